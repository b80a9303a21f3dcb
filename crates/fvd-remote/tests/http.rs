//! HTTP(S) bases against nginx (ranges, ETag/Last-Modified, redirects,
//! TLS with a private CA) and against a small scripted server in this file
//! (chunked 206 answers, 503 then success, servers that ignore ranges or
//! close every connection).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use common::*;
use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::executor::block_on;
use fvd_remote::Policy;
use fvd_remote::http::HttpBase;

const SIZE: usize = 6 << 20;

fn quick_policy() -> Policy {
    Policy {
        attempts: 4,
        base_delay: Duration::from_millis(20),
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        ..Policy::default()
    }
}

/// Replace `path` with `bytes` (same size, different content) and move
/// its mtime forward, as a new upload would.
fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(30))
        .unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn nginx_base_reads_match_and_a_changed_file_is_refused() {
    let t = "nginx_base_reads_match_and_a_changed_file_is_refused";
    if !have("nginx", t) || !have("qemu-img", t) || !have("qemu-io", t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    let bytes = data(3, SIZE);
    std::fs::write(www.join("base.raw"), &bytes).unwrap();
    std::fs::write(d.join("base.raw"), &bytes).unwrap();
    let port = free_port();
    // Few requests per connection: reads must survive servers closing
    // kept-alive connections.
    let _ng = nginx(
        d,
        &www,
        port,
        "keepalive_requests 3;\n    location = /old.raw { return 301 /base.raw; }",
    );
    let url = format!("http://127.0.0.1:{port}/base.raw");

    let base = open_base(&url, "raw").unwrap();
    assert_eq!(base.size(), SIZE as u64);
    assert!(base.validator().contains("etag=\""), "{}", base.validator());
    assert!(
        base.validator().contains("last-modified="),
        "{}",
        base.validator()
    );
    let futs: Vec<_> = (0..40u64)
        .map(|i| {
            let off = (i * 123_457) % (SIZE as u64 - 70_000);
            (off, base.read_at(off, IoBuf::zeroed(70_000)))
        })
        .collect();
    for (off, f) in futs {
        let b = block_on(f).unwrap();
        assert_eq!(&b[..], &bytes[off as usize..off as usize + 70_000]);
    }
    assert_eq!(read_all(base.as_ref()), bytes);
    let b = block_on(base.read_at(SIZE as u64 - 10, IoBuf::zeroed(30))).unwrap();
    assert_eq!(&b[..10], &bytes[SIZE - 10..]);
    assert!(b[10..].iter().all(|&x| x == 0));
    let runs = block_on(base.allocation(0, SIZE as u64 + 4096)).unwrap();
    assert_eq!(runs.len(), 2);

    // A redirect is followed; messages keep the URL as written.
    let old = format!("http://127.0.0.1:{port}/old.raw");
    let moved = open_base(&old, "raw").unwrap();
    assert_eq!(moved.describe(), old);
    assert_eq!(read_all(moved.as_ref()), bytes);

    let fvd = fvd_bin(t);
    if let Some(fvd) = &fvd {
        cli_cow_check(d, fvd, &url);
    }

    // The file changes on the server (same size, new content and mtime):
    // an open base notices at its next read, and the image refuses to open.
    replace_file(&www.join("base.raw"), &data(4, SIZE));
    let e = block_on(base.read_at(0, IoBuf::zeroed(4096))).expect_err("read of a changed file");
    assert!(e.to_string().contains("changed on the server"), "{e}");
    if let Some(fvd) = &fvd {
        run(d, fvd, &["io", "-c", "read 0 4096", "img.fvd"])
            .fails_with("open after the change", "changed");
    }
}

#[test]
fn nginx_errors_are_clear() {
    let t = "nginx_errors_are_clear";
    if !have("nginx", t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let www = d.join("www");
    std::fs::create_dir_all(www.join("noranges")).unwrap();
    std::fs::write(www.join("base.raw"), data(5, 1 << 20)).unwrap();
    std::fs::write(www.join("noranges/base.raw"), data(5, 1 << 20)).unwrap();
    std::fs::write(www.join("secret.raw"), b"x").unwrap();
    let port = free_port();
    let _ng = nginx(
        d,
        &www,
        port,
        "location /noranges/ { max_ranges 0; }\n    location = /secret.raw { return 403; }\n    \
         location = /broken.raw { return 500; }",
    );
    let p = quick_policy();
    let open = |path: &str| block_on(HttpBase::open(&format!("http://127.0.0.1:{port}{path}"), p));
    let e = open("/missing.raw").err().unwrap();
    assert!(e.to_string().contains("404"), "{e}");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    let e = open("/secret.raw").err().unwrap();
    assert!(e.to_string().contains("403"), "{e}");
    let e = open("/noranges/base.raw").err().unwrap();
    assert!(
        e.to_string().contains("does not support range requests"),
        "{e}"
    );
    let e = open("/broken.raw").err().unwrap();
    assert!(
        e.to_string().contains("500") && e.to_string().contains("gave up after 4 tries"),
        "{e}"
    );
    // Nothing listening.
    let e = block_on(HttpBase::open(
        &format!("http://127.0.0.1:{}/x", free_port()),
        p,
    ))
    .err()
    .unwrap();
    assert!(e.to_string().contains("refused"), "{e}");
    // Through the provider, as the CLI sees it.
    let e = open_base(&format!("http://127.0.0.1:{port}/missing.raw"), "raw")
        .err()
        .unwrap();
    assert_eq!(e.kind(), fvd_core::ErrorKind::NotFound);
    assert!(e.to_string().contains("/missing.raw"), "{e}");
}

/// nginx with TLS (offering HTTP/2) and a certificate from a private CA:
/// trusted through SSL_CERT_FILE, refused without it.
#[test]
fn https_with_a_private_ca() {
    let t = "https_with_a_private_ca";
    if !have("nginx", t) || !have("openssl", t) || !have("qemu-img", t) || !have("qemu-io", t) {
        return;
    }
    let Some(fvd) = fvd_bin(t) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, cert, key) = private_ca(d);
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    let bytes = data(9, SIZE);
    std::fs::write(www.join("base.raw"), &bytes).unwrap();
    std::fs::write(d.join("base.raw"), &bytes).unwrap();
    let port = free_port();
    let extra = format!(
        "ssl_certificate {};\n    ssl_certificate_key {};",
        cert.display(),
        key.display()
    );
    let _ng = nginx(d, &www, port, &extra);
    let url = format!("https://127.0.0.1:{port}/base.raw");
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    run_env(
        d,
        &fvd,
        &["create", "-q", "-b", &url, "-F", "raw", "img.fvd"],
        &env,
    )
    .ok("create over https");
    run_env(
        d,
        &fvd,
        &["convert", "-f", "fvd", "img.fvd", "-O", "raw", "out.raw"],
        &env,
    )
    .ok("convert");
    assert_same_raw(d, "out.raw", "base.raw");
    // nginx offered HTTP/2 in the TLS handshake, and the client took it.
    let access = std::fs::read_to_string(d.join("nginx/access.log")).unwrap();
    assert!(
        access.lines().any(|l| l.contains("HTTP/2.0\" 206")),
        "no HTTP/2 range request in nginx's log:\n{access}"
    );
    run_env(
        d,
        &fvd,
        &["io", "-c", "write -P 0x42 1000 5000", "img.fvd"],
        &env,
    )
    .ok("write");
    run_env(
        d,
        &fvd,
        &[
            "io",
            "-c",
            "read -P 0x42 1000 5000",
            "-c",
            "read 0 1000",
            "img.fvd",
        ],
        &env,
    )
    .ok("read");
    // Without the private CA the server is not trusted.
    run(
        d,
        &fvd,
        &["create", "-q", "-b", &url, "-F", "raw", "img2.fvd"],
    )
    .fails_with("create without the CA", "certificate");
}

/// How the scripted server answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 206 with a chunked body (chunks of 1000 bytes), keep-alive.
    Chunked,
    /// 503 to the first two requests, then plain 206 with Content-Length.
    Flaky,
    /// 206 and `Connection: close` on every answer.
    Close,
    /// 200 with the whole file, whatever the Range says.
    IgnoreRanges,
}

/// A one-file HTTP/1.1 server for byte ranges, answering as `mode` says.
/// Returns its port and a request counter.
fn scripted_server(file: Arc<Vec<u8>>, mode: Mode) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let file = file.clone();
            let c = c.clone();
            std::thread::spawn(move || serve(conn, &file, mode, &c));
        }
    });
    (port, count)
}

fn serve(conn: std::net::TcpStream, file: &[u8], mode: Mode, count: &AtomicUsize) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut range = None;
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            // Header names are case-insensitive (HTTP/1.1 clients may send
            // them in lower case).
            if let Some((name, v)) = h.split_once(':')
                && name.eq_ignore_ascii_case("range")
            {
                let v = v.trim().strip_prefix("bytes=").unwrap();
                let (a, b) = v.split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
            }
        }
        let n = count.fetch_add(1, Ordering::SeqCst);
        let (a, b) = range.expect("a range request");
        let b = b.min(file.len() - 1);
        let body = &file[a..=b];
        let cr = format!(
            "Content-Range: bytes {a}-{b}/{}\r\nETag: \"v1\"\r\n",
            file.len()
        );
        let ok = match mode {
            Mode::Chunked => {
                let mut out = format!(
                    "HTTP/1.1 206 Partial Content\r\n{cr}Transfer-Encoding: chunked\r\n\r\n"
                )
                .into_bytes();
                for chunk in body.chunks(1000) {
                    out.extend_from_slice(format!("{:x};ext=1\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
                w.write_all(&out).is_ok()
            }
            Mode::Flaky if n < 2 => w
                .write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nRetry-After: 0\r\n\r\nbusy")
                .is_ok(),
            Mode::Flaky | Mode::Close => {
                let close = if mode == Mode::Close {
                    "Connection: close\r\n"
                } else {
                    ""
                };
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\n{cr}{close}Content-Length: {}\r\n\r\n",
                    body.len()
                );
                w.write_all(head.as_bytes()).is_ok() && w.write_all(body).is_ok()
            }
            Mode::IgnoreRanges => {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", file.len());
                w.write_all(head.as_bytes()).is_ok() && w.write_all(file).is_ok()
            }
        };
        if !ok || mode == Mode::Close {
            return;
        }
    }
}

#[test]
fn scripted_servers() {
    let file = Arc::new(data(11, 300_000));
    let p = quick_policy();
    for mode in [Mode::Chunked, Mode::Flaky, Mode::Close] {
        let (port, count) = scripted_server(file.clone(), mode);
        let url = format!("http://127.0.0.1:{port}/f.raw");
        let base = block_on(HttpBase::open(&url, p)).unwrap();
        assert_eq!(base.size(), 300_000);
        assert_eq!(base.validator(), "size=300000;etag=\"v1\"");
        for (off, len) in [
            (0u64, 300_000usize),
            (1, 1),
            (299_990, 50),
            (12_345, 100_000),
        ] {
            let b = block_on(base.read_at(off, IoBuf::zeroed(len))).unwrap();
            let inside = (300_000 - off as usize).min(len);
            assert_eq!(&b[..inside], &file[off as usize..off as usize + inside]);
            assert!(b[inside..].iter().all(|&x| x == 0));
        }
        assert!(count.load(Ordering::SeqCst) >= 5);
    }
    let (port, _) = scripted_server(file.clone(), Mode::IgnoreRanges);
    let e = block_on(HttpBase::open(&format!("http://127.0.0.1:{port}/f.raw"), p))
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("does not support range requests"),
        "{e}"
    );
}

/// Servers the tests start are stopped with everything they forked: nginx's
/// workers must not outlive the test (they used to, holding their ports).
#[test]
fn nginx_workers_stop_with_the_server() {
    let t = "nginx_workers_stop_with_the_server";
    if !have("nginx", t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let www = d.join("www");
    std::fs::create_dir(&www).unwrap();
    let port = free_port();
    let server = nginx(d, &www, port, "");
    let t0 = std::time::Instant::now();
    let mut workers = server.group_members();
    while workers.is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        workers = server.group_members();
    }
    assert!(!workers.is_empty(), "nginx started no worker");
    drop(server);
    let alive = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    let t0 = std::time::Instant::now();
    while workers.iter().any(alive) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<&i32> = workers.iter().filter(|p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "nginx workers {left:?} outlived the server"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections"
    );
}
