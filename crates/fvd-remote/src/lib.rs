//! Remote and qcow2 base images for FVD.
//!
//! [`register`] adds a [`BaseProvider`] to fvd-core that opens:
//!
//! * `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH` — an
//!   NBD export ([`nbd`], our own client);
//! * `http://` and `https://` URLs — a file served with byte ranges
//!   ([`http`]);
//! * `s3://bucket/key` — an object in S3 or an S3-compatible store, read
//!   with signed range requests ([`s3`]);
//! * the `qcow2` format, for local paths and over both transports
//!   ([`qcow2`]), following the qcow2 backing chain read-only with the
//!   backing format recorded in the image (never probed).
//!
//! NBD bases use the fvd-nbd client (many reads in flight); HTTP(S) and S3
//! bases share one pooled async client design ([`client`], [`ranged`]).
//! Both run their connections on the one remote runtime ([`runtime`]), so
//! their futures complete under any executor. Timeouts and retries are
//! described in [`retry`]. Every base is read-only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use fvd_core::base::{Base, BaseProvider, is_url, register_base_provider};
use fvd_core::open::{BoxFut, MAX_CHAIN_DEPTH, PathOptions, open_base};
use fvd_core::{Error, ErrorKind, Format};

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

/// Register the provider with fvd-core (once; later calls do nothing).
/// Call it at program start, before opening images.
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| register_base_provider(Arc::new(RemoteProvider)));
}

/// The provider [`register`] installs: NBD, HTTP(S) and S3 URLs as raw or
/// qcow2 content, and qcow2 images at local paths.
pub struct RemoteProvider;

impl BaseProvider for RemoteProvider {
    fn open(&self, name: &str, format: &str) -> Option<BoxFut<'static, Arc<dyn Base>>> {
        let remote = nbd::is_nbd_url(name) || http::is_http_url(name) || s3::is_s3_url(name);
        let handled = match format {
            "raw" => remote,
            "qcow2" => remote || !is_url(name),
            _ => false,
        };
        if !handled {
            return None;
        }
        Some(open_named(name.to_string(), format.to_string(), 0))
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

/// Open `name` (a URL or a local path) with content in `format` (`raw` or
/// `qcow2`); `depth` counts the images above it in a chain.
pub fn open_named(name: String, format: String, depth: usize) -> BoxFut<'static, Arc<dyn Base>> {
    Box::pin(async move {
        if depth > MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{name}: backing chain is deeper than {MAX_CHAIN_DEPTH}"
            )));
        }
        let policy = Policy::from_env();
        let file: Arc<dyn Base> = if nbd::is_nbd_url(&name) {
            Arc::new(nbd::NbdBase::open(&name, policy).await.map_err(to_core)?)
        } else if http::is_http_url(&name) {
            Arc::new(http::HttpBase::open(&name, policy).await.map_err(to_core)?)
        } else if s3::is_s3_url(&name) {
            Arc::new(s3::S3Base::open(&name, policy).await.map_err(to_core)?)
        } else if is_url(&name) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{name}: unsupported URL scheme (nbd://, nbd+unix://, http://, https://, s3://)"
                ),
            ));
        } else {
            let opts = PathOptions {
                read_only: true,
                ..PathOptions::default()
            };
            open_base(Path::new(&name), Format::Raw, opts, depth).await?
        };
        match format.as_str() {
            "raw" => Ok(file),
            "qcow2" => {
                let header = qcow2::read_header(file.as_ref(), &name).await?;
                let backing = open_backing(&name, &header, depth).await?;
                Ok(
                    Arc::new(qcow2::Qcow2Base::open(file, name, header, backing).await?)
                        as Arc<dyn Base>,
                )
            }
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("{name}: format {other} is not supported here (raw or qcow2)"),
            )),
        }
    })
}

/// Where the backing file named `backing` inside the image `image` is.
fn resolve_backing(image: &str, backing: &str) -> Result<String, Error> {
    if is_url(backing) {
        return Ok(backing.to_string());
    }
    if http::is_http_url(image) {
        if backing.starts_with('/') {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{image}: a remote qcow2 image names the local backing file '{backing}'; refused"
                ),
            ));
        }
        return http::join_url(image, backing).map_err(Error::arg);
    }
    if s3::is_s3_url(image) {
        if backing.starts_with('/') {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{image}: a remote qcow2 image names the local backing file '{backing}'; refused"
                ),
            ));
        }
        return s3::join_url(image, backing).map_err(Error::arg);
    }
    if is_url(image) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{image}: a remote qcow2 image names the relative backing file '{backing}'; only URLs are supported there"
            ),
        ));
    }
    let p = Path::new(backing);
    let full: PathBuf = if p.is_absolute() {
        p.to_path_buf()
    } else {
        Path::new(image)
            .parent()
            .map(|d| d.join(p))
            .unwrap_or_else(|| p.to_path_buf())
    };
    Ok(full.to_string_lossy().into_owned())
}

async fn open_backing(
    name: &str,
    header: &qcow2::Header,
    depth: usize,
) -> Result<Option<Arc<dyn Base>>, Error> {
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
    let target = resolve_backing(name, backing)?;
    let ctx = |e: Error| e.context(format!("{name}: backing file"));
    let base = match format.as_str() {
        "raw" | "file" => open_named(target, "raw".into(), depth + 1)
            .await
            .map_err(ctx)?,
        "qcow2" => open_named(target, "qcow2".into(), depth + 1)
            .await
            .map_err(ctx)?,
        "fvd" if !is_url(&target) => {
            let opts = PathOptions {
                read_only: true,
                ..PathOptions::default()
            };
            open_base(Path::new(&target), Format::Fvd, opts, depth + 1)
                .await
                .map_err(ctx)?
        }
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{name}: the backing file '{backing}' has format {other}, which is not supported (raw, qcow2)"
                ),
            ));
        }
    };
    Ok(Some(base))
}
