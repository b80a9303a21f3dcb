//! Simulated disks: a durable image under a volatile write cache, seeded
//! latencies, injected faults and crashes.
//!
//! [`SimStorage`] keeps two views of the bytes:
//! * `cur` — what reads see: every completed write, in completion order;
//! * `durable` — what survives a crash for sure: writes made durable by a
//!   completed flush (or a FUA write).
//!
//! Every operation sleeps a seeded random virtual latency, so concurrent
//! operations complete in random order; its effect happens at completion.
//! `flush` makes durable exactly the writes that completed before it was
//! issued. [`SimStorage::crash`] builds the next disk from `durable` plus a
//! seeded subset of the writes that were completed-but-unflushed or still in
//! flight, applied in random order, some torn at 512-byte granularity.
//!
//! [`SimBase`] is a read-only base with the same latencies and its own
//! faults, including short reads.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::rng::Rng;
use crate::runtime::SimHandle;
use fvd_core::base::Base;
use fvd_core::iobuf::IoBuf;
use fvd_core::storage::{AllocRun, IoFuture, Storage, coalesce};

/// Page size of the sparse byte store.
pub const PAGE: u64 = 4096;
/// Granularity at which a write may be torn by a crash.
pub const SECTOR: u64 = 512;

/// A sparse byte store of copy-on-write pages; cloning it is cheap.
#[derive(Clone, Default)]
pub struct Pages {
    pages: BTreeMap<u64, Arc<[u8; PAGE as usize]>>,
}

impl Pages {
    /// Copy `[offset, offset+buf.len())` into `buf` (holes read as zeros).
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(buf.len() - done);
            match self.pages.get(&(pos / PAGE)) {
                Some(p) => buf[done..done + n].copy_from_slice(&p[in_page..in_page + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
    }

    /// Store `data` at `offset`, allocating pages as needed.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_page = (pos % PAGE) as usize;
            let n = (PAGE as usize - in_page).min(data.len() - done);
            let p = self
                .pages
                .entry(pos / PAGE)
                .or_insert_with(|| Arc::new([0u8; PAGE as usize]));
            Arc::make_mut(p)[in_page..in_page + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    /// Zero `[offset, offset+len)`; with `dealloc` whole pages are freed,
    /// otherwise missing pages are allocated (like `fallocate(ZERO_RANGE)`).
    pub fn zero(&mut self, offset: u64, len: u64, dealloc: bool) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let page = pos / PAGE;
            let in_page = pos % PAGE;
            let n = (PAGE - in_page).min(end - pos);
            if dealloc && n == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                Arc::make_mut(p)[in_page as usize..(in_page + n) as usize].fill(0);
            } else if !dealloc {
                self.pages.insert(page, Arc::new([0u8; PAGE as usize]));
            }
            pos += n;
        }
    }

    /// Drop everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        let keep = len.div_ceil(PAGE);
        self.pages.retain(|&p, _| p < keep);
        if !len.is_multiple_of(PAGE)
            && let Some(p) = self.pages.get_mut(&(len / PAGE))
        {
            Arc::make_mut(p)[(len % PAGE) as usize..].fill(0);
        }
    }

    /// Pages that hold storage.
    pub fn allocated_pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// Pages of `[offset, offset+len)` not yet allocated.
    fn missing_pages(&self, offset: u64, len: u64) -> u64 {
        if len == 0 {
            return 0;
        }
        (offset / PAGE..(offset + len).div_ceil(PAGE))
            .filter(|p| !self.pages.contains_key(p))
            .count() as u64
    }

    fn is_allocated(&self, page: u64) -> bool {
        self.pages.contains_key(&page)
    }

    /// All bytes `[0, len)` as one vector.
    pub fn to_vec(&self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.read(0, &mut v);
        v
    }
}

/// The content of a write-like operation.
#[derive(Clone)]
enum Payload {
    Bytes(Arc<[u8]>),
    Zero { dealloc: bool },
}

#[derive(Clone)]
struct Rec {
    offset: u64,
    len: u64,
    payload: Payload,
    /// Completion order (for completed records).
    cseq: u64,
}

impl Rec {
    fn apply(&self, p: &mut Pages) {
        match &self.payload {
            Payload::Bytes(b) => p.write(self.offset, b),
            Payload::Zero { dealloc } => p.zero(self.offset, self.len, *dealloc),
        }
    }

    /// The part `[s, e)` of this record (absolute offsets inside it).
    fn slice(&self, s: u64, e: u64) -> Rec {
        let payload = match &self.payload {
            Payload::Bytes(b) => {
                Payload::Bytes(b[(s - self.offset) as usize..(e - self.offset) as usize].into())
            }
            Payload::Zero { dealloc } => Payload::Zero { dealloc: *dealloc },
        };
        Rec {
            offset: s,
            len: e - s,
            payload,
            cseq: self.cseq,
        }
    }

    /// Split at absolute 512-byte boundaries.
    fn sectors(&self) -> Vec<Rec> {
        let mut out = Vec::new();
        let end = self.offset + self.len;
        let mut s = self.offset;
        while s < end {
            let e = ((s / SECTOR + 1) * SECTOR).min(end);
            out.push(self.slice(s, e));
            s = e;
        }
        out
    }
}

/// Probabilities and limits of injected faults. All zero/None by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Probability that a read fails with EIO.
    pub read_error: f64,
    /// Probability that a write fails with EIO.
    pub write_error: f64,
    /// Probability that a flush fails with EIO.
    pub flush_error: f64,
    /// Probability that a discard or write_zeroes fails with EIO.
    pub zero_error: f64,
    /// Fail the n-th read from now (0 = the next one).
    pub fail_read_at: Option<u64>,
    /// Fail the n-th write from now (0 = the next one).
    pub fail_write_at: Option<u64>,
    /// Fail the n-th flush from now (0 = the next one).
    pub fail_flush_at: Option<u64>,
    /// Allocated bytes the storage may hold; a write needing more fails
    /// with ENOSPC and changes nothing.
    pub capacity: Option<u64>,
    /// Largest length `set_len` accepts; beyond it, ENOSPC.
    pub max_len: Option<u64>,
    /// Probability that a base read returns fewer bytes than asked for
    /// (only [`SimBase`] uses it).
    pub short_read: f64,
}

/// Virtual latency of an operation: uniform in `[min, max]` nanoseconds,
/// and with probability `tail` uniform in `[max, tail_max]`.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Shortest latency (at least 1 so every operation yields).
    pub min: u64,
    /// Longest ordinary latency.
    pub max: u64,
    /// Probability of a tail latency.
    pub tail: f64,
    /// Longest tail latency.
    pub tail_max: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            min: 1_000,
            max: 100_000,
            tail: 0.02,
            tail_max: 5_000_000,
        }
    }
}

impl Latency {
    fn draw(&self, rng: &mut Rng) -> u64 {
        let min = self.min.max(1);
        let max = self.max.max(min);
        if rng.chance(self.tail) {
            rng.range(max, self.tail_max.max(max))
        } else {
            rng.range(min, max)
        }
    }
}

/// How a crash treats the writes that were not durable.
#[derive(Debug, Clone, Copy)]
pub struct CrashPolicy {
    /// Probability that a completed-but-unflushed write survives.
    pub keep_completed: f64,
    /// Probability that a write still in flight survives.
    pub keep_inflight: f64,
    /// Probability that a surviving write is torn (each of its sectors then
    /// survives with probability 1/2).
    pub tear: f64,
}

impl CrashPolicy {
    /// A policy drawn at random: sometimes nothing survives, sometimes
    /// everything, usually a mix.
    pub fn random(rng: &mut Rng) -> Self {
        let p = [0.0, 0.25, 0.5, 0.75, 1.0];
        CrashPolicy {
            keep_completed: *rng.pick(&p),
            keep_inflight: *rng.pick(&p),
            tear: *rng.pick(&[0.0, 0.1, 0.5]),
        }
    }
}

/// What a crash did with the writes that were not durable.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashReport {
    /// Non-durable writes considered.
    pub pending: u64,
    /// Of those, the ones (wholly or partly) applied.
    pub kept: u64,
    /// Of those, the ones torn.
    pub torn: u64,
}

/// Operation counters of one storage.
#[derive(Debug, Clone, Copy, Default)]
pub struct IoStats {
    /// Reads completed or failed.
    pub reads: u64,
    /// Writes completed or failed.
    pub writes: u64,
    /// Flushes completed or failed.
    pub flushes: u64,
    /// Discards and write_zeroes completed or failed.
    pub zeroes: u64,
    /// Faults injected.
    pub faults: u64,
}

struct Disk {
    cur: Pages,
    durable: Pages,
    len: u64,
    /// Completed, not yet durable, in completion order.
    volatile: Vec<Rec>,
    inflight: BTreeMap<u64, Rec>,
    next_id: u64,
    cseq: u64,
    faults: Faults,
    latency: Latency,
    stats: IoStats,
    dead: bool,
    /// Writes, zeroings and flushes that may still start; the next one
    /// after that never completes (a crash point at an exact I/O).
    halt_after: Option<u64>,
}

impl Disk {
    fn new(durable: Pages, len: u64, faults: Faults, latency: Latency) -> Self {
        Disk {
            cur: durable.clone(),
            durable,
            len,
            volatile: Vec::new(),
            inflight: BTreeMap::new(),
            next_id: 0,
            cseq: 0,
            faults,
            latency,
            stats: IoStats::default(),
            dead: false,
            halt_after: None,
        }
    }

    /// Make durable, in order, every volatile record completed before `upto`.
    fn make_durable(&mut self, upto: u64) {
        let n = self.volatile.partition_point(|r| r.cseq < upto);
        for r in self.volatile.drain(..n) {
            r.apply(&mut self.durable);
        }
        if self.volatile.is_empty() {
            // Both views are equal: share the pages again.
            self.durable = self.cur.clone();
        }
    }
}

fn countdown(c: &mut Option<u64>) -> bool {
    match c {
        Some(0) => {
            *c = None;
            true
        }
        Some(n) => {
            *n -= 1;
            false
        }
        None => false,
    }
}

/// A simulated EIO. `what` only documents the call site.
fn eio(_what: &str) -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A simulated disk; see the module documentation. Clones share the disk.
#[derive(Clone)]
pub struct SimStorage {
    disk: Arc<Mutex<Disk>>,
    sim: SimHandle,
    name: Arc<str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Zero,
}

impl SimStorage {
    /// An empty disk of length 0.
    pub fn new(sim: SimHandle, name: &str) -> Self {
        Self::from_pages(sim, name, Pages::default(), 0)
    }

    /// A disk whose durable content is `pages`, `len` bytes long.
    pub fn from_pages(sim: SimHandle, name: &str, pages: Pages, len: u64) -> Self {
        SimStorage {
            disk: Arc::new(Mutex::new(Disk::new(
                pages,
                len,
                Faults::default(),
                Latency::default(),
            ))),
            sim,
            name: name.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the fault configuration.
    pub fn set_faults(&self, f: Faults) {
        self.lock().faults = f;
    }

    /// Change the fault configuration in place.
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.lock().faults);
    }

    /// The current fault configuration.
    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Replace the latency model.
    pub fn set_latency(&self, l: Latency) {
        self.lock().latency = l;
    }

    /// Operation counters.
    pub fn stats(&self) -> IoStats {
        self.lock().stats
    }

    /// The bytes a crash right now would keep for sure.
    pub fn durable_pages(&self) -> Pages {
        self.lock().durable.clone()
    }

    /// The bytes reads see right now.
    pub fn current_pages(&self) -> Pages {
        self.lock().cur.clone()
    }

    /// Current length.
    pub fn length(&self) -> u64 {
        self.lock().len
    }

    /// Let `n` more writes, zeroings and flushes start, then freeze the
    /// next one forever (it stays in flight: a crash may keep it or not).
    /// `None` lifts the limit. The run stops there: a crash point at an
    /// exact I/O.
    pub fn halt_after(&self, n: Option<u64>) {
        self.lock().halt_after = n;
    }

    /// Writes, zeroings and flushes started so far.
    pub fn mutating_ops(&self) -> u64 {
        let s = self.lock().stats;
        s.writes + s.flushes + s.zeroes
    }

    /// Writes completed but not yet durable, and writes in flight.
    pub fn unflushed(&self) -> (usize, usize) {
        let d = self.lock();
        (d.volatile.len(), d.inflight.len())
    }

    /// A new, independent disk holding this disk's durable bytes (no crash
    /// of this one). Faults and latency are copied.
    pub fn snapshot(&self, name: &str) -> SimStorage {
        let d = self.lock();
        let s = SimStorage::from_pages(self.sim.clone(), name, d.durable.clone(), d.len);
        {
            let mut n = s.lock();
            n.faults = d.faults.clone();
            n.latency = d.latency;
        }
        s
    }

    /// Crash: this disk dies (every later operation fails) and a new disk is
    /// returned holding the durable bytes plus a subset of the non-durable
    /// writes chosen by `policy` and `rng`, applied in random order.
    pub fn crash(&self, rng: &mut Rng, policy: CrashPolicy) -> (SimStorage, CrashReport) {
        let mut d = self.lock();
        d.dead = true;
        let mut report = CrashReport::default();
        let mut survivors: Vec<Rec> = Vec::new();
        let completed = std::mem::take(&mut d.volatile);
        let inflight = std::mem::take(&mut d.inflight);
        let all = completed
            .into_iter()
            .map(|r| (r, policy.keep_completed))
            .chain(inflight.into_values().map(|r| (r, policy.keep_inflight)));
        for (r, keep) in all {
            report.pending += 1;
            if !rng.chance(keep) {
                continue;
            }
            report.kept += 1;
            if r.len > SECTOR && rng.chance(policy.tear) {
                report.torn += 1;
                survivors.extend(r.sectors().into_iter().filter(|_| rng.chance(0.5)));
            } else {
                survivors.push(r);
            }
        }
        rng.shuffle(&mut survivors);
        let mut pages = std::mem::take(&mut d.durable);
        for r in &survivors {
            r.apply(&mut pages);
        }
        let next = SimStorage {
            disk: Arc::new(Mutex::new(Disk::new(
                pages,
                d.len,
                d.faults.clone(),
                d.latency,
            ))),
            sim: self.sim.clone(),
            name: self.name.clone(),
        };
        d.cur = Pages::default();
        (next, report)
    }

    /// Crash keeping exactly the non-durable writes (completed or in flight)
    /// for which `keep(offset, len)` is true, whole and in completion order
    /// (in-flight ones last). For tests that need one precise crash state.
    pub fn crash_keeping(&self, mut keep: impl FnMut(u64, u64) -> bool) -> SimStorage {
        let mut d = self.lock();
        d.dead = true;
        let completed = std::mem::take(&mut d.volatile);
        let inflight = std::mem::take(&mut d.inflight);
        let mut pages = std::mem::take(&mut d.durable);
        for r in completed.iter().chain(inflight.values()) {
            if keep(r.offset, r.len) {
                r.apply(&mut pages);
            }
        }
        d.cur = Pages::default();
        SimStorage {
            disk: Arc::new(Mutex::new(Disk::new(
                pages,
                d.len,
                d.faults.clone(),
                d.latency,
            ))),
            sim: self.sim.clone(),
            name: self.name.clone(),
        }
    }

    /// True (and the operation must never complete) when `halt_after`
    /// stops this operation.
    fn halts(&self, kind: Kind) -> bool {
        let mut d = self.lock();
        if kind == Kind::Read {
            return false;
        }
        match &mut d.halt_after {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }

    /// Decide the latency and whether the operation fails; count it.
    fn begin(&self, kind: Kind) -> (u64, bool) {
        let mut d = self.lock();
        let latency = d.latency;
        let f = &mut d.faults;
        let (p, pointed) = match kind {
            Kind::Read => (f.read_error, countdown(&mut f.fail_read_at)),
            Kind::Write => (f.write_error, countdown(&mut f.fail_write_at)),
            Kind::Flush => (f.flush_error, countdown(&mut f.fail_flush_at)),
            Kind::Zero => (f.zero_error, false),
        };
        let (lat, random_fail) = self
            .sim
            .with_rng(|r| (latency.draw(r), p > 0.0 && r.chance(p)));
        let fail = pointed || random_fail;
        match kind {
            Kind::Read => d.stats.reads += 1,
            Kind::Write => d.stats.writes += 1,
            Kind::Flush => d.stats.flushes += 1,
            Kind::Zero => d.stats.zeroes += 1,
        }
        if fail {
            d.stats.faults += 1;
        }
        (lat, fail)
    }

    async fn write_like(&self, rec: Rec, kind: Kind, fua: bool) -> io::Result<()> {
        let halt = self.halts(kind);
        let (lat, fail) = self.begin(kind);
        let id = {
            let mut d = self.lock();
            let id = d.next_id;
            d.next_id += 1;
            d.inflight.insert(id, rec);
            id
        };
        if halt {
            std::future::pending::<()>().await;
        }
        self.sim.sleep_ns(lat).await;
        let mut d = self.lock();
        let Some(mut rec) = d.inflight.remove(&id) else {
            return Err(eio("disk crashed"));
        };
        if d.dead {
            return Err(eio("disk crashed"));
        }
        if fail {
            self.sim.note_fault();
            // A failed write may have partly happened.
            let parts: Vec<Rec> = rec
                .sectors()
                .into_iter()
                .filter(|_| self.sim.with_rng(|r| r.chance(0.3)))
                .collect();
            for mut p in parts {
                p.cseq = d.cseq;
                d.cseq += 1;
                p.apply(&mut d.cur);
                d.volatile.push(p);
            }
            return Err(eio(if kind == Kind::Zero { "zero" } else { "write" }));
        }
        let end = rec.offset + rec.len;
        if let Some(cap) = d.faults.capacity {
            let grows = !matches!(rec.payload, Payload::Zero { dealloc: true });
            let need = if grows {
                d.cur.missing_pages(rec.offset, rec.len)
            } else {
                0
            };
            if (d.cur.allocated_pages() + need) * PAGE > cap {
                d.stats.faults += 1;
                self.sim.note_fault();
                return Err(errno(libc::ENOSPC));
            }
        }
        if kind == Kind::Write {
            d.len = d.len.max(end);
        }
        rec.cseq = d.cseq;
        d.cseq += 1;
        rec.apply(&mut d.cur);
        d.volatile.push(rec);
        if fua {
            let upto = d.cseq;
            d.make_durable(upto);
        }
        Ok(())
    }
}

impl Storage for SimStorage {
    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let (lat, fail) = self.begin(Kind::Read);
            self.sim.sleep_ns(lat).await;
            let d = self.lock();
            if d.dead {
                return Err(eio("disk crashed"));
            }
            if fail {
                self.sim.note_fault();
                return Err(eio("read"));
            }
            let inside = d.len.saturating_sub(offset).min(buf.len() as u64) as usize;
            d.cur.read(offset, &mut buf[..inside]);
            buf[inside..].fill(0);
            Ok(buf)
        })
    }

    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let rec = Rec {
                offset,
                len: buf.len() as u64,
                payload: Payload::Bytes(Arc::from(&buf[..])),
                cseq: 0,
            };
            self.write_like(rec, Kind::Write, fua).await?;
            Ok(buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let halt = self.halts(Kind::Flush);
            let (lat, fail) = self.begin(Kind::Flush);
            if halt {
                std::future::pending::<()>().await;
            }
            let upto = self.lock().cseq;
            self.sim.sleep_ns(lat).await;
            let mut d = self.lock();
            if d.dead {
                return Err(eio("disk crashed"));
            }
            if fail {
                self.sim.note_fault();
                // Like a real failed fsync: some prefix of the writes may
                // have reached the medium anyway.
                let covered = d.volatile.partition_point(|r| r.cseq < upto);
                let k = self.sim.with_rng(|r| r.below(covered as u64 + 1));
                let cut = d.volatile.get(k as usize).map_or(upto, |r| r.cseq);
                d.make_durable(cut.min(upto));
                return Err(eio("flush"));
            }
            d.make_durable(upto);
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let rec = Rec {
                offset,
                len,
                payload: Payload::Zero { dealloc: true },
                cseq: 0,
            };
            self.write_like(rec, Kind::Zero, false).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let rec = Rec {
                offset,
                len,
                payload: Payload::Zero { dealloc: false },
                cseq: 0,
            };
            self.write_like(rec, Kind::Zero, false).await
        })
    }

    fn len(&self) -> io::Result<u64> {
        let d = self.lock();
        if d.dead {
            return Err(eio("disk crashed"));
        }
        Ok(d.len)
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let lat = self.sim.with_rng(|r| r.range(1, 1000));
            self.sim.sleep_ns(lat).await;
            let mut d = self.lock();
            if d.dead {
                return Err(eio("disk crashed"));
            }
            if d.faults.max_len.is_some_and(|m| len > m) {
                d.stats.faults += 1;
                self.sim.note_fault();
                return Err(errno(libc::ENOSPC));
            }
            // Size changes are treated as immediately durable (the engine
            // only sizes an image when creating it).
            if len < d.len {
                d.cur.truncate(len);
                d.durable.truncate(len);
            }
            d.len = len;
            Ok(())
        })
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        Box::pin(async move {
            let latency = self.lock().latency;
            let lat = self.sim.with_rng(|r| latency.draw(r));
            self.sim.sleep_ns(lat).await;
            let d = self.lock();
            if d.dead {
                return Err(eio("disk crashed"));
            }
            let end = offset + len;
            let mut runs = Vec::new();
            let mut pos = offset;
            while pos < end {
                let page = pos / PAGE;
                let n = (PAGE - pos % PAGE).min(end - pos);
                let data = pos < d.len && d.cur.is_allocated(page);
                runs.push(AllocRun { length: n, data });
                pos += n;
            }
            Ok(coalesce(runs))
        })
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.lock().cur.allocated_pages() * PAGE)
    }

    fn describe(&self) -> String {
        format!("sim:{}", self.name)
    }
}

/// A read-only simulated base image with latencies, EIO and short reads.
#[derive(Clone)]
pub struct SimBase {
    data: Arc<[u8]>,
    sim: SimHandle,
    faults: Arc<Mutex<(Faults, Latency)>>,
    name: Arc<str>,
}

impl SimBase {
    /// A base holding `data`.
    pub fn new(sim: SimHandle, name: &str, data: Arc<[u8]>) -> Self {
        SimBase {
            data,
            sim,
            faults: Arc::new(Mutex::new((Faults::default(), Latency::default()))),
            name: name.into(),
        }
    }

    /// Replace the fault configuration (reads only: `read_error`,
    /// `fail_read_at`, `short_read`).
    pub fn set_faults(&self, f: Faults) {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).0 = f;
    }

    /// Replace the latency model.
    pub fn set_latency(&self, l: Latency) {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).1 = l;
    }

    /// The base's bytes.
    pub fn bytes(&self) -> &Arc<[u8]> {
        &self.data
    }

    /// Decide (latency, fail, short).
    fn begin(&self) -> (u64, bool, bool) {
        let mut g = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let (f, lat) = &mut *g;
        let pointed = countdown(&mut f.fail_read_at);
        let (read_error, short_read, lat) = (f.read_error, f.short_read, *lat);
        drop(g);
        self.sim.with_rng(|r| {
            (
                lat.draw(r),
                pointed || (read_error > 0.0 && r.chance(read_error)),
                short_read > 0.0 && r.chance(short_read),
            )
        })
    }
}

impl Base for SimBase {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let (lat, fail, short) = self.begin();
            self.sim.sleep_ns(lat).await;
            if fail {
                self.sim.note_fault();
                return Err(eio("base read"));
            }
            let size = self.data.len() as u64;
            let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
            if inside > 0 {
                let o = offset as usize;
                buf[..inside].copy_from_slice(&self.data[o..o + inside]);
            }
            buf[inside..].fill(0);
            if short && !buf.is_empty() {
                self.sim.note_fault();
                let keep = self.sim.with_rng(|r| r.below(buf.len() as u64));
                buf.truncate(keep as usize);
            }
            Ok(buf)
        })
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        Box::pin(async move {
            let latency = self.faults.lock().unwrap_or_else(|p| p.into_inner()).1;
            let lat = self.sim.with_rng(|r| latency.draw(r));
            self.sim.sleep_ns(lat).await;
            let size = self.data.len() as u64;
            let end = offset + len;
            let mut runs = Vec::new();
            let mut pos = offset;
            while pos < end {
                let n = (PAGE - pos % PAGE).min(end - pos);
                let page = pos / PAGE * PAGE;
                let data = page < size && {
                    let e = (page + PAGE).min(size);
                    !fvd_core::iobuf::is_zero(&self.data[page as usize..e as usize])
                };
                runs.push(AllocRun { length: n, data });
                pos += n;
            }
            Ok(coalesce(runs))
        })
    }

    fn format(&self) -> fvd_core::format::Format {
        fvd_core::format::Format::Raw
    }

    fn describe(&self) -> String {
        format!("sim:{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Executor;

    fn buf(v: u8, n: usize) -> IoBuf {
        IoBuf::from_slice(&vec![v; n])
    }

    #[test]
    fn flush_makes_completed_writes_durable() {
        let ex = Executor::new(5);
        let s = SimStorage::new(ex.handle(), "d");
        ex.block_on(async {
            s.write_at(0, buf(1, 4096), false).await.unwrap();
            assert_eq!(s.durable_pages().to_vec(4096), vec![0; 4096]);
            let b = s.read_at(0, IoBuf::zeroed(4096)).await.unwrap();
            assert!(b.iter().all(|&x| x == 1));
            s.flush().await.unwrap();
            assert!(s.durable_pages().to_vec(4096).iter().all(|&x| x == 1));
        })
        .unwrap();
    }

    #[test]
    fn crash_keeps_durable_and_maybe_unflushed() {
        for seed in 0..20 {
            let ex = Executor::new(seed);
            let s = SimStorage::new(ex.handle(), "d");
            ex.block_on(async {
                s.write_at(0, buf(1, 1024), false).await.unwrap();
                s.flush().await.unwrap();
                s.write_at(0, buf(2, 1024), false).await.unwrap();
            })
            .unwrap();
            let mut rng = Rng::new(seed);
            let pol = CrashPolicy::random(&mut rng);
            let (n, _) = s.crash(&mut rng, pol);
            let v = n.current_pages().to_vec(1024);
            for sector in v.chunks(512) {
                assert!(sector.iter().all(|&x| x == 1) || sector.iter().all(|&x| x == 2));
            }
            assert!(s.len().is_err());
        }
    }

    #[test]
    fn flush_does_not_cover_later_writes() {
        let ex = Executor::new(11);
        let s = SimStorage::new(ex.handle(), "d");
        ex.block_on(async {
            let f = s.flush();
            s.write_at(0, buf(3, 512), false).await.unwrap();
            f.await.unwrap();
        })
        .unwrap();
        // The flush was created first but issued (first polled) after the
        // write completed, so it covers the write.
        assert_eq!(s.durable_pages().to_vec(512), vec![3; 512]);
    }

    #[test]
    fn capacity_gives_enospc() {
        let ex = Executor::new(12);
        let s = SimStorage::new(ex.handle(), "d");
        s.update_faults(|f| f.capacity = Some(8192));
        ex.block_on(async {
            s.write_at(0, buf(1, 8192), false).await.unwrap();
            let e = s.write_at(8192, buf(1, 512), false).await.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
            s.write_at(4096, buf(2, 512), false).await.unwrap();
        })
        .unwrap();
    }
}
