//! Encrypted images (feature ENCRYPTED) through the engine: what the file
//! holds, what reads return, keys and key slots. External oracles (QEMU,
//! cryptsetup) are in crates/fvd-cli/tests/encrypt.rs.

use std::sync::Arc;

use fvd_core::base::{Base, RawBase};
use fvd_core::crypt::{Secret, luks};
use fvd_core::executor::block_on;
use fvd_core::storage::{MemStorage, Storage};
use fvd_core::{CreateEncryption, CreateOptions, ErrorKind, Image, KeySlotChange, OpenOptions};

const MIB: u64 = 1 << 20;

fn pass(s: &str) -> Secret {
    Secret::new(s.as_bytes().to_vec())
}

fn opts(size: u64, compact: bool) -> CreateOptions {
    CreateOptions {
        size: Some(size),
        compact,
        chunk_size: Some(MIB as u32),
        grow_unit: Some(MIB),
        encryption: Some(CreateEncryption {
            secret: pass("correct horse"),
            iterations: 1000,
        }),
        ..Default::default()
    }
}

fn open(
    disk: &MemStorage,
    base: Option<Arc<dyn Base>>,
    key: Option<&str>,
) -> fvd_core::Result<Image> {
    block_on(Image::open_with_key(
        Arc::new(disk.clone()),
        base,
        OpenOptions::default(),
        key.map(pass).as_ref(),
    ))
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    block_on(img.read_slice(off, &mut b)).unwrap();
    b
}

/// A recognisable 16-byte-periodic plaintext.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let tag = *b"FVD-PLAINTEXT-##";
    (0..len)
        .map(|i| {
            if i % 16 < 14 {
                tag[i % 16]
            } else {
                seed.wrapping_add((i / 16) as u8)
            }
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn data_is_encrypted_and_reads_back() {
    for compact in [false, true] {
        let disk = MemStorage::new("img");
        block_on(fvd_core::image::create(
            &disk,
            &opts(8 * MIB, compact),
            None,
        ))
        .unwrap();
        let img = open(&disk, None, Some("correct horse")).unwrap();
        assert!(img.is_encrypted() && img.has_key());
        let a = pattern(64 << 10, 1);
        block_on(img.write_slice(MIB, &a, false)).unwrap();
        // Unaligned writes: inside one sector, across sector boundaries.
        let b = pattern(1000, 2);
        block_on(img.write_slice(3 * MIB + 300, &b, false)).unwrap();
        // (Long enough that random ciphertext never holds it by chance: a
        // 3-byte needle was found in ~3% of runs.)
        let small = b"xyz-inside-one-sector";
        block_on(img.write_slice(3 * MIB + 5, small, false)).unwrap();
        block_on(img.flush()).unwrap();
        assert_eq!(read(&img, MIB, a.len()), a);
        let got = read(&img, 3 * MIB, 1400);
        assert_eq!(&got[5..5 + small.len()], small);
        assert!(
            got[..5].iter().all(|&x| x == 0) && got[5 + small.len()..300].iter().all(|&x| x == 0)
        );
        assert_eq!(&got[300..1300], &b[..]);
        assert!(got[1300..].iter().all(|&x| x == 0));
        // Never-written space reads as zeros.
        assert!(read(&img, 5 * MIB, 8192).iter().all(|&x| x == 0));
        block_on(img.close()).unwrap();
        let file = disk.to_vec();
        assert!(
            !contains(&file, b"FVD-PLAINTEXT-"),
            "plaintext in the file (compact {compact})"
        );
        assert!(!contains(&file, small));
        let img = open(&disk, None, Some("correct horse")).unwrap();
        assert_eq!(read(&img, MIB, a.len()), a);
    }
}

#[test]
fn zeroing_and_discard_read_as_zeros() {
    for compact in [false, true] {
        let disk = MemStorage::new("img");
        block_on(fvd_core::image::create(
            &disk,
            &opts(8 * MIB, compact),
            None,
        ))
        .unwrap();
        let img = open(&disk, None, Some("correct horse")).unwrap();
        let a = pattern(2 * MIB as usize, 3);
        block_on(img.write_slice(0, &a, false)).unwrap();
        // Unaligned write_zeroes: partial sectors at both ends.
        block_on(img.write_zeroes(1000, 3000, false, false)).unwrap();
        // Unaligned discard.
        block_on(img.discard(100_001, 70_000)).unwrap();
        // A whole chunk freed (compact).
        block_on(img.discard(MIB, MIB)).unwrap();
        let mut want = a.clone();
        want[1000..4000].fill(0);
        want[100_001..170_001].fill(0);
        want[MIB as usize..].fill(0);
        assert_eq!(read(&img, 0, want.len()), want);
        block_on(img.close()).unwrap();
        let img = open(&disk, None, Some("correct horse")).unwrap();
        assert_eq!(read(&img, 0, want.len()), want);
    }
}

#[test]
fn copy_on_write_from_a_plain_base_encrypts_the_copy() {
    let base_bytes = pattern(4 * MIB as usize, 9);
    let base_disk = MemStorage::from_bytes("base", &base_bytes);
    let base: Arc<dyn Base> = Arc::new(RawBase::new(Arc::new(base_disk)).unwrap());
    for compact in [false, true] {
        let disk = MemStorage::new("img");
        let mut o = opts(4 * MIB, compact);
        o.base = Some(("base".into(), fvd_core::Format::Raw));
        o.block_size = Some(64 << 10);
        block_on(fvd_core::image::create(&disk, &o, Some(base.as_ref()))).unwrap();
        let img = open(&disk, Some(base.clone()), Some("correct horse")).unwrap();
        img.set_copy_on_read(true);
        // A partial-block write copies the rest of the block from the base.
        block_on(img.write_slice(70_000, b"guest", false)).unwrap();
        // A read copies base blocks into the image.
        let _ = read(&img, 2 * MIB, 128 << 10);
        let mut want = base_bytes.clone();
        want[70_000..70_005].copy_from_slice(b"guest");
        assert_eq!(read(&img, 0, want.len()), want);
        block_on(img.close()).unwrap();
        assert!(
            img.stats()
                .cor_bytes
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        );
        let file = disk.to_vec();
        assert!(
            !contains(&file, b"FVD-PLAINTEXT-"),
            "base data copied in clear"
        );
        let img = open(&disk, Some(base.clone()), Some("correct horse")).unwrap();
        assert_eq!(read(&img, 0, want.len()), want);
    }
}

#[test]
fn wrong_or_missing_key() {
    let disk = MemStorage::new("img");
    block_on(fvd_core::image::create(&disk, &opts(4 * MIB, false), None)).unwrap();
    let img = open(&disk, None, Some("correct horse")).unwrap();
    block_on(img.write_slice(0, &pattern(4096, 0), false)).unwrap();
    // Leave the journal dirty: a wrong key must fail before a replay writes.
    block_on(img.flush()).unwrap();
    std::mem::forget(img);
    let before = disk.to_vec();
    let e = open(&disk, None, Some("battery staple"))
        .err()
        .expect("wrong key opens");
    assert_eq!(e.kind(), ErrorKind::KeyRequired);
    assert!(!e.to_string().contains("battery"), "{e}");
    assert!(e.to_string().contains("invalid key"), "{e}");
    assert!(disk.to_vec() == before, "a wrong key changed the file");
    // Without a key: metadata work only.
    let img = block_on(Image::open_with_key(
        Arc::new(disk.clone()),
        None,
        OpenOptions { read_only: true },
        None,
    ))
    .unwrap();
    assert!(img.is_encrypted() && !img.has_key());
    assert!(!block_on(img.block_status(0, 4 * MIB)).unwrap().is_empty());
    let mut b = [0u8; 512];
    let e = block_on(img.read_slice(0, &mut b)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyRequired);
    assert!(disk.to_vec() == before);
}

#[test]
fn key_slots_add_change_remove() {
    let disk = MemStorage::new("img");
    block_on(fvd_core::image::create(&disk, &opts(4 * MIB, false), None)).unwrap();
    let img = open(&disk, None, Some("correct horse")).unwrap();
    block_on(img.write_slice(0, &pattern(4096, 5), false)).unwrap();
    let add = KeySlotChange::Add {
        secret: pass("second"),
        iterations: 1000,
        slot: None,
    };
    assert_eq!(block_on(img.change_key_slots(add)).unwrap(), 1);
    let change = KeySlotChange::Change {
        old: pass("correct horse"),
        new: pass("third"),
        iterations: 1000,
    };
    assert_eq!(block_on(img.change_key_slots(change)).unwrap(), 2);
    assert_eq!(img.luks_header().unwrap().active_slots(), vec![1, 2]);
    let e =
        block_on(img.change_key_slots(KeySlotChange::RemovePassphrase(pass("nope")))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyRequired);
    assert_eq!(
        block_on(img.change_key_slots(KeySlotChange::RemovePassphrase(pass("second")))).unwrap(),
        1
    );
    assert!(
        block_on(img.change_key_slots(KeySlotChange::RemoveSlot(2))).is_err(),
        "last slot"
    );
    block_on(img.close()).unwrap();
    drop(img);
    assert!(open(&disk, None, Some("correct horse")).is_err());
    assert!(open(&disk, None, Some("second")).is_err());
    let img = open(&disk, None, Some("third")).unwrap();
    assert_eq!(read(&img, 0, 4096), pattern(4096, 5));
}

#[test]
fn concurrent_partial_sector_writes_keep_every_writer_bytes() {
    let disk = MemStorage::new("img");
    block_on(fvd_core::image::create(&disk, &opts(4 * MIB, false), None)).unwrap();
    let img = Arc::new(open(&disk, None, Some("correct horse")).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    // 64 writers, each owning 8 bytes of the same 512-byte sector pair.
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..128u64 {
            let img = img.clone();
            tasks.push(tokio::spawn(async move {
                img.write_slice(MIB + w * 8, &[w as u8 + 1; 8], false)
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let got = read(&img, MIB, 1024);
    for w in 0..128usize {
        assert!(
            got[w * 8..w * 8 + 8].iter().all(|&x| x == w as u8 + 1),
            "writer {w} lost"
        );
    }
}

#[test]
fn the_key_slot_area_is_standard_luks1() {
    let disk = MemStorage::new("img");
    block_on(fvd_core::image::create(&disk, &opts(4 * MIB, false), None)).unwrap();
    let (h, _) = block_on(fvd_core::image::read_header(&disk)).unwrap();
    let r = h.region(fvd_core::format::header::Region::KeySlots);
    assert!(r.length >= luks::AREA_BYTES);
    let mut area = vec![0u8; luks::AREA_BYTES as usize];
    disk.read_sync(r.offset, &mut area);
    let hdr = luks::Header::decode(&area).unwrap();
    assert_eq!(hdr.active_slots(), vec![0]);
    assert!(luks::unlock(&area, b"correct horse", "img").is_ok());
    assert!(disk.len().unwrap() > 0);
}

#[test]
fn snapshots_of_an_encrypted_image_move_chunks_under_new_tweaks() {
    let disk = MemStorage::new("img");
    block_on(fvd_core::image::create(&disk, &opts(8 * MIB, true), None)).unwrap();
    let img = open(&disk, None, Some("correct horse")).unwrap();
    let old = pattern(2 * MIB as usize, 1);
    block_on(img.write_slice(0, &old, false)).unwrap();
    block_on(img.create_snapshot("before")).unwrap();
    // A 4 KiB write into each shared chunk: the rest of the chunk moves to
    // a new physical chunk, decrypted and encrypted again.
    let new = pattern(4096, 9);
    block_on(img.write_slice(MIB / 2, &new, false)).unwrap();
    block_on(img.write_slice(MIB + 8192, &new, false)).unwrap();
    block_on(img.close()).unwrap();
    let mut want = old.clone();
    want[(MIB / 2) as usize..(MIB / 2) as usize + 4096].copy_from_slice(&new);
    want[(MIB + 8192) as usize..(MIB + 8192) as usize + 4096].copy_from_slice(&new);
    let img = open(&disk, None, Some("correct horse")).unwrap();
    assert!(read(&img, 0, 2 * MIB as usize) == want, "live disk");
    assert!(
        !contains(&disk.to_vec(), &new[..16]),
        "plaintext in the file"
    );
    let view = block_on(Image::open_snapshot_with_key(
        Arc::new(disk.clone()),
        None,
        &fvd_core::image::snapshot::SnapshotSel::Name("before".into()),
        Some(&pass("correct horse")),
    ))
    .unwrap();
    assert!(read(&view, 0, 2 * MIB as usize) == old, "snapshot");
}
