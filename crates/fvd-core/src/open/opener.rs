//! The base opener: which bases an image may name, where they are, and how
//! they are opened — in one value the program builds and passes down (no
//! global registry).
//!
//! It owns
//! * the **providers** ([`BaseProvider`]): what the core cannot open itself,
//!   URLs (`nbd://`, `http://`...) and formats other than raw and FVD
//!   (qcow2); fvd-remote supplies them, a program without network code
//!   simply has none;
//! * **resolution** of a base name recorded inside an image against that
//!   image's location ([`Opener::resolve`]): a URL stays a URL, an absolute
//!   path stays as written, a relative path is taken relative to the
//!   image's directory, or to its URL through a provider; an image behind a
//!   URL may not name a local file;
//! * the **chain depth limit** ([`Opener::open_base`]): images above a base
//!   are counted, so a chain that loops ends with a clear error;
//! * how base files are opened: read-only, with a shared lock (unless
//!   force-shared), in the cache mode of the image above them.
//!
//! A base is always opened in the format recorded in the image above it,
//! never a probed one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use super::PathOptions;
use super::fvd_base::FvdBase;
use crate::base::{Base, RawBase};
use crate::crypt::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::format::header::{Header, INCOMPAT_ENCRYPTED};
use crate::image::snapshot::{SnapshotSel, snapshot_needs_base};
use crate::image::{Image, OpenOptions, read_header};
use crate::storage::file::FileOptions;
use crate::storage::{FileStorage, Storage};

/// Longest chain of bases followed by default.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// What opening a base returns (boxed: chains recurse).
pub type OpenFuture<'a> = Pin<Box<dyn Future<Output = Result<Arc<dyn Base>>> + Send + 'a>>;

/// Where an image or a base lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local file or block device.
    Path(PathBuf),
    /// A URL (`scheme://...`), reachable only through a provider.
    Url(String),
}

impl Location {
    /// A name as a user or an image wrote it: a URL if it has a scheme,
    /// else a path (relative names stay relative to the current directory).
    pub fn parse(name: &str) -> Location {
        if is_url(name) {
            Location::Url(name.to_string())
        } else {
            Location::Path(PathBuf::from(name))
        }
    }

    /// The location for messages.
    pub fn display(&self) -> String {
        match self {
            Location::Path(p) => p.display().to_string(),
            Location::Url(u) => u.clone(),
        }
    }
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

/// Opens what the core cannot open itself. Every method answers `None`
/// for what the provider does not handle, so the opener can ask the next.
pub trait BaseProvider: Send + Sync {
    /// The bytes behind `url`, as a raw base.
    fn open_url(&self, url: &str) -> Option<OpenFuture<'static>>;

    /// A base in `format` whose bytes are `file`, found at `location`
    /// (depth `depth`). Bases it names in turn are opened through `opener`
    /// ([`Opener::open_named`]) at `depth + 1`.
    fn open_format<'a>(
        &'a self,
        format: Format,
        file: Arc<dyn Base>,
        location: &'a Location,
        opener: &'a Opener,
        depth: usize,
    ) -> Option<OpenFuture<'a>>;

    /// `name` (relative) resolved against the URL `parent`.
    fn join_url(&self, parent: &str, name: &str) -> Option<Result<String>>;
}

/// The passphrase of the encrypted FVD image at a path, if the program has
/// one (asked for the image opened and for every FVD base of its chain).
pub type KeyLookup = Arc<dyn Fn(&Path) -> Option<Secret> + Send + Sync>;

/// Opens images and their bases: providers, chain depth limit, resolution
/// of recorded base names, how base files are opened, and the keys of
/// encrypted images. Cheap to clone.
#[derive(Clone)]
pub struct Opener {
    providers: Vec<Arc<dyn BaseProvider>>,
    max_depth: usize,
    files: PathOptions,
    keys: Option<KeyLookup>,
}

impl Default for Opener {
    fn default() -> Self {
        Opener::local()
    }
}

impl Opener {
    /// An opener for local raw and FVD bases only.
    pub fn local() -> Self {
        Opener {
            providers: Vec::new(),
            max_depth: MAX_CHAIN_DEPTH,
            files: PathOptions {
                read_only: true,
                ..PathOptions::default()
            },
            keys: None,
        }
    }

    /// Ask `keys` for the passphrase of every encrypted FVD image opened.
    pub fn with_keys(mut self, keys: KeyLookup) -> Self {
        self.keys = Some(keys);
        self
    }

    /// The passphrase known for the image at `path`.
    pub fn key_for(&self, path: &Path) -> Option<Secret> {
        self.keys.as_ref().and_then(|k| k(path))
    }

    /// Ask `p` too (after the providers added before it).
    pub fn with_provider(mut self, p: Arc<dyn BaseProvider>) -> Self {
        self.providers.push(p);
        self
    }

    /// Follow chains of at most `depth` bases.
    pub fn with_max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth;
        self
    }

    /// Longest chain followed.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// This opener, opening base files in the cache mode and sharing mode
    /// of `opts` (always read-only).
    pub fn with_file_options(&self, opts: PathOptions) -> Self {
        let mut o = self.clone();
        o.files = PathOptions {
            read_only: true,
            ..opts
        };
        o
    }

    /// Where the base named `name` inside the image at `parent` is.
    pub fn resolve(&self, parent: &Location, name: &str) -> Result<Location> {
        if is_url(name) {
            return Ok(Location::Url(name.to_string()));
        }
        match parent {
            Location::Path(p) => {
                let n = Path::new(name);
                Ok(Location::Path(if n.is_absolute() {
                    n.to_path_buf()
                } else {
                    p.parent().map_or_else(|| n.to_path_buf(), |d| d.join(n))
                }))
            }
            Location::Url(u) if name.starts_with('/') => Err(Error::new(
                ErrorKind::Unsupported,
                format!("{u}: a remote image names the local backing file '{name}'; refused"),
            )),
            Location::Url(u) => self
                .providers
                .iter()
                .find_map(|p| p.join_url(u, name))
                .unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Unsupported,
                        format!(
                            "{u}: a remote image names the relative backing file '{name}'; only URLs are supported there"
                        ),
                    ))
                })
                .map(Location::Url),
        }
    }

    /// Open the base named `name` inside the image at `parent`, in
    /// `format`, at chain depth `depth` (errors name `parent`'s base).
    pub fn open_named<'a>(
        &'a self,
        parent: &'a Location,
        name: &'a str,
        format: Format,
        depth: usize,
    ) -> OpenFuture<'a> {
        Box::pin(async move {
            let location = self.resolve(parent, name)?;
            self.open_base(&location, format, depth).await
        })
    }

    /// Open the base at `location` in `format`, read-only; `depth` counts
    /// the images above it.
    pub fn open_base<'a>(
        &'a self,
        location: &'a Location,
        format: Format,
        depth: usize,
    ) -> OpenFuture<'a> {
        Box::pin(async move {
            if depth > self.max_depth {
                return Err(Error::invalid(format!(
                    "{}: base chain is deeper than {}",
                    location.display(),
                    self.max_depth
                )));
            }
            match (format, location) {
                (Format::Raw, _) => self.open_bytes(location).await,
                (Format::Fvd, Location::Path(path)) => {
                    let storage = self.open_file(path)?;
                    let img = self.open_fvd(path, storage, self.files, depth).await?;
                    Ok(Arc::new(FvdBase::new(Arc::new(img))) as Arc<dyn Base>)
                }
                (Format::Fvd, Location::Url(url)) => Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("{url}: an FVD base must be a local file"),
                )),
                (other, _) => {
                    let file = self.open_bytes(location).await?;
                    match self
                        .providers
                        .iter()
                        .find_map(|p| p.open_format(other, file.clone(), location, self, depth))
                    {
                        Some(fut) => fut.await,
                        None => Err(Error::new(
                            ErrorKind::Unsupported,
                            format!(
                                "{}: {} is not supported by this program",
                                location.display(),
                                other.name()
                            ),
                        )),
                    }
                }
            }
        })
    }

    /// The bytes at `location` as a raw base.
    async fn open_bytes(&self, location: &Location) -> Result<Arc<dyn Base>> {
        match location {
            Location::Path(path) => Ok(Arc::new(RawBase::new(self.open_file(path)?)?)),
            Location::Url(url) => match self.providers.iter().find_map(|p| p.open_url(url)) {
                Some(fut) => fut.await,
                None => Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("{url}: no support for this kind of URL in this program"),
                )),
            },
        }
    }

    /// A base file, read-only.
    fn open_file(&self, path: &Path) -> Result<Arc<dyn Storage>> {
        if !path.exists() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("{}: base image not found", path.display()),
            ));
        }
        open_storage(path, self.files)
    }

    /// The FVD image at `path` on `storage`, with its base (depth `depth`
    /// counts the images above this one).
    pub(super) async fn open_fvd(
        &self,
        path: &Path,
        storage: Arc<dyn Storage>,
        opts: PathOptions,
        depth: usize,
    ) -> Result<Image> {
        let (h, _) = read_header(storage.as_ref()).await?;
        let base = self
            .fvd_base(path, storage.as_ref(), opts, depth, None)
            .await?;
        let key = self.key_of(path, &h);
        Image::open_with_key(
            storage,
            base,
            OpenOptions {
                read_only: opts.read_only,
            },
            key.as_ref(),
        )
        .await
    }

    /// The base an FVD image (or its snapshot `sel`) reads from, opened;
    /// `None` when it reads nothing from one.
    async fn fvd_base(
        &self,
        path: &Path,
        storage: &dyn Storage,
        opts: PathOptions,
        depth: usize,
        sel: Option<&SnapshotSel>,
    ) -> Result<Option<Arc<dyn Base>>> {
        let (h, _) = read_header(storage).await?;
        let Some((name, format)) = h.base() else {
            return Ok(None);
        };
        if !snapshot_needs_base(storage, &h, sel).await? {
            return Ok(None);
        }
        let here = Location::Path(path.to_path_buf());
        let bases = self.with_file_options(opts);
        Ok(Some(
            bases
                .open_named(&here, name, format, depth + 1)
                .await
                .map_err(|e| e.context(format!("{}: base", path.display())))?,
        ))
    }

    /// Open snapshot `sel` of the FVD image at `path`, read-only (like
    /// `qemu-img convert -l` and `qemu-nbd -l`).
    pub async fn open_snapshot(
        &self,
        path: &Path,
        opts: PathOptions,
        sel: &SnapshotSel,
    ) -> Result<Image> {
        let opts = PathOptions {
            read_only: true,
            ..opts
        };
        let storage = open_storage(path, opts)?;
        let (h, _) = read_header(storage.as_ref()).await?;
        let base = self
            .fvd_base(path, storage.as_ref(), opts, 0, Some(sel))
            .await?;
        let key = self.key_of(path, &h);
        Image::open_snapshot_with_key(storage, base, sel, key.as_ref()).await
    }

    /// The passphrase of the image at `path` when its header says it is
    /// encrypted.
    fn key_of(&self, path: &Path, h: &Header) -> Option<Secret> {
        match h.incompatible & INCOMPAT_ENCRYPTED {
            0 => None,
            _ => self.key_for(path),
        }
    }
}

pub(super) fn open_storage(path: &Path, opts: PathOptions) -> Result<Arc<dyn Storage>> {
    let fo = FileOptions {
        write: !opts.read_only,
        create: false,
        cache: opts.cache,
        lock: !opts.force_share,
    };
    Ok(Arc::new(FileStorage::open(path, fo)?))
}
