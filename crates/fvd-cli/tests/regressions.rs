//! Regression tests of the defects found by hostile testing (issue 16): each
//! reproduces the report and asserts what a user should get instead.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fails_cleanly, file_hash, fvd, json};

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

/// Run `fvd args` in `dir` with standard output going to `stdout`.
fn fvd_to(dir: &Path, args: &[&str], stdout: Stdio) -> (i32, String) {
    let out = Command::new(FVD)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run fvd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A pipe whose reading end is already closed: every write gets EPIPE.
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

/// An image over a base, with local data and a stored prefetch profile.
fn image_with_profile(d: &Path) {
    fvd(d, &["create", "-q", "-f", "raw", "base.raw", "4M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 3 0 4M", "base.raw"]).ok("fill base");
    fvd(
        d,
        &["create", "-q", "-b", "base.raw", "-F", "raw", "img.fvd"],
    )
    .ok("create");
    fvd(d, &["io", "-c", "write -P 9 64k 64k", "img.fvd"]).ok("write");
    let entries: Vec<(u64, u64)> = (0..200).map(|i| (i * 4096, 4096)).collect();
    std::fs::write(d.join("p.profile"), profile_bytes(&entries)).unwrap();
    fvd(d, &["profile", "import", "img.fvd", "p.profile"]).ok("import");
}

/// Defect 1: a reader that went away, or a full disk, on standard output.
#[test]
fn closed_or_full_stdout_is_not_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    image_with_profile(d);
    let commands: [&[&str]; 6] = [
        &["io", "-c", "read -v 0 1M", "img.fvd"],
        &["map", "img.fvd"],
        &["check", "img.fvd"],
        &["profile", "show", "-v", "img.fvd"],
        &["info", "--output=json", "img.fvd"],
        &["map", "--output=json", "img.fvd"],
    ];
    for args in commands {
        let before = file_hash(&d.join("img.fvd"));
        let (code, stderr) = fvd_to(d, args, closed_pipe());
        assert_eq!(code, 0, "{args:?} on a closed pipe: exit {code}\n{stderr}");
        assert!(
            stderr.is_empty(),
            "{args:?} on a closed pipe said:\n{stderr}"
        );
        if args[0] != "io" {
            assert_eq!(before, file_hash(&d.join("img.fvd")), "{args:?}");
        }
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let (code, stderr) = fvd_to(d, args, Stdio::from(full));
        assert_eq!(code, 1, "{args:?} >/dev/full: exit {code}\n{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?} >/dev/full:\n{stderr}");
        assert!(
            lines[0].starts_with("fvd: ") && lines[0].contains("standard output"),
            "{args:?}: {}",
            lines[0]
        );
    }
    // The image was closed cleanly by every run.
    fvd(d, &["check", "img.fvd"]).ok("check after");
}

/// Run `fvd args` in `dir`, killing it if it has not finished in 10 s.
fn fvd_deadline(dir: &Path, args: &[&str]) -> (i32, String) {
    let mut child = Command::new(FVD)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fvd");
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code().unwrap_or(-1), err);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fvd {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Defect 2: FIFOs as images or bases must not block forever.
#[test]
fn fifo_images_and_bases_are_refused_at_once() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    mkfifo(&d.join("p"));
    for args in [
        vec!["info", "p"],
        vec!["io", "-r", "-c", "read 0 512", "p"],
        vec!["io", "-c", "read 0 512", "p"],
        vec!["check", "p"],
        vec!["create", "-b", "p", "-F", "raw", "x.fvd", "1M"],
    ] {
        let (code, err) = fvd_deadline(d, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains("not a regular file or block device"),
            "{args:?}: {err}"
        );
        assert!(err.contains("p:"), "{args:?} does not name the FIFO: {err}");
    }
    assert!(!d.join("x.fvd").exists());
    // A base that became a FIFO.
    fvd(d, &["create", "-q", "-f", "raw", "b.raw", "1M"]).ok("base");
    fvd(d, &["create", "-q", "-b", "b.raw", "-F", "raw", "o.fvd"]).ok("image");
    std::fs::remove_file(d.join("b.raw")).unwrap();
    mkfifo(&d.join("b.raw"));
    let (code, err) = fvd_deadline(d, &["io", "-r", "-c", "read 0 512", "o.fvd"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("b.raw: is not a regular file or block device"),
        "{err}"
    );
}

/// Defect 4: freed 512-byte chunks sharing a file-system block are given
/// back once the whole block is free; check is clean after a normal close.
#[test]
fn small_chunks_freed_by_discard_are_not_leaks() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(
        d,
        &[
            "create",
            "-q",
            "-o",
            "compact=on,block_size=512,chunk_size=512",
            "r.fvd",
            "1M",
        ],
    )
    .ok("create");
    fvd(
        d,
        &[
            "io",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -z -u 0 32k",
            "r.fvd",
        ],
    )
    .ok("io");
    fvd(d, &["check", "r.fvd"]).ok("check after contiguous frees");
    // Frees scattered over many file-system blocks, one chunk at a time.
    let mut args = vec!["io".to_string()];
    for i in 0..64u64 {
        args.push("-c".into());
        args.push(format!("write -z -u {} 512", (i * 7 % 64) * 512 + 32768));
    }
    args.push("r.fvd".into());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    fvd(d, &a).ok("scattered frees");
    fvd(d, &["check", "r.fvd"]).ok("check after scattered frees");
    let r = fvd(d, &["info", "--output=json", "r.fvd"]);
    r.ok("info");
    let v = json(&r.stdout);
    assert!(
        v["actual-size"].as_u64().unwrap() < 11 << 20,
        "{}",
        r.stdout
    );
}

/// An encoded prefetch profile (docs/FORMAT.md §7).
fn profile_bytes(entries: &[(u64, u64)]) -> Vec<u8> {
    let mut b = vec![0u8; 32 + 16 * entries.len()];
    b[..4].copy_from_slice(b"FVDP");
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[8..16].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    for (i, (o, l)) in entries.iter().enumerate() {
        b[32 + 16 * i..40 + 16 * i].copy_from_slice(&o.to_le_bytes());
        b[40 + 16 * i..48 + 16 * i].copy_from_slice(&l.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b[32..]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Defect 5: profile ranges are checked against the base, not the image.
#[test]
fn profile_import_checks_the_base_size() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "-f", "raw", "base.raw", "16M"]).ok("base");
    fvd(
        d,
        &[
            "create", "-q", "-b", "base.raw", "-F", "raw", "big.fvd", "32M",
        ],
    )
    .ok("32M");
    fvd(
        d,
        &[
            "create",
            "-q",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "small.fvd",
            "8M",
        ],
    )
    .ok("8M");
    std::fs::write(d.join("past.profile"), profile_bytes(&[(16 << 20, 4096)])).unwrap();
    std::fs::write(d.join("inside.profile"), profile_bytes(&[(10 << 20, 4096)])).unwrap();
    std::fs::write(d.join("zero.profile"), profile_bytes(&[(0, 0)])).unwrap();
    fails_cleanly(
        d,
        &["profile", "import", "big.fvd", "past.profile"],
        "past.profile",
        "outside the base",
    );
    fvd(d, &["profile", "import", "small.fvd", "inside.profile"]).ok("inside the base");
    let r = fvd(d, &["profile", "show", "-v", "small.fvd"]);
    r.ok("show");
    assert!(r.stdout.contains("1 ranges"), "{}", r.stdout);
    let r = fails_cleanly(
        d,
        &["profile", "import", "big.fvd", "zero.profile"],
        "zero.profile",
        "length 0",
    );
    assert!(!r.stderr.contains("outside"), "{}", r.stderr);
    fvd(d, &["create", "-q", "nobase.fvd", "8M"]).ok("no base");
    fails_cleanly(
        d,
        &["profile", "import", "nobase.fvd", "inside.profile"],
        "nobase.fvd",
        "has no base",
    );
}

/// Defect 6: a directory as base, and a base chain that loops.
#[test]
fn directory_bases_and_chain_loops_are_named() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::create_dir(d.join("dir")).unwrap();
    fails_cleanly(
        d,
        &["create", "-b", "dir", "-F", "raw", "x.fvd", "1M"],
        "x.fvd",
        "dir: is a directory",
    );
    fvd(d, &["create", "-q", "-f", "raw", "b.raw", "1M"]).ok("base");
    fvd(d, &["create", "-q", "-b", "b.raw", "-F", "raw", "o.fvd"]).ok("image");
    std::fs::remove_file(d.join("b.raw")).unwrap();
    std::fs::create_dir(d.join("b.raw")).unwrap();
    for args in [
        vec!["info", "o.fvd"],
        vec!["io", "-c", "read 0 512", "o.fvd"],
    ] {
        let r = fails_cleanly(d, &args, "o.fvd", "b.raw: is a directory");
        assert!(!r.stderr.contains("9223372036854775807"), "{}", r.stderr);
    }
    // A -> B -> A.
    fvd(d, &["create", "-q", "a.fvd", "1M"]).ok("a");
    fvd(d, &["create", "-q", "-b", "a.fvd", "-F", "fvd", "b.fvd"]).ok("b over a");
    fvd(d, &["create", "-q", "-b", "b.fvd", "-F", "fvd", "a2.fvd"]).ok("a2 over b");
    std::fs::rename(d.join("a2.fvd"), d.join("a.fvd")).unwrap();
    for args in [
        vec!["io", "-c", "read 0 512", "a.fvd"],
        vec!["io", "-r", "-c", "read 0 512", "a.fvd"],
        vec!["info", "a.fvd"],
        vec!["check", "a.fvd"],
    ] {
        let r = fails_cleanly(d, &args, "a.fvd", "base chain loops back to");
        assert!(!r.stderr.contains("in use"), "{}", r.stderr);
    }
}

/// Defect 8: the commands the demo suggests work as printed.
#[test]
fn demo_suggestions_work_as_printed() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let r = fvd(d, &["demo"]);
    r.ok("demo");
    let tail = r
        .stdout
        .split("Try next:")
        .nth(1)
        .unwrap_or_else(|| panic!("no suggestions:\n{}", r.stdout));
    let cmds: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("fvd "))
        .collect();
    assert!(cmds.len() >= 3, "{tail}");
    for c in cmds {
        let words: Vec<&str> = c.split_whitespace().skip(1).collect();
        let r = fvd(d, &words);
        // compare: 0 same, 1 different (the image was written), 2 error.
        let fine = r.code == 0 || (words[0] == "compare" && r.code == 1);
        assert!(fine, "{c}: exit {}\n{}{}", r.code, r.stdout, r.stderr);
    }
}

/// Defect 9: the stats printed at exit give the server's real uptime.
#[test]
fn serve_uptime_is_real() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "img.fvd", "1M"]).ok("create");
    let child = Command::new(FVD)
        .args(["serve", "--socket", "s.sock", "img.fvd"])
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let t0 = Instant::now();
    while !d.join("s.sock").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find_map(|l| l.strip_prefix("fvd serve: stats "))
        .unwrap_or_else(|| panic!("no stats line:\n{err}"));
    let up = json(line)["uptime-seconds"].as_f64().unwrap();
    let wall = t0.elapsed().as_secs_f64();
    assert!(up >= 1.4 && up <= wall + 1.0, "uptime {up} s, ran {wall} s");
}

/// Defect 10: a sparse image too large for the host file system is refused
/// with the limit named and compact images suggested.
#[test]
fn sparse_image_past_the_file_size_limit() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let r = fvd(d, &["create", "big.fvd", "64T"]);
    if r.code == 0 {
        // This file system holds 64 TiB files (xfs, btrfs, tmpfs): fine.
        assert!(!is_ext4(d), "ext4 cannot hold a 64 TiB file");
        return;
    }
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(lines[0].contains("big.fvd"), "{}", lines[0]);
    assert!(lines[0].contains("largest file"), "{}", lines[0]);
    assert!(lines[0].contains("compact=on"), "{}", lines[0]);
    assert!(!lines[0].contains("os error"), "{}", lines[0]);
    assert!(!d.join("big.fvd").exists(), "a failed create left a file");
    fvd(d, &["create", "-q", "-o", "compact=on", "big.fvd", "64T"]).ok("compact 64T");
}

fn is_ext4(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs fills the zeroed struct we own.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0) && s.f_type == 0xEF53
}

/// Defect 3: a base rewritten in place (same size) is noticed at open.
#[test]
fn base_modified_in_place_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "-f", "raw", "base.raw", "8M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 5 0 8M", "base.raw"]).ok("fill");
    fvd(
        d,
        &["create", "-q", "-b", "base.raw", "-F", "raw", "img.fvd"],
    )
    .ok("image");
    fvd(d, &["io", "-r", "-c", "read -P 5 0 4k", "img.fvd"]).ok("read before");
    // A few bytes, in the first MiB, at the end, and in the middle sample.
    for (off, what) in [(1000u64, "head"), ((8 << 20) - 100, "tail")] {
        fvd(
            d,
            &[
                "io",
                "-f",
                "raw",
                "-c",
                &format!("write -P 6 {off} 8"),
                "base.raw",
            ],
        )
        .ok("modify base");
        for args in [
            vec!["io", "-r", "-c", "read 0 512", "img.fvd"],
            vec!["info", "img.fvd"],
            vec!["io", "-c", "read 0 512", "img.fvd"],
        ] {
            let r = fails_cleanly(d, &args, "img.fvd", "changed");
            assert!(r.stderr.contains("base.raw"), "{what}: {}", r.stderr);
        }
        // The escape hatches: -U for a look, rebase -u to accept the base.
        fvd(d, &["io", "-r", "-U", "-c", "read 0 512", "img.fvd"]).ok("-U");
        fvd(
            d,
            &["rebase", "-u", "-b", "base.raw", "-F", "raw", "img.fvd"],
        )
        .ok("rebase -u");
        fvd(d, &["io", "-c", "read -P 5 8192 4k", "img.fvd"]).ok("after rebase -u");
    }
}
