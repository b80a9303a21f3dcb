//! Read-only base images.
//!
//! A base is anything that can answer positional reads and say which ranges
//! are zero: a raw file here; an FVD image (`open::FvdBase`, above the
//! engine), and network sources and qcow2 (fvd-remote) elsewhere. Reads
//! past the base's end return zeros, so an image may be larger than its
//! base.

use std::sync::Arc;

pub mod fingerprint;

use crate::error::{Error, Result};
use crate::format::Format;
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
    /// Format of the base's content.
    fn format(&self) -> Format;
    /// A description for messages.
    fn describe(&self) -> String;
    /// What identifies this base's content, recorded at create time and
    /// compared at every open (a changed base is refused). Sources that know
    /// more than the size (an HTTP ETag, Last-Modified) add it here.
    fn validator(&self) -> String {
        format!("size={}", self.size())
    }
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
    fn format(&self) -> Format {
        Format::Raw
    }
    fn describe(&self) -> String {
        self.storage.describe()
    }
}
