//! HTTP(S) bases: a file on a web server read with byte ranges.
//!
//! `http://` and `https://` URLs, read through the pooled client of
//! [`crate::client`] (HTTP/2 where the server offers it, TLS through rustls
//! trusting the system's CA certificates or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR`), with the validation and retry rules of
//! [`crate::ranged`]: the size, `ETag` and `Last-Modified` seen at open go
//! into the validator and are checked on every answer, ranges must come
//! back as `206` exactly. Redirects are followed at open (at most 5), and
//! reads go to the final location; messages keep the URL as written.

use std::io;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;

use crate::client::{Client, Req};
use crate::ranged::{Probe, RangedBase, Source, Version, probe, retried};
use crate::retry::{Failure, Policy};

/// Most redirects followed at open.
const MAX_REDIRECTS: usize = 5;

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

/// Requests for a file at a plain URL.
pub struct Plain {
    url: HttpUrl,
    uri: http::Uri,
}

impl Plain {
    fn new(url: HttpUrl) -> Result<Plain, String> {
        let scheme = if url.tls { "https" } else { "http" };
        let text = format!("{scheme}://{}{}", url.host_header(), url.target);
        let uri = text
            .parse::<http::Uri>()
            .map_err(|e| format!("{}: {e}", url.url))?;
        Ok(Plain { url, uri })
    }

    fn request(&self, method: Method, range: Option<(u64, u64)>) -> Result<Req, Failure> {
        let mut b = Request::builder()
            .method(method)
            .uri(self.uri.clone())
            .header("user-agent", concat!("fvd/", env!("CARGO_PKG_VERSION")))
            .header("accept-encoding", "identity");
        if let Some((first, last)) = range {
            b = b.header("range", format!("bytes={first}-{last}"));
        }
        b.body(Empty::<Bytes>::new())
            .map_err(|e| Failure::permanent(format!("{}: {e}", self.url.url)))
    }
}

impl Source for Plain {
    fn get(&self, first: u64, last: u64, _version: Option<&Version>) -> Result<Req, Failure> {
        self.request(Method::GET, Some((first, last)))
    }

    fn head(&self) -> Result<Req, Failure> {
        self.request(Method::HEAD, None)
    }

    fn name(&self) -> &str {
        &self.url.url
    }
}

/// A file on an HTTP(S) server used as a base (content read as raw).
pub type HttpBase = RangedBase<Plain>;

impl HttpBase {
    /// Probe `url` (following redirects) for its size, ETag and
    /// Last-Modified, retrying transient failures as `policy` says.
    pub async fn open(url: &str, policy: Policy) -> io::Result<HttpBase> {
        let first = parse_url(url).map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
        let original = url.to_string();
        crate::runtime::spawn(async move {
            let client = Client::new(&policy);
            let mut url = first;
            for _ in 0..=MAX_REDIRECTS {
                let src = Plain::new(url.clone())
                    .map_err(|m| io::Error::new(io::ErrorKind::InvalidInput, m))?;
                match retried(&policy, || probe(&client, &src)).await? {
                    Probe::Found { size, version } => {
                        return Ok(RangedBase::new(
                            src, client, size, version, policy, original,
                        ));
                    }
                    Probe::Redirect(loc) => {
                        url = url.join(&loc).map_err(|e| {
                            io::Error::other(format!("{}: bad redirect: {e}", url.url))
                        })?;
                    }
                }
            }
            Err(io::Error::other(format!(
                "{original}: more than {MAX_REDIRECTS} redirects"
            )))
        })
        .await
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
        let p = Plain::new(parse_url("http://[::1]:81/a?b=c").unwrap()).unwrap();
        assert_eq!(p.uri.to_string(), "http://[::1]:81/a?b=c");
    }
}
