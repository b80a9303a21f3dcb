//! Starting `fvd serve` from scripts and service managers, as qemu-nbd is
//! started: `--pidfile` (written once the socket accepts, removed at exit),
//! `--fork` (the command returns only once the socket accepts; the server
//! goes on in the background), and systemd socket activation (`LISTEN_FDS`
//! / `LISTEN_PID`: the listening socket is descriptor 3).
//!
//! `--fork` re-runs the program rather than calling fork(2): the async
//! runtime's threads already exist, and a forked copy of a threaded process
//! may only call async-signal-safe functions. The child runs in a session
//! of its own with a hidden `--ready-fd N`: its standard error goes through
//! a pipe the parent relays until the child says it is ready (one byte on
//! descriptor N, after the socket accepts and the pid file is written);
//! the child then points its standard error at /dev/null (so a caller that
//! captures the parent's output is not kept waiting) and the parent exits
//! 0. If the child exits first, the parent exits with its status, its
//! messages already relayed.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result, anyhow};

/// The socket inherited through systemd socket activation, taken at startup.
static ACTIVATED: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Take the socket of systemd socket activation, if the environment says
/// this process got one (`LISTEN_PID` is our pid, `LISTEN_FDS` >= 1), and
/// remove the variables so that nothing we start inherits them. Must run
/// first in `main`, while the process has a single thread (changing the
/// environment is not thread-safe).
pub fn capture_activation() {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called first in main, before any other thread exists.
        unsafe { std::env::remove_var(v) };
    }
    if !ours || count < 1 {
        return;
    }
    // SAFETY: systemd's protocol hands descriptors 3.. to this process; we
    // take ownership of the first, and keep it out of programs we start.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    // SAFETY: fcntl on the descriptor we now own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    *ACTIVATED.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
}

/// The socket of socket activation, once (None without activation).
pub fn take_activated() -> Option<OwnedFd> {
    ACTIVATED.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// A pid file: written with this process's id, removed when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Write our process id to `path`.
    pub fn write(path: &Path) -> Result<PidFile> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("{}: cannot write the pid file", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The child's side of `--fork`: tells the waiting parent that the server
/// accepts connections.
pub struct Ready(Option<File>);

impl Ready {
    /// From `--ready-fd N` (none without it).
    pub fn from_fd(fd: Option<i32>) -> Ready {
        // SAFETY: the descriptor was created for us by the parent and is
        // used nowhere else in this process.
        Ready(fd.map(|fd| unsafe { File::from_raw_fd(fd) }))
    }

    /// The server accepts connections: detach standard error from the
    /// parent and tell it (nothing without `--fork`).
    pub fn notify(&mut self) {
        let Some(mut f) = self.0.take() else { return };
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            // SAFETY: dup2 onto our own standard error.
            unsafe { libc::dup2(null.as_raw_fd(), libc::STDERR_FILENO) };
        }
        let _ = f.write_all(b"R");
    }
}

/// `--fork`: start this command again in the background without `--fork`
/// and return once it accepts connections (see the module docs).
pub fn fork_and_wait() -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find the fvd program")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--fork")
        .collect();
    let (mut ready_r, ready_w) = std::io::pipe().context("cannot create a pipe")?;
    let wfd = ready_w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .arg("--ready-fd")
        .arg(wfd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the server process")?;
    drop(ready_w);
    let mut child_err = child.stderr.take().ok_or_else(|| anyhow!("no pipe"))?;
    let relay = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = child_err.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = std::io::stderr().write_all(&buf[..n]);
        }
    });
    let mut byte = [0u8; 1];
    let ready = matches!(ready_r.read(&mut byte), Ok(1));
    let _ = relay.join();
    if ready {
        return Ok(0);
    }
    let status = child.wait().context("cannot wait for the server process")?;
    Ok(status.code().map_or(1, |c| c.clamp(1, 255) as u8))
}
