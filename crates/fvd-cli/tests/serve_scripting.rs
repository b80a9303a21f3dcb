//! `fvd serve` as scripts and service managers start it: `--pidfile`,
//! `--fork` (returns only once the socket accepts, as qemu-nbd --fork), and
//! systemd socket activation (the listening socket as descriptor 3 with
//! `LISTEN_FDS`/`LISTEN_PID`), over NBD and over vhost-user-blk.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fvd, have_tools, run_in};

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

/// Read the NBD greeting on `sock` (within 5 s).
fn greeted(sock: &Path) -> bool {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 16];
    s.read_exact(&mut g).is_ok() && &g[..8] == b"NBDMAGIC"
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn wait_gone(pid: i32) {
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(20), "{pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_in(file: &Path) -> i32 {
    std::fs::read_to_string(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn pidfile_is_written_when_serving_and_removed_at_exit() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "img.fvd", "1M"]).ok("create");
    let mut child = Command::new(FVD)
        .args([
            "serve",
            "--pidfile",
            "s.pid",
            "--socket",
            "s.sock",
            "img.fvd",
        ])
        .current_dir(d)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !d.join("s.pid").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no pid file");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Written only once the socket accepts.
    assert!(greeted(&d.join("s.sock")));
    assert_eq!(pid_in(&d.join("s.pid")), child.id() as i32);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!d.join("s.pid").exists(), "pid file left behind");
    assert!(!d.join("s.sock").exists(), "socket left behind");
}

#[test]
fn fork_returns_once_the_socket_accepts() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "img.fvd", "4M"]).ok("create");
    // Captured output: the command must return although the server lives on.
    let r = fvd(
        d,
        &[
            "serve",
            "--fork",
            "--pidfile",
            "s.pid",
            "--socket",
            "s.sock",
            "img.fvd",
        ],
    );
    r.ok("serve --fork");
    assert!(
        r.stderr.contains("fvd serve: serving img.fvd"),
        "{}",
        r.stderr
    );
    // No wait: the socket accepts right now.
    assert!(
        greeted(&d.join("s.sock")),
        "not accepting when --fork returned"
    );
    let uri = format!("nbd+unix:///?socket={}", d.join("s.sock").display());
    run_in(d, "qemu-io", &["-f", "raw", "-c", "write -P 7 0 64k", &uri]).ok("write");
    run_in(d, "qemu-io", &["-f", "raw", "-c", "read -P 7 0 64k", &uri]).ok("read");
    let pid = pid_in(&d.join("s.pid"));
    assert!(alive(pid));
    // SAFETY: signalling the server we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    assert!(!d.join("s.pid").exists() && !d.join("s.sock").exists());
    fvd(d, &["check", "img.fvd"]).ok("closed cleanly");
    fvd(d, &["io", "-c", "read -P 7 0 64k", "img.fvd"]).ok("data kept");
    // A server that cannot start: the error, and a failing status.
    let r = fvd(
        d,
        &[
            "serve",
            "--fork",
            "--pidfile",
            "x.pid",
            "--socket",
            "x.sock",
            "none.fvd",
        ],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("none.fvd"), "{}", r.stderr);
    assert!(!d.join("x.pid").exists() && !d.join("x.sock").exists());
}

/// Start `fvd serve ARGS` the way systemd does with socket activation:
/// `listener` becomes descriptor 3, `LISTEN_FDS=1`, `LISTEN_PID` its pid.
fn activated(d: &Path, listener: &impl AsRawFd, args: &[&str]) -> std::process::Child {
    let fd = listener.as_raw_fd();
    let script = format!(
        "LISTEN_PID=$$ LISTEN_FDS=1 exec {FVD} serve {}",
        args.join(" ")
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script])
        .current_dir(d)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe. (dup2 onto itself
    // would keep the close-on-exec flag: clear it instead.)
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

#[test]
fn systemd_socket_activation() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "img.fvd", "4M"]).ok("create");
    // A unix socket made by the "service manager".
    let sock = d.join("act.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let child = activated(d, &l, &["img.fvd"]);
    drop(l);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    run_in(d, "qemu-io", &["-f", "raw", "-c", "write -P 9 1M 4k", &uri]).ok("write over unix");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(sock.exists(), "the activator's socket file must stay");
    fvd(d, &["io", "-c", "read -P 9 1M 4k", "img.fvd"]).ok("data");
    // TCP.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut child = activated(d, &l, &["img.fvd"]);
    drop(l);
    let uri = format!("nbd://127.0.0.1:{port}/");
    run_in(d, "qemu-io", &["-f", "raw", "-c", "read -P 9 1M 4k", &uri]).ok("read over TCP");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // Activation and an address of our own do not mix.
    let l = std::os::unix::net::UnixListener::bind(d.join("b.sock")).unwrap();
    let child = activated(d, &l, &["--socket", "other.sock", "img.fvd"]);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("LISTEN_FDS"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// True if something accepts connections on the unix socket `sock`.
fn accepting(sock: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(sock).is_ok()
}

/// The vhost-user-blk export starts the same ways: `--fork` with
/// `--pidfile`, and socket activation (a unix socket only).
#[test]
fn vhost_user_blk_fork_pidfile_and_activation() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-q", "img.fvd", "4M"]).ok("create");
    let r = fvd(
        d,
        &[
            "serve",
            "--fork",
            "--pidfile",
            "v.pid",
            "--vhost-user-blk",
            "v.sock",
            "img.fvd",
        ],
    );
    r.ok("serve --fork --vhost-user-blk");
    assert!(r.stderr.contains("over vhost-user-blk"), "{}", r.stderr);
    assert!(
        accepting(&d.join("v.sock")),
        "not accepting when --fork returned"
    );
    let pid = pid_in(&d.join("v.pid"));
    assert!(alive(pid));
    // SAFETY: signalling the server we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_gone(pid);
    assert!(!d.join("v.pid").exists() && !d.join("v.sock").exists());
    fvd(d, &["check", "img.fvd"]).ok("closed cleanly");
    // Socket activation: the activator's unix socket is served and left.
    let sock = d.join("act.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let child = activated(
        d,
        &l,
        &[
            "--vhost-user-blk",
            "act.sock",
            "--pidfile",
            "a.pid",
            "img.fvd",
        ],
    );
    drop(l);
    let t0 = Instant::now();
    while !d.join("a.pid").exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no pid file");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(accepting(&sock));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(sock.exists(), "the activator's socket file must stay");
    fvd(d, &["check", "img.fvd"]).ok("closed cleanly after activation");
    // vhost-user has no TCP transport.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let child = activated(d, &l, &["--vhost-user-blk", "x.sock", "img.fvd"]);
    drop(l);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unix socket"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    fvd(d, &["check", "img.fvd"]).ok("closed cleanly after the refusal");
}
