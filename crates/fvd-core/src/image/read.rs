//! Reads: each run of the request's mapping from where it lives.

use std::sync::atomic::Ordering;

use super::{Image, Target, expect_len};
use crate::error::{Error, ErrorKind, Result};
use crate::iobuf::IoBuf;

impl Image {
    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _req = self.stats.request();
        let t0 = self.latency.start();
        let r = self.read_untimed(offset, buf).await;
        self.latency.finish(t0);
        r
    }

    async fn read_untimed(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _gate = self.enter().await;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        for run in self.map.request(offset, len) {
            let part = &mut buf[(run.start - offset) as usize..(run.end() - offset) as usize];
            match run.target {
                Target::Host(host) => self.read_host(host, run.start, part).await?,
                // Guest reads of the base record the profile and copy on read.
                Target::Base => self.read_from_base(run.start, part).await?,
                Target::Unallocated => part.fill(0),
            }
        }
        Ok(())
    }

    /// Read bytes that live in the image (never in the base).
    pub(super) async fn read_image(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        for run in self.map.image_runs(offset, out.len() as u64, &[]) {
            let part = &mut out[(run.start - offset) as usize..(run.end() - offset) as usize];
            match run.target {
                Target::Host(host) => self.read_host(host, run.start, part).await?,
                Target::Base | Target::Unallocated => part.fill(0),
            }
        }
        Ok(())
    }

    /// Read the current content of `[offset, offset+len)` for the engine's
    /// own use (the edges of a copy-on-write): no profile, no copy-on-read.
    pub(super) async fn read_current(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        for run in self.map.request(offset, len) {
            let part = &mut out[(run.start - offset) as usize..(run.end() - offset) as usize];
            match run.target {
                Target::Host(host) => self.read_host(host, run.start, part).await?,
                Target::Base => self.read_base(run.start, part).await?,
                Target::Unallocated => {}
            }
        }
        Ok(out)
    }

    /// Read image bytes at host offset `host` (virtual offset `virt`, for
    /// messages), decrypted in an encrypted image.
    pub(super) async fn read_host(&self, host: u64, virt: u64, out: &mut [u8]) -> Result<()> {
        if let Some(c) = &self.crypt {
            return self.read_encrypted(c, host, virt, out).await;
        }
        let buf = self.read_storage(host, out.len(), virt).await?;
        out.copy_from_slice(&buf);
        Ok(())
    }

    /// `len` bytes of the storage at host offset `host`, as stored.
    pub(super) async fn read_storage(&self, host: u64, len: usize, virt: u64) -> Result<IoBuf> {
        let buf = self
            .storage
            .read_at(host, IoBuf::for_overwrite(len))
            .await
            .map_err(self.io_err("read", virt))?;
        expect_len(
            &buf,
            len,
            &format!("{}: read at offset {virt}", self.describe()),
        )?;
        Ok(buf)
    }

    /// Read base bytes at `offset`.
    pub(super) async fn read_base(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let base = self
            .base
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
        let timer = self.stats.base_read();
        let buf = base
            .read_at(offset, IoBuf::for_overwrite(out.len()))
            .await
            .map_err(|e| {
                Error::io(
                    format!("{}: base read at offset {offset}", base.describe()),
                    e,
                )
            })?;
        drop(timer);
        expect_len(
            &buf,
            out.len(),
            &format!("{}: base read at offset {offset}", base.describe()),
        )?;
        self.stats
            .base_read_bytes
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out.copy_from_slice(&buf);
        Ok(())
    }

    /// `len` base bytes at `offset`.
    pub(super) async fn base_bytes(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        if len > 0 {
            self.read_base(offset, &mut v).await?;
        }
        Ok(v)
    }
}
