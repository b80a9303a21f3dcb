//! `check`: leaks after a crash, a dirty journal, repairs, and corruption.

use std::path::Path;

use fvd_core::check::{Repair, check_path};
use fvd_core::executor::block_on;
use fvd_core::{BaseSpec, CreateOptions, Format, PathOptions, create_path, open_path};

fn setup(dir: &Path) -> std::path::PathBuf {
    let base: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(dir.join("base.raw"), base).unwrap();
    let img = dir.join("img.fvd");
    let spec = BaseSpec {
        name: "base.raw".into(),
        format: Format::Raw,
    };
    block_on(create_path(
        &img,
        Some(&spec),
        CreateOptions::default(),
        Some(false),
    ))
    .unwrap();
    img
}

#[test]
fn fresh_image_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path());
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(r.clean);
    assert_eq!(r.local_blocks, (0, 1024));
}

#[test]
fn crash_before_flush_leaks_and_repair_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path());
    {
        let i = block_on(open_path(&img, Format::Fvd, PathOptions::default())).unwrap();
        block_on(i.write_slice(8192, &[7u8; 4096], false)).unwrap();
        // Dropped without flush or close: the data reached the file, the
        // bitmap record did not.
    }
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert_eq!(r.leaked_bytes, 4096);
    let r = block_on(check_path(&img, Format::Fvd, Some(Repair::Leaks))).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(r.repaired.iter().any(|m| m.contains("freed 4096")), "{r:?}");
    // The unflushed write is gone and the base shows through.
    let i = block_on(open_path(
        &img,
        Format::Fvd,
        PathOptions {
            read_only: true,
            ..Default::default()
        },
    ))
    .unwrap();
    let mut b = vec![0u8; 4096];
    block_on(i.read_slice(8192, &mut b)).unwrap();
    assert_eq!(b[0], (8192u32 % 253) as u8 | 1);
}

#[test]
fn dirty_journal_is_reported_and_replayed_by_repair_all() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path());
    {
        let i = block_on(open_path(&img, Format::Fvd, PathOptions::default())).unwrap();
        block_on(i.write_slice(0, &[9u8; 4096], false)).unwrap();
        block_on(i.flush()).unwrap();
    }
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert!(!r.clean);
    assert_eq!((r.journal_blocks, r.journal_records), (1, 1));
    assert_eq!(r.local_blocks.0, 1);
    let r = block_on(check_path(&img, Format::Fvd, Some(Repair::All))).unwrap();
    assert!(r.clean, "{r:?}");
    assert_eq!(r.journal_blocks, 0);
    assert_eq!(r.local_blocks.0, 1);
}

#[test]
fn stray_bitmap_bits_are_corruption_and_repairable() {
    let dir = tempfile::tempdir().unwrap();
    // A base of 4 KiB + 1 KiB: 2 blocks, so byte 0 of the bitmap has 6 stray bits.
    std::fs::write(dir.path().join("base.raw"), vec![1u8; 5120]).unwrap();
    let img = dir.path().join("img.fvd");
    let spec = BaseSpec {
        name: "base.raw".into(),
        format: Format::Raw,
    };
    block_on(create_path(
        &img,
        Some(&spec),
        CreateOptions::default(),
        Some(false),
    ))
    .unwrap();
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0b1000_0000], 8192).unwrap();
    drop(f);
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
    let r = block_on(check_path(&img, Format::Fvd, Some(Repair::All))).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(std::fs::read(&img).unwrap()[8192], 0);
}

#[test]
fn truncated_and_missing_base_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let img = setup(dir.path());
    std::fs::remove_file(dir.path().join("base.raw")).unwrap();
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(r.exit_code(), 1, "{r:?}");
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(1 << 20).unwrap();
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert!(
        r.corruptions.iter().any(|c| c.contains("truncated")),
        "{r:?}"
    );
}
