//! The transmission phase: the request loop of one connection.
//!
//! One reader (this loop) decodes requests, validates them with
//! [`validate_request`], reads their payloads and spawns one task per
//! request; tasks run concurrently against the shared image and hand their
//! replies, each whole, in completion order, to one writer task, which
//! writes whatever has queued up with a single vectored write (so replies
//! never interleave, and a busy connection needs few system calls).
//!
//! Bounds: at most [`ServerConfig::max_inflight`] requests run at once;
//! write payloads, read lengths and a fixed overhead per request stay
//! under [`ServerConfig::max_buffered`] bytes from the moment a request is
//! read until its reply has been written (the reader waits for room before
//! reading the next payload), so a client that stops reading replies stops
//! being served instead of filling memory. A payload larger than the export's maximum
//! block size (32 MiB) is not read: the client gets `EINVAL` and the
//! connection is closed, since the stream cannot be resynchronised
//! without reading it.
//!
//! Replies: simple replies unless structured replies were negotiated;
//! with structured replies, reads answer with `OFFSET_DATA` chunks (and
//! `OFFSET_HOLE` chunks for the zero ranges of reads of at least
//! [`SPARSE_READ_MIN`] bytes, unless `NBD_CMD_FLAG_DF`), errors with
//! `ERROR` chunks carrying a message, and other successes with simple
//! replies; with extended headers every reply is an extended chunk.
//!
//! Buffers: a write's payload is read from the socket into a buffer from
//! the engine's pool, and that buffer is what the storage writes; a read
//! lands in a pool buffer that the writer task sends as it is (a header
//! piece and a data piece in one vectored write). Zero ranges of a read
//! are found in the data read, 4 KiB at a time ([`HOLE_GRAIN`]), not by a
//! block status lookup first: the scan stops at the first non-zero byte of
//! each piece of data, while a lookup cost every large read one more trip
//! to the I/O threads (and `SEEK_DATA`/`SEEK_HOLE` calls); 1 MiB reads at
//! queue depth 8 ran about a third faster without it. The data chunks of
//! such a read are views of the one buffer.
//!
//! [`ServerConfig::max_inflight`]: super::ServerConfig::max_inflight
//! [`ServerConfig::max_buffered`]: super::ServerConfig::max_buffered

use std::future::Future;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fvd_core::iobuf::zero_runs;
use fvd_core::{Extent, Image, IoBuf, Source};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::Shared;
use super::handshake::{META_ID_ALLOCATION_DEPTH, META_ID_BASE_ALLOCATION, Session};
use crate::proto::consts::{self, EINVAL, EIO, EOVERFLOW};
use crate::proto::error::nbd_error_from_errno;
use crate::proto::reply::{self, ReplyTo, encode_simple_reply};
use crate::proto::request::{Command, Request, decode_request};
use crate::proto::transmission::{
    TransmissionContext, decode_block_status_payload, validate_range, validate_request,
};
use crate::stream::write_all_vectored;

/// Reads at least this long look for zero ranges and send them as
/// `OFFSET_HOLE` chunks; shorter reads always send their data (a block
/// status lookup costs more than sending a few KiB).
pub const SPARSE_READ_MIN: u64 = 64 * 1024;

/// Granularity of the zero ranges a read sends as `OFFSET_HOLE` chunks
/// (aligned to the export's offsets).
pub const HOLE_GRAIN: u64 = 4096;

/// Largest range one `NBD_CMD_BLOCK_STATUS` answer covers; clients ask
/// again for the rest.
const BLOCK_STATUS_WINDOW: u64 = 1 << 30;

/// Most descriptors in one block status chunk (the spec asks for at most
/// 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Bytes charged to the buffer budget for every request on top of its
/// payload and read data (reply headers, bookkeeping).
const REQUEST_OVERHEAD: u32 = 64;

/// Most replies gathered into one vectored write.
const MAX_BATCH: usize = 256;

/// Bytes after which a batch is written even if more replies are queued.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// One piece of a reply on the wire.
enum Part {
    /// Header bytes, or a whole reply without data.
    Bytes(Vec<u8>),
    /// Data read from the image: the buffer the engine read into.
    Data(IoBuf),
    /// A range of a buffer shared by the data chunks of one sparse read.
    Shared(Arc<IoBuf>, Range<usize>),
}

impl AsRef<[u8]> for Part {
    fn as_ref(&self) -> &[u8] {
        match self {
            Part::Bytes(b) => b,
            Part::Data(d) => d,
            Part::Shared(d, r) => d.get(r.clone()).unwrap_or_default(),
        }
    }
}

/// What request tasks hand to the writer task.
enum Msg {
    /// One complete reply in one piece.
    Reply(Part),
    /// One complete reply in pieces written back to back (a header and
    /// its data, the chunks of a sparse read).
    Parts(Vec<Part>),
    /// The budget of a finished request, released once everything queued
    /// before it has been written.
    Release(OwnedSemaphorePermit),
}

/// Per-connection state shared by the request tasks.
struct Ctx {
    shared: Arc<Shared>,
    session: Session,
    out: mpsc::UnboundedSender<Msg>,
    broken: Arc<AtomicBool>,
}

/// The writer task: write queued replies in batches until every sender is
/// gone, then shut the stream down. After a write error it keeps draining
/// (releasing budgets) without writing.
async fn writer_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    broken: Arc<AtomicBool>,
) {
    let mut batch: Vec<Part> = Vec::new();
    let mut released: Vec<OwnedSemaphorePermit> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Reply(p) => {
                    bytes = bytes.saturating_add(p.as_ref().len());
                    batch.push(p);
                }
                Msg::Parts(parts) => {
                    for p in parts {
                        bytes = bytes.saturating_add(p.as_ref().len());
                        batch.push(p);
                    }
                }
                Msg::Release(p) => released.push(p),
            }
            if batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() && !broken.load(Ordering::Acquire) {
            let r = match write_all_vectored(&mut w, &batch).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                broken.store(true, Ordering::Release);
            }
        }
        batch.clear();
        released.clear();
    }
    let _ = w.shutdown().await;
}

/// Completes with `None` as soon as `stop` fires (or its sender is gone).
async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    fut: impl Future<Output = T>,
) -> Option<T> {
    if *stop.borrow() {
        return None;
    }
    tokio::select! {
        biased;
        _ = stop.changed() => None,
        v = fut => Some(v),
    }
}

/// Serve requests until the client disconnects, violates the protocol or
/// the server stops; then let the requests in flight finish and close the
/// connection.
pub(crate) async fn run<R, W>(
    reader: R,
    writer: W,
    shared: Arc<Shared>,
    session: Session,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = &shared.config;
    let max_inflight = cfg.max_inflight;
    let drain_timeout = cfg.drain_timeout;
    let budget = Arc::new(Semaphore::new(cfg.max_buffered));
    let mut tctx = TransmissionContext::new(
        session.size,
        shared.export_flags(session.structured, session.extended),
    );
    tctx.structured_replies = session.structured;
    tctx.extended_headers = session.extended;
    tctx.block_status = session.any_meta();
    tctx.min_block_size = cfg.min_block_size;
    tctx.max_payload = shared.max_payload();
    let (out, rx) = mpsc::unbounded_channel();
    let broken = Arc::new(AtomicBool::new(false));
    let mut writer_task = tokio::spawn(writer_loop(writer, rx, broken.clone()));
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        session,
        out,
        broken,
    });
    let mut rd = BufReader::with_capacity(128 * 1024, reader);
    let hdr_len = Request::header_len(session.extended);
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut result = Ok(());

    loop {
        while tasks.try_join_next().is_some() {}
        if ctx.broken.load(Ordering::Acquire) {
            break;
        }
        let mut hdr_buf = [0u8; consts::EXTENDED_REQUEST_HEADER_LEN];
        let hdr = hdr_buf.get_mut(..hdr_len).unwrap_or_default();
        match unless_stopped(&mut stop, rd.read_exact(hdr)).await {
            None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    result = Err(e);
                }
                break;
            }
        }
        let req = match decode_request(hdr, session.extended) {
            Ok(r) => r,
            Err(e) => {
                result = Err(io::Error::new(io::ErrorKind::InvalidData, e));
                break;
            }
        };
        if req.command == Command::Disc {
            break;
        }
        let payload_len = req.payload_len(session.extended);
        if payload_len > u64::from(tctx.max_payload) {
            // The payload cannot be buffered and skipping it would take as
            // long as reading it: refuse and hang up.
            ctx.error(&req, EINVAL, "request payload too large");
            result = Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request payload of {payload_len} bytes refused"),
            ));
            break;
        }
        let verdict = validate_request(&req, &tctx);
        let read_len = if req.command == Command::Read && verdict.is_ok() {
            req.length
        } else {
            0
        };
        let cost = u32::try_from(payload_len.saturating_add(read_len))
            .unwrap_or(u32::MAX)
            .saturating_add(REQUEST_OVERHEAD);
        // Room for the request: a task slot and its bytes.
        while tasks.len() >= max_inflight {
            if unless_stopped(&mut stop, tasks.join_next()).await.is_none() {
                break;
            }
        }
        if tasks.len() >= max_inflight {
            break;
        }
        let permit = match unless_stopped(&mut stop, budget.clone().acquire_many_owned(cost)).await
        {
            Some(Ok(p)) => p,
            _ => break,
        };
        let payload = match read_payload(&mut rd, payload_len).await {
            Ok(p) => p,
            Err(e) => {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    result = Err(e);
                }
                break;
            }
        };
        let task_ctx = ctx.clone();
        tasks.spawn(async move {
            match verdict {
                Ok(()) => task_ctx.process(req, payload).await,
                Err(code) => task_ctx.error(&req, code, "invalid request"),
            }
            // The budget returns once the reply has been written.
            let _ = task_ctx.out.send(Msg::Release(permit));
        });
    }

    // Drain: every request read gets its reply before the connection closes.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, drain).await.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // Every sender gone: the writer writes what is queued and shuts down.
    drop(ctx);
    if tokio::time::timeout(drain_timeout, &mut writer_task)
        .await
        .is_err()
    {
        writer_task.abort();
    }
    result
}

/// Read a request payload of `len` bytes (at most the maximum payload)
/// into a buffer from the pool: for a write, the buffer the engine hands
/// to the storage.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> io::Result<IoBuf> {
    let n = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    let mut payload = IoBuf::for_overwrite(n);
    rd.read_exact(&mut payload).await?;
    Ok(payload)
}

/// The chunks of a read at `offset` whose data holds zero ranges:
/// `OFFSET_HOLE` for each zero run, `OFFSET_DATA` for each data run (a view
/// of `data`), the last one flagged DONE. `None` if a chunk cannot be
/// encoded (never for reads within the maximum block size).
fn sparse_chunks(
    to: ReplyTo,
    offset: u64,
    data: IoBuf,
    runs: Vec<(Range<usize>, bool)>,
) -> Option<Vec<Part>> {
    let data = Arc::new(data);
    let mut out = Vec::with_capacity(runs.len().saturating_mul(2));
    let n = runs.len();
    for (i, (r, zero)) in runs.into_iter().enumerate() {
        let done = i.saturating_add(1) == n;
        let start = offset.checked_add(u64::try_from(r.start).ok()?)?;
        let length = r.end.checked_sub(r.start)?;
        if zero {
            let hole = u32::try_from(length).ok()?;
            out.push(Part::Bytes(reply::offset_hole(to, start, hole, done).ok()?));
        } else {
            let head = reply::offset_data_header(to, start, length as u64, done).ok()?;
            out.push(Part::Bytes(head));
            out.push(Part::Shared(data.clone(), r));
        }
    }
    Some(out)
}

/// `base:allocation` flags of an extent: zero ranges are holes.
fn allocation_flags(e: &Extent) -> u32 {
    if e.zero {
        consts::STATE_HOLE | consts::STATE_ZERO
    } else {
        0
    }
}

/// `qemu:allocation-depth` of an extent: 1 in the image, 2 in its base.
fn depth_flags(e: &Extent) -> u32 {
    match e.source {
        Source::Image => 1,
        Source::Base => 2,
    }
}

/// Merge extents into `(length, flags)` descriptors.
fn descriptors(extents: &[Extent], flags: fn(&Extent) -> u32) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for e in extents.iter().filter(|e| e.length > 0) {
        let f = flags(e);
        match out.last_mut() {
            Some(last) if last.1 == f => last.0 = last.0.saturating_add(e.length),
            _ => out.push((e.length, f)),
        }
    }
    out
}

fn errno_message(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

impl Ctx {
    /// Queue one whole reply for the writer.
    fn send(&self, bytes: Vec<u8>) {
        self.queue(Msg::Reply(Part::Bytes(bytes)));
    }

    /// Queue a reply made of pieces.
    fn send_parts(&self, parts: Vec<Part>) {
        self.queue(Msg::Parts(parts));
    }

    fn queue(&self, m: Msg) {
        if !self.broken.load(Ordering::Acquire) {
            let _ = self.out.send(m);
        }
    }

    fn reply_to(&self, req: &Request) -> ReplyTo {
        ReplyTo::for_request(req, self.session.extended)
    }

    /// Success without payload.
    fn ok(&self, req: &Request) {
        if self.session.extended {
            self.send(reply::none_done(self.reply_to(req)));
        } else {
            self.send(encode_simple_reply(req.cookie, 0).to_vec());
        }
    }

    /// Failure with an NBD error code.
    fn error(&self, req: &Request, code: u32, message: &str) {
        if self.session.structured {
            let msg = format!("{}: {message}", req.command.name());
            self.send(reply::error_chunk(self.reply_to(req), code, &msg, true));
        } else {
            self.send(encode_simple_reply(req.cookie, code).to_vec());
        }
    }

    fn engine_error(&self, req: &Request, e: &fvd_core::Error) {
        let errno = e.errno();
        self.shared.log(format_args!(
            "{} at {}+{}: {e}",
            req.command.name(),
            req.offset,
            req.length
        ));
        self.error(req, nbd_error_from_errno(errno), &errno_message(errno));
    }

    fn finish(&self, req: &Request, r: fvd_core::Result<()>) {
        match r {
            Ok(()) => self.ok(req),
            Err(e) => self.engine_error(req, &e),
        }
    }

    async fn process(&self, req: Request, payload: IoBuf) {
        // Held until the reply is queued: an online resize waits for it.
        let image = self.shared.live.enter().await;
        let image: &Image = &image;
        let fua = req.has_flags(consts::CMD_FLAG_FUA);
        match req.command {
            Command::Read => self.read(image, &req).await,
            Command::Write => {
                // The payload buffer is what the storage writes.
                let r = image.write(req.offset, payload, fua).await;
                self.finish(&req, r.map(drop));
            }
            Command::Flush => {
                let r = image.flush().await;
                self.finish(&req, r);
            }
            Command::Trim => {
                let mut r = image.discard(req.offset, req.length).await;
                if r.is_ok() && fua {
                    r = image.flush().await;
                }
                self.finish(&req, r);
            }
            Command::WriteZeroes => {
                // Zeroing is always fast here (fallocate or metadata), so
                // NBD_CMD_FLAG_FAST_ZERO never has to fail.
                let unmap = !req.has_flags(consts::CMD_FLAG_NO_HOLE);
                let r = image.write_zeroes(req.offset, req.length, unmap, fua).await;
                self.finish(&req, r);
            }
            Command::Cache => {
                let r = image.cache(req.offset, req.length).await;
                self.finish(&req, r);
            }
            Command::BlockStatus => self.block_status(image, &req, &payload).await,
            Command::Disc | Command::Resize | Command::Unknown(_) => {
                self.error(&req, EINVAL, "unsupported command");
            }
        }
    }

    async fn read(&self, image: &Image, req: &Request) {
        let Ok(len) = usize::try_from(req.length) else {
            self.error(req, EINVAL, "read too long");
            return;
        };
        if !self.session.structured {
            // The data goes out of the buffer the engine read into.
            match image.read(req.offset, IoBuf::for_overwrite(len)).await {
                Ok(data) => {
                    let head = encode_simple_reply(req.cookie, 0).to_vec();
                    self.send_parts(vec![Part::Bytes(head), Part::Data(data)]);
                }
                Err(e) => self.engine_error(req, &e),
            }
            return;
        }
        let to = self.reply_to(req);
        if len == 0 {
            self.send(reply::none_done(to));
            return;
        }
        let head = match reply::offset_data_header(to, req.offset, req.length, true) {
            Ok(h) => h,
            Err(_) => {
                self.error(req, EOVERFLOW, "read too long");
                return;
            }
        };
        let data = match image.read(req.offset, IoBuf::for_overwrite(len)).await {
            Ok(d) => d,
            Err(e) => {
                self.engine_error(req, &e);
                return;
            }
        };
        if !req.has_flags(consts::CMD_FLAG_DF) && req.length >= SPARSE_READ_MIN {
            let runs = zero_runs(&data, req.offset, HOLE_GRAIN);
            if runs.iter().any(|(_, zero)| *zero) {
                match sparse_chunks(to, req.offset, data, runs) {
                    Some(parts) => self.send_parts(parts),
                    None => self.error(req, EIO, "cannot encode the read's chunks"),
                }
                return;
            }
        }
        self.send_parts(vec![Part::Bytes(head), Part::Data(data)]);
    }

    async fn block_status(&self, image: &Image, req: &Request, payload: &[u8]) {
        let session = self.session;
        let mut ids: Vec<u32> = Vec::with_capacity(2);
        let mut length = req.length;
        if session.extended && req.has_flags(consts::CMD_FLAG_PAYLOAD_LEN) {
            let p = match decode_block_status_payload(payload) {
                Ok(p) => p,
                Err(_) => {
                    self.error(req, EINVAL, "bad block status payload");
                    return;
                }
            };
            for id in p.context_ids {
                let selected = (id == META_ID_BASE_ALLOCATION && session.meta_base)
                    || (id == META_ID_ALLOCATION_DEPTH && session.meta_depth);
                if !selected {
                    self.error(req, EINVAL, "metadata context not selected");
                    return;
                }
                ids.push(id);
            }
            length = p.effect_length;
            if let Err(code) =
                validate_range(Command::BlockStatus, req.offset, length, self.session.size)
            {
                self.error(req, code, "range outside the export");
                return;
            }
        } else {
            if session.meta_base {
                ids.push(META_ID_BASE_ALLOCATION);
            }
            if session.meta_depth {
                ids.push(META_ID_ALLOCATION_DEPTH);
            }
        }
        if length == 0 || ids.is_empty() {
            self.error(req, EINVAL, "empty block status request");
            return;
        }
        let window = length.min(BLOCK_STATUS_WINDOW);
        let extents = match image.block_status(req.offset, window).await {
            Ok(e) => e,
            Err(e) => {
                self.engine_error(req, &e);
                return;
            }
        };
        let to = self.reply_to(req);
        let mut out = Vec::new();
        let last = ids.len().saturating_sub(1);
        for (i, &id) in ids.iter().enumerate() {
            let f: fn(&Extent) -> u32 = if id == META_ID_BASE_ALLOCATION {
                allocation_flags
            } else {
                depth_flags
            };
            let mut descs = descriptors(&extents, f);
            if req.has_flags(consts::CMD_FLAG_REQ_ONE) {
                descs.truncate(1);
            }
            descs.truncate(MAX_DESCRIPTORS);
            let chunk = if session.extended {
                let d: Vec<(u64, u64)> = descs.iter().map(|&(l, f)| (l, u64::from(f))).collect();
                reply::block_status_ext(to, id, &d, i == last)
            } else {
                let d: Option<Vec<(u32, u32)>> = descs
                    .iter()
                    .map(|&(l, f)| u32::try_from(l).ok().map(|l| (l, f)))
                    .collect();
                match d {
                    Some(d) => reply::block_status(to, id, &d, i == last),
                    None => {
                        self.error(req, EOVERFLOW, "extent too long");
                        return;
                    }
                }
            };
            match chunk {
                Ok(c) => out.extend_from_slice(&c),
                Err(_) => {
                    self.error(req, EIO, "no extents");
                    return;
                }
            }
        }
        self.send(out);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, source: Source, zero: bool) -> Extent {
        Extent {
            start,
            length,
            source,
            zero,
            host_offset: None,
        }
    }

    #[test]
    fn descriptors_merge_by_flags() {
        let e = [
            ext(0, 4096, Source::Image, false),
            ext(4096, 4096, Source::Base, false),
            ext(8192, 8192, Source::Base, true),
            ext(16384, 0, Source::Image, true),
            ext(16384, 4096, Source::Image, true),
        ];
        assert_eq!(
            descriptors(&e, allocation_flags),
            vec![(8192, 0), (12288, STATE_HOLE_ZERO)]
        );
        assert_eq!(
            descriptors(&e, depth_flags),
            vec![(4096, 1), (12288, 2), (4096, 1)]
        );
        assert!(descriptors(&[], depth_flags).is_empty());
    }

    const STATE_HOLE_ZERO: u32 = consts::STATE_HOLE | consts::STATE_ZERO;

    #[tokio::test]
    async fn vectored_writes_survive_short_writes() {
        // A duplex pipe with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let bufs: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; usize::from(i) % 13]).collect();
        let want: Vec<u8> = bufs.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        write_all_vectored(&mut a, &bufs).await.unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), want);
    }

    #[test]
    fn sparse_reads_send_holes_and_views_of_one_buffer() {
        let mut data = IoBuf::zeroed(5 * 4096);
        data[..4096].fill(1);
        data[3 * 4096 + 7] = 2;
        let runs = zero_runs(&data, 8192, HOLE_GRAIN);
        let to = ReplyTo {
            cookie: 9,
            request_offset: None,
        };
        let parts = sparse_chunks(to, 8192, data, runs).unwrap();
        // data (header + view), hole, data (header + view), hole.
        assert_eq!(parts.len(), 6);
        assert!(matches!(&parts[1], Part::Shared(_, r) if *r == (0..4096)));
        assert!(matches!(&parts[2], Part::Bytes(_)));
        assert!(matches!(&parts[4], Part::Shared(_, r) if *r == (3 * 4096..4 * 4096)));
        assert_eq!(parts[4].as_ref()[7], 2);
        let hole = reply::offset_hole(to, 8192 + 4096, 8192, false).unwrap();
        assert_eq!(parts[2].as_ref(), &hole[..]);
        let last = reply::offset_hole(to, 8192 + 4 * 4096, 4096, true).unwrap();
        assert_eq!(parts[5].as_ref(), &last[..]);
    }

    #[tokio::test]
    async fn payloads_are_read_exactly() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = BufReader::with_capacity(1000, &data[..]);
        assert_eq!(
            read_payload(&mut r, 70_000).await.unwrap()[..],
            data[..70_000]
        );
        assert!(read_payload(&mut r, 0).await.unwrap().is_empty());
        assert_eq!(
            read_payload(&mut r, 30_000).await.unwrap()[..],
            data[70_000..]
        );
        let e = read_payload(&mut r, 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
