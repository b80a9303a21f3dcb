//! ENOSPC through `fvd serve` (issue [commit], bug 3): a file system that
//! runs full, then gets space back. The export must work again, writes and
//! flushes included, and SIGTERM must exit 0 leaving the image clean — also
//! for an image made before journals were written at create (its journal
//! region a hole). Runs on a 64 MiB tmpfs; needs root (mount) and qemu-io.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod nbd_support;

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use fvd_core::Format;
use fvd_core::check::check_path;
use fvd_core::executor::block_on;
use fvd_core::format::header::{Header, Region};
use nbd_support::*;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    _holder: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let holder = tempfile::tempdir().unwrap();
        let dir = holder.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .ok()?;
        st.success().then_some(Tmpfs {
            dir,
            _holder: holder,
        })
    }

    /// Bytes still free.
    fn free(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs on a NUL-terminated path into a zeroed struct.
        unsafe {
            let mut s: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
            s.f_bavail * s.f_frsize
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Punch the journal region: an image as older versions created it.
fn punch_journal(img: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 0).unwrap();
    let j = Header::decode(&b).unwrap().region(Region::Journal);
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, j.offset as i64, j.length as i64) };
    assert_eq!(rc, 0, "punch the journal");
}

fn run_case(old_journal: bool) {
    let Some(fs) = Tmpfs::mount("64m") else {
        eprintln!("SKIP: cannot mount a tmpfs (not root?)");
        return;
    };
    let base = fs.dir.join("base.raw");
    create_raw(&base, 32 * MIB, &[(0, 32 * MIB)]);
    let img = fs.dir.join("disk.fvd");
    create_fvd(&img, Some(64 * MIB), Some(("base.raw", Format::Raw)));
    if old_journal {
        punch_journal(&img);
    }
    let sock = fs.dir.join("s.sock");
    let mut server = Server::unix(&img, &sock, &["-v"]);
    let uri = server.uri();
    // Fill the file system until 1 MiB is free.
    let filler = fs.dir.join("filler");
    let f = std::fs::File::create(&filler).unwrap();
    let fill = fs.free().saturating_sub(MIB);
    // SAFETY: fallocate on an open descriptor with integer arguments.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, fill as i64) };
    assert_eq!(rc, 0, "fill the tmpfs");
    drop(f);
    // Copy-on-write writes (qemu-io's default cache mode writes with FUA)
    // until the file system says no.
    let mut refused = false;
    for i in 0..4u64 {
        let w = format!("write -P 0xa1 {} 1M", (2 + i) * MIB);
        let out = qemu_io(&uri, &[&w]);
        if !out.ok {
            assert!(
                out.text.contains("No space left on device"),
                "a full file system must say ENOSPC:\n{}\nserver log:\n{}",
                out.text,
                server.log()
            );
            refused = true;
            break;
        }
    }
    assert!(refused, "the full file system never refused a write");
    std::fs::remove_file(&filler).unwrap();
    // Space is back: writes that need no metadata, copy-on-write writes
    // and flushes all work again.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xa3 40M 64k",
            "flush",
            "write -P 0xa4 8M 64k",
            "flush",
            "read -P 0xa3 40M 64k",
            "read -P 0xa4 8M 64k",
        ],
    );
    let log = server.log();
    assert!(
        !log.contains("must be reopened"),
        "the export was poisoned:\n{log}"
    );
    let st = server.terminate();
    assert!(st.success(), "SIGTERM exit status {st}:\n{}", server.log());
    let r = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert!(r.clean, "not clean after SIGTERM: {r:?}");
    assert!(r.corruptions.is_empty(), "{r:?}");
    let got = engine_content(&img, Format::Fvd);
    assert!(
        got[(40 * MIB) as usize..(40 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xa3)
    );
    assert!(
        got[(8 * MIB) as usize..(8 * MIB + 65536) as usize]
            .iter()
            .all(|&b| b == 0xa4)
    );
}

#[test]
fn enospc_does_not_poison_the_export() {
    if missing(&["qemu-io"]) {
        return;
    }
    run_case(false);
}

#[test]
fn enospc_does_not_poison_an_image_with_a_sparse_journal() {
    if missing(&["qemu-io"]) {
        return;
    }
    run_case(true);
}
