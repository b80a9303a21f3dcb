//! Model-based test: random operations on an image compared with a plain
//! byte model, with and without a base, on every block-size class, with
//! close/reopen and crash/reopen (journal replay) in the sequence.

use std::sync::Arc;

use fvd_core::base::{Base, RawBase};
use fvd_core::executor::block_on;
use fvd_core::storage::MemStorage;
use fvd_core::{CreateOptions, Format, Image, OpenOptions};

/// xorshift64*: deterministic, dependency-free randomness for the model.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Case {
    virtual_size: u64,
    base_size: Option<u64>,
    block_size: u32,
    detect_zeroes: bool,
    /// Chunk size of a compact image; None for the sparse layout.
    compact: Option<u32>,
    /// Encrypted (LUKS1, AES-XTS): byte-granular writes then decrypt,
    /// patch and encrypt partial sectors.
    encrypted: bool,
}

fn key() -> fvd_core::crypt::Secret {
    fvd_core::crypt::Secret::new(b"model".to_vec())
}

fn base_bytes(size: u64, rng: &mut Rng) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    // Data regions and zero regions, so zero detection has something to find.
    let mut pos = 0usize;
    while pos < v.len() {
        let len = (rng.below(64 * 1024) as usize + 512).min(v.len() - pos);
        if rng.below(3) != 0 {
            let b = (rng.next() as u8) | 1;
            for (i, x) in v[pos..pos + len].iter_mut().enumerate() {
                *x = b.wrapping_add(i as u8);
            }
        }
        pos += len;
    }
    v
}

fn open(disk: &MemStorage, base: &Option<Arc<dyn Base>>) -> Image {
    block_on(Image::open_with_key(
        Arc::new(disk.clone()),
        base.clone(),
        OpenOptions::default(),
        Some(&key()),
    ))
    .expect("open")
}

fn run_case(case: &Case, seed: u64, steps: usize) {
    let mut rng = Rng(seed | 1);
    let disk = MemStorage::new("image");
    let (base, mut model): (Option<Arc<dyn Base>>, Vec<u8>) = match case.base_size {
        Some(bs) => {
            let bytes = base_bytes(bs, &mut rng);
            let mem = MemStorage::from_bytes("base", &bytes);
            let mut m = bytes.clone();
            m.resize(case.virtual_size as usize, 0);
            (
                Some(Arc::new(RawBase::new(Arc::new(mem)).unwrap()) as Arc<dyn Base>),
                m,
            )
        }
        None => (None, vec![0u8; case.virtual_size as usize]),
    };
    let opts = CreateOptions {
        size: Some(case.virtual_size),
        base: base.as_ref().map(|_| ("base.raw".to_string(), Format::Raw)),
        block_size: Some(case.block_size),
        journal_size: Some(64 * 1024), // small, so recycling happens
        detect_zeroes: case.detect_zeroes,
        copy_on_read: false,
        compact: case.compact.is_some(),
        chunk_size: case.compact,
        grow_unit: Some(256 << 10),
        grow_cmd: None,
        encryption: case.encrypted.then(|| fvd_core::CreateEncryption {
            secret: key(),
            iterations: 1000,
        }),
    };
    block_on(fvd_core::image::create(&disk, &opts, base.as_deref())).expect("create");
    let mut img = open(&disk, &base);
    let size = case.virtual_size;
    for step in 0..steps {
        let op = rng.below(100);
        // Offsets are often block-unaligned and often cross block boundaries.
        let unit = if rng.below(2) == 0 { 512 } else { 1 };
        let off = rng.below(size / unit) * unit;
        let max_len = (size - off).min(3 * case.block_size as u64 + 1024);
        let len = (rng.below(max_len / unit) * unit + unit).min(size - off);
        let ctx = format!("seed {seed} step {step} op {op} off {off} len {len}");
        match op {
            0..=39 => {
                let fill = rng.next() as u8;
                let data: Vec<u8> = (0..len)
                    .map(|i| fill.wrapping_add((i / 512) as u8) ^ 0x5a)
                    .collect();
                block_on(img.write_slice(off, &data, rng.below(10) == 0)).expect(&ctx);
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            40..=69 => {
                let mut buf = vec![0u8; len as usize];
                block_on(img.read_slice(off, &mut buf)).expect(&ctx);
                assert!(
                    buf == model[off as usize..(off + len) as usize],
                    "read mismatch: {ctx}"
                );
            }
            70..=76 => {
                block_on(img.discard(off, len)).expect(&ctx);
                model[off as usize..(off + len) as usize].fill(0);
            }
            77..=83 => {
                block_on(img.write_zeroes(off, len, rng.below(2) == 0, false)).expect(&ctx);
                model[off as usize..(off + len) as usize].fill(0);
            }
            84..=91 => block_on(img.flush()).expect(&ctx),
            92..=95 => {
                block_on(img.close()).expect(&ctx);
                drop(img);
                img = open(&disk, &base);
                assert!(img.header().unwrap().is_clean(), "clean after close: {ctx}");
            }
            _ => {
                // Crash after a flush: nothing acknowledged may be lost; the
                // journal is replayed at open.
                block_on(img.flush()).expect(&ctx);
                drop(img);
                img = open(&disk, &base);
            }
        }
    }
    // Whole-disk comparison at the end, after a crash-reopen.
    block_on(img.flush()).unwrap();
    drop(img);
    let img = open(&disk, &base);
    let mut all = vec![0u8; size as usize];
    block_on(img.read_slice(0, &mut all)).unwrap();
    let first_bad = all.iter().zip(model.iter()).position(|(a, b)| a != b);
    assert_eq!(
        first_bad, None,
        "final image differs from model (seed {seed})"
    );
    block_on(img.close()).unwrap();
}

fn seeds() -> Vec<u64> {
    match std::env::var("FVD_MODEL_SEED") {
        Ok(s) => vec![s.parse().expect("FVD_MODEL_SEED must be a number")],
        Err(_) => (1..=6u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect(),
    }
}

#[test]
fn model_without_base() {
    for bs in [512u32, 4096, 65536] {
        for seed in seeds() {
            run_case(
                &Case {
                    virtual_size: 2 << 20,
                    base_size: None,
                    block_size: bs,
                    detect_zeroes: false,
                    compact: None,
                    encrypted: false,
                },
                seed,
                400,
            );
        }
    }
}

#[test]
fn model_with_base_every_block_size() {
    for bs in [512u32, 4096, 65536, 1 << 20] {
        for seed in seeds() {
            // Base smaller than the image and not block aligned.
            let case = Case {
                virtual_size: 4 << 20,
                base_size: Some((3 << 20) + 1536),
                block_size: bs,
                detect_zeroes: seed % 2 == 0,
                compact: None,
                encrypted: false,
            };
            run_case(&case, seed ^ bs as u64, 500);
        }
    }
}

#[test]
fn model_base_larger_than_image() {
    for seed in seeds() {
        let case = Case {
            virtual_size: 2 << 20,
            base_size: Some(3 << 20),
            block_size: 4096,
            detect_zeroes: true,
            compact: None,
            encrypted: false,
        };
        run_case(&case, seed, 300);
    }
}

#[test]
fn model_compact_without_base() {
    for (bs, cs) in [(4096u32, 65536u32), (65536, 1 << 20)] {
        for seed in seeds() {
            let case = Case {
                virtual_size: 4 << 20,
                base_size: None,
                block_size: bs,
                detect_zeroes: false,
                compact: Some(cs),
                encrypted: false,
            };
            run_case(&case, seed ^ cs as u64, 400);
        }
    }
}

#[test]
fn model_encrypted() {
    for (base_size, compact) in [
        (None, None),
        (Some((3 << 20) + 1536), None),
        (None, Some(65536u32)),
        (Some((3 << 20) + 1536), Some(65536)),
    ] {
        for seed in seeds().into_iter().take(4) {
            let case = Case {
                virtual_size: 4 << 20,
                base_size,
                block_size: 4096,
                detect_zeroes: seed % 2 == 0,
                compact,
                encrypted: true,
            };
            run_case(&case, seed ^ 0xe4c, 400);
        }
    }
}

#[test]
fn model_compact_with_base() {
    for (bs, cs) in [(512u32, 4096u32), (4096, 65536), (65536, 1 << 20)] {
        for seed in seeds() {
            let case = Case {
                virtual_size: 4 << 20,
                base_size: Some((3 << 20) + 1536),
                block_size: bs,
                detect_zeroes: seed % 2 == 0,
                compact: Some(cs),
                encrypted: false,
            };
            run_case(&case, seed ^ bs as u64 ^ cs as u64, 500);
        }
    }
}

#[test]
fn concurrent_partial_writes_to_shared_blocks_are_serialised() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.raw");
    let base_data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&base_path, &base_data).unwrap();
    let img_path = dir.path().join("img.fvd");
    rt.block_on(async {
        let spec = fvd_core::BaseSpec {
            name: "base.raw".into(),
            format: fvd_core::Format::Raw,
        };
        fvd_core::create_path(
            &img_path,
            Some(&spec),
            CreateOptions {
                block_size: Some(65536),
                ..Default::default()
            },
            Some(false),
        )
        .await
        .unwrap();
        let img = Arc::new(
            fvd_core::open_path(&img_path, fvd_core::Format::Fvd, Default::default())
                .await
                .unwrap(),
        );
        // 8 writers; writer k writes every sector s with s % 8 == k: every
        // block is copied-on-write by several writers at once.
        let mut tasks = Vec::new();
        for k in 0..8u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = k;
                while s < 2048 {
                    img.write_slice(s * 512, &[0xc0 | k as u8; 512], false)
                        .await
                        .unwrap();
                    s += 8;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        img.flush().await.unwrap();
        let mut all = vec![0u8; 1 << 20];
        img.read_slice(0, &mut all).await.unwrap();
        for s in 0..2048usize {
            let want = 0xc0 | (s % 8) as u8;
            assert!(
                all[s * 512..(s + 1) * 512].iter().all(|&b| b == want),
                "sector {s} lost its write"
            );
        }
        img.close().await.unwrap();
    });
}

#[test]
fn cache_fills_are_soft_and_never_overwrite_guest_writes() {
    let base_data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 249) as u8 | 1).collect();
    let base: Option<Arc<dyn Base>> = Some(Arc::new(
        RawBase::new(Arc::new(MemStorage::from_bytes("base", &base_data))).unwrap(),
    ));
    let disk = MemStorage::new("img");
    let opts = CreateOptions {
        size: Some(1 << 20),
        base: Some(("b".into(), Format::Raw)),
        block_size: Some(4096),
        ..Default::default()
    };
    block_on(fvd_core::image::create(&disk, &opts, base.as_deref())).unwrap();
    let img = open(&disk, &base);
    block_on(img.write_slice(8192, &[0xee; 100], false)).unwrap();
    block_on(img.cache(0, 1 << 20)).unwrap();
    assert_eq!(img.local_blocks(), (256, 256));
    let base_before = img
        .stats()
        .base_read_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut all = vec![0u8; 1 << 20];
    block_on(img.read_slice(0, &mut all)).unwrap();
    // Served from the image now: no base reads.
    assert_eq!(
        img.stats()
            .base_read_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        base_before
    );
    let mut want = base_data.clone();
    want[8192..8292].fill(0xee);
    assert!(all == want);
    // Soft bits are not journaled: after a crash only the guest write's block is local.
    block_on(img.flush()).unwrap();
    drop(img);
    let img = open(&disk, &base);
    assert_eq!(img.local_blocks(), (1, 256));
    block_on(img.read_slice(0, &mut all)).unwrap();
    assert!(all == want);
    // A clean close makes copy-on-read fills permanent.
    block_on(img.cache(0, 1 << 20)).unwrap();
    block_on(img.close()).unwrap();
    drop(img);
    let img = open(&disk, &base);
    assert_eq!(img.local_blocks(), (256, 256));
    block_on(img.read_slice(0, &mut all)).unwrap();
    assert!(all == want);
}

#[test]
fn zero_detection_over_a_sparse_base_marks_holes_and_zero_data_only() {
    for bs in [512u32, 4096, 65536] {
        // Holes, explicit zeros and data, with run edges inside blocks.
        let mem = MemStorage::new("base");
        let size: u64 = (3 << 20) + 1536;
        mem.write_sync(0, &[0u8; 0]);
        mem.write_sync(5000, &vec![7u8; 3000]);
        mem.write_sync(1 << 20, &vec![0u8; 300_000]);
        mem.write_sync((2 << 20) + 100, &[9u8; 10]);
        mem.write_sync(size - 10, &[3u8; 10]);
        let want = mem.to_vec();
        let base: Option<Arc<dyn Base>> = Some(Arc::new(RawBase::new(Arc::new(mem)).unwrap()));
        let disk = MemStorage::new("img");
        let opts = CreateOptions {
            size: Some(4 << 20),
            base: Some(("b".into(), Format::Raw)),
            block_size: Some(bs),
            detect_zeroes: true,
            ..Default::default()
        };
        block_on(fvd_core::image::create(&disk, &opts, base.as_deref())).unwrap();
        let img = open(&disk, &base);
        let (local, total) = img.local_blocks();
        assert!(
            local > 0 && local < total,
            "block size {bs}: {local} of {total} local"
        );
        let mut all = vec![0u8; size as usize];
        block_on(img.read_slice(0, &mut all)).unwrap();
        assert!(
            all == want,
            "block size {bs}: content differs after zero detection"
        );
        // Every block marked local must be zero in the base.
        for b in 0..total {
            let (s, e) = (
                (b * bs as u64) as usize,
                (((b + 1) * bs as u64).min(size)) as usize,
            );
            let ext = block_on(img.block_status(s as u64, (e - s) as u64)).unwrap();
            if ext.iter().all(|x| x.source == fvd_core::Source::Image) {
                assert!(
                    want[s..e].iter().all(|&x| x == 0),
                    "block {b} (bs {bs}) marked zero but holds data"
                );
            }
        }
    }
}
