//! Helpers for the FUSE export tests: skipping where FUSE cannot work,
//! starting `fvd mount` and waiting for its ready line, unmounting, and
//! checking that an image was left clean.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use fvd_testkit::skip;

/// How long a mount may take to become ready, and an unmount to finish.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// True if FUSE mounts can be made here (root and /dev/fuse) and every
/// tool in `tools` runs; otherwise print why the test is skipped.
pub fn fuse_usable(tools: &[&str]) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip("FUSE tests need root (mount(2) over a regular file)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        skip("/dev/fuse is missing");
        return false;
    }
    fvd_testkit::have_tools(tools)
}

/// Run a command; panic with its output unless it succeeds. Returns stdout.
pub fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Run a command and return its exit status, stdout and stderr.
pub fn run(prog: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run the `fvd` binary; panic unless it succeeds.
pub fn fvd(args: &[&str]) -> String {
    sh(env!("CARGO_BIN_EXE_fvd"), args)
}

/// Path as a `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Deterministic non-zero bytes (so copy-on-write has something to copy).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// A raw base with pattern data and an FVD overlay on it, in `dir`.
/// Returns (base, overlay, the base's bytes).
pub fn image_with_base(dir: &Path, size: usize, block_size: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.raw");
    let data = pattern(size, 7);
    std::fs::write(&base, &data).expect("write base");
    let img = dir.join("disk.fvd");
    fvd(&[
        "create",
        "-q",
        "-f",
        "fvd",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "-o",
        &format!("block_size={block_size}"),
        s(&img),
    ]);
    (base, img, data)
}

/// An FVD image without a base.
pub fn plain_image(dir: &Path, size: &str) -> PathBuf {
    let img = dir.join("plain.fvd");
    fvd(&["create", "-q", "-f", "fvd", s(&img), size]);
    img
}

/// An empty regular file to mount over.
pub fn mountpoint(dir: &Path) -> PathBuf {
    let mp = dir.join("disk.mnt");
    std::fs::write(&mp, b"").expect("create mount point");
    mp
}

/// True if `path` is a mount point now.
pub fn is_mounted(path: &Path) -> bool {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == canon)
}

/// A running `fvd mount`.
pub struct Mount {
    child: Option<Child>,
    /// The mount point.
    pub path: PathBuf,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Mount {
    /// Start `fvd mount IMAGE MP extra...` and wait for its ready line.
    pub fn start(image: &Path, mp: &Path, extra: &[&str]) -> Mount {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fvd"));
        cmd.arg("mount")
            .args(extra)
            .arg(image)
            .arg(mp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn fvd mount");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let err_reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so the process never blocks on a full pipe.
            let mut rest = String::new();
            let _ = r.read_to_string(&mut rest);
        });
        let mut m = Mount {
            child: Some(child),
            path: mp.to_path_buf(),
            stderr: Some(err_reader),
        };
        match rx.recv_timeout(TIMEOUT) {
            Ok(line) if line.trim_end() == mp.display().to_string() => {}
            Ok(line) => {
                let (status, err) = m.kill();
                panic!("fvd mount: unexpected ready line {line:?} ({status:?})\nstderr:\n{err}");
            }
            Err(_) => {
                let (status, err) = m.kill();
                panic!("fvd mount did not become ready ({status:?})\nstderr:\n{err}");
            }
        }
        assert!(is_mounted(mp), "{} is not mounted", mp.display());
        m
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Send `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid of our own child.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Wait for the process to end (panic after TIMEOUT); returns its
    /// exit status and stderr.
    pub fn wait(&mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                let st = child.wait().expect("wait");
                let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
                panic!("fvd mount did not exit ({st:?})\nstderr:\n{err:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, err)
    }

    /// Unmount with `umount` and wait for a clean exit (status 0).
    pub fn unmount(mut self) {
        sh("umount", &[s(&self.path)]);
        let (status, err) = self.wait();
        assert!(status.success(), "fvd mount: {status}\nstderr:\n{err}");
        assert!(!is_mounted(&self.path), "still mounted");
    }

    fn kill(&mut self) -> (Option<ExitStatus>, String) {
        if is_mounted(&self.path) {
            let _ = run("umount", &["-l", s(&self.path)]);
        }
        let mut status = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            status = c.wait().ok();
        }
        let err = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, err)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() {
            let (_, err) = self.kill();
            if !err.is_empty() {
                eprintln!("fvd mount stderr:\n{err}");
            }
        }
    }
}

/// Panic unless `image` (FVD) is closed cleanly and consistent.
pub fn assert_clean(image: &Path) {
    let r = fvd_core::executor::block_on(fvd_core::check::check_path(
        image,
        fvd_core::Format::Fvd,
        None,
    ))
    .unwrap_or_else(|e| panic!("check {}: {e}", image.display()));
    assert!(r.clean, "{}: clean flag not set: {r:?}", image.display());
    assert!(
        r.corruptions.is_empty() && r.check_errors.is_empty() && r.leaks.is_empty(),
        "{}: check found problems: {r:?}",
        image.display()
    );
    fvd(&["check", s(image)]);
}

/// Read all of an image's virtual disk with `fvd convert` to raw.
pub fn disk_bytes(image: &Path, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("converted.raw");
    let _ = std::fs::remove_file(&out);
    fvd(&["convert", "-f", "fvd", "-O", "raw", s(image), s(&out)]);
    std::fs::read(&out).expect("read converted")
}
