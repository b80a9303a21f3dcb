//! The NBD server: one image, one export, many connections.
//!
//! Layers, each in its own module:
//! * this module — configuration, the listener (unix socket or TCP), the
//!   accept loop with its client limit, signals and the orderly shutdown;
//! * `handshake` — the option negotiation state machine
//!   (fixed newstyle, `STARTTLS`, `INFO`/`GO`, structured replies,
//!   extended headers, metadata contexts);
//! * `transmission` — the request loop: many
//!   requests in flight per connection, replies written out of order
//!   through one writer;
//! * `tls` — loading certificates for `STARTTLS`.
//!
//! Every connection shares one [`Image`], so `NBD_FLAG_CAN_MULTI_CONN` is
//! advertised: a flush on any connection covers the writes completed on
//! all of them.
//!
//! Shutdown (a signal, or the last client leaving with
//! [`ServerConfig::once`]): stop accepting, stop reading new requests,
//! let the requests in flight finish and send their replies, then flush
//! and close the image (which sets its clean flag) and remove the unix
//! socket.
//!
//! Admission (`admission`): a connection is greeted as soon as it is
//! accepted and has [`ServerConfig::handshake_timeout`] (10 s) to
//! negotiate; at most [`ServerConfig::max_handshakes`] (32) negotiate at
//! once, one more dropping the one negotiating longest. Only negotiated
//! connections take one of the [`ServerConfig::max_clients`] transmission
//! slots (`--shared`), waiting for one if all are taken. So clients that
//! connect and say nothing never keep others from being greeted.
//!
//! Robustness rules: a protocol violation that leaves the byte stream in
//! an unknown state (bad magic, a write payload larger than
//! [`MAX_PAYLOAD`]) closes that connection only — the payload is not read
//! and discarded, the client gets an `EINVAL` reply and then a hard
//! disconnect; every other invalid request gets an error reply and the
//! connection goes on. Memory per connection is bounded by
//! [`ServerConfig::max_inflight`] requests and
//! [`ServerConfig::max_buffered`] bytes of payload and read data.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fvd_core::{Image, LiveImage};
use fvd_listen::{Inherited, SocketFile};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::proto::consts;
use crate::proto::transmission::MAX_PAYLOAD;
use crate::stream::Stream;

mod admission;
mod handshake;
mod tls;
mod transmission;

pub use tls::TlsFiles;

/// Name of the `qemu:allocation-depth` metadata context: 1 for data in the
/// image, 2 for data still in its base.
pub const META_CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Default number of clients served at once.
pub const DEFAULT_MAX_CLIENTS: usize = 16;

/// Default number of connections negotiating at once (see `admission`).
pub const DEFAULT_MAX_HANDSHAKES: usize = 32;

/// Default time a connection has to finish its negotiation (qemu-nbd's
/// handshake limit).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default TCP address: loopback only, the IANA NBD port.
pub const DEFAULT_TCP_ADDR: &str = "127.0.0.1:10809";

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket at this path (created with mode 0600, removed on exit).
    Unix(PathBuf),
    /// A TCP address (port 0 picks a free port).
    Tcp(SocketAddr),
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export's name; clients asking for another name get
    /// `NBD_REP_ERR_UNKNOWN`.
    pub export_name: String,
    /// Clients in the transmission phase at once (`--shared`); one more
    /// that finished its handshake waits for a slot. Connections still
    /// negotiating do not count.
    pub max_clients: usize,
    /// Connections negotiating at once; when one more is accepted, the one
    /// negotiating longest is dropped.
    pub max_handshakes: usize,
    /// Smallest request granularity advertised (1, or 512 for
    /// `O_DIRECT` images); requests not aligned to it fail with `EINVAL`.
    pub min_block_size: u32,
    /// Preferred request granularity advertised.
    pub preferred_block_size: u32,
    /// Offer `NBD_OPT_STRUCTURED_REPLY` (when false, extended headers are
    /// refused too: their replies are structured).
    pub structured_replies: bool,
    /// Offer `NBD_OPT_EXTENDED_HEADERS`.
    pub extended_headers: bool,
    /// Certificates for `STARTTLS`; when set, TLS is required (FORCEDTLS).
    pub tls: Option<TlsFiles>,
    /// Stop once the last client has disconnected (like `qemu-nbd`
    /// without `--persistent`).
    pub once: bool,
    /// Print connection events to standard error.
    pub verbose: bool,
    /// Export read-only even though the image is open for writing
    /// (`fvd serve --read-only-export`): clients get `NBD_FLAG_READ_ONLY`
    /// and `NBD_EPERM` for writes, while the engine still writes the
    /// image for copy-on-read, `NBD_CMD_CACHE` and prefetch fills.
    pub read_only_export: bool,
    /// Time a client has for the whole negotiation (TLS included).
    pub handshake_timeout: Duration,
    /// Requests in flight per connection.
    pub max_inflight: usize,
    /// Bytes of write payload and read data held per connection.
    pub max_buffered: usize,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            max_clients: DEFAULT_MAX_CLIENTS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            min_block_size: 1,
            preferred_block_size: 4096,
            structured_replies: true,
            extended_headers: true,
            tls: None,
            once: false,
            verbose: false,
            read_only_export: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_inflight: 64,
            max_buffered: 64 << 20,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// What every connection needs, shared.
pub(crate) struct Shared {
    pub(crate) live: Arc<LiveImage>,
    pub(crate) config: ServerConfig,
    pub(crate) read_only: bool,
    pub(crate) tls: Option<TlsAcceptor>,
}

impl Shared {
    /// The export's size now (a client sees it at its handshake).
    pub(crate) fn size(&self) -> u64 {
        self.live.current().virtual_size()
    }

    /// Transmission flags for a session (`structured`: structured replies
    /// or extended headers negotiated; `extended`: extended headers).
    pub(crate) fn export_flags(&self, structured: bool, extended: bool) -> u16 {
        let mut flags =
            consts::FLAG_HAS_FLAGS | consts::FLAG_CAN_MULTI_CONN | consts::FLAG_SEND_CACHE;
        if self.read_only {
            flags |= consts::FLAG_READ_ONLY;
        } else {
            flags |= consts::FLAG_SEND_FLUSH
                | consts::FLAG_SEND_FUA
                | consts::FLAG_SEND_TRIM
                | consts::FLAG_SEND_WRITE_ZEROES
                | consts::FLAG_SEND_FAST_ZERO;
        }
        if structured {
            flags |= consts::FLAG_SEND_DF;
        }
        if extended {
            flags |= consts::FLAG_BLOCK_STATUS_PAYLOAD;
        }
        flags
    }

    /// Largest request payload (and read length) accepted.
    pub(crate) fn max_payload(&self) -> u32 {
        MAX_PAYLOAD
    }

    pub(crate) fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.config.verbose {
            eprintln!("fvd serve: {msg}");
        }
    }
}

enum ListenerKind {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener),
}

/// A bound listening socket.
pub struct Listener {
    kind: ListenerKind,
}

impl Listener {
    /// Bind `addr`. A unix socket gets mode 0600; a stale socket file
    /// (nobody accepting on it) is replaced, anything else at the path is
    /// an error.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => bind_unix(path),
            ListenAddr::Tcp(sa) => {
                let l = TcpListener::bind(sa)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {sa}: {e}")))?;
                Ok(Listener {
                    kind: ListenerKind::Tcp(l),
                })
            }
        }
    }

    /// A listening socket inherited from the process that started us
    /// (systemd socket activation): unix or TCP, already bound. A unix
    /// socket's file is left in place at exit (it belongs to the activator).
    pub fn from_inherited(fd: std::os::fd::OwnedFd) -> io::Result<Listener> {
        let kind = match Inherited::from_fd(fd)? {
            Inherited::Unix(l, file) => {
                l.set_nonblocking(true)?;
                ListenerKind::Unix(UnixListener::from_std(l)?, file)
            }
            Inherited::Tcp(l) => {
                l.set_nonblocking(true)?;
                ListenerKind::Tcp(TcpListener::from_std(l)?)
            }
        };
        Ok(Listener { kind })
    }

    /// Where clients connect, as an NBD URI for `export_name`.
    pub fn uri(&self, export_name: &str) -> String {
        match &self.kind {
            ListenerKind::Unix(_, f) => {
                format!("nbd+unix:///{export_name}?socket={}", f.path().display())
            }
            ListenerKind::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}/{export_name}"),
                Err(_) => "nbd://?".to_string(),
            },
        }
    }

    /// The TCP address actually bound (None for unix sockets).
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            ListenerKind::Tcp(l) => l.local_addr().ok(),
            ListenerKind::Unix(..) => None,
        }
    }

    async fn accept(&self) -> io::Result<(Stream, String)> {
        match &self.kind {
            ListenerKind::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::unix(s), "unix client".to_string()))
            }
            ListenerKind::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Stream::tcp(s), peer.to_string()))
            }
        }
    }
}

fn bind_unix(path: &Path) -> io::Result<Listener> {
    let (l, file) = fvd_listen::bind_unix(path)?;
    l.set_nonblocking(true)?;
    Ok(Listener {
        kind: ListenerKind::Unix(UnixListener::from_std(l)?, file),
    })
}

/// How a [`Server::serve`] run ended.
#[derive(Debug, Clone, Default)]
pub struct ServeSummary {
    /// Connections accepted.
    pub connections: u64,
    /// Connections still running when the drain timeout expired.
    pub abandoned: usize,
}

/// An NBD server for one image.
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Prepare a server for `image` (loads the TLS certificates, if any).
    pub fn new(image: Arc<Image>, config: ServerConfig) -> io::Result<Server> {
        Self::new_live(Arc::new(LiveImage::new(image)), config)
    }

    /// Prepare a server for the image in `live`, which an online operation
    /// (resize) may replace while it serves: each request runs on the
    /// current image, and a client sees the current size at its handshake.
    pub fn new_live(live: Arc<LiveImage>, mut config: ServerConfig) -> io::Result<Server> {
        let tls = match &config.tls {
            Some(files) => Some(tls::acceptor(files)?),
            None => None,
        };
        if !config.structured_replies {
            config.extended_headers = false;
        }
        config.max_clients = config.max_clients.max(1);
        config.max_inflight = config.max_inflight.max(1);
        // At least one largest request (and its overhead) must fit.
        config.max_buffered = config.max_buffered.max(
            usize::try_from(MAX_PAYLOAD)
                .unwrap_or(usize::MAX)
                .saturating_mul(2),
        );
        config.min_block_size = config.min_block_size.max(1);
        config.preferred_block_size = config
            .preferred_block_size
            .clamp(config.min_block_size, MAX_PAYLOAD);
        let read_only = live.current().is_read_only() || config.read_only_export;
        Ok(Server {
            shared: Arc::new(Shared {
                live,
                config,
                read_only,
                tls,
            }),
        })
    }

    /// Accept clients on `listener` until `shutdown` completes (or, with
    /// [`ServerConfig::once`], the last client leaves); then drain the
    /// requests in flight, flush and close the image, and remove the unix
    /// socket. Errors closing the image are returned.
    pub async fn serve<F>(self, listener: Listener, shutdown: F) -> io::Result<ServeSummary>
    where
        F: Future<Output = ()> + Send,
    {
        let shared = self.shared;
        let cfg = &shared.config;
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(cfg.max_clients));
        let handshakes = admission::Handshakes::new(cfg.max_handshakes);
        let conns = Arc::new(admission::Connections::default());
        let idle = Arc::new(Notify::new());
        let mut summary = ServeSummary::default();
        tokio::pin!(shutdown);
        loop {
            // Never waits for a slot: a connection is greeted at once, and
            // the limits apply to it afterwards (see `admission`).
            let accepted = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = idle.notified() => break,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    shared.log(format_args!("accept failed: {e}"));
                    // Out of descriptors and the like: back off a little.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            summary.connections = summary.connections.saturating_add(1);
            conns.opened();
            let admitted = Admitted {
                ticket: handshakes.enter(),
                slots: slots.clone(),
            };
            let shared2 = shared.clone();
            let stop = stop_rx.clone();
            let conns2 = conns.clone();
            let idle2 = idle.clone();
            tokio::spawn(async move {
                shared2.log(format_args!("{peer}: connected"));
                match serve_connection(stream, &shared2, stop, admitted).await {
                    Ok(()) => shared2.log(format_args!("{peer}: disconnected")),
                    Err(e) => shared2.log(format_args!("{peer}: closed: {e}")),
                }
                if conns2.closed() && shared2.config.once {
                    idle2.notify_one();
                }
            });
        }
        // Stop every connection from reading new requests, then wait for
        // them to finish what they have in flight.
        let _ = stop_tx.send(true);
        drop(listener);
        let drained = tokio::time::timeout(
            cfg.drain_timeout.saturating_add(Duration::from_secs(1)),
            conns.all_closed(),
        )
        .await;
        if drained.is_err() {
            summary.abandoned = conns.open();
        }
        let image = shared.live.enter().await;
        image.flush().await.map_err(io::Error::from)?;
        image.close().await.map_err(io::Error::from)?;
        Ok(summary)
    }
}

/// What a new connection was given by the accept loop: its place among the
/// negotiating connections (and the signal that drops it), and the
/// transmission slots it must take one of once negotiated.
struct Admitted {
    ticket: (admission::Ticket, tokio::sync::oneshot::Receiver<()>),
    slots: Arc<Semaphore>,
}

/// One connection, from the greeting to the last reply.
async fn serve_connection(
    conn: Stream,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    admitted: Admitted,
) -> io::Result<()> {
    let (ticket, evicted) = admitted.ticket;
    let negotiation = tokio::time::timeout(
        shared.config.handshake_timeout,
        handshake::negotiate(conn, shared),
    );
    // A server shutting down drops clients still negotiating; so does one
    // with too many connections negotiating, the oldest first.
    let negotiated = tokio::select! {
        biased;
        _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
        _ = evicted => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "dropped while negotiating: too many connections negotiating at once",
            ));
        }
        n = negotiation => n,
    };
    drop(ticket);
    let negotiated = negotiated
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "negotiation timed out"))??;
    let Some((conn, session)) = negotiated else {
        return Ok(());
    };
    // A transmission slot (`--shared`): wait for one if all are taken.
    let _permit = tokio::select! {
        biased;
        _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
        p = admitted.slots.acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return Ok(()),
        },
    };
    let (r, w) = conn.into_split();
    transmission::run(r, w, shared.clone(), session, stop).await
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_mode_stale_file_and_removal() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fvd-nbd-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // A stale socket (nobody accepting) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let l = Listener::bind(&ListenAddr::Unix(path.clone()))
            .await
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            l.uri("disk"),
            format!("nbd+unix:///disk?socket={}", path.display())
        );
        // A live one is not.
        let err = Listener::bind(&ListenAddr::Unix(path.clone())).await;
        assert!(err.is_err());
        drop(l);
        assert!(
            !path.exists(),
            "the socket file is removed with the listener"
        );
        // Neither is a regular file.
        std::fs::write(&path, b"x").unwrap();
        assert!(
            Listener::bind(&ListenAddr::Unix(path.clone()))
                .await
                .is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_bound_port() {
        let l = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
        let port = l.local_tcp_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_eq!(l.uri(""), format!("nbd://127.0.0.1:{port}/"));
    }
}
