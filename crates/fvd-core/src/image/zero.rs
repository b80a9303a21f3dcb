//! write_zeroes and discard: zeroing in place, copy-on-write of partial
//! base blocks, and freeing whole chunks of compact images.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::map::{Allocation, Frees, ZeroPiece};
use super::{Image, Target};
use crate::error::Result;

impl Image {
    /// Make `[offset, offset+len)` read as zeros; with `unmap` the space may be freed.
    pub async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, fua: bool) -> Result<()> {
        let _req = self.stats.request();
        self.write_zeroes_counted(offset, len, unmap, fua).await
    }

    async fn write_zeroes_counted(
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
            let _gate = self.enter().await;
            if self.map.direct_zero(offset, len, unmap) {
                self.zero_image(offset, len, unmap, &Allocation::none())
                    .await?;
                self.mark_dirty();
            } else {
                let _g = self.lock_span(offset, len).await;
                self.slow_zero(offset, len, unmap).await?;
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Discard a range: it reads as zeros afterwards and its space is freed
    /// where the storage allows.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false).await
    }

    /// Zeroing that copies partial base blocks, allocates, or frees chunks
    /// (span locked), piece by piece as the mapping says.
    async fn slow_zero(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.map
            .prepare_rewrite(
                self.storage.as_ref(),
                &self.stats,
                self.map.blocks_of(offset, len),
            )
            .await?;
        let mut frees = Frees::default();
        let mut failed = None;
        for (s, e, blocks, piece) in self.map.zero_pieces(offset, len, unmap) {
            let r = match piece {
                ZeroPiece::Free { chunk } => {
                    self.map.free_chunk(&mut frees, chunk, blocks);
                    Ok(())
                }
                ZeroPiece::InImage => {
                    let r = self.zero_image(s, e - s, unmap, &Allocation::none()).await;
                    if r.is_ok() {
                        let crcs = self.zero_crcs(blocks.clone(), s, e, &[], &[]);
                        self.map.publish_hard(blocks, &crcs);
                    }
                    r
                }
                ZeroPiece::CopyOnWrite => self.copy_on_write_zeroes(s, e, blocks, unmap).await,
            };
            if let Err(err) = r {
                failed = Some(err);
                break;
            }
        }
        // Give the space back now, in runs of physically adjacent chunks (so
        // small chunks sharing a file-system block free it): nothing can
        // reuse them before their free is durable, and zeros are what a
        // discard reads.
        if let Some(c) = self.map.compact()
            && let Err(e) = self.punch_chunks(c, frees.physical(), offset).await
        {
            // Some of them may still hold their data: a later allocation
            // must zero them, not trust them to read zeros.
            c.mark_dirty(frees.physical());
            failed.get_or_insert(e);
        }
        // Publish the frees done so far even after an error: the chunks are
        // unmapped in memory, so their free must reach the journal, and they
        // become reusable only once it is durable.
        let freed = self.map.publish_frees(frees);
        self.stats.chunks_freed.fetch_add(freed, Ordering::Relaxed);
        failed.map_or(Ok(()), Err)
    }

    /// Zeros over `[s, e)` where partial blocks are still in the base: copy
    /// their missing edges from the base, zero the rest, then publish.
    async fn copy_on_write_zeroes(
        &self,
        s: u64,
        e: u64,
        blocks: Range<u64>,
        unmap: bool,
    ) -> Result<()> {
        let (head, tail) = self.cow_edges(s, e).await?;
        let start = s - head.len() as u64;
        let fresh = self
            .allocate(start, head.len() as u64 + (e - s) + tail.len() as u64)
            .await?;
        let crcs = self.zero_crcs(blocks.clone(), s, e, &head, &tail);
        let r = async {
            if !head.is_empty() {
                self.write_image(start, head, &fresh).await?;
            }
            self.zero_image(s, e - s, unmap, &fresh).await?;
            if !tail.is_empty() {
                self.write_image(e, tail, &fresh).await?;
            }
            Ok(())
        }
        .await;
        self.publish(r, fresh, blocks, &crcs)
    }

    /// CRCs of the blocks a zeroing of `[s, e)` holds whole, with `head`
    /// written just before `s` and `tail` just after `e`.
    fn zero_crcs(
        &self,
        blocks: Range<u64>,
        s: u64,
        e: u64,
        head: &[u8],
        tail: &[u8],
    ) -> Vec<Option<u32>> {
        let start = s - head.len() as u64;
        let end = e + tail.len() as u64;
        blocks
            .map(|b| {
                let r = self.map.block_span(b);
                if r.start < start || r.end > end || r.start >= r.end {
                    return None;
                }
                // The block's bytes: part of head, zeros, part of tail.
                let mut crc = 0u32;
                let h = r.start.max(start)..r.end.min(s);
                if h.start < h.end {
                    let a = (h.start - start) as usize;
                    crc = crc32c::crc32c_append(crc, &head[a..a + (h.end - h.start) as usize]);
                }
                let z = r.start.max(s)..r.end.min(e);
                if z.start < z.end {
                    crc = crate::meta::zeros_crc_append(crc, z.end - z.start);
                }
                let t = r.start.max(e)..r.end;
                if t.start < t.end {
                    let a = (t.start - e) as usize;
                    crc = crc32c::crc32c_append(crc, &tail[a..a + (t.end - t.start) as usize]);
                }
                Some(crc)
            })
            .collect()
    }

    /// Make image-resident bytes read as zeros (unallocated chunks already do).
    pub(super) async fn zero_image(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fresh: &Allocation,
    ) -> Result<()> {
        for run in self.map.image_runs(offset, len, fresh.chunks()) {
            if let Target::Host(host) = run.target {
                self.zero_host(host, run.start, run.len, unmap).await?;
            }
        }
        Ok(())
    }

    /// Zero image bytes at host offset `host` (virtual offset `virt`, for
    /// messages): punched with `unmap`, else zeroed in place (partial
    /// sectors of an encrypted image are patched).
    pub(super) async fn zero_host(
        &self,
        host: u64,
        virt: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        match &self.crypt {
            Some(c) => self.zero_encrypted(c, host, virt, len, unmap).await,
            None => self.zero_storage(host, virt, len, unmap).await,
        }
    }

    /// Zero the storage at host offset `host`, as [`Image::zero_host`]
    /// without encryption.
    pub(super) async fn zero_storage(
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
