//! The transmission phase: the request loop of one connection.
//!
//! One reader (this loop) decodes requests, validates them with
//! [`validate_request`], reads their payloads and spawns one task per
//! request; tasks run concurrently against the shared image and write
//! their replies, in completion order, through one writer behind a mutex
//! (each reply is written whole while the lock is held, so replies never
//! interleave).
//!
//! Bounds: at most [`ServerConfig::max_inflight`] requests run at once;
//! write payloads plus read lengths of the requests in flight stay under
//! [`ServerConfig::max_buffered`] bytes (the reader waits for room before
//! reading the next payload). A payload larger than the export's maximum
//! block size (32 MiB) is not read: the client gets `EINVAL` and the
//! connection is closed, since the stream cannot be resynchronised
//! without reading it.
//!
//! Replies: simple replies unless structured replies were negotiated;
//! with structured replies, reads answer with `OFFSET_DATA` chunks (and
//! `OFFSET_HOLE` chunks for zero ranges of reads of at least
//! [`SPARSE_READ_MIN`] bytes, unless `NBD_CMD_FLAG_DF`), errors with
//! `ERROR` chunks carrying a message, and other successes with simple
//! replies; with extended headers every reply is an extended chunk.
//!
//! [`ServerConfig::max_inflight`]: super::ServerConfig::max_inflight
//! [`ServerConfig::max_buffered`]: super::ServerConfig::max_buffered

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fvd_core::{Extent, Source};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::task::JoinSet;

use super::Shared;
use super::handshake::{META_ID_ALLOCATION_DEPTH, META_ID_BASE_ALLOCATION, Session};
use crate::consts::{self, EINVAL, EIO, EOVERFLOW};
use crate::error::nbd_error_from_errno;
use crate::reply::{self, ReplyTo, encode_simple_reply};
use crate::request::{Command, Request, decode_request};
use crate::transmission::{
    TransmissionContext, decode_block_status_payload, validate_range, validate_request,
};

/// Reads at least this long look for zero ranges and send them as
/// `OFFSET_HOLE` chunks; shorter reads always send their data (a block
/// status lookup costs more than sending a few KiB).
pub const SPARSE_READ_MIN: u64 = 64 * 1024;

/// Largest range one `NBD_CMD_BLOCK_STATUS` answer covers; clients ask
/// again for the rest.
const BLOCK_STATUS_WINDOW: u64 = 1 << 30;

/// Most descriptors in one block status chunk (the spec asks for at most
/// 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

/// Per-connection state shared by the request tasks.
struct Ctx<W> {
    shared: Arc<Shared>,
    session: Session,
    writer: Mutex<W>,
    broken: AtomicBool,
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
        shared.size,
        shared.export_flags(session.structured, session.extended),
    );
    tctx.structured_replies = session.structured;
    tctx.extended_headers = session.extended;
    tctx.block_status = session.any_meta();
    tctx.min_block_size = cfg.min_block_size;
    tctx.max_payload = shared.max_payload();
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        session,
        writer: Mutex::new(writer),
        broken: AtomicBool::new(false),
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
            ctx.error(&req, EINVAL, "request payload too large").await;
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
        let cost = u32::try_from(payload_len.saturating_add(read_len)).unwrap_or(u32::MAX);
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
        let mut payload = Vec::new();
        if payload_len > 0 {
            payload.resize(usize::try_from(payload_len).unwrap_or(0), 0);
            if let Err(e) = rd.read_exact(&mut payload).await {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    result = Err(e);
                }
                break;
            }
        }
        let task_ctx = ctx.clone();
        tasks.spawn(async move {
            match verdict {
                Ok(()) => task_ctx.process(req, payload).await,
                Err(code) => task_ctx.error(&req, code, "invalid request").await,
            }
            drop(permit);
        });
    }

    // Drain: every request read gets its reply before the connection closes.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_timeout, drain).await.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let mut w = ctx.writer.lock().await;
    let _ = w.shutdown().await;
    result
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

impl<W: AsyncWrite + Unpin + Send + 'static> Ctx<W> {
    /// Write one whole reply.
    async fn send(&self, bytes: &[u8]) {
        if self.broken.load(Ordering::Acquire) {
            return;
        }
        let mut w = self.writer.lock().await;
        let r = match w.write_all(bytes).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.broken.store(true, Ordering::Release);
        }
    }

    fn reply_to(&self, req: &Request) -> ReplyTo {
        ReplyTo::for_request(req, self.session.extended)
    }

    /// Success without payload.
    async fn ok(&self, req: &Request) {
        if self.session.extended {
            self.send(&reply::none_done(self.reply_to(req))).await;
        } else {
            self.send(&encode_simple_reply(req.cookie, 0)).await;
        }
    }

    /// Failure with an NBD error code.
    async fn error(&self, req: &Request, code: u32, message: &str) {
        if self.session.structured {
            let msg = format!("{}: {message}", req.command.name());
            self.send(&reply::error_chunk(self.reply_to(req), code, &msg, true))
                .await;
        } else {
            self.send(&encode_simple_reply(req.cookie, code)).await;
        }
    }

    async fn engine_error(&self, req: &Request, e: &fvd_core::Error) {
        let errno = e.errno();
        self.shared.log(format_args!(
            "{} at {}+{}: {e}",
            req.command.name(),
            req.offset,
            req.length
        ));
        self.error(req, nbd_error_from_errno(errno), &errno_message(errno))
            .await;
    }

    async fn finish(&self, req: &Request, r: fvd_core::Result<()>) {
        match r {
            Ok(()) => self.ok(req).await,
            Err(e) => self.engine_error(req, &e).await,
        }
    }

    async fn process(&self, req: Request, payload: Vec<u8>) {
        let image = &self.shared.image;
        let fua = req.has_flags(consts::CMD_FLAG_FUA);
        match req.command {
            Command::Read => self.read(&req).await,
            Command::Write => {
                let r = image.write(req.offset, &payload, fua).await;
                self.finish(&req, r).await;
            }
            Command::Flush => {
                let r = image.flush().await;
                self.finish(&req, r).await;
            }
            Command::Trim => {
                let mut r = image.discard(req.offset, req.length).await;
                if r.is_ok() && fua {
                    r = image.flush().await;
                }
                self.finish(&req, r).await;
            }
            Command::WriteZeroes => {
                // Zeroing is always fast here (fallocate or metadata), so
                // NBD_CMD_FLAG_FAST_ZERO never has to fail.
                let unmap = !req.has_flags(consts::CMD_FLAG_NO_HOLE);
                let r = image.write_zeroes(req.offset, req.length, unmap, fua).await;
                self.finish(&req, r).await;
            }
            Command::Cache => {
                let r = image.cache(req.offset, req.length).await;
                self.finish(&req, r).await;
            }
            Command::BlockStatus => self.block_status(&req, &payload).await,
            Command::Disc | Command::Resize | Command::Unknown(_) => {
                self.error(&req, EINVAL, "unsupported command").await;
            }
        }
    }

    async fn read(&self, req: &Request) {
        let image = &self.shared.image;
        let Ok(len) = usize::try_from(req.length) else {
            self.error(req, EINVAL, "read too long").await;
            return;
        };
        if !self.session.structured {
            let mut buf = vec![0u8; consts::SIMPLE_REPLY_LEN.saturating_add(len)];
            let Some((head, data)) = buf.split_at_mut_checked(consts::SIMPLE_REPLY_LEN) else {
                return;
            };
            match image.read(req.offset, data).await {
                Ok(()) => {
                    head.copy_from_slice(&encode_simple_reply(req.cookie, 0));
                    self.send(&buf).await;
                }
                Err(e) => self.engine_error(req, &e).await,
            }
            return;
        }
        let to = self.reply_to(req);
        if len == 0 {
            self.send(&reply::none_done(to)).await;
            return;
        }
        if !req.has_flags(consts::CMD_FLAG_DF)
            && req.length >= SPARSE_READ_MIN
            && let Ok(extents) = image.block_status(req.offset, req.length).await
            && extents.iter().any(|e| e.zero)
        {
            match self.sparse_read(req, to, &extents).await {
                Ok(out) => self.send(&out).await,
                Err(e) => self.engine_error(req, &e).await,
            }
            return;
        }
        let head = match reply::offset_data_header(to, req.offset, req.length, true) {
            Ok(h) => h,
            Err(_) => {
                self.error(req, EOVERFLOW, "read too long").await;
                return;
            }
        };
        let mut buf = vec![0u8; head.len().saturating_add(len)];
        let Some((h, data)) = buf.split_at_mut_checked(head.len()) else {
            return;
        };
        h.copy_from_slice(&head);
        match image.read(req.offset, data).await {
            Ok(()) => self.send(&buf).await,
            Err(e) => self.engine_error(req, &e).await,
        }
    }

    /// The chunks of a read with zero ranges: `OFFSET_HOLE` for each zero
    /// run, `OFFSET_DATA` for each data run, the last one flagged DONE.
    async fn sparse_read(
        &self,
        req: &Request,
        to: ReplyTo,
        extents: &[Extent],
    ) -> fvd_core::Result<Vec<u8>> {
        let image = &self.shared.image;
        // (start, length, zero) runs, merged.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for e in extents.iter().filter(|e| e.length > 0) {
            match runs.last_mut() {
                Some(last) if last.2 == e.zero => last.1 = last.1.saturating_add(e.length),
                _ => runs.push((e.start, e.length, e.zero)),
            }
        }
        let bad = |what: &str| fvd_core::Error::new(fvd_core::ErrorKind::Io, what.to_string());
        let mut out =
            Vec::with_capacity(usize::try_from(req.length).unwrap_or(0).saturating_add(64));
        let n = runs.len();
        for (i, &(start, length, zero)) in runs.iter().enumerate() {
            let done = i.saturating_add(1) == n;
            if zero {
                let hole = u32::try_from(length).map_err(|_| bad("hole too long"))?;
                let chunk =
                    reply::offset_hole(to, start, hole, done).map_err(|_| bad("empty hole"))?;
                out.extend_from_slice(&chunk);
            } else {
                let head = reply::offset_data_header(to, start, length, done)
                    .map_err(|_| bad("bad data chunk"))?;
                out.extend_from_slice(&head);
                let at = out.len();
                let dlen = usize::try_from(length).map_err(|_| bad("data too long"))?;
                out.resize(at.saturating_add(dlen), 0);
                let data = out.get_mut(at..).unwrap_or_default();
                image.read(start, data).await?;
            }
        }
        Ok(out)
    }

    async fn block_status(&self, req: &Request, payload: &[u8]) {
        let session = self.session;
        let mut ids: Vec<u32> = Vec::with_capacity(2);
        let mut length = req.length;
        if session.extended && req.has_flags(consts::CMD_FLAG_PAYLOAD_LEN) {
            let p = match decode_block_status_payload(payload) {
                Ok(p) => p,
                Err(_) => {
                    self.error(req, EINVAL, "bad block status payload").await;
                    return;
                }
            };
            for id in p.context_ids {
                let selected = (id == META_ID_BASE_ALLOCATION && session.meta_base)
                    || (id == META_ID_ALLOCATION_DEPTH && session.meta_depth);
                if !selected {
                    self.error(req, EINVAL, "metadata context not selected")
                        .await;
                    return;
                }
                ids.push(id);
            }
            length = p.effect_length;
            if let Err(code) =
                validate_range(Command::BlockStatus, req.offset, length, self.shared.size)
            {
                self.error(req, code, "range outside the export").await;
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
            self.error(req, EINVAL, "empty block status request").await;
            return;
        }
        let window = length.min(BLOCK_STATUS_WINDOW);
        let extents = match self.shared.image.block_status(req.offset, window).await {
            Ok(e) => e,
            Err(e) => {
                self.engine_error(req, &e).await;
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
                        self.error(req, EOVERFLOW, "extent too long").await;
                        return;
                    }
                }
            };
            match chunk {
                Ok(c) => out.extend_from_slice(&c),
                Err(_) => {
                    self.error(req, EIO, "no extents").await;
                    return;
                }
            }
        }
        self.send(&out).await;
    }
}
