//! The vhost-user socket: one front end at a time, reconnects, shutdown.
//!
//! The backend listens on a unix socket (mode 0600, removed on exit) and
//! serves one front end at a time, as vhost-user requires. For each
//! connection it builds a fresh [`BlkBackend`] and `VhostUserDaemon` (new
//! vrings, new worker threads, the write cache back on), so a front end that
//! reconnects (QEMU's `reconnect-ms`) starts from a clean device while the
//! image stays open. When a connection ends — the front end left, crashed,
//! or we are shutting down — the worker threads are stopped, every request
//! still in flight is finished (its completion goes to guest memory we still
//! map), and the image is committed. Then the next front end is accepted,
//! unless the export runs `once` or a shutdown was asked for; at the end the
//! image is flushed and closed cleanly.
//!
//! The socket is bound by `fvd-listen`, the implementation the NBD server
//! uses too ([`Socket`]: bound here, or inherited through socket
//! activation).

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fvd_core::Image;
use tokio::io::unix::AsyncFd;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use fvd_listen::{Inherited, SocketFile};

use crate::backend::BlkBackend;
use crate::config::DeviceConfig;

/// Default queue size limit (a driver may choose less).
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// Most request queues.
pub const MAX_QUEUES: u16 = 64;

/// How the export behaves.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Request queues offered (1 to [`MAX_QUEUES`]).
    pub num_queues: u16,
    /// Largest queue size a driver may choose.
    pub queue_size: u16,
    /// The `GET_ID` serial.
    pub serial: String,
    /// Stop after the first front end disconnects.
    pub once: bool,
    /// Report connections and failed requests on standard error.
    pub verbose: bool,
}

impl ExportConfig {
    /// An export on `socket` with one queue.
    pub fn new(socket: impl Into<PathBuf>) -> ExportConfig {
        ExportConfig {
            socket: socket.into(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            serial: String::new(),
            once: false,
            verbose: false,
        }
    }
}

/// How a [`serve`] run ended.
#[derive(Debug, Clone, Default)]
pub struct ServeSummary {
    /// Front-end connections served.
    pub connections: u64,
}

/// True if a connection is waiting on `fd` (so that accepting cannot block
/// or spin).
fn pending(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

/// Validate the configuration and describe the device for `image`.
pub fn device_config(image: &Image, cfg: &ExportConfig) -> io::Result<DeviceConfig> {
    if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--num-queues must be 1 to {MAX_QUEUES}"),
        ));
    }
    if cfg.queue_size < 2 || !cfg.queue_size.is_power_of_two() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--queue-size must be a power of two, at least 2",
        ));
    }
    Ok(DeviceConfig {
        size: image.virtual_size(),
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        read_only: image.is_read_only(),
        block_size: image.block_size(),
        serial: cfg.serial.clone(),
    })
}

/// A listening vhost-user socket: bound by [`Socket::bind`] (mode 0600,
/// removed on exit) or inherited (systemd socket activation; its file is
/// left to the activator).
pub struct Socket {
    listener: UnixListener,
    _file: SocketFile,
}

impl Socket {
    /// Listen on `path` (a stale socket file is replaced, a live one is an
    /// error).
    pub fn bind(path: &Path) -> io::Result<Socket> {
        let (listener, file) = fvd_listen::bind_unix(path)?;
        Ok(Socket {
            listener,
            _file: file,
        })
    }

    /// The socket's path (an inherited socket's own, possibly empty).
    pub fn path(&self) -> &Path {
        self._file.path()
    }

    /// A listening socket passed in by the program that started us; it
    /// must be a unix socket (vhost-user has no other transport).
    pub fn inherited(fd: std::os::fd::OwnedFd) -> io::Result<Socket> {
        match Inherited::from_fd(fd)? {
            Inherited::Unix(listener, file) => Ok(Socket {
                listener,
                _file: file,
            }),
            Inherited::Tcp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the inherited socket is a TCP socket; vhost-user needs a unix socket",
            )),
        }
    }
}

/// Serve `image` over vhost-user-blk on `cfg.socket` until `shutdown`
/// completes (or, with `once`, the first front end leaves); then finish the
/// requests in flight, flush and close the image, and remove the socket.
pub async fn serve<F>(image: Arc<Image>, cfg: ExportConfig, shutdown: F) -> io::Result<ServeSummary>
where
    F: Future<Output = ()> + Send,
{
    device_config(&image, &cfg)?;
    let socket = Socket::bind(&cfg.socket)?;
    serve_on(image, cfg, socket, shutdown).await
}

/// [`serve`] on a socket already listening (`cfg.socket` is then only
/// named in messages).
pub async fn serve_on<F>(
    image: Arc<Image>,
    cfg: ExportConfig,
    socket: Socket,
    shutdown: F,
) -> io::Result<ServeSummary>
where
    F: Future<Output = ()> + Send,
{
    let device = device_config(&image, &cfg)?;
    let Socket {
        listener,
        _file: _socket_file,
    } = socket;
    listener.set_nonblocking(true)?;
    let mut vlistener = Listener::from(listener.try_clone()?);
    // SAFETY: the AsyncFd owns `listener`, whose descriptor stays open and
    // unchanged until the AsyncFd is dropped.
    let ready = unsafe { AsyncFd::register(listener) }?;
    let mut summary = ServeSummary::default();
    let log = |msg: std::fmt::Arguments<'_>| {
        if cfg.verbose {
            eprintln!("fvd serve: {msg}");
        }
    };
    tokio::pin!(shutdown);
    loop {
        let mut guard = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            g = ready.readable() => g?,
        };
        if !pending(guard.get_inner()) {
            guard.clear_ready();
            continue;
        }
        let backend = Arc::new(BlkBackend::new(
            image.clone(),
            device.clone(),
            tokio::runtime::Handle::current(),
            cfg.verbose,
        ));
        let mut daemon = VhostUserDaemon::new(
            "fvd-vhost".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| io::Error::other(format!("cannot start the vhost-user backend: {e}")))?;
        let started = daemon.start(&mut vlistener);
        guard.clear_ready();
        if let Err(e) = started {
            log(format_args!("vhost-user: accept failed: {e}"));
            backend.stop_workers();
            continue;
        }
        summary.connections += 1;
        log(format_args!("vhost-user front end connected"));
        let stop = daemon.shutdown_handle();
        let mut waiter = tokio::task::spawn_blocking(move || daemon.wait());
        let stopping = tokio::select! {
            biased;
            _ = &mut shutdown => true,
            _ = &mut waiter => false,
        };
        if stopping {
            if let Some(s) = stop {
                s.shutdown();
            }
            let _ = waiter.await;
        }
        let b = backend.clone();
        let _ = tokio::task::spawn_blocking(move || {
            b.close();
            b.wait_idle();
        })
        .await;
        match image.flush().await {
            Ok(()) => log(format_args!(
                "vhost-user front end disconnected; requests drained, image committed"
            )),
            Err(e) => eprintln!("fvd serve: commit after disconnect failed: {e}"),
        }
        if stopping || cfg.once {
            break;
        }
    }
    drop(vlistener);
    image.flush().await.map_err(io::Error::from)?;
    image.close().await.map_err(io::Error::from)?;
    Ok(summary)
}
