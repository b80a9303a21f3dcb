//! `rebase`: put the image over another base (qemu-img rebase).
//!
//! Safe mode keeps what the guest reads: every block the image reads from
//! its old base is compared with the new base and copied into the image
//! where they differ (ordinary journaled writes; a crash leaves the old
//! image with some blocks local, its content unchanged). Blocks whose
//! extent changes meaning — the one holding the old or the new end of a
//! base range — are copied whatever their content. Then one header switch
//! records the new base (name, format, size, a validator with a fresh
//! fingerprint) and a bitmap for the new base range: old bits, and set bits
//! where the image held the data past its old base.
//!
//! `-b ''` flattens: every block still in the base is copied and the image
//! has no base afterwards. Unsafe mode (`-u`) only rewrites the reference
//! and its validator: the old base is not read (it may be gone or changed).

use std::path::Path;
use std::sync::Arc;

use super::{Target, open_engine, read_clean, switch};
use crate::base::Base;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::format::header::{FLAG_ALL_LOCAL, Header};
use crate::image::{Image, Source, read_header};
use crate::iobuf::IoBuf;
use crate::open::{Location, Opener};
use crate::storage::Storage;

/// Bytes compared (and copied) at once.
const STEP: u64 = 4 << 20;

/// The base the image is to have.
pub enum NewBase {
    /// None: the image is flattened (`-b ''`).
    Nothing,
    /// A base, opened read-only, recorded as `name` in `format`.
    Base {
        /// The name recorded in the header (a path as the user gave it).
        name: String,
        /// Its format.
        format: Format,
        /// The base itself.
        base: Arc<dyn Base>,
        /// Record a content fingerprint (bases named by a path).
        fingerprint: bool,
    },
}

/// What `rebase` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rebased {
    /// Bytes copied from the old base into the image.
    pub copied: u64,
}

/// The header with the new base's fields.
async fn rebased_header(h: &Header, new: &NewBase) -> Result<Header> {
    let mut n = h.clone();
    match new {
        NewBase::Nothing => {
            n.base_name.clear();
            n.base_format = None;
            n.base_size = 0;
            n.base_validator.clear();
            n.flags &= !FLAG_ALL_LOCAL;
        }
        NewBase::Base {
            name,
            format,
            base,
            fingerprint,
        } => {
            n.base_name = name.clone();
            n.base_format = Some(*format);
            n.base_size = base.size();
            n.base_validator =
                crate::base::fingerprint::validator(base.as_ref(), *fingerprint).await?;
        }
    }
    Ok(n)
}

/// Rebase the image on `storage` from `old_base` onto `new`. Unsafe mode
/// (`unsafe_mode`) copies nothing; `old_base` is then needed only if the
/// image's journal must be replayed.
pub async fn rebase(
    storage: Arc<dyn Storage>,
    old_base: Option<Arc<dyn Base>>,
    new: NewBase,
    unsafe_mode: bool,
) -> Result<Rebased> {
    let (h, _) = read_header(storage.as_ref()).await?;
    if !unsafe_mode {
        super::refuse_unsupported(&h, &storage.describe(), "a safe rebase or flatten")?;
    } else if h.incompatible & crate::format::header::INCOMPAT_SNAPSHOTS != 0 {
        super::refuse_unsupported(&h, &storage.describe(), "rebase")?;
    }
    let mut done = Rebased::default();
    if !unsafe_mode || !h.is_clean() {
        let img = open_engine(&storage, old_base).await?;
        if !unsafe_mode {
            let target = rebased_header(&h, &new).await?;
            done.copied = copy_differences(&img, &target, &new).await?;
            img.flush().await?;
        }
        img.close().await?;
    }
    let old = read_clean(storage.as_ref()).await?;
    let nh = rebased_header(&old.header, &new).await?;
    let bitmap = super::carry_bits(&old.bitmap, nh.base_blocks());
    switch(
        storage.as_ref(),
        &old,
        Target {
            header: nh,
            bitmap: Some(bitmap),
            table: None,
        },
    )
    .await?;
    Ok(done)
}

/// Safe mode's copies: the blocks the image reads from its old base whose
/// content the new base would change (or whose extent changes meaning).
async fn copy_differences(img: &Image, target: &Header, new: &NewBase) -> Result<u64> {
    let bs = img.block_size();
    let r1 = img.base_range();
    let r2 = target.base_range();
    let new_base = match new {
        NewBase::Base { base, .. } => Some(base.clone()),
        NewBase::Nothing => None,
    };
    let mut copied = 0;
    let mut pos = 0;
    while pos < r1 {
        let window = (64 << 20).min(r1 - pos);
        // The runs read from the base, whole: block_status splits them where
        // the base's own allocation changes, which need not be a block
        // boundary; merged, they start and end on block boundaries (or r1).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for e in img.block_status(pos, window).await? {
            if e.source != Source::Base {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.1 == e.start => r.1 += e.length,
                _ => runs.push((e.start, e.start + e.length)),
            }
        }
        for (start, end) in runs {
            let mut s = start;
            while s < end {
                let n = STEP.min(end - s);
                copied += copy_window(img, s, s + n, bs, r1, r2, new_base.as_deref()).await?;
                s += n;
            }
        }
        pos += window;
    }
    Ok(copied)
}

/// Compare and copy the blocks of `[s, e)` (block aligned at `s`; `e` a
/// block boundary or `r1`), all read from the old base.
async fn copy_window(
    img: &Image,
    s: u64,
    e: u64,
    bs: u64,
    r1: u64,
    r2: u64,
    new_base: Option<&dyn Base>,
) -> Result<u64> {
    // Both reads at once.
    type Read<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<IoBuf>> + Send + 'a>>;
    let len = (e - s) as usize;
    let mut reads: Vec<Read<'_>> = vec![Box::pin(async move {
        img.read(s, IoBuf::for_overwrite(len)).await
    })];
    if let Some(b) = new_base {
        reads.push(Box::pin(async move {
            b.read_at(s, IoBuf::zeroed(len))
                .await
                .map_err(|er| Error::io(format!("{}: read at offset {s}", b.describe()), er))
        }));
    }
    let mut got = crate::image::prefetch::join_all(reads).await.into_iter();
    let old = got.next().expect("one read at least")?;
    let new = got.next().transpose()?;
    let mut copied = 0;
    let mut run: Option<u64> = None;
    let mut b = s / bs;
    loop {
        let bstart = b * bs;
        let here = bstart < e;
        let copy = here && {
            let old_end = ((b + 1) * bs).min(r1);
            let new_end = if bstart < r2 {
                ((b + 1) * bs).min(r2)
            } else {
                bstart
            };
            let (i, j) = ((bstart - s) as usize, (old_end.min(e) - s) as usize);
            old_end != new_end
                || match &new {
                    Some(n) => old[i..j] != n[i..j],
                    None => true,
                }
        };
        match (copy, run) {
            (true, None) => run = Some(bstart),
            (false, Some(rs)) => {
                let re = bstart.min(e);
                copied +=
                    copy_run(img, rs, re, bs, &old[(rs - s) as usize..(re - s) as usize]).await?;
                run = None;
            }
            _ => {}
        }
        if !here {
            break;
        }
        b += 1;
    }
    Ok(copied)
}

/// Make the blocks of `[s, e)` local with `data` (their old-base content).
async fn copy_run(img: &Image, s: u64, e: u64, bs: u64, data: &[u8]) -> Result<u64> {
    if crate::iobuf::is_zero(data) {
        img.write_zeroes(s, e - s, true, false).await?;
        return Ok(0);
    }
    img.fill_blocks(
        s / bs..e.div_ceil(bs),
        Some((s, IoBuf::from_slice(data))),
        true,
    )
    .await
}

/// Rebase the image file at `path` onto `new` (`None`: flatten), a base
/// name resolved like `fvd create -b` resolves it; bases are opened through
/// `opener`. `unsafe_mode` is `-u`.
pub async fn rebase_path(
    opener: &Opener,
    path: &Path,
    new: Option<(&str, Format)>,
    unsafe_mode: bool,
) -> Result<Rebased> {
    let storage = super::open_image_storage(path)?;
    let (h, _) = read_header(storage.as_ref()).await?;
    let old_base = if !unsafe_mode || !h.is_clean() {
        super::open_recorded_base(opener, path, &h).await?
    } else {
        None
    };
    let new = match new {
        None => NewBase::Nothing,
        Some((name, format)) => {
            if super::local_base_path(opener, path, name)
                .is_some_and(|resolved| crate::open::reaches(&resolved, path))
            {
                return Err(Error::arg(format!(
                    "{}: base '{name}' is (or is over) the image itself: the chain would loop",
                    path.display()
                )));
            }
            let here = Location::Path(path.to_path_buf());
            let base = opener
                .open_named(&here, name, format, 1)
                .await
                .map_err(|e| e.context(format!("{}: new base", path.display())))?;
            NewBase::Base {
                name: name.to_string(),
                format,
                base,
                fingerprint: !crate::open::is_url(name),
            }
        }
    };
    rebase(storage, old_base, new, unsafe_mode)
        .await
        .map_err(|e| super::named(path, e))
}
