//! `resize`: change the virtual size (qemu-img resize).
//!
//! Growing: the new space reads as zeros — also where the image was smaller
//! than its base and grows over it, as qemu-img does for an overlay (the
//! bits of those blocks are set, the image's zeros hide the base). Beyond
//! the base the new space costs nothing. The block holding the old end of
//! a base range is first made local (copy-on-write of its old part), since
//! its bit comes to cover more. Sparse layout: the file grows (holes); a
//! block device must already be large enough, or be grown by `grow_cmd`.
//! Compact: the chunk table gains entries — in place when its region has
//! room (entries past the old count are ignored by the old header), else in
//! new space (`super::space`) — and the tail of the chunk that held the
//! old end is zeroed.
//!
//! Shrinking (`shrink` set, as qemu-img's `--shrink`): the header switch
//! drops everything past the new end; afterwards the file is truncated (or
//! the dropped chunks punched). No data moves.

use std::path::Path;
use std::sync::Arc;

use super::space::{self, Placement};
use super::{Clean, Target, open_engine, read_clean, switch};
use crate::base::Base;
use crate::error::{Error, Result};
use crate::format::header::{Header, MAX_VIRTUAL_SIZE, Region};
use crate::image::compact::EMPTY;
use crate::image::read_header;
use crate::open::Opener;
use crate::storage::Storage;

/// What `resize` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resized {
    /// The size before.
    pub old_size: u64,
    /// The size now.
    pub new_size: u64,
    /// Bytes the data region's start moved by to make room (compact images).
    pub data_shift: u64,
}

/// Check a requested size.
pub fn check_size(old: u64, new: u64, shrink: bool) -> Result<()> {
    if !new.is_multiple_of(512) {
        return Err(Error::arg(format!("size {new} is not a multiple of 512")));
    }
    if new > MAX_VIRTUAL_SIZE {
        return Err(Error::arg(format!("size {new} is too large (max 2^62)")));
    }
    if new < old && !shrink {
        return Err(Error::arg(
            "use --shrink to shrink the image (the data past the new end is lost)",
        ));
    }
    Ok(())
}

/// The header of the image at `new_size`, before regions are placed.
fn resized_header(h: &Header, new_size: u64) -> Header {
    let mut n = h.clone();
    n.virtual_size = new_size;
    if !super::is_compact(h) {
        n.regions[Region::Data as usize].length = new_size;
    }
    n
}

/// Resize the FVD image on `storage` (with its base) to `new_size`.
///
/// A compact image whose chunk table cannot be placed at once grows in
/// steps, each a complete resize (its own header switch): a step grows as
/// far as the metadata area allows, or moves the data region's start to
/// make room (as far as free chunks allow moving the first ones away).
pub async fn resize(
    storage: Arc<dyn Storage>,
    base: Option<Arc<dyn Base>>,
    new_size: u64,
    shrink: bool,
) -> Result<Resized> {
    let (h, _) = read_header(storage.as_ref()).await?;
    super::refuse_unsupported(&h, &storage.describe(), "resize")?;
    let old_size = h.virtual_size;
    check_size(old_size, new_size, shrink)?;
    let mut done = Resized {
        old_size,
        new_size,
        data_shift: 0,
    };
    loop {
        let (size, shift) = step(&storage, &base, new_size).await?;
        done.data_shift += shift;
        if size == new_size {
            return Ok(done);
        }
    }
}

/// Can the image with header `eh` have size `v` (its data region moved by
/// `shift`) with its new metadata placed in the metadata area?
fn fits(eh: &Header, v: u64, shift: u64, max_phys: u64) -> bool {
    let mut trial = resized_header(eh, v);
    trial.regions[Region::Data as usize].offset += shift;
    let w = wanted(eh, &trial, shift, max_phys);
    space::place(eh, &mut trial, &w).is_ok_and(|p| p == Placement::Placed)
}

/// The regions a resize from `eh` to `nh` writes anew, with their sizes.
fn wanted(eh: &Header, nh: &Header, shift: u64, max_phys: u64) -> Vec<(Region, u64)> {
    let mut w = Vec::new();
    if nh.base_blocks() != eh.base_blocks() {
        w.push((Region::Bitmap, nh.base_blocks().div_ceil(8)));
    }
    if super::is_compact(eh) {
        let n = nh.virtual_size.div_ceil(nh.chunk_size as u64);
        let k = shift / eh.chunk_size as u64;
        let entries = n.max(max_phys.saturating_sub(k));
        if shift > 0 || entries * 4 > eh.region(Region::Table).length {
            w.push((Region::Table, entries * 4));
        }
    }
    w
}

/// One resize toward `goal`: returns the size reached and the bytes the
/// data region's start moved by.
async fn step(
    storage: &Arc<dyn Storage>,
    base: &Option<Arc<dyn Base>>,
    goal: u64,
) -> Result<(u64, u64)> {
    let img = open_engine(storage, base.clone()).await?;
    let eh = img
        .header()
        .cloned()
        .ok_or_else(|| Error::arg("not an FVD image"))?;
    let cur = eh.virtual_size;
    let table = img.chunk_table().unwrap_or_default();
    let allocated = table.iter().filter(|&&p| p != EMPTY).count() as u64;
    let max_phys = crate::image::reclaim::high_water(&table);
    let (mut size, mut shift) = (goal, 0);
    if cur != goal && !fits(&eh, goal, 0, max_phys) {
        if !super::is_compact(&eh) {
            // A sparse image: `switch` reports what does not fit.
        } else {
            (size, shift) = plan_compact_step(&eh, cur, goal, allocated, max_phys)?;
        }
    }
    if size == cur && shift == 0 {
        img.close().await?;
        return Ok((cur, 0));
    }
    let nh = resized_header(&eh, size);
    let bs = eh.block_size as u64;
    let (r_old, r_new) = (eh.base_range(), nh.base_range());
    if r_new > r_old && !r_old.is_multiple_of(bs) {
        // The block holding the old end of the base range comes to cover
        // more of the disk: copy its old part in, so it is wholly local.
        let b = r_old / bs;
        img.fill_blocks(b..b + 1, None, true).await?;
        img.flush().await?;
    }
    if shift > 0 {
        img.vacate_low_chunks(shift / eh.chunk_size as u64).await?;
    }
    img.close().await?;
    drop(img);
    let old = read_clean(storage.as_ref()).await?;
    let target = target(&old, size, shift)?;
    prepare_new_space(storage.as_ref(), &old, size).await?;
    let nh = switch(storage.as_ref(), &old, target).await?;
    if size < cur {
        give_back(storage.as_ref(), &old, &nh).await;
    }
    Ok((size, shift))
}

/// The next step of a compact image from `cur` toward `goal` when the goal
/// does not fit at once: move the data region's start by as much as the
/// goal needs when enough chunks are free to move the first ones away;
/// else grow as far as fits without moving; else move as far as free
/// chunks allow (the next step grows into the room made).
fn plan_compact_step(
    eh: &Header,
    cur: u64,
    goal: u64,
    allocated: u64,
    max_phys: u64,
) -> Result<(u64, u64)> {
    let cs = eh.chunk_size as u64;
    let unit = space::shift_unit(cs);
    let limit = eh.region(Region::Table).length / 4;
    // Chunks 0..k can be emptied only if the other chunks below the
    // physical limit can hold their data: k <= limit - allocated.
    let movable = limit.saturating_sub(allocated) * cs / unit * unit;
    let mut trial = resized_header(eh, goal);
    let w = wanted(eh, &trial, 0, max_phys);
    let need = match space::place(eh, &mut trial, &w)? {
        Placement::Shift(s) => s,
        Placement::Placed => 0,
    };
    // Room for the goal's table once the start moved by `s`.
    let mut s = need;
    while s <= movable && !fits(eh, goal, s, max_phys) {
        s += unit;
    }
    if s <= movable && s > 0 {
        return Ok((goal, s));
    }
    // The largest size that fits without moving.
    let (mut lo, mut hi) = (cur / 512, goal / 512);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(eh, mid * 512, 0, max_phys) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo * 512 > cur {
        return Ok((lo * 512, 0));
    }
    if movable > 0 {
        return Ok((cur, movable));
    }
    Err(Error::new(
        crate::error::ErrorKind::NoSpace,
        format!(
            "cannot grow the chunk table to {} entries: the metadata area is full and no chunk is free to move the data region's start",
            goal.div_ceil(cs)
        ),
    ))
}

/// The metadata after the resize: the new size, bits for the base range
/// (the blocks the image grows over are set: they read the image's zeros),
/// and the chunk table with entries added or dropped (renumbered when the
/// data region's start moved by `shift`).
fn target(old: &Clean, new_size: u64, shift: u64) -> Result<Target> {
    let oh = &old.header;
    let mut nh = resized_header(oh, new_size);
    let ob = oh.base_blocks();
    let nb = nh.base_blocks();
    let bitmap = (nb != ob).then(|| super::carry_bits(&old.bitmap, nb));
    let table = if super::is_compact(oh) {
        let cs = oh.chunk_size as u64;
        let k = u32::try_from(shift / cs).map_err(|_| Error::arg("data region moved too far"))?;
        let n = new_size.div_ceil(cs) as usize;
        let mut t = Vec::with_capacity(n);
        for &p in old.table.iter().take(n) {
            t.push(match p {
                EMPTY => EMPTY,
                p => p.checked_sub(k).ok_or_else(|| {
                    Error::corrupt(format!("chunk {p} was not moved out of the way"))
                })?,
            });
        }
        t.resize(n, EMPTY);
        Some(t)
    } else {
        None
    };
    if shift > 0 {
        nh.regions[Region::Data as usize].offset += shift;
    }
    Ok(Target {
        header: nh,
        bitmap,
        table,
    })
}

/// Before the switch, make the space a grow exposes read as zeros. It lies
/// past the old end, where the old header never reads.
async fn prepare_new_space(storage: &dyn Storage, old: &Clean, new_size: u64) -> Result<()> {
    let oh = &old.header;
    let v1 = oh.virtual_size;
    if new_size <= v1 {
        return Ok(());
    }
    let desc = storage.describe();
    let d = oh.region(Region::Data).offset;
    if super::is_compact(oh) {
        // The chunk holding the old end may hold stale bytes past it.
        let cs = oh.chunk_size as u64;
        let c = v1 / cs;
        if !v1.is_multiple_of(cs)
            && let Some(&p) = old.table.get(c as usize)
            && p != EMPTY
        {
            let host = d + p as u64 * cs + v1 % cs;
            storage
                .write_zeroes(host, cs - v1 % cs)
                .await
                .map_err(|e| Error::io(format!("{desc}: zero the old last chunk"), e))?;
        }
        return Ok(());
    }
    let size = |s: &dyn Storage| s.len().map_err(|e| Error::io(format!("{desc}: size"), e));
    let (from, to) = (d + v1, d + new_size);
    // A file drops whatever lies past the old end (an interrupted shrink's
    // tail) and grows with holes. A block device keeps its size: it must
    // hold the new end (or be grown by the grow command), and the new
    // space is zeroed.
    if size(storage)? > from {
        storage
            .set_len(from)
            .await
            .map_err(|e| Error::io(format!("{desc}: truncate"), e))?;
    }
    let len = size(storage)?;
    if len <= from {
        return crate::storage::limit::grow_sparse_file(storage, to, new_size).await;
    }
    if len < to {
        grow_device(storage, oh, to, len).await?;
    }
    storage
        .write_zeroes(from, to - from)
        .await
        .map_err(|e| Error::io(format!("{desc}: zero the new space"), e))
}

/// Grow a block device holding a sparse-layout image to `need` bytes with
/// the image's `grow_cmd`.
async fn grow_device(storage: &dyn Storage, h: &Header, need: u64, have: u64) -> Result<()> {
    let desc = storage.describe();
    if h.grow_cmd.is_empty() {
        return Err(Error::new(
            crate::error::ErrorKind::NoSpace,
            format!(
                "{desc}: the device holds {have} bytes and the resized image needs {need}; grow the device first, or set a grow command (fvd amend -o grow_cmd=...)"
            ),
        ));
    }
    crate::image::compact::run_grow_cmd(&h.grow_cmd, &desc, need - have).await?;
    let now = storage
        .len()
        .map_err(|e| Error::io(format!("{desc}: size"), e))?;
    if now < need {
        return Err(Error::new(
            crate::error::ErrorKind::NoSpace,
            format!("{desc}: still {now} bytes after the grow command; {need} needed"),
        ));
    }
    Ok(())
}

/// After a shrink: truncate the file, or punch the chunks only the dropped
/// part used. Best effort: a crash or a failure leaves space `fvd check`
/// reports as leaked.
async fn give_back(storage: &dyn Storage, old: &Clean, nh: &Header) {
    // set_len never shrinks a block device: on one it does nothing.
    let d = nh.region(Region::Data).offset;
    if !super::is_compact(nh) {
        let _ = storage.set_len(d + nh.virtual_size).await;
        return;
    }
    let cs = nh.chunk_size as u64;
    let n = nh.virtual_size.div_ceil(cs) as usize;
    let kept = &old.table[..n.min(old.table.len())];
    use crate::image::reclaim::{high_water, unused_runs};
    for (off, len) in unused_runs(kept, cs, high_water(&old.table)) {
        let _ = storage.discard(d + off, len).await;
    }
    let _ = storage.set_len(d + high_water(kept) * cs).await;
}

/// Resize the image file at `path` (FVD) to `new_size`; its base is opened
/// through `opener`.
pub async fn resize_path(
    opener: &Opener,
    path: &Path,
    new_size: u64,
    shrink: bool,
) -> Result<Resized> {
    let storage = super::open_image_storage(path)?;
    let (h, _) = read_header(storage.as_ref()).await?;
    let base = super::open_recorded_base(opener, path, &h).await?;
    resize(storage, base, new_size, shrink)
        .await
        .map_err(|e| super::named(path, e))
}

/// Resize a raw image file at `path`.
pub fn resize_raw_path(path: &Path, new_size: u64, shrink: bool) -> Result<Resized> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("{}: cannot open", path.display()), e))?;
    let meta = f
        .metadata()
        .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::arg(format!(
            "{}: only raw image files can be resized (not devices)",
            path.display()
        )));
    }
    let old_size = meta.len();
    check_size(old_size, new_size, shrink).map_err(|e| super::named(path, e))?;
    f.set_len(new_size)
        .map_err(|e| Error::io(format!("{}: set size", path.display()), e))?;
    f.sync_all()
        .map_err(|e| Error::io(format!("{}: fsync", path.display()), e))?;
    Ok(Resized {
        old_size,
        new_size,
        data_shift: 0,
    })
}
