//! The HTTP client of HTTP(S) and S3 bases: hyper with a connection pool.
//!
//! One [`Client`] per base: a pool of kept-alive connections, HTTP/1.1 or
//! HTTP/2 as the server offers in the TLS handshake (ALPN; plain `http://`
//! speaks HTTP/1.1), with at most [`Policy::in_flight`] requests at once —
//! that many HTTP/1.1 connections, or streams on one HTTP/2 connection.
//! TLS is rustls with the ring provider, trusting the system's CA
//! certificates; `SSL_CERT_FILE` and `SSL_CERT_DIR` replace that store (a
//! private CA, as the tests use).
//!
//! Everything here runs on the remote I/O runtime ([`crate::runtime`]).
//! Failures come back as [`Failure`]s that name the URL and the operation:
//! refused, reset or timed-out connections are transient, TLS certificate
//! problems and broken protocol are permanent.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as Hyper;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::retry::{Failure, Policy};

/// A request as the clients build it (no request body).
pub(crate) type Req = Request<Empty<Bytes>>;

/// Idle connections are closed after this long: below the idle timeouts
/// servers commonly use (SeaweedFS 10 s, nginx 75 s), so a request rarely
/// goes out on a connection the server is just closing.
const POOL_IDLE: Duration = Duration::from_secs(8);

/// The TLS setup, built once: the trusted CA certificates and, when the
/// store was empty, why (added to certificate errors).
fn tls_config() -> &'static (rustls::ClientConfig, Option<String>) {
    static CONFIG: OnceLock<(rustls::ClientConfig, Option<String>)> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        let empty = (added == 0).then(|| {
            let why = found
                .errors
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!(
                "no trusted CA certificates found in the system store{why}; \
                 install ca-certificates or set SSL_CERT_FILE"
            )
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (config, empty)
    })
}

/// The pooled HTTP client of one base.
pub(crate) struct Client {
    hyper: Hyper<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    permits: Arc<Semaphore>,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl Client {
    /// A client with `policy`'s timeouts and in-flight limit. Call it on the
    /// remote I/O runtime.
    pub(crate) fn new(policy: &Policy) -> Client {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(policy.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config().0.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let hyper = Hyper::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(policy.in_flight)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Client {
            hyper,
            permits: Arc::new(Semaphore::new(policy.in_flight.max(1))),
            connect_timeout: policy.connect_timeout,
            io_timeout: policy.io_timeout,
        }
    }

    /// Send `req` and wait for the answer's head. `name` (the URL) and
    /// `what` (the operation) go into failure messages. The answer holds
    /// one of the in-flight permits until it is dropped.
    pub(crate) async fn send(&self, req: Req, name: &str, what: &str) -> Result<Answer, Failure> {
        let permit =
            self.permits.clone().acquire_owned().await.map_err(|_| {
                Failure::permanent(format!("{name}: {what}: the client was closed"))
            })?;
        // Connecting (TCP, TLS) and the wait for the head, each bounded.
        let limit = self.connect_timeout + self.io_timeout;
        let resp = match tokio::time::timeout(limit, self.hyper.request(req)).await {
            Err(_) => return Err(Failure::transient(format!("{name}: {what}: timed out"))),
            Ok(Err(e)) => return Err(classify(name, what, &e)),
            Ok(Ok(r)) => r,
        };
        let (parts, body) = resp.into_parts();
        let reason = parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            reason,
            body,
            io_timeout: self.io_timeout,
            _permit: permit,
        })
    }
}

/// An answer whose body has not been read yet.
pub(crate) struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    reason: Option<String>,
    body: Incoming,
    io_timeout: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Answer {
    /// The value of header `name`, if present and text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// "404 Not Found": the code and the server's reason phrase (or the
    /// standard one).
    pub(crate) fn status_text(&self) -> String {
        let reason = self
            .reason
            .as_deref()
            .or(self.status.canonical_reason())
            .unwrap_or("");
        format!("{} {reason}", self.status.as_u16())
            .trim_end()
            .to_string()
    }

    /// The next piece of the body; `None` at its end.
    async fn next_data(&mut self, name: &str, what: &str) -> Result<Option<Bytes>, Failure> {
        loop {
            let frame = match tokio::time::timeout(self.io_timeout, self.body.frame()).await {
                Err(_) => return Err(Failure::transient(format!("{name}: {what}: timed out"))),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(classify(name, what, &e)),
                Ok(Some(Ok(f))) => f,
            };
            // Trailers carry nothing a base needs.
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }

    /// Read the body into `dst`, which it must fill exactly.
    pub(crate) async fn read_into(
        mut self,
        dst: &mut [u8],
        name: &str,
        what: &str,
    ) -> Result<(), Failure> {
        let mut got = 0usize;
        while let Some(data) = self.next_data(name, what).await? {
            let end = got + data.len();
            if end > dst.len() {
                return Err(Failure::permanent(format!(
                    "{name}: {what}: HTTP protocol error: the answer has more than the {} bytes asked for",
                    dst.len()
                )));
            }
            dst[got..end].copy_from_slice(&data);
            got = end;
        }
        if got < dst.len() {
            return Err(Failure::transient(format!(
                "{name}: {what}: the answer ended after {got} of {} bytes",
                dst.len()
            )));
        }
        Ok(())
    }

    /// Up to `limit` bytes of the body (for the explanation in an error
    /// answer); whatever could not be read is left out.
    pub(crate) async fn small_body(mut self, limit: usize, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < limit {
            match self.next_data(name, "error answer").await {
                Ok(Some(d)) => out.extend_from_slice(&d[..d.len().min(limit - out.len())]),
                _ => break,
            }
        }
        out
    }
}

/// Classify a failure of hyper or of the connection below it: certificate
/// and TLS problems are permanent, connection-level ones transient (as
/// [`Failure::from_io`] says), protocol violations permanent.
fn classify(name: &str, what: &str, e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut hyper_err = None;
    while let Some(err) = cur {
        if let Some(mut io) = err.downcast_ref::<io::Error>() {
            // Layers wrap the error of the layer below in io::Errors of
            // their own: look inside for rustls' (or the innermost) one.
            loop {
                let inner = io.get_ref();
                if let Some(tls) = inner.and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return tls_failure(name, what, tls);
                }
                match inner.and_then(|i| i.downcast_ref::<io::Error>()) {
                    Some(i) => io = i,
                    None => break,
                }
            }
            return Failure::from_io(
                &format!("{name}: {what}"),
                io::Error::new(io.kind(), io.to_string()),
            );
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return tls_failure(name, what, tls);
        }
        if hyper_err.is_none() {
            hyper_err = err.downcast_ref::<hyper::Error>();
        }
        cur = err.source();
    }
    if let Some(h) = hyper_err {
        if h.is_parse() || h.is_user() {
            return Failure::permanent(format!("{name}: {what}: HTTP protocol error: {h}"));
        }
        if h.is_timeout() {
            return Failure::transient(format!("{name}: {what}: timed out"));
        }
        if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
            return Failure::transient(format!("{name}: {what}: connection closed by the server"));
        }
    }
    Failure::transient(format!("{name}: {what}: {}", chain(e)))
}

fn tls_failure(name: &str, what: &str, tls: &rustls::Error) -> Failure {
    let hint = match (tls, &tls_config().1) {
        (rustls::Error::InvalidCertificate(_), Some(why)) => format!(" ({why})"),
        _ => String::new(),
    };
    Failure::permanent(format!("{name}: {what}: TLS: {tls}{hint}"))
}

/// An error and its sources on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}
