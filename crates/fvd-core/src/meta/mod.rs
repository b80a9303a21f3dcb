//! In-memory metadata, the journal writer (group commit) and recovery.
//!
//! # Bitmaps
//! * `local` — the in-memory truth: 1 = the block's current data is in the
//!   image. Copy-on-read fills set it without journaling ("soft" bits).
//! * `hard` — blocks written by the guest whose bit is on disk or queued in
//!   `pending`; a write needs metadata only if it turns a `hard` bit on.
//! * `committed` — exactly what the on-disk bitmap plus the journal say. Only
//!   touched under the commit lock; a checkpoint writes it in place.
//!
//! Invariant: committed ⊆ hard ⊆ local, and every `hard` bit not in
//! `committed` is covered by a record in `pending` or in the round being
//! committed.
//!
//! # Flush ordering (publish after write)
//! A commit round: (1) fdatasync the image, making the data of every write
//! that completed before the round started durable; (2) write the journal
//! blocks holding the records of those writes (and the header with the clean
//! flag cleared, the first time); (3) fdatasync again. So no record is ever
//! durable before the data it points at. A checkpoint writes the committed
//! bitmap in place, fdatasyncs, then writes the header with the next journal
//! epoch and fdatasyncs: old-epoch blocks are ignored only once the bitmap
//! that subsumes them is durable.
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
use crate::format::header::{FLAG_CLEAN, HEADER_SLOT_SIZE, Header, Region};
use crate::format::journal::{self, Record};
use crate::iobuf::IoBuf;
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
    /// Bytes of bitmap written in place (checkpoints).
    pub bitmap_bytes_written: AtomicU64,
    /// Checkpoints (journal recycles and clean closes that wrote metadata).
    pub checkpoints: AtomicU64,
    /// fdatasync calls on the image storage.
    pub storage_flushes: AtomicU64,
    /// Journal records replayed at open.
    pub replayed_records: AtomicU64,
}

impl Stats {
    /// Metadata write operations so far (journal + header + bitmap checkpoints).
    pub fn metadata_writes(&self) -> u64 {
        self.journal_writes.load(Ordering::Relaxed)
            + self.header_writes.load(Ordering::Relaxed)
            + self.checkpoints.load(Ordering::Relaxed)
    }
}

/// The state only a commit round touches.
pub(crate) struct CommitState {
    /// The newest header on disk.
    pub header: Header,
    /// Slot (0 or 1) holding `header`.
    pub slot: usize,
    /// Bitmap as on disk + journal.
    pub committed: AtomicBitmap,
    /// 4 KiB pages of the bitmap region changed since the last checkpoint.
    pub dirty_pages: BTreeSet<u64>,
    /// Next journal block index.
    pub journal_pos: u64,
}

/// Metadata of one open image.
pub(crate) struct Meta {
    pub local: AtomicBitmap,
    pub hard: AtomicBitmap,
    pending: Mutex<Vec<Record>>,
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
    pub fn new(header: Header, slot: usize, bitmap: AtomicBitmap) -> Self {
        let bits = bitmap.len();
        let local = AtomicBitmap::new(bits);
        local.copy_from(&bitmap);
        let hard = AtomicBitmap::new(bits);
        hard.copy_from(&bitmap);
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
                committed: bitmap,
                dirty_pages: BTreeSet::new(),
                journal_pos: 0,
            }),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Note that a data write completed (the next flush must fdatasync).
    pub fn mark_data_dirty(&self) {
        self.data_dirty.store(true, Ordering::Release);
    }

    /// After a guest write of blocks `r` completed: set their bits and queue
    /// records for those that were not yet hard.
    pub fn publish_hard(&self, r: Range<u64>) {
        let mut run_start: Option<u64> = None;
        let mut new_runs = Vec::new();
        for b in r.clone() {
            self.local.set(b);
            let was = self.hard.set(b);
            match (was, run_start) {
                (false, None) => run_start = Some(b),
                (true, Some(s)) => {
                    new_runs.push((s, b));
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            new_runs.push((s, r.end));
        }
        if !new_runs.is_empty() {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (s, e) in new_runs {
                push_set_bits(&mut p, s, e);
            }
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

    fn poison<T>(&self, e: Error) -> Result<T> {
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
        let records = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        if records.is_empty() && !dirty {
            self.rounds_done.store(round, Ordering::SeqCst);
            return Ok(());
        }
        if let Err(e) = flush_storage(storage, stats).await {
            return self.poison(e);
        }
        if !records.is_empty() {
            let r = self.write_records(&mut st, storage, stats, &records).await;
            if let Err(e) = r {
                return self.poison(e);
            }
        }
        self.rounds_done.store(round, Ordering::SeqCst);
        Ok(())
    }

    async fn write_records(
        &self,
        st: &mut CommitState,
        storage: &dyn Storage,
        stats: &Stats,
        records: &[Record],
    ) -> Result<()> {
        let blocks = journal::pack(records);
        let capacity = st.header.region(Region::Journal).length / journal::BLOCK_SIZE as u64;
        for r in records {
            apply(&st.committed, r, &mut st.dirty_pages)?;
        }
        if st.journal_pos + blocks.len() as u64 > capacity {
            // Journal full: write the whole committed bitmap in place instead.
            return checkpoint(st, storage, stats, false).await;
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
        if st.header.is_clean() {
            // First metadata change since open: the header must say "replay the
            // journal" no later than the journal blocks are durable.
            let mut h = st.header.clone();
            h.flags &= !FLAG_CLEAN;
            write_header(st, storage, stats, h).await?;
        }
        flush_storage(storage, stats).await
    }

    /// Flush, then (if metadata changed since open) checkpoint and set the clean flag.
    pub async fn close(&self, storage: &dyn Storage, stats: &Stats) -> Result<()> {
        self.commit(storage, stats).await?;
        let mut st = self.commit.lock().await;
        // Soft bits (copy-on-read fills) become permanent at a clean close,
        // once the data they point at is durable.
        let mut promoted = Vec::new();
        for (s, e, local) in self.local.runs(0..self.local.len()) {
            if !local {
                continue;
            }
            for (a, b, committed) in st.committed.runs(s..e) {
                if !committed {
                    push_set_bits(&mut promoted, a, b);
                }
            }
        }
        if !promoted.is_empty() {
            if let Err(e) = flush_storage(storage, stats).await {
                return self.poison(e);
            }
            let CommitState {
                committed,
                dirty_pages,
                ..
            } = &mut *st;
            for r in &promoted {
                apply(committed, r, dirty_pages)?;
                apply(&self.hard, r, &mut BTreeSet::new())?;
            }
        }
        if !st.header.is_clean() || !promoted.is_empty() {
            if let Err(e) = checkpoint(&mut st, storage, stats, true).await {
                return self.poison(e);
            }
        }
        Ok(())
    }
}

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

/// Apply one record to a bitmap, noting the dirty pages of the bitmap region.
pub(crate) fn apply(bm: &AtomicBitmap, r: &Record, dirty: &mut BTreeSet<u64>) -> Result<()> {
    match r {
        Record::SetBits { first, count } | Record::ClearBits { first, count } => {
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
            let first_page = first / 8 / 4096;
            let last_page = (end - 1) / 8 / 4096;
            dirty.extend(first_page..=last_page);
            Ok(())
        }
        Record::Table { .. } => Err(Error::new(
            ErrorKind::Unsupported,
            "journal holds chunk-table records but this image has no chunk table",
        )),
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

/// Write the committed bitmap in place and start a new journal epoch.
pub(crate) async fn checkpoint(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    clean: bool,
) -> Result<()> {
    flush_storage(storage, stats).await?;
    let region = st.header.region(Region::Bitmap);
    let pages: Vec<u64> = std::mem::take(&mut st.dirty_pages).into_iter().collect();
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
            let bytes = st.committed.bytes_range(start as usize, len as usize);
            storage
                .write_at(region.offset + start, IoBuf::from_slice(&bytes), false)
                .await
                .map_err(|e| Error::io("bitmap write", e))?;
            stats.bitmap_bytes_written.fetch_add(len, Ordering::Relaxed);
        }
        i = j;
    }
    flush_storage(storage, stats).await?;
    let mut h = st.header.clone();
    h.journal_epoch = h.journal_epoch.wrapping_add(1);
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
