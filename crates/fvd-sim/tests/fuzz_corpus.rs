//! The fuzz targets' bodies (`fvd_sim::fuzz`) on a generated,
//! deterministic corpus, on stable Rust: small valid images, each byte of
//! their headers mutated, truncations, mutated journal blocks and random
//! bytes. Regression inputs found by fuzzing are kept at the end.

use fvd_core::format::header::{HEADER_SLOT_SIZE, Header, Region, decode_slots};
use fvd_core::format::journal;
use fvd_sim::Rng;
use fvd_sim::fuzz::{self, Reached};

/// Values a mutated byte takes, by offset, so that every offset sees a
/// flipped low bit, a flipped high bit, all bits flipped, zero and 0xff.
fn mutate(b: u8, off: usize) -> u8 {
    match off % 5 {
        0 => b ^ 0x01,
        1 => b ^ 0x80,
        2 => !b,
        3 => 0,
        _ => 0xff,
    }
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        let x = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&x[..c.len()]);
    }
    v
}

fn newest(img: &[u8]) -> (Header, usize) {
    decode_slots(img).expect("seed images decode")
}

#[test]
fn header_corpus() {
    let seeds = fuzz::seed_images();
    let mut n = 0;
    for (_, img) in seeds.iter().step_by(4) {
        let area = &img[..2 * HEADER_SLOT_SIZE];
        for off in 0..area.len() {
            let mut m = area.to_vec();
            m[off] = mutate(m[off], off);
            fuzz::header(&m);
            n += 1;
        }
        for len in [0, 1, 8, 12, 100, 4091, 4092, 4095, 4096, 4097, 8191] {
            fuzz::header(&area[..len]);
            n += 1;
        }
    }
    let mut rng = Rng::new(1);
    for i in 0..500 {
        let mut m = random_bytes(&mut rng, 8192);
        if i % 2 == 0 {
            m[..8].copy_from_slice(&fvd_core::format::header::MAGIC);
            m[8..12].copy_from_slice(&1u32.to_le_bytes());
            m[12..16].copy_from_slice(&4096u32.to_le_bytes());
        }
        fuzz::header(&m);
        n += 1;
    }
    assert!(n > 10_000);
}

/// The first journal block of every dirty seed image.
fn journal_blocks() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (name, img) in fuzz::seed_images() {
        if !name.ends_with("dirty") {
            continue;
        }
        let (h, _) = newest(&img);
        let j = h.region(Region::Journal);
        let o = j.offset as usize;
        let b = img[o..o + journal::BLOCK_SIZE].to_vec();
        if journal::decode_block(&b, h.journal_epoch, 0)
            .ok()
            .flatten()
            .is_some()
        {
            out.push(b);
        }
    }
    assert!(!out.is_empty(), "no seed image has a journal block");
    out
}

#[test]
fn journal_corpus() {
    let mut rng = Rng::new(2);
    for b in journal_blocks() {
        let used = 32 + u16::from_le_bytes([b[26], b[27]]) as usize;
        for off in 0..used.min(journal::BLOCK_SIZE) + 64 {
            let mut m = b.clone();
            m[off] = mutate(m[off], off);
            fuzz::journal(&m);
        }
        for len in [0, 4, 8, 24, 31, 32, 4095] {
            fuzz::journal(&b[..len]);
        }
    }
    for _ in 0..300 {
        let mut m = random_bytes(&mut rng, journal::BLOCK_SIZE);
        // Plausible record headers: small counts, known types.
        m[24..26].copy_from_slice(&((rng.below(300)) as u16).to_le_bytes());
        m[26..28].copy_from_slice(&((rng.below(5000)) as u16).to_le_bytes());
        for r in 0..(journal::PAYLOAD / 16) {
            let p = 32 + r * 16;
            m[p..p + 2].copy_from_slice(&(rng.below(4) as u16).to_le_bytes());
        }
        fuzz::journal(&m);
    }
}

#[test]
fn bitmap_corpus() {
    let mut rng = Rng::new(3);
    for len in [0usize, 1, 7, 8, 9, 16, 100, 4104] {
        for _ in 0..50 {
            let mut m = random_bytes(&mut rng, len);
            if len > 8 && rng.below(2) == 0 {
                // Bit counts that end inside a byte, with and without stray bits.
                let bits = (len as u64 - 8) * 8 - rng.below(8);
                m[..8].copy_from_slice(&bits.to_le_bytes());
            }
            fuzz::bitmap(&m);
        }
    }
    for (_, img) in fuzz::seed_images() {
        let (h, _) = newest(&img);
        let bm = h.region(Region::Bitmap);
        if bm.length == 0 {
            continue;
        }
        let mut m = h.base_blocks().to_le_bytes().to_vec();
        m.extend_from_slice(&img[bm.offset as usize..bm.end() as usize]);
        fuzz::bitmap(&m);
    }
}

#[test]
fn image_corpus_valid_and_truncated() {
    for (name, img) in fuzz::seed_images() {
        assert_eq!(fuzz::image(&img), Reached::Reopened, "{name}");
        let (h, _) = newest(&img);
        let mut cuts: Vec<u64> = vec![0, 1, 8, 4096, 8191, 8192, 8193, img.len() as u64 - 1];
        for r in [Region::Bitmap, Region::Journal, Region::Data] {
            let e = h.region(r);
            if e.length > 0 {
                cuts.extend([e.offset, e.offset + 1, e.offset + e.length / 2, e.end() - 1]);
            }
        }
        for cut in cuts {
            let cut = (cut as usize).min(img.len());
            let _ = fuzz::image(&img[..cut]);
        }
    }
}

#[test]
fn image_corpus_every_header_byte() {
    // Four seeds (a dirty one over a base, a clean one without, a fresh one
    // over a larger base, a dirty compact one); each byte of the newest
    // header slot mutated.
    let seeds = fuzz::seed_images();
    let chosen = [
        "smallbase-sparse-bs4096-dirty",
        "nobase-sparse-bs512-clean",
        "bigbase-sparse-bs65536-fresh",
        "smallbase-compact-bs512-dirty",
    ];
    let mut reached = [0usize; 4];
    for want in chosen {
        let (_, img) = seeds.iter().find(|(n, _)| n == want).expect("seed exists");
        let (h, slot) = newest(img);
        let start = slot * HEADER_SLOT_SIZE;
        for off in start..start + HEADER_SLOT_SIZE {
            let mut m = img.clone();
            m[off] = mutate(m[off], off);
            // Bytes whose mutation leaves the same header (after the
            // checksum is fixed) behave like the seed: test them through
            // the header body only.
            let mut slot_bytes = m[start..start + HEADER_SLOT_SIZE].to_vec();
            fuzz::fix_header_crc(&mut slot_bytes);
            if Header::decode(&slot_bytes).is_ok_and(|d| d == h) {
                fuzz::header(&m[..2 * HEADER_SLOT_SIZE]);
                continue;
            }
            reached[fuzz::image(&m) as usize] += 1;
        }
    }
    eprintln!("every header byte: reached {reached:?}");
    // Many mutated fields still give a valid header: the engine must run on them.
    assert!(reached[Reached::Reopened as usize] > 100, "{reached:?}");
    assert!(reached[Reached::Rejected as usize] > 100, "{reached:?}");
}

#[test]
fn image_corpus_journal_and_bitmap_bytes() {
    let seeds = fuzz::seed_images();
    for (name, img) in seeds.iter().filter(|(n, _)| n.ends_with("dirty")) {
        if name.starts_with("nobase-sparse") {
            continue;
        }
        let (h, _) = newest(img);
        let j = h.region(Region::Journal).offset as usize;
        let used = 32 + u16::from_le_bytes([img[j + 26], img[j + 27]]) as usize;
        // Every byte of the first block's header and records (checksums
        // are fixed by the body's second run).
        let mut reached = [0usize; 4];
        for off in j..j + used {
            let mut m = img.clone();
            m[off] = mutate(m[off], off);
            let _ = fuzz::image(&m);
            let fixed = fuzz::fix_crcs(&m).unwrap_or(m);
            reached[fuzz::image_as_is(&fixed) as usize] += 1;
        }
        // With checksums fixed, some mutations are corruption (open refuses
        // the image), others valid records (the engine must cope).
        assert!(
            reached[Reached::Rejected as usize] > 0,
            "{name}: {reached:?}"
        );
        assert!(
            reached[Reached::Reopened as usize] > 0,
            "{name}: {reached:?}"
        );
        eprintln!("{name}: journal bytes reached {reached:?}");
        let bm = h.region(Region::Bitmap);
        if bm.length > 0 {
            let last = (h.base_blocks().div_ceil(8) as usize).max(1) - 1;
            for off in [0, last, last + 1, bm.length as usize - 1] {
                let mut m = img.clone();
                m[bm.offset as usize + off] ^= 0xff;
                let _ = fuzz::image(&m);
            }
        }
    }
}

#[test]
fn image_corpus_random() {
    let mut rng = Rng::new(4);
    let seeds = fuzz::seed_images();
    for i in 0..400 {
        let len = rng.below(40_000) as usize;
        let mut m = random_bytes(&mut rng, len);
        if i % 2 == 0 && len >= 8 {
            m[..8].copy_from_slice(&fvd_core::format::header::MAGIC);
        }
        let _ = fuzz::image(&m);
        // A seed with a burst of random bytes somewhere in its metadata.
        let (_, img) = &seeds[i % seeds.len()];
        let mut m = img.clone();
        let meta_end = (newest(img).0.region(Region::Data).offset as usize).min(m.len());
        let at = rng.below(meta_end as u64) as usize;
        let n = (rng.range(1, 64) as usize).min(m.len() - at);
        let burst = random_bytes(&mut rng, n);
        m[at..at + n].copy_from_slice(&burst);
        let _ = fuzz::image(&m);
    }
}

/// `FVD_FUZZ_SEED_DIR=<dir>` writes the seed inputs of every fuzz target to
/// `<dir>/<target>/` (for `cargo fuzz run <target> <dir>/<target>`).
#[test]
fn write_seed_corpus_if_asked() {
    let Some(dir) = std::env::var_os("FVD_FUZZ_SEED_DIR") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let write = |target: &str, name: &str, data: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), data).unwrap();
    };
    for (name, img) in fuzz::seed_images() {
        write("image", &name, &img);
        write("header", &name, &img[..2 * HEADER_SLOT_SIZE]);
        let (h, _) = newest(&img);
        let bm = h.region(Region::Bitmap);
        if bm.length > 0 {
            let mut m = h.base_blocks().to_le_bytes().to_vec();
            m.extend_from_slice(&img[bm.offset as usize..bm.end() as usize]);
            write("bitmap", &name, &m);
        }
    }
    for (i, b) in journal_blocks().iter().enumerate() {
        write("journal", &format!("block{i}"), b);
    }
}
