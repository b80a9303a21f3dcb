//! Data integrity of `fvd mount` under concurrency: fio random writes with
//! crc32c verification, O_DIRECT at queue depths 16 and 32 (where
//! qemu-storage-daemon's FUSE export was found to corrupt data) and
//! buffered with four writers, over FVD images with a base. After the
//! export is closed, a second export re-verifies everything (`verify_only`).
//! Needs root, /dev/fuse and fio; skipped (with a note) otherwise.

mod fuse_common;

use std::path::Path;

use fuse_common::{Mount, assert_clean, fuse_usable, image_with_base, mountpoint, run, s};

/// Run fio; panic unless it exits 0 without verify errors.
fn fio(mp: &Path, job: &[&str], verify_only: bool) {
    let name = format!("--filename={}", s(mp));
    let mut args = vec!["--name=v", name.as_str()];
    args.extend_from_slice(job);
    args.extend_from_slice(&[
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--group_reporting",
    ]);
    if verify_only {
        args.push("--verify_only");
    }
    let (st, out, err) = run("fio", &args);
    let bad =
        out.contains("verify: bad") || err.contains("verify: bad") || err.contains("bad magic");
    assert!(
        st.success() && !bad,
        "fio {args:?}: {st}\nstdout:\n{out}\nstderr:\n{err}"
    );
}

/// Mount, run `job` with verification, unmount, check the image; then
/// mount again and verify the data once more.
fn verify_job(block_size: &str, job: &[&str]) {
    if !fuse_usable(&["fio"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, _) = image_with_base(dir, 64 << 20, block_size);
    let mp = mountpoint(dir);

    let m = Mount::start(&img, &mp, &[]);
    fio(&mp, job, false);
    m.unmount();
    assert_clean(&img);

    // fio opens the file read-write even to verify only.
    let m = Mount::start(&img, &mp, &[]);
    fio(&mp, job, true);
    m.unmount();
    assert_clean(&img);
}

#[test]
fn fuse_fio_direct_randwrite_qd16_verify() {
    verify_job(
        "64K",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--ioengine=libaio",
            "--direct=1",
            "--size=64M",
        ],
    );
}

#[test]
fn fuse_fio_direct_randwrite_qd32_verify() {
    verify_job(
        "4K",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--ioengine=libaio",
            "--direct=1",
            "--size=64M",
        ],
    );
}

#[test]
fn fuse_fio_direct_mixed_sizes_qd32_verify() {
    // Writes of 512 bytes to 256 KiB over 16 KiB blocks: many requests
    // share copy-on-write blocks with their neighbours.
    verify_job(
        "16K",
        &[
            "--rw=randwrite",
            "--bsrange=512-256k",
            "--iodepth=32",
            "--ioengine=libaio",
            "--direct=1",
            "--size=64M",
        ],
    );
}

#[test]
fn fuse_fio_buffered_four_writers_verify() {
    // Four jobs, each on its own 16 MiB quarter of the disk.
    verify_job(
        "64K",
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--ioengine=psync",
            "--direct=0",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
        ],
    );
}
