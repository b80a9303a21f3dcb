//! Commit rounds (group commit), confirmations, checkpoints, close.
//!
//! # Flush ordering (one fdatasync per flush)
//! A commit round makes durable every write that completed before it
//! started. In the common case it is **one** fdatasync:
//!
//! 1. write the journal blocks holding the queued records — bits of
//!    copy-on-write blocks as `SET_BITS_CHECKED` records carrying each
//!    block's CRC-32C, table entries of chunks whose old content reads as
//!    zeros — each block saying which earlier blocks are *confirmed*
//!    (`confirmed` = the journal position when the round started: their
//!    rounds completed, so their data was durable before this block was
//!    written);
//! 2. fdatasync: data and journal become durable together.
//!
//! Nothing orders the journal before the data inside that fdatasync, so
//! after a crash a record may be durable while its data is not: replay sets
//! the bit of an unconfirmed checked record only if the block's data has
//! the record's CRC, else the block reads from the base — a legal outcome,
//! since the round never completed (replay.rs). A record of a completed
//! round stays unconfirmed until a later round's journal block is durable;
//! until then its block is *unsettled* and never rewritten in place (the
//! rewrite first runs a confirming round, `Meta::confirm`): a torn rewrite
//! would fail the CRC check and lose a flushed write.
//!
//! A round is **ordered** (two fdatasyncs: data first, then the journal,
//! whose blocks then confirm themselves) when a record cannot be checked —
//! a plain `SET_BITS` of written data, a stale CRC (the block was rewritten
//! while its record was queued), a chunk whose old content may not read as
//! zeros — or when its checked data is large (replay would read it all),
//! and always for the first round after the image was clean: that round
//! writes the header with `CLEAN` cleared (and `CHECKSUMMED_JOURNAL` set),
//! which must be durable before any journal block of the epoch, and the
//! fdatasync after the header covers the data too. A round with only data
//! is one fdatasync and writes no journal block, unless records of an
//! earlier round still wait for confirmation: then an empty journal block
//! confirms them at no extra fdatasync.
//!
//! # Early journal blocks (flush-per-write)
//! A round's journal write and its fdatasync are two device round trips in
//! a row (with `O_DIRECT`, the journal write is one whole write latency).
//! When the flushes come close together (`EarlyJournal::Auto`: the last
//! round took at most `EARLY_MAX_GROUPS` groups, and fewer early blocks
//! than that were written since it), a copy-on-write of whole
//! blocks journals its own `SET_BITS_CHECKED` record in an *early block*,
//! written concurrently with its data (`Meta::write_early`); the round then
//! has nothing to write and is one fdatasync. The rules:
//!
//! * The writer holds the commit lock from before the early block until its
//!   bits are published: no round runs in between, so the round after it
//!   takes the group (marked `early`) and its fdatasync makes the data
//!   durable.
//! * Every journal block's `confirmed` is `synced_pos`, the journal position
//!   at the end of the last completed round — never an early block whose
//!   data may not be durable yet (the mutation `ConfirmUnsynced` breaks
//!   this rule; the simulator catches it). Ordered rounds and checkpoints
//!   flush first, so their blocks still confirm everything before them.
//! * A round that took early groups confirms the earlier rounds' records
//!   without a journal block of its own: the early block said so, and it is
//!   durable once the round's fdatasync completed.
//! * A rewrite before the flush makes the early group's CRC stale: the round
//!   writes its records again, ordered (as for any stale record).
//! * A data write that fails under a written early block queues a
//!   `CLEAR_BITS` record: replay applies it after the early block, so no
//!   later confirmation can set the bit of data never written.
//!
//! Failures: a failed fdatasync poisons the image (the kernel may have
//! dropped dirty pages); a failed journal or header write does not (nothing
//! was promised): its records go back to the queue and the error (ENOSPC,
//! EIO) goes to the flusher. A checkpoint whose page or header write fails
//! leaves `checkpoint_needed` set, so no later round completes before a
//! checkpoint does.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{CommitState, Group, Meta, Stats};
use crate::error::{Error, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{
    FLAG_ALL_LOCAL, FLAG_CLEAN, HEADER_SLOT_SIZE, Header, INCOMPAT_CHECKSUMMED_JOURNAL, Region,
};
use crate::format::journal::{self, Record};
use crate::iobuf::IoBuf;
use crate::storage::Storage;

/// Above this many bytes of checked data a round is ordered: replay would
/// have to read them all back to check them.
const MAX_CHECKED_BYTES: u64 = 64 << 20;

/// A round's failure: fatal (an fdatasync failed: poison) or not.
pub(crate) enum Failure {
    Fatal(Error),
    Retry(Error),
}

/// The records a round took from the queue.
struct Taken {
    groups: Vec<Group>,
    /// Blocks of checked records, for settling.
    checked: Vec<Range<u64>>,
    ordered: bool,
    /// Some group's records are in an early journal block (not stale).
    early: bool,
}

/// Which checked records a completed round confirmed.
enum Confirmed {
    /// None (the round wrote no journal block).
    Nothing,
    /// Those of earlier rounds (its journal blocks say so).
    Earlier,
    /// Those of earlier rounds and its own (ordered round, checkpoint).
    All,
}

impl Meta {
    /// Make every write completed before this call durable, with group commit.
    pub async fn commit(&self, storage: &dyn Storage, stats: &Stats) -> Result<()> {
        self.check_poisoned()?;
        let need = self.rounds_started.load(Ordering::SeqCst) + 1;
        let mut st = self.commit.lock().await;
        self.check_poisoned()?;
        if self.rounds_done.load(Ordering::SeqCst) >= need && !st.checkpoint_needed {
            return Ok(());
        }
        self.round(&mut st, storage, stats, false).await
    }

    /// Run a round that writes a journal block even with nothing queued,
    /// unless no block of `blocks` waits for a confirmation any more.
    pub(super) async fn confirm(
        &self,
        storage: &dyn Storage,
        stats: &Stats,
        blocks: Range<u64>,
    ) -> Result<()> {
        self.check_poisoned()?;
        let mut st = self.commit.lock().await;
        self.check_poisoned()?;
        if self.settled(blocks) {
            return Ok(());
        }
        stats.confirm_rounds.fetch_add(1, Ordering::Relaxed);
        self.round(&mut st, storage, stats, true).await
    }

    /// Take the queued groups for round `round`: checked records of blocks
    /// rewritten since they were queued make the round ordered.
    fn take(&self, round: u64, all_local: bool) -> Taken {
        let mut p = self.lock_pending();
        let mut groups = std::mem::take(&mut *p);
        let mut t = Taken {
            groups: Vec::new(),
            checked: Vec::new(),
            ordered: false,
            early: false,
        };
        for g in &mut groups {
            for r in &g.records {
                if let Record::SetBitsChecked { .. } = r {
                    let b = r.blocks();
                    if !self.stale.none_set(b.clone()) {
                        g.ordered = true;
                        self.stale.clear_range(b.clone());
                    }
                    self.queued.clear_range(b.clone());
                    t.checked.push(b);
                }
            }
            t.ordered |= g.ordered;
            t.early |= g.early && !g.ordered;
        }
        drop(p);
        if all_local {
            // The base is detached and the durable bitmap gone: bits mean
            // nothing any more, but a write that mapped its blocks before the
            // detach may still publish some. Only table records remain.
            for g in &mut groups {
                g.records.retain(|r| matches!(r, Record::Table { .. }));
            }
            groups.retain(|g| !g.records.is_empty());
            self.settle_ranges(&std::mem::take(&mut t.checked));
        }
        t.groups = groups;
        if !t.checked.is_empty() {
            self.settling
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((round, t.checked.clone()));
        }
        t
    }

    /// Put the groups of a failed round back at the head of the queue.
    fn untake(&self, round: u64, t: Taken) {
        let mut p = self.lock_pending();
        for r in &t.checked {
            self.queued.set_range(r.clone());
        }
        let later = std::mem::take(&mut *p);
        *p = t.groups;
        p.extend(later);
        drop(p);
        self.settling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(r, _)| *r != round);
    }

    /// Records of rounds before `round` (through it with `inclusive`) are
    /// confirmed durably: their blocks may be rewritten in place.
    fn settle_before(&self, round: u64, inclusive: bool) {
        let mut s = self.settling.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((r, _)) = s.front() {
            if *r < round || (inclusive && *r == round) {
                let (_, ranges) = s.pop_front().expect("front exists");
                self.settle_ranges(&ranges);
            } else {
                break;
            }
        }
    }

    fn settle_ranges(&self, ranges: &[Range<u64>]) {
        for r in ranges {
            self.unsettled.clear_range(r.clone());
        }
    }

    /// True if records of a completed round wait for a confirmation.
    fn unconfirmed_rounds(&self) -> bool {
        !self
            .settling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// One commit round, commit lock held. `force`: write a journal block
    /// even with nothing queued (a confirmation).
    async fn round(
        &self,
        st: &mut CommitState,
        storage: &dyn Storage,
        stats: &Stats,
        force: bool,
    ) -> Result<()> {
        let round = self.rounds_started.fetch_add(1, Ordering::SeqCst) + 1;
        let all_local = st.header.flags & FLAG_ALL_LOCAL != 0;
        let earlier_unconfirmed = self.unconfirmed_rounds();
        st.early_since_round = 0;
        let t = self.take(round, all_local);
        if !t.groups.is_empty() {
            self.last_round_groups
                .store(t.groups.len() as u64, Ordering::Relaxed);
        }
        // An early block taken here confirms the earlier rounds by itself.
        let confirm = !all_local && (force || (earlier_unconfirmed && !t.early));
        let dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        if t.groups.is_empty() && !dirty && !confirm && !st.checkpoint_needed {
            self.rounds_done.store(round, Ordering::SeqCst);
            return Ok(());
        }
        match self.run_round(st, storage, stats, &t, confirm).await {
            Ok(confirmed) => {
                match confirmed {
                    Confirmed::Nothing => {}
                    Confirmed::Earlier => self.settle_before(round, false),
                    Confirmed::All => self.settle_before(round, true),
                }
                self.rounds_done.store(round, Ordering::SeqCst);
                Ok(())
            }
            Err(Failure::Retry(e)) => {
                if dirty {
                    self.mark_data_dirty();
                }
                if !st.checkpoint_needed || t.groups.is_empty() {
                    self.untake(round, t);
                }
                Err(e)
            }
            Err(Failure::Fatal(e)) => self.poison(e),
        }
    }

    /// The I/O of a round: which checked records it confirmed.
    async fn run_round(
        &self,
        st: &mut CommitState,
        storage: &dyn Storage,
        stats: &Stats,
        t: &Taken,
        confirm: bool,
    ) -> std::result::Result<Confirmed, Failure> {
        let fatal = Failure::Fatal;
        // Early groups are in the journal already, unless stale (ordered).
        let groups: Vec<Vec<Record>> = t
            .groups
            .iter()
            .filter(|g| !g.early || g.ordered)
            .map(|g| g.records.clone())
            .collect();
        let records = groups.iter().any(|g| !g.is_empty());
        if !records && !confirm && !st.checkpoint_needed {
            // Data only: one fdatasync, no journal block.
            flush_storage(storage, stats).await.map_err(fatal)?;
            st.synced_pos = st.journal_pos;
            return Ok(if t.early {
                Confirmed::Earlier
            } else {
                Confirmed::Nothing
            });
        }
        let blocks = if records {
            journal::pack_groups(&groups)
        } else {
            vec![Vec::new()]
        };
        let capacity = (st.header.region(Region::Journal).length / journal::BLOCK_SIZE as u64)
            .min(u32::MAX as u64 - 1);
        if st.checkpoint_needed || st.journal_pos + blocks.len() as u64 > capacity {
            // Journal full: write the whole durable metadata in place instead.
            for r in groups.iter().flatten() {
                st.durable.apply(r).map_err(fatal)?;
            }
            st.checkpoint_needed = true;
            checkpoint(st, storage, stats, false).await?;
            st.checkpoint_needed = false;
            return Ok(Confirmed::All);
        }
        // Ordered: the data is durable before any journal block is written.
        let checked_blocks: u64 = t.checked.iter().map(|r| r.end - r.start).sum();
        let mut ordered = t.ordered
            || checked_blocks.saturating_mul(st.header.block_size as u64) > MAX_CHECKED_BYTES;
        if st.header.is_clean() || st.header.incompatible & INCOMPAT_CHECKSUMMED_JOURNAL == 0 {
            // First metadata change since the image was clean: the header must
            // say "replay the journal" durably before any journal block of this
            // epoch is written. Otherwise a crash could keep blocks but not the
            // header, and a later session at the same epoch, writing fewer
            // blocks from 0, would replay them as its own (stale records).
            let mut h = st.header.clone();
            h.flags &= !FLAG_CLEAN;
            h.incompatible |= INCOMPAT_CHECKSUMMED_JOURNAL;
            write_header(st, storage, stats, h)
                .await
                .map_err(Failure::Retry)?;
            flush_storage(storage, stats).await.map_err(fatal)?;
            // That fdatasync made the round's data durable too.
            ordered = true;
        } else if ordered {
            flush_storage(storage, stats).await.map_err(fatal)?;
        }
        let mut buf = IoBuf::zeroed(blocks.len() * journal::BLOCK_SIZE);
        for (i, recs) in blocks.iter().enumerate() {
            let seq = st.journal_pos + i as u64;
            // Ordered: this block's own records are confirmed by itself.
            let confirmed = if ordered {
                seq + 1
            } else {
                self.confirmed_pos(st)
            };
            let b = journal::encode_block(st.header.journal_epoch, seq, confirmed as u32, recs);
            buf[i * journal::BLOCK_SIZE..(i + 1) * journal::BLOCK_SIZE].copy_from_slice(&b);
        }
        let off =
            st.header.region(Region::Journal).offset + st.journal_pos * journal::BLOCK_SIZE as u64;
        storage
            .write_at(off, buf, false)
            .await
            .map_err(|e| Failure::Retry(Error::io("journal write", e)))?;
        stats.journal_writes.fetch_add(1, Ordering::Relaxed);
        stats
            .journal_blocks
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        stats.commit_rounds.fetch_add(1, Ordering::Relaxed);
        if ordered {
            stats.ordered_rounds.fetch_add(1, Ordering::Relaxed);
        }
        st.journal_pos += blocks.len() as u64;
        for r in groups.iter().flatten() {
            st.durable.apply(r).map_err(fatal)?;
        }
        flush_storage(storage, stats).await.map_err(fatal)?;
        st.synced_pos = st.journal_pos;
        Ok(if ordered {
            Confirmed::All
        } else {
            Confirmed::Earlier
        })
    }

    /// What a journal block written now may say is confirmed.
    fn confirmed_pos(&self, st: &CommitState) -> u64 {
        if self.mutation() == super::Mutation::ConfirmUnsynced as u8 {
            st.journal_pos
        } else {
            st.synced_pos
        }
    }

    /// The commit lock, if a write may journal its bits early now (see
    /// "Early journal blocks"): never waits for it.
    pub(crate) fn early_journal(&self) -> Option<tokio::sync::MutexGuard<'_, CommitState>> {
        let policy = self.early_policy.load(Ordering::Relaxed);
        let auto = policy == super::EarlyJournal::Auto as u8;
        let wanted = policy == super::EarlyJournal::Always as u8
            || (auto && self.last_round_groups.load(Ordering::Relaxed) <= super::EARLY_MAX_GROUPS);
        if !wanted || !self.checked || self.is_poisoned() {
            return None;
        }
        let st = self.commit.try_lock().ok()?;
        // Writes without flushes between them: their bits share a round.
        if auto && st.early_since_round >= super::EARLY_MAX_GROUPS {
            return None;
        }
        let capacity = st.header.region(Region::Journal).length / journal::BLOCK_SIZE as u64;
        // The first round after a clean open writes the header first.
        let ok = !st.header.is_clean()
            && st.header.incompatible & INCOMPAT_CHECKSUMMED_JOURNAL != 0
            && st.header.flags & FLAG_ALL_LOCAL == 0
            && !st.checkpoint_needed
            && st.journal_pos + 2 <= capacity;
        ok.then_some(st)
    }

    /// Write `records` (checked bits of a write in flight) in an early
    /// journal block, commit lock held (from [`Meta::early_journal`]). No
    /// fdatasync: the next round's makes it durable with the data.
    pub(crate) async fn write_early(
        &self,
        st: &mut CommitState,
        storage: &dyn Storage,
        stats: &Stats,
        records: &[Record],
    ) -> Result<()> {
        let block = journal::encode_block(
            st.header.journal_epoch,
            st.journal_pos,
            self.confirmed_pos(st) as u32,
            records,
        );
        let off =
            st.header.region(Region::Journal).offset + st.journal_pos * journal::BLOCK_SIZE as u64;
        storage
            .write_at(off, IoBuf::from_slice(&block), false)
            .await
            .map_err(|e| Error::io("journal write", e))?;
        stats.journal_writes.fetch_add(1, Ordering::Relaxed);
        stats.journal_blocks.fetch_add(1, Ordering::Relaxed);
        stats.early_blocks.fetch_add(1, Ordering::Relaxed);
        st.journal_pos += 1;
        st.early_since_round += 1;
        for r in records {
            st.durable.apply(r)?;
        }
        Ok(())
    }

    /// Detach the base (every block is local): a checkpoint whose header
    /// carries the all-local flag — not just a new header, since the new
    /// epoch ends the old journal, whose chunk-table records (compact
    /// images) must be in place first. The durable bitmap is gone after it.
    /// A failure poisons the image.
    pub async fn detach_base(&self, storage: &dyn Storage, stats: &Stats) -> Result<()> {
        let mut st = self.commit.lock().await;
        self.check_poisoned()?;
        if let Err(e) = checkpoint_with_flags(&mut st, storage, stats, false, FLAG_ALL_LOCAL).await
        {
            return self.poison(e.into_error());
        }
        st.durable.bitmap = AtomicBitmap::new(0);
        st.durable.bitmap_dirty.clear();
        self.settle_before(u64::MAX, true);
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
                    super::push_set_bits(&mut promoted, a, b);
                }
            }
        }
        if !promoted.is_empty() {
            if let Err(e) = flush_storage(storage, stats).await {
                return self.poison(e);
            }
            for r in &promoted {
                st.durable.apply(r)?;
                self.hard.set_range(r.blocks());
            }
        }
        if !st.header.is_clean() || !promoted.is_empty() || st.checkpoint_needed {
            match checkpoint(&mut st, storage, stats, true).await {
                Ok(()) => st.checkpoint_needed = false,
                Err(Failure::Retry(e)) => {
                    st.checkpoint_needed = true;
                    return Err(e);
                }
                Err(Failure::Fatal(e)) => return self.poison(e),
            }
        }
        self.settle_before(u64::MAX, true);
        Ok(())
    }
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Fatal(e) | Failure::Retry(e) => e,
        }
    }
}

pub(crate) async fn flush_storage(storage: &dyn Storage, stats: &Stats) -> Result<()> {
    stats.storage_flushes.fetch_add(1, Ordering::Relaxed);
    storage.flush().await.map_err(|e| Error::io("fdatasync", e))
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
    pages: &std::collections::BTreeSet<u64>,
    bytes_of: impl Fn(usize, usize) -> Vec<u8>,
) -> Result<()> {
    let pages: Vec<u64> = pages.iter().copied().collect();
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

/// Write the durable bitmap and table in place and start a new journal
/// epoch (with `clean`: the clean flag, and no `CHECKSUMMED_JOURNAL`).
pub(crate) async fn checkpoint(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    clean: bool,
) -> std::result::Result<(), Failure> {
    checkpoint_with_flags(st, storage, stats, clean, 0).await
}

/// [`checkpoint`], setting `flags` in the new header too. The dirty page
/// sets are cleared only once the checkpoint completed, so a failed one
/// can be retried.
async fn checkpoint_with_flags(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    clean: bool,
    flags: u64,
) -> std::result::Result<(), Failure> {
    let fatal = Failure::Fatal;
    let retry = Failure::Retry;
    flush_storage(storage, stats).await.map_err(fatal)?;
    // Table pages first, made durable before any bitmap page: the records of
    // a round that overflowed the journal live only here, and a bit durable
    // without its chunk's table entry would make the block read zeros.
    let table = &st.durable.table;
    write_pages(
        storage,
        stats,
        st.header.region(Region::Table),
        &st.durable.table_dirty,
        |s, l| table_bytes(table, s, l),
    )
    .await
    .map_err(retry)?;
    flush_storage(storage, stats).await.map_err(fatal)?;
    st.durable.table_dirty.clear();
    let bm = &st.durable.bitmap;
    write_pages(
        storage,
        stats,
        st.header.region(Region::Bitmap),
        &st.durable.bitmap_dirty,
        |s, l| bm.bytes_range(s, l),
    )
    .await
    .map_err(retry)?;
    flush_storage(storage, stats).await.map_err(fatal)?;
    st.durable.bitmap_dirty.clear();
    let mut h = st.header.clone();
    h.journal_epoch = h.journal_epoch.wrapping_add(1);
    h.flags |= flags;
    if clean {
        h.flags |= FLAG_CLEAN;
        h.incompatible &= !INCOMPAT_CHECKSUMMED_JOURNAL;
    }
    write_header(st, storage, stats, h).await.map_err(retry)?;
    flush_storage(storage, stats).await.map_err(fatal)?;
    st.journal_pos = 0;
    st.synced_pos = 0;
    stats.checkpoints.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// A checkpoint for callers outside a round (open after replay): errors as
/// plain errors.
pub(crate) async fn checkpoint_now(
    st: &mut CommitState,
    storage: &dyn Storage,
    stats: &Stats,
    clean: bool,
) -> Result<()> {
    checkpoint(st, storage, stats, clean)
        .await
        .map_err(Failure::into_error)
}
