//! The cache under concurrent readers, a tiny limit and damaged files, over
//! a base that counts what it is asked for.

use std::sync::Mutex;
use std::time::Duration;

use fvd_core::base::RawBase;
use fvd_core::storage::MemStorage;

use super::*;

const BS: u64 = 4096;

/// A base in memory that counts the fetches of every cache block and
/// answers after a delay, so concurrent readers overlap.
struct Counting {
    inner: RawBase,
    fetches: Mutex<Vec<u32>>,
}

impl Counting {
    fn new(data: &[u8]) -> Arc<Counting> {
        let mem = Arc::new(MemStorage::from_bytes("base", data));
        Arc::new(Counting {
            inner: RawBase::new(mem).unwrap(),
            fetches: Mutex::new(vec![0; data.len().div_ceil(BS as usize)]),
        })
    }

    fn most(&self) -> u32 {
        self.fetches
            .lock()
            .unwrap()
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    fn total(&self) -> u32 {
        self.fetches.lock().unwrap().iter().sum()
    }
}

impl Base for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        {
            let mut f = self.fetches.lock().unwrap();
            for b in offset / BS..(offset + buf.len() as u64).div_ceil(BS) {
                f[b as usize] += 1;
            }
        }
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.inner.read_at(offset, buf).await
        })
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.inner.allocation(offset, len)
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn describe(&self) -> String {
        "counting base".into()
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(29) ^ (i % 253) as u8)
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn opts(dir: &Path, max_bytes: Option<u64>) -> CacheOptions {
    CacheOptions {
        dir: dir.to_path_buf(),
        max_bytes,
        block_size: Some(BS),
    }
}

/// `tasks` readers doing `reads` random reads each; every answer checked.
async fn hammer(cache: &Arc<CachedBase>, data: &Arc<Vec<u8>>, tasks: u64, reads: u64) {
    let mut hs = Vec::new();
    for t in 0..tasks {
        let (cache, data) = (cache.clone(), data.clone());
        hs.push(tokio::spawn(async move {
            let mut x = t * 7919 + 1;
            for _ in 0..reads {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 1 + (x >> 33) % (3 * BS);
                let off = (x >> 13) % (data.len() as u64 - len);
                let got = cache
                    .read_at(off, IoBuf::for_overwrite(len as usize))
                    .await
                    .unwrap();
                assert!(
                    got[..] == data[off as usize..(off + len) as usize],
                    "wrong data at {off}+{len}"
                );
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
}

#[test]
fn keys_follow_url_and_validator_but_not_signatures() {
    let a = cache_key("https://h/b.raw", "size=1 etag=\"x\"");
    assert_eq!(a.len(), 32);
    assert_ne!(a, cache_key("https://h/b.raw", "size=1 etag=\"y\""));
    assert_ne!(a, cache_key("https://h/c.raw", "size=1 etag=\"x\""));
    assert_eq!(
        a,
        cache_key(
            "https://h/b.raw?X-Amz-Signature=abc&X-Amz-Date=1",
            "size=1 etag=\"x\""
        )
    );
    assert_eq!(
        key_url("nbd+unix:///e?socket=/s&X-Amz-Credential=k"),
        "nbd+unix:///e?socket=/s"
    );
}

#[test]
fn the_default_block_size_bounds_the_table() {
    assert_eq!(default_block_size(0), 4096);
    assert_eq!(default_block_size(16 << 30), 4096);
    assert_eq!(default_block_size((16 << 30) + 1), 8192);
    assert_eq!(default_block_size(1 << 40), 256 << 10);
    assert_eq!(default_block_size(u64::MAX), 16 << 20);
}

#[test]
fn runs_group_consecutive_blocks() {
    assert_eq!(runs_of(0..8, |b| b != 3 && b != 4), vec![0..3, 5..8]);
    assert!(runs_of(0..3, |_| false).is_empty());
}

#[test]
fn concurrent_readers_fetch_each_block_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(pattern(1 << 20));
    let base = Counting::new(&data);
    runtime().block_on(async {
        let cache = Arc::new(
            CachedBase::open(base.clone(), "mem://a", &opts(dir.path(), None))
                .await
                .unwrap(),
        );
        hammer(&cache, &data, 16, 200).await;
        assert_eq!(base.most(), 1, "a block was fetched twice");
        assert_eq!(cache.stats().bad_blocks.load(Ordering::Relaxed), 0);
    });
}

#[test]
fn a_tiny_limit_evicts_under_readers_without_dropping_their_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(pattern(1 << 20));
    let base = Counting::new(&data);
    let limit = 6 * BS;
    runtime().block_on(async {
        let cache = Arc::new(
            CachedBase::open(base.clone(), "mem://b", &opts(dir.path(), Some(limit)))
                .await
                .unwrap(),
        );
        hammer(&cache, &data, 16, 300).await;
        let s = cache.stats();
        assert!(s.evicted_blocks.load(Ordering::Relaxed) > 0);
        // A block punched under a reader would fail that reader's check.
        assert_eq!(s.bad_blocks.load(Ordering::Relaxed), 0);
        assert!(cache.used_bytes() <= limit);
        let on_disk = std::fs::metadata(cache.data_path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            on_disk.blocks() * 512 <= limit,
            "{} bytes",
            on_disk.blocks() * 512
        );
    });
}

#[test]
fn reopening_keeps_blocks_and_refetches_damaged_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(pattern(64 << 10));
    let base = Counting::new(&data);
    let rt = runtime();
    let (data_path, sums_path) = rt.block_on(async {
        let cache = CachedBase::open(base.clone(), "mem://c", &opts(dir.path(), None))
            .await
            .unwrap();
        cache
            .read_at(0, IoBuf::for_overwrite(64 << 10))
            .await
            .unwrap();
        let key = cache_key("mem://c", &base.validator());
        cache_paths(dir.path(), &key)
    });
    assert_eq!(base.total(), 16);
    // A flipped data byte in block 3, a damaged entry for block 9.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data_path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 3 * BS + 5).unwrap();
    f.write_all_at(&[b[0] ^ 1], 3 * BS + 5).unwrap();
    let t = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&sums_path)
        .unwrap();
    t.write_all_at(&[0xff], table::entry_offset(9) + 6).unwrap();
    rt.block_on(async {
        let cache = CachedBase::open(base.clone(), "mem://c", &opts(dir.path(), None))
            .await
            .unwrap();
        assert_eq!(
            cache.used_bytes(),
            15 * BS,
            "the damaged entry counts as absent"
        );
        let got = cache
            .read_at(0, IoBuf::for_overwrite(64 << 10))
            .await
            .unwrap();
        assert!(got[..] == data[..]);
        assert_eq!(cache.stats().bad_blocks.load(Ordering::Relaxed), 1);
    });
    let f = base.fetches.lock().unwrap().clone();
    assert_eq!((f[3], f[9], base.total()), (2, 2, 18), "{f:?}");
    // A cache made for another block size starts empty instead of serving.
    rt.block_on(async {
        let other = CacheOptions {
            block_size: Some(8192),
            ..opts(dir.path(), None)
        };
        let cache = CachedBase::open(base.clone(), "mem://c", &other)
            .await
            .unwrap();
        assert_eq!(cache.used_bytes(), 0);
        let got = cache
            .read_at(0, IoBuf::for_overwrite(64 << 10))
            .await
            .unwrap();
        assert!(got[..] == data[..]);
    });
}

#[test]
fn the_evictor_never_takes_a_pinned_block() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(pattern(4 * BS as usize));
    let base = Counting::new(&data);
    runtime().block_on(async {
        let cache = CachedBase::open(base.clone(), "mem://d", &opts(dir.path(), None))
            .await
            .unwrap();
        cache
            .read_at(0, IoBuf::for_overwrite(2 * BS as usize))
            .await
            .unwrap();
        assert!(cache.try_pin(0) && cache.try_pin(1));
        // Two turns of the hand: the first clears the reference bits, the
        // second finds only pinned blocks.
        assert!(!cache.evict_one().await, "a pinned block was evicted");
        assert!(cache.is_present(0) && cache.is_present(1));
        cache.unpin(1);
        assert!(cache.evict_one().await);
        assert!(cache.is_present(0) && !cache.is_present(1));
        // Its entry is cleared and its data punched.
        let got = cache
            .table
            .read_at(table::entry_offset(1), IoBuf::for_overwrite(8))
            .await
            .unwrap();
        assert_eq!(table::decode_entry(&got), None);
        cache.unpin(0);
        assert!(cache.evict_one().await);
        assert_eq!(cache.used_bytes(), 0);
    });
}
