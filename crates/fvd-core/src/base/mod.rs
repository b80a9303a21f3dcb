//! Read-only base images.
//!
//! A base is anything that can answer positional reads and say which ranges
//! are zero: a raw file, another FVD image (chains), and later network
//! sources. Reads past the base's end return zeros, so an image may be
//! larger than its base.

use std::sync::Arc;

pub mod chain;
pub mod fingerprint;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::iobuf::IoBuf;
use crate::storage::{AllocRun, IoFuture, Storage};

/// A read-only source of base data.
pub trait Base: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf>;
    /// Data and zero runs of `[offset, offset+len)`.
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>>;
    /// Format name ("raw", "fvd").
    fn format(&self) -> &'static str;
    /// A description for messages.
    fn describe(&self) -> String;
    /// What identifies this base's content, recorded at create time and
    /// compared at every open (a changed base is refused). Sources that know
    /// more than the size (an HTTP ETag, Last-Modified) add it here.
    fn validator(&self) -> String {
        format!("size={}", self.size())
    }
}

/// Opens bases the core cannot open itself: URLs (`nbd://`, `http://`...)
/// and formats other than raw and FVD (qcow2). Transports register one at
/// startup with [`register_base_provider`]; the core stays free of network
/// code.
pub trait BaseProvider: Send + Sync {
    /// Open `name` (a URL, or a path already resolved against the image's
    /// directory) in `format`, or `None` if this provider does not handle it.
    fn open(&self, name: &str, format: &str)
    -> Option<crate::open::BoxFut<'static, Arc<dyn Base>>>;
}

static PROVIDERS: std::sync::RwLock<Vec<Arc<dyn BaseProvider>>> =
    std::sync::RwLock::new(Vec::new());

/// Add a provider; later registrations are asked first.
pub fn register_base_provider(p: Arc<dyn BaseProvider>) {
    PROVIDERS
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(0, p);
}

/// Ask the registered providers to open `name` in `format`.
pub fn open_with_providers(
    name: &str,
    format: &str,
) -> Option<crate::open::BoxFut<'static, Arc<dyn Base>>> {
    let providers = PROVIDERS.read().unwrap_or_else(|e| e.into_inner()).clone();
    providers.iter().find_map(|p| p.open(name, format))
}

/// True if a base name is a URL rather than a path.
pub fn is_url(name: &str) -> bool {
    name.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
    })
}

/// A read-only [`Storage`] view of a base, so any base (a qcow2 file, a URL)
/// can be inspected, compared or converted like a raw image.
pub struct BaseStorage {
    base: Arc<dyn Base>,
}

impl BaseStorage {
    /// Wrap `base`.
    pub fn new(base: Arc<dyn Base>) -> Self {
        BaseStorage { base }
    }
}

fn read_only_error<T>() -> std::io::Result<T> {
    Err(std::io::Error::from_raw_os_error(libc::EROFS))
}

impl Storage for BaseStorage {
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.base.read_at(offset, buf)
    }
    fn write_at(&self, _offset: u64, _buf: IoBuf, _fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(std::future::ready(read_only_error()))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(read_only_error()))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(read_only_error()))
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.base.size())
    }
    fn set_len(&self, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(read_only_error()))
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.base.allocation(offset, len)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        Ok(0)
    }
    fn describe(&self) -> String {
        self.base.describe()
    }
}

/// A raw file (or any storage) used as a base.
pub struct RawBase {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl RawBase {
    /// Wrap `storage`; its current length is the base size.
    pub fn new(storage: Arc<dyn Storage>) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?;
        Ok(RawBase { storage, size })
    }
}

impl Base for RawBase {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.storage.read_at(offset, buf)
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.storage.allocation(offset, len)
    }
    fn format(&self) -> &'static str {
        "raw"
    }
    fn describe(&self) -> String {
        self.storage.describe()
    }
}

/// An FVD image used as the base of another (a chain).
pub struct FvdBase {
    image: Arc<Image>,
}

impl FvdBase {
    /// Wrap an image opened read-only.
    pub fn new(image: Arc<Image>) -> Self {
        FvdBase { image }
    }
}

impl Base for FvdBase {
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }
    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            let size = self.image.virtual_size();
            let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
            buf[inside..].fill(0);
            if inside > 0 {
                self.image.read(offset, &mut buf[..inside]).await?;
            }
            Ok(buf)
        })
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        Box::pin(async move {
            let size = self.image.virtual_size();
            let inside = size.saturating_sub(offset).min(len);
            let mut runs: Vec<AllocRun> = self
                .image
                .block_status(offset, inside)
                .await?
                .into_iter()
                .map(|e| AllocRun {
                    length: e.length,
                    data: !e.zero,
                })
                .collect();
            if inside < len {
                runs.push(AllocRun {
                    length: len - inside,
                    data: false,
                });
            }
            Ok(crate::storage::coalesce(runs))
        })
    }
    fn format(&self) -> &'static str {
        "fvd"
    }
    fn describe(&self) -> String {
        self.image.describe()
    }
}
