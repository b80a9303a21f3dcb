//! Remote and qcow2 base images for FVD.
//!
//! [`provider`] is the [`BaseProvider`] a program gives its
//! [`Opener`] ([`opener`] builds one) to open:
//!
//! * `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH` — an
//!   NBD export ([`nbd`], our own client);
//! * `http://` and `https://` URLs — a file served with byte ranges
//!   ([`http`]), and relative names inside images found there;
//! * `s3://bucket/key` — an object in S3 or an S3-compatible store, read
//!   with signed range requests ([`s3`]), and relative names inside images
//!   found there;
//! * the `qcow2` format, for local paths and over both transports
//!   ([`qcow2`]), following the qcow2 backing chain read-only with the
//!   backing format recorded in the image (never probed) through the same
//!   opener, so its depth limit and name resolution apply.
//!
//! NBD bases use the fvd-nbd client (many reads in flight); HTTP(S) and S3
//! bases share one pooled async client design ([`client`], [`ranged`]).
//! Both run their connections on the one remote runtime ([`runtime`]), so
//! their futures complete under any executor. Timeouts and retries are
//! described in [`retry`]. Every base is read-only.
//!
//! [`cache`] keeps the blocks of one such base in a local cache shared by
//! every image of a host (`fvd cache serve`).

use std::sync::Arc;

use fvd_core::base::Base;
use fvd_core::open::{BaseProvider, Location, OpenFuture, Opener};
use fvd_core::{Error, ErrorKind, Format};

pub mod cache;
mod client;
pub mod http;
pub mod nbd;
pub mod qcow2;
pub mod ranged;
pub mod retry;
mod runtime;
pub mod s3;
mod url;

pub use retry::Policy;

/// An opener for everything this crate and the core can open.
pub fn opener() -> Opener {
    Opener::local().with_provider(provider())
}

/// The provider of NBD, HTTP(S) and S3 URLs and of the qcow2 format.
pub fn provider() -> Arc<dyn BaseProvider> {
    Arc::new(RemoteProvider)
}

/// NBD, HTTP(S) and S3 URLs as raw bytes, qcow2 over any bytes.
struct RemoteProvider;

impl BaseProvider for RemoteProvider {
    fn open_url(&self, url: &str) -> Option<OpenFuture<'static>> {
        let url = url.to_string();
        let policy = Policy::from_env();
        if nbd::is_nbd_url(&url) {
            Some(Box::pin(async move {
                let b = nbd::NbdBase::open(&url, policy).await.map_err(to_core)?;
                Ok(Arc::new(b) as Arc<dyn Base>)
            }))
        } else if http::is_http_url(&url) {
            Some(Box::pin(async move {
                let b = http::HttpBase::open(&url, policy).await.map_err(to_core)?;
                Ok(Arc::new(b) as Arc<dyn Base>)
            }))
        } else if s3::is_s3_url(&url) {
            Some(Box::pin(async move {
                let b = s3::S3Base::open(&url, policy).await.map_err(to_core)?;
                Ok(Arc::new(b) as Arc<dyn Base>)
            }))
        } else {
            None
        }
    }

    fn open_format<'a>(
        &'a self,
        format: Format,
        file: Arc<dyn Base>,
        location: &'a Location,
        opener: &'a Opener,
        depth: usize,
    ) -> Option<OpenFuture<'a>> {
        if format != Format::Qcow2 {
            return None;
        }
        Some(Box::pin(async move {
            let name = location.display();
            let header = qcow2::read_header(file.as_ref(), &name).await?;
            let backing = open_backing(opener, location, &header, depth).await?;
            Ok(
                Arc::new(qcow2::Qcow2Base::open(file, name, header, backing).await?)
                    as Arc<dyn Base>,
            )
        }))
    }

    fn join_url(&self, parent: &str, name: &str) -> Option<Result<String, Error>> {
        if http::is_http_url(parent) {
            Some(http::join_url(parent, name).map_err(Error::arg))
        } else if s3::is_s3_url(parent) {
            Some(s3::join_url(parent, name).map_err(Error::arg))
        } else {
            None
        }
    }
}

/// An io::Error from a transport, as an engine error (the message already
/// names the URL).
fn to_core(e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        std::io::ErrorKind::InvalidData => ErrorKind::InvalidImage,
        _ => ErrorKind::Io,
    };
    Error::new(kind, e.to_string())
}

/// The backing file of the qcow2 image at `location` (depth `depth`), if it
/// names one, in the format it records.
async fn open_backing(
    opener: &Opener,
    location: &Location,
    header: &qcow2::Header,
    depth: usize,
) -> Result<Option<Arc<dyn Base>>, Error> {
    let name = location.display();
    let Some(backing) = &header.backing_file else {
        return Ok(None);
    };
    let Some(format) = &header.backing_format else {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{name}: the qcow2 image has the backing file '{backing}' but does not record \
                 its format, and image formats are never probed; record it with \
                 'qemu-img rebase -u -b {backing} -F raw|qcow2 {name}'"
            ),
        ));
    };
    if backing.starts_with("json:") {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{name}: json: backing file names are not supported"),
        ));
    }
    let format = match format.as_str() {
        // qemu's "file" protocol driver reads the bytes as they are.
        "raw" | "file" => Format::Raw,
        other => other.parse::<Format>().map_err(|_| {
            Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{name}: the backing file '{backing}' has format {other}, which is not supported (raw, qcow2, fvd)"
                ),
            )
        })?,
    };
    let target = opener.resolve(location, backing)?;
    let base = opener
        .open_base(&target, format, depth + 1)
        .await
        .map_err(|e| e.context(format!("{name}: backing file")))?;
    Ok(Some(base))
}
