//! Which header slot is in force (issue [commit], bug 4): a damaged newest
//! slot must never silently roll back flushed writes, and a newest slot
//! that needs a feature this build lacks refuses the image.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fvd_core::check::{Repair, check_path};
use fvd_core::executor::block_on;
use fvd_core::format::header::{HEADER_SLOT_SIZE, Header};
use fvd_core::{BaseSpec, CreateOptions, ErrorKind, Format, PathOptions, create_path, open_path};

const KIB: u64 = 1024;

fn setup(dir: &Path, journal_size: u64) -> PathBuf {
    let base: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(dir.join("base.raw"), base).unwrap();
    let img = dir.join("img.fvd");
    let spec = BaseSpec {
        name: "base.raw".into(),
        format: Format::Raw,
    };
    let opts = CreateOptions {
        journal_size: Some(journal_size),
        ..CreateOptions::default()
    };
    block_on(create_path(&img, Some(&spec), opts, Some(false))).unwrap();
    img
}

/// Write `byte` over 4 KiB base blocks at `offsets`, each followed by a
/// flush, then drop the image without closing it (as kill -9 would).
fn write_flushed_and_crash(img: &Path, writes: &[(u64, u8)]) {
    let i = block_on(open_path(img, Format::Fvd, PathOptions::default())).unwrap();
    for &(off, byte) in writes {
        block_on(i.write_slice(off, &[byte; 4096], false)).unwrap();
        block_on(i.flush()).unwrap();
    }
}

fn slot(img: &Path, n: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; HEADER_SLOT_SIZE];
    f.read_exact_at(&mut b, (n * HEADER_SLOT_SIZE) as u64)
        .unwrap();
    b
}

fn put_slot(img: &Path, n: usize, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, (n * HEADER_SLOT_SIZE) as u64)
        .unwrap();
}

/// The slot holding the newest valid header.
fn newest(img: &Path) -> usize {
    let g = |n| Header::decode(&slot(img, n)).map(|h| h.generation).ok();
    match (g(0), g(1)) {
        (Some(a), Some(b)) if b > a => 1,
        (None, Some(_)) => 1,
        _ => 0,
    }
}

/// Flip one byte in the reserved area of slot `n` (the CRC then fails).
fn damage(img: &Path, n: usize) {
    let mut b = slot(img, n);
    b[3000] ^= 0x40;
    put_slot(img, n, &b);
}

/// True if the 4 KiB at `off` all hold `byte`.
fn holds(img: &Path, off: u64, byte: u8) -> bool {
    read_at(img, off).unwrap().iter().all(|&b| b == byte)
}

fn read_at(img: &Path, off: u64) -> fvd_core::Result<Vec<u8>> {
    let i = block_on(open_path(
        img,
        Format::Fvd,
        PathOptions {
            read_only: true,
            ..Default::default()
        },
    ))?;
    let mut v = vec![0u8; 4096];
    block_on(i.read_slice(off, &mut v))?;
    Ok(v)
}

/// The newest slot cleared the clean flag; damaged, the older (clean) slot
/// was used and the journal ignored: flushed writes read base data. Now
/// the journal's blocks of the older slot's epoch show that the damaged one
/// was newer, and they are replayed; check reports it and -r all rewrites
/// the header.
#[test]
fn damaged_newest_slot_that_cleared_clean_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path(), 64 * KIB);
    write_flushed_and_crash(&img, &[(64 * KIB, 0xa1), (128 * KIB, 0xa2)]);
    let n = newest(&img);
    damage(&img, n);
    assert!(
        holds(&img, 64 * KIB, 0xa1),
        "a flushed write was rolled back"
    );
    assert!(
        holds(&img, 128 * KIB, 0xa2),
        "a flushed write was rolled back"
    );
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
    assert!(r.corruptions.iter().any(|c| c.contains("damaged")), "{r:?}");
    let r = block_on(check_path(&img, Format::Fvd, Some(Repair::All))).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(r.clean, "{r:?}");
    assert!(holds(&img, 64 * KIB, 0xa1));
    assert!(Header::decode(&slot(&img, n)).is_ok(), "slot {n} rewritten");
}

/// The newest slot was a checkpoint that started a new journal epoch (a
/// one-block journal fills at every round), and blocks of that epoch were
/// written after it. Damaged, the older slot's epoch has no blocks left:
/// replaying it would lose the last flushed write. The open refuses with a
/// message naming the way out; `check -r all` rebuilds the header from the
/// older slot and the journal, and the write is back.
#[test]
fn damaged_newest_checkpoint_slot_refuses_and_check_rebuilds_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path(), 4 * KIB);
    write_flushed_and_crash(
        &img,
        &[(64 * KIB, 0xb1), (128 * KIB, 0xb2), (192 * KIB, 0xb3)],
    );
    damage(&img, newest(&img));
    let e = read_at(&img, 192 * KIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("damaged") && msg.contains("check -r all"),
        "{msg}"
    );
    let rw = block_on(open_path(&img, Format::Fvd, PathOptions::default()));
    assert!(rw.is_err(), "a read-write open must refuse too");
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
    let r = block_on(check_path(&img, Format::Fvd, Some(Repair::All))).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(r.repaired.iter().any(|m| m.contains("rebuilt")), "{r:?}");
    for (off, byte) in [(64 * KIB, 0xb1), (128 * KIB, 0xb2), (192 * KIB, 0xb3)] {
        assert!(holds(&img, off, byte), "a flushed write at {off} was lost");
    }
}

/// A header update torn by a crash (nothing newer in the journal) is not
/// damage: the older slot is in force, as before.
#[test]
fn torn_header_update_keeps_the_older_slot() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path(), 64 * KIB);
    // A clean image: slot 0 in force, slot 1 empty. A torn write there.
    put_slot(&img, 1, &[0x5a; 1024]);
    assert_eq!(read_at(&img, 0).unwrap().len(), 4096);
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(!r.notes.is_empty(), "{r:?}");
}

/// One rule: the newest slot needs a feature this build lacks (as a newer
/// fvd would write it) — the image is refused, never read through the
/// older slot.
#[test]
fn newest_slot_with_an_unknown_incompatible_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path(), 64 * KIB);
    let mut h = Header::decode(&slot(&img, 0)).unwrap();
    h.generation += 1;
    h.incompatible |= 1 << 40;
    put_slot(&img, 1, &h.encode());
    for ro in [true, false] {
        let e = block_on(open_path(
            &img,
            Format::Fvd,
            PathOptions {
                read_only: ro,
                ..Default::default()
            },
        ))
        .err()
        .expect("an image needing a newer fvd was opened");
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("newer fvd"), "{e}");
    }
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 1, "{r:?}");
}
