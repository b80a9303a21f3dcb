//! Encrypted images against external oracles: QEMU's `luks` driver reads
//! the data FVD wrote (the key-slot region as a detached LUKS1 header, the
//! data region as its payload), cryptsetup parses the header, dumps the
//! key FVD uses and makes headers and key slots FVD opens; Python's
//! `cryptography` decrypts a sector with the dumped key. Plus the CLI
//! rules: the plaintext never appears in the file, a wrong key fails in
//! one line and leaves the file alone.

mod common;

use std::path::Path;

use common::{file_hash, fvd, fvd_with_input, json, run_in};
use fvd_testkit::{find_tool, have_tools};

const SIZE: u64 = 4 << 20;
/// The LUKS1 area (header + 8 slots of key material), in bytes.
const AREA: u64 = 2_068_480;

fn secret(id: &str, file: &str) -> String {
    format!("secret,id={id},file={file}")
}

/// Key-slot region offset and data region offset of an FVD image.
fn regions(path: &Path) -> (u64, u64) {
    let b = std::fs::read(path).unwrap();
    let at = |i: usize| u64::from_le_bytes(b[128 + 16 * i..136 + 16 * i].try_into().unwrap());
    (at(5), at(7))
}

/// Bytes that never occur by chance: every 16-byte block holds the tag.
fn plaintext(len: usize) -> Vec<u8> {
    let tag = b"FVD-SECRET-DATA:";
    (0..len)
        .map(|i| {
            if i % 16 < 12 {
                tag[i % 16]
            } else {
                (i / 16 % 251) as u8 + 1
            }
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An encrypted image whose whole disk is written (converted from a raw
/// file with no zero sector), then patched at unaligned offsets.
fn make_image(d: &Path) {
    std::fs::write(d.join("pw"), b"open sesame").unwrap();
    std::fs::write(d.join("src.raw"), plaintext(SIZE as usize)).unwrap();
    fvd(
        d,
        &[
            "--object",
            &secret("s0", "pw"),
            "convert",
            "-f",
            "raw",
            "-O",
            "fvd",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            "src.raw",
            "x.fvd",
        ],
    )
    .ok("convert to an encrypted image");
    fvd(
        d,
        &[
            "--object",
            &secret("s0", "pw"),
            "io",
            "-c",
            "write -P 0x41 1000 3000",
            "-c",
            "write -P 0x42 70001 7",
            "-c",
            "write -z 200000 1000",
            "-c",
            "discard 1M 64k",
            "x.fvd",
        ],
    )
    .ok("unaligned writes");
}

#[test]
fn qemu_reads_what_fvd_wrote() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d);
    let img = std::fs::read(d.join("x.fvd")).unwrap();
    assert!(
        !contains(&img, b"FVD-SECRET-DATA:"),
        "plaintext in the image file"
    );
    fvd(
        d,
        &[
            "--object",
            &secret("s0", "pw"),
            "convert",
            "-O",
            "raw",
            "x.fvd",
            "fvd.raw",
        ],
    )
    .ok("fvd convert with the key");
    // The same bytes through QEMU: the key-slot region is a detached LUKS1
    // header whose payload offset (4040 sectors) QEMU adds to file.offset.
    let (keys, data) = regions(&d.join("x.fvd"));
    let opts = format!(
        "driver=luks,key-secret=s0,header.driver=raw,header.offset={keys},header.size={AREA},\
         header.file.driver=file,header.file.filename=x.fvd,file.driver=raw,\
         file.offset={},file.size={},file.file.driver=file,file.file.filename=x.fvd",
        data - AREA,
        SIZE + AREA
    );
    run_in(
        d,
        "qemu-img",
        &[
            "convert",
            "--object",
            &secret("s0", "pw"),
            "--image-opts",
            &opts,
            "-O",
            "raw",
            "qemu.raw",
        ],
    )
    .ok("qemu-img convert through the luks driver");
    let q = std::fs::read(d.join("qemu.raw")).unwrap();
    let f = std::fs::read(d.join("fvd.raw")).unwrap();
    assert_eq!(q.len(), f.len());
    // Zeroed and discarded sectors are stored as zeros, which FVD reads as
    // zeros and QEMU decrypts to noise; every other sector must agree byte
    // for byte (the plaintext has no zero sector, so nothing hides there).
    let mut compared = 0;
    for (i, (qs, fs)) in q.chunks(512).zip(f.chunks(512)).enumerate() {
        if fs.iter().all(|&b| b == 0) {
            continue;
        }
        assert!(qs == fs, "QEMU and FVD disagree on sector {i}");
        compared += 1;
    }
    assert!(compared > 8000, "only {compared} sectors compared");
    let hole = (1 << 20)..(1 << 20) + (64 << 10);
    let mut want = plaintext(SIZE as usize);
    want[1000..4000].fill(0x41);
    want[70001..70008].fill(0x42);
    want[200000..201000].fill(0);
    want[hole].fill(0);
    assert!(f == want, "fvd convert does not read back what was written");
}

#[test]
fn cryptsetup_reads_fvd_headers_and_fvd_reads_cryptsetup_headers() {
    if !have_tools(&["cryptsetup", "python3"]) {
        return;
    }
    let cs = find_tool("cryptsetup").unwrap();
    let cs = cs.to_str().unwrap();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_image(d);
    let path = d.join("x.fvd");
    let (keys, data) = regions(&path);
    let extract = |to: &str| {
        let b = std::fs::read(&path).unwrap();
        std::fs::write(d.join(to), &b[keys as usize..(keys + AREA) as usize]).unwrap();
    };
    let put_back = |from: &str| {
        use std::os::unix::fs::FileExt;
        let hdr = std::fs::read(d.join(from)).unwrap();
        assert_eq!(hdr.len() as u64, AREA);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&hdr, keys).unwrap();
    };
    extract("hdr.bin");
    let dump = run_in(d, cs, &["luksDump", "hdr.bin"]);
    dump.ok("luksDump of FVD's header");
    for want in [
        "Version:       \t1",
        "aes",
        "xts-plain64",
        "sha256",
        "MK bits:       \t512",
        "Key Slot 0: ENABLED",
    ] {
        assert!(
            dump.stdout.contains(want),
            "luksDump lacks {want:?}:\n{}",
            dump.stdout
        );
    }
    run_in(
        d,
        cs,
        &[
            "luksDump",
            "--dump-volume-key",
            "--volume-key-file",
            "mk.bin",
            "--batch-mode",
            "--key-file",
            "pw",
            "hdr.bin",
        ],
    )
    .ok("dump the volume key");
    // The dumped key decrypts sector 0 of the data region to the plaintext.
    let py = format!(
        "import sys\n\
         from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
         k=open('mk.bin','rb').read(); f=open('x.fvd','rb'); f.seek({data}); ct=f.read(512)\n\
         d=Cipher(algorithms.AES(k), modes.XTS((0).to_bytes(16,'little'))).decryptor()\n\
         sys.stdout.buffer.write(d.update(ct)+d.finalize())\n"
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&py)
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout,
        plaintext(512),
        "the dumped key is not the data key"
    );

    // luksAddKey on FVD's header; FVD opens with the new passphrase.
    std::fs::write(d.join("pw2"), b"second key").unwrap();
    run_in(
        d,
        cs,
        &[
            "luksAddKey",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "pw",
            "hdr.bin",
            "pw2",
        ],
    )
    .ok("luksAddKey");
    put_back("hdr.bin");
    let read = |pw: &str| {
        fvd(
            d,
            &[
                "--object",
                &secret("k", pw),
                "io",
                "-r",
                "-c",
                "read -P 0x41 1000 3000",
                "x.fvd",
            ],
        )
    };
    read("pw2").ok("FVD opens a slot cryptsetup added");
    read("pw").ok("the first slot still opens");

    // fvd luks add-key; cryptsetup opens the new slot.
    std::fs::write(d.join("pw3"), b"third key").unwrap();
    fvd(
        d,
        &[
            "--object",
            &secret("a", "pw"),
            "--object",
            &secret("n", "pw3"),
            "luks",
            "add-key",
            "--key-secret",
            "a",
            "--new-secret",
            "n",
            "--pbkdf-force-iterations",
            "1000",
            "x.fvd",
        ],
    )
    .ok("fvd luks add-key");
    extract("hdr3.bin");
    run_in(
        d,
        cs,
        &["open", "--test-passphrase", "--key-file", "pw3", "hdr3.bin"],
    )
    .ok("cryptsetup opens the slot fvd added");
    fvd(
        d,
        &[
            "--object",
            &secret("k", "pw"),
            "luks",
            "remove-key",
            "x.fvd",
        ],
    )
    .ok("remove-key");
    extract("hdr4.bin");
    run_in(
        d,
        cs,
        &["open", "--test-passphrase", "--key-file", "pw", "hdr4.bin"],
    )
    .expect_code(2, "a removed passphrase no longer opens");
    read("pw").expect_code(1, "a removed passphrase no longer opens in FVD");

    // A header made by cryptsetup (its own salts, AF split and digest) for
    // the same volume key opens in FVD.
    std::fs::write(d.join("pw5"), b"made by cryptsetup").unwrap();
    std::fs::write(d.join("dummy"), vec![0u8; 1 << 20]).unwrap();
    run_in(
        d,
        cs,
        &[
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--cipher",
            "aes-xts-plain64",
            "--key-size",
            "512",
            "--hash",
            "sha256",
            "--volume-key-file",
            "mk.bin",
            "--key-file",
            "pw5",
            "--header",
            "hdr5.bin",
            "dummy",
        ],
    )
    .ok("cryptsetup luksFormat");
    put_back("hdr5.bin");
    read("pw5").ok("FVD opens a header cryptsetup made");
    read("pw2").expect_code(1, "the old header's passphrases are gone");
}

#[test]
fn wrong_key_is_one_line_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::write(d.join("pw"), b"right").unwrap();
    std::fs::write(d.join("bad"), b"wrong-passphrase-text").unwrap();
    fvd(
        d,
        &[
            "--object",
            &secret("s", "pw"),
            "create",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10",
            "x.fvd",
            "4M",
        ],
    )
    .ok("create");
    fvd(
        d,
        &[
            "--object",
            &secret("s", "pw"),
            "io",
            "-c",
            "write -P 7 0 64k",
            "x.fvd",
        ],
    )
    .ok("write");
    let before = file_hash(&d.join("x.fvd"));
    let key_slot_args = |action: &'static str| {
        vec![
            "--object",
            "secret,id=n,file=pw",
            "luks",
            action,
            "--key-secret",
            "s",
            "--new-secret",
            "n",
            "--pbkdf-force-iterations",
            "1000",
            "x.fvd",
        ]
    };
    for args in [
        vec!["io", "-c", "write -P 1 0 4k", "x.fvd"],
        vec!["convert", "-O", "raw", "x.fvd", "out.raw"],
        key_slot_args("add-key"),
        key_slot_args("change-key"),
        vec!["luks", "remove-key", "x.fvd"],
        vec!["luks", "kill-slot", "x.fvd", "0"],
    ] {
        let mut full = vec!["--object", "secret,id=s,file=bad"];
        full.extend(args.iter().copied());
        let r = fvd(d, &full);
        assert_ne!(r.code, 0, "{args:?} succeeded with a wrong key");
        let err = r.stderr.trim_end();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("invalid key"), "{args:?}: {err}");
        assert!(
            !err.contains("wrong-passphrase"),
            "{args:?} leaks the secret: {err}"
        );
    }
    assert_eq!(
        before,
        file_hash(&d.join("x.fvd")),
        "a wrong key changed the file"
    );
    assert!(!d.join("out.raw").exists());
    // No key at all: info works, data commands say how to give one.
    let info = fvd(d, &["info", "--output", "json", "x.fvd"]);
    info.ok("info without a key");
    let j = json(&info.stdout);
    assert_eq!(j["encrypted"], true);
    assert_eq!(
        j["format-specific"]["data"]["encrypt"]["cipher-alg"],
        "aes-256"
    );
    let r = fvd(d, &["io", "-c", "read 0 4k", "x.fvd"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("encrypted") && r.stderr.contains("--object secret"),
        "{}",
        r.stderr
    );
    // The key from standard input, and through --image-opts.
    fvd_with_input(
        d,
        &[
            "--object",
            "secret,id=s,file=-",
            "io",
            "-r",
            "-c",
            "read -P 7 0 64k",
            "x.fvd",
        ],
        "right\n",
    )
    .ok("key from stdin");
    fvd(
        d,
        &[
            "--object",
            &secret("a", "bad"),
            "--object",
            &secret("b", "pw"),
            "compare",
            "--image-opts",
            "driver=fvd,file.filename=x.fvd,encrypt.key-secret=b",
            "driver=fvd,file.filename=x.fvd,encrypt.key-secret=b",
        ],
    )
    .ok("--image-opts picks the key");
}
