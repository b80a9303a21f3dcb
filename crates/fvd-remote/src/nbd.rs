//! An NBD client: an NBD export as a read-only base.
//!
//! URLs follow the NBD URI convention: `nbd://host[:port]/export` (TCP,
//! port 10809 by default) and `nbd+unix:///export?socket=PATH` (a unix
//! socket); an empty export name selects the server's default export. TLS
//! (`nbds://`) is not supported.
//!
//! Negotiation is fixed newstyle: structured replies if the server offers
//! them, the `base:allocation` metadata context if it has one, then
//! `NBD_OPT_GO` asking for the block size constraints, falling back to
//! `NBD_OPT_EXPORT_NAME` when the server does not know `NBD_OPT_GO`. Reads
//! are split at the server's maximum block size and aligned to its minimum
//! block size; `NBD_REPLY_TYPE_OFFSET_DATA`, `OFFSET_HOLE` and error chunks
//! are handled, and simple replies when structured replies are off.
//! [`Base::allocation`] uses `NBD_CMD_BLOCK_STATUS` when the server has
//! `base:allocation`, else it reports everything as data.
//!
//! Each connection serves one request at a time on its own worker thread
//! (see [`crate::pool`]); up to [`Policy::connections`] of them are opened
//! as the load requires when the server advertises
//! `NBD_FLAG_CAN_MULTI_CONN`, else one. A connection that fails is dropped and the
//! request retried on a new one as [`Policy`] says.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::storage::{AllocRun, IoFuture, coalesce};
use fvd_nbd::consts;
use fvd_nbd::handshake::{
    self, ClientOption, InfoReply, OptionReply, decode_option_reply, decode_option_reply_header,
};
use fvd_nbd::reply::{self, ChunkPayload, ReplyHeader};
use fvd_nbd::request::{Command, Request, encode_request};

use crate::pool::Workers;
use crate::retry::{Failure, Policy};

/// Largest read sent as one request, whatever the server allows.
const MAX_READ: u32 = 32 << 20;
/// Largest range asked about in one `NBD_CMD_BLOCK_STATUS`.
const MAX_STATUS: u64 = 1 << 30;
/// Largest option reply or non-data reply chunk accepted.
const MAX_CONTROL_PAYLOAD: u64 = 16 << 20;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A TCP host and port.
    Tcp {
        /// Host name or address (no brackets for IPv6).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix domain socket.
    Unix(PathBuf),
}

/// A parsed `nbd://` or `nbd+unix://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUrl {
    /// Where to connect.
    pub address: NbdAddress,
    /// Export name ("" for the default export).
    pub export: String,
    /// The URL as written (for messages).
    pub url: String,
}

/// True if `name` uses one of the NBD URL schemes this client knows
/// (including the refused `nbds` ones, so that they get a clear message).
pub fn is_nbd_url(name: &str) -> bool {
    let Some((scheme, _)) = name.split_once("://") else {
        return false;
    };
    matches!(
        scheme.to_ascii_lowercase().as_str(),
        "nbd" | "nbd+tcp" | "nbd+unix" | "nbds" | "nbds+tcp" | "nbds+unix" | "nbd+vsock"
    )
}

/// Parse an NBD URL.
pub fn parse_url(url: &str) -> Result<NbdUrl, String> {
    let (scheme, authority, path, query) = crate::url::split(url)?;
    let params = crate::url::query_pairs(query)?;
    let export = crate::url::percent_decode(path.strip_prefix('/').unwrap_or(path))?;
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let address = match scheme.as_str() {
        "nbd" | "nbd+tcp" => {
            if param("socket").is_some() {
                return Err(format!(
                    "{url}: 'socket=' needs the nbd+unix:// scheme (nbd+unix:///export?socket=PATH)"
                ));
            }
            let (host, port) =
                crate::url::host_port(authority).map_err(|e| format!("{url}: {e}"))?;
            if host.is_empty() {
                return Err(format!("{url}: no host name"));
            }
            NbdAddress::Tcp {
                host,
                port: port.unwrap_or(consts::DEFAULT_PORT),
            }
        }
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err(format!(
                    "{url}: nbd+unix URLs have no host (nbd+unix:///export?socket=PATH)"
                ));
            }
            match param("socket") {
                Some(s) if !s.is_empty() => NbdAddress::Unix(PathBuf::from(s)),
                _ => {
                    return Err(format!(
                        "{url}: the socket is missing (nbd+unix:///export?socket=PATH)"
                    ));
                }
            }
        }
        "nbds" | "nbds+tcp" | "nbds+unix" => {
            return Err(format!(
                "{url}: NBD over TLS is not supported by this client"
            ));
        }
        other => return Err(format!("{url}: unsupported NBD URL scheme '{other}'")),
    };
    Ok(NbdUrl {
        address,
        export,
        url: url.to_string(),
    })
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (requests are aligned to it).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum block size (reads are split at it).
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Id of the `base:allocation` context, if the server has it.
    pub allocation_context: Option<u32>,
    /// Negotiated with `NBD_OPT_GO` (false: `NBD_OPT_EXPORT_NAME`).
    pub used_go: bool,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

fn nbd_error_name(code: u32) -> String {
    match code {
        consts::EPERM => "EPERM (operation not permitted)".into(),
        consts::EIO => "EIO (input/output error)".into(),
        consts::ENOMEM => "ENOMEM (out of memory)".into(),
        consts::EINVAL => "EINVAL (invalid argument)".into(),
        consts::ENOSPC => "ENOSPC (no space left)".into(),
        consts::EOVERFLOW => "EOVERFLOW (value too large)".into(),
        consts::ENOTSUP => "ENOTSUP (not supported)".into(),
        consts::ESHUTDOWN => "ESHUTDOWN (server shutting down)".into(),
        other => format!("error {other}"),
    }
}

fn option_error_name(code: u32) -> String {
    match code {
        consts::REP_ERR_UNSUP => "unsupported option".into(),
        consts::REP_ERR_POLICY => "forbidden by server policy".into(),
        consts::REP_ERR_INVALID => "invalid request".into(),
        consts::REP_ERR_PLATFORM => "not supported on the server's platform".into(),
        consts::REP_ERR_TLS_REQD => "TLS required".into(),
        consts::REP_ERR_UNKNOWN => "unknown export".into(),
        consts::REP_ERR_SHUTDOWN => "server shutting down".into(),
        consts::REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required".into(),
        consts::REP_ERR_TOO_BIG => "request too big".into(),
        consts::REP_ERR_EXT_HEADER_REQD => "extended headers required".into(),
        other => format!("error {other:#x}"),
    }
}

fn with_message(msg: &str) -> String {
    if msg.is_empty() {
        String::new()
    } else {
        format!(" ({msg})")
    }
}

/// One NBD connection in the transmission phase.
pub struct Connection {
    io: BufReader<Stream>,
    info: ExportInfo,
    cookie: u64,
    url: String,
    /// Set when the stream is no longer usable (I/O or protocol error).
    broken: bool,
}

impl Connection {
    /// Connect to `url` and negotiate, with the connect timeout of `policy`
    /// for everything up to the transmission phase.
    pub fn connect(url: &NbdUrl, policy: &Policy) -> Result<Connection, Failure> {
        let u = &url.url;
        let stream = match &url.address {
            NbdAddress::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| Failure::from_io(&format!("{u}: cannot resolve '{host}'"), e))?
                    .collect();
                let mut last = None;
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, policy.connect_timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match (found, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(Failure::from_io(&format!("{u}: connect"), e)),
                    (None, None) => {
                        return Err(Failure::permanent(format!("{u}: '{host}' has no address")));
                    }
                };
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            NbdAddress::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(|e| {
                Failure::from_io(&format!("{u}: connect to {}", path.display()), e)
            })?),
        };
        stream
            .set_timeouts(policy.connect_timeout)
            .map_err(|e| Failure::from_io(&format!("{u}: socket setup"), e))?;
        let mut c = Connection {
            io: BufReader::with_capacity(64 * 1024, stream),
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                preferred_block: 4096,
                max_block: MAX_READ,
                structured: false,
                allocation_context: None,
                used_go: false,
            },
            cookie: 0,
            url: u.clone(),
            broken: false,
        };
        c.info = c.handshake(&url.export)?;
        c.io.get_ref()
            .set_timeouts(policy.io_timeout)
            .map_err(|e| Failure::from_io(&format!("{u}: socket setup"), e))?;
        Ok(c)
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// True once the connection cannot be used any more.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn io_fail(&mut self, what: &str, e: io::Error) -> Failure {
        self.broken = true;
        Failure::from_io(&format!("{}: {what}", self.url), e)
    }

    fn protocol(&mut self, msg: impl std::fmt::Display) -> Failure {
        self.broken = true;
        Failure::permanent(format!("{}: NBD protocol error: {msg}", self.url))
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), Failure> {
        match self.io.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_fail(what, e)),
        }
    }

    fn write_all(&mut self, buf: &[u8], what: &str) -> Result<(), Failure> {
        match self.io.get_mut().write_all(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_fail(what, e)),
        }
    }

    fn read_vec(&mut self, len: u64, what: &str) -> Result<Vec<u8>, Failure> {
        if len > MAX_CONTROL_PAYLOAD {
            return Err(self.protocol(format!("{what} of {len} bytes is too large")));
        }
        let mut v = vec![0u8; len as usize];
        self.read_exact(&mut v, what)?;
        Ok(v)
    }

    fn send_option(&mut self, opt: &ClientOption) -> Result<(), Failure> {
        let bytes = match handshake::encode_option(opt) {
            Ok(b) => b,
            Err(e) => {
                return Err(Failure::permanent(format!(
                    "{}: cannot encode option: {e}",
                    self.url
                )));
            }
        };
        self.write_all(&bytes, "handshake")
    }

    fn read_option_reply(&mut self, option: u32) -> Result<OptionReply, Failure> {
        let mut h = [0u8; consts::OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut h, "handshake")?;
        let hdr = match decode_option_reply_header(&h) {
            Ok(h) => h,
            Err(e) => return Err(self.protocol(e)),
        };
        if hdr.option != option {
            return Err(self.protocol(format!(
                "reply to option {} while waiting for option {option}",
                hdr.option
            )));
        }
        let payload = self.read_vec(u64::from(hdr.length), "option reply")?;
        match decode_option_reply(&hdr, &payload) {
            Ok(r) => Ok(r),
            Err(e) => Err(self.protocol(e)),
        }
    }

    fn handshake(&mut self, export: &str) -> Result<ExportInfo, Failure> {
        let u = self.url.clone();
        let mut g = [0u8; consts::GREETING_LEN];
        self.read_exact(&mut g, "handshake")?;
        let hflags = match handshake::decode_greeting(&g) {
            Ok(f) => f,
            Err(e) => {
                self.broken = true;
                return Err(Failure::permanent(format!(
                    "{u}: not an NBD server speaking the newstyle protocol ({e})"
                )));
            }
        };
        if hflags & consts::FLAG_FIXED_NEWSTYLE == 0 {
            self.broken = true;
            return Err(Failure::permanent(format!(
                "{u}: the server does not support fixed newstyle negotiation"
            )));
        }
        let no_zeroes = hflags & consts::FLAG_NO_ZEROES != 0;
        let mut cflags = consts::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= consts::FLAG_C_NO_ZEROES;
        }
        self.write_all(&handshake::encode_client_flags(cflags), "handshake")?;

        // Structured replies, then the allocation context.
        self.send_option(&ClientOption::StructuredReply)?;
        let structured = match self.read_option_reply(consts::OPT_STRUCTURED_REPLY)? {
            OptionReply::Ack => true,
            OptionReply::Error { .. } => false,
            other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
        };
        let mut allocation_context = None;
        if structured {
            self.send_option(&ClientOption::SetMetaContext {
                export: export.to_string(),
                queries: vec![consts::META_CONTEXT_BASE_ALLOCATION.to_string()],
            })?;
            loop {
                match self.read_option_reply(consts::OPT_SET_META_CONTEXT)? {
                    OptionReply::MetaContext { id, name } => {
                        if name == consts::META_CONTEXT_BASE_ALLOCATION {
                            allocation_context = Some(id);
                        }
                    }
                    OptionReply::Ack => break,
                    OptionReply::Error { reply_type, .. }
                        if reply_type == consts::REP_ERR_UNKNOWN =>
                    {
                        return Err(Failure::permanent_kind(
                            io::ErrorKind::NotFound,
                            format!("{u}: the server has no export named '{export}'"),
                        ));
                    }
                    OptionReply::Error { .. } => {
                        allocation_context = None;
                        break;
                    }
                    other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
                }
            }
        }

        // NBD_OPT_GO with the block size constraints.
        self.send_option(&ClientOption::Go {
            name: export.to_string(),
            info_requests: vec![consts::INFO_BLOCK_SIZE],
        })?;
        let mut export_info = None;
        let mut block = None;
        let mut used_go = true;
        loop {
            match self.read_option_reply(consts::OPT_GO)? {
                OptionReply::Info(InfoReply::Export { size, flags }) => {
                    export_info = Some((size, flags));
                }
                OptionReply::Info(InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                }) => block = Some((minimum, preferred, maximum)),
                OptionReply::Info(_) => {}
                OptionReply::Ack => break,
                OptionReply::Error {
                    reply_type,
                    message,
                } => match reply_type {
                    consts::REP_ERR_UNSUP => {
                        used_go = false;
                        export_info = Some(self.export_name(export, no_zeroes)?);
                        break;
                    }
                    consts::REP_ERR_UNKNOWN => {
                        return Err(Failure::permanent_kind(
                            io::ErrorKind::NotFound,
                            format!(
                                "{u}: the server has no export named '{export}'{}",
                                with_message(&message)
                            ),
                        ));
                    }
                    consts::REP_ERR_TLS_REQD => {
                        return Err(Failure::permanent(format!(
                            "{u}: the server requires TLS, which this client does not support"
                        )));
                    }
                    consts::REP_ERR_SHUTDOWN => {
                        self.broken = true;
                        return Err(Failure::transient(format!(
                            "{u}: the server is shutting down"
                        )));
                    }
                    other => {
                        return Err(Failure::permanent(format!(
                            "{u}: the server refused export '{export}': {}{}",
                            option_error_name(other),
                            with_message(&message)
                        )));
                    }
                },
                other => return Err(self.protocol(format!("unexpected reply {other:?}"))),
            }
        }
        let Some((size, flags)) = export_info else {
            return Err(self.protocol("the server did not send the export size"));
        };
        if size > i64::MAX as u64 {
            return Err(self.protocol(format!("export size {size} is too large")));
        }
        let (min_block, preferred_block, max_block) = match block {
            None => (1, 4096, MAX_READ),
            Some((min, pref, max)) => {
                if min == 0 || !min.is_power_of_two() || min > 64 * 1024 {
                    return Err(self.protocol(format!("invalid minimum block size {min}")));
                }
                if max < min {
                    return Err(self.protocol(format!(
                        "maximum block size {max} is below the minimum {min}"
                    )));
                }
                // Read whole multiples of the minimum, at most MAX_READ.
                let max = max.min(MAX_READ) / min * min;
                (min, pref.max(min), max.max(min))
            }
        };
        Ok(ExportInfo {
            size,
            flags,
            min_block,
            preferred_block,
            max_block,
            structured,
            allocation_context,
            used_go,
        })
    }

    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(u64, u16), Failure> {
        self.send_option(&ClientOption::ExportName(export.to_string()))?;
        let len = if no_zeroes {
            10
        } else {
            10 + consts::EXPORT_NAME_REPLY_ZEROES
        };
        let mut buf = vec![0u8; len];
        if let Err(e) = self.io.read_exact(&mut buf) {
            self.broken = true;
            if e.kind() == io::ErrorKind::UnexpectedEof {
                return Err(Failure::permanent_kind(
                    io::ErrorKind::NotFound,
                    format!(
                        "{}: the server closed the connection: it has no export named '{export}'",
                        self.url
                    ),
                ));
            }
            return Err(Failure::from_io(&format!("{}: handshake", self.url), e));
        }
        match handshake::decode_export_name_reply(&buf, no_zeroes) {
            Ok(r) => Ok(r),
            Err(e) => Err(self.protocol(e)),
        }
    }

    fn send_request(&mut self, command: Command, offset: u64, length: u64) -> Result<u64, Failure> {
        self.cookie = self.cookie.wrapping_add(1);
        let req = Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        let bytes = match encode_request(&req, false) {
            Ok(b) => b,
            Err(e) => return Err(Failure::permanent(format!("{}: {e}", self.url))),
        };
        self.write_all(&bytes, "send request")?;
        Ok(self.cookie)
    }

    fn read_reply_header(&mut self, cookie: u64) -> Result<ReplyHeader, Failure> {
        let mut buf = [0u8; consts::EXTENDED_REPLY_HEADER_LEN];
        self.read_exact(&mut buf[..4], "read reply")?;
        let len = match reply::reply_header_len(&buf[..4], false) {
            Ok(l) => l,
            Err(e) => return Err(self.protocol(e)),
        };
        self.read_exact(&mut buf[4..len], "read reply")?;
        let h = match reply::decode_reply_header(&buf[..len], false) {
            Ok(h) => h,
            Err(e) => return Err(self.protocol(e)),
        };
        if h.cookie() != cookie {
            return Err(self.protocol(format!(
                "reply for cookie {} while waiting for {cookie}",
                h.cookie()
            )));
        }
        if matches!(h, ReplyHeader::Chunk(_)) && !self.info.structured {
            return Err(self.protocol("structured reply without negotiation"));
        }
        Ok(h)
    }

    fn server_error(&mut self, what: &str, code: u32, message: &str) -> Failure {
        let msg = format!(
            "{}: {what} failed on the server: {}{}",
            self.url,
            nbd_error_name(code),
            with_message(message)
        );
        if code == consts::ESHUTDOWN {
            self.broken = true;
            Failure::transient(msg)
        } else {
            Failure::permanent(msg)
        }
    }

    /// Fill `buf` from `offset`; bytes past the end of the export read as
    /// zeros.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Failure> {
        let size = self.info.size;
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let min = u64::from(self.info.min_block.max(1));
        let maxb = u64::from(self.info.max_block.max(self.info.min_block).max(1));
        let end = offset + inside as u64;
        let mut pos = offset;
        while pos < end {
            let a_start = pos / min * min;
            let chunk_end = end.min(a_start + maxb);
            let a_end = chunk_end.div_ceil(min).saturating_mul(min).min(size);
            let dst = &mut buf[(pos - offset) as usize..(chunk_end - offset) as usize];
            if a_start == pos && a_end == chunk_end {
                self.read_request(a_start, dst)?;
            } else {
                let mut tmp = vec![0u8; (a_end - a_start) as usize];
                self.read_request(a_start, &mut tmp)?;
                let from = (pos - a_start) as usize;
                dst.copy_from_slice(&tmp[from..from + dst.len()]);
            }
            pos = chunk_end;
        }
        Ok(())
    }

    fn read_request(&mut self, offset: u64, dst: &mut [u8]) -> Result<(), Failure> {
        let len = dst.len() as u64;
        let cookie = self.send_request(Command::Read, offset, len)?;
        let what = format!("read of {len} bytes at offset {offset}");
        let mut covered = 0u64;
        let mut error: Option<Failure> = None;
        loop {
            let h = match self.read_reply_header(cookie)? {
                ReplyHeader::Simple(s) => {
                    if s.error != 0 {
                        return Err(self.server_error(&what, s.error, ""));
                    }
                    self.read_exact(dst, "read data")?;
                    return Ok(());
                }
                ReplyHeader::Chunk(h) => h,
            };
            if h.reply_type == consts::REPLY_TYPE_OFFSET_DATA {
                if h.length < 9 {
                    return Err(self.protocol("OFFSET_DATA chunk shorter than 9 bytes"));
                }
                let mut o = [0u8; 8];
                self.read_exact(&mut o, "read data")?;
                let at = u64::from_be_bytes(o);
                let n = h.length - 8;
                if at < offset || at.checked_add(n).is_none_or(|e| e > offset + len) {
                    return Err(self.protocol(format!(
                        "data chunk at {at} (+{n}) outside the request {offset} (+{len})"
                    )));
                }
                let from = (at - offset) as usize;
                self.read_exact(&mut dst[from..from + n as usize], "read data")?;
                covered += n;
            } else {
                let payload = self.read_vec(h.length, "reply chunk")?;
                let decoded = match reply::decode_chunk_payload(&h, &payload) {
                    Ok(p) => p,
                    Err(e) => return Err(self.protocol(e)),
                };
                match decoded {
                    ChunkPayload::None => {}
                    ChunkPayload::OffsetHole { offset: at, length } => {
                        let n = u64::from(length);
                        if at < offset || at.checked_add(n).is_none_or(|e| e > offset + len) {
                            return Err(self.protocol(format!(
                                "hole chunk at {at} (+{n}) outside the request {offset} (+{len})"
                            )));
                        }
                        let from = (at - offset) as usize;
                        dst[from..from + n as usize].fill(0);
                        covered += n;
                    }
                    p if p.error().is_some() => {
                        if let (None, Some((code, message))) = (&error, p.error()) {
                            error = Some(self.server_error(&what, code, message));
                        }
                    }
                    other => {
                        return Err(self.protocol(format!("unexpected chunk {other:?} in a read")));
                    }
                }
            }
            if h.is_done() {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if covered != len {
            return Err(self.protocol(format!(
                "the reply covered {covered} of {len} bytes of {what}"
            )));
        }
        Ok(())
    }

    /// Data and zero runs of `[offset, offset+len)` from `base:allocation`
    /// (everything is data if the server has no such context).
    pub fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<AllocRun>, Failure> {
        let size = self.info.size;
        let end = offset.saturating_add(len);
        let inside_end = end.min(size).max(offset);
        let mut runs = Vec::new();
        let Some(ctx) = self.info.allocation_context else {
            runs.push(AllocRun {
                length: inside_end - offset,
                data: true,
            });
            runs.push(AllocRun {
                length: end - inside_end,
                data: false,
            });
            return Ok(coalesce(runs));
        };
        let min = u64::from(self.info.min_block.max(1));
        let mut pos = offset;
        while pos < inside_end {
            let a_start = pos / min * min;
            let want = (inside_end - a_start).min(MAX_STATUS);
            let a_len = want
                .div_ceil(min)
                .saturating_mul(min)
                .min(size - a_start)
                .min(u64::from(u32::MAX) / min * min);
            let descriptors = self.block_status(a_start, a_len, ctx)?;
            let mut cur = a_start;
            for (dlen, flags) in descriptors {
                let seg_end = cur.saturating_add(dlen);
                let s = cur.max(pos);
                let e = seg_end.min(inside_end);
                if e > s {
                    runs.push(AllocRun {
                        length: e - s,
                        data: flags & u64::from(consts::STATE_ZERO) == 0,
                    });
                }
                cur = seg_end;
                if cur >= inside_end {
                    break;
                }
            }
            if cur <= pos {
                return Err(self.protocol("block status made no progress"));
            }
            pos = cur.min(inside_end);
        }
        runs.push(AllocRun {
            length: end - inside_end,
            data: false,
        });
        Ok(coalesce(runs))
    }

    fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        ctx: u32,
    ) -> Result<Vec<(u64, u64)>, Failure> {
        let cookie = self.send_request(Command::BlockStatus, offset, len)?;
        let what = format!("block status of {len} bytes at offset {offset}");
        let mut out: Option<Vec<(u64, u64)>> = None;
        let mut error = None;
        loop {
            let h = match self.read_reply_header(cookie)? {
                ReplyHeader::Simple(s) => {
                    if s.error != 0 {
                        return Err(self.server_error(&what, s.error, ""));
                    }
                    return Err(self.protocol("simple success reply to a block status request"));
                }
                ReplyHeader::Chunk(h) => h,
            };
            let payload = self.read_vec(h.length, "reply chunk")?;
            let decoded = match reply::decode_chunk_payload(&h, &payload) {
                Ok(p) => p,
                Err(e) => return Err(self.protocol(e)),
            };
            match decoded {
                ChunkPayload::None => {}
                ChunkPayload::BlockStatus {
                    context_id,
                    descriptors,
                } => {
                    if context_id == ctx && out.is_none() {
                        out = Some(
                            descriptors
                                .into_iter()
                                .map(|(l, f)| (u64::from(l), u64::from(f)))
                                .collect(),
                        );
                    }
                }
                p if p.error().is_some() => {
                    if let (None, Some((code, message))) = (&error, p.error()) {
                        error = Some(self.server_error(&what, code, message));
                    }
                }
                other => {
                    return Err(
                        self.protocol(format!("unexpected chunk {other:?} in a block status"))
                    );
                }
            }
            if h.is_done() {
                break;
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        match out {
            Some(d) if !d.is_empty() => Ok(d),
            _ => Err(self.protocol("no extents for the allocation context")),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.broken {
            return;
        }
        // A polite disconnect; failures do not matter.
        let _ = self.io.get_ref().set_timeouts(Duration::from_millis(200));
        let req = Request {
            flags: 0,
            command: Command::Disc,
            cookie: self.cookie.wrapping_add(1),
            offset: 0,
            length: 0,
        };
        if let Ok(bytes) = encode_request(&req, false) {
            let _ = self.io.get_mut().write_all(&bytes);
        }
    }
}

#[derive(Default)]
struct Slot(Option<Connection>);

/// An NBD export used as a base (content read as raw).
pub struct NbdBase {
    url: Arc<NbdUrl>,
    info: ExportInfo,
    policy: Policy,
    workers: Workers<Slot>,
}

fn with_conn<T>(
    slot: &mut Slot,
    url: &NbdUrl,
    policy: &Policy,
    size: u64,
    f: impl FnOnce(&mut Connection) -> Result<T, Failure>,
) -> Result<T, Failure> {
    let conn = match &mut slot.0 {
        Some(c) => c,
        empty => {
            let c = Connection::connect(url, policy).map_err(|f| match (f, &url.address) {
                // A server restarting removes and recreates its socket.
                (Failure::Permanent(e), NbdAddress::Unix(_))
                    if e.kind() == io::ErrorKind::NotFound =>
                {
                    Failure::Transient(e)
                }
                (f, _) => f,
            })?;
            if c.info.size != size {
                return Err(Failure::permanent(format!(
                    "{}: the export changed size from {size} to {} bytes",
                    url.url, c.info.size
                )));
            }
            empty.insert(c)
        }
    };
    let r = f(conn);
    if r.is_err() && conn.is_broken() {
        slot.0 = None;
    }
    r
}

impl NbdBase {
    /// Connect to `url` (retrying transient failures as `policy` says) and
    /// learn the export's size and capabilities.
    pub async fn open(url: &str, policy: Policy) -> io::Result<NbdBase> {
        let parsed =
            Arc::new(parse_url(url).map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?);
        let workers: Workers<Slot> = Workers::new("fvd-nbd", policy.connections);
        let u = parsed.clone();
        let info = workers
            .run(move |slot: &mut Slot| {
                policy.run(|_| {
                    let c = Connection::connect(&u, &policy)?;
                    let info = c.info;
                    slot.0 = Some(c);
                    Ok(info)
                })
            })
            .await?;
        // Several connections only where the server says they see the same
        // data (NBD_FLAG_CAN_MULTI_CONN); qemu-nbd, for one, serves a single
        // client unless started with --shared.
        if info.flags & consts::FLAG_CAN_MULTI_CONN == 0 {
            workers.set_max_threads(1);
        }
        Ok(NbdBase {
            url: parsed,
            info,
            policy,
            workers,
        })
    }

    /// What the server said about the export at open.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }
}

impl Base for NbdBase {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let url = self.url.clone();
        let policy = self.policy;
        let size = self.info.size;
        if buf.is_empty() {
            return Box::pin(std::future::ready(Ok(buf)));
        }
        Box::pin(self.workers.run(move |slot: &mut Slot| {
            let mut buf = buf;
            policy.run(|_| with_conn(slot, &url, &policy, size, |c| c.read(offset, &mut buf)))?;
            Ok(buf)
        }))
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        if self.info.allocation_context.is_none() || len == 0 {
            let inside = self.info.size.saturating_sub(offset).min(len);
            let runs = coalesce(vec![
                AllocRun {
                    length: inside,
                    data: true,
                },
                AllocRun {
                    length: len - inside,
                    data: false,
                },
            ]);
            return Box::pin(std::future::ready(Ok(runs)));
        }
        let url = self.url.clone();
        let policy = self.policy;
        let size = self.info.size;
        Box::pin(self.workers.run(move |slot: &mut Slot| {
            policy.run(|_| with_conn(slot, &url, &policy, size, |c| c.allocation(offset, len)))
        }))
    }

    fn format(&self) -> fvd_core::Format {
        fvd_core::Format::Raw
    }

    fn describe(&self) -> String {
        self.url.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("nbd://example.com/disk").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "example.com".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "disk");
        let u = parse_url("nbd://127.0.0.1:1234").unwrap();
        assert_eq!(u.export, "");
        assert_eq!(
            u.address,
            NbdAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        let u = parse_url("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(u.export, "a b");
        let u = parse_url("nbd+unix:///?socket=/tmp/x.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/tmp/x.sock".into()));
        assert_eq!(u.export, "");
        let u = parse_url("nbd+unix:///exp?socket=/tmp/x.sock").unwrap();
        assert_eq!(u.export, "exp");
        assert!(parse_url("nbd+unix:///exp").is_err());
        assert!(parse_url("nbd+unix://host/exp?socket=/s").is_err());
        assert!(parse_url("nbds://host/exp").unwrap_err().contains("TLS"));
        assert!(parse_url("nbd:///exp").is_err());
        assert!(parse_url("nbd://h/e?socket=/s").is_err());
        assert!(is_nbd_url("NBD+UNIX:///x"));
        assert!(!is_nbd_url("http://x"));
    }
}
