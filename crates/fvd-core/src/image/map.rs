//! The mapping layer: where each byte of the virtual disk lives.
//!
//! A guest range becomes runs of [`Target`]s in two steps, and nothing else
//! in the engine translates an offset:
//!
//! 1. **the bitmap** (FVD's own level): a block of the base range whose
//!    `local` bit is 0 is read from the base, at the same offset; every
//!    other byte — local blocks, and everything past the base range — lives
//!    in the image;
//! 2. **the layout** of image-resident bytes (`Layout`): in the sparse
//!    layout (and raw files) at `data_offset + offset`, no translation; in
//!    compact images through the chunk table, where an unallocated chunk has
//!    no storage and reads as zeros. A run on a chunk pins it, so the chunk
//!    cannot be freed and reused while the run's I/O is in flight.
//!
//! The access layer (`read.rs`, `write.rs`, `zero.rs`, `status.rs`,
//! `cor.rs`, `prefetch.rs`) asks this module where bytes are, whether a
//! write may go straight to its host offsets (`Mapping::direct_write`),
//! which edges a copy-on-write must copy, which chunks to allocate, and what
//! to publish after the data is written; it does the data I/O itself. The
//! mapping layer does metadata work only: allocation (growing the storage),
//! the in-memory bitmaps and table, and queuing journal records.
//!
//! A request wholly in the image or wholly in the base maps to one run
//! without allocating: a bitmap scan a word at a time (`AtomicBitmap::run_at`)
//! and, in compact images, one table lookup and pin per chunk.
//!
//! Internal snapshots (`image::snapshot`: a chunk table and bitmap per
//! snapshot, chunks shared between them and the live disk): the chunk
//! lookup reads the live table; a chunk shared with a snapshot maps to
//! [`Target::Host`] for reads but makes `Mapping::direct_write` false, like
//! an unallocated chunk, and `Mapping::allocate` gives it a replacement
//! whose parts the request does not cover are copied from the old chunk
//! where a fresh chunk's are zeroed (`Mapping::fills`: the one place a
//! chunk's data is copied, which the access layer carries out with
//! `copy_host`). A zeroing never punches or frees a shared chunk; it
//! unmaps it, or copies it like a write.
//!
//! Encryption: every data byte of the image goes through the access
//! layer's `read_host` / `write_host` / `zero_host` with its host offset,
//! the sector tweak; the mapping itself does not change.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::compact::{Chunk, Compact, EMPTY, Pin};
use crate::error::{ErrorKind, Result};
use crate::format::journal::Record;
use crate::meta::{self, Meta, Proof, Stats};
use crate::storage::Storage;

/// Where a run of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// In the image file, starting at this byte offset.
    Host(u64),
    /// In the base image, at the same offset (an FVD image addresses its
    /// base like its own virtual disk).
    Base,
    /// In the image but without storage (an unallocated chunk of a compact
    /// image): reads as zeros; a write must allocate it first.
    Unallocated,
}

/// One run of a mapped range.
#[derive(Debug)]
pub struct Run<'a> {
    /// First virtual byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the bytes are.
    pub target: Target,
    /// Chunks the run uses, kept from reuse until the run is dropped.
    _pin: Option<Pin<'a>>,
}

impl Run<'_> {
    /// One past the last virtual byte.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// How image-resident bytes are placed in the file.
pub(crate) enum Layout {
    /// At `data_offset + offset` (sparse FVD images; raw files at 0).
    Linear {
        /// Offset of the data region.
        data_offset: u64,
    },
    /// Through the chunk table (compact images).
    Chunked(Box<Compact>),
}

/// The mapping of one open image: its geometry, the metadata that says
/// where blocks are, and the layout.
pub(crate) struct Mapping {
    /// Size of the virtual disk.
    pub virtual_size: u64,
    /// Bytes per bitmap block (a power of two).
    pub block_size: u64,
    /// log2 of `block_size`: the lookup every request starts with shifts
    /// rather than divides.
    block_shift: u32,
    /// Blocks of the base range (bits of the bitmap).
    pub base_blocks: u64,
    /// Bytes of the virtual disk backed by the base; drops to 0 once every
    /// block is local (prefetch done), so requests stop consulting the
    /// bitmap.
    base_range: AtomicU64,
    /// Bitmaps and journal (`None` for raw files).
    pub meta: Option<Meta>,
    layout: Layout,
}

/// Chunks allocated for a request and not yet published: its data must be
/// written first (`Mapping::publish`), or the chunks given back
/// (`Mapping::release`). Dropping an allocation leaks its chunks until the
/// image is reopened, on purpose: a request future dropped mid-flight may
/// still have a write running on an I/O thread into them.
#[must_use]
pub(crate) struct Allocation {
    chunks: Vec<Chunk>,
    /// Virtual chunks of `chunks` that replace a chunk shared with a
    /// snapshot, and that chunk.
    replaced: Vec<(u64, u32)>,
}

/// How a chunk of an allocation gets the bytes the request does not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// A fresh chunk that may hold old data: zero `len` bytes at host
    /// offset `host` (virtual offset `virt`), punching them if `unmap`
    /// (not in preallocated images, which keep their storage allocated).
    Zero {
        host: u64,
        virt: u64,
        len: u64,
        unmap: bool,
    },
    /// A replacement for a shared chunk (zeroed first unless it reads
    /// zeros already): copy `len` bytes
    /// from host offset `from` in the old chunk to `to` in the new one
    /// (virtual offset `virt`).
    Copy {
        from: u64,
        to: u64,
        virt: u64,
        len: u64,
    },
}

impl Allocation {
    /// Nothing allocated.
    pub fn none() -> Self {
        Allocation {
            chunks: Vec::new(),
            replaced: Vec::new(),
        }
    }

    /// The chunks.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Some chunk may hold old data, or holds bytes copied from a chunk
    /// shared with a snapshot: its record must wait for its data.
    fn ordered(&self) -> bool {
        !self.replaced.is_empty() || self.chunks.iter().any(|c| !c.zeroed)
    }
}

/// What a slow-path zeroing does with one piece of its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ZeroPiece {
    /// A whole chunk given back (compact images, unmap allowed): unmap it;
    /// its storage, if any, is punched with the other frees of the request
    /// ([`Frees::physical`]).
    Free {
        /// Virtual chunk.
        chunk: u64,
    },
    /// Every block is already in the image: zero what has storage there.
    InImage,
    /// Some blocks are still in the base: a copy-on-write of zeros.
    CopyOnWrite,
}

/// Chunks freed by a zeroing, published together at its end.
#[derive(Default)]
pub(crate) struct Frees {
    unmapped: Vec<Chunk>,
    physical: Vec<u32>,
    blocks: Option<Range<u64>>,
}

impl Frees {
    /// The physical chunks freed so far (not reusable before their free is
    /// durable, so their storage may be punched meanwhile).
    pub fn physical(&self) -> &[u32] {
        &self.physical
    }
}

impl Mapping {
    /// A mapping: `meta` is `None` for raw files (everything local).
    pub fn new(
        virtual_size: u64,
        block_size: u64,
        base_blocks: u64,
        base_range: u64,
        meta: Option<Meta>,
        layout: Layout,
    ) -> Self {
        debug_assert!(block_size.is_power_of_two());
        Mapping {
            virtual_size,
            block_size,
            block_shift: block_size.trailing_zeros(),
            base_blocks,
            base_range: AtomicU64::new(base_range),
            meta,
            layout,
        }
    }

    /// Bytes still backed by the base.
    #[inline]
    pub fn base_range(&self) -> u64 {
        self.base_range.load(Ordering::Acquire)
    }

    /// Every block is local: stop consulting the bitmap and the base.
    pub fn detach(&self) {
        self.base_range.store(0, Ordering::Release);
    }

    /// The chunk table and allocator (compact images).
    pub fn compact(&self) -> Option<&Compact> {
        match &self.layout {
            Layout::Chunked(c) => Some(c),
            Layout::Linear { .. } => None,
        }
    }

    /// Blocks of the base range overlapping `[offset, offset+len)`.
    pub fn blocks_of(&self, offset: u64, len: u64) -> Range<u64> {
        let end = (offset + len).min(self.base_range());
        if offset >= end {
            return 0..0;
        }
        offset >> self.block_shift..(end + self.block_size - 1) >> self.block_shift
    }

    /// True if every block of `blocks` is in the image.
    pub fn all_local(&self, blocks: Range<u64>) -> bool {
        self.meta
            .as_ref()
            .is_none_or(|m| blocks.is_empty() || m.local.all_set(blocks))
    }

    /// The runs of `blocks` that are not in the image.
    pub fn missing(&self, blocks: Range<u64>) -> Vec<Range<u64>> {
        let Some(m) = &self.meta else {
            return Vec::new();
        };
        m.local
            .runs(blocks)
            .into_iter()
            .filter(|r| !r.2)
            .map(|r| r.0..r.1)
            .collect()
    }

    /// Blocks in the image, and blocks of the base range.
    pub fn local_blocks(&self) -> (u64, u64) {
        match &self.meta {
            Some(m) => (m.local.count_ones(), self.base_blocks),
            None => (0, 0),
        }
    }

    /// Map `[offset, offset+len)` (clamped to the virtual disk): the runs it
    /// consists of, in order, computed as they are taken.
    #[inline]
    pub fn request(&self, offset: u64, len: u64) -> RequestMap<'_> {
        let end = offset.saturating_add(len).min(self.virtual_size);
        RequestMap {
            map: self,
            pos: offset.min(end),
            end,
            base_range: self.base_range(),
            local: None,
        }
    }

    /// The runs of image-resident bytes `[offset, offset+len)` in the
    /// layout alone (no bitmap): [`Target::Host`] or [`Target::Unallocated`].
    /// `fresh` holds chunks allocated for the request and not yet published.
    pub fn image_runs<'a>(&'a self, offset: u64, len: u64, fresh: &'a [Chunk]) -> ImageRuns<'a> {
        ImageRuns {
            layout: &self.layout,
            pos: offset,
            end: offset + len,
            fresh,
        }
    }

    /// The first-level segment at `pos`: where it ends (at most `end`) and
    /// whether it is in the base.
    #[inline]
    fn segment(&self, pos: u64, end: u64, base_range: u64) -> (u64, bool) {
        let Some(m) = &self.meta else {
            return (end, false);
        };
        if pos >= base_range {
            return (end, false);
        }
        let shift = self.block_shift;
        let last = (end.min(base_range) + self.block_size - 1) >> shift;
        let (run_end, local) = m.local.run_at(pos >> shift, last);
        if local {
            // Past the base range everything is local too.
            let e = if run_end >= last {
                end
            } else {
                run_end << shift
            };
            (e.min(end), false)
        } else {
            ((run_end << shift).min(end).min(base_range), true)
        }
    }

    /// True if a write of `[offset, offset+len)` may go straight to its host
    /// offsets, with no lock and no metadata — exactly a raw-file write:
    /// every block it touches is `hard` (committed or queued) and settled
    /// (no unconfirmed checked record, see `meta`), and, in compact images,
    /// every chunk allocated.
    pub fn direct_write(&self, offset: u64, len: u64) -> bool {
        let Some(m) = &self.meta else { return true };
        let blocks = self.blocks_of(offset, len);
        let settled_hard = |b: Range<u64>| m.hard.all_set(b.clone()) && m.settled(b);
        if !blocks.is_empty() && !settled_hard(blocks) {
            return false;
        }
        match &self.layout {
            Layout::Chunked(c) => c.all_owned(chunks_of(c, offset, len)),
            Layout::Linear { .. } => true,
        }
    }

    /// True if zeroing `[offset, offset+len)` needs no lock and no metadata:
    /// a direct write that frees no chunk.
    pub fn direct_zero(&self, offset: u64, len: u64, unmap: bool) -> bool {
        self.direct_write(offset, len) && !(unmap && self.frees_chunks(offset, len))
    }

    /// True if the range covers a whole allocated chunk (compact images).
    fn frees_chunks(&self, offset: u64, len: u64) -> bool {
        let Layout::Chunked(c) = &self.layout else {
            return false;
        };
        let first = offset.div_ceil(c.chunk_size);
        let last = self.full_chunk_end(c, offset + len);
        (first..last).any(|ch| c.lookup(ch) != EMPTY)
    }

    /// One past the last chunk that `[.., end)` covers completely (the last
    /// chunk of the disk counts as covered when `end` is the disk's end).
    fn full_chunk_end(&self, c: &Compact, end: u64) -> u64 {
        if end == self.virtual_size {
            end.div_ceil(c.chunk_size)
        } else {
            end / c.chunk_size
        }
    }

    /// The byte range a slow-path request must lock: whole blocks, or whole
    /// chunks in compact images (allocation works on chunks).
    pub fn lock_span(&self, offset: u64, len: u64) -> Range<u64> {
        match &self.layout {
            Layout::Chunked(c) => {
                let r = chunks_of(c, offset, len);
                r.start * c.chunk_size..r.end * c.chunk_size
            }
            Layout::Linear { .. } => {
                let b = self.blocks_of(offset, len);
                b.start * self.block_size..b.end * self.block_size
            }
        }
    }

    /// What a copy-on-write of `[offset, end)` must copy around the data:
    /// the missing head and tail of its partial first and last blocks that
    /// are not in the image yet (empty ranges where nothing is missing).
    /// Called with the span locked. (Blocks filled by copy-on-read are
    /// local: their edges are not rewritten — after a detach a direct write
    /// may land there meanwhile.)
    pub fn cow_edges(&self, offset: u64, end: u64) -> (Range<u64>, Range<u64>) {
        let none = (offset..offset, end..end);
        let (Some(m), blocks) = (&self.meta, self.blocks_of(offset, end - offset)) else {
            return none;
        };
        if blocks.is_empty() {
            return none;
        }
        let bs = self.block_size;
        let head_start = blocks.start * bs;
        let head = if offset > head_start && !m.local.get(blocks.start) {
            head_start..offset
        } else {
            offset..offset
        };
        let tail_end = (blocks.end * bs).min(self.base_range());
        let tail = if end < tail_end && !m.local.get(blocks.end - 1) {
            end..tail_end
        } else {
            end..end
        };
        (head, tail)
    }

    /// Allocate the unallocated chunks of `[offset, offset+len)`, and
    /// replacements for the chunks a snapshot shares (span locked), growing
    /// the storage when it is full. Chunks freed by discards become
    /// reusable only once their free is durable, so on ENOSPC with frees
    /// pending this commits and tries again.
    pub async fn allocate(
        &self,
        storage: &dyn Storage,
        stats: &Stats,
        offset: u64,
        len: u64,
    ) -> Result<Allocation> {
        let (Layout::Chunked(c), Some(m)) = (&self.layout, &self.meta) else {
            return Ok(Allocation::none());
        };
        let mut replaced = Vec::new();
        let missing: Vec<u64> = chunks_of(c, offset, len)
            .filter(|&ch| {
                let p = c.lookup(ch);
                let copy = p != EMPTY && c.needs_copy(ch);
                if copy {
                    replaced.push((ch, p));
                }
                p == EMPTY || copy
            })
            .collect();
        if missing.is_empty() {
            return Ok(Allocation::none());
        }
        let mut tries = 0;
        let fatal = |e: &crate::error::Error| m.mark_poisoned(e);
        let chunks = loop {
            match c.allocate(storage, &missing, m.rounds_done(), &fatal).await {
                // Other writers may take the chunks first: commit again.
                Err(e) if e.kind() == ErrorKind::NoSpace && c.has_pending_frees() && tries < 64 => {
                    tries += 1;
                    m.commit(storage, stats).await?;
                }
                r => break r?,
            }
        };
        stats
            .chunks_allocated
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
        stats
            .chunks_copied
            .fetch_add(replaced.len() as u64, Ordering::Relaxed);
        Ok(Allocation { chunks, replaced })
    }

    /// A fresh physical chunk for the mapped chunk `chunk` of a compact
    /// image (a lifecycle operation moving its data): the caller copies the
    /// data there, then [`Mapping::publish`] moves the entry, or
    /// [`Mapping::release`] gives it back.
    pub async fn allocate_move(&self, storage: &dyn Storage, chunk: u64) -> Result<Allocation> {
        let (Layout::Chunked(c), Some(m)) = (&self.layout, &self.meta) else {
            return Ok(Allocation::none());
        };
        let fatal = |e: &crate::error::Error| m.mark_poisoned(e);
        let chunks = c
            .allocate(storage, &[chunk], m.rounds_done(), &fatal)
            .await?;
        // The new entry must never be durable before the copied data (a
        // fresh chunk reads zeros, not the data): naming the chunk it
        // replaces makes its round ordered.
        Ok(Allocation {
            chunks,
            replaced: vec![(chunk, c.lookup(chunk))],
        })
    }

    /// What the chunks of `a` need besides the request's own bytes
    /// `[offset, offset+len)`, before they are published, in order: a fresh
    /// chunk the request does not cover wholly is zeroed unless it is known
    /// to read zeros (whatever the storage held there must read as zeros);
    /// a replacement of a shared
    /// chunk is zeroed too, then gets the old chunk's bytes around the
    /// request copied over — only those of blocks in the image: what the
    /// bitmap sends to the base stays zeros, as in a fresh chunk.
    pub fn fills(&self, a: &Allocation, offset: u64, len: u64) -> Vec<Fill> {
        let Layout::Chunked(c) = &self.layout else {
            return Vec::new();
        };
        let cs = c.chunk_size;
        let end = offset + len;
        let unmap = !c.preallocation.allocates_data();
        let mut out = Vec::new();
        for chunk in &a.chunks {
            let (ch, p) = (chunk.virt, chunk.phys);
            let (s, e) = (ch * cs, (ch + 1) * cs);
            if offset <= s && e <= end {
                continue;
            }
            let to = c.host_offset(p, 0);
            if !chunk.zeroed {
                out.push(Fill::Zero {
                    host: to,
                    virt: s,
                    len: cs,
                    unmap,
                });
            }
            if let Some(&(_, old)) = a.replaced.iter().find(|&&(v, _)| v == ch) {
                let from = c.host_offset(old, 0);
                // The parts of the chunk before and after the request.
                for (a0, a1) in [(s, offset.clamp(s, e)), (end.clamp(s, e), e)] {
                    for (r0, r1) in self.local_runs(a0, a1) {
                        out.push(Fill::Copy {
                            from: from + (r0 - s),
                            to: to + (r0 - s),
                            virt: r0,
                            len: r1 - r0,
                        });
                    }
                }
            }
        }
        out
    }

    /// The runs of `[start, end)` whose blocks are in the image (everything
    /// past the base range is).
    fn local_runs(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if start >= end {
            return Vec::new();
        }
        let Some(m) = &self.meta else {
            return vec![(start, end)];
        };
        let base_range = self.base_range();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, e: u64| match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        };
        let blocks = self.blocks_of(start, end - start);
        for (b0, b1, local) in m.local.runs(blocks) {
            let s = (b0 * self.block_size).max(start);
            let e = (b1 * self.block_size).min(end).min(base_range);
            if local && s < e {
                push(s, e);
            }
        }
        if end > base_range {
            push(start.max(base_range), end);
        }
        out
    }

    /// Give back chunks whose data write failed (they may hold part of it).
    pub fn release(&self, a: Allocation) {
        if let Layout::Chunked(c) = &self.layout {
            c.release(&a.chunks, true);
        }
    }

    /// Publish after write (a guest write, or a journaled fill): make the
    /// chunks of `a` visible and set the bits of `blocks`, queuing the table
    /// records and the bits that turned on as one group. `crcs`: the
    /// CRC-32C of each block of `blocks` as written, where the write held
    /// the whole block.
    pub fn publish(&self, a: Allocation, blocks: Range<u64>, crcs: &[Option<u32>]) {
        let Some(m) = &self.meta else { return };
        if a.chunks.is_empty() {
            m.publish_hard(blocks, Proof::Crcs(crcs));
            return;
        }
        if let Layout::Chunked(c) = &self.layout {
            c.publish(&a.chunks);
        }
        m.publish_group(
            table_records(&a.chunks),
            blocks,
            Proof::Crcs(crcs),
            a.ordered(),
        );
    }

    /// Publish a copy-on-read fill: the table entries of new chunks are
    /// journaled (later guest writes into those chunks rely on them), the
    /// bits stay soft (memory only).
    pub fn publish_soft(&self, a: Allocation, blocks: Range<u64>) {
        let Some(m) = &self.meta else { return };
        if let Layout::Chunked(c) = &self.layout {
            c.publish(&a.chunks);
            m.publish_group(table_records(&a.chunks), 0..0, Proof::Unmapped, a.ordered());
        }
        m.local.set_range(blocks);
    }

    /// Publish the bits of blocks a write made hard (no new chunk).
    pub fn publish_hard(&self, blocks: Range<u64>, crcs: &[Option<u32>]) {
        if let Some(m) = &self.meta {
            m.publish_hard(blocks, Proof::Crcs(crcs));
        }
    }

    /// Before rewriting `blocks` in place (span locked): see
    /// `Meta::prepare_rewrite`.
    pub async fn prepare_rewrite(
        &self,
        storage: &dyn Storage,
        stats: &Stats,
        blocks: Range<u64>,
    ) -> Result<()> {
        match &self.meta {
            Some(m) => m.prepare_rewrite(storage, stats, blocks).await,
            None => Ok(()),
        }
    }

    /// The span of block `b` (clipped to the base range): the bytes its
    /// checked record describes.
    pub fn block_span(&self, b: u64) -> Range<u64> {
        let s = b << self.block_shift;
        s..(s + self.block_size).min(self.base_range())
    }

    /// The CRC-32C of each block of `blocks` that `buf` (the content of
    /// `[start, start+buf.len())`) holds whole.
    pub fn block_crcs(&self, blocks: Range<u64>, start: u64, buf: &[u8]) -> Vec<Option<u32>> {
        let end = start + buf.len() as u64;
        blocks
            .map(|b| {
                let r = self.block_span(b);
                (r.start >= start && r.end <= end && r.start < r.end).then(|| {
                    meta::block_crc(&buf[(r.start - start) as usize..(r.end - start) as usize])
                })
            })
            .collect()
    }

    /// How a slow-path zeroing of `[offset, offset+len)` treats each part
    /// of it (span locked): (start, end, blocks, piece). Compact images go
    /// chunk by chunk; the sparse layout has one piece.
    pub fn zero_pieces(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Vec<(u64, u64, Range<u64>, ZeroPiece)> {
        let end = offset + len;
        let shared = |s: u64, e: u64| match &self.layout {
            Layout::Chunked(c) => chunks_of(c, s, e - s).any(|ch| c.needs_copy(ch)),
            Layout::Linear { .. } => false,
        };
        let piece = |s: u64, e: u64| {
            let blocks = self.blocks_of(s, e - s);
            // Zeros in a chunk a snapshot shares go to a copy of it.
            let kind = if self.all_local(blocks.clone()) && !shared(s, e) {
                ZeroPiece::InImage
            } else {
                ZeroPiece::CopyOnWrite
            };
            (s, e, blocks, kind)
        };
        let Layout::Chunked(c) = &self.layout else {
            return vec![piece(offset, end)];
        };
        let cs = c.chunk_size;
        chunks_of(c, offset, len)
            .map(|ch| {
                let (s, e) = ((ch * cs).max(offset), ((ch + 1) * cs).min(end));
                if unmap && s == ch * cs && ch < self.full_chunk_end(c, end) {
                    let blocks = self.blocks_of(s, e - s);
                    (s, e, blocks, ZeroPiece::Free { chunk: ch })
                } else {
                    piece(s, e)
                }
            })
            .collect()
    }

    /// Unmap chunk `chunk` of a zeroing (its storage is punched after the
    /// last piece); its `blocks` read as zeros from now on.
    pub fn free_chunk(&self, frees: &mut Frees, chunk: u64, blocks: Range<u64>) {
        let Layout::Chunked(c) = &self.layout else {
            return;
        };
        // Not reusable before the round that journals the free is known:
        // its record is queued only at the end (see `publish_frees`). A
        // chunk a snapshot holds stays allocated (`Compact::free`).
        let shared = c.is_shared(chunk);
        let p = c.free(chunk, u64::MAX);
        if p != EMPTY {
            if !shared {
                frees.physical.push(p);
            }
            frees.unmapped.push(Chunk {
                virt: chunk,
                phys: EMPTY,
                zeroed: true,
            });
        }
        if !blocks.is_empty() {
            let r = frees.blocks.get_or_insert(blocks.clone());
            *r = r.start.min(blocks.start)..r.end.max(blocks.end);
        }
    }

    /// Queue the frees of a zeroing (also after it failed halfway: the
    /// chunks are unmapped in memory, so their free must reach the journal)
    /// and stamp them with the round that will make them durable.
    pub fn publish_frees(&self, frees: Frees) -> u64 {
        let (Layout::Chunked(c), Some(m)) = (&self.layout, &self.meta) else {
            return 0;
        };
        m.publish_group(
            table_records(&frees.unmapped),
            frees.blocks.unwrap_or(0..0),
            Proof::Unmapped,
            false,
        );
        c.set_pending_round(&frees.physical, m.next_round());
        frees.physical.len() as u64
    }
}

/// Chunks overlapping `[offset, offset+len)`.
fn chunks_of(c: &Compact, offset: u64, len: u64) -> Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / c.chunk_size..(offset + len).div_ceil(c.chunk_size)
}

/// Records that map virtual chunks `chunks` (sorted) to new entries.
fn table_records(chunks: &[Chunk]) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for &Chunk {
        virt: c, phys: p, ..
    } in chunks
    {
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

/// The runs of a request, computed one at a time (`Mapping::request`).
pub struct RequestMap<'a> {
    map: &'a Mapping,
    pos: u64,
    end: u64,
    /// The base range when the request was mapped.
    base_range: u64,
    /// The image-resident segment being walked.
    local: Option<ImageRuns<'a>>,
}

impl<'a> Iterator for RequestMap<'a> {
    type Item = Run<'a>;

    #[inline]
    fn next(&mut self) -> Option<Run<'a>> {
        if let Some(local) = &mut self.local {
            if let Some(run) = local.next() {
                return Some(run);
            }
            self.local = None;
        }
        if self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let (end, in_base) = self.map.segment(start, self.end, self.base_range);
        self.pos = end;
        let target = match (&self.map.layout, in_base) {
            (_, true) => Target::Base,
            (Layout::Linear { data_offset }, false) => Target::Host(data_offset + start),
            (Layout::Chunked(_), false) => {
                let mut local = self.map.image_runs(start, end - start, &[]);
                let run = local.next();
                self.local = Some(local);
                return run;
            }
        };
        Some(Run {
            start,
            len: end - start,
            target,
            _pin: None,
        })
    }
}

/// The runs of image-resident bytes (`Mapping::image_runs`).
pub(crate) struct ImageRuns<'a> {
    layout: &'a Layout,
    pos: u64,
    end: u64,
    fresh: &'a [Chunk],
}

impl<'a> Iterator for ImageRuns<'a> {
    type Item = Run<'a>;

    #[inline]
    fn next(&mut self) -> Option<Run<'a>> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let c = match self.layout {
            Layout::Linear { data_offset } => {
                self.pos = self.end;
                return Some(Run {
                    start,
                    len: self.end - start,
                    target: Target::Host(data_offset + start),
                    _pin: None,
                });
            }
            Layout::Chunked(c) => c,
        };
        let cs = c.chunk_size;
        let chunk_end = |at: u64| ((at / cs + 1) * cs).min(self.end);
        let mut pins: Option<Pin<'a>> = None;
        let mut end = chunk_end(start);
        let target = match self.chunk(c, start / cs) {
            None => {
                // Neighbouring unallocated chunks form one run.
                while end < self.end && self.chunk(c, end / cs).is_none() {
                    end = chunk_end(end);
                }
                Target::Unallocated
            }
            Some((phys, pin)) => {
                // Physically contiguous chunks form one run (one I/O), as
                // long as they are all fresh or all pinned.
                let fresh = pin.is_none();
                pins = pin;
                let mut next = phys as u64 + 1;
                while end < self.end {
                    match self.chunk(c, end / cs) {
                        Some((p, pin)) if p as u64 == next && pin.is_none() == fresh => {
                            if let (Some(all), Some(pin)) = (&mut pins, pin) {
                                all.extend(pin);
                            }
                            next += 1;
                            end = chunk_end(end);
                        }
                        _ => break,
                    }
                }
                Target::Host(c.host_offset(phys, start))
            }
        };
        self.pos = end;
        Some(Run {
            start,
            len: end - start,
            target,
            _pin: pins,
        })
    }
}

impl<'a> ImageRuns<'a> {
    /// Physical chunk of `chunk`: a fresh one (no pin needed: nobody else
    /// sees it yet), else the table's, pinned; `None` if unallocated.
    fn chunk(&self, c: &'a Compact, chunk: u64) -> Option<(u32, Option<Pin<'a>>)> {
        if let Some(ch) = self.fresh.iter().find(|ch| ch.virt == chunk) {
            return Some((ch.phys, None));
        }
        c.pin(chunk).map(|(p, pin)| (p, Some(pin)))
    }
}
