//! Copy-on-read and fills from the base: data read from the base is written
//! into the image so it is never fetched twice.
//!
//! A fill is a *soft* write: it sets `local` bits in memory only (compact
//! images journal the table entry of a chunk a fill allocates, because later
//! guest writes into that chunk depend on it). It never overwrites a guest
//! write: the blocks are locked and re-checked before the fill is written,
//! and a guest write to a block being filled waits for the lock. Fills in
//! flight are bounded by `max_cor_bytes`; beyond it a read simply is not
//! copied. With a background spawner (the NBD server's runtime) the fill runs
//! after the guest read has been answered; otherwise it completes before the
//! read returns.
//!
//! Until a fill has written its blocks and set their bits, a copy of the
//! base data it fetched stays in `CorState::pending`: a guest read of those
//! blocks in that window is answered from it instead of fetching them from
//! the base again (guests re-read blocks within milliseconds, e.g. through
//! the page cache and the buffer cache of the same disk). This is correct
//! because the base never changes and only reads mapped to the base look
//! there.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::Image;
use super::read::part;
use crate::error::Result;
use crate::executor::Spawner;
use crate::iobuf::IoBuf;

pub(crate) struct Background {
    image: Weak<Image>,
    spawn: Spawner,
}

/// Copy-on-read switch, the bound on bytes in flight, and the base data of
/// fills in flight.
pub(crate) struct CorState {
    enabled: AtomicBool,
    inflight: AtomicU64,
    max: u64,
    /// Base data of unfinished fills, keyed by (virtual start, fill number).
    /// Its size is bounded by `max`. Lock order: a leaf (never held across an
    /// await or while taking another lock).
    pending: Mutex<BTreeMap<(u64, u64), Arc<IoBuf>>>,
    next_fill: AtomicU64,
}

impl CorState {
    pub fn new(enabled: bool, max: u64) -> Self {
        CorState {
            enabled: AtomicBool::new(enabled),
            inflight: AtomicU64::new(0),
            max: max.max(1 << 20),
            pending: Mutex::new(BTreeMap::new()),
            next_fill: AtomicU64::new(0),
        }
    }

    /// Copy `[offset, offset + out.len())` out of the data of a fill in
    /// flight that covers all of it; false if none does.
    fn copy_pending(&self, offset: u64, out: &mut [u8]) -> bool {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + out.len() as u64;
        let hit = pending
            .range(..=(offset, u64::MAX))
            .rev()
            .find(|((start, _), data)| start + data.len() as u64 >= end);
        match hit {
            Some(((start, _), data)) => {
                out.copy_from_slice(&data[part(*start, offset, end)]);
                true
            }
            None => false,
        }
    }

    /// Keep a copy of `data` (base bytes at `start`) until [`Self::forget`].
    fn remember(&self, start: u64, data: &[u8]) -> (u64, u64) {
        let key = (start, self.next_fill.fetch_add(1, Ordering::Relaxed));
        let copy = Arc::new(IoBuf::from_slice(data));
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(key, copy);
        key
    }

    fn forget(&self, key: (u64, u64)) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.remove(&key);
    }

    fn try_reserve(&self, n: u64) -> bool {
        let mut cur = self.inflight.load(Ordering::Acquire);
        loop {
            if cur + n > self.max {
                return false;
            }
            match self
                .inflight
                .compare_exchange(cur, cur + n, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn release(&self, n: u64) {
        self.inflight.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Image {
    /// Turn copy-on-read on or off (the image's default comes from its header).
    pub fn set_copy_on_read(&self, on: bool) {
        self.cor.enabled.store(
            on && !self.read_only && self.map.meta.is_some(),
            Ordering::Release,
        );
    }

    /// True if reads of base data copy it into the image.
    pub fn copy_on_read(&self) -> bool {
        self.cor.enabled.load(Ordering::Acquire)
    }

    /// Let copy-on-read fills run after the guest read returns, on `spawn`.
    pub fn enable_background(self: &Arc<Self>, spawn: Spawner) {
        let _ = self.background.set(Background {
            image: Arc::downgrade(self),
            spawn,
        });
    }

    /// Guest requests served so far.
    pub fn foreground_ops(&self) -> u64 {
        self.foreground_ops.load(Ordering::Relaxed)
    }

    /// True while a guest request (read, write, zeroing, discard) is being
    /// served.
    pub(crate) fn guest_in_flight(&self) -> bool {
        self.stats.requests_in_flight.load(Ordering::Relaxed) > 0
    }

    /// Read base data for the guest into `out`, recording the profile and
    /// copying it into the image when copy-on-read is on.
    pub(crate) async fn read_from_base(&self, offset: u64, mut out: IoBuf) -> Result<IoBuf> {
        let len = out.len() as u64;
        self.record_profile(offset, len);
        if !self.copy_on_read() {
            return self.read_base(offset, out).await;
        }
        if self.cor.copy_pending(offset, &mut out) {
            self.stats.cor_pending_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(out);
        }
        let bs = self.map.block_size;
        let blocks = self.map.blocks_of(offset, len);
        if blocks.is_empty() {
            // The base was detached (prefetch done) after the request was
            // mapped: every block is in the image now.
            return self.read_image(offset, out).await;
        }
        let start = blocks.start * bs;
        let end = (blocks.end * bs).min(self.base_range());
        let n = end - start;
        if !self.cor.try_reserve(n) {
            self.stats.cor_skipped.fetch_add(1, Ordering::Relaxed);
            return self.read_base(offset, out).await;
        }
        // Widen to whole blocks so the fill can set their bits; the fill
        // keeps that buffer, the guest gets a copy of its part.
        let data = match self.base_bytes(start, n).await {
            Ok(d) => d,
            Err(e) => {
                self.cor.release(n);
                return Err(e);
            }
        };
        out.copy_from_slice(&data[part(start, offset, offset + len)]);
        let key = self.cor.remember(start, &data);
        match self
            .background
            .get()
            .and_then(|b| b.image.upgrade().map(|img| (img, b.spawn.clone())))
        {
            Some((img, spawn)) => spawn(Box::pin(async move {
                let _gate = img.enter().await;
                img.finish_cor(blocks, start, data, key).await;
            })),
            None => self.finish_cor(blocks, start, data, key).await,
        }
        Ok(out)
    }

    async fn finish_cor(&self, blocks: Range<u64>, start: u64, data: IoBuf, key: (u64, u64)) {
        let n = data.len() as u64;
        // A failed fill (no space, a write error) costs nothing but the copy:
        // the guest's read already has its data and the block stays in the base.
        if let Ok(filled) = self.fill_blocks(blocks, Some((start, data)), false).await {
            self.stats.cor_bytes.fetch_add(filled, Ordering::Relaxed);
        }
        // Only now are the bits set (or the fill abandoned, and the blocks
        // read from the base again): the copy is no longer needed.
        self.cor.forget(key);
        self.cor.release(n);
    }

    /// Copy the non-local blocks of `blocks` into the image, from `src`
    /// (data starting at virtual offset `.0`, written from its parts) or
    /// else from the base. `hard` fills are journaled like guest writes
    /// (offline prefetch, resumable); soft ones only set bits in memory.
    /// Returns the bytes written.
    pub(crate) async fn fill_blocks(
        &self,
        blocks: Range<u64>,
        src: Option<(u64, IoBuf)>,
        hard: bool,
    ) -> Result<u64> {
        let (filled, _) = self.fill_blocks_until(blocks, src, hard, &|| false).await?;
        Ok(filled)
    }

    /// [`Image::fill_blocks`] that asks `stop` before each run it would
    /// fetch from the base, and again once that fetch completed, and gives
    /// up when it says so (prefetch yielding to the guest): data fetched
    /// when `stop` turned true is dropped, not written. Returns the bytes
    /// written and whether it stopped early (then some of `blocks` may
    /// still be in the base).
    pub(crate) async fn fill_blocks_until(
        &self,
        blocks: Range<u64>,
        mut src: Option<(u64, IoBuf)>,
        hard: bool,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<(u64, bool)> {
        if self.map.meta.is_none() {
            return Ok((0, false));
        }
        let bs = self.map.block_size;
        let mut filled = 0;
        for missing in self.map.missing(blocks) {
            if src.is_none() && stop() {
                return Ok((filled, true));
            }
            let _g = self
                .lock_span(missing.start * bs, (missing.end - missing.start) * bs)
                .await;
            // Re-check under the lock: a guest write may have got there first.
            for still in self.map.missing(missing) {
                let s = still.start * bs;
                let e = (still.end * bs).min(self.base_range());
                if s >= e {
                    continue;
                }
                // The data: a part of `src` (given back after the write), or
                // fetched from the base.
                let (data, given) = match src.take() {
                    Some((start, buf)) => {
                        let w = buf.window();
                        (buf.narrow(part(start, s, e)), Some((start, w)))
                    }
                    None if stop() => return Ok((filled, true)),
                    None => (self.base_bytes(s, e - s).await?, None),
                };
                if given.is_none() && stop() {
                    // The base read was under way when the caller was told to
                    // stop (a guest request): drop the data rather than write
                    // it in front of the guest. Nothing was allocated or
                    // published yet, so the blocks simply stay in the base.
                    self.stats
                        .prefetch_dropped_bytes
                        .fetch_add(e - s, Ordering::Relaxed);
                    return Ok((filled, true));
                }
                let fresh = self.allocate(s, e - s).await?;
                let crcs = if hard {
                    self.map.block_crcs(still.clone(), s, &data)
                } else {
                    Vec::new()
                };
                let r = self.write_image(s, data, &fresh).await.and_then(|data| {
                    if let Some((start, w)) = given {
                        src = Some((start, self.rejoin(data, w)?));
                    }
                    Ok(())
                });
                if hard {
                    self.publish(r, fresh, still, &crcs)?;
                } else if let Err(err) = r {
                    self.map.release(fresh);
                    return Err(err);
                } else {
                    self.map.publish_soft(fresh, still);
                }
                filled += e - s;
            }
        }
        Ok((filled, false))
    }
}

impl Image {
    /// Copy the base data of `[offset, offset+len)` into the image (the
    /// NBD_CMD_CACHE / copy-on-read path). The bits it sets are *soft*: kept in
    /// memory only and never journaled, so after a crash those blocks are
    /// simply read from the base again. Never overwrites a guest write: the
    /// blocks are locked and re-checked before the fill is written. (In
    /// compact images a chunk the fill allocates is journaled, because a later
    /// guest write into the same chunk relies on its table entry.)
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        if self.map.meta.is_none() || self.read_only || self.base.is_none() {
            return Ok(());
        }
        self.check_writable()?;
        let _gate = self.enter().await;
        let blocks = self.map.blocks_of(offset, len);
        // Bounded work per step: at most this many blocks are filled at once.
        let step = (crate::format::layout::DEFAULT_MAX_COR_BYTES / self.map.block_size).max(1);
        let mut b = blocks.start;
        while b < blocks.end {
            let end = (b + step).min(blocks.end);
            let n = self.fill_blocks(b..end, None, false).await?;
            self.stats.cor_bytes.fetch_add(n, Ordering::Relaxed);
            b = end;
        }
        Ok(())
    }
}
