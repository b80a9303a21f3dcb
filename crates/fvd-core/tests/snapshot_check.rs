//! `check` of images with internal snapshots: refcounts recomputed from
//! every table (too high: a leak `-r leaks` repairs; too low: corruption),
//! leaked chunks punched, and a chunk only a snapshot uses never punched.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use fvd_core::check::{Repair, check_path};
use fvd_core::executor::block_on;
use fvd_core::format::header::Region;
use fvd_core::image::snapshot::SnapshotSel;
use fvd_core::{CreateOptions, Format, Image, PathOptions, create_path, open_path};

fn open(p: &Path) -> Image {
    block_on(open_path(p, Format::Fvd, PathOptions::default())).unwrap()
}

fn poke(p: &Path, off: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(bytes).unwrap();
}

fn peek(p: &Path, off: u64, n: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut v = vec![0u8; n];
    f.read_exact(&mut v).unwrap();
    v
}

fn snapshot_bytes(p: &Path, name: &str, len: usize) -> Vec<u8> {
    let img = block_on(fvd_core::Opener::local().open_snapshot(
        p,
        PathOptions::default(),
        &SnapshotSel::Name(name.into()),
    ))
    .unwrap();
    let mut v = vec![0u8; len];
    block_on(img.read_slice(0, &mut v)).unwrap();
    v
}

#[test]
fn refcounts_and_leaks_are_checked_and_repaired_without_touching_snapshot_data() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("img.fvd");
    let opts = CreateOptions {
        size: Some(8 << 20),
        compact: true,
        chunk_size: Some(64 << 10),
        ..Default::default()
    };
    block_on(create_path(&p, None, opts, None)).unwrap();
    let img = open(&p);
    block_on(img.write_slice(0, &vec![0xaa; 1 << 20], false)).unwrap();
    block_on(img.create_snapshot("keep")).unwrap();
    // Chunks 0..3 get new chunks; the old ones only "keep" holds now.
    block_on(img.write_slice(0, &vec![0xbb; 256 << 10], false)).unwrap();
    let s = block_on(img.create_snapshot("gone")).unwrap();
    // A copy past the snapshot's table copy: the latter is below the
    // highest chunk in use once the snapshot is gone.
    block_on(img.write_slice(512 << 10, &[0xcc; 4096], false)).unwrap();
    block_on(img.delete_snapshot(&SnapshotSel::Name("gone".into()))).unwrap();
    block_on(img.close()).unwrap();
    drop(img);
    let (h, _) = block_on(fvd_core::image::read_header(
        &fvd_core::storage::MemStorage::from_bytes("h", &peek(&p, 0, 8192)),
    ))
    .unwrap();
    let data = h.region(Region::Data).offset;
    let refcounts = h.region(Region::Refcounts).offset;
    assert_eq!(
        block_on(check_path(&p, Format::Fvd, None))
            .unwrap()
            .exit_code(),
        0
    );

    // A leak: data in the chunk the deleted snapshot's table copy used.
    poke(&p, data + s.table_chunk * (64 << 10), &[0x5a; 8192]);
    // A refcount too high: physical chunk 0 ("keep" only) counted 3 times.
    assert_eq!(peek(&p, refcounts, 2), [1, 0]);
    poke(&p, refcounts, &[3, 0]);
    let r = block_on(check_path(&p, Format::Fvd, None)).unwrap();
    assert!(r.corruptions.is_empty(), "{r:?}");
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert_eq!(r.refcounts_too_high, 1);
    assert!(r.leaked_bytes >= 8192);

    let r = block_on(check_path(&p, Format::Fvd, Some(Repair::Leaks))).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("refcount")), "{r:?}");
    assert!(r.repaired.iter().any(|x| x.contains("freed")), "{r:?}");
    assert_eq!(peek(&p, refcounts, 2), [1, 0]);
    // Nothing a snapshot uses was punched.
    let keep = snapshot_bytes(&p, "keep", 1 << 20);
    assert!(keep.iter().all(|&b| b == 0xaa));

    // A refcount too low is corruption, and -r leaks then touches nothing.
    poke(&p, refcounts, &[0, 0]);
    let r = block_on(check_path(&p, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
    assert!(r.corruptions[0].contains("refcount"), "{r:?}");
    let r = block_on(check_path(&p, Format::Fvd, Some(Repair::Leaks))).unwrap();
    assert_eq!(r.exit_code(), 2);
    let keep = snapshot_bytes(&p, "keep", 1 << 20);
    assert!(keep.iter().all(|&b| b == 0xaa));
    // Deleting the snapshot on such an image is refused, not half done.
    let img = open(&p);
    let e = block_on(img.delete_snapshot(&SnapshotSel::Name("keep".into()))).unwrap_err();
    assert!(e.to_string().contains("refcount"), "{e}");
    assert_eq!(img.snapshots().len(), 1);
}

#[test]
fn a_damaged_directory_is_reported_and_refused_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("img.fvd");
    let opts = CreateOptions {
        size: Some(4 << 20),
        compact: true,
        ..Default::default()
    };
    block_on(create_path(&p, None, opts, None)).unwrap();
    let img = open(&p);
    block_on(img.write_slice(0, &[1u8; 4096], false)).unwrap();
    block_on(img.create_snapshot("a")).unwrap();
    block_on(img.close()).unwrap();
    drop(img);
    let (h, _) = block_on(fvd_core::image::read_header(
        &fvd_core::storage::MemStorage::from_bytes("h", &peek(&p, 0, 8192)),
    ))
    .unwrap();
    let dir = h.region(Region::Snapshots);
    // Both copies unreadable.
    poke(&p, dir.offset, &[0xee; 64]);
    poke(&p, dir.offset + dir.length / 2, &[0xee; 64]);
    let e = block_on(open_path(&p, Format::Fvd, PathOptions::default()))
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(
        msg.contains("snapshot directory") && !msg.contains('\n'),
        "{msg}"
    );
    let r = block_on(check_path(&p, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
}

#[test]
fn sparse_images_get_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("img.fvd");
    let opts = CreateOptions {
        size: Some(4 << 20),
        ..Default::default()
    };
    block_on(create_path(&p, None, opts, None)).unwrap();
    let img = open(&p);
    let e = block_on(img.create_snapshot("x")).unwrap_err();
    assert!(e.to_string().contains("fvd convert -o compact=on"), "{e}");
    assert!(img.snapshots().is_empty());
    for bad in ["", &"n".repeat(2000)] {
        let c = open_compact(t.path());
        assert!(block_on(c.create_snapshot(bad)).is_err());
    }
}

fn open_compact(dir: &Path) -> Image {
    let p = dir.join("c.fvd");
    if !p.exists() {
        let opts = CreateOptions {
            size: Some(4 << 20),
            compact: true,
            ..Default::default()
        };
        block_on(create_path(&p, None, opts, None)).unwrap();
    }
    open(&p)
}
