//! Deterministic simulation testing of the engine (after FVD's `blksim` and
//! `qemu-test`, see docs).
//!
//! Every source of nondeterminism — task scheduling, I/O latency and
//! completion order, injected faults, what survives a crash — is drawn from
//! one seeded random stream under virtual time, so a failing seed replays
//! exactly.
//!
//! * [`executor`] — a single-threaded executor with virtual time and timers,
//!   which also runs the engine's background work (copy-on-read fills,
//!   prefetch) through its spawner and clock;
//! * [`storage`] — [`SimStorage`], a disk with a volatile write cache,
//!   faults and crashes, and [`SimBase`], a base with faults and short reads;
//! * [`model`] — the per-sector truth model;
//! * [`harness`] — random testers, crash points and whole-disk checks;
//! * [`fuzz`] — the bodies of the fuzz targets, shared with stable tests.
//!
//! The module has no dependencies beyond the crate's own and is always
//! compiled, so integration tests and the fuzz crate can use it.

pub mod executor;
pub mod fuzz;
pub mod harness;
pub mod model;
pub mod rng;
pub mod storage;

pub use executor::{Executor, SimClock, SimHandle, Sleep, Stop, sleep};
pub use harness::{
    SimConfig, SimReport, Violation, background_seed, check_consistency, is_background_seed, run,
};
pub use rng::Rng;
pub use storage::{CrashPolicy, CrashReport, Faults, Latency, Pages, SimBase, SimStorage};
