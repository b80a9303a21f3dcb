//! Opening an image: the header, the bitmap and chunk table, the snapshot
//! directory, the replay of a journal left by a crash (and the end of a
//! snapshot apply a crash interrupted); read-only views of a snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::compact::{self, Compact, SnapshotUse};
use super::encrypt::Encryption;
use super::map::{Layout, Mapping};
use super::rangelock::RangeLocks;
use super::{Image, OpenOptions, cor, expect_len, profile, snapshot};
use crate::base::Base;
use crate::crypt::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{self, Header, INCOMPAT_COMPACT, INCOMPAT_ENCRYPTED, Region};
use crate::iobuf::IoBuf;
use crate::meta::{self, Durable, Meta, Stats};
use crate::storage::Storage;

impl Image {
    /// Open an FVD image on `storage`, with its base already opened by the caller.
    pub async fn open(
        storage: Arc<dyn Storage>,
        base: Option<Arc<dyn Base>>,
        opts: OpenOptions,
    ) -> Result<Image> {
        Self::open_with_key(storage, base, opts, None).await
    }

    /// Open an FVD image on `storage`; `key` is the passphrase of an
    /// encrypted image. Without it an encrypted image opens for metadata
    /// work only (data I/O fails with [`ErrorKind::KeyRequired`]); a key
    /// that opens no key slot fails before anything is written.
    pub async fn open_with_key(
        storage: Arc<dyn Storage>,
        base: Option<Arc<dyn Base>>,
        opts: OpenOptions,
        key: Option<&Secret>,
    ) -> Result<Image> {
        let desc = storage.describe();
        let hf = meta::header_in_force(storage.as_ref()).await?;
        let (h, slot, header_note) = (hf.header, hf.slot, hf.note);
        // Keys first: a wrong passphrase must fail before a replay writes.
        let crypt = open_crypt(storage.as_ref(), &h, key, &desc).await?;
        let file_len = storage_len(storage.as_ref())?;
        check_length(&desc, &h, file_len)?;
        let capacity = capacity_of(&h, file_len);
        let snaps = snapshot::load(storage.as_ref(), &h, capacity)
            .await
            .map_err(|e| e.context(&desc))?;
        // An apply a crash interrupted: the image is the snapshot.
        let pending = snaps.pending;
        let base_range = match &pending {
            Some(p) if p.entry.has_bitmap() => h.recorded_base_range(),
            Some(_) => 0,
            None => h.base_range(),
        };
        let base = check_base(&desc, &h, base, base_range)?;
        let (durable, replayed) = match &pending {
            Some(p) => (p.durable(), meta::Replayed::default()),
            None => load_metadata(storage.as_ref(), &h)
                .await
                .map_err(|e| e.context(&desc))?,
        };
        let stats = Stats::default();
        stats
            .replayed_records
            .store(replayed.records, Ordering::Relaxed);
        stats
            .replay_dropped
            .store(replayed.dropped, Ordering::Relaxed);
        let layout =
            layout_of(&h, &durable.table, capacity, &snaps.usage).map_err(|e| e.context(&desc))?;
        let dirty = !h.is_clean();
        if !opts.read_only {
            reserve_metadata(storage.as_ref(), &h)
                .await
                .map_err(|e| e.context(&desc))?;
        }
        let base_blocks = durable.bitmap.len();
        let meta = Meta::new(h.clone(), slot, durable);
        let mut dir = snaps.state;
        let mut header = h;
        if !opts.read_only {
            let mut st = meta.commit.lock().await;
            let r = match &pending {
                Some(p) => {
                    snapshot::finish_apply(storage.as_ref(), &stats, &mut st, &mut dir, p).await
                }
                None if dirty => {
                    meta::checkpoint_now(&mut st, storage.as_ref(), &stats, true).await
                }
                None => Ok(()),
            };
            r.map_err(|e| e.context(&desc))?;
            header = st.header.clone();
        }
        Ok(Image::assemble(Parts {
            storage,
            base,
            header,
            meta,
            layout,
            base_blocks,
            base_range,
            read_only: opts.read_only,
            stats,
            replayed_blocks: replayed.blocks,
            header_note,
            snapshots: snapshot::SnapshotState::new(dir),
            crypt,
        }))
    }

    /// Open snapshot `sel` of the FVD image on `storage` as a read-only
    /// image (`qemu-img convert -l`, `qemu-nbd -l`). `base` is needed when
    /// the snapshot reads from it ([`snapshot::snapshot_needs_base`]).
    pub async fn open_snapshot(
        storage: Arc<dyn Storage>,
        base: Option<Arc<dyn Base>>,
        sel: &snapshot::SnapshotSel,
    ) -> Result<Image> {
        Self::open_snapshot_with_key(storage, base, sel, None).await
    }

    /// [`Image::open_snapshot`] of an encrypted image: `key` is its
    /// passphrase (as [`Image::open_with_key`]).
    pub async fn open_snapshot_with_key(
        storage: Arc<dyn Storage>,
        base: Option<Arc<dyn Base>>,
        sel: &snapshot::SnapshotSel,
        key: Option<&Secret>,
    ) -> Result<Image> {
        let desc = storage.describe();
        let (h, slot) = read_header(storage.as_ref()).await?;
        let crypt = open_crypt(storage.as_ref(), &h, key, &desc).await?;
        let file_len = storage_len(storage.as_ref())?;
        check_length(&desc, &h, file_len)?;
        let capacity = capacity_of(&h, file_len);
        let snaps = snapshot::load(storage.as_ref(), &h, capacity)
            .await
            .map_err(|e| e.context(&desc))?;
        let entry = sel
            .find(&snaps.state.dir().entries)
            .ok_or_else(|| sel.not_found(&desc))?
            .clone();
        let view = snapshot::read_view(storage.as_ref(), &h, capacity, &entry)
            .await
            .map_err(|e| e.context(&desc))?;
        let base_range = if entry.has_bitmap() {
            h.recorded_base_range()
        } else {
            0
        };
        let base = check_base(&desc, &h, base, base_range)?;
        let durable = view.durable();
        let layout = layout_of(&h, &durable.table, capacity, &Default::default())
            .map_err(|e| e.context(&desc))?;
        let base_blocks = durable.bitmap.len();
        let meta = Meta::new(h.clone(), slot, durable);
        Ok(Image::assemble(Parts {
            storage,
            base,
            header: h,
            meta,
            layout,
            base_blocks,
            base_range,
            read_only: true,
            stats: Stats::default(),
            replayed_blocks: 0,
            header_note: None,
            snapshots: snapshot::SnapshotState::new(snaps.state),
            crypt,
        }))
    }

    fn assemble(p: Parts) -> Image {
        Image {
            storage: p.storage,
            base: p.base,
            map: Mapping::new(
                p.header.virtual_size,
                p.header.block_size as u64,
                p.base_blocks,
                p.base_range,
                Some(p.meta),
                p.layout,
            ),
            locks: RangeLocks::default(),
            read_only: p.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats: Arc::new(p.stats),
            cor: cor::CorState::new(
                p.header.flags & header::FLAG_COPY_ON_READ != 0 && !p.read_only,
                p.header.max_cor_bytes,
            ),
            background: std::sync::OnceLock::new(),
            profile: profile::Recorder::default(),
            foreground_ops: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
            snapshots: p.snapshots,
            header: Some(p.header),
            replayed_blocks: p.replayed_blocks,
            header_note: p.header_note,
            crypt: p.crypt,
        }
    }

    /// Serve a raw file through the same interface (no metadata at all).
    pub fn open_raw(storage: Arc<dyn Storage>, opts: OpenOptions) -> Result<Image> {
        let len = storage
            .len()
            .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?;
        Ok(Image {
            storage,
            base: None,
            map: Mapping::new(len, 4096, 0, 0, None, Layout::Linear { data_offset: 0 }),
            locks: RangeLocks::default(),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats: Arc::default(),
            header: None,
            replayed_blocks: 0,
            header_note: None,
            cor: cor::CorState::new(false, 0),
            background: std::sync::OnceLock::new(),
            profile: profile::Recorder::default(),
            foreground_ops: AtomicU64::new(0),
            gate: tokio::sync::RwLock::new(()),
            snapshots: snapshot::SnapshotState::default(),
            crypt: None,
        })
    }
}

/// What an open image is assembled from.
struct Parts {
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
    header: Header,
    meta: Meta,
    layout: Layout,
    base_blocks: u64,
    base_range: u64,
    read_only: bool,
    stats: Stats,
    replayed_blocks: u64,
    header_note: Option<String>,
    snapshots: snapshot::SnapshotState,
    crypt: Option<Encryption>,
}

/// The keys of an encrypted image (`None` for a plain one).
async fn open_crypt(
    storage: &dyn Storage,
    h: &Header,
    key: Option<&Secret>,
    desc: &str,
) -> Result<Option<Encryption>> {
    if h.incompatible & INCOMPAT_ENCRYPTED == 0 {
        return Ok(None);
    }
    Ok(Some(
        Encryption::open(
            storage,
            h.region(Region::KeySlots),
            h.region(Region::Data).offset,
            key,
            desc,
        )
        .await?,
    ))
}

fn storage_len(storage: &dyn Storage) -> Result<u64> {
    storage
        .len()
        .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))
}

/// A file shorter than its data region (sparse layout) is truncated.
fn check_length(desc: &str, h: &Header, file_len: u64) -> Result<()> {
    let data = h.region(Region::Data);
    let needed = data.offset + data.length;
    if file_len < needed {
        return Err(Error::corrupt(format!(
            "{desc}: image is truncated: file is {file_len} bytes, the header needs {needed}"
        )));
    }
    Ok(())
}

/// Whole chunks between the data region's start and the end of the storage.
fn capacity_of(h: &Header, file_len: u64) -> u64 {
    file_len.saturating_sub(h.region(Region::Data).offset) / h.chunk_size as u64
}

/// The base, checked against what the image recorded, when `base_range`
/// needs one.
fn check_base(
    desc: &str,
    h: &Header,
    base: Option<Arc<dyn Base>>,
    base_range: u64,
) -> Result<Option<Arc<dyn Base>>> {
    if base_range == 0 {
        return Ok(None);
    }
    let b = base.ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("{desc}: base image '{}' was not opened", h.base_name),
        )
    })?;
    crate::base::fingerprint::verify_identity(desc, h, b.as_ref())?;
    Ok(Some(b))
}

/// The layout of image-resident bytes: the chunk table (validated) of a
/// compact image, else the linear data region.
fn layout_of(h: &Header, table: &[u32], capacity: u64, snaps: &SnapshotUse) -> Result<Layout> {
    let data = h.region(Region::Data);
    if !h.is_compact() {
        return Ok(Layout::Linear {
            data_offset: data.offset,
        });
    }
    compact::validate_table(table, capacity)?;
    Ok(Layout::Chunked(Box::new(Compact::new(
        h, table, capacity, snaps,
    ))))
}

/// Read the bitmap (and table) and replay the journal if the image is dirty.
pub(super) async fn load_metadata(
    storage: &dyn Storage,
    h: &Header,
) -> Result<(Durable, meta::Replayed)> {
    let bits = h.base_blocks();
    let bitmap = if bits > 0 {
        let bytes = bits.div_ceil(8) as usize;
        let buf = storage
            .read_at(h.region(Region::Bitmap).offset, IoBuf::zeroed(bytes))
            .await
            .map_err(|e| Error::io("read bitmap", e))?;
        expect_len(&buf, bytes, || "read bitmap".into())?;
        AtomicBitmap::from_bytes(bits, &buf)?
    } else {
        AtomicBitmap::new(0)
    };
    let table = read_table(storage, h).await?;
    let mut durable = Durable::new(bitmap, table);
    if h.is_clean() {
        return Ok((durable, meta::Replayed::default()));
    }
    let replayed = meta::replay(storage, h, &mut durable).await?;
    Ok((durable, replayed))
}

/// Make sure writes into the journal can never fail for lack of space:
/// allocate its region (images created before the journal was written at
/// create time have holes there). Content is untouched.
async fn reserve_metadata(storage: &dyn Storage, h: &Header) -> Result<()> {
    let j = h.region(Region::Journal);
    match storage.preallocate(j.offset, j.length).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(Error::io("allocate the journal region", e)),
    }
}

/// Read the on-disk chunk table (empty for the sparse layout).
pub(crate) async fn read_table(storage: &dyn Storage, h: &Header) -> Result<Vec<u32>> {
    if h.incompatible & INCOMPAT_COMPACT == 0 {
        return Ok(Vec::new());
    }
    let bytes = (h.virtual_size.div_ceil(h.chunk_size as u64) * 4) as usize;
    let buf = storage
        .read_at(h.region(Region::Table).offset, IoBuf::zeroed(bytes))
        .await
        .map_err(|e| Error::io(format!("{}: read chunk table", storage.describe()), e))?;
    expect_len(&buf, bytes, || "read chunk table".into())?;
    Ok(buf
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Read and validate the header in force of an image (docs/FORMAT.md §2:
/// the newest valid slot, unless the journal proves a damaged slot newer).
pub async fn read_header(storage: &dyn Storage) -> Result<(Header, usize)> {
    let hf = meta::header_in_force(storage).await?;
    Ok((hf.header, hf.slot))
}
