//! An image a server exports, which an online operation can replace by the
//! same image reopened: online resize (`fvd resize --server`, the control
//! socket's `block_resize`).
//!
//! The engine's geometry (size, bitmap, chunk table) is fixed for the life
//! of an [`Image`]; a resize changes it. So an online resize quiesces,
//! closes the image cleanly, runs the offline resize
//! ([`crate::lifecycle::resize`]) on the same storage and base, reopens the
//! image and puts it in place of the old one. Its crash safety is the
//! offline operation's: one header switch.
//!
//! # The slot gate
//! Every guest request holds the slot's gate shared while it runs (it
//! gets the current image from it); a resize holds it exclusively, so it
//! starts once the requests in flight are done, and requests that arrive
//! meanwhile wait and then run on the resized image. Inside, the resize
//! takes the old image's own gate exclusively to wait for its background
//! work (prefetch steps, copy-on-read fills), then closes it: background
//! work that enters later finds the image closed and stops.
//!
//! Lock order (docs/ARCHITECTURE.md): slot gate, then the image's gate,
//! then its commit lock. Nothing holding an image's gate waits for the
//! slot gate.

use std::sync::{Arc, RwLock as SyncRwLock};

use tokio::sync::{RwLock, RwLockReadGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions, read_header};
use crate::lifecycle::resize::{Resized, check_size, resize};

/// The image a server exports, replaceable by an online operation.
pub struct LiveImage {
    /// Guest requests hold it shared, a resize exclusively.
    slot: RwLock<Arc<Image>>,
    /// The same image, for readers that must not wait (statistics).
    latest: SyncRwLock<Arc<Image>>,
}

impl LiveImage {
    /// Export `image`.
    pub fn new(image: Arc<Image>) -> Self {
        LiveImage {
            slot: RwLock::new(image.clone()),
            latest: SyncRwLock::new(image),
        }
    }

    /// Hold the slot gate for one request: the image to run it on.
    pub async fn enter(&self) -> RwLockReadGuard<'_, Arc<Image>> {
        self.slot.read().await
    }

    /// The current image, without waiting (during a resize: the image
    /// being replaced).
    pub fn current(&self) -> Arc<Image> {
        self.latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resize the exported image to `new_size` (`shrink` allows dropping
    /// data past the new end, as `qemu-img resize --shrink`). Refusals
    /// (read-only export, raw file, encrypted image, internal snapshots,
    /// a shrink without `shrink`) leave the image as it was, open. Once the
    /// image was closed it is reopened, also when the resize failed, and
    /// `reopened` is called with the new image before any request runs on
    /// it (to apply the server's settings).
    pub async fn resize(
        &self,
        new_size: u64,
        shrink: bool,
        reopened: impl FnOnce(&Arc<Image>),
    ) -> Result<Resized> {
        let mut slot = self.slot.write().await;
        let old = slot.clone();
        let desc = old.describe();
        if old.is_read_only() {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("{desc}: the image is exported read-only"),
            ));
        }
        if old.header().is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{desc}: online resize needs an fvd image (a raw file is resized with the server stopped)"
                ),
            ));
        }
        // The header on disk, not the one read at open: a snapshot taken
        // since then set its flag there.
        old.flush().await?;
        let (h, _) = read_header(old.storage().as_ref()).await?;
        crate::lifecycle::refuse_unsupported(&h, &desc, "resize")?;
        let old_size = old.virtual_size();
        check_size(old_size, new_size, shrink).map_err(|e| e.context(&desc))?;
        if new_size == old_size {
            return Ok(Resized {
                old_size,
                new_size,
                data_shift: 0,
            });
        }
        old.close_quiesced().await?;
        let (storage, base) = (old.storage().clone(), old.base().cloned());
        let done = resize(storage.clone(), base.clone(), new_size, shrink).await;
        // Old image or resized one (the switch is the commit point): reopen
        // whichever is on disk, also after a failure.
        let mut image = Image::open(storage, base, OpenOptions::default())
            .await
            .map_err(|e| e.context(format!("{desc}: reopening after the resize")))?;
        image.carry_counters_from(&old);
        let image = Arc::new(image);
        reopened(&image);
        *slot = image.clone();
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = image;
        done.map_err(|e| e.context(&desc))
    }
}
