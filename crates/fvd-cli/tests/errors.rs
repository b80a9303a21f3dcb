//! Every failure: one line `fvd: …` naming the file, a non-zero exit status,
//! and the file left byte for byte as it was.

mod common;

use std::path::Path;

use common::{fails_cleanly, fvd};

/// Header slot size and the offset of its CRC.
const SLOT: usize = 4096;
const CRC_AT: usize = 4092;

/// The usual operations on an image; each must fail the same way.
fn every_opener(dir: &Path, file: &str, needle: &str) {
    for args in [
        vec!["info", file],
        vec!["info", "--output=json", file],
        vec!["map", file],
        vec!["io", "-c", "write 0 512", file],
        vec!["io", "-r", "-c", "read 0 512", file],
        vec!["convert", file, "out.fvd"],
        vec!["compare", file, file],
    ] {
        fails_cleanly(dir, &args, file, needle);
        assert!(
            !dir.join("out.fvd").exists(),
            "convert left its output behind"
        );
    }
}

/// A small FVD image with some data, closed cleanly.
fn make_image(dir: &Path, name: &str) {
    fvd(dir, &["create", name, "4M"]).ok("create");
    fvd(dir, &["io", "-c", "write -P 0x42 0 64k", name]).ok("write");
}

fn patch(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

fn slot_is_valid(b: &[u8], slot: usize) -> bool {
    let s = &b[slot * SLOT..(slot + 1) * SLOT];
    s[..4] == *b"\x89FVD"
        && u32::from_le_bytes(s[CRC_AT..].try_into().unwrap()) == crc32c::crc32c(&s[..CRC_AT])
}

#[test]
fn wrong_magic() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(d.join("disk.raw"), data).unwrap();
    every_opener(d, "disk.raw", "not an FVD image");
    fails_cleanly(d, &["check", "disk.raw"], "disk.raw", "not an FVD image");
}

#[test]
fn truncated_image() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "t.fvd");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.fvd"))
        .unwrap();
    f.set_len(2 << 20).unwrap();
    drop(f);
    every_opener(d, "t.fvd", "truncated");
    // Cut inside the header area too.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("t.fvd"))
        .unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    every_opener(d, "t.fvd", "not an FVD image");
}

#[test]
fn bad_header_crc() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "c.fvd");
    patch(&d.join("c.fvd"), |b| {
        b[100] ^= 0x5a;
        b[SLOT + 100] ^= 0x5a;
    });
    every_opener(d, "c.fvd", "checksum");
}

#[test]
fn unknown_incompatible_feature() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "f.fvd");
    patch(&d.join("f.fvd"), |b| {
        for slot in 0..2 {
            if !slot_is_valid(b, slot) {
                continue;
            }
            let s = &mut b[slot * SLOT..(slot + 1) * SLOT];
            s[31] |= 0x40; // bit 62 of the incompatible features at 24..32
            let crc = crc32c::crc32c(&s[..CRC_AT]);
            s[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        }
    });
    every_opener(d, "f.fvd", "incompatible feature");
}

#[test]
fn missing_base() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "base.raw", "2M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 7 0 1M", "base.raw"]).ok("fill base");
    fvd(d, &["create", "-b", "base.raw", "-F", "raw", "over.fvd"]).ok("create");
    std::fs::remove_file(d.join("base.raw")).unwrap();
    every_opener(d, "over.fvd", "base image not found");
}

#[test]
fn size_not_a_multiple_of_512() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fails_cleanly(
        d,
        &["create", "x.fvd", "1000"],
        "x.fvd",
        "size 1000 is not a multiple of 512",
    );
    assert!(!d.join("x.fvd").exists());
    fails_cleanly(
        d,
        &["create", "-f", "raw", "x.raw", "1000"],
        "x.raw",
        "not a multiple of 512",
    );
    assert!(!d.join("x.raw").exists());
    fails_cleanly(d, &["create", "x.fvd", "12Q"], "x.fvd", "invalid size");
    fails_cleanly(
        d,
        &["create", "x.fvd", "1.3k"],
        "x.fvd",
        "not a whole number",
    );
}

#[test]
fn existing_files_are_not_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "a.fvd");
    make_image(d, "b.fvd");
    fails_cleanly(d, &["create", "a.fvd", "1M"], "a.fvd", "exists");
    fails_cleanly(d, &["convert", "a.fvd", "b.fvd"], "b.fvd", "exists");
}

/// Makes a file unwritable even for root (immutable attribute), undone on drop.
struct Immutable<'a>(&'a Path);

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(self.0)
            .status();
    }
}

#[test]
fn read_only_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "ro.fvd");
    let path = d.join("ro.fvd");
    let is_root = unsafe_free_euid_is_root();
    let _guard = if is_root {
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "NOTE: running as root and chattr +i does not work here; read-only case skipped"
            );
            return;
        }
        Some(Immutable(&path))
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        None
    };
    fails_cleanly(
        d,
        &["io", "-c", "write 0 512", "ro.fvd"],
        "ro.fvd",
        "read-only",
    );
    // Reading still works.
    fvd(d, &["io", "-r", "-c", "read -P 0x42 0 64k", "ro.fvd"]).ok("read-only open");
    fvd(d, &["info", "ro.fvd"]).ok("info of a read-only file");
}

/// True when running as root (from /proc, to keep the test free of unsafe code).
fn unsafe_free_euid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn image_in_use() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "busy.fvd");
    let path = d.join("busy.fvd");
    let held = fvd_core::executor::block_on(fvd_core::open_path(
        &path,
        fvd_core::Format::Fvd,
        fvd_core::PathOptions::default(),
    ))
    .expect("open read-write");
    fails_cleanly(
        d,
        &["io", "-c", "write 0 512", "busy.fvd"],
        "busy.fvd",
        "in use",
    );
    fails_cleanly(d, &["info", "busy.fvd"], "busy.fvd", "in use");
    // -U inspects it anyway.
    fvd(d, &["info", "-U", "busy.fvd"]).ok("info -U");
    fvd_core::executor::block_on(held.close()).expect("close");
}

#[test]
fn io_command_errors_fail_the_run_but_not_the_image() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d, "e.fvd");
    let r = fvd(
        d,
        &[
            "io",
            "-c",
            "write 4M 512",
            "-c",
            "read -P 0x42 0 4k",
            "-c",
            "bogus 1 2",
            "e.fvd",
        ],
    );
    r.expect_code(1, "io with failing commands");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stderr);
    assert!(
        lines[0].starts_with("fvd: write failed: e.fvd: "),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("outside the virtual disk"),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("bogus"), "{}", lines[1]);
    assert!(r.stdout.contains("read 4096/4096 bytes at offset 0"));
    fvd(d, &["check", "e.fvd"]).ok("check after failed commands");
}
