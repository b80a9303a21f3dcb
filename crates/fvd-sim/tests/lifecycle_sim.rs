//! Crash safety of the lifecycle operations in the simulator: each
//! operation runs on simulated disks (image and base) with a volatile write
//! cache and is cut off at a sweep of points in virtual time; the disks then
//! crash (a random part of the unflushed writes survives, torn or not). The
//! image must open and read exactly as before the operation or as after it,
//! `check` must find no corruption (space left behind is at most a leak),
//! and running the operation again must finish it.

use std::sync::Arc;

use fvd_core::base::{Base, RawBase};
use fvd_core::lifecycle::commit::{BaseWriter, commit};
use fvd_core::lifecycle::rebase::{NewBase, rebase};
use fvd_core::lifecycle::resize::resize;
use fvd_core::storage::Storage;
use fvd_core::{CreateOptions, Format, Image, IoBuf, OpenOptions};
use fvd_sim::{CrashPolicy, Executor, Rng, SimStorage};

/// The operations under test.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Grow an image smaller than its base past the base's end.
    GrowOverBase,
    /// Shrink below the base's size.
    Shrink,
    /// Grow a compact image so far that its table moves the data region.
    GrowTable,
    /// Commit into the raw base (emptying the image, or keeping it).
    Commit(bool),
    /// Safe rebase onto the second base.
    Rebase,
    /// Flatten.
    Flatten,
}

struct Disks {
    image: SimStorage,
    bases: [SimStorage; 2],
}

impl Disks {
    /// Crash every disk: with a random policy, or (`adversarial`) keeping
    /// only the image's unflushed header writes — metadata that reached the
    /// disk before everything it relies on.
    fn crash(&self, rng: &mut Rng, adversarial: bool) -> Disks {
        if adversarial {
            return Disks {
                image: self.image.crash_keeping(|off, _| off < 8192),
                bases: [
                    self.bases[0].crash_keeping(|_, _| false),
                    self.bases[1].crash_keeping(|_, _| false),
                ],
            };
        }
        let policy = CrashPolicy::random(rng);
        Disks {
            image: self.image.crash(rng, policy).0,
            bases: [
                self.bases[0].crash(rng, policy).0,
                self.bases[1].crash(rng, policy).0,
            ],
        }
    }

    fn snapshot(&self) -> Disks {
        Disks {
            image: self.image.snapshot("img"),
            bases: [self.bases[0].snapshot("b0"), self.bases[1].snapshot("b1")],
        }
    }

    fn base(&self, i: usize) -> Arc<dyn Base> {
        Arc::new(RawBase::new(Arc::new(self.bases[i].clone())).unwrap())
    }
}

const BASE: u64 = 1 << 20;

fn setup(exec: &Executor, op: Op, seed: u64) -> Disks {
    let h = exec.handle();
    let disks = Disks {
        image: SimStorage::new(h.clone(), "img"),
        bases: [SimStorage::new(h.clone(), "b0"), SimStorage::new(h, "b1")],
    };
    let compact = matches!(op, Op::GrowTable) || seed % 2 == 1;
    let size = match op {
        Op::GrowOverBase | Op::GrowTable => BASE / 2 + 1536,
        _ => BASE + (64 << 10),
    };
    exec.block_on(async {
        for (i, b) in disks.bases.iter().enumerate() {
            b.set_len(BASE).await.unwrap();
            let data: Vec<u8> = (0..BASE)
                .map(|x| ((x / 512) as u8).wrapping_mul(7 + i as u8) | 1)
                .collect();
            b.write_at(0, IoBuf::from_slice(&data), false)
                .await
                .unwrap();
            // The second base shares the first's first half.
            if i == 1 {
                let same: Vec<u8> = (0..BASE / 2)
                    .map(|x| ((x / 512) as u8).wrapping_mul(7) | 1)
                    .collect();
                b.write_at(0, IoBuf::from_slice(&same), false)
                    .await
                    .unwrap();
            }
            b.flush().await.unwrap();
        }
        let opts = CreateOptions {
            size: Some(size),
            base: Some(("b0".into(), Format::Raw)),
            block_size: Some(if compact { 512 } else { 4096 }),
            journal_size: Some(64 << 10),
            compact,
            chunk_size: compact.then_some(if matches!(op, Op::GrowTable) {
                512
            } else {
                8192
            }),
            fingerprint_base: true,
            ..Default::default()
        };
        fvd_core::image::create(&disks.image, &opts, Some(disks.base(0).as_ref()))
            .await
            .unwrap();
        let img = Image::open(
            Arc::new(disks.image.clone()),
            Some(disks.base(0)),
            OpenOptions::default(),
        )
        .await
        .unwrap();
        let mut rng = Rng::new(seed);
        for _ in 0..12 {
            let off = rng.below(size / 512) * 512;
            let len = (rng.below(64) + 1) * 512;
            let len = len.min(size - off);
            let byte = rng.below(255) as u8 + 1;
            img.write(off, IoBuf::from_slice(&vec![byte; len as usize]), false)
                .await
                .unwrap();
        }
        if matches!(op, Op::GrowTable) {
            // Every chunk in use: moving the data region's start needs the
            // table to grow first.
            for off in (0..size).step_by(4096) {
                let n = 4096.min(size - off);
                img.write(off, IoBuf::from_slice(&vec![0x5a; n as usize]), false)
                    .await
                    .unwrap();
            }
        }
        img.close().await.unwrap();
    })
    .unwrap();
    disks
}

/// The image's base (index), before and after the operation.
fn bases_of(op: Op) -> (Option<usize>, Option<usize>) {
    match op {
        Op::Rebase => (Some(0), Some(1)),
        Op::Flatten => (Some(0), None),
        _ => (Some(0), Some(0)),
    }
}

async fn run_op(d: &Disks, op: Op) -> fvd_core::Result<()> {
    let img: Arc<dyn Storage> = Arc::new(d.image.clone());
    let b0 = Some(d.base(0));
    match op {
        Op::GrowOverBase => resize(img, b0, BASE + 8192, false).await.map(|_| ()),
        Op::Shrink => resize(img, b0, BASE / 4 + 512, true).await.map(|_| ()),
        Op::GrowTable => resize(img, b0, 64 << 20, false).await.map(|_| ()),
        Op::Commit(keep) => {
            let w = BaseWriter::Raw(Arc::new(d.bases[0].clone()));
            commit(img, &w, keep).await.map(|_| ())
        }
        Op::Rebase => {
            let new = NewBase::Base {
                name: "b1".into(),
                format: Format::Raw,
                base: d.base(1),
                fingerprint: true,
            };
            rebase(img, b0, new, false).await.map(|_| ())
        }
        Op::Flatten => rebase(img, b0, NewBase::Nothing, false).await.map(|_| ()),
    }
}

/// The image's whole content over base `base` (None: no base), and its size.
async fn view(d: &Disks, base: Option<usize>) -> fvd_core::Result<Vec<u8>> {
    let img = Image::open(
        Arc::new(d.image.clone()),
        base.map(|i| d.base(i)),
        OpenOptions { read_only: true },
    )
    .await?;
    let v = img
        .read(0, IoBuf::zeroed(img.virtual_size() as usize))
        .await?;
    Ok(v.to_vec())
}

/// Which base the (crashed) image names: 0, 1 or none.
async fn named_base(d: &Disks) -> Option<usize> {
    let (h, _) = fvd_core::image::read_header(&d.image).await.unwrap();
    match h.base_name.as_str() {
        "" => None,
        "b0" => Some(0),
        _ => Some(1),
    }
}

fn sweep(op: Op, seed: u64, points: u64) {
    let exec = Executor::new(seed);
    // The operation run to the end: its duration and the view after it.
    let reference = setup(&exec, op, seed);
    let (before_base, after_base) = bases_of(op);
    let before = exec
        .block_on(view(&reference, before_base))
        .unwrap()
        .unwrap();
    let t0 = exec.now();
    exec.block_on(run_op(&reference, op)).unwrap().unwrap();
    let duration = exec.now() - t0;
    let after = exec
        .block_on(view(&reference, after_base))
        .unwrap()
        .unwrap();
    let mut rng = Rng::new(seed ^ 0xc4a5);
    let mut outcomes = [0u32; 2];
    for k in 0..points * 2 {
        let (i, adversarial) = (k / 2, k % 2 == 1);
        let exec = Executor::new(seed.wrapping_add(i));
        let disks = setup(&exec, op, seed);
        // From the start to well past the end (each run's latencies differ,
        // so the last points complete).
        let cut = duration * i * 3 / (points * 2) + (i * 7919) % (duration / points + 1);
        exec.set_deadline(Some(exec.now() + cut));
        let finished = exec.block_on(run_op(&disks, op));
        exec.set_deadline(None);
        exec.clear();
        if let Ok(r) = finished {
            r.unwrap_or_else(|e| panic!("{op:?} seed {seed} point {i}: {e}"));
        }
        let crashed = disks.crash(&mut rng, adversarial);
        let what = format!(
            "{op:?} seed {seed} point {i}{} (cut at {cut} of {duration} ns)",
            if adversarial { " adversarial" } else { "" }
        );
        let base = exec.block_on(named_base(&crashed)).unwrap();
        let got = exec
            .block_on(view(&crashed, base))
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: the image does not open: {e}"));
        if got == before {
            outcomes[0] += 1;
        } else if got == after {
            outcomes[1] += 1;
        } else {
            let other = if got.len() == before.len() {
                &before
            } else {
                &after
            };
            let at = got.iter().zip(other.iter()).position(|(a, b)| a != b);
            panic!(
                "{what}: neither the old nor the new content (size {} vs {}/{}; first difference at {at:?})",
                got.len(),
                before.len(),
                after.len()
            );
        }
        let report = exec
            .block_on(fvd_core::check::check_storage(&crashed.image, None))
            .unwrap()
            .unwrap();
        assert!(
            report.corruptions.is_empty() && report.check_errors.is_empty(),
            "{what}: check: {:?} {:?}",
            report.corruptions,
            report.check_errors
        );
        // Running the operation again finishes it.
        let again = Disks {
            image: crashed.image.clone(),
            bases: [crashed.bases[0].clone(), crashed.bases[1].clone()],
        };
        // A rebase that switched already names its new base: nothing to
        // run again (the old base would not match any more).
        let switched = matches!(op, Op::Rebase | Op::Flatten) && base == after_base;
        let rerun = if switched {
            Ok(())
        } else {
            exec.block_on(run_op(&again, op)).unwrap()
        };
        rerun.unwrap_or_else(|e| panic!("{what}: running it again: {e}"));
        let end = exec.block_on(view(&again, after_base)).unwrap().unwrap();
        assert!(end == after, "{what}: running it again gave other content");
        let _ = again.snapshot();
    }
    // The sweep must have seen both sides of the commit point (when the
    // operation changes what the guest reads at all).
    if before != after {
        assert!(
            outcomes[0] > 0 && outcomes[1] > 0,
            "{op:?}: outcomes {outcomes:?}"
        );
    }
}

#[test]
fn resize_survives_crashes() {
    for seed in 1..=4 {
        sweep(Op::GrowOverBase, seed, 40);
        sweep(Op::Shrink, seed, 40);
    }
}

#[test]
fn table_growth_survives_crashes() {
    sweep(Op::GrowTable, 11, 60);
}

#[test]
fn commit_survives_crashes() {
    for seed in 1..=4 {
        sweep(Op::Commit(seed % 2 == 0), seed, 40);
    }
}

#[test]
fn rebase_and_flatten_survive_crashes() {
    for seed in 1..=4 {
        sweep(Op::Rebase, seed, 40);
        sweep(Op::Flatten, seed, 40);
    }
}
