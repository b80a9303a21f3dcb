//! Positional, asynchronous byte storage under an image (and under raw bases).
//!
//! A backend only moves bytes; it knows nothing about the format. Buffers are
//! owned ([`IoBuf`]) so that an operation running on another thread never
//! touches memory its caller has freed. Every method returns a boxed future
//! so the trait stays object-safe: the engine holds `Arc<dyn Storage>`.
//!
//! Contract the engine relies on:
//! * a write is visible to later reads once its future completed;
//! * it is durable only after a later `flush` completed (or with `fua`);
//! * `discard` leaves the range reading as zeros;
//! * reads past the end of the storage return zeros.

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::iobuf::IoBuf;

mod aio;
pub mod file;
pub mod limit;
pub mod mem;
mod pool;
mod sys;

pub use file::{CacheMode, FileStorage};
pub use mem::MemStorage;

/// The future every storage operation returns.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// One run of a storage allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRun {
    /// Length in bytes.
    pub length: u64,
    /// True if the run holds data; false if it is a hole (reads as zeros).
    pub data: bool,
}

/// A pure transform of a buffer's bytes in place (an encrypted image's
/// cipher), handed to [`Storage::read_at_then`] / [`Storage::write_at_after`]
/// so that it runs next to the I/O.
pub type Transform = Box<dyn FnOnce(&mut [u8]) + Send>;

/// Byte storage with positional asynchronous I/O.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync {
    /// Read `buf.len()` bytes at `offset` into `buf` and give it back.
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf>;
    /// Write all of `buf` at `offset`; with `fua` the data is durable on return.
    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf>;
    /// [`Storage::read_at`], then `after` over the bytes read. A backend
    /// with I/O threads runs `after` on the thread that read (the file
    /// backend's pool), so a cipher does not load the caller's thread: with
    /// `fvd serve`'s one event loop, that thread serves every request.
    fn read_at_then(&self, offset: u64, buf: IoBuf, after: Transform) -> IoFuture<'_, IoBuf> {
        let read = self.read_at(offset, buf);
        Box::pin(async move {
            let mut buf = read.await?;
            after(&mut buf);
            Ok(buf)
        })
    }
    /// `before` over `buf`, then [`Storage::write_at`]; a backend with I/O
    /// threads runs `before` on the thread that writes (see
    /// [`Storage::read_at_then`]). The buffer given back holds the
    /// transformed bytes.
    fn write_at_after(
        &self,
        offset: u64,
        mut buf: IoBuf,
        fua: bool,
        before: Transform,
    ) -> IoFuture<'_, IoBuf> {
        before(&mut buf);
        self.write_at(offset, buf, fua)
    }
    /// Make every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Deallocate a range; it reads as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Make a range read as zeros, keeping it allocated.
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Grow or shrink to `len` bytes.
    fn set_len(&self, len: u64) -> IoFuture<'_, ()>;
    /// Allocate backing store for `[offset, offset+len)` (inside the
    /// current size) without changing what it reads, so that later writes
    /// there cannot fail for lack of space. A storage that cannot do this
    /// does nothing.
    fn preallocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let _ = (offset, len);
        Box::pin(async { Ok(()) })
    }
    /// Which parts of `[offset, offset+len)` hold data and which are holes.
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>>;
    /// Bytes of backing store in use (for `info`).
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// A human description for messages (a path).
    fn describe(&self) -> String;
}

/// Merge adjacent runs of the same kind and drop empty ones.
pub fn coalesce(runs: Vec<AllocRun>) -> Vec<AllocRun> {
    let mut out: Vec<AllocRun> = Vec::with_capacity(runs.len());
    for r in runs.into_iter().filter(|r| r.length > 0) {
        match out.last_mut() {
            Some(last) if last.data == r.data => last.length += r.length,
            _ => out.push(r),
        }
    }
    out
}

/// Write zero bytes over `r` (data written: neither a hole nor an unwritten
/// extent), 64 KiB at a time.
///
/// Why not larger: the page cache keeps the folio size a write created.
/// After 1 MiB writes, every later 4 KiB guest write dirties (and each
/// flush writes back, block by block) a 1 MiB folio: on ext4 (Linux 6.18)
/// 4 KiB write + flush pairs on such a file ran ~20% slower than on one
/// written 64 KiB at a time (2,880 vs 3,530 IOPS, `docs/BENCHMARKS.md`).
pub async fn write_zeros(storage: &dyn Storage, r: std::ops::Range<u64>) -> io::Result<()> {
    const STEP: u64 = 64 << 10;
    let mut pos = r.start;
    while pos < r.end {
        let n = STEP.min(r.end - pos);
        storage
            .write_at(pos, IoBuf::zeroed(n as usize), false)
            .await?;
        pos += n;
    }
    Ok(())
}
