//! Model test of internal snapshots: the live disk and every snapshot as
//! byte arrays; random writes, discards, zeroings, copy-on-read fills,
//! snapshot creates, applies and deletes, reopens and drops without close;
//! every snapshot read back exactly through a read-only view, and `check`
//! (which recomputes the refcounts from every table) finds no corruption.

use std::sync::Arc;

use fvd_core::base::{Base, RawBase};
use fvd_core::check::check_storage;
use fvd_core::executor::block_on;
use fvd_core::image::snapshot::SnapshotSel;
use fvd_core::storage::MemStorage;
use fvd_core::{CreateOptions, Format, Image, OpenOptions};

/// xorshift64*: deterministic randomness without dependencies.
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
    chunk_size: u32,
    /// Drop the image without a close now and then.
    drops: bool,
}

/// One snapshot of the model.
struct Snap {
    id: u64,
    name: String,
    bytes: Vec<u8>,
}

struct World {
    disk: MemStorage,
    base: Option<Arc<dyn Base>>,
    live: Vec<u8>,
    snaps: Vec<Snap>,
}

impl World {
    fn open(&self) -> Image {
        block_on(Image::open(
            Arc::new(self.disk.clone()),
            self.base.clone(),
            OpenOptions::default(),
        ))
        .expect("open")
    }

    fn view(&self, s: &Snap, ctx: &str) {
        let sel = SnapshotSel::Id(s.id.to_string());
        let v = block_on(Image::open_snapshot(
            Arc::new(self.disk.clone()),
            self.base.clone(),
            &sel,
        ))
        .unwrap_or_else(|e| panic!("{ctx}: open snapshot {}: {e}", s.id));
        let mut all = vec![0u8; self.live.len()];
        block_on(v.read_slice(0, &mut all)).unwrap();
        let bad = all.iter().zip(&s.bytes).position(|(a, b)| a != b);
        assert_eq!(bad, None, "{ctx}: snapshot {} '{}' differs", s.id, s.name);
    }

    fn check(&self, ctx: &str) {
        let r = block_on(check_storage(&self.disk, None)).unwrap();
        assert!(
            r.corruptions.is_empty() && r.check_errors.is_empty(),
            "{ctx}: check: {:?} {:?}",
            r.corruptions,
            r.check_errors
        );
        assert_eq!(r.snapshots, self.snaps.len() as u64, "{ctx}");
    }
}

fn run_case(case: &Case, seed: u64, steps: usize) {
    let mut rng = Rng(seed | 1);
    let disk = MemStorage::new("image");
    let (base, live) = match case.base_size {
        Some(n) => {
            let bytes: Vec<u8> = (0..n).map(|i| (i / 512) as u8 ^ 0xa5 | 1).collect();
            let mem = MemStorage::from_bytes("base", &bytes);
            let mut live = bytes.clone();
            live.resize(case.virtual_size as usize, 0);
            let b: Arc<dyn Base> = Arc::new(RawBase::new(Arc::new(mem)).unwrap());
            (Some(b), live)
        }
        None => (None, vec![0u8; case.virtual_size as usize]),
    };
    let opts = CreateOptions {
        size: Some(case.virtual_size),
        base: base.as_ref().map(|_| ("base.raw".to_string(), Format::Raw)),
        block_size: Some(case.block_size),
        journal_size: Some(64 << 10),
        compact: true,
        chunk_size: Some(case.chunk_size),
        grow_unit: Some(256 << 10),
        ..Default::default()
    };
    block_on(fvd_core::image::create(&disk, &opts, base.as_deref())).expect("create");
    let mut w = World {
        disk,
        base,
        live,
        snaps: Vec::new(),
    };
    let mut img = w.open();
    // Fills whose image was dropped without a close leave data under bits
    // that were never made durable: leaks, not corruption.
    let mut dropped = false;
    let size = case.virtual_size;
    let cs = case.chunk_size as u64;
    for step in 0..steps {
        let op = rng.below(100);
        let unit = [1u64, 512, 4096][rng.below(3) as usize];
        let off = rng.below(size / unit) * unit;
        let max_len = (size - off).min(2 * cs + 4096);
        let len = (rng.below(max_len / unit) * unit + unit).min(size - off);
        let ctx = format!("seed {seed} step {step} op {op} off {off} len {len}");
        let range = off as usize..(off + len) as usize;
        match op {
            0..=34 => {
                let fill = rng.next() as u8;
                let data: Vec<u8> = (0..len)
                    .map(|i| fill.wrapping_add((i / 512) as u8) | 1)
                    .collect();
                block_on(img.write_slice(off, &data, rng.below(8) == 0)).expect(&ctx);
                w.live[range].copy_from_slice(&data);
            }
            35..=49 => {
                let mut buf = vec![0u8; len as usize];
                block_on(img.read_slice(off, &mut buf)).expect(&ctx);
                assert!(buf == w.live[range], "read mismatch: {ctx}");
            }
            50..=54 => {
                block_on(img.discard(off, len)).expect(&ctx);
                w.live[range].fill(0);
            }
            55..=58 => {
                block_on(img.write_zeroes(off, len, rng.below(2) == 0, false)).expect(&ctx);
                w.live[range].fill(0);
            }
            59..=61 => block_on(img.cache(off, len)).expect(&ctx),
            62..=65 => block_on(img.flush()).expect(&ctx),
            66..=74 => {
                let name = format!("s{}", rng.below(4));
                let s = block_on(img.create_snapshot(&name)).expect(&ctx);
                assert_eq!(s.name, name);
                assert!(w.snaps.iter().all(|x| x.id < s.id), "{ctx}: ids grow");
                w.snaps.push(Snap {
                    id: s.id,
                    name,
                    bytes: w.live.clone(),
                });
            }
            75..=80 if !w.snaps.is_empty() => {
                // By name (the first with it, as qemu-img) or by id.
                let i = rng.below(w.snaps.len() as u64) as usize;
                let by_name = rng.below(2) == 0;
                let sel = if by_name {
                    SnapshotSel::Name(w.snaps[i].name.clone())
                } else {
                    SnapshotSel::Id(w.snaps[i].id.to_string())
                };
                let gone = block_on(img.delete_snapshot(&sel)).expect(&ctx);
                let k = w.snaps.iter().position(|s| s.id == gone.id).unwrap();
                if by_name {
                    assert_eq!(
                        k,
                        w.snaps
                            .iter()
                            .position(|s| s.name == w.snaps[i].name)
                            .unwrap()
                    );
                }
                w.snaps.remove(k);
                assert_eq!(img.snapshots().len(), w.snaps.len(), "{ctx}");
            }
            81..=84 if !w.snaps.is_empty() => {
                let i = rng.below(w.snaps.len() as u64) as usize;
                let sel = SnapshotSel::IdOrName(w.snaps[i].id.to_string());
                block_on(img.apply_snapshot(&sel)).expect(&ctx);
                w.live = w.snaps[i].bytes.clone();
                img = w.open();
            }
            85..=88 if !w.snaps.is_empty() => {
                let i = rng.below(w.snaps.len() as u64) as usize;
                w.view(&w.snaps[i], &ctx);
            }
            89..=93 => {
                block_on(img.close()).expect(&ctx);
                drop(img);
                w.check(&ctx);
                img = w.open();
            }
            _ if !case.drops => {
                block_on(img.close()).expect(&ctx);
                drop(img);
                img = w.open();
            }
            _ => {
                // Dropped without a close after a flush: the journal is
                // replayed at open; nothing acknowledged is lost.
                block_on(img.flush()).expect(&ctx);
                drop(img);
                dropped = true;
                img = w.open();
            }
        }
    }
    block_on(img.close()).unwrap();
    drop(img);
    let img = w.open();
    let mut all = vec![0u8; size as usize];
    block_on(img.read_slice(0, &mut all)).unwrap();
    let bad = all.iter().zip(&w.live).position(|(a, b)| a != b);
    assert_eq!(bad, None, "seed {seed}: the live disk differs at the end");
    for s in &w.snaps {
        w.view(s, &format!("seed {seed} at the end"));
    }
    // Deleting every snapshot leaves a plain image: no snapshots feature,
    // no leak, the same content.
    for s in std::mem::take(&mut w.snaps) {
        block_on(img.delete_snapshot(&SnapshotSel::Id(s.id.to_string()))).unwrap();
    }
    block_on(img.close()).unwrap();
    drop(img);
    let (h, _) = block_on(fvd_core::image::read_header(&w.disk)).unwrap();
    assert_eq!(
        h.incompatible & fvd_core::format::header::INCOMPAT_SNAPSHOTS,
        0
    );
    let r = block_on(check_storage(&w.disk, None)).unwrap();
    assert!(r.corruptions.is_empty(), "{r:?}");
    assert!(r.leaks.is_empty() || dropped, "seed {seed}: {r:?}");
    let img = w.open();
    block_on(img.read_slice(0, &mut all)).unwrap();
    assert!(
        all == w.live,
        "seed {seed}: content after deleting every snapshot"
    );
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
fn snapshots_without_base() {
    for (bs, cs) in [(512u32, 4096u32), (4096, 65536), (4096, 1 << 20)] {
        for seed in seeds() {
            let case = Case {
                virtual_size: 4 << 20,
                base_size: None,
                block_size: bs,
                chunk_size: cs,
                drops: true,
            };
            run_case(&case, seed ^ cs as u64, 400);
        }
    }
}

#[test]
fn snapshots_with_base() {
    for (bs, cs) in [(512u32, 8192u32), (4096, 65536)] {
        for seed in seeds() {
            // A base smaller than the disk, not block aligned.
            let case = Case {
                virtual_size: 3 << 20,
                base_size: Some((2 << 20) + 1536),
                block_size: bs,
                chunk_size: cs,
                drops: seed % 2 == 0,
            };
            run_case(&case, seed ^ bs as u64, 400);
        }
    }
}
