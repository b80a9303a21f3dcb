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

/// The skip-or-fail-under-CI rule shared with fvd-cli's tests.
#[path = "../../../fvd-cli/tests/common/ci.rs"]
pub mod ci;

/// True if `tool` is on PATH; prints a note naming the test otherwise.
pub fn have(tool: &str, test: &str) -> bool {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join(tool).is_file())
            || Path::new("/usr/sbin").join(tool).is_file()
    });
    if !found {
        ci::skip(&format!(
            "{test}: '{tool}' is not installed; this test needs it"
        ));
    }
    found
}

/// The tool's path, also looking in /usr/sbin (nginx lives there).
pub fn tool(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.is_file() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

/// The `fvd` binary built next to this test, if any (cargo builds it for
/// `cargo test --workspace`; `cargo build -p fvd-cli` otherwise).
pub fn fvd_bin(test: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("fvd");
    if p.is_file() {
        Some(p)
    } else {
        ci::skip(&format!(
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
}

impl Server {
    /// Start `prog args` in `dir` (output to `dir/<name>.log`).
    pub fn start(dir: &Path, prog: &Path, args: &[&str], name: &str) -> Server {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        use std::os::unix::process::CommandExt;
        // A process group of its own, so that stopping the server stops
        // whatever it forked (nginx's workers) too.
        let child = Command::new(prog)
            .args(args)
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
        }
    }

    /// Kill the server and every process of its group now (SIGKILL), and
    /// reap it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the process group our own child leads.
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
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
/// in its server block.
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
        ssl = if extra.contains("ssl_certificate") {
            " ssl"
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

/// Open a base through the registered providers, as the engine does.
pub fn open_base(name: &str, format: &str) -> fvd_core::Result<Arc<dyn Base>> {
    fvd_remote::register();
    let f: fvd_core::Format = format.parse().unwrap();
    fvd_core::executor::block_on(fvd_core::open::open_base_named(
        Path::new("/"),
        name,
        f,
        fvd_core::PathOptions {
            read_only: true,
            ..Default::default()
        },
        0,
    ))
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
