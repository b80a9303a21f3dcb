//! Deterministic simulation testing of the engine (after FVD's `blksim` and
//! `qemu-test`, see docs).
//!
//! Every source of nondeterminism — task scheduling, I/O latency and
//! completion order, injected faults, what survives a crash — is drawn from
//! one seeded random stream under virtual time, so a failing seed replays
//! exactly.
//!
//! * [`runtime`] — the simulated runtime in one place: a single-threaded
//!   executor with virtual time and timers, the engine's [`Spawner`]
//!   (background copy-on-read fills run as its tasks) and [`Clock`]
//!   (prefetch pacing on virtual time and the seeded random stream);
//! * [`storage`] — [`SimStorage`], a disk with a volatile write cache,
//!   faults and crashes, and [`SimBase`], a base with faults and short reads;
//! * [`model`] — the per-sector truth model;
//! * [`harness`] — random testers, crash points and whole-disk checks;
//! * [`fuzz`] — the bodies of the fuzz targets, shared with stable tests.
//!
//! A crate of its own, so the production library carries none of it; it
//! depends on fvd-core's public interface only. Its tests (`tests/sim.rs`,
//! `tests/fuzz_corpus.rs`) and the cargo-fuzz targets (`fuzz/`) use it.
//!
//! [`Spawner`]: fvd_core::executor::Spawner
//! [`Clock`]: fvd_core::executor::Clock

pub mod fuzz;
pub mod harness;
pub mod model;
pub mod rng;
pub mod runtime;
pub mod snapshots;
pub mod storage;

pub use harness::{
    SimConfig, SimReport, Violation, background_seed, check_consistency, is_background_seed, run,
};
pub use rng::Rng;
pub use runtime::{Executor, SimClock, SimHandle, Sleep, Stop, sleep};
pub use storage::{CrashPolicy, CrashReport, Faults, Latency, Pages, SimBase, SimStorage};
