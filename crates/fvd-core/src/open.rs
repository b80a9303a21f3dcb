//! Opening and creating images by path, with their base chains.
//!
//! The base named inside an image is resolved relative to the image's own
//! directory (absolute names are used as written), opened read-only with a
//! shared lock, and opened with the format recorded in the image — never a
//! probed one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::base::{Base, FvdBase, RawBase};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{CreateOptions, Image, OpenOptions, create, read_header};
use crate::storage::{CacheMode, FileStorage, Storage, file::FileOptions};

/// Longest chain of FVD bases followed.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Image formats `fvd` reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// FVD.
    Fvd,
    /// A raw disk image.
    Raw,
    /// A qcow2 image: read-only, through a registered base provider.
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fvd" => Ok(Format::Fvd),
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown format '{other}' (expected fvd, raw or qcow2)"),
            )),
        }
    }
}

impl Format {
    /// Name as written in headers and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Fvd => "fvd",
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

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

/// Resolve a base name recorded in the image at `image_path` (URLs are
/// returned unchanged).
pub fn resolve_base(image_path: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if crate::base::is_url(name) {
        return p.to_path_buf();
    }
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image_path
        .parent()
        .map(|d| d.join(p))
        .unwrap_or_else(|| p.to_path_buf())
}

fn open_storage(path: &Path, write: bool, opts: PathOptions) -> Result<Arc<dyn Storage>> {
    let fo = FileOptions {
        write,
        create: false,
        cache: opts.cache,
        lock: !opts.force_share,
    };
    Ok(Arc::new(FileStorage::open(path, fo)?))
}

/// Open the base named `name` (as recorded in an image at `image_path`, or
/// as given on the command line) in `format`, read-only. Paths resolve
/// against the image's directory; URLs and qcow2 go to the registered
/// providers.
pub fn open_base_named<'a>(
    image_path: &'a Path,
    name: &'a str,
    format: Format,
    opts: PathOptions,
    depth: usize,
) -> BoxFut<'a, Arc<dyn Base>> {
    Box::pin(async move {
        if crate::base::is_url(name) || format == Format::Qcow2 {
            let target = resolve_base(image_path, name);
            let target = target.to_string_lossy();
            return match crate::base::open_with_providers(&target, format.name()) {
                Some(fut) => fut.await,
                None => Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "no support for base '{name}' in format {} in this program",
                        format.name()
                    ),
                )),
            };
        }
        open_base(&resolve_base(image_path, name), format, opts, depth).await
    })
}

/// Open a base image by path, in the given format, read-only.
pub fn open_base<'a>(
    path: &'a Path,
    format: Format,
    opts: PathOptions,
    depth: usize,
) -> BoxFut<'a, Arc<dyn Base>> {
    Box::pin(async move {
        if depth > MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "{}: base chain is deeper than {MAX_CHAIN_DEPTH}",
                path.display()
            )));
        }
        if format == Format::Qcow2 {
            let name = path.to_string_lossy();
            return match crate::base::open_with_providers(&name, format.name()) {
                Some(fut) => fut.await,
                None => Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("{name}: qcow2 is not supported by this program"),
                )),
            };
        }
        if !path.exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{}: base image not found", path.display()),
            ));
        }
        let ro = PathOptions {
            read_only: true,
            ..opts
        };
        let storage = open_storage(path, false, ro)?;
        Ok(match format {
            Format::Raw => Arc::new(RawBase::new(storage)?) as Arc<dyn Base>,
            Format::Fvd => {
                let img = open_fvd_at(path, storage, ro, depth + 1).await?;
                Arc::new(FvdBase::new(Arc::new(img)))
            }
            Format::Qcow2 => unreachable!("handled above"),
        })
    })
}

/// A boxed future (recursion through base chains).
pub type BoxFut<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'a>>;

async fn open_fvd_at(
    path: &Path,
    storage: Arc<dyn Storage>,
    opts: PathOptions,
    depth: usize,
) -> Result<Image> {
    let (h, _) = read_header(storage.as_ref()).await?;
    let base = if h.base_range() > 0 {
        let fmt: Format = h
            .base_format
            .parse()
            .map_err(|e: Error| e.context(path.display()))?;
        Some(
            open_base_named(path, &h.base_name, fmt, opts, depth)
                .await
                .map_err(|e| e.context(format!("{}: base", path.display())))?,
        )
    } else {
        None
    };
    Image::open(
        storage,
        base,
        OpenOptions {
            read_only: opts.read_only,
            trust_base: opts.force_share,
        },
    )
    .await
}

/// Open an image file in `format`.
pub async fn open_path(path: &Path, format: Format, opts: PathOptions) -> Result<Image> {
    if !path.exists() && !crate::base::is_url(&path.to_string_lossy()) {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("{}: no such file", path.display()),
        ));
    }
    if format == Format::Qcow2 || crate::base::is_url(&path.to_string_lossy()) {
        // Read-only views of what only a provider can open.
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
        // The path is the user's own, already relative to the current
        // directory: not resolved against anything.
        let name = path.to_string_lossy();
        let base = if crate::base::is_url(&name) {
            open_base_named(path, &name, format, opts, 0).await?
        } else {
            open_base(path, format, opts, 0).await?
        };
        let storage: Arc<dyn Storage> = Arc::new(crate::base::BaseStorage::new(base));
        return Image::open_raw(
            storage,
            OpenOptions {
                read_only: true,
                ..Default::default()
            },
        );
    }
    if format == Format::Fvd {
        crate::base::chain::check_no_loop(path, resolve_base)?;
    }
    let storage = open_storage(path, !opts.read_only, opts)?;
    match format {
        Format::Raw => Image::open_raw(
            storage,
            OpenOptions {
                read_only: opts.read_only,
                ..Default::default()
            },
        ),
        Format::Fvd => open_fvd_at(path, storage, opts, 0).await,
        Format::Qcow2 => unreachable!("handled above"),
    }
}

/// What `create_path` needs to know about the base.
#[derive(Debug, Clone)]
pub struct BaseSpec {
    /// The name to record (as the user gave it).
    pub name: String,
    /// Its format.
    pub format: Format,
}

/// Create an FVD image file at `path`. On failure nothing is left behind.
pub async fn create_path(
    path: &Path,
    base: Option<&BaseSpec>,
    mut opts: CreateOptions,
    detect_zeroes: Option<bool>,
) -> Result<()> {
    let base_img = match base {
        Some(b) => {
            let img = open_base_named(path, &b.name, b.format, PathOptions::default(), 0)
                .await
                .map_err(|e| e.context(format!("{}: cannot open base", path.display())))?;
            opts.base = Some((b.name.clone(), b.format.name().to_string()));
            opts.fingerprint_base = !crate::base::is_url(&b.name);
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
    let local_base = base.is_some_and(|b| !crate::base::is_url(&b.name));
    opts.detect_zeroes = !is_device && detect_zeroes.unwrap_or(local_base);
    let fo = FileOptions {
        write: true,
        create: !is_device,
        cache: CacheMode::Writeback,
        lock: true,
    };
    let storage = FileStorage::open(path, fo)?;
    let r = create(&storage, &opts, base_img.as_deref()).await;
    if let Err(e) = r {
        drop(storage);
        if !is_device {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.context(path.display()));
    }
    Ok(())
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
