//! Writes: the direct path (a raw-file write), copy-on-write from the base,
//! chunk allocation, and publishing bits and table entries after the data.

use std::sync::atomic::Ordering;

use super::map::{Allocation, Fill};
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
            let _gate = self.enter().await;
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

    /// Write image bytes at host offset `host` (virtual offset `virt`, for
    /// messages), encrypted in an encrypted image.
    pub(super) async fn write_host(&self, host: u64, virt: u64, buf: IoBuf) -> Result<()> {
        match &self.crypt {
            Some(c) => self.write_encrypted(c, host, virt, buf).await,
            None => self.write_storage(host, virt, buf).await,
        }
    }

    /// Write `buf` to the storage at host offset `host`, as it is.
    pub(super) async fn write_storage(&self, host: u64, virt: u64, buf: IoBuf) -> Result<()> {
        let n = buf.len() as u64;
        self.storage
            .write_at(host, buf, false)
            .await
            .map_err(self.io_err("write", virt))?;
        self.stats.data_writes.fetch_add(1, Ordering::Relaxed);
        self.stats.data_write_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
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
                Fill::Zero { host, virt, len } => self.zero_host(host, virt, len, true).await,
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
            let buf = match &self.crypt {
                Some(_) => {
                    let mut plain = vec![0u8; n as usize];
                    self.read_host(from + done, virt + done, &mut plain).await?;
                    IoBuf::from_slice(&plain)
                }
                None => {
                    self.read_storage(from + done, n as usize, virt + done)
                        .await?
                }
            };
            for (s, e) in nonzero_pages(&buf, to + done) {
                self.write_host(
                    to + done + s as u64,
                    virt + done + s as u64,
                    IoBuf::from_slice(&buf[s..e]),
                )
                .await?;
            }
            done += n;
        }
        Ok(())
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

/// Runs `[s, e)` of `buf` (which lands at host offset `host`) holding a
/// non-zero byte, at 4 KiB pages of the host file.
fn nonzero_pages(buf: &[u8], host: u64) -> Vec<(usize, usize)> {
    const PAGE: u64 = 4096;
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut i = 0usize;
    while i < buf.len() {
        let next = (((host + i as u64) / PAGE + 1) * PAGE - host) as usize;
        let j = next.min(buf.len());
        if !crate::iobuf::is_zero(&buf[i..j]) {
            match out.last_mut() {
                Some(r) if r.1 == i => r.1 = j,
                _ => out.push((i, j)),
            }
        }
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::nonzero_pages;

    #[test]
    fn zero_pages_are_skipped_at_host_page_grain() {
        let mut b = vec![0u8; 3 * 4096];
        b[5] = 1;
        b[2 * 4096 + 7] = 1;
        assert_eq!(nonzero_pages(&b, 0), vec![(0, 4096), (8192, 12288)]);
        // Starting mid-page: pieces end at host page boundaries.
        assert_eq!(nonzero_pages(&b, 512), vec![(0, 3584), (7680, 11776)]);
        assert!(nonzero_pages(&[0u8; 100], 0).is_empty());
    }
}
