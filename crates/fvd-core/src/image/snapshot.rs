//! Internal snapshots of compact images: create, list, delete, apply, and
//! read-only views (docs/FORMAT.md §10).
//!
//! A snapshot is a copy of the chunk table (and, with a base, of the
//! bitmap) in runs of physical chunks at the end of the data region, named
//! by an entry of the snapshot directory; the chunks its table points at are
//! shared with the live disk and counted in the refcount table. Creating
//! costs a copy of the table, not of the data: O(table), independent of how
//! much data the disk holds. The write path never touches refcounts: a
//! write into a shared chunk gets a new chunk (`map.rs`).
//!
//! # Quiescing
//! Every operation holds the image's gate exclusively: requests in flight
//! finish first, new ones wait. It then runs a commit round, so what is on
//! disk (table, bitmap, journal) is exactly what is in memory, and takes
//! the commit lock for the rest of the operation (lock order: gate, commit;
//! docs/ARCHITECTURE.md).
//!
//! # Crash safety: one commit point per operation
//! * **create**: write the table and bitmap copies into new chunks, raise
//!   the refcounts of the live chunks, fdatasync; then the directory copy
//!   naming the snapshot, fdatasync (the first snapshot writes it before
//!   the header that sets `SNAPSHOTS`, and the header write is the commit
//!   point). A crash before leaves the old directory: refcounts too high
//!   (a leak) and unreferenced chunks, nothing else.
//! * **delete**: the directory copy without the snapshot, fdatasync; only
//!   then lower the refcounts and punch the chunks no one uses any more. A
//!   crash after leaves refcounts too high: a leak.
//! * **apply**: the directory copy saying "applying S", fdatasync: from here
//!   the image is S. Then S's table and bitmap go over the live ones in
//!   place, fdatasync, the header starts a new journal epoch (clean),
//!   fdatasync, and the directory drops the note. An open that finds the
//!   note finishes the apply (read-only: reads S).
//!
//! Refcounts on disk are therefore never lower than the truth; `check`
//! recomputes them from every table (too high: leak; too low: corruption).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use super::Image;
use super::compact::{Compact, EMPTY, SnapshotUse, validate_table};
use crate::error::{Error, ErrorKind, Result};
use crate::format::bitmap::AtomicBitmap;
use crate::format::header::{FLAG_ALL_LOCAL, FLAG_CLEAN, Header, INCOMPAT_SNAPSHOTS, Region};
use crate::format::snapshot::{
    Directory, MAX_NAME, MIN_DIR_REGION, RefcountLocation, SNAP_HAS_BITMAP, SnapshotEntry,
    decode_copies, decode_refcounts, decode_table, encode_table_into, refcount_bytes_into,
};
use crate::iobuf::IoBuf;
use crate::meta::{self, CommitState, Durable, Meta, Stats};
use crate::storage::Storage;

pub use crate::format::snapshot::SnapshotEntry as Snapshot;

/// Which snapshot a command means, with qemu-img's matching rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSel {
    /// The first snapshot with this name (`snapshot -d NAME`,
    /// `snapshot.name=NAME`).
    Name(String),
    /// The snapshot with this id (`snapshot.id=ID`).
    Id(String),
    /// The snapshot with this id and this name.
    IdAndName(String, String),
    /// The snapshot with this id if there is one, else the first with this
    /// name (`snapshot -a`, a bare `-l` argument).
    IdOrName(String),
}

impl SnapshotSel {
    /// The snapshot it selects among `entries`.
    pub fn find<'a>(&self, entries: &'a [SnapshotEntry]) -> Option<&'a SnapshotEntry> {
        let by_id = |id: &str| entries.iter().find(|e| e.id.to_string() == id);
        let by_name = |n: &str| entries.iter().find(|e| e.name == n);
        match self {
            SnapshotSel::Name(n) => by_name(n),
            SnapshotSel::Id(i) => by_id(i),
            SnapshotSel::IdAndName(i, n) => entries
                .iter()
                .find(|e| e.id.to_string() == *i && e.name == *n),
            SnapshotSel::IdOrName(s) => by_id(s).or_else(|| by_name(s)),
        }
    }

    /// Parse qemu-img's `-l` argument: `snapshot.id=ID`,
    /// `snapshot.name=NAME`, both separated by a comma (a comma inside a
    /// value is written `,,`), or a bare id or name.
    pub fn parse_param(s: &str) -> Result<SnapshotSel> {
        if !s.starts_with("snapshot.id=") && !s.starts_with("snapshot.name=") {
            return Ok(SnapshotSel::IdOrName(s.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for item in split_options(s) {
            match item.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v.to_string()),
                Some(("snapshot.name", v)) => name = Some(v.to_string()),
                _ => {
                    return Err(Error::arg(format!(
                        "'{item}': expected snapshot.id=ID or snapshot.name=NAME"
                    )));
                }
            }
        }
        Ok(match (id, name) {
            (Some(i), Some(n)) => SnapshotSel::IdAndName(i, n),
            (Some(i), None) => SnapshotSel::Id(i),
            (None, Some(n)) => SnapshotSel::Name(n),
            (None, None) => unreachable!("the prefix names one of them"),
        })
    }

    /// The error for a snapshot that does not exist in `what`.
    pub fn not_found(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!("{what}: snapshot {self} not found"),
        )
    }
}

impl std::fmt::Display for SnapshotSel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotSel::Name(n) | SnapshotSel::IdOrName(n) => write!(f, "'{n}'"),
            SnapshotSel::Id(i) => write!(f, "with id {i}"),
            SnapshotSel::IdAndName(i, n) => write!(f, "'{n}' with id {i}"),
        }
    }
}

/// Split `a=b,c=d` at single commas; `,,` is a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(ch);
        }
    }
    out
}

/// Bugs a test can switch on to show that the simulator catches them
/// (mutation checks). Never set outside tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotBug {
    /// Write into a chunk a snapshot shares instead of copying it.
    SkipSharedCopy = 1,
    /// Delete: lower refcounts and punch freed chunks before the directory
    /// without the snapshot is durable.
    EarlyFree = 2,
}

/// The directory as this image sees it.
#[derive(Debug, Clone, Default)]
pub(crate) struct DirState {
    /// `SNAPSHOTS` is set: the directory is in force.
    enabled: bool,
    /// The directory in force (empty when not enabled).
    dir: Directory,
    /// Generation and copy of the newest valid copy, in force or not (the
    /// next write goes to the other copy, one generation later).
    newest: Option<(u64, usize)>,
}

impl DirState {
    /// The directory in force.
    pub fn dir(&self) -> &Directory {
        &self.dir
    }
}

/// The snapshot state of an open image.
#[derive(Default)]
pub(crate) struct SnapshotState {
    /// Changed only with the gate held exclusively; never held across an
    /// await.
    dir: Mutex<DirState>,
    /// [`SnapshotBug`] bits.
    bugs: AtomicU32,
}

impl SnapshotState {
    pub fn new(dir: DirState) -> Self {
        SnapshotState {
            dir: Mutex::new(dir),
            bugs: AtomicU32::new(0),
        }
    }

    fn current(&self) -> DirState {
        self.dir.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, d: DirState) {
        *self.dir.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    fn bug(&self, b: SnapshotBug) -> bool {
        self.bugs.load(Ordering::Relaxed) & b as u32 != 0
    }
}

/// A snapshot read from disk: its entry, table and bitmap.
pub(crate) struct View {
    pub entry: SnapshotEntry,
    table: Vec<u32>,
    /// Bits and bytes of its bitmap (None: every block in the image).
    bitmap: Option<(u64, Vec<u8>)>,
}

impl View {
    /// The snapshot as the durable metadata of an image.
    pub fn durable(&self) -> Durable {
        Durable::new(self.bitmap(), self.table.clone())
    }

    fn bitmap(&self) -> AtomicBitmap {
        match &self.bitmap {
            Some((bits, bytes)) => {
                AtomicBitmap::from_bytes(*bits, bytes).unwrap_or_else(|_| AtomicBitmap::new(*bits))
            }
            None => AtomicBitmap::new(0),
        }
    }
}

/// What opening finds about snapshots.
pub(crate) struct Loaded {
    pub state: DirState,
    /// Chunks snapshots hold (for the allocator).
    pub usage: SnapshotUse,
    /// An apply a crash interrupted.
    pub pending: Option<View>,
}

/// Bytes of one directory copy, or an error when the region is too small.
fn copy_len(h: &Header) -> Result<usize> {
    let r = h.region(Region::Snapshots);
    if r.length < MIN_DIR_REGION {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the snapshot directory region is {} bytes; snapshots need at least {MIN_DIR_REGION}",
                r.length
            ),
        ));
    }
    Ok((r.length / 2) as usize)
}

/// File offset of physical chunk `p`.
fn chunk_offset(h: &Header, p: u64) -> u64 {
    h.region(Region::Data).offset + p * h.chunk_size as u64
}

/// Runs of physical chunks a directory's metadata occupies: each
/// snapshot's table and bitmap copies, and a refcount table in the data
/// region.
pub(crate) fn metadata_runs(h: &Header, d: &Directory) -> Vec<(String, std::ops::Range<u64>)> {
    let cs = h.chunk_size as u64;
    let mut out = Vec::new();
    for e in &d.entries {
        out.push((
            format!("table copy of snapshot {}", e.id),
            e.table_chunk..e.table_chunk + e.table_chunks(cs),
        ));
        if e.has_bitmap() {
            out.push((
                format!("bitmap copy of snapshot {}", e.id),
                e.bitmap_chunk..e.bitmap_chunk + e.bitmap_chunks(cs),
            ));
        }
    }
    if let Some(r) = refcount_run(h, d) {
        out.push(("refcount table".to_string(), r));
    }
    out
}

/// The chunks of a refcount table kept in the data region.
fn refcount_run(h: &Header, d: &Directory) -> Option<std::ops::Range<u64>> {
    let loc = d.refcounts;
    if d.entries.is_empty() || loc.offset == h.region(Region::Refcounts).offset {
        return None;
    }
    let cs = h.chunk_size as u64;
    let first = (loc.offset - h.region(Region::Data).offset) / cs;
    Some(first..first + loc.bytes().div_ceil(cs))
}

/// Check the parts of a directory that opening relies on.
fn validate_dir(h: &Header, d: &Directory, capacity: u64) -> Result<()> {
    let cs = h.chunk_size as u64;
    for e in &d.entries {
        if e.disk_size != h.virtual_size {
            return Err(Error::corrupt(format!(
                "snapshot {} records a disk of {} bytes, the image has {}",
                e.id, e.disk_size, h.virtual_size
            )));
        }
        if e.has_bitmap() && (h.base().is_none() || e.bitmap_bits != h.recorded_base_blocks()) {
            return Err(Error::corrupt(format!(
                "snapshot {} has a bitmap of {} blocks, the base range has {}",
                e.id,
                e.bitmap_bits,
                h.recorded_base_blocks()
            )));
        }
    }
    let r4 = h.region(Region::Refcounts);
    let loc = d.refcounts;
    if !d.entries.is_empty() && loc.offset == r4.offset {
        if loc.bytes() > r4.length {
            return Err(Error::corrupt(format!(
                "the refcount table of {} entries does not fit its region ({} bytes)",
                loc.entries, r4.length
            )));
        }
    } else if !d.entries.is_empty() {
        let data = h.region(Region::Data).offset;
        if loc.offset < data || !(loc.offset - data).is_multiple_of(cs) {
            return Err(Error::corrupt(format!(
                "the refcount table at offset {} is neither in its region nor at a chunk",
                loc.offset
            )));
        }
    }
    let mut runs = metadata_runs(h, d);
    runs.sort_by_key(|r| r.1.start);
    for (what, r) in &runs {
        if r.end > capacity || r.start > r.end {
            return Err(Error::corrupt(format!(
                "the {what} (chunks {}..{}) lies past the end of the data region ({capacity} chunks)",
                r.start, r.end
            )));
        }
    }
    if let Some(w) = runs.windows(2).find(|w| w[0].1.end > w[1].1.start) {
        return Err(Error::corrupt(format!(
            "the {} and the {} overlap",
            w[0].0, w[1].0
        )));
    }
    Ok(())
}

/// Read the snapshot state of an image whose data region holds `capacity`
/// chunks.
pub(crate) async fn load(storage: &dyn Storage, h: &Header, capacity: u64) -> Result<Loaded> {
    let enabled = h.incompatible & INCOMPAT_SNAPSHOTS != 0;
    let empty = Loaded {
        state: DirState::default(),
        usage: SnapshotUse::default(),
        pending: None,
    };
    if !h.is_compact() {
        if enabled {
            return Err(Error::corrupt(
                "the snapshots feature is set on an image without a chunk table",
            ));
        }
        return Ok(empty);
    }
    let region = h.region(Region::Snapshots);
    if region.length < MIN_DIR_REGION {
        if enabled {
            copy_len(h)?;
        }
        return Ok(empty);
    }
    let raw = storage
        .read_at(region.offset, IoBuf::zeroed(region.length as usize))
        .await
        .map_err(|e| Error::io("read snapshot directory", e))?;
    let found = match decode_copies(&raw) {
        Ok(f) => f,
        Err(e) if enabled => return Err(e),
        // Not in force: only its generation matters.
        Err(_) => None,
    };
    let newest = found.as_ref().map(|(d, slot)| (d.generation, *slot));
    if !enabled {
        return Ok(Loaded {
            state: DirState {
                enabled,
                dir: Directory::default(),
                newest,
            },
            ..empty
        });
    }
    let Some((dir, _)) = found else {
        return Err(Error::corrupt(
            "the snapshots feature is set but neither snapshot directory copy is valid",
        ));
    };
    validate_dir(h, &dir, capacity)?;
    let mut usage = SnapshotUse {
        refcounts: Vec::new(),
        metadata: metadata_runs(h, &dir).into_iter().map(|r| r.1).collect(),
    };
    if !dir.entries.is_empty() {
        let bytes = dir.refcounts.bytes();
        let buf = storage
            .read_at(dir.refcounts.offset, IoBuf::zeroed(bytes as usize))
            .await
            .map_err(|e| Error::io("read refcount table", e))?;
        usage.refcounts = decode_refcounts(&buf);
    }
    let pending = match dir.by_id(dir.applying) {
        Some(e) if dir.applying != 0 => Some(read_view(storage, h, capacity, e).await?),
        _ => None,
    };
    Ok(Loaded {
        state: DirState {
            enabled,
            dir,
            newest,
        },
        usage,
        pending,
    })
}

/// Read snapshot `e`'s table and bitmap.
pub(crate) async fn read_view(
    storage: &dyn Storage,
    h: &Header,
    capacity: u64,
    e: &SnapshotEntry,
) -> Result<View> {
    let cs = h.chunk_size as u64;
    let entries = e.table_entries(cs);
    let buf = storage
        .read_at(
            chunk_offset(h, e.table_chunk),
            IoBuf::zeroed(entries as usize * 4),
        )
        .await
        .map_err(|er| Error::io(format!("read the table of snapshot {}", e.id), er))?;
    let table = decode_table(&buf, entries)?;
    validate_table(&table, capacity)
        .map_err(|er| er.context(format!("snapshot {} ('{}')", e.id, e.name)))?;
    let bitmap = if e.has_bitmap() {
        let n = e.bitmap_bytes() as usize;
        let buf = storage
            .read_at(chunk_offset(h, e.bitmap_chunk), IoBuf::zeroed(n))
            .await
            .map_err(|er| Error::io(format!("read the bitmap of snapshot {}", e.id), er))?;
        AtomicBitmap::from_bytes(e.bitmap_bits, &buf)
            .map_err(|er| er.context(format!("snapshot {} ('{}')", e.id, e.name)))?;
        Some((e.bitmap_bits, buf.to_vec()))
    } else {
        None
    };
    Ok(View {
        entry: e.clone(),
        table,
        bitmap,
    })
}

/// True if opening the image with header `h` (or its snapshot `sel`) needs
/// the base: the image reads from it, or an interrupted apply is switching
/// to a snapshot that does, or the snapshot does.
pub async fn snapshot_needs_base(
    storage: &dyn Storage,
    h: &Header,
    sel: Option<&SnapshotSel>,
) -> Result<bool> {
    if h.base().is_none() {
        return Ok(false);
    }
    if h.incompatible & INCOMPAT_SNAPSHOTS == 0 || h.recorded_base_range() == 0 {
        return Ok(sel.is_none() && h.base_range() > 0);
    }
    if sel.is_none() && h.base_range() > 0 {
        return Ok(true);
    }
    let capacity = storage
        .len()
        .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?
        .saturating_sub(h.region(Region::Data).offset)
        / h.chunk_size as u64;
    let loaded = load(storage, h, capacity).await?;
    let d = &loaded.state.dir;
    Ok(match sel {
        Some(s) => s.find(&d.entries).is_some_and(|e| e.has_bitmap()),
        None => match loaded.pending {
            Some(p) => p.entry.has_bitmap(),
            None => h.base_range() > 0,
        },
    })
}

/// Write `d` into the directory copy after `ds`'s newest (not yet durable);
/// `ds` then describes it.
async fn write_dir(
    storage: &dyn Storage,
    h: &Header,
    ds: &mut DirState,
    d: &Directory,
) -> Result<()> {
    let half = copy_len(h)?;
    let (generation, slot) = match ds.newest {
        Some((g, s)) => (g + 1, 1 - s),
        None => (1, 0),
    };
    let bytes = d.encode(generation, half)?;
    let off = h.region(Region::Snapshots).offset + (slot * half) as u64;
    storage
        .write_at(off, IoBuf::from_slice(&bytes), false)
        .await
        .map_err(|e| Error::io("snapshot directory write", e))?;
    ds.newest = Some((generation, slot));
    ds.dir = d.clone();
    Ok(())
}

/// Write the 4 KiB pages `pages` (all of them with `None`) of a refcount
/// table at `loc` holding `counts`.
async fn write_refcounts(
    storage: &dyn Storage,
    loc: RefcountLocation,
    counts: &[u16],
    pages: Option<BTreeSet<u64>>,
) -> Result<()> {
    let total = loc.bytes().div_ceil(4096);
    let pages: Vec<u64> = match pages {
        Some(p) => p.into_iter().filter(|&x| x < total).collect(),
        None => (0..total).collect(),
    };
    let count = |p: u64| counts.get(p as usize).copied().unwrap_or(0);
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + 1 && j - i < 1024 {
            j += 1;
        }
        let start = pages[i] * 4096;
        let len = ((pages[j - 1] + 1) * 4096).min(loc.bytes().div_ceil(4096) * 4096) - start;
        let mut bytes = IoBuf::for_overwrite(len as usize);
        refcount_bytes_into(count, loc.entries, start, &mut bytes);
        storage
            .write_at(loc.offset + start, bytes, false)
            .await
            .map_err(|e| Error::io("refcount table write", e))?;
        i = j;
    }
    Ok(())
}

/// The pages of a refcount table holding the counts of chunks `phys`.
fn pages_of(phys: impl IntoIterator<Item = u32>) -> BTreeSet<u64> {
    // A flag per page first: tables have millions of entries, a few
    // thousand pages.
    let mut hit: Vec<bool> = Vec::new();
    for p in phys.into_iter().filter(|&p| p != EMPTY) {
        let page = p as usize * 2 / 4096;
        if page >= hit.len() {
            hit.resize(page + 1, false);
        }
        hit[page] = true;
    }
    (0..hit.len() as u64).filter(|&i| hit[i as usize]).collect()
}

/// Finish an apply whose directory copy says "applying S" (durable): S's
/// table and bitmap over the live ones, a clean header of a new journal
/// epoch, and the directory without the note. Idempotent: an open after a
/// crash in the middle runs it again.
pub(crate) async fn finish_apply(
    storage: &dyn Storage,
    stats: &Stats,
    st: &mut CommitState,
    ds: &mut DirState,
    s: &View,
) -> Result<()> {
    let h = st.header.clone();
    let t = h.region(Region::Table);
    let bytes = meta::table_bytes(&s.table, 0, t.length as usize);
    storage
        .write_at(t.offset, IoBuf::from_slice(&bytes), false)
        .await
        .map_err(|e| Error::io("chunk table write", e))?;
    let bitmap = s.bitmap();
    if let Some((_, bits)) = &s.bitmap {
        let b = h.region(Region::Bitmap);
        let mut bytes = bits.clone();
        bytes.resize(b.length as usize, 0);
        storage
            .write_at(b.offset, IoBuf::from_slice(&bytes), false)
            .await
            .map_err(|e| Error::io("bitmap write", e))?;
    }
    meta::flush_storage(storage, stats).await?;
    let mut nh = h.clone();
    nh.journal_epoch = nh.journal_epoch.wrapping_add(1);
    nh.flags |= FLAG_CLEAN;
    if s.entry.has_bitmap() {
        nh.flags &= !FLAG_ALL_LOCAL;
    } else if h.base().is_some() {
        nh.flags |= FLAG_ALL_LOCAL;
    }
    meta::write_header(st, storage, stats, nh.clone()).await?;
    meta::flush_storage(storage, stats).await?;
    st.journal_pos = 0;
    st.synced_pos = 0;
    st.durable = Durable::new(bitmap, s.table.clone());
    let mut d = ds.dir.clone();
    d.applying = 0;
    write_dir(storage, &nh, ds, &d).await?;
    meta::flush_storage(storage, stats).await
}

/// A name qemu-img would take.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::arg("a snapshot name must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(Error::arg(format!(
            "snapshot name is longer than {MAX_NAME} bytes"
        )));
    }
    if name.contains('\0') {
        return Err(Error::arg("a snapshot name must not contain a NUL byte"));
    }
    Ok(())
}

fn now() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

impl Image {
    /// The image's snapshots, in creation order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.snapshots.current().dir.entries
    }

    /// The chunk table and metadata, or why this image has no snapshots.
    fn snapshot_parts(&self) -> Result<(&Compact, &Meta)> {
        match (self.map.compact(), &self.map.meta) {
            (Some(c), Some(m)) => Ok((c, m)),
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{}: internal snapshots need an image with a chunk table; make a copy with one: \
                     fvd convert -o compact=on IMAGE NEW (with -B BASE -F FMT to keep the base)",
                    self.describe()
                ),
            )),
        }
    }

    #[doc(hidden)]
    /// Switch a bug on (mutation checks of the simulator only).
    pub fn inject_snapshot_bug(&self, bug: SnapshotBug) {
        self.snapshots.bugs.fetch_or(bug as u32, Ordering::Relaxed);
        if bug == SnapshotBug::SkipSharedCopy
            && let Some(c) = self.map.compact()
        {
            c.set_skip_shared_copy();
        }
    }

    /// Punch physical chunks `phys` (runs of adjacent ones at once).
    async fn punch_phys(&self, c: &Compact, phys: &[u32]) -> Result<()> {
        let mut sorted = phys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let host = c.host_offset(sorted[i], 0);
            let len = (j - i) as u64 * c.chunk_size;
            self.zero_host(host, 0, len, true).await?;
            i = j;
        }
        Ok(())
    }

    /// Take a snapshot of the disk as it is now, named `name` (like
    /// `qemu-img snapshot -c`): requests in flight complete first, new ones
    /// wait; the snapshot holds every write completed before the call. Costs
    /// a copy of the chunk table (and bitmap), whatever the data.
    pub async fn create_snapshot(&self, name: &str) -> Result<Snapshot> {
        check_name(name)?;
        let (c, m) = self.snapshot_parts()?;
        self.check_writable()?;
        let _gate = self.gate.write().await;
        self.check_writable()?;
        let storage = self.storage.as_ref();
        // Fills become hard bits, then one round makes everything durable:
        // the snapshot never takes a bit whose data a crash could lose.
        m.harden_soft();
        m.commit(storage, &self.stats).await?;
        let mut st = m.commit.lock().await;
        m.check_poisoned()?;
        let mut ds = self.snapshots.current();
        let h = st.header.clone();
        let half = copy_len(&h)?;
        let cs = c.chunk_size;
        let live = c.table_snapshot();
        let bits = if self.map.base_range() > 0 {
            st.durable.bitmap.len()
        } else {
            0
        };
        let (date_sec, date_nsec) = now();
        let mut entry = SnapshotEntry {
            id: ds.dir.next_id(),
            name: name.to_string(),
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: self.map.virtual_size,
            icount: 0,
            flags: if bits > 0 { SNAP_HAS_BITMAP } else { 0 },
            table_chunk: 0,
            bitmap_chunk: 0,
            bitmap_bits: bits,
        };
        let mut dir = ds.dir.clone();
        dir.entries.push(entry.clone());
        dir.encode(0, half)?;
        // Counts after: one more for every chunk of the live table.
        let fresh = ds.dir.entries.is_empty();
        let high = live
            .iter()
            .filter(|&&p| p != EMPTY)
            .map(|&p| p as u64 + 1)
            .max()
            .unwrap_or(0);
        let old = if fresh { 0 } else { ds.dir.refcounts.entries };
        let need = high.max(old);
        let mut counts: Vec<u16> = (0..need)
            .map(|p| if fresh { 0 } else { c.refcount(p as u32) })
            .collect();
        for &p in live.iter().filter(|&&p| p != EMPTY) {
            let n = &mut counts[p as usize];
            *n = n.checked_add(1).ok_or_else(|| {
                Error::new(
                    ErrorKind::NoSpace,
                    format!("chunk {p} is already held by {} snapshots", u16::MAX),
                )
            })?;
        }
        let r4 = h.region(Region::Refcounts);
        let (loc, moved) = if !fresh && ds.dir.refcounts.entries >= need {
            (ds.dir.refcounts, false)
        } else if r4.length / 2 >= need {
            let loc = RefcountLocation {
                offset: r4.offset,
                entries: r4.length / 2,
            };
            (loc, fresh || ds.dir.refcounts != loc)
        } else {
            (RefcountLocation::default(), true)
        };
        // New chunks: the table copy, the bitmap copy, a grown refcount table.
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        // A failed fdatasync while growing poisons the image.
        let fatal = |e: &Error| m.mark_poisoned(e);
        let r = async {
            let t = c
                .allocate_run(storage, (live.len() as u64 * 4).div_ceil(cs), &fatal)
                .await?;
            entry.table_chunk = t.start;
            runs.push(t);
            if bits > 0 {
                let b = c
                    .allocate_run(storage, bits.div_ceil(8).div_ceil(cs), &fatal)
                    .await?;
                entry.bitmap_chunk = b.start;
                runs.push(b);
            }
            let mut loc = loc;
            if loc.entries == 0 {
                // Room to grow: a quarter more than needed, whole chunks.
                let want = (need + need / 4).max(2048);
                let n = (want * 2).div_ceil(cs);
                let run = c.allocate_run(storage, n, &fatal).await?;
                loc = RefcountLocation {
                    offset: c.host_offset(run.start as u32, 0),
                    entries: n * cs / 2,
                };
                runs.push(run);
            }
            // Encoded straight into the buffer the write takes: at 1 TiB
            // the table is 4 MiB, and every copy of it shows in the time.
            let mut tb = IoBuf::for_overwrite(live.len() * 4);
            encode_table_into(&live, &mut tb);
            self.write_meta(c.host_offset(entry.table_chunk as u32, 0), tb)
                .await?;
            if bits > 0 {
                let bb = st.durable.bitmap.to_bytes(bits.div_ceil(8) as usize);
                self.write_meta(
                    c.host_offset(entry.bitmap_chunk as u32, 0),
                    IoBuf::from_slice(&bb),
                )
                .await?;
            }
            let pages = (!moved).then(|| pages_of(live.iter().copied()));
            write_refcounts(storage, loc, &counts, pages).await?;
            Ok::<_, Error>(loc)
        }
        .await;
        let loc = match r {
            Ok(loc) => loc,
            Err(e) => {
                for run in runs {
                    c.free_chunks(run.map(|p| p as u32), 0);
                }
                return Err(e);
            }
        };
        let old_run = if moved && !fresh {
            refcount_run(&h, &ds.dir)
        } else {
            None
        };
        *dir.entries.last_mut().expect("just pushed") = entry.clone();
        dir.refcounts = loc;
        // Commit point: the directory naming the snapshot (for the first
        // one, the header setting the feature after it).
        let committed = async {
            meta::flush_storage(storage, &self.stats).await?;
            write_dir(storage, &h, &mut ds, &dir).await?;
            meta::flush_storage(storage, &self.stats).await?;
            if !ds.enabled {
                let mut nh = st.header.clone();
                nh.incompatible |= INCOMPAT_SNAPSHOTS;
                meta::write_header(&mut st, storage, &self.stats, nh).await?;
                meta::flush_storage(storage, &self.stats).await?;
                ds.enabled = true;
            }
            Ok(())
        }
        .await;
        if let Err(e) = committed {
            // Old or new: the image must be reopened to know.
            return m.poison(e);
        }
        for (p, &n) in counts.iter().enumerate() {
            if c.refcount(p as u32) != n {
                c.set_refcount(p as u32, n);
            }
        }
        self.snapshots.set(ds);
        if let Some(run) = old_run {
            let phys: Vec<u32> = run.map(|p| p as u32).collect();
            self.punch_phys(c, &phys).await?;
            c.free_chunks(phys, m.rounds_done());
        }
        Ok(entry)
    }

    /// Write snapshot metadata bytes at host offset `host`.
    async fn write_meta(&self, host: u64, bytes: IoBuf) -> Result<()> {
        self.storage
            .write_at(host, bytes, false)
            .await
            .map_err(|e| Error::io(format!("{}: snapshot metadata write", self.describe()), e))?;
        Ok(())
    }

    /// Delete the snapshot `sel` selects (like `qemu-img snapshot -d`):
    /// chunks only it held are punched and reused.
    pub async fn delete_snapshot(&self, sel: &SnapshotSel) -> Result<Snapshot> {
        let (c, m) = self.snapshot_parts()?;
        self.check_writable()?;
        let _gate = self.gate.write().await;
        self.check_writable()?;
        let storage = self.storage.as_ref();
        m.commit(storage, &self.stats).await?;
        let mut st = m.commit.lock().await;
        m.check_poisoned()?;
        let mut ds = self.snapshots.current();
        let desc = self.describe();
        let entry = sel
            .find(&ds.dir.entries)
            .ok_or_else(|| sel.not_found(&desc))?
            .clone();
        let h = st.header.clone();
        let capacity = (storage
            .len()
            .map_err(|e| Error::io(format!("{desc}: size"), e))?)
        .saturating_sub(c.data_offset)
            / c.chunk_size;
        let view = read_view(storage, &h, capacity, &entry)
            .await
            .map_err(|e| e.context(&desc))?;
        let loc = ds.dir.refcounts;
        let mut counts: Vec<u16> = (0..loc.entries).map(|p| c.refcount(p as u32)).collect();
        for &p in view.table.iter().filter(|&&p| p != EMPTY) {
            match counts.get_mut(p as usize) {
                Some(n) if *n > 0 => *n -= 1,
                _ => {
                    return Err(Error::corrupt(format!(
                        "{desc}: snapshot {} uses chunk {p}, whose refcount is already 0 (run fvd check)",
                        entry.id
                    )));
                }
            }
        }
        let mut dir = ds.dir.clone();
        dir.entries.retain(|e| e.id != entry.id);
        let live = c.table_snapshot();
        let mut is_live = vec![false; c.high_water() as usize];
        for &p in live.iter().filter(|&&p| p != EMPTY) {
            if let Some(x) = is_live.get_mut(p as usize) {
                *x = true;
            }
        }
        // Chunks nothing uses once the snapshot is gone.
        let mut freed: Vec<u32> = view
            .table
            .iter()
            .copied()
            .filter(|&p| {
                p != EMPTY
                    && counts[p as usize] == 0
                    && !is_live.get(p as usize).copied().unwrap_or(false)
            })
            .collect();
        let cs = c.chunk_size;
        freed.extend(
            (entry.table_chunk..entry.table_chunk + entry.table_chunks(cs)).map(|p| p as u32),
        );
        if entry.has_bitmap() {
            freed.extend(
                (entry.bitmap_chunk..entry.bitmap_chunk + entry.bitmap_chunks(cs))
                    .map(|p| p as u32),
            );
        }
        if dir.entries.is_empty() {
            // Without snapshots the refcounts mean nothing: back to the region.
            if let Some(run) = refcount_run(&h, &ds.dir) {
                freed.extend(run.map(|p| p as u32));
            }
            dir.refcounts = RefcountLocation {
                offset: h.region(Region::Refcounts).offset,
                entries: 0,
            };
        }
        let pages = pages_of(view.table.iter().copied());
        if self.snapshots.bug(SnapshotBug::EarlyFree) {
            // The mutation: counts and punches reach the disk before the
            // directory that makes them true.
            write_refcounts(storage, loc, &counts, Some(pages.clone())).await?;
            self.punch_phys(c, &freed).await?;
            meta::flush_storage(storage, &self.stats).await?;
        }
        // Commit point: the directory without the snapshot.
        let committed = async {
            write_dir(storage, &h, &mut ds, &dir).await?;
            meta::flush_storage(storage, &self.stats).await?;
            if dir.entries.is_empty() {
                let mut nh = st.header.clone();
                nh.incompatible &= !INCOMPAT_SNAPSHOTS;
                meta::write_header(&mut st, storage, &self.stats, nh).await?;
                meta::flush_storage(storage, &self.stats).await?;
                ds.enabled = false;
                ds.dir = Directory::default();
            }
            Ok(())
        }
        .await;
        if let Err(e) = committed {
            return m.poison(e);
        }
        for &p in view.table.iter().filter(|&&p| p != EMPTY) {
            c.set_refcount(p, counts[p as usize]);
        }
        self.snapshots.set(ds);
        // Lower counts on disk (until then they are too high: a leak), then
        // give the space back.
        let mut r = Ok(());
        if !dir.entries.is_empty() {
            r = write_refcounts(storage, loc, &counts, Some(pages)).await;
        }
        let punched = self.punch_phys(c, &freed).await;
        c.free_chunks(freed, m.rounds_done());
        r.and(punched)?;
        Ok(entry)
    }

    /// Revert the disk to the snapshot `sel` selects (like `qemu-img
    /// snapshot -a`): afterwards it reads exactly as when the snapshot was
    /// taken, and what was written since is gone. The image is consumed:
    /// open it again to use it.
    pub async fn apply_snapshot(self, sel: &SnapshotSel) -> Result<Snapshot> {
        let (c, m) = self.snapshot_parts()?;
        self.check_writable()?;
        let storage = self.storage.as_ref();
        m.commit(storage, &self.stats).await?;
        let mut st = m.commit.lock().await;
        m.check_poisoned()?;
        let mut ds = self.snapshots.current();
        let desc = self.describe();
        let entry = sel
            .find(&ds.dir.entries)
            .ok_or_else(|| sel.not_found(&desc))?
            .clone();
        let h = st.header.clone();
        let capacity = (storage
            .len()
            .map_err(|e| Error::io(format!("{desc}: size"), e))?)
        .saturating_sub(c.data_offset)
            / c.chunk_size;
        let view = read_view(storage, &h, capacity, &entry)
            .await
            .map_err(|e| e.context(&desc))?;
        // Commit point: the directory says the image is becoming the snapshot.
        let mut dir = ds.dir.clone();
        dir.applying = entry.id;
        let r = async {
            write_dir(storage, &h, &mut ds, &dir).await?;
            meta::flush_storage(storage, &self.stats).await?;
            finish_apply(storage, &self.stats, &mut st, &mut ds, &view).await
        }
        .await;
        if let Err(e) = r {
            return m.poison(e);
        }
        // The old live chunks no snapshot holds are garbage now.
        let mut in_snap = vec![false; c.high_water() as usize];
        for &p in view.table.iter().filter(|&&p| p != EMPTY) {
            if let Some(x) = in_snap.get_mut(p as usize) {
                *x = true;
            }
        }
        let garbage: Vec<u32> = c
            .table_snapshot()
            .into_iter()
            .filter(|&p| {
                p != EMPTY
                    && c.refcount(p) == 0
                    && !in_snap.get(p as usize).copied().unwrap_or(false)
            })
            .collect();
        self.closed.store(true, Ordering::Release);
        self.punch_phys(c, &garbage).await?;
        meta::flush_storage(storage, &self.stats).await?;
        Ok(entry)
    }
}
