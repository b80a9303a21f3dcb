//! qcow2 bases against images made by qemu-img and qemu-io: backing
//! chains, compressed clusters, extended L2 (subclusters), v2 images,
//! qcow2 over HTTP and NBD, clear refusals, and mutated images.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use fvd_core::IoBuf;
use fvd_core::base::{Base, RawBase};
use fvd_core::executor::block_on;
use fvd_core::storage::MemStorage;
use fvd_remote::qcow2::{Qcow2Base, read_header};

const SIZE: usize = 6 << 20;

fn qemu_img(dir: &Path, args: &[&str]) {
    run(dir, Path::new("qemu-img"), args).ok(&format!("qemu-img {}", args.join(" ")));
}

fn qemu_io(dir: &Path, img: &str, fmt: &str, ops: &[&str]) {
    let mut a = vec!["-f", fmt];
    for op in ops {
        a.push("-c");
        a.push(op);
    }
    a.push(img);
    run(dir, Path::new("qemu-io"), &a).ok(&format!("qemu-io {img}"));
}

/// A directory with base.raw (6 MiB) and over.qcow2 on it (raw backing),
/// written by qemu-io: data, unaligned data, zero clusters, a discard.
fn setup(test: &str) -> Option<tempfile::TempDir> {
    if !have("qemu-img", test) || !have("qemu-io", test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_sparse(&d.join("base.raw"), &data(21, SIZE));
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "over.qcow2",
        ],
    );
    qemu_io(
        d,
        "over.qcow2",
        "qcow2",
        &[
            "write -P 0x11 1M 64k",
            "write -P 0x22 3000 5000",
            "write -z 2M 128k",
            "discard 4M 64k",
            "write -P 0x33 5M 300k",
        ],
    );
    Some(dir)
}

/// `fvd convert -f qcow2 IMG` equals `qemu-img convert IMG`, and the
/// library reads the same bytes, and its allocation map never calls
/// nonzero bytes a hole.
fn check_against_qemu(dir: &Path, img: &str) {
    qemu_img(dir, &["convert", "-O", "raw", img, "qemu.raw"]);
    if let Some(fvd) = fvd_bin("check_against_qemu") {
        let _ = std::fs::remove_file(dir.join("fvd.raw"));
        run(
            dir,
            &fvd,
            &["convert", "-f", "qcow2", img, "-O", "raw", "fvd.raw"],
        )
        .ok(&format!("fvd convert {img}"));
        assert_same_raw(dir, "fvd.raw", "qemu.raw");
    }
    let expect = std::fs::read(dir.join("qemu.raw")).unwrap();
    let base = open_base(dir.join(img).to_str().unwrap(), "qcow2").unwrap();
    assert_eq!(base.format(), fvd_core::Format::Qcow2);
    assert_eq!(base.size(), expect.len() as u64);
    assert!(
        read_all(base.as_ref()) == expect,
        "{img}: content differs from qemu-img's"
    );
    let runs = block_on(base.allocation(0, expect.len() as u64 + 65536)).unwrap();
    assert_eq!(
        runs.iter().map(|r| r.length).sum::<u64>(),
        expect.len() as u64 + 65536
    );
    let mut pos = 0usize;
    for r in &runs {
        let end = (pos + r.length as usize).min(expect.len());
        if !r.data && pos < expect.len() {
            assert!(
                expect[pos..end].iter().all(|&b| b == 0),
                "{img}: hole at {pos} holds data"
            );
        }
        pos += r.length as usize;
    }
    // Odd-sized reads at odd offsets.
    for (off, len) in [
        (1u64, 1usize),
        (65535, 2),
        (1_000_003, 777_777),
        (expect.len() as u64 - 3, 9),
    ] {
        let b = block_on(base.read_at(off, IoBuf::zeroed(len))).unwrap();
        let inside = (expect.len() - off as usize).min(len);
        assert_eq!(
            &b[..inside],
            &expect[off as usize..off as usize + inside],
            "{img} at {off}"
        );
        assert!(b[inside..].iter().all(|&x| x == 0));
    }
}

#[test]
fn qcow2_over_raw_backing_matches_qemu() {
    let t = "qcow2_over_raw_backing_matches_qemu";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    check_against_qemu(d, "over.qcow2");
    // An FVD image on the qcow2 chain, written with fvd io, against qemu-io
    // on a raw copy of the chain's content.
    if let Some(fvd) = fvd_bin(t) {
        cli_cow_check_with(d, &fvd, "over.qcow2", "qcow2", "qemu.raw");
        let info = run(d, &fvd, &["info", "img.fvd"]);
        info.ok("fvd info");
        assert!(
            info.stdout.contains("backing file format: qcow2"),
            "{}",
            info.stdout
        );
    }
}

#[test]
fn compressed_clusters() {
    let t = "compressed_clusters";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "over.qcow2", "c64k.qcow2"],
    );
    check_against_qemu(d, "c64k.qcow2");
    // The extremes of the compressed entry layout: 512 B and 2 MiB clusters.
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "over.qcow2",
            "c512.qcow2",
        ],
    );
    check_against_qemu(d, "c512.qcow2");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "over.qcow2",
            "c2m.qcow2",
        ],
    );
    check_against_qemu(d, "c2m.qcow2");
    // Compressed clusters under later uncompressed writes.
    qemu_io(
        d,
        "c64k.qcow2",
        "qcow2",
        &["write -P 0x44 70000 10000", "write -z 196608 65536"],
    );
    check_against_qemu(d, "c64k.qcow2");
    if let Some(fvd) = fvd_bin(t) {
        cli_cow_check_with(d, &fvd, "c64k.qcow2", "qcow2", "qemu.raw");
    }
}

#[test]
fn extended_l2_subclusters_over_a_qcow2_chain() {
    let t = "extended_l2_subclusters_over_a_qcow2_chain";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "-b",
            "over.qcow2",
            "-F",
            "qcow2",
            "ext.qcow2",
        ],
    );
    qemu_io(
        d,
        "ext.qcow2",
        "qcow2",
        &[
            "write -P 0x55 5000 3000",
            "write -P 0x66 200k 4k",
            "write -z 1M 8k",
            "write -z 3M 256k",
            "write -P 0x77 1040k 100k",
            "discard 5M 8k",
        ],
    );
    check_against_qemu(d, "ext.qcow2");
    let base = open_base(d.join("ext.qcow2").to_str().unwrap(), "qcow2").unwrap();
    assert!(
        base.validator()
            .starts_with(&format!("size={SIZE};file:size=")),
        "{}",
        base.validator()
    );
    if let Some(fvd) = fvd_bin(t) {
        cli_cow_check_with(d, &fvd, "ext.qcow2", "qcow2", "qemu.raw");
        // The qcow2 file changes after the FVD image was made: refused.
        qemu_io(d, "ext.qcow2", "qcow2", &["write -P 0x12 5500k 64k"]);
        run(d, &fvd, &["io", "-c", "read 0 512", "img.fvd"])
            .fails_with("open after the change", "changed");
    }
}

#[test]
fn version_2_images() {
    let t = "version_2_images";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "v2.qcow2",
        ],
    );
    qemu_io(
        d,
        "v2.qcow2",
        "qcow2",
        &["write -P 0x31 12345 67890", "write -z 1M 64k"],
    );
    check_against_qemu(d, "v2.qcow2");
    qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "v2c.qcow2",
        ],
    );
    check_against_qemu(d, "v2c.qcow2");
}

/// Patch `len` bytes at `at` in `path`.
fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut f = std::fs::read(path).unwrap();
    f[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, f).unwrap();
}

fn open_err(dir: &Path, img: &str) -> String {
    match open_base(dir.join(img).to_str().unwrap(), "qcow2") {
        Ok(_) => panic!("{img} opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_images_are_refused_clearly() {
    let t = "unsupported_images_are_refused_clearly";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            "enc.qcow2",
            "1M",
        ],
    );
    assert!(open_err(d, "enc.qcow2").contains("encrypted"));
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "z.qcow2",
            "1M",
        ],
    );
    assert!(open_err(d, "z.qcow2").contains("zstd"));
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=z.data",
            "df.qcow2",
            "1M",
        ],
    );
    assert!(open_err(d, "df.qcow2").contains("external data file"));
    // Marked corrupt (incompatible bit 1).
    std::fs::copy(d.join("over.qcow2"), d.join("bad.qcow2")).unwrap();
    patch(&d.join("bad.qcow2"), 79, &[2]);
    assert!(open_err(d, "bad.qcow2").contains("marked corrupt"));
    // A backing file without a recorded format: never probed.
    std::fs::copy(d.join("over.qcow2"), d.join("nofmt.qcow2")).unwrap();
    let bytes = std::fs::read(d.join("nofmt.qcow2")).unwrap();
    let at = bytes[..65536]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    patch(&d.join("nofmt.qcow2"), at, &[0xe2, 0x79, 0x2a, 0xcb]);
    let e = open_err(d, "nofmt.qcow2");
    assert!(
        e.contains("does not record its format") && e.contains("qemu-img rebase"),
        "{e}"
    );
    // A missing backing file.
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "gone.raw",
            "-F",
            "raw",
            "-u",
            "orphan.qcow2",
            "6M",
        ],
    );
    let e = open_err(d, "orphan.qcow2");
    assert!(e.contains("gone.raw"), "{e}");
    // A chain that loops.
    let mk = |name: &str, backing: &str| {
        qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", "-u", name, "6M",
            ],
        );
    };
    mk("loop1.qcow2", "loop2.qcow2");
    mk("loop2.qcow2", "loop1.qcow2");
    assert!(open_err(d, "loop1.qcow2").contains("deeper than"));
    // Not qcow2 at all.
    assert!(open_err(d, "base.raw").contains("magic"));
    if let Some(fvd) = fvd_bin(t) {
        run(
            d,
            &fvd,
            &["create", "-q", "-b", "enc.qcow2", "-F", "qcow2", "e.fvd"],
        )
        .fails_with("create on an encrypted qcow2", "encrypted");
        assert!(!d.join("e.fvd").exists());
        run(
            d,
            &fvd,
            &[
                "convert",
                "-f",
                "qcow2",
                "nofmt.qcow2",
                "-O",
                "raw",
                "x.raw",
            ],
        )
        .fails_with("convert without a backing format", "never probed");
    }
}

#[test]
fn qcow2_over_http_and_nbd() {
    let t = "qcow2_over_http_and_nbd";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    qemu_img(d, &["convert", "-O", "raw", "over.qcow2", "qemu.raw"]);
    let expect = std::fs::read(d.join("qemu.raw")).unwrap();
    if have("nginx", t) {
        let www = d.join("www");
        std::fs::create_dir(&www).unwrap();
        std::fs::copy(d.join("over.qcow2"), www.join("over.qcow2")).unwrap();
        std::fs::copy(d.join("base.raw"), www.join("base.raw")).unwrap();
        let port = free_port();
        let _ng = nginx(d, &www, port, "");
        // The relative backing name resolves against the URL.
        let url = format!("http://127.0.0.1:{port}/over.qcow2");
        let base = open_base(&url, "qcow2").unwrap();
        assert!(read_all(base.as_ref()) == expect, "qcow2 over http differs");
        drop(base);
        if let Some(fvd) = fvd_bin(t) {
            cli_cow_check_with(d, &fvd, &url, "qcow2", "qemu.raw");
        }
    }
    if have("nbdkit", t) {
        // No backing file over NBD (a relative name has no meaning there).
        qemu_img(
            d,
            &["convert", "-c", "-O", "qcow2", "over.qcow2", "flat.qcow2"],
        );
        let sock = d.join("k.sock");
        let mut srv = Server::start(
            d,
            Path::new("nbdkit"),
            &["-f", "-U", sock.to_str().unwrap(), "file", "flat.qcow2"],
            "nbdkit",
        );
        wait_unix(&mut srv, &sock);
        let url = format!("nbd+unix:///?socket={}", sock.display());
        let base = open_base(&url, "qcow2").unwrap();
        assert!(read_all(base.as_ref()) == expect, "qcow2 over nbd differs");
        let mut srv2 = Server::start(
            d,
            Path::new("nbdkit"),
            &[
                "-f",
                "-U",
                d.join("k2.sock").to_str().unwrap(),
                "file",
                "over.qcow2",
            ],
            "nbdkit2",
        );
        wait_unix(&mut srv2, &d.join("k2.sock"));
        let url = format!("nbd+unix:///?socket={}", d.join("k2.sock").display());
        let e = open_base(&url, "qcow2").err().unwrap();
        assert!(e.to_string().contains("relative backing file"), "{e}");
    }
}

/// Mutated qemu-made images (header, L1 and L2 tables, compressed data)
/// give errors, never panics.
#[test]
fn mutated_images_never_panic() {
    let t = "mutated_images_never_panic";
    let Some(dir) = setup(t) else { return };
    let d = dir.path();
    qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "over.qcow2", "c.qcow2"],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=16k",
            "e.qcow2",
            "2M",
        ],
    );
    qemu_io(
        d,
        "e.qcow2",
        "qcow2",
        &[
            "write -P 0x55 5000 3000",
            "write -z 64k 4k",
            "write -P 1 1M 100k",
        ],
    );
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut opened = 0;
    for img in ["c.qcow2", "e.qcow2", "over.qcow2"] {
        let orig = std::fs::read(d.join(img)).unwrap();
        let h = block_on(read_header(
            &RawBase::new(Arc::new(MemStorage::from_bytes(img, &orig))).unwrap(),
            img,
        ))
        .unwrap();
        let cs = 1usize << h.cluster_bits;
        for _ in 0..300 {
            let mut f = orig.clone();
            for _ in 0..(next() % 6 + 1) {
                // Mostly the first clusters (header, L1, refcounts, L2).
                let limit = if next() % 4 == 0 {
                    f.len()
                } else {
                    (4 * cs).min(f.len())
                };
                let at = (next() % limit as u64) as usize;
                f[at] = match next() % 3 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            let file: Arc<dyn Base> =
                Arc::new(RawBase::new(Arc::new(MemStorage::from_bytes(img, &f))).unwrap());
            let Ok(h) = block_on(read_header(file.as_ref(), img)) else {
                continue;
            };
            if h.size > 64 << 20 {
                continue;
            }
            let Ok(q) = block_on(Qcow2Base::open(file, img.into(), h, None)) else {
                continue;
            };
            opened += 1;
            let _ = block_on(q.read_at(0, IoBuf::zeroed(q.size() as usize)));
            let _ = block_on(q.read_at(12_345, IoBuf::zeroed(100_000)));
            let _ = block_on(q.allocation(0, q.size()));
        }
    }
    assert!(opened > 100, "only {opened} mutated images opened");
}
