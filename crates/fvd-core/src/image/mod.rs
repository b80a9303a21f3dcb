//! The image engine: read, write, flush, discard, write_zeroes, block_status.
//!
//! Mapping first, then I/O: a request is split by the bitmap into runs that
//! live in the image (at `data_offset + offset`: no address translation) or
//! in the base; data I/O runs outside every metadata lock.
//!
//! Write paths:
//! * fast (no lock, no metadata): every touched block is `hard`, or the
//!   request lies beyond the base range — exactly a raw-file write;
//! * copy-on-write: lock the touched blocks, re-check, merge the missing head
//!   and tail of partial blocks from the base, write, then publish the bits
//!   (publish after write). The records reach the journal at the next flush.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::base::Base;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{
    self, FLAG_ALL_LOCAL, FLAG_ZERO_DETECTED, HEADER_AREA, Header, INCOMPAT_COMPACT,
    INCOMPAT_ENCRYPTED, INCOMPAT_SNAPSHOTS, Region,
};
use crate::format::layout::{CreateLayout, compute_layout};
use crate::iobuf::IoBuf;
use crate::meta::{self, Meta, Stats};
use crate::storage::Storage;

pub mod rangelock;

use rangelock::RangeLocks;

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
    /// Offset in the image file, for extents in the image.
    pub host_offset: Option<u64>,
}

/// Where a request goes, decided from the bitmap alone (no I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMap {
    /// Entirely in the image, at this file offset (the raw-like fast path).
    Image(u64),
    /// Entirely in the base, at the same offset.
    Base,
    /// Partly in each.
    Mixed,
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Refuse writes; never modify the file (a dirty journal is replayed in memory).
    pub read_only: bool,
}

/// Geometry fixed at open.
#[derive(Debug, Clone)]
struct Geometry {
    virtual_size: u64,
    block_size: u64,
    base_range: u64,
    base_blocks: u64,
    data_offset: u64,
}

/// An open FVD image (or a raw file served through the same interface).
pub struct Image {
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
    geo: Geometry,
    meta: Option<Meta>,
    locks: RangeLocks,
    read_only: bool,
    closed: AtomicBool,
    raw_dirty: AtomicBool,
    stats: Stats,
    header: Option<Header>,
    replayed_blocks: u64,
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
            (Some((name, fmt)), Some(_)) => Some((
                name.clone(),
                fmt.clone(),
                base_size,
                format!("size={base_size}"),
            )),
            (Some(_), None) => return Err(Error::arg("base named but not opened")),
            _ => None,
        },
        block_size: opts.block_size,
        journal_size: opts.journal_size,
        compact: false,
        chunk_size: None,
    };
    let mut h = compute_layout(&layout)?;
    if opts.copy_on_read {
        h.flags |= header::FLAG_COPY_ON_READ;
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
    storage
        .set_len(data.offset + data.length)
        .await
        .map_err(io("set size"))?;
    let j = h.region(Region::Journal);
    storage
        .write_zeroes(j.offset, j.length)
        .await
        .map_err(io("clear journal"))?;
    let bm = h.region(Region::Bitmap);
    if bm.length > 0 {
        let bytes = bitmap.to_bytes(bm.length as usize);
        storage
            .write_at(bm.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(io("write bitmap"))?;
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
    const STEP: u64 = 4 << 20;
    let step = STEP.max(bs) / bs * bs;
    let mut pos = 0;
    while pos < range {
        let len = step.min(range - pos);
        let runs = base
            .allocation(pos, len)
            .await
            .map_err(|e| Error::io(format!("{}: block status", base.describe()), e))?;
        let mut p = pos;
        let mut data_ranges = Vec::new();
        for r in runs {
            if r.data {
                data_ranges.push((p, p + r.length));
            }
            p += r.length;
        }
        let buf = if data_ranges.is_empty() {
            None
        } else {
            let b = base.read_at(pos, IoBuf::zeroed(len as usize)).await;
            Some(b.map_err(|e| Error::io(format!("{}: read", base.describe()), e))?)
        };
        let first = pos / bs;
        let last = (pos + len).div_ceil(bs);
        for blk in first..last {
            let s = (blk * bs).max(pos);
            let e = ((blk + 1) * bs).min(pos + len);
            let zero = match &buf {
                None => true,
                Some(b) => crate::iobuf::is_zero(&b[(s - pos) as usize..(e - pos) as usize]),
            };
            if zero {
                bitmap.set(blk);
            }
        }
        pos += len;
    }
    Ok(())
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
        let unsupported =
            h.incompatible & (INCOMPAT_COMPACT | INCOMPAT_ENCRYPTED | INCOMPAT_SNAPSHOTS);
        if unsupported != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{desc}: image uses features {unsupported:#x} (compact/encrypted/snapshots) not supported by this build"
                ),
            ));
        }
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
            if b.size() != h.base_size {
                return Err(Error::invalid(format!(
                    "{desc}: base image '{}' changed: it was {} bytes at create time and is {} now",
                    b.describe(),
                    h.base_size,
                    b.size()
                )));
            }
            Some(b)
        } else {
            None
        };
        let bm = h.region(Region::Bitmap);
        let bits = h.base_blocks();
        let bitmap = if bits > 0 {
            let bytes = (bits.div_ceil(8)) as usize;
            let buf = storage
                .read_at(bm.offset, IoBuf::zeroed(bytes))
                .await
                .map_err(|e| Error::io(format!("{desc}: read bitmap"), e))?;
            AtomicBitmap::from_bytes(bits, &buf).map_err(|e| e.context(&desc))?
        } else {
            AtomicBitmap::new(0)
        };
        let mut dirty_pages = std::collections::BTreeSet::new();
        let mut replayed_blocks = 0;
        let stats = Stats::default();
        if !h.is_clean() {
            let replay = meta::read_journal(storage.as_ref(), &h)
                .await
                .map_err(|e| e.context(&desc))?;
            for r in &replay.records {
                meta::apply(&bitmap, r, &mut dirty_pages).map_err(|e| e.context(&desc))?;
            }
            replayed_blocks = replay.blocks;
            stats
                .replayed_records
                .store(replay.records.len() as u64, Ordering::Relaxed);
        }
        let geo = Geometry {
            virtual_size: h.virtual_size,
            block_size: h.block_size as u64,
            base_range,
            base_blocks: bits,
            data_offset: data.offset,
        };
        let meta = Meta::new(h.clone(), slot, bitmap);
        if !h.is_clean() && !opts.read_only {
            let mut st = meta.commit.lock().await;
            st.dirty_pages = dirty_pages;
            meta::checkpoint(&mut st, storage.as_ref(), &stats, true)
                .await
                .map_err(|e| e.context(&desc))?;
        }
        Ok(Image {
            storage,
            base,
            geo,
            meta: Some(meta),
            locks: RangeLocks::default(),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats,
            header: Some(h),
            replayed_blocks,
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
                base_range: 0,
                base_blocks: 0,
                data_offset: 0,
            },
            meta: None,
            locks: RangeLocks::default(),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats: Stats::default(),
            header: None,
            replayed_blocks: 0,
        })
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
        let end = (offset + len).min(self.geo.base_range);
        if offset >= end {
            return 0..0;
        }
        offset / self.geo.block_size..end.div_ceil(self.geo.block_size)
    }

    fn io_err(&self, what: &str, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        let d = self.describe();
        let what = what.to_string();
        move |e| Error::io(format!("{d}: {what} at offset {offset}"), e)
    }

    /// Map a read request: the bitmap lookup every request starts with.
    pub fn map_request(&self, offset: u64, len: u64) -> RequestMap {
        let blocks = self.blocks_of(offset, len);
        match &self.meta {
            Some(m) if !blocks.is_empty() => {
                if m.local.all_set(blocks.clone()) {
                    RequestMap::Image(self.geo.data_offset + offset)
                } else if m.local.none_set(blocks) && offset + len <= self.geo.base_range {
                    RequestMap::Base
                } else {
                    RequestMap::Mixed
                }
            }
            _ => RequestMap::Image(self.geo.data_offset + offset),
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let meta = match (self.map_request(offset, len), &self.meta) {
            (RequestMap::Image(_), _) | (_, None) => return self.read_image(offset, buf).await,
            (RequestMap::Base, _) => return self.read_base(offset, buf).await,
            (RequestMap::Mixed, Some(m)) => m,
        };
        let blocks = self.blocks_of(offset, len);
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
        for (b0, b1, local) in meta.local.runs(blocks) {
            let s = (b0 * bs).max(offset);
            let e = (b1 * bs).min(end);
            if local {
                push(s, e, false);
            } else {
                let be = e.min(self.geo.base_range);
                push(s, be, true);
                push(be, e, false);
            }
            pos = e;
        }
        push(pos, end, false);
        for (s, e, from_base) in segs {
            let part = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if from_base {
                self.read_base(s, part).await?;
            } else {
                self.read_image(s, part).await?;
            }
        }
        Ok(())
    }

    async fn read_image(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let buf = self
            .storage
            .read_at(
                self.geo.data_offset + offset,
                IoBuf::for_overwrite(out.len()),
            )
            .await
            .map_err(self.io_err("read", offset))?;
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

    async fn write_image(&self, offset: u64, buf: IoBuf) -> Result<()> {
        let n = buf.len() as u64;
        self.storage
            .write_at(self.geo.data_offset + offset, buf, false)
            .await
            .map_err(self.io_err("write", offset))?;
        self.stats.data_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.data_write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn mark_dirty(&self) {
        match &self.meta {
            Some(m) => m.mark_data_dirty(),
            None => self.raw_dirty.store(true, Ordering::Release),
        }
    }

    async fn flush_raw(&self) -> Result<()> {
        if self.raw_dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = meta::flush_storage(self.storage.as_ref(), &self.stats).await {
                self.raw_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// True if the write of `blocks` needs the copy-on-write path.
    fn needs_cow(&self, blocks: &Range<u64>) -> bool {
        match &self.meta {
            Some(m) => !blocks.is_empty() && !m.hard.all_set(blocks.clone()),
            None => false,
        }
    }

    /// Write `data` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let blocks = self.blocks_of(offset, data.len() as u64);
            if self.needs_cow(&blocks) {
                let _g = self.locks.lock(blocks.start, blocks.end).await;
                self.cow_write(offset, Some(data), data.len() as u64, false, blocks)
                    .await?;
            } else {
                self.write_image(offset, IoBuf::from_slice(data)).await?;
                self.mark_dirty();
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Make `[offset, offset+len)` read as zeros; with `unmap` the space may be freed.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len > 0 {
            let blocks = self.blocks_of(offset, len);
            if self.needs_cow(&blocks) {
                let _g = self.locks.lock(blocks.start, blocks.end).await;
                self.cow_write(offset, None, len, unmap, blocks).await?;
            } else {
                self.zero_image(offset, len, unmap).await?;
                self.mark_dirty();
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Discard a range: it reads as zeros afterwards and its space is freed
    /// where the storage allows.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false).await
    }

    async fn zero_image(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let off = self.geo.data_offset + offset;
        let r = if unmap {
            self.storage.discard(off, len).await
        } else {
            self.storage.write_zeroes(off, len).await
        };
        r.map_err(self.io_err("zero", offset))
    }

    /// Copy-on-write of `blocks`, with their range lock held. `data` is None
    /// for zeroing.
    async fn cow_write(
        &self,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        unmap: bool,
        blocks: Range<u64>,
    ) -> Result<()> {
        let meta = self.meta.as_ref().expect("copy-on-write needs metadata");
        let bs = self.geo.block_size;
        let end = offset + len;
        // Missing head of the first block and tail of the last, if they are not local.
        let head_start = blocks.start * bs;
        let head = if offset > head_start && !meta.local.get(blocks.start) {
            self.base_bytes(head_start, offset - head_start).await?
        } else {
            Vec::new()
        };
        let tail_end = (blocks.end * bs).min(self.geo.base_range);
        let tail = if end < tail_end && !meta.local.get(blocks.end - 1) {
            self.base_bytes(end, tail_end - end).await?
        } else {
            Vec::new()
        };
        let start = offset - head.len() as u64;
        match data {
            Some(d) => {
                let mut buf = IoBuf::for_overwrite(head.len() + d.len() + tail.len());
                buf[..head.len()].copy_from_slice(&head);
                buf[head.len()..head.len() + d.len()].copy_from_slice(d);
                buf[head.len() + d.len()..].copy_from_slice(&tail);
                self.write_image(start, buf).await?;
            }
            None => {
                if !head.is_empty() {
                    self.write_image(start, IoBuf::from_slice(&head)).await?;
                }
                self.zero_image(offset, len, unmap).await?;
                if !tail.is_empty() {
                    self.write_image(end, IoBuf::from_slice(&tail)).await?;
                }
            }
        }
        meta.publish_hard(blocks);
        Ok(())
    }

    /// Copy the base data of `[offset, offset+len)` into the image (the
    /// NBD_CMD_CACHE / copy-on-read path). The bits it sets are *soft*: kept in
    /// memory only and never journaled, so after a crash those blocks are
    /// simply read from the base again. Never overwrites a guest write: the
    /// blocks are locked and re-checked before the fill is written.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let meta = match &self.meta {
            Some(m) if !self.read_only && self.base.is_some() => m,
            _ => return Ok(()),
        };
        self.check_writable()?;
        let blocks = self.blocks_of(offset, len);
        let bs = self.geo.block_size;
        // Bounded work per step: at most this many blocks are filled at once.
        let step = (crate::format::layout::DEFAULT_MAX_COR_BYTES / bs).max(1);
        let mut b = blocks.start;
        while b < blocks.end {
            let end = (b + step).min(blocks.end);
            for (r0, r1, local) in meta.local.runs(b..end) {
                if local {
                    continue;
                }
                let _g = self.locks.lock(r0, r1).await;
                for (s0, s1, now_local) in meta.local.runs(r0..r1) {
                    if now_local {
                        continue;
                    }
                    let s = s0 * bs;
                    let e = (s1 * bs).min(self.geo.base_range);
                    let data = self.base_bytes(s, e - s).await?;
                    self.write_image(s, IoBuf::from_slice(&data)).await?;
                    meta.local.set_range(s0..s1);
                }
            }
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

    /// Flush, write the bitmap in place if it changed, and set the clean flag.
    pub async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) || self.read_only {
            return Ok(());
        }
        match &self.meta {
            Some(m) => m.close(self.storage.as_ref(), &self.stats).await,
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
        let end = offset + len;
        let bs = self.geo.block_size;
        let blocks = self.blocks_of(offset, len);
        let mut segs: Vec<(u64, u64, bool)> = Vec::new();
        let mut pos = offset;
        if let Some(m) = &self.meta
            && !blocks.is_empty()
        {
            for (b0, b1, local) in m.local.runs(blocks) {
                let s = (b0 * bs).max(offset);
                let e = (b1 * bs)
                    .min(end)
                    .min(if local { end } else { self.geo.base_range });
                segs.push((s, e, !local));
                pos = e;
            }
        }
        if pos < end {
            segs.push((pos, end, false));
        }
        for (s, e, from_base) in segs {
            let runs = if from_base {
                let base = self
                    .base
                    .as_ref()
                    .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
                base.allocation(s, e - s)
                    .await
                    .map_err(|er| Error::io(format!("{}: block status", base.describe()), er))?
            } else {
                self.storage
                    .allocation(self.geo.data_offset + s, e - s)
                    .await
                    .map_err(self.io_err("block status", s))?
            };
            let mut p = s;
            for r in runs {
                let length = r.length.min(e - p);
                if length == 0 {
                    continue;
                }
                let source = if from_base {
                    Source::Base
                } else {
                    Source::Image
                };
                let host_offset = if from_base {
                    None
                } else {
                    Some(self.geo.data_offset + p)
                };
                match out.last_mut() {
                    Some(l)
                        if l.source == source
                            && l.zero == !r.data
                            && l.start + l.length == p
                            && l.host_offset.map(|h| h + l.length) == host_offset =>
                    {
                        l.length += length
                    }
                    _ => out.push(Extent {
                        start: p,
                        length,
                        source,
                        zero: !r.data,
                        host_offset,
                    }),
                }
                p += length;
            }
            if p < e {
                out.push(Extent {
                    start: p,
                    length: e - p,
                    source: if from_base {
                        Source::Base
                    } else {
                        Source::Image
                    },
                    zero: true,
                    host_offset: None,
                });
            }
        }
        Ok(out)
    }

    /// Set the all-local flag when every block of the base range is in the
    /// image (used by prefetch and `check -r`). Returns whether it was set.
    pub async fn detach_base_if_complete(&self) -> Result<bool> {
        let meta = match &self.meta {
            Some(m) if !self.read_only => m,
            _ => return Ok(false),
        };
        if self.geo.base_blocks == 0 || !meta.hard.all_set(0..self.geo.base_blocks) {
            return Ok(false);
        }
        meta.commit(self.storage.as_ref(), &self.stats).await?;
        let mut st = meta.commit.lock().await;
        let mut h = st.header.clone();
        h.flags |= FLAG_ALL_LOCAL;
        meta::flush_storage(self.storage.as_ref(), &self.stats).await?;
        meta::write_header(&mut st, self.storage.as_ref(), &self.stats, h).await?;
        meta::flush_storage(self.storage.as_ref(), &self.stats).await?;
        Ok(true)
    }
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
