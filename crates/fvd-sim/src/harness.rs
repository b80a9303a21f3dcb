//! Random testers, crash points and whole-disk checks: one simulated run.
//!
//! A run creates an image (over a base, or not) on a [`SimStorage`], opens
//! it, and starts N tester tasks. Each tester issues one request at a time:
//! reads, writes (some FUA), discards, write_zeroes, flushes and
//! block-status queries, of random sector-aligned offsets and lengths (often
//! not block aligned, often crossing blocks, often right next to another
//! tester's request), never overlapping another tester's in-flight write.
//! Reads are checked against the [`Model`] as they complete.
//!
//! At random points the run crashes: every task is dropped, the disk keeps
//! its durable bytes plus a random part of the rest, the image is checked
//! for consistency and reopened (journal replay — itself sometimes crashed),
//! the whole disk is compared with what the model allows, and the run goes
//! on with the reopened image. At the end the image is flushed, closed,
//! checked and compared once more.
//!
//! Background seeds ([`background_seed`]) add the engine's background work:
//! copy-on-read fills spawned as tasks of the executor after the guest read
//! returned, and a prefetch task per session (adaptive or profile order,
//! soft or journaled fills, sometimes rate-capped, under the simulator's
//! clock) racing the testers, the crash points and the faults. Nothing in
//! the model changes for them — fills and prefetch never change what a
//! sector reads — so every read and every whole-disk check also asserts that
//! a fill never overwrote a guest write and never changed data the guest did
//! not write. Once a prefetch completes the base must be detached: after a
//! crash whose header says so the image is reopened *without* its base. At
//! the end a last prefetch runs without faults; it must complete, leave
//! every block local and the disk as the model says.

use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use crate::model::{self, BASE, FIRST_TAG, Model, SECTOR, Seen, Val, ZERO};
use crate::rng::{Rng, mix64};
use crate::runtime::{Executor, SimHandle, Stop};
use crate::storage::{CrashPolicy, Faults, Latency, SimBase, SimStorage};
use fvd_core::base::Base;
use fvd_core::error::ErrorKind;
use fvd_core::format::header::FLAG_ALL_LOCAL;
use fvd_core::image::prefetch::{
    PrefetchConfig, PrefetchMode, PrefetchState, PrefetchStatus, prefetch,
};
use fvd_core::image::{CreateOptions, Image, OpenOptions, Source};
use fvd_core::iobuf::IoBuf;
use fvd_core::storage::Storage;
use fvd_core::{EarlyJournal, Mutation};

/// Top 16 bits of every background seed (see [`background_seed`]).
const BACKGROUND_TAG: u64 = 0xb6f0;
/// Top 16 bits of every rewrite seed (see [`rewrite_seed`]).
const REWRITE_TAG: u64 = 0x5e77;

/// The `i`-th background seed: its configuration (see
/// [`SimConfig::from_seed`]) adds background copy-on-read and/or a prefetch
/// task to a configuration drawn like any other. The seed alone says so
/// (its top 16 bits), so a background seed replays like any other.
pub fn background_seed(i: u64) -> u64 {
    (mix64(i ^ 0x0b6f_05ee_d000) >> 16) | (BACKGROUND_TAG << 48)
}

/// True for seeds made by [`background_seed`].
pub fn is_background_seed(seed: u64) -> bool {
    seed >> 48 == BACKGROUND_TAG
}

/// The `i`-th rewrite seed: a configuration (see
/// [`SimConfig::add_rewrite_pressure`]) that aims at the one-fdatasync
/// commit's weak spots — copy-on-write blocks rewritten right after the
/// flush that made them durable, crashes before the next flush, torn data
/// under durable journal records.
pub fn rewrite_seed(i: u64) -> u64 {
    (mix64(i ^ 0x05e7_75ee_d000) >> 16) | (REWRITE_TAG << 48)
}

/// True for seeds made by [`rewrite_seed`].
pub fn is_rewrite_seed(seed: u64) -> bool {
    seed >> 48 == REWRITE_TAG
}

/// Everything that shapes one run. [`SimConfig::from_seed`] derives a
/// varied configuration from the seed alone, so a seed replays a run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed of every random decision.
    pub seed: u64,
    /// Virtual disk size (multiple of 512).
    pub virtual_size: u64,
    /// Base size, or None for an image without a base.
    pub base_size: Option<u64>,
    /// Bytes per bitmap block.
    pub block_size: u32,
    /// Journal size (small, so the journal fills and is checkpointed).
    pub journal_size: u64,
    /// Mark zero blocks of the base local at create.
    pub detect_zeroes: bool,
    /// Concurrent testers.
    pub testers: usize,
    /// Requests to complete before the run ends.
    pub ios: u64,
    /// Mean number of requests between crash points (0: never crash).
    pub ios_per_crash: u64,
    /// Longest request, in sectors.
    pub max_sectors: u64,
    /// Percent of requests that are flushes.
    pub flush_percent: u64,
    /// Probability that a recovery (reopen) is itself crashed.
    pub recovery_crash: f64,
    /// Faults of the image storage while testers run.
    pub image_faults: Faults,
    /// Faults of the base while testers run.
    pub base_faults: Faults,
    /// Extra allocated bytes allowed past what the image holds at each
    /// (re)open; None: unlimited. Writes beyond it fail with ENOSPC.
    pub space_slack: Option<u64>,
    /// I/O latency of image and base.
    pub latency: Latency,
    /// Compact image (chunk table) of this chunk size, or the sparse layout.
    pub compact_chunk: Option<u32>,
    /// Copy-on-read (foreground fills: a read returns after its fill).
    pub copy_on_read: bool,
    /// With copy-on-read: fills run as background tasks of the executor
    /// (through the engine's spawner), after the guest read returned.
    pub background_cor: bool,
    /// A prefetch task runs alongside the testers in every session (until
    /// the base is detached or the request budget is spent), and once more
    /// without faults at the end.
    pub prefetch: Option<PrefetchConfig>,
    /// Probability that a request goes to (or right next to) a range one of
    /// the last writes wrote: copy-on-write blocks rewritten soon after.
    pub rewrite_recent: f64,
    /// Probability that a write surviving a crash is torn; None: drawn per
    /// crash as usual.
    pub tear: Option<f64>,
    /// A deliberate break of the engine's commit protocol (mutation checks).
    pub mutation: Mutation,
    /// Encrypted image (LUKS1 key slots, AES-XTS data, [`sim_key`]).
    pub encrypted: bool,
    /// When writes journal their bits alongside their data (drawn from a
    /// stream of its own: half the seeds `Always`, the rest as in
    /// production).
    pub early_journal: EarlyJournal,
}

/// The passphrase of encrypted simulated images (every open of the
/// harness gives it; images that are not encrypted ignore it).
pub fn sim_key() -> fvd_core::crypt::Secret {
    fvd_core::crypt::Secret::new(b"fvd-sim passphrase".to_vec())
}

impl SimConfig {
    /// A configuration drawn from `seed`: block size 512/4096/65536, no
    /// base, a base smaller than the image (unaligned end), as large, or
    /// larger; sparse or (a quarter of the seeds) compact layout;
    /// copy-on-read in a third; 1 to 64 testers; faults in about a third;
    /// encrypted in a quarter.
    /// Background seeds ([`background_seed`]) then get a base and background
    /// work (see [`SimConfig::add_background_work`]).
    pub fn from_seed(seed: u64) -> Self {
        let mut cfg = Self::classic(seed);
        if is_background_seed(seed) {
            cfg.add_background_work();
        }
        if is_rewrite_seed(seed) {
            cfg.add_rewrite_pressure();
        }
        cfg
    }

    fn classic(seed: u64) -> Self {
        let mut r = Rng::new(seed ^ 0x000c_0f19_u64.rotate_left(40));
        let block_size = *r.pick(&[512u32, 4096, 65536]);
        let min_size: u64 = if block_size == 65536 {
            512 << 10
        } else {
            64 << 10
        };
        let virtual_size = *r.pick(&[
            min_size,
            min_size.max(256 << 10),
            min_size.max(512 << 10),
            1 << 20,
        ]);
        let base_size = match r.below(20) {
            0..=3 => None,
            4..=10 => Some(virtual_size * r.range(1, 7) / 8 + *r.pick(&[0, 100, 1536, 4096])),
            11..=14 => Some(virtual_size),
            _ => Some(virtual_size + r.range(1, 64) * 512 + *r.pick(&[0, 100])),
        };
        let testers = *r.pick(&[1usize, 2, 4, 8, 16, 16, 32, 32, 64]);
        let faults = r.below(3) == 0;
        let image_faults = if faults {
            Faults {
                read_error: *r.pick(&[0.0, 0.002, 0.01]),
                write_error: *r.pick(&[0.0, 0.002, 0.01]),
                flush_error: *r.pick(&[0.0, 0.005, 0.02]),
                zero_error: *r.pick(&[0.0, 0.01]),
                ..Faults::default()
            }
        } else {
            Faults::default()
        };
        let base_faults = if faults && base_size.is_some() {
            Faults {
                read_error: *r.pick(&[0.0, 0.002, 0.01]),
                short_read: *r.pick(&[0.0, 0.002, 0.01]),
                ..Faults::default()
            }
        } else {
            Faults::default()
        };
        let space_slack = if faults && r.below(3) == 0 {
            Some(r.range(0, 64) * 4096)
        } else {
            None
        };
        SimConfig {
            seed,
            virtual_size,
            base_size,
            block_size,
            journal_size: *r.pick(&[4096u64, 8192, 16384, 65536]),
            detect_zeroes: r.below(2) == 0,
            testers,
            ios: 5000,
            ios_per_crash: *r.pick(&[20u64, 60, 100, 150, 300]),
            max_sectors: *r.pick(&[8u64, 24, 64, 160]),
            flush_percent: *r.pick(&[1u64, 5, 10, 20]),
            recovery_crash: *r.pick(&[0.0, 0.1, 0.3]),
            image_faults,
            base_faults,
            space_slack,
            latency: Latency {
                min: 1_000,
                max: *r.pick(&[20_000u64, 100_000, 1_000_000]),
                tail: *r.pick(&[0.0, 0.02]),
                tail_max: 5_000_000,
            },
            compact_chunk: (r.below(4) == 0)
                .then(|| block_size.max(*r.pick(&[4096u32, 16384, 65536]))),
            copy_on_read: r.below(3) == 0,
            background_cor: false,
            prefetch: None,
            rewrite_recent: 0.0,
            tear: None,
            mutation: Mutation::None,
            // Drawn last, so the other fields of a seed stay as they were.
            encrypted: r.below(4) == 0,
            early_journal: if Rng::new(seed ^ 0x6561_726c_u64.rotate_left(28)).below(2) == 0 {
                EarlyJournal::Always
            } else {
                EarlyJournal::Auto
            },
        }
    }

    /// Make this a rewrite configuration (drawn from the seed, from a stream
    /// of its own): 1500 requests on a base as large as the disk (so every
    /// first write is a copy-on-write), half to nine tenths of them on a
    /// range one of the last 16 writes wrote, a fifth to a third of them
    /// flushes, a crash every 10 to 40 requests (usually between two
    /// flushes, some right after a flush), and many surviving writes torn —
    /// data under journal records that made it.
    pub fn add_rewrite_pressure(&mut self) {
        let mut r = Rng::new(self.seed ^ 0x7265_7772_u64.rotate_left(20));
        self.ios = 1500;
        self.base_size = Some(self.virtual_size);
        self.detect_zeroes = false;
        self.testers = *r.pick(&[1usize, 2, 4, 8]);
        self.rewrite_recent = *r.pick(&[0.5, 0.75, 0.9]);
        self.max_sectors = (*r.pick(&[1u64, 2, 8, 24])).max(1);
        self.flush_percent = *r.pick(&[20u64, 25, 33]);
        self.ios_per_crash = *r.pick(&[10u64, 20, 40]);
        self.tear = Some(*r.pick(&[0.5, 0.9]));
        self.copy_on_read = r.below(4) == 0;
        self.journal_size = *r.pick(&[8192u64, 65536]);
        if r.below(2) == 0 {
            // No injected I/O errors: every crash is a clean cut.
            self.image_faults = Faults::default();
            self.base_faults = Faults::default();
            self.space_slack = None;
        }
    }

    /// Make this a background configuration (drawn from the seed, from a
    /// stream of its own): 3000 requests; a base if there was none;
    /// copy-on-read in the background, a prefetch task, or both; the
    /// prefetch in adaptive or (a quarter) profile order, journaled like
    /// offline prefetch in a third, rate-capped in a third, often pausing
    /// for a "slow" base.
    pub fn add_background_work(&mut self) {
        let mut r = Rng::new(self.seed ^ 0x6b67_7764_u64.rotate_left(24));
        let v = self.virtual_size;
        // Shorter runs, more of them: the shapes of background work vary more
        // from seed to seed than within a run.
        self.ios = 3000;
        if self.base_size.is_none() {
            self.base_size = Some(match r.below(3) {
                0 => v * r.range(1, 7) / 8 + *r.pick(&[0, 100, 1536, 4096]),
                1 => v,
                _ => v + r.range(1, 64) * 512,
            });
        }
        let (cor, pf) = match r.below(3) {
            0 => (true, false),
            1 => (false, true),
            _ => (true, true),
        };
        if cor {
            self.copy_on_read = true;
            self.background_cor = true;
        }
        if !pf {
            return;
        }
        let bs = self.block_size as u64;
        let us = std::time::Duration::from_micros;
        // Fields not drawn here keep the engine's defaults.
        let mut p = PrefetchConfig {
            mode: if r.below(4) == 0 {
                PrefetchMode::Profile
            } else {
                PrefetchMode::Adaptive
            },
            ..PrefetchConfig::default()
        };
        p.start_delay = us(*r.pick(&[0, 0, 100, 1000, 5000]));
        // The whole disk in 5 ms, 50 ms or 0.5 s of virtual time.
        p.rate_limit = (r.below(3) == 0).then(|| v * 1000 / *r.pick(&[5, 50, 500]));
        p.step_bytes = bs.max(*r.pick(&[512, 4096, 16384, 65536, 262144]));
        // 0: never pause; u64::MAX: the base always looks slow.
        p.min_throughput = *r.pick(&[0, 0, 256 << 20, u64::MAX]);
        p.max_pause = us(1000 * *r.pick(&[1, 5]));
        p.yield_delay = us(*r.pick(&[100, 1000, 5000]));
        p.hard = r.below(3) == 0;
        p.flush_every = *r.pick(&[16 << 10, 256 << 10, 64 << 20]);
        self.prefetch = Some(p);
    }
}

/// Something the engine did that its contract forbids.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Seed of the run.
    pub seed: u64,
    /// Requests completed when it was found.
    pub step: u64,
    /// Crash points passed when it was found.
    pub crash: u64,
    /// Virtual time (ns).
    pub time: u64,
    /// What went wrong.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} step={} crash={} t={}ns: {}  (replay: FVD_SIM_SEED={} cargo test -p fvd-sim --test sim)",
            self.seed, self.step, self.crash, self.time, self.what, self.seed
        )
    }
}

/// The outcome of one run.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Seed of the run.
    pub seed: u64,
    /// Crash points simulated (recovery crashes included).
    pub crash_points: u64,
    /// Requests completed by testers.
    pub ios: u64,
    /// Faults injected.
    pub faults: u64,
    /// Virtual time at the end (ns).
    pub virtual_ns: u64,
    /// Contract violations (a run stops at the first one it detects).
    pub violations: Vec<Violation>,
    /// Prefetch tasks that completed (the base detached).
    pub prefetches_done: u64,
    /// Prefetch tasks that failed (with faults injected).
    pub prefetches_failed: u64,
    /// Bytes copied from the base into the image by copy-on-read and
    /// prefetch fills.
    pub fill_bytes: u64,
    /// The image ended all-local, its base detached.
    pub detached: bool,
    /// Recoveries after a crash that found the image detached and opened,
    /// checked and compared it without its base.
    pub detached_reopens: u64,
    /// Commit rounds that wrote journal blocks (all sessions).
    pub commit_rounds: u64,
    /// Of those, ordered rounds (data made durable before the journal).
    pub ordered_rounds: u64,
    /// Rounds run to confirm records before a rewrite in place.
    pub confirm_rounds: u64,
    /// Early journal blocks (written by writes alongside their data).
    pub early_blocks: u64,
    /// Checked bits replay dropped because their data had not become durable.
    pub replay_dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    tester: usize,
    first: u64,
    end: u64,
    write: bool,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write {
        tag: Val,
        fua: bool,
    },
    Zero {
        unmap: bool,
        fua: bool,
        discard: bool,
    },
    Flush,
    Status,
}

struct World {
    cfg: SimConfig,
    sim: SimHandle,
    model: Model,
    base: Option<Arc<[u8]>>,
    rng: Rng,
    inflight: Vec<Flight>,
    /// The last writes planned (first sector, sectors), for rewrite seeds.
    recent: Vec<(u64, u64)>,
    next_tag: Val,
    ios: u64,
    crash_at: u64,
    crashes: u64,
    poisoned: bool,
    /// Faults injected before the current session started.
    session_faults: u64,
    violations: Vec<Violation>,
    prefetches_done: u64,
    prefetches_failed: u64,
    /// Background work failed in this session (the engine may be poisoned
    /// without a tester noticing): the session ends with a crash point.
    background_failed: bool,
}

impl World {
    fn violation(&mut self, what: String) {
        let v = Violation {
            seed: self.cfg.seed,
            step: self.ios,
            crash: self.crashes,
            time: self.sim.now(),
            what,
        };
        self.violations.push(v);
    }

    fn running(&self) -> bool {
        self.violations.is_empty() && !self.poisoned && self.ios < self.cfg.ios
    }

    fn base_sector(&self, sector: u64) -> [u8; SECTOR] {
        let mut out = [0u8; SECTOR];
        if let Some(b) = &self.base {
            let s = (sector * SECTOR as u64).min(b.len() as u64) as usize;
            let e = (s + SECTOR).min(b.len());
            out[..e - s].copy_from_slice(&b[s..e]);
        }
        out
    }

    /// Check `bytes` (read from `first`) against live or durable values.
    /// Returns the value seen in each sector, or None after a violation.
    fn verify(&mut self, first: u64, bytes: &[u8], durable: bool, what: &str) -> Option<Vec<Val>> {
        let mut seen_vals = Vec::with_capacity(bytes.len() / SECTOR);
        for (i, chunk) in bytes.chunks(SECTOR).enumerate() {
            let s = first + i as u64;
            let base = self.base_sector(s);
            let seen = model::identify(chunk, s, &base);
            let allowed = if durable {
                self.model.durable(s)
            } else {
                self.model.live(s)
            };
            if !model::acceptable(seen, s, fvd_core::iobuf::is_zero(&base), &allowed) {
                let names: Vec<String> = allowed.iter().map(|&v| val_name(v)).collect();
                self.violation(format!(
                    "{what}: sector {s} (offset {}) reads {seen}, expected one of [{}]",
                    s * SECTOR as u64,
                    names.join(", ")
                ));
                return None;
            }
            seen_vals.push(match seen {
                Seen::Zero => ZERO,
                Seen::Base => BASE,
                Seen::Write { tag, .. } => tag,
                Seen::Damaged { .. } | Seen::Garbage => unreachable!("rejected above"),
            });
        }
        Some(seen_vals)
    }

    /// Choose a request for `tester`, or None if every try conflicted.
    fn plan(&mut self, tester: usize) -> Option<(Op, u64, u64)> {
        let pct = self.rng.below(100);
        let f = self.cfg.flush_percent;
        let op = if pct < f {
            Op::Flush
        } else if pct < f + 40 {
            Op::Read
        } else if pct < f + 75 {
            let tag = self.next_tag;
            self.next_tag += 1;
            Op::Write {
                tag,
                fua: self.rng.below(10) == 0,
            }
        } else if pct < f + 90 {
            Op::Zero {
                unmap: self.rng.below(2) == 0,
                fua: self.rng.below(20) == 0,
                discard: self.rng.below(2) == 0,
            }
        } else {
            Op::Status
        };
        if matches!(op, Op::Flush) {
            return Some((op, 0, 0));
        }
        let n = self.model.len();
        let write = matches!(op, Op::Write { .. } | Op::Zero { .. });
        for _ in 0..8 {
            let count = match self.rng.below(4) {
                0 => 1,
                1 => self.rng.range(1, 8),
                _ => self.rng.range(1, self.cfg.max_sectors),
            }
            .min(n);
            let first = if !self.recent.is_empty() && self.rng.chance(self.cfg.rewrite_recent) {
                // Into (or just around) what a recent write wrote.
                let (f, c) = *self.rng.pick(&self.recent);
                (f + self.rng.below(c + 2)).saturating_sub(1)
            } else if !self.inflight.is_empty() && self.rng.below(2) == 0 {
                // Right next to (or just inside) someone else's request.
                let other = *self.rng.pick(&self.inflight);
                let gap = self.rng.below(3);
                if self.rng.below(2) == 0 {
                    other.end + gap
                } else {
                    other.first.saturating_sub(count + gap)
                }
            } else {
                self.rng.below(n)
            };
            let first = first.min(n - count);
            let end = first + count;
            let conflict = self
                .inflight
                .iter()
                .any(|f| f.first < end && first < f.end && (f.write || write));
            if !conflict {
                self.inflight.push(Flight {
                    tester,
                    first,
                    end,
                    write,
                });
                if write && self.cfg.rewrite_recent > 0.0 {
                    if self.recent.len() == 16 {
                        self.recent.remove(0);
                    }
                    self.recent.push((first, count));
                }
                return Some((op, first, count));
            }
        }
        None
    }

    fn done(&mut self, tester: usize) {
        self.inflight.retain(|f| f.tester != tester);
        self.ios += 1;
        if self.cfg.ios_per_crash > 0 && self.ios == self.crash_at {
            // Crash a little later, with requests in flight.
            let delay = self.rng.below(self.cfg.latency.max * 2);
            self.sim.set_deadline(Some(self.sim.now() + delay));
        }
    }

    fn schedule_crash(&mut self) {
        if self.cfg.ios_per_crash > 0 {
            self.crash_at = self.ios + self.rng.range(1, 2 * self.cfg.ios_per_crash);
        }
    }

    /// An engine request failed: fine if a fault was injected meanwhile.
    fn failed(&mut self, what: &str, e: &fvd_core::Error, faults_before: u64, flushes: bool) {
        let injected = self.sim.faults_injected() != faults_before;
        if injected || self.poisoned {
            if flushes {
                // A failed flush poisons the engine: it must be reopened.
                self.poisoned = true;
            }
            return;
        }
        if e.kind() == ErrorKind::Io && self.sim.faults_injected() != self.session_faults {
            // An earlier fault may have failed a commit the engine ran on
            // its own (inside a write), poisoning it: end the session.
            self.poisoned = true;
            return;
        }
        self.violation(format!("{what} failed with no fault injected: {e}"));
    }
}

impl World {
    /// Background work failed: fine if a fault was injected meanwhile. The
    /// testers go on (if the engine poisoned itself they find out); half
    /// the time a crash point follows at once, so the image is checked
    /// right after the failure, and at the latest the session ends with one.
    fn background_failed(&mut self, what: &str, e: &fvd_core::Error, faults_before: u64) {
        self.failed(what, e, faults_before, false);
        self.background_failed = true;
        if self.cfg.ios_per_crash > 0 && self.rng.below(2) == 0 {
            let at = self.sim.now() + self.rng.below(self.cfg.latency.max * 2);
            if self.sim.deadline().is_none_or(|d| d > at) {
                self.sim.set_deadline(Some(at));
            }
        }
    }
}

fn val_name(v: Val) -> String {
    match v {
        ZERO => "zeros".into(),
        BASE => "base data".into(),
        t => format!("write #{t}"),
    }
}

fn sector_data(tag: Val, first: u64, count: u64) -> Vec<u8> {
    let mut v = vec![0u8; (count as usize) * SECTOR];
    for (i, c) in v.chunks_mut(SECTOR).enumerate() {
        model::fill_sector(tag, first + i as u64, c);
    }
    v
}

async fn tester(id: usize, img: Arc<Image>, w: Rc<RefCell<World>>, sim: SimHandle) {
    loop {
        let plan = {
            let mut wb = w.borrow_mut();
            if !wb.running() {
                return;
            }
            wb.plan(id)
        };
        let Some((op, first, count)) = plan else {
            let d = w.borrow_mut().rng.range(1_000, 50_000);
            sim.sleep_ns(d).await;
            continue;
        };
        let off = first * SECTOR as u64;
        let len = count * SECTOR as u64;
        let faults0 = sim.faults_injected();
        match op {
            Op::Read => {
                let r = img.read(off, IoBuf::for_overwrite(len as usize)).await;
                let mut wb = w.borrow_mut();
                match r {
                    Ok(buf) => {
                        wb.verify(first, &buf, false, &format!("read {off}+{len}"));
                    }
                    Err(e) => wb.failed(&format!("read {off}+{len}"), &e, faults0, false),
                }
            }
            Op::Write { tag, fua } => {
                let data = sector_data(tag, first, count);
                let t = w.borrow_mut().model.begin_write(first, count, tag);
                let r = img.write(off, IoBuf::from_slice(&data), fua).await;
                let mut wb = w.borrow_mut();
                wb.model.end_write(t, r.is_ok(), fua);
                if let Err(e) = r {
                    wb.failed(&format!("write #{tag} {off}+{len}"), &e, faults0, fua);
                }
            }
            Op::Zero {
                unmap,
                fua,
                discard,
            } => {
                let t = w.borrow_mut().model.begin_write(first, count, ZERO);
                let (r, fua) = if discard {
                    (img.discard(off, len).await, false)
                } else {
                    (img.write_zeroes(off, len, unmap, fua).await, fua)
                };
                let mut wb = w.borrow_mut();
                wb.model.end_write(t, r.is_ok(), fua);
                if let Err(e) = r {
                    wb.failed(&format!("zero {off}+{len}"), &e, faults0, fua);
                }
            }
            Op::Flush => {
                let issued = w.borrow_mut().model.flush_issued();
                let r = img.flush().await;
                let mut wb = w.borrow_mut();
                match r {
                    Ok(()) => wb.model.flush_done(issued),
                    Err(e) => wb.failed("flush", &e, faults0, true),
                }
            }
            Op::Status => {
                let r = img.block_status(off, len).await;
                let mut wb = w.borrow_mut();
                match r {
                    Ok(ext) => {
                        if let Some(bad) = check_extents(&ext, off, len, img.virtual_size()) {
                            wb.violation(format!("block_status {off}+{len}: {bad}: {ext:?}"));
                        }
                    }
                    Err(e) => wb.failed(&format!("block_status {off}+{len}"), &e, faults0, false),
                }
            }
        }
        let think = {
            let mut wb = w.borrow_mut();
            wb.done(id);
            if wb.rng.below(4) == 0 {
                wb.rng.range(1, 30_000)
            } else {
                0
            }
        };
        if think > 0 {
            sim.sleep_ns(think).await;
        }
    }
}

/// One session's prefetch task: store a profile first (profile mode), then
/// prefetch. Success must leave the base detached; failure needs a fault.
async fn prefetcher(
    img: Arc<Image>,
    cfg: PrefetchConfig,
    profile: Option<Vec<(u64, u64)>>,
    w: Rc<RefCell<World>>,
    sim: SimHandle,
) {
    let faults0 = sim.faults_injected();
    if let Some(entries) = profile
        && let Err(e) = img.store_profile(&entries).await
    {
        w.borrow_mut()
            .background_failed("store prefetch profile", &e, faults0);
        return;
    }
    let status = Arc::new(PrefetchStatus::default());
    let r = prefetch(img.clone(), cfg, Arc::new(sim.clock()), status.clone()).await;
    let mut wb = w.borrow_mut();
    match r {
        Ok(()) => {
            wb.prefetches_done += 1;
            let (local, blocks) = img.local_blocks();
            if img.base_range() != 0 || local != blocks || status.state() != PrefetchState::Done {
                wb.violation(format!(
                    "prefetch completed but the image is not all-local: base range {}, {local} of {blocks} blocks local, state {}",
                    img.base_range(),
                    status.state().name()
                ));
            }
        }
        Err(e) => {
            wb.prefetches_failed += 1;
            if status.state() != PrefetchState::Failed {
                wb.violation(format!(
                    "prefetch failed ({e}) but reports state {}",
                    status.state().name()
                ));
            }
            wb.background_failed("prefetch", &e, faults0);
        }
    }
}

/// Random profile ranges inside the base range, for profile-mode prefetch.
fn random_profile(rng: &mut Rng, range: u64) -> Vec<(u64, u64)> {
    (0..rng.range(1, 6))
        .map(|_| {
            let off = rng.below(range);
            let len = rng.range(1, 64 << 10).min(range - off);
            (off, len)
        })
        .collect()
}

/// Extents must tile `[off, off+len)` in order.
fn check_extents(ext: &[fvd_core::Extent], off: u64, len: u64, size: u64) -> Option<String> {
    let mut pos = off;
    for e in ext {
        if e.start != pos || e.length == 0 {
            return Some(format!("extent at {} does not continue at {pos}", e.start));
        }
        if e.source == Source::Image && e.host_offset.is_none() && !e.zero {
            return Some("image extent with data but no host offset".into());
        }
        pos += e.length;
    }
    if pos != off + len || pos > size {
        return Some(format!("extents end at {pos}, not {}", off + len));
    }
    None
}

/// Base content: pages of data, zero pages and half-zero pages.
fn make_base(rng: &mut Rng, size: u64) -> Arc<[u8]> {
    let mut v = vec![0u8; size as usize];
    for page in v.chunks_mut(4096) {
        match rng.below(10) {
            0..=2 => {}
            3 => {
                let half = page.len() / 2;
                fill_random(rng, &mut page[half..]);
            }
            _ => fill_random(rng, page),
        }
    }
    v.into()
}

fn fill_random(rng: &mut Rng, out: &mut [u8]) {
    for c in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

/// Check the image on `storage` for consistency without changing it: the
/// engine's own checker ([`fvd_core::check::check_storage`]) must find no
/// corruption, and a read-only open (which replays the journal in memory)
/// must succeed. Returns the read-only image.
pub async fn check_consistency(
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
) -> Result<Image, String> {
    let report = fvd_core::check::check_storage(storage.as_ref(), None)
        .await
        .map_err(|e| format!("check could not run: {e}"))?;
    if !report.check_errors.is_empty() || !report.corruptions.is_empty() {
        return Err(format!(
            "check found corruptions {:?}, errors {:?}",
            report.corruptions, report.check_errors
        ));
    }
    Image::open_with_key(
        storage,
        base,
        OpenOptions { read_only: true },
        Some(&sim_key()),
    )
    .await
    .map_err(|e| format!("read-only open failed: {e}"))
}

struct Run {
    cfg: SimConfig,
    exec: Executor,
    sim: SimHandle,
    rng: Rng,
    base: Option<SimBase>,
    /// The image on disk is all-local: it is opened without its base.
    detached: bool,
    world: Rc<RefCell<World>>,
    report: SimReport,
}

impl Run {
    /// The base to open the image with (none once it was detached).
    fn base_dyn(&self) -> Option<Arc<dyn Base>> {
        if self.detached {
            return None;
        }
        self.base.clone().map(|b| Arc::new(b) as Arc<dyn Base>)
    }

    fn violation(&mut self, what: String) {
        self.world.borrow_mut().violation(what);
    }

    fn failed(&self) -> bool {
        !self.world.borrow().violations.is_empty()
    }

    fn faults(&self, disk: &SimStorage, on: bool) {
        if on {
            let mut f = self.cfg.image_faults.clone();
            if let Some(slack) = self.cfg.space_slack {
                let used = disk.allocated_bytes().unwrap_or(0);
                f.capacity = Some(used + slack);
            }
            disk.set_faults(f);
        } else {
            disk.set_faults(Faults::default());
        }
        if let Some(b) = &self.base {
            b.set_faults(if on {
                self.cfg.base_faults.clone()
            } else {
                Faults::default()
            });
        }
    }

    /// Share a freshly opened image with the tasks, its background
    /// copy-on-read fills running on the executor when configured.
    fn share(&mut self, img: Image) -> Arc<Image> {
        let img = Arc::new(img);
        img.set_mutation(self.cfg.mutation);
        img.set_early_journal(self.cfg.early_journal);
        if self.cfg.background_cor {
            img.enable_background(self.sim.spawner());
        }
        self.detached = self.base.is_some() && img.base_range() == 0;
        img
    }

    /// Add the fill counters of `img` to the report.
    fn note_fills(&mut self, img: &Image) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = img.stats();
        self.report.fill_bytes += s.cor_bytes.load(Relaxed) + s.prefetch_bytes.load(Relaxed);
        self.report.commit_rounds += s.commit_rounds.load(Relaxed);
        self.report.ordered_rounds += s.ordered_rounds.load(Relaxed);
        self.report.early_blocks += s.early_blocks.load(Relaxed);
        self.report.confirm_rounds += s.confirm_rounds.load(Relaxed);
        self.report.replay_dropped += s.replay_dropped.load(Relaxed);
    }

    /// True if the newest header on `disk` says the image is all-local.
    fn all_local_on(&mut self, disk: &SimStorage) -> bool {
        let snap = disk.snapshot("image-header");
        matches!(
            self.exec.block_on(fvd_core::image::read_header(&snap)),
            Ok(Ok((h, _))) if h.flags & FLAG_ALL_LOCAL != 0
        )
    }

    /// Read the whole disk through `img` and compare it with the model.
    /// With `reset`, the model then takes the values seen as certain.
    fn check_disk(
        &mut self,
        img: &Image,
        durable: bool,
        reset: bool,
        what: &str,
    ) -> Option<Vec<u8>> {
        let size = self.cfg.virtual_size;
        let mut all = vec![0u8; size as usize];
        const CHUNK: u64 = 64 << 10;
        let mut pos = 0;
        while pos < size {
            let n = CHUNK.min(size - pos);
            match self
                .exec
                .block_on(img.read(pos, IoBuf::for_overwrite(n as usize)))
            {
                Ok(Ok(buf)) => all[pos as usize..(pos + n) as usize].copy_from_slice(&buf),
                Ok(Err(e)) => {
                    self.violation(format!("{what}: read {pos}+{n} failed: {e}"));
                    return None;
                }
                Err(s) => {
                    self.violation(format!("{what}: read {pos}+{n} did not complete ({s:?})"));
                    return None;
                }
            }
            pos += n;
        }
        let seen = self.world.borrow_mut().verify(0, &all, durable, what)?;
        if reset {
            let mut w = self.world.borrow_mut();
            for (s, v) in seen.into_iter().enumerate() {
                w.model.reset(s as u64, v);
            }
            w.model.reset_durability();
        }
        Some(all)
    }

    /// Crash `disk`, check the survivor and reopen it (crashing recovery
    /// too, sometimes). None after a violation.
    fn crash_and_recover(&mut self, disk: SimStorage) -> Option<(SimStorage, Arc<Image>)> {
        let mut disk = disk;
        loop {
            let mut policy = CrashPolicy::random(&mut self.rng);
            if let Some(t) = self.cfg.tear {
                policy.tear = t;
            }
            let (next, _) = disk.crash(&mut self.rng, policy);
            disk = next;
            self.report.crash_points += 1;
            self.world.borrow_mut().crashes += 1;
            self.faults(&disk, false);
            // A detached image (all-local header durable) must open, check
            // and read without its base.
            self.detached = self.all_local_on(&disk);
            self.report.detached_reopens += self.detached as u64;
            // Consistency of the bytes as they are, before recovery.
            let snap: Arc<dyn Storage> = Arc::new(disk.snapshot("image-check"));
            let ro = match self.exec.block_on(check_consistency(snap, self.base_dyn())) {
                Ok(Ok(img)) => img,
                Ok(Err(e)) => {
                    self.violation(format!("after crash: {e}"));
                    return None;
                }
                Err(s) => {
                    self.violation(format!("after crash: check did not complete ({s:?})"));
                    return None;
                }
            };
            let ro_view = self.check_disk(&ro, true, false, "after crash, read-only view")?;
            drop(ro);
            // Recovery, possibly crashed in the middle.
            if self.rng.chance(self.cfg.recovery_crash) {
                let d = self.rng.range(1, 2_000_000);
                self.exec.set_deadline(Some(self.exec.now() + d));
            }
            let storage: Arc<dyn Storage> = Arc::new(disk.clone());
            let opened = self.exec.block_on(Image::open_with_key(
                storage,
                self.base_dyn(),
                OpenOptions::default(),
                Some(&sim_key()),
            ));
            self.exec.set_deadline(None);
            match opened {
                Ok(Ok(img)) => {
                    let img = self.share(img);
                    let view = self.check_disk(&img, true, true, "after crash and recovery")?;
                    if view != ro_view {
                        let at = view.iter().zip(&ro_view).position(|(a, b)| a != b);
                        self.violation(format!(
                            "recovered image differs from the read-only replay at byte {at:?}"
                        ));
                        return None;
                    }
                    return Some((disk, img));
                }
                Ok(Err(e)) => {
                    self.violation(format!("reopen after crash failed: {e}"));
                    return None;
                }
                Err(Stop::Deadline) => {
                    // Crashed during recovery: crash again from here.
                    self.exec.clear();
                    continue;
                }
                Err(Stop::Idle) => {
                    self.violation("reopen after crash hangs".into());
                    return None;
                }
            }
        }
    }
}

/// Run one simulation. Deterministic: the same configuration gives the
/// same run, the same report.
pub fn run(cfg: &SimConfig) -> SimReport {
    let exec = Executor::new(cfg.seed);
    let sim = exec.handle();
    let mut rng = Rng::new(cfg.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let base = cfg.base_size.map(|size| {
        let b = SimBase::new(sim.clone(), "base", make_base(&mut rng, size));
        b.set_latency(cfg.latency);
        b
    });
    let world = Rc::new(RefCell::new(World {
        cfg: cfg.clone(),
        sim: sim.clone(),
        model: Model::new(cfg.virtual_size / SECTOR as u64, |_| BASE),
        base: base.as_ref().map(|b| b.bytes().clone()),
        rng: rng.fork(),
        inflight: Vec::new(),
        recent: Vec::new(),
        next_tag: FIRST_TAG,
        ios: 0,
        crash_at: 0,
        crashes: 0,
        poisoned: false,
        session_faults: 0,
        violations: Vec::new(),
        prefetches_done: 0,
        prefetches_failed: 0,
        background_failed: false,
    }));
    let mut run = Run {
        cfg: cfg.clone(),
        exec,
        sim,
        rng,
        base,
        detached: false,
        world,
        report: SimReport {
            seed: cfg.seed,
            ..SimReport::default()
        },
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.go()));
    if let Err(p) = outcome {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into());
        // The executor may hold futures of the panicked run: drop them first.
        run.exec.clear();
        run.violation(format!("panic: {msg}"));
    }
    let w = run.world.borrow();
    run.report.ios = w.ios;
    run.report.violations = w.violations.clone();
    run.report.prefetches_done += w.prefetches_done;
    run.report.prefetches_failed += w.prefetches_failed;
    run.report.faults = run.sim.faults_injected();
    run.report.virtual_ns = run.sim.now();
    run.report.clone()
}

impl Run {
    fn go(&mut self) {
        let cfg = self.cfg.clone();
        let mut disk = SimStorage::new(self.sim.clone(), "image");
        disk.set_latency(cfg.latency);
        let opts = CreateOptions {
            size: Some(cfg.virtual_size),
            base: self
                .base
                .as_ref()
                .map(|_| ("base.raw".to_string(), fvd_core::format::Format::Raw)),
            block_size: Some(cfg.block_size),
            journal_size: Some(cfg.journal_size),
            detect_zeroes: cfg.detect_zeroes,
            compact: cfg.compact_chunk.is_some(),
            chunk_size: cfg.compact_chunk,
            grow_unit: cfg.compact_chunk.map(|c| c as u64 * 4),
            copy_on_read: cfg.copy_on_read,
            encryption: cfg.encrypted.then(|| fvd_core::CreateEncryption {
                secret: sim_key(),
                iterations: 1000,
            }),
            ..CreateOptions::default()
        };
        let base_ref = self.base.clone();
        let created = self.exec.block_on(fvd_core::image::create(
            &disk,
            &opts,
            base_ref.as_ref().map(|b| b as &dyn Base),
        ));
        if !matches!(created, Ok(Ok(_))) {
            self.violation(format!("create failed: {created:?}"));
            return;
        }
        let opened = self.exec.block_on(Image::open_with_key(
            Arc::new(disk.clone()),
            self.base_dyn(),
            OpenOptions::default(),
            Some(&sim_key()),
        ));
        let mut img = match opened {
            Ok(Ok(i)) => self.share(i),
            other => {
                self.violation(format!("open failed: {:?}", other.map(|r| r.map(|_| ()))));
                return;
            }
        };
        loop {
            // One session: testers (and background work) run until the
            // budget is spent, the engine poisons itself, or the crash point.
            self.faults(&disk, true);
            {
                let mut w = self.world.borrow_mut();
                w.poisoned = false;
                w.background_failed = false;
                w.session_faults = self.sim.faults_injected();
                w.inflight.clear();
                w.schedule_crash();
            }
            for t in 0..cfg.testers {
                self.exec
                    .spawn(tester(t, img.clone(), self.world.clone(), self.sim.clone()));
            }
            let budget_left = self.world.borrow().ios < cfg.ios;
            if let Some(p) = &cfg.prefetch
                && img.base_range() > 0
                && budget_left
            {
                if p.mode == PrefetchMode::Profile {
                    img.set_profile_recording(true);
                }
                let profile = (p.mode == PrefetchMode::Profile)
                    .then(|| random_profile(&mut self.rng, img.base_range()));
                self.exec.spawn(prefetcher(
                    img.clone(),
                    p.clone(),
                    profile,
                    self.world.clone(),
                    self.sim.clone(),
                ));
            }
            let stop = self.exec.run();
            let tasks = self.exec.tasks();
            self.exec.clear();
            self.exec.set_deadline(None);
            if self.failed() {
                return;
            }
            let crash = match stop {
                Stop::Deadline => true,
                Stop::Idle if tasks > 0 => {
                    self.violation(format!(
                        "hang: {tasks} tasks (testers, fills, prefetch) blocked forever"
                    ));
                    return;
                }
                Stop::Idle => {
                    let w = self.world.borrow();
                    w.poisoned || w.background_failed
                }
            };
            if Arc::strong_count(&img) != 1 {
                self.violation("image still referenced after the session".into());
                return;
            }
            self.note_fills(&img);
            if !crash {
                break;
            }
            drop(img);
            match self.crash_and_recover(disk) {
                Some((d, i)) => {
                    disk = d;
                    img = i;
                }
                None => return,
            }
        }
        self.finish(disk, img);
    }

    /// A last prefetch, without faults, must complete: every block local,
    /// the base detached, the disk as the model says.
    fn final_prefetch(&mut self, img: &Arc<Image>, p: &PrefetchConfig) -> Option<()> {
        let status = Arc::new(PrefetchStatus::default());
        let clock = Arc::new(self.sim.clock());
        let fills_before = img
            .stats()
            .prefetch_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        match self
            .exec
            .block_on(prefetch(img.clone(), p.clone(), clock, status.clone()))
        {
            Ok(Ok(())) => self.report.prefetches_done += 1,
            Ok(Err(e)) => {
                self.violation(format!("prefetch without faults failed: {e}"));
                return None;
            }
            Err(s) => {
                self.violation(format!("prefetch without faults did not complete ({s:?})"));
                return None;
            }
        }
        let (local, blocks) = img.local_blocks();
        if img.base_range() != 0 || local != blocks || status.state() != PrefetchState::Done {
            let copied = img
                .stats()
                .prefetch_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                - fills_before;
            self.violation(format!(
                "prefetch without faults completed but the image is not all-local: base range {}, {local} of {blocks} blocks local, state {}, {copied} bytes copied",
                img.base_range(),
                status.state().name()
            ));
            return None;
        }
        self.check_disk(img, false, false, "after prefetch")?;
        Some(())
    }

    /// Flush, close, check, reopen and compare once more.
    fn finish(&mut self, disk: SimStorage, img: Arc<Image>) {
        self.faults(&disk, false);
        if let Some(p) = self.cfg.prefetch.clone()
            && self.final_prefetch(&img, &p).is_none()
        {
            return;
        }
        let issued = self.world.borrow_mut().model.flush_issued();
        match self.exec.block_on(img.flush()) {
            Ok(Ok(())) => self.world.borrow_mut().model.flush_done(issued),
            other => {
                self.violation(format!("final flush failed: {other:?}"));
                return;
            }
        }
        if let Err(e) = self
            .exec
            .block_on(img.close())
            .unwrap_or_else(|s| Err(fvd_core::Error::new(ErrorKind::Io, format!("close: {s:?}"))))
        {
            self.violation(format!("close failed: {e}"));
            return;
        }
        self.note_fills(&img);
        drop(img);
        // Everything is durable now: a crash must lose nothing.
        let (disk, _) = disk.crash(
            &mut self.rng,
            CrashPolicy {
                keep_completed: 0.0,
                keep_inflight: 0.0,
                tear: 0.0,
            },
        );
        self.detached = self.all_local_on(&disk);
        self.report.detached = self.detached;
        if self.cfg.prefetch.is_some() && !self.detached {
            self.violation("the image is not all-local on disk after its prefetch".into());
            return;
        }
        let snap: Arc<dyn Storage> = Arc::new(disk.snapshot("image-check"));
        match self.exec.block_on(check_consistency(snap, self.base_dyn())) {
            Ok(Ok(ro)) => {
                if !ro.header().is_some_and(|h| h.is_clean()) {
                    self.violation("image is not clean after close".into());
                } else {
                    // Violations are recorded by check_disk itself.
                    let _ = self.check_disk(&ro, true, false, "after close");
                }
            }
            other => {
                self.violation(format!("after close: {:?}", other.map(|r| r.map(|_| ()))));
            }
        }
    }
}
