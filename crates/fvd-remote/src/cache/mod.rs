//! One cache per host for a remote base shared by many images
//! (`fvd cache serve`).
//!
//! [`CachedBase`] wraps any [`Base`] (an NBD export, an HTTP(S) URL, an S3
//! object) and keeps the blocks it reads in two local files under a cache
//! directory, named by the base's URL and validator ([`cache_key`]), so a
//! replaced object gets a new cache and never mixes with the old one:
//!
//! * `<key>.data` — a sparse file the size of the base; a cached block sits
//!   at its own offset;
//! * `<key>.sums` — the checksum table ([`table`]): one CRC-32C per block.
//!   An entry is the only record that a block is cached.
//!
//! # Invariants
//! * **Nothing unchecked is served.** Every block read from the data file
//!   is checked against its CRC; a mismatch (a flipped byte, a block a crash
//!   left half written, a punched block) drops the block and fetches it from
//!   the base again. So neither file needs an fdatasync: whatever a crash
//!   leaves, a block is either proven by its entry or fetched.
//! * **Fill order**: data first, then the entry; **eviction order**: entry
//!   first (zeroed), then the hole punched. A crash between the two leaves
//!   an absent entry over data (space reclaimed at the next open) or, for a
//!   fill, data without an entry (fetched again).
//! * **Eviction never drops a block under a reader.** Each block has a state
//!   word (`PRESENT`, a clock `REF` bit, a count of readers holding a pin,
//!   `EVICTING`). A reader pins a present block before reading it; the
//!   evictor takes a block only by swapping exactly `PRESENT` (no pin, not
//!   referenced since the hand last passed) for `EVICTING`, so no pin can be
//!   taken after that, and a fill of the block waits until its eviction has
//!   punched it.
//! * **One fetch per block.** A block is filled under its stripe lock, and
//!   re-checked under it, so readers of the same missing block (four VMs
//!   booting at once) wait for one fetch instead of each fetching it.
//! * **Size limit**: at most `max_bytes / block_size` blocks are cached
//!   (reserved before a fill); the clock hand evicts unpinned blocks to make
//!   room, and a fill that finds no room serves its data uncached.
//!
//! # Lock order
//! Stripe locks (async mutexes, in ascending stripe order) → the clock hand
//! (async mutex). The evictor takes no stripe lock (a filler waiting for
//! room holds its own), only the `EVICTING` state of its victim, which no
//! filler holds while waiting for the hand.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use fvd_core::Format;
use fvd_core::base::Base;
use fvd_core::iobuf::IoBuf;
use fvd_core::storage::file::FileOptions;
use fvd_core::storage::{AllocRun, FileStorage, IoFuture, Storage};
use fvd_core::{Error, ErrorKind, Result};
use sha2::Digest;
use tokio::sync::{Mutex, MutexGuard};

pub mod table;

use table::{ABSENT, ENTRY_SIZE, HEADER_SIZE, TableHeader};

/// Most cache blocks the default block size allows: 4 Mi blocks, so the
/// checksum table and the in-memory state take at most 32 MiB each.
pub const MAX_DEFAULT_BLOCKS: u64 = 4 << 20;

/// The default cache block size for a base of `size` bytes: 4 KiB (the
/// block size of images over bases up to 128 GiB, so a cache never fetches
/// more than the images ask for), doubled until the base has at most
/// [`MAX_DEFAULT_BLOCKS`] blocks.
pub fn default_block_size(size: u64) -> u64 {
    let mut bs = 4096u64;
    while size.div_ceil(bs) > MAX_DEFAULT_BLOCKS && bs < 16 << 20 {
        bs *= 2;
    }
    bs
}

/// Locks that serialise the fills of the blocks mapped to them.
const STRIPES: u64 = 4096;
/// Bytes of the base one stripe covers before the next takes over: a
/// large read locks a few dozen stripes, not one per block, and random
/// reads of different 64 KiB spans rarely wait for each other's fetch.
const STRIPE_SPAN: u64 = 64 << 10;

/// Most blocks stored (and reserved) at once by a fill.
const STORE_BLOCKS: u64 = 16;

const PRESENT: u32 = 1;
const REF: u32 = 2;
const PIN: u32 = 4;
/// Being evicted: its entry and data are being cleared.
const EVICTING: u32 = 1 << 31;

/// Where and how big a cache is.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The cache directory (created if missing).
    pub dir: PathBuf,
    /// Most bytes of cached data (`None`: no limit).
    pub max_bytes: Option<u64>,
    /// Bytes per cache block: a power of two from 4 KiB to 16 MiB
    /// (`None`: [`default_block_size`] of the base).
    pub block_size: Option<u64>,
}

/// Counters of a cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Bytes served from the cache.
    pub hit_bytes: AtomicU64,
    /// Bytes fetched from the base.
    pub fetched_bytes: AtomicU64,
    /// Cached blocks that failed their checksum (and were fetched again).
    pub bad_blocks: AtomicU64,
    /// Blocks evicted to stay under the size limit.
    pub evicted_blocks: AtomicU64,
    /// Bytes fetched but not cached (no room: every block pinned).
    pub uncached_bytes: AtomicU64,
}

/// The base's name as a cache is keyed by it: presigned-URL parameters
/// (`X-Amz-*`, which change at every signing) are left out, the rest of the
/// URL is kept as given.
pub fn key_url(url: &str) -> String {
    let Some((head, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.to_ascii_lowercase().starts_with("x-amz-"))
        .collect();
    if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    }
}

/// The name of the cache of the base at `url` with `validator`: the first
/// 32 hex digits of SHA-256(key URL ‖ NUL ‖ validator).
pub fn cache_key(url: &str, validator: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(key_url(url).as_bytes());
    h.update([0u8]);
    h.update(validator.as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The data file and checksum table of the cache `key` in `dir`.
pub fn cache_paths(dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{key}.data")),
        dir.join(format!("{key}.sums")),
    )
}

/// A base read through a local cache of its blocks.
pub struct CachedBase {
    base: Arc<dyn Base>,
    data: FileStorage,
    table: FileStorage,
    data_path: PathBuf,
    bs: u64,
    size: u64,
    max_blocks: u64,
    /// Per block: `PRESENT`, `REF`, pins (in units of `PIN`).
    state: Vec<AtomicU32>,
    /// Per block: the CRC-32C of its bytes (meaningful while `PRESENT`).
    crcs: Vec<AtomicU32>,
    stripes: Vec<Mutex<()>>,
    /// Blocks cached or reserved for a fill.
    used: AtomicU64,
    /// The clock hand (also serialises evictions).
    hand: Mutex<u64>,
    stats: CacheStats,
}

fn io_err(what: &Path, op: &str, e: io::Error) -> Error {
    Error::io(format!("{}: {op}", what.display()), e)
}

impl CachedBase {
    /// Open (or create) the cache of `base`, known as `url`, under
    /// `opts.dir`. Another process using the same cache makes this fail.
    pub async fn open(base: Arc<dyn Base>, url: &str, opts: &CacheOptions) -> Result<CachedBase> {
        let bs = opts
            .block_size
            .unwrap_or_else(|| default_block_size(base.size()));
        if !bs.is_power_of_two() || !(4096..=16 << 20).contains(&bs) {
            return Err(Error::invalid(format!(
                "cache block size {bs}: expected a power of two from 4 KiB to 16 MiB"
            )));
        }
        std::fs::create_dir_all(&opts.dir).map_err(|e| io_err(&opts.dir, "create", e))?;
        let validator = base.validator();
        let key = cache_key(url, &validator);
        let (data_path, table_path) = cache_paths(&opts.dir, &key);
        let size = base.size();
        let nblocks = size.div_ceil(bs);
        let header = TableHeader {
            block_size: bs as u32,
            base_size: size,
            url: key_url(url),
            validator,
        };
        let table = open_file(&table_path)?;
        let data = open_file(&data_path)?;
        let cache = CachedBase {
            base,
            data,
            table,
            data_path,
            bs,
            size,
            max_blocks: opts.max_bytes.map_or(u64::MAX, |m| m / bs),
            state: (0..nblocks).map(|_| AtomicU32::new(0)).collect(),
            crcs: (0..nblocks).map(|_| AtomicU32::new(0)).collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            used: AtomicU64::new(0),
            hand: Mutex::new(0),
            stats: CacheStats::default(),
        };
        cache.load(&header, &table_path).await?;
        Ok(cache)
    }

    /// Read the table (or start it empty), reclaim data no entry proves, and
    /// evict down to the limit.
    async fn load(&self, header: &TableHeader, table_path: &Path) -> Result<()> {
        let nblocks = self.state.len() as u64;
        let table_len = self
            .table
            .len()
            .map_err(|e| io_err(table_path, "size", e))?;
        let head = self
            .table
            .read_at(0, IoBuf::for_overwrite(HEADER_SIZE as usize))
            .await
            .map_err(|e| io_err(table_path, "read", e))?;
        let fresh = match TableHeader::decode(&head) {
            Ok(h) if h == *header && table_len >= table::table_len(nblocks) => false,
            Ok(_) if table_len > 0 => {
                eprintln!(
                    "fvd cache: {}: made for another base or block size; starting it empty",
                    table_path.display()
                );
                true
            }
            Err(why) if table_len > 0 => {
                eprintln!(
                    "fvd cache: {}: {why}; starting it empty",
                    table_path.display()
                );
                true
            }
            _ => true,
        };
        if fresh {
            let bytes = header.encode().map_err(Error::invalid)?;
            let set = async {
                self.table.set_len(0).await?;
                self.table
                    .set_len(table::table_len(nblocks).max(HEADER_SIZE))
                    .await?;
                self.table
                    .write_at(0, IoBuf::from_slice(&bytes), false)
                    .await?;
                self.data.set_len(0).await?;
                self.data.set_len(self.size).await?;
                self.table.flush().await
            };
            set.await.map_err(|e| io_err(table_path, "initialise", e))?;
            return Ok(());
        }
        // Entries, a megabyte at a time.
        let per = (1 << 20) / ENTRY_SIZE;
        let mut b = 0;
        while b < nblocks {
            let n = per.min(nblocks - b);
            let buf = self
                .table
                .read_at(
                    table::entry_offset(b),
                    IoBuf::for_overwrite((n * ENTRY_SIZE) as usize),
                )
                .await
                .map_err(|e| io_err(table_path, "read", e))?;
            for (i, e) in buf.chunks_exact(ENTRY_SIZE as usize).enumerate() {
                if let Some(crc) = table::decode_entry(e) {
                    self.crcs[b as usize + i].store(crc, Ordering::Relaxed);
                    self.state[b as usize + i].store(PRESENT, Ordering::Relaxed);
                    self.used.fetch_add(1, Ordering::Relaxed);
                }
            }
            b += n;
        }
        if self
            .data
            .len()
            .map_err(|e| io_err(&self.data_path, "size", e))?
            != self.size
        {
            self.data
                .set_len(self.size)
                .await
                .map_err(|e| io_err(&self.data_path, "resize", e))?;
        }
        self.reclaim_orphans()
            .await
            .map_err(|e| io_err(&self.data_path, "reclaim", e))?;
        while self.used.load(Ordering::Acquire) > self.max_blocks {
            if !self.evict_one().await {
                break;
            }
        }
        Ok(())
    }

    /// Punch the data of blocks without an entry (a crash between an
    /// eviction's two steps, or a fill's), so the limit counts what is there.
    async fn reclaim_orphans(&self) -> io::Result<()> {
        let runs = self.data.allocation(0, self.size).await?;
        let mut pos = 0;
        for AllocRun { length, data } in runs {
            if data {
                let blocks = pos / self.bs..(pos + length).div_ceil(self.bs);
                for r in runs_of(blocks, |b| !self.is_present(b)) {
                    let (s, e) = self.byte_range(r);
                    self.data.discard(s, e - s).await?;
                }
            }
            pos += length;
        }
        Ok(())
    }

    /// The cache's counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes of cached data (blocks cached or being filled).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Acquire) * self.bs
    }

    /// Bytes per cache block.
    pub fn block_size(&self) -> u64 {
        self.bs
    }

    /// The data file (the checksum table is beside it, `.sums`).
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// The stripe lock of block `b`.
    fn stripe(&self, b: u64) -> usize {
        ((b * self.bs / STRIPE_SPAN) % STRIPES) as usize
    }

    fn is_present(&self, b: u64) -> bool {
        self.state[b as usize].load(Ordering::Acquire) & PRESENT != 0
    }

    /// Bytes `[start, end)` of blocks `r` (the last one may be short).
    fn byte_range(&self, r: Range<u64>) -> (u64, u64) {
        (r.start * self.bs, (r.end * self.bs).min(self.size))
    }

    /// Pin block `b` if it is present (it cannot be evicted until unpinned).
    fn try_pin(&self, b: u64) -> bool {
        let st = &self.state[b as usize];
        let mut cur = st.load(Ordering::Acquire);
        loop {
            if cur & PRESENT == 0 {
                return false;
            }
            match st.compare_exchange_weak(
                cur,
                (cur + PIN) | REF,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn unpin(&self, b: u64) {
        self.state[b as usize].fetch_sub(PIN, Ordering::AcqRel);
    }

    /// Drop a block that failed its check (readers still holding pins keep
    /// them; they check what they read themselves).
    fn drop_bad(&self, b: u64) {
        let was = self.state[b as usize].fetch_and(!PRESENT, Ordering::AcqRel);
        if was & PRESENT != 0 {
            self.used.fetch_sub(1, Ordering::AcqRel);
            self.stats.bad_blocks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Copy the blocks of `data` (bytes of blocks `r`) that match their
    /// CRC into `out` (bytes from `out_start`); the others are returned.
    fn accept(&self, r: Range<u64>, data: &[u8], out: &mut [u8], out_start: u64) -> Vec<u64> {
        let mut bad = Vec::new();
        let (s, _) = self.byte_range(r.clone());
        for b in r {
            let (bs, be) = self.byte_range(b..b + 1);
            let bytes = &data[(bs - s) as usize..(be - s) as usize];
            if crc32c::crc32c(bytes) == self.crcs[b as usize].load(Ordering::Acquire) {
                out[(bs - out_start) as usize..(be - out_start) as usize].copy_from_slice(bytes);
                self.stats.hit_bytes.fetch_add(be - bs, Ordering::Relaxed);
            } else {
                bad.push(b);
            }
        }
        bad
    }

    /// Read blocks `r`, all pinned by the caller, from the data file into
    /// `out`; unpins them and returns those that failed their check.
    async fn read_pinned(
        &self,
        r: Range<u64>,
        out: &mut [u8],
        out_start: u64,
    ) -> io::Result<Vec<u64>> {
        let (s, e) = self.byte_range(r.clone());
        let read = self
            .data
            .read_at(s, IoBuf::for_overwrite((e - s) as usize))
            .await;
        let res = read.map(|data| self.accept(r.clone(), &data, out, out_start));
        for b in r {
            self.unpin(b);
        }
        res
    }

    /// The bytes of blocks `blocks`.
    async fn read_blocks(&self, blocks: Range<u64>) -> io::Result<IoBuf> {
        let (start, end) = self.byte_range(blocks.clone());
        let mut out = IoBuf::for_overwrite((end - start) as usize);
        let pinned: Vec<bool> = blocks.clone().map(|b| self.try_pin(b)).collect();
        let at = |b: u64| pinned[(b - blocks.start) as usize];
        let mut missing = Vec::new();
        for r in runs_of(blocks.clone(), at) {
            match self.read_pinned(r.clone(), &mut out, start).await {
                Ok(bad) => missing.extend(bad),
                Err(e) => {
                    // Unpin what is still pinned before giving up.
                    for b in blocks.clone().filter(|&b| at(b) && b >= r.end) {
                        self.unpin(b);
                    }
                    return Err(e);
                }
            }
        }
        missing.extend(blocks.clone().filter(|&b| !at(b)));
        missing.sort_unstable();
        let set: std::collections::BTreeSet<u64> = missing.iter().copied().collect();
        for r in runs_of(blocks, |b| set.contains(&b)) {
            self.fill(r, &mut out, start).await?;
        }
        Ok(out)
    }

    /// Lock the stripes of blocks `r`, in ascending order.
    async fn lock_stripes(&self, r: Range<u64>) -> Vec<MutexGuard<'_, ()>> {
        let mut ids: Vec<usize> = r.map(|b| self.stripe(b)).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut guards = Vec::with_capacity(ids.len());
        for i in ids {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }

    /// Bring blocks `r` (not read yet, or failed their check) into `out`:
    /// from the cache if another reader filled them meanwhile, else fetched
    /// from the base once and cached.
    async fn fill(&self, r: Range<u64>, out: &mut [u8], out_start: u64) -> io::Result<()> {
        let _locks = self.lock_stripes(r.clone()).await;
        let mut todo = Vec::new();
        for b in r.clone() {
            // Re-check under the lock: filled by another reader meanwhile,
            // or (a block that failed its check) refilled already.
            if self.try_pin(b) {
                if self.read_pinned(b..b + 1, out, out_start).await?.is_empty() {
                    continue;
                }
                self.drop_bad(b);
            }
            todo.push(b);
        }
        // A block still being evicted must not be written before its hole
        // is punched (the eviction takes a moment: two writes).
        for &b in &todo {
            while self.state[b as usize].load(Ordering::Acquire) & EVICTING != 0 {
                tokio::task::yield_now().await;
            }
        }
        let set: std::collections::BTreeSet<u64> = todo.into_iter().collect();
        for run in runs_of(r, |b| set.contains(&b)) {
            let (s, e) = self.byte_range(run.clone());
            let data = self
                .base
                .read_at(s, IoBuf::for_overwrite((e - s) as usize))
                .await?;
            self.stats.fetched_bytes.fetch_add(e - s, Ordering::Relaxed);
            out[(s - out_start) as usize..(e - out_start) as usize].copy_from_slice(&data);
            // Stored in pieces of at most STORE_BLOCKS, each reserved on its
            // own: a tiny limit still caches what fits.
            let mut b = run.start;
            while b < run.end {
                let piece = b..(b + STORE_BLOCKS.min(self.max_blocks).max(1)).min(run.end);
                b = piece.end;
                let (ps, pe) = self.byte_range(piece.clone());
                let n = piece.end - piece.start;
                if !self.reserve(n).await {
                    self.stats
                        .uncached_bytes
                        .fetch_add(pe - ps, Ordering::Relaxed);
                    continue;
                }
                let bytes = IoBuf::from_slice(&data[(ps - s) as usize..(pe - s) as usize]);
                if let Err(err) = self.store(piece.clone(), bytes).await {
                    // The reader has its data; the blocks simply stay uncached.
                    self.used.fetch_sub(n, Ordering::AcqRel);
                    eprintln!(
                        "fvd cache: {}: cannot cache blocks {}..{}: {err}",
                        self.data_path.display(),
                        piece.start,
                        piece.end
                    );
                }
            }
        }
        Ok(())
    }

    /// Write fetched blocks `r` (their space reserved) into the cache: data,
    /// then entries, then the in-memory bits.
    async fn store(&self, r: Range<u64>, data: IoBuf) -> io::Result<()> {
        let (s, _) = self.byte_range(r.clone());
        let mut entries = Vec::with_capacity(((r.end - r.start) * ENTRY_SIZE) as usize);
        let mut crcs = Vec::new();
        for b in r.clone() {
            let (bs, be) = self.byte_range(b..b + 1);
            let crc = crc32c::crc32c(&data[(bs - s) as usize..(be - s) as usize]);
            crcs.push(crc);
            entries.extend_from_slice(&table::encode_entry(crc));
        }
        self.data.write_at(s, data, false).await?;
        self.table
            .write_at(
                table::entry_offset(r.start),
                IoBuf::from_slice(&entries),
                false,
            )
            .await?;
        for (b, crc) in r.zip(crcs) {
            self.crcs[b as usize].store(crc, Ordering::Release);
            self.state[b as usize].fetch_or(PRESENT | REF, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Reserve room for `n` blocks, evicting others; false if there is none.
    async fn reserve(&self, n: u64) -> bool {
        if n > self.max_blocks {
            return false;
        }
        loop {
            let cur = self.used.load(Ordering::Acquire);
            if cur + n <= self.max_blocks {
                if self
                    .used
                    .compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            if !self.evict_one().await {
                return false;
            }
        }
    }

    /// Evict one cached block that no reader holds (clock: a referenced
    /// block gets a second chance). False if two turns found none.
    async fn evict_one(&self) -> bool {
        let n = self.state.len() as u64;
        if n == 0 {
            return false;
        }
        let mut hand = self.hand.lock().await;
        for _ in 0..2 * n {
            let b = *hand;
            *hand = (b + 1) % n;
            let st = &self.state[b as usize];
            let cur = st.load(Ordering::Acquire);
            if cur & PRESENT == 0 {
                continue;
            }
            if cur & REF != 0 {
                st.fetch_and(!REF, Ordering::AcqRel);
                continue;
            }
            // Exactly PRESENT: unpinned and not referenced since the hand
            // last passed. No pin can be taken once it is EVICTING, and a
            // fill of the block waits until it is 0 again.
            if st
                .compare_exchange(PRESENT, EVICTING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            // Entry first, then the hole: a crash between leaves data no
            // entry proves (reclaimed at the next open), never an entry
            // over a hole.
            let (s, e) = self.byte_range(b..b + 1);
            let r = async {
                self.table
                    .write_at(table::entry_offset(b), IoBuf::from_slice(&ABSENT), false)
                    .await?;
                self.data.discard(s, e - s).await
            };
            if let Err(err) = r.await {
                eprintln!(
                    "fvd cache: {}: evicting block {b}: {err}",
                    self.data_path.display()
                );
            }
            st.fetch_and(!EVICTING, Ordering::AcqRel);
            self.used.fetch_sub(1, Ordering::AcqRel);
            self.stats.evicted_blocks.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    async fn read(&self, offset: u64, mut buf: IoBuf) -> io::Result<IoBuf> {
        let end = offset.saturating_add(buf.len() as u64);
        let data_end = end.min(self.size);
        if offset >= data_end {
            buf.fill(0);
            return Ok(buf);
        }
        buf[(data_end - offset) as usize..].fill(0);
        let blocks = offset / self.bs..data_end.div_ceil(self.bs);
        let start = blocks.start * self.bs;
        let whole = self.read_blocks(blocks).await?;
        buf[..(data_end - offset) as usize]
            .copy_from_slice(&whole[(offset - start) as usize..(data_end - start) as usize]);
        Ok(buf)
    }
}

/// Open a cache file for reading and writing (created if missing), locked
/// exclusively: one server per cache.
fn open_file(path: &Path) -> Result<FileStorage> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, "create", e))?;
    FileStorage::open(path, FileOptions::read_write()).map_err(|e| {
        if e.kind() == ErrorKind::Busy {
            Error::new(
                ErrorKind::Busy,
                format!(
                    "{}: this cache is in use by another fvd cache serve",
                    path.display()
                ),
            )
        } else {
            e
        }
    })
}

/// The maximal runs of `r` whose blocks satisfy `f`.
fn runs_of(r: Range<u64>, f: impl Fn(u64) -> bool) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for b in r {
        if !f(b) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == b => last.end = b + 1,
            _ => out.push(b..b + 1),
        }
    }
    out
}

impl Base for CachedBase {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        Box::pin(self.read(offset, buf))
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.base.allocation(offset, len)
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn describe(&self) -> String {
        format!("cache of {}", self.base.describe())
    }
    fn validator(&self) -> String {
        self.base.validator()
    }
}

#[cfg(test)]
mod tests;
