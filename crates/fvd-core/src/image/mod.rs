//! The image engine: read, write, flush, discard, write_zeroes, cache,
//! block_status.
//!
//! Mapping first, then I/O: [`map`] turns every request into runs in the
//! image (at a host offset), in the base, or without storage; the modules
//! beside it do the I/O of those runs, outside every metadata lock:
//! `read.rs`, `write.rs`, `zero.rs` (write_zeroes, discard), `status.rs`
//! (block_status), `cor.rs` (copy-on-read, NBD_CMD_CACHE), `prefetch.rs`;
//! `create.rs` and `load.rs` make and open images.
//!
//! Write paths:
//! * direct (no lock, no metadata): every touched block is `hard` (or the
//!   request lies beyond the base range) and, in compact images, every
//!   touched chunk is allocated — exactly a raw-file write;
//! * slow: lock the touched range (whole blocks; whole chunks in compact
//!   images), re-check, allocate missing chunks, merge the missing head and
//!   tail of partial blocks from the base, write, then publish the table
//!   entries and bits (publish after write). The records reach the journal
//!   at the next flush.
//!
//! The **gate**: every request (read, write, zeroing, cache, block status,
//! a copy-on-read or prefetch fill) holds it shared while it runs; a
//! snapshot operation (`snapshot.rs`) holds it exclusively, so it starts
//! once the requests in flight are done and new ones wait until it is over
//! (quiesce, commit, snapshot, resume). It is the first lock of the lock
//! order (docs/ARCHITECTURE.md); a request takes it once, at its entry
//! point, never again inside (a fill run by a read uses the read's).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::base::Base;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::Header;
use crate::iobuf::IoBuf;
use crate::meta::{self, Stats};
use crate::storage::Storage;

pub(crate) mod compact;
mod cor;
mod create;
mod encrypt;
mod lifecycle;
mod load;
pub mod map;
mod physarray;
pub mod prefetch;
mod profile;
pub mod rangelock;
mod read;
pub(crate) mod reclaim;
pub mod snapshot;
mod status;
mod write;
mod zero;

pub use create::{CreateEncryption, CreateOptions, create};
pub use encrypt::KeySlotChange;
pub use load::read_header;
pub(crate) use load::read_table;

pub use map::{RequestMap, Run, Target};

use map::Mapping;
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

/// An open FVD image (or a raw file served through the same interface).
pub struct Image {
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
    /// Where every byte of the virtual disk lives, and the metadata saying so.
    map: Mapping,
    locks: RangeLocks,
    read_only: bool,
    closed: AtomicBool,
    raw_dirty: AtomicBool,
    /// Counters; an image reopened in place of this one (online resize)
    /// carries them on.
    stats: Arc<Stats>,
    header: Option<Header>,
    replayed_blocks: u64,
    /// What the open noticed about the header slots (a damaged one).
    header_note: Option<String>,
    cor: cor::CorState,
    background: std::sync::OnceLock<cor::Background>,
    profile: profile::Recorder,
    /// Guest requests served (prefetch yields when this moves).
    foreground_ops: AtomicU64,
    /// Requests hold it shared, snapshot operations exclusively.
    gate: tokio::sync::RwLock<()>,
    /// The snapshot directory (compact images).
    snapshots: snapshot::SnapshotState,
    /// Keys and sector locks of an encrypted image (`encrypt.rs`).
    crypt: Option<encrypt::Encryption>,
}

/// `buf` holds `want` bytes, or an error naming `what` (built only then:
/// every data read passes here).
fn expect_len(buf: &IoBuf, want: usize, what: impl FnOnce() -> String) -> Result<()> {
    if buf.len() != want {
        return Err(Error::new(
            ErrorKind::Io,
            format!("{}: short transfer ({} of {want} bytes)", what(), buf.len()),
        ));
    }
    Ok(())
}

impl Image {
    /// Bytes of the virtual disk still backed by the base (0 once all local).
    pub fn base_range(&self) -> u64 {
        self.map.base_range()
    }

    /// Size of the virtual disk.
    pub fn virtual_size(&self) -> u64 {
        self.map.virtual_size
    }

    /// Bytes per bitmap block.
    pub fn block_size(&self) -> u64 {
        self.map.block_size
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

    /// What the open noticed about the header slots: a damaged slot, and
    /// whether the journal showed it was the newest (then replayed).
    pub fn header_note(&self) -> Option<&str> {
        self.header_note.as_deref()
    }

    /// Break the commit protocol on purpose (the simulator's mutation
    /// checks; never in production).
    #[doc(hidden)]
    pub fn set_mutation(&self, m: crate::meta::Mutation) {
        if let Some(meta) = &self.map.meta {
            meta.set_mutation(m);
        }
    }

    /// Choose when writes journal their bits alongside their data (default
    /// [`crate::EarlyJournal::Auto`]; the simulator forces both ways).
    pub fn set_early_journal(&self, p: crate::EarlyJournal) {
        if let Some(meta) = &self.map.meta {
            meta.set_early_journal(p);
        }
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
        self.map.local_blocks()
    }

    /// Chunk usage of a compact image (None in the sparse layout).
    pub fn chunk_usage(&self) -> Option<ChunkUsage> {
        self.map.compact().map(|c| {
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
            Some(end) if end <= self.map.virtual_size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "request {offset}+{len} lies outside the virtual disk ({} bytes)",
                    self.map.virtual_size
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
        if let Some(m) = &self.map.meta {
            m.check_poisoned()?;
        }
        Ok(())
    }

    /// Map `[offset, offset+len)`: the runs in the image, in the base, or
    /// without storage that every request is split into, computed as they
    /// are taken.
    #[inline]
    pub fn map_request(&self, offset: u64, len: u64) -> RequestMap<'_> {
        self.map.request(offset, len)
    }

    /// Hold the gate for one request.
    async fn enter(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Lock the span a slow-path request must own ([`Mapping::lock_span`]).
    async fn lock_span(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let r = self.map.lock_span(offset, len);
        self.locks.lock(r.start, r.end).await
    }

    fn io_err<'a>(
        &'a self,
        what: &'a str,
        offset: u64,
    ) -> impl FnOnce(std::io::Error) -> Error + 'a {
        // The message is built only on error: every request passes here.
        move |e| Error::io(format!("{}: {what} at offset {offset}", self.describe()), e)
    }

    fn mark_dirty(&self) {
        match &self.map.meta {
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
        match &self.map.meta {
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
        if self.map.meta.is_some() {
            self.save_recorded_profile().await?;
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        match &self.map.meta {
            Some(m) => {
                m.close(self.storage.as_ref(), &self.stats).await?;
                self.reclaim_shared_pages().await
            }
            None => self.flush_raw().await,
        }
    }
}
