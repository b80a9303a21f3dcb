//! Internal snapshots in the simulator (`fvd_sim::snapshots`): create,
//! delete and apply crashed at every I/O; testers writing into chunks
//! shared with snapshots taken and deleted online, with crash points; and
//! the mutation checks — the same runs on an engine broken on purpose must
//! report violations.
//!
//! `FVD_SNAP_SEEDS=N` runs N seeds instead of the default.

use fvd_core::image::snapshot::SnapshotBug;
use fvd_sim::snapshots::{SnapOp, concurrent, sweep};

fn seeds(default: u64) -> u64 {
    std::env::var("FVD_SNAP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn sweep_all(op: SnapOp) {
    let mut points = 0;
    let mut outcomes = [0u64; 2];
    for seed in 1..=seeds(24) {
        let r = sweep(op, seed, None);
        assert!(
            r.violations.is_empty(),
            "{op:?} seed {seed}: {} violations, first: {}",
            r.violations.len(),
            r.violations[0]
        );
        assert!(r.ios > 3, "{op:?} seed {seed}: only {} I/Os", r.ios);
        points += r.points;
        outcomes[0] += r.outcomes[0];
        outcomes[1] += r.outcomes[1];
    }
    eprintln!("{op:?}: {points} crash points, old/new state {outcomes:?}");
    // Both sides of the commit point were hit.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{op:?}: {outcomes:?}");
}

#[test]
fn create_crashed_at_every_io() {
    sweep_all(SnapOp::Create);
}

#[test]
fn delete_crashed_at_every_io() {
    sweep_all(SnapOp::Delete);
}

#[test]
fn apply_crashed_at_every_io() {
    sweep_all(SnapOp::Apply);
}

#[test]
fn shared_chunks_under_concurrent_writes_and_online_snapshots() {
    let (mut created, mut copies, mut checked, mut crashes) = (0, 0, 0, 0);
    for seed in 1..=seeds(40) {
        let r = concurrent(seed, None);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        created += r.created;
        copies += r.copies;
        checked += r.sectors_checked;
        crashes += r.crashes;
    }
    eprintln!(
        "{created} snapshots taken online, {copies} shared chunks copied, {checked} snapshot sectors checked, {crashes} crashes"
    );
    assert!(created > 0 && copies > 0 && checked > 0);
}

#[test]
fn mutation_skipping_the_copy_of_a_shared_chunk_is_caught() {
    let caught = (1..=seeds(12))
        .filter(|&seed| {
            !concurrent(seed, Some(SnapshotBug::SkipSharedCopy))
                .violations
                .is_empty()
        })
        .count();
    eprintln!(
        "skip-shared-copy: caught in {caught} of {} seeds",
        seeds(12)
    );
    assert!(caught > 0, "the simulator missed writes into shared chunks");
}

#[test]
fn mutation_freeing_before_the_directory_is_durable_is_caught() {
    let mut violations = 0;
    for seed in 1..=seeds(6) {
        violations += sweep(SnapOp::Delete, seed, Some(SnapshotBug::EarlyFree))
            .violations
            .len();
    }
    eprintln!("early-free: {violations} violations");
    assert!(violations > 0, "the simulator missed an early free");
}
