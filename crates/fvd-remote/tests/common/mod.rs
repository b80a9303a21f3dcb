//! Helpers for the fvd-remote integration tests: real servers (qemu-nbd,
//! nbdkit, nginx) started and stopped by the tests, the `fvd` binary, and
//! deterministic data.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fvd_core::base::Base;

/// True if `tool` is installed; otherwise the test `test` is skipped, or
/// fails under CI ([`fvd_testkit::skip`]: `.ci/run` installs every tool).
pub fn have(tool: &str, test: &str) -> bool {
    let found = fvd_testkit::find_tool(tool).is_some();
    if !found {
        fvd_testkit::skip(&format!(
            "{test}: '{tool}' is not installed; this test needs it"
        ));
    }
    found
}

/// The tool's path (nginx lives in /usr/sbin).
pub fn tool(name: &str) -> PathBuf {
    fvd_testkit::find_tool(name).unwrap_or_else(|| PathBuf::from(name))
}

/// The `fvd` binary built next to this test, if any (cargo builds it for
/// `cargo test --workspace`; `cargo build -p fvd-cli` otherwise).
pub fn fvd_bin(test: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("fvd");
    if p.is_file() {
        Some(p)
    } else {
        fvd_testkit::skip(&format!(
            "{test}: the fvd binary is not built (cargo build -p fvd-cli, or cargo test --workspace)"
        ));
        None
    }
}

/// A finished command.
#[derive(Debug)]
pub struct Run {
    /// Exit status (-1 when killed).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panic with the output unless the status is 0.
    pub fn ok(&self, what: &str) -> &Self {
        assert_eq!(
            self.code, 0,
            "{what}: exit status {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Panic unless the command failed with `needle` in its stderr.
    pub fn fails_with(&self, what: &str, needle: &str) -> &Self {
        assert_ne!(self.code, 0, "{what}: succeeded\nstdout:\n{}", self.stdout);
        assert!(
            self.stderr.contains(needle),
            "{what}: stderr lacks '{needle}':\n{}",
            self.stderr
        );
        self
    }
}

/// Run `prog args` in `dir` with extra environment variables.
pub fn run_env(dir: &Path, prog: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(prog);
    c.args(args).current_dir(dir).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run `prog args` in `dir`.
pub fn run(dir: &Path, prog: &Path, args: &[&str]) -> Run {
    run_env(dir, prog, args, &[])
}

/// `qemu-img compare -f raw -F raw a b` succeeds.
pub fn assert_same_raw(dir: &Path, a: &str, b: &str) {
    run(
        dir,
        Path::new("qemu-img"),
        &["compare", "-f", "raw", "-F", "raw", a, b],
    )
    .ok(&format!("qemu-img compare {a} {b}"));
}

/// A server process, killed when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// What it is (for messages).
    pub what: String,
    group_killed: bool,
}

impl Server {
    /// Start `prog args` in `dir` (output to `dir/<name>.log`), in a
    /// process group of its own.
    pub fn start(dir: &Path, prog: &Path, args: &[&str], name: &str) -> Server {
        Server::start_env(dir, prog, args, name, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_env(
        dir: &Path,
        prog: &Path,
        args: &[&str],
        name: &str,
        env: &[(&str, &str)],
    ) -> Server {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(prog)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", prog.display()));
        Server {
            child,
            what: format!("{} {}", prog.display(), args.join(" ")),
            group_killed: false,
        }
    }

    /// Kill the server and everything it started (nginx's workers) now
    /// (SIGKILL to its process group), and reap it.
    pub fn kill(&mut self) {
        if !self.group_killed {
            // The group outlives its leader while a member (a worker)
            // lives; once reaped here, its id is not ours any more.
            // SAFETY: plain syscall on the process group start() created.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            self.group_killed = true;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Process ids of the server's group other than the server itself.
    pub fn group_members(&self) -> Vec<i32> {
        let pgid = self.child.id() as i32;
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // SAFETY: getpgid only reads.
            if pid != pgid && unsafe { libc::getpgid(pid) } == pgid {
                out.push(pid);
            }
        }
        out
    }

    /// Panic if the server has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited: {st}", self.what);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until a unix socket accepts connections.
pub fn wait_unix(server: &mut Server, sock: &Path) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        server.assert_running();
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not listen on {}", server.what, sock.display());
}

/// Wait until 127.0.0.1:`port` accepts connections.
pub fn wait_tcp(server: &mut Server, port: u16) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        server.assert_running();
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} did not listen on port {port}", server.what);
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `len` bytes of deterministic pseudo-random data, with zero runs (so the
/// base has holes worth mapping).
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v.truncate(len);
    // A zero stretch every 1 MiB.
    for start in (0..len).step_by(1 << 20) {
        let end = (start + (256 << 10)).min(len);
        v[start + (64 << 10).min(end - start)..end].fill(0);
    }
    v
}

/// Write a sparse file: the zero stretches of `bytes` stay holes.
pub fn write_sparse(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (i, chunk) in bytes.chunks(4096).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, i as u64 * 4096).unwrap();
        }
    }
}

/// Start nginx serving `root` on 127.0.0.1:`port`, with `extra` directives
/// in its server block (TLS and HTTP/2 when they name a certificate). Its
/// access log is `dir/nginx/access.log`.
pub fn nginx(dir: &Path, root: &Path, port: u16, extra: &str) -> Server {
    let ng = dir.join("nginx");
    std::fs::create_dir_all(&ng).unwrap();
    let d = ng.display();
    let conf = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n  default_type application/octet-stream;\n\
         server {{\n    listen 127.0.0.1:{port}{ssl};\n    root {root};\n    {extra}\n  }}\n}}\n",
        // With TLS, HTTP/2 is offered (ALPN) as well as HTTP/1.1.
        ssl = if extra.contains("ssl_certificate") {
            " ssl http2"
        } else {
            ""
        },
        root = root.display(),
    );
    let conf_path = ng.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut s = Server::start(
        dir,
        &tool("nginx"),
        &[
            "-c",
            conf_path.to_str().unwrap(),
            "-p",
            ng.to_str().unwrap(),
            "-e",
            ng.join("error.log").to_str().unwrap(),
        ],
        "nginx",
    );
    wait_tcp(&mut s, port);
    s
}

/// Open a base through this crate's opener, as the engine does.
pub fn open_base(name: &str, format: &str) -> fvd_core::Result<Arc<dyn Base>> {
    let f: fvd_core::Format = format.parse().unwrap();
    let location = fvd_core::Location::parse(name);
    fvd_core::executor::block_on(fvd_remote::opener().open_base(&location, f, 0))
}

/// Read all of `base` (in 1 MiB pieces).
pub fn read_all(base: &dyn Base) -> Vec<u8> {
    let mut out = Vec::new();
    let size = base.size();
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(1 << 20) as usize;
        let b = fvd_core::executor::block_on(base.read_at(pos, fvd_core::IoBuf::zeroed(n)))
            .unwrap_or_else(|e| panic!("{}: read at {pos}: {e}", base.describe()));
        out.extend_from_slice(&b);
        pos += n as u64;
    }
    out
}

/// The writes applied with `fvd io` to the image and with `qemu-io` to a
/// raw copy of the base: aligned, unaligned (copy-on-write of partial
/// blocks), zeroes, large, and at the very end.
pub const OPS: &[&str] = &[
    "write -P 0x5a 4096 8192",
    "write -P 0x17 1000 3000",
    "write -z 2M 64k",
    "write -P 0xee 3M 1M",
    "write -P 0x01 6290000 1456",
];

/// Create an FVD image over `url` with the CLI, write OPS with `fvd io`,
/// and check the result against qemu-io's on a raw copy of the base.
pub fn cli_cow_check(dir: &Path, fvd: &Path, url: &str) {
    cli_cow_check_with(dir, fvd, url, "raw", "base.raw");
}

/// [`cli_cow_check`] for a base in `format` whose content is the raw file
/// `content` in `dir`.
pub fn cli_cow_check_with(dir: &Path, fvd: &Path, url: &str, format: &str, content: &str) {
    cli_cow_check_env(dir, fvd, url, format, content, &[]);
}

/// [`cli_cow_check_with`] with extra environment variables for `fvd`.
pub fn cli_cow_check_env(
    dir: &Path,
    fvd: &Path,
    url: &str,
    format: &str,
    content: &str,
    env: &[(&str, &str)],
) {
    let run = |dir: &Path, prog: &Path, args: &[&str]| {
        if prog == fvd {
            run_env(dir, prog, args, env)
        } else {
            run(dir, prog, args)
        }
    };
    let _ = std::fs::remove_file(dir.join("img.fvd"));
    run(
        dir,
        fvd,
        &["create", "-q", "-b", url, "-F", format, "img.fvd"],
    )
    .ok("fvd create");
    let mut args = vec![];
    for op in OPS {
        args.push("-c");
        args.push(op);
    }
    let mut fvd_args = vec!["io"];
    fvd_args.extend(args.iter());
    fvd_args.push("img.fvd");
    run(dir, fvd, &fvd_args).ok("fvd io writes");
    std::fs::copy(dir.join(content), dir.join("exp.raw")).unwrap();
    let mut q = vec!["-f", "raw"];
    q.extend(args);
    q.push("exp.raw");
    run(dir, Path::new("qemu-io"), &q).ok("qemu-io writes");
    let reads = [
        "io",
        "-c",
        "read -P 0x5a 4096 8192",
        "-c",
        "read -P 0xee 3M 1M",
        "img.fvd",
    ];
    run(dir, fvd, &reads).ok("fvd io read back");
    let _ = std::fs::remove_file(dir.join("out.raw"));
    let conv = ["convert", "-f", "fvd", "img.fvd", "-O", "raw", "out.raw"];
    run(dir, fvd, &conv).ok("fvd convert");
    assert_same_raw(dir, "out.raw", "exp.raw");
    run(dir, fvd, &["check", "img.fvd"]).ok("fvd check");
}

/// A private CA and a server certificate for 127.0.0.1 signed by it, made
/// with openssl in `dir`: `(ca.pem, srv.pem, srv.key)`.
pub fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ossl = |args: &[&str]| {
        run(dir, Path::new("openssl"), args).ok("openssl");
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fvd test CA",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    ossl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (dir.join("ca.pem"), dir.join("srv.pem"), dir.join("srv.key"))
}

/// The access key of the SeaweedFS test identity.
pub const S3_KEY: &str = "fvdtestkey";
/// Its secret key.
pub const S3_SECRET: &str = "fvdtestsecret0123456789";
/// The region requests are signed for (SeaweedFS accepts any).
pub const S3_REGION: &str = "us-east-1";

/// The bucket and object [`Seaweed`] uses to tell it is ready.
const PROBE_BUCKET: &str = "fvd-ready";

/// A real SeaweedFS (`weed server`: master, volume server, filer and S3
/// gateway in one process) on free ports with data in `dir/weed`, in its
/// own process group: stopped with SIGTERM, then SIGKILL after 3 s (it
/// can hang on SIGTERM), the whole group, when dropped. It also dies with
/// the thread that started it (PR_SET_PDEATHSIG), so a killed test run
/// leaves nothing behind.
pub struct Seaweed {
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` of the S3 gateway.
    pub endpoint: String,
    /// `https://127.0.0.1:PORT` of the S3 gateway, when started with TLS.
    pub tls_endpoint: Option<String>,
}

impl Seaweed {
    /// Start it (with an HTTPS port too if `tls` gives a certificate and
    /// key) and wait until a GET returns 206.
    pub fn start(dir: &Path, tls: Option<(&Path, &Path)>) -> Seaweed {
        let data = dir.join("weed");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("s3.json");
        std::fs::write(
            &conf,
            format!(
                r#"{{"identities":[{{"name":"fvd","credentials":[{{"accessKey":"{S3_KEY}","secretKey":"{S3_SECRET}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )
        .unwrap();
        // Every port it opens, chosen here: the defaults collide between
        // tests running in parallel.
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < 10 {
            let p = free_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let s3_port = ports[6];
        let mut args: Vec<String> = vec![
            "server".into(),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-dir={}", data.display()),
            // Small volumes, enough of them: every bucket is a collection
            // with volumes of its own.
            "-volume.max=100".into(),
            "-master.volumeSizeLimitMB=64".into(),
            "-master.telemetry=false".into(),
            format!("-master.port={}", ports[0]),
            format!("-master.port.grpc={}", ports[1]),
            format!("-volume.port={}", ports[2]),
            format!("-volume.port.grpc={}", ports[3]),
            format!("-filer.port={}", ports[4]),
            format!("-filer.port.grpc={}", ports[5]),
            "-s3".into(),
            format!("-s3.port={s3_port}"),
            format!("-s3.port.grpc={}", ports[7]),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-iam=false".into(),
            format!("-s3.config={}", conf.display()),
            format!("-filer.localSocket={}", dir.join("filer.sock").display()),
            format!("-s3.localSocket={}", dir.join("s3.sock").display()),
        ];
        let mut tls_endpoint = None;
        if let Some((cert, key)) = tls {
            args.push(format!("-s3.port.https={}", ports[8]));
            args.push(format!("-s3.cert.file={}", cert.display()));
            args.push(format!("-s3.key.file={}", key.display()));
            tls_endpoint = Some(format!("https://127.0.0.1:{}", ports[8]));
        }
        let mut w = Seaweed {
            dir: dir.to_path_buf(),
            args,
            child: None,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            tls_endpoint,
        };
        w.spawn();
        w.create_bucket(PROBE_BUCKET);
        w.put(PROBE_BUCKET, "probe", b"ready");
        w.wait_ready();
        w
    }

    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))
            .unwrap();
        let mut c = Command::new("weed");
        c.args(&self.args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(c.spawn().expect("cannot start weed"));
    }

    /// Panic with the end of its log if it has exited.
    fn assert_running(&mut self) {
        if let Some(c) = &mut self.child
            && let Ok(Some(st)) = c.try_wait()
        {
            let log = std::fs::read_to_string(self.dir.join("weed.log")).unwrap_or_default();
            let tail: String = log.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!("weed exited ({st}); the end of its log, newest first:\n{tail}");
        }
    }

    /// Poll (up to 90 s) until a GET of the probe object returns 206: after
    /// a start or restart SeaweedFS answers 500 for a while.
    pub fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            self.assert_running();
            let url = self.presign("GET", PROBE_BUCKET, "probe");
            if let Ok(r) = http_request("GET", &url, &[("range", "bytes=0-0")], b"")
                && r.0 == 206
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "SeaweedFS did not serve a range GET within 90 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A URL for `method` on `bucket/key` (an empty key: the bucket),
    /// presigned for an hour with the test identity.
    pub fn presign(&self, method: &str, bucket: &str, key: &str) -> String {
        self.presign_at(&self.endpoint, method, bucket, key)
    }

    /// [`Seaweed::presign`] for another endpoint of the gateway.
    pub fn presign_at(&self, endpoint: &str, method: &str, bucket: &str, key: &str) -> String {
        use rusty_s3::S3Action;
        let b = rusty_s3::Bucket::new(
            endpoint.parse().unwrap(),
            rusty_s3::UrlStyle::Path,
            bucket.to_string(),
            S3_REGION,
        )
        .unwrap();
        let c = rusty_s3::Credentials::new(S3_KEY, S3_SECRET);
        let hour = Duration::from_secs(3600);
        let url = match (method, key) {
            ("PUT", "") => rusty_s3::actions::CreateBucket::new(&b, &c).sign(hour),
            ("PUT", k) => rusty_s3::actions::PutObject::new(&b, Some(&c), k).sign(hour),
            ("GET", k) => rusty_s3::actions::GetObject::new(&b, Some(&c), k).sign(hour),
            ("DELETE", k) => rusty_s3::actions::DeleteObject::new(&b, Some(&c), k).sign(hour),
            other => panic!("presign {other:?}"),
        };
        url.to_string()
    }

    /// Create `bucket` (retrying while the store starts up).
    pub fn create_bucket(&mut self, bucket: &str) {
        let t0 = Instant::now();
        loop {
            self.assert_running();
            let url = self.presign("PUT", bucket, "");
            match http_request("PUT", &url, &[], b"") {
                Ok((200, ..)) => return,
                Ok((409, ..)) => return,
                r => assert!(
                    t0.elapsed() < Duration::from_secs(90),
                    "cannot create bucket {bucket}: {:?}",
                    r.map(|(s, _, b)| (s, String::from_utf8_lossy(&b).into_owned()))
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Store `bytes` as `bucket/key` (retrying while the store starts up).
    pub fn put(&mut self, bucket: &str, key: &str, bytes: &[u8]) {
        let t0 = Instant::now();
        loop {
            self.assert_running();
            let url = self.presign("PUT", bucket, key);
            match http_request("PUT", &url, &[], bytes) {
                Ok((200, ..)) => return,
                r => assert!(
                    t0.elapsed() < Duration::from_secs(90),
                    "cannot store {bucket}/{key}: {:?}",
                    r.map(|(s, _, b)| (s, String::from_utf8_lossy(&b).into_owned()))
                ),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kill it at once (SIGKILL to the group), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall on the process group we created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }

    /// Start it again on the same ports and data, and wait until it serves.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready();
    }

    /// Stop it: SIGTERM to the group, SIGKILL after 3 s.
    pub fn stop(&mut self) {
        if let Some(c) = &mut self.child {
            let pgid = -(c.id() as i32);
            // SAFETY: plain syscall on the process group we created.
            unsafe { libc::kill(pgid, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Whatever is left of the group goes too.
        self.kill();
    }

    /// Environment variables that point `fvd` at the S3 gateway.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", S3_REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", S3_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.to_string()),
        ]
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP answer: status, headers (names in lower case), body.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// One HTTP/1.1 request over a new plain TCP connection (test uploads
/// and probes).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Answer> {
    use std::io::{Read, Write};
    let u: url::Url = url
        .parse()
        .map_err(|e| std::io::Error::other(format!("{url}: {e}")))?;
    let host = u.host_str().unwrap_or("127.0.0.1");
    let port = u.port_or_known_default().unwrap_or(80);
    let mut s = std::net::TcpStream::connect((host, port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let target = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let hdrs: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if hdrs
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..i]).into_owned();
            let size =
                usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
            if size == 0 || rest.len() < i + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[i + 2..i + 2 + size]);
            rest = &rest[(i + 4 + size).min(rest.len())..];
        }
        body = out;
    }
    Ok((status, hdrs, body))
}
