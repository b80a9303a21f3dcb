//! A remote object read by byte ranges: what HTTP(S) and S3 bases share.
//!
//! A [`Source`] says how to ask for the object (a plain URL, or signed S3
//! requests); [`RangedBase`] does the rest, the same way for both:
//!
//! * **Open** sends `GET` with `Range: bytes=0-0`: the `206` answer's
//!   `Content-Range` gives the size, and its `ETag` and `Last-Modified` are
//!   the object's version, recorded in the base's validator so that an
//!   image whose base changed is refused at open. A `200` answer means the
//!   server ignores ranges: a permanent error. (An empty object answers
//!   `416`; a `HEAD` confirms its size is 0.)
//! * **Reads** send `Range: bytes=a-b` (at most [`MAX_RANGE`] bytes per
//!   request) and accept only `206` with exactly that range, the size seen
//!   at open and the same `ETag` and `Last-Modified`: a changed object is
//!   refused, never mixed with the old one. Sources that can (S3) also send
//!   `If-Match` with the ETag, and the server's `412` says the same.
//! * **Failures**: timeouts, dropped connections, `5xx` (S3's 503 SlowDown
//!   included), `408` and `429` are retried as [`Policy`] says, on the
//!   remote I/O runtime's timer; other statuses fail at once with the URL,
//!   the status and, where the source can read it, the server's
//!   explanation.
//!
//! Every read runs as a task on the remote I/O runtime
//! ([`crate::runtime`]), so its future completes under any executor, and
//! many reads are in flight at once (up to [`Policy::in_flight`]).

use std::io;
use std::sync::Arc;

use fvd_core::IoBuf;
use fvd_core::base::Base;
use fvd_core::storage::{AllocRun, IoFuture, coalesce};

use crate::client::{Answer, Client, Req};
use crate::retry::{Failure, Policy};

/// Most bytes fetched with one request (larger reads are split).
pub const MAX_RANGE: u64 = 16 << 20;
/// Longest validator the image header can record.
const MAX_VALIDATOR: usize = 256;
/// Most bytes of an error answer read for its explanation.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How requests for one remote object are made.
pub trait Source: Send + Sync + 'static {
    /// A `GET` of bytes `first..=last`; `version` is the one seen at open
    /// (`None` while opening), for sources that send `If-Match`.
    fn get(&self, first: u64, last: u64, version: Option<&Version>) -> Result<Req, Failure>;
    /// A `HEAD` of the object.
    fn head(&self) -> Result<Req, Failure>;
    /// The URL requests go to, for messages.
    fn name(&self) -> &str;
    /// A one-line explanation from an error answer's body, if the source
    /// knows the format (S3's XML error documents).
    fn explain(&self, _body: &[u8]) -> Option<String> {
        None
    }
}

/// What identifies the object's version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Version {
    /// The `ETag` header.
    pub etag: Option<String>,
    /// The `Last-Modified` header.
    pub last_modified: Option<String>,
}

impl Version {
    fn of(a: &Answer) -> Version {
        Version {
            etag: a.header("etag").map(str::to_string),
            last_modified: a.header("last-modified").map(str::to_string),
        }
    }

    /// Why `now` is not this version, if it is not.
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

/// A `Content-Range`: the range (`None` for `*`) and the total size
/// (`None` for `*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// What a `Content-Range` header says: `bytes a-b/total` or `bytes */total`.
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

/// The failure for an answer with an unexpected status: its code, reason
/// and the source's explanation of the body.
async fn status_failure<S: Source>(src: &S, a: Answer, what: &str) -> Failure {
    let status = a.status.as_u16();
    let text = a.status_text();
    let body = a.small_body(MAX_ERROR_BODY, src.name()).await;
    let why = src
        .explain(&body)
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    let msg = format!("{}: {what}: the server answered {text}{why}", src.name());
    match status {
        404 | 410 => Failure::permanent_kind(io::ErrorKind::NotFound, msg),
        401 | 403 => Failure::permanent_kind(io::ErrorKind::PermissionDenied, msg),
        408 | 429 | 500..=599 => Failure::transient(msg),
        _ => Failure::permanent(msg),
    }
}

/// What the first request of an open found.
pub(crate) enum Probe {
    /// The object, its size and version.
    Found {
        /// Size in bytes.
        size: u64,
        /// ETag and Last-Modified.
        version: Version,
    },
    /// A redirect to this `Location` (as sent).
    Redirect(String),
}

/// Ask for byte 0 of the object: its size and version, or a redirect.
pub(crate) async fn probe<S: Source>(client: &Client, src: &S) -> Result<Probe, Failure> {
    let name = src.name();
    let what = "open";
    let a = client.send(src.get(0, 0, None)?, name, what).await?;
    match a.status.as_u16() {
        206 => {
            let cr = a.header("content-range").unwrap_or("").to_string();
            let Some((Some((0, 0)), total)) = parse_content_range(&cr) else {
                return Err(Failure::permanent(format!(
                    "{name}: HTTP protocol error: 206 answer with Content-Range '{cr}' to a request for bytes 0-0"
                )));
            };
            let Some(size) = total else {
                return Err(Failure::permanent(format!(
                    "{name}: the server does not tell the size of the file (Content-Range '{cr}')"
                )));
            };
            let version = Version::of(&a);
            let mut one = [0u8; 1];
            a.read_into(&mut one, name, what).await?;
            Ok(Probe::Found { size, version })
        }
        200 => Err(Failure::permanent(format!(
            "{name}: the server does not support range requests (it answered 200 to a \
             request for bytes 0-0); a remote base needs byte ranges"
        ))),
        416 => {
            let cr = a.header("content-range").map(parse_content_range);
            if let Some(Some((None, Some(0)))) = cr {
                let version = Version::of(&a);
                drop(a.small_body(MAX_ERROR_BODY, name).await);
                return Ok(Probe::Found { size: 0, version });
            }
            // No byte 0: the object may be empty (S3 says so only in HEAD).
            drop(a.small_body(MAX_ERROR_BODY, name).await);
            let h = client.send(src.head()?, name, what).await?;
            let len = h
                .header("content-length")
                .and_then(|v| v.parse::<u64>().ok());
            if h.status == 200 && len == Some(0) {
                return Ok(Probe::Found {
                    size: 0,
                    version: Version::of(&h),
                });
            }
            Err(status_failure(src, h, "probe size").await)
        }
        301 | 302 | 303 | 307 | 308 => match a.header("location") {
            Some(loc) => Ok(Probe::Redirect(loc.to_string())),
            None => Err(status_failure(src, a, "open (a redirect without a Location)").await),
        },
        _ => Err(status_failure(src, a, what).await),
    }
}

/// Run `op` with `policy`'s retries, sleeping on the runtime's timer.
pub(crate) async fn retried<T, F, Fut>(policy: &Policy, mut op: F) -> io::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut tried = 0u32;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(f) => tokio::time::sleep(policy.backoff(&mut tried, f)?).await,
        }
    }
}

struct Object<S> {
    source: S,
    client: Client,
    size: u64,
    version: Version,
    policy: Policy,
    /// The name as the user wrote it (for `describe` and messages about
    /// the object itself).
    original: String,
}

/// A remote object read by ranges, as a base (content read as raw).
pub struct RangedBase<S: Source> {
    object: Arc<Object<S>>,
}

impl<S: Source> RangedBase<S> {
    /// A base over `source`, which [`probe`] found to hold `size` bytes of
    /// `version`; `original` is the name the user gave.
    pub(crate) fn new(
        source: S,
        client: Client,
        size: u64,
        version: Version,
        policy: Policy,
        original: String,
    ) -> Self {
        RangedBase {
            object: Arc::new(Object {
                source,
                client,
                size,
                version,
                policy,
                original,
            }),
        }
    }
}

impl<S: Source> Object<S> {
    async fn read(&self, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let mut done = 0usize;
        while done < inside {
            let n = (inside - done).min(MAX_RANGE as usize);
            let at = offset + done as u64;
            let dst = &mut buf[done..done + n];
            let mut tried = 0u32;
            loop {
                match self.read_range(at, dst).await {
                    Ok(()) => break,
                    Err(f) => tokio::time::sleep(self.policy.backoff(&mut tried, f)?).await,
                }
            }
            done += n;
        }
        Ok(buf)
    }

    fn changed(&self, why: impl std::fmt::Display) -> Failure {
        Failure::permanent(format!(
            "{}: the file changed on the server: {why}",
            self.original
        ))
    }

    async fn read_range(&self, offset: u64, dst: &mut [u8]) -> Result<(), Failure> {
        let name = self.source.name();
        let last = offset + dst.len() as u64 - 1;
        let what = format!("read of {} bytes at offset {offset}", dst.len());
        let req = self.source.get(offset, last, Some(&self.version))?;
        let a = self.client.send(req, name, &what).await?;
        match a.status.as_u16() {
            206 => {
                let cr = a.header("content-range").unwrap_or("");
                let Some((Some((first, end)), total)) = parse_content_range(cr) else {
                    return Err(Failure::permanent(format!(
                        "{name}: HTTP protocol error: 206 answer with Content-Range '{cr}'"
                    )));
                };
                if let Some(t) = total
                    && t != self.size
                {
                    return Err(
                        self.changed(format_args!("it was {} bytes and is {t} now", self.size))
                    );
                }
                if let Some(why) = self.version.changed(&Version::of(&a)) {
                    return Err(self.changed(why));
                }
                if (first, end) != (offset, last) {
                    return Err(Failure::permanent(format!(
                        "{name}: HTTP protocol error: asked for bytes {offset}-{last}, got Content-Range '{cr}'"
                    )));
                }
                a.read_into(dst, name, &what).await
            }
            200 => Err(Failure::permanent(format!(
                "{name}: the server ignored a range request (it answered 200); a remote base needs byte ranges"
            ))),
            412 => {
                let etag = self.version.etag.as_deref().unwrap_or("?");
                Err(self.changed(format_args!(
                    "it no longer has ETag {etag} ({})",
                    a.status_text()
                )))
            }
            416 => Err(Failure::permanent(format!(
                "{}: {what}: the server answered {} (did the file shrink?)",
                self.original,
                a.status_text()
            ))),
            _ => Err(status_failure(&self.source, a, &what).await),
        }
    }

    fn validator(&self) -> String {
        let v = &self.version;
        let base = format!("size={}", self.size);
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

/// FNV-1a, to shorten an over-long ETag in the validator.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl<S: Source> Base for RangedBase<S> {
    fn size(&self) -> u64 {
        self.object.size
    }

    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let object = self.object.clone();
        Box::pin(crate::runtime::spawn(async move {
            object.read(offset, buf).await
        }))
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        let inside = self.object.size.saturating_sub(offset).min(len);
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
        self.object.original.clone()
    }

    fn validator(&self) -> String {
        self.object.validator()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
