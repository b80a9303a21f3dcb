//! `bench/run --quick --smoke`: the side-by-side benchmark harness runs end
//! to end on a tiny disk (every system, both exports, every workload once),
//! writes its results, leaves docs/BENCHMARKS.md alone and leaves nothing
//! mounted or attached behind; and a system that fails to start fails the
//! run. Needs root, /dev/fuse, loop devices and the benchmark tools (fio,
//! postmark, nbdfuse, qemu-storage-daemon...); skipped with a note otherwise.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Hard limit for one harness run; a smoke run normally takes ~45 s.
const LIMIT: Duration = Duration::from_secs(120);

const SYSTEMS: [&str; 6] = [
    "fvd",
    "fvd-compact",
    "raw-fvd",
    "raw-qsd",
    "qcow2",
    "qcow2-2m",
];
const EXPORTS: [&str; 2] = ["nbd", "fuse"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn have(tool: &str) -> bool {
    fvd_testkit::find_tool(tool).is_some()
}

/// True if the harness can run here; otherwise print why not.
fn usable() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        fvd_testkit::skip("bench/run needs root (FUSE mounts, loop devices)");
        return false;
    }
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(dev).exists() {
            fvd_testkit::skip(&format!("{dev} is missing"));
            return false;
        }
    }
    let tools = [
        "python3",
        "fio",
        "postmark",
        "nbdfuse",
        "qemu-img",
        "qemu-storage-daemon",
        "losetup",
        "mkfs.ext4",
        "fusermount3",
        "stdbuf",
        "setpriv",
        "findmnt",
    ];
    for t in tools {
        if !have(t) {
            fvd_testkit::skip(&format!(
                "{t} is not installed (apt-get install -y fio postmark libnbd-bin fuse3)"
            ));
            return false;
        }
    }
    let nbd_engine = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("uri"))
        .unwrap_or(false);
    if !nbd_engine {
        fvd_testkit::skip("this fio has no nbd ioengine");
        return false;
    }
    true
}

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Run bench/run with `args` and FVD set to `fvd`; SIGTERM it (the harness
/// then cleans up) and fail if it runs longer than LIMIT.
fn bench(args: &[&str], fvd: &Path) -> Outcome {
    let script = repo_root().join("bench/run");
    let start = Instant::now();
    let mut child = Command::new(&script)
        .args(args)
        .env("FVD", fvd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bench/run");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > LIMIT && !timed_out {
            timed_out = true;
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        if start.elapsed() > LIMIT + Duration::from_secs(60) {
            let _ = child.kill();
        }
        thread::sleep(Duration::from_millis(100));
    };
    let o = Outcome {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    };
    assert!(
        !timed_out,
        "bench/run {args:?} ran longer than {LIMIT:?}\nstderr:\n{}",
        o.stderr
    );
    o
}

/// Nothing of a run may stay mounted or attached under `dir`.
fn assert_nothing_left(dir: &Path) {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let d = dir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&d)).collect();
    assert!(left.is_empty(), "still mounted under {d}: {left:#?}");
    let loops = Command::new("losetup")
        .arg("-a")
        .output()
        .expect("losetup -a");
    let loops = String::from_utf8_lossy(&loops.stdout).into_owned();
    let left: Vec<&str> = loops.lines().filter(|l| l.contains(&d)).collect();
    assert!(
        left.is_empty(),
        "loop devices still attached under {d}: {left:#?}"
    );
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        entries.is_empty(),
        "the harness left files in {d}: {entries:?}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn smoke_run_covers_every_system_and_cleans_up() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let docs = repo_root().join("docs/BENCHMARKS.md");
    let docs_before = std::fs::read(&docs).ok();

    let o = bench(
        &[
            "--quick",
            "--smoke",
            "--out",
            s(&out),
            "--workdir",
            s(&work),
        ],
        Path::new(env!("CARGO_BIN_EXE_fvd")),
    );
    eprintln!("bench/run --quick --smoke took {:?}", o.elapsed);
    assert!(
        o.status.success(),
        "bench/run --quick --smoke failed ({})\nstderr:\n{}",
        o.status,
        o.stderr
    );
    assert_nothing_left(&work);
    assert_eq!(
        std::fs::read(&docs).ok(),
        docs_before,
        "a smoke run must not touch docs/BENCHMARKS.md"
    );

    // The results: TSV, JSON and Markdown of this run.
    let files: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("results directory")
        .map(|e| e.expect("entry").path())
        .collect();
    let find = |ext: &str| {
        files
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == ext))
            .unwrap_or_else(|| panic!("no .{ext} result in {files:?}"))
            .clone()
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(find("json")).expect("read json"))
            .expect("results JSON");
    let md = std::fs::read_to_string(find("md")).expect("read md");
    let tsv = std::fs::read_to_string(find("tsv")).expect("read tsv");
    assert!(tsv.starts_with("rep\tpart\texport\tsystem\tworkload\tqd\tmetric\tvalue\tunit\n"));
    assert_eq!(json["mode"], "smoke");
    assert_eq!(
        json["problems"].as_array().map(Vec::len),
        Some(0),
        "{}",
        json["problems"]
    );

    let medians = json["medians"].as_array().expect("medians");
    let median = |part: &str, export: &str, system: &str, workload: &str, metric: &str| {
        medians
            .iter()
            .find(|m| {
                m["part"] == part
                    && m["export"] == export
                    && m["system"] == system
                    && m["workload"] == workload
                    && m["metric"] == metric
            })
            .and_then(|m| m["median"].as_f64())
            .unwrap_or_else(|| panic!("no median {part}/{export}/{system}/{workload}/{metric}"))
    };
    for export in EXPORTS {
        for system in SYSTEMS {
            for wl in [
                "firstwrite",
                "overwrite",
                "baseread",
                "localread",
                "seqwrite",
                "seqread",
            ] {
                let v = median("block", export, system, wl, "iops");
                assert!(v > 0.0, "{export}/{system}/{wl}: {v} IOPS");
            }
            let g = median("block", export, system, "firstwrite", "growth_per_written");
            assert!(g > 0.0, "{export}/{system}: growth {g}");
            assert!(median("fs", export, system, "files", "files_s") > 0.0);
            assert!(median("fs", export, system, "postmark", "tps") > 0.0);
            assert!(median("fs", export, system, "postmark", "size_after") > 0.0);
        }
    }
    for system in ["fvd", "fvd-compact"] {
        assert!(median("meta", "-", system, "1t-bench", "metadata_bytes") > 0.0);
    }
    for system in ["qcow2", "qcow2-2m"] {
        assert!(median("meta", "-", system, "1t-full", "l2_bytes") > 0.0);
    }

    for needle in [
        "<!-- bench/run: begin",
        "<!-- bench/run: end -->",
        "#### Block I/O through NBD",
        "#### Block I/O through FUSE",
        "#### File systems",
        "#### Space",
        "#### Metadata",
        "#### Targets",
        "Exact commands",
    ] {
        assert!(md.contains(needle), "the report lacks {needle:?}:\n{md}");
    }
    assert!(
        o.stdout.contains("#### Targets"),
        "the report goes to stdout too"
    );
}

#[test]
fn a_system_that_fails_to_start_fails_the_run() {
    if !usable() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    // An fvd whose `serve` dies at once; everything else is the real one.
    let wrapper = tmp.path().join("fvd-broken-serve");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = serve ]; then echo 'serve: broken on purpose' >&2; exit 3; fi\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_fvd")
        ),
    )
    .expect("write wrapper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let o = bench(
        &[
            "--quick",
            "--smoke",
            "--systems",
            "fvd",
            "--exports",
            "nbd",
            "--parts",
            "block",
            "--out",
            s(&out),
            "--workdir",
            s(&work),
        ],
        &wrapper,
    );
    assert!(
        !o.status.success(),
        "bench/run succeeded with a broken server"
    );
    assert!(
        o.stderr.contains("exited with status 3") && o.stderr.contains("broken on purpose"),
        "the failure must name the system and show its log:\n{}",
        o.stderr
    );
    assert!(
        !out.exists()
            || std::fs::read_dir(&out)
                .map(|mut d| d.next().is_none())
                .unwrap_or(true),
        "a failed run must not write results"
    );
    assert_nothing_left(&work);
}
