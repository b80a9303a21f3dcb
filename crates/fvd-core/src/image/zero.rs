//! write_zeroes and discard: zeroing in place, copy-on-write of partial
//! base blocks, and freeing whole chunks of compact images.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::Image;
use super::compact::{Compact, EMPTY};
use super::write::table_records;
use crate::error::Result;
use crate::meta::Meta;

impl Image {
    /// Make `[offset, offset+len)` read as zeros; with `unmap` the space may be freed.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<()> {
        let t0 = self.latency.start();
        let r = self.write_zeroes_untimed(offset, len, unmap, fua).await;
        self.latency.finish(t0);
        r
    }

    pub(super) async fn write_zeroes_untimed(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<()> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, len)?;
        if len > 0 {
            if self.needs_slow_path(offset, len) || (unmap && self.frees_chunks(offset, len)) {
                let _g = self.lock_span(offset, len).await;
                self.slow_zero(offset, len, unmap).await?;
            } else {
                self.zero_local(offset, len, unmap).await?;
                self.mark_dirty();
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// True if the range covers a whole allocated chunk (compact images).
    pub(super) fn frees_chunks(&self, offset: u64, len: u64) -> bool {
        let Some(c) = &self.compact else { return false };
        let first = offset.div_ceil(c.chunk_size);
        let last = self.full_chunk_end(c, offset + len);
        (first..last).any(|ch| c.lookup(ch) != EMPTY)
    }

    /// One past the last chunk that `[.., end)` covers completely (the last
    /// chunk of the disk counts as covered when `end` is the disk's end).
    pub(super) fn full_chunk_end(&self, c: &Compact, end: u64) -> u64 {
        if end == self.geo.virtual_size {
            end.div_ceil(c.chunk_size)
        } else {
            end / c.chunk_size
        }
    }

    /// Zeroing that copies partial base blocks, allocates, or frees chunks.
    pub(super) async fn slow_zero(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let meta = self.meta.as_ref().expect("the slow path needs metadata");
        let end = offset + len;
        let Some(c) = &self.compact else {
            return self.sparse_slow_zero(meta, offset, len, unmap).await;
        };
        let cs = c.chunk_size;
        // Chunks freed whole, and the blocks whose bits go with them (the
        // freed chunks are consecutive, so their blocks form one range).
        let mut freed = Vec::new();
        let mut freed_phys: Vec<u32> = Vec::new();
        let mut freed_blocks: Option<Range<u64>> = None;
        let mut failed = None;
        for ch in Self::chunks_of(c, offset, len) {
            let s = (ch * cs).max(offset);
            let e = ((ch + 1) * cs).min(end);
            let whole = s == ch * cs && ch < self.full_chunk_end(c, end);
            let blocks = self.blocks_of(s, e - s);
            let all_local = blocks.is_empty() || meta.local.all_set(blocks.clone());
            if whole && unmap {
                // Give the space back now: nothing can reuse the chunk before
                // its free is durable, and zeros are what a discard reads.
                let p = c.lookup(ch);
                if p != EMPTY {
                    let host = c.data_offset + p as u64 * cs;
                    if let Err(e) = self.zero_host(host, s, cs, true).await {
                        failed = Some(e);
                        break;
                    }
                }
                // Not reusable before the round that journals the free is
                // known: its record is queued only at the end (see below).
                let p_old = c.free(ch, u64::MAX);
                if p_old != EMPTY {
                    freed_phys.push(p_old);
                    freed.push((ch, EMPTY));
                    self.stats.chunks_freed.fetch_add(1, Ordering::Relaxed);
                }
                if !blocks.is_empty() {
                    let r = freed_blocks.get_or_insert(blocks.clone());
                    *r = r.start.min(blocks.start)..r.end.max(blocks.end);
                }
            } else if c.lookup(ch) != EMPTY && all_local {
                if let Err(e) = self.zero_local(s, e - s, unmap).await {
                    failed = Some(e);
                    break;
                }
                meta.publish_hard(blocks);
            } else if c.lookup(ch) == EMPTY && all_local {
                // An unallocated chunk already reads as zeros.
                meta.publish_hard(blocks);
            } else if let Err(e) = self.slow_write(s, &vec![0u8; (e - s) as usize]).await {
                // Partial blocks still in the base: a copy-on-write of zeros.
                failed = Some(e);
                break;
            }
        }
        // Publish the frees done so far even after an error: the chunks are
        // unmapped in memory, so their free must reach the journal, and they
        // become reusable only once it is durable.
        meta.publish_group(table_records(&freed), freed_blocks.unwrap_or(0..0));
        c.set_pending_round(&freed_phys, meta.next_round());
        failed.map_or(Ok(()), Err)
    }

    pub(super) async fn sparse_slow_zero(
        &self,
        meta: &Meta,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let end = offset + len;
        let blocks = self.blocks_of(offset, len);
        let (head, tail) = self.cow_edges(meta, offset, end, &blocks).await?;
        if !head.is_empty() {
            self.write_local(offset - head.len() as u64, &head, &[])
                .await?;
        }
        self.zero_local(offset, len, unmap).await?;
        if !tail.is_empty() {
            self.write_local(end, &tail, &[]).await?;
        }
        meta.publish_hard(blocks);
        Ok(())
    }

    /// Discard a range: it reads as zeros afterwards and its space is freed
    /// where the storage allows.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false).await
    }

    /// Make image-resident data read as zeros (unallocated chunks already do).
    pub(super) async fn zero_local(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let Some(c) = &self.compact else {
            return self
                .zero_host(self.geo.data_offset + offset, offset, len, unmap)
                .await;
        };
        let mut pos = offset;
        for chunk in Self::chunks_of(c, offset, len) {
            let e = ((chunk + 1) * c.chunk_size).min(offset + len);
            if let Some((p, _pin)) = c.pin(chunk) {
                self.zero_host(c.host_offset(p, pos), pos, e - pos, unmap)
                    .await?;
            }
            pos = e;
        }
        Ok(())
    }

    pub(super) async fn zero_host(
        &self,
        host: u64,
        virt: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let r = if unmap {
            self.storage.discard(host, len).await
        } else {
            self.storage.write_zeroes(host, len).await
        };
        r.map_err(self.io_err("zero", virt))
    }
}
