//! An HTTP/1.1 client for byte ranges: a file on a web server as a base.
//!
//! `http://` and `https://` URLs (TLS through rustls with the ring
//! provider, trusting the system's CA certificates; `SSL_CERT_FILE` and
//! `SSL_CERT_DIR` override the store). Opening sends
//! `GET` with `Range: bytes=0-0`: the `206` answer's `Content-Range` gives
//! the size, and its `ETag` and `Last-Modified` go into the base's
//! validator, so an image whose base changed on the server is refused at
//! open. Reads send `Range: bytes=a-b` and expect `206` with exactly that
//! range; every answer's size, `ETag` and `Last-Modified` are checked again
//! against the ones seen at open. A server that answers `200` to a range
//! request does not support ranges: that is a permanent error. Redirects
//! are followed at open (at most 5), and reads go to the final location.
//!
//! Connections are kept alive and reused; a reused connection that turns
//! out to be closed is replaced at once. Timeouts, `5xx`, `408` and `429`
//! are retried as [`Policy`] says; other statuses fail at once with the URL
//! and the status in the message.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};

use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::storage::{AllocRun, IoFuture, coalesce};

use crate::pool::Workers;
use crate::retry::{Failure, Policy};

/// Most bytes fetched with one request (larger reads are split).
const MAX_RANGE: u64 = 16 << 20;
/// Longest status line or header line.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines in one response.
const MAX_HEADERS: usize = 200;
/// Most bytes of an error response's body read (and dropped) to keep the
/// connection; larger bodies close it instead.
const MAX_DISCARD: u64 = 64 * 1024;
/// Most redirects followed at open.
const MAX_REDIRECTS: usize = 5;
/// Longest validator the image header can record.
const MAX_VALIDATOR: usize = 256;

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    /// `https`.
    pub tls: bool,
    /// Host name or address (no brackets for IPv6).
    pub host: String,
    /// Port (80 or 443 unless given).
    pub port: u16,
    /// Path and query, as sent in the request line (starts with `/`).
    pub target: String,
    /// The URL as written.
    pub url: String,
}

/// True if `name` is an `http://` or `https://` URL.
pub fn is_http_url(name: &str) -> bool {
    name.split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"))
}

/// Parse an `http://` or `https://` URL.
pub fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let (scheme, authority, path, query) = crate::url::split(url)?;
    let tls = match scheme.as_str() {
        "http" => false,
        "https" => true,
        other => return Err(format!("{url}: unsupported scheme '{other}'")),
    };
    let (host, port) = crate::url::host_port(authority).map_err(|e| format!("{url}: {e}"))?;
    if host.is_empty() {
        return Err(format!("{url}: no host name"));
    }
    if path
        .bytes()
        .chain(query.unwrap_or("").bytes())
        .any(|b| b <= b' ' || b == 0x7f)
    {
        return Err(format!(
            "{url}: spaces and control characters must be %-escaped"
        ));
    }
    let mut target = if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    };
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    Ok(HttpUrl {
        tls,
        port: port.unwrap_or(if tls { 443 } else { 80 }),
        host,
        target,
        url: url.to_string(),
    })
}

/// Resolve `relative` (a name found inside the file at `base`, such as a
/// qcow2 backing file) against the URL `base`.
pub fn join_url(base: &str, relative: &str) -> Result<String, String> {
    let b = parse_url(base)?;
    Ok(b.join(relative)?.url)
}

impl HttpUrl {
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// Resolve a `Location` header against this URL.
    fn join(&self, location: &str) -> Result<HttpUrl, String> {
        if crate::url::split(location).is_ok() {
            return parse_url(location);
        }
        let scheme = if self.tls { "https" } else { "http" };
        let authority = self.host_header();
        let abs = if let Some(rest) = location.strip_prefix("//") {
            format!("{scheme}://{rest}")
        } else if location.starts_with('/') {
            format!("{scheme}://{authority}{location}")
        } else {
            let path = self.target.split('?').next().unwrap_or("/");
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            format!("{scheme}://{authority}{dir}{location}")
        };
        parse_url(&abs)
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "no trusted CA certificates found in the system store{why}; \
                     install ca-certificates or set SSL_CERT_FILE"
                ));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS setup: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A response's status line and headers.
#[derive(Debug)]
struct Head {
    status: u16,
    reason: String,
    headers: Vec<(String, String)>,
    body: BodyKind,
    keep_alive: bool,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn status_text(&self) -> String {
        if self.reason.is_empty() {
            self.status.to_string()
        } else {
            format!("{} {}", self.status, self.reason)
        }
    }
}

/// One HTTP connection.
struct Conn {
    io: BufReader<Stream>,
    /// Still usable for another request.
    reusable: bool,
    /// Requests completed on it.
    served: u64,
}

impl Conn {
    fn connect(url: &HttpUrl, policy: &Policy) -> Result<Conn, Failure> {
        let u = &url.url;
        let addrs: Vec<_> = (url.host.as_str(), url.port)
            .to_socket_addrs()
            .map_err(|e| Failure::from_io(&format!("{u}: cannot resolve '{}'", url.host), e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, policy.connect_timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(Failure::from_io(&format!("{u}: connect"), e)),
            (None, None) => {
                return Err(Failure::permanent(format!(
                    "{u}: '{}' has no address",
                    url.host
                )));
            }
        };
        let setup = |e| Failure::from_io(&format!("{u}: socket setup"), e);
        tcp.set_read_timeout(Some(policy.io_timeout))
            .map_err(setup)?;
        tcp.set_write_timeout(Some(policy.io_timeout))
            .map_err(setup)?;
        let _ = tcp.set_nodelay(true);
        let stream = if url.tls {
            let config = tls_config().map_err(|m| Failure::permanent(format!("{u}: {m}")))?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| Failure::permanent(format!("{u}: bad TLS server name: {e}")))?;
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| Failure::permanent(format!("{u}: TLS setup: {e}")))?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        } else {
            Stream::Plain(tcp)
        };
        Ok(Conn {
            io: BufReader::with_capacity(64 * 1024, stream),
            reusable: true,
            served: 0,
        })
    }

    /// A failure on the socket: the connection is finished. TLS
    /// certificate problems are permanent; the rest as [`Failure::from_io`].
    fn io_fail(&mut self, url: &HttpUrl, what: &str, e: io::Error) -> Failure {
        self.reusable = false;
        if e.kind() == io::ErrorKind::InvalidData
            && let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Failure::permanent(format!("{}: {what}: TLS: {tls}", url.url));
        }
        Failure::from_io(&format!("{}: {what}", url.url), e)
    }

    fn protocol(&mut self, url: &HttpUrl, msg: impl std::fmt::Display) -> Failure {
        self.reusable = false;
        Failure::permanent(format!("{}: HTTP protocol error: {msg}", url.url))
    }

    fn send_get(&mut self, url: &HttpUrl, range: (u64, u64)) -> Result<(), Failure> {
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fvd/{}\r\nAccept: */*\r\n\
             Accept-Encoding: identity\r\nRange: bytes={}-{}\r\n\r\n",
            url.target,
            url.host_header(),
            env!("CARGO_PKG_VERSION"),
            range.0,
            range.1
        );
        let r = {
            let s = self.io.get_mut();
            s.write_all(req.as_bytes()).and_then(|()| s.flush())
        };
        r.map_err(|e| self.io_fail(url, "send request", e))
    }

    /// One line without its CRLF; `None` at a clean end of stream before
    /// any byte.
    fn read_line(&mut self, url: &HttpUrl) -> Result<Option<String>, Failure> {
        let mut line = Vec::new();
        let r = (&mut self.io).take(MAX_LINE).read_until(b'\n', &mut line);
        match r {
            Err(e) => Err(self.io_fail(url, "read response", e)),
            Ok(0) => Ok(None),
            Ok(_) if line.last() != Some(&b'\n') => {
                if line.len() as u64 >= MAX_LINE {
                    Err(self.protocol(url, "header line too long"))
                } else {
                    self.reusable = false;
                    Err(Failure::from_io(
                        &format!("{}: read response", url.url),
                        io::Error::from(io::ErrorKind::UnexpectedEof),
                    ))
                }
            }
            Ok(_) => {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(String::from_utf8_lossy(&line).into_owned()))
            }
        }
    }

    fn read_head(&mut self, url: &HttpUrl) -> Result<Head, Failure> {
        loop {
            let Some(status_line) = self.read_line(url)? else {
                self.reusable = false;
                return Err(Failure::from_io(
                    &format!("{}: read response", url.url),
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            };
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or("");
            let minor = match version {
                "HTTP/1.1" => 1,
                "HTTP/1.0" => 0,
                _ => return Err(self.protocol(url, format!("bad status line '{status_line}'"))),
            };
            let status: u16 = match parts.next().and_then(|s| s.parse().ok()) {
                Some(s) if (100..1000).contains(&s) => s,
                _ => return Err(self.protocol(url, format!("bad status line '{status_line}'"))),
            };
            let reason = parts.next().unwrap_or("").trim().to_string();
            let mut headers: Vec<(String, String)> = Vec::new();
            loop {
                let Some(line) = self.read_line(url)? else {
                    return Err(self.protocol(url, "end of stream inside the headers"));
                };
                if line.is_empty() {
                    break;
                }
                if line.starts_with([' ', '\t']) {
                    return Err(self.protocol(url, "folded header lines are not supported"));
                }
                let Some((name, value)) = line.split_once(':') else {
                    return Err(self.protocol(url, format!("bad header line '{line}'")));
                };
                if headers.len() >= MAX_HEADERS {
                    return Err(self.protocol(url, "too many header lines"));
                }
                headers.push((name.trim().to_string(), value.trim().to_string()));
            }
            if (100..200).contains(&status) {
                // Interim response (100 Continue, 103 Early Hints): skip it.
                continue;
            }
            let mut head = Head {
                status,
                reason,
                headers,
                body: BodyKind::Empty,
                keep_alive: false,
            };
            let tokens = |v: Option<&str>| -> Vec<String> {
                v.unwrap_or("")
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .filter(|t| !t.is_empty())
                    .collect()
            };
            let connection = head
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
                .flat_map(|(_, v)| tokens(Some(v)))
                .collect::<Vec<_>>();
            head.keep_alive = if minor == 1 {
                !connection.iter().any(|t| t == "close")
            } else {
                connection.iter().any(|t| t == "keep-alive")
            };
            let te = tokens(head.header("transfer-encoding"));
            let lengths: Vec<&str> = head
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.as_str())
                .collect();
            head.body = if status == 204 || status == 304 {
                BodyKind::Empty
            } else if !te.is_empty() {
                if te.last().map(String::as_str) != Some("chunked") {
                    return Err(self.protocol(url, "unsupported transfer encoding"));
                }
                if te.iter().any(|t| t != "chunked" && t != "identity") {
                    return Err(self.protocol(url, "unsupported transfer encoding"));
                }
                BodyKind::Chunked
            } else if let Some(first) = lengths.first() {
                let n: u64 = match first.parse() {
                    Ok(n) => n,
                    Err(_) => {
                        return Err(self.protocol(url, format!("bad Content-Length '{first}'")));
                    }
                };
                if lengths.iter().any(|l| l.parse::<u64>().ok() != Some(n)) {
                    return Err(self.protocol(url, "conflicting Content-Length headers"));
                }
                BodyKind::Length(n)
            } else {
                BodyKind::UntilClose
            };
            if let Some(ce) = head.header("content-encoding")
                && !ce.eq_ignore_ascii_case("identity")
                && (200..300).contains(&status)
            {
                return Err(self.protocol(
                    url,
                    format!("the server sent an encoded body (Content-Encoding: {ce})"),
                ));
            }
            if head.body == BodyKind::UntilClose || !head.keep_alive {
                self.reusable = false;
            }
            return Ok(head);
        }
    }

    fn read_exact(&mut self, url: &HttpUrl, buf: &mut [u8]) -> Result<(), Failure> {
        match self.io.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_fail(url, "read body", e)),
        }
    }

    fn chunk_size(&mut self, url: &HttpUrl) -> Result<u64, Failure> {
        let Some(line) = self.read_line(url)? else {
            return Err(self.protocol(url, "end of stream in a chunked body"));
        };
        let hex = line.split(';').next().unwrap_or("").trim();
        match u64::from_str_radix(hex, 16) {
            Ok(n) if !hex.is_empty() && hex.len() <= 15 => Ok(n),
            _ => Err(self.protocol(url, format!("bad chunk size line '{line}'"))),
        }
    }

    fn chunk_end(&mut self, url: &HttpUrl) -> Result<(), Failure> {
        match self.read_line(url)? {
            Some(l) if l.is_empty() => Ok(()),
            _ => Err(self.protocol(url, "missing CRLF after a chunk")),
        }
    }

    fn trailers(&mut self, url: &HttpUrl) -> Result<(), Failure> {
        for _ in 0..=MAX_HEADERS {
            match self.read_line(url)? {
                Some(l) if l.is_empty() => return Ok(()),
                Some(_) => {}
                None => return Err(self.protocol(url, "end of stream in the trailers")),
            }
        }
        Err(self.protocol(url, "too many trailer lines"))
    }

    /// Read a body that must be exactly `dst.len()` bytes into `dst`.
    fn read_body(&mut self, url: &HttpUrl, head: &Head, dst: &mut [u8]) -> Result<(), Failure> {
        let want = dst.len() as u64;
        match head.body {
            BodyKind::Empty => {
                if want != 0 {
                    return Err(self.protocol(url, format!("empty body, {want} bytes expected")));
                }
            }
            BodyKind::Length(n) => {
                if n != want {
                    return Err(self.protocol(
                        url,
                        format!("body of {n} bytes where {want} were asked for"),
                    ));
                }
                self.read_exact(url, dst)?;
            }
            BodyKind::UntilClose => {
                self.read_exact(url, dst)?;
                self.reusable = false;
            }
            BodyKind::Chunked => {
                let mut filled = 0usize;
                loop {
                    let n = self.chunk_size(url)?;
                    if n == 0 {
                        break;
                    }
                    if n > (dst.len() - filled) as u64 {
                        return Err(self.protocol(url, "chunked body longer than the range"));
                    }
                    let n = n as usize;
                    self.read_exact(url, &mut dst[filled..filled + n])?;
                    filled += n;
                    self.chunk_end(url)?;
                }
                self.trailers(url)?;
                if filled != dst.len() {
                    return Err(self.protocol(
                        url,
                        format!("chunked body of {filled} bytes where {want} were asked for"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Skip the body of an answer we do not use, keeping the connection if
    /// it is small; else give the connection up.
    fn discard_body(&mut self, url: &HttpUrl, head: &Head) {
        match head.body {
            BodyKind::Empty => {}
            BodyKind::Length(n) if n <= MAX_DISCARD => {
                let mut sink = vec![0u8; n as usize];
                if self.read_exact(url, &mut sink).is_err() {
                    self.reusable = false;
                }
            }
            _ => self.reusable = false,
        }
    }
}

/// A `Content-Range`: the range (`None` for `*`) and the total size
/// (`None` for `*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// What a `Content-Range` header says: `bytes a-b/total` or `bytes */total`
/// (`total` is `None` for `*`).
fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            if b < a {
                return None;
            }
            Some((a, b))
        }
    };
    Some((range, total))
}

fn status_failure(url: &HttpUrl, head: &Head, what: &str) -> Failure {
    let msg = format!(
        "{}: {what}: the server answered {}",
        url.url,
        head.status_text()
    );
    match head.status {
        404 | 410 => Failure::permanent_kind(io::ErrorKind::NotFound, msg),
        401 | 403 => Failure::permanent_kind(io::ErrorKind::PermissionDenied, msg),
        408 | 429 | 500..=599 => Failure::transient(msg),
        _ => Failure::permanent(msg),
    }
}

/// What identifies the object's version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Version {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Version {
    fn of(head: &Head) -> Version {
        Version {
            etag: head.header("etag").map(str::to_string),
            last_modified: head.header("last-modified").map(str::to_string),
        }
    }

    /// Why `now` is not the version seen at open, if it is not.
    fn changed(&self, now: &Version) -> Option<String> {
        if let (Some(a), Some(b)) = (&self.etag, &now.etag)
            && a != b
        {
            return Some(format!("ETag {a} is now {b}"));
        }
        if let (Some(a), Some(b)) = (&self.last_modified, &now.last_modified)
            && a != b
        {
            return Some(format!("Last-Modified '{a}' is now '{b}'"));
        }
        None
    }
}

enum Probe {
    Found { size: u64, version: Version },
    Redirect(HttpUrl),
}

fn probe(conn: &mut Conn, url: &HttpUrl) -> Result<Probe, Failure> {
    conn.send_get(url, (0, 0))?;
    let head = conn.read_head(url)?;
    match head.status {
        206 => {
            let cr = head.header("content-range").unwrap_or("");
            let Some((Some((0, 0)), total)) = parse_content_range(cr) else {
                return Err(conn.protocol(
                    url,
                    format!("206 answer with Content-Range '{cr}' to a request for bytes 0-0"),
                ));
            };
            let Some(size) = total else {
                return Err(Failure::permanent(format!(
                    "{}: the server does not tell the size of the file (Content-Range '{cr}')",
                    url.url
                )));
            };
            let mut one = [0u8; 1];
            conn.read_body(url, &head, &mut one)?;
            Ok(Probe::Found {
                size,
                version: Version::of(&head),
            })
        }
        200 => {
            conn.reusable = false;
            Err(Failure::permanent(format!(
                "{}: the server does not support range requests (it answered 200 to a \
                 request for bytes 0-0); an HTTP base needs byte ranges",
                url.url
            )))
        }
        416 => {
            let cr = head.header("content-range").unwrap_or("");
            conn.discard_body(url, &head);
            match parse_content_range(cr) {
                Some((None, Some(0))) => Ok(Probe::Found {
                    size: 0,
                    version: Version::of(&head),
                }),
                _ => Err(status_failure(url, &head, "probe size")),
            }
        }
        301 | 302 | 303 | 307 | 308 => {
            let Some(loc) = head.header("location").map(str::to_string) else {
                return Err(conn.protocol(url, "redirect without a Location"));
            };
            conn.discard_body(url, &head);
            let next = url
                .join(&loc)
                .map_err(|e| Failure::permanent(format!("{}: bad redirect: {e}", url.url)))?;
            Ok(Probe::Redirect(next))
        }
        _ => {
            conn.discard_body(url, &head);
            Err(status_failure(url, &head, "open"))
        }
    }
}

/// What every read checks the answer against.
struct Expect {
    size: u64,
    version: Version,
    /// The URL as the user wrote it (for messages).
    original: String,
}

fn read_range(
    conn: &mut Conn,
    url: &HttpUrl,
    exp: &Expect,
    offset: u64,
    dst: &mut [u8],
) -> Result<(), Failure> {
    let last = offset + dst.len() as u64 - 1;
    conn.send_get(url, (offset, last))?;
    let head = conn.read_head(url)?;
    let what = format!("read of {} bytes at offset {offset}", dst.len());
    match head.status {
        206 => {
            let cr = head.header("content-range").unwrap_or("");
            let Some((Some((a, b)), total)) = parse_content_range(cr) else {
                return Err(conn.protocol(url, format!("206 answer with Content-Range '{cr}'")));
            };
            if let Some(t) = total
                && t != exp.size
            {
                conn.reusable = false;
                return Err(Failure::permanent(format!(
                    "{}: the file changed on the server: it was {} bytes and is {t} now",
                    exp.original, exp.size
                )));
            }
            if let Some(why) = exp.version.changed(&Version::of(&head)) {
                conn.reusable = false;
                return Err(Failure::permanent(format!(
                    "{}: the file changed on the server: {why}",
                    exp.original
                )));
            }
            if (a, b) != (offset, last) {
                return Err(conn.protocol(
                    url,
                    format!("asked for bytes {offset}-{last}, got Content-Range '{cr}'"),
                ));
            }
            conn.read_body(url, &head, dst)
        }
        200 => {
            conn.reusable = false;
            Err(Failure::permanent(format!(
                "{}: the server ignored a range request (it answered 200); an HTTP base needs byte ranges",
                url.url
            )))
        }
        416 => {
            conn.discard_body(url, &head);
            Err(Failure::permanent(format!(
                "{}: {what}: the server answered {} (did the file shrink?)",
                exp.original,
                head.status_text()
            )))
        }
        _ => {
            conn.discard_body(url, &head);
            Err(status_failure(url, &head, &what))
        }
    }
}

#[derive(Default)]
struct Slot(Option<Conn>);

/// Run `f` on the slot's connection, connecting if needed. A reused
/// connection that fails transiently (the server closed it while idle) is
/// replaced once at once, without counting as a retry.
fn with_conn<T>(
    slot: &mut Slot,
    url: &HttpUrl,
    policy: &Policy,
    mut f: impl FnMut(&mut Conn) -> Result<T, Failure>,
) -> Result<T, Failure> {
    for fresh in [false, true] {
        let reused = slot.0.as_ref().is_some_and(|c| c.served > 0);
        let conn = match &mut slot.0 {
            Some(c) => c,
            empty => empty.insert(Conn::connect(url, policy)?),
        };
        let r = f(conn);
        conn.served += 1;
        if !conn.reusable {
            slot.0 = None;
        }
        match r {
            Err(e) if e.is_transient() && reused && !fresh => {
                slot.0 = None;
                continue;
            }
            r => return r,
        }
    }
    Err(Failure::transient(format!("{}: connection lost", url.url)))
}

/// A file on an HTTP(S) server used as a base (content read as raw).
pub struct HttpBase {
    url: Arc<HttpUrl>,
    expect: Arc<Expect>,
    policy: Policy,
    workers: Workers<Slot>,
}

impl HttpBase {
    /// Probe `url` (following redirects) for its size, ETag and
    /// Last-Modified, retrying transient failures as `policy` says.
    pub async fn open(url: &str, policy: Policy) -> io::Result<HttpBase> {
        let first = parse_url(url).map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        let workers: Workers<Slot> = Workers::new("fvd-http", policy.connections);
        let original = url.to_string();
        let (final_url, size, version) = workers
            .run(move |slot: &mut Slot| {
                let mut url = first;
                for _ in 0..=MAX_REDIRECTS {
                    let found =
                        policy.run(|_| with_conn(slot, &url, &policy, |c| probe(c, &url)))?;
                    match found {
                        Probe::Found { size, version } => return Ok((url, size, version)),
                        Probe::Redirect(next) => {
                            if (next.tls, &next.host, next.port) != (url.tls, &url.host, url.port) {
                                slot.0 = None;
                            }
                            url = next;
                        }
                    }
                }
                Err(io::Error::other(format!(
                    "{original}: more than {MAX_REDIRECTS} redirects"
                )))
            })
            .await?;
        Ok(HttpBase {
            url: Arc::new(final_url),
            expect: Arc::new(Expect {
                size,
                version,
                original: url.to_string(),
            }),
            policy,
            workers,
        })
    }
}

/// FNV-1a, to shorten an over-long ETag in the validator.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Base for HttpBase {
    fn size(&self) -> u64 {
        self.expect.size
    }

    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let url = self.url.clone();
        let exp = self.expect.clone();
        let policy = self.policy;
        Box::pin(self.workers.run(move |slot: &mut Slot| {
            let mut buf = buf;
            let inside = exp.size.saturating_sub(offset).min(buf.len() as u64) as usize;
            buf[inside..].fill(0);
            let mut done = 0usize;
            while done < inside {
                let n = (inside - done).min(MAX_RANGE as usize);
                let at = offset + done as u64;
                let dst = &mut buf[done..done + n];
                policy.run(|_| {
                    with_conn(slot, &url, &policy, |c| read_range(c, &url, &exp, at, dst))
                })?;
                done += n;
            }
            Ok(buf)
        }))
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        let inside = self.expect.size.saturating_sub(offset).min(len);
        Box::pin(std::future::ready(Ok(coalesce(vec![
            AllocRun {
                length: inside,
                data: true,
            },
            AllocRun {
                length: len - inside,
                data: false,
            },
        ]))))
    }

    fn format(&self) -> fvd_core::Format {
        fvd_core::Format::Raw
    }

    fn describe(&self) -> String {
        self.expect.original.clone()
    }

    fn validator(&self) -> String {
        let v = &self.expect.version;
        let base = format!("size={}", self.expect.size);
        let lm = v
            .last_modified
            .as_ref()
            .map(|l| format!(";last-modified={l}"))
            .unwrap_or_default();
        let etag = v
            .etag
            .as_ref()
            .map(|e| format!(";etag={e}"))
            .unwrap_or_default();
        let full = format!("{base}{etag}{lm}");
        if full.len() <= MAX_VALIDATOR {
            return full;
        }
        let etag = v
            .etag
            .as_ref()
            .map(|e| format!(";etag-fnv={:016x}", fnv1a(e)))
            .unwrap_or_default();
        let lm = if lm.len() > 100 {
            format!(";last-modified-fnv={:016x}", fnv1a(&lm))
        } else {
            lm
        };
        format!("{base}{etag}{lm}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("http://127.0.0.1:8080/dir/base.raw?x=1").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 8080));
        assert_eq!(u.target, "/dir/base.raw?x=1");
        assert_eq!(u.host_header(), "127.0.0.1:8080");
        let u = parse_url("https://example.com").unwrap();
        assert_eq!((u.tls, u.port, u.target.as_str()), (true, 443, "/"));
        assert_eq!(u.host_header(), "example.com");
        let u = parse_url("http://[::1]:81/a").unwrap();
        assert_eq!(u.host_header(), "[::1]:81");
        assert!(parse_url("ftp://x/y").is_err());
        assert!(parse_url("http:///y").is_err());
        assert!(parse_url("http://h/a b").is_err());
        let base = parse_url("http://h:81/d/e/f.raw").unwrap();
        assert_eq!(base.join("g.raw").unwrap().target, "/d/e/g.raw");
        assert_eq!(base.join("/g.raw").unwrap().target, "/g.raw");
        assert_eq!(base.join("https://o/x").unwrap().host, "o");
        assert_eq!(base.join("//o:5/x").unwrap().port, 5);
    }

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-0/100"),
            Some((Some((0, 0)), Some(100)))
        );
        assert_eq!(
            parse_content_range("bytes 5-9/*"),
            Some((Some((5, 9)), None))
        );
        assert_eq!(parse_content_range("bytes */0"), Some((None, Some(0))));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }

    #[test]
    fn versions() {
        let a = Version {
            etag: Some("\"a\"".into()),
            last_modified: Some("Mon".into()),
        };
        assert!(a.changed(&a.clone()).is_none());
        let b = Version {
            etag: Some("\"b\"".into()),
            ..a.clone()
        };
        assert!(a.changed(&b).unwrap().contains("ETag"));
        assert!(a.changed(&Version::default()).is_none());
    }
}
