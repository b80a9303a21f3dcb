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
        Box::pin(async move {
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
