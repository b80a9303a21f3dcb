//! S3 bases: `s3://bucket/key`, read with signed range requests.
//!
//! Where the object store is and who we are come from the usual AWS
//! variables, or from `--object s3,...` on the command line ([`configure`],
//! which wins), and never from the base name: an image records only
//! `s3://bucket/key`.
//!
//! | setting | `--object s3,` key | environment | default |
//! |---|---|---|---|
//! | endpoint | `endpoint=URL` | `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` | `https://s3.<region>.amazonaws.com` |
//! | region | `region=R` | `AWS_REGION`, `AWS_DEFAULT_REGION` | `us-east-1` |
//! | addressing | `url-style=path\|virtual-host` | — | path with a custom endpoint, else virtual-host |
//! | access key | `access-key-id=ID` | `AWS_ACCESS_KEY_ID` | none: unsigned requests |
//! | secret key | `secret-access-key-file=PATH` | `AWS_SECRET_ACCESS_KEY` | |
//! | session token | `session-token-file=PATH` | `AWS_SESSION_TOKEN` | |
//!
//! Every request is signed afresh with AWS Signature Version 4 (rusty-s3,
//! as a presigned URL valid for a few minutes, so a retry after a long
//! pause is signed again). Reads carry `If-Match` with the ETag seen at
//! open, signed too: a replaced object answers `412` and the read fails
//! instead of mixing two versions. S3's `503 SlowDown` and `500` are
//! retried as [`Policy`] says; other errors show S3's own code and message
//! (`InvalidAccessKeyId`, `NoSuchKey`...). The rest — size, validator,
//! `206` exactly — is [`crate::ranged`].

use std::io;
use std::sync::RwLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use rusty_s3::actions::{GetObject, HeadObject};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::client::{Client, Req};
use crate::ranged::{Probe, RangedBase, Source, Version, probe, retried};
use crate::retry::{Failure, Policy};

/// How long a signature is valid: the time between signing and the server
/// seeing the request (a wait for an in-flight slot included).
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// True if `name` is an `s3://` URL.
pub fn is_s3_url(name: &str) -> bool {
    name.split_once("://")
        .is_some_and(|(s, _)| s.eq_ignore_ascii_case("s3"))
}

/// Split `s3://bucket/key` into bucket and key. The key is taken as
/// written (no %-decoding, as the AWS CLI does); `.` and `..` segments are
/// refused, since URLs would resolve them to another object.
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .split_once("://")
        .filter(|(s, _)| s.eq_ignore_ascii_case("s3"))
        .map(|(_, r)| r)
        .ok_or_else(|| format!("{url}: not an s3:// URL"))?;
    let (bucket, key) = rest
        .split_once('/')
        .ok_or_else(|| format!("{url}: no object key (s3://BUCKET/KEY)"))?;
    if bucket.is_empty() {
        return Err(format!("{url}: no bucket name (s3://BUCKET/KEY)"));
    }
    if bucket.contains(['@', ':']) {
        return Err(format!(
            "{url}: credentials and endpoints do not go into s3:// URLs; use the AWS_* \
             variables or --object s3,..."
        ));
    }
    if key.is_empty() || key.ends_with('/') {
        return Err(format!("{url}: no object key (s3://BUCKET/KEY)"));
    }
    if key.split('/').any(|s| s == "." || s == "..") {
        return Err(format!("{url}: '.' and '..' are not allowed in the key"));
    }
    if key.bytes().any(|b| b < b' ' || b == 0x7f) {
        return Err(format!("{url}: control characters in the key"));
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// Resolve `relative` (a qcow2 backing file name) against the object
/// `base`: a key in the same "directory" of the same bucket.
pub fn join_url(base: &str, relative: &str) -> Result<String, String> {
    let (bucket, key) = parse_url(base)?;
    let dir = &key[..key.rfind('/').map_or(0, |i| i + 1)];
    let joined = format!("s3://{bucket}/{dir}{relative}");
    parse_url(&joined)?;
    Ok(joined)
}

/// Settings given on the command line (`--object s3,KEY=VALUE,...`); each
/// one given wins over the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// `endpoint=URL`.
    pub endpoint: Option<String>,
    /// `region=NAME`.
    pub region: Option<String>,
    /// `url-style=path|virtual-host`.
    pub path_style: Option<bool>,
    /// `access-key-id=ID`.
    pub access_key_id: Option<String>,
    /// The content of `secret-access-key-file=PATH`.
    pub secret_access_key: Option<String>,
    /// The content of `session-token-file=PATH`.
    pub session_token: Option<String>,
}

/// Split `a=1,b=2` into pairs; `,,` stands for a comma in a value, as in
/// QEMU's option syntax.
fn option_pairs(spec: &str) -> Result<Vec<(String, String)>, String> {
    let mut items = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                items.last_mut().expect("one item").push(',');
            }
            ',' => items.push(String::new()),
            c => items.last_mut().expect("one item").push(c),
        }
    }
    items
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|i| match i.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => Err(format!("'{i}' is not KEY=VALUE")),
        })
        .collect()
}

fn read_secret(path: &str, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{what} {path}: {e}"))?;
    let text = text.trim_end_matches(['\n', '\r']).to_string();
    if text.is_empty() {
        return Err(format!("{what} {path} is empty"));
    }
    Ok(text)
}

impl Options {
    /// Parse `s3,endpoint=...,region=...` (the value of `--object`).
    /// Secrets are read from the files named; secret values themselves are
    /// not accepted on the command line, where every user can see them.
    pub fn parse(spec: &str) -> Result<Options, String> {
        let rest = match spec.split_once(',') {
            Some(("s3", rest)) => rest,
            None if spec == "s3" => "",
            _ => {
                let kind = spec.split(',').next().unwrap_or("");
                return Err(format!("unknown object type '{kind}' (supported: s3)"));
            }
        };
        let mut o = Options::default();
        for (k, v) in option_pairs(rest)? {
            let empty = || format!("s3 option {k} is empty");
            if v.is_empty() {
                return Err(empty());
            }
            match k.as_str() {
                "endpoint" => o.endpoint = Some(v),
                "region" => o.region = Some(v),
                "url-style" => {
                    o.path_style = Some(match v.as_str() {
                        "path" => true,
                        "virtual-host" => false,
                        _ => return Err(format!("url-style={v}: use path or virtual-host")),
                    })
                }
                "access-key-id" => o.access_key_id = Some(v),
                "secret-access-key-file" => {
                    o.secret_access_key = Some(read_secret(&v, "secret-access-key-file")?)
                }
                "session-token-file" => {
                    o.session_token = Some(read_secret(&v, "session-token-file")?)
                }
                "secret-access-key" | "session-token" => {
                    return Err(format!(
                        "s3 option {k}= would show the secret to every user of the machine; \
                         put it in a file and use {k}-file=PATH, or set the AWS_* variable"
                    ));
                }
                other => {
                    return Err(format!(
                        "unknown s3 option '{other}' (endpoint, region, url-style, \
                         access-key-id, secret-access-key-file, session-token-file)"
                    ));
                }
            }
        }
        Ok(o)
    }

    /// `other`'s settings over these.
    fn merged(self, other: Options) -> Options {
        Options {
            endpoint: other.endpoint.or(self.endpoint),
            region: other.region.or(self.region),
            path_style: other.path_style.or(self.path_style),
            access_key_id: other.access_key_id.or(self.access_key_id),
            secret_access_key: other.secret_access_key.or(self.secret_access_key),
            session_token: other.session_token.or(self.session_token),
        }
    }
}

static OPTIONS: RwLock<Option<Options>> = RwLock::new(None);

/// Apply `--object s3,...` to every S3 base opened from now on (settings
/// given again replace earlier ones). Call it at program start.
pub fn configure(spec: &str) -> Result<(), String> {
    let new = Options::parse(spec)?;
    let mut cur = OPTIONS.write().unwrap_or_else(|e| e.into_inner());
    *cur = Some(cur.take().unwrap_or_default().merged(new));
    Ok(())
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Where the bucket is and how to sign, from the options and the
/// environment.
struct Settings {
    bucket: Bucket,
    credentials: Option<Credentials>,
}

impl Settings {
    /// `given` wins over [`configure`]'s options, which win over the
    /// environment.
    fn resolve(bucket: &str, url: &str, given: &Options) -> Result<Settings, String> {
        let o = OPTIONS
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
            .merged(given.clone());
        let region = o
            .region
            .or_else(|| var("AWS_REGION"))
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_string());
        let custom = o
            .endpoint
            .or_else(|| var("AWS_ENDPOINT_URL_S3"))
            .or_else(|| var("AWS_ENDPOINT_URL"));
        // Virtual-host names need a bucket that is a valid host label.
        let dns_name = bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let path_style = o.path_style.unwrap_or(custom.is_some() || !dns_name);
        let endpoint = custom.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let parsed = endpoint
            .parse::<url::Url>()
            .map_err(|e| format!("{url}: S3 endpoint '{endpoint}': {e}"))?;
        let style = if path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(parsed, style, bucket.to_string(), region).map_err(|e| {
            format!("{url}: S3 endpoint '{endpoint}' with bucket '{bucket}': {e:?}")
        })?;
        let key = o.access_key_id.or_else(|| var("AWS_ACCESS_KEY_ID"));
        let secret = o.secret_access_key.or_else(|| var("AWS_SECRET_ACCESS_KEY"));
        let token = o.session_token.or_else(|| var("AWS_SESSION_TOKEN"));
        let credentials = match (key, secret) {
            (Some(k), Some(s)) => Some(match token {
                Some(t) => Credentials::new_with_token(k, s, t),
                None => Credentials::new(k, s),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(format!(
                    "{url}: an S3 access key id is set but no secret access key \
                     (AWS_SECRET_ACCESS_KEY or --object s3,secret-access-key-file=PATH)"
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{url}: an S3 secret access key is set but no access key id \
                     (AWS_ACCESS_KEY_ID or --object s3,access-key-id=ID)"
                ));
            }
        };
        Ok(Settings {
            bucket,
            credentials,
        })
    }
}

/// Signed requests for one S3 object.
pub struct Signed {
    settings: Settings,
    key: String,
    /// `s3://bucket/key`, for messages.
    name: String,
}

impl Signed {
    fn request(
        &self,
        method: Method,
        url: url::Url,
        range: Option<(u64, u64)>,
        if_match: Option<&str>,
    ) -> Result<Req, Failure> {
        let mut b = Request::builder()
            .method(method)
            .uri(url.as_str())
            .header("user-agent", concat!("fvd/", env!("CARGO_PKG_VERSION")));
        if let Some((first, last)) = range {
            b = b.header("range", format!("bytes={first}-{last}"));
        }
        if let Some(etag) = if_match {
            b = b.header("if-match", etag);
        }
        b.body(Empty::<Bytes>::new())
            .map_err(|e| Failure::permanent(format!("{}: {e}", self.name)))
    }
}

impl Source for Signed {
    fn get(&self, first: u64, last: u64, version: Option<&Version>) -> Result<Req, Failure> {
        let etag = version.and_then(|v| v.etag.as_deref());
        let mut action = GetObject::new(
            &self.settings.bucket,
            self.settings.credentials.as_ref(),
            &self.key,
        );
        if let Some(etag) = etag {
            action.headers_mut().insert("if-match", etag);
        }
        let url = action.sign(SIGNATURE_LIFETIME);
        self.request(Method::GET, url, Some((first, last)), etag)
    }

    fn head(&self) -> Result<Req, Failure> {
        let action = HeadObject::new(
            &self.settings.bucket,
            self.settings.credentials.as_ref(),
            &self.key,
        );
        self.request(Method::HEAD, action.sign(SIGNATURE_LIFETIME), None, None)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn explain(&self, body: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(body).ok()?;
        let code = xml_element(text, "Code")?;
        let message = xml_element(text, "Message").unwrap_or_default();
        let hint = match code.as_str() {
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken" | "ExpiredToken" => {
                "; check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, \
                 AWS_SESSION_TOKEN or --object s3,...)"
            }
            "RequestTimeTooSkewed" => "; check this machine's clock",
            "PermanentRedirect" | "AuthorizationHeaderMalformed" => {
                "; check the region (AWS_REGION) and endpoint (AWS_ENDPOINT_URL)"
            }
            _ => "",
        };
        let message = message.trim_end_matches('.');
        let sep = if message.is_empty() { "" } else { ": " };
        Some(format!("{code}{sep}{message}{hint}"))
    }
}

/// The text of the first `<tag>...</tag>` in an XML document, unescaped
/// (S3's error documents are flat and small).
fn xml_element(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = doc.find(&open)? + open.len();
    let end = start + doc[start..].find(&format!("</{tag}>"))?;
    let raw = doc[start..end].trim();
    let text = raw
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// An object in an S3 bucket used as a base (content read as raw).
pub type S3Base = RangedBase<Signed>;

impl S3Base {
    /// Find the object's size and ETag, retrying transient failures as
    /// `policy` says; the store and credentials as [`configure`] and the
    /// environment say.
    pub async fn open(url: &str, policy: Policy) -> io::Result<S3Base> {
        Self::open_with(url, policy, &Options::default()).await
    }

    /// [`S3Base::open`] with `options` winning over [`configure`]'s and the
    /// environment.
    pub async fn open_with(url: &str, policy: Policy, options: &Options) -> io::Result<S3Base> {
        let invalid = |m| io::Error::new(io::ErrorKind::InvalidInput, m);
        let (bucket, key) = parse_url(url).map_err(invalid)?;
        let settings = Settings::resolve(&bucket, url, options).map_err(invalid)?;
        let src = Signed {
            settings,
            key,
            name: url.to_string(),
        };
        let original = url.to_string();
        crate::runtime::spawn(async move {
            let client = Client::new(&policy);
            match retried(&policy, || probe(&client, &src)).await? {
                Probe::Found { size, version } => Ok(RangedBase::new(
                    src, client, size, version, policy, original,
                )),
                Probe::Redirect(loc) => Err(io::Error::other(format!(
                    "{original}: the object store redirected to {loc}; set the bucket's \
                     region (AWS_REGION) or endpoint (AWS_ENDPOINT_URL)"
                ))),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(is_s3_url("S3://b/k"));
        assert!(!is_s3_url("s3a://b/k"));
        assert_eq!(
            parse_url("s3://bkt/dir/a b.raw").unwrap(),
            ("bkt".into(), "dir/a b.raw".into())
        );
        for bad in [
            "s3://bkt",
            "s3://bkt/",
            "s3:///k",
            "s3://bkt/a/../b",
            "s3://bkt/./b",
            "s3://key:secret@bkt/k",
            "http://bkt/k",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            join_url("s3://b/d/e/top.qcow2", "base.qcow2").unwrap(),
            "s3://b/d/e/base.qcow2"
        );
        assert_eq!(join_url("s3://b/top", "x").unwrap(), "s3://b/x");
        assert!(join_url("s3://b/d/top", "../x").is_err());
    }

    #[test]
    fn options() {
        let dir = std::env::temp_dir().join(format!("fvd-s3-opt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cr3t\n").unwrap();
        let spec = format!(
            "s3,endpoint=http://127.0.0.1:9000,region=eu,url-style=path,access-key-id=AK,\
             secret-access-key-file={}",
            secret.display()
        );
        let o = Options::parse(&spec).unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(o.region.as_deref(), Some("eu"));
        assert_eq!(o.path_style, Some(true));
        assert_eq!(o.access_key_id.as_deref(), Some("AK"));
        assert_eq!(o.secret_access_key.as_deref(), Some("s3cr3t"));
        assert_eq!(
            Options::parse("s3,region=a,,b").unwrap().region.as_deref(),
            Some("a,b")
        );
        assert!(Options::parse("secret,id=x").is_err());
        assert!(Options::parse("s3,secret-access-key=x").is_err());
        assert!(Options::parse("s3,url-style=odd").is_err());
        assert!(Options::parse("s3,bogus=1").is_err());
        assert!(Options::parse("s3,region").is_err());
        assert!(Options::parse("s3,secret-access-key-file=/nonexistent/x").is_err());
        let m = o.clone().merged(Options {
            region: Some("us".into()),
            ..Options::default()
        });
        assert_eq!(m.region.as_deref(), Some("us"));
        assert_eq!(m.endpoint, o.endpoint);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn signed(url: &str, o: &Options) -> Signed {
        let (bucket, key) = parse_url(url).unwrap();
        Signed {
            settings: Settings::resolve(&bucket, url, o).unwrap(),
            key,
            name: url.to_string(),
        }
    }

    #[test]
    fn addressing_and_signing() {
        let mut o = Options {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: Some("eu-west-1".into()),
            access_key_id: Some("AK".into()),
            secret_access_key: Some("SK".into()),
            ..Options::default()
        };
        // A custom endpoint: path style.
        let s = signed("s3://bkt/dir/a b.raw", &o);
        let v = Version {
            etag: Some("\"e1\"".into()),
            last_modified: None,
        };
        let req = s.get(10, 19, Some(&v)).unwrap();
        let uri = req.uri().to_string();
        assert!(
            uri.starts_with(
                "http://127.0.0.1:9000/bkt/dir/a%20b.raw?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            ),
            "{uri}"
        );
        assert!(uri.contains("X-Amz-Credential=AK%2F"), "{uri}");
        assert!(uri.contains("%2Feu-west-1%2Fs3%2Faws4_request"), "{uri}");
        assert!(uri.contains("X-Amz-SignedHeaders=host%3Bif-match"), "{uri}");
        assert!(!uri.contains("SK"), "{uri}");
        assert_eq!(req.headers()["range"], "bytes=10-19");
        assert_eq!(req.headers()["if-match"], "\"e1\"");
        // Opening sends no If-Match.
        let req = s.get(0, 0, None).unwrap();
        assert!(req.headers().get("if-match").is_none());
        assert!(req.uri().to_string().contains("X-Amz-SignedHeaders=host&"));
        // Virtual-host style on request.
        o.endpoint = Some("https://objects.example".into());
        o.path_style = Some(false);
        let uri = signed("s3://bkt/k", &o).head().unwrap().uri().to_string();
        assert!(uri.starts_with("https://bkt.objects.example/k?"), "{uri}");
        if ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
            .iter()
            .any(|v| var(v).is_some())
        {
            return; // The environment would fill in what follows leaves out.
        }
        // No credentials: unsigned.
        o.access_key_id = None;
        o.secret_access_key = None;
        let uri = signed("s3://bkt/k", &o)
            .get(0, 0, None)
            .unwrap()
            .uri()
            .to_string();
        assert_eq!(uri, "https://bkt.objects.example/k");
        // Half a key pair is refused.
        o.access_key_id = Some("AK".into());
        assert!(Settings::resolve("bkt", "s3://bkt/k", &o).is_err());
    }

    #[test]
    fn error_documents() {
        let doc = "<?xml version=\"1.0\"?><Error><Code>InvalidAccessKeyId</Code>\
                   <Message>The key &amp; id\n you gave</Message></Error>";
        assert_eq!(
            xml_element(doc, "Message").unwrap(),
            "The key & id you gave"
        );
        assert_eq!(xml_element(doc, "Code").unwrap(), "InvalidAccessKeyId");
        assert_eq!(xml_element(doc, "Resource"), None);
    }
}
