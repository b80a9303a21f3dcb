//! `check`: consistency of an image's header, journal, bitmap and chunk
//! table, and repair of what can be repaired.
//!
//! Findings fall in three classes, as in `qemu-img check`:
//! * corruptions — metadata that contradicts itself (exit code 2);
//! * leaks — space holding data no metadata refers to: blocks of the base
//!   range whose bit is 0 but whose storage holds data (copy-on-write writes
//!   that crashed before their journal record was durable), and in compact
//!   images physical chunks no table entry references (exit code 3);
//! * check errors — the check itself could not run (exit code 1).
//!
//! With internal snapshots the refcounts are recomputed from every
//! snapshot's table: a stored count higher than that is a leak (a create
//! or delete a crash interrupted; `-r leaks` writes the right count), a
//! lower one corruption. A chunk any snapshot uses is never a leak, so a
//! repair never punches it.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::format::Format;
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{HEADER_SLOT_SIZE, Header, INCOMPAT_COMPACT, Region, decode_slots};
use crate::image::compact::EMPTY;
use crate::image::{Image, OpenOptions};
use crate::iobuf::IoBuf;
use crate::meta::{self, Durable};
use crate::open::{Location, Opener};
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
    /// Allocated chunks and all chunks (compact images).
    pub chunks: Option<(u64, u64)>,
    /// Internal snapshots.
    pub snapshots: u64,
    /// Chunks whose stored refcount is higher than the snapshots using
    /// them (a leak `-r leaks` repairs).
    pub refcounts_too_high: u64,
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

/// Check (and optionally repair) the image at `path`, whose base (needed
/// to repair a dirty image) is local ([`Opener::local`]).
pub async fn check_path(
    path: &Path,
    format: Format,
    repair: Option<Repair>,
) -> Result<CheckReport> {
    check_with(&Opener::local(), path, format, repair).await
}

/// Check (and optionally repair) the image at `path`; `opener` opens its
/// base when a repair replays the journal.
pub async fn check_with(
    opener: &Opener,
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
        let done = repair_image(opener, storage.clone(), path, mode, &report).await?;
        if !done.is_empty() {
            report = check_storage(storage.as_ref(), Some(path)).await?;
            report.repaired = done;
        }
    }
    Ok(report)
}

/// The image's metadata as check sees it.
struct Loaded {
    header: Header,
    durable: Durable,
    capacity: u64,
    /// Snapshots: what their tables use.
    snaps: Option<Snaps>,
}

/// What the snapshots of a compact image use.
struct Snaps {
    /// Snapshot refcount of each physical chunk, recomputed.
    counts: Vec<u16>,
    /// Every physical chunk a snapshot's table uses.
    tables: Vec<u32>,
    /// Runs of snapshot metadata.
    metadata: Vec<std::ops::Range<u64>>,
    /// Where the stored refcounts are, and how many.
    refcounts: crate::format::snapshot::RefcountLocation,
}

/// Check an image on any storage. `path` (if known) locates the base.
pub async fn check_storage(storage: &dyn Storage, path: Option<&Path>) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let Some(loaded) = load(storage, path, &mut r).await? else {
        return Ok(r);
    };
    if r.corruptions.is_empty() {
        for (host, len) in leaked_ranges(storage, &loaded).await? {
            r.leaked_bytes += len;
            r.leaks.push(format!(
                "{len} bytes at file offset {host} hold data no metadata refers to"
            ));
        }
    }
    Ok(r)
}

async fn load(
    storage: &dyn Storage,
    path: Option<&Path>,
    r: &mut CheckReport,
) -> Result<Option<Loaded>> {
    let desc = storage.describe();
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
            return Ok(None);
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
    if h.incompatible & crate::format::header::INCOMPAT_ENCRYPTED != 0 {
        let keys = h.region(Region::KeySlots);
        let n = crate::crypt::luks::AREA_BYTES as usize;
        let luks = storage
            .read_at(keys.offset, IoBuf::zeroed(n))
            .await
            .map_err(|e| Error::io(format!("{desc}: read key slots"), e))?;
        match crate::crypt::luks::Header::decode(&luks) {
            Ok(l) if l.active_slots().is_empty() => r
                .corruptions
                .push("LUKS header: no key slot is active; the data cannot be decrypted".into()),
            Ok(_) => {}
            Err(e) => r.corruptions.push(e.to_string()),
        }
    }
    let data = h.region(Region::Data);
    r.image_end_offset = data.end();
    if len < data.end() {
        r.corruptions.push(format!(
            "image is truncated: file is {len} bytes, the header needs {}",
            data.end()
        ));
        return Ok(None);
    }
    check_base(&h, path, r);
    let bits = h.base_blocks();
    let bitmap = if bits > 0 {
        let raw = storage
            .read_at(
                h.region(Region::Bitmap).offset,
                IoBuf::zeroed(bits.div_ceil(8) as usize),
            )
            .await
            .map_err(|e| Error::io(format!("{desc}: read bitmap"), e))?;
        match AtomicBitmap::from_bytes(bits, &raw) {
            Ok(b) => b,
            Err(e) => {
                r.corruptions.push(format!("bitmap: {}", e.message()));
                let mut fixed = raw.to_vec();
                // Only the partial last byte can hold stray bits.
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
    let bm_region = h.region(Region::Bitmap);
    let used = bits.div_ceil(8);
    // With ALL_LOCAL the bitmap is ignored entirely, stale bits and all.
    let all_local = h.flags & crate::format::header::FLAG_ALL_LOCAL != 0;
    if bm_region.length > used && !all_local {
        let pad = storage
            .read_at(
                bm_region.offset + used,
                IoBuf::zeroed((bm_region.length - used) as usize),
            )
            .await
            .map_err(|e| Error::io(format!("{desc}: read bitmap"), e))?;
        if !pad.is_zero() {
            r.corruptions
                .push("bitmap: bits are set past the base range".to_string());
        }
    }
    let compact = h.incompatible & INCOMPAT_COMPACT != 0;
    let table = crate::image::read_table(storage, &h).await?;
    let mut durable = Durable::new(bitmap, table);
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
                for rec in &replay.records {
                    if let Err(e) = durable.apply(rec) {
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
    r.local_blocks = (durable.bitmap.count_ones(), bits);
    let cs = h.chunk_size as u64;
    let capacity = len.saturating_sub(data.offset) / cs;
    let mut snaps = None;
    if compact {
        snaps = check_snapshots(storage, &h, capacity, &mut durable, r).await?;
        check_table(&durable.table, capacity, r);
        r.image_end_offset = len;
    }
    Ok(Some(Loaded {
        header: h,
        durable,
        capacity,
        snaps,
    }))
}

/// Check the snapshot directory, every snapshot's table and bitmap, and the
/// refcounts against the counts recomputed from the tables. With an apply
/// pending, `durable` becomes the snapshot being applied (what the image is).
async fn check_snapshots(
    storage: &dyn Storage,
    h: &Header,
    capacity: u64,
    durable: &mut Durable,
    r: &mut CheckReport,
) -> Result<Option<Snaps>> {
    use crate::image::snapshot;
    let loaded = match snapshot::load(storage, h, capacity).await {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::Io => return Err(e),
        Err(e) => {
            r.corruptions
                .push(format!("snapshot directory: {}", e.message()));
            return Ok(None);
        }
    };
    let dir = loaded.state.dir().clone();
    if dir.entries.is_empty() {
        return Ok(None);
    }
    r.snapshots = dir.entries.len() as u64;
    if let Some(p) = &loaded.pending {
        r.notes.push(format!(
            "an apply of snapshot {} was interrupted; opening the image read-write finishes it",
            p.entry.id
        ));
        *durable = p.durable();
    }
    let mut counts: Vec<u16> = Vec::new();
    let mut tables = Vec::new();
    for e in &dir.entries {
        let view = match snapshot::read_view(storage, h, capacity, e).await {
            Ok(v) => v,
            Err(er) if er.kind() == ErrorKind::Io => return Err(er),
            Err(er) => {
                r.corruptions.push(er.message().to_string());
                continue;
            }
        };
        for &p in view.durable().table.iter().filter(|&&p| p != EMPTY) {
            if counts.len() <= p as usize {
                counts.resize(p as usize + 1, 0);
            }
            counts[p as usize] = counts[p as usize].saturating_add(1);
            tables.push(p);
        }
    }
    let stored = loaded.usage.refcounts;
    let len = counts.len().max(stored.len());
    for p in 0..len {
        let want = counts.get(p).copied().unwrap_or(0);
        let have = stored.get(p).copied().unwrap_or(0);
        if have < want {
            r.corruptions.push(format!(
                "physical chunk {p} has refcount {have} but {want} snapshots use it"
            ));
        } else if have > want {
            r.refcounts_too_high += 1;
        }
    }
    if r.refcounts_too_high > 0 {
        r.leaks.push(format!(
            "{} chunks have a refcount higher than the snapshots using them",
            r.refcounts_too_high
        ));
    }
    let metadata: Vec<_> = snapshot::metadata_runs(h, &dir)
        .into_iter()
        .map(|x| x.1)
        .collect();
    // Data chunks (live or a snapshot's) inside snapshot metadata.
    for run in &metadata {
        let hit = durable
            .table
            .iter()
            .chain(tables.iter())
            .find(|&&p| p != EMPTY && run.contains(&(p as u64)));
        if let Some(p) = hit {
            r.corruptions.push(format!(
                "physical chunk {p} holds data but lies in snapshot metadata (chunks {}..{})",
                run.start, run.end
            ));
        }
    }
    tables.sort_unstable();
    tables.dedup();
    Ok(Some(Snaps {
        counts,
        tables,
        metadata,
        refcounts: dir.refcounts,
    }))
}

/// Entries must point inside the data region and no chunk may be used twice.
fn check_table(table: &[u32], capacity: u64, r: &mut CheckReport) {
    let mut owner: Vec<(u32, usize)> = Vec::new();
    let mut allocated = 0;
    for (c, &p) in table.iter().enumerate() {
        if p == EMPTY {
            continue;
        }
        allocated += 1;
        if p as u64 >= capacity {
            r.corruptions.push(format!("chunk table entry {c} points at chunk {p}, past the data region ({capacity} chunks)"));
            continue;
        }
        owner.push((p, c));
    }
    owner.sort_unstable();
    for w in owner.windows(2).filter(|w| w[0].0 == w[1].0) {
        r.corruptions.push(format!(
            "physical chunk {} is referenced by entries {} and {}",
            w[0].0, w[0].1, w[1].1
        ));
    }
    r.chunks = Some((allocated, table.len() as u64));
}

fn check_base(h: &Header, path: Option<&Path>, r: &mut CheckReport) {
    if h.base_range() == 0 {
        return;
    }
    let (Some(path), Some((name, format))) = (path, h.base()) else {
        return;
    };
    let here = Location::Path(path.to_path_buf());
    let bpath = match Opener::local().resolve(&here, name) {
        Ok(Location::Path(p)) if format != Format::Qcow2 => p,
        // Only a provider can reach it; opening checks it.
        _ => return,
    };
    match std::fs::metadata(&bpath) {
        Err(e) => r
            .check_errors
            .push(format!("base image {}: {e}", bpath.display())),
        Ok(m) if format == Format::Raw && m.len() != h.base_size => r.check_errors.push(format!(
            "base image {} changed: it was {} bytes at create time and is {} now",
            bpath.display(),
            h.base_size,
            m.len()
        )),
        Ok(_) => {}
    }
}

/// Host ranges (offset, length) that hold data no metadata refers to. Only
/// whole 4 KiB host pages count: a partial page may hold live data next to it.
async fn leaked_ranges(storage: &dyn Storage, l: &Loaded) -> Result<Vec<(u64, u64)>> {
    let h = &l.header;
    let bs = h.block_size as u64;
    let cs = h.chunk_size as u64;
    let data_off = h.region(Region::Data).offset;
    let compact = h.incompatible & INCOMPAT_COMPACT != 0;
    let mut candidates: Vec<(u64, u64)> = Vec::new();
    // Blocks still in the base whose storage is nevertheless written.
    for (b0, b1, local) in l.durable.bitmap.runs(0..h.base_blocks()) {
        if local {
            continue;
        }
        let (s, e) = (b0 * bs, (b1 * bs).min(h.base_range()));
        if !compact {
            candidates.push((data_off + s, data_off + e));
            continue;
        }
        let mut pos = s;
        while pos < e {
            let c = pos / cs;
            let ce = ((c + 1) * cs).min(e);
            let p = l.durable.table.get(c as usize).copied().unwrap_or(EMPTY);
            // A chunk a snapshot uses may hold data its bitmap needs.
            let held = l
                .snaps
                .as_ref()
                .is_some_and(|s| s.counts.get(p as usize).is_some_and(|&n| n > 0));
            if p != EMPTY && !held {
                let host = data_off + p as u64 * cs + pos % cs;
                candidates.push((host, host + (ce - pos)));
            }
            pos = ce;
        }
    }
    // Physical chunks no entry references, below the highest one in use
    // (past it lies free capacity, not leaked space).
    if compact {
        // In use: the live table, every snapshot's table, snapshot metadata.
        let mut in_use: Vec<std::ops::Range<u64>> = l
            .durable
            .table
            .iter()
            .filter(|&&p| p != EMPTY)
            .map(|&p| p as u64..p as u64 + 1)
            .collect();
        if let Some(s) = &l.snaps {
            in_use.extend(s.tables.iter().map(|&p| p as u64..p as u64 + 1));
            in_use.extend(s.metadata.iter().cloned());
        }
        let high = in_use.iter().map(|r| r.end).max().unwrap_or(0);
        let mut used = vec![false; high.min(l.capacity) as usize];
        for r in &in_use {
            for p in r.clone() {
                if let Some(u) = used.get_mut(p as usize) {
                    *u = true;
                }
            }
        }
        let mut p = 0;
        while p < used.len() {
            if used[p] {
                p += 1;
                continue;
            }
            let q = (p..used.len()).find(|&i| used[i]).unwrap_or(used.len());
            candidates.push((data_off + p as u64 * cs, data_off + q as u64 * cs));
            p = q;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in candidates {
        let (s, e) = (s.div_ceil(4096) * 4096, e / 4096 * 4096);
        if s >= e {
            continue;
        }
        let runs = storage
            .allocation(s, e - s)
            .await
            .map_err(|er| Error::io(format!("{}: allocation map", storage.describe()), er))?;
        let mut pos = s;
        for run in runs {
            if run.data {
                match out.last_mut() {
                    Some((a, n)) if *a + *n == pos => *n += run.length,
                    _ => out.push((pos, run.length)),
                }
            }
            pos += run.length;
        }
    }
    Ok(out)
}

async fn repair_image(
    opener: &Opener,
    storage: Arc<dyn Storage>,
    path: &Path,
    mode: Repair,
    report: &CheckReport,
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if mode == Repair::All && (!report.clean || !report.corruptions.is_empty()) {
        let (h, _) = crate::image::read_header(storage.as_ref()).await?;
        if report.corruptions.iter().any(|c| c.starts_with("bitmap")) {
            rewrite_bitmap(storage.as_ref(), &h).await?;
            done.push("cleared bitmap bits beyond the base range".to_string());
        }
        // Opening read-write replays the journal and checkpoints; closing
        // sets the clean flag.
        let needs_base =
            crate::image::snapshot::snapshot_needs_base(storage.as_ref(), &h, None).await?;
        let base = match h.base() {
            Some((name, format)) if needs_base => {
                let here = Location::Path(path.to_path_buf());
                Some(opener.open_named(&here, name, format, 1).await?)
            }
            _ => None,
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
    if report.leaked_bytes > 0 || report.refcounts_too_high > 0 {
        let mut r = CheckReport::default();
        let Some(loaded) = load(storage.as_ref(), Some(path), &mut r).await? else {
            return Ok(done);
        };
        if !loaded.header.is_clean() {
            done.push(
                "leaks not repaired: the journal must be replayed first (use -r all)".to_string(),
            );
            return Ok(done);
        }
        if !r.corruptions.is_empty() {
            done.push("leaks not repaired: fix the corruption first (use -r all)".to_string());
            return Ok(done);
        }
        if let Some(s) = &loaded.snaps
            && r.refcounts_too_high > 0
        {
            // Exact counts: never lower than the truth, so safe in place.
            let bytes = crate::format::snapshot::refcount_bytes(
                |p| s.counts.get(p as usize).copied().unwrap_or(0),
                s.refcounts.entries,
                0,
                s.refcounts.bytes(),
            );
            storage
                .write_at(s.refcounts.offset, IoBuf::from_slice(&bytes), false)
                .await
                .map_err(|er| Error::io("write refcount table", er))?;
            done.push(format!(
                "lowered the refcounts of {} chunks to the snapshots using them",
                r.refcounts_too_high
            ));
        }
        let mut freed = 0;
        for (host, len) in leaked_ranges(storage.as_ref(), &loaded).await? {
            storage
                .discard(host, len)
                .await
                .map_err(|er| Error::io("punch leaked data", er))?;
            freed += len;
        }
        storage.flush().await.map_err(|e| Error::io("flush", e))?;
        if freed > 0 {
            done.push(format!("freed {freed} bytes of leaked data"));
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
    if !bits.is_multiple_of(8) && first_stray_byte < fixed.len() {
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
