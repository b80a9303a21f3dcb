//! `fvd mount`: the exported file read and written with dd, qemu-io and
//! fallocate, compared with qemu-img, and the image checked after unmount.
//! Needs root and /dev/fuse; skipped (with a note) otherwise.

mod fuse_common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fuse_common::{
    Mount, assert_clean, disk_bytes, fuse_usable, fvd, image_with_base, mountpoint, pattern,
    plain_image, run, s, sh,
};

const MIB: usize = 1 << 20;

/// Write `data` at `offset` of the model and into a source file for dd.
fn dd_write(mp: &Path, dir: &Path, model: &mut [u8], offset: usize, data: &[u8], oflag: &str) {
    let src = dir.join("dd.src");
    std::fs::write(&src, data).expect("write dd source");
    assert_eq!(offset % 4096, 0);
    assert_eq!(data.len() % 4096, 0);
    let mut args = vec![
        format!("if={}", s(&src)),
        format!("of={}", s(mp)),
        "bs=4096".to_string(),
        format!("seek={}", offset / 4096),
        "conv=notrunc,fsync".to_string(),
        "status=none".to_string(),
    ];
    if !oflag.is_empty() {
        args.push(format!("oflag={oflag}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sh("dd", &args);
    model[offset..offset + data.len()].copy_from_slice(data);
}

/// The mounted file equals `model`, read directly and by qemu-img compare.
fn assert_content(mp: &Path, dir: &Path, model: &[u8]) {
    let got = std::fs::read(mp).expect("read mounted file");
    assert_eq!(got.len(), model.len(), "size of the mounted file");
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("mounted file differs from the model at byte {i}");
    }
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, model).expect("write expected");
    sh(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(mp), s(&expected)],
    );
}

#[test]
fn fuse_dd_qemu_io_fallocate_then_clean_image() {
    if !fuse_usable(&["qemu-img", "qemu-io", "fallocate", "dd"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let size = 16 * MIB;
    let (_base, img, mut model) = image_with_base(dir, size, "64K");
    let mp = mountpoint(dir);
    let m = Mount::start(&img, &mp, &[]);

    let meta = std::fs::metadata(&mp).expect("stat");
    assert!(meta.is_file());
    assert_eq!(meta.len(), size as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    // Nothing written yet: the base shows through.
    assert_content(&mp, dir, &model);

    // Buffered dd, partial 64 KiB blocks at both ends.
    dd_write(&mp, dir, &mut model, 3 * MIB + 4096, &pattern(MIB, 11), "");
    // O_DIRECT dd.
    dd_write(
        &mp,
        dir,
        &mut model,
        8_192_000,
        &pattern(300 * 1024, 12),
        "direct",
    );
    // qemu-io, buffered and O_DIRECT (-n), one of them unaligned.
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 1M", s(&mp)],
    );
    model[..MIB].fill(0x5a);
    sh(
        "qemu-io",
        &["-f", "raw", "-n", "-c", "write -P 0xa5 10M 68k", s(&mp)],
    );
    model[10 * MIB..10 * MIB + 68 * 1024].fill(0xa5);
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 12345 7000", s(&mp)],
    );
    model[12345..12345 + 7000].fill(0x3c);
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x5a 4096 1000", s(&mp)],
    );
    assert_content(&mp, dir, &model);

    // Punch a hole (PUNCH_HOLE|KEEP_SIZE -> discard), over base data and
    // over written data, unaligned.
    sh(
        "fallocate",
        &["-p", "-o", "2000000", "-l", "1500000", s(&mp)],
    );
    model[2_000_000..3_500_000].fill(0);
    // Zero a range (ZERO_RANGE -> write_zeroes); inside the file it needs no
    // KEEP_SIZE.
    sh("fallocate", &["-z", "-o", "6M", "-l", "100K", s(&mp)]);
    model[6 * MIB..6 * MIB + 100 * 1024].fill(0);
    sh("fallocate", &["-z", "-n", "-o", "7M", "-l", "64K", s(&mp)]);
    model[7 * MIB..7 * MIB + 64 * 1024].fill(0);
    assert_content(&mp, dir, &model);
    // fsync of the file (fdatasync and fsync).
    sh("sync", &["-d", s(&mp)]);
    sh("sync", &[s(&mp)]);

    m.unmount();
    assert_clean(&img);
    assert_eq!(disk_bytes(&img, dir), model, "image content after unmount");
}

#[test]
fn fuse_size_is_fixed_and_writes_stop_at_the_end() {
    if !fuse_usable(&["fallocate", "truncate", "dd"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let img = plain_image(dir, "8M");
    let mp = mountpoint(dir);
    let m = Mount::start(&img, &mp, &["--threads", "2"]);

    // Same size: allowed; any other size: refused.
    sh("truncate", &["-s", "8M", s(&mp)]);
    for size in ["4M", "9M", "0"] {
        let (st, _, _) = run("truncate", &["-s", size, s(&mp)]);
        assert!(!st.success(), "truncate -s {size} must fail");
    }
    // fallocate growing the file is refused; with KEEP_SIZE it is clipped.
    let (st, _, err) = run("fallocate", &["-l", "16M", s(&mp)]);
    assert!(!st.success(), "fallocate -l 16M must fail");
    assert!(err.contains("not supported"), "{err}");
    let (st, _, _) = run("fallocate", &["-z", "-o", "7M", "-l", "2M", s(&mp)]);
    assert!(!st.success(), "zeroing past the end without -n must fail");
    sh("fallocate", &["-n", "-o", "7M", "-l", "2M", s(&mp)]);
    sh("fallocate", &["-p", "-o", "7M", "-l", "2M", s(&mp)]);
    // Collapse/insert would change the size.
    let (st, _, _) = run("fallocate", &["-c", "-o", "0", "-l", "64K", s(&mp)]);
    assert!(!st.success(), "collapse range must fail");
    // Writing at the end fails like on a block device.
    let (st, _, _) = run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", s(&mp)),
            "bs=4096",
            "seek=2048",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    assert!(!st.success(), "a write past the end must fail");
    assert_eq!(std::fs::metadata(&mp).expect("stat").len(), 8 * MIB as u64);
    // statfs works.
    sh("stat", &["-f", s(&mp)]);

    m.unmount();
    assert_clean(&img);
}

#[test]
fn fuse_read_only_export() {
    if !fuse_usable(&["qemu-io", "dd"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, model) = image_with_base(dir, 4 * MIB, "4K");
    let mp = mountpoint(dir);
    let m = Mount::start(&img, &mp, &["--read-only"]);
    let meta = std::fs::metadata(&mp).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(std::fs::read(&mp).expect("read"), model);
    let (st, _, _) = run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", s(&mp)),
            "bs=4096",
            "count=1",
            "conv=notrunc",
            "status=none",
        ],
    );
    assert!(!st.success(), "a write to a read-only export must fail");
    let (st, _, _) = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", s(&mp)]);
    assert!(
        !st.success(),
        "qemu-io write to a read-only export must fail"
    );
    m.unmount();
    assert_clean(&img);
    fvd(&["check", s(&img)]);
}

#[test]
fn fuse_raw_image_with_cache_none() {
    if !fuse_usable(&["qemu-io", "qemu-img"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let raw = dir.join("disk.raw");
    let mut model = pattern(4 * MIB, 3);
    std::fs::write(&raw, &model).expect("write raw");
    let mp = mountpoint(dir);
    let m = Mount::start(&raw, &mp, &["-f", "raw", "--cache=none"]);
    // Unaligned writes reach an O_DIRECT image file through the engine.
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 1000 3000", s(&mp)],
    );
    model[1000..4000].fill(0x11);
    sh(
        "qemu-io",
        &["-f", "raw", "-n", "-c", "write -P 0x22 1M 512k", s(&mp)],
    );
    model[MIB..MIB + 512 * 1024].fill(0x22);
    sh("fallocate", &["-p", "-o", "3M", "-l", "100000", s(&mp)]);
    model[3 * MIB..3 * MIB + 100_000].fill(0);
    assert_content(&mp, dir, &model);
    m.unmount();
    assert_eq!(std::fs::read(&raw).expect("read raw"), model);
}
