//! `fvd serve` with QEMU's own NBD client: qemu-io and qemu-img over a unix
//! socket and over TCP, server restarts, clean shutdown, negotiation
//! fallbacks forced from the server side. Skipped (with a message) where
//! QEMU's tools are not installed.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod nbd_support;

use std::path::Path;

use fvd_core::Format;
use fvd_core::executor::block_on;
use nbd_support::*;

const MIB: u64 = 1 << 20;

fn check_clean(img: &Path, format: Format) {
    let report = block_on(fvd_core::check::check_path(img, format, None)).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
    assert!(report.clean, "{report:?}");
}

/// Writes, reads, discards, zeroes and many asynchronous writes in flight.
fn exercise(uri: &str) {
    qemu_io_ok(
        uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x12 1536 5000",
            "read -P 0x12 1536 5000",
            "read -P 0xab 0 1536",
            "discard 256k 256k",
            "read -P 0 256k 256k",
            "read -P 0xab 512k 512k",
            "write -z 2M 1M",
            "read -P 0 2M 1M",
            "write -P 0x77 3M 64k",
            "write -z -u 3M 32k",
            "read -P 0 3M 32k",
            "read -P 0x77 3104k 32k",
            "flush",
        ],
    );
    // 32 asynchronous writes in flight, then one flush.
    let mut cmds: Vec<String> = (0..32u64)
        .map(|i| format!("aio_write -P {} {} 64k", i + 1, 4 * MIB + i * 65536))
        .collect();
    cmds.push("aio_flush".into());
    for i in 0..32u64 {
        cmds.push(format!("read -P {} {} 64k", i + 1, 4 * MIB + i * 65536));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(uri, &refs);
}

fn verify_after_restart(uri: &str) {
    let mut cmds = vec![
        "read -P 0xab 0 1536".to_string(),
        "read -P 0x12 1536 5000".to_string(),
        "read -P 0 256k 256k".to_string(),
        "read -P 0 2M 1M".to_string(),
        "read -P 0x77 3104k 32k".to_string(),
    ];
    for i in 0..32u64 {
        cmds.push(format!("read -P {} {} 64k", i + 1, 4 * MIB + i * 65536));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    // Read-only open: works on read-only and writable exports alike.
    let o = qemu_io_opts(&["-f", "raw", "-r"], uri, &refs);
    assert!(
        o.ok && !o.text.contains("failed") && !o.text.contains("error"),
        "{}",
        o.text
    );
}

#[test]
fn qemu_io_over_unix_and_tcp_with_restarts() {
    if missing(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.fvd");
    create_fvd(&img, Some(64 * MIB), None);
    let sock = t.path().join("s.sock");

    let mut server = Server::unix(&img, &sock, &[]);
    exercise(&server.uri());
    // SIGTERM: exit 0, socket gone, image clean.
    assert!(server.terminate().success(), "{}", server.log());
    assert!(!sock.exists(), "the socket must be removed");
    check_clean(&img, Format::Fvd);

    // The data is there after a restart, over TCP this time.
    let mut server = Server::tcp(&img, &t.path().join("tcp.log"), &[]);
    verify_after_restart(&server.uri());
    exercise(&server.uri());
    assert!(server.terminate().success(), "{}", server.log());
    check_clean(&img, Format::Fvd);

    // And once more on a unix socket, with a named export.
    let mut server = Server::unix(&img, &sock, &["--export-name", "disk0"]);
    verify_after_restart(&server.uri_named("disk0"));
    let o = qemu_io(&server.uri_named("other"), &["read 0 4k"]);
    assert!(!o.ok, "an unknown export name must be refused:\n{}", o.text);
    assert!(server.terminate().success());
    check_clean(&img, Format::Fvd);
}

#[test]
fn raw_images_and_read_only_exports() {
    if missing(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.raw");
    create_raw(&img, 32 * MIB, &[(0, MIB)]);
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &["-f", "raw"]);
    exercise(&server.uri());
    assert!(server.terminate().success());

    let mut server = Server::unix(&img, &sock, &["-f", "raw", "--read-only"]);
    verify_after_restart(&server.uri());
    let o = qemu_io(&server.uri(), &["write 0 4k"]);
    assert!(!o.ok, "a read-only export must refuse writers:\n{}", o.text);
    assert!(server.terminate().success());
}

#[test]
fn cache_none_export() {
    if missing(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.fvd");
    create_fvd(&img, Some(64 * MIB), None);
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &["--cache=none"]);
    // qemu-io honours the 512-byte minimum block size (read-modify-write
    // on its side for the unaligned request).
    exercise(&server.uri());
    assert!(server.terminate().success(), "{}", server.log());
    check_clean(&img, Format::Fvd);
}

#[test]
fn forced_fallbacks_still_serve_qemu() {
    if missing(&["qemu-io", "qemu-img"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.fvd");
    create_fvd(&img, Some(64 * MIB), None);
    let sock = t.path().join("s.sock");
    for flags in [
        &["--no-extended-headers"][..],
        &["--no-structured-replies"][..],
        &["--no-structured-replies", "--no-extended-headers"][..],
    ] {
        let mut server = Server::unix(&img, &sock, flags);
        exercise(&server.uri());
        verify_after_restart(&server.uri());
        let o = run(
            "qemu-img",
            &["map", "--output=json", "-f", "raw", &server.uri()],
        );
        assert!(o.ok, "{flags:?}: {}", o.text);
        assert!(server.terminate().success());
    }
    check_clean(&img, Format::Fvd);
}

/// `(start, end, zero)` runs of `qemu-img map --output=json`.
fn qemu_map_runs(uri: &str) -> Vec<(u64, u64, bool)> {
    let o = run("qemu-img", &["map", "--output=json", "-f", "raw", uri]);
    assert!(o.ok, "{}", o.text);
    let json_start = o.text.find('[').unwrap();
    let json_end = o.text.rfind(']').unwrap();
    let v: serde_json::Value = serde_json::from_str(&o.text[json_start..=json_end]).unwrap();
    merge_runs(v.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["zero"].as_bool().unwrap(),
        )
    }))
}

#[test]
fn qemu_img_map_compare_convert_match_the_image() {
    if missing(&["qemu-io", "qemu-img"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    // A 16 MiB raw base with data in [0,2M) and [5M,6M), an FVD image of
    // 24 MiB over it.
    let base = d.join("base.raw");
    create_raw(&base, 16 * MIB, &[(0, 2 * MIB), (5 * MIB, MIB)]);
    let img = d.join("a.fvd");
    create_fvd(&img, Some(24 * MIB), Some(("base.raw", Format::Raw)));
    let sock = d.join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);
    let uri = server.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x31 1M 8k",
            "write -P 0x32 3M 5000",
            "write -z 5M 64k",
            "discard 1M 4k",
            "write -P 0x33 20M 1M",
            "flush",
        ],
    );
    let engine = zero_runs(&engine_extents(&img, Format::Fvd));
    assert_eq!(qemu_map_runs(&uri), engine);
    // Same answer with only structured replies (32-bit block status).
    assert!(server.terminate().success());
    let mut server = Server::unix(&img, &sock, &["--no-extended-headers"]);
    assert_eq!(qemu_map_runs(&server.uri()), engine);
    // And the content: compare and convert over NBD equal the engine's view.
    let content = engine_content(&img, Format::Fvd);
    let flat = d.join("flat.raw");
    std::fs::write(&flat, &content).unwrap();
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &server.uri(),
            flat.to_str().unwrap(),
        ],
    );
    assert!(o.ok, "qemu-img compare: {}", o.text);
    let copy = d.join("copy.raw");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &server.uri(),
            copy.to_str().unwrap(),
        ],
    );
    assert!(o.ok, "qemu-img convert: {}", o.text);
    assert!(
        std::fs::read(&copy).unwrap() == content,
        "converted copy differs"
    );
    // A change through NBD makes compare fail.
    qemu_io_ok(&server.uri(), &["write -P 0x99 7M 512"]);
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &server.uri(),
            flat.to_str().unwrap(),
        ],
    );
    assert!(!o.ok, "compare must see the difference: {}", o.text);
    assert!(server.terminate().success());
    check_clean(&img, Format::Fvd);
}

#[test]
fn several_clients_share_the_image() {
    if missing(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.fvd");
    create_fvd(&img, Some(64 * MIB), None);
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &["--shared", "4"]);
    let uri = server.uri();
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let w = format!("write -P {} {} 4M", i + 1, i * 4 * MIB);
                let r = format!("read -P {} {} 4M", i + 1, i * 4 * MIB);
                qemu_io_ok(&uri, &[&w, "flush", &r]);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let cmds: Vec<String> = (0..4u64)
        .map(|i| format!("read -P {} {} 4M", i + 1, i * 4 * MIB))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_ok(&uri, &refs);
    assert!(server.terminate().success());
}

#[test]
fn once_exits_after_the_last_client() {
    if missing(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.fvd");
    create_fvd(&img, Some(8 * MIB), None);
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &["--once"]);
    qemu_io_ok(&server.uri(), &["write -P 0x42 0 64k"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.running() {
        assert!(std::time::Instant::now() < deadline, "--once did not exit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!sock.exists());
    check_clean(&img, Format::Fvd);
}
