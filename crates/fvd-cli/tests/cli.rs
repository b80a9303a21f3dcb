//! The commands of `fvd` on their own: create, info, map, io, check, demo.

mod common;

use common::{data_ranges, fvd, fvd_with_input, json};

/// The `size=` of a `Formatting '…'` line.
fn formatted_size(stdout: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Formatting '"))
        .unwrap_or_else(|| panic!("no Formatting line in {stdout:?}"));
    let size = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("size="))
        .expect("size=");
    size.parse().expect("numeric size")
}

#[test]
fn create_parses_sizes_like_qemu_img() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for (i, (text, bytes)) in [
        ("512", 512u64),
        ("64K", 64 << 10),
        ("64k", 64 << 10),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("1T", 1 << 40),
        ("0x100000", 1 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("s{i}.fvd");
        let r = fvd(d, &["create", &name, text]);
        r.ok(text);
        assert_eq!(formatted_size(&r.stdout), bytes, "{text}");
        let info = json(&fvd(d, &["info", "--output=json", &name]).ok("info").stdout);
        assert_eq!(info["virtual-size"].as_u64(), Some(bytes), "{text}");
        std::fs::remove_file(d.join(&name)).unwrap();
    }
    let r = fvd(d, &["create", "-f", "raw", "r.img", "1M"]);
    r.ok("raw");
    assert_eq!(r.stdout.trim(), "Formatting 'r.img', fmt=raw size=1048576");
    assert_eq!(std::fs::metadata(d.join("r.img")).unwrap().len(), 1 << 20);
}

#[test]
fn create_over_a_base() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    fvd(d, &["create", "-f", "raw", "sub/base.raw", "3M"]).ok("base");

    // -b without -F is refused: the base format is never probed.
    let r = fvd(d, &["create", "-b", "base.raw", "sub/img.fvd"]);
    r.expect_code(1, "-b without -F");
    assert_eq!(
        r.stderr.trim(),
        "fvd: -F is required with -b: the base format is recorded, never probed"
    );
    assert!(!d.join("sub/img.fvd").exists());

    // A relative base name is recorded as given and resolved from the image's directory.
    let r = fvd(
        d,
        &[
            "create",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "block_size=64K",
            "sub/img.fvd",
        ],
    );
    r.ok("create over base");
    assert_eq!(
        r.stdout.trim(),
        "Formatting 'sub/img.fvd', fmt=fvd size=3145728 backing_file=base.raw backing_fmt=raw block_size=65536"
    );
    let info = json(
        &fvd(d, &["info", "--output=json", "sub/img.fvd"])
            .ok("info")
            .stdout,
    );
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["full-backing-filename"], "sub/base.raw");
    assert_eq!(info["cluster-size"], 65536);

    // Unknown -o keys are named.
    let r = fvd(d, &["create", "-o", "cluster_size=64k", "x.fvd", "1M"]);
    r.expect_code(1, "unknown option");
    assert!(r.stderr.contains("cluster_size"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1);
    // -o help lists the options.
    let r = fvd(d, &["create", "-o", "help"]);
    r.ok("-o help");
    assert!(r.stdout.contains("block_size") && r.stdout.contains("detect_zeroes"));
}

#[test]
fn info_json_has_qemu_style_keys() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "base.raw", "4M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 1 0 1M", "base.raw"]).ok("fill");
    fvd(
        d,
        &["create", "-b", "base.raw", "-F", "raw", "img.fvd", "8M"],
    )
    .ok("create");
    let r = fvd(d, &["info", "--output=json", "img.fvd"]);
    r.ok("info");
    let v = json(&r.stdout);
    for k in [
        "filename",
        "format",
        "virtual-size",
        "actual-size",
        "dirty-flag",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
        "cluster-size",
        "format-specific",
    ] {
        assert!(v.get(k).is_some(), "missing key {k}:\n{}", r.stdout);
    }
    assert_eq!(v["format"], "fvd");
    assert_eq!(v["filename"], "img.fvd");
    assert_eq!(v["virtual-size"], 8 << 20);
    assert_eq!(v["dirty-flag"], false);
    assert_eq!(v["format-specific"]["type"], "fvd");
    let data = &v["format-specific"]["data"];
    for k in [
        "version",
        "block-size",
        "chunk-size",
        "journal-size",
        "metadata-bytes",
        "bitmap-bytes",
        "table-bytes",
        "local-blocks",
        "base-blocks",
        "local-fraction",
        "clean",
        "all-local",
        "copy-on-read",
        "zero-detected",
        "incompatible-features",
        "compatible-features",
        "autoclear-features",
        "journal-epoch",
    ] {
        assert!(data.get(k).is_some(), "missing key {k}:\n{}", r.stdout);
    }
    // 1 MiB of the 4 MiB base holds data: the other 3 MiB were zero and are local.
    assert_eq!(data["base-blocks"], 1024);
    assert_eq!(data["local-blocks"], 768);
    assert_eq!(data["zero-detected"], true);
    assert_eq!(data["local-fraction"], 0.75);

    let h = fvd(d, &["info", "img.fvd"]);
    h.ok("human info");
    for line in [
        "image: img.fvd",
        "file format: fvd",
        "virtual size: 8 MiB (8388608 bytes)",
        "backing file: base.raw",
        "backing file format: raw",
        "local: 75% of base range (768 of 1024 blocks)",
        "clean: true",
    ] {
        assert!(h.stdout.contains(line), "no '{line}' in:\n{}", h.stdout);
    }
}

#[test]
fn info_of_a_crashed_image_replays_in_memory_only() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "base.raw", "1M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 3 0 1M", "base.raw"]).ok("fill");
    fvd(d, &["create", "-b", "base.raw", "-F", "raw", "img.fvd"]).ok("create");
    // A copy-on-write write and a flush journal a record; then "crash" (no close).
    {
        let img = fvd_core::executor::block_on(fvd_core::open_path(
            &d.join("img.fvd"),
            fvd_core::Format::Fvd,
            fvd_core::PathOptions::default(),
        ))
        .expect("open");
        fvd_core::executor::block_on(img.write_slice(4096, &[9u8; 4096], false)).expect("write");
        fvd_core::executor::block_on(img.flush()).expect("flush");
    }
    let before = common::file_hash(&d.join("img.fvd"));
    let v = json(
        &fvd(d, &["info", "--output=json", "img.fvd"])
            .ok("info")
            .stdout,
    );
    assert_eq!(v["dirty-flag"], true);
    assert_eq!(v["format-specific"]["data"]["local-blocks"], 1);
    let r = fvd(
        d,
        &[
            "io",
            "-r",
            "-c",
            "read -P 9 4k 4k",
            "-c",
            "read -P 3 0 4k",
            "img.fvd",
        ],
    );
    r.ok("read after crash");
    assert_eq!(
        common::file_hash(&d.join("img.fvd")),
        before,
        "read-only open wrote"
    );
    // A read-write open replays and closes cleanly.
    fvd(d, &["io", "-c", "flush", "img.fvd"]).ok("replay");
    let v = json(
        &fvd(d, &["info", "--output=json", "img.fvd"])
            .ok("info")
            .stdout,
    );
    assert_eq!(v["dirty-flag"], false);
}

#[test]
fn map_shows_image_and_base_layers() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "base.raw", "2M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 5 0 1M", "base.raw"]).ok("fill");
    fvd(
        d,
        &["create", "-b", "base.raw", "-F", "raw", "img.fvd", "4M"],
    )
    .ok("create");
    fvd(
        d,
        &[
            "io",
            "-c",
            "write -P 6 64k 4k",
            "-c",
            "write -P 7 3M 4k",
            "img.fvd",
        ],
    )
    .ok("writes");
    let m = json(
        &fvd(d, &["map", "--output=json", "img.fvd"])
            .ok("map")
            .stdout,
    );
    let entries = m.as_array().unwrap();
    let find = |start: u64| {
        entries
            .iter()
            .find(|e| e["start"] == start)
            .unwrap_or_else(|| panic!("no entry at {start}: {m}"))
    };
    assert_eq!(find(0)["depth"], 1);
    assert_eq!(find(0)["data"], true);
    assert_eq!(find(0)["offset"], 0);
    assert_eq!(find(65536)["depth"], 0);
    assert_eq!(find(65536)["length"], 4096);
    assert_eq!(find(65536)["data"], true);
    assert_eq!(find(3 << 20)["depth"], 0);
    assert_eq!(
        data_ranges(&m),
        vec![(0, 1 << 20), (3 << 20, (3 << 20) + 4096)]
    );
    let h = fvd(d, &["map", "img.fvd"]);
    h.ok("human map");
    let lines: Vec<&str> = h.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "Offset          Length          Mapped to       File"
    );
    assert!(
        lines[1].starts_with("0               0x10000         0               base.raw"),
        "{}",
        h.stdout
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("0x10000         0x1000 ") && l.ends_with("img.fvd"))
    );
}

#[test]
fn io_reads_commands_from_stdin_and_maps() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "base.raw", "1M"]).ok("base");
    fvd(
        d,
        &[
            "create",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "detect_zeroes=off",
            "i.fvd",
            "2M",
        ],
    )
    .ok("create");
    let r = fvd_with_input(
        d,
        &["io", "i.fvd"],
        "write -P 0x10 0x1000 4k\n# comment\n\nread -P 16 4k 4k\nmap\nalloc 0 8k\nlength\nflush\n",
    );
    r.ok("stdin commands");
    assert!(
        r.stdout
            .contains("wrote 4096/4096 bytes at offset 4096\n4 KiB, 1 ops; ")
    );
    assert!(r.stdout.contains("read 4096/4096 bytes at offset 4096"));
    assert!(
        r.stdout
            .contains("4 KiB (0x1000) bytes not allocated at offset 0 bytes (0x0)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("4 KiB (0x1000) bytes     allocated at offset 4 KiB (0x1000)")
    );
    assert!(
        r.stdout
            .contains("4096/8192 bytes allocated at offset 0 bytes")
    );
    assert!(r.stdout.contains("\n2 MiB\n"));
    // Pattern mismatch: qemu-io's message and exit status 1.
    let r = fvd(d, &["io", "-c", "read -P 0x11 4k 4k", "i.fvd"]);
    r.expect_code(1, "pattern mismatch");
    assert!(
        r.stdout
            .contains("Pattern verification failed at offset 4096, 4096 bytes")
    );
    // Zero writes and read-only opens.
    fvd(
        d,
        &[
            "io",
            "-c",
            "write -z -u 4k 4k",
            "-c",
            "read -P 0 4k 4k",
            "i.fvd",
        ],
    )
    .ok("zero");
    let r = fvd(d, &["io", "-r", "-c", "write 0 512", "i.fvd"]);
    r.expect_code(1, "write on a read-only open");
    assert!(r.stderr.contains("read-only"), "{}", r.stderr);
}

#[test]
fn check_reports_a_clean_image() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "c.fvd", "1M"]).ok("create");
    let r = fvd(d, &["check", "c.fvd"]);
    r.ok("check");
    assert!(r.stdout.contains("No errors were found on the image."));
    let v = json(
        &fvd(d, &["check", "--output=json", "c.fvd"])
            .ok("check json")
            .stdout,
    );
    for k in [
        "check-errors",
        "corruptions",
        "leaks",
        "image-end-offset",
        "filename",
        "format",
    ] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["check-errors"], 0);
    assert_eq!(v["filename"], "c.fvd");
    assert_eq!(v["format"], "fvd");
}

#[test]
fn demo_shows_free_writes() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let r = fvd(d, &["demo", "--dir", "demo"]);
    r.ok("demo");
    // Columns: ... data bytes, base read, journal, header, fsyncs.
    let row = |tag: &str| -> Vec<u64> {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(tag))
            .unwrap_or_else(|| panic!("no row {tag}:\n{}", r.stdout));
        let nums: Vec<u64> = line
            .split_whitespace()
            .rev()
            .take(5)
            .map(|w| w.parse().unwrap_or_else(|_| panic!("bad row {line}")))
            .collect();
        nums.into_iter().rev().collect()
    };
    let journal = |tag: &str| row(tag)[2];
    for free in ["(b)", "(c)", "(d)"] {
        assert_eq!(journal(free), 0, "{free} is a free write:\n{}", r.stdout);
        assert_eq!(row(free)[3], 0, "{free} writes no header");
        assert_eq!(row(free)[1], 0, "{free} reads no base");
    }
    assert_eq!(journal("(a)"), 1);
    assert_eq!(journal("(e)"), 1);
    assert_eq!(
        row("(e)")[1],
        3584,
        "the partial write merges 3.5 KiB from the base"
    );
    assert!(r.stdout.contains("Verified"));
    assert!(r.stdout.contains("fvd info"));
    assert!(d.join("demo/demo.fvd").exists() && d.join("demo/base.raw").exists());
    fvd(d, &["check", "demo/demo.fvd"]).ok("check demo image");
    let v = json(
        &fvd(d, &["info", "--output=json", "demo/demo.fvd"])
            .ok("info")
            .stdout,
    );
    assert_eq!(v["dirty-flag"], false);
    assert_eq!(v["virtual-size"], 96 << 20);
    // Without --dir the temporary files are removed.
    let r = fvd(d, &["demo"]);
    r.ok("demo in a temporary directory");
    assert!(r.stdout.contains("were removed"));
}

#[test]
fn usage_errors_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    for args in [
        vec!["info"],
        vec!["info", "--output=xml", "x"],
        vec!["info", "-f", "qcow2", "x"],
        vec!["frobnicate"],
    ] {
        let r = fvd(d, &args);
        assert_eq!(r.code, 1, "{args:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.starts_with("fvd: "), "{}", r.stderr);
    }
    assert_eq!(fvd(d, &["compare", "a"]).code, 2);
    fvd(d, &["--help"]).ok("help");
    fvd(d, &["--version"]).ok("version");
}

#[test]
fn check_exit_codes_for_leaks_and_corruption() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-f", "raw", "base.raw", "1M"]).ok("base");
    fvd(d, &["io", "-f", "raw", "-c", "write -P 3 0 1M", "base.raw"]).ok("fill");
    fvd(d, &["create", "-b", "base.raw", "-F", "raw", "l.fvd"]).ok("create");
    fvd(d, &["io", "-c", "write -P 1 0 4k", "l.fvd"]).ok("write");
    // Where the data region starts, from the map's host offset of block 0.
    let m = json(&fvd(d, &["map", "--output=json", "l.fvd"]).ok("map").stdout);
    let data_offset = m[0]["offset"].as_u64().expect("offset of an image extent");
    // Data in the image for a block whose bit is 0: a leak (exit 3).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("l.fvd"))
            .unwrap();
        f.write_all_at(&[0x77; 4096], data_offset + 65536).unwrap();
    }
    let r = fvd(d, &["check", "l.fvd"]);
    r.expect_code(3, "check with a leak");
    assert!(
        r.stdout
            .contains("1 leaked clusters were found on the image.")
    );
    assert!(
        r.stdout
            .contains("This means waste of disk space, but no harm to data.")
    );
    let v = json(&fvd(d, &["check", "--output=json", "l.fvd"]).stdout);
    assert_eq!(v["leaks"], 1);
    let r = fvd(d, &["check", "-r", "leaks", "l.fvd"]);
    r.ok("repair leaks");
    assert!(r.stdout.contains("No errors were found on the image."));
    fvd(d, &["compare", "-F", "raw", "l.fvd", "base.raw"]).expect_code(1, "block 0 differs");
    fvd(d, &["io", "-r", "-c", "read -P 3 64k 4k", "l.fvd"]).ok("base data still read");

    // A truncated image is a corruption (exit 2).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("l.fvd"))
        .unwrap();
    f.set_len(data_offset).unwrap();
    drop(f);
    let r = fvd(d, &["check", "l.fvd"]);
    r.expect_code(2, "check of a truncated image");
    assert!(
        r.stdout.contains("1 errors were found on the image."),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("Data may be corrupted, or further writes to the image may corrupt it.")
    );
}

#[test]
fn prefetch_detaches_the_base_and_profiles_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.iter_mut().enumerate().take(6 << 20) {
        *b = (i / 4096) as u8 | 1;
    }
    std::fs::write(&base, &data).unwrap();
    let img = d.join("img.fvd");
    let fvd = env!("CARGO_BIN_EXE_fvd");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(fvd).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (c, _, e) = run(&[
        "create",
        "-q",
        "-b",
        "base.raw",
        "-F",
        "raw",
        img.to_str().unwrap(),
    ]);
    assert_eq!(c, Some(0), "{e}");
    let (c, out, e) = run(&["profile", "show", img.to_str().unwrap()]);
    assert_eq!(c, Some(0), "{e}");
    assert!(out.contains("no prefetch profile"), "{out}");
    // A profile file made by hand, imported, exported back identically.
    let prof = d.join("boot.profile");
    std::fs::write(
        &prof,
        fvd_core::format::profile::encode(&[(4 << 20, 65536), (0, 4096)]),
    )
    .unwrap();
    let (c, _, e) = run(&[
        "profile",
        "import",
        img.to_str().unwrap(),
        prof.to_str().unwrap(),
    ]);
    assert_eq!(c, Some(0), "{e}");
    let back = d.join("back.profile");
    let (c, _, e) = run(&[
        "profile",
        "export",
        img.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    assert_eq!(c, Some(0), "{e}");
    assert_eq!(std::fs::read(&prof).unwrap(), std::fs::read(&back).unwrap());
    let (c, out, e) = run(&["prefetch", "--profile", img.to_str().unwrap()]);
    assert_eq!(c, Some(0), "{e}{out}");
    // The base is no longer needed.
    std::fs::remove_file(&base).unwrap();
    let (c, out, e) = run(&["io", "-c", "read -P 0x01 2M 4k", img.to_str().unwrap()]);
    assert_eq!(c, Some(0), "{e}{out}");
    let (c, out, e) = run(&["check", img.to_str().unwrap()]);
    assert_eq!(c, Some(0), "{e}{out}");
    let (c, out, _) = run(&["info", "--output=json", img.to_str().unwrap()]);
    assert_eq!(c, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format-specific"]["data"]["all-local"], true);
}
