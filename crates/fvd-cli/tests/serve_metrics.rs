//! `fvd serve --metrics`: Prometheus text scraped over HTTP while guest
//! reads of a slow base (nbdkit with its delay filter) are in flight.

use fvd_testkit::wait_path;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const FVD: &str = env!("CARGO_BIN_EXE_fvd");

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// GET `path` from `addr`; (status line, headers, body).
fn get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.into(), headers.to_ascii_lowercase(), body.into())
}

/// The samples of a Prometheus text page, checked for the format's rules
/// (every sample belongs to a family declared by `# TYPE` before it).
fn parse(page: &str) -> HashMap<String, f64> {
    let mut families = HashSet::new();
    let mut out = HashMap::new();
    for line in page.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect(line);
        let name = key.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
            .unwrap_or(name);
        assert!(families.contains(family), "no # TYPE before: {line}");
        let v = if value == "+Inf" {
            f64::INFINITY
        } else {
            value.parse::<f64>().expect(line)
        };
        assert!(out.insert(key.to_string(), v).is_none(), "twice: {line}");
    }
    out
}

const DELAY_MS: u64 = 20;

#[test]
fn metrics_follow_base_reads_while_they_run() {
    if !fvd_testkit::have_tools(&["nbdkit", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 16 << 20]).unwrap();
    let base_sock = dir.path().join("base.sock");
    let _kit = Proc(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&base_sock)
            .args(["--filter=delay", "file"])
            .arg(&base)
            .arg(format!("rdelay={DELAY_MS}ms"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_path(&base_sock);
    let img: PathBuf = dir.path().join("img.fvd");
    let uri = format!("nbd+unix:///?socket={}", base_sock.display());
    let out = Command::new(FVD)
        .args(["create", "-q", "-b", &uri, "-F", "raw"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let sock = dir.path().join("img.sock");
    let mut child = Command::new(FVD)
        .args(["serve", "--copy-on-read", "off", "--metrics", "127.0.0.1:0"])
        .arg("--socket")
        .arg(&sock)
        .arg(&img)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _srv = Proc(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("fvd serve: metrics at http://") {
                let _ = tx.send(url.trim_end_matches("/metrics").to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("fvd serve printed no metrics address");
    wait_path(&sock);

    let (status, headers, body) = get(&addr, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let before = parse(&body);
    assert_eq!(before["fvd_base_reads_total"], 0.0, "{body}");
    assert_eq!(before["fvd_base_read_bytes_total"], 0.0);
    assert_eq!(before["fvd_requests_in_flight"], 0.0);
    assert_eq!(before["fvd_prefetch_state{state=\"off\"}"], 1.0);
    assert!(get(&addr, "/nope").0.contains(" 404 "));

    // 8 rounds of 16 reads of 64 KiB in flight at once, each answered
    // DELAY_MS late by the base server; scrape all the while.
    const ROUNDS: usize = 8;
    const PER_ROUND: usize = 16;
    let mut cmds = Vec::new();
    for r in 0..ROUNDS {
        for i in 0..PER_ROUND {
            cmds.push(format!("aio_read -P 7 {}k 64k", (r * PER_ROUND + i) * 64));
        }
        cmds.push("aio_flush".into());
    }
    let nbd = format!("nbd+unix:///?socket={}", sock.display());
    let io = std::thread::spawn(move || {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in &cmds {
            c.args(["-c", cmd]);
        }
        c.arg(nbd).output().unwrap()
    });
    let (mut max_base, mut max_guest, mut scrapes) = (0.0f64, 0.0f64, 0);
    while !io.is_finished() {
        let m = parse(&get(&addr, "/metrics").2);
        max_base = max_base.max(m["fvd_base_reads_in_flight"]);
        max_guest = max_guest.max(m["fvd_requests_in_flight"]);
        scrapes += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = io.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("Pattern verification"),
        "qemu-io: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        max_base >= 2.0,
        "never saw base reads in flight in {scrapes} scrapes (max {max_base})"
    );
    assert!(
        max_guest >= 2.0,
        "never saw guest requests in flight in {scrapes} scrapes (max {max_guest})"
    );

    let m = parse(&get(&addr, "/metrics").2);
    let reads = (ROUNDS * PER_ROUND) as f64;
    assert_eq!(m["fvd_base_read_bytes_total"], reads * 65536.0);
    assert!(m["fvd_base_reads_total"] >= reads, "{m:?}");
    assert!(m["fvd_requests_total"] >= reads, "{m:?}");
    assert_eq!(m["fvd_base_reads_in_flight"], 0.0);
    assert_eq!(m["fvd_requests_in_flight"], 0.0);
    // Every base read was timed, none faster than the server's delay.
    let count = m["fvd_base_read_duration_seconds_count"];
    assert_eq!(count, m["fvd_base_reads_total"]);
    assert!(m["fvd_base_read_duration_seconds_sum"] >= count * DELAY_MS as f64 / 1000.0);
    assert_eq!(
        m["fvd_base_read_duration_seconds_bucket{le=\"0.01\"}"], 0.0,
        "a base read answered before the server's {DELAY_MS} ms delay"
    );
    assert_eq!(
        m["fvd_base_read_duration_seconds_bucket{le=\"+Inf\"}"],
        count
    );
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("fvd_base_read_duration_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                *v,
            ))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "buckets not cumulative: {buckets:?}"
    );
}
