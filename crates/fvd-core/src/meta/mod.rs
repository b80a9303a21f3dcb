//! In-memory metadata, the journal writer (group commit) and recovery.
//!
//! # Bitmaps
//! * `local` — the in-memory truth: 1 = the block's current data is in the
//!   image. Copy-on-read fills set it without journaling ("soft" bits).
//! * `hard` — blocks written by the guest whose bit is on disk or queued in
//!   `pending`; a write needs metadata only if it turns a `hard` bit on.
//! * `durable.bitmap` — exactly what the on-disk bitmap plus the journal
//!   say. Only touched under the commit lock; a checkpoint writes it in place.
//!
//! Invariant: durable ⊆ hard ⊆ local, and every `hard` bit not durable is
//! covered by a record in `pending` or in the round being committed. The
//! chunk table of compact images follows the same rule: the in-memory table
//! (in `image::compact`) runs ahead of `durable.table` by the records in
//! `pending`.
//!
//! # Record groups
//! `pending` holds groups of records that must become durable together (the
//! table entries of newly allocated chunks and the bits of the blocks written
//! into them). A group never spans two journal blocks, so a torn journal
//! write can never leave a bit durable without its chunk.
//!
//! # Flush ordering (publish after write)
//! A commit round: (1) fdatasync the image, making the data of every write
//! that completed before the round started durable; (2) the first time
//! after the image was clean, write the header with the clean flag cleared
//! and fdatasync; (3) write the journal blocks holding the records of those
//! writes; (4) fdatasync again. So no record is ever
//! durable before the data it points at. A checkpoint writes the durable
//! table pages in place and fdatasyncs, then the bitmap pages and
//! fdatasyncs (no bit is durable before its chunk's entry), then writes the
//! header with the next journal epoch and fdatasyncs: old-epoch blocks are
//! ignored only once the metadata that subsumes them is durable.
//!
//! # Lock order
//! `Meta::commit` (async mutex) → `Meta::pending` (std mutex, never held across
//! an await). The range locks of the image are always taken before `commit`
//! and never while holding it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{FLAG_ALL_LOCAL, FLAG_CLEAN, HEADER_SLOT_SIZE, Header, Region};
use crate::format::journal::{self, Record};
use crate::iobuf::IoBuf;
use crate::latency::{InFlight, LatencyHistogram};
use crate::storage::Storage;

/// Counters of I/O the engine performed, by purpose.
#[derive(Default, Debug)]
pub struct Stats {
    /// Guest data writes issued to the image storage.
    pub data_writes: AtomicU64,
    /// Bytes of those writes (merged copy-on-write blocks included).
    pub data_write_bytes: AtomicU64,
    /// Bytes read from the base (reads and copy-on-write merges).
    pub base_read_bytes: AtomicU64,
    /// Journal write operations.
    pub journal_writes: AtomicU64,
    /// Journal blocks written.
    pub journal_blocks: AtomicU64,
    /// Header slot writes.
    pub header_writes: AtomicU64,
    /// Bytes of bitmap and table written in place (checkpoints).
    pub bitmap_bytes_written: AtomicU64,
    /// Checkpoints (journal recycles and clean closes that wrote metadata).
    pub checkpoints: AtomicU64,
    /// fdatasync calls on the image storage.
    pub storage_flushes: AtomicU64,
    /// Journal records replayed at open.
    pub replayed_records: AtomicU64,
    /// Chunks allocated (compact images).
    pub chunks_allocated: AtomicU64,
    /// Chunks freed by discard (compact images).
    pub chunks_freed: AtomicU64,
    /// Chunks shared with a snapshot that a write or fill copied to a new
    /// chunk (compact images).
    pub chunks_copied: AtomicU64,
    /// Bytes copied from the base into the image by copy-on-read and NBD_CMD_CACHE.
    pub cor_bytes: AtomicU64,
    /// Bytes copied from the base into the image by prefetch.
    pub prefetch_bytes: AtomicU64,
    /// Copy-on-read fills skipped because too many bytes were in flight.
    pub cor_skipped: AtomicU64,
    /// Read requests sent to the base (guest reads, fills, prefetch, edges
    /// of copy-on-write).
    pub base_reads: AtomicU64,
    /// Base reads sent and not yet answered.
    pub base_reads_in_flight: AtomicU64,
    /// Time from sending a base read to its answer.
    pub base_read_latency: LatencyHistogram,
    /// Guest reads, writes, write_zeroes and discards being served.
    pub requests_in_flight: AtomicU64,
}

impl Stats {
    /// Count a base read until the guard drops, and time it.
    pub(crate) fn base_read(&self) -> InFlight<'_> {
        self.base_reads.fetch_add(1, Ordering::Relaxed);
        InFlight::start(&self.base_reads_in_flight, Some(&self.base_read_latency))
    }

    /// Count a guest request until the guard drops.
    pub(crate) fn request(&self) -> InFlight<'_> {
        InFlight::start(&self.requests_in_flight, None)
    }

    /// Metadata write operations so far (journal + header + bitmap checkpoints).
    pub fn metadata_writes(&self) -> u64 {
        self.journal_writes.load(Ordering::Relaxed)
            + self.header_writes.load(Ordering::Relaxed)
            + self.checkpoints.load(Ordering::Relaxed)
    }
}

/// What the on-disk bitmap and table say once the journal is applied, and
/// which 4 KiB pages of their regions differ from what is written in place.
pub(crate) struct Durable {
    pub bitmap: AtomicBitmap,
    pub table: Vec<u32>,
    pub bitmap_dirty: BTreeSet<u64>,
    pub table_dirty: BTreeSet<u64>,
}

impl Durable {
    pub fn new(bitmap: AtomicBitmap, table: Vec<u32>) -> Self {
        Durable {
            bitmap,
            table,
            bitmap_dirty: BTreeSet::new(),
            table_dirty: BTreeSet::new(),
        }
    }

    /// Apply one record (replay, or a record being committed).
    pub fn apply(&mut self, r: &Record) -> Result<()> {
        match r {
            Record::SetBits { first, count } | Record::ClearBits { first, count } => {
                let bm = &self.bitmap;
                let end = first.checked_add(*count as u64).filter(|&e| e <= bm.len()).ok_or_else(|| {
                    Error::corrupt(format!(
                        "journal record for blocks {first}..+{count} lies outside the bitmap ({} blocks)",
                        bm.len()
                    ))
                })?;
                if matches!(r, Record::SetBits { .. }) {
                    bm.set_range(*first..end);
                } else {
                    bm.clear_range(*first..end);
                }
                self.bitmap_dirty
                    .extend(first / 8 / 4096..=(end - 1) / 8 / 4096);
                Ok(())
            }
            Record::Table { first, entries } => {
                let end = first
                    .checked_add(entries.len() as u64)
                    .filter(|&e| e <= self.table.len() as u64)
                    .ok_or_else(|| {
                        Error::corrupt(format!(
                            "journal record for chunks {first}..+{} lies outside the chunk table ({} chunks)",
                            entries.len(),
                            self.table.len()
                        ))
                    })?;
                self.table[*first as usize..end as usize].copy_from_slice(entries);
                self.table_dirty
                    .extend(first * 4 / 4096..=(end * 4 - 1) / 4096);
                Ok(())
            }
        }
    }
}

/// The state only a commit round touches.
pub(crate) struct CommitState {
    /// The newest header on disk.
    pub header: Header,
    /// Slot (0 or 1) holding `header`.
    pub slot: usize,
    /// Bitmap and table as on disk + journal.
    pub durable: Durable,
    /// Next journal block index.
    pub journal_pos: u64,
}

/// Metadata of one open image.
pub(crate) struct Meta {
    pub local: AtomicBitmap,
    pub hard: AtomicBitmap,
    pending: Mutex<Vec<Vec<Record>>>,
    data_dirty: AtomicBool,
    rounds_started: AtomicU64,
    rounds_done: AtomicU64,
    pub commit: tokio::sync::Mutex<CommitState>,
    poisoned: AtomicBool,
}

/// Result of reading the journal.
pub(crate) struct Replay {
    pub blocks: u64,
    pub records: Vec<Record>,
}

impl Meta {
    pub fn new(header: Header, slot: usize, durable: Durable) -> Self {
        let bits = durable.bitmap.len();
        let local = AtomicBitmap::new(bits);
        local.copy_from(&durable.bitmap);
        let hard = AtomicBitmap::new(bits);
        hard.copy_from(&durable.bitmap);
        Meta {
            local,
            hard,
            pending: Mutex::new(Vec::new()),
            data_dirty: AtomicBool::new(false),
            rounds_started: AtomicU64::new(0),
            rounds_done: AtomicU64::new(0),
            commit: tokio::sync::Mutex::new(CommitState {
                header,
                slot,
                durable,
                journal_pos: 0,
            }),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Note that a data write completed (the next flush must fdatasync).
    pub fn mark_data_dirty(&self) {
        self.data_dirty.store(true, Ordering::Release);
    }

    /// The commit round a record queued now will be part of, at the latest.
    pub fn next_round(&self) -> u64 {
        self.rounds_started.load(Ordering::SeqCst) + 1
    }

    /// Rounds that completed (their records are durable).
    pub fn rounds_done(&self) -> u64 {
        self.rounds_done.load(Ordering::SeqCst)
    }

    /// Set `local` and `hard` for blocks `r`; the runs of blocks that were
    /// not yet hard, as SET_BITS records.
    fn harden(&self, r: Range<u64>) -> Vec<Record> {
        let mut out = Vec::new();
        let mut run_start: Option<u64> = None;
        for b in r.clone() {
            self.local.set(b);
            let was = self.hard.set(b);
            match (was, run_start) {
                (false, None) => run_start = Some(b),
                (true, Some(s)) => {
                    push_set_bits(&mut out, s, b);
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            push_set_bits(&mut out, s, r.end);
        }
        out
    }

    /// After a guest write of blocks `r` completed: set their bits and queue
    /// records for those that were not yet hard.
    pub fn publish_hard(&self, r: Range<u64>) {
        let recs = self.harden(r);
        if !recs.is_empty() {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Merge with the previous group when it holds only bits (sequential
            // writes then cost one record).
            match p.last_mut() {
                // A group is bits-only exactly when its first record is (table
                // records come first); a bounded group keeps this O(1).
                Some(g)
                    if g.len() < MAX_BITS_GROUP
                        && matches!(g.first(), Some(Record::SetBits { .. })) =>
                {
                    for rec in recs {
                        if let Record::SetBits { first, count } = rec {
                            push_set_bits(g, first, first + count as u64);
                        }
                    }
                }
                _ => p.push(recs),
            }
        }
        self.mark_data_dirty();
    }

    /// Make the soft bits (copy-on-read and prefetch fills, in memory only)
    /// hard, queuing their records: the next commit round makes the fills'
    /// data durable (its first fdatasync) before their bits. A snapshot is
    /// taken after such a round, so it never holds a bit whose data a crash
    /// could lose, and the live image's durable bits cover the snapshot's.
    pub fn harden_soft(&self) {
        let mut soft = Vec::new();
        for (s, e, local) in self.local.runs(0..self.local.len()) {
            if local {
                soft.extend(
                    self.hard
                        .runs(s..e)
                        .into_iter()
                        .filter(|r| !r.2)
                        .map(|r| r.0..r.1),
                );
            }
        }
        for r in soft {
            self.publish_hard(r);
        }
    }

    /// Queue `table` records together with the bits of `blocks`, as one group
    /// that becomes durable atomically.
    pub fn publish_group(&self, table: Vec<Record>, blocks: Range<u64>) {
        let mut group = table;
        group.extend(self.harden(blocks));
        if !group.is_empty() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(group);
        }
        self.mark_data_dirty();
    }

    /// True once a flush has failed: the image refuses further writes.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn check_poisoned(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier flush failed; the image must be reopened",
            ));
        }
        Ok(())
    }

    /// Mark the image poisoned (a flush failed: the kernel may have dropped
    /// dirty pages, so a later successful flush would prove nothing).
    pub(crate) fn poison<T>(&self, e: Error) -> Result<T> {
        self.poisoned.store(true, Ordering::Release);
        Err(e)
    }

    /// Make every write completed before this call durable, with group commit.
    pub async fn commit(&self, storage: &dyn Storage, stats: &Stats) -> Result<()> {
        self.check_poisoned()?;
        let need = self.rounds_started.load(Ordering::SeqCst) + 1;
        let mut st = self.commit.lock().await;
        self.check_poisoned()?;
        if self.rounds_done.load(Ordering::SeqCst) >= need {
            return Ok(());
        }
        let round = self.rounds_started.fetch_add(1, Ordering::SeqCst) + 1;
        let mut groups =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if st.header.flags & FLAG_ALL_LOCAL != 0 {
            // The base is detached and the durable bitmap gone: bits mean
            // nothing any more, but a write that mapped its blocks before the
            // detach may still publish some. Only table records remain.
            for g in &mut groups {
                g.retain(|r| matches!(r, Record::Table { .. }));
            }
            groups.retain(|g| !g.is_empty());
        }
        let dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        if groups.is_empty() && !dirty {
            self.rounds_done.store(round, Ordering::SeqCst);
            return Ok(());
        }
        if let Err(e) = flush_storage(storage, stats).await {
            return self.poison(e);
        }
        if !groups.is_empty()
            && let Err(e) = self.write_records(&mut st, storage, stats, &groups).await
        {
            return self.poison(e);
        }
        self.rounds_done.store(round, Ordering::SeqCst);
        Ok(())
    }

    async fn write_records(
        &self,
        st: &mut CommitState,
        storage: &dyn Storage,
        stats: &Stats,
        groups: &[Vec<Record>],
    ) -> Result<()> {
        let blocks = journal::pack_groups(groups);
        let capacity = st.header.region(Region::Journal).length / journal::BLOCK_SIZE as u64;
        for r in groups.iter().flatten() {
            st.durable.apply(r)?;
        }
        if st.journal_pos + blocks.len() as u64 > capacity {
            // Journal full: write the whole durable metadata in place instead.
            return checkpoint(st, storage, stats, false).await;
        }
        if st.header.is_clean() {
            // First metadata change since the image was clean: the header must
            // say "replay the journal" durably before any journal block of this
            // epoch is written. Otherwise a crash could keep blocks but not the
            // header, and a later session at the same epoch, writing fewer
            // blocks from 0, would replay them as its own (stale records).
            let mut h = st.header.clone();
            h.flags &= !FLAG_CLEAN;
            write_header(st, storage, stats, h).await?;
            flush_storage(storage, stats).await?;
        }
        let mut buf = IoBuf::zeroed(blocks.len() * journal::BLOCK_SIZE);
        for (i, recs) in blocks.iter().enumerate() {
            let b = journal::encode_block(st.header.journal_epoch, st.journal_pos + i as u64, recs);
            buf[i * journal::BLOCK_SIZE..(i + 1) * journal::BLOCK_SIZE].copy_from_slice(&b);
        }
        let off =
            st.header.region(Region::Journal).offset + st.journal_pos * journal::BLOCK_SIZE as u64;
        storage
            .write_at(off, buf, false)
            .await
            .map_err(|e| Error::io("journal write", e))?;
        stats.journal_writes.fetch_add(1, Ordering::Relaxed);
        stats
            .journal_blocks
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        st.journal_pos += blocks.len() as u64;
        flush_storage(storage, stats).await
    }

    /// Detach the base (every block is local): a checkpoint whose header
    /// carries the all-local flag — not just a new header, since the new
    /// epoch ends the old journal, whose chunk-table records (compact
    /// images) must be in place first. The durable bitmap is gone after it.
    /// A failure poisons the image, as in a commit round: the header may
    /// already be at the new epoch while the journal position is not.
    pub async fn detach_base(&self, storage: &dyn Storage, stats: &Stats) -> Result<()> {
        let mut st = self.commit.lock().await;
        self.check_poisoned()?;
        if let Err(e) = checkpoint_with_flags(&mut st, storage, stats, false, FLAG_ALL_LOCAL).await
        {
            return self.poison(e);
        }
        st.durable.bitmap = AtomicBitmap::new(0);
        st.durable.bitmap_dirty.clear();
        Ok(())
    }

    /// Flush, then (if metadata changed since open) checkpoint and set the clean flag.
    pub async fn close(&self, storage: &dyn Storage, stats: &Stats) -> Result<()> {
        self.commit(storage, stats).await?;
        let mut st = self.commit.lock().await;
        // Soft bits (copy-on-read fills) become permanent at a clean close,
        // once the data they point at is durable.
        let mut promoted = Vec::new();
        // After the base was detached the durable bitmap is gone: nothing to promote.
        let bits = if st.durable.bitmap.is_empty() {
            0
        } else {
            self.local.len()
        };
        for (s, e, local) in self.local.runs(0..bits) {
            if !local {
                continue;
            }
            for (a, b, durable) in st.durable.bitmap.runs(s..e) {
                if !durable {
                    push_set_bits(&mut promoted, a, b);
                }
            }
        }
        if !promoted.is_empty() {
            if let Err(e) = flush_storage(storage, stats).await {
                return self.poison(e);
            }
            for r in &promoted {
                st.durable.apply(r)?;
                if let Record::SetBits { first, count } = r {
                    self.hard.set_range(*first..first + *count as u64);
                }
            }
        }
        if (!st.header.is_clean() || !promoted.is_empty())
            && let Err(e) = checkpoint(&mut st, storage, stats, true).await
        {
            return self.poison(e);
        }
        Ok(())
    }
}

/// Records per bits-only group (about one journal block's worth).
const MAX_BITS_GROUP: usize = journal::PAYLOAD / 16;

fn push_set_bits(p: &mut Vec<Record>, s: u64, e: u64) {
    // Extend the previous record when runs are adjacent (sequential writes).
    if let Some(Record::SetBits { first, count }) = p.last_mut()
        && *first + *count as u64 == s
        && (*count as u64 + (e - s)) <= u32::MAX as u64
    {
        *count += (e - s) as u32;
        return;
    }
    let mut start = s;
    while start < e {
        let n = (e - start).min(u32::MAX as u64);
        p.push(Record::SetBits {
            first: start,
            count: n as u32,
        });
        start += n;
    }
}

pub(crate) async fn flush_storage(storage: &dyn Storage, stats: &Stats) -> Result<()> {
    stats.storage_flushes.fetch_add(1, Ordering::Relaxed);
    storage.flush().await.map_err(|e| Error::io("flush", e))
}

/// Write `h` (with the next generation) into the slot not holding the newest header.
pub(crate) async fn write_header(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    mut h: Header,
) -> Result<()> {
    h.generation = st.header.generation + 1;
    let slot = 1 - st.slot;
    let buf = IoBuf::from_slice(&h.encode());
    storage
        .write_at((slot * HEADER_SLOT_SIZE) as u64, buf, false)
        .await
        .map_err(|e| Error::io("header write", e))?;
    stats.header_writes.fetch_add(1, Ordering::Relaxed);
    st.header = h;
    st.slot = slot;
    Ok(())
}

/// Write runs of dirty 4 KiB pages of a region, taking each run's bytes from `bytes_of`.
async fn write_pages(
    storage: &dyn Storage,
    stats: &Stats,
    region: crate::format::header::Extent,
    pages: BTreeSet<u64>,
    bytes_of: impl Fn(usize, usize) -> Vec<u8>,
) -> Result<()> {
    let pages: Vec<u64> = pages.into_iter().collect();
    let mut i = 0;
    while i < pages.len() {
        // Coalesce consecutive pages into one write.
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 && j - i < 256 {
            j += 1;
        }
        let start = pages[i] * 4096;
        let len = ((pages[j - 1] + 1) * 4096)
            .min(region.length)
            .saturating_sub(start);
        if len > 0 {
            let bytes = bytes_of(start as usize, len as usize);
            storage
                .write_at(region.offset + start, IoBuf::from_slice(&bytes), false)
                .await
                .map_err(|e| Error::io("metadata write", e))?;
            stats.bitmap_bytes_written.fetch_add(len, Ordering::Relaxed);
        }
        i = j;
    }
    Ok(())
}

/// Encode bytes `[start, start+len)` of an on-disk chunk table.
pub(crate) fn table_bytes(table: &[u32], start: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0xffu8; len];
    for (k, byte) in out.iter_mut().enumerate() {
        let pos = start + k;
        if let Some(e) = table.get(pos / 4) {
            *byte = e.to_le_bytes()[pos % 4];
        }
    }
    out
}

/// Write the durable bitmap and table in place and start a new journal epoch.
pub(crate) async fn checkpoint(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    clean: bool,
) -> Result<()> {
    checkpoint_with_flags(st, storage, stats, clean, 0).await
}

/// [`checkpoint`], setting `flags` in the new header too.
async fn checkpoint_with_flags(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    clean: bool,
    flags: u64,
) -> Result<()> {
    flush_storage(storage, stats).await?;
    // Table pages first, made durable before any bitmap page: the records of
    // a round that overflowed the journal live only here, and a bit durable
    // without its chunk's table entry would make the block read zeros.
    let table_pages = std::mem::take(&mut st.durable.table_dirty);
    let table = &st.durable.table;
    write_pages(
        storage,
        stats,
        st.header.region(Region::Table),
        table_pages,
        |s, l| table_bytes(table, s, l),
    )
    .await?;
    flush_storage(storage, stats).await?;
    let bitmap_pages = std::mem::take(&mut st.durable.bitmap_dirty);
    let bm = &st.durable.bitmap;
    write_pages(
        storage,
        stats,
        st.header.region(Region::Bitmap),
        bitmap_pages,
        |s, l| bm.bytes_range(s, l),
    )
    .await?;
    flush_storage(storage, stats).await?;
    let mut h = st.header.clone();
    h.journal_epoch = h.journal_epoch.wrapping_add(1);
    h.flags |= flags;
    if clean {
        h.flags |= FLAG_CLEAN;
    }
    write_header(st, storage, stats, h).await?;
    flush_storage(storage, stats).await?;
    st.journal_pos = 0;
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Read the valid prefix of the journal of `header`'s epoch.
pub(crate) async fn read_journal(storage: &dyn Storage, header: &Header) -> Result<Replay> {
    let region = header.region(Region::Journal);
    let total = region.length / journal::BLOCK_SIZE as u64;
    let mut records = Vec::new();
    let mut seq = 0u64;
    const BATCH: u64 = 256;
    'outer: while seq < total {
        let n = BATCH.min(total - seq);
        let buf = IoBuf::zeroed((n as usize) * journal::BLOCK_SIZE);
        let buf = storage
            .read_at(region.offset + seq * journal::BLOCK_SIZE as u64, buf)
            .await
            .map_err(|e| Error::io("journal read", e))?;
        for k in 0..n as usize {
            let bytes = &buf[k * journal::BLOCK_SIZE..(k + 1) * journal::BLOCK_SIZE];
            match journal::decode_block(bytes, header.journal_epoch, seq)? {
                Some(b) => records.extend(b.records),
                None => break 'outer,
            }
            seq += 1;
        }
    }
    Ok(Replay {
        blocks: seq,
        records,
    })
}
