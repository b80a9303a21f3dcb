//! Read-only base images.
//!
//! A base is anything that can answer positional reads and say which ranges
//! are zero: a raw file, another FVD image (chains), and later network
//! sources. Reads past the base's end return zeros, so an image may be
//! larger than its base.

use std::sync::Arc;

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
