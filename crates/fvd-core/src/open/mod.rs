//! Opening and creating images by path or URL, with their base chains.
//!
//! The layer above the engine: [`Opener`] (`opener.rs`) decides where a base
//! named inside an image is and opens it — local raw and FVD files itself,
//! URLs and other formats through the providers the program gives it — and
//! `fvd_base.rs` adapts an FVD image to serve as a base. The free functions
//! [`open_path`] and [`create_path`] use [`Opener::local`]: local bases
//! only.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::format::header::Header;
use crate::image::{CreateOptions, Image, OpenOptions, create};
use crate::storage::file::FileOptions;
use crate::storage::{CacheMode, FileStorage, Storage};

mod fvd_base;
mod opener;

pub use fvd_base::FvdBase;
pub use opener::{BaseProvider, KeyLookup, Location, MAX_CHAIN_DEPTH, OpenFuture, Opener, is_url};

/// How to open an image by path.
#[derive(Debug, Clone, Copy)]
pub struct PathOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Host cache mode.
    pub cache: CacheMode,
    /// Skip the file lock (like qemu-img -U); only for read-only inspection.
    pub force_share: bool,
}

impl Default for PathOptions {
    fn default() -> Self {
        PathOptions {
            read_only: false,
            cache: CacheMode::Writeback,
            force_share: false,
        }
    }
}

/// What [`Opener::create`] needs to know about the base.
#[derive(Debug, Clone)]
pub struct BaseSpec {
    /// The name to record (as the user gave it).
    pub name: String,
    /// Its format.
    pub format: Format,
}

impl Opener {
    /// Open the image at `path` in `format`. A URL, or a qcow2 file, is
    /// opened read-only as a raw view of its content.
    pub async fn open(&self, path: &Path, format: Format, opts: PathOptions) -> Result<Image> {
        let name = path.to_string_lossy();
        let location = Location::parse(&name);
        if let Location::Path(p) = &location
            && !p.exists()
        {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{}: no such file", path.display()),
            ));
        }
        if format == Format::Qcow2 || matches!(location, Location::Url(_)) {
            // Read-only views of what only a provider can open. The path is
            // the user's own, relative to the current directory.
            if !opts.read_only {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "{}: {} images can only be opened read-only",
                        path.display(),
                        format.name()
                    ),
                ));
            }
            let base = self
                .with_file_options(opts)
                .open_base(&location, format, 0)
                .await?;
            let storage: Arc<dyn Storage> = Arc::new(crate::base::BaseStorage::new(base));
            return Image::open_raw(storage, OpenOptions { read_only: true });
        }
        let storage = opener::open_storage(path, opts)?;
        match format {
            Format::Raw => Image::open_raw(
                storage,
                OpenOptions {
                    read_only: opts.read_only,
                },
            ),
            Format::Fvd => self.open_fvd(path, storage, opts, 0).await,
            Format::Qcow2 => unreachable!("handled above"),
        }
    }

    /// Create an FVD image file at `path` (or on the block device there);
    /// returns the header written. On failure nothing is left behind.
    pub async fn create(
        &self,
        path: &Path,
        base: Option<&BaseSpec>,
        mut opts: CreateOptions,
        detect_zeroes: Option<bool>,
    ) -> Result<Header> {
        let here = Location::Path(path.to_path_buf());
        let base_img = match base {
            Some(b) => {
                let img = self
                    .open_named(&here, &b.name, b.format, 1)
                    .await
                    .map_err(|e| e.context(format!("{}: cannot open base", path.display())))?;
                opts.base = Some((b.name.clone(), b.format));
                Some(img)
            }
            None => None,
        };
        use std::os::unix::fs::FileTypeExt;
        let is_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        // A block device need not read zeros where never written: no zero detection.
        // Zero detection reads the whole base: on by default for local bases only.
        let local_base = base.is_some_and(|b| !is_url(&b.name));
        opts.detect_zeroes = !is_device && detect_zeroes.unwrap_or(local_base);
        let fo = FileOptions {
            write: true,
            create: !is_device,
            cache: CacheMode::Writeback,
            lock: true,
        };
        let storage = FileStorage::open(path, fo)?;
        match create(&storage, &opts, base_img.as_deref()).await {
            Ok(h) => Ok(h),
            Err(e) => {
                drop(storage);
                if !is_device {
                    let _ = std::fs::remove_file(path);
                }
                Err(e.context(path.display()))
            }
        }
    }
}

/// Open an image file in `format`, with local bases only
/// ([`Opener::local`]; programs that take URLs or qcow2 bases build an
/// [`Opener`] with providers).
pub async fn open_path(path: &Path, format: Format, opts: PathOptions) -> Result<Image> {
    Opener::local().open(path, format, opts).await
}

/// Create an FVD image file at `path` over a local base, if any
/// ([`Opener::create`] with [`Opener::local`]).
pub async fn create_path(
    path: &Path,
    base: Option<&BaseSpec>,
    opts: CreateOptions,
    detect_zeroes: Option<bool>,
) -> Result<Header> {
    Opener::local()
        .create(path, base, opts, detect_zeroes)
        .await
}

/// Create a raw image file of `size` bytes (sparse).
pub fn create_raw(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("{}: cannot create", path.display()), e))?;
    f.set_len(size)
        .map_err(|e| Error::io(format!("{}: set size", path.display()), e))
}
