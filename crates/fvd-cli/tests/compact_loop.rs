//! Compact images on a raw block device (a loop device with no file system
//! on it): growth through a grow command, and ENOSPC without one.

use std::path::Path;
use std::process::{Command, Stdio};

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

fn usable() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        fvd_testkit::skip("loop devices need root");
        return false;
    }
    fvd_testkit::have_tools(&["losetup"])
}

fn run(prog: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loop device over a `size`-byte file; detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(file: &Path, size: u64) -> Loop {
        std::fs::File::create(file).unwrap().set_len(size).unwrap();
        let (ok, out, err) = run("losetup", &["-f", "--show", file.to_str().unwrap()]);
        assert!(ok, "losetup: {err}");
        Loop {
            dev: out.trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

fn fvd(args: &[&str]) -> (bool, String, String) {
    run(FVD, args)
}

#[test]
fn compact_image_on_a_loop_device_grows_through_the_grow_command() {
    if !usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("lv.img");
    let lo = Loop::new(&backing, 16 << 20);
    let grow = format!(
        "truncate -s +{{bytes}} {} && losetup -c {{path}}",
        backing.display()
    );
    let opts = format!(
        "compact=on,chunk_size=1M,journal_size=256K,grow_cmd={}",
        grow.replace(',', ",,")
    );
    let (ok, _, err) = fvd(&["create", "-o", &opts, &lo.dev, "256M"]);
    assert!(ok, "create: {err}");
    // 96 MiB of data: far more than the 16 MiB device holds at first.
    let (ok, out, err) = fvd(&[
        "io",
        "-c",
        "write -P 0x5a 0 32M",
        "-c",
        "write -P 0x6b 180M 64M",
        "-c",
        "read -P 0x5a 0 32M",
        "-c",
        "read -P 0x6b 180M 64M",
        "-c",
        "read -P 0 100M 1M",
        &lo.dev,
    ]);
    assert!(ok, "io: {err}\n{out}");
    let dev_size = std::fs::metadata(&backing).unwrap().len();
    assert!(dev_size >= 96 << 20, "the device did not grow: {dev_size}");
    let (ok, out, err) = fvd(&["check", &lo.dev]);
    assert!(ok, "check: {err}\n{out}");
    let (ok, out, _) = fvd(&["info", "--output=json", &lo.dev]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["format-specific"]["data"]["compact"]["allocated-chunks"], 96,
        "{out}"
    );
    // Reopen and verify again.
    let (ok, out, err) = fvd(&[
        "io",
        "-r",
        "-c",
        "read -P 0x6b 180M 64M",
        "-c",
        "read -P 0x5a 0 32M",
        &lo.dev,
    ]);
    assert!(ok, "{err}\n{out}");
}

#[test]
fn compact_image_on_a_full_device_fails_with_enospc_and_stays_consistent() {
    if !usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("lv.img");
    let lo = Loop::new(&backing, 16 << 20);
    let (ok, _, err) = fvd(&[
        "create",
        "-o",
        "compact=on,chunk_size=1M,journal_size=256K",
        &lo.dev,
        "256M",
    ]);
    assert!(ok, "create: {err}");
    let (ok, out, err) = fvd(&["io", "-c", "write -P 0x11 0 2M", &lo.dev]);
    assert!(ok, "{err}{out}");
    let (ok, out, err) = fvd(&["io", "-c", "write -P 0x22 50M 32M", &lo.dev]);
    assert!(!ok, "a write past the device's capacity succeeded: {out}");
    assert!(
        err.contains("space") || out.contains("space"),
        "no ENOSPC message: {err}{out}"
    );
    let (ok, out, err) = fvd(&["check", &lo.dev]);
    assert!(ok, "check after ENOSPC: {err}\n{out}");
    let (ok, out, err) = fvd(&["io", "-r", "-c", "read -P 0x11 0 2M", &lo.dev]);
    assert!(ok, "{err}{out}");
}
