//! Writes: the direct path (a raw-file write), copy-on-write from the base,
//! chunk allocation, and publishing bits and table entries after the data.
//!
//! The caller's buffer is what the storage writes: each run of the mapping
//! gets its part of it (no copy; an encrypted image encrypts whole sectors
//! of it in place). Only a copy-on-write with partial blocks at its edges
//! copies, into one buffer holding head, data and tail, so that the blocks
//! reach the image in one write.

use std::sync::atomic::Ordering;

use super::map::Allocation;
use super::read::part;
use super::{Image, Target};
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;

impl Image {
    /// Write `buf` at `offset`; with `fua` it is durable on return. Gives
    /// the buffer back for reuse, its content unspecified (an encrypted
    /// image encrypts whole sectors in place); on error it is dropped.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf> {
        let t0 = self.latency.start();
        let r = self.write_untimed(offset, buf, fua).await;
        self.latency.finish(t0);
        r
    }

    async fn write_untimed(&self, offset: u64, mut buf: IoBuf, fua: bool) -> Result<IoBuf> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, buf.len() as u64)?;
        if !buf.is_empty() {
            let len = buf.len() as u64;
            if self.map.direct_write(offset, len) {
                buf = self.write_image(offset, buf, &Allocation::none()).await?;
                self.mark_dirty();
            } else {
                let _g = self.lock_span(offset, len).await;
                buf = self.slow_write(offset, buf).await?;
            }
        }
        if fua {
            self.flush().await?;
        }
        Ok(buf)
    }

    /// Write `buf`, bytes that live in the image, at `offset`. In compact
    /// images every chunk must be allocated, in the table or in `fresh`
    /// (allocated, not yet published).
    pub(super) async fn write_image(
        &self,
        offset: u64,
        mut buf: IoBuf,
        fresh: &Allocation,
    ) -> Result<IoBuf> {
        let whole = buf.window();
        for run in self
            .map
            .image_runs(offset, buf.len() as u64, fresh.chunks())
        {
            let host = match run.target {
                Target::Host(host) => host,
                Target::Base | Target::Unallocated => {
                    return Err(Error::corrupt(format!(
                        "{}: the chunk at offset {} vanished during a write",
                        self.describe(),
                        run.start
                    )));
                }
            };
            let p = buf.narrow(part(offset, run.start, run.end()));
            let p = self.write_host(host, run.start, p).await?;
            buf = self.rejoin(p, whole)?;
        }
        Ok(buf)
    }

    /// Write image bytes at host offset `host` (virtual offset `virt`, for
    /// messages), encrypted in an encrypted image (in place: the buffer
    /// given back then holds ciphertext).
    pub(super) async fn write_host(&self, host: u64, virt: u64, buf: IoBuf) -> Result<IoBuf> {
        match &self.crypt {
            Some(c) => self.write_encrypted(c, host, virt, buf).await,
            None => self.write_storage(host, virt, buf).await,
        }
    }

    /// Write `buf` to the storage at host offset `host`, as it is.
    pub(super) async fn write_storage(&self, host: u64, virt: u64, buf: IoBuf) -> Result<IoBuf> {
        let n = buf.len() as u64;
        let buf = self
            .storage
            .write_at(host, buf, false)
            .await
            .map_err(self.io_err("write", virt))?;
        self.stats.data_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.data_write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(buf)
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
    pub(super) async fn cow_edges(&self, offset: u64, end: u64) -> Result<(IoBuf, IoBuf)> {
        let (head, tail) = self.map.cow_edges(offset, end);
        Ok((
            self.read_current(head.start, head.end - head.start).await?,
            self.read_current(tail.start, tail.end - tail.start).await?,
        ))
    }

    /// Copy-on-write + allocation of `[offset, offset+data.len())`, span lock held.
    async fn slow_write(&self, offset: u64, data: IoBuf) -> Result<IoBuf> {
        let len = data.len() as u64;
        let end = offset + len;
        let blocks = self.map.blocks_of(offset, len);
        let (head, tail) = self.cow_edges(offset, end).await?;
        let start = offset - head.len() as u64;
        let fresh = self
            .allocate(start, head.len() as u64 + len + tail.len() as u64)
            .await?;
        if head.is_empty() && tail.is_empty() {
            let r = self.write_image(offset, data, &fresh).await;
            return self.publish(r, fresh, blocks);
        }
        // Whole blocks in one write: head, data and tail merged.
        let mut merged = IoBuf::for_overwrite(head.len() + data.len() + tail.len());
        let (h, rest) = merged.split_at_mut(head.len());
        let (d, t) = rest.split_at_mut(data.len());
        h.copy_from_slice(&head);
        d.copy_from_slice(&data);
        t.copy_from_slice(&tail);
        let r = self.write_image(start, merged, &fresh).await;
        self.publish(r, fresh, blocks)?;
        Ok(data)
    }

    /// Publish after write, or give the chunks back if the write failed.
    pub(super) fn publish<T>(
        &self,
        r: Result<T>,
        fresh: Allocation,
        blocks: std::ops::Range<u64>,
    ) -> Result<T> {
        match r {
            Ok(v) => {
                self.map.publish(fresh, blocks);
                Ok(v)
            }
            Err(e) => {
                self.map.release(fresh);
                Err(e)
            }
        }
    }
}

impl Image {
    /// Write a slice at `offset`: a copy into a buffer from the pool, then
    /// [`Image::write`]. For callers whose data is borrowed (tests, a FUSE
    /// request buffer); transports that own their data pass it to
    /// [`Image::write`] without the copy.
    pub async fn write_slice(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.write(offset, IoBuf::from_slice(data), fua)
            .await
            .map(drop)
    }
}
