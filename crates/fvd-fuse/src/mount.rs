//! Mounting, serving and unmounting: the life of one export.
//!
//! [`serve`] mounts a [`DiskFile`] over a regular file, runs the FUSE
//! session on a pool of threads, and waits for the end: an `umount` (or
//! `fusermount3 -u`) of the mount point from outside, or SIGINT, SIGTERM or
//! SIGHUP. On a signal it unmounts the file itself; if the file is still in
//! use (a loop device, an open descriptor) it detaches the mount lazily and
//! keeps serving until the last user lets go. A second signal gives up
//! waiting. Either way the image is closed cleanly (flushed, clean flag set)
//! before `serve` returns.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread;

use fuser::{Config, MountOption, Session, SessionACL};
use fvd_core::Image;
use fvd_core::executor::block_on;

use crate::fs::{DiskFile, FileOptions};

/// Default number of threads serving requests.
pub const DEFAULT_THREADS: usize = 8;

/// Upper limit of `threads`.
pub const MAX_THREADS: usize = 256;

/// How to mount an export.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// The exported file.
    pub file: FileOptions,
    /// Threads reading and serving requests (each has its own `/dev/fuse`
    /// descriptor and request buffer).
    pub threads: usize,
    /// Let users other than the one mounting open the file (`allow_other`;
    /// the kernel then checks the file's mode).
    pub allow_other: bool,
    /// Source name shown in `/proc/mounts` (usually the image path).
    pub fs_name: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            file: FileOptions::default(),
            threads: DEFAULT_THREADS,
            allow_other: false,
            fs_name: "fvd".to_string(),
        }
    }
}

/// How an export ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The file system was unmounted from outside (`umount`, `fusermount3 -u`).
    Unmounted,
    /// A signal arrived and the export unmounted itself.
    Signal(i32),
    /// A second signal arrived while a lazily detached mount was still in
    /// use; the image was closed with users still holding the file, which
    /// now fail with `ENOTCONN` once the process exits.
    Forced(i32),
}

/// Why an export failed.
#[derive(Debug)]
pub struct ServeError {
    message: String,
    source: Option<io::Error>,
}

impl ServeError {
    fn new(message: impl Into<String>, source: Option<io::Error>) -> Self {
        ServeError {
            message: message.into(),
            source,
        }
    }
}

impl fmt::Display for ServeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

/// Check that `mountpoint` can carry a single-file export.
pub fn check_mountpoint(mountpoint: &Path) -> Result<(), ServeError> {
    let meta = std::fs::metadata(mountpoint).map_err(|e| {
        ServeError::new(
            format!("{}: cannot use as mount point", mountpoint.display()),
            Some(e),
        )
    })?;
    if !meta.is_file() {
        return Err(ServeError::new(
            format!(
                "{}: not a regular file (the disk is mounted over an existing regular file)",
                mountpoint.display()
            ),
            None,
        ));
    }
    Ok(())
}

/// Mount `image` over the regular file `mountpoint` and serve it until it is
/// unmounted or a signal asks to stop. `on_ready` runs once the mount is in
/// place and requests are being served. The image is closed cleanly before
/// this returns, on success and on failure alike.
pub fn serve(
    image: Arc<Image>,
    mountpoint: &Path,
    opts: &MountOptions,
    on_ready: impl FnOnce(),
) -> Result<Ending, ServeError> {
    let served = serve_open(&image, mountpoint, opts, on_ready);
    let closed = block_on(image.close()).map_err(|e| {
        ServeError::new(
            format!("{}: cannot close the image cleanly", image.describe()),
            Some(io::Error::from_raw_os_error(e.errno())),
        )
    });
    let ending = served?;
    closed?;
    Ok(ending)
}

fn serve_open(
    image: &Arc<Image>,
    mountpoint: &Path,
    opts: &MountOptions,
    on_ready: impl FnOnce(),
) -> Result<Ending, ServeError> {
    check_mountpoint(mountpoint)?;
    let target = mountpoint.canonicalize().map_err(|e| {
        ServeError::new(format!("{}: cannot resolve", mountpoint.display()), Some(e))
    })?;
    let threads = opts.threads.clamp(1, MAX_THREADS);
    let file = DiskFile::new(image.clone(), opts.file);
    let read_only = opts.file.read_only || image.is_read_only();

    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("fvd".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        if read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(threads);
    config.clone_fd = threads > 1;

    // Signals first: one arriving during the mount is acted on once the
    // mount is up.
    let signals = SignalPipe::install()?;
    let mut session = Session::new(file, &target, &config).map_err(|e| {
        ServeError::new(
            format!("{}: cannot mount the FUSE export", mountpoint.display()),
            Some(e),
        )
    })?;
    let mut unmounter = session.unmount_callable();
    let done = signals.writer()?;
    let runner = thread::Builder::new()
        .name("fvd-fuse".to_string())
        .spawn(move || {
            let r = session.run();
            notify(done.as_raw_fd(), 0);
            r
        })
        .map_err(|e| {
            ServeError::new(
                format!("{}: cannot start the FUSE session", mountpoint.display()),
                Some(e),
            )
        })?;
    on_ready();

    let mut first_signal = None;
    loop {
        let event = signals.wait();
        if event == 0 {
            break;
        }
        let sig = i32::from(event);
        if first_signal.is_some() {
            // Second signal while a detached mount is still in use.
            return Ok(Ending::Forced(sig));
        }
        first_signal = Some(sig);
        match unmounter.unmount() {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                lazy_unmount(&target);
                eprintln!(
                    "fvd: {} is in use; detached it, serving until its last user closes it \
                     (signal again to stop now)",
                    mountpoint.display()
                );
            }
            Err(e) => {
                eprintln!("fvd: {}: cannot unmount: {e}", mountpoint.display());
                first_signal = None;
            }
        }
    }
    let failed = |what: &str| format!("{}: the FUSE session {what}", mountpoint.display());
    let result = runner
        .join()
        .map_err(|_| ServeError::new(failed("panicked"), None))?;
    result.map_err(|e| ServeError::new(failed("failed"), Some(e)))?;
    Ok(match first_signal {
        Some(sig) => Ending::Signal(sig),
        None => Ending::Unmounted,
    })
}

/// Detach a busy mount; it goes away when its last user does.
fn lazy_unmount(target: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(target.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `path` is a valid NUL-terminated string for the call's duration.
    let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        eprintln!(
            "fvd: {}: cannot detach: {}",
            target.display(),
            io::Error::last_os_error()
        );
    }
}

/// Write end of the current signal pipe, for the handler (-1: none).
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);

/// Signals that end an export.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno; saving and
    // restoring it keeps the interrupted code's errno intact.
    let errno = unsafe { *libc::__errno_location() };
    notify(SIGNAL_FD.load(Ordering::Relaxed), sig as u8);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Send one event byte (async-signal-safe: a single write).
fn notify(fd: RawFd, event: u8) {
    if fd < 0 {
        return;
    }
    // SAFETY: writes one byte from a live stack variable; a failure (full
    // pipe) only loses a duplicate wake-up.
    unsafe { libc::write(fd, (&raw const event).cast(), 1) };
}

/// A self-pipe carrying signal numbers (and 0 for "session ended"), with
/// the handlers for [`SIGNALS`] installed while it lives.
struct SignalPipe {
    read: OwnedFd,
    write: OwnedFd,
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl SignalPipe {
    fn install() -> Result<SignalPipe, ServeError> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two descriptors into a live array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(ServeError::new(
                "cannot create the signal pipe",
                Some(io::Error::last_os_error()),
            ));
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // The handler must never block.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        SIGNAL_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        let mut pipe = SignalPipe {
            read,
            write,
            old: Vec::new(),
        };
        for sig in SIGNALS {
            // SAFETY: a zeroed sigaction is a valid value to fill in; the
            // handler only does async-signal-safe work.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                act.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut act.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &act, &mut old) != 0 {
                    return Err(ServeError::new(
                        "cannot install signal handlers",
                        Some(io::Error::last_os_error()),
                    ));
                }
                pipe.old.push((sig, old));
            }
        }
        Ok(pipe)
    }

    /// A descriptor of its own for the session thread to report its end.
    fn writer(&self) -> Result<OwnedFd, ServeError> {
        self.write
            .try_clone()
            .map_err(|e| ServeError::new("cannot duplicate the signal pipe", Some(e)))
    }

    /// Block until the next event byte.
    fn wait(&self) -> u8 {
        let mut b = 0u8;
        loop {
            // SAFETY: reads one byte into a live stack variable.
            let n = unsafe { libc::read(self.read.as_raw_fd(), (&raw mut b).cast(), 1) };
            if n == 1 {
                return b;
            }
            let err = io::Error::last_os_error();
            if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Cannot happen while we hold a write end; treat as "ended".
            return 0;
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for (sig, old) in &self.old {
            // SAFETY: restores the action saved at install.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
        SIGNAL_FD.store(-1, Ordering::SeqCst);
    }
}
