//! `fvd mount` under a loop device and ext4: mkfs, files, sync, e2fsck,
//! with a buffered loop device and with `--direct-io=on`. Needs root,
//! /dev/fuse and loop devices; skipped (with a note) otherwise.

mod fuse_common;

use std::path::{Path, PathBuf};

use fuse_common::{
    Mount, assert_clean, fuse_usable, image_with_base, mountpoint, pattern, plain_image, run, s, sh,
};

/// An attached loop device and (maybe) a file system mounted from it;
/// both undone on drop so a failing test leaves nothing behind.
struct Loop {
    dev: String,
    fs_mount: Option<PathBuf>,
}

impl Loop {
    fn attach(file: &Path, direct: bool, read_only: bool) -> Loop {
        let mut args = vec!["-f", "--show"];
        if direct {
            args.push("--direct-io=on");
        }
        if read_only {
            args.push("-r");
        }
        args.push(s(file));
        let dev = sh("losetup", &args).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop {
            dev,
            fs_mount: None,
        }
    }

    /// Whether the kernel is doing direct I/O on the backing file.
    fn dio(&self) -> bool {
        let name = self.dev.trim_start_matches("/dev/");
        std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
    }

    fn mount(&mut self, at: &Path, opts: &str) {
        std::fs::create_dir_all(at).expect("mkdir");
        sh("mount", &["-o", opts, &self.dev, s(at)]);
        self.fs_mount = Some(at.to_path_buf());
    }

    fn umount(&mut self) {
        if let Some(p) = self.fs_mount.take() {
            sh("umount", &[s(&p)]);
        }
    }

    fn detach(mut self) {
        self.umount();
        sh("losetup", &["-d", &self.dev]);
        self.dev.clear();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(p) = self.fs_mount.take() {
            let _ = run("umount", &["-l", s(&p)]);
        }
        if !self.dev.is_empty() {
            let _ = run("losetup", &["-d", &self.dev]);
        }
    }
}

fn loop_usable() -> bool {
    if !fuse_usable(&["losetup", "mkfs.ext4", "e2fsck"]) {
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        fvd_testkit::skip("/dev/loop-control is missing (no loop devices)");
        return false;
    }
    true
}

/// Files written to the file system: (name, content).
fn files() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = (0..150)
        .map(|i| (format!("f{i:03}"), pattern(1000 + i * 517, i as u64 + 100)))
        .collect();
    v.push(("big".to_string(), pattern(9 << 20, 99)));
    v
}

fn e2fsck_clean(dev: &str) {
    let (st, out, err) = run("e2fsck", &["-fn", dev]);
    assert!(
        st.success(),
        "e2fsck -fn {dev}: {st}\nstdout:\n{out}\nstderr:\n{err}"
    );
}

/// mkfs, write files, sync, umount, e2fsck; then a second export of the
/// same image shows the same files.
fn ext4_over_export(img: &Path, dir: &Path, direct: bool) {
    let mp = mountpoint(dir);
    let fsdir = dir.join("fs");
    let m = Mount::start(img, &mp, &[]);
    let mut lo = Loop::attach(&mp, direct, false);
    if direct {
        assert!(
            lo.dio(),
            "{}: the loop device is not using direct I/O",
            lo.dev
        );
    }
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            &lo.dev,
        ],
    );
    lo.mount(&fsdir, "rw");
    for (name, data) in files() {
        std::fs::write(fsdir.join(&name), &data).expect("write file");
    }
    sh("sync", &[]);
    lo.umount();
    e2fsck_clean(&lo.dev);
    lo.detach();
    m.unmount();
    assert_clean(img);

    // A fresh export, read-only this time: the files are all there.
    let m = Mount::start(img, &mp, &["--read-only"]);
    let mut lo = Loop::attach(&mp, direct, true);
    e2fsck_clean(&lo.dev);
    lo.mount(&fsdir, "ro");
    for (name, data) in files() {
        let got = std::fs::read(fsdir.join(&name)).expect("read file");
        assert!(got == data, "{name}: content differs after remount");
    }
    lo.detach();
    m.unmount();
    assert_clean(img);
}

#[test]
fn fuse_loop_ext4_buffered() {
    if !loop_usable() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = plain_image(tmp.path(), "128M");
    ext4_over_export(&img, tmp.path(), false);
}

#[test]
fn fuse_loop_ext4_direct_io_over_a_base() {
    if !loop_usable() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_base, img, _) = image_with_base(tmp.path(), 96 << 20, "64K");
    ext4_over_export(&img, tmp.path(), true);
}
