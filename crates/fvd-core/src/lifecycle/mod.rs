//! Image lifecycle operations in qemu-img's vocabulary: `resize`, `commit`,
//! `rebase`, `amend`.
//!
//! # One commit point per operation: the header switch
//! Every operation has the same shape:
//!
//! 1. open the image through the engine (a dirty journal is replayed) and
//!    do the data work that keeps the guest's view: copy-on-write of a block
//!    that will change meaning, copies between layers, moving chunks. These
//!    are ordinary engine writes, journaled and flushed as always, so a
//!    crash here leaves the old image, its content unchanged;
//! 2. close it cleanly (a checkpoint: bitmap and table in place, clean flag);
//! 3. write the new bitmap and chunk table into space the current header
//!    does not use ([`space`]), fdatasync;
//! 4. **switch the header**: write the new header (new size, base, regions,
//!    next journal epoch, clean) into the other header slot, fdatasync. This
//!    is the commit point: a crash before it leaves the old image, after it
//!    the new one (a torn header write leaves the other slot in force);
//! 5. give back space nothing refers to any more (punch, truncate). A crash
//!    here only leaves space that `fvd check` reports as leaked.
//!
//! Metadata is never edited in place while the header that uses it is in
//! force — with one exception that header ignores: chunk-table entries past
//! the number of chunks of the current size (docs/FORMAT.md §4.2).
//!
//! `commit` writes into the base too; docs/ARCHITECTURE.md states each
//! operation's crash safety.

pub mod amend;
pub mod commit;
pub mod rebase;
pub mod resize;
pub mod space;

use std::path::Path;
use std::sync::Arc;

use crate::base::Base;
use crate::error::{Error, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{self, FLAG_CLEAN, HEADER_SLOT_SIZE, Header, INCOMPAT_COMPACT, Region};
use crate::image::{Image, OpenOptions, read_header};
use crate::iobuf::IoBuf;
use crate::open::{Location, Opener};
use crate::storage::file::FileOptions;
use crate::storage::{CacheMode, FileStorage, Storage};

/// The durable metadata of a cleanly closed image.
pub(crate) struct Clean {
    /// The header in force.
    pub header: Header,
    /// Its slot.
    pub slot: usize,
    /// The bitmap (`base_blocks` bits).
    pub bitmap: AtomicBitmap,
    /// The chunk table (compact images; else empty).
    pub table: Vec<u32>,
}

/// Read the metadata of a clean image.
pub(crate) async fn read_clean(storage: &dyn Storage) -> Result<Clean> {
    let (header, slot) = read_header(storage).await?;
    if !header.is_clean() {
        return Err(Error::invalid(format!(
            "{}: image is not clean after close",
            storage.describe()
        )));
    }
    let bits = header.base_blocks();
    let bitmap = if bits > 0 {
        let n = bits.div_ceil(8) as usize;
        let buf = storage
            .read_at(header.region(Region::Bitmap).offset, IoBuf::zeroed(n))
            .await
            .map_err(|e| Error::io(format!("{}: read bitmap", storage.describe()), e))?;
        AtomicBitmap::from_bytes(bits, &buf)?
    } else {
        AtomicBitmap::new(0)
    };
    let table = crate::image::read_table(storage, &header).await?;
    Ok(Clean {
        header,
        slot,
        bitmap,
        table,
    })
}

/// Refuse `op` on an image the lifecycle operations do not handle yet: an
/// encrypted one (its sectors are encrypted with tweaks of where they lie
/// in the data region, docs/FORMAT.md §9, and the operations that move or
/// copy data do not carry keys), or one with internal snapshots (their
/// tables and chunks are not carried over, §10).
pub(crate) fn refuse_unsupported(h: &Header, desc: &str, op: &str) -> Result<()> {
    let what = if h.incompatible & header::INCOMPAT_ENCRYPTED != 0 {
        "an encrypted image"
    } else if h.incompatible & header::INCOMPAT_SNAPSHOTS != 0 {
        "an image with internal snapshots"
    } else {
        return Ok(());
    };
    Err(Error::new(
        crate::error::ErrorKind::Unsupported,
        format!("{desc}: {op} of {what} is not supported yet"),
    ))
}

/// The metadata an operation wants in force after its switch.
pub(crate) struct Target {
    /// The new header: size, base fields, flags, data region, options. Its
    /// bitmap and table regions are decided by [`switch`].
    pub header: Header,
    /// The new bitmap (`header.base_blocks()` bits), or `None` to keep the
    /// old one as it is.
    pub bitmap: Option<AtomicBitmap>,
    /// The new chunk table (one entry per chunk of the new size), or `None`
    /// to keep the old one.
    pub table: Option<Vec<u32>>,
}

/// A bitmap of `bits` bits carrying the bits of `old` it shares, and with
/// every bit past `old`'s end set: blocks that become part of the base
/// range whose data the image holds (past its old base range, or all of an
/// image whose base was detached).
pub(crate) fn carry_bits(old: &AtomicBitmap, bits: u64) -> AtomicBitmap {
    let bm = AtomicBitmap::new(bits);
    for (s, e, set) in old.runs(0..old.len().min(bits)) {
        if set {
            bm.set_range(s..e);
        }
    }
    if bits > old.len() {
        bm.set_range(old.len()..bits);
    }
    bm
}

/// Switch to `header` with the old bitmap and table (header fields only).
pub(crate) async fn switch_header(
    storage: &dyn Storage,
    old: &Clean,
    header: Header,
) -> Result<Header> {
    let target = Target {
        header,
        bitmap: None,
        table: None,
    };
    switch(storage, old, target).await
}

fn round4k(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

fn io<'a>(
    storage: &'a dyn Storage,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(format!("{}: {what}", storage.describe()), e)
}

/// Steps 3 to 5 of the module docs: write the new metadata where the old
/// header does not look, switch the header, give back the old regions.
/// `old` must be what [`read_clean`] returned for the same storage.
pub(crate) async fn switch(storage: &dyn Storage, old: &Clean, target: Target) -> Result<Header> {
    let oh = &old.header;
    let mut nh = target.header;
    // The regions to write, and whether each can stay where it is.
    let bitmap = target.bitmap.filter(|bm| {
        nh.base_blocks() != oh.base_blocks()
            || oh.region(Region::Bitmap).length < nh.base_blocks().div_ceil(8)
            || bm.to_bytes(bm.len().div_ceil(8) as usize)
                != old.bitmap.to_bytes(bm.len().div_ceil(8) as usize)
    });
    let shifted = nh.region(Region::Data).offset != oh.region(Region::Data).offset;
    let mut table_in_place: Option<(u64, Vec<u32>)> = None;
    let mut table_moved: Option<Vec<u32>> = None;
    if let Some(t) = target.table {
        let n_old = old.table.len();
        let fits = t.len() as u64 * 4 <= oh.region(Region::Table).length;
        let keeps = t.len() >= n_old && t[..n_old] == old.table[..];
        if fits && !shifted && (keeps || t.len() < n_old && t[..] == old.table[..t.len()]) {
            // Only entries the old header ignores change (growth), or none.
            if t.len() > n_old {
                table_in_place = Some((n_old as u64, t[n_old..].to_vec()));
            }
        } else {
            table_moved = Some(t);
        }
    }
    let mut wanted = Vec::new();
    if let Some(bm) = &bitmap {
        wanted.push((Region::Bitmap, round4k(bm.len().div_ceil(8))));
    }
    if let Some(t) = &table_moved {
        // The region must also hold every physical chunk number in use
        // (docs/FORMAT.md §4.2): after a shrink they may exceed the entries.
        let high = crate::image::reclaim::high_water(t);
        wanted.push((Region::Table, round4k((t.len() as u64).max(high) * 4)));
    }
    if !wanted.is_empty() && space::place(oh, &mut nh, &wanted)? != space::Placement::Placed {
        return Err(Error::new(
            crate::error::ErrorKind::NoSpace,
            format!(
                "{}: no room for the new metadata (the data region was not moved)",
                storage.describe()
            ),
        ));
    }
    // Step 3: the new regions, then fdatasync.
    if let Some(bm) = &bitmap {
        let r = nh.region(Region::Bitmap);
        if r.length > 0 {
            let bytes = bm.to_bytes(r.length as usize);
            storage
                .write_at(r.offset, IoBuf::from_slice(&bytes), false)
                .await
                .map_err(io(storage, "write bitmap"))?;
        }
    }
    if let Some(t) = &table_moved {
        let r = nh.region(Region::Table);
        let bytes = crate::meta::table_bytes(t, 0, r.length as usize);
        storage
            .write_at(r.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(io(storage, "write chunk table"))?;
    }
    if let Some((first, entries)) = &table_in_place {
        let r = nh.region(Region::Table);
        let bytes = crate::meta::table_bytes(entries, 0, entries.len() * 4);
        storage
            .write_at(r.offset + first * 4, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(io(storage, "write chunk table"))?;
    }
    let wrote = bitmap.is_some() || table_moved.is_some() || table_in_place.is_some();
    if nh.region(Region::Journal) != oh.region(Region::Journal) {
        // A journal that gave up its tail: nothing of the new epoch may be
        // found in it (epochs only grow, but be certain).
        let j = nh.region(Region::Journal);
        storage
            .discard(j.offset, j.length)
            .await
            .map_err(io(storage, "clear journal"))?;
    }
    if wrote {
        storage.flush().await.map_err(io(storage, "flush"))?;
    }
    // Step 4: the header switch.
    nh.generation = oh.generation + 1;
    nh.journal_epoch = oh.journal_epoch.wrapping_add(1);
    nh.flags |= FLAG_CLEAN;
    nh.validate()
        .map_err(|e| e.context(format!("{}: new header", storage.describe())))?;
    let slot = 1 - old.slot;
    storage
        .write_at(
            (slot * HEADER_SLOT_SIZE) as u64,
            IoBuf::from_slice(&nh.encode()),
            false,
        )
        .await
        .map_err(io(storage, "header write"))?;
    storage.flush().await.map_err(io(storage, "flush"))?;
    // Step 5: regions nothing uses any more (best effort: leaks at worst).
    for r in [Region::Bitmap, Region::Table] {
        let (o, n) = (oh.region(r), nh.region(r));
        if o.length > 0 && o != n && !overlaps_any(&nh, o) {
            let _ = storage.discard(o.offset, o.length).await;
        }
    }
    Ok(nh)
}

/// True if `e` overlaps a region of `h` other than the data region.
fn overlaps_any(h: &Header, e: header::Extent) -> bool {
    Region::ALL.iter().any(|&r| {
        let x = h.region(r);
        r != Region::Data && x.length > 0 && x.offset < e.end() && e.offset < x.end()
    })
}

/// `e`, naming `path` unless its message already does.
pub(crate) fn named(path: &Path, e: Error) -> Error {
    let p = path.display().to_string();
    if e.message().starts_with(&p) || e.message().contains(&format!("{p}:")) {
        e
    } else {
        e.context(p)
    }
}

/// True for compact images.
pub(crate) fn is_compact(h: &Header) -> bool {
    h.incompatible & INCOMPAT_COMPACT != 0
}

/// Open the storage of an FVD image file read-write, exclusively locked
/// (the lock is held for the whole operation, through the engine's open and
/// close and the header switch).
pub(crate) fn open_image_storage(path: &Path) -> Result<Arc<dyn Storage>> {
    let fo = FileOptions {
        write: true,
        create: false,
        cache: CacheMode::Writeback,
        lock: true,
    };
    Ok(Arc::new(FileStorage::open(path, fo)?))
}

/// Open the base named in `h` (of the image at `path`) read-only through
/// `opener`, and check it is the base `h` recorded (size, validator,
/// content fingerprint) as the opener does for every image it opens.
pub(crate) async fn open_recorded_base(
    opener: &Opener,
    path: &Path,
    h: &Header,
) -> Result<Option<Arc<dyn Base>>> {
    let Some((name, format)) = h.base().filter(|_| h.base_range() > 0) else {
        return Ok(None);
    };
    let here = Location::Path(path.to_path_buf());
    let base = opener
        .open_named(&here, name, format, 1)
        .await
        .map_err(|e| e.context(format!("{}: base", path.display())))?;
    crate::base::fingerprint::verify(&path.display().to_string(), h, base.as_ref()).await?;
    Ok(Some(base))
}

/// The local path of the base `name` of the image at `path`, if local.
pub(crate) fn local_base_path(
    opener: &Opener,
    path: &Path,
    name: &str,
) -> Option<std::path::PathBuf> {
    match opener.resolve(&Location::Path(path.to_path_buf()), name) {
        Ok(Location::Path(p)) => Some(p),
        _ => None,
    }
}

/// Open the image on `storage` through the engine, read-write.
pub(crate) async fn open_engine(
    storage: &Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
) -> Result<Image> {
    Image::open(storage.clone(), base, OpenOptions::default()).await
}
