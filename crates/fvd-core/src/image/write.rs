//! Writes: the fast path (a raw-file write), copy-on-write from the base,
//! chunk allocation, and publishing bits and table entries after the data.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::Image;
use super::compact::EMPTY;
use crate::error::{Error, ErrorKind, Result};
use crate::format::journal::Record;
use crate::iobuf::IoBuf;
use crate::meta::Meta;

impl Image {
    /// Write data that lives in the image. In compact images every chunk must
    /// be allocated, in the table or in `fresh` (allocated, not yet published).
    pub(super) async fn write_local(
        &self,
        offset: u64,
        data: &[u8],
        fresh: &[(u64, u32)],
    ) -> Result<()> {
        let Some(c) = &self.compact else {
            return self
                .write_host(
                    self.geo.data_offset + offset,
                    offset,
                    IoBuf::from_slice(data),
                )
                .await;
        };
        // Map each chunk, pin it, and merge physically contiguous parts into one write.
        let mut runs: Vec<(u64, u64, u64)> = Vec::new(); // (virt, host, len)
        let mut pins = Vec::new();
        let mut pos = offset;
        let end = offset + data.len() as u64;
        for chunk in Self::chunks_of(c, offset, data.len() as u64) {
            let e = ((chunk + 1) * c.chunk_size).min(end);
            let phys = match fresh.iter().find(|&&(v, _)| v == chunk) {
                Some(&(_, p)) => p,
                None => match c.pin(chunk) {
                    Some((p, pin)) => {
                        pins.push(pin);
                        p
                    }
                    None => {
                        return Err(Error::corrupt(format!(
                            "chunk {chunk} vanished during a write"
                        )));
                    }
                },
            };
            let host = c.host_offset(phys, pos);
            match runs.last_mut() {
                Some(r) if r.1 + r.2 == host => r.2 += e - pos,
                _ => runs.push((pos, host, e - pos)),
            }
            pos = e;
        }
        for (virt, host, len) in runs {
            let part = &data[(virt - offset) as usize..(virt - offset + len) as usize];
            self.write_host(host, virt, IoBuf::from_slice(part)).await?;
        }
        drop(pins);
        Ok(())
    }

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

    /// True if a write of `[offset, offset+len)` needs the slow path.
    pub(super) fn needs_slow_path(&self, offset: u64, len: u64) -> bool {
        let Some(m) = &self.meta else { return false };
        let blocks = self.blocks_of(offset, len);
        if !blocks.is_empty() && !m.hard.all_set(blocks) {
            return true;
        }
        match &self.compact {
            Some(c) => !c.all_allocated(Self::chunks_of(c, offset, len)),
            None => false,
        }
    }

    /// Write `data` at `offset`; with `fua` it is durable on return.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let t0 = self.latency.start();
        let r = self.write_untimed(offset, data, fua).await;
        self.latency.finish(t0);
        r
    }

    pub(super) async fn write_untimed(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, data.len() as u64)?;
        if !data.is_empty() {
            let len = data.len() as u64;
            if self.needs_slow_path(offset, len) {
                let _g = self.lock_span(offset, len).await;
                self.slow_write(offset, data).await?;
            } else {
                self.write_local(offset, data, &[]).await?;
                self.mark_dirty();
            }
        }
        if fua { self.flush().await } else { Ok(()) }
    }

    /// Allocate the unallocated chunks of `[offset, offset+len)` (span lock
    /// held). New chunks not wholly covered by the range are zeroed first, so
    /// their untouched parts read as zeros whatever the storage held before.
    pub(super) async fn allocate_chunks(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let (Some(c), Some(m)) = (&self.compact, &self.meta) else {
            return Ok(Vec::new());
        };
        let missing: Vec<u64> = Self::chunks_of(c, offset, len)
            .filter(|&ch| c.lookup(ch) == EMPTY)
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut tries = 0;
        let fresh = loop {
            match c
                .allocate(self.storage.as_ref(), &missing, m.rounds_done())
                .await
            {
                // Chunks freed by discards are reusable once their free is
                // durable (and other writers may take them first): commit,
                // then try again.
                Err(e) if e.kind() == ErrorKind::NoSpace && c.has_pending_frees() && tries < 64 => {
                    tries += 1;
                    m.commit(self.storage.as_ref(), &self.stats).await?;
                }
                r => break r?,
            }
        };
        for &(ch, p) in &fresh {
            let covered = offset <= ch * c.chunk_size && (ch + 1) * c.chunk_size <= offset + len;
            if !covered {
                let host = c.data_offset + p as u64 * c.chunk_size;
                if let Err(e) = self
                    .zero_host(host, ch * c.chunk_size, c.chunk_size, true)
                    .await
                {
                    c.release(&fresh);
                    return Err(e);
                }
            }
        }
        self.stats
            .chunks_allocated
            .fetch_add(fresh.len() as u64, Ordering::Relaxed);
        Ok(fresh)
    }

    /// Base bytes completing the partial first and last blocks of
    /// `[offset, end)` that are not local yet (empty where none are needed).
    pub(super) async fn cow_edges(
        &self,
        meta: &Meta,
        offset: u64,
        end: u64,
        blocks: &Range<u64>,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        if blocks.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let bs = self.geo.block_size;
        let head_start = blocks.start * bs;
        let head = if offset > head_start && !meta.local.get(blocks.start) {
            self.base_bytes(head_start, offset - head_start).await?
        } else {
            Vec::new()
        };
        let tail_end = (blocks.end * bs).min(self.base_range());
        let tail = if end < tail_end && !meta.local.get(blocks.end - 1) {
            self.base_bytes(end, tail_end - end).await?
        } else {
            Vec::new()
        };
        Ok((head, tail))
    }

    /// Copy-on-write + allocation of `[offset, offset+data.len())`, span lock held.
    pub(super) async fn slow_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let meta = self.meta.as_ref().expect("the slow path needs metadata");
        let len = data.len() as u64;
        let end = offset + len;
        let blocks = self.blocks_of(offset, len);
        let (head, tail) = self.cow_edges(meta, offset, end, &blocks).await?;
        let start = offset - head.len() as u64;
        let fresh = self
            .allocate_chunks(start, head.len() as u64 + len + tail.len() as u64)
            .await?;
        let r = if head.is_empty() && tail.is_empty() {
            self.write_local(offset, data, &fresh).await
        } else {
            let mut buf = Vec::with_capacity(head.len() + data.len() + tail.len());
            buf.extend_from_slice(&head);
            buf.extend_from_slice(data);
            buf.extend_from_slice(&tail);
            self.write_local(start, &buf, &fresh).await
        };
        self.publish(r, &fresh, blocks)
    }

    /// Publish after write: make fresh chunks visible and queue their table
    /// records with the blocks' bits, or give the chunks back on failure.
    pub(super) fn publish(
        &self,
        r: Result<()>,
        fresh: &[(u64, u32)],
        blocks: Range<u64>,
    ) -> Result<()> {
        let meta = self.meta.as_ref().expect("publishing needs metadata");
        if let Err(e) = r {
            if let Some(c) = &self.compact {
                c.release(fresh);
            }
            return Err(e);
        }
        if let Some(c) = &self.compact {
            c.publish(fresh);
        }
        if fresh.is_empty() {
            meta.publish_hard(blocks);
        } else {
            meta.publish_group(table_records(fresh), blocks);
        }
        Ok(())
    }
}

/// Records that map virtual chunks `chunks` (sorted) to new entries.
pub(super) fn table_records(chunks: &[(u64, u32)]) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    for &(c, p) in chunks {
        match out.last_mut() {
            Some(Record::Table { first, entries })
                if *first + entries.len() as u64 == c
                    && entries.len() < Record::MAX_TABLE_ENTRIES =>
            {
                entries.push(p)
            }
            _ => out.push(Record::Table {
                first: c,
                entries: vec![p],
            }),
        }
    }
    out
}
