//! Copy-on-read, profile recording and prefetch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fvd_core::base::{Base, RawBase};
use fvd_core::executor::ThreadClock;
use fvd_core::executor::block_on;
use fvd_core::image::prefetch::{
    PrefetchConfig, PrefetchMode, PrefetchState, PrefetchStatus, prefetch,
};
use fvd_core::storage::{AllocRun, IoFuture, MemStorage};
use fvd_core::{CreateOptions, Format, Image, IoBuf, OpenOptions};

const MIB: u64 = 1 << 20;

/// A base that counts and logs what is fetched, can be slowed down, and can fail.
struct Counting {
    inner: RawBase,
    fetched: AtomicU64,
    log: Mutex<Vec<(u64, u64)>>,
    delay_ms: AtomicU64,
    fail_after: AtomicU64,
    failed: AtomicBool,
    /// While set, reads that start wait (a base read under way).
    hold: AtomicBool,
}

impl Counting {
    fn new(data: &[u8]) -> Arc<Counting> {
        Arc::new(Counting {
            inner: RawBase::new(Arc::new(MemStorage::from_bytes("base", data))).unwrap(),
            fetched: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            delay_ms: AtomicU64::new(0),
            fail_after: AtomicU64::new(u64::MAX),
            failed: AtomicBool::new(false),
            hold: AtomicBool::new(false),
        })
    }
}

impl Base for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let n = buf.len() as u64;
        let total = self.fetched.fetch_add(n, Ordering::SeqCst) + n;
        self.log.lock().unwrap().push((offset, n));
        let delay = self.delay_ms.load(Ordering::SeqCst);
        let fail = total > self.fail_after.load(Ordering::SeqCst);
        if fail {
            self.failed.store(true, Ordering::SeqCst);
        }
        let held = self.hold.load(Ordering::SeqCst);
        Box::pin(async move {
            while held && self.hold.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if delay > 0 {
                std::thread::sleep(Duration::from_millis(delay));
            }
            if fail {
                return Err(std::io::Error::from_raw_os_error(5));
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
        "counting-base".into()
    }
}

fn base_data(size: usize) -> Vec<u8> {
    (0..size).map(|i| ((i / 4096) % 251) as u8 + 1).collect()
}

fn setup(size: u64, cor: bool) -> (MemStorage, Arc<Counting>, Vec<u8>) {
    let data = base_data(size as usize);
    let base = Counting::new(&data);
    let disk = MemStorage::new("img");
    let opts = CreateOptions {
        size: Some(size),
        base: Some(("b".into(), Format::Raw)),
        block_size: Some(4096),
        copy_on_read: cor,
        ..Default::default()
    };
    block_on(fvd_core::image::create(
        &disk,
        &opts,
        Some(base.as_ref() as &dyn Base),
    ))
    .unwrap();
    (disk, base, data)
}

fn open(disk: &MemStorage, base: &Arc<Counting>) -> Image {
    let b: Arc<dyn Base> = base.clone();
    block_on(Image::open(
        Arc::new(disk.clone()),
        Some(b),
        OpenOptions::default(),
    ))
    .unwrap()
}

#[test]
fn copy_on_read_fetches_each_byte_once() {
    let (disk, base, data) = setup(16 * MIB, true);
    let img = open(&disk, &base);
    assert!(img.copy_on_read());
    // 1,000 random 4 KiB reads, then the same again.
    let mut x = 12345u64;
    let offs: Vec<u64> = (0..1000)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % (16 * MIB / 4096) * 4096
        })
        .collect();
    let unique: std::collections::BTreeSet<u64> = offs.iter().copied().collect();
    for pass in 0..2 {
        for &o in &offs {
            let mut b = vec![0u8; 4096];
            block_on(img.read_slice(o, &mut b)).unwrap();
            assert!(
                b == data[o as usize..o as usize + 4096],
                "pass {pass} offset {o}"
            );
        }
        if pass == 0 {
            assert_eq!(
                base.fetched.load(Ordering::SeqCst),
                unique.len() as u64 * 4096,
                "first pass fetched more than it read"
            );
        }
    }
    assert_eq!(
        base.fetched.load(Ordering::SeqCst),
        unique.len() as u64 * 4096,
        "second pass fetched from the base"
    );
    assert_eq!(
        img.stats().cor_bytes.load(Ordering::SeqCst),
        unique.len() as u64 * 4096
    );
}

/// A guest that reads a block again before its copy-on-read fill has
/// finished (the fill runs after the first read was answered) gets the data
/// the fill holds, without fetching the block from the base a second time;
/// once the fill finished, reads come from the image.
#[test]
fn a_reread_during_a_pending_fill_does_not_fetch_again() {
    type Deferred = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let (disk, base, data) = setup(4 * MIB, true);
    let img = Arc::new(open(&disk, &base));
    let deferred: Arc<Mutex<Vec<Deferred>>> = Arc::default();
    let queue = deferred.clone();
    img.enable_background(Arc::new(move |f| queue.lock().unwrap().push(f)));
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        block_on(img.read_slice(off, &mut b)).unwrap();
        assert!(b == data[off as usize..off as usize + len], "offset {off}");
    };
    read(8192, 4096);
    assert_eq!(base.fetched.load(Ordering::SeqCst), 4096);
    assert_eq!(deferred.lock().unwrap().len(), 1, "the fill waits");
    // The same block again, and a part of it.
    read(8192, 4096);
    read(8192 + 512, 1024);
    assert_eq!(
        base.fetched.load(Ordering::SeqCst),
        4096,
        "a block whose fill is pending was fetched again"
    );
    assert_eq!(img.stats().cor_pending_hits.load(Ordering::SeqCst), 2);
    // A read reaching past the pending block fetches (only what it lacks
    // is not tracked: the whole span comes from the base).
    read(8192, 8192);
    assert_eq!(base.fetched.load(Ordering::SeqCst), 4096 + 8192);
    for f in std::mem::take(&mut *deferred.lock().unwrap()) {
        block_on(f);
    }
    read(8192, 8192);
    assert_eq!(base.fetched.load(Ordering::SeqCst), 4096 + 8192);
    assert_eq!(img.stats().cor_pending_hits.load(Ordering::SeqCst), 2);
    assert_eq!(img.stats().cor_bytes.load(Ordering::SeqCst), 8192);
}

#[test]
fn copy_on_read_never_overwrites_a_newer_guest_write() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for order in 0..2 {
            let (disk, base, _) = setup(4 * MIB, true);
            base.delay_ms.store(50, Ordering::SeqCst);
            let img = Arc::new(open(&disk, &base));
            let spawn_img = img.clone();
            let h = tokio::runtime::Handle::current();
            img.enable_background(Arc::new(move |f| {
                h.spawn(f);
            }));
            let reader = {
                let img = img.clone();
                tokio::spawn(async move {
                    let mut b = vec![0u8; 4096];
                    img.read_slice(8192, &mut b).await.unwrap();
                })
            };
            if order == 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            spawn_img
                .write_slice(8192 + 100, &[0xee; 200], false)
                .await
                .unwrap();
            reader.await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await; // let the fill finish
            let mut b = vec![0u8; 4096];
            img.read_slice(8192, &mut b).await.unwrap();
            assert!(
                b[100..300].iter().all(|&x| x == 0xee),
                "order {order}: the fill overwrote the guest write"
            );
        }
    });
}

#[test]
fn prefetch_makes_everything_local_and_detaches_the_base() {
    let (disk, base, data) = setup(8 * MIB, false);
    let img = Arc::new(open(&disk, &base));
    block_on(img.write_slice(MIB + 5, &[7; 100], false)).unwrap();
    let status = Arc::new(PrefetchStatus::default());
    let cfg = PrefetchConfig {
        step_bytes: 256 << 10,
        ..Default::default()
    };
    block_on(prefetch(
        img.clone(),
        cfg,
        Arc::new(ThreadClock::default()),
        status.clone(),
    ))
    .unwrap();
    assert_eq!(status.state(), PrefetchState::Done);
    assert_eq!(img.base_range(), 0);
    block_on(img.close()).unwrap();
    drop(img);
    // Opens without its base now.
    let img = block_on(Image::open(
        Arc::new(disk.clone()),
        None,
        OpenOptions::default(),
    ))
    .unwrap();
    assert!(img.header().unwrap().flags & fvd_core::format::header::FLAG_ALL_LOCAL != 0);
    let mut all = vec![0u8; 8 * MIB as usize];
    block_on(img.read_slice(0, &mut all)).unwrap();
    let mut want = data.clone();
    want[MIB as usize + 5..MIB as usize + 105].fill(7);
    assert!(all == want);
    let r = block_on(fvd_core::check::check_storage(&disk, None)).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
}

#[test]
fn profile_is_recorded_stored_and_prefetched_first() {
    let (disk, base, _) = setup(8 * MIB, false);
    let img = open(&disk, &base);
    img.set_profile_recording(true);
    let order = [5 * MIB, 2 * MIB, 7 * MIB];
    for &o in &order {
        let mut b = vec![0u8; 64 << 10];
        block_on(img.read_slice(o, &mut b)).unwrap();
    }
    assert_eq!(
        img.recorded_profile(),
        order.iter().map(|&o| (o, 64 << 10)).collect::<Vec<_>>()
    );
    assert!(block_on(img.save_recorded_profile()).unwrap());
    block_on(img.close()).unwrap();
    drop(img);
    let img = Arc::new(open(&disk, &base));
    assert_eq!(block_on(img.stored_profile()).unwrap().unwrap().len(), 3);
    base.log.lock().unwrap().clear();
    let cfg = PrefetchConfig {
        mode: PrefetchMode::Profile,
        step_bytes: 64 << 10,
        ..Default::default()
    };
    block_on(prefetch(
        img.clone(),
        cfg,
        Arc::new(ThreadClock::default()),
        Arc::new(PrefetchStatus::default()),
    ))
    .unwrap();
    let log = base.log.lock().unwrap().clone();
    let first: Vec<u64> = log.iter().take(3).map(|&(o, _)| o).collect();
    assert_eq!(
        first,
        order.to_vec(),
        "profile ranges were not fetched first"
    );
}

#[test]
fn offline_prefetch_is_resumable_after_interruption() {
    let (disk, base, data) = setup(8 * MIB, false);
    base.fail_after.store(3 * MIB, Ordering::SeqCst);
    let img = Arc::new(open(&disk, &base));
    let cfg = PrefetchConfig {
        hard: true,
        flush_every: MIB,
        step_bytes: 512 << 10,
        first_step_bytes: 512 << 10,
        ..Default::default()
    };
    let r = block_on(prefetch(
        img.clone(),
        cfg.clone(),
        Arc::new(ThreadClock::default()),
        Arc::new(PrefetchStatus::default()),
    ));
    assert!(r.is_err() && base.failed.load(Ordering::SeqCst));
    drop(img); // interrupted: no close
    base.fail_after.store(u64::MAX, Ordering::SeqCst);
    base.fetched.store(0, Ordering::SeqCst);
    let img = Arc::new(open(&disk, &base));
    let (local, _) = img.local_blocks();
    assert!(
        local >= 2 * MIB / 4096,
        "progress was not kept: {local} blocks"
    );
    block_on(prefetch(
        img.clone(),
        cfg,
        Arc::new(ThreadClock::default()),
        Arc::new(PrefetchStatus::default()),
    ))
    .unwrap();
    assert!(
        base.fetched.load(Ordering::SeqCst) <= 6 * MIB,
        "resumed prefetch fetched everything again"
    );
    let mut all = vec![0u8; 8 * MIB as usize];
    block_on(img.read_slice(0, &mut all)).unwrap();
    assert!(all == data);
    block_on(img.close()).unwrap();
}

/// Prefetch gets out of the guest's way at once: once a guest request
/// arrives during a round, the steps in flight issue no further base reads
/// (at most the `depth` reads already under way complete), nothing more is
/// fetched while the guest has not been quiet for the quiet time, and once
/// the guest stays idle the prefetch finishes. Each step here needs one
/// slow base read per block (every other block is already local), so a
/// round that ran to its end would issue over a hundred more reads.
#[test]
fn prefetch_stops_at_a_guest_request_and_finishes_once_the_guest_is_idle() {
    let (disk, base, data) = setup(8 * MIB, false);
    let img = Arc::new(open(&disk, &base));
    let blocks = 8 * MIB / 4096;
    for b in (0..blocks).step_by(2) {
        block_on(img.write_slice(b * 4096, &[9; 4096], false)).unwrap();
    }
    base.delay_ms.store(2, Ordering::SeqCst);
    base.log.lock().unwrap().clear();
    let status = Arc::new(PrefetchStatus::default());
    let cfg = PrefetchConfig {
        quiet: Duration::from_millis(300),
        // The base is slow on purpose: no random backoff for it.
        min_throughput: 0,
        ..Default::default()
    };
    let depth = cfg.depth;
    let (img2, st2) = (img.clone(), status.clone());
    let runner = std::thread::spawn(move || {
        block_on(prefetch(img2, cfg, Arc::new(ThreadClock::default()), st2))
    });
    let t0 = std::time::Instant::now();
    while base.log.lock().unwrap().len() < 8 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "prefetch did not start"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The guest reads a block already in the image.
    let mut b = vec![0u8; 4096];
    block_on(img.read_slice(0, &mut b)).unwrap();
    let at_request = base.log.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(150));
    let after = base.log.lock().unwrap().len() - at_request;
    assert!(
        after <= depth,
        "{after} base reads issued after the guest request (at most {depth} were under way)"
    );
    // The guest stays idle: prefetch resumes and finishes.
    runner.join().unwrap().unwrap();
    assert_eq!(status.state(), PrefetchState::Done);
    assert!(status.yields.load(Ordering::Relaxed) >= 1);
    assert_eq!(img.base_range(), 0);
    let mut all = vec![0u8; 8 * MIB as usize];
    block_on(img.read_slice(0, &mut all)).unwrap();
    for blk in 0..blocks as usize {
        let got = &all[blk * 4096..(blk + 1) * 4096];
        let want: &[u8] = if blk % 2 == 0 {
            &[9; 4096]
        } else {
            &data[blk * 4096..(blk + 1) * 4096]
        };
        assert!(got == want, "block {blk}");
    }
    // Every base block fetched once, plus what was fetched while the guest
    // came back and dropped (at most the reads under way: `depth` here).
    let dropped = img.stats().prefetch_dropped_bytes.load(Ordering::SeqCst);
    assert!(dropped <= status.yields.load(Ordering::Relaxed) * depth as u64 * 4096);
    assert_eq!(
        base.fetched.load(Ordering::SeqCst),
        blocks / 2 * 4096 + dropped,
        "every base block fetched once, and again only after a drop"
    );
    block_on(img.close()).unwrap();
}

/// A base read that was under way when a guest request arrived is not
/// written into the image: prefetch data is optional, and writing it would
/// sit in front of the guest. The blocks stay in the base (no bit set
/// without its data) and are fetched again once the guest is idle.
#[test]
fn prefetch_drops_a_base_read_that_completes_after_a_guest_request() {
    let (disk, base, data) = setup(4 * MIB, false);
    let img = Arc::new(open(&disk, &base));
    block_on(img.write_slice(0, &[9; 4096], false)).unwrap();
    let (local0, _) = img.local_blocks();
    let written0 = img.stats().data_write_bytes.load(Ordering::SeqCst);
    base.log.lock().unwrap().clear();
    base.hold.store(true, Ordering::SeqCst);
    let status = Arc::new(PrefetchStatus::default());
    let cfg = PrefetchConfig {
        quiet: Duration::from_millis(400),
        min_throughput: 0,
        ..Default::default()
    };
    let (img2, st2) = (img.clone(), status.clone());
    let runner = std::thread::spawn(move || {
        block_on(prefetch(img2, cfg, Arc::new(ThreadClock::default()), st2))
    });
    let t0 = std::time::Instant::now();
    while base.log.lock().unwrap().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "prefetch did not start"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // A base read is under way; the guest reads a block of its own, then
    // the base read completes.
    let mut b = vec![0u8; 4096];
    block_on(img.read_slice(0, &mut b)).unwrap();
    assert_eq!(b, [9; 4096]);
    let fetched_before = base.fetched.load(Ordering::SeqCst);
    base.hold.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        img.stats().data_write_bytes.load(Ordering::SeqCst),
        written0,
        "prefetch wrote into the image after the guest request"
    );
    assert_eq!(img.local_blocks().0, local0, "blocks became local");
    assert_eq!(status.done.load(Ordering::SeqCst), 0);
    assert!(fetched_before > 0);
    assert_eq!(
        img.stats().prefetch_dropped_bytes.load(Ordering::SeqCst),
        fetched_before,
        "the read under way was dropped"
    );
    // The guest stays idle: the dropped blocks are fetched again and
    // prefetch finishes with the base's data everywhere the guest did not
    // write.
    runner.join().unwrap().unwrap();
    assert_eq!(status.state(), PrefetchState::Done);
    assert_eq!(img.base_range(), 0);
    let mut all = vec![0u8; 4 * MIB as usize];
    block_on(img.read_slice(0, &mut all)).unwrap();
    assert!(all[..4096] == [9; 4096]);
    assert!(
        all[4096..] == data[4096..],
        "the base's data after the prefetch"
    );
    block_on(img.close()).unwrap();
}
