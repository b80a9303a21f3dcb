//! `amend`: change in place what can change without touching data
//! (qemu-img amend): copy-on-read default, grow command and unit, the
//! copy-on-read budget, and dropping the stored prefetch profile (the
//! compatible feature bit). One header switch; nothing else is written.

use std::path::Path;
use std::sync::Arc;

use super::{open_engine, read_clean};
use crate::base::Base;
use crate::error::{Error, Result};
use crate::format::header::{COMPAT_PREFETCH_PROFILE, FLAG_COPY_ON_READ, MAX_GROW_CMD, Region};
use crate::image::read_header;
use crate::open::Opener;
use crate::storage::Storage;

/// The changes asked for; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amendments {
    /// Copy-on-read on by default.
    pub copy_on_read: Option<bool>,
    /// Command growing the block device (empty: none).
    pub grow_cmd: Option<String>,
    /// Growth step of compact images on files.
    pub grow_unit: Option<u64>,
    /// Copy-on-read bytes in flight at most.
    pub max_cor_bytes: Option<u64>,
    /// `false` drops the stored prefetch profile (`true` is refused: a
    /// profile is stored with `fvd profile import`).
    pub prefetch_profile: Option<bool>,
}

impl Amendments {
    /// True if nothing is asked.
    pub fn is_empty(&self) -> bool {
        *self == Amendments::default()
    }
}

/// Apply `a` to the image on `storage` (`base` is needed only if its
/// journal must be replayed first).
pub async fn amend(
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
    a: &Amendments,
) -> Result<()> {
    let desc = storage.describe();
    if let Some(cmd) = &a.grow_cmd
        && cmd.len() > MAX_GROW_CMD
    {
        return Err(Error::arg(format!(
            "{desc}: grow_cmd is longer than {MAX_GROW_CMD} bytes"
        )));
    }
    if a.grow_unit == Some(0) || a.max_cor_bytes == Some(0) {
        return Err(Error::arg(format!(
            "{desc}: grow_unit and max_cor_bytes must be larger than 0"
        )));
    }
    if a.prefetch_profile == Some(true) {
        return Err(Error::arg(format!(
            "{desc}: prefetch_profile can only be turned off here; store a profile with 'fvd profile import'"
        )));
    }
    let (h, _) = read_header(storage.as_ref()).await?;
    if !h.is_clean() {
        open_engine(&storage, base).await?.close().await?;
    }
    let old = read_clean(storage.as_ref()).await?;
    let mut nh = old.header.clone();
    if let Some(on) = a.copy_on_read {
        if on {
            nh.flags |= FLAG_COPY_ON_READ;
        } else {
            nh.flags &= !FLAG_COPY_ON_READ;
        }
    }
    if let Some(cmd) = &a.grow_cmd {
        nh.grow_cmd = cmd.clone();
    }
    if let Some(u) = a.grow_unit {
        nh.grow_unit = u;
    }
    if let Some(m) = a.max_cor_bytes {
        nh.max_cor_bytes = m;
    }
    let drop_profile =
        a.prefetch_profile == Some(false) && old.header.compatible & COMPAT_PREFETCH_PROFILE != 0;
    if drop_profile {
        nh.compatible &= !COMPAT_PREFETCH_PROFILE;
    }
    if nh == old.header {
        return Ok(());
    }
    let nh = super::switch_header(storage.as_ref(), &old, nh).await?;
    if drop_profile {
        let r = nh.region(Region::Profile);
        let _ = storage.discard(r.offset, r.length).await;
    }
    Ok(())
}

/// Amend the image file at `path` (its base, needed only to replay a
/// journal, is opened through `opener`).
pub async fn amend_path(opener: &Opener, path: &Path, a: &Amendments) -> Result<()> {
    let storage = super::open_image_storage(path)?;
    let (h, _) = read_header(storage.as_ref()).await?;
    let base = if h.is_clean() {
        None
    } else {
        super::open_recorded_base(opener, path, &h).await?
    };
    amend(storage, base, a)
        .await
        .map_err(|e| super::named(path, e))
}
