//! Engine measurements for docs/BENCHMARKS.md (run: `cargo bench -p fvd-core --bench core`).
//!
//! 1. mapping of a 4 KiB request on a 1 TiB image (`Image::map_request`,
//!    the function every request starts with: bitmap lookup + layout);
//! 2. open time of a 1 TiB image with a 4 MiB bitmap;
//! 3. metadata bytes per TiB;
//! 4. 4 KiB random first writes through the engine on a copy-on-write image
//!    vs the same writes to a raw file through the same file backend, and
//!    on an encrypted copy-on-write image (AES-256-XTS); then 4 KiB random
//!    reads of what was written, encrypted vs not;
//! 5. 1 MiB sequential first writes (QD8) on a copy-on-write image vs a raw
//!    file, then 1 MiB sequential reads of what was written, page cache
//!    (the flush is not timed: it would measure the disk, not the engine).
//!
//! Every request's buffer is owned and reused, as a transport's buffers
//! come from the pool.
//!
//! Set FVD_BENCH_QUICK=1 for a short run (used by the smoke test).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fvd_core::format::header::Region;
use fvd_core::{
    BaseSpec, CreateOptions, Format, Image, IoBuf, PathOptions, create_path, open_path,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const TIB: u64 = 1 << 40;

/// FVD_BENCH_CACHE=none measures with O_DIRECT.
fn cache_mode() -> fvd_core::storage::CacheMode {
    std::env::var("FVD_BENCH_CACHE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

fn quick() -> bool {
    std::env::var("FVD_BENCH_QUICK").is_ok()
}

fn make_tib_image(dir: &Path, rt: &tokio::runtime::Runtime) -> std::path::PathBuf {
    let base = dir.join("base-1t.raw");
    std::fs::File::create(&base).unwrap().set_len(TIB).unwrap();
    let img = dir.join("img-1t.fvd");
    let spec = BaseSpec {
        name: "base-1t.raw".into(),
        format: Format::Raw,
    };
    rt.block_on(create_path(
        &img,
        Some(&spec),
        CreateOptions::default(),
        Some(false),
    ))
    .unwrap();
    img
}

fn bench_lookup(img: &Image) -> f64 {
    // Half of the blocks local, so the lookup sees both outcomes.
    let n: u64 = if quick() { 1_000_000 } else { 20_000_000 };
    let mut rng = Rng(0x1234_5678);
    let blocks = TIB / 4096;
    let start = Instant::now();
    for _ in 0..n {
        let off = (rng.next() % blocks) * 4096;
        // Take every run, as a request does.
        for run in img.map_request(black_box(off), 4096) {
            black_box(run.target);
        }
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn bench_open(path: &Path, rt: &tokio::runtime::Runtime) -> Duration {
    let reps = if quick() { 3 } else { 10 };
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let img = rt
                .block_on(open_path(path, Format::Fvd, PathOptions::default()))
                .unwrap();
            let d = t.elapsed();
            rt.block_on(img.close()).unwrap();
            d
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// 4 KiB random reads at queue depth `qd` of the first `count` blocks the
/// writes of [`first_writes`] touched.
fn random_reads(
    img: Arc<Image>,
    rt: &tokio::runtime::Runtime,
    span: u64,
    count: usize,
    qd: usize,
) -> f64 {
    let mut rng = Rng(0xfeed_beef);
    let mut offsets: Vec<u64> = (0..span / 4096).map(|b| b * 4096).collect();
    for i in (1..offsets.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        offsets.swap(i, j);
    }
    offsets.truncate(count);
    let offsets = Arc::new(offsets);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..qd {
            let img = img.clone();
            let offsets = offsets.clone();
            tasks.push(tokio::spawn(async move {
                let mut data = IoBuf::for_overwrite(4096);
                let mut i = w;
                while i < offsets.len() {
                    data = img.read(offsets[i], data).await.unwrap();
                    i += qd;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    count as f64 / start.elapsed().as_secs_f64()
}

/// 4 KiB random first writes at queue depth `qd`, plus the final flush.
fn first_writes(
    img: Arc<Image>,
    rt: &tokio::runtime::Runtime,
    span: u64,
    count: usize,
    qd: usize,
) -> f64 {
    let mut rng = Rng(0xfeed_beef);
    let mut offsets: Vec<u64> = (0..span / 4096).map(|b| b * 4096).collect();
    for i in (1..offsets.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        offsets.swap(i, j);
    }
    offsets.truncate(count);
    let offsets = Arc::new(offsets);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..qd {
            let img = img.clone();
            let offsets = offsets.clone();
            tasks.push(tokio::spawn(async move {
                let mut data = IoBuf::for_overwrite(4096);
                data.fill(0x5a);
                let mut i = w;
                while i < offsets.len() {
                    data = img.write(offsets[i], data, false).await.unwrap();
                    i += qd;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        img.flush().await.unwrap();
    });
    count as f64 / start.elapsed().as_secs_f64()
}

/// 1 MiB sequential writes (or reads) of `[0, span)` at queue depth `qd`,
/// in MiB/s.
fn sequential(
    img: &Arc<Image>,
    rt: &tokio::runtime::Runtime,
    span: u64,
    qd: usize,
    write: bool,
) -> f64 {
    const BS: u64 = 1 << 20;
    let n = span / BS;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..qd {
            let (img, next) = (img.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = IoBuf::for_overwrite(BS as usize);
                buf.fill(0x3c);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    buf = if write {
                        img.write(i * BS, buf, false).await.unwrap()
                    } else {
                        img.read(i * BS, buf).await.unwrap()
                    };
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    (span >> 20) as f64 / start.elapsed().as_secs_f64()
}

/// A copy-on-write FVD image over `base.raw` and a raw file of `span`
/// bytes, in `dir`, named `tag`.fvd and `tag`.raw, both open: the pair the
/// interleaved measures compare.
fn cow_and_raw(
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    tag: &str,
    span: u64,
) -> (PathBuf, PathBuf, Arc<Image>, Arc<Image>) {
    let fvd = dir.join(format!("{tag}.fvd"));
    let spec = BaseSpec {
        name: "base.raw".into(),
        format: Format::Raw,
    };
    rt.block_on(create_path(
        &fvd,
        Some(&spec),
        CreateOptions::default(),
        Some(false),
    ))
    .unwrap();
    let raw = dir.join(format!("{tag}.raw"));
    fvd_core::create_raw(&raw, span).unwrap();
    let a = Arc::new(
        rt.block_on(open_path(&fvd, Format::Fvd, PathOptions::default()))
            .unwrap(),
    );
    let b = Arc::new(
        rt.block_on(open_path(&raw, Format::Raw, PathOptions::default()))
            .unwrap(),
    );
    (fvd, raw, a, b)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let dir =
        tempfile::tempdir_in(std::env::var("FVD_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();

    let tib = make_tib_image(dir.path(), &rt);
    let img = rt
        .block_on(open_path(&tib, Format::Fvd, PathOptions::default()))
        .unwrap();
    let h = img.header().unwrap().clone();
    // Make every other 4 KiB block local so lookups hit both paths.
    rt.block_on(async {
        for i in 0..4096u64 {
            img.write_slice(i * 2 * 32768, &[1u8; 512], false)
                .await
                .unwrap();
        }
        img.close().await.unwrap();
    });
    drop(img);
    let img = rt
        .block_on(open_path(&tib, Format::Fvd, PathOptions::default()))
        .unwrap();
    let lookup_ns = bench_lookup(&img);
    rt.block_on(img.close()).unwrap();
    drop(img);
    let open = bench_open(&tib, &rt);
    let meta_bytes = h.region(Region::Bitmap).length + h.region(Region::Table).length;

    let span: u64 = if quick() { 256 << 20 } else { 2 << 30 };
    let count = if quick() { 20_000 } else { 100_000 };
    let base = dir.path().join("base.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(span).unwrap();
    // Fill the base with data so first writes really are copy-on-write.
    {
        use std::os::unix::fs::FileExt;
        let chunk = vec![0xa5u8; 1 << 20];
        for off in (0..span).step_by(1 << 20) {
            f.write_all_at(&chunk, off).unwrap();
        }
        f.sync_all().unwrap();
    }
    let mut fvd_iops = Vec::new();
    let mut raw_iops = Vec::new();
    let mut enc_iops = Vec::new();
    let mut fvd_read = Vec::new();
    let mut enc_read = Vec::new();
    let key = fvd_core::crypt::Secret::new(b"bench".to_vec());
    let k2 = key.clone();
    let keyed = fvd_core::Opener::local().with_keys(Arc::new(move |_: &Path| Some(k2.clone())));
    for rep in 0..3 {
        let (fvd, raw, a, b) = cow_and_raw(dir.path(), &rt, &format!("cow-{rep}"), span);
        let spec = BaseSpec {
            name: "base.raw".into(),
            format: Format::Raw,
        };
        let enc = dir.path().join(format!("enc-{rep}.fvd"));
        let eo = CreateOptions {
            encryption: Some(fvd_core::CreateEncryption {
                secret: key.clone(),
                iterations: 1000,
            }),
            ..CreateOptions::default()
        };
        rt.block_on(keyed.create(&enc, Some(&spec), eo, Some(false)))
            .unwrap();
        let c = Arc::new(
            rt.block_on(keyed.open(&enc, Format::Fvd, PathOptions::default()))
                .unwrap(),
        );
        // Interleave the systems within each repetition, order rotated.
        for k in 0..3 {
            match (k + rep) % 3 {
                0 => fvd_iops.push(first_writes(a.clone(), &rt, span, count, 32)),
                1 => raw_iops.push(first_writes(b.clone(), &rt, span, count, 32)),
                _ => enc_iops.push(first_writes(c.clone(), &rt, span, count, 32)),
            }
        }
        if rep % 2 == 0 {
            fvd_read.push(random_reads(a.clone(), &rt, span, count, 32));
            enc_read.push(random_reads(c.clone(), &rt, span, count, 32));
        } else {
            enc_read.push(random_reads(c.clone(), &rt, span, count, 32));
            fvd_read.push(random_reads(a.clone(), &rt, span, count, 32));
        }
        rt.block_on(c.close()).unwrap();
        let _ = std::fs::remove_file(&fvd);
        let _ = std::fs::remove_file(&raw);
        let _ = std::fs::remove_file(&enc);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (f, r) = (med(&mut fvd_iops), med(&mut raw_iops));
    let e = med(&mut enc_iops);
    let (fr, er) = (med(&mut fvd_read), med(&mut enc_read));

    // 1 MiB sequential first writes, then reads of them, interleaved.
    let seq_span: u64 = if quick() { 256 << 20 } else { 1 << 30 };
    let (mut sfw, mut srw, mut sfr, mut srr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..3 {
        let (fvd, raw, a, b) = cow_and_raw(dir.path(), &rt, &format!("seq-{rep}"), span);
        let order = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_fvd in order {
            let (img, w, r) = if is_fvd {
                (&a, &mut sfw, &mut sfr)
            } else {
                (&b, &mut srw, &mut srr)
            };
            w.push(sequential(img, &rt, seq_span, 8, true));
            r.push(sequential(img, &rt, seq_span, 8, false));
        }
        // Deleting the files drops their dirty pages unwritten.
        drop((a, b));
        let _ = std::fs::remove_file(&fvd);
        let _ = std::fs::remove_file(&raw);
    }
    let (sfw, srw, sfr, srr) = (med(&mut sfw), med(&mut srw), med(&mut sfr), med(&mut srr));
    println!("bench: lookup_4k_1tib_ns={lookup_ns:.1} (target <= 50)");
    println!(
        "bench: open_1tib_ms={:.2} (target <= 50)",
        open.as_secs_f64() * 1000.0
    );
    println!(
        "bench: metadata_bytes_per_tib={} ({:.2} MiB, target <= 6 MiB)",
        meta_bytes,
        meta_bytes as f64 / (1 << 20) as f64
    );
    let compact =
        fvd_core::format::layout::compute_layout(&fvd_core::format::layout::CreateLayout {
            virtual_size: TIB,
            base: Some(("b".into(), Format::Raw, TIB, String::new())),
            block_size: None,
            journal_size: None,
            compact: true,
            chunk_size: None,
            encrypted: false,
        })
        .unwrap();
    let cmeta = compact.region(Region::Bitmap).length + compact.region(Region::Table).length;
    println!(
        "bench: compact_metadata_bytes_per_tib={cmeta} ({:.2} MiB: bitmap + chunk table, target <= 6 MiB; qcow2 L2: 128 MiB)",
        cmeta as f64 / (1 << 20) as f64
    );
    println!(
        "bench: first_writes_4k_qd32 cache={:?} io_threads={} fvd_iops={f:.0} raw_iops={r:.0} ratio={:.3} (target >= 0.95)",
        cache_mode(),
        std::env::var("FVD_IO_THREADS").unwrap_or_else(|_| "16".into()),
        f / r
    );
    println!(
        "bench: seq_1m_qd8 cache={:?} write_mib_s fvd={sfw:.0} raw={srw:.0} ratio={:.3} read_mib_s fvd={sfr:.0} raw={srr:.0} ratio={:.3}",
        cache_mode(),
        sfw / srw,
        sfr / srr
    );
    println!(
        "bench: encrypted_first_writes_4k_qd32 cache={:?} aes_ni={} fvd_iops={f:.0} encrypted_iops={e:.0} ratio={:.3} (target >= 0.9)",
        cache_mode(),
        aes_ni(),
        e / f
    );
    println!(
        "bench: encrypted_random_reads_4k_qd32 cache={:?} fvd_iops={fr:.0} encrypted_iops={er:.0} ratio={:.3} (target >= 0.9)",
        cache_mode(),
        er / fr
    );
}

/// True if the CPU has AES instructions (what the aes crate uses).
fn aes_ni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
