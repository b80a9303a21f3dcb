//! `check`: consistency of an image's header, journal and bitmap, and
//! repair of what can be repaired.
//!
//! Findings fall in three classes, as in `qemu-img check`:
//! * corruptions — metadata that contradicts itself (exit code 2);
//! * leaks — space used by data no metadata refers to: blocks of the base
//!   range whose bit is 0 but whose image storage holds data, left by
//!   copy-on-write writes that crashed before their journal record was
//!   durable (exit code 3);
//! * check errors — the check itself could not run (exit code 1).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{HEADER_SLOT_SIZE, Header, Region, decode_slots};
use crate::image::{Image, OpenOptions};
use crate::iobuf::IoBuf;
use crate::meta;
use crate::open::{Format, PathOptions, resolve_base};
use crate::storage::file::FileOptions;
use crate::storage::{CacheMode, FileStorage, Storage};

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Punch out leaked data.
    Leaks,
    /// Leaks, plus replaying a dirty journal and clearing stray bitmap bits.
    All,
}

/// The outcome of a check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Metadata that contradicts itself.
    pub corruptions: Vec<String>,
    /// Unreferenced data.
    pub leaks: Vec<String>,
    /// Bytes of leaked data.
    pub leaked_bytes: u64,
    /// What was repaired.
    pub repaired: Vec<String>,
    /// Things worth knowing that are not errors.
    pub notes: Vec<String>,
    /// Reasons the check could not complete.
    pub check_errors: Vec<String>,
    /// Valid journal blocks of the current epoch (to be replayed).
    pub journal_blocks: u64,
    /// Records in them.
    pub journal_records: u64,
    /// The clean flag.
    pub clean: bool,
    /// One past the last byte the image uses.
    pub image_end_offset: u64,
    /// Blocks of the base range in the image, and all of them.
    pub local_blocks: (u64, u64),
}

impl CheckReport {
    /// Exit code as `qemu-img check` defines it.
    pub fn exit_code(&self) -> i32 {
        if !self.check_errors.is_empty() {
            1
        } else if !self.corruptions.is_empty() {
            2
        } else if !self.leaks.is_empty() {
            3
        } else {
            0
        }
    }
}

/// Check (and optionally repair) the image at `path`.
pub async fn check_path(
    path: &Path,
    format: Format,
    repair: Option<Repair>,
) -> Result<CheckReport> {
    let write = repair.is_some();
    let fo = FileOptions {
        write,
        create: false,
        cache: CacheMode::Writeback,
        lock: true,
    };
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, fo)?);
    if format == Format::Raw {
        let len = storage
            .len()
            .map_err(|e| Error::io(format!("{}: size", path.display()), e))?;
        return Ok(CheckReport {
            clean: true,
            image_end_offset: len,
            ..Default::default()
        });
    }
    let mut report = check_storage(storage.as_ref(), Some(path)).await?;
    if let Some(mode) = repair
        && report.check_errors.is_empty()
    {
        repair_image(storage.clone(), path, mode, &report)
            .await
            .map(|done| report.repaired = done)?;
        if !report.repaired.is_empty() {
            let repaired = std::mem::take(&mut report.repaired);
            report = check_storage(storage.as_ref(), Some(path)).await?;
            report.repaired = repaired;
        }
    }
    Ok(report)
}

/// Check an image on any storage. `path` (if known) locates the base.
pub async fn check_storage(storage: &dyn Storage, path: Option<&Path>) -> Result<CheckReport> {
    let desc = storage.describe();
    let mut r = CheckReport::default();
    let len = storage
        .len()
        .map_err(|e| Error::io(format!("{desc}: size"), e))?;
    let area = storage
        .read_at(0, IoBuf::zeroed(2 * HEADER_SLOT_SIZE))
        .await
        .map_err(|e| Error::io(format!("{desc}: read header"), e))?;
    let (h, slot) = match decode_slots(&area) {
        Ok(v) => v,
        Err(e) => {
            r.check_errors.push(format!("{desc}: {e}"));
            return Ok(r);
        }
    };
    let other = &area[(1 - slot) * HEADER_SLOT_SIZE..(2 - slot) * HEADER_SLOT_SIZE];
    if other.iter().any(|&b| b != 0) && Header::decode(other).is_err() {
        r.notes.push(format!(
            "header slot {} is not valid (an interrupted header update); slot {slot} is used",
            1 - slot
        ));
    }
    r.clean = h.is_clean();
    let data = h.region(Region::Data);
    r.image_end_offset = data.end();
    if len < data.end() {
        r.corruptions.push(format!(
            "image is truncated: file is {len} bytes, the header needs {}",
            data.end()
        ));
        return Ok(r);
    }
    check_base(&h, path, &mut r);
    let bits = h.base_blocks();
    let bitmap_region = h.region(Region::Bitmap);
    let bitmap = if bits > 0 {
        let raw = storage
            .read_at(
                bitmap_region.offset,
                IoBuf::zeroed(bits.div_ceil(8) as usize),
            )
            .await
            .map_err(|e| Error::io(format!("{desc}: read bitmap"), e))?;
        match AtomicBitmap::from_bytes(bits, &raw) {
            Ok(b) => b,
            Err(e) => {
                r.corruptions.push(format!("bitmap: {}", e.message()));
                let mut fixed = raw.to_vec();
                if let Some(last) = fixed.last_mut()
                    && bits % 8 != 0
                {
                    *last &= (1u8 << (bits % 8)) - 1;
                }
                AtomicBitmap::from_bytes(bits, &fixed)?
            }
        }
    } else {
        AtomicBitmap::new(0)
    };
    match meta::read_journal(storage, &h).await {
        Ok(replay) => {
            r.journal_blocks = replay.blocks;
            r.journal_records = replay.records.len() as u64;
            if h.is_clean() && replay.blocks > 0 {
                r.corruptions.push(format!(
                    "image is marked clean but its journal holds {} valid blocks of the current epoch",
                    replay.blocks
                ));
            }
            if !h.is_clean() {
                let mut dirty = BTreeSet::new();
                for rec in &replay.records {
                    if let Err(e) = meta::apply(&bitmap, rec, &mut dirty) {
                        r.corruptions.push(format!("journal: {}", e.message()));
                        break;
                    }
                }
            }
        }
        Err(e) if e.kind() == ErrorKind::Corrupt => {
            r.corruptions.push(format!("journal: {}", e.message()))
        }
        Err(e) => return Err(e),
    }
    r.local_blocks = (bitmap.count_ones(), bits);
    if bits > 0 {
        find_leaks(storage, &h, &bitmap, &mut r).await?;
    }
    Ok(r)
}

fn check_base(h: &Header, path: Option<&Path>, r: &mut CheckReport) {
    if h.base_range() == 0 {
        return;
    }
    let Some(path) = path else { return };
    let bpath = resolve_base(path, &h.base_name);
    match std::fs::metadata(&bpath) {
        Err(e) => r
            .check_errors
            .push(format!("base image {}: {e}", bpath.display())),
        Ok(m) if h.base_format == "raw" && m.len() != h.base_size => r.check_errors.push(format!(
            "base image {} changed: it was {} bytes at create time and is {} now",
            bpath.display(),
            h.base_size,
            m.len()
        )),
        Ok(_) => {}
    }
}

/// Blocks whose bit is 0 (data comes from the base) but whose image storage holds data.
async fn leaked_ranges(
    storage: &dyn Storage,
    h: &Header,
    bitmap: &AtomicBitmap,
) -> Result<Vec<(u64, u64)>> {
    let bs = h.block_size as u64;
    let data_off = h.region(Region::Data).offset;
    let range = h.base_range();
    let mut out = Vec::new();
    for (b0, b1, local) in bitmap.runs(0..h.base_blocks()) {
        if local {
            continue;
        }
        // Only whole 4 KiB host pages count: a partial page at the end of an
        // unaligned base range may hold data of the range beyond the base.
        let s = (b0 * bs).div_ceil(4096) * 4096;
        let e = (b1 * bs).min(range) / 4096 * 4096;
        if s >= e {
            continue;
        }
        let runs = storage
            .allocation(data_off + s, e - s)
            .await
            .map_err(|er| Error::io(format!("{}: allocation map", storage.describe()), er))?;
        let mut p = s;
        for run in runs {
            if run.data {
                match out.last_mut() {
                    Some((_, end)) if *end == p => *end = p + run.length,
                    _ => out.push((p, p + run.length)),
                }
            }
            p += run.length;
        }
    }
    Ok(out)
}

async fn find_leaks(
    storage: &dyn Storage,
    h: &Header,
    bitmap: &AtomicBitmap,
    r: &mut CheckReport,
) -> Result<()> {
    for (s, e) in leaked_ranges(storage, h, bitmap).await? {
        r.leaked_bytes += e - s;
        r.leaks.push(format!(
            "{} bytes at virtual offset {s} hold data but the bitmap says the base has it",
            e - s
        ));
    }
    Ok(())
}

async fn repair_image(
    storage: Arc<dyn Storage>,
    path: &Path,
    mode: Repair,
    report: &CheckReport,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if mode == Repair::All && (!report.clean || !report.corruptions.is_empty()) {
        // Opening read-write replays the journal and checkpoints the bitmap
        // (rewriting it without stray bits); closing sets the clean flag.
        let (h, _) = crate::image::read_header(storage.as_ref()).await?;
        let bitmap_corrupt = report.corruptions.iter().any(|c| c.starts_with("bitmap"));
        if bitmap_corrupt {
            rewrite_bitmap(storage.as_ref(), &h).await?;
            done.push("cleared bitmap bits beyond the base range".to_string());
        }
        let base = if h.base_range() > 0 {
            let fmt: Format = h.base_format.parse()?;
            Some(
                crate::open::open_base(
                    &resolve_base(path, &h.base_name),
                    fmt,
                    PathOptions::default(),
                    0,
                )
                .await?,
            )
        } else {
            None
        };
        let img = Image::open(storage.clone(), base, OpenOptions { read_only: false }).await?;
        img.close().await?;
        if !report.clean {
            done.push(format!(
                "replayed {} journal records and marked the image clean",
                report.journal_records
            ));
        }
    }
    if report.leaked_bytes > 0 {
        let (h, _) = crate::image::read_header(storage.as_ref()).await?;
        let bits = h.base_blocks();
        let raw = storage
            .read_at(
                h.region(Region::Bitmap).offset,
                IoBuf::zeroed(bits.div_ceil(8) as usize),
            )
            .await
            .map_err(|e| Error::io("read bitmap", e))?;
        let bitmap = AtomicBitmap::from_bytes(bits, &raw)?;
        if h.is_clean() {
            let data_off = h.region(Region::Data).offset;
            let mut freed = 0;
            for (s, e) in leaked_ranges(storage.as_ref(), &h, &bitmap).await? {
                storage
                    .discard(data_off + s, e - s)
                    .await
                    .map_err(|er| Error::io("punch leaked data", er))?;
                freed += e - s;
            }
            storage.flush().await.map_err(|e| Error::io("flush", e))?;
            done.push(format!("freed {freed} bytes of leaked data"));
        } else {
            done.push(
                "leaks not repaired: the journal must be replayed first (use -r all)".to_string(),
            );
        }
    }
    Ok(done)
}

async fn rewrite_bitmap(storage: &dyn Storage, h: &Header) -> Result<()> {
    let bits = h.base_blocks();
    let region = h.region(Region::Bitmap);
    let raw = storage
        .read_at(region.offset, IoBuf::zeroed(region.length as usize))
        .await
        .map_err(|e| Error::io("read bitmap", e))?;
    let mut fixed = raw.to_vec();
    let first_stray_byte = (bits / 8) as usize;
    if bits % 8 != 0 && first_stray_byte < fixed.len() {
        fixed[first_stray_byte] &= (1u8 << (bits % 8)) - 1;
    }
    let clear_from = bits.div_ceil(8) as usize;
    if clear_from < fixed.len() {
        fixed[clear_from..].fill(0);
    }
    storage
        .write_at(region.offset, IoBuf::from_slice(&fixed), false)
        .await
        .map_err(|e| Error::io("write bitmap", e))?;
    storage.flush().await.map_err(|e| Error::io("flush", e))
}
