//! The image engine: read, write, flush, discard, write_zeroes, cache,
//! block_status.
//!
//! Mapping first, then I/O: a request is split by the bitmap into runs that
//! live in the image or in the base; runs in the image are then mapped to
//! the file — at `data_offset + offset` in the sparse layout (no address
//! translation), or through the chunk table in compact images. Data I/O
//! runs outside every metadata lock.
//!
//! Write paths:
//! * fast (no lock, no metadata): every touched block is `hard` (or the
//!   request lies beyond the base range) and, in compact images, every
//!   touched chunk is allocated — exactly a raw-file write;
//! * slow: lock the touched range (whole blocks; whole chunks in compact
//!   images), re-check, allocate missing chunks, merge the missing head and
//!   tail of partial blocks from the base, write, then publish the table
//!   entries and bits (publish after write). The records reach the journal
//!   at the next flush.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::base::Base;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::Header;
use crate::iobuf::IoBuf;
use crate::meta::{self, Meta, Stats};
use crate::storage::Storage;

pub(crate) mod compact;
mod cor;
mod create;
mod load;
pub mod prefetch;
mod profile;
pub mod rangelock;
mod read;
mod status;
mod write;
mod zero;

pub use cor::Spawner;
pub use create::{CreateOptions, create};
pub use load::read_header;
pub(crate) use load::read_table;

use compact::Compact;
use rangelock::{RangeGuard, RangeLocks};

/// Where the data of an extent comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The image itself.
    Image,
    /// The base image.
    Base,
}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte (virtual offset).
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which layer holds the data.
    pub source: Source,
    /// True if the extent reads as zeros.
    pub zero: bool,
    /// Offset in the image file, for extents in the image that have storage.
    pub host_offset: Option<u64>,
}

/// Where a request goes, decided from the bitmap alone (no I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMap {
    /// Entirely in the image, at this file offset (the raw-like fast path).
    Image(u64),
    /// Entirely in the base, at the same offset.
    Base,
    /// Partly in each, or (compact images) spread over chunks.
    Mixed,
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Refuse writes; never modify the file (a dirty journal is replayed in memory).
    pub read_only: bool,
}

/// Chunk usage of a compact image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkUsage {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Virtual chunks.
    pub chunks: u64,
    /// Chunks with storage.
    pub allocated: u64,
    /// Pairs of virtually adjacent allocated chunks.
    pub adjacent_pairs: u64,
    /// Of those, pairs that are not physically adjacent.
    pub fragmented_pairs: u64,
}

/// Geometry fixed at open.
#[derive(Debug, Clone)]
struct Geometry {
    virtual_size: u64,
    block_size: u64,
    base_blocks: u64,
    data_offset: u64,
}

/// An open FVD image (or a raw file served through the same interface).
pub struct Image {
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
    geo: Geometry,
    meta: Option<Meta>,
    compact: Option<Compact>,
    locks: RangeLocks,
    read_only: bool,
    closed: AtomicBool,
    raw_dirty: AtomicBool,
    stats: Stats,
    header: Option<Header>,
    replayed_blocks: u64,
    /// Bytes of the virtual disk backed by the base; drops to 0 once every
    /// block is local (prefetch done), so I/O stops consulting the bitmap.
    base_range: AtomicU64,
    cor: cor::CorState,
    background: std::sync::OnceLock<cor::Background>,
    profile: profile::Recorder,
    /// Guest requests served (prefetch yields when this moves).
    foreground_ops: AtomicU64,
    /// Latency of guest requests, timed once a prefetch watches it.
    latency: prefetch::LatencyWatch,
}

fn expect_len(buf: &IoBuf, want: usize, what: &str) -> Result<()> {
    if buf.len() != want {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{what}: short transfer ({} of {want} bytes)", buf.len()),
        ));
    }
    Ok(())
}

impl Image {
    /// Bytes of the virtual disk still backed by the base (0 once all local).
    pub fn base_range(&self) -> u64 {
        self.base_range.load(Ordering::Acquire)
    }

    /// Size of the virtual disk.
    pub fn virtual_size(&self) -> u64 {
        self.geo.virtual_size
    }

    /// Bytes per bitmap block.
    pub fn block_size(&self) -> u64 {
        self.geo.block_size
    }

    /// The header as read at open (None for raw files).
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// The base, if the image still depends on one.
    pub fn base(&self) -> Option<&Arc<dyn Base>> {
        self.base.as_ref()
    }

    /// The storage under the image.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// I/O counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Journal blocks replayed when the image was opened.
    pub fn replayed_blocks(&self) -> u64 {
        self.replayed_blocks
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Name for messages.
    pub fn describe(&self) -> String {
        self.storage.describe()
    }

    /// Blocks of the base range that are in the image, and all of them.
    pub fn local_blocks(&self) -> (u64, u64) {
        match &self.meta {
            Some(m) => (m.local.count_ones(), self.geo.base_blocks),
            None => (0, 0),
        }
    }

    /// Chunk usage of a compact image (None in the sparse layout).
    pub fn chunk_usage(&self) -> Option<ChunkUsage> {
        self.compact.as_ref().map(|c| {
            let (allocated, adjacent_pairs, fragmented_pairs) = c.usage();
            ChunkUsage {
                chunk_size: c.chunk_size,
                chunks: c.chunks(),
                allocated,
                adjacent_pairs,
                fragmented_pairs,
            }
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.virtual_size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "request {offset}+{len} lies outside the virtual disk ({} bytes)",
                    self.geo.virtual_size
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{}: image is open read-only", self.describe()),
            ));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("{}: image is closed", self.describe()),
            ));
        }
        if let Some(m) = &self.meta {
            m.check_poisoned()?;
        }
        Ok(())
    }

    /// Blocks of the base range overlapping `[offset, offset+len)`.
    fn blocks_of(&self, offset: u64, len: u64) -> Range<u64> {
        let end = (offset + len).min(self.base_range());
        if offset >= end {
            return 0..0;
        }
        offset / self.geo.block_size..end.div_ceil(self.geo.block_size)
    }

    /// Chunks overlapping `[offset, offset+len)` (compact images).
    fn chunks_of(c: &Compact, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / c.chunk_size..(offset + len).div_ceil(c.chunk_size)
    }

    /// Lock the span a slow-path request must own: whole blocks, or whole
    /// chunks in compact images.
    async fn lock_span(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        match &self.compact {
            Some(c) => {
                let r = Self::chunks_of(c, offset, len);
                self.locks
                    .lock(r.start * c.chunk_size, r.end * c.chunk_size)
                    .await
            }
            None => {
                let b = self.blocks_of(offset, len);
                let bs = self.geo.block_size;
                self.locks.lock(b.start * bs, b.end * bs).await
            }
        }
    }

    fn io_err(&self, what: &str, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        let d = self.describe();
        let what = what.to_string();
        move |e| Error::io(format!("{d}: {what} at offset {offset}"), e)
    }

    fn mark_dirty(&self) {
        match &self.meta {
            Some(m) => m.mark_data_dirty(),
            None => self.raw_dirty.store(true, Ordering::Release),
        }
    }

    async fn flush_raw(&self) -> Result<()> {
        if self.raw_dirty.swap(false, Ordering::AcqRel)
            && let Err(e) = meta::flush_storage(self.storage.as_ref(), &self.stats).await
        {
            self.raw_dirty.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        match &self.meta {
            Some(m) => m.commit(self.storage.as_ref(), &self.stats).await,
            None => self.flush_raw().await,
        }
    }

    /// Flush, write the bitmap and table in place if they changed, and set the clean flag.
    pub async fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) || self.read_only {
            return Ok(());
        }
        // A profile recorded in this run is kept in the image.
        if self.meta.is_some() {
            self.save_recorded_profile().await?;
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match &self.meta {
            Some(m) => m.close(self.storage.as_ref(), &self.stats).await,
            None => self.flush_raw().await,
        }
    }
}
