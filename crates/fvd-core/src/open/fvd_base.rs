//! An FVD image used as the base of another (a chain): an adapter above the
//! image engine, so the base layer below it needs no knowledge of images.

use std::sync::Arc;

use crate::base::Base;
use crate::format::Format;
use crate::image::Image;
use crate::iobuf::IoBuf;
use crate::storage::{AllocRun, IoFuture, coalesce};

/// An FVD image, opened read-only, serving as a base.
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
                let whole = buf.window();
                let part = self.image.read(offset, buf.narrow(0..inside)).await?;
                buf = part.widen(whole).map_err(|_| {
                    std::io::Error::other("the engine returned another buffer than it was given")
                })?;
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
            Ok(coalesce(runs))
        })
    }
    fn format(&self) -> Format {
        Format::Fvd
    }
    fn describe(&self) -> String {
        self.image.describe()
    }
}
