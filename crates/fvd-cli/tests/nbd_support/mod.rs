//! Shared helpers of the NBD tests: images, an `fvd serve` child process,
//! real clients (qemu-io, qemu-img, nbdinfo) and a tiny hand-written
//! client built on the fvd-nbd codec.

#![allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/ci.rs"]
pub mod ci;

use fvd_core::executor::block_on;
use fvd_core::{BaseSpec, CreateOptions, Extent, Format, PathOptions};
use fvd_nbd::consts::*;
use fvd_nbd::handshake::{self, OptionReply, OptionReplyHeader};
use fvd_nbd::reply::{self, ChunkPayload, ReplyHeader};
use fvd_nbd::request::{Command as Cmd, Request, encode_request};

/// The `fvd` binary under test.
pub fn fvd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fvd"))
}

/// True when `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Prints a skip message and returns true if any tool is missing.
pub fn missing(tools: &[&str]) -> bool {
    for t in tools {
        if !have(t) {
            ci::skip(&format!("{t} is not installed; this test needs it"));
            return true;
        }
    }
    false
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
        img.read(0, &mut buf).await.unwrap();
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
// A hand-written client on the codec.
// ---------------------------------------------------------------------------

/// A minimal blocking NBD client.
pub struct Client {
    /// The connection.
    pub s: UnixStream,
    /// Extended headers negotiated.
    pub extended: bool,
    /// Structured replies negotiated.
    pub structured: bool,
}

/// One reply as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply, with the data of a read.
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    /// The chunks of a structured or extended reply.
    Chunks { cookie: u64, chunks: Vec<Chunk> },
}

/// One decoded chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NONE`.
    None,
    /// `OFFSET_DATA`.
    Data(u64, Vec<u8>),
    /// `OFFSET_HOLE`.
    Hole(u64, u32),
    /// Block status descriptors (either width).
    Status(u32, Vec<(u64, u64)>),
    /// An error chunk.
    Error(u32, String),
}

impl Reply {
    /// The cookie.
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunks { cookie, .. } => *cookie,
        }
    }

    /// The NBD error (0 for success).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunks { chunks, .. } => chunks
                .iter()
                .find_map(|c| match c {
                    Chunk::Error(e, _) => Some(*e),
                    _ => None,
                })
                .unwrap_or(0),
        }
    }

    /// The data of a read reply, holes filled in, relative to `offset`.
    pub fn data(&self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Reply::Simple { data, .. } => data.clone(),
            Reply::Chunks { chunks, .. } => {
                let mut out = vec![0xeeu8; len];
                for c in chunks {
                    match c {
                        Chunk::Data(o, d) => {
                            let at = (o - offset) as usize;
                            out[at..at + d.len()].copy_from_slice(d);
                        }
                        Chunk::Hole(o, l) => {
                            let at = (o - offset) as usize;
                            out[at..at + *l as usize].fill(0);
                        }
                        _ => {}
                    }
                }
                out
            }
        }
    }
}

impl Client {
    /// Connect and exchange greeting and client flags.
    pub fn connect(sock: &Path, client_flags: u32) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client {
            s,
            extended: false,
            structured: false,
        };
        let g = c.read_n(GREETING_LEN);
        let flags = handshake::decode_greeting(&g).unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.s.write_all(&handshake::encode_client_flags(client_flags))
            .unwrap();
        c
    }

    /// Read exactly `n` bytes.
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True if the server closed the connection (EOF or reset) within the
    /// read timeout.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        let _ = self.s.set_read_timeout(Some(Duration::from_secs(10)));
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Send raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Send an option and collect replies up to the final one (ACK or error).
    pub fn option(&mut self, code: u32, payload: &[u8]) -> Vec<(OptionReplyHeader, OptionReply)> {
        let req = handshake::encode_option_request(code, payload).unwrap();
        self.send(&req);
        self.option_replies()
    }

    /// Read option replies up to the final one.
    pub fn option_replies(&mut self) -> Vec<(OptionReplyHeader, OptionReply)> {
        let mut out = Vec::new();
        loop {
            let h = self.read_n(OPTION_REPLY_HEADER_LEN);
            let h = handshake::decode_option_reply_header(&h).unwrap();
            let p = self.read_n(h.length as usize);
            let r = handshake::decode_option_reply(&h, &p).unwrap();
            let last = matches!(r, OptionReply::Ack | OptionReply::Error { .. });
            out.push((h, r));
            if last {
                return out;
            }
        }
    }

    /// `NBD_OPT_GO` for `name`, asking for the block size; returns (size, flags).
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
        export.expect("NBD_INFO_EXPORT")
    }

    /// Send a request header (and payload).
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
        let mut bytes = encode_request(&req, self.extended).unwrap();
        bytes.extend_from_slice(payload);
        self.send(&bytes);
    }

    /// Read one complete reply. `read_len` is the data length a simple
    /// reply to a successful read carries (the client must know it).
    pub fn reply(&mut self, read_len: impl Fn(u64) -> usize) -> Reply {
        let mut chunks = Vec::new();
        loop {
            let magic = self.read_n(4);
            let len = reply::reply_header_len(&magic, self.extended).unwrap();
            let mut hdr = magic.clone();
            hdr.extend(self.read_n(len - 4));
            match reply::decode_reply_header(&hdr, self.extended).unwrap() {
                ReplyHeader::Simple(s) => {
                    let data = if s.error == 0 {
                        self.read_n(read_len(s.cookie))
                    } else {
                        Vec::new()
                    };
                    return Reply::Simple {
                        error: s.error,
                        cookie: s.cookie,
                        data,
                    };
                }
                ReplyHeader::Chunk(h) => {
                    let cookie = h.cookie;
                    let p = self.read_n(h.length as usize);
                    let c = match reply::decode_chunk_payload(&h, &p).unwrap() {
                        ChunkPayload::None => Chunk::None,
                        ChunkPayload::OffsetData { offset, data } => {
                            Chunk::Data(offset, data.to_vec())
                        }
                        ChunkPayload::OffsetHole { offset, length } => Chunk::Hole(offset, length),
                        ChunkPayload::BlockStatus {
                            context_id,
                            descriptors,
                        } => Chunk::Status(
                            context_id,
                            descriptors
                                .iter()
                                .map(|&(l, f)| (u64::from(l), u64::from(f)))
                                .collect(),
                        ),
                        ChunkPayload::BlockStatusExt {
                            context_id,
                            descriptors,
                        } => Chunk::Status(context_id, descriptors),
                        ChunkPayload::Error { error, message }
                        | ChunkPayload::ErrorOffset { error, message, .. }
                        | ChunkPayload::UnknownError { error, message, .. } => {
                            Chunk::Error(error, message)
                        }
                    };
                    chunks.push(c);
                    if h.is_done() {
                        return Reply::Chunks { cookie, chunks };
                    }
                }
            }
        }
    }
}
