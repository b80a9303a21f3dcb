//! Deterministic simulation of the engine under concurrency, crashes and
//! injected faults (see `fvd_sim`).
//!
//! The default run is 600 classic seeds plus 300 background seeds (whose
//! configuration adds background copy-on-read and/or a prefetch task, see
//! `fvd_sim::background_seed`) plus 150 rewrite seeds (copy-on-write blocks
//! rewritten right after a flush, crashes before the next, torn data under
//! durable journal records: `fvd_sim::rewrite_seed`).
//!
//! * `FVD_SIM_SEED=<seed>` replays one seed (as printed by a failure), of
//!   either kind.
//! * `FVD_SIM_SOAK=<minutes>` keeps running new seeds for that long
//!   (alternately classic and background).
//! * `FVD_SIM_SEEDS=<n>` runs the first n classic seeds of the default run;
//!   `FVD_SIM_BG_SEEDS=<n>` the first n background seeds,
//!   `FVD_SIM_REWRITE_SEEDS=<n>` the first n rewrite seeds.
//! * `FVD_SIM_LAYOUT=sparse|compact` runs only seeds whose image has that
//!   layout (the seed alone still decides everything, so replays match).
//!
//! The default run prints two lines:
//! `sim: seeds=<n> crash_points=<n> ios=<n> early_blocks=<n> violations=<n>` (all seeds) and
//! `sim background: seeds=<n> crash_points=<n> ios=<n> prefetches_done=<n>
//! prefetches_failed=<n> detached=<n> detached_reopens=<n> fill_bytes=<n>
//! violations=<n>` (the background seeds alone), and `sim rewrite:
//! seeds=<n> crash_points=<n> ios=<n> commit_rounds=<n> ordered_rounds=<n>
//! confirm_rounds=<n> replay_dropped=<n> violations=<n>`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fvd_core::base::Base;
use fvd_core::storage::Storage;
use fvd_core::{CreateOptions, ErrorKind, Format, Image, OpenOptions};
use fvd_sim::model::{self, Seen};
use fvd_sim::{
    CrashPolicy, Executor, Faults, Latency, Rng, SimBase, SimConfig, SimReport, SimStorage,
    background_seed, check_consistency, is_background_seed, is_rewrite_seed, rewrite_seed, run,
};

/// Classic seeds of the default run.
const DEFAULT_SEEDS: u64 = 600;
/// Background seeds of the default run.
const DEFAULT_BG_SEEDS: u64 = 300;
/// Rewrite seeds of the default run.
const DEFAULT_REWRITE_SEEDS: u64 = 150;

fn seed_of(i: u64) -> u64 {
    fvd_sim::rng::mix64(i ^ 0x0f0d_5eed)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

/// The configuration of `seed`, or None if `FVD_SIM_LAYOUT` excludes it.
fn config(seed: u64) -> Option<SimConfig> {
    let cfg = SimConfig::from_seed(seed);
    match std::env::var("FVD_SIM_LAYOUT").as_deref() {
        Ok("sparse") if cfg.compact_chunk.is_some() => None,
        Ok("compact") if cfg.compact_chunk.is_none() => None,
        Ok("sparse" | "compact") | Err(_) => Some(cfg),
        Ok(other) => panic!("FVD_SIM_LAYOUT must be sparse or compact, not {other}"),
    }
}

/// Run seeds on every core until `next` yields None.
fn run_parallel(next: impl Fn() -> Option<SimConfig> + Sync) -> Vec<SimReport> {
    let out = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while let Some(cfg) = next() {
                    let r = run(&cfg);
                    out.lock().unwrap().push(r);
                }
            });
        }
    });
    let mut v = out.into_inner().unwrap();
    v.sort_by_key(|r| r.seed);
    v
}

#[test]
fn random_testers_with_crash_points() {
    let started = Instant::now();
    let reports = if let Some(seed) = env_u64("FVD_SIM_SEED") {
        let cfg = SimConfig::from_seed(seed);
        eprintln!("replaying {cfg:?}");
        vec![run(&cfg)]
    } else if let Some(minutes) = env_u64("FVD_SIM_SOAK") {
        let until = started + Duration::from_secs(minutes * 60);
        let i = AtomicU64::new(0);
        run_parallel(|| {
            while Instant::now() < until {
                let k = i.fetch_add(1, Ordering::Relaxed);
                let seed = match k % 3 {
                    0 => seed_of(k / 3),
                    1 => background_seed(k / 3),
                    _ => rewrite_seed(k / 3),
                };
                if let Some(c) = config(seed) {
                    return Some(c);
                }
            }
            None
        })
    } else {
        // The first n seeds of each kind the layout filter accepts,
        // background seeds first.
        let n = env_u64("FVD_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
        let n_bg = env_u64("FVD_SIM_BG_SEEDS").unwrap_or(DEFAULT_BG_SEEDS);
        let n_rw = env_u64("FVD_SIM_REWRITE_SEEDS").unwrap_or(DEFAULT_REWRITE_SEEDS);
        // (background seeds tried, taken, classic seeds tried, taken,
        // rewrite seeds tried, taken)
        let taken = Mutex::new((0u64, 0u64, 0u64, 0u64, 0u64, 0u64));
        run_parallel(|| {
            let mut t = taken.lock().unwrap();
            while t.5 < n_rw {
                t.4 += 1;
                if let Some(c) = config(rewrite_seed(t.4 - 1)) {
                    t.5 += 1;
                    return Some(c);
                }
            }
            while t.1 < n_bg {
                t.0 += 1;
                if let Some(c) = config(background_seed(t.0 - 1)) {
                    t.1 += 1;
                    return Some(c);
                }
            }
            while t.3 < n {
                t.2 += 1;
                if let Some(c) = config(seed_of(t.2 - 1)) {
                    t.3 += 1;
                    return Some(c);
                }
            }
            None
        })
    };
    let crash_points: u64 = reports.iter().map(|r| r.crash_points).sum();
    let ios: u64 = reports.iter().map(|r| r.ios).sum();
    let violations: Vec<_> = reports.iter().flat_map(|r| r.violations.iter()).collect();
    // Written past the test harness's capture, so it always shows.
    let early: u64 = reports.iter().map(|r| r.early_blocks).sum();
    let line = format!(
        "sim: seeds={} crash_points={crash_points} ios={ios} early_blocks={early} violations={}\n",
        reports.len(),
        violations.len()
    );
    let _ = std::io::stdout().write_all(line.as_bytes());
    let bg: Vec<&SimReport> = reports
        .iter()
        .filter(|r| is_background_seed(r.seed))
        .collect();
    if !bg.is_empty() {
        let sum = |f: fn(&SimReport) -> u64| bg.iter().map(|r| f(r)).sum::<u64>();
        let line = format!(
            "sim background: seeds={} crash_points={} ios={} prefetches_done={} prefetches_failed={} detached={} detached_reopens={} fill_bytes={} violations={}\n",
            bg.len(),
            sum(|r| r.crash_points),
            sum(|r| r.ios),
            sum(|r| r.prefetches_done),
            sum(|r| r.prefetches_failed),
            sum(|r| r.detached as u64),
            sum(|r| r.detached_reopens),
            sum(|r| r.fill_bytes),
            sum(|r| r.violations.len() as u64),
        );
        let _ = std::io::stdout().write_all(line.as_bytes());
    }
    let rw: Vec<&SimReport> = reports.iter().filter(|r| is_rewrite_seed(r.seed)).collect();
    if !rw.is_empty() {
        let line = format!(
            "sim rewrite: seeds={} crash_points={} ios={} commit_rounds={} ordered_rounds={} confirm_rounds={} replay_dropped={} violations={}\n",
            rw.len(),
            rw.iter().map(|r| r.crash_points).sum::<u64>(),
            rw.iter().map(|r| r.ios).sum::<u64>(),
            rw.iter().map(|r| r.commit_rounds).sum::<u64>(),
            rw.iter().map(|r| r.ordered_rounds).sum::<u64>(),
            rw.iter().map(|r| r.confirm_rounds).sum::<u64>(),
            rw.iter().map(|r| r.replay_dropped).sum::<u64>(),
            rw.iter().map(|r| r.violations.len() as u64).sum::<u64>(),
        );
        let _ = std::io::stdout().write_all(line.as_bytes());
    }
    if std::env::var_os("FVD_SIM_VERBOSE").is_some() {
        eprintln!("wall time {:?}", started.elapsed());
    }
    for v in &violations {
        eprintln!("sim violation: {v}");
    }
    assert!(violations.is_empty(), "{} violations", violations.len());
}

#[test]
fn default_seeds_cover_every_shape() {
    let cfgs: Vec<SimConfig> = (0..DEFAULT_SEEDS)
        .map(|i| SimConfig::from_seed(seed_of(i)))
        .collect();
    for bs in [512u32, 4096, 65536] {
        let of_bs = || cfgs.iter().filter(move |c| c.block_size == bs);
        assert!(of_bs().any(|c| c.base_size.is_none()), "bs {bs}: no base");
        assert!(
            of_bs().any(|c| c
                .base_size
                .is_some_and(|b| b < c.virtual_size && b % 512 != 0)),
            "bs {bs}: image larger than an unaligned base"
        );
        assert!(
            of_bs().any(|c| c.base_size.is_some_and(|b| b > c.virtual_size)),
            "bs {bs}: base larger than the image"
        );
        assert!(
            of_bs().any(|c| c.compact_chunk.is_some()),
            "bs {bs}: compact"
        );
        assert!(of_bs().any(|c| c.testers >= 32), "bs {bs}: many testers");
        assert!(
            of_bs().any(|c| c.encrypted && c.base_size.is_some()),
            "bs {bs}: encrypted over a base"
        );
        assert!(
            of_bs().any(|c| c.encrypted && c.compact_chunk.is_some()),
            "bs {bs}: encrypted compact"
        );
    }
    assert!(cfgs.iter().any(|c| c.image_faults.flush_error > 0.0));
    assert!(cfgs.iter().any(|c| c.base_faults.short_read > 0.0));
    assert!(cfgs.iter().any(|c| c.space_slack.is_some()));
    assert!(cfgs.iter().any(|c| c.copy_on_read && c.base_size.is_some()));
    // Classic seeds stay classic.
    assert!(
        cfgs.iter()
            .all(|c| c.prefetch.is_none() && !c.background_cor)
    );
    assert!((0..DEFAULT_SEEDS).all(|i| !is_background_seed(seed_of(i))));
}

#[test]
fn default_background_seeds_cover_every_shape() {
    let cfgs: Vec<SimConfig> = (0..DEFAULT_BG_SEEDS)
        .map(|i| SimConfig::from_seed(background_seed(i)))
        .collect();
    use fvd_core::image::prefetch::PrefetchMode;
    let pf = || {
        cfgs.iter()
            .filter_map(|c| c.prefetch.as_ref().map(|p| (c, p)))
    };
    assert!(cfgs.iter().all(|c| c.base_size.is_some()));
    assert!(
        cfgs.iter()
            .all(|c| c.background_cor || c.prefetch.is_some())
    );
    assert!(
        cfgs.iter()
            .any(|c| c.background_cor && c.prefetch.is_none())
    );
    assert!(
        cfgs.iter()
            .any(|c| !c.background_cor && c.prefetch.is_some())
    );
    assert!(pf().any(|(c, _)| c.background_cor));
    assert!(pf().any(|(_, p)| p.mode == PrefetchMode::Profile));
    assert!(pf().any(|(_, p)| p.mode == PrefetchMode::Adaptive && !p.hard));
    assert!(pf().any(|(_, p)| p.hard));
    assert!(pf().any(|(_, p)| p.rate_limit.is_some()));
    assert!(pf().any(|(_, p)| p.min_throughput == u64::MAX));
    assert!(pf().any(|(c, _)| c.base_faults.read_error > 0.0));
    assert!(pf().any(|(c, _)| c.image_faults.flush_error > 0.0));
    assert!(pf().any(|(c, _)| c.compact_chunk.is_some()));
    assert!(
        cfgs.iter()
            .any(|c| c.background_cor && c.base_faults.read_error > 0.0)
    );
    for bs in [512u32, 4096, 65536] {
        assert!(pf().any(|(c, _)| c.block_size == bs), "bs {bs}: prefetch");
        assert!(
            cfgs.iter().any(|c| c.block_size == bs && c.background_cor),
            "bs {bs}: background copy-on-read"
        );
    }
}

#[test]
fn runs_are_deterministic() {
    let seed = (0..)
        .map(seed_of)
        .find(|&s| SimConfig::from_seed(s).compact_chunk.is_none())
        .unwrap();
    let mut cfg = SimConfig::from_seed(seed);
    cfg.ios = 800;
    cfg.testers = 16;
    let a = run(&cfg);
    let b = run(&cfg);
    assert_eq!(
        (a.crash_points, a.ios, a.faults, a.virtual_ns),
        (b.crash_points, b.ios, b.faults, b.virtual_ns)
    );
    assert!(a.violations.is_empty(), "{:?}", a.violations);
    // Background work (fills spawned by the engine, prefetch on the
    // simulator's clock) is just as deterministic.
    let seed = (0..)
        .map(background_seed)
        .find(|&s| {
            let c = SimConfig::from_seed(s);
            c.background_cor && c.prefetch.is_some()
        })
        .unwrap();
    let mut cfg = SimConfig::from_seed(seed);
    cfg.ios = 800;
    let a = run(&cfg);
    let b = run(&cfg);
    assert_eq!(
        (a.crash_points, a.ios, a.faults, a.virtual_ns, a.fill_bytes),
        (b.crash_points, b.ios, b.faults, b.virtual_ns, b.fill_bytes)
    );
    assert!(a.fill_bytes > 0 && a.prefetches_done > 0, "{a:?}");
    assert!(a.violations.is_empty(), "{:?}", a.violations);
}

/// A small fixture: an image over a base, both simulated.
struct Fixture {
    exec: Executor,
    disk: SimStorage,
    base: SimBase,
}

const VSIZE: u64 = 256 << 10;
const BSIZE: u64 = 192 << 10;

impl Fixture {
    fn new(seed: u64, block_size: u32) -> Self {
        Self::with_layout(seed, block_size, None)
    }

    /// An image of the sparse layout, or compact with chunks of `chunk`.
    fn with_layout(seed: u64, block_size: u32, chunk: Option<u32>) -> Self {
        let exec = Executor::new(seed);
        let mut rng = Rng::new(seed);
        let mut data = vec![0u8; BSIZE as usize];
        for c in data.chunks_mut(8) {
            c.copy_from_slice(&(rng.next_u64() | 1).to_le_bytes());
        }
        let base = SimBase::new(exec.handle(), "base", data.into());
        let disk = SimStorage::new(exec.handle(), "image");
        let opts = CreateOptions {
            size: Some(VSIZE),
            base: Some(("base.raw".into(), Format::Raw)),
            block_size: Some(block_size),
            journal_size: Some(16384),
            compact: chunk.is_some(),
            chunk_size: chunk,
            ..Default::default()
        };
        exec.block_on(fvd_core::image::create(
            &disk,
            &opts,
            Some(&base as &dyn Base),
        ))
        .unwrap()
        .unwrap();
        Fixture { exec, disk, base }
    }

    fn base_dyn(&self) -> Option<Arc<dyn Base>> {
        Some(Arc::new(self.base.clone()))
    }

    fn open(&self) -> Image {
        self.exec
            .block_on(Image::open(
                Arc::new(self.disk.clone()),
                self.base_dyn(),
                OpenOptions::default(),
            ))
            .unwrap()
            .unwrap()
    }

    /// Crash keeping nothing that was not durable, check and reopen.
    fn crash_lose_all(&mut self) -> Image {
        let (d, _) = self.disk.crash(
            &mut Rng::new(1),
            CrashPolicy {
                keep_completed: 0.0,
                keep_inflight: 0.0,
                tear: 0.0,
            },
        );
        self.disk = d;
        let snap: Arc<dyn Storage> = Arc::new(self.disk.snapshot("check"));
        self.exec
            .block_on(check_consistency(snap, self.base_dyn()))
            .unwrap()
            .unwrap_or_else(|e| panic!("inconsistent after crash: {e}"));
        self.open()
    }

    fn read(&self, img: &Image, off: u64, len: usize) -> fvd_core::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.exec.block_on(img.read_slice(off, &mut v)).unwrap()?;
        Ok(v)
    }

    fn base_bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let b = self.base.bytes();
        b[off as usize..off as usize + len].to_vec()
    }
}

fn sector_of(tag: u64, sector: u64) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    model::fill_sector(tag, sector, &mut v);
    v
}

#[test]
fn base_read_error_reaches_the_caller_and_image_stays_consistent() {
    for bs in [512u32, 4096, 65536] {
        let mut fx = Fixture::new(10 + bs as u64, bs);
        let img = fx.open();
        // A read of base data fails.
        fx.base.set_faults(Faults {
            fail_read_at: Some(0),
            ..Faults::default()
        });
        let e = fx.read(&img, 4096, 8192).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert_eq!(e.errno(), libc::EIO);
        // A copy-on-write that needs base data fails and publishes nothing.
        fx.base.set_faults(Faults {
            fail_read_at: Some(0),
            ..Faults::default()
        });
        let e = fx
            .exec
            .block_on(img.write_slice(1034, &[0xab; 100], false))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        fx.base.set_faults(Faults::default());
        assert_eq!(fx.read(&img, 0, 8192).unwrap(), fx.base_bytes(0, 8192));
        fx.exec.block_on(img.flush()).unwrap().unwrap();
        drop(img);
        let img = fx.crash_lose_all();
        assert_eq!(fx.read(&img, 0, 65536).unwrap(), fx.base_bytes(0, 65536));
    }
}

#[test]
fn short_base_read_is_an_error_never_wrong_data() {
    for bs in [512u32, 4096, 65536] {
        let fx = Fixture::new(20 + bs as u64, bs);
        let img = fx.open();
        fx.base.set_faults(Faults {
            short_read: 1.0,
            ..Faults::default()
        });
        for (off, len) in [(0u64, 512usize), (4096, 8192), (1536, 70000)] {
            match fx.read(&img, off, len) {
                Ok(v) => assert_eq!(v, fx.base_bytes(off, len), "wrong data at {off}+{len}"),
                Err(e) => assert_eq!(e.errno(), libc::EIO, "{e}"),
            }
        }
        // A copy-on-write merging a short base read must fail, not write garbage.
        let r = fx
            .exec
            .block_on(img.write_slice(512 * 3, &sector_of(9, 3), false))
            .unwrap();
        fx.base.set_faults(Faults::default());
        let got = fx.read(&img, 0, 4096).unwrap();
        let mut want = fx.base_bytes(0, 4096);
        if r.is_ok() {
            want[1536..2048].copy_from_slice(&sector_of(9, 3));
        }
        assert_eq!(got, want, "block size {bs}");
    }
}

#[test]
fn enospc_fails_the_write_and_publishes_no_metadata() {
    for bs in [512u32, 4096, 65536] {
        let mut fx = Fixture::new(30 + bs as u64, bs);
        let img = fx.open();
        let used = fx.disk.allocated_bytes().unwrap();
        fx.disk.update_faults(|f| f.capacity = Some(used));
        let e = fx
            .exec
            .block_on(img.write_slice(8192, &sector_of(7, 16), false))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        assert_eq!(e.errno(), libc::ENOSPC);
        // The flush succeeds (nothing to commit for the failed write)...
        fx.exec.block_on(img.flush()).unwrap().unwrap();
        assert_eq!(fx.read(&img, 8192, 512).unwrap(), fx.base_bytes(8192, 512));
        drop(img);
        // ...and after a crash the sector still reads its old (base) value.
        fx.disk.update_faults(|f| f.capacity = None);
        let img = fx.crash_lose_all();
        assert_eq!(fx.read(&img, 8192, 512).unwrap(), fx.base_bytes(8192, 512));
        // Beyond the base range too: the old value there is zeros.
        let used = fx.disk.allocated_bytes().unwrap();
        fx.disk.update_faults(|f| f.capacity = Some(used));
        let e = fx
            .exec
            .block_on(img.write_slice(BSIZE + 4096, &sector_of(8, 0), true))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
        fx.disk.update_faults(|f| f.capacity = None);
        drop(img);
        let img = fx.crash_lose_all();
        assert_eq!(fx.read(&img, BSIZE + 4096, 512).unwrap(), vec![0u8; 512]);
    }
}

#[test]
fn enospc_when_create_cannot_size_the_image() {
    let exec = Executor::new(40);
    let disk = SimStorage::new(exec.handle(), "image");
    disk.update_faults(|f| f.max_len = Some(1 << 20));
    let opts = CreateOptions {
        size: Some(VSIZE),
        ..Default::default()
    };
    let e = exec
        .block_on(fvd_core::image::create(&disk, &opts, None))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
}

#[test]
fn failed_flush_is_not_durable_and_poisons_the_image() {
    for bs in [512u32, 4096, 65536] {
        let mut fx = Fixture::new(50 + bs as u64, bs);
        let img = fx.open();
        // A durable write first.
        fx.exec
            .block_on(img.write_slice(0, &sector_of(1, 0), true))
            .unwrap()
            .unwrap();
        // Then one whose flush fails.
        fx.exec
            .block_on(img.write_slice(0, &sector_of(2, 0), false))
            .unwrap()
            .unwrap();
        fx.exec
            .block_on(img.write_slice(70000 / 512 * 512, &sector_of(3, 136), false))
            .unwrap()
            .unwrap();
        fx.disk.update_faults(|f| f.fail_flush_at = Some(0));
        let e = fx.exec.block_on(img.flush()).unwrap().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        // Poisoned: later writes and flushes fail, reads still work.
        let w = fx
            .exec
            .block_on(img.write_slice(512, &sector_of(4, 1), false));
        assert!(w.unwrap().is_err(), "write accepted after a failed flush");
        assert!(fx.exec.block_on(img.flush()).unwrap().is_err());
        let _ = fx.exec.block_on(img.close());
        assert_eq!(fx.read(&img, 0, 512).unwrap(), sector_of(2, 0));
        drop(img);
        // Nothing of the failed flush is promised: after a crash that keeps
        // only what was durable before it, the old values are back.
        let img = fx.crash_lose_all();
        let s0 = fx.read(&img, 0, 512).unwrap();
        assert!(
            s0 == sector_of(1, 0) || s0 == sector_of(2, 0),
            "sector 0 reads {}",
            model::identify(&s0, 0, &fx.base_bytes(0, 512))
        );
        let s136 = fx.read(&img, 136 * 512, 512).unwrap();
        let base136 = fx.base_bytes(136 * 512, 512);
        assert!(
            s136 == base136 || s136 == sector_of(3, 136),
            "sector 136 reads {}",
            model::identify(&s136, 136, &base136)
        );
        assert!(matches!(
            model::identify(&s136, 136, &base136),
            Seen::Base | Seen::Write { .. }
        ));
    }
}

#[test]
fn latency_model_is_respected() {
    let exec = Executor::new(60);
    let disk = SimStorage::new(exec.handle(), "d");
    disk.set_latency(Latency {
        min: 10,
        max: 10,
        tail: 0.0,
        tail_max: 10,
    });
    exec.block_on(async {
        disk.set_len(4096).await.unwrap();
        let t0 = exec.now();
        disk.write_at(0, fvd_core::IoBuf::zeroed(512), false)
            .await
            .unwrap();
        assert_eq!(exec.now() - t0, 10);
    })
    .unwrap();
}

/// Regression (found by the simulator, seed 4053383373600616778 among
/// others): the first commit after a clean open wrote its journal blocks
/// before the header that clears the clean flag, under one fdatasync. A
/// crash could keep the blocks and lose the header; the next session, at the
/// same journal epoch, wrote fewer blocks from position 0, and after its own
/// crash the replay ran on into the older session's stale blocks,
/// resurrecting writes that the session in between had seen as gone.
#[test]
fn regression_stale_journal_blocks_after_lost_header_update() {
    use fvd_core::format::header::Region;
    use std::rc::Rc;
    let exec = Executor::new(77);
    let mut rng = Rng::new(77);
    let mut base_data = vec![0u8; 1 << 20];
    for c in base_data.chunks_mut(8) {
        c.copy_from_slice(&(rng.next_u64() | 1).to_le_bytes());
    }
    let base: Arc<dyn Base> = Arc::new(SimBase::new(exec.handle(), "base", base_data.into()));
    let disk = SimStorage::new(exec.handle(), "image");
    let fixed = Latency {
        min: 1000,
        max: 1000,
        tail: 0.0,
        tail_max: 1000,
    };
    disk.set_latency(fixed);
    let opts = CreateOptions {
        size: Some(1 << 20),
        base: Some(("base.raw".into(), Format::Raw)),
        block_size: Some(512),
        journal_size: Some(64 << 10),
        ..Default::default()
    };
    exec.block_on(fvd_core::image::create(&disk, &opts, Some(base.as_ref())))
        .unwrap()
        .unwrap();
    let open = |d: &SimStorage| {
        exec.block_on(Image::open(
            Arc::new(d.clone()),
            Some(base.clone()),
            OpenOptions::default(),
        ))
        .unwrap()
        .unwrap()
    };
    // Session A: 600 scattered copy-on-write blocks (3 journal blocks of
    // records), then a flush that crashes the moment its journal write has
    // completed; the crash keeps that write and nothing else unflushed.
    let a = Rc::new(open(&disk));
    let journal = a.header().unwrap().region(Region::Journal);
    for k in 0..600u64 {
        exec.block_on(a.write_slice(k * 1024, &[0xaa; 512], false))
            .unwrap()
            .unwrap();
    }
    let a2 = a.clone();
    exec.spawn(async move {
        let _ = a2.flush().await;
    });
    let mut probe = vec![0u8; 4];
    loop {
        exec.set_deadline(Some(exec.now() + 100));
        let stop = exec.run();
        disk.current_pages().read(journal.offset, &mut probe);
        if probe != [0u8; 4] {
            break;
        }
        assert_eq!(stop, fvd_sim::Stop::Deadline, "flush ended early");
    }
    exec.clear();
    exec.set_deadline(None);
    drop(a);
    let in_journal = |off: u64, _len: u64| off >= journal.offset && off < journal.end();
    let disk = disk.crash_keeping(in_journal);
    // Session B: whatever it sees of A's writes is now the durable state;
    // it writes and flushes one other sector, then crashes.
    let b = open(&disk);
    let mut seen_by_b = Vec::new();
    let mut buf = vec![0u8; 512];
    for k in 0..600u64 {
        exec.block_on(b.read_slice(k * 1024, &mut buf))
            .unwrap()
            .unwrap();
        seen_by_b.push(buf.clone());
    }
    exec.block_on(b.write_slice((1 << 19) + 512, &[0xbb; 512], false))
        .unwrap()
        .unwrap();
    exec.block_on(b.flush()).unwrap().unwrap();
    drop(b);
    let disk = disk.crash_keeping(|_, _| false);
    // Session C: nothing B saw may change.
    let c = open(&disk);
    for k in 0..600u64 {
        exec.block_on(c.read_slice(k * 1024, &mut buf))
            .unwrap()
            .unwrap();
        assert!(
            buf == seen_by_b[k as usize],
            "sector {} changed across a crash without being written",
            k * 2
        );
    }
    exec.block_on(c.read_slice((1 << 19) + 512, &mut buf))
        .unwrap()
        .unwrap();
    assert_eq!(buf, vec![0xbb; 512]);
}

/// Regression (found by the simulator, seed 16683295349085591547): with a
/// base whose size is not a multiple of 512, the sector holding the base's
/// end was split: its base part read from the base while its bit was 0, the
/// rest always from the image. A copy-on-write of that sector whose data
/// survived a crash but whose journal record did not then read half old,
/// half new — neither value.
#[test]
fn regression_sector_straddling_an_unaligned_base_end() {
    for bs in [512u32, 4096] {
        let exec = Executor::new(70);
        let mut rng = Rng::new(70);
        let mut data = vec![0u8; 32868];
        for c in data.chunks_mut(4) {
            c.copy_from_slice(&(rng.next_u64() as u32 | 1).to_le_bytes()[..c.len()]);
        }
        let base = SimBase::new(exec.handle(), "base", data.into());
        let base_dyn: Option<Arc<dyn Base>> = Some(Arc::new(base.clone()));
        let disk = SimStorage::new(exec.handle(), "image");
        let opts = CreateOptions {
            size: Some(64 << 10),
            base: Some(("base.raw".into(), Format::Raw)),
            block_size: Some(bs),
            ..Default::default()
        };
        exec.block_on(fvd_core::image::create(
            &disk,
            &opts,
            Some(&base as &dyn Base),
        ))
        .unwrap()
        .unwrap();
        let img = exec
            .block_on(Image::open(
                Arc::new(disk.clone()),
                base_dyn.clone(),
                OpenOptions::default(),
            ))
            .unwrap()
            .unwrap();
        exec.block_on(img.write_slice(64 * 512, &sector_of(5, 64), false))
            .unwrap()
            .unwrap();
        drop(img);
        // The data write survives, nothing else was written or flushed.
        let (disk, _) = disk.crash(
            &mut Rng::new(1),
            CrashPolicy {
                keep_completed: 1.0,
                keep_inflight: 1.0,
                tear: 0.0,
            },
        );
        let img = exec
            .block_on(Image::open(
                Arc::new(disk.clone()),
                base_dyn,
                OpenOptions::default(),
            ))
            .unwrap()
            .unwrap();
        let mut got = vec![0u8; 512];
        exec.block_on(img.read_slice(64 * 512, &mut got))
            .unwrap()
            .unwrap();
        let mut old = vec![0u8; 512];
        old[..100].copy_from_slice(&base.bytes()[32768..]);
        assert!(
            got == old || got == sector_of(5, 64),
            "block size {bs}: sector 64 reads {}",
            model::identify(&got, 64, &old)
        );
    }
}

/// Regression (found by the simulator, seed 4893216063067876452): when the
/// journal is full, a commit round's records go only to the checkpoint,
/// which wrote the bitmap and chunk-table pages in place under one
/// fdatasync. A crash could keep a block's bit without its chunk's table
/// entry: the block then read zeros instead of its data or the base's.
#[test]
fn regression_compact_checkpoint_bit_without_chunk() {
    use fvd_core::format::header::Region;
    use std::rc::Rc;
    let exec = Executor::new(78);
    let mut rng = Rng::new(78);
    let mut base_data = vec![0u8; 256 << 10];
    for c in base_data.chunks_mut(8) {
        c.copy_from_slice(&(rng.next_u64() | 1).to_le_bytes());
    }
    let base_bytes: Arc<[u8]> = base_data.into();
    let base: Arc<dyn Base> = Arc::new(SimBase::new(exec.handle(), "base", base_bytes.clone()));
    let disk = SimStorage::new(exec.handle(), "image");
    disk.set_latency(Latency {
        min: 1000,
        max: 1000,
        tail: 0.0,
        tail_max: 1000,
    });
    let opts = CreateOptions {
        size: Some(256 << 10),
        base: Some(("base.raw".into(), Format::Raw)),
        block_size: Some(512),
        journal_size: Some(4096),
        compact: true,
        chunk_size: Some(4096),
        ..Default::default()
    };
    exec.block_on(fvd_core::image::create(&disk, &opts, Some(base.as_ref())))
        .unwrap()
        .unwrap();
    let img = Rc::new(
        exec.block_on(Image::open(
            Arc::new(disk.clone()),
            Some(base.clone()),
            OpenOptions::default(),
        ))
        .unwrap()
        .unwrap(),
    );
    let bitmap = img.header().unwrap().region(Region::Bitmap);
    // The first round fills the one-block journal...
    exec.block_on(img.write_slice(0, &sector_of(1, 0), false))
        .unwrap()
        .unwrap();
    exec.block_on(img.flush()).unwrap().unwrap();
    // ...so the second goes to a checkpoint. Crash as soon as its bitmap
    // write has completed, keeping that write and nothing else unflushed.
    let sector = 40u64;
    exec.block_on(img.write_slice(sector * 512, &sector_of(2, sector), false))
        .unwrap()
        .unwrap();
    let img2 = img.clone();
    exec.spawn(async move {
        let _ = img2.flush().await;
    });
    let mut byte = [0u8; 1];
    loop {
        exec.set_deadline(Some(exec.now() + 100));
        let stop = exec.run();
        disk.current_pages()
            .read(bitmap.offset + sector / 8, &mut byte);
        if byte[0] & (1 << (sector % 8)) != 0 {
            break;
        }
        assert_eq!(stop, fvd_sim::Stop::Deadline, "flush ended early");
    }
    exec.clear();
    exec.set_deadline(None);
    drop(img);
    let disk = disk.crash_keeping(|off, _| off >= bitmap.offset && off < bitmap.end());
    let img = exec
        .block_on(Image::open(
            Arc::new(disk.clone()),
            Some(base),
            OpenOptions::default(),
        ))
        .unwrap()
        .unwrap();
    let mut got = vec![0u8; 512];
    exec.block_on(img.read_slice(sector * 512, &mut got))
        .unwrap()
        .unwrap();
    let old = &base_bytes[(sector * 512) as usize..(sector * 512 + 512) as usize];
    assert!(
        got == old || got == sector_of(2, sector),
        "sector {sector} reads {}",
        model::identify(&got, sector, old)
    );
}

/// Regression seeds of compact-image bugs the simulator found (each also
/// in the default run; kept here so they run first and fast):
/// * 5577507638538687331, 8384519305784458344, 10045292011028599186: a
///   chunk freed by a discard was stamped with the commit round current at
///   the free, but its record was queued only after further awaits; a round
///   could complete in between, the chunk was reused while its free was not
///   yet journaled, and after a crash two virtual chunks shared it;
/// * 4893216063067876452: bit durable without its chunk's table entry
///   (see `regression_compact_checkpoint_bit_without_chunk`);
/// * 16082075200178689610: a discard failing halfway left its freed chunks
///   unpublished (leaked, or reusable without a durable free), and a full
///   image answered ENOSPC while discarded chunks waited for a commit;
/// * 9278988092711311077: the same ENOSPC when, during that commit, other
///   writers took the chunks it released (the allocation now commits and
///   retries while frees are pending);
/// * 6427439016717633989, 7982015950141780070: two allocations growing the
///   storage at once issued `set_len` concurrently; the smaller one could
///   complete last and shrink the file under a chunk already in use;
/// * 8384519305784458344, 10045292011028599186 and 16082075200178689610
///   again: chunks freed by a discard whose punch failed were later handed
///   out as reading zeros (their copy-on-write fill skipped), so another
///   sector's old data showed through.
#[test]
fn regression_compact_seeds() {
    for seed in [
        5577507638538687331u64,
        8384519305784458344,
        10045292011028599186,
        4893216063067876452,
        16082075200178689610,
        6427439016717633989,
        7982015950141780070,
        9278988092711311077,
    ] {
        let cfg = SimConfig::from_seed(seed);
        assert!(
            cfg.compact_chunk.is_some(),
            "seed {seed} is no longer compact"
        );
        let r = run(&cfg);
        assert!(r.violations.is_empty(), "{}", r.violations[0]);
    }
}

/// Regression (found by review while adding background work to the
/// simulator, too rare for its random faults to hit): detaching the base (prefetch done) wrote the all-local header with a new
/// journal epoch, and a failed fdatasync after it did not poison the image.
/// The engine went on with the new epoch but the old journal position; a
/// later commit wrote its records where replay never looks, so a flushed
/// write into a newly allocated chunk (compact image) read zeros after a
/// crash. Whichever fdatasync of the detach fails, a later flush that
/// succeeds must have made its writes durable, or the image must refuse
/// them.
#[test]
fn failed_flush_while_detaching_the_base_loses_no_acknowledged_write() {
    let (mut failed, mut done) = (0, 0);
    for (k, chunk) in (0..8u64).flat_map(|k| [(k, None), (k, Some(16384u32))]) {
        let mut fx = Fixture::with_layout(90 + k, 4096, chunk);
        let img = fx.open();
        // Every block local, but soft (copy-on-read fills): writes to them
        // still publish bits.
        fx.exec.block_on(img.cache(0, VSIZE)).unwrap().unwrap();
        fx.exec
            .block_on(img.write_slice(4096, &sector_of(1, 8), false))
            .unwrap()
            .unwrap();
        fx.exec.block_on(img.flush()).unwrap().unwrap();
        fx.disk.update_faults(|f| f.fail_flush_at = Some(k));
        let detached = fx.exec.block_on(img.detach_base_if_complete()).unwrap();
        match &detached {
            Ok(d) => {
                assert!(d, "k={k}: not detached although every block is local");
                done += 1;
            }
            Err(_) => failed += 1,
        }
        fx.disk.update_faults(|f| f.fail_flush_at = None);
        // A block local but not hard, and (compact) a chunk beyond the base
        // range not allocated yet: both need metadata.
        let w = fx
            .exec
            .block_on(img.write_slice(8192, &sector_of(2, 16), false))
            .unwrap()
            .and_then(|()| {
                fx.exec
                    .block_on(img.write_slice(BSIZE + 16384, &sector_of(3, 416), false))
                    .unwrap()
            });
        let f = fx.exec.block_on(img.flush()).unwrap();
        let acknowledged = w.is_ok() && f.is_ok();
        drop(img);
        let img = fx.crash_lose_all();
        assert_eq!(fx.read(&img, 4096, 512).unwrap(), sector_of(1, 8), "k={k}");
        if acknowledged {
            let got = fx.read(&img, 8192, 512).unwrap();
            assert!(
                got == sector_of(2, 16),
                "k={k} {chunk:?} (detach: {detached:?}): a flushed write reads {}",
                model::identify(&got, 16, &fx.base_bytes(8192, 512))
            );
            let got = fx.read(&img, BSIZE + 16384, 512).unwrap();
            assert!(
                got == sector_of(3, 416),
                "k={k} {chunk:?} (detach: {detached:?}): a flushed write reads {}",
                model::identify(&got, 416, &[0u8; 512])
            );
        }
    }
    // Both outcomes were exercised.
    assert!(failed > 0 && done > 0, "{failed} failed, {done} done");
}

/// Regression (found by the simulator's background seeds, e.g.
/// 13182049104682160205): detaching the base ended the journal epoch with
/// a new header only. The chunk-table records journaled in that epoch
/// (chunks allocated by fills and writes since the last checkpoint) were
/// never written in place, so after a crash those chunks were unmapped:
/// base data and flushed writes read zeros, and a chunk could even be
/// handed out twice.
#[test]
fn regression_detach_keeps_the_chunk_table() {
    let mut fx = Fixture::with_layout(95, 4096, Some(16384));
    let img = fx.open();
    fx.exec
        .block_on(img.write_slice(BSIZE + 16384, &sector_of(3, 416), false))
        .unwrap()
        .unwrap();
    // Copy-on-read fills allocate (and journal) the chunks of the base range.
    fx.exec.block_on(img.cache(0, VSIZE)).unwrap().unwrap();
    fx.exec.block_on(img.flush()).unwrap().unwrap();
    assert!(
        fx.exec
            .block_on(img.detach_base_if_complete())
            .unwrap()
            .unwrap()
    );
    drop(img);
    let img = fx.crash_lose_all();
    assert_eq!(img.base_range(), 0, "the detach was not durable");
    assert!(
        fx.read(&img, 0, BSIZE as usize).unwrap() == fx.base_bytes(0, BSIZE as usize),
        "base data changed across the detach and a crash"
    );
    assert_eq!(
        fx.read(&img, BSIZE + 16384, 512).unwrap(),
        sector_of(3, 416)
    );
}

/// Regression (found by the simulator's background seeds, e.g.
/// 13182049104682160205 and 13182242400016144887): a write that mapped its
/// blocks before the base was detached published their bits after it; the
/// next commit found the records outside the (now empty) durable bitmap,
/// failed, and poisoned the image with no I/O error at all.
#[test]
fn regression_write_racing_the_detach() {
    use std::rc::Rc;
    for seed in 0..8 {
        let mut fx = Fixture::new(100 + seed, 4096);
        let img = Rc::new(fx.open());
        // Every block local but soft: a write still publishes bits.
        fx.exec.block_on(img.cache(0, VSIZE)).unwrap().unwrap();
        let writer = img.clone();
        fx.exec.spawn(async move {
            writer
                .write_slice(8192, &sector_of(2, 16), false)
                .await
                .unwrap();
        });
        assert!(
            fx.exec
                .block_on(img.detach_base_if_complete())
                .unwrap()
                .unwrap()
        );
        assert_eq!(fx.exec.run(), fvd_sim::Stop::Idle);
        fx.exec
            .block_on(img.flush())
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: flush after the detach failed: {e}"));
        drop(img);
        let img = fx.crash_lose_all();
        assert_eq!(fx.read(&img, 8192, 512).unwrap(), sector_of(2, 16));
    }
}

/// Regression (found by the simulator, background seed
/// 13182221185693649488): a read mapped to image and base segments awaited
/// one segment while the base was detached; the copy-on-read of a later
/// base segment then computed an empty block range and panicked slicing
/// its buffer.
#[test]
fn regression_read_racing_the_detach() {
    use fvd_core::storage::{AllocRun, IoFuture};
    use fvd_sim::SimHandle;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::atomic::AtomicBool;
    /// The first read at offset 0 after arming takes a (virtual) second.
    struct SlowFirstRead {
        inner: SimBase,
        sim: SimHandle,
        armed: AtomicBool,
    }
    impl Base for SlowFirstRead {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: fvd_core::IoBuf) -> IoFuture<'_, fvd_core::IoBuf> {
            Box::pin(async move {
                if offset == 0 && self.armed.swap(false, Ordering::Relaxed) {
                    self.sim.sleep(Duration::from_secs(1)).await;
                }
                self.inner.read_at(offset, buf).await
            })
        }
        fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
            self.inner.allocation(offset, len)
        }
        fn format(&self) -> fvd_core::Format {
            fvd_core::Format::Raw
        }
        fn describe(&self) -> String {
            "slow-first-read".into()
        }
    }
    let fx = Fixture::new(96, 4096);
    let slow = Arc::new(SlowFirstRead {
        inner: fx.base.clone(),
        sim: fx.exec.handle(),
        armed: AtomicBool::new(false),
    });
    let img = Rc::new(
        fx.exec
            .block_on(Image::open(
                Arc::new(fx.disk.clone()),
                Some(slow.clone()),
                OpenOptions::default(),
            ))
            .unwrap()
            .unwrap(),
    );
    img.set_copy_on_read(true);
    // Block 1 local, blocks 0 and 2 in the base: a read of blocks 0..3 is
    // mapped to three segments, base, image, base.
    fx.exec.block_on(img.cache(4096, 4096)).unwrap().unwrap();
    slow.armed.store(true, Ordering::Relaxed);
    let got = Rc::new(RefCell::new(None));
    let (reader, out) = (img.clone(), got.clone());
    fx.exec.spawn(async move {
        let mut buf = vec![0u8; 12288];
        let r = reader.read_slice(0, &mut buf).await;
        *out.borrow_mut() = Some(r.map(|()| buf));
    });
    // Let the reader start its (slow) base read of block 0...
    fx.exec.set_deadline(Some(fx.exec.now() + 1));
    assert_eq!(fx.exec.run(), fvd_sim::Stop::Deadline);
    fx.exec.set_deadline(None);
    // ...while every block becomes local and the base is detached.
    fx.exec
        .block_on(async {
            img.cache(0, VSIZE).await.unwrap();
            assert!(img.detach_base_if_complete().await.unwrap());
        })
        .unwrap();
    assert_eq!(fx.exec.run(), fvd_sim::Stop::Idle);
    let read = got.borrow_mut().take().expect("the read did not complete");
    assert!(read.unwrap() == fx.base_bytes(0, 12288), "wrong data");
}

/// Background seeds that found the detach bugs above: the first five the
/// lost chunk-table entries and the bits published after the detach (they
/// are background seeds 25, 50, 114, 164 and 244 of the default run), the
/// last one the read racing the detach (background seed 1222). Their runs
/// depend on the prefetch algorithm, so the tests above pin the bugs down
/// deterministically.
#[test]
fn regression_background_seeds() {
    for seed in [
        13182049104682160205u64,
        13182242400016144887,
        13182218960992566217,
        13182180830706249799,
        13182270923345987488,
        13182221185693649488,
    ] {
        let cfg = SimConfig::from_seed(seed);
        assert!(
            cfg.prefetch.is_some(),
            "seed {seed} has no prefetch any more"
        );
        let r = run(&cfg);
        assert!(r.violations.is_empty(), "{}", r.violations[0]);
    }
}

/// Storing a prefetch profile fdatasyncs the image, covering guest writes
/// not yet flushed; if that fails, the kernel may have dropped their pages,
/// so no later flush may report success.
#[test]
fn failed_flush_while_storing_a_profile_poisons_the_image() {
    for k in 0..2u64 {
        let fx = Fixture::with_layout(300 + k, 4096, None);
        let img = fx.open();
        fx.exec
            .block_on(img.write_slice(4096, &sector_of(1, 8), false))
            .unwrap()
            .unwrap();
        fx.disk.update_faults(|f| f.fail_flush_at = Some(k));
        let stored = fx.exec.block_on(img.store_profile(&[(0, 4096)])).unwrap();
        assert!(
            stored.is_err(),
            "k={k}: the injected flush failure was not reported"
        );
        fx.disk.update_faults(|f| f.fail_flush_at = None);
        let flushed = fx.exec.block_on(img.flush()).unwrap();
        assert!(
            flushed.is_err(),
            "k={k}: a flush after a failed fdatasync reported success"
        );
    }
}

#[test]
fn default_rewrite_seeds_cover_every_shape() {
    let cfgs: Vec<SimConfig> = (0..DEFAULT_REWRITE_SEEDS)
        .map(|i| SimConfig::from_seed(rewrite_seed(i)))
        .collect();
    assert!((0..DEFAULT_REWRITE_SEEDS).all(|i| is_rewrite_seed(rewrite_seed(i))));
    assert!(cfgs.iter().all(|c| c.base_size == Some(c.virtual_size)));
    assert!(
        cfgs.iter()
            .all(|c| c.rewrite_recent > 0.0 && c.tear.is_some())
    );
    for bs in [512u32, 4096, 65536] {
        let of_bs = || cfgs.iter().filter(move |c| c.block_size == bs);
        assert!(
            of_bs().any(|c| c.compact_chunk.is_none()),
            "bs {bs}: sparse"
        );
        assert!(
            of_bs().any(|c| c.compact_chunk.is_some()),
            "bs {bs}: compact"
        );
    }
    assert!(cfgs.iter().any(|c| c.testers == 1));
    assert!(cfgs.iter().any(|c| c.image_faults.flush_error > 0.0));
    assert!(cfgs.iter().any(|c| c.copy_on_read));
}

/// The mutation checks of the one-fdatasync commit (issue [commit]): the
/// simulator must catch a protocol that rewrites blocks in place while
/// their checked journal record is unconfirmed, and one that leaves a
/// queued record's CRC stale after a rewrite. The same seeds with the
/// protocol as designed find nothing (they are part of the default run).
#[test]
fn mutations_of_the_commit_protocol_are_caught() {
    let seeds: Vec<u64> = (0..60).map(rewrite_seed).collect();
    for m in [
        fvd_core::Mutation::SkipConfirmation,
        fvd_core::Mutation::SkipStale,
    ] {
        let found = Mutex::new(0u64);
        let i = AtomicU64::new(0);
        let reports = run_parallel(|| {
            let k = i.fetch_add(1, Ordering::Relaxed) as usize;
            let mut cfg = SimConfig::from_seed(*seeds.get(k)?);
            cfg.mutation = m;
            Some(cfg)
        });
        for r in &reports {
            *found.lock().unwrap() += r.violations.len() as u64;
        }
        let found = found.into_inner().unwrap();
        let early: u64 = reports.iter().map(|r| r.early_blocks).sum();
        let line = format!(
            "sim mutation {m:?}: seeds={} early_blocks={early} violations={found}\n",
            reports.len()
        );
        let _ = std::io::stdout().write_all(line.as_bytes());
        assert!(found > 0, "mutation {m:?} went unnoticed");
    }
}

/// Crash `disk` with `policy` (seeded by `seed`), check the survivor and
/// open it.
fn crash_and_open(fx: &mut Fixture, seed: u64, policy: CrashPolicy) -> Image {
    let (d, _) = fx.disk.crash(&mut Rng::new(seed), policy);
    fx.disk = d;
    let snap: Arc<dyn Storage> = Arc::new(fx.disk.snapshot("check"));
    fx.exec
        .block_on(check_consistency(snap, fx.base_dyn()))
        .unwrap()
        .unwrap_or_else(|e| panic!("inconsistent after crash: {e}"));
    fx.open()
}

fn flushes(img: &Image) -> u64 {
    img.stats().storage_flushes.load(Ordering::Relaxed)
}

/// Write sectors `first..first+count` with tag `tag`.
fn write_tag(fx: &Fixture, img: &Image, tag: u64, first: u64, count: u64) {
    let mut data = Vec::new();
    for s in first..first + count {
        data.extend(sector_of(tag, s));
    }
    fx.exec
        .block_on(img.write_slice(first * 512, &data, false))
        .unwrap()
        .unwrap();
}

/// Issue [commit]: a block copied on write and flushed with one fdatasync
/// has an unconfirmed journal record (replay checks its CRC). Rewritten in
/// place right after the flush and torn by a crash before the next one, it
/// would fail the check and read the base: a flushed write lost. The engine
/// first confirms the record (one journal block, one fdatasync). Checked
/// for both layouts and many tearings; the mutation without the
/// confirmation loses the flushed data here.
#[test]
fn rewrite_right_after_a_flush_keeps_the_flushed_data() {
    for mutation in [
        fvd_core::Mutation::None,
        fvd_core::Mutation::SkipConfirmation,
    ] {
        let mut lost = 0;
        for (k, chunk) in (0..24u64).flat_map(|k| [(k, None), (k, Some(16384u32))]) {
            let mut fx = Fixture::with_layout(400 + k, 4096, chunk);
            let img = fx.open();
            img.set_mutation(mutation);
            // The first round after open writes the header (two fdatasyncs).
            write_tag(&fx, &img, 1, 0, 1);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            // A first write to base block 2, flushed: one fdatasync.
            let f0 = flushes(&img);
            write_tag(&fx, &img, 2, 16, 8);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            assert_eq!(flushes(&img) - f0, 1, "a flush after a first write");
            // Rewritten in part, then a crash that tears what was not durable.
            write_tag(&fx, &img, 3, 17, 3);
            if mutation == fvd_core::Mutation::None {
                let confirms = img.stats().confirm_rounds.load(Ordering::Relaxed);
                assert_eq!(confirms, 1, "the rewrite confirmed the record first");
            }
            drop(img);
            let img = crash_and_open(
                &mut fx,
                k,
                CrashPolicy {
                    keep_completed: 1.0,
                    keep_inflight: 1.0,
                    tear: 1.0,
                },
            );
            for s in 16..24u64 {
                let got = fx.read(&img, s * 512, 512).unwrap();
                let ok =
                    got == sector_of(2, s) || ((17..20).contains(&s) && got == sector_of(3, s));
                if !ok {
                    assert_eq!(
                        mutation,
                        fvd_core::Mutation::SkipConfirmation,
                        "k={k} {chunk:?}: sector {s} reads {}",
                        model::identify(&got, s, &fx.base_bytes(s * 512, 512))
                    );
                    lost += 1;
                    break;
                }
            }
        }
        if mutation == fvd_core::Mutation::SkipConfirmation {
            assert!(
                lost > 0,
                "the mutation lost nothing: the test proves nothing"
            );
        }
    }
}

/// Issue [commit]: flush-per-write. After a first round shows the flushes
/// come close together, a first write to a base block journals its record
/// in an early block alongside its data, and the flush after it is one
/// fdatasync with no journal write of its own; the flushed data survives a
/// crash that keeps only what was durable. With early journaling off the
/// same flush writes the journal block itself.
#[test]
fn flush_after_an_early_journaled_write_is_one_fdatasync() {
    for early in [fvd_core::EarlyJournal::Auto, fvd_core::EarlyJournal::Never] {
        for chunk in [None, Some(16384u32)] {
            let mut fx = Fixture::with_layout(470, 4096, chunk);
            let img = fx.open();
            img.set_early_journal(early);
            // The first round after open writes the header.
            write_tag(&fx, &img, 1, 0, 8);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            // Compact: the chunk of blocks 2-3 is allocated by this write.
            write_tag(&fx, &img, 2, 16, 8);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            let s = img.stats();
            let (f0, j0, e0) = (
                flushes(&img),
                s.journal_writes.load(Ordering::Relaxed),
                s.early_blocks.load(Ordering::Relaxed),
            );
            write_tag(&fx, &img, 3, 24, 8);
            let j_mid = s.journal_writes.load(Ordering::Relaxed);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            let s = img.stats();
            let early_blocks = s.early_blocks.load(Ordering::Relaxed) - e0;
            assert_eq!(flushes(&img) - f0, 1, "{early:?} {chunk:?}: one fdatasync");
            assert_eq!(
                s.journal_writes.load(Ordering::Relaxed) - j0,
                1,
                "{early:?} {chunk:?}: one journal block"
            );
            if early == fvd_core::EarlyJournal::Auto {
                assert_eq!(early_blocks, 1, "{chunk:?}: the write journaled early");
                assert_eq!(j_mid - j0, 1, "{chunk:?}: before the flush");
            } else {
                assert_eq!(early_blocks, 0, "{chunk:?}");
                assert_eq!(j_mid, j0, "{chunk:?}: the round wrote it");
            }
            drop(img);
            let img = fx.crash_lose_all();
            for s in 24..32u64 {
                let got = fx.read(&img, s * 512, 512).unwrap();
                assert!(
                    got == sector_of(3, s),
                    "{early:?} {chunk:?}: sector {s} lost"
                );
            }
        }
    }
}

/// Early journal blocks only while flushes come close together: writes
/// streaming without a flush stop writing them after two (their bits then
/// share the next round's block), and a round that took many groups turns
/// them off until a round takes few again.
#[test]
fn early_journal_blocks_only_when_flushes_are_frequent() {
    let mut fx = Fixture::with_layout(490, 4096, None);
    let img = fx.open();
    let early = |img: &Image| img.stats().early_blocks.load(Ordering::Relaxed);
    write_tag(&fx, &img, 1, 0, 8);
    fx.exec.block_on(img.flush()).unwrap().unwrap();
    // Eight first writes (to every other block: no merging), no flush.
    for i in 0..8u64 {
        write_tag(&fx, &img, 2, 16 + 16 * i, 8);
    }
    assert_eq!(early(&img), 2, "two early blocks, then the round's");
    fx.exec.block_on(img.flush()).unwrap().unwrap();
    // That round took 7 groups: the next write waits for a round.
    write_tag(&fx, &img, 3, 200, 8);
    assert_eq!(early(&img), 2);
    fx.exec.block_on(img.flush()).unwrap().unwrap();
    // The last round took one group: early again.
    write_tag(&fx, &img, 4, 232, 8);
    assert_eq!(early(&img), 3);
    fx.exec.block_on(img.flush()).unwrap().unwrap();
    drop(img);
    let img = fx.crash_lose_all();
    for (tag, first) in [(3u64, 200u64), (4, 232)] {
        for s in first..first + 8 {
            assert!(fx.read(&img, s * 512, 512).unwrap() == sector_of(tag, s));
        }
    }
}

/// Issue [commit]: two early journal blocks in a row, no flush between. The
/// second must not confirm the first (its data is not durable yet): a
/// crash that keeps the journal blocks but not the first write's data must
/// leave that block reading the base, never what the image file held. The
/// mutation `ConfirmUnsynced` (a block confirms everything before it) makes
/// some crash read bytes the guest never wrote.
#[test]
fn an_early_block_never_confirms_unsynced_data() {
    for mutation in [
        fvd_core::Mutation::None,
        fvd_core::Mutation::ConfirmUnsynced,
    ] {
        let mut bad = 0;
        for k in 0..40u64 {
            let mut fx = Fixture::with_layout(480, 4096, None);
            let img = fx.open();
            img.set_mutation(mutation);
            img.set_early_journal(fvd_core::EarlyJournal::Always);
            write_tag(&fx, &img, 1, 0, 8);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            let e0 = img.stats().early_blocks.load(Ordering::Relaxed);
            write_tag(&fx, &img, 2, 16, 8);
            write_tag(&fx, &img, 3, 32, 8);
            assert_eq!(img.stats().early_blocks.load(Ordering::Relaxed) - e0, 2);
            drop(img);
            let (d, _) = fx.disk.crash(
                &mut Rng::new(k),
                CrashPolicy {
                    keep_completed: 0.5,
                    keep_inflight: 0.5,
                    tear: 0.0,
                },
            );
            fx.disk = d;
            let img = fx.open();
            for (tag, first) in [(2u64, 16u64), (3, 32)] {
                for s in first..first + 8 {
                    let got = fx.read(&img, s * 512, 512).unwrap();
                    if got != sector_of(tag, s) && got != fx.base_bytes(s * 512, 512) {
                        assert_eq!(
                            mutation,
                            fvd_core::Mutation::ConfirmUnsynced,
                            "k={k}: sector {s} reads {}",
                            model::identify(&got, s, &fx.base_bytes(s * 512, 512))
                        );
                        bad += 1;
                    }
                }
            }
        }
        if mutation == fvd_core::Mutation::ConfirmUnsynced {
            assert!(
                bad > 0,
                "the mutation went unnoticed: the test proves nothing"
            );
        }
    }
}

/// Issue [commit]: a block rewritten while its checked record is still
/// queued makes the record's CRC stale; the round that takes it makes the
/// data durable before the journal (an ordered round), so the record holds
/// whatever the data is. The mutation that keeps the stale CRC loses the
/// flushed data after a crash.
#[test]
fn rewrite_before_the_flush_makes_the_round_ordered() {
    for mutation in [fvd_core::Mutation::None, fvd_core::Mutation::SkipStale] {
        for chunk in [None, Some(16384u32)] {
            let mut fx = Fixture::with_layout(450, 4096, chunk);
            let img = fx.open();
            img.set_mutation(mutation);
            write_tag(&fx, &img, 1, 0, 1);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            let ordered0 = img.stats().ordered_rounds.load(Ordering::Relaxed);
            write_tag(&fx, &img, 2, 16, 8);
            write_tag(&fx, &img, 3, 18, 2);
            fx.exec.block_on(img.flush()).unwrap().unwrap();
            let ordered = img.stats().ordered_rounds.load(Ordering::Relaxed) - ordered0;
            drop(img);
            let img = fx.crash_lose_all();
            let got: Vec<Vec<u8>> = (16..24u64)
                .map(|s| fx.read(&img, s * 512, 512).unwrap())
                .collect();
            let want: Vec<Vec<u8>> = (16..24u64)
                .map(|s| sector_of(if (18..20).contains(&s) { 3 } else { 2 }, s))
                .collect();
            if mutation == fvd_core::Mutation::None {
                assert_eq!(ordered, 1, "{chunk:?}");
                assert!(got == want, "{chunk:?}: a flushed write was lost");
            } else {
                assert!(got != want, "{chunk:?}: the stale CRC went unnoticed");
            }
        }
    }
}

/// Issue [commit]: torn data under a durable journal record. The one
/// fdatasync of a round covers data and journal together, so a crash may
/// keep the journal block and tear the data: replay checks the block's
/// CRC and leaves it reading the base (the flush never completed). With
/// the whole data kept, the record applies.
#[test]
fn torn_data_under_a_durable_record_reads_the_base() {
    use std::rc::Rc;
    for (keep_all, chunk) in [
        (false, None),
        (true, None),
        (false, Some(16384)),
        (true, Some(16384)),
    ] {
        let mut fx = Fixture::with_layout(460, 4096, chunk);
        let img = Rc::new(fx.open());
        write_tag(&fx, &img, 1, 0, 1);
        fx.exec.block_on(img.flush()).unwrap().unwrap();
        let journal = img
            .header()
            .unwrap()
            .region(fvd_core::format::header::Region::Journal);
        write_tag(&fx, &img, 2, 16, 8);
        let flusher = img.clone();
        fx.exec.spawn(async move {
            let _ = flusher.flush().await;
        });
        // Run until the round's journal write completed but is not durable.
        let mut cur = vec![0u8; journal.length as usize];
        let mut dur = vec![0u8; journal.length as usize];
        loop {
            fx.exec.set_deadline(Some(fx.exec.now() + 100));
            let stop = fx.exec.run();
            fx.disk.current_pages().read(journal.offset, &mut cur);
            fx.disk.durable_pages().read(journal.offset, &mut dur);
            if cur != dur {
                break;
            }
            assert_eq!(stop, fvd_sim::Stop::Deadline, "the flush ended first");
        }
        fx.exec.clear();
        fx.exec.set_deadline(None);
        drop(img);
        fx.disk = fx.disk.crash_keeping_sectors(|off, _, sector| {
            let in_journal = off >= journal.offset && off < journal.end();
            in_journal || keep_all || (sector / 512) % 2 == 0
        });
        let snap: Arc<dyn Storage> = Arc::new(fx.disk.snapshot("check"));
        fx.exec
            .block_on(check_consistency(snap, fx.base_dyn()))
            .unwrap()
            .unwrap_or_else(|e| panic!("inconsistent after crash: {e}"));
        let img = fx.open();
        let got = fx.read(&img, 16 * 512, 4096).unwrap();
        let dropped = img.stats().replay_dropped.load(Ordering::Relaxed);
        if keep_all {
            let want: Vec<u8> = (16..24).flat_map(|s| sector_of(2, s)).collect();
            assert!(
                got == want,
                "{chunk:?}: whole data and record, yet not applied"
            );
            assert_eq!(dropped, 0);
        } else {
            assert!(
                got == fx.base_bytes(16 * 512, 4096),
                "{chunk:?}: torn data under a durable record did not read the base"
            );
            assert_eq!(dropped, 1, "{chunk:?}");
        }
    }
}

/// Issue [commit], bug 3: a journal write that fails (ENOSPC, EIO) left
/// nothing half-done that a later round cannot redo — no fdatasync failed —
/// so it must not poison the image: the flush reports the error, the
/// records stay queued, and the next flush commits them.
#[test]
fn failed_journal_write_does_not_poison_the_image() {
    for chunk in [None, Some(16384u32)] {
        let mut fx = Fixture::with_layout(470, 4096, chunk);
        let img = fx.open();
        // The round's own journal block is what fails here.
        img.set_early_journal(fvd_core::EarlyJournal::Never);
        write_tag(&fx, &img, 1, 0, 1);
        fx.exec.block_on(img.flush()).unwrap().unwrap();
        write_tag(&fx, &img, 2, 16, 8);
        // The next write is the round's journal block.
        fx.disk.update_faults(|f| f.fail_write_at = Some(0));
        let e = fx.exec.block_on(img.flush()).unwrap().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(e.to_string().contains("journal write"), "{e}");
        // Not poisoned: writes (also ones needing metadata) and flushes work.
        write_tag(&fx, &img, 3, 40, 2);
        fx.exec
            .block_on(img.flush())
            .unwrap()
            .unwrap_or_else(|e| panic!("{chunk:?}: flush after a failed journal write: {e}"));
        drop(img);
        let img = fx.crash_lose_all();
        for (tag, first, count) in [(2u64, 16u64, 8u64), (3, 40, 2)] {
            for s in first..first + count {
                assert!(
                    fx.read(&img, s * 512, 512).unwrap() == sector_of(tag, s),
                    "{chunk:?}: sector {s} lost"
                );
            }
        }
    }
}
