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
        let t0 = self.latency.start();
        let r = self.write_zeroes_untimed(offset, len, unmap, fua).await;
        self.latency.finish(t0);
        r
    }

    async fn write_zeroes_untimed(
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
        let mut frees = Frees::default();
        let mut failed = None;
        for (s, e, blocks, piece) in self.map.zero_pieces(offset, len, unmap) {
            let r = match piece {
                ZeroPiece::Free { chunk, storage } => {
                    // Give the space back now: nothing can reuse the chunk
                    // before its free is durable, and zeros are what a
                    // discard reads.
                    let r = match storage {
                        Some((host, n)) => self.zero_host(host, s, n, true).await,
                        None => Ok(()),
                    };
                    if r.is_ok() {
                        self.map.free_chunk(&mut frees, chunk, blocks);
                    }
                    r
                }
                ZeroPiece::InImage => {
                    let r = self.zero_image(s, e - s, unmap, &Allocation::none()).await;
                    if r.is_ok() {
                        self.map.publish_hard(blocks);
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
        self.publish(r, fresh, blocks)
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
