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
    self, HEADER_AREA, Header, INCOMPAT_COMPACT, INCOMPAT_ENCRYPTED, INCOMPAT_SNAPSHOTS, Region,
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
        let (h, slot) = read_header(storage.as_ref()).await?;
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
            crate::base::fingerprint::verify_identity(&desc, &h, b.as_ref())?;
            Some(b)
        } else {
            None
        };
        let (mut durable, replay_blocks, replay_records) = load_metadata(storage.as_ref(), &h)
            .await
            .map_err(|e| e.context(&desc))?;
        let stats = Stats::default();
        stats
            .replayed_records
            .store(replay_records, Ordering::Relaxed);
        let layout = if is_compact {
            let cs = h.chunk_size as u64;
            let capacity = file_len.saturating_sub(data.offset) / cs;
            let phys_limit = h.region(Region::Table).length / 4;
            compact::validate_table(&durable.table, capacity, phys_limit)
                .map_err(|e| e.context(&desc))?;
            Layout::Chunked(Compact::new(
                &durable.table,
                cs,
                data.offset,
                capacity,
                phys_limit,
                h.grow_unit,
                h.grow_cmd.clone(),
            ))
        } else {
            durable.table.clear();
            Layout::Linear {
                data_offset: data.offset,
            }
        };
        let dirty = !h.is_clean();
        let meta = Meta::new(h.clone(), slot, durable);
        if dirty && !opts.read_only {
            let mut st = meta.commit.lock().await;
            meta::checkpoint(&mut st, storage.as_ref(), &stats, true)
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
            replayed_blocks: replay_blocks,
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
) -> Result<(Durable, u64, u64)> {
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
        return Ok((durable, 0, 0));
    }
    let replay = meta::read_journal(storage, h).await?;
    for r in &replay.records {
        durable.apply(r)?;
    }
    Ok((durable, replay.blocks, replay.records.len() as u64))
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

/// Read and validate the newest header of an image.
pub async fn read_header(storage: &dyn Storage) -> Result<(Header, usize)> {
    let desc = storage.describe();
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{desc}: size"), e))?;
    if len < header::HEADER_SLOT_SIZE as u64 {
        return Err(Error::invalid(format!(
            "{desc}: not an FVD image (file is only {len} bytes)"
        )));
    }
    let buf = storage
        .read_at(0, IoBuf::zeroed(HEADER_AREA as usize))
        .await
        .map_err(|e| Error::io(format!("{desc}: read header"), e))?;
    header::decode_slots(&buf).map_err(|e| e.context(&desc))
}
