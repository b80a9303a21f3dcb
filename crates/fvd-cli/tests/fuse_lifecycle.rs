//! `fvd mount` start and end: SIGTERM/SIGINT unmount and leave the image
//! clean, `fusermount3 -u` works, a busy mount is detached and served until
//! its last user closes it, the pid file, and refused mount points.
//! Needs root and /dev/fuse; skipped (with a note) otherwise.

mod fuse_common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use fuse_common::{
    Mount, TIMEOUT, assert_clean, disk_bytes, fuse_usable, image_with_base, is_mounted, mountpoint,
    run, s, sh,
};

#[test]
fn fuse_sigterm_and_sigint_unmount_and_leave_the_image_clean() {
    if !fuse_usable(&["qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, mut model) = image_with_base(dir, 8 << 20, "64K");
    let mp = mountpoint(dir);
    for (i, sig) in [libc::SIGTERM, libc::SIGINT].into_iter().enumerate() {
        let m = Mount::start(&img, &mp, &[]);
        let off = 100_000 + i * 1_000_000;
        let p = 0x40 + i as u8;
        sh(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {p} {off} 300000"),
                s(&mp),
            ],
        );
        model[off..off + 300_000].fill(p);
        let mut m = m;
        m.signal(sig);
        let (status, err) = m.wait();
        assert!(status.success(), "signal {sig}: {status}\nstderr:\n{err}");
        assert!(!is_mounted(&mp), "still mounted after signal {sig}");
        assert_clean(&img);
    }
    assert_eq!(disk_bytes(&img, dir), model);
}

#[test]
fn fuse_fusermount3_u_unmounts() {
    if !fuse_usable(&["fusermount3", "qemu-io"]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, _) = image_with_base(dir, 4 << 20, "4K");
    let mp = mountpoint(dir);
    let mut m = Mount::start(&img, &mp, &["--threads", "1"]);
    sh(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 0 64k", s(&mp)],
    );
    sh("fusermount3", &["-u", s(&mp)]);
    let (status, err) = m.wait();
    assert!(status.success(), "{status}\nstderr:\n{err}");
    assert_clean(&img);
    assert!(disk_bytes(&img, dir)[..65536].iter().all(|&b| b == 0x77));
}

#[test]
fn fuse_busy_mount_is_served_until_its_last_user_closes_it() {
    if !fuse_usable(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, _) = image_with_base(dir, 4 << 20, "64K");
    let mp = mountpoint(dir);
    let mut m = Mount::start(&img, &mp, &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mp)
        .expect("open the mounted file");
    m.signal(libc::SIGTERM);
    let start = Instant::now();
    while is_mounted(&mp) {
        assert!(start.elapsed() < TIMEOUT, "a busy mount is detached");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still served through the open descriptor.
    f.write_all_at(&[0x99; 8192], 12288)
        .expect("write after detach");
    f.sync_all().expect("fsync after detach");
    let mut back = [0u8; 8192];
    f.read_exact_at(&mut back, 12288)
        .expect("read after detach");
    assert_eq!(back, [0x99; 8192]);
    drop(f);
    let (status, err) = m.wait();
    assert!(status.success(), "{status}\nstderr:\n{err}");
    assert!(err.contains("in use"), "stderr:\n{err}");
    assert_clean(&img);
    assert!(
        disk_bytes(&img, dir)[12288..20480]
            .iter()
            .all(|&b| b == 0x99)
    );
}

#[test]
fn fuse_second_signal_stops_a_busy_export() {
    if !fuse_usable(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, _) = image_with_base(dir, 4 << 20, "64K");
    let mp = mountpoint(dir);
    let mut m = Mount::start(&img, &mp, &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mp)
        .expect("open the mounted file");
    f.write_all_at(&[0x5e; 4096], 0).expect("write");
    m.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    m.signal(libc::SIGTERM);
    let (status, err) = m.wait();
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
    // The connection is gone with the process.
    assert!(f.write_all_at(&[1; 512], 0).is_err());
    drop(f);
    assert_clean(&img);
    assert!(disk_bytes(&img, dir)[..4096].iter().all(|&b| b == 0x5e));
}

#[test]
fn fuse_pidfile_is_written_and_removed() {
    if !fuse_usable(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, _) = image_with_base(dir, 1 << 20, "4K");
    let mp = mountpoint(dir);
    let pidfile = dir.join("fvd.pid");
    let pf = format!("--pidfile={}", s(&pidfile));
    let m = Mount::start(&img, &mp, &[&pf]);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(pid, m.pid());
    m.unmount();
    assert!(!pidfile.exists(), "pid file left behind");
    assert_clean(&img);
}

#[test]
fn fuse_refuses_bad_mount_points() {
    if !fuse_usable(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (_base, img, _) = image_with_base(dir, 1 << 20, "4K");
    let fvd = env!("CARGO_BIN_EXE_fvd");
    let (st, _, err) = run(fvd, &["mount", s(&img), s(dir)]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    let missing = dir.join("missing");
    let (st, _, err) = run(fvd, &["mount", s(&img), s(&missing)]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.starts_with("fvd: ") && err.contains("missing"), "{err}");
    let mp = mountpoint(dir);
    let (st, _, err) = run(fvd, &["mount", s(&dir.join("nope.fvd")), s(&mp)]);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(!is_mounted(&mp));
    assert_clean(&img);
}
