//! Online resize: `fvd resize --server CONTROL` on an image `fvd serve`
//! exports. Real clients (nbdinfo, qemu-io) see the new size when they
//! reconnect, data is kept, new space reads zeros; the refusals are the
//! offline command's; a client writing all the while loses nothing and
//! gets no error (its requests wait for the resize, then run on the
//! resized image).

mod nbd_support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fvd_core::Format;
use fvd_nbd::proto::consts::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES};
use fvd_nbd::proto::request::Command as Cmd;
use nbd_support::{Client, Server, engine_content, missing, ok, qemu_io_ok, run};

const M: u64 = 1 << 20;

fn fvd(dir: &Path, args: &[&str]) -> std::process::Output {
    nbd_support::fvd_in(dir, args)
}

fn fails(o: &std::process::Output, needle: &str, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} succeeded");
    assert!(
        err.contains(needle),
        "{what}: expected '{needle}' in: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
}

/// The size nbdinfo reads on a new connection.
fn nbd_size(uri: &str) -> u64 {
    let o = run("nbdinfo", &["--size", uri]);
    assert!(o.ok, "nbdinfo: {}", o.text);
    o.text.trim().parse().expect("a size")
}

fn serve(d: &Path, image: &str, extra: &[&str]) -> Server {
    let ctl = d.join("ctl.sock");
    let mut args = vec!["--control-socket", ctl.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::unix(&d.join(image), &d.join("nbd.sock"), &args)
}

fn resize_cases(create_opts: &str) {
    if missing(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        &fvd(d, &["create", "-o", create_opts, "a.fvd", "16M"]),
        "create",
    );
    ok(
        &fvd(
            d,
            &[
                "io",
                "-c",
                "write -P 7 0 1M",
                "-c",
                "write -P 8 15M 1M",
                "a.fvd",
            ],
        ),
        "write",
    );
    let mut server = serve(d, "a.fvd", &[]);
    let uri = server.uri();
    assert_eq!(nbd_size(&uri), 16 * M);
    // In use: the offline command says how to reach the server.
    fails(&fvd(d, &["resize", "a.fvd", "+16M"]), "--server", "offline");

    // Grow, relative, naming the image.
    ok(
        &fvd(d, &["resize", "--server", "ctl.sock", "a.fvd", "+16M"]),
        "grow",
    );
    assert_eq!(nbd_size(&uri), 32 * M, "a new connection sees the new size");
    qemu_io_ok(
        &uri,
        &[
            "read -P 7 0 1M",
            "read -P 0 1M 14M",
            "read -P 8 15M 1M",
            "read -P 0 16M 16M",
            "write -P 9 30M 1M",
        ],
    );

    // Shrink: refused without --shrink, as offline; the size is kept.
    fails(
        &fvd(d, &["resize", "--server", "ctl.sock", "8M"]),
        "--shrink",
        "shrink without --shrink",
    );
    assert_eq!(nbd_size(&uri), 32 * M);
    ok(
        &fvd(d, &["resize", "--server", "ctl.sock", "--shrink", "8M"]),
        "shrink",
    );
    assert_eq!(nbd_size(&uri), 8 * M);
    qemu_io_ok(&uri, &["read -P 7 0 1M", "read -P 0 1M 7M"]);
    // Growing again exposes zeros, not what was past the old end.
    ok(
        &fvd(d, &["resize", "--server", "ctl.sock", "--", "+24M"]),
        "regrow",
    );
    assert_eq!(nbd_size(&uri), 32 * M);
    qemu_io_ok(&uri, &["read -P 7 0 1M", "read -P 0 1M 31M"]);

    // Another file than the one served, a bad size: one line, no change.
    std::fs::write(d.join("other"), b"x").unwrap();
    fails(
        &fvd(d, &["resize", "--server", "ctl.sock", "other", "64M"]),
        "not this image",
        "other file",
    );
    fails(
        &fvd(d, &["resize", "--server", "ctl.sock", "1000"]),
        "multiple of 512",
        "odd size",
    );
    assert_eq!(nbd_size(&uri), 32 * M);

    assert!(server.terminate().success(), "{}", server.log());
    let check = fvd(d, &["check", "a.fvd"]);
    ok(&check, "check after the server stopped");
    let info = ok(&fvd(d, &["info", "--output=json", "a.fvd"]), "info");
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 32 * M);
    let data = engine_content(&d.join("a.fvd"), Format::Fvd);
    assert!(data[..M as usize].iter().all(|&b| b == 7));
    assert!(data[M as usize..].iter().all(|&b| b == 0));
}

#[test]
fn grow_and_shrink_a_served_sparse_image() {
    resize_cases("compact=off");
}

#[test]
fn grow_and_shrink_a_served_compact_image() {
    resize_cases("compact=on,chunk_size=64k");
}

#[test]
fn refusals_leave_the_server_serving() {
    if missing(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        &fvd(d, &["create", "-o", "compact=on", "s.fvd", "16M"]),
        "create",
    );
    // An image with internal snapshots: refused (as offline).
    let mut server = serve(d, "s.fvd", &[]);
    let uri = server.uri();
    ok(
        &fvd(d, &["snapshot", "--server", "ctl.sock", "-c", "one"]),
        "snapshot",
    );
    fails(
        &fvd(d, &["resize", "--server", "ctl.sock", "+16M"]),
        "internal snapshots",
        "snapshotted",
    );
    assert_eq!(nbd_size(&uri), 16 * M);
    qemu_io_ok(&uri, &["write -P 3 0 64k", "read -P 3 0 64k"]);
    assert!(server.terminate().success(), "{}", server.log());

    // A read-only export.
    ok(&fvd(d, &["create", "r.fvd", "16M"]), "create");
    let mut server = serve(d, "r.fvd", &["-r"]);
    fails(
        &fvd(d, &["resize", "--server", "ctl.sock", "+16M"]),
        "read-only",
        "read-only export",
    );
    assert_eq!(nbd_size(&server.uri()), 16 * M);
    assert!(server.terminate().success(), "{}", server.log());
}

/// A client writes all the while (pipelined, on a connection opened before
/// the first resize) while the image grows and shrinks again and again:
/// every write succeeds, and the image ends with the last data written to
/// each block.
#[test]
fn writes_in_flight_never_race_with_the_resize() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(&fvd(d, &["create", "w.fvd", "16M"]), "create");
    let server = serve(d, "w.fvd", &[]);
    let sock = d.join("nbd.sock");
    const BLOCKS: u64 = 256;
    const BS: u64 = 4096;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        let (size, _) = c.go("");
        assert_eq!(size, 16 * M);
        let mut last = vec![0u8; BLOCKS as usize];
        let mut round = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while !stop2.load(Ordering::Acquire) || round < 20 {
            round += 1;
            let fill = (round % 250 + 1) as u8;
            let mut sent = Vec::new();
            for i in 0..16u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b = x % BLOCKS;
                let payload = vec![fill; BS as usize];
                c.request(Cmd::Write, 0, round * 16 + i, b * BS, BS, &payload);
                sent.push(b);
            }
            for b in sent {
                let r = c.reply();
                assert_eq!(r.error(), 0, "write to block {b} in round {round} failed");
                last[b as usize] = fill;
            }
        }
        last
    });
    for _ in 0..6 {
        ok(
            &fvd(d, &["resize", "--server", "ctl.sock", "+16M"]),
            "grow while writing",
        );
        ok(
            &fvd(d, &["resize", "--server", "ctl.sock", "--shrink", "16M"]),
            "shrink while writing",
        );
    }
    stop.store(true, Ordering::Release);
    let last = writer.join().expect("the writer");
    let mut server = server;
    assert!(server.terminate().success(), "{}", server.log());
    let data = engine_content(&d.join("w.fvd"), Format::Fvd);
    assert_eq!(data.len() as u64, 16 * M);
    for (b, &want) in last.iter().enumerate() {
        let block = &data[b * BS as usize..(b + 1) * BS as usize];
        assert!(
            block.iter().all(|&v| v == want),
            "block {b}: expected {want}, found {}",
            block[0]
        );
    }
}

fn query_stats(ctl: &Path) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(ctl).unwrap();
    s.write_all(b"{\"execute\": \"query-stats\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["return"].clone()
}

/// A prefetch running when the image is resized goes on with the reopened
/// image and finishes there; the statistics keep counting.
#[test]
fn prefetch_goes_on_after_an_online_resize() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base: Vec<u8> = (0..16 * M).map(|i| (i / 4096 % 251) as u8 + 1).collect();
    std::fs::write(d.join("base.raw"), &base).unwrap();
    ok(
        &fvd(d, &["create", "-b", "base.raw", "-F", "raw", "p.fvd"]),
        "create",
    );
    let server = serve(
        d,
        "p.fvd",
        &["--prefetch", "adaptive", "--prefetch-rate", "8M"],
    );
    let ctl = d.join("ctl.sock");
    std::thread::sleep(std::time::Duration::from_millis(400));
    let before = query_stats(&ctl);
    assert_eq!(before["prefetch"]["state"], "running", "{before}");
    ok(
        &fvd(d, &["resize", "--server", "ctl.sock", "+16M"]),
        "grow during prefetch",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let after = loop {
        let s = query_stats(&ctl);
        if s["prefetch"]["state"] == "done" {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prefetch never finished: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(after["virtual-size"], 32 * M);
    assert_eq!(after["local-blocks"], after["base-blocks"], "{after}");
    assert!(
        after["base-bytes-read"].as_u64().unwrap() >= 16 * M,
        "counters carried over the resize: {after}"
    );
    let mut server = server;
    assert!(server.terminate().success(), "{}", server.log());
    let data = engine_content(&d.join("p.fvd"), Format::Fvd);
    assert!(data[..16 * M as usize] == base[..], "base data kept");
    assert!(
        data[16 * M as usize..].iter().all(|&b| b == 0),
        "new space zeros"
    );
    // Detached: the image reads the same without its base.
    std::fs::remove_file(d.join("base.raw")).unwrap();
    let info = ok(
        &fvd(d, &["info", "--output=json", "p.fvd"]),
        "info without base",
    );
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
}
