//! Writes: the direct path (a raw-file write), copy-on-write from the base,
//! chunk allocation, and publishing bits and table entries after the data.

use std::sync::atomic::Ordering;

use super::map::Allocation;
use super::{Image, Target};
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;

impl Image {
    /// Write `data` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let _req = self.stats.request();
        let t0 = self.latency.start();
        let r = self.write_untimed(offset, data, fua).await;
        self.latency.finish(t0);
        r
    }

    async fn write_untimed(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let len = data.len() as u64;
            if self.map.direct_write(offset, len) {
                self.write_image(offset, data, &Allocation::none()).await?;
                self.mark_dirty();
            } else {
                let _g = self.lock_span(offset, len).await;
                self.slow_write(offset, data).await?;
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Write bytes that live in the image. In compact images every chunk must
    /// be allocated, in the table or in `fresh` (allocated, not yet published).
    pub(super) async fn write_image(
        &self,
        offset: u64,
        data: &[u8],
        fresh: &Allocation,
    ) -> Result<()> {
        for run in self
            .map
            .image_runs(offset, data.len() as u64, fresh.chunks())
        {
            let part = &data[(run.start - offset) as usize..(run.end() - offset) as usize];
            match run.target {
                Target::Host(host) => {
                    self.write_host(host, run.start, IoBuf::from_slice(part))
                        .await?
                }
                Target::Base | Target::Unallocated => {
                    return Err(Error::corrupt(format!(
                        "{}: the chunk at offset {} vanished during a write",
                        self.describe(),
                        run.start
                    )));
                }
            }
        }
        Ok(())
    }

    /// Write image bytes at host offset `host` (virtual offset `virt`, for messages).
    pub(super) async fn write_host(&self, host: u64, virt: u64, buf: IoBuf) -> Result<()> {
        let n = buf.len() as u64;
        self.storage
            .write_at(host, buf, false)
            .await
            .map_err(self.io_err("write", virt))?;
        self.stats.data_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.data_write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Allocate the unallocated chunks of `[offset, offset+len)` (span lock
    /// held). New chunks not wholly covered by the range are zeroed first, so
    /// their untouched parts read as zeros whatever the storage held before.
    pub(super) async fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        let a = self
            .map
            .allocate(self.storage.as_ref(), &self.stats, offset, len)
            .await?;
        for (host, virt, n) in self.map.partial_chunks(&a, offset, len) {
            if let Err(e) = self.zero_host(host, virt, n, true).await {
                self.map.release(a);
                return Err(e);
            }
        }
        Ok(a)
    }

    /// The bytes a copy-on-write of `[offset, end)` must write around the
    /// data: the missing head and tail of its partial blocks, as they read
    /// now (from the base).
    pub(super) async fn cow_edges(&self, offset: u64, end: u64) -> Result<(Vec<u8>, Vec<u8>)> {
        let (head, tail) = self.map.cow_edges(offset, end);
        Ok((
            self.read_current(head.start, head.end - head.start).await?,
            self.read_current(tail.start, tail.end - tail.start).await?,
        ))
    }

    /// Copy-on-write + allocation of `[offset, offset+data.len())`, span lock held.
    async fn slow_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let end = offset + len;
        let blocks = self.map.blocks_of(offset, len);
        let (head, tail) = self.cow_edges(offset, end).await?;
        let start = offset - head.len() as u64;
        let fresh = self
            .allocate(start, head.len() as u64 + len + tail.len() as u64)
            .await?;
        let r = if head.is_empty() && tail.is_empty() {
            self.write_image(offset, data, &fresh).await
        } else {
            let mut buf = Vec::with_capacity(head.len() + data.len() + tail.len());
            buf.extend_from_slice(&head);
            buf.extend_from_slice(data);
            buf.extend_from_slice(&tail);
            self.write_image(start, &buf, &fresh).await
        };
        self.publish(r, fresh, blocks)
    }

    /// Publish after write, or give the chunks back if the write failed.
    pub(super) fn publish(
        &self,
        r: Result<()>,
        fresh: Allocation,
        blocks: std::ops::Range<u64>,
    ) -> Result<()> {
        match r {
            Ok(()) => {
                self.map.publish(fresh, blocks);
                Ok(())
            }
            Err(e) => {
                self.map.release(fresh);
                Err(e)
            }
        }
    }
}
