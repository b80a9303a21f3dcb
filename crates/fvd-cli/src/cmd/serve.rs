//! `fvd serve` — export an image over NBD (like `qemu-nbd`), or over
//! vhost-user-blk with `--vhost-user-blk PATH` (see `serve_vhost`).
//!
//! Listens on a unix socket (`--socket`, mode 0600, removed on exit) or on
//! TCP (`--bind`, default 127.0.0.1:10809). One export, named by
//! `--export-name` (default: the empty name); clients asking for another
//! name are refused. Up to `--shared` clients are served at once (default
//! 16; one more that finished its handshake waits until one leaves); all
//! of them share one open image, so the export advertises
//! multi-connection consistency. Connections still negotiating do not
//! count: every connection is greeted at once and has 10 s to negotiate,
//! and at most 32 negotiate at once (one more drops the one negotiating
//! longest), so idle connections never lock other clients out.
//!
//! Runs until SIGINT or SIGTERM (or, with `--once`, until the last client
//! has left): it then stops accepting, lets the requests in flight finish,
//! flushes and closes the image cleanly, removes the socket and exits 0.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use fvd_core::Opener;
use fvd_core::storage::CacheMode;
use fvd_core::{Format, LiveImage, PathOptions};
use fvd_remote::cache::CacheOptions;

use crate::common::parse_cache;
use fvd_nbd::proto::consts::DEFAULT_PORT;
use fvd_nbd::server::{
    DEFAULT_MAX_CLIENTS, ListenAddr, Listener, Server, ServerConfig, TlsFiles, shutdown_signal,
};

/// Arguments of `fvd serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Listen on this unix socket (created with mode 0600, removed on exit).
    #[arg(short = 'k', long, value_name = "PATH", conflicts_with = "bind")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP at ADDR:PORT, ADDR or :PORT (default 127.0.0.1:10809).
    #[arg(short = 'b', long, value_name = "ADDR:PORT")]
    pub bind: Option<String>,
    /// Name of the export (default: the empty name).
    #[arg(short = 'x', long, value_name = "NAME", default_value = "")]
    pub export_name: String,
    /// Export read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// Export read-only but keep the image open for writing, so that
    /// copy-on-read, NBD_CMD_CACHE and prefetch still fill it (a cache
    /// image shared by many clients; pair with --copy-on-read=on). Clients
    /// see a read-only export: their writes fail with EPERM.
    #[arg(long, conflicts_with_all = ["read_only", "load_snapshot"])]
    pub read_only_export: bool,
    /// Export internal snapshot SNAPSHOT_PARAM read-only (like qemu-nbd
    /// -l): snapshot.id=ID, snapshot.name=NAME, or an id or name.
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT_PARAM")]
    pub load_snapshot: Option<String>,
    /// Answer JSON requests on this unix socket (mode 0600): snapshots of
    /// the running image, online resize, statistics (see `fvd snapshot
    /// --server`, `fvd resize --server`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Most clients served at once; one more waits after its handshake
    /// until one leaves (connections still negotiating do not count).
    #[arg(short = 'e', long, value_name = "N", default_value_t = DEFAULT_MAX_CLIENTS)]
    pub shared: usize,
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Host cache mode: writeback (page cache), none (O_DIRECT; the
    /// export then asks for 512-byte aligned requests) or unsafe (flush
    /// and FUA do nothing, as in qemu-nbd).
    #[arg(long, value_name = "MODE", default_value = "writeback", value_parser = parse_cache)]
    pub cache: CacheMode,
    /// Server certificate (PEM): turns on TLS, and requires it.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the server certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM): clients must present a certificate it signed.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Exit when the last client disconnects (like qemu-nbd without -t).
    #[arg(long)]
    pub once: bool,
    /// Threads of the server's event loop. The default, 1, is
    /// qemu-storage-daemon's model: one loop for the protocol, with image
    /// I/O on the engine's own I/O threads; more help with many busy
    /// clients on many cores.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Report connections and failed requests on standard error.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Write the process id to this file once the socket accepts
    /// connections; removed at exit.
    #[arg(long, visible_alias = "pid-file", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Run in the background: return once the socket accepts connections
    /// (as qemu-nbd --fork); the server's messages after that are dropped.
    #[arg(long)]
    pub fork: bool,
    /// Descriptor on which a --fork parent waits for readiness (internal).
    #[arg(long, hide = true, value_name = "FD")]
    pub ready_fd: Option<i32>,
    /// Refuse NBD_OPT_STRUCTURED_REPLY (and extended headers): for tests.
    #[arg(long, hide = true)]
    pub no_structured_replies: bool,
    /// Refuse NBD_OPT_EXTENDED_HEADERS: for tests.
    #[arg(long, hide = true)]
    pub no_extended_headers: bool,
    /// Copy-on-read, prefetch, profile and statistics options.
    #[command(flatten)]
    pub base: super::serve_extras::BaseArgs,
    /// The vhost-user-blk export (instead of NBD).
    #[command(flatten)]
    pub vhost: super::serve_vhost::VhostArgs,
    /// The image.
    pub image: PathBuf,
}

/// Open the image `fvd serve` exports (or its snapshot, `-l`).
async fn open_image(a: &ServeArgs, opts: PathOptions, opener: &Opener) -> Result<fvd_core::Image> {
    let path = a.image.display().to_string();
    let opened = match &a.load_snapshot {
        Some(param) => {
            let sel = fvd_core::image::snapshot::SnapshotSel::parse_param(param)
                .map_err(|e| anyhow!("-l {param}: {e}"))?;
            if a.format != Format::Fvd {
                bail!("{path}: -l needs an fvd image");
            }
            opener.open_snapshot(&a.image, opts, &sel).await
        }
        None => opener.open(&a.image, a.format, opts).await,
    };
    opened.map_err(|e| {
        let msg = e.to_string();
        if msg.contains(&path) {
            anyhow!(msg)
        } else {
            anyhow!("{path}: {msg}")
        }
    })
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Parse `ADDR:PORT`, `ADDR` or `:PORT`.
fn parse_bind(s: &str) -> Result<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    if let Some(port) = s.strip_prefix(':')
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    bail!("--bind {s}: expected ADDR:PORT, ADDR or :PORT (ADDR an IP address)")
}

/// The socket accepts connections: write the pid file, then tell a
/// waiting `--fork` parent (in that order: once the parent returns, the pid
/// file is there). The pid file is removed when the guard is dropped.
fn accepting(
    a: &ServeArgs,
    ready: &mut super::serve_start::Ready,
) -> Result<Option<super::serve_start::PidFile>> {
    let pidfile = a
        .pidfile
        .as_deref()
        .map(super::serve_start::PidFile::write)
        .transpose()?;
    ready.notify();
    Ok(pidfile)
}

/// Run `fvd serve` on a runtime of its own (`--threads` workers).
pub async fn run(a: ServeArgs, opener: &Opener) -> Result<u8> {
    run_with(a, opener, None).await
}

/// [`run`], serving the image itself, or (`fvd cache serve`, `cache` set)
/// the base whose URL is the positional argument, through the host's cache
/// of it.
pub async fn run_with(a: ServeArgs, opener: &Opener, cache: Option<CacheOptions>) -> Result<u8> {
    if a.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if a.fork {
        return super::serve_start::fork_and_wait();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opener = opener.clone();
    std::thread::Builder::new()
        .name("fvd-serve".into())
        .spawn(move || {
            let rt = if a.threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(a.threads)
                    .enable_all()
                    .build()
            };
            let r = match rt {
                Ok(rt) => rt.block_on(serve(a, &opener, cache)),
                Err(e) => Err(anyhow!("cannot start the server's runtime: {e}")),
            };
            let _ = tx.send(r);
        })
        .context("cannot start the server thread")?;
    rx.await
        .map_err(|_| anyhow!("the server thread ended unexpectedly"))?
}

async fn serve(a: ServeArgs, opener: &Opener, cache: Option<CacheOptions>) -> Result<u8> {
    let started = std::time::Instant::now();
    let mut ready = super::serve_start::Ready::from_fd(a.ready_fd);
    let activated = super::serve_start::take_activated();
    if activated.is_some() && (a.socket.is_some() || a.bind.is_some()) {
        bail!(
            "socket activation (LISTEN_FDS) passes the listening socket: do not give --socket or --bind"
        );
    }
    let addr = match (&a.socket, &a.bind) {
        (Some(p), _) => ListenAddr::Unix(p.clone()),
        (None, Some(b)) => ListenAddr::Tcp(parse_bind(b)?),
        (None, None) => ListenAddr::Tcp(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            DEFAULT_PORT,
        )),
    };
    if a.shared == 0 {
        bail!("--shared must be at least 1");
    }
    // Catch the signals before anything can be left half done.
    let signal = shutdown_signal()
        .await
        .context("cannot install signal handlers")?;
    // A snapshot is exported read-only, as qemu-nbd -l does.
    let open_read_only = a.read_only || a.load_snapshot.is_some();
    let read_only = open_read_only || a.read_only_export;
    let opts = PathOptions {
        read_only: open_read_only,
        cache: a.cache,
        force_share: false,
    };
    let path = a.image.display().to_string();
    let mut cached = None;
    let image = match &cache {
        Some(opts) => {
            let (c, image) = super::serve_cache::open_cached(&path, opts, opener).await?;
            cached = Some(c);
            image
        }
        None => open_image(&a, opts, opener).await?,
    };
    crate::common::require_key(&image, &a.image)?;
    let image = Arc::new(image);
    let more = cached.as_ref().map(super::serve_cache::stats_fn);
    // What the server exports: an online resize replaces the image in it.
    let live = Arc::new(LiveImage::new(image.clone()));
    let extras = match super::serve_extras::start(&live, &a.base, started, more).await {
        Ok(x) => x,
        Err(e) => {
            let _ = live.current().close().await;
            return Err(e);
        }
    };
    let _control = match &a.control_socket {
        Some(p) => match super::control::start(
            super::control::Target {
                live: live.clone(),
                stats: extras.stats_fn(&live),
                // vhost-user-blk clients keep the size they were given.
                reopened: a
                    .vhost
                    .vhost_user_blk
                    .is_none()
                    .then(|| extras.reopened_fn()),
            },
            p,
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = live.current().close().await;
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(socket) = a.vhost.vhost_user_blk.clone() {
        if a.read_only_export {
            let _ = image.close().await;
            bail!(
                "--read-only-export is an NBD export option; it does not apply to --vhost-user-blk"
            );
        }
        let bound = match activated {
            Some(fd) => fvd_vhost::Socket::inherited(fd),
            None => fvd_vhost::Socket::bind(&socket),
        };
        let listening = match bound {
            Ok(l) => l,
            Err(e) => {
                let _ = live.current().close().await;
                return Err(anyhow!(e));
            }
        };
        let export = super::serve_vhost::Export {
            path: &a.image,
            socket,
            read_only,
            once: a.once,
            verbose: a.verbose,
            args: &a.vhost,
        };
        let on_accepting = || accepting(&a, &mut ready);
        return super::serve_vhost::run(image, extras, export, listening, signal, on_accepting)
            .await;
    }
    let min_block_size = if a.cache == CacheMode::None { 512 } else { 1 };
    let preferred = u32::try_from(image.block_size().clamp(4096, 1 << 20)).unwrap_or(4096);
    let config = ServerConfig {
        export_name: a.export_name.clone(),
        max_clients: a.shared,
        min_block_size,
        preferred_block_size: preferred,
        structured_replies: !a.no_structured_replies,
        extended_headers: !a.no_extended_headers,
        tls: a
            .tls_cert
            .as_ref()
            .zip(a.tls_key.as_ref())
            .map(|(c, k)| TlsFiles {
                cert: c.clone(),
                key: k.clone(),
                ca: a.tls_ca.clone(),
            }),
        once: a.once,
        verbose: a.verbose,
        read_only_export: a.read_only_export,
        ..ServerConfig::default()
    };
    let started = async {
        let server = Server::new_live(live.clone(), config)?;
        let listener = match activated {
            Some(fd) => Listener::from_inherited(fd)?,
            None => Listener::bind(&addr).await?,
        };
        Ok::<_, std::io::Error>((server, listener))
    }
    .await;
    let (server, listener) = match started {
        Ok(v) => v,
        Err(e) => {
            let _ = live.current().close().await;
            return Err(anyhow!(e));
        }
    };
    let what = match &cached {
        Some(c) => format!("{path} through the cache {}", c.data_path().display()),
        None => path.clone(),
    };
    eprintln!(
        "fvd serve: serving {what}{} at {}{}",
        a.load_snapshot
            .as_deref()
            .map(|s| format!(" (snapshot {s})"))
            .unwrap_or_default(),
        listener.uri(&a.export_name),
        if a.read_only_export {
            " (read-only export, image filled by copy-on-read)"
        } else if read_only {
            " (read-only)"
        } else {
            ""
        }
    );
    let pidfile = match accepting(&a, &mut ready) {
        Ok(p) => p,
        Err(e) => {
            drop(listener);
            let _ = live.current().close().await;
            return Err(e);
        }
    };
    let summary = server
        .serve(listener, signal)
        .await
        .map_err(|e| anyhow!("{path}: closing: {e}"))?;
    extras.finish(&live.current());
    if let Some(c) = &cached {
        eprintln!("{}", super::serve_cache::summary(c));
    }
    drop(pidfile);
    if summary.abandoned > 0 {
        eprintln!(
            "fvd serve: {} connection(s) did not finish in time",
            summary.abandoned
        );
    }
    if a.verbose {
        eprintln!(
            "fvd serve: stopped after {} connection(s); {path} closed cleanly",
            summary.connections
        );
    }
    Ok(0)
}
