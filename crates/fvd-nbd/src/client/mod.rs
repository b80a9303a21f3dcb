//! The NBD client: one implementation for every user (remote bases, the
//! demo, the tests of the server).
//!
//! Layers, each in its own module:
//! * [`handshake`] — option negotiation on one stream ([`Handshake`]),
//!   with raw access for tests of servers;
//! * [`connection`] — one connection in transmission ([`Connection`]):
//!   many requests in flight, replies matched by cookie in any order,
//!   simple, structured and extended replies;
//! * `inflight` — the table of requests in flight and the assembly of
//!   their replies ([`Reply`]);
//! * this module — [`Client`]: connections opened as the load requires
//!   (several only when the server advertises `NBD_FLAG_CAN_MULTI_CONN`),
//!   reads split at the server's block size limits, retries with backoff
//!   on a new connection when one fails;
//! * `tls` — `STARTTLS` ([`TlsConfig`]); `error` — failures and their
//!   classification ([`RetryPolicy`]).
//!
//! # Which executor runs what
//!
//! The connections' reader and writer tasks, connecting, and the retry
//! loops (which sleep) run on a tokio runtime: the one given in
//! [`Config::runtime`], or else one shared by every client of the process,
//! started on first use with one worker thread (`fvd-nbd-client`) and kept
//! for the life of the process. What the methods of [`Client`] and
//! [`Connection`] return are channel receivers (a join handle, a oneshot),
//! which complete under any executor: tokio, fvd-core's `block_on`, the
//! simulator. So a base over NBD works the same in `fvd serve` (tokio),
//! the FUSE export and the CLI (`block_on`).
//!
//! # Failures and retries
//!
//! A connection that fails (socket error, a request in flight without a
//! byte from the server for [`Config::io_timeout`], the server shutting
//! down) is dropped, and every request that was in flight on it is tried
//! again on a new connection as [`Config::retry`] says (with
//! [`NoRetry`], the default, it fails at once). Only reads, block status
//! and cache requests are retried: a write, trim, zero or flush whose
//! connection died may or may not have happened, and a flush on a new
//! connection would not cover writes acknowledged on the old one, so those
//! fail. A protocol violation by the server or an error it reports for a
//! request is permanent. A server that comes back with an export of
//! another size is refused.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinSet;

pub mod connection;
mod error;
pub mod handshake;
mod inflight;
mod tls;

pub use connection::Connection;
pub use error::{NoRetry, RetryPolicy, nbd_error_name, option_error_name};
pub use handshake::{ExportInfo, Handshake, MAX_READ, Negotiation};
pub use inflight::{Chunk, Reply};
pub use tls::TlsConfig;

use error::Failure;

use crate::proto::consts;
use crate::proto::request::{Command, Request};
use crate::stream::Stream;

/// Largest range asked about in one `NBD_CMD_BLOCK_STATUS`.
const MAX_STATUS: u64 = 1 << 30;

/// A new connection is opened (up to [`Config::connections`], when the
/// server allows several) once every open one has this many requests in
/// flight.
const SPREAD_AT: usize = 4;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host and port.
    Tcp {
        /// Host name or address (no brackets for IPv6).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix domain socket.
    Unix(PathBuf),
}

/// What a client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where the server listens.
    pub address: Address,
    /// Export name ("" for the default export).
    pub export: String,
    /// How messages name the target (its URL).
    pub name: String,
}

/// How a client connects, negotiates and retries.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time allowed to connect and negotiate.
    pub connect_timeout: Duration,
    /// Time a connection with requests in flight may go without a byte
    /// from the server before it counts as dead.
    pub io_timeout: Duration,
    /// Most connections to the server (1 unless it advertises
    /// `NBD_FLAG_CAN_MULTI_CONN`).
    pub connections: usize,
    /// Most requests in flight on one connection.
    pub max_inflight: usize,
    /// Retries of requests whose connection failed.
    pub retry: Arc<dyn RetryPolicy>,
    /// What to negotiate.
    pub negotiation: Negotiation,
    /// Upgrade every connection to TLS (`STARTTLS`).
    pub tls: Option<TlsConfig>,
    /// The runtime for the client's tasks (default: the shared one).
    pub runtime: Option<Handle>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            connections: 4,
            max_inflight: 64,
            retry: Arc::new(NoRetry),
            negotiation: Negotiation::default(),
            tls: None,
            runtime: None,
        }
    }
}

/// The runtime shared by clients that were not given one.
pub fn shared_runtime() -> io::Result<Handle> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fvd-nbd-client")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(io::Error::other(format!(
            "cannot start the NBD client's runtime: {e}"
        ))),
    }
}

/// Open a plain stream to `address` (no timeout; see
/// [`Config::connect_timeout`] for the client's).
pub async fn connect_stream(address: &Address) -> io::Result<Stream> {
    match address {
        Address::Unix(path) => UnixStream::connect(path).await.map(Stream::unix),
        Address::Tcp { host, port } => {
            let mut last = None;
            for a in tokio::net::lookup_host((host.as_str(), *port)).await? {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(Stream::tcp(s)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("'{host}' has no address"))
            }))
        }
    }
}

/// One run of an allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationRun {
    /// Length in bytes.
    pub length: u64,
    /// Data (false: reads as zeros).
    pub data: bool,
}

/// An NBD client: one export, one or more connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("target", &self.inner.target.name)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

struct Inner {
    target: Target,
    config: Config,
    runtime: Handle,
    /// What the first connection negotiated.
    info: ExportInfo,
    /// Most connections: 1 unless the server allows several.
    max_connections: usize,
    conns: Mutex<Vec<Arc<Connection>>>,
    /// Held while a connection is being opened for a request.
    connecting: tokio::sync::Mutex<()>,
    /// A connection is being opened in the background.
    growing: AtomicBool,
}

/// Run `fut` on `runtime`; what is returned completes under any executor.
fn spawn_on<T: Send + 'static>(
    runtime: Handle,
    fut: impl Future<Output = io::Result<T>> + Send + 'static,
) -> impl Future<Output = io::Result<T>> + Send + 'static {
    let task = runtime.spawn(fut);
    async move {
        task.await
            .unwrap_or_else(|e| Err(io::Error::other(format!("NBD client task failed: {e}"))))
    }
}

impl Client {
    /// Connect to `target` (retrying as `config.retry` says) and learn the
    /// export's size and capabilities.
    pub fn connect(
        target: Target,
        config: Config,
    ) -> impl Future<Output = io::Result<Client>> + Send + 'static {
        let runtime = config.runtime.clone().map_or_else(shared_runtime, Ok);
        let task = runtime.map(|rt| spawn_on(rt.clone(), Client::open(target, config, rt)));
        async move { task?.await }
    }

    async fn open(target: Target, config: Config, runtime: Handle) -> io::Result<Client> {
        let first = retrying(&*config.retry, || {
            open_connection(&target, &config, &runtime, false)
        })
        .await?;
        let info = first.info().clone();
        let max_connections = if info.has_flag(consts::FLAG_CAN_MULTI_CONN) {
            config.connections.max(1)
        } else {
            // Without multi-conn several connections need not see the same
            // data (and qemu-nbd, for one, serves a single client unless
            // started with --shared).
            1
        };
        Ok(Client {
            inner: Arc::new(Inner {
                target,
                config,
                runtime,
                info,
                max_connections,
                conns: Mutex::new(vec![Arc::new(first)]),
                connecting: tokio::sync::Mutex::new(()),
                growing: AtomicBool::new(false),
            }),
        })
    }

    /// What the server said about the export on the first connection.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.inner
            .lock_conns()
            .iter()
            .filter(|c| !c.is_dead())
            .count()
    }

    /// Most connections this client opens.
    pub fn max_connections(&self) -> usize {
        self.inner.max_connections
    }

    fn spawn<T: Send + 'static>(
        &self,
        fut: impl Future<Output = io::Result<T>> + Send + 'static,
    ) -> impl Future<Output = io::Result<T>> + Send + 'static {
        spawn_on(self.inner.runtime.clone(), fut)
    }

    /// Read `len` bytes at `offset` (inside the export), split and aligned
    /// as the server's block sizes require, retried on failure.
    pub fn read(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Future<Output = io::Result<Vec<u8>>> + Send + 'static {
        let inner = self.inner.clone();
        self.spawn(async move { inner.read(offset, len).await })
    }

    /// Data and zero runs of `[offset, offset + len)` (inside the export)
    /// from `base:allocation`; everything is data when the server has no
    /// such context.
    pub fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<Vec<AllocationRun>>> + Send + 'static {
        let inner = self.inner.clone();
        self.spawn(async move { inner.allocation(offset, len).await })
    }

    /// Send `command` (with `flags`, for `[offset, offset + length)`, and
    /// `payload`) and return the server's reply as it is; an error reply is
    /// a [`Reply`] too. Reads, block status and cache requests are retried
    /// on a new connection when theirs fails.
    pub fn call(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Vec<u8>,
    ) -> impl Future<Output = io::Result<Reply>> + Send + 'static {
        let inner = self.inner.clone();
        let request = Request {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        };
        self.spawn(async move { inner.request(request, payload, |_, r| Ok(r)).await })
    }

    /// Write `data` at `offset` (`fua`: durable when acknowledged).
    pub fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        let flags = if fua { consts::CMD_FLAG_FUA } else { 0 };
        let len = data.len() as u64;
        self.checked(Command::Write, flags, offset, len, data)
    }

    /// Make every acknowledged write durable.
    pub fn flush(&self) -> impl Future<Output = io::Result<()>> + Send + 'static {
        self.checked(Command::Flush, 0, 0, 0, Vec::new())
    }

    /// `call` whose error reply becomes an error.
    fn checked(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: Vec<u8>,
    ) -> impl Future<Output = io::Result<()>> + Send + 'static {
        let name = self.inner.target.name.clone();
        let reply = self.call(command, flags, offset, length, payload);
        async move {
            let r = reply.await?;
            match r.first_error() {
                None => Ok(()),
                Some((code, message)) => Err(Failure::server(
                    &name,
                    &format!("{} of {length} bytes at offset {offset}", command.name()),
                    code,
                    message,
                )
                .to_io()),
            }
        }
    }
}

/// Run `attempt` until it succeeds, fails permanently, or has failed
/// transiently as often as `policy` allows, pausing between tries.
async fn retrying<T, F, Fut>(policy: &dyn RetryPolicy, mut attempt: F) -> io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let attempts = policy.attempts().max(1);
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(f) => {
                failures = failures.saturating_add(1);
                if failures >= attempts || !f.is_transient(policy) {
                    return Err(f.after_tries(failures));
                }
                tokio::time::sleep(policy.delay(failures)).await;
            }
        }
    }
}

/// Connect to `target` and negotiate, within the connect timeout.
/// `reconnect`: a missing unix socket is a server restarting (transient).
async fn open_connection(
    target: &Target,
    config: &Config,
    runtime: &Handle,
    reconnect: bool,
) -> Result<Connection, Failure> {
    let name = &target.name;
    let setup = async {
        let stream = connect_stream(&target.address).await.map_err(|e| {
            let what = match &target.address {
                Address::Unix(p) => format!("{name}: connect to {}", p.display()),
                Address::Tcp { .. } => format!("{name}: connect"),
            };
            let mut f = Failure::io(&what, &e);
            if reconnect && e.kind() == io::ErrorKind::NotFound {
                f = Failure::transient(f.kind, f.message);
            }
            f
        })?;
        let hs = Handshake::begin(stream, name, None).await?;
        hs.run(&target.export, &config.negotiation, config.tls.as_ref())
            .await
    };
    let (stream, info) = match tokio::time::timeout(config.connect_timeout, setup).await {
        Ok(r) => r?,
        Err(_) => {
            let e = io::Error::from(io::ErrorKind::TimedOut);
            return Err(Failure::io(&format!("{name}: connect"), &e));
        }
    };
    Ok(Connection::start(
        stream,
        info,
        name,
        config.io_timeout,
        config.max_inflight,
        runtime,
    ))
}

impl Inner {
    fn lock_conns(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Connection>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The least loaded live connection, and how many are live.
    fn least_loaded(&self) -> (Option<Arc<Connection>>, usize) {
        let mut conns = self.lock_conns();
        conns.retain(|c| !c.is_dead());
        let best = conns.iter().min_by_key(|c| c.inflight()).cloned();
        (best, conns.len())
    }

    /// A connection for one request: the least loaded one (opening another
    /// in the background when all are busy), or a new one when none is
    /// left.
    async fn connection(self: &Arc<Self>) -> Result<Arc<Connection>, Failure> {
        loop {
            if let (Some(c), live) = self.least_loaded() {
                if c.inflight() >= SPREAD_AT && live < self.max_connections {
                    self.grow();
                }
                return Ok(c);
            }
            let _one_at_a_time = self.connecting.lock().await;
            if self.least_loaded().0.is_some() {
                continue;
            }
            let c = self.reopen().await?;
            self.lock_conns().push(c.clone());
            return Ok(c);
        }
    }

    /// A new connection to the same export.
    async fn reopen(&self) -> Result<Arc<Connection>, Failure> {
        let c = open_connection(&self.target, &self.config, &self.runtime, true).await?;
        let (was, now) = (self.info.size, c.info().size);
        if was != now {
            return Err(Failure::permanent(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the export changed size from {was} to {now} bytes",
                    self.target.name
                ),
            ));
        }
        Ok(Arc::new(c))
    }

    /// Open one more connection in the background.
    fn grow(self: &Arc<Self>) {
        if self.growing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        self.runtime.spawn(async move {
            if let Ok(c) = inner.reopen().await {
                let mut conns = inner.lock_conns();
                if conns.len() < inner.max_connections {
                    conns.push(c);
                }
            }
            inner.growing.store(false, Ordering::Release);
        });
    }

    /// One request, retried on a new connection when its own fails if its
    /// command allows (reads, block status, cache: they change nothing);
    /// `check` turns the reply into the result (a server error into a
    /// failure).
    async fn request<T>(
        self: &Arc<Self>,
        request: Request,
        payload: Vec<u8>,
        check: impl Fn(&Connection, Reply) -> Result<T, Failure>,
    ) -> io::Result<T> {
        let idempotent = matches!(
            request.command,
            Command::Read | Command::BlockStatus | Command::Cache
        );
        let policy: &dyn RetryPolicy = if idempotent {
            &*self.config.retry
        } else {
            &NoRetry
        };
        // Only the first try has the payload: requests with one are not
        // retried.
        let mut payload = Some(payload);
        retrying(policy, || {
            let payload = payload.take().unwrap_or_default();
            async {
                let c = self.connection().await?;
                let r = c.request(request, false, payload).await;
                let r = r.and_then(|reply| check(&c, reply));
                if let Err(f) = &r
                    && !f.is_permanent()
                {
                    // The server is going away (or the connection did): do
                    // not send it more.
                    self.lock_conns().retain(|x| !Arc::ptr_eq(x, &c));
                }
                r
            }
        })
        .await
    }

    fn server_failure(&self, what: &str, code: u32, message: &str) -> Failure {
        Failure::server(&self.target.name, what, code, message)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {len} bytes at offset {offset} are outside the export ({} bytes)",
                    self.target.name, self.info.size
                ),
            ));
        }
        Ok(())
    }

    async fn read(self: &Arc<Self>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        self.check_range(offset, len64)?;
        let pieces = split_read(
            offset,
            len64,
            self.info.min_block,
            self.info.max_block,
            self.info.size,
        );
        if let [p] = pieces[..]
            && p.aligned_start == p.from
            && p.aligned_start.saturating_add(p.aligned_len) == p.to
        {
            return self.read_aligned(p.aligned_start, p.aligned_len).await;
        }
        let mut out = vec![0u8; len];
        let mut tasks = JoinSet::new();
        for p in pieces {
            let inner = self.clone();
            tasks.spawn(async move {
                let data = inner.read_aligned(p.aligned_start, p.aligned_len).await?;
                io::Result::Ok((data, p))
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (data, p) =
                done.map_err(|e| io::Error::other(format!("NBD read task failed: {e}")))??;
            let src = data.get(p.range_in(p.aligned_start));
            let dst = out.get_mut(p.range_in(offset));
            match (src, dst) {
                (Some(src), Some(dst)) if src.len() == dst.len() => dst.copy_from_slice(src),
                _ => return Err(io::Error::other("NBD read pieces do not fit")),
            }
        }
        Ok(out)
    }

    /// One read request (already aligned and within the limits).
    async fn read_aligned(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let what = format!("read of {len} bytes at offset {offset}");
        let request = Request {
            flags: 0,
            command: Command::Read,
            cookie: 0,
            offset,
            length: len,
        };
        self.request(request, Vec::new(), |_, reply| match reply.first_error() {
            Some((code, message)) => Err(self.server_failure(&what, code, message)),
            None => Ok(reply.data),
        })
        .await
    }

    async fn allocation(self: &Arc<Self>, offset: u64, len: u64) -> io::Result<Vec<AllocationRun>> {
        self.check_range(offset, len)?;
        let end = offset.saturating_add(len);
        let mut runs = Runs::default();
        if self.info.allocation_context.is_none() {
            runs.push(len, true);
            return Ok(runs.0);
        }
        let min = u64::from(self.info.min_block.max(1));
        let size = self.info.size;
        let mut pos = offset;
        while pos < end {
            let a_start = align_down(pos, min);
            // Whole minimum blocks, within the export and a 32-bit length.
            let a_len = align_up(end.saturating_sub(a_start).min(MAX_STATUS), min)
                .min(size.saturating_sub(a_start))
                .min(align_down(u64::from(u32::MAX), min));
            let what = format!("block status of {a_len} bytes at offset {a_start}");
            let request = Request {
                flags: 0,
                command: Command::BlockStatus,
                cookie: 0,
                offset: a_start,
                length: a_len,
            };
            let descriptors = self
                .request(request, Vec::new(), |c, reply| {
                    if let Some((code, message)) = reply.first_error() {
                        return Err(self.server_failure(&what, code, message));
                    }
                    // Context ids are per connection.
                    let Some(ctx) = c.info().allocation_context else {
                        return Ok(vec![(a_len, 0)]);
                    };
                    match reply.status(ctx) {
                        Some(d) if !d.is_empty() => Ok(d.to_vec()),
                        _ => Err(Failure::protocol(
                            &self.target.name,
                            "no extents for the allocation context",
                        )),
                    }
                })
                .await?;
            let mut cur = a_start;
            for (dlen, flags) in descriptors {
                let seg_end = cur.saturating_add(dlen);
                let from = cur.max(pos);
                let to = seg_end.min(end);
                runs.push(
                    to.saturating_sub(from),
                    flags & u64::from(consts::STATE_ZERO) == 0,
                );
                cur = seg_end;
                if cur >= end {
                    break;
                }
            }
            if cur <= pos {
                return Err(
                    Failure::protocol(&self.target.name, "block status made no progress").to_io(),
                );
            }
            pos = cur.min(end);
        }
        Ok(runs.0)
    }
}

/// Allocation runs, merged as they are added.
#[derive(Default)]
struct Runs(Vec<AllocationRun>);

impl Runs {
    fn push(&mut self, length: u64, data: bool) {
        if length == 0 {
            return;
        }
        match self.0.last_mut() {
            Some(last) if last.data == data => last.length = last.length.saturating_add(length),
            _ => self.0.push(AllocationRun { length, data }),
        }
    }
}

fn align_down(v: u64, block: u64) -> u64 {
    v.saturating_sub(v.checked_rem(block).unwrap_or(0))
}

fn align_up(v: u64, block: u64) -> u64 {
    align_down(v.saturating_add(block.saturating_sub(1)), block)
}

/// One request of a read split at the server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    /// The request: aligned to the minimum block size.
    aligned_start: u64,
    aligned_len: u64,
    /// The part of the caller's read it serves.
    from: u64,
    to: u64,
}

impl Piece {
    /// `[from, to)` relative to `base`, as buffer indices.
    fn range_in(&self, base: u64) -> std::ops::Range<usize> {
        let at = |v: u64| usize::try_from(v.saturating_sub(base)).unwrap_or(usize::MAX);
        at(self.from)..at(self.to)
    }
}

/// Split a read of `[offset, offset + len)` into requests aligned to
/// `min_block`, of at most `max_block` bytes, inside an export of `size`.
fn split_read(offset: u64, len: u64, min_block: u32, max_block: u32, size: u64) -> Vec<Piece> {
    let min = u64::from(min_block.max(1));
    let max = u64::from(max_block.max(min_block).max(1));
    let end = offset.saturating_add(len);
    let mut pieces = Vec::new();
    let mut pos = offset;
    while pos < end {
        let aligned_start = align_down(pos, min);
        let to = end.min(aligned_start.saturating_add(max));
        let aligned_end = align_up(to, min).min(size);
        pieces.push(Piece {
            aligned_start,
            aligned_len: aligned_end.saturating_sub(aligned_start),
            from: pos,
            to,
        });
        pos = to;
    }
    pieces
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_split_at_the_block_limits() {
        let p = split_read(1000, 3000, 4096, 65536, 1 << 20);
        assert_eq!(
            p,
            [Piece {
                aligned_start: 0,
                aligned_len: 4096,
                from: 1000,
                to: 4000
            }]
        );
        let p = split_read(0, 200_000, 4096, 65536, 1 << 20);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|x| x.aligned_len <= 65536));
        assert_eq!(p[3].to, 200_000);
        assert_eq!(p[3].aligned_len, 200_704 - 196_608);
        // The last block of an export whose size is not a multiple.
        let p = split_read(10_000, 10, 4096, 65536, 10_010);
        assert_eq!(p[0].aligned_start, 8192);
        assert_eq!(p[0].aligned_len, 1818);
        let p = split_read(5, 10, 1, 1 << 25, 100);
        assert_eq!(p[0].range_in(5), 0..10);
        assert_eq!(align_up(4097, 4096), 8192);
        assert_eq!(align_down(4097, 4096), 4096);
        assert_eq!(align_up(0, 512), 0);
    }
}
