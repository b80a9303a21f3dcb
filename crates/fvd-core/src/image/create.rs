//! Creating an image: the layout of a new file, zero detection of the
//! base, and the empty metadata written before the header.

use crate::base::Base;
use crate::crypt::{MasterKey, Secret, luks};
use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{self, FLAG_ZERO_DETECTED, HEADER_AREA, Header, Preallocation, Region};
use crate::format::layout::{CreateLayout, compute_layout};
use crate::iobuf::IoBuf;
use crate::storage::{Storage, write_zeros};

/// What a new image should look like.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Virtual size; defaults to the base size.
    pub size: Option<u64>,
    /// Base name as recorded in the header, and its format.
    pub base: Option<(String, Format)>,
    /// Bytes per bitmap bit.
    pub block_size: Option<u32>,
    /// Journal size in bytes.
    pub journal_size: Option<u64>,
    /// Scan the base and mark zero-filled blocks local at create.
    pub detect_zeroes: bool,
    /// Default copy-on-read setting recorded in the image.
    pub copy_on_read: bool,
    /// Use the chunk table (compact image).
    pub compact: bool,
    /// Bytes per chunk (compact images).
    pub chunk_size: Option<u32>,
    /// Growth step of compact images on files.
    pub grow_unit: Option<u64>,
    /// Command growing a block device: `{path}` and `{bytes}` are substituted.
    pub grow_cmd: Option<String>,
    /// What to allocate ahead of the data (`-o preallocation=`).
    pub preallocation: Preallocation,
    /// Record a fingerprint of the base's content in the base validator,
    /// checked by the opener at every open (docs/FORMAT.md §2.7).
    /// [`crate::Opener::create`] sets it for bases named by a path; remote
    /// bases have validators of their own.
    pub fingerprint_base: bool,
    /// Encrypt the data (LUKS1 key slots, AES-256-XTS).
    pub encryption: Option<CreateEncryption>,
}

/// How a new encrypted image's first key slot is made.
#[derive(Debug, Clone)]
pub struct CreateEncryption {
    /// The passphrase of key slot 0.
    pub secret: Secret,
    /// PBKDF2 iterations of the slot (see `crypt::luks::iterations_for`).
    pub iterations: u32,
}

/// Create an image on empty `storage`. `base` must be the opened base when
/// `opts.base` is set.
pub async fn create(
    storage: &dyn Storage,
    opts: &CreateOptions,
    base: Option<&dyn Base>,
) -> Result<Header> {
    let base_size = base.map(|b| b.size()).unwrap_or(0);
    let size = match (opts.size, base) {
        (Some(s), _) => s,
        (None, Some(b)) => b.size().div_ceil(512) * 512,
        (None, None) => {
            return Err(Error::arg(
                "an image size is required when there is no base",
            ));
        }
    };
    let layout = CreateLayout {
        virtual_size: size,
        base: match (&opts.base, base) {
            (Some((name, fmt)), Some(b)) => {
                let validator =
                    crate::base::fingerprint::validator(b, opts.fingerprint_base).await?;
                Some((name.clone(), *fmt, base_size, validator))
            }
            (Some(_), None) => return Err(Error::arg("base named but not opened")),
            _ => None,
        },
        block_size: opts.block_size,
        journal_size: opts.journal_size,
        compact: opts.compact,
        chunk_size: opts.chunk_size,
        encrypted: opts.encryption.is_some(),
    };
    let mut h = compute_layout(&layout)?;
    h.preallocation = opts.preallocation;
    if opts.copy_on_read {
        h.flags |= header::FLAG_COPY_ON_READ;
    }
    if let Some(g) = opts.grow_unit {
        h.grow_unit = g;
    }
    if let Some(cmd) = &opts.grow_cmd {
        if cmd.len() > header::MAX_GROW_CMD {
            return Err(Error::arg("grow_cmd is longer than 1024 bytes"));
        }
        h.grow_cmd = cmd.clone();
    }
    let bitmap = AtomicBitmap::new(h.base_blocks());
    if let (true, Some(b)) = (opts.detect_zeroes, base) {
        mark_zero_blocks(b, &bitmap, h.block_size as u64, h.base_range()).await?;
        if bitmap.count_ones() > 0 {
            h.flags |= FLAG_ZERO_DETECTED;
        }
    }
    let io = |what: &'static str| move |e| Error::io(format!("{}: {what}", storage.describe()), e);
    let data = h.region(Region::Data);
    let identity = h.is_compact() && opts.preallocation == Preallocation::Metadata;
    // Compact images with `metadata`: every chunk mapped in place.
    let data_len = if identity {
        h.virtual_size.div_ceil(h.chunk_size as u64) * h.chunk_size as u64
    } else {
        data.length
    };
    let len = storage.len().map_err(io("size"))?;
    let want = data.offset + data_len;
    if len < want && opts.compact {
        storage.set_len(want).await.map_err(io("set size"))?;
    } else if len < want {
        crate::storage::limit::grow_sparse_file(storage, want, size).await?;
    }
    // Reserved regions start out as holes (zeros).
    for r in [
        Region::Snapshots,
        Region::Refcounts,
        Region::KeySlots,
        Region::Profile,
    ] {
        let e = h.region(r);
        storage
            .discard(e.offset, e.length)
            .await
            .map_err(io("clear metadata"))?;
    }
    // The journal and the bitmap are written (zeros), not left as holes:
    // a journal write then never allocates storage — it cannot fail for
    // lack of space, and a flush commits no file-system metadata for it.
    let j = h.region(Region::Journal);
    write_zeros(storage, j.offset..j.end())
        .await
        .map_err(io("write journal"))?;
    let bm = h.region(Region::Bitmap);
    if bm.length > 0 {
        let bytes = bitmap.to_bytes(bm.length as usize);
        storage
            .write_at(bm.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(io("write bitmap"))?;
    }
    if let Some(enc) = &opts.encryption {
        // A fresh master key in slot 0 of a LUKS1 header (key material
        // is random to anyone without the passphrase; the rest of the
        // region stays a hole).
        let mk = MasterKey::generate()?;
        let area = luks::format(&mk, enc.secret.expose(), enc.iterations)?;
        storage
            .write_at(
                h.region(Region::KeySlots).offset,
                IoBuf::from_slice(&area),
                false,
            )
            .await
            .map_err(io("write key slots"))?;
    }
    let t = h.region(Region::Table);
    if t.length > 0 {
        let chunks = h.virtual_size.div_ceil(h.chunk_size as u64);
        let mut bytes = vec![0xffu8; t.length as usize];
        if identity {
            for c in 0..chunks as usize {
                bytes[c * 4..c * 4 + 4].copy_from_slice(&(c as u32).to_le_bytes());
            }
        }
        storage
            .write_at(t.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(io("write chunk table"))?;
    }
    if !h.is_compact() {
        // The sparse layout: the data region, allocated or written ahead.
        match opts.preallocation {
            Preallocation::Falloc => storage
                .preallocate(data.offset, data.length)
                .await
                .map_err(io("preallocate the data region"))?,
            Preallocation::Full => write_zeros(storage, data.offset..data.end())
                .await
                .map_err(io("write the data region"))?,
            Preallocation::Off | Preallocation::Metadata => {}
        }
    }
    let mut area = vec![0u8; HEADER_AREA as usize];
    area[..header::HEADER_SLOT_SIZE].copy_from_slice(&h.encode());
    storage
        .write_at(0, IoBuf::from_slice(&area), false)
        .await
        .map_err(io("write header"))?;
    storage.flush().await.map_err(io("flush"))?;
    Ok(h)
}

pub(super) async fn mark_zero_blocks(
    base: &dyn Base,
    bitmap: &AtomicBitmap,
    bs: u64,
    range: u64,
) -> Result<()> {
    // Ask for the allocation map in large windows (a sparse base answers
    // with a few runs), mark the blocks of holes at once, and read only the
    // data runs to look for zero-filled blocks.
    const WINDOW: u64 = 64 << 30;
    const STEP: u64 = 4 << 20;
    let step = STEP.max(bs) / bs * bs;
    let err = |what: &'static str| move |e| Error::io(format!("{}: {what}", base.describe()), e);
    let mut pos = 0;
    while pos < range {
        let wlen = WINDOW.min(range - pos);
        let runs = base
            .allocation(pos, wlen)
            .await
            .map_err(err("block status"))?;
        let mut p = pos;
        for run in runs {
            let (s, e) = (p, (p + run.length).min(pos + wlen));
            p = e;
            if s >= e {
                continue;
            }
            if !run.data {
                // Whole blocks inside the hole; partial ones are settled below
                // only if their data part reads as zeros too.
                let (b0, b1) = (s.div_ceil(bs), e / bs);
                if b0 < b1 {
                    bitmap.set_range(b0..b1);
                }
                for blk in [s / bs, e.saturating_sub(1) / bs] {
                    let (bs0, be) = (blk * bs, ((blk + 1) * bs).min(range));
                    if (bs0 < s || be > e) && block_is_zero(base, bs0, be).await? {
                        bitmap.set(blk);
                    }
                }
                continue;
            }
            // Data run: read it a step at a time, aligned to blocks.
            let mut q = s / bs * bs;
            while q < e {
                let len = step.min(((e.div_ceil(bs) * bs).min(range)) - q);
                let buf = base
                    .read_at(q, IoBuf::zeroed(len as usize))
                    .await
                    .map_err(err("read"))?;
                if buf.len() as u64 != len {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("{}: short read at offset {q}", base.describe()),
                    ));
                }
                for blk in q / bs..(q + len).div_ceil(bs) {
                    let (bs0, be) = ((blk * bs).max(q), ((blk + 1) * bs).min(q + len));
                    if crate::iobuf::is_zero(&buf[(bs0 - q) as usize..(be - q) as usize]) {
                        bitmap.set(blk);
                    }
                }
                q += len;
            }
        }
        pos += wlen;
    }
    Ok(())
}

/// True if the base reads as zeros over `[s, e)`.
pub(super) async fn block_is_zero(base: &dyn Base, s: u64, e: u64) -> Result<bool> {
    let buf = base
        .read_at(s, IoBuf::zeroed((e - s) as usize))
        .await
        .map_err(|er| Error::io(format!("{}: read", base.describe()), er))?;
    Ok(buf.len() as u64 == e - s && buf.is_zero())
}
