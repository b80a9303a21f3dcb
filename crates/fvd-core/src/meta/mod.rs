//! In-memory metadata, the journal writer (group commit) and recovery.
//!
//! # Bitmaps
//! * `local` — the in-memory truth: 1 = the block's current data is in the
//!   image. Copy-on-read fills set it without journaling ("soft" bits).
//! * `hard` — blocks written by the guest whose bit is on disk or queued in
//!   `pending`; a write needs metadata only if it turns a `hard` bit on.
//! * `durable.bitmap` — exactly what the on-disk bitmap plus the journal
//!   say. Only touched under the commit lock; a checkpoint writes it in place.
//! * `unsettled` — blocks whose `SET_BITS_CHECKED` record is not yet
//!   *confirmed* durably: replay after a crash would still check the
//!   block's data against the record's CRC, so the block must not be
//!   rewritten in place (a torn rewrite would fail the check and lose a
//!   flushed write). `queued` marks those whose record is still in
//!   `pending`, `stale` those of them rewritten since (their CRC no longer
//!   describes the data; the round that takes them makes the data durable
//!   before writing the record).
//!
//! Invariant: durable ⊆ hard ⊆ local, unsettled ⊆ hard, stale ⊆ queued ⊆
//! unsettled, and every `hard` bit not durable is covered by a record in
//! `pending` or in the round being committed. The chunk table of compact
//! images follows the same rule: the in-memory table (in `image::compact`)
//! runs ahead of `durable.table` by the records in `pending`.
//!
//! # Record groups
//! `pending` holds groups of records that must become durable together (the
//! table entries of newly allocated chunks and the bits of the blocks written
//! into them). A group never spans two journal blocks, so a torn journal
//! write can never leave a bit durable without its chunk. A group is
//! *ordered* when some record of it describes data the journal cannot check
//! (a plain `SET_BITS` of written data, a chunk whose old content may not
//! read as zeros): the round that takes it makes the data durable before it
//! writes the journal (`commit.rs`).
//!
//! # Lock order
//! `Meta::commit` (async mutex) → `Meta::pending` (std mutex, never held across
//! an await). The range locks of the image are always taken before `commit`
//! and never while holding it.

use std::collections::{BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{Header, INCOMPAT_ENCRYPTED};
use crate::format::journal::{self, Record};
use crate::latency::{InFlight, LatencyHistogram};
use crate::storage::Storage;

mod commit;
mod replay;

pub(crate) use commit::{checkpoint_now, flush_storage, table_bytes, write_header};
pub(crate) use replay::{
    Replayed, SlotDamage, header_in_force, inspect_header, read_journal, replay,
};

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
    /// Commit rounds that wrote journal blocks.
    pub commit_rounds: AtomicU64,
    /// Of those, rounds that made the data durable before the journal
    /// (two fdatasyncs: a record without a checksum, a stale checksum, the
    /// first round after a clean open).
    pub ordered_rounds: AtomicU64,
    /// Rounds run only to confirm records before a rewrite in place.
    pub confirm_rounds: AtomicU64,
    /// Early journal blocks: written by a write alongside its data.
    pub early_blocks: AtomicU64,
    /// Journal records replayed at open.
    pub replayed_records: AtomicU64,
    /// Checked bits replay dropped because their block's data did not match.
    pub replay_dropped: AtomicU64,
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
    /// Bytes fetched from the base for prefetch and dropped, not written,
    /// because a guest request arrived while the fetch was under way.
    pub prefetch_dropped_bytes: AtomicU64,
    /// Guest reads of base data answered from a copy-on-read fill still in
    /// flight (instead of fetching the same blocks from the base again).
    pub cor_pending_hits: AtomicU64,
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

/// A deliberate break of the commit protocol, for the simulator's mutation
/// checks only: each must make the simulator report violations.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Mutation {
    /// The protocol as designed.
    #[default]
    None = 0,
    /// Rewrite blocks in place while their checked record is unconfirmed
    /// (no confirmation round first).
    SkipConfirmation = 1,
    /// Rewrite blocks whose checked record is still queued without marking
    /// its CRC stale.
    SkipStale = 2,
    /// Let journal blocks confirm early-journaled blocks written since the
    /// last completed round (whose data is not durable yet).
    ConfirmUnsynced = 3,
}

/// When a write journals its bits itself, alongside its data (see
/// `commit.rs`, "Early journal blocks").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum EarlyJournal {
    /// When the flushes come close together (the last round took at most
    /// [`EARLY_MAX_GROUPS`] groups, and at most that many early blocks
    /// were written since it): the flush-per-write pattern.
    #[default]
    Auto = 0,
    /// Whenever the protocol allows it (simulator, tests).
    Always = 1,
    /// Never: bits wait for the next commit round.
    Never = 2,
}

/// Early journal blocks pay off only when a flush follows a few writes:
/// each costs a journal block that a round would have shared.
pub const EARLY_MAX_GROUPS: u64 = 2;

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

    /// Apply one record (replay, or a record being committed), checked
    /// records unconditionally.
    pub fn apply(&mut self, r: &Record) -> Result<()> {
        self.apply_with(r, |_| true)
    }

    /// Apply one record; a checked record sets only the bits `keep` accepts.
    pub fn apply_with(&mut self, r: &Record, mut keep: impl FnMut(u64) -> bool) -> Result<()> {
        match r {
            Record::SetBits { .. } | Record::ClearBits { .. } | Record::SetBitsChecked { .. } => {
                let bm = &self.bitmap;
                let blocks = r.blocks();
                let (first, count) = (blocks.start, blocks.end - blocks.start);
                if blocks.end > bm.len() || blocks.end < first {
                    return Err(Error::corrupt(format!(
                        "journal record for blocks {first}..+{count} lies outside the bitmap ({} blocks)",
                        bm.len()
                    )));
                }
                match r {
                    Record::SetBits { .. } => bm.set_range(blocks.clone()),
                    Record::ClearBits { .. } => bm.clear_range(blocks.clone()),
                    _ => {
                        for b in blocks.clone() {
                            if keep(b) {
                                bm.set(b);
                            }
                        }
                    }
                }
                if count > 0 {
                    self.bitmap_dirty
                        .extend(first / 8 / 4096..=(blocks.end - 1) / 8 / 4096);
                }
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
    /// Journal blocks before this one were written before the last
    /// completed round's final fdatasync, and their records' data was
    /// durable by then: a new block may say they are confirmed. Blocks
    /// from here to `journal_pos` are early blocks (their data not durable).
    pub synced_pos: u64,
    /// Early blocks written since the last round started.
    pub early_since_round: u64,
    /// A checkpoint failed after it had applied records to `durable` that
    /// no journal block holds: the next round must checkpoint.
    pub checkpoint_needed: bool,
}

/// A group of records that must become durable together.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub records: Vec<Record>,
    /// Some record describes data the journal cannot check: the round must
    /// make the data durable before it writes the journal.
    pub ordered: bool,
    /// The records are already in an early journal block: the round only
    /// makes their data durable (unless a rewrite made them stale).
    pub early: bool,
}

impl Group {
    fn is_bits_only(&self) -> bool {
        // A group is bits-only exactly when its first record is (table
        // records come first).
        matches!(
            self.records.first(),
            Some(Record::SetBits { .. } | Record::SetBitsChecked { .. })
        )
    }
}

/// What proves a block's data when its bit is journaled.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Proof<'a> {
    /// The CRC-32C of each block of the range as written (`None` where the
    /// write did not hold the whole block).
    Crcs(&'a [Option<u32>]),
    /// The blocks read zeros whatever the storage holds (their chunks are
    /// unmapped in the same group): nothing to check.
    Unmapped,
}

/// Metadata of one open image.
pub(crate) struct Meta {
    pub local: AtomicBitmap,
    pub hard: AtomicBitmap,
    unsettled: AtomicBitmap,
    queued: AtomicBitmap,
    stale: AtomicBitmap,
    pending: Mutex<Vec<Group>>,
    /// Blocks of checked records taken by commit rounds, by round, until
    /// a later journal block confirms them (oldest first).
    settling: Mutex<VecDeque<(u64, Vec<Range<u64>>)>>,
    data_dirty: AtomicBool,
    rounds_started: AtomicU64,
    rounds_done: AtomicU64,
    pub commit: tokio::sync::Mutex<CommitState>,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    mutation: AtomicU8,
    /// Bits may be journaled as `SET_BITS_CHECKED`. Not in encrypted
    /// images: the CRCs come from the guest's plaintext while replay reads
    /// the ciphertext on disk (and may run without the key), so their
    /// records are plain `SET_BITS` in ordered rounds.
    checked: bool,
    early_policy: AtomicU8,
    /// Groups the last round with records took (`u64::MAX` before one).
    last_round_groups: AtomicU64,
}

/// Records per bits-only group (about one journal block's worth).
const MAX_BITS_GROUP: usize = journal::PAYLOAD / 16;

impl Meta {
    pub fn new(header: Header, slot: usize, durable: Durable) -> Self {
        let checked = header.incompatible & INCOMPAT_ENCRYPTED == 0;
        let bits = durable.bitmap.len();
        let local = AtomicBitmap::new(bits);
        local.copy_from(&durable.bitmap);
        let hard = AtomicBitmap::new(bits);
        hard.copy_from(&durable.bitmap);
        Meta {
            local,
            hard,
            unsettled: AtomicBitmap::new(bits),
            queued: AtomicBitmap::new(bits),
            stale: AtomicBitmap::new(bits),
            pending: Mutex::new(Vec::new()),
            settling: Mutex::new(VecDeque::new()),
            data_dirty: AtomicBool::new(false),
            rounds_started: AtomicU64::new(0),
            rounds_done: AtomicU64::new(0),
            commit: tokio::sync::Mutex::new(CommitState {
                header,
                slot,
                durable,
                journal_pos: 0,
                synced_pos: 0,
                early_since_round: 0,
                checkpoint_needed: false,
            }),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            mutation: AtomicU8::new(Mutation::None as u8),
            checked,
            early_policy: AtomicU8::new(EarlyJournal::Auto as u8),
            last_round_groups: AtomicU64::new(u64::MAX),
        }
    }

    /// Break the protocol on purpose (simulator mutation checks).
    pub fn set_mutation(&self, m: Mutation) {
        self.mutation.store(m as u8, Ordering::Relaxed);
    }

    /// Choose when writes journal their bits early.
    pub fn set_early_journal(&self, p: EarlyJournal) {
        self.early_policy.store(p as u8, Ordering::Relaxed);
    }

    fn mutation(&self) -> u8 {
        self.mutation.load(Ordering::Relaxed)
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

    /// True if no block of `blocks` waits for a confirmation: a write may
    /// rewrite them in place.
    pub fn settled(&self, blocks: Range<u64>) -> bool {
        self.unsettled.none_set(blocks) || self.mutation() == Mutation::SkipConfirmation as u8
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<Group>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set `local` and `hard` for blocks `r`; the blocks that were not yet
    /// hard become records (checked where `proof` has a CRC). Returns the
    /// records and whether one of them cannot be checked.
    fn harden(&self, r: Range<u64>, proof: Proof<'_>) -> (Vec<Record>, bool) {
        let mut out = Vec::new();
        let mut ordered = false;
        for b in r.clone() {
            self.local.set(b);
            // Publishers of a block hold its range lock: nobody else turns
            // this bit on meanwhile.
            if self.hard.get(b) {
                continue;
            }
            let crc = match proof {
                Proof::Crcs(c) if self.checked => c.get((b - r.start) as usize).copied().flatten(),
                Proof::Crcs(_) | Proof::Unmapped => None,
            };
            match crc {
                Some(crc) => {
                    // Unsettled before hard: a direct writer that sees the
                    // hard bit also sees this one.
                    self.unsettled.set(b);
                    self.queued.set(b);
                    push_checked(&mut out, b, crc);
                }
                None => {
                    ordered |= matches!(proof, Proof::Crcs(_));
                    push_set_bits(&mut out, b, b + 1);
                }
            }
            self.hard.set(b);
        }
        (out, ordered)
    }

    /// After a guest write of blocks `r` completed: set their bits and queue
    /// records for those that were not yet hard.
    pub fn publish_hard(&self, r: Range<u64>, proof: Proof<'_>) {
        let mut p = self.lock_pending();
        let (recs, ordered) = self.harden(r, proof);
        if !recs.is_empty() {
            // Merge with the previous group when it holds only bits (sequential
            // writes then cost one record); a bounded group keeps this O(1).
            match p.last_mut() {
                Some(g) if g.records.len() < MAX_BITS_GROUP && g.is_bits_only() && !g.early => {
                    g.ordered |= ordered;
                    for rec in recs {
                        match rec {
                            Record::SetBits { first, count } => {
                                push_set_bits(&mut g.records, first, first + count as u64)
                            }
                            Record::SetBitsChecked { first, crcs } => {
                                for (i, c) in crcs.into_iter().enumerate() {
                                    push_checked(&mut g.records, first + i as u64, c);
                                }
                            }
                            other => g.records.push(other),
                        }
                    }
                }
                _ => p.push(Group {
                    records: recs,
                    ordered,
                    early: false,
                }),
            }
        }
        drop(p);
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
            // No CRC: the round that takes them is ordered.
            self.publish_hard(r, Proof::Crcs(&[]));
        }
    }

    /// Queue `table` records together with the bits of `blocks`, as one group
    /// that becomes durable atomically. `ordered`: the table points at
    /// chunks whose old content may not read as zeros.
    pub fn publish_group(
        &self,
        table: Vec<Record>,
        blocks: Range<u64>,
        proof: Proof<'_>,
        ordered: bool,
    ) {
        let mut p = self.lock_pending();
        let mut group = Group {
            records: table,
            ordered,
            early: false,
        };
        let (bits, bits_ordered) = self.harden(blocks, proof);
        group.records.extend(bits);
        group.ordered |= bits_ordered;
        if !group.records.is_empty() {
            p.push(group);
        }
        drop(p);
        self.mark_data_dirty();
    }

    /// After a write whose bits an early journal block already holds
    /// (`Meta::write_early`) completed: set them, queued as an early group
    /// (never merged with others: the round must not skip records no
    /// journal block holds).
    pub fn publish_early(&self, r: Range<u64>, crcs: &[Option<u32>]) {
        let mut p = self.lock_pending();
        let (records, ordered) = self.harden(r, Proof::Crcs(crcs));
        if !records.is_empty() {
            p.push(Group {
                records,
                ordered,
                early: true,
            });
        }
        drop(p);
        self.mark_data_dirty();
    }

    /// After a write whose early journal block was written but whose data
    /// write failed: queue records that clear the bits again, so that no
    /// later confirmation makes replay trust the early block's bits.
    pub fn revoke_early(&self, r: Range<u64>) {
        let count = (r.end - r.start) as u32;
        self.lock_pending().push(Group {
            records: vec![Record::ClearBits {
                first: r.start,
                count,
            }],
            ordered: false,
            early: false,
        });
        self.mark_data_dirty();
    }

    /// Before `blocks` (range locked by the caller) are rewritten in place:
    /// a block whose checked record is still queued gets its CRC marked
    /// stale — the round that takes it then makes the data durable first,
    /// so whatever the rewrite leaves is what the record promises; a block
    /// whose record is already in the journal but not confirmed waits for a
    /// round that confirms it (one journal block and one fdatasync), since
    /// replay would otherwise check a torn rewrite against the old CRC and
    /// drop a flushed write.
    pub async fn prepare_rewrite(
        &self,
        storage: &dyn Storage,
        stats: &Stats,
        blocks: Range<u64>,
    ) -> Result<()> {
        loop {
            if blocks.is_empty() || self.settled(blocks.clone()) {
                return Ok(());
            }
            if !self.mark_stale(blocks.clone()) {
                return Ok(());
            }
            self.confirm(storage, stats, blocks.clone()).await?;
        }
    }

    /// Mark the queued records of `blocks` stale; true if some unsettled
    /// block's record is no longer queued (it needs a confirmation).
    fn mark_stale(&self, blocks: Range<u64>) -> bool {
        let _p = self.lock_pending();
        let mut in_journal = false;
        for (s, e, unsettled) in self.unsettled.runs(blocks) {
            if !unsettled {
                continue;
            }
            for b in s..e {
                if self.queued.get(b) {
                    if self.mutation() != Mutation::SkipStale as u8 {
                        self.stale.set(b);
                    }
                } else {
                    in_journal = true;
                }
            }
        }
        in_journal
    }

    /// True once a flush has failed: the image refuses further writes.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn check_poisoned(&self) -> Result<()> {
        if self.is_poisoned() {
            let why = self
                .poison_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "the image must be reopened: an earlier fdatasync failed ({why}), so data written before it may be lost"
                ),
            ));
        }
        Ok(())
    }

    /// Mark the image poisoned (an fdatasync failed: the kernel may have
    /// dropped dirty pages, so a later successful flush would prove nothing).
    pub(crate) fn poison<T>(&self, e: Error) -> Result<T> {
        self.mark_poisoned(&e);
        Err(e)
    }

    /// [`Meta::poison`] for a failure the caller reports itself.
    pub(crate) fn mark_poisoned(&self, e: &Error) {
        {
            let mut r = self.poison_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(e.to_string());
            }
        }
        self.poisoned.store(true, Ordering::Release);
    }
}

/// Append set bits `[s, e)` to `p`, extending its last record when adjacent.
fn push_set_bits(p: &mut Vec<Record>, s: u64, e: u64) {
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

/// Append the checked bit of block `b`, extending the last record when adjacent.
fn push_checked(p: &mut Vec<Record>, b: u64, crc: u32) {
    if let Some(Record::SetBitsChecked { first, crcs }) = p.last_mut()
        && *first + crcs.len() as u64 == b
        && crcs.len() < Record::MAX_CHECKED_BLOCKS
    {
        crcs.push(crc);
        return;
    }
    p.push(Record::SetBitsChecked {
        first: b,
        crcs: vec![crc],
    });
}

/// CRC-32C of a block's content, as a checked record carries it.
pub(crate) fn block_crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// CRC-32C of `len` zero bytes.
pub(crate) fn zeros_crc(len: u64) -> u32 {
    zeros_crc_append(0, len)
}

/// [`zeros_crc`] continuing from `crc`.
pub(crate) fn zeros_crc_append(crc: u32, len: u64) -> u32 {
    const Z: [u8; 4096] = [0u8; 4096];
    let mut crc = crc;
    let mut left = len;
    while left > 0 {
        let n = left.min(Z.len() as u64) as usize;
        crc = crc32c::crc32c_append(crc, &Z[..n]);
        left -= n as u64;
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_crc_matches_a_zero_buffer() {
        for len in [0u64, 1, 512, 4096, 5000, 65536] {
            assert_eq!(zeros_crc(len), crc32c::crc32c(&vec![0u8; len as usize]));
        }
    }

    #[test]
    fn checked_bits_merge_into_runs() {
        let mut v = Vec::new();
        push_checked(&mut v, 5, 1);
        push_checked(&mut v, 6, 2);
        push_checked(&mut v, 8, 3);
        assert_eq!(
            v,
            vec![
                Record::SetBitsChecked {
                    first: 5,
                    crcs: vec![1, 2]
                },
                Record::SetBitsChecked {
                    first: 8,
                    crcs: vec![3]
                }
            ]
        );
    }
}
