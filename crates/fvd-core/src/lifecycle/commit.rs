//! `commit`: write the image's own data into its base (qemu-img commit).
//!
//! Order, and why each crash point is safe:
//! 1. **mark**: the image's base validator becomes `commit-in-progress`
//!    (a header switch). From here the image opens without checking its
//!    base's size or fingerprint — the base is about to change;
//! 2. the base grows to the image's size if it is smaller (its new space
//!    lies past `base_size`, where the image never reads its base);
//! 3. every extent the image holds itself (blocks whose bit is set, and
//!    everything past the base range) is copied into the base, zeros
//!    included; then the base is flushed. The base changes only where the
//!    image reads its own data, so a crash anywhere here leaves the image
//!    reading exactly what it read before; running `commit` again finishes;
//! 4. the image's header switches to the updated base (its size and a new
//!    validator with a fresh fingerprint) and, unless `keep` (`-d`), to an
//!    all-zero bitmap: the image is then empty over its base;
//! 5. the image's data is punched (compact: chunks unmapped, then punched).
//!    A crash here leaves only space `fvd check` reports as leaked.
//!
//! Other images over the same base see it change: their fingerprints make
//! them refuse to open (qemu-img leaves such overlays silently corrupt).

use std::path::Path;
use std::sync::Arc;

use super::{Target, open_engine, read_clean, switch};
use crate::base::fingerprint::{self, COMMIT_IN_PROGRESS};
use crate::base::{Base, RawBase};
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::Region;
use crate::image::compact::EMPTY;
use crate::image::{Image, Source, read_header};
use crate::iobuf::IoBuf;
use crate::open::FvdBase;
use crate::open::{Opener, PathOptions};
use crate::storage::Storage;
use crate::storage::file::FileOptions;
use crate::storage::{CacheMode, FileStorage};

/// Largest piece copied at once.
const COPY_STEP: u64 = 1 << 20;
/// Pieces copied at once (the I/O pool's threads work in parallel).
const COPIES_IN_FLIGHT: usize = 8;

/// The base, opened for writing.
pub enum BaseWriter {
    /// A raw image (file or block device).
    Raw(Arc<dyn Storage>),
    /// An FVD image, opened read-write.
    Fvd(Arc<Image>),
}

impl BaseWriter {
    fn view(&self) -> Result<Arc<dyn Base>> {
        Ok(match self {
            BaseWriter::Raw(s) => Arc::new(RawBase::new(s.clone())?),
            BaseWriter::Fvd(i) => Arc::new(FvdBase::new(i.clone())),
        })
    }

    fn size(&self) -> Result<u64> {
        match self {
            BaseWriter::Raw(s) => s
                .len()
                .map_err(|e| Error::io(format!("{}: size", s.describe()), e)),
            BaseWriter::Fvd(i) => Ok(i.virtual_size()),
        }
    }

    async fn write(&self, offset: u64, data: IoBuf) -> Result<()> {
        match self {
            BaseWriter::Raw(s) => s
                .write_at(offset, data, false)
                .await
                .map(|_| ())
                .map_err(|e| Error::io(format!("{}: write at offset {offset}", s.describe()), e)),
            BaseWriter::Fvd(i) => i.write(offset, data, false).await.map(|_| ()),
        }
    }

    async fn zero(&self, offset: u64, len: u64) -> Result<()> {
        match self {
            BaseWriter::Raw(s) => s
                .write_zeroes(offset, len)
                .await
                .map_err(|e| Error::io(format!("{}: zero at offset {offset}", s.describe()), e)),
            BaseWriter::Fvd(i) => i.write_zeroes(offset, len, true, false).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        match self {
            BaseWriter::Raw(s) => s
                .flush()
                .await
                .map_err(|e| Error::io(format!("{}: flush", s.describe()), e)),
            BaseWriter::Fvd(i) => i.flush().await,
        }
    }

    /// Grow a raw base to `size` bytes (step 2); an FVD base must have
    /// been resized before it was opened.
    async fn grow_to(&self, size: u64) -> Result<()> {
        let have = self.size()?;
        if have >= size {
            return Ok(());
        }
        match self {
            BaseWriter::Raw(s) => {
                s.set_len(size).await.map_err(|e| {
                    Error::new(
                        ErrorKind::NoSpace,
                        format!(
                            "{}: the base is {have} bytes and cannot grow to the image's {size}: {e}",
                            s.describe()
                        ),
                    )
                })?;
                self.flush().await
            }
            BaseWriter::Fvd(i) => Err(Error::arg(format!(
                "{}: the base is smaller than the image; resize it first",
                i.describe()
            ))),
        }
    }
}

/// What `commit` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Bytes of data copied into the base (zeros written as zeros not counted).
    pub bytes: u64,
    /// The base's size after the commit.
    pub base_size: u64,
}

/// Step 1: mark the image on `storage` as being committed (nothing if it
/// already is). The image must be clean; `view` is its base, read-only,
/// used only when the journal needs a replay first.
pub async fn mark(storage: &Arc<dyn Storage>, view: Option<Arc<dyn Base>>) -> Result<()> {
    let (h, _) = read_header(storage.as_ref()).await?;
    super::refuse_unsupported(&h, &storage.describe(), "commit")?;
    if h.base_validator == COMMIT_IN_PROGRESS {
        return Ok(());
    }
    if !h.is_clean() {
        open_engine(storage, view).await?.close().await?;
    }
    let old = read_clean(storage.as_ref()).await?;
    let mut nh = old.header.clone();
    nh.base_validator = COMMIT_IN_PROGRESS.to_string();
    super::switch_header(storage.as_ref(), &old, nh).await?;
    Ok(())
}

/// Steps 1 to 5 for the image on `storage` and its base, opened for
/// writing as `base`. With `keep` (qemu-img's `-d`) the image keeps its
/// data; else it is emptied.
pub async fn commit(storage: Arc<dyn Storage>, base: &BaseWriter, keep: bool) -> Result<Committed> {
    let (h, _) = read_header(storage.as_ref()).await?;
    super::refuse_unsupported(&h, &storage.describe(), "commit")?;
    if h.base_name.is_empty() {
        return Err(Error::arg(format!(
            "{}: the image has no base image to commit into",
            storage.describe()
        )));
    }
    mark(&storage, Some(base.view()?)).await?;
    base.grow_to(h.virtual_size).await?;
    let img = open_engine(&storage, Some(base.view()?)).await?;
    let bytes = copy_local_data(&img, base, base.view()?.as_ref()).await?;
    base.flush().await?;
    img.close().await?;
    drop(img);
    let view = base.view()?;
    let old = read_clean(storage.as_ref()).await?;
    let oh = &old.header;
    let mut nh = oh.clone();
    nh.base_size = view.size();
    nh.base_validator = fingerprint::validator(view.as_ref(), true).await?;
    // The base now holds everything the image held: nothing is left to
    // prefetch or detach.
    nh.flags &= !crate::format::header::FLAG_ALL_LOCAL;
    // Kept, every block the image held stays local; emptied, none does.
    let bitmap = if keep {
        super::carry_bits(&old.bitmap, nh.base_blocks())
    } else {
        AtomicBitmap::new(nh.base_blocks())
    };
    let nh = switch(
        storage.as_ref(),
        &old,
        Target {
            header: nh,
            bitmap: Some(bitmap),
            table: None,
        },
    )
    .await?;
    if !keep {
        empty_data(storage.as_ref(), &old.table, &nh).await?;
    }
    Ok(Committed {
        bytes,
        base_size: view.size(),
    })
}

/// Step 3: copy every extent the image holds itself into the base, up to
/// [`COPIES_IN_FLIGHT`] pieces at once. Zeros are written only where the
/// base does not read zeros already (`view` tells: the blocks a create
/// found zero in the base are local zeros).
async fn copy_local_data(img: &Image, base: &BaseWriter, view: &dyn Base) -> Result<u64> {
    let size = img.virtual_size();
    let mut copied = 0;
    let mut pos = 0;
    while pos < size {
        let window = (64 << 20).min(size - pos);
        let mut pieces = Vec::new();
        for e in img.block_status(pos, window).await? {
            if e.source != Source::Image {
                continue;
            }
            if e.zero {
                let runs = view
                    .allocation(e.start, e.length)
                    .await
                    .map_err(|er| Error::io(format!("{}: block status", view.describe()), er))?;
                let mut at = e.start;
                for r in runs {
                    if r.data {
                        base.zero(at, r.length).await?;
                    }
                    at += r.length;
                }
                continue;
            }
            let mut off = e.start;
            while off < e.start + e.length {
                let n = COPY_STEP.min(e.start + e.length - off);
                pieces.push((off, n));
                off += n;
            }
        }
        for batch in pieces.chunks(COPIES_IN_FLIGHT) {
            let copies = batch
                .iter()
                .map(|&(off, n)| {
                    Box::pin(async move {
                        let buf = img.read(off, IoBuf::for_overwrite(n as usize)).await?;
                        base.write(off, buf).await
                    })
                        as std::pin::Pin<
                            Box<dyn std::future::Future<Output = Result<()>> + Send + '_>,
                        >
                })
                .collect();
            for r in crate::image::prefetch::join_all(copies).await {
                r?;
            }
            copied += batch.iter().map(|p| p.1).sum::<u64>();
        }
        pos += window;
    }
    Ok(copied)
}

/// Step 5 (without `keep`): the image's data is no longer read (every bit
/// is clear and the base covers the whole disk); give its space back.
/// Compact images: unmap every chunk — in place, which changes nothing the
/// image reads — then cut the file at the data region; a block device
/// (whose length `set_len` leaves alone) has its chunks punched instead.
/// A crash before the cut leaves only chunks `fvd check` reports as leaked.
async fn empty_data(
    storage: &dyn Storage,
    table: &[u32],
    nh: &crate::format::header::Header,
) -> Result<()> {
    let d = nh.region(Region::Data).offset;
    let err = |what: &'static str| move |e| Error::io(format!("{}: {what}", storage.describe()), e);
    if !super::is_compact(nh) {
        return storage
            .discard(d, nh.virtual_size)
            .await
            .map_err(err("punch data"));
    }
    let r = nh.region(Region::Table);
    let empty = vec![EMPTY; table.len()];
    let bytes = crate::meta::table_bytes(&empty, 0, table.len() * 4);
    storage
        .write_at(r.offset, IoBuf::from_slice(&bytes), false)
        .await
        .map_err(err("write chunk table"))?;
    storage.flush().await.map_err(err("flush"))?;
    // Files shrink to the metadata (one call however many chunks there
    // were); set_len leaves a block device as it is.
    let _ = storage.set_len(d).await;
    let used = crate::image::reclaim::high_water(table) * nh.chunk_size as u64;
    if used > 0 && storage.len().map_err(err("size"))? > d {
        storage
            .discard(d, used)
            .await
            .map_err(err("punch chunks"))?;
    }
    Ok(())
}

/// Commit the image file at `path` into its base (a local raw or FVD image;
/// the bases under it are opened through `opener`).
pub async fn commit_path(opener: &Opener, path: &Path, keep: bool) -> Result<Committed> {
    let storage = super::open_image_storage(path)?;
    let (h, _) = read_header(storage.as_ref()).await?;
    super::refuse_unsupported(&h, &storage.describe(), "commit")?;
    let Some((name, fmt)) = h.base() else {
        return Err(Error::arg(format!(
            "{}: the image has no base image to commit into",
            path.display()
        )));
    };
    let bpath = match super::local_base_path(opener, path, name) {
        Some(p) if matches!(fmt, Format::Raw | Format::Fvd) => p,
        _ => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: cannot commit into base '{name}' ({}): only local raw and fvd bases can be written; a remote or qcow2 base is read-only to fvd (convert the image instead)",
                    path.display(),
                    fmt.name()
                ),
            ));
        }
    };
    if fmt == Format::Fvd {
        // The FVD base must be resized before it is opened for writing, and
        // the image marked before its base changes size.
        let view = super::open_recorded_base(opener, path, &h).await?;
        mark(&storage, view).await?;
        let bh = {
            let s = FileStorage::open(&bpath, FileOptions::read_only())?;
            read_header(&s).await?.0
        };
        if bh.virtual_size < h.virtual_size {
            super::resize::resize_path(opener, &bpath, h.virtual_size, false).await?;
        }
    }
    let writer = match fmt {
        Format::Raw => {
            let fo = FileOptions {
                write: true,
                create: false,
                cache: CacheMode::Writeback,
                lock: true,
            };
            BaseWriter::Raw(Arc::new(FileStorage::open(&bpath, fo)?))
        }
        _ => BaseWriter::Fvd(Arc::new(
            opener
                .open(&bpath, Format::Fvd, PathOptions::default())
                .await?,
        )),
    };
    let r = commit(storage, &writer, keep).await;
    if let BaseWriter::Fvd(img) = &writer {
        img.close().await?;
    }
    r.map_err(|e| super::named(path, e))
}
