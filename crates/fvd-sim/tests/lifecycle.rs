//! Model-based test of the lifecycle operations (resize, commit, rebase,
//! flatten, amend) mixed with guest writes: after every step the image is
//! reopened over its current base and its whole content compared with a
//! byte model of the guest's view, the base with its own model, and `check`
//! must find nothing. Sparse and compact layouts, block sizes from 512 B to
//! 64 KiB, images smaller and larger than their bases, base fingerprints
//! verified at every open.

use std::sync::Arc;

use fvd_core::base::{Base, RawBase};
use fvd_core::executor::block_on;
use fvd_core::lifecycle::amend::{Amendments, amend};
use fvd_core::lifecycle::commit::{BaseWriter, commit};
use fvd_core::lifecycle::rebase::{NewBase, rebase};
use fvd_core::lifecycle::resize::resize;
use fvd_core::storage::{MemStorage, Storage};
use fvd_core::{CreateOptions, Format, Image, IoBuf, OpenOptions};
use fvd_sim::Rng;

/// A raw base in memory and what it holds.
struct RawDisk {
    disk: MemStorage,
    bytes: Vec<u8>,
}

impl RawDisk {
    fn new(name: &str, size: u64, rng: &mut Rng) -> RawDisk {
        let disk = MemStorage::new(name);
        let mut bytes = vec![0u8; size as usize];
        let mut pos = 0;
        while pos < bytes.len() {
            let len = (rng.below(48 << 10) as usize + 512).min(bytes.len() - pos);
            if rng.below(3) != 0 {
                let b = rng.next_u64() as u8 | 1;
                for (i, x) in bytes[pos..pos + len].iter_mut().enumerate() {
                    *x = b.wrapping_add((i / 512) as u8);
                }
            }
            pos += len;
        }
        block_on(disk.set_len(size)).unwrap();
        block_on(disk.write_at(0, fvd_core::IoBuf::from_slice(&bytes), false)).unwrap();
        RawDisk { disk, bytes }
    }

    fn base(&self) -> Arc<dyn Base> {
        Arc::new(RawBase::new(Arc::new(self.disk.clone())).unwrap())
    }

    /// Re-read what the disk holds (after a commit wrote into it).
    fn reload(&mut self) {
        let len = self.disk.len().unwrap();
        let b = block_on(self.disk.read_at(0, fvd_core::IoBuf::zeroed(len as usize))).unwrap();
        self.bytes = b.to_vec();
    }
}

struct World {
    image: MemStorage,
    bases: Vec<RawDisk>,
    /// Index of the image's base in `bases`, if it has one.
    current: Option<usize>,
    model: Vec<u8>,
}

impl World {
    fn base(&self) -> Option<Arc<dyn Base>> {
        self.current.map(|i| self.bases[i].base())
    }

    fn open(&self) -> Image {
        block_on(Image::open(
            Arc::new(self.image.clone()),
            self.base(),
            OpenOptions::default(),
        ))
        .unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn storage(&self) -> Arc<dyn Storage> {
        Arc::new(self.image.clone())
    }

    /// The image's whole content and `check` against the model.
    fn verify(&self, what: &str) {
        let img = block_on(Image::open(
            Arc::new(self.image.clone()),
            self.base(),
            OpenOptions { read_only: true },
        ))
        .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        assert_eq!(img.virtual_size(), self.model.len() as u64, "{what}: size");
        let got = block_on(img.read(0, IoBuf::zeroed(self.model.len()))).unwrap();
        if got[..] != self.model[..] {
            let at = got
                .iter()
                .zip(&self.model)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "{what}: content differs at {at}: {:#x} instead of {:#x}",
                got[at], self.model[at]
            );
        }
        drop(img);
        let r = block_on(fvd_core::check::check_storage(&self.image, None)).unwrap();
        assert_eq!(
            r.exit_code(),
            0,
            "{what}: check: {:?} {:?} {:?}",
            r.corruptions,
            r.leaks,
            r.check_errors
        );
    }
}

fn sector_size(rng: &mut Rng, max: u64) -> u64 {
    (rng.below(max / 512) + 1) * 512
}

fn run_case(seed: u64, compact: Option<u32>, block_size: u32) {
    let mut rng = Rng::new(seed);
    let bases: Vec<RawDisk> = (0..3)
        .map(|i| {
            RawDisk::new(
                &format!("base{i}"),
                sector_size(&mut rng, 3 << 20),
                &mut rng,
            )
        })
        .collect();
    let v0 = sector_size(&mut rng, 4 << 20);
    let image = MemStorage::new("img");
    let opts = CreateOptions {
        size: Some(v0),
        base: Some(("base0".into(), Format::Raw)),
        block_size: Some(block_size),
        journal_size: Some(64 << 10),
        detect_zeroes: rng.below(2) == 0,
        compact: compact.is_some(),
        chunk_size: compact,
        grow_unit: Some(256 << 10),
        fingerprint_base: true,
        ..Default::default()
    };
    block_on(fvd_core::image::create(
        &image,
        &opts,
        Some(bases[0].base().as_ref()),
    ))
    .unwrap();
    let mut model = bases[0].bytes.clone();
    model.resize(v0 as usize, 0);
    let mut w = World {
        image,
        bases,
        current: Some(0),
        model,
    };
    w.verify("create");
    for step in 0..40 {
        let what = format!("seed {seed:#x} step {step}");
        match rng.below(10) {
            0..=3 => {
                let img = w.open();
                for _ in 0..rng.below(6) + 1 {
                    let size = w.model.len() as u64;
                    if size == 0 {
                        break;
                    }
                    let off = rng.below(size / 512) * 512 + rng.below(2) * rng.below(512);
                    let len = (rng.below(128 << 10) + 1).min(size - off);
                    if rng.below(4) == 0 {
                        block_on(img.write_zeroes(off, len, rng.below(2) == 0, false)).unwrap();
                        w.model[off as usize..(off + len) as usize].fill(0);
                    } else {
                        let b = rng.next_u64() as u8;
                        let data = vec![b; len as usize];
                        block_on(img.write(off, IoBuf::from_slice(&data), false)).unwrap();
                        w.model[off as usize..(off + len) as usize].fill(b);
                    }
                }
                block_on(img.close()).unwrap();
                w.verify(&format!("{what}: writes"));
            }
            4 | 5 => {
                let new = sector_size(&mut rng, 6 << 20);
                let shrink = new < w.model.len() as u64;
                block_on(resize(w.storage(), w.base(), new, shrink))
                    .unwrap_or_else(|e| panic!("{what}: resize to {new}: {e}"));
                w.model.resize(new as usize, 0);
                w.verify(&format!("{what}: resize to {new}"));
            }
            6 => {
                let Some(i) = w.current else { continue };
                let keep = rng.below(2) == 0;
                let writer = BaseWriter::Raw(Arc::new(w.bases[i].disk.clone()));
                block_on(commit(w.storage(), &writer, keep))
                    .unwrap_or_else(|e| panic!("{what}: commit: {e}"));
                w.bases[i].reload();
                let b = &w.bases[i].bytes;
                assert!(b.len() >= w.model.len(), "{what}: base did not grow");
                assert!(
                    b[..w.model.len()] == w.model[..],
                    "{what}: base after commit"
                );
                w.verify(&format!("{what}: commit (keep {keep})"));
            }
            7 | 8 => {
                let to = rng.below(3) as usize;
                let new = NewBase::Base {
                    name: format!("base{to}"),
                    format: Format::Raw,
                    base: w.bases[to].base(),
                    fingerprint: true,
                };
                block_on(rebase(w.storage(), w.base(), new, false))
                    .unwrap_or_else(|e| panic!("{what}: rebase to base{to}: {e}"));
                w.current = Some(to);
                w.verify(&format!("{what}: rebase to base{to}"));
            }
            _ => {
                if rng.below(3) == 0 {
                    block_on(rebase(w.storage(), w.base(), NewBase::Nothing, false))
                        .unwrap_or_else(|e| panic!("{what}: flatten: {e}"));
                    w.current = None;
                    w.verify(&format!("{what}: flatten"));
                } else {
                    let a = Amendments {
                        copy_on_read: Some(rng.below(2) == 0),
                        grow_unit: Some(sector_size(&mut rng, 1 << 20)),
                        ..Default::default()
                    };
                    block_on(amend(w.storage(), w.base(), &a)).unwrap();
                    w.verify(&format!("{what}: amend"));
                }
            }
        }
    }
}

#[test]
fn sparse_images() {
    for (i, bs) in [512u32, 4096, 65536].into_iter().enumerate() {
        for s in 0..16u64 {
            run_case(0x5eed_0000 + s * 7 + i as u64 * 1000, None, bs);
        }
    }
}

#[test]
fn compact_images() {
    for (bs, cs) in [
        (512u32, 512u32),
        (4096, 4096),
        (4096, 65536),
        (65536, 1 << 20),
    ] {
        for s in 0..16u64 {
            run_case(0xc0ac_0000 + s * 13 + cs as u64, Some(cs), bs);
        }
    }
}

/// The table of a compact image that grows far beyond what its metadata
/// area holds: the journal gives up its tail, then the data region's start
/// moves (its first chunks are moved away first).
#[test]
fn compact_table_growth_moves_the_data_region() {
    let mut rng = Rng::new(77);
    let base = RawDisk::new("base0", 1 << 20, &mut rng);
    let image = MemStorage::new("img");
    let opts = CreateOptions {
        size: Some(2 << 20),
        base: Some(("base0".into(), Format::Raw)),
        block_size: Some(512),
        journal_size: Some(64 << 10),
        compact: true,
        chunk_size: Some(512),
        fingerprint_base: true,
        ..Default::default()
    };
    block_on(fvd_core::image::create(
        &image,
        &opts,
        Some(base.base().as_ref()),
    ))
    .unwrap();
    let mut model = base.bytes.clone();
    model.resize(2 << 20, 0);
    let mut w = World {
        image,
        bases: vec![base],
        current: Some(0),
        model,
    };
    let img = w.open();
    // Fill the whole disk, so the first physical chunks hold data.
    for i in 0..(2u64 << 20) / 4096 {
        let data = vec![(i % 251) as u8 + 1; 4096];
        block_on(img.write(i * 4096, IoBuf::from_slice(&data), false)).unwrap();
        w.model[(i * 4096) as usize..((i + 1) * 4096) as usize].copy_from_slice(&data);
    }
    block_on(img.close()).unwrap();
    let before = fvd_core::image::read_header(&w.image);
    let d0 = block_on(before)
        .unwrap()
        .0
        .region(fvd_core::format::header::Region::Data)
        .offset;
    // 2 MiB of 512-byte chunks need 16 KiB of table; 1 GiB needs 8 MiB.
    let done = block_on(resize(w.storage(), w.base(), 1 << 30, false)).unwrap();
    assert!(done.data_shift > 0, "{done:?}");
    w.model.resize(1 << 30, 0);
    let (h, _) = block_on(fvd_core::image::read_header(&w.image)).unwrap();
    assert_eq!(
        h.region(fvd_core::format::header::Region::Data).offset,
        d0 + done.data_shift
    );
    w.verify("after the table grew");
    // And back, and writes after it all.
    block_on(resize(w.storage(), w.base(), 3 << 20, true)).unwrap();
    w.model.resize(3 << 20, 0);
    w.verify("after shrinking");
    let img = w.open();
    block_on(img.write(5000, IoBuf::from_slice(&[9u8; 70000]), false)).unwrap();
    w.model[5000..75000].fill(9);
    block_on(img.close()).unwrap();
    w.verify("writes after");
}

/// A block device in memory: its length is fixed (`set_len` cannot shrink
/// it and fails past its end), as `FileStorage` treats a device.
struct Device(MemStorage);

impl Storage for Device {
    fn read_at(
        &self,
        o: u64,
        b: fvd_core::IoBuf,
    ) -> fvd_core::storage::IoFuture<'_, fvd_core::IoBuf> {
        self.0.read_at(o, b)
    }
    fn write_at(
        &self,
        o: u64,
        b: fvd_core::IoBuf,
        fua: bool,
    ) -> fvd_core::storage::IoFuture<'_, fvd_core::IoBuf> {
        self.0.write_at(o, b, fua)
    }
    fn flush(&self) -> fvd_core::storage::IoFuture<'_, ()> {
        self.0.flush()
    }
    fn discard(&self, o: u64, l: u64) -> fvd_core::storage::IoFuture<'_, ()> {
        self.0.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64) -> fvd_core::storage::IoFuture<'_, ()> {
        self.0.write_zeroes(o, l)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> fvd_core::storage::IoFuture<'_, ()> {
        let have = self.0.len().unwrap();
        Box::pin(std::future::ready(if len > have {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        }))
    }
    fn allocation(
        &self,
        o: u64,
        l: u64,
    ) -> fvd_core::storage::IoFuture<'_, Vec<fvd_core::storage::AllocRun>> {
        self.0.allocation(o, l)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.0.allocated_bytes()
    }
    fn describe(&self) -> String {
        "device".into()
    }
}

/// `commit` empties a compact image on a block device: the table is
/// unmapped and the chunks it used are punched (the device cannot be cut).
#[test]
fn commit_punches_the_chunks_of_a_compact_image_on_a_device() {
    let mut rng = Rng::new(91);
    let mut base = RawDisk::new("base0", 1 << 20, &mut rng);
    let mem = MemStorage::new("dev");
    block_on(mem.set_len(8 << 20)).unwrap();
    let dev = Arc::new(Device(mem.clone()));
    let opts = CreateOptions {
        size: Some(1 << 20),
        base: Some(("base0".into(), Format::Raw)),
        compact: true,
        chunk_size: Some(64 << 10),
        journal_size: Some(64 << 10),
        fingerprint_base: true,
        ..Default::default()
    };
    block_on(fvd_core::image::create(
        dev.as_ref(),
        &opts,
        Some(base.base().as_ref()),
    ))
    .unwrap();
    let img = block_on(Image::open(
        dev.clone(),
        Some(base.base()),
        OpenOptions::default(),
    ))
    .unwrap();
    let mut model = base.bytes.clone();
    for i in 0..6u64 {
        let off = i * 150_000;
        block_on(img.write(off, IoBuf::from_slice(&[i as u8 + 3; 70_000]), false)).unwrap();
        model[off as usize..off as usize + 70_000].fill(i as u8 + 3);
    }
    block_on(img.close()).unwrap();
    let (h, _) = block_on(fvd_core::image::read_header(dev.as_ref())).unwrap();
    let d = h.region(fvd_core::format::header::Region::Data).offset;
    let held = mem.allocated_bytes().unwrap();
    block_on(commit(
        dev.clone(),
        &BaseWriter::Raw(Arc::new(base.disk.clone())),
        false,
    ))
    .unwrap();
    base.reload();
    assert!(base.bytes == model, "base after commit");
    assert_eq!(mem.len().unwrap(), 8 << 20, "the device keeps its length");
    let runs = block_on(mem.allocation(d, (8 << 20) - d)).unwrap();
    assert!(
        runs.iter().all(|r| !r.data),
        "chunks left allocated: {runs:?}"
    );
    assert!(mem.allocated_bytes().unwrap() < held);
    let img = block_on(Image::open(
        dev.clone(),
        Some(base.base()),
        OpenOptions::default(),
    ))
    .unwrap();
    let got = block_on(img.read(0, IoBuf::zeroed(1 << 20))).unwrap();
    assert!(got[..] == model[..], "image after commit");
    block_on(img.close()).unwrap();
    let r = block_on(fvd_core::check::check_storage(dev.as_ref(), None)).unwrap();
    assert_eq!(r.exit_code(), 0, "{:?} {:?}", r.leaks, r.corruptions);
}
