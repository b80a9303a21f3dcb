//! Compact images: the one-level chunk table, the chunk allocator, storage
//! growth, and the in-flight pins that make chunk reuse safe.
//!
//! Virtual chunk `c` lives at physical chunk `table[c]` of the data region
//! (`EMPTY` = unallocated: reads as zeros, or from the base where the bitmap
//! says so). Allocation takes the lowest free physical chunk, else the next
//! one past the end, growing the storage (a file by `grow_unit`, a block
//! device through `grow_cmd`) when it runs out.
//!
//! Reuse rule (the bug class cloud-hypervisor hit with a stale punch-hole):
//! a chunk freed by discard becomes allocatable only when (1) the commit
//! round that journals the free has completed, so no durable metadata can
//! still point at it, and (2) no I/O that looked it up before the free is
//! still running. (2) is tracked by a per-physical-chunk pin count: an I/O
//! pins the chunk, then re-reads the table entry; if the entry changed it
//! unpins and looks up again. With sequentially consistent operations, an
//! allocator that sees a zero pin count after the free can never race an
//! I/O that still uses the old mapping.
//!
//! Zeroed chunks (the one-fdatasync commit, `meta/commit.rs`): a `TABLE`
//! record may become durable before the data of its chunk, so a chunk may
//! be handed out for a round of one fdatasync only if whatever it holds
//! durably already reads as zeros — storage grown in this session (grown,
//! preallocated, then fdatasynced before any chunk of it is used) or a
//! chunk freed in this session (punched before its free was committed).
//! Any other chunk (free at open, past the highest one in use at open, or
//! given back after a failed write, or freed by a snapshot operation,
//! which does not punch) may hold old data: its allocation is *ordered*, so
//! its data and its zeroing are durable before its record. So is a
//! replacement for a chunk shared with a snapshot: the bytes copied into it
//! must be durable before the `TABLE` record that maps it.
//!
//! Internal snapshots (`image::snapshot`) keep chunks alive that the live
//! table no longer references: a per-physical-chunk **refcount** counts the
//! snapshots holding a chunk. A chunk the live table shares with a snapshot
//! (refcount > 0) is never written in place, never punched and never
//! returned to the allocator by a discard; the mapping layer gives a write
//! into it a replacement chunk. Refcounts change only while every request
//! is held at the image's gate (snapshot create, delete, apply), so the
//! request paths read them without a lock. Snapshot metadata (table and
//! bitmap copies, a grown refcount table) occupies runs of physical chunks
//! taken from the end of the data region. "Free" is: not in the live
//! table, refcount 0, and not snapshot metadata.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};

use super::physarray::PhysArray;
use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{Header, Preallocation, Region};
use crate::storage::Storage;

/// Table entry of an unallocated chunk.
pub const EMPTY: u32 = u32::MAX;
/// Physical chunk numbers stay below this (`EMPTY` is not one).
pub const MAX_PHYS: u64 = u32::MAX as u64;

/// What snapshots hold of the data region, as read at open.
#[derive(Debug, Clone, Default)]
pub(crate) struct SnapshotUse {
    /// Snapshot refcount of each physical chunk (past the end: 0).
    pub refcounts: Vec<u16>,
    /// Runs of physical chunks holding snapshot metadata.
    pub metadata: Vec<Range<u64>>,
}

/// A chunk handed out by the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Virtual chunk.
    pub virt: u64,
    /// Physical chunk.
    pub phys: u32,
    /// Its storage is known to read zeros durably.
    pub zeroed: bool,
}

struct Allocator {
    /// Next never-used physical chunk.
    next: u32,
    /// Physical chunks free for reuse now.
    free: BTreeSet<u32>,
    /// Free chunks that may hold old data (not known to read zeros).
    dirty: BTreeSet<u32>,
    /// Chunks at and past this one (below `capacity`) read zeros durably.
    zeroed_from: u64,
    /// Freed chunks waiting for commit round `.1` to complete.
    pending_free: Vec<(u32, u64)>,
    /// Physical chunks the storage can hold now.
    capacity: u64,
}

/// Chunk table and allocator of an open compact image.
pub(crate) struct Compact {
    pub chunk_size: u64,
    pub data_offset: u64,
    pub grow_unit: u64,
    pub grow_cmd: String,
    /// How growth allocates the new storage.
    pub preallocation: Preallocation,
    table: Box<[AtomicU32]>,
    pins: PhysArray<AtomicU32>,
    /// Snapshots holding each physical chunk (changed only with the
    /// image's gate held exclusively).
    refs: PhysArray<AtomicU16>,
    /// Mutation check only: write shared chunks in place.
    skip_shared_copy: AtomicBool,
    /// Never held across an await; taken under `grow_lock` to record the
    /// grown capacity.
    alloc: Mutex<Allocator>,
    /// Serialises growth: two concurrent `set_len` calls could complete in
    /// the wrong order and shrink the storage under a chunk in use. Lock
    /// order (docs/ARCHITECTURE.md): taken by an allocation with its span's
    /// range lock held, before `alloc`; never while holding `Meta::commit`,
    /// and released before an allocation commits and retries.
    grow_lock: tokio::sync::Mutex<()>,
}

/// Keeps physical chunks `first..first+count` from being reused while an
/// I/O uses them.
#[derive(Debug)]
pub(crate) struct Pin<'a> {
    pins: &'a PhysArray<AtomicU32>,
    first: u32,
    count: u32,
}

impl Pin<'_> {
    /// Take over `next`, the pin of the physical chunk right after these.
    pub fn extend(&mut self, next: Self) {
        debug_assert_eq!(next.first, self.first + self.count);
        self.count += next.count;
        std::mem::forget(next);
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        for p in self.first..self.first + self.count {
            self.pins.get(p as u64).fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Validate a table read from disk: entries inside the storage and unique.
pub(crate) fn validate_table(table: &[u32], capacity: u64) -> Result<()> {
    let mut seen = ChunkSet::default();
    for (c, &p) in table.iter().enumerate() {
        if p == EMPTY {
            continue;
        }
        if p as u64 >= capacity {
            return Err(Error::corrupt(format!(
                "chunk table entry {c} points at chunk {p}, past the end of the data region ({capacity} chunks)"
            )));
        }
        if seen.insert(p) {
            return Err(Error::corrupt(format!(
                "physical chunk {p} is referenced twice (entry {c})"
            )));
        }
    }
    Ok(())
}

/// A set of physical chunk numbers: one bit each (open-time bookkeeping of
/// tables with millions of entries).
#[derive(Default)]
struct ChunkSet {
    words: Vec<u64>,
}

impl ChunkSet {
    /// Add `p`; true if it was there already.
    fn insert(&mut self, p: u32) -> bool {
        let w = p as usize / 64;
        if w >= self.words.len() {
            self.words.resize((w + 1).next_power_of_two(), 0);
        }
        let bit = 1u64 << (p % 64);
        let was = self.words[w] & bit != 0;
        self.words[w] |= bit;
        was
    }

    fn contains(&self, p: u32) -> bool {
        self.words
            .get(p as usize / 64)
            .is_some_and(|w| w & (1u64 << (p % 64)) != 0)
    }

    /// One past the highest member (0 when empty).
    fn end(&self) -> u32 {
        match self.words.iter().rposition(|&w| w != 0) {
            Some(i) => (i * 64 + 64 - self.words[i].leading_zeros() as usize) as u32,
            None => 0,
        }
    }
}

/// Physical chunks in use by `table` or `snaps`.
fn in_use(table: &[u32], snaps: &SnapshotUse) -> ChunkSet {
    let mut used = ChunkSet::default();
    for &p in table.iter().filter(|&&p| p != EMPTY) {
        used.insert(p);
    }
    for (p, &n) in snaps.refcounts.iter().enumerate() {
        if n > 0 {
            used.insert(p as u32);
        }
    }
    for r in &snaps.metadata {
        for p in r.start as u32..r.end as u32 {
            used.insert(p);
        }
    }
    used
}

impl Compact {
    /// The chunk map of the compact image with header `h`: `table` (already
    /// validated), `capacity` whole chunks of storage, chunks `snaps` holds.
    pub fn new(h: &Header, table: &[u32], capacity: u64, snaps: &SnapshotUse) -> Self {
        let used = in_use(table, snaps);
        let next = used.end();
        // Chunks below the high-water mark that nothing uses were allocated
        // by writes that never reached the journal (or freed by snapshot
        // operations a crash interrupted): free again, but they may hold
        // their data (`dirty`).
        let free: BTreeSet<u32> = (0..next).filter(|&p| !used.contains(p)).collect();
        let refs: PhysArray<AtomicU16> = PhysArray::new(table.len() as u64);
        for (p, &n) in snaps.refcounts.iter().enumerate() {
            if n > 0 {
                refs.get(p as u64).store(n, Ordering::Relaxed);
            }
        }
        Compact {
            chunk_size: h.chunk_size as u64,
            data_offset: h.region(Region::Data).offset,
            grow_unit: h.grow_unit,
            grow_cmd: h.grow_cmd.clone(),
            preallocation: h.preallocation,
            table: table.iter().map(|&p| AtomicU32::new(p)).collect(),
            pins: PhysArray::new(table.len() as u64),
            refs,
            skip_shared_copy: AtomicBool::new(false),
            alloc: Mutex::new(Allocator {
                next,
                dirty: free.clone(),
                free,
                zeroed_from: capacity,
                pending_free: Vec::new(),
                capacity,
            }),
            grow_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Allocator> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of virtual chunks.
    pub fn chunks(&self) -> u64 {
        self.table.len() as u64
    }

    /// Physical chunk of virtual chunk `c`.
    pub fn lookup(&self, c: u64) -> u32 {
        self.table[c as usize].load(Ordering::SeqCst)
    }

    /// Snapshots holding physical chunk `p`.
    #[inline]
    pub fn refcount(&self, p: u32) -> u16 {
        self.refs
            .peek(p as u64)
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Set the snapshot refcount of physical chunk `p` (image gate held
    /// exclusively).
    pub fn set_refcount(&self, p: u32, n: u16) {
        self.refs.get(p as u64).store(n, Ordering::Release);
    }

    /// True if virtual chunk `c` is allocated and a snapshot holds its
    /// chunk: it must not be written in place.
    #[inline]
    pub fn is_shared(&self, c: u64) -> bool {
        let p = self.lookup(c);
        p != EMPTY && self.refcount(p) > 0
    }

    /// True if a write into virtual chunk `c` must go to a copy of it (a
    /// snapshot shares it).
    #[inline]
    pub fn needs_copy(&self, c: u64) -> bool {
        self.is_shared(c) && !self.skip_shared_copy.load(Ordering::Relaxed)
    }

    /// True if every chunk of `r` is allocated and no write into it needs a
    /// copy: a write may go to it in place.
    pub fn all_owned(&self, r: Range<u64>) -> bool {
        r.into_iter()
            .all(|c| self.lookup(c) != EMPTY && !self.needs_copy(c))
    }

    /// Mutation check only: let writes into shared chunks go in place.
    pub fn set_skip_shared_copy(&self) {
        self.skip_shared_copy.store(true, Ordering::Relaxed);
    }

    /// Pin the physical chunk of `c` for an I/O; `None` if unallocated.
    pub fn pin(&self, c: u64) -> Option<(u32, Pin<'_>)> {
        loop {
            let p = self.lookup(c);
            if p == EMPTY {
                return None;
            }
            self.pins.get(p as u64).fetch_add(1, Ordering::SeqCst);
            let pin = Pin {
                pins: &self.pins,
                first: p,
                count: 1,
            };
            if self.lookup(c) == p {
                return Some((p, pin));
            }
        }
    }

    /// File offset of virtual byte `v` in physical chunk `p`.
    pub fn host_offset(&self, p: u32, v: u64) -> u64 {
        self.data_offset + p as u64 * self.chunk_size + v % self.chunk_size
    }

    /// A snapshot of the table (for check, info and checkpoints).
    pub fn table_snapshot(&self) -> Vec<u32> {
        self.table
            .iter()
            .map(|e| e.load(Ordering::SeqCst))
            .collect()
    }

    /// Allocated chunks and the number of virtually adjacent allocated pairs
    /// that are not physically adjacent (fragmentation).
    pub fn usage(&self) -> (u64, u64, u64) {
        let t = self.table_snapshot();
        let allocated = t.iter().filter(|&&p| p != EMPTY).count() as u64;
        let mut pairs = 0;
        let mut breaks = 0;
        for w in t.windows(2) {
            if w[0] != EMPTY && w[1] != EMPTY {
                pairs += 1;
                if w[1] != w[0].wrapping_add(1) {
                    breaks += 1;
                }
            }
        }
        (allocated, pairs, breaks)
    }

    /// Allocate physical chunks for `virt` (all unallocated, locked by the
    /// caller), growing the storage if needed. `rounds_done` tells which
    /// freed chunks have a durable free. Each chunk comes with whether it
    /// is known to read zeros durably. The result is not yet published.
    /// `fatal` is told of an fdatasync that failed while growing.
    pub async fn allocate(
        &self,
        storage: &dyn Storage,
        virt: &[u64],
        rounds_done: u64,
        fatal: &(dyn Fn(&Error) + Sync),
    ) -> Result<Vec<Chunk>> {
        let (out, need) = {
            let mut a = self.lock();
            self.collect_frees(&mut a, rounds_done);
            let mut out: Vec<Chunk> = Vec::with_capacity(virt.len());
            for &c in virt {
                let (p, zeroed) = match a.free.pop_first() {
                    Some(p) => (p, !a.dirty.remove(&p)),
                    None => {
                        if a.next as u64 >= MAX_PHYS {
                            for ch in out.drain(..) {
                                a.free.insert(ch.phys);
                                if !ch.zeroed {
                                    a.dirty.insert(ch.phys);
                                }
                            }
                            return Err(Error::new(
                                ErrorKind::NoSpace,
                                "no free chunk number left (2^32 - 1 chunks in use)",
                            ));
                        }
                        a.next += 1;
                        let p = a.next - 1;
                        (p, p as u64 >= a.zeroed_from)
                    }
                };
                out.push(Chunk {
                    virt: c,
                    phys: p,
                    zeroed,
                });
            }
            let need = out.iter().map(|ch| ch.phys as u64 + 1).max().unwrap_or(0);
            (out, need)
        };
        if need > self.lock().capacity
            && let Err(e) = self.grow(storage, need, fatal).await
        {
            self.release(&out, false);
            return Err(e);
        }
        Ok(out)
    }

    /// Move pending frees whose free is durable and whose chunk no I/O
    /// pins into the free set.
    fn collect_frees(&self, a: &mut Allocator, rounds_done: u64) {
        let mut still_pending = Vec::new();
        for (p, round) in std::mem::take(&mut a.pending_free) {
            if round <= rounds_done && self.pins.get(p as u64).load(Ordering::SeqCst) == 0 {
                a.free.insert(p);
            } else {
                still_pending.push((p, round));
            }
        }
        a.pending_free = still_pending;
    }

    /// Allocate `n` physically contiguous chunks past every chunk in use
    /// (snapshot metadata), growing the storage. Not published anywhere:
    /// give them back with [`Compact::free_chunks`] if unused.
    /// `fatal` is told of an fdatasync that failed while growing.
    pub async fn allocate_run(
        &self,
        storage: &dyn Storage,
        n: u64,
        fatal: &(dyn Fn(&Error) + Sync),
    ) -> Result<Range<u64>> {
        let run = {
            let mut a = self.lock();
            let start = a.next as u64;
            if start + n >= MAX_PHYS {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    "no free chunk number left (2^32 - 1 chunks in use)",
                ));
            }
            a.next = (start + n) as u32;
            start..start + n
        };
        if run.end > self.lock().capacity
            && let Err(e) = self.grow(storage, run.end, fatal).await
        {
            self.free_chunks(run.clone().map(|p| p as u32), 0);
            return Err(e);
        }
        Ok(run)
    }

    /// Give physical chunks nothing refers to any more (durably, as of
    /// commit round `round`) back to the allocator; each is reused only
    /// once no I/O pins it.
    /// Such chunks may still hold their data (they are not punched): they
    /// are `dirty`.
    pub fn free_chunks(&self, phys: impl IntoIterator<Item = u32>, round: u64) {
        let mut a = self.lock();
        for p in phys {
            a.dirty.insert(p);
            a.pending_free.push((p, round));
        }
    }

    /// Physical chunks `phys` (freed or about to be) may hold old data: never
    /// hand them out as known to read zeros.
    pub fn mark_dirty(&self, phys: &[u32]) {
        let mut a = self.lock();
        a.dirty.extend(phys.iter().copied());
    }

    /// Return chunks that were allocated but never published. `written`:
    /// a write into them may have happened (they may no longer read zeros).
    pub fn release(&self, chunks: &[Chunk], written: bool) {
        let mut a = self.lock();
        for ch in chunks {
            a.free.insert(ch.phys);
            if written || !ch.zeroed {
                a.dirty.insert(ch.phys);
            }
        }
    }

    /// Make allocated chunks visible to readers (after their data is written).
    pub fn publish(&self, chunks: &[Chunk]) {
        for ch in chunks {
            self.table[ch.virt as usize].store(ch.phys, Ordering::SeqCst);
        }
    }

    /// Unmap virtual chunk `c`; its physical chunk is reusable after commit
    /// round `round` completed and no pinned I/O uses it — unless a
    /// snapshot holds it, which keeps it. Returns the old entry.
    pub fn free(&self, c: u64, round: u64) -> u32 {
        let p = self.table[c as usize].swap(EMPTY, Ordering::SeqCst);
        if p != EMPTY && self.refcount(p) == 0 {
            self.lock().pending_free.push((p, round));
        }
        p
    }

    /// The allocator's high-water mark: one past the highest physical chunk
    /// in use or handed out.
    pub fn high_water(&self) -> u64 {
        self.lock().next as u64
    }

    /// True while some freed chunk waits for its free to become durable.
    pub fn has_pending_frees(&self) -> bool {
        !self.lock().pending_free.is_empty()
    }

    /// Keep physical chunks `0..k` out of every later allocation: a
    /// lifecycle operation moves their data away and then the data region's
    /// start past them.
    pub fn reserve_below(&self, k: u32) {
        let mut a = self.lock();
        a.free.retain(|&p| p >= k);
        a.pending_free.retain(|&(p, _)| p >= k);
        a.next = a.next.max(k);
    }

    /// Set the commit round of pending frees.
    pub fn set_pending_round(&self, phys: &[u32], round: u64) {
        let mut a = self.lock();
        for e in a.pending_free.iter_mut() {
            if phys.contains(&e.0) {
                e.1 = round;
            }
        }
    }

    async fn grow(
        &self,
        storage: &dyn Storage,
        need_chunks: u64,
        fatal: &(dyn Fn(&Error) + Sync),
    ) -> Result<()> {
        let _grow = self.grow_lock.lock().await;
        let cs = self.chunk_size;
        let step = (self.grow_unit.max(cs) / cs).max(1);
        let have = self.lock().capacity;
        if have >= need_chunks {
            // Grown by another allocation while this one waited.
            return Ok(());
        }
        // Without snapshots the data region never needs more chunks than the
        // virtual disk has; with them it may, and then grows step by step.
        let target = if need_chunks <= self.chunks() {
            need_chunks.max(have + step).min(self.chunks())
        } else {
            need_chunks.max(have + step)
        };
        let target_len = self.data_offset + target * cs;
        let needed_len = self.data_offset + need_chunks * cs;
        let old_len = storage
            .len()
            .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?;
        let mut r = storage.set_len(target_len).await;
        if r.is_err() && storage.len().map(|l| l >= needed_len).unwrap_or(false) {
            r = Ok(());
        }
        if let Err(e) = r {
            if self.grow_cmd.is_empty() {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!(
                        "{}: out of space ({e}) and no grow command is set",
                        storage.describe()
                    ),
                ));
            }
            let have_len = storage.len().map_err(|e| Error::io("size", e))?;
            run_grow_cmd(
                &self.grow_cmd,
                &storage.describe(),
                target_len.saturating_sub(have_len),
            )
            .await?;
        }
        let len = storage
            .len()
            .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?;
        if len < needed_len {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "{}: out of space: {len} bytes, {needed_len} needed",
                    storage.describe()
                ),
            ));
        }
        let new_capacity = (len - self.data_offset) / cs;
        let grown = self.data_offset + have * cs..self.data_offset + new_capacity * cs;
        let grown = grown.start.max(old_len.min(grown.end))..grown.end;
        self.preallocate(storage, grown).await?;
        // The new size (and preallocation) must be durable before a table
        // entry pointing into it can be: a one-fdatasync round may make its
        // journal durable without the size change.
        if let Err(e) = storage.flush().await {
            let e = Error::io(
                format!("{}: fdatasync after growing", storage.describe()),
                e,
            );
            fatal(&e);
            return Err(e);
        }
        self.lock().capacity = new_capacity;
        Ok(())
    }

    /// Allocate (`falloc`) or write zeros over (`full`) grown storage.
    async fn preallocate(&self, storage: &dyn Storage, r: std::ops::Range<u64>) -> Result<()> {
        if r.is_empty() {
            return Ok(());
        }
        let what = |e| {
            Error::io(
                format!("{}: preallocate grown storage", storage.describe()),
                e,
            )
        };
        match self.preallocation {
            Preallocation::Falloc => storage
                .preallocate(r.start, r.end - r.start)
                .await
                .map_err(what),
            Preallocation::Full => crate::storage::write_zeros(storage, r).await.map_err(what),
            Preallocation::Off | Preallocation::Metadata => Ok(()),
        }
    }
}

/// Run the grow command (`{path}` and `{bytes}` substituted) on a thread.
pub(crate) async fn run_grow_cmd(cmd: &str, path: &str, bytes: u64) -> Result<()> {
    let line = cmd
        .replace("{path}", path)
        .replace("{bytes}", &bytes.to_string());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let shown = line.clone();
    std::thread::spawn(move || {
        let r = std::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .status();
        let _ = tx.send(r);
    });
    match rx.await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(Error::new(
            ErrorKind::NoSpace,
            format!("grow command '{shown}' failed ({st})"),
        )),
        Ok(Err(e)) => Err(Error::io(format!("grow command '{shown}'"), e)),
        Err(_) => Err(Error::new(ErrorKind::Io, "grow command thread vanished")),
    }
}
