//! Bodies of the fuzz targets, shared by `fuzz/` (cargo-fuzz, nightly) and
//! `tests/fuzz_corpus.rs` (stable, a generated corpus).
//!
//! Each body must never panic, hang or allocate without bound on any input;
//! where an input decodes, it also checks properties (round trips, data
//! written reads back) and panics when one fails.
//!
//! [`image`] treats the input as a whole image file. Header and journal
//! checksums make random mutations mostly fail early, so the body also runs
//! a second time on a copy whose checksums were recomputed ([`fix_crcs`]):
//! the fuzzer then explores every field's validation and the engine on
//! strange but valid metadata.

use std::sync::Arc;

use fvd_core::base::Base;
use fvd_core::executor::block_on;
use fvd_core::format::bitmap::AtomicBitmap;
use fvd_core::format::header::{self, HEADER_SLOT_SIZE, Header, Region};
use fvd_core::format::journal;
use fvd_core::image::{CreateOptions, Image, OpenOptions};
use fvd_core::iobuf::IoBuf;
use fvd_core::storage::{AllocRun, IoFuture, MemStorage};

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Header decoding: `Header::decode` and `decode_slots` on the input.
#[doc(hidden)]
pub fn header(data: &[u8]) {
    if let Ok(h) = Header::decode(data) {
        check_header(&h);
    }
    if let Ok((h, slot)) = header::decode_slots(data) {
        assert!(slot < 2);
        let again = Header::decode(&data[slot * HEADER_SLOT_SIZE..]).expect("chosen slot decodes");
        assert_eq!(
            again, h,
            "decode_slots returned another header than its slot"
        );
        check_header(&h);
    }
    // The same bytes with a valid checksum: every field's validation.
    if data.len() >= HEADER_SLOT_SIZE {
        let mut fixed = data[..HEADER_SLOT_SIZE].to_vec();
        fix_header_crc(&mut fixed);
        if let Ok(h) = Header::decode(&fixed) {
            check_header(&h);
        }
    }
}

fn check_header(h: &Header) {
    let enc = h.encode();
    let back = Header::decode(&enc).expect("an encoded valid header decodes");
    assert_eq!(&back, h, "header does not round-trip");
    let _ = (h.base_range(), h.base_blocks(), h.is_clean());
    for r in Region::ALL {
        let e = h.region(r);
        let _ = e.end();
    }
}

/// Journal block decoding, with the epoch and sequence the block claims.
#[doc(hidden)]
pub fn journal(data: &[u8]) {
    let epoch = u64_at(data, 8);
    let seq = u64_at(data, 16);
    check_block(data, epoch, seq);
    if data.len() >= journal::BLOCK_SIZE {
        let mut fixed = data[..journal::BLOCK_SIZE].to_vec();
        fixed[0..4].copy_from_slice(&journal::MAGIC.to_le_bytes());
        fix_block_crc(&mut fixed);
        check_block(&fixed, epoch, seq);
    }
}

fn check_block(data: &[u8], epoch: u64, seq: u64) {
    let Ok(Some(b)) = journal::decode_block(data, epoch, seq) else {
        return;
    };
    assert_eq!((b.epoch, b.seq), (epoch, seq));
    let used: usize = b.records.iter().map(|r| r.encoded_len()).sum();
    assert!(used <= journal::PAYLOAD, "decoded records overflow a block");
    let enc = journal::encode_block(epoch, seq, &b.records);
    let back = journal::decode_block(&enc, epoch, seq)
        .expect("an encoded block decodes")
        .expect("an encoded block is valid");
    assert_eq!(back.records, b.records, "journal block does not round-trip");
}

/// Bitmap loading: the first 8 bytes give the bit count (bounded by the
/// input), the rest are the on-disk bytes.
#[doc(hidden)]
pub fn bitmap(data: &[u8]) {
    let bytes = data.get(8..).unwrap_or(&[]);
    let bits = u64_at(data, 0) % (bytes.len() as u64 * 8 + 65);
    let Ok(bm) = AtomicBitmap::from_bytes(bits, bytes) else {
        return;
    };
    let need = bits.div_ceil(8) as usize;
    assert_eq!(bm.len(), bits);
    assert_eq!(
        bm.to_bytes(need),
        bytes[..need],
        "bitmap does not round-trip"
    );
    let ones: u64 = bytes[..need].iter().map(|b| b.count_ones() as u64).sum();
    assert_eq!(bm.count_ones(), ones);
    let mut pos = 0;
    for (s, e, v) in bm.runs(0..bits) {
        assert!(s == pos && e > s, "runs do not tile the bitmap");
        assert!(if v {
            bm.all_set(s..e)
        } else {
            bm.none_set(s..e)
        });
        pos = e;
    }
    assert_eq!(pos, bits);
    if bits > 0 {
        let a = u64_at(data, 0).rotate_left(17) % bits;
        let b = a + (u64_at(data, 0).rotate_left(41) % (bits - a));
        assert_eq!(bm.bytes_range(0, need), bm.to_bytes(need));
        let _ = (bm.all_set(a..b), bm.none_set(a..b), bm.get(a));
    }
}

/// Recompute the checksum of one header slot (`slot.len() >= 4096`).
pub fn fix_header_crc(slot: &mut [u8]) {
    let crc = crc32c::crc32c(&slot[..HEADER_SLOT_SIZE - 4]);
    slot[HEADER_SLOT_SIZE - 4..HEADER_SLOT_SIZE].copy_from_slice(&crc.to_le_bytes());
}

/// Recompute the checksum of one journal block (`b.len() >= 4096`).
pub fn fix_block_crc(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[8..journal::BLOCK_SIZE]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// A copy of `image` whose header slots (those with the magic) and journal
/// blocks (of the newest header, those with the magic) have correct
/// checksums; None if nothing changed.
pub fn fix_crcs(image: &[u8]) -> Option<Vec<u8>> {
    let mut v = image.to_vec();
    for slot in 0..2 {
        let s = slot * HEADER_SLOT_SIZE;
        if v.len() >= s + HEADER_SLOT_SIZE && v[s..s + 8] == header::MAGIC {
            fix_header_crc(&mut v[s..s + HEADER_SLOT_SIZE]);
        }
    }
    if let Ok((h, _)) = header::decode_slots(&v) {
        let j = h.region(Region::Journal);
        let mut off = j.offset;
        while off < j.end() && off.saturating_add(journal::BLOCK_SIZE as u64) <= v.len() as u64 {
            let o = off as usize;
            if v[o..o + 4] == journal::MAGIC.to_le_bytes() {
                fix_block_crc(&mut v[o..o + journal::BLOCK_SIZE]);
            }
            off += journal::BLOCK_SIZE as u64;
        }
    }
    (v != image).then_some(v)
}

/// A base of any size whose bytes are a function of their offset; nothing
/// is allocated, so a header may claim any base size.
struct PatternBase {
    size: u64,
}

/// The byte a [`PatternBase`] holds at `offset`.
fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9e37_79b9) >> 11) as u8 | 1
}

impl Base for PatternBase {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        for (i, b) in buf.iter_mut().enumerate() {
            let o = offset + i as u64;
            *b = if o < self.size { pattern_byte(o) } else { 0 };
        }
        Box::pin(std::future::ready(Ok(buf)))
    }
    fn allocation(&self, _offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        Box::pin(std::future::ready(Ok(vec![AllocRun {
            length: len,
            data: true,
        }])))
    }
    fn format(&self) -> fvd_core::format::Format {
        fvd_core::format::Format::Raw
    }
    fn describe(&self) -> String {
        "fuzz-base".into()
    }
}

/// How far [`image`] got with an input (the better of its two runs).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reached {
    /// No open succeeded.
    Rejected,
    /// Opened read-only only.
    ReadOnly,
    /// Opened read-write; some write, flush or close failed.
    ReadWrite,
    /// Written, closed and reopened with the data intact.
    Reopened,
}

/// The input as a whole image file: open it (read-write, else read-only),
/// read, query, write, flush, close, reopen; what was written must read
/// back. Then the same with checksums fixed.
#[doc(hidden)]
pub fn image(data: &[u8]) -> Reached {
    let a = image_as_is(data);
    match fix_crcs(data) {
        Some(fixed) => a.max(image_as_is(&fixed)),
        None => a,
    }
}

fn base_for(storage: &MemStorage) -> Option<Arc<dyn Base>> {
    let mut area = vec![0u8; 2 * HEADER_SLOT_SIZE];
    storage.read_sync(0, &mut area);
    let (h, _) = header::decode_slots(&area).ok()?;
    (h.base_range() > 0).then(|| Arc::new(PatternBase { size: h.base_size }) as Arc<dyn Base>)
}

/// One run of the [`image`] body on exactly these bytes.
#[doc(hidden)]
pub fn image_as_is(data: &[u8]) -> Reached {
    let storage = MemStorage::from_bytes("fuzz", data);
    let base = base_for(&storage);
    let opened = block_on(Image::open(
        Arc::new(storage.clone()),
        base.clone(),
        OpenOptions::default(),
    ));
    let img = match opened {
        Ok(img) => img,
        Err(_) => {
            if let Ok(ro) = block_on(Image::open(
                Arc::new(storage.clone()),
                base.clone(),
                OpenOptions { read_only: true },
            )) {
                exercise_reads(&ro);
                return Reached::ReadOnly;
            }
            return Reached::Rejected;
        }
    };
    exercise_reads(&img);
    let size = img.virtual_size();
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    if size >= 512 {
        written.push((0, (0..512u32).map(|i| (i * 7 + 3) as u8).collect()));
    }
    if size >= 4096 {
        let mid = (size / 2 / 512 * 512).saturating_sub(100);
        written.push((mid, (0..700u32).map(|i| (i * 13 + 1) as u8).collect()));
        written.push((size - 512, vec![0u8; 512]));
    }
    let mut ok = true;
    for (i, (off, d)) in written.iter().enumerate() {
        let r = if i == 2 {
            block_on(img.discard(*off, d.len() as u64))
        } else {
            block_on(img.write(*off, IoBuf::from_slice(d), i == 1)).map(drop)
        };
        ok &= r.is_ok();
    }
    ok &= block_on(img.flush()).is_ok();
    if ok {
        check_written(&img, &written, "after flush");
    }
    let closed = block_on(img.close()).is_ok();
    drop(img);
    if !(ok && closed) {
        return Reached::ReadWrite;
    }
    // A clean close must leave an image that opens and holds what was written.
    let again = block_on(Image::open(
        Arc::new(storage.clone()),
        base,
        OpenOptions::default(),
    ))
    .unwrap_or_else(|e| panic!("image closed cleanly does not reopen: {e}"));
    check_written(&again, &written, "after close and reopen");
    block_on(again.close()).expect("second close");
    Reached::Reopened
}

fn exercise_reads(img: &Image) {
    let size = img.virtual_size();
    let n = size.min(64 << 10);
    let _ = block_on(img.read(0, IoBuf::for_overwrite(n as usize)));
    let _ = block_on(img.read(size - n, IoBuf::for_overwrite(n as usize)));
    if let Ok(ext) = block_on(img.block_status(0, size.min(4 << 20))) {
        let mut pos = 0;
        for e in &ext {
            assert_eq!(e.start, pos, "block_status extents do not tile");
            pos += e.length;
        }
        assert_eq!(pos, size.min(4 << 20), "block_status extents do not cover");
    }
}

fn check_written(img: &Image, written: &[(u64, Vec<u8>)], when: &str) {
    for (off, d) in written {
        let got = block_on(img.read(*off, IoBuf::for_overwrite(d.len())))
            .unwrap_or_else(|e| panic!("{when}: read failed: {e}"));
        assert!(
            got[..] == d[..],
            "{when}: data written at {off} does not read back"
        );
    }
}

/// Small valid images for seeding fuzzers: every combination of base (none,
/// smaller with an unaligned end, larger), block size, layout (sparse,
/// compact) and state (fresh, dirty journal, cleanly closed), with the
/// regions packed tightly so that an image is tens of KiB, not megabytes.
#[doc(hidden)]
pub fn seed_images() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (bname, base) in [
        ("nobase", None),
        ("smallbase", Some(40_000u64)),
        ("bigbase", Some(100_000u64)),
    ] {
        for bs in [512u32, 4096, 65536] {
            for compact in [false, true] {
                for state in ["fresh", "dirty", "clean"] {
                    let layout = if compact { "compact" } else { "sparse" };
                    let name = format!("{bname}-{layout}-bs{bs}-{state}");
                    if let Some(img) = build_image(base, bs, compact, state) {
                        out.push((name, img));
                    }
                }
            }
        }
    }
    out
}

fn build_image(base_size: Option<u64>, bs: u32, compact: bool, state: &str) -> Option<Vec<u8>> {
    let size: u64 = if bs == 65536 { 256 << 10 } else { 64 << 10 };
    let base = base_size.map(|s| Arc::new(PatternBase { size: s }) as Arc<dyn Base>);
    let disk = MemStorage::new("seed");
    let opts = CreateOptions {
        size: Some(size),
        base: base
            .as_ref()
            .map(|_| ("base.raw".into(), fvd_core::format::Format::Raw)),
        block_size: Some(bs),
        journal_size: Some(16 << 10),
        compact,
        chunk_size: compact.then_some(bs.max(4096)),
        grow_unit: compact.then_some(bs.max(4096) as u64),
        ..CreateOptions::default()
    };
    block_on(fvd_core::image::create(&disk, &opts, base.as_deref())).ok()?;
    let packed = MemStorage::from_bytes("seed", &pack(&disk.to_vec())?);
    if state != "fresh" {
        let img = block_on(Image::open(
            Arc::new(packed.clone()),
            base.clone(),
            OpenOptions::default(),
        ))
        .ok()?;
        for k in 0..12u64 {
            let off = (k * 5 * 1024 + 300) % (size - 2000);
            block_on(img.write(off, IoBuf::from_slice(&[k as u8 + 1; 1500]), false)).ok()?;
            if k % 4 == 3 {
                block_on(img.flush()).ok()?;
            }
        }
        block_on(img.discard(size - 4096, 4096)).ok()?;
        block_on(img.flush()).ok()?;
        if state == "clean" {
            block_on(img.close()).ok()?;
        }
    }
    Some(packed.to_vec())
}

/// Move an image's regions next to each other (header, bitmap, journal,
/// data), dropping the reserved regions, and rewrite both header slots.
fn pack(image: &[u8]) -> Option<Vec<u8>> {
    let (h, _) = header::decode_slots(image).ok()?;
    let mut nh = h.clone();
    let mut pos = header::HEADER_AREA;
    let mut out = vec![0u8; pos as usize];
    out[..HEADER_SLOT_SIZE].copy_from_slice(&image[..HEADER_SLOT_SIZE]);
    for r in Region::ALL {
        let e = h.region(r);
        let keep = matches!(r, Region::Bitmap | Region::Journal | Region::Table);
        if r == Region::Data || !keep || e.length == 0 {
            nh.regions[r as usize] = Default::default();
            continue;
        }
        nh.regions[r as usize].offset = pos;
        out.resize((pos + e.length) as usize, 0);
        let end = e.end().min(image.len() as u64);
        if e.offset < end {
            out[pos as usize..(pos + end - e.offset) as usize]
                .copy_from_slice(&image[e.offset as usize..end as usize]);
        }
        pos += e.length;
    }
    let d = h.region(Region::Data);
    nh.regions[Region::Data as usize] = header::Extent {
        offset: pos,
        length: d.length,
    };
    let tail = image.get(d.offset as usize..).unwrap_or(&[]);
    out.resize(pos as usize + tail.len().max(d.length as usize), 0);
    out[pos as usize..pos as usize + tail.len()].copy_from_slice(tail);
    nh.validate().ok()?;
    let enc = nh.encode();
    out[..HEADER_SLOT_SIZE].copy_from_slice(&enc);
    out[HEADER_SLOT_SIZE..2 * HEADER_SLOT_SIZE].fill(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_small_images() {
        let seeds = seed_images();
        assert_eq!(seeds.len(), 54);
        for (name, img) in &seeds {
            assert!(img.len() < 400 << 10, "{name} is {} bytes", img.len());
            let (h, _) = header::decode_slots(img).unwrap();
            // Without a base a sparse image needs no metadata: it stays clean.
            let dirty = name.ends_with("dirty")
                && (name.contains("compact") || !name.starts_with("nobase"));
            assert_eq!(h.is_clean(), !dirty, "{name}");
            assert_eq!(image(img), Reached::Reopened, "{name}");
        }
    }
}
