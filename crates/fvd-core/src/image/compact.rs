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

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// Table entry of an unallocated chunk.
pub const EMPTY: u32 = u32::MAX;

struct Allocator {
    /// Next never-used physical chunk.
    next: u32,
    /// Physical chunks free for reuse now.
    free: BTreeSet<u32>,
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
    table: Box<[AtomicU32]>,
    pins: Box<[AtomicU32]>,
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
    pins: &'a [AtomicU32],
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
            self.pins[p as usize].fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Validate a table read from disk: entries inside the storage, below
/// `phys_limit` (the entries the table region can hold, docs/FORMAT.md
/// §4.2) and unique.
pub(crate) fn validate_table(table: &[u32], capacity: u64, phys_limit: u64) -> Result<()> {
    let mut seen = vec![false; phys_limit as usize];
    for (c, &p) in table.iter().enumerate() {
        if p == EMPTY {
            continue;
        }
        if p as u64 >= phys_limit || p as u64 >= capacity {
            return Err(Error::corrupt(format!(
                "chunk table entry {c} points at chunk {p}, past the end of the data region ({capacity} chunks)"
            )));
        }
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(Error::corrupt(format!(
                "physical chunk {p} is referenced twice (entry {c})"
            )));
        }
    }
    Ok(())
}

impl Compact {
    /// `phys_limit`: physical chunks are numbered below it (the entries the
    /// table region can hold; at least the table's length).
    pub fn new(
        table: &[u32],
        chunk_size: u64,
        data_offset: u64,
        capacity: u64,
        phys_limit: u64,
        grow_unit: u64,
        grow_cmd: String,
    ) -> Self {
        let next = table
            .iter()
            .filter(|&&p| p != EMPTY)
            .map(|&p| p + 1)
            .max()
            .unwrap_or(0);
        let used: BTreeSet<u32> = table.iter().copied().filter(|&p| p != EMPTY).collect();
        // Chunks below the high-water mark that no entry references were
        // allocated by writes that never reached the journal: free again.
        let free = (0..next).filter(|p| !used.contains(p)).collect();
        Compact {
            chunk_size,
            data_offset,
            grow_unit,
            grow_cmd,
            table: table.iter().map(|&p| AtomicU32::new(p)).collect(),
            pins: (0..phys_limit.max(table.len() as u64))
                .map(|_| AtomicU32::new(0))
                .collect(),
            alloc: Mutex::new(Allocator {
                next,
                free,
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

    /// True if every chunk of `r` is allocated.
    pub fn all_allocated(&self, r: std::ops::Range<u64>) -> bool {
        r.into_iter().all(|c| self.lookup(c) != EMPTY)
    }

    /// Pin the physical chunk of `c` for an I/O; `None` if unallocated.
    pub fn pin(&self, c: u64) -> Option<(u32, Pin<'_>)> {
        loop {
            let p = self.lookup(c);
            if p == EMPTY {
                return None;
            }
            self.pins[p as usize].fetch_add(1, Ordering::SeqCst);
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
    /// freed chunks have a durable free. The result is not yet published.
    pub async fn allocate(
        &self,
        storage: &dyn Storage,
        virt: &[u64],
        rounds_done: u64,
    ) -> Result<Vec<(u64, u32)>> {
        let (out, need) = {
            let mut a = self.lock();
            let pins = &self.pins;
            let mut still_pending = Vec::new();
            for (p, round) in std::mem::take(&mut a.pending_free) {
                if round <= rounds_done && pins[p as usize].load(Ordering::SeqCst) == 0 {
                    a.free.insert(p);
                } else {
                    still_pending.push((p, round));
                }
            }
            a.pending_free = still_pending;
            let mut out = Vec::with_capacity(virt.len());
            for &c in virt {
                let p = match a.free.pop_first() {
                    Some(p) => p,
                    None => {
                        if a.next as usize >= self.pins.len() {
                            // More physical chunks than virtual ones means a leak;
                            // refuse rather than overflow the pin array.
                            for (_, p) in out.drain(..) {
                                a.free.insert(p);
                            }
                            return Err(Error::new(
                                ErrorKind::NoSpace,
                                "no free chunk left in the chunk table",
                            ));
                        }
                        a.next += 1;
                        a.next - 1
                    }
                };
                out.push((c, p));
            }
            let need = out.iter().map(|&(_, p)| p as u64 + 1).max().unwrap_or(0);
            (out, need)
        };
        if need > self.lock().capacity
            && let Err(e) = self.grow(storage, need).await
        {
            self.release(&out);
            return Err(e);
        }
        Ok(out)
    }

    /// Return chunks that were allocated but never published.
    pub fn release(&self, chunks: &[(u64, u32)]) {
        let mut a = self.lock();
        for &(_, p) in chunks {
            a.free.insert(p);
        }
    }

    /// Make allocated chunks visible to readers (after their data is written).
    pub fn publish(&self, chunks: &[(u64, u32)]) {
        for &(c, p) in chunks {
            self.table[c as usize].store(p, Ordering::SeqCst);
        }
    }

    /// Unmap virtual chunk `c`; its physical chunk is reusable after commit
    /// round `round` completed and no pinned I/O uses it. Returns the old entry.
    pub fn free(&self, c: u64, round: u64) -> u32 {
        let p = self.table[c as usize].swap(EMPTY, Ordering::SeqCst);
        if p != EMPTY {
            self.lock().pending_free.push((p, round));
        }
        p
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

    async fn grow(&self, storage: &dyn Storage, need_chunks: u64) -> Result<()> {
        let _grow = self.grow_lock.lock().await;
        let cs = self.chunk_size;
        let step = (self.grow_unit.max(cs) / cs).max(1);
        let have = self.lock().capacity;
        if have >= need_chunks {
            // Grown by another allocation while this one waited.
            return Ok(());
        }
        let target = (need_chunks.max(have + step)).min(self.pins.len() as u64);
        let target_len = self.data_offset + target * cs;
        let needed_len = self.data_offset + need_chunks * cs;
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
        self.lock().capacity = (len - self.data_offset) / cs;
        Ok(())
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
