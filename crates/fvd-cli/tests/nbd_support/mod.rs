//! Shared helpers of the NBD tests: images, an `fvd serve` child process,
//! real clients (qemu-io, qemu-img, nbdinfo) and the fvd-nbd client driven
//! step by step.

#![allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fvd_core::executor::block_on;
use fvd_core::{BaseSpec, CreateOptions, Extent, Format, PathOptions};
use fvd_nbd::client::{
    Address, Connection, ExportInfo, Handshake, MAX_READ, connect_stream, shared_runtime,
};
#[allow(unused_imports)]
pub use fvd_nbd::client::{Chunk, Reply};
use fvd_nbd::proto::consts::*;
use fvd_nbd::proto::handshake::{self, OptionReply, OptionReplyHeader};
use fvd_nbd::proto::request::{Command as Cmd, Request};
use tokio::io::AsyncReadExt;
use tokio::runtime::Handle;

/// The `fvd` binary under test.
pub fn fvd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fvd"))
}

/// True when `tool` is installed.
pub fn have(tool: &str) -> bool {
    fvd_testkit::find_tool(tool).is_some()
}

/// Prints a skip message and returns true if any tool is missing.
pub fn missing(tools: &[&str]) -> bool {
    !fvd_testkit::have_tools(tools)
}

/// Create an FVD image of `size` bytes, optionally over a base.
pub fn create_fvd(path: &Path, size: Option<u64>, base: Option<(&str, Format)>) {
    let spec = base.map(|(name, format)| BaseSpec {
        name: name.to_string(),
        format,
    });
    let opts = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    block_on(fvd_core::create_path(path, spec.as_ref(), opts, None)).unwrap();
}

/// Byte `i` of the deterministic base pattern.
pub fn base_byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1
}

/// Create a raw file of `size` bytes whose `data` ranges hold the base
/// pattern; the rest is a hole.
pub fn create_raw(path: &Path, size: u64, data: &[(u64, u64)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for &(start, len) in data {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(1 << 20);
            let buf: Vec<u8> = (off..off + n).map(base_byte).collect();
            f.write_all_at(&buf, off).unwrap();
            off += n;
        }
    }
    f.sync_all().unwrap();
}

/// Block status of an image, as the engine reports it (opened read-only
/// without the lock, so it works while a server holds the image).
pub fn engine_extents(path: &Path, format: Format) -> Vec<Extent> {
    block_on(async {
        let img = fvd_core::open_path(
            path,
            format,
            PathOptions {
                read_only: true,
                force_share: true,
                ..PathOptions::default()
            },
        )
        .await
        .unwrap();
        let size = img.virtual_size();
        let mut out = Vec::new();
        let mut off = 0;
        while off < size {
            let n = (size - off).min(1 << 30);
            out.extend(img.block_status(off, n).await.unwrap());
            off += n;
        }
        out
    })
}

/// Whole content of an image, read through the engine (read-only, no lock).
pub fn engine_content(path: &Path, format: Format) -> Vec<u8> {
    block_on(async {
        let img = fvd_core::open_path(
            path,
            format,
            PathOptions {
                read_only: true,
                force_share: true,
                ..PathOptions::default()
            },
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; img.virtual_size() as usize];
        img.read_slice(0, &mut buf).await.unwrap();
        buf
    })
}

/// `(start, end, zero)` runs, merged, from engine extents.
pub fn zero_runs(extents: &[Extent]) -> Vec<(u64, u64, bool)> {
    merge_runs(extents.iter().map(|e| (e.start, e.length, e.zero)))
}

/// Merge `(start, length, flag)` items into `(start, end, flag)` runs.
pub fn merge_runs(items: impl Iterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (s, l, f) in items {
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == s && last.2 == f => last.1 = s + l,
            _ => out.push((s, s + l, f)),
        }
    }
    out
}

/// A running `fvd serve`.
pub struct Server {
    child: Option<Child>,
    /// The unix socket, when serving on one.
    pub sock: Option<PathBuf>,
    /// The TCP port, when serving on TCP.
    pub port: Option<u16>,
    log: PathBuf,
}

impl Server {
    /// Serve `image` on the unix socket `sock` with extra arguments.
    pub fn unix(image: &Path, sock: &Path, args: &[&str]) -> Server {
        let mut a: Vec<String> = vec!["--socket".into(), sock.display().to_string()];
        a.extend(args.iter().map(|s| s.to_string()));
        let mut s = Server::spawn(image, &a, sock.with_extension("log"));
        s.sock = Some(sock.to_path_buf());
        s.wait_ready();
        s
    }

    /// Serve `image` on 127.0.0.1 on a free port; `log` receives stderr.
    pub fn tcp(image: &Path, log: &Path, args: &[&str]) -> Server {
        let mut a: Vec<String> = vec!["--bind".into(), "127.0.0.1:0".into()];
        a.extend(args.iter().map(|s| s.to_string()));
        let mut s = Server::spawn(image, &a, log.to_path_buf());
        let line = s.wait_ready();
        let at = line.find("nbd://127.0.0.1:").expect("TCP URI in the log") + 16;
        let port: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        s.port = Some(port.parse().unwrap());
        s
    }

    fn spawn(image: &Path, args: &[String], log: PathBuf) -> Server {
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(fvd_bin())
            .arg("serve")
            .args(args)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        Server {
            child: Some(child),
            sock: None,
            port: None,
            log,
        }
    }

    /// Wait for the "serving" line; returns it.
    fn wait_ready(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.log();
            if let Some(line) = text.lines().find(|l| l.contains("fvd serve: serving")) {
                return line.to_string();
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("fvd serve exited with {st} before serving:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "fvd serve did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// URI of the export `name`.
    pub fn uri_named(&self, name: &str) -> String {
        match (&self.sock, self.port) {
            (Some(s), _) => format!("nbd+unix:///{name}?socket={}", s.display()),
            (None, Some(p)) => format!("nbd://127.0.0.1:{p}/{name}"),
            _ => unreachable!(),
        }
    }

    /// URI of the default export.
    pub fn uri(&self) -> String {
        self.uri_named("")
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    fn signal(&mut self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGTERM, then wait (at most 30 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if self.running() {
            self.signal(libc::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                let log = self.log();
                self.kill9();
                panic!("fvd serve did not exit in time:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run `fvd` with `args` in `dir` (no input).
pub fn fvd_in(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(fvd_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run fvd")
}

/// The standard output of a command that must have succeeded.
pub fn ok(o: &std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Output of a client tool.
pub struct Out {
    /// Exit status was 0.
    pub ok: bool,
    /// Standard output and error, concatenated.
    pub text: String,
}

/// Run a program and collect its output.
pub fn run(prog: &str, args: &[&str]) -> Out {
    let o = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&o.stderr));
    Out {
        ok: o.status.success(),
        text,
    }
}

/// `qemu-io -f raw` with `cmds` on `uri`.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Out {
    qemu_io_opts(&["-f", "raw"], uri, cmds)
}

/// `qemu-io` with leading options.
pub fn qemu_io_opts(opts: &[&str], target: &str, cmds: &[&str]) -> Out {
    let mut args: Vec<&str> = opts.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(target);
    run("qemu-io", &args)
}

/// `qemu-io` that must succeed without a failed command.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let o = qemu_io(uri, cmds);
    assert!(
        o.ok && !o.text.contains("failed") && !o.text.contains("error"),
        "qemu-io {cmds:?} on {uri}:\n{}",
        o.text
    );
    o.text
}

// ---------------------------------------------------------------------------
// The fvd-nbd client, step by step.
// ---------------------------------------------------------------------------

/// A client for tests of the server, on the fvd-nbd client: the handshake
/// one option at a time (any option, any bytes), then a pipelined
/// connection on which requests go out exactly as given (cookies, flags
/// and lengths included) and replies come back matched by cookie. Dropped,
/// it vanishes without `NBD_CMD_DISC`, as a crashing client would.
pub struct Client {
    rt: Handle,
    hs: Option<Handshake>,
    conn: Option<Connection>,
    replies: VecDeque<Pin<Box<dyn Future<Output = std::io::Result<Reply>> + Send>>>,
    /// Extended headers negotiated (set by the test that negotiates them).
    pub extended: bool,
    /// Structured replies negotiated.
    pub structured: bool,
}

impl Client {
    /// Connect, read the greeting and send `client_flags`.
    pub fn connect(sock: &Path, client_flags: u32) -> Client {
        let rt = shared_runtime().unwrap();
        let name = format!("nbd+unix:///?socket={}", sock.display());
        let hs = rt.block_on(async {
            let stream = connect_stream(&Address::Unix(sock.to_path_buf())).await?;
            Handshake::start(stream, &name, Some(client_flags)).await
        });
        let hs = hs.unwrap();
        assert_eq!(hs.server_flags(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Client {
            rt,
            hs: Some(hs),
            conn: None,
            replies: VecDeque::new(),
            extended: false,
            structured: false,
        }
    }

    fn hs(&mut self) -> &mut Handshake {
        self.hs.as_mut().expect("still negotiating")
    }

    /// The connection, entering transmission with what was negotiated.
    fn conn(&mut self) -> &Connection {
        if self.conn.is_none() {
            let stream = self.hs.take().expect("negotiated").into_stream();
            let info = ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                preferred_block: 4096,
                max_block: MAX_READ,
                structured: self.structured || self.extended,
                extended: self.extended,
                contexts: Vec::new(),
                allocation_context: None,
                used_go: true,
                tls: false,
            };
            let c = Connection::start(
                stream,
                info,
                "test",
                Duration::from_secs(20),
                1024,
                &self.rt,
            );
            self.conn = Some(c);
        }
        self.conn.as_ref().unwrap()
    }

    /// Read exactly `n` bytes during the handshake.
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        let rt = self.rt.clone();
        rt.block_on(self.hs().stream_mut().read_exact(&mut v))
            .unwrap();
        v
    }

    /// True if the server closed the connection within 10 s.
    pub fn closed_by_server(&mut self) -> bool {
        let rt = self.rt.clone();
        let limit = Duration::from_secs(10);
        if let Some(c) = &self.conn {
            return rt.block_on(async { tokio::time::timeout(limit, c.closed()).await.is_ok() });
        }
        let s = self.hs().stream_mut();
        rt.block_on(async {
            let mut b = [0u8; 1];
            loop {
                match tokio::time::timeout(limit, s.read(&mut b)).await {
                    Ok(Ok(0)) => return true,
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return e.kind() == std::io::ErrorKind::ConnectionReset,
                    Err(_) => return false,
                }
            }
        })
    }

    /// Send raw bytes (written before this returns).
    pub fn send(&mut self, bytes: &[u8]) {
        let rt = self.rt.clone();
        match &self.conn {
            Some(c) => rt.block_on(c.send_raw(bytes.to_vec())).unwrap(),
            None => rt.block_on(self.hs().send_raw(bytes)).unwrap(),
        }
    }

    /// Send an option and collect replies up to the final one (ACK or error).
    pub fn option(&mut self, code: u32, payload: &[u8]) -> Vec<(OptionReplyHeader, OptionReply)> {
        let rt = self.rt.clone();
        rt.block_on(self.hs().option_raw(code, payload)).unwrap()
    }

    /// `NBD_OPT_GO` for `name`, asking for the block size; returns (size,
    /// flags) and enters transmission.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let opt = handshake::ClientOption::Go {
            name: name.into(),
            info_requests: vec![INFO_BLOCK_SIZE],
        };
        let payload = handshake::encode_option_payload(&opt).unwrap();
        let replies = self.option(OPT_GO, &payload);
        let mut export = None;
        for (_, r) in &replies {
            match r {
                OptionReply::Info(handshake::InfoReply::Export { size, flags }) => {
                    export = Some((*size, *flags))
                }
                OptionReply::Error {
                    reply_type,
                    message,
                } => {
                    panic!("GO refused: {reply_type:#x} {message}")
                }
                _ => {}
            }
        }
        assert!(matches!(replies.last(), Some((_, OptionReply::Ack))));
        self.conn();
        export.expect("NBD_INFO_EXPORT")
    }

    /// Send a request exactly as given (header and payload); its reply is
    /// collected by [`Client::reply`], in the order requests were sent.
    pub fn request(
        &mut self,
        cmd: Cmd,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let req = Request {
            flags,
            command: cmd,
            cookie,
            offset,
            length,
        };
        let rt = self.rt.clone();
        let reply = rt
            .block_on(self.conn().submit_raw(req, payload.to_vec()))
            .unwrap();
        self.replies.push_back(Box::pin(reply));
    }

    /// The reply to the oldest request not yet collected.
    pub fn reply(&mut self) -> Reply {
        let next = self.replies.pop_front().expect("a request in flight");
        self.rt.block_on(next).unwrap()
    }

    /// [`Client::reply`] if it comes within `limit`; else `None`, and the
    /// request stays the oldest one in flight.
    #[allow(dead_code)]
    pub fn reply_within(&mut self, limit: Duration) -> Option<Reply> {
        let mut next = self.replies.pop_front().expect("a request in flight");
        let got = self
            .rt
            .block_on(async { tokio::time::timeout(limit, &mut next).await });
        match got {
            Ok(r) => Some(r.unwrap()),
            Err(_) => {
                self.replies.push_front(next);
                None
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            // Whatever was sent reaches the server, then the client is gone.
            let _ = self.rt.block_on(c.send_raw(Vec::new()));
            c.abort();
        }
    }
}
