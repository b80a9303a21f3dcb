//! One connection in the transmission phase, pipelined.
//!
//! Two tasks per connection, on the client's tokio runtime:
//! * the writer takes encoded requests from a channel and writes whatever
//!   has queued up with one vectored write;
//! * the reader reads replies in the order the server sends them, finds
//!   each one's request by its cookie in the table of requests in flight,
//!   and assembles structured replies chunk by chunk (reads land straight
//!   in the request's buffer).
//!
//! Any number of callers submit requests at once (up to the in-flight
//! limit); each waits on its own channel, so the futures of [`Connection`]
//! complete under any executor. A request in flight with no byte from the
//! server for the I/O timeout, a socket error or a protocol violation kill
//! the connection: the table is closed, every request in it fails with the
//! reason, and both tasks end. Dropping the [`Connection`] sends
//! `NBD_CMD_DISC` once the requests in flight have their replies.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::runtime::Handle;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use super::error::Failure;
use super::handshake::ExportInfo;
use super::inflight::{Chunk, Pending, Reply, Table, Waiter};
use crate::proto::consts;
use crate::proto::reply::{self, ChunkHeader, ChunkPayload, ReplyHeader, SimpleReply};
use crate::proto::request::{Command, Request, encode_request};
use crate::stream::{ReadHalf, Stream, WriteHalf, write_all_vectored};

/// Largest non-data reply chunk accepted (block status lists, messages).
const MAX_CONTROL_PAYLOAD: u64 = 16 << 20;

/// Most requests gathered into one vectored write.
const MAX_BATCH: usize = 256;

/// What the reader and the writer share with the callers.
struct Shared {
    table: Table,
    target: String,
    /// Wakes the idle reader: a request entered, or the handle is gone.
    wake: Notify,
    /// The handle was dropped: finish what is in flight, then stop.
    closing: AtomicBool,
    /// Becomes true once the connection is dead.
    dead: watch::Sender<bool>,
    tasks: std::sync::Mutex<Vec<AbortHandle>>,
}

impl Shared {
    /// The connection is over because of `f`: fail everything in flight
    /// and refuse new requests.
    fn close(&self, f: &Failure) {
        self.table.close(f);
        self.dead.send_replace(true);
    }

    /// The connection died of `f`: close it and stop both tasks.
    fn kill(&self, f: &Failure) {
        self.close(f);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
    }
}

/// What the writer writes: a request (header and payload) or raw bytes,
/// and whom to tell once it is written.
struct Outgoing {
    bufs: Vec<Vec<u8>>,
    written: Option<oneshot::Sender<()>>,
}

/// One negotiated connection with many requests in flight.
pub struct Connection {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<Outgoing>,
    info: ExportInfo,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("target", &self.shared.target)
            .field("inflight", &self.inflight())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Start the transmission phase on `stream`, negotiated as `info`:
    /// spawn the reader and writer tasks on `runtime`. At most
    /// `max_inflight` requests are in flight at once; a request in flight
    /// with no byte from the server for `io_timeout` kills the connection.
    pub fn start(
        stream: Stream,
        info: ExportInfo,
        target: &str,
        io_timeout: Duration,
        max_inflight: usize,
        runtime: &Handle,
    ) -> Connection {
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            table: Table::new(max_inflight),
            target: target.to_string(),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            dead: watch::Sender::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        let reader = ReplyReader {
            rd: BufReader::with_capacity(128 * 1024, rd),
            shared: shared.clone(),
            structured: info.structured,
            extended: info.extended,
            io_timeout,
        };
        let disc = Request {
            flags: 0,
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let disc = encode_request(&disc, info.extended).unwrap_or_default();
        let r = runtime.spawn(reader.run());
        let w = runtime.spawn(writer(wr, rx, shared.clone(), disc));
        shared
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([r.abort_handle(), w.abort_handle()]);
        // A task may have died before its handle was recorded.
        if *shared.dead.borrow() {
            r.abort();
            w.abort();
        }
        Connection {
            shared,
            requests: tx,
            info,
        }
    }

    /// What was negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.shared.table.inflight()
    }

    /// Whether the connection has died.
    pub fn is_dead(&self) -> bool {
        *self.shared.dead.borrow()
    }

    /// Wait until the connection dies (the server hung up, a timeout, a
    /// protocol error).
    pub async fn closed(&self) {
        let mut rx = self.shared.dead.subscribe();
        let _ = rx.wait_for(|dead| *dead).await;
    }

    /// Send `request` exactly as given (its cookie included, whatever its
    /// flags and length say) followed by `payload`; once it is queued for
    /// writing, return what waits for the reply. For tests of servers.
    pub async fn submit_raw(
        &self,
        request: Request,
        payload: Vec<u8>,
    ) -> io::Result<impl Future<Output = io::Result<Reply>> + Send + 'static> {
        let waiter = self
            .submit(request, true, payload)
            .await
            .map_err(|f| f.to_io())?;
        let shared = self.shared.clone();
        Ok(async move { wait(waiter, &shared).await.map_err(|f| f.to_io()) })
    }

    /// Send `bytes` as they are (for tests of servers: malformed requests)
    /// and wait until they are written.
    pub async fn send_raw(&self, bytes: Vec<u8>) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        let out = Outgoing {
            bufs: vec![bytes],
            written: Some(tx),
        };
        let closed = || io::Error::new(io::ErrorKind::NotConnected, "connection closed");
        self.requests.send(out).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())
    }

    /// Drop the connection at once: no `NBD_CMD_DISC`, requests in flight
    /// fail (for tests of servers: a client that vanishes).
    pub fn abort(&self) {
        self.shared.kill(&Failure::permanent(
            io::ErrorKind::ConnectionAborted,
            format!("{}: the connection was aborted", self.shared.target),
        ));
    }

    pub(crate) async fn request(
        &self,
        request: Request,
        keep_cookie: bool,
        payload: Vec<u8>,
    ) -> Result<Reply, Failure> {
        let waiter = self.submit(request, keep_cookie, payload).await?;
        wait(waiter, &self.shared).await
    }

    /// Enter `request` in the table and queue it for the writer.
    async fn submit(
        &self,
        request: Request,
        keep_cookie: bool,
        payload: Vec<u8>,
    ) -> Result<Waiter, Failure> {
        let slot = self.shared.table.slot().await?;
        let target = &self.shared.target;
        let check = encode_request(&request, self.info.extended).map_err(|e| {
            Failure::permanent(io::ErrorKind::InvalidInput, format!("{target}: {e}"))
        })?;
        let (entered, waiter) = self.shared.table.enter(request, keep_cookie, slot)?;
        let header = if keep_cookie {
            check
        } else {
            encode_request(&entered, self.info.extended).unwrap_or(check)
        };
        self.shared.wake.notify_one();
        let out = Outgoing {
            bufs: vec![header, payload],
            written: None,
        };
        if self.requests.send(out).is_err()
            && let Some(p) = self.shared.table.take(entered.cookie)
        {
            // The writer is gone, so the connection is dead.
            p.fail(lost(&self.shared));
        }
        Ok(waiter)
    }
}

/// Wait for the reply a request is promised.
async fn wait(waiter: Waiter, shared: &Shared) -> Result<Reply, Failure> {
    match waiter.await {
        Ok(r) => r,
        Err(_) => Err(lost(shared)),
    }
}

/// Why a request got no reply: the reason the connection died, or else
/// that it was lost.
fn lost(shared: &Shared) -> Failure {
    shared.table.closed().unwrap_or_else(|| {
        Failure::transient(
            io::ErrorKind::ConnectionAborted,
            format!(
                "{}: the connection was lost with the request in flight",
                shared.target
            ),
        )
    })
}

impl Drop for Connection {
    fn drop(&mut self) {
        // The writer sees its channel close and sends NBD_CMD_DISC; the
        // reader stops once nothing is in flight.
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// The writer task.
async fn writer(
    mut w: WriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
    disc: Vec<u8>,
) {
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.extend(first.bufs);
        acks.extend(first.written);
        for _ in 1..MAX_BATCH {
            let Ok(out) = rx.try_recv() else { break };
            batch.extend(out.bufs);
            acks.extend(out.written);
        }
        let r = match write_all_vectored(&mut w, &batch).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        };
        batch.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        if let Err(e) = r {
            shared.kill(&Failure::io(
                &format!("{}: send request", shared.target),
                &e,
            ));
            return;
        }
    }
    // Every handle is gone: a polite disconnect (which fails harmlessly if
    // the server already hung up).
    let _ = w.write_all(&disc).await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// The reader task's state.
struct ReplyReader {
    rd: BufReader<ReadHalf>,
    shared: Arc<Shared>,
    structured: bool,
    extended: bool,
    io_timeout: Duration,
}

impl ReplyReader {
    async fn run(mut self) {
        match self.serve().await {
            // Closed with nothing in flight: the writer may still say
            // goodbye.
            Ok(()) => self.shared.close(&Failure::transient(
                io::ErrorKind::ConnectionAborted,
                format!("{}: the connection was closed", self.shared.target),
            )),
            Err(f) => self.shared.kill(&f),
        }
    }

    fn protocol(&self, msg: impl std::fmt::Display) -> Failure {
        Failure::protocol(&self.shared.target, msg)
    }

    /// Read replies until the connection ends: `Ok` when it closed while
    /// nothing was in flight.
    async fn serve(&mut self) -> Result<(), Failure> {
        loop {
            let mut hdr = [0u8; consts::EXTENDED_REPLY_HEADER_LEN];
            let (magic, rest) = hdr.split_at_mut(4);
            if !self.fill(magic, true).await? {
                return Ok(());
            }
            let len =
                reply::reply_header_len(magic, self.extended).map_err(|e| self.protocol(e))?;
            let rest = rest.get_mut(..len.saturating_sub(4)).unwrap_or_default();
            self.fill(rest, false).await?;
            let header = hdr.get(..len).unwrap_or_default();
            match reply::decode_reply_header(header, self.extended).map_err(|e| self.protocol(e))? {
                ReplyHeader::Simple(s) => self.simple(s).await?,
                ReplyHeader::Chunk(h) => self.chunk(h).await?,
            }
        }
    }

    /// Fill `buf` from the server. With `may_idle`, waiting with nothing
    /// in flight is not timed, and a connection closed (or given up) before
    /// the first byte returns `Ok(false)`.
    async fn fill(&mut self, buf: &mut [u8], may_idle: bool) -> Result<bool, Failure> {
        let mut got = 0usize;
        while got < buf.len() {
            let busy = !may_idle || got > 0 || self.shared.table.inflight() > 0;
            if !busy && self.shared.closing.load(Ordering::Acquire) {
                return Ok(false);
            }
            let dst = buf.get_mut(got..).unwrap_or_default();
            tokio::select! {
                r = self.rd.read(dst) => match r {
                    Ok(0) if !busy => return Ok(false),
                    Ok(0) => {
                        let e = io::Error::from(io::ErrorKind::UnexpectedEof);
                        return Err(Failure::io(&format!("{}: read reply", self.shared.target), &e));
                    }
                    Ok(n) => got = got.saturating_add(n),
                    Err(e) => {
                        return Err(Failure::io(&format!("{}: read reply", self.shared.target), &e));
                    }
                },
                _ = self.shared.wake.notified(), if !busy => {}
                _ = tokio::time::sleep(self.io_timeout), if busy => {
                    let e = io::Error::from(io::ErrorKind::TimedOut);
                    return Err(Failure::io(
                        &format!("{}: waiting for a reply", self.shared.target),
                        &e,
                    ));
                }
            }
        }
        Ok(true)
    }

    fn take(&self, cookie: u64) -> Result<Pending, Failure> {
        self.shared.table.take(cookie).ok_or_else(|| {
            self.protocol(format!("reply for cookie {cookie}, which is not in flight"))
        })
    }

    async fn simple(&mut self, s: SimpleReply) -> Result<(), Failure> {
        let mut p = self.take(s.cookie)?;
        p.reply.simple = true;
        p.reply.simple_error = s.error;
        if s.error == 0 && p.request.command == Command::Read {
            // The data follows, exactly as long as the request.
            let mut data = std::mem::take(p.data());
            let r = self.fill(&mut data, false).await;
            p.reply.data = data;
            if let Err(f) = r {
                p.fail(f.clone());
                return Err(f);
            }
        }
        p.finish(&self.shared.target);
        Ok(())
    }

    async fn chunk(&mut self, h: ChunkHeader) -> Result<(), Failure> {
        if !self.structured {
            return Err(self.protocol("structured reply without negotiation"));
        }
        let mut p = self.take(h.cookie)?;
        match self.chunk_into(&mut p, &h).await {
            Ok(()) if h.is_done() => p.finish(&self.shared.target),
            Ok(()) => self.shared.table.put_back(p),
            Err(f) => {
                p.fail(f.clone());
                return Err(f);
            }
        }
        Ok(())
    }

    /// Check that `[at, at + n)` lies inside the read `p`; returns the
    /// position in its buffer.
    fn inside(&self, p: &Pending, what: &str, at: u64, n: u64) -> Result<usize, Failure> {
        let r = &p.request;
        let end = r.offset.saturating_add(r.length);
        if r.command != Command::Read {
            return Err(self.protocol(format!(
                "{what} chunk in the reply to a {}",
                r.command.name()
            )));
        }
        if at < r.offset || at.checked_add(n).is_none_or(|e| e > end) {
            return Err(self.protocol(format!(
                "{what} chunk at {at} (+{n}) outside the read of {} bytes at offset {}",
                r.length, r.offset
            )));
        }
        usize::try_from(at.saturating_sub(r.offset)).map_err(|_| self.protocol("offset overflow"))
    }

    async fn chunk_into(&mut self, p: &mut Pending, h: &ChunkHeader) -> Result<(), Failure> {
        if h.reply_type == consts::REPLY_TYPE_OFFSET_DATA {
            if h.length < 9 {
                return Err(self.protocol("OFFSET_DATA chunk shorter than 9 bytes"));
            }
            let mut at = [0u8; 8];
            self.fill(&mut at, false).await?;
            let at = u64::from_be_bytes(at);
            let n = h.length.saturating_sub(8);
            let from = self.inside(p, "data", at, n)?;
            let to = from.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
            let mut data = std::mem::take(p.data());
            let r = match data.get_mut(from..to) {
                Some(dst) => self.fill(dst, false).await.map(|_| ()),
                None => Err(self.protocol("data chunk outside the buffer")),
            };
            p.reply.data = data;
            r?;
            p.cover(at, n);
            p.reply.chunks.push(Chunk::Data {
                offset: at,
                length: n,
            });
            return Ok(());
        }
        if h.length > MAX_CONTROL_PAYLOAD {
            return Err(self.protocol(format!(
                "reply chunk of type {} with {} bytes is too large",
                h.reply_type, h.length
            )));
        }
        let mut payload = vec![0u8; usize::try_from(h.length).unwrap_or(0)];
        self.fill(&mut payload, false).await?;
        let chunk = match reply::decode_chunk_payload(h, &payload).map_err(|e| self.protocol(e))? {
            ChunkPayload::None => Chunk::None,
            ChunkPayload::OffsetData { .. } => {
                return Err(self.protocol("unexpected OFFSET_DATA chunk"));
            }
            ChunkPayload::OffsetHole { offset, length } => {
                let n = u64::from(length);
                self.inside(p, "hole", offset, n)?;
                p.data();
                p.cover(offset, n);
                Chunk::Hole { offset, length: n }
            }
            ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            } => Chunk::Status {
                context_id,
                descriptors: descriptors
                    .into_iter()
                    .map(|(l, f)| (u64::from(l), u64::from(f)))
                    .collect(),
            },
            ChunkPayload::BlockStatusExt {
                context_id,
                descriptors,
            } => Chunk::Status {
                context_id,
                descriptors,
            },
            ChunkPayload::Error { error, message }
            | ChunkPayload::UnknownError { error, message, .. } => Chunk::Error {
                error,
                message,
                offset: None,
            },
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            } => Chunk::Error {
                error,
                message,
                offset: Some(offset),
            },
        };
        if matches!(chunk, Chunk::Status { .. }) && p.request.command != Command::BlockStatus {
            return Err(self.protocol(format!(
                "block status chunk in the reply to a {}",
                p.request.command.name()
            )));
        }
        p.reply.chunks.push(chunk);
        Ok(())
    }
}
