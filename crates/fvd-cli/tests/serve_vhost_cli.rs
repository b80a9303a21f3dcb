//! `fvd serve --vhost-user-blk`: option errors, the socket's lifecycle and
//! SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

#[test]
fn conflicting_and_bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::fvd(dir.path(), &["create", "-q", "d.fvd", "16M"]).ok("create");
    let r = common::fvd(
        dir.path(),
        &[
            "serve",
            "--vhost-user-blk",
            "v.sock",
            "--socket",
            "n.sock",
            "d.fvd",
        ],
    );
    r.expect_code(1, "both transports");
    assert!(r.stderr.contains("--socket"), "{}", r.stderr);
    let r = common::fvd(dir.path(), &["serve", "--num-queues", "2", "d.fvd"]);
    r.expect_code(1, "--num-queues without --vhost-user-blk");
    let r = common::fvd(
        dir.path(),
        &[
            "serve",
            "--vhost-user-blk",
            "v.sock",
            "--num-queues",
            "0",
            "d.fvd",
        ],
    );
    r.expect_code(1, "zero queues");
    assert!(r.stderr.contains("--num-queues"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr); // refused before serving
    // Something that is not a socket is never replaced.
    std::fs::write(dir.path().join("file"), b"keep").unwrap();
    let r = common::fvd(dir.path(), &["serve", "--vhost-user-blk", "file", "d.fvd"]);
    r.expect_code(1, "not a socket");
    assert!(r.stderr.contains("not a socket"), "{}", r.stderr);
    assert_eq!(std::fs::read(dir.path().join("file")).unwrap(), b"keep");
    // Every refusal left the image closed cleanly.
    let r = common::fvd(dir.path(), &["check", "d.fvd"]);
    r.ok("check");
}

#[test]
fn sigterm_without_a_front_end_closes_cleanly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    common::fvd(dir.path(), &["create", "-q", "d.fvd", "16M"]).ok("create");
    let sock = dir.path().join("v.sock");
    let child = Command::new(FVD)
        .args(["serve", "-v", "--vhost-user-blk"])
        .arg(&sock)
        .arg(dir.path().join("d.fvd"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A second server on the same live socket is refused.
    common::fvd(dir.path(), &["create", "-q", "e.fvd", "16M"]).ok("create");
    let r = common::fvd(
        dir.path(),
        &["serve", "--vhost-user-blk", "v.sock", "e.fvd"],
    );
    r.expect_code(1, "socket in use");
    assert!(r.stderr.contains("already listening"), "{}", r.stderr);
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("closed cleanly"), "{err}");
    assert!(!sock.exists(), "the socket is removed");
    common::fvd(dir.path(), &["check", "d.fvd"]).ok("check");
}
