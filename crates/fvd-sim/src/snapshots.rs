//! Internal snapshots in the simulator.
//!
//! * [`sweep`]: snapshot create, delete or apply on a small compact image,
//!   cut off at every write, zeroing and flush it issues (the I/O freezes
//!   there, [`SimStorage::halt_after`]) and crashed three ways: a random
//!   part of the unflushed writes survives (torn or not), only the writes
//!   to metadata regions survive (metadata ahead of its data), or nothing
//!   does. The image must then hold the old state or the new one — the
//!   live disk and every snapshot, byte for byte — and `check` must find
//!   no corruption (a refcount too high, a leak, is allowed).
//! * [`concurrent`]: testers write, zero and read chunks shared with
//!   snapshots while a snapshotter takes and deletes snapshots online; the
//!   run crashes at random points. A snapshot must read exactly what the
//!   model said the disk held when its create was called (the requests in
//!   flight then included, the ones issued after excluded), forever; the
//!   live disk what the model allows.
//!
//! Both take an optional [`SnapshotBug`] for the mutation checks: the
//! tests assert that a broken engine is caught.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use fvd_core::base::Base;
use fvd_core::check::check_storage;
use fvd_core::format::Format;
use fvd_core::image::snapshot::{SnapshotBug, SnapshotSel};
use fvd_core::image::{CreateOptions, Image, OpenOptions};
use fvd_core::storage::Storage;

use crate::model::{self, BASE, FIRST_TAG, Model, SECTOR, Seen, Val, ZERO};
use crate::rng::Rng;
use crate::runtime::{Executor, SimHandle, Stop};
use crate::storage::{CrashPolicy, SimBase, SimStorage};

/// The operation a sweep cuts off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapOp {
    /// Create snapshot "c".
    Create,
    /// Delete snapshot "a".
    Delete,
    /// Apply snapshot "a".
    Apply,
}

/// What a sweep saw.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Crash points tried (cut points × crash policies).
    pub points: u64,
    /// I/Os (writes, zeroings, flushes) of the whole operation.
    pub ios: u64,
    /// Crashes that left the old state, and the new one.
    pub outcomes: [u64; 2],
    /// Everything that went wrong.
    pub violations: Vec<String>,
}

/// The shape of a sweep's image, drawn from its seed.
#[derive(Debug, Clone, Copy)]
struct Shape {
    virtual_size: u64,
    base_size: Option<u64>,
    block_size: u32,
    chunk_size: u32,
}

impl Shape {
    fn of(seed: u64) -> Shape {
        let mut r = Rng::new(seed ^ 0x5a9f_0c1e);
        let block_size = *r.pick(&[512u32, 4096]);
        let chunk_size = *r.pick(&[4096u32, 8192, 16384]);
        let virtual_size = *r.pick(&[128u64 << 10, 256 << 10]);
        let base_size = r.chance(0.5).then(|| virtual_size / 2 + 1536);
        Shape {
            virtual_size,
            base_size,
            block_size,
            chunk_size,
        }
    }
}

/// The disks of one run.
struct Disks {
    image: SimStorage,
    base: Option<SimBase>,
}

impl Disks {
    fn base(&self) -> Option<Arc<dyn Base>> {
        self.base
            .as_ref()
            .map(|b| Arc::new(b.clone()) as Arc<dyn Base>)
    }
}

/// What an image holds: the live disk and every snapshot (id → name, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Content {
    live: Vec<u8>,
    snaps: BTreeMap<u64, (String, Vec<u8>)>,
}

fn pattern(rng: &mut Rng, len: usize) -> Vec<u8> {
    let b = rng.next_u64() as u8 | 1;
    (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect()
}

/// A compact image with snapshots "a" and "b" and writes before, between
/// and after them (the same for the same seed).
fn setup(exec: &Executor, shape: Shape, seed: u64) -> Disks {
    let h = exec.handle();
    let image = SimStorage::new(h.clone(), "image");
    let base = shape.base_size.map(|n| {
        let mut r = Rng::new(seed ^ 0xba5e);
        let bytes: Vec<u8> = (0..n).map(|_| r.next_u64() as u8).collect();
        SimBase::new(h.clone(), "base", bytes.into())
    });
    let disks = Disks { image, base };
    let opts = CreateOptions {
        size: Some(shape.virtual_size),
        base: disks.base.as_ref().map(|_| ("base".into(), Format::Raw)),
        block_size: Some(shape.block_size),
        journal_size: Some(16 << 10),
        compact: true,
        chunk_size: Some(shape.chunk_size),
        grow_unit: Some(shape.chunk_size as u64 * 4),
        ..Default::default()
    };
    exec.block_on(async {
        let base = disks.base();
        fvd_core::image::create(&disks.image, &opts, base.as_deref())
            .await
            .expect("create");
        let img = Image::open(Arc::new(disks.image.clone()), base, OpenOptions::default())
            .await
            .expect("open");
        let mut rng = Rng::new(seed);
        let size = shape.virtual_size;
        for round in 0..3 {
            for _ in 0..10 {
                let off = rng.below(size / 512) * 512;
                let len = ((rng.below(24) + 1) * 512).min(size - off);
                match rng.below(10) {
                    0 => img.discard(off, len).await.expect("discard"),
                    1 => img.cache(off, len).await.expect("cache"),
                    _ => {
                        let data = pattern(&mut rng, len as usize);
                        img.write_slice(off, &data, false).await.expect("write");
                    }
                }
            }
            if round < 2 {
                let name = if round == 0 { "a" } else { "b" };
                img.create_snapshot(name).await.expect("snapshot");
            }
        }
        img.close().await.expect("close");
    })
    .expect("setup ran to the end");
    disks
}

/// Read what `disk` holds (opening it read-write: recovery runs).
async fn content(disks: &Disks) -> fvd_core::Result<Content> {
    let img = Image::open(
        Arc::new(disks.image.clone()),
        disks.base(),
        OpenOptions::default(),
    )
    .await?;
    let mut live = vec![0u8; img.virtual_size() as usize];
    img.read_slice(0, &mut live).await?;
    let mut snaps = BTreeMap::new();
    for s in img.snapshots() {
        let v = Image::open_snapshot(
            Arc::new(disks.image.clone()),
            disks.base(),
            &SnapshotSel::Id(s.id.to_string()),
        )
        .await?;
        let mut bytes = vec![0u8; v.virtual_size() as usize];
        v.read_slice(0, &mut bytes).await?;
        snaps.insert(s.id, (s.name.clone(), bytes));
    }
    img.close().await?;
    Ok(content_of(live, snaps))
}

fn content_of(live: Vec<u8>, snaps: BTreeMap<u64, (String, Vec<u8>)>) -> Content {
    Content { live, snaps }
}

async fn run_op(disks: &Disks, op: SnapOp, bug: Option<SnapshotBug>) -> fvd_core::Result<()> {
    let img = Image::open(
        Arc::new(disks.image.clone()),
        disks.base(),
        OpenOptions::default(),
    )
    .await?;
    if let Some(b) = bug {
        img.inject_snapshot_bug(b);
    }
    match op {
        SnapOp::Create => {
            // Soft fills just before: the snapshot must not take a bit
            // whose data a crash could lose.
            if img.base_range() > 0 {
                img.cache(0, img.base_range()).await?;
            }
            img.create_snapshot("c").await?;
            img.close().await
        }
        SnapOp::Delete => {
            img.delete_snapshot(&SnapshotSel::Name("a".into())).await?;
            img.close().await
        }
        SnapOp::Apply => img
            .apply_snapshot(&SnapshotSel::Name("a".into()))
            .await
            .map(|_| ()),
    }
}

/// How a cut-off run's unflushed writes survive.
#[derive(Debug, Clone, Copy)]
enum Survive {
    Random,
    MetadataOnly,
    Nothing,
}

/// Crash snapshot `op` at every I/O it issues (see the module docs).
pub fn sweep(op: SnapOp, seed: u64, bug: Option<SnapshotBug>) -> SweepReport {
    let shape = Shape::of(seed);
    let mut report = SweepReport::default();
    let what =
        |k: u64, s: Survive| format!("{op:?} seed {seed} ({shape:?}) cut at I/O {k} ({s:?})");
    // The whole operation once: the old and the new state, and its I/Os.
    let exec = Executor::new(seed);
    let reference = setup(&exec, shape, seed);
    let before = exec
        .block_on(content(&reference))
        .expect("ran")
        .expect("before");
    let ops0 = reference.image.mutating_ops();
    let done = exec.block_on(run_op(&reference, op, None)).expect("ran");
    if let Err(e) = done {
        report.violations.push(format!("{op:?} seed {seed}: {e}"));
        return report;
    }
    report.ios = reference.image.mutating_ops() - ops0;
    let after = exec
        .block_on(content(&reference))
        .expect("ran")
        .expect("after");
    let data_offset = exec
        .block_on(fvd_core::image::read_header(&reference.image))
        .expect("ran")
        .expect("header")
        .0
        .region(fvd_core::format::header::Region::Data)
        .offset;
    let mut rng = Rng::new(seed ^ 0xc2a5);
    for k in 0..=report.ios {
        for survive in [Survive::Random, Survive::MetadataOnly, Survive::Nothing] {
            let exec = Executor::new(seed.wrapping_add(k));
            let disks = setup(&exec, shape, seed);
            disks.image.halt_after(Some(k));
            let r = exec.block_on(run_op(&disks, op, bug));
            exec.clear();
            if let Ok(Err(e)) = r {
                report.violations.push(format!("{}: {e}", what(k, survive)));
                continue;
            }
            let image = match survive {
                Survive::Random => {
                    let policy = CrashPolicy::random(&mut rng);
                    disks.image.crash(&mut rng, policy).0
                }
                Survive::MetadataOnly => disks.image.crash_keeping(|off, _| off < data_offset),
                Survive::Nothing => disks.image.crash_keeping(|_, _| false),
            };
            let crashed = Disks {
                image,
                base: disks.base.clone(),
            };
            report.points += 1;
            if let Some(v) = verify(&exec, &crashed, &before, &after, &mut report) {
                report.violations.push(format!("{}: {v}", what(k, survive)));
                continue;
            }
            // Running the operation again (what is left of it) works.
            let again = match op {
                SnapOp::Delete => {
                    let c = exec.block_on(content(&crashed)).expect("ran").ok();
                    c.is_some_and(|c| c.snaps.values().any(|(n, _)| n == "a"))
                }
                _ => true,
            };
            if again && let Ok(Err(e)) = exec.block_on(run_op(&crashed, op, None)) {
                report
                    .violations
                    .push(format!("{}: running it again: {e}", what(k, survive)));
            }
        }
    }
    report
}

/// Check a crashed image: consistent, and the old or the new state.
fn verify(
    exec: &Executor,
    d: &Disks,
    before: &Content,
    after: &Content,
    report: &mut SweepReport,
) -> Option<String> {
    // The bytes as the crash left them, before any recovery writes.
    let copy = d.image.snapshot("check");
    match exec.block_on(check_storage(&copy, None)) {
        Ok(Ok(r)) if r.corruptions.is_empty() && r.check_errors.is_empty() => {}
        Ok(Ok(r)) => return Some(format!("check: {:?} {:?}", r.corruptions, r.check_errors)),
        Ok(Err(e)) => return Some(format!("check failed: {e}")),
        Err(s) => return Some(format!("check did not finish ({s:?})")),
    }
    let got = match exec.block_on(content(d)) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Some(format!("the image does not open: {e}")),
        Err(s) => return Some(format!("recovery did not finish ({s:?})")),
    };
    if got == *before {
        report.outcomes[0] += 1;
        None
    } else if got == *after {
        report.outcomes[1] += 1;
        None
    } else {
        Some(describe_difference(&got, before, after))
    }
}

fn describe_difference(got: &Content, before: &Content, after: &Content) -> String {
    let first = |a: &[u8], b: &[u8]| a.iter().zip(b).position(|(x, y)| x != y);
    let mut out = format!(
        "neither the old nor the new state: live differs from old at {:?}, from new at {:?}; snapshots {:?} (old {:?}, new {:?})",
        first(&got.live, &before.live),
        first(&got.live, &after.live),
        got.snaps.keys().collect::<Vec<_>>(),
        before.snaps.keys().collect::<Vec<_>>(),
        after.snaps.keys().collect::<Vec<_>>(),
    );
    for (id, (_, bytes)) in &got.snaps {
        let want = before.snaps.get(id).or_else(|| after.snaps.get(id));
        if let Some((_, w)) = want
            && let Some(at) = first(bytes, w)
        {
            out += &format!("; snapshot {id} differs at byte {at}");
        }
    }
    out
}

/// What a concurrent run saw.
#[derive(Debug, Clone, Default)]
pub struct ConcurrentReport {
    /// Requests completed.
    pub ios: u64,
    /// Crash points.
    pub crashes: u64,
    /// Snapshots created (online, with requests in flight).
    pub created: u64,
    /// Snapshots deleted.
    pub deleted: u64,
    /// Shared chunks copied by writes.
    pub copies: u64,
    /// Snapshot sectors compared at checks.
    pub sectors_checked: u64,
    /// Everything that went wrong.
    pub violations: Vec<String>,
}

/// A snapshot the snapshotter asked for.
struct Rec {
    /// Its id once the create returned (or a crash showed it).
    id: Option<u64>,
    /// Per sector, the values it may hold.
    sets: Vec<Vec<Val>>,
    state: RecState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecState {
    Creating,
    Live,
    Deleting,
    Gone,
}

struct World {
    model: Model,
    rng: Rng,
    next_tag: Val,
    inflight: Vec<(u64, u64)>,
    recs: Vec<Rec>,
    ios: u64,
    budget: u64,
    base: Option<Arc<[u8]>>,
    report: ConcurrentReport,
}

impl World {
    fn violation(&mut self, v: String) {
        if self.report.violations.len() < 20 {
            self.report.violations.push(v);
        }
    }

    fn base_sector(&self, s: u64) -> [u8; SECTOR] {
        let mut out = [0u8; SECTOR];
        if let Some(b) = &self.base {
            let off = (s as usize) * SECTOR;
            if off < b.len() {
                let n = (b.len() - off).min(SECTOR);
                out[..n].copy_from_slice(&b[off..off + n]);
            }
        }
        out
    }

    /// The value `bytes` (sector `s`) is, if one of `vals`.
    fn seen(&self, s: u64, bytes: &[u8], vals: &[Val]) -> Result<Val, Seen> {
        let base = self.base_sector(s);
        let seen = model::identify(bytes, s, &base);
        if !model::acceptable(
            seen,
            s,
            model::identify(&base, s, &base) == Seen::Zero,
            vals,
        ) {
            return Err(seen);
        }
        Ok(match seen {
            Seen::Zero if vals.contains(&ZERO) => ZERO,
            Seen::Zero | Seen::Base => BASE,
            Seen::Write { tag, .. } => tag,
            _ => unreachable!("acceptable"),
        })
    }

    /// A sector range no other request has in flight.
    fn pick(&mut self, sectors: u64) -> Option<(u64, u64)> {
        for _ in 0..8 {
            let count = self.rng.range(1, 24).min(sectors);
            // Often right at a chunk boundary of small chunks.
            let first = self.rng.below(sectors - count + 1);
            let clash = self
                .inflight
                .iter()
                .any(|&(f, c)| first < f + c && f < first + count);
            if !clash {
                return Some((first, count));
            }
        }
        None
    }
}

async fn tester(img: Arc<Image>, w: Rc<RefCell<World>>, sim: SimHandle) {
    let sectors = w.borrow().model.len();
    loop {
        let (kind, range) = {
            let mut wb = w.borrow_mut();
            if wb.ios >= wb.budget {
                return;
            }
            let kind = wb.rng.below(100);
            let range = if kind < 90 { wb.pick(sectors) } else { None };
            if let Some(r) = range {
                wb.inflight.push(r);
            }
            (kind, range)
        };
        match (kind, range) {
            (0..=59, Some((first, count))) => {
                let tag = {
                    let mut wb = w.borrow_mut();
                    wb.next_tag += 1;
                    wb.next_tag
                };
                let mut data = vec![0u8; (count as usize) * SECTOR];
                for (i, s) in data.chunks_mut(SECTOR).enumerate() {
                    model::fill_sector(tag, first + i as u64, s);
                }
                let t = w.borrow_mut().model.begin_write(first, count, tag);
                let r = img.write_slice(first * 512, &data, false).await;
                let mut wb = w.borrow_mut();
                wb.model.end_write(t, r.is_ok(), false);
                if let Err(e) = r {
                    wb.violation(format!("write #{tag}: {e}"));
                }
            }
            (60..=69, Some((first, count))) => {
                let t = w.borrow_mut().model.begin_write(first, count, ZERO);
                let r = img.discard(first * 512, count * 512).await;
                let mut wb = w.borrow_mut();
                wb.model.end_write(t, r.is_ok(), false);
                if let Err(e) = r {
                    wb.violation(format!("discard: {e}"));
                }
            }
            (70..=89, Some((first, count))) => {
                let mut buf = vec![0u8; (count as usize) * SECTOR];
                let r = img.read_slice(first * 512, &mut buf).await;
                let mut wb = w.borrow_mut();
                match r {
                    Ok(()) => {
                        for (i, b) in buf.chunks(SECTOR).enumerate() {
                            let s = first + i as u64;
                            let vals = wb.model.live(s);
                            if let Err(seen) = wb.seen(s, b, &vals) {
                                wb.violation(format!(
                                    "read of sector {s}: {seen}, expected {vals:?}"
                                ));
                            }
                        }
                    }
                    Err(e) => wb.violation(format!("read: {e}")),
                }
            }
            _ => {
                let issued = w.borrow_mut().model.flush_issued();
                match img.flush().await {
                    Ok(()) => w.borrow_mut().model.flush_done(issued),
                    Err(e) => w.borrow_mut().violation(format!("flush: {e}")),
                }
            }
        }
        {
            let mut wb = w.borrow_mut();
            if let Some(r) = range {
                let i = wb.inflight.iter().position(|&x| x == r).expect("in flight");
                wb.inflight.swap_remove(i);
            }
            wb.ios += 1;
        }
        let think = w.borrow_mut().rng.range(0, 20_000);
        sim.sleep_ns(think).await;
    }
}

async fn snapshotter(img: Arc<Image>, w: Rc<RefCell<World>>, sim: SimHandle) {
    loop {
        let pause = w.borrow_mut().rng.range(50_000, 400_000);
        sim.sleep_ns(pause).await;
        let (delete, done) = {
            let mut wb = w.borrow_mut();
            let live: Vec<usize> = (0..wb.recs.len())
                .filter(|&i| wb.recs[i].state == RecState::Live)
                .collect();
            let delete = (live.len() > 2 || (!live.is_empty() && wb.rng.chance(0.3)))
                .then(|| live[wb.rng.below(live.len() as u64) as usize]);
            (delete, wb.ios >= wb.budget)
        };
        if done {
            return;
        }
        match delete {
            Some(i) => {
                let id = {
                    let mut wb = w.borrow_mut();
                    wb.recs[i].state = RecState::Deleting;
                    wb.recs[i].id.expect("live snapshots have ids")
                };
                let r = img.delete_snapshot(&SnapshotSel::Id(id.to_string())).await;
                let mut wb = w.borrow_mut();
                match r {
                    Ok(_) => {
                        wb.recs[i].state = RecState::Gone;
                        wb.report.deleted += 1;
                    }
                    Err(e) => wb.violation(format!("delete of snapshot {id}: {e}")),
                }
            }
            None => {
                // What the snapshot must hold: the disk as the model says it
                // is now, requests in flight included; a create is also a
                // flush of everything completed before it.
                let (i, issued) = {
                    let mut wb = w.borrow_mut();
                    let sets = (0..wb.model.len()).map(|s| wb.model.live(s)).collect();
                    wb.recs.push(Rec {
                        id: None,
                        sets,
                        state: RecState::Creating,
                    });
                    (wb.recs.len() - 1, wb.model.flush_issued())
                };
                let r = img.create_snapshot(&format!("s{i}")).await;
                let mut wb = w.borrow_mut();
                match r {
                    Ok(e) => {
                        wb.recs[i].id = Some(e.id);
                        wb.recs[i].state = RecState::Live;
                        wb.report.created += 1;
                        wb.model.flush_done(issued);
                    }
                    Err(e) => wb.violation(format!("create of s{i}: {e}")),
                }
            }
        }
    }
}

/// Testers and a snapshotter on one image, with crash points (see the
/// module docs).
pub fn concurrent(seed: u64, bug: Option<SnapshotBug>) -> ConcurrentReport {
    let exec = Executor::new(seed);
    let sim = exec.handle();
    let mut rng = Rng::new(seed ^ 0x3c0f);
    let chunk_size = *rng.pick(&[4096u32, 8192]);
    let block_size = *rng.pick(&[512u32, 4096]);
    let virtual_size: u64 = 256 << 10;
    let base_bytes: Option<Arc<[u8]>> = rng.chance(0.5).then(|| {
        let n = virtual_size * 3 / 4 + 512;
        (0..n)
            .map(|_| rng.next_u64() as u8)
            .collect::<Vec<u8>>()
            .into()
    });
    let base = base_bytes
        .as_ref()
        .map(|b| SimBase::new(sim.clone(), "base", b.clone()));
    let base_dyn = || base.as_ref().map(|b| Arc::new(b.clone()) as Arc<dyn Base>);
    let mut disk = SimStorage::new(sim.clone(), "image");
    let opts = CreateOptions {
        size: Some(virtual_size),
        base: base.as_ref().map(|_| ("base".into(), Format::Raw)),
        block_size: Some(block_size),
        journal_size: Some(32 << 10),
        compact: true,
        chunk_size: Some(chunk_size),
        grow_unit: Some(chunk_size as u64 * 8),
        ..Default::default()
    };
    let w = Rc::new(RefCell::new(World {
        model: Model::new(virtual_size / SECTOR as u64, |_| BASE),
        rng: rng.fork(),
        next_tag: FIRST_TAG,
        inflight: Vec::new(),
        recs: Vec::new(),
        ios: 0,
        budget: 0,
        base: base_bytes.clone(),
        report: ConcurrentReport::default(),
    }));
    let created = exec.block_on(async {
        let b = base_dyn();
        fvd_core::image::create(&disk, &opts, b.as_deref()).await
    });
    if !matches!(created, Ok(Ok(_))) {
        w.borrow_mut()
            .violation(format!("create failed: {created:?}"));
        return w.borrow().report.clone();
    }
    let sessions = 4;
    for session in 0..sessions {
        let img = match exec.block_on(Image::open(
            Arc::new(disk.clone()),
            base_dyn(),
            OpenOptions::default(),
        )) {
            Ok(Ok(i)) => Arc::new(i),
            other => {
                let msg = format!("open failed: {:?}", other.map(|r| r.map(|_| ())));
                w.borrow_mut().violation(msg);
                break;
            }
        };
        if let Some(b) = bug {
            img.inject_snapshot_bug(b);
        }
        {
            let mut wb = w.borrow_mut();
            wb.budget = wb.ios + 300;
            wb.inflight.clear();
        }
        let testers = rng.range(2, 8) as usize;
        for _ in 0..testers {
            exec.spawn(tester(img.clone(), w.clone(), sim.clone()));
        }
        exec.spawn(snapshotter(img.clone(), w.clone(), sim.clone()));
        let last = session + 1 == sessions;
        if !last {
            exec.set_deadline(Some(exec.now() + rng.range(2_000_000, 20_000_000)));
        }
        let stop = exec.run();
        exec.clear();
        exec.set_deadline(None);
        if stop == Stop::Idle && exec.tasks() > 0 {
            w.borrow_mut()
                .violation("hang: tasks blocked forever".into());
            break;
        }
        w.borrow_mut().report.copies += img
            .stats()
            .chunks_copied
            .load(std::sync::atomic::Ordering::Relaxed);
        if last {
            let closed = exec.block_on(img.close());
            if !matches!(closed, Ok(Ok(()))) {
                w.borrow_mut()
                    .violation(format!("close failed: {closed:?}"));
            }
            drop(img);
            // A clean close: the durable state is the live one.
            let mut wb = w.borrow_mut();
            let f = wb.model.flush_issued();
            wb.model.flush_done(f);
        } else {
            drop(img);
            let policy = CrashPolicy::random(&mut rng);
            disk = disk.crash(&mut rng, policy).0;
            w.borrow_mut().report.crashes += 1;
        }
        check_world(&exec, &disk, base_dyn(), &w);
        if !w.borrow().report.violations.is_empty() {
            break;
        }
    }
    let mut wb = w.borrow_mut();
    wb.report.ios = wb.ios;
    wb.report.clone()
}

/// After a crash (or at the end): check, recover, compare the live disk
/// and every snapshot with what may be there, and narrow the model to it.
fn check_world(
    exec: &Executor,
    disk: &SimStorage,
    base: Option<Arc<dyn Base>>,
    w: &Rc<RefCell<World>>,
) {
    let copy = disk.snapshot("check");
    match exec.block_on(check_storage(&copy, None)) {
        Ok(Ok(r)) if r.corruptions.is_empty() && r.check_errors.is_empty() => {}
        other => {
            let msg = match other {
                Ok(Ok(r)) => format!("check: {:?} {:?}", r.corruptions, r.check_errors),
                Ok(Err(e)) => format!("check failed: {e}"),
                Err(s) => format!("check did not finish ({s:?})"),
            };
            w.borrow_mut().violation(msg);
            return;
        }
    }
    let storage: Arc<dyn Storage> = Arc::new(disk.clone());
    let img = match exec.block_on(Image::open(storage, base.clone(), OpenOptions::default())) {
        Ok(Ok(i)) => i,
        other => {
            let msg = format!("recovery failed: {:?}", other.map(|r| r.map(|_| ())));
            w.borrow_mut().violation(msg);
            return;
        }
    };
    let sectors = w.borrow().model.len();
    let mut live = vec![0u8; (sectors as usize) * SECTOR];
    if !matches!(exec.block_on(img.read_slice(0, &mut live)), Ok(Ok(()))) {
        w.borrow_mut()
            .violation("reading the recovered disk failed".into());
        return;
    }
    {
        let mut wb = w.borrow_mut();
        for s in 0..sectors {
            let vals = wb.model.durable(s);
            let b = &live[(s as usize) * SECTOR..(s as usize + 1) * SECTOR];
            match wb.seen(s, b, &vals) {
                Ok(v) => wb.model.reset(s, v),
                Err(seen) => {
                    wb.violation(format!(
                        "after recovery, sector {s}: {seen}, expected {vals:?}"
                    ));
                    return;
                }
            }
        }
        wb.model.reset_durability();
    }
    // Which snapshots exist must agree with the creates and deletes that
    // returned; an operation cut off may have happened or not.
    let listed = img.snapshots();
    let mut wb = w.borrow_mut();
    for l in &listed {
        if wb.recs.iter().any(|r| r.id == Some(l.id)) {
            continue;
        }
        match wb.recs.iter_mut().find(|r| r.state == RecState::Creating) {
            Some(r) => {
                r.id = Some(l.id);
                r.state = RecState::Live;
            }
            None => wb.violation(format!("snapshot {} exists but was never created", l.id)),
        }
    }
    for r in wb.recs.iter_mut() {
        let present = r.id.is_some_and(|id| listed.iter().any(|l| l.id == id));
        match (r.state, present) {
            (RecState::Live, false) => {}
            (RecState::Creating | RecState::Deleting, false) => r.state = RecState::Gone,
            (RecState::Deleting, true) => r.state = RecState::Live,
            _ => {}
        }
    }
    let lost: Vec<u64> = wb
        .recs
        .iter()
        .filter(|r| r.state == RecState::Live)
        .filter_map(|r| r.id)
        .filter(|id| !listed.iter().any(|l| l.id == *id))
        .collect();
    for id in lost {
        wb.violation(format!("snapshot {id} was created but is gone"));
    }
    drop(wb);
    // Every snapshot reads what it held when it was taken.
    let n = w.borrow().recs.len();
    for i in 0..n {
        let Some(id) = w.borrow().recs[i]
            .id
            .filter(|_| w.borrow().recs[i].state == RecState::Live)
        else {
            continue;
        };
        let view = exec.block_on(Image::open_snapshot(
            Arc::new(disk.clone()),
            base.clone(),
            &SnapshotSel::Id(id.to_string()),
        ));
        let v = match view {
            Ok(Ok(v)) => v,
            other => {
                let msg = format!(
                    "snapshot {id} does not open: {:?}",
                    other.map(|r| r.map(|_| ()))
                );
                w.borrow_mut().violation(msg);
                return;
            }
        };
        let mut bytes = vec![0u8; (sectors as usize) * SECTOR];
        if !matches!(exec.block_on(v.read_slice(0, &mut bytes)), Ok(Ok(()))) {
            w.borrow_mut()
                .violation(format!("reading snapshot {id} failed"));
            return;
        }
        let mut wb = w.borrow_mut();
        for s in 0..sectors {
            let b = &bytes[(s as usize) * SECTOR..(s as usize + 1) * SECTOR];
            let vals = wb.recs[i].sets[s as usize].clone();
            match wb.seen(s, b, &vals) {
                Ok(v) => wb.recs[i].sets[s as usize] = vec![v],
                Err(seen) => {
                    wb.violation(format!(
                        "snapshot {id}, sector {s}: {seen}, expected {vals:?}"
                    ));
                    return;
                }
            }
        }
        wb.report.sectors_checked += sectors;
    }
    let _ = exec.block_on(img.close());
}
