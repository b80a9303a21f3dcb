//! NBD bases against real servers: qemu-nbd and nbdkit over unix sockets
//! and TCP, with the delay, blocksize-policy and noextents filters, simple
//! replies, a server killed and restarted mid-run.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::executor::block_on;
use fvd_remote::Policy;
use fvd_remote::nbd::NbdBase;

const SIZE: usize = 6 << 20;

fn setup(test: &str) -> Option<(tempfile::TempDir, Vec<u8>)> {
    if !have("qemu-img", test) || !have("qemu-io", test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(7, SIZE);
    write_sparse(&dir.path().join("base.raw"), &bytes);
    Some((dir, bytes))
}

fn quick_policy() -> Policy {
    Policy {
        attempts: 3,
        base_delay: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        ..Policy::default()
    }
}

#[test]
fn qemu_nbd_unix_socket_cow_matches_qemu_io() {
    let t = "qemu_nbd_unix_socket_cow_matches_qemu_io";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("qemu-nbd", t) {
        return;
    }
    let Some(fvd) = fvd_bin(t) else { return };
    let d = dir.path();
    let sock = d.join("q.sock");
    // Default --shared=1: one client at a time, no multi-conn.
    let mut srv = Server::start(
        d,
        Path::new("qemu-nbd"),
        &[
            "-r",
            "-t",
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            "base.raw",
        ],
        "qemu-nbd",
    );
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let base = open_base(&url, "raw").unwrap();
    assert_eq!(base.size(), SIZE as u64);
    assert_eq!(read_all(base.as_ref()), bytes);
    drop(base);
    cli_cow_check(d, &fvd, &url);
}

#[test]
fn nbdkit_unix_socket_cow_and_allocation() {
    let t = "nbdkit_unix_socket_cow_and_allocation";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let Some(fvd) = fvd_bin(t) else { return };
    let d = dir.path();
    let sock = d.join("k.sock");
    let mut srv = Server::start(
        d,
        Path::new("nbdkit"),
        &["-f", "-U", sock.to_str().unwrap(), "file", "base.raw"],
        "nbdkit",
    );
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let nbd = block_on(NbdBase::open(&url, quick_policy())).unwrap();
    assert!(nbd.info().structured);
    assert!(nbd.info().allocation_context.is_some());
    // base:allocation: holes are reported, and every hole reads as zeros.
    let runs = block_on(nbd.allocation(0, SIZE as u64 + 8192)).unwrap();
    assert_eq!(
        runs.iter().map(|r| r.length).sum::<u64>(),
        SIZE as u64 + 8192
    );
    assert!(runs.iter().any(|r| !r.data), "{runs:?}");
    let mut pos = 0usize;
    for r in &runs {
        let end = (pos + r.length as usize).min(SIZE);
        if !r.data && pos < SIZE {
            assert!(bytes[pos..end].iter().all(|&b| b == 0), "hole at {pos}");
        }
        pos += r.length as usize;
    }
    // Many reads in flight (nbdkit allows several connections).
    let futs: Vec<_> = (0..64u64)
        .map(|i| {
            let off = (i * 92_821) % (SIZE as u64 - 9000);
            (off, nbd.read_at(off, IoBuf::zeroed(9000)))
        })
        .collect();
    for (off, f) in futs {
        let b = block_on(f).unwrap();
        assert_eq!(
            &b[..],
            &bytes[off as usize..off as usize + 9000],
            "read at {off}"
        );
    }
    // Reads past the end are zeros.
    let b = block_on(nbd.read_at(SIZE as u64 - 100, IoBuf::zeroed(300))).unwrap();
    assert_eq!(&b[..100], &bytes[SIZE - 100..]);
    assert!(b[100..].iter().all(|&x| x == 0));
    drop(nbd);
    cli_cow_check(d, &fvd, &url);
    let map = run(d, &fvd, &["map", "img.fvd"]);
    map.ok("fvd map");
    assert!(map.stdout.contains("img.fvd"), "{}", map.stdout);
}

#[test]
fn nbdkit_tcp() {
    let t = "nbdkit_tcp";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let port = free_port();
    let p = port.to_string();
    let mut srv = Server::start(
        d,
        Path::new("nbdkit"),
        &["-f", "-i", "127.0.0.1", "-p", &p, "file", "base.raw"],
        "nbdkit",
    );
    wait_tcp(&mut srv, port);
    let url = format!("nbd://127.0.0.1:{port}/");
    let base = open_base(&url, "raw").unwrap();
    assert_eq!(read_all(base.as_ref()), bytes);
    assert_eq!(base.describe(), url);
    drop(base);
    if let Some(fvd) = fvd_bin(t) {
        cli_cow_check(d, &fvd, &url);
    }
}

#[test]
fn nbdkit_delay_filter_is_slow_but_correct() {
    let t = "nbdkit_delay_filter_is_slow_but_correct";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("k.sock");
    let mut srv = Server::start(
        d,
        Path::new("nbdkit"),
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=delay",
            "file",
            "base.raw",
            "rdelay=2ms",
        ],
        "nbdkit",
    );
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let base = open_base(&url, "raw").unwrap();
    let t0 = Instant::now();
    let futs: Vec<_> = (0..200u64)
        .map(|i| {
            let off = (i * 31_337) % (SIZE as u64 - 4096);
            (off, base.read_at(off, IoBuf::zeroed(4096)))
        })
        .collect();
    for (off, f) in futs {
        let b = block_on(f).unwrap();
        assert_eq!(&b[..], &bytes[off as usize..off as usize + 4096]);
    }
    // Every read waits out its 2 ms, but they are in flight together:
    // far less than the 400 ms of one read at a time.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(2) && took < Duration::from_millis(400),
        "{took:?}"
    );
    assert_eq!(read_all(base.as_ref()), bytes);
    drop(base);
    if let Some(fvd) = fvd_bin(t) {
        cli_cow_check(d, &fvd, &url);
    }
}

#[test]
fn block_size_constraints_are_respected() {
    let t = "block_size_constraints_are_respected";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("k.sock");
    // The server refuses unaligned or oversized requests.
    let mut srv = Server::start(
        d,
        Path::new("nbdkit"),
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=blocksize-policy",
            "file",
            "base.raw",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
        "nbdkit",
    );
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let nbd = block_on(NbdBase::open(&url, quick_policy())).unwrap();
    assert_eq!(nbd.info().min_block, 4096);
    assert_eq!(nbd.info().max_block, 65536);
    for (off, len) in [
        (1000u64, 3000usize),
        (4095, 2),
        (12345, 300_000),
        (0, 1 << 20),
        (SIZE as u64 - 10, 10),
    ] {
        let b = block_on(nbd.read_at(off, IoBuf::zeroed(len))).unwrap();
        assert_eq!(
            &b[..],
            &bytes[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    let runs = block_on(nbd.allocation(1000, 3_000_000)).unwrap();
    assert_eq!(runs.iter().map(|r| r.length).sum::<u64>(), 3_000_000);
}

#[test]
fn simple_replies_and_no_extents() {
    let t = "simple_replies_and_no_extents";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("k.sock");
    let mut srv = Server::start(
        d,
        Path::new("nbdkit"),
        &[
            "-f",
            "--no-sr",
            "-U",
            sock.to_str().unwrap(),
            "file",
            "base.raw",
        ],
        "nbdkit",
    );
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let nbd = block_on(NbdBase::open(&url, quick_policy())).unwrap();
    assert!(!nbd.info().structured);
    assert!(nbd.info().allocation_context.is_none());
    assert_eq!(read_all(&nbd), bytes);
    // Without base:allocation everything inside the export is data.
    let runs = block_on(nbd.allocation(0, SIZE as u64 + 512)).unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs[0].data && runs[0].length == SIZE as u64);
    assert!(!runs[1].data && runs[1].length == 512);
}

#[test]
fn unknown_export_is_a_clear_permanent_error() {
    let t = "unknown_export_is_a_clear_permanent_error";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("qemu-nbd", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("q.sock");
    let mut srv = Server::start(
        d,
        Path::new("qemu-nbd"),
        &[
            "-r",
            "-t",
            "-e",
            "4",
            "-x",
            "disk",
            "-f",
            "raw",
            "-k",
            sock.to_str().unwrap(),
            "base.raw",
        ],
        "qemu-nbd",
    );
    wait_unix(&mut srv, &sock);
    let t0 = Instant::now();
    let bad = format!("nbd+unix:///nope?socket={}", sock.display());
    let e = open_base(&bad, "raw").err().expect("unknown export opened");
    assert!(e.to_string().contains("no export named 'nope'"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "permanent errors are not retried"
    );
    let good = format!("nbd+unix:///disk?socket={}", sock.display());
    let base = open_base(&good, "raw").unwrap();
    assert_eq!(read_all(base.as_ref()), bytes);
    // Nothing listening: a clear error naming the URL.
    let none = format!("nbd+unix:///?socket={}", d.join("none.sock").display());
    let e = open_base(&none, "raw")
        .err()
        .expect("opened a missing socket");
    assert!(e.to_string().contains("none.sock"), "{e}");
    let e = open_base("nbds://127.0.0.1/x", "raw").err().unwrap();
    assert!(e.to_string().contains("TLS"), "{e}");
}

/// The image over an NBD base: a base server killed mid-run makes reads of
/// base data fail with EIO while local data stays readable and writable;
/// the image stays consistent; a restarted server is picked up again.
#[test]
fn server_killed_mid_run() {
    let t = "server_killed_mid_run";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("k.sock");
    let args = ["-f", "-U", sock.to_str().unwrap(), "file", "base.raw"];
    let mut srv = Server::start(d, Path::new("nbdkit"), &args, "nbdkit");
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let img_path = d.join("img.fvd");
    block_on(fvd_remote::opener().create(
        &img_path,
        Some(&fvd_core::BaseSpec {
            name: url.clone(),
            format: fvd_core::Format::Raw,
        }),
        fvd_core::CreateOptions::default(),
        None,
    ))
    .unwrap();

    // Open with a short retry policy.
    let base: Arc<dyn Base> = Arc::new(block_on(NbdBase::open(&url, quick_policy())).unwrap());
    let storage = Arc::new(
        fvd_core::storage::FileStorage::open(
            &img_path,
            fvd_core::storage::file::FileOptions::read_write(),
        )
        .unwrap(),
    );
    let img = block_on(fvd_core::Image::open(
        storage,
        Some(base),
        fvd_core::OpenOptions::default(),
    ))
    .unwrap();
    let local = vec![0x77u8; 256 << 10];
    block_on(img.write_slice(1 << 20, &local, false)).unwrap();
    block_on(img.flush()).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    block_on(img.read_slice(4 << 20, &mut buf)).unwrap();
    assert_eq!(&buf[..], &bytes[4 << 20..(4 << 20) + (64 << 10)]);

    srv.kill();
    let t0 = Instant::now();
    let e = block_on(img.read_slice(5 << 20, &mut buf))
        .expect_err("read of base data with the server gone");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Local data still reads; whole-block writes still work.
    let mut got = vec![0u8; local.len()];
    block_on(img.read_slice(1 << 20, &mut got)).unwrap();
    assert_eq!(got, local);
    block_on(img.write_slice(2 << 20, &vec![0x99u8; 64 << 10], false)).unwrap();
    block_on(img.flush()).unwrap();
    block_on(img.close()).unwrap();
    drop(img);
    let report = block_on(fvd_core::check::check_path(
        &img_path,
        fvd_core::Format::Fvd,
        None,
    ))
    .unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");

    // The server comes back: the image opens and reads everything again.
    let _ = std::fs::remove_file(&sock);
    let mut srv = Server::start(d, Path::new("nbdkit"), &args, "nbdkit2");
    wait_unix(&mut srv, &sock);
    let img =
        block_on(fvd_remote::opener().open(&img_path, fvd_core::Format::Fvd, Default::default()))
            .unwrap();
    let mut all = vec![0u8; SIZE];
    block_on(img.read_slice(0, &mut all)).unwrap();
    let mut expect = bytes.clone();
    expect[1 << 20..(1 << 20) + local.len()].copy_from_slice(&local);
    expect[2 << 20..(2 << 20) + (64 << 10)].fill(0x99);
    assert!(all == expect, "content after the restart differs");
}

/// A base whose server restarts between two reads: the second read
/// reconnects (a retry) and succeeds.
#[test]
fn reconnects_after_server_restart() {
    let t = "reconnects_after_server_restart";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("k.sock");
    let args = ["-f", "-U", sock.to_str().unwrap(), "file", "base.raw"];
    let mut srv = Server::start(d, Path::new("nbdkit"), &args, "nbdkit");
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let policy = Policy {
        attempts: 8,
        base_delay: Duration::from_millis(100),
        ..quick_policy()
    };
    let nbd = block_on(NbdBase::open(&url, policy)).unwrap();
    let b = block_on(nbd.read_at(0, IoBuf::zeroed(4096))).unwrap();
    assert_eq!(&b[..], &bytes[..4096]);
    srv.kill();
    let _ = std::fs::remove_file(&sock);
    // Read while the server is down; it comes back 300 ms later. (The
    // server is started from this thread: nbdkit exits with the thread
    // that started it.)
    let nbd = Arc::new(nbd);
    let reader = {
        let nbd = nbd.clone();
        std::thread::spawn(move || block_on(nbd.read_at(1 << 20, IoBuf::zeroed(4096))))
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut srv = Server::start(d, Path::new("nbdkit"), &args, "nbdkit2");
    wait_unix(&mut srv, &sock);
    let b = reader.join().unwrap().unwrap();
    assert_eq!(&b[..], &bytes[1 << 20..(1 << 20) + 4096]);
}

/// Reads in flight when the base server is killed: they are sent again on
/// a new connection once it is back, and return the right data.
#[test]
fn reads_in_flight_survive_a_server_restart() {
    let t = "reads_in_flight_survive_a_server_restart";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) {
        return;
    }
    let d = dir.path();
    let sock = d.join("k.sock");
    // Each read waits 500 ms at the server: plenty of time to kill it.
    let args = [
        "-f",
        "-U",
        sock.to_str().unwrap(),
        "--filter=delay",
        "file",
        "base.raw",
        "rdelay=500ms",
    ];
    let mut srv = Server::start(d, Path::new("nbdkit"), &args, "nbdkit");
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let policy = Policy {
        attempts: 10,
        base_delay: Duration::from_millis(100),
        ..quick_policy()
    };
    let nbd = block_on(NbdBase::open(&url, policy)).unwrap();
    let reads: Vec<_> = (0..16u64)
        .map(|i| {
            let off = i * 300_001 % (SIZE as u64 - 8192);
            (off, nbd.read_at(off, IoBuf::zeroed(8192)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    srv.kill();
    let _ = std::fs::remove_file(&sock);
    let _srv = Server::start(d, Path::new("nbdkit"), &args, "nbdkit2");
    for (off, f) in reads {
        let b = block_on(f).unwrap();
        assert!(
            b[..] == bytes[off as usize..off as usize + 8192],
            "read at {off}"
        );
    }
}

/// Several connections where the server advertises multi-conn (nbdkit),
/// one where it does not (qemu-nbd without --shared).
#[test]
fn connections_follow_multi_conn() {
    let t = "connections_follow_multi_conn";
    let Some((dir, bytes)) = setup(t) else { return };
    if !have("nbdkit", t) || !have("qemu-nbd", t) {
        return;
    }
    let d = dir.path();
    let load = |nbd: &NbdBase| {
        let reads: Vec<_> = (0..128u64)
            .map(|i| {
                let off = i * 40_000;
                (off, nbd.read_at(off, IoBuf::zeroed(4096)))
            })
            .collect();
        for (off, f) in reads {
            let b = block_on(f).unwrap();
            assert!(b[..] == bytes[off as usize..off as usize + 4096], "{off}");
        }
    };
    let sock = d.join("k.sock");
    let mut srv = Server::start(
        d,
        Path::new("nbdkit"),
        &[
            "-f",
            "-U",
            sock.to_str().unwrap(),
            "--filter=delay",
            "file",
            "base.raw",
            "rdelay=5ms",
        ],
        "nbdkit",
    );
    wait_unix(&mut srv, &sock);
    let url = format!("nbd+unix:///?socket={}", sock.display());
    let nbd = block_on(NbdBase::open(&url, quick_policy())).unwrap();
    assert_ne!(
        nbd.info().flags & fvd_nbd::proto::consts::FLAG_CAN_MULTI_CONN,
        0
    );
    load(&nbd);
    load(&nbd);
    let n = nbd.client().connections();
    assert!(n > 1 && n <= quick_policy().connections, "{n} connections");

    let qsock = d.join("q.sock");
    let mut q = Server::start(
        d,
        Path::new("qemu-nbd"),
        &[
            "-r",
            "-t",
            "-f",
            "raw",
            "-k",
            qsock.to_str().unwrap(),
            "base.raw",
        ],
        "qemu-nbd",
    );
    wait_unix(&mut q, &qsock);
    let url = format!("nbd+unix:///?socket={}", qsock.display());
    let nbd = block_on(NbdBase::open(&url, quick_policy())).unwrap();
    load(&nbd);
    assert_eq!(nbd.client().connections(), 1);
    assert_eq!(nbd.client().max_connections(), 1);
}
