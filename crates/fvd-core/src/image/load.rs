//! Opening an image: the header, the bitmap and chunk table, and the
//! replay of a journal left by a crash.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::compact::{self, Compact};
use super::encrypt::Encryption;
use super::map::{Layout, Mapping};
use super::rangelock::RangeLocks;
use super::{Image, OpenOptions, cor, expect_len, prefetch, profile};
use crate::base::Base;
use crate::crypt::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{
    self, Header, INCOMPAT_COMPACT, INCOMPAT_ENCRYPTED, INCOMPAT_SNAPSHOTS, Region,
};
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
        let (h, slot) = (hf.header, hf.slot);
        let unsupported = h.incompatible & INCOMPAT_SNAPSHOTS;
        if unsupported != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{desc}: image uses features {unsupported:#x} (snapshots) not supported by this build"
                ),
            ));
        }
        // Keys first: a wrong passphrase must fail before a replay writes.
        let crypt = if h.incompatible & INCOMPAT_ENCRYPTED != 0 {
            Some(
                Encryption::open(
                    storage.as_ref(),
                    h.region(Region::KeySlots),
                    h.region(Region::Data).offset,
                    key,
                    &desc,
                )
                .await?,
            )
        } else {
            None
        };
        let is_compact = h.incompatible & INCOMPAT_COMPACT != 0;
        let data = h.region(Region::Data);
        let file_len = storage
            .len()
            .map_err(|e| Error::io(format!("{desc}: size"), e))?;
        let needed = data.offset + data.length;
        if file_len < needed {
            return Err(Error::corrupt(format!(
                "{desc}: image is truncated: file is {file_len} bytes, the header needs {needed}"
            )));
        }
        let base_range = h.base_range();
        let base = if base_range > 0 {
            let b = base.ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("{desc}: base image '{}' was not opened", h.base_name),
                )
            })?;
            if b.size() != h.base_size {
                return Err(Error::invalid(format!(
                    "{desc}: base image '{}' changed: it was {} bytes at create time and is {} now",
                    b.describe(),
                    h.base_size,
                    b.size()
                )));
            }
            let now = b.validator();
            if !h.base_validator.is_empty() && now != h.base_validator {
                return Err(Error::invalid(format!(
                    "{desc}: base image '{}' changed: it was '{}' at create time and is '{now}' now",
                    b.describe(),
                    h.base_validator
                )));
            }
            Some(b)
        } else {
            None
        };
        let (mut durable, replayed) = load_metadata(storage.as_ref(), &h)
            .await
            .map_err(|e| e.context(&desc))?;
        let stats = Stats::default();
        stats
            .replayed_records
            .store(replayed.records, Ordering::Relaxed);
        stats
            .replay_dropped
            .store(replayed.dropped, Ordering::Relaxed);
        let layout = if is_compact {
            let cs = h.chunk_size as u64;
            let capacity = file_len.saturating_sub(data.offset) / cs;
            compact::validate_table(&durable.table, capacity).map_err(|e| e.context(&desc))?;
            Layout::Chunked(Compact::new(
                &durable.table,
                cs,
                data.offset,
                capacity,
                h.grow_unit,
                h.grow_cmd.clone(),
                h.preallocation,
            ))
        } else {
            durable.table.clear();
            Layout::Linear {
                data_offset: data.offset,
            }
        };
        let dirty = !h.is_clean();
        if !opts.read_only {
            reserve_metadata(storage.as_ref(), &h)
                .await
                .map_err(|e| e.context(&desc))?;
        }
        let meta = Meta::new(h.clone(), slot, durable);
        if dirty && !opts.read_only {
            let mut st = meta.commit.lock().await;
            meta::checkpoint_now(&mut st, storage.as_ref(), &stats, true)
                .await
                .map_err(|e| e.context(&desc))?;
        }
        Ok(Image {
            storage,
            base,
            map: Mapping::new(
                h.virtual_size,
                h.block_size as u64,
                h.base_blocks(),
                base_range,
                Some(meta),
                layout,
            ),
            locks: RangeLocks::default(),
            read_only: opts.read_only,
            closed: AtomicBool::new(false),
            raw_dirty: AtomicBool::new(false),
            stats,
            cor: cor::CorState::new(
                h.flags & header::FLAG_COPY_ON_READ != 0 && !opts.read_only,
                h.max_cor_bytes,
            ),
            background: std::sync::OnceLock::new(),
            profile: profile::Recorder::default(),
            foreground_ops: AtomicU64::new(0),
            latency: prefetch::LatencyWatch::default(),
            header: Some(h),
            replayed_blocks: replayed.blocks,
            header_note: hf.note,
            crypt,
        })
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
            stats: Stats::default(),
            header: None,
            replayed_blocks: 0,
            header_note: None,
            cor: cor::CorState::new(false, 0),
            background: std::sync::OnceLock::new(),
            profile: profile::Recorder::default(),
            foreground_ops: AtomicU64::new(0),
            latency: prefetch::LatencyWatch::default(),
            crypt: None,
        })
    }
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
        expect_len(&buf, bytes, "read bitmap")?;
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
    expect_len(&buf, bytes, "read chunk table")?;
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
