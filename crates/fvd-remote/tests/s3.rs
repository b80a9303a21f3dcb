//! S3 bases against a real SeaweedFS started by the tests (signed reads,
//! the CLI over s3:// images, qcow2 content, errors, a replaced object, a
//! restart in the middle of reads, presigned URLs and S3 over HTTPS with a
//! private CA), and against a small scripted server in this file (503
//! SlowDown, the signature and If-Match on every read).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::executor::block_on;
use fvd_remote::Policy;
use fvd_remote::s3::{Options, S3Base};

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

/// Options that point at `endpoint` with the test identity.
fn options(endpoint: &str) -> Options {
    Options {
        endpoint: Some(endpoint.to_string()),
        region: Some(S3_REGION.to_string()),
        access_key_id: Some(S3_KEY.to_string()),
        secret_access_key: Some(S3_SECRET.to_string()),
        ..Options::default()
    }
}

fn open(url: &str, policy: Policy, o: &Options) -> std::io::Result<S3Base> {
    block_on(S3Base::open_with(url, policy, o))
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Reads at many offsets at once, compared with `bytes`.
fn check_reads(base: &dyn Base, bytes: &[u8]) {
    let size = bytes.len() as u64;
    let futs: Vec<_> = (0..40u64)
        .map(|i| {
            let off = (i * 123_457) % (size - 70_000);
            (off, base.read_at(off, IoBuf::zeroed(70_000)))
        })
        .collect();
    for (off, f) in futs {
        let b = block_on(f).unwrap();
        assert_eq!(&b[..], &bytes[off as usize..off as usize + 70_000]);
    }
    let b = block_on(base.read_at(size - 10, IoBuf::zeroed(30))).unwrap();
    assert_eq!(&b[..10], &bytes[bytes.len() - 10..]);
    assert!(b[10..].iter().all(|&x| x == 0));
}

#[test]
fn seaweedfs_signed_reads_cli_serve_and_qcow2() {
    let t = "seaweedfs_signed_reads_cli_serve_and_qcow2";
    if !have("weed", t) || !have("qemu-img", t) || !have("qemu-io", t) {
        return;
    }
    let Some(fvd) = fvd_bin(t) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut w = Seaweed::start(d, None);
    w.create_bucket("fvd");
    let bytes = data(21, SIZE);
    std::fs::write(d.join("base.raw"), &bytes).unwrap();
    w.put("fvd", "dir/base.raw", &bytes);
    let url = "s3://fvd/dir/base.raw";

    // The library, many reads in flight.
    let base = open(url, quick_policy(), &options(&w.endpoint)).unwrap();
    assert_eq!(base.size(), SIZE as u64);
    assert_eq!(base.describe(), url);
    assert!(
        base.validator().contains(";etag=\""),
        "{}",
        base.validator()
    );
    check_reads(&base, &bytes);
    assert_eq!(read_all(&base), bytes);

    // The CLI, configured by the AWS_* variables: create, io, convert,
    // check.
    let env = w.env();
    let envr = env_refs(&env);
    cli_cow_check_env(d, &fvd, url, "raw", "base.raw", &envr);
    // The image records the URL, and neither the endpoint nor a key.
    let img = std::fs::read(d.join("img.fvd")).unwrap();
    let port = w.endpoint.rsplit(':').next().unwrap();
    for secret in [S3_KEY, S3_SECRET, &format!("127.0.0.1:{port}")] {
        assert!(
            !img.windows(secret.len()).any(|x| x == secret.as_bytes()),
            "the image holds '{secret}'"
        );
    }
    let info = run_env(d, &fvd, &["info", "--output=json", "img.fvd"], &envr);
    info.ok("fvd info");
    assert!(
        info.stdout
            .contains(&format!("\"backing-filename\": \"{url}\"")),
        "{}",
        info.stdout
    );

    // --object instead of the variables; without credentials the store
    // says no, on one line.
    std::fs::write(d.join("secret"), format!("{S3_SECRET}\n")).unwrap();
    let object = format!(
        "s3,endpoint={},region={S3_REGION},url-style=path,access-key-id={S3_KEY},\
         secret-access-key-file={}",
        w.endpoint,
        d.join("secret").display()
    );
    run(d, &fvd, &["info", "--object", &object, "img.fvd"]).ok("info with --object");
    let anon = run_env(
        d,
        &fvd,
        &["info", "img.fvd"],
        &[("AWS_ENDPOINT_URL", w.endpoint.as_str())],
    );
    anon.fails_with("info without credentials", "403");
    assert_eq!(anon.stderr.trim().lines().count(), 1, "{}", anon.stderr);

    // fvd serve of the image, read over NBD by qemu-img.
    let sock = d.join("nbd.sock");
    let mut serve = Server::start_env(
        d,
        &fvd,
        &["serve", "-r", "-k", sock.to_str().unwrap(), "img.fvd"],
        "serve",
        &envr,
    );
    wait_unix(&mut serve, &sock);
    let nbd = format!("nbd+unix:///?socket={}", sock.display());
    run(
        d,
        Path::new("qemu-img"),
        &["compare", "-f", "raw", "-F", "raw", "exp.raw", &nbd],
    )
    .ok("qemu-img compare over fvd serve");
    serve.kill();

    // qcow2 content over S3: an image over a raw object in the same
    // "directory" (a relative backing file name).
    let qi = |args: &[&str]| {
        run(d, Path::new("qemu-img"), args).ok("qemu-img");
    };
    qi(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qcow2",
    ]);
    run(
        d,
        Path::new("qemu-io"),
        &[
            "-c",
            "write -P 0x33 1M 192k",
            "-c",
            "write -z 4M 8k",
            "top.qcow2",
        ],
    )
    .ok("qemu-io");
    qi(&["convert", "-O", "raw", "top.qcow2", "top.raw"]);
    w.put(
        "fvd",
        "dir/top.qcow2",
        &std::fs::read(d.join("top.qcow2")).unwrap(),
    );
    cli_cow_check_env(d, &fvd, "s3://fvd/dir/top.qcow2", "qcow2", "top.raw", &envr);
}

#[test]
fn seaweedfs_errors_are_clear_and_a_replaced_object_is_refused() {
    let t = "seaweedfs_errors_are_clear_and_a_replaced_object_is_refused";
    if !have("weed", t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut w = Seaweed::start(d, None);
    w.create_bucket("fvd");
    w.put("fvd", "obj.raw", &data(31, 1 << 20));
    let p = quick_policy();
    let good = options(&w.endpoint);
    let url = "s3://fvd/obj.raw";

    let one_line = |e: &std::io::Error| {
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        m
    };
    let wrong_secret = Options {
        secret_access_key: Some("not-the-secret".into()),
        ..good.clone()
    };
    let e = open(url, p, &wrong_secret).err().unwrap();
    let m = one_line(&e);
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{m}");
    assert!(
        m.contains("403") && m.contains("SignatureDoesNotMatch") && m.contains("credentials"),
        "{m}"
    );
    let wrong_key = Options {
        access_key_id: Some("nosuchkey".into()),
        ..good.clone()
    };
    let m = one_line(&open(url, p, &wrong_key).err().unwrap());
    assert!(m.contains("403") && m.contains("InvalidAccessKeyId"), "{m}");
    let e = open("s3://fvd/missing.raw", p, &good).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(one_line(&e).contains("NoSuchKey"), "{e}");
    let e = open("s3://nosuchbucket/x.raw", p, &good).err().unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert!(one_line(&e).contains("NoSuchBucket"), "{e}");

    // The CLI prints one line naming the URL and the store's reason.
    if let Some(fvd) = fvd_bin(t) {
        let mut env = w.env();
        env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
        env.push(("AWS_SECRET_ACCESS_KEY", "wrong".into()));
        let r = run_env(
            d,
            &fvd,
            &["create", "-q", "-b", url, "-F", "raw", "img.fvd"],
            &env_refs(&env),
        );
        r.fails_with("create with a wrong key", "SignatureDoesNotMatch");
        assert!(r.stderr.contains(url), "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);

        let env = w.env();
        run_env(
            d,
            &fvd,
            &["create", "-q", "-b", url, "-F", "raw", "img.fvd"],
            &env_refs(&env),
        )
        .ok("create");
    }

    // The object is replaced under an open base: the next read fails
    // (If-Match answered 412) instead of mixing versions, and the image
    // refuses to open.
    let base = open(url, p, &good).unwrap();
    block_on(base.read_at(0, IoBuf::zeroed(4096))).unwrap();
    w.put("fvd", "obj.raw", &data(32, 1 << 20));
    let e =
        block_on(base.read_at(4096, IoBuf::zeroed(4096))).expect_err("read of a replaced object");
    let m = one_line(&e);
    assert!(
        m.contains("changed on the server") && m.contains("412"),
        "{m}"
    );
    if let Some(fvd) = fvd_bin(t) {
        run_env(
            d,
            &fvd,
            &["io", "-c", "read 0 4096", "img.fvd"],
            &env_refs(&w.env()),
        )
        .fails_with("open after the replacement", "changed");
    }
}

#[test]
fn seaweedfs_restarted_mid_read_is_retried() {
    let t = "seaweedfs_restarted_mid_read_is_retried";
    if !have("weed", t) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut w = Seaweed::start(d, None);
    w.create_bucket("fvd");
    let bytes = Arc::new(data(41, 16 << 20));
    w.put("fvd", "big.raw", &bytes);
    // Tries enough to span a restart (SeaweedFS answers 500 for ~12 s
    // after one).
    let policy = Policy {
        attempts: 100,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(10),
        ..Policy::default()
    };
    let base = Arc::new(open("s3://fvd/big.raw", policy, &options(&w.endpoint)).unwrap());
    let reads = Arc::new(AtomicUsize::new(0));
    let restarted = Arc::new(AtomicBool::new(false));
    let reader = {
        let (base, bytes) = (base.clone(), bytes.clone());
        let (reads, restarted) = (reads.clone(), restarted.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut longest = Duration::ZERO;
            // Sequential 256 KiB reads, 8 in flight, round the object until
            // it was read whole once after the restart.
            let piece = 256 << 10;
            let n = bytes.len() / piece;
            let (mut i, mut after) = (0usize, 0usize);
            while after < n {
                assert!(
                    t0.elapsed() < Duration::from_secs(180),
                    "reads took too long"
                );
                let batch: Vec<_> = (0..8)
                    .map(|k| {
                        let off = ((i + k) % n) * piece;
                        (off, base.read_at(off as u64, IoBuf::zeroed(piece)))
                    })
                    .collect();
                let started = Instant::now();
                let was_restarted = restarted.load(Ordering::SeqCst);
                for (off, f) in batch {
                    let b = block_on(f).unwrap_or_else(|e| panic!("read at {off}: {e}"));
                    assert_eq!(&b[..], &bytes[off..off + piece], "data at {off}");
                    reads.fetch_add(1, Ordering::SeqCst);
                }
                longest = longest.max(started.elapsed());
                i += 8;
                if was_restarted {
                    after += 8;
                }
            }
            longest
        })
    };
    while reads.load(Ordering::SeqCst) < 64 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // A crash and a restart in the middle of the reads.
    w.kill();
    std::thread::sleep(Duration::from_millis(500));
    let before = reads.load(Ordering::SeqCst);
    w.restart();
    restarted.store(true, Ordering::SeqCst);
    let longest = reader.join().expect("reads across the restart");
    let after = reads.load(Ordering::SeqCst);
    assert!(after > before, "no read completed after the restart");
    assert!(
        longest > Duration::from_millis(500),
        "no read waited for the restart ({longest:?})"
    );
}

#[test]
fn seaweedfs_presigned_and_signed_over_https() {
    let t = "seaweedfs_presigned_and_signed_over_https";
    if !have("weed", t) || !have("openssl", t) || !have("qemu-img", t) {
        return;
    }
    let Some(fvd) = fvd_bin(t) else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, cert, key) = private_ca(d);
    let mut w = Seaweed::start(d, Some((&cert, &key)));
    let tls = w.tls_endpoint.clone().unwrap();
    w.create_bucket("fvd");
    let bytes = data(51, SIZE);
    std::fs::write(d.join("base.raw"), &bytes).unwrap();
    w.put("fvd", "base.raw", &bytes);
    let ca_env = ("SSL_CERT_FILE", ca.to_str().unwrap());

    // A presigned URL is a plain https base.
    let presigned = w.presign_at(&tls, "GET", "fvd", "base.raw");
    assert!(presigned.starts_with("https://") && presigned.contains("X-Amz-Signature="));
    let convert = ["convert", "-f", "fvd", "img.fvd", "-O", "raw", "out.raw"];
    run_env(
        d,
        &fvd,
        &["create", "-q", "-b", &presigned, "-F", "raw", "img.fvd"],
        &[ca_env],
    )
    .ok("create over a presigned URL");
    run_env(d, &fvd, &convert, &[ca_env]).ok("convert");
    assert_same_raw(d, "out.raw", "base.raw");

    // s3:// with an https endpoint, signed, trusting the private CA.
    let mut env = w.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", tls.clone()));
    let mut envr = env_refs(&env);
    let _ = std::fs::remove_file(d.join("img.fvd"));
    let create = [
        "create",
        "-q",
        "-b",
        "s3://fvd/base.raw",
        "-F",
        "raw",
        "img.fvd",
    ];
    run_env(d, &fvd, &create, &envr).fails_with("create without the CA", "certificate");
    envr.push(ca_env);
    run_env(d, &fvd, &create, &envr).ok("create over https");
    let _ = std::fs::remove_file(d.join("out.raw"));
    run_env(d, &fvd, &convert, &envr).ok("convert over https");
    assert_same_raw(d, "out.raw", "base.raw");
}

/// What the scripted S3 server saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    target: String,
    if_match: Option<String>,
}

/// A one-object S3 imitation: the first two requests get 503 SlowDown,
/// unsigned requests 403, a wrong If-Match 412, the rest 206 with ETag
/// "e1". Returns its port and what it saw.
fn scripted_s3(file: Arc<Vec<u8>>) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let (file, s) = (file.clone(), s.clone());
            std::thread::spawn(move || serve_s3(conn, &file, &s));
        }
    });
    (port, seen)
}

fn serve_s3(conn: std::net::TcpStream, file: &[u8], seen: &Mutex<Vec<Seen>>) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split(' ').nth(1).unwrap_or("").to_string();
        let (mut range, mut if_match) = (None, None);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, v) = h.split_once(':').unwrap();
            let v = v.trim();
            if name.eq_ignore_ascii_case("range") {
                let (a, b) = v.strip_prefix("bytes=").unwrap().split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
            } else if name.eq_ignore_ascii_case("if-match") {
                if_match = Some(v.to_string());
            }
        }
        let n = {
            let mut s = seen.lock().unwrap();
            s.push(Seen {
                target: target.clone(),
                if_match: if_match.clone(),
            });
            s.len()
        };
        let error = |code: &str, msg: &str| {
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{msg}</Message></Error>"
            );
            (body.len(), body)
        };
        let out = if n <= 2 {
            let (len, body) = error("SlowDown", "Please reduce your request rate.");
            format!("HTTP/1.1 503 Slow Down\r\nContent-Length: {len}\r\n\r\n{body}").into_bytes()
        } else if !target.contains("X-Amz-Signature=") {
            let (len, body) = error("AccessDenied", "Access Denied");
            format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {len}\r\n\r\n{body}").into_bytes()
        } else if if_match.as_deref().is_some_and(|m| m != "\"e1\"") {
            let (len, body) = error(
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
            );
            format!("HTTP/1.1 412 Precondition Failed\r\nContent-Length: {len}\r\n\r\n{body}")
                .into_bytes()
        } else {
            let (a, b) = range.expect("a range request");
            let b = b.min(file.len() - 1);
            let mut out = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nETag: \"e1\"\r\n\
                 Content-Length: {}\r\n\r\n",
                file.len(),
                b + 1 - a
            )
            .into_bytes();
            out.extend_from_slice(&file[a..=b]);
            out
        };
        if w.write_all(&out).is_err() {
            return;
        }
    }
}

#[test]
fn slowdown_is_retried_and_every_read_is_signed_with_if_match() {
    let file = Arc::new(data(61, 300_000));
    let (port, seen) = scripted_s3(file.clone());
    let o = options(&format!("http://127.0.0.1:{port}"));
    let base = open("s3://bkt/some/key.raw", quick_policy(), &o).unwrap();
    assert_eq!(base.size(), 300_000);
    assert_eq!(base.validator(), "size=300000;etag=\"e1\"");
    for (off, len) in [
        (0u64, 300_000usize),
        (1, 1),
        (299_990, 50),
        (12_345, 100_000),
    ] {
        let b = block_on(base.read_at(off, IoBuf::zeroed(len))).unwrap();
        let inside = (300_000 - off as usize).min(len);
        assert_eq!(&b[..inside], &file[off as usize..off as usize + inside]);
    }
    let seen = seen.lock().unwrap().clone();
    // Two SlowDowns, the open, four reads.
    assert_eq!(seen.len(), 7, "{seen:?}");
    for s in &seen {
        assert!(
            s.target.starts_with("/bkt/some/key.raw?"),
            "path style: {s:?}"
        );
        assert!(s.target.contains("X-Amz-Signature="), "signed: {s:?}");
    }
    for s in &seen[3..] {
        assert_eq!(s.if_match.as_deref(), Some("\"e1\""), "{s:?}");
        assert!(s.target.contains("if-match"), "If-Match is signed: {s:?}");
    }
}
