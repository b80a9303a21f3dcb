//! Writes: the direct path (a raw-file write), copy-on-write from the base,
//! chunk allocation, and publishing bits and table entries after the data.
//!
//! The caller's buffer is what the storage writes: each run of the mapping
//! gets its part of it (no copy; an encrypted image encrypts whole sectors
//! of it in place). Only a copy-on-write with partial blocks at its edges
//! copies, into one buffer holding head, data and tail, so that the blocks
//! reach the image in one write.

use std::sync::atomic::Ordering;

use super::map::{Allocation, Fill};
use super::read::part;
use super::{Image, Target};
use crate::error::{Error, Result};
use crate::executor::join2;
use crate::format::journal::Record;
use crate::iobuf::{IoBuf, zero_runs};
use crate::storage::Transform;

impl Image {
    /// Write `buf` at `offset`; with `fua` it is durable on return. Gives
    /// the buffer back for reuse, its content unspecified (an encrypted
    /// image encrypts whole sectors in place); on error it is dropped.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf> {
        let _req = self.stats.request();
        self.write_counted(offset, buf, fua).await
    }

    async fn write_counted(&self, offset: u64, mut buf: IoBuf, fua: bool) -> Result<IoBuf> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, buf.len() as u64)?;
        if !buf.is_empty() {
            let _gate = self.enter().await;
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
        self.write_storage_after(host, virt, buf, None).await
    }

    /// `before` (the cipher) over `buf` next to the write
    /// ([`crate::storage::Storage::write_at_after`]), then
    /// [`Image::write_storage`].
    pub(super) async fn write_storage_after(
        &self,
        host: u64,
        virt: u64,
        buf: IoBuf,
        before: Option<Transform>,
    ) -> Result<IoBuf> {
        let n = buf.len() as u64;
        let write = match before {
            Some(f) => self.storage.write_at_after(host, buf, false, f),
            None => self.storage.write_at(host, buf, false),
        };
        let buf = write.await.map_err(self.io_err("write", virt))?;
        self.stats.data_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.data_write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(buf)
    }

    /// Allocate the unallocated chunks of `[offset, offset+len)`, and new
    /// chunks for those a snapshot shares (span lock held). Parts of them
    /// the range does not cover are filled first (`Mapping::fills`): zeroed
    /// in a fresh chunk, so they read as zeros whatever the storage held
    /// before; copied from the shared chunk into its replacement.
    pub(super) async fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        let a = self
            .map
            .allocate(self.storage.as_ref(), &self.stats, offset, len)
            .await?;
        for fill in self.map.fills(&a, offset, len) {
            let r = match fill {
                Fill::Zero {
                    host,
                    virt,
                    len,
                    unmap,
                } => self.zero_host(host, virt, len, unmap).await,
                Fill::Copy {
                    from,
                    to,
                    virt,
                    len,
                } => self.copy_host(from, to, virt, len).await,
            };
            if let Err(e) = r {
                self.map.release(a);
                return Err(e);
            }
        }
        Ok(a)
    }

    /// Copy `len` image bytes from host offset `from` to `to` (virtual
    /// offset `virt`, for messages), into zeroed storage: the copy of a
    /// chunk a snapshot shares. 4 KiB pages of zeros are not written (they
    /// read as zeros already), so a sparse chunk stays sparse. The one
    /// place data moves between chunks, so a transform of stored bytes
    /// (encryption by host offset) applies here.
    pub(super) async fn copy_host(&self, from: u64, to: u64, virt: u64, len: u64) -> Result<()> {
        const PIECE: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            // Through read_host: an encrypted chunk is decrypted with its
            // old tweaks here and encrypted with the new ones by write_host.
            let mut buf = self
                .read_host(from + done, virt + done, IoBuf::for_overwrite(n as usize))
                .await?;
            let whole = buf.window();
            for (r, zero) in zero_runs(&buf, to + done, 4096) {
                if zero {
                    continue;
                }
                let (host, v) = (to + done + r.start as u64, virt + done + r.start as u64);
                let p = self.write_host(host, v, buf.narrow(r)).await?;
                buf = self.rejoin(p, whole)?;
            }
            done += n;
        }
        Ok(())
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
        self.map
            .prepare_rewrite(self.storage.as_ref(), &self.stats, blocks.clone())
            .await?;
        let (head, tail) = self.cow_edges(offset, end).await?;
        let start = offset - head.len() as u64;
        let fresh = self
            .allocate(start, head.len() as u64 + len + tail.len() as u64)
            .await?;
        if head.is_empty() && tail.is_empty() {
            let mut crcs = self.map.block_crcs(blocks.clone(), offset, &data);
            if fresh.chunks().is_empty()
                && let Some(early) = self.early_records(blocks.clone(), &crcs)
            {
                return self.write_early(offset, data, blocks, &crcs, early).await;
            }
            let r = self.write_image(offset, data, &fresh).await;
            if r.is_ok() {
                self.checksum_partial_fills(blocks.clone(), &mut crcs).await;
            }
            return self.publish(r, fresh, blocks, &crcs);
        }
        // Whole blocks in one write: head, data and tail merged.
        let mut merged = IoBuf::for_overwrite(head.len() + data.len() + tail.len());
        let (h, rest) = merged.split_at_mut(head.len());
        let (d, t) = rest.split_at_mut(data.len());
        h.copy_from_slice(&head);
        d.copy_from_slice(&data);
        t.copy_from_slice(&tail);
        let mut crcs = self.map.block_crcs(blocks.clone(), start, &merged);
        let r = self.write_image(start, merged, &fresh).await;
        if r.is_ok() {
            self.checksum_partial_fills(blocks.clone(), &mut crcs).await;
        }
        self.publish(r, fresh, blocks, &crcs)?;
        Ok(data)
    }

    /// The commit lock and the record, if this write of whole blocks
    /// (none of them hard yet) may journal its bits alongside its data.
    fn early_records(
        &self,
        blocks: std::ops::Range<u64>,
        crcs: &[Option<u32>],
    ) -> Option<(
        tokio::sync::MutexGuard<'_, crate::meta::CommitState>,
        Record,
    )> {
        let m = self.map.meta.as_ref()?;
        // Cheap checks first: most slow writes of a busy image get no early
        // block, and they should not pay for building its record.
        if blocks.is_empty() || crcs.iter().any(Option::is_none) || !m.hard.none_set(blocks.clone())
        {
            return None;
        }
        let st = m.early_journal()?;
        Some((
            st,
            Record::SetBitsChecked {
                first: blocks.start,
                crcs: crcs.iter().flatten().copied().collect(),
            },
        ))
    }

    /// A copy-on-write of whole blocks whose record goes to an early
    /// journal block, written concurrently with the data (commit lock held
    /// until the bits are published: `meta/commit.rs`, "Early journal
    /// blocks").
    async fn write_early(
        &self,
        offset: u64,
        data: IoBuf,
        blocks: std::ops::Range<u64>,
        crcs: &[Option<u32>],
        (mut st, record): (
            tokio::sync::MutexGuard<'_, crate::meta::CommitState>,
            Record,
        ),
    ) -> Result<IoBuf> {
        let m = self.map.meta.as_ref().expect("early_records checked it");
        let records = [record];
        let (data_r, journal_r) = join2(
            self.write_image(offset, data, &Allocation::none()),
            m.write_early(&mut st, self.storage.as_ref(), &self.stats, &records),
        )
        .await;
        match (data_r, journal_r) {
            (Ok(buf), Ok(())) => {
                m.publish_early(blocks, crcs);
                Ok(buf)
            }
            // No early block: the bits wait for the next round as usual.
            (Ok(buf), Err(_)) => {
                drop(st);
                self.publish(Ok(buf), Allocation::none(), blocks, crcs)
            }
            (Err(e), Ok(())) => {
                m.revoke_early(blocks);
                Err(e)
            }
            (Err(e), Err(_)) => Err(e),
        }
    }

    /// Blocks a write covered only in part although they turn hard now were
    /// filled by copy-on-read (local, not hard): their other bytes are in
    /// the image. Checksum them as they are now (span locked, so nothing
    /// else writes them). A block that cannot be read keeps no CRC (its
    /// record then waits for its data, an ordered round).
    async fn checksum_partial_fills(&self, blocks: std::ops::Range<u64>, crcs: &mut [Option<u32>]) {
        let Some(m) = &self.map.meta else { return };
        for (i, b) in blocks.enumerate() {
            if crcs[i].is_some() || m.hard.get(b) || !m.local.get(b) {
                continue;
            }
            let span = self.map.block_span(b);
            if span.is_empty() {
                continue;
            }
            if let Ok(bytes) = self.read_current(span.start, span.end - span.start).await {
                crcs[i] = Some(crate::meta::block_crc(&bytes));
            }
        }
    }

    /// Publish after write, or give the chunks back if the write failed.
    /// `crcs`: see [`super::map::Mapping::publish`].
    pub(super) fn publish<T>(
        &self,
        r: Result<T>,
        fresh: Allocation,
        blocks: std::ops::Range<u64>,
        crcs: &[Option<u32>],
    ) -> Result<T> {
        match r {
            Ok(v) => {
                self.map.publish(fresh, blocks, crcs);
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
