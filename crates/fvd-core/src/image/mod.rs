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
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{
    self, FLAG_ZERO_DETECTED, HEADER_AREA, Header, INCOMPAT_COMPACT, INCOMPAT_ENCRYPTED,
    INCOMPAT_SNAPSHOTS, Region,
};
use crate::format::journal::Record;
use crate::format::layout::{CreateLayout, compute_layout};
use crate::iobuf::IoBuf;
use crate::meta::{self, Durable, Meta, Stats};
use crate::storage::Storage;

pub(crate) mod compact;
mod cor;
mod lifecycle;
pub mod prefetch;
mod profile;
pub mod rangelock;
pub(crate) mod reclaim;

pub use cor::Spawner;

use compact::{Compact, EMPTY};
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
    /// Skip the base's content fingerprint check (the escape hatch of `-U`
    /// for looking at an image whose base was changed in place).
    pub trust_base: bool,
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

/// What a new image should look like.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; defaults to the base size.
    pub size: Option<u64>,
    /// Base name as recorded in the header, and its format.
    pub base: Option<(String, String)>,
    /// Bytes per bitmap bit.
    pub block_size: Option<u32>,
    /// Journal size in bytes.
    pub journal_size: Option<u64>,
    /// Scan the base and mark zero-filled blocks local at create.
    pub detect_zeroes: bool,
    /// Default copy-on-read setting recorded in the image.
    pub copy_on_read: bool,
    /// Use the chunk table (compact image).
    pub compact: bool,
    /// Bytes per chunk (compact images).
    pub chunk_size: Option<u32>,
    /// Growth step of compact images on files.
    pub grow_unit: Option<u64>,
    /// Command growing a block device: `{path}` and `{bytes}` are substituted.
    pub grow_cmd: Option<String>,
    /// Record a fingerprint of the base's content in the base validator,
    /// checked at every open (docs/FORMAT.md §2.5). [`crate::create_path`]
    /// sets it for bases named by a path; remote bases have validators of
    /// their own.
    pub fingerprint_base: bool,
}

/// Create an image on empty `storage`. `base` must be the opened base when
/// `opts.base` is set.
pub async fn create(
    storage: &dyn Storage,
    opts: &CreateOptions,
    base: Option<&dyn Base>,
) -> Result<Header> {
    let base_size = base.map(|b| b.size()).unwrap_or(0);
    let size = match (opts.size, base) {
        (Some(s), _) => s,
        (None, Some(b)) => b.size().div_ceil(512) * 512,
        (None, None) => {
            return Err(Error::arg(
                "an image size is required when there is no base",
            ));
        }
    };
    let layout = CreateLayout {
        virtual_size: size,
        base: match (&opts.base, base) {
            (Some((name, fmt)), Some(b)) => {
                let validator =
                    crate::base::fingerprint::validator(b, opts.fingerprint_base).await?;
                Some((name.clone(), fmt.clone(), base_size, validator))
            }
            (Some(_), None) => return Err(Error::arg("base named but not opened")),
            _ => None,
        },
        block_size: opts.block_size,
        journal_size: opts.journal_size,
        compact: opts.compact,
        chunk_size: opts.chunk_size,
    };
    let mut h = compute_layout(&layout)?;
    if opts.copy_on_read {
        h.flags |= header::FLAG_COPY_ON_READ;
    }
    if let Some(g) = opts.grow_unit {
        h.grow_unit = g;
    }
    if let Some(cmd) = &opts.grow_cmd {
        if cmd.len() > header::MAX_GROW_CMD {
            return Err(Error::arg("grow_cmd is longer than 1024 bytes"));
        }
        h.grow_cmd = cmd.clone();
    }
    let bitmap = AtomicBitmap::new(h.base_blocks());
    if let (true, Some(b)) = (opts.detect_zeroes, base) {
        mark_zero_blocks(b, &bitmap, h.block_size as u64, h.base_range()).await?;
        if bitmap.count_ones() > 0 {
            h.flags |= FLAG_ZERO_DETECTED;
        }
    }
    let io = |what: &'static str| move |e| Error::io(format!("{}: {what}", storage.describe()), e);
    let data = h.region(Region::Data);
    let len = storage.len().map_err(io("size"))?;
    let want = data.offset + data.length;
    if len < want && opts.compact {
        storage.set_len(want).await.map_err(io("set size"))?;
    } else if len < want {
        crate::storage::limit::grow_sparse_file(storage, want, size).await?;
    }
    // Metadata regions start out as "empty": zeros, and 0xFF for the table.
    // Punching (rather than writing zeros) keeps a new file sparse.
    for r in [
        Region::Journal,
        Region::Bitmap,
        Region::Snapshots,
        Region::Refcounts,
        Region::KeySlots,
        Region::Profile,
    ] {
        let e = h.region(r);
        storage
            .discard(e.offset, e.length)
            .await
            .map_err(io("clear metadata"))?;
    }
    let bm = h.region(Region::Bitmap);
    if bitmap.count_ones() > 0 {
        let bytes = bitmap.to_bytes(bm.length as usize);
        storage
            .write_at(bm.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(io("write bitmap"))?;
    }
    let t = h.region(Region::Table);
    if t.length > 0 {
        let ones = vec![0xffu8; t.length as usize];
        storage
            .write_at(t.offset, IoBuf::from_slice(&ones), false)
            .await
            .map_err(io("write chunk table"))?;
    }
    let mut area = vec![0u8; HEADER_AREA as usize];
    area[..header::HEADER_SLOT_SIZE].copy_from_slice(&h.encode());
    storage
        .write_at(0, IoBuf::from_slice(&area), false)
        .await
        .map_err(io("write header"))?;
    storage.flush().await.map_err(io("flush"))?;
    Ok(h)
}

async fn mark_zero_blocks(
    base: &dyn Base,
    bitmap: &AtomicBitmap,
    bs: u64,
    range: u64,
) -> Result<()> {
    // Ask for the allocation map in large windows (a sparse base answers
    // with a few runs), mark the blocks of holes at once, and read only the
    // data runs to look for zero-filled blocks.
    const WINDOW: u64 = 64 << 30;
    const STEP: u64 = 4 << 20;
    let step = STEP.max(bs) / bs * bs;
    let err = |what: &'static str| move |e| Error::io(format!("{}: {what}", base.describe()), e);
    let mut pos = 0;
    while pos < range {
        let wlen = WINDOW.min(range - pos);
        let runs = base
            .allocation(pos, wlen)
            .await
            .map_err(err("block status"))?;
        let mut p = pos;
        for run in runs {
            let (s, e) = (p, (p + run.length).min(pos + wlen));
            p = e;
            if s >= e {
                continue;
            }
            if !run.data {
                // Whole blocks inside the hole; partial ones are settled below
                // only if their data part reads as zeros too.
                let (b0, b1) = (s.div_ceil(bs), e / bs);
                if b0 < b1 {
                    bitmap.set_range(b0..b1);
                }
                for blk in [s / bs, e.saturating_sub(1) / bs] {
                    let (bs0, be) = (blk * bs, ((blk + 1) * bs).min(range));
                    if (bs0 < s || be > e) && block_is_zero(base, bs0, be).await? {
                        bitmap.set(blk);
                    }
                }
                continue;
            }
            // Data run: read it a step at a time, aligned to blocks.
            let mut q = s / bs * bs;
            while q < e {
                let len = step.min(((e.div_ceil(bs) * bs).min(range)) - q);
                let buf = base
                    .read_at(q, IoBuf::zeroed(len as usize))
                    .await
                    .map_err(err("read"))?;
                if buf.len() as u64 != len {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("{}: short read at offset {q}", base.describe()),
                    ));
                }
                for blk in q / bs..(q + len).div_ceil(bs) {
                    let (bs0, be) = ((blk * bs).max(q), ((blk + 1) * bs).min(q + len));
                    if crate::iobuf::is_zero(&buf[(bs0 - q) as usize..(be - q) as usize]) {
                        bitmap.set(blk);
                    }
                }
                q += len;
            }
        }
        pos += wlen;
    }
    Ok(())
}

/// True if the base reads as zeros over `[s, e)`.
async fn block_is_zero(base: &dyn Base, s: u64, e: u64) -> Result<bool> {
    let buf = base
        .read_at(s, IoBuf::zeroed((e - s) as usize))
        .await
        .map_err(|er| Error::io(format!("{}: read", base.describe()), er))?;
    Ok(buf.len() as u64 == e - s && buf.is_zero())
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

/// Records that map virtual chunks `chunks` (sorted) to new entries.
fn table_records(chunks: &[(u64, u32)]) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for &(c, p) in chunks {
        match out.last_mut() {
            Some(Record::Table { first, entries })
                if *first + entries.len() as u64 == c
                    && entries.len() < Record::MAX_TABLE_ENTRIES =>
            {
                entries.push(p)
            }
            _ => out.push(Record::Table {
                first: c,
                entries: vec![p],
            }),
        }
    }
    out
}

impl Image {
    /// Open an FVD image on `storage`, with its base already opened by the caller.
    pub async fn open(
        storage: Arc<dyn Storage>,
        base: Option<Arc<dyn Base>>,
        opts: OpenOptions,
    ) -> Result<Image> {
        let desc = storage.describe();
        let (h, slot) = read_header(storage.as_ref()).await?;
        let unsupported = h.incompatible & (INCOMPAT_ENCRYPTED | INCOMPAT_SNAPSHOTS);
        if unsupported != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{desc}: image uses features {unsupported:#x} (encrypted/snapshots) not supported by this build"
                ),
            ));
        }
        let is_compact = h.incompatible & INCOMPAT_COMPACT != 0;
        let data = h.region(Region::Data);
        let file_len = storage
            .len()
            .map_err(|e| Error::io(format!("{desc}: size"), e))?;
        let needed = data.offset + data.length;
        if file_len < needed {
            return Err(Error::corrupt(format!(
                "{desc}: image is truncated: file is {file_len} bytes, the header needs {needed}"
            )));
        }
        let base_range = h.base_range();
        let base = if base_range > 0 {
            let b = base.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("{desc}: base image '{}' was not opened", h.base_name),
                )
            })?;
            crate::base::fingerprint::verify(&desc, &h, b.as_ref(), opts.trust_base).await?;
            Some(b)
        } else {
            None
        };
        let (mut durable, replay_blocks, replay_records) = load_metadata(storage.as_ref(), &h)
            .await
            .map_err(|e| e.context(&desc))?;
        let stats = Stats::default();
        stats
            .replayed_records
            .store(replay_records, Ordering::Relaxed);
        let compact = if is_compact {
            let cs = h.chunk_size as u64;
            let capacity = file_len.saturating_sub(data.offset) / cs;
            let phys_limit = h.region(Region::Table).length / 4;
            compact::validate_table(&durable.table, capacity, phys_limit)
                .map_err(|e| e.context(&desc))?;
            Some(Compact::new(
                &durable.table,
                cs,
                data.offset,
                capacity,
                phys_limit,
                h.grow_unit,
                h.grow_cmd.clone(),
            ))
        } else {
            durable.table.clear();
            None
        };
        let geo = Geometry {
            virtual_size: h.virtual_size,
            block_size: h.block_size as u64,
            base_blocks: h.base_blocks(),
            data_offset: data.offset,
        };
        let dirty = !h.is_clean();
        let meta = Meta::new(h.clone(), slot, durable);
        if dirty && !opts.read_only {
            let mut st = meta.commit.lock().await;
            meta::checkpoint(&mut st, storage.as_ref(), &stats, true)
                .await
                .map_err(|e| e.context(&desc))?;
        }
        Ok(Image {
            storage,
            base,
            geo,
            meta: Some(meta),
            compact,
            locks: RangeLocks::default(),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats,
            base_range: AtomicU64::new(base_range),
            cor: cor::CorState::new(
                h.flags & header::FLAG_COPY_ON_READ != 0 && !opts.read_only,
                h.max_cor_bytes,
            ),
            background: std::sync::OnceLock::new(),
            profile: profile::Recorder::default(),
            foreground_ops: AtomicU64::new(0),
            latency: prefetch::LatencyWatch::default(),
            header: Some(h),
            replayed_blocks: replay_blocks,
        })
    }

    /// Serve a raw file through the same interface (no metadata at all).
    pub fn open_raw(storage: Arc<dyn Storage>, opts: OpenOptions) -> Result<Image> {
        let len = storage
            .len()
            .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?;
        Ok(Image {
            storage,
            base: None,
            geo: Geometry {
                virtual_size: len,
                block_size: 4096,
                base_blocks: 0,
                data_offset: 0,
            },
            meta: None,
            compact: None,
            locks: RangeLocks::default(),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats: Stats::default(),
            header: None,
            replayed_blocks: 0,
            base_range: AtomicU64::new(0),
            cor: cor::CorState::new(false, 0),
            background: std::sync::OnceLock::new(),
            profile: profile::Recorder::default(),
            foreground_ops: AtomicU64::new(0),
            latency: prefetch::LatencyWatch::default(),
        })
    }

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

    /// Map a read request: the bitmap lookup every request starts with.
    pub fn map_request(&self, offset: u64, len: u64) -> RequestMap {
        let blocks = self.blocks_of(offset, len);
        let in_image = match &self.meta {
            Some(m) if !blocks.is_empty() => {
                if m.local.all_set(blocks.clone()) {
                    true
                } else if m.local.none_set(blocks) && offset + len <= self.base_range() {
                    return RequestMap::Base;
                } else {
                    return RequestMap::Mixed;
                }
            }
            _ => true,
        };
        debug_assert!(in_image);
        match &self.compact {
            None => RequestMap::Image(self.geo.data_offset + offset),
            Some(c) => {
                let r = Self::chunks_of(c, offset, len);
                match c.lookup(r.start) {
                    p if p != EMPTY && r.end - r.start == 1 => {
                        RequestMap::Image(c.host_offset(p, offset))
                    }
                    _ => RequestMap::Mixed,
                }
            }
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let t0 = self.latency.start();
        let r = self.read_untimed(offset, buf).await;
        self.latency.finish(t0);
        r
    }

    async fn read_untimed(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        let blocks = self.blocks_of(offset, len);
        let meta = match &self.meta {
            Some(m) if !blocks.is_empty() && !m.local.all_set(blocks.clone()) => m,
            _ => return self.read_local(offset, buf).await,
        };
        if m_none_local(meta, &blocks) && offset + len <= self.base_range() {
            return self.read_from_base(offset, buf).await;
        }
        for (s, e, from_base) in self.segments(meta, offset, len) {
            let part = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if from_base {
                self.read_from_base(s, part).await?;
            } else {
                self.read_local(s, part).await?;
            }
        }
        Ok(())
    }

    /// Split `[offset, offset+len)` into runs in the image and in the base.
    fn segments(&self, meta: &Meta, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset + len;
        let bs = self.geo.block_size;
        let mut segs: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |s: u64, e: u64, from_base: bool| {
            if s >= e {
                return;
            }
            match segs.last_mut() {
                Some(last) if last.1 == s && last.2 == from_base => last.1 = e,
                _ => segs.push((s, e, from_base)),
            }
        };
        let mut pos = offset;
        for (b0, b1, local) in meta.local.runs(self.blocks_of(offset, len)) {
            let s = (b0 * bs).max(offset);
            let e = (b1 * bs).min(end);
            if local {
                push(s, e, false);
            } else {
                let be = e.min(self.base_range());
                push(s, be, true);
                push(be, e, false);
            }
            pos = e;
        }
        push(pos, end, false);
        segs
    }

    /// Read data that lives in the image (sparse offset or through the table).
    async fn read_local(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let Some(c) = &self.compact else {
            return self
                .read_host(self.geo.data_offset + offset, offset, out)
                .await;
        };
        let mut pos = offset;
        for chunk in Self::chunks_of(c, offset, out.len() as u64) {
            let e = ((chunk + 1) * c.chunk_size).min(offset + out.len() as u64);
            let part = &mut out[(pos - offset) as usize..(e - offset) as usize];
            match c.pin(chunk) {
                None => part.fill(0),
                Some((p, _pin)) => self.read_host(c.host_offset(p, pos), pos, part).await?,
            }
            pos = e;
        }
        Ok(())
    }

    async fn read_host(&self, host: u64, virt: u64, out: &mut [u8]) -> Result<()> {
        let buf = self
            .storage
            .read_at(host, IoBuf::for_overwrite(out.len()))
            .await
            .map_err(self.io_err("read", virt))?;
        expect_len(
            &buf,
            out.len(),
            &format!("{}: read at offset {virt}", self.describe()),
        )?;
        out.copy_from_slice(&buf);
        Ok(())
    }

    async fn read_base(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let base = self
            .base
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
        let buf = base
            .read_at(offset, IoBuf::for_overwrite(out.len()))
            .await
            .map_err(|e| {
                Error::io(
                    format!("{}: base read at offset {offset}", base.describe()),
                    e,
                )
            })?;
        expect_len(
            &buf,
            out.len(),
            &format!("{}: base read at offset {offset}", base.describe()),
        )?;
        self.stats
            .base_read_bytes
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out.copy_from_slice(&buf);
        Ok(())
    }

    async fn base_bytes(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        if len > 0 {
            self.read_base(offset, &mut v).await?;
        }
        Ok(v)
    }

    /// Write data that lives in the image. In compact images every chunk must
    /// be allocated, in the table or in `fresh` (allocated, not yet published).
    async fn write_local(&self, offset: u64, data: &[u8], fresh: &[(u64, u32)]) -> Result<()> {
        let Some(c) = &self.compact else {
            return self
                .write_host(
                    self.geo.data_offset + offset,
                    offset,
                    IoBuf::from_slice(data),
                )
                .await;
        };
        // Map each chunk, pin it, and merge physically contiguous parts into one write.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new(); // (virt, host, len)
        let mut pins = Vec::new();
        let mut pos = offset;
        let end = offset + data.len() as u64;
        for chunk in Self::chunks_of(c, offset, data.len() as u64) {
            let e = ((chunk + 1) * c.chunk_size).min(end);
            let phys = match fresh.iter().find(|&&(v, _)| v == chunk) {
                Some(&(_, p)) => p,
                None => match c.pin(chunk) {
                    Some((p, pin)) => {
                        pins.push(pin);
                        p
                    }
                    None => {
                        return Err(Error::corrupt(format!(
                            "chunk {chunk} vanished during a write"
                        )));
                    }
                },
            };
            let host = c.host_offset(phys, pos);
            match runs.last_mut() {
                Some(r) if r.1 + r.2 == host => r.2 += e - pos,
                _ => runs.push((pos, host, e - pos)),
            }
            pos = e;
        }
        for (virt, host, len) in runs {
            let part = &data[(virt - offset) as usize..(virt - offset + len) as usize];
            self.write_host(host, virt, IoBuf::from_slice(part)).await?;
        }
        drop(pins);
        Ok(())
    }

    async fn write_host(&self, host: u64, virt: u64, buf: IoBuf) -> Result<()> {
        let n = buf.len() as u64;
        self.storage
            .write_at(host, buf, false)
            .await
            .map_err(self.io_err("write", virt))?;
        self.stats.data_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.data_write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Make image-resident data read as zeros (unallocated chunks already do).
    async fn zero_local(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let Some(c) = &self.compact else {
            return self
                .zero_host(self.geo.data_offset + offset, offset, len, unmap)
                .await;
        };
        let mut pos = offset;
        for chunk in Self::chunks_of(c, offset, len) {
            let e = ((chunk + 1) * c.chunk_size).min(offset + len);
            if let Some((p, _pin)) = c.pin(chunk) {
                self.zero_host(c.host_offset(p, pos), pos, e - pos, unmap)
                    .await?;
            }
            pos = e;
        }
        Ok(())
    }

    async fn zero_host(&self, host: u64, virt: u64, len: u64, unmap: bool) -> Result<()> {
        let r = if unmap {
            self.storage.discard(host, len).await
        } else {
            self.storage.write_zeroes(host, len).await
        };
        r.map_err(self.io_err("zero", virt))
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

    /// True if a write of `[offset, offset+len)` needs the slow path.
    fn needs_slow_path(&self, offset: u64, len: u64) -> bool {
        let Some(m) = &self.meta else { return false };
        let blocks = self.blocks_of(offset, len);
        if !blocks.is_empty() && !m.hard.all_set(blocks) {
            return true;
        }
        match &self.compact {
            Some(c) => !c.all_allocated(Self::chunks_of(c, offset, len)),
            None => false,
        }
    }

    /// Write `data` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let t0 = self.latency.start();
        let r = self.write_untimed(offset, data, fua).await;
        self.latency.finish(t0);
        r
    }

    async fn write_untimed(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let len = data.len() as u64;
            if self.needs_slow_path(offset, len) {
                let _g = self.lock_span(offset, len).await;
                self.slow_write(offset, data).await?;
            } else {
                self.write_local(offset, data, &[]).await?;
                self.mark_dirty();
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Allocate the unallocated chunks of `[offset, offset+len)` (span lock
    /// held). New chunks not wholly covered by the range are zeroed first, so
    /// their untouched parts read as zeros whatever the storage held before.
    async fn allocate_chunks(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let (Some(c), Some(m)) = (&self.compact, &self.meta) else {
            return Ok(Vec::new());
        };
        let missing: Vec<u64> = Self::chunks_of(c, offset, len)
            .filter(|&ch| c.lookup(ch) == EMPTY)
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut tries = 0;
        let fresh = loop {
            match c
                .allocate(self.storage.as_ref(), &missing, m.rounds_done())
                .await
            {
                // Chunks freed by discards are reusable once their free is
                // durable (and other writers may take them first): commit,
                // then try again.
                Err(e) if e.kind() == ErrorKind::NoSpace && c.has_pending_frees() && tries < 64 => {
                    tries += 1;
                    m.commit(self.storage.as_ref(), &self.stats).await?;
                }
                r => break r?,
            }
        };
        for &(ch, p) in &fresh {
            let covered = offset <= ch * c.chunk_size && (ch + 1) * c.chunk_size <= offset + len;
            if !covered {
                let host = c.data_offset + p as u64 * c.chunk_size;
                if let Err(e) = self
                    .zero_host(host, ch * c.chunk_size, c.chunk_size, true)
                    .await
                {
                    c.release(&fresh);
                    return Err(e);
                }
            }
        }
        self.stats
            .chunks_allocated
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        Ok(fresh)
    }

    /// Base bytes completing the partial first and last blocks of
    /// `[offset, end)` that are not local yet (empty where none are needed).
    async fn cow_edges(
        &self,
        meta: &Meta,
        offset: u64,
        end: u64,
        blocks: &Range<u64>,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        if blocks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let bs = self.geo.block_size;
        let head_start = blocks.start * bs;
        let head = if offset > head_start && !meta.local.get(blocks.start) {
            self.base_bytes(head_start, offset - head_start).await?
        } else {
            Vec::new()
        };
        let tail_end = (blocks.end * bs).min(self.base_range());
        let tail = if end < tail_end && !meta.local.get(blocks.end - 1) {
            self.base_bytes(end, tail_end - end).await?
        } else {
            Vec::new()
        };
        Ok((head, tail))
    }

    /// Copy-on-write + allocation of `[offset, offset+data.len())`, span lock held.
    async fn slow_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let meta = self.meta.as_ref().expect("the slow path needs metadata");
        let len = data.len() as u64;
        let end = offset + len;
        let blocks = self.blocks_of(offset, len);
        let (head, tail) = self.cow_edges(meta, offset, end, &blocks).await?;
        let start = offset - head.len() as u64;
        let fresh = self
            .allocate_chunks(start, head.len() as u64 + len + tail.len() as u64)
            .await?;
        let r = if head.is_empty() && tail.is_empty() {
            self.write_local(offset, data, &fresh).await
        } else {
            let mut buf = Vec::with_capacity(head.len() + data.len() + tail.len());
            buf.extend_from_slice(&head);
            buf.extend_from_slice(data);
            buf.extend_from_slice(&tail);
            self.write_local(start, &buf, &fresh).await
        };
        self.publish(r, &fresh, blocks)
    }

    /// Publish after write: make fresh chunks visible and queue their table
    /// records with the blocks' bits, or give the chunks back on failure.
    fn publish(&self, r: Result<()>, fresh: &[(u64, u32)], blocks: Range<u64>) -> Result<()> {
        let meta = self.meta.as_ref().expect("publishing needs metadata");
        if let Err(e) = r {
            if let Some(c) = &self.compact {
                c.release(fresh);
            }
            return Err(e);
        }
        if let Some(c) = &self.compact {
            c.publish(fresh);
        }
        if fresh.is_empty() {
            meta.publish_hard(blocks);
        } else {
            meta.publish_group(table_records(fresh), blocks);
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeros; with `unmap` the space may be freed.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<()> {
        let t0 = self.latency.start();
        let r = self.write_zeroes_untimed(offset, len, unmap, fua).await;
        self.latency.finish(t0);
        r
    }

    async fn write_zeroes_untimed(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, len)?;
        if len > 0 {
            if self.needs_slow_path(offset, len) || (unmap && self.frees_chunks(offset, len)) {
                let _g = self.lock_span(offset, len).await;
                self.slow_zero(offset, len, unmap).await?;
            } else {
                self.zero_local(offset, len, unmap).await?;
                self.mark_dirty();
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// True if the range covers a whole allocated chunk (compact images).
    fn frees_chunks(&self, offset: u64, len: u64) -> bool {
        let Some(c) = &self.compact else { return false };
        let first = offset.div_ceil(c.chunk_size);
        let last = self.full_chunk_end(c, offset + len);
        (first..last).any(|ch| c.lookup(ch) != EMPTY)
    }

    /// One past the last chunk that `[.., end)` covers completely (the last
    /// chunk of the disk counts as covered when `end` is the disk's end).
    fn full_chunk_end(&self, c: &Compact, end: u64) -> u64 {
        if end == self.geo.virtual_size {
            end.div_ceil(c.chunk_size)
        } else {
            end / c.chunk_size
        }
    }

    /// Zeroing that copies partial base blocks, allocates, or frees chunks.
    async fn slow_zero(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let meta = self.meta.as_ref().expect("the slow path needs metadata");
        let end = offset + len;
        let Some(c) = &self.compact else {
            return self.sparse_slow_zero(meta, offset, len, unmap).await;
        };
        let cs = c.chunk_size;
        // Chunks freed whole, and the blocks whose bits go with them (the
        // freed chunks are consecutive, so their blocks form one range).
        let mut freed = Vec::new();
        let mut freed_phys: Vec<u32> = Vec::new();
        let mut freed_blocks: Option<Range<u64>> = None;
        let mut failed = None;
        for ch in Self::chunks_of(c, offset, len) {
            let s = (ch * cs).max(offset);
            let e = ((ch + 1) * cs).min(end);
            let whole = s == ch * cs && ch < self.full_chunk_end(c, end);
            let blocks = self.blocks_of(s, e - s);
            let all_local = blocks.is_empty() || meta.local.all_set(blocks.clone());
            if whole && unmap {
                // Not reusable before the round that journals the free is
                // known: its record is queued only at the end (see below).
                // Its space is given back after the loop, in runs.
                let p_old = c.free(ch, u64::MAX);
                if p_old != EMPTY {
                    freed_phys.push(p_old);
                    freed.push((ch, EMPTY));
                    self.stats.chunks_freed.fetch_add(1, Ordering::Relaxed);
                }
                if !blocks.is_empty() {
                    let r = freed_blocks.get_or_insert(blocks.clone());
                    *r = r.start.min(blocks.start)..r.end.max(blocks.end);
                }
            } else if c.lookup(ch) != EMPTY && all_local {
                if let Err(e) = self.zero_local(s, e - s, unmap).await {
                    failed = Some(e);
                    break;
                }
                meta.publish_hard(blocks);
            } else if c.lookup(ch) == EMPTY && all_local {
                // An unallocated chunk already reads as zeros.
                meta.publish_hard(blocks);
            } else if let Err(e) = self.slow_write(s, &vec![0u8; (e - s) as usize]).await {
                // Partial blocks still in the base: a copy-on-write of zeros.
                failed = Some(e);
                break;
            }
        }
        // Give the space back now, in runs of physically adjacent chunks (so
        // small chunks sharing a file-system block free it): nothing can
        // reuse them before their free is durable, and zeros are what a
        // discard reads.
        if let Err(e) = self.punch_chunks(c, &freed_phys, offset).await {
            failed.get_or_insert(e);
        }
        // Publish the frees done so far even after an error: the chunks are
        // unmapped in memory, so their free must reach the journal, and they
        // become reusable only once it is durable.
        meta.publish_group(table_records(&freed), freed_blocks.unwrap_or(0..0));
        c.set_pending_round(&freed_phys, meta.next_round());
        failed.map_or(Ok(()), Err)
    }

    async fn sparse_slow_zero(
        &self,
        meta: &Meta,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let end = offset + len;
        let blocks = self.blocks_of(offset, len);
        let (head, tail) = self.cow_edges(meta, offset, end, &blocks).await?;
        if !head.is_empty() {
            self.write_local(offset - head.len() as u64, &head, &[])
                .await?;
        }
        self.zero_local(offset, len, unmap).await?;
        if !tail.is_empty() {
            self.write_local(end, &tail, &[]).await?;
        }
        meta.publish_hard(blocks);
        Ok(())
    }

    /// Discard a range: it reads as zeros afterwards and its space is freed
    /// where the storage allows.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false).await
    }

    /// Copy the base data of `[offset, offset+len)` into the image (the
    /// NBD_CMD_CACHE / copy-on-read path). The bits it sets are *soft*: kept in
    /// memory only and never journaled, so after a crash those blocks are
    /// simply read from the base again. Never overwrites a guest write: the
    /// blocks are locked and re-checked before the fill is written. (In
    /// compact images a chunk the fill allocates is journaled, because a later
    /// guest write into the same chunk relies on its table entry.)
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.meta.is_none() || self.read_only || self.base.is_none() {
            return Ok(());
        }
        self.check_writable()?;
        let blocks = self.blocks_of(offset, len);
        // Bounded work per step: at most this many blocks are filled at once.
        let step = (crate::format::layout::DEFAULT_MAX_COR_BYTES / self.geo.block_size).max(1);
        let mut b = blocks.start;
        while b < blocks.end {
            let end = (b + step).min(blocks.end);
            let n = self.fill_blocks(b..end, None, false).await?;
            self.stats.cor_bytes.fetch_add(n, Ordering::Relaxed);
            b = end;
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
            Some(m) => {
                m.close(self.storage.as_ref(), &self.stats).await?;
                self.reclaim_shared_pages().await
            }
            None => self.flush_raw().await,
        }
    }

    /// Where the data of `[offset, offset+len)` is and whether it reads as zeros.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let segs = match &self.meta {
            Some(m) => self.segments(m, offset, len),
            None => vec![(offset, offset + len, false)],
        };
        for (s, e, from_base) in segs {
            if from_base {
                let base = self
                    .base
                    .as_ref()
                    .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
                let runs = base
                    .allocation(s, e - s)
                    .await
                    .map_err(|er| Error::io(format!("{}: block status", base.describe()), er))?;
                push_runs(&mut out, s, e, Source::Base, None, runs);
            } else {
                self.local_status(&mut out, s, e).await?;
            }
        }
        Ok(out)
    }

    async fn local_status(&self, out: &mut Vec<Extent>, s: u64, e: u64) -> Result<()> {
        let Some(c) = &self.compact else {
            let runs = self
                .storage
                .allocation(self.geo.data_offset + s, e - s)
                .await
                .map_err(self.io_err("block status", s))?;
            push_runs(
                out,
                s,
                e,
                Source::Image,
                Some(self.geo.data_offset + s),
                runs,
            );
            return Ok(());
        };
        let mut pos = s;
        for ch in Self::chunks_of(c, s, e - s) {
            let ce = ((ch + 1) * c.chunk_size).min(e);
            match c.pin(ch) {
                None => push_runs(out, pos, ce, Source::Image, None, vec![]),
                Some((p, _pin)) => {
                    let host = c.host_offset(p, pos);
                    let runs = self
                        .storage
                        .allocation(host, ce - pos)
                        .await
                        .map_err(self.io_err("block status", pos))?;
                    push_runs(out, pos, ce, Source::Image, Some(host), runs);
                }
            }
            pos = ce;
        }
        Ok(())
    }

    /// When every block of the base range is in the image (prefetch done):
    /// make the data durable, checkpoint with the all-local flag in the new
    /// header (old bitmap records no longer apply; chunk-table records are
    /// written in place first), and stop consulting the bitmap and the base.
    /// A failure poisons the image. Returns whether the image is now
    /// detached.
    pub async fn detach_base_if_complete(&self) -> Result<bool> {
        let meta = match &self.meta {
            Some(m) if !self.read_only => m,
            _ => return Ok(false),
        };
        let blocks = self.geo.base_blocks;
        if self.base_range() == 0 {
            return Ok(true);
        }
        if !meta.local.all_set(0..blocks) {
            return Ok(false);
        }
        meta.commit(self.storage.as_ref(), &self.stats).await?;
        meta.detach_base(self.storage.as_ref(), &self.stats).await?;
        self.base_range.store(0, Ordering::Release);
        Ok(true)
    }
}

fn m_none_local(meta: &Meta, blocks: &Range<u64>) -> bool {
    meta.local.none_set(blocks.clone())
}

/// Append allocation runs of `[s, e)` as extents (holes read as zeros; a
/// missing tail of the runs is a hole).
fn push_runs(
    out: &mut Vec<Extent>,
    s: u64,
    e: u64,
    source: Source,
    host: Option<u64>,
    runs: Vec<crate::storage::AllocRun>,
) {
    let mut p = s;
    let mut push = |start: u64, length: u64, zero: bool, host_offset: Option<u64>| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(l)
                if l.source == source
                    && l.zero == zero
                    && l.start + l.length == start
                    && l.host_offset.map(|h| h + l.length) == host_offset =>
            {
                l.length += length
            }
            _ => out.push(Extent {
                start,
                length,
                source,
                zero,
                host_offset,
            }),
        }
    };
    for r in runs {
        let length = r.length.min(e - p);
        push(p, length, !r.data, host.map(|h| h + (p - s)));
        p += length;
    }
    if p < e {
        push(p, e - p, true, host.map(|h| h + (p - s)));
    }
}

/// Read the bitmap (and table) and replay the journal if the image is dirty.
async fn load_metadata(storage: &dyn Storage, h: &Header) -> Result<(Durable, u64, u64)> {
    let bits = h.base_blocks();
    let bitmap = if bits > 0 {
        let bytes = bits.div_ceil(8) as usize;
        let buf = storage
            .read_at(h.region(Region::Bitmap).offset, IoBuf::zeroed(bytes))
            .await
            .map_err(|e| Error::io("read bitmap", e))?;
        expect_len(&buf, bytes, "read bitmap")?;
        AtomicBitmap::from_bytes(bits, &buf)?
    } else {
        AtomicBitmap::new(0)
    };
    let table = read_table(storage, h).await?;
    let mut durable = Durable::new(bitmap, table);
    if h.is_clean() {
        return Ok((durable, 0, 0));
    }
    let replay = meta::read_journal(storage, h).await?;
    for r in &replay.records {
        durable.apply(r)?;
    }
    Ok((durable, replay.blocks, replay.records.len() as u64))
}

/// Read the on-disk chunk table (empty for the sparse layout).
pub(crate) async fn read_table(storage: &dyn Storage, h: &Header) -> Result<Vec<u32>> {
    if h.incompatible & INCOMPAT_COMPACT == 0 {
        return Ok(Vec::new());
    }
    let bytes = (h.virtual_size.div_ceil(h.chunk_size as u64) * 4) as usize;
    let buf = storage
        .read_at(h.region(Region::Table).offset, IoBuf::zeroed(bytes))
        .await
        .map_err(|e| Error::io(format!("{}: read chunk table", storage.describe()), e))?;
    expect_len(&buf, bytes, "read chunk table")?;
    Ok(buf
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Read and validate the newest header of an image.
pub async fn read_header(storage: &dyn Storage) -> Result<(Header, usize)> {
    let desc = storage.describe();
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{desc}: size"), e))?;
    if len < header::HEADER_SLOT_SIZE as u64 {
        return Err(Error::invalid(format!(
            "{desc}: not an FVD image (file is only {len} bytes)"
        )));
    }
    let buf = storage
        .read_at(0, IoBuf::zeroed(HEADER_AREA as usize))
        .await
        .map_err(|e| Error::io(format!("{desc}: read header"), e))?;
    header::decode_slots(&buf).map_err(|e| e.context(&desc))
}
