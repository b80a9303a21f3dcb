//! qemu-img and qemu-io as oracles: what `fvd` writes, converts and maps must
//! agree with what QEMU's tools make of the same operations on raw files.
//! Skipped (with a message) where QEMU's tools are not installed.

mod common;

use common::{data_ranges, fvd, json, run_in};
use fvd_testkit::have_tools;

/// qemu-io commands that lay out data, zero and hole regions in a 16 MiB raw file.
const RAW_WRITES: [&str; 6] = [
    "write -P 0xab 0 1M",
    "write -z 4M 1M",
    "write -P 0x11 7M 64k",
    "write -P 0x22 9M 3k",
    "write -P 0x33 12M 4k",
    "write -P 0x44 15M 1M",
];

fn qemu_io_raw(dir: &std::path::Path, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(file);
    run_in(dir, "qemu-io", &args).ok("qemu-io");
}

#[test]
fn convert_round_trip_matches_qemu() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run_in(d, "qemu-img", &["create", "-f", "raw", "raw.img", "16M"]).ok("qemu-img create");
    qemu_io_raw(d, "raw.img", &RAW_WRITES);

    fvd(
        d,
        &["convert", "-f", "raw", "-O", "fvd", "raw.img", "x.fvd"],
    )
    .ok("convert raw to fvd");
    fvd(
        d,
        &[
            "convert", "-p", "-f", "fvd", "-O", "raw", "x.fvd", "back.raw",
        ],
    )
    .ok("convert fvd to raw");
    let cmp = run_in(
        d,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "raw.img", "back.raw"],
    );
    cmp.ok("qemu-img compare of the round trip");
    assert!(
        cmp.stdout.contains("Images are identical."),
        "{}",
        cmp.stdout
    );

    // Our own compare agrees, in both directions and across formats.
    let ours = fvd(
        d,
        &["compare", "-f", "fvd", "-F", "raw", "x.fvd", "raw.img"],
    );
    ours.ok("fvd compare");
    assert_eq!(ours.stdout.trim(), "Images are identical.");

    // The destination cache modes (qemu-img's -t) copy the same bytes:
    // O_DIRECT, and unsafe (no fdatasync) into FVD and raw.
    for (mode, fmt, out) in [
        ("none", "fvd", "t-none.fvd"),
        ("unsafe", "fvd", "t-unsafe.fvd"),
        ("unsafe", "raw", "t-unsafe.raw"),
    ] {
        fvd(
            d,
            &[
                "convert", "-t", mode, "-f", "raw", "-O", fmt, "raw.img", out,
            ],
        )
        .ok("convert -t");
        let c = fvd(d, &["compare", "-f", fmt, "-F", "raw", out, "raw.img"]);
        c.ok("fvd compare after convert -t");
        assert_eq!(
            c.stdout.trim(),
            "Images are identical.",
            "-t {mode} -O {fmt}"
        );
    }
    let bad = fvd(d, &["convert", "-t", "bogus", "raw.img", "t-bad.fvd"]);
    assert!(
        bad.stderr.contains("unknown cache mode 'bogus'"),
        "{}",
        bad.stderr
    );
    assert!(!d.join("t-bad.fvd").exists());

    // The map of the FVD image has the same data ranges as QEMU's map of the raw file.
    let q = run_in(
        d,
        "qemu-img",
        &["map", "--output=json", "-f", "raw", "raw.img"],
    );
    q.ok("qemu-img map");
    let m = fvd(d, &["map", "--output=json", "x.fvd"]);
    m.ok("fvd map");
    let (qm, fm) = (json(&q.stdout), json(&m.stdout));
    assert_eq!(
        data_ranges(&fm),
        data_ranges(&qm),
        "data ranges differ\nqemu-img:\n{}\nfvd:\n{}",
        q.stdout,
        m.stdout
    );
    // Both maps cover the disk without gaps, and ours is shaped like QEMU's.
    for map in [&qm, &fm] {
        let mut pos = 0;
        for e in map.as_array().unwrap() {
            assert_eq!(e["start"].as_u64().unwrap(), pos);
            pos += e["length"].as_u64().unwrap();
        }
        assert_eq!(pos, 16 << 20);
    }
    for e in fm.as_array().unwrap() {
        assert_eq!(e["depth"], 0);
        assert_eq!(e["present"], true);
        assert_eq!(e["compressed"], false);
        assert_eq!(e["data"].as_bool(), e["zero"].as_bool().map(|z| !z));
    }
    // Line layout as qemu-img prints it: '[' on the first line, one object per line.
    let lines: Vec<&str> = m.stdout.lines().collect();
    assert!(lines[0].starts_with("[{ \"start\": 0, "), "{}", lines[0]);
    assert!(lines.last().unwrap().ends_with("}]"));

    // The raw map of the converted-back file equals QEMU's map of it.
    let q2 = run_in(
        d,
        "qemu-img",
        &["map", "--output=json", "-f", "raw", "back.raw"],
    );
    let f2 = fvd(d, &["map", "--output=json", "-f", "raw", "back.raw"]);
    assert_eq!(
        data_ranges(&json(&f2.stdout)),
        data_ranges(&json(&q2.stdout))
    );
}

#[test]
fn io_writes_over_a_base_match_qemu_io_on_raw() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run_in(d, "qemu-img", &["create", "-f", "raw", "base.raw", "8M"]).ok("create base");
    qemu_io_raw(
        d,
        "base.raw",
        &[
            "write -P 0x61 0 2M",
            "write -P 0x62 3M 1M",
            "write -P 0x63 6M 512k",
        ],
    );
    fvd(
        d,
        &["create", "-b", "base.raw", "-F", "raw", "img.fvd", "12M"],
    )
    .ok("fvd create");

    // The same guest writes through fvd io on the image and through qemu-io on
    // a raw copy of the base grown to the image size.
    let writes = [
        "write -P 0x5a 1M 4k",        // copy-on-write of a whole block
        "write -P 0x5b 1028k 512",    // partial block: merged from the base
        "write -P 0x5c 2M 4k",        // zero-filled base block
        "write -z 3M 64k",            // zeroes over base data
        "discard 6M 4k",              // discard over base data
        "write -P 0x5d 10M 1M",       // beyond the base
        "write -P 0x5e 8388096 1024", // straddles the end of the base
    ];
    let mut args = vec!["io"];
    for w in &writes {
        args.push("-c");
        args.push(w);
    }
    args.push("img.fvd");
    let io = fvd(d, &args);
    io.ok("fvd io");
    assert!(
        io.stdout
            .contains("wrote 4096/4096 bytes at offset 1048576")
    );
    assert!(
        io.stdout
            .contains("discard 4096/4096 bytes at offset 6291456")
    );

    std::fs::copy(d.join("base.raw"), d.join("expected.raw")).unwrap();
    run_in(
        d,
        "qemu-img",
        &["resize", "-f", "raw", "expected.raw", "12M"],
    )
    .ok("qemu-img resize");
    qemu_io_raw(d, "expected.raw", &writes);

    let same = fvd(d, &["compare", "-F", "raw", "img.fvd", "expected.raw"]);
    same.ok("compare equal content");
    assert_eq!(same.stdout.trim(), "Images are identical.");

    // QEMU agrees once the image is converted to raw.
    fvd(d, &["convert", "-O", "raw", "img.fvd", "img.raw"]).ok("convert");
    run_in(
        d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "img.raw",
            "expected.raw",
        ],
    )
    .ok("qemu-img compare");

    // Patterns read back as written, verified by fvd io itself.
    fvd(
        d,
        &[
            "io",
            "-r",
            "-c",
            "read -P 0x5b 1028k 512",
            "-c",
            "read -P 0x5a 1M 4k",
            "-c",
            "read -P 0x61 1032k 4k",
            "-c",
            "read -P 0 3M 64k",
            "img.fvd",
        ],
    )
    .ok("pattern reads");

    // One more write makes the contents differ: exit 1 at that sector.
    fvd(d, &["io", "-c", "write -P 0x99 5M 100", "img.fvd"]).ok("write");
    let diff = fvd(d, &["compare", "-F", "raw", "img.fvd", "expected.raw"]);
    diff.expect_code(1, "compare after a diverging write");
    assert_eq!(diff.stdout.trim(), "Content mismatch at offset 5242880!");

    // qemu-img compare says the same about the same two contents.
    fvd(d, &["convert", "-O", "raw", "img.fvd", "img2.raw"]).ok("convert");
    let q = run_in(
        d,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "img2.raw",
            "expected.raw",
        ],
    );
    q.expect_code(1, "qemu-img compare");
    assert_eq!(q.stdout.trim(), diff.stdout.trim());

    // Sizes: a larger raw whose extra part is zero is identical unless strict.
    qemu_io_raw(d, "expected.raw", &["write -P 0x99 5M 100"]);
    run_in(
        d,
        "qemu-img",
        &["resize", "-f", "raw", "expected.raw", "16M"],
    )
    .ok("resize");
    let grown = fvd(d, &["compare", "-F", "raw", "img.fvd", "expected.raw"]);
    grown.ok("compare with zero tail");
    assert_eq!(
        grown.stdout,
        "Warning: Image size mismatch!\nImages are identical.\n"
    );
    let strict = fvd(
        d,
        &["compare", "-s", "-F", "raw", "img.fvd", "expected.raw"],
    );
    strict.expect_code(1, "strict compare");
    assert_eq!(strict.stdout.trim(), "Strict mode: Image size mismatch!");
    qemu_io_raw(d, "expected.raw", &["write -P 1 13M 1"]);
    let tail = fvd(d, &["compare", "-F", "raw", "img.fvd", "expected.raw"]);
    tail.expect_code(1, "compare with data in the tail");
    assert!(
        tail.stdout.contains("Content mismatch at offset 13631488!"),
        "{}",
        tail.stdout
    );

    // An error is exit status 2.
    let err = fvd(d, &["compare", "-F", "raw", "img.fvd", "missing.raw"]);
    err.expect_code(2, "compare with a missing file");
    assert!(err.stderr.starts_with("fvd: missing.raw"), "{}", err.stderr);
}

#[test]
fn qemu_io_vocabulary_and_report_lines() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "r.img", "4M"]).ok("create raw");
    let cmds = [
        "write -P 0x41 0 16",
        "read -v 0 20",
        "read -P 0x41 0 16",
        "read -P 0x41 0 17",
    ];
    let mut ours = vec!["io", "-f", "raw"];
    let mut theirs = vec!["-f", "raw"];
    for c in &cmds {
        ours.extend(["-c", c]);
        theirs.extend(["-c", c]);
    }
    ours.push("r.img");
    theirs.push("r.img");
    let a = fvd(d, &ours);
    let b = run_in(d, "qemu-io", &theirs);
    assert_eq!(
        a.code, b.code,
        "exit status\nours:\n{}\nqemu-io:\n{}",
        a.stdout, b.stdout
    );
    // Same lines, except for the timings.
    let strip = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| match l.find(" ops; ") {
                Some(p) => l[..p].to_string(),
                None => l.to_string(),
            })
            .collect()
    };
    assert_eq!(strip(&a.stdout), strip(&b.stdout));
}
