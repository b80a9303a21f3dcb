//! One cache per host for a remote base (`fvd cache serve`) and the
//! read-only export over a writable image (`fvd serve --read-only-export`),
//! with the base behind a real NBD server (nbdkit) whose log filter records
//! every read it answers.

use fvd_testkit::wait_path;
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const FVD: &str = env!("CARGO_BIN_EXE_fvd");
const MIB: u64 = 1 << 20;
/// Granule of the base's pattern.
const BLOCK: u64 = 64 << 10;
/// The cache's block size (its default for bases up to 16 GiB).
const CBLOCK: u64 = 4096;

/// A server process: SIGTERM and wait when dropped.
struct Proc(Option<Child>);

impl Proc {
    /// SIGKILL it (a crash) and reap it.
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM it, wait, and return what it printed on standard error.
    fn stop(&mut self) -> String {
        use std::io::Read;
        let Some(mut c) = self.0.take() else {
            return String::new();
        };
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
        let mut s = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A base whose every 64 KiB block has its own bytes.
fn make_base(path: &Path, size: u64) {
    let data: Vec<u8> = (0..size)
        .map(|i| ((i / BLOCK) as u8).wrapping_mul(37) ^ (i % 251) as u8)
        .collect();
    std::fs::write(path, data).unwrap();
}

/// nbdkit serving `base` on a unix socket, logging every request, with a
/// delay per read so that concurrent readers really overlap.
fn nbdkit(dir: &Path, base: &Path, log: &Path) -> (Proc, String) {
    let sock = dir.join("base.sock");
    let child = Command::new("nbdkit")
        .args(["-f", "-U"])
        .arg(&sock)
        .args(["--filter=log", "--filter=delay", "file"])
        .arg(base)
        .arg(format!("logfile={}", log.display()))
        .arg("rdelay=2ms")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_path(&sock);
    (
        Proc(Some(child)),
        format!("nbd+unix:///?socket={}", sock.display()),
    )
}

/// Every read nbdkit answered: (offset, count).
fn base_reads(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let field = |line: &str, name: &str| {
        let v = line.split(name).nth(1)?.split_whitespace().next()?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    text.lines()
        .filter(|l| l.contains(" Read id="))
        .filter_map(|l| Some((field(l, "offset=")?, field(l, "count=")?)))
        .collect()
}

/// Bytes read from the base, and how many times each byte was read at most.
fn fetch_figures(log: &Path) -> (u64, u64) {
    let reads = base_reads(log);
    let total = reads.iter().map(|r| r.1).sum();
    // Count reads per 4 KiB page.
    let mut per_page: BTreeMap<u64, u64> = BTreeMap::new();
    for (off, len) in reads {
        for p in off / 4096..(off + len).div_ceil(4096) {
            *per_page.entry(p).or_default() += 1;
        }
    }
    (total, per_page.values().copied().max().unwrap_or(0))
}

/// Start `fvd ARGS... --socket SOCK EXTRA... TARGET` and wait for its socket.
fn start_fvd(args: &[&str], sock: &Path, extra: &[&str], target: &str) -> Proc {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(FVD)
        .args(args)
        .arg("--socket")
        .arg(sock)
        .args(extra)
        .arg(target)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_path(sock);
    Proc(Some(child))
}

fn cache_serve(dir: &Path, sock: &Path, base_url: &str, extra: &[&str]) -> Proc {
    let cache = dir.join("cache");
    let args = ["cache", "serve", "--dir", cache.to_str().unwrap()];
    start_fvd(&args, sock, extra, base_url)
}

fn serve(image: &Path, sock: &Path, extra: &[&str]) -> Proc {
    start_fvd(&["serve"], sock, extra, image.to_str().unwrap())
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// `qemu-img compare` of the base file with the export at `sock`.
fn compare(base: &Path, sock: &Path) -> common::Run {
    common::run_in(
        base.parent().unwrap(),
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            base.to_str().unwrap(),
            &uri(sock),
        ],
    )
}

fn cache_files(dir: &Path) -> (PathBuf, PathBuf) {
    let mut data = None;
    let mut sums = None;
    for e in std::fs::read_dir(dir.join("cache")).unwrap() {
        let p = e.unwrap().path();
        match p.extension().and_then(|e| e.to_str()) {
            Some("data") => data = Some(p),
            Some("sums") => sums = Some(p),
            _ => {}
        }
    }
    (
        data.expect("a cache data file"),
        sums.expect("a checksum table"),
    )
}

/// Entries of the checksum table that say "cached" (CRC and its complement).
fn present_entries(sums: &Path) -> u64 {
    let b = std::fs::read(sums).unwrap();
    b[4096..]
        .chunks_exact(8)
        .filter(|e| {
            let crc = u32::from_le_bytes(e[0..4].try_into().unwrap());
            let chk = u32::from_le_bytes(e[4..8].try_into().unwrap());
            chk == !crc
        })
        .count() as u64
}

fn tools() -> bool {
    fvd_testkit::have_tools(&["nbdkit", "qemu-img", "qemu-io"])
}

/// A scratch directory with a base of `size` bytes behind nbdkit.
struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    log: PathBuf,
    /// Stops nbdkit when the test ends.
    _kit: Proc,
    base_url: String,
}

fn setup(size: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    make_base(&base, size);
    let log = dir.path().join("base.log");
    let (kit, base_url) = nbdkit(dir.path(), &base, &log);
    Setup {
        dir,
        base,
        log,
        _kit: kit,
        base_url,
    }
}

/// An FVD image over the export (or URL) `lower`.
fn create_overlay(d: &Path, img: &Path, lower: &str) {
    common::fvd(
        d,
        &[
            "create",
            "-q",
            "-b",
            lower,
            "-F",
            "raw",
            img.to_str().unwrap(),
        ],
    )
    .ok("create overlay");
}

#[test]
fn four_images_over_one_cache_fetch_each_block_once() {
    if !tools() {
        return;
    }
    let size = 16 * MIB;
    let s = setup(size);
    let (d, base, log, base_url) = (s.dir.path(), &s.base, &s.log, &s.base_url);
    let csock = d.join("cache.sock");
    let mut cache = cache_serve(d, &csock, base_url, &[]);
    // Four VMs: an overlay each, over the cache's export, each served by
    // its own fvd serve.
    let mut vms = Vec::new();
    for i in 0..4 {
        let img = d.join(format!("vm{i}.fvd"));
        create_overlay(d, &img, &uri(&csock));
        let sock = d.join(format!("vm{i}.sock"));
        vms.push((serve(&img, &sock, &[]), sock));
    }
    // All four read the whole disk at once.
    let runs: Vec<common::Run> = std::thread::scope(|s| {
        let hs: Vec<_> = vms
            .iter()
            .map(|(_, sock)| s.spawn(|| compare(base, sock)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &runs {
        r.ok("compare through an overlay over the cache");
    }
    let (total, most) = fetch_figures(log);
    eprintln!(
        "4 VMs over one cache: {total} bytes fetched from the base for a {size}-byte disk ({:.2}x)",
        total as f64 / size as f64
    );
    assert_eq!(most, 1, "some block was fetched from the base twice");
    assert_eq!(total, size, "the base served {total} bytes for {size}");
    // One server per cache: a second one is refused, naming the file.
    let cache_dir = d.join("cache");
    let second = common::fvd(
        d,
        &[
            "cache",
            "serve",
            "--dir",
            cache_dir.to_str().unwrap(),
            "--socket",
            d.join("second.sock").to_str().unwrap(),
            base_url,
        ],
    );
    second.expect_code(1, "a second server of the same cache");
    assert!(
        second.stderr.contains("in use by another fvd cache serve"),
        "{second:?}"
    );
    drop(vms);
    let err = cache.stop();
    assert!(err.contains("16 MiB fetched from the base"), "{err}");
}

#[test]
fn kill_9_of_the_cache_server_then_restart_keeps_data_correct() {
    if !tools() {
        return;
    }
    let size = 32 * MIB;
    let s = setup(size);
    let (d, base, log, base_url) = (s.dir.path(), &s.base, &s.log, &s.base_url);
    let csock = d.join("cache.sock");
    let mut cache = cache_serve(d, &csock, base_url, &[]);
    let img = d.join("vm.fvd");
    create_overlay(d, &img, &uri(&csock));
    let vsock = d.join("vm.sock");
    let _vm = serve(&img, &vsock, &["--copy-on-read=off"]);
    // A reader in flight while the cache server is killed.
    let during = std::thread::scope(|s| {
        let h = s.spawn(|| compare(base, &vsock));
        // Let it fetch a part (2 ms per base read).
        let t = Instant::now();
        while base_reads(log).len() < 4 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(5));
        }
        cache.kill9();
        std::thread::sleep(Duration::from_millis(200));
        cache = cache_serve(d, &csock, base_url, &[]);
        h.join().unwrap()
    });
    // The reader either rode through the restart (the overlay's NBD client
    // reconnects) or failed with a message; never wrong data.
    // qemu-img compare: 0 identical, 1 different, 2 an error.
    assert_ne!(during.code, 1, "wrong data during the crash: {during:?}");
    if during.code != 0 {
        assert!(
            !during.stderr.trim().is_empty(),
            "compare failed without a message: {during:?}"
        );
    }
    compare(base, &vsock).ok("compare after the restart");
    let (settled, most) = fetch_figures(log);
    // Only fills in flight at the kill were lost: no byte came from the
    // base more than twice, and far less than the disk twice over.
    assert!(most <= 2, "a block was fetched {most} times");
    assert!(settled < 2 * size, "{settled} bytes fetched for {size}");
    // Everything is cached now, the blocks filled before the kill included:
    // a full pass through the cache's own export fetches nothing.
    compare(base, &csock).ok("compare the cache's export itself");
    assert_eq!(fetch_figures(log).0, settled, "a full pass fetched again");
    eprintln!(
        "kill -9 mid-read: {} bytes fetched for a {size}-byte disk; the reader {}",
        settled,
        if during.code == 0 {
            "rode through the restart"
        } else {
            "failed with a message"
        }
    );
    // With the cache server gone for good, a VM's read fails clearly after
    // its retries, instead of returning anything.
    cache.kill9();
    let r = common::run_in(
        d,
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 1M 64k", &uri(&vsock)],
    );
    let said = r.stdout.clone() + &r.stderr;
    assert!(
        said.contains("read failed") && !said.contains("read 65536/65536"),
        "a read with the cache server down: {r:?}"
    );
}

#[test]
fn tiny_cache_limit_evicts_during_reads_and_stays_under_it() {
    if !tools() {
        return;
    }
    let size = 8 * MIB;
    let s = setup(size);
    let (d, base, base_url) = (s.dir.path(), &s.base, &s.base_url);
    let csock = d.join("cache.sock");
    let limit = MIB;
    let mut cache = cache_serve(d, &csock, base_url, &["--max-size", "1M"]);
    let (data, sums) = cache_files(d);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut peak = 0;
    std::thread::scope(|s| {
        let readers: Vec<_> = (0..4).map(|_| s.spawn(|| compare(base, &csock))).collect();
        let watcher = s.spawn(|| {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let used = std::fs::metadata(&data).unwrap().blocks() * 512;
                peak = peak.max(used);
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        for r in readers {
            r.join().unwrap().ok("compare through a tiny cache");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        peak = watcher.join().unwrap();
    });
    let used = std::fs::metadata(&data).unwrap().blocks() * 512;
    assert!(
        used <= limit,
        "the cache holds {used} bytes (limit {limit})"
    );
    // A fill reserves its blocks before writing them, an eviction gives
    // them back after punching: the file never holds more than the limit.
    assert!(
        peak <= limit,
        "the cache peaked at {peak} bytes (limit {limit})"
    );
    assert!(present_entries(&sums) <= limit / CBLOCK);
    let err = cache.stop();
    let evicted: u64 = err
        .split(" blocks evicted")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(evicted > 0, "nothing was evicted: {err}");
}

#[test]
fn flipped_byte_in_a_cached_block_is_refetched_not_served() {
    if !tools() {
        return;
    }
    let size = 4 * MIB;
    let s = setup(size);
    let (d, base, log, base_url) = (s.dir.path(), &s.base, &s.log, &s.base_url);
    let csock = d.join("cache.sock");
    let mut cache = cache_serve(d, &csock, base_url, &[]);
    compare(base, &csock).ok("first pass");
    assert_eq!(fetch_figures(log).0, size);
    cache.stop();
    let (data, _) = cache_files(d);
    let flip = |at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, at).unwrap();
    };
    // On disk while the server is down...
    flip(5 * BLOCK + 1234);
    let n0 = base_reads(log).len();
    let stats = d.join("stats.sock");
    let metrics = free_local_addr();
    let mut cache = cache_serve(
        d,
        &csock,
        base_url,
        &[
            "--stats-socket",
            stats.to_str().unwrap(),
            "--metrics",
            &metrics,
        ],
    );
    wait_path(&stats);
    compare(base, &csock).ok("after a flipped byte");
    assert_eq!(stat_json(&stats)["cache"]["bad-blocks"], 1);
    let reads = base_reads(log);
    assert_eq!(reads.len(), n0 + 1, "{reads:?}");
    assert_eq!(*reads.last().unwrap(), (5 * BLOCK, CBLOCK));
    // ... and under the running server (its stats socket counts it).
    flip(40 * BLOCK + 7);
    compare(base, &csock).ok("after a flip under the server");
    let reads = base_reads(log);
    assert_eq!(*reads.last().unwrap(), (40 * BLOCK, CBLOCK));
    assert_eq!(fetch_figures(log).0, size + 2 * CBLOCK);
    let st = stat_json(&stats);
    assert_eq!(st["cache"]["bad-blocks"], 2, "{st}");
    assert_eq!(st["cache"]["cached-bytes"], size, "{st}");
    // The same figures for Prometheus.
    let page = scrape(&metrics);
    assert!(page.contains("\nfvd_cache_bad_blocks_total 2\n"), "{page}");
    assert!(
        page.contains(&format!("\nfvd_cache_cached_bytes {size}\n")),
        "{page}"
    );
    assert!(
        page.contains(&format!("\nfvd_cache_fetched_bytes_total {}\n", 2 * CBLOCK)),
        "{page}"
    );
    let err = cache.stop();
    assert!(err.contains("2 blocks failed their checksum"), "{err}");
}

/// A loopback `ADDR:PORT` nothing listens on now.
fn free_local_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// The body of `GET /metrics` at `addr` (retried while the server starts).
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = std::net::TcpStream::connect(addr) {
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            return out;
        }
        assert!(Instant::now() < deadline, "no metrics at {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_replaced_base_gets_a_new_cache() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    make_base(&base, MIB);
    let path = |d: &Path| {
        let r = common::fvd(
            d,
            &[
                "cache",
                "path",
                "--output=json",
                "--dir",
                d.join("cache").to_str().unwrap(),
                base.to_str().unwrap(),
            ],
        );
        r.ok("cache path");
        serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap()
    };
    let first = path(d);
    make_base(&base, 2 * MIB);
    let second = path(d);
    assert_ne!(first["data"], second["data"], "{first} {second}");
    assert_ne!(first["validator"], second["validator"]);
    // A cache whose header names another base is started empty, not served.
    let (a, b) = (
        first["sums"].as_str().unwrap().to_string(),
        second["sums"].as_str().unwrap().to_string(),
    );
    assert_ne!(a, b);
}

#[test]
fn read_only_export_refuses_writes_and_fills_the_image() {
    if !tools() {
        return;
    }
    let s = setup(4 * MIB);
    let (d, base, log, base_url) = (s.dir.path(), &s.base, &s.log, &s.base_url);
    let img = d.join("cache.fvd");
    create_overlay(d, &img, base_url);
    let sock = d.join("img.sock");
    let stats = d.join("stats.sock");
    let _srv = serve(
        &img,
        &sock,
        &[
            "--read-only-export",
            "--copy-on-read=on",
            "--stats-socket",
            stats.to_str().unwrap(),
        ],
    );
    wait_path(&stats);
    // Writes are refused: the export says read-only.
    let w = common::run_in(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", &uri(&sock)],
    );
    assert!(
        w.code != 0 || w.stdout.contains("fail") || w.stderr.contains("ermission"),
        "a write went through: {w:?}"
    );
    assert!(
        (w.stdout.clone() + &w.stderr).contains("ermission")
            || (w.stdout.clone() + &w.stderr).contains("read-only")
            || (w.stdout.clone() + &w.stderr).contains("Read-only"),
        "{w:?}"
    );
    if fvd_testkit::have_tools(&["nbdinfo"]) {
        let r = common::run_in(d, "nbdinfo", &["--json", &uri(&sock)]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["exports"][0]["is_read_only"], true, "{v}");
    }
    // Reads fill the image: the second pass fetches nothing.
    compare(base, &sock).ok("first pass");
    let first = fetch_figures(log).0;
    std::thread::sleep(Duration::from_millis(300));
    compare(base, &sock).ok("second pass");
    assert_eq!(
        fetch_figures(log).0,
        first,
        "the second pass went to the base"
    );
    let s = stat_json(&stats);
    assert!(s["copy-on-read-bytes"].as_u64().unwrap() >= 4 * MIB, "{s}");
}

fn stat_json(path: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut s = String::new();
    std::os::unix::net::UnixStream::connect(path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap()
}
