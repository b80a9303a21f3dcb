//! Reads: each run of the request's mapping from where it lives, into its
//! part of the caller's buffer (no copy).

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::{Image, Target, expect_len};
use crate::error::{Error, ErrorKind, Result};
use crate::iobuf::{IoBuf, Window};
use crate::storage::Transform;

/// The part of a buffer holding `[offset, ..)` that covers `[start, end)`.
pub(super) fn part(offset: u64, start: u64, end: u64) -> Range<usize> {
    (start - offset) as usize..(end - offset) as usize
}

impl Image {
    /// Read `buf.len()` bytes at `offset` into `buf` and give it back.
    ///
    /// Every byte of `buf` is overwritten, so a buffer from
    /// [`IoBuf::for_overwrite`] is the one to pass. On error the buffer is
    /// dropped (back to the pool).
    pub async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let _req = self.stats.request();
        self.read_counted(offset, buf).await
    }

    async fn read_counted(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(buf);
        }
        let _gate = self.enter().await;
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        let whole = buf.window();
        for run in self.map.request(offset, len) {
            let mut p = buf.narrow(part(offset, run.start, run.end()));
            p = match run.target {
                Target::Host(host) => self.read_host(host, run.start, p).await?,
                // Guest reads of the base record the profile and copy on read.
                Target::Base => self.read_from_base(run.start, p).await?,
                Target::Unallocated => {
                    p.fill(0);
                    p
                }
            };
            buf = self.rejoin(p, whole)?;
        }
        Ok(buf)
    }

    /// A part of a buffer given back by the storage, widened to the window
    /// `w` it was narrowed from.
    pub(super) fn rejoin(&self, part: IoBuf, w: Window) -> Result<IoBuf> {
        part.widen(w).map_err(|_| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "{}: the storage returned another buffer than it was given",
                    self.describe()
                ),
            )
        })
    }

    /// Read bytes that live in the image (never in the base) into `buf`.
    pub(super) async fn read_image(&self, offset: u64, mut buf: IoBuf) -> Result<IoBuf> {
        let whole = buf.window();
        for run in self.map.image_runs(offset, buf.len() as u64, &[]) {
            let mut p = buf.narrow(part(offset, run.start, run.end()));
            p = match run.target {
                Target::Host(host) => self.read_host(host, run.start, p).await?,
                Target::Base | Target::Unallocated => {
                    p.fill(0);
                    p
                }
            };
            buf = self.rejoin(p, whole)?;
        }
        Ok(buf)
    }

    /// Read the current content of `[offset, offset+len)` for the engine's
    /// own use (the edges of a copy-on-write): no profile, no copy-on-read.
    pub(super) async fn read_current(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let mut buf = IoBuf::for_overwrite(len as usize);
        let whole = buf.window();
        for run in self.map.request(offset, len) {
            let mut p = buf.narrow(part(offset, run.start, run.end()));
            p = match run.target {
                Target::Host(host) => self.read_host(host, run.start, p).await?,
                Target::Base => self.read_base(run.start, p).await?,
                Target::Unallocated => {
                    p.fill(0);
                    p
                }
            };
            buf = self.rejoin(p, whole)?;
        }
        Ok(buf)
    }

    /// Read image bytes at host offset `host` into `buf` (virtual offset
    /// `virt`, for messages), decrypted in an encrypted image.
    pub(super) async fn read_host(&self, host: u64, virt: u64, buf: IoBuf) -> Result<IoBuf> {
        match &self.crypt {
            Some(c) => self.read_encrypted(c, host, virt, buf).await,
            None => self.read_storage(host, virt, buf).await,
        }
    }

    /// Read the storage at host offset `host` into `buf`, as stored.
    pub(super) async fn read_storage(&self, host: u64, virt: u64, buf: IoBuf) -> Result<IoBuf> {
        self.read_storage_then(host, virt, buf, None).await
    }

    /// [`Image::read_storage`], then `after` (the cipher) over the bytes,
    /// next to the read ([`crate::storage::Storage::read_at_then`]).
    pub(super) async fn read_storage_then(
        &self,
        host: u64,
        virt: u64,
        buf: IoBuf,
        after: Option<Transform>,
    ) -> Result<IoBuf> {
        let want = buf.len();
        let read = match after {
            Some(f) => self.storage.read_at_then(host, buf, f),
            None => self.storage.read_at(host, buf),
        };
        let buf = read.await.map_err(self.io_err("read", virt))?;
        expect_len(&buf, want, || {
            format!("{}: read at offset {virt}", self.describe())
        })?;
        Ok(buf)
    }

    /// Read base bytes at `offset` into `buf`.
    pub(super) async fn read_base(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        let base = self
            .base
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
        let want = buf.len();
        let timer = self.stats.base_read();
        let buf = base.read_at(offset, buf).await.map_err(|e| {
            Error::io(
                format!("{}: base read at offset {offset}", base.describe()),
                e,
            )
        })?;
        drop(timer);
        expect_len(&buf, want, || {
            format!("{}: base read at offset {offset}", base.describe())
        })?;
        self.stats
            .base_read_bytes
            .fetch_add(want as u64, Ordering::Relaxed);
        Ok(buf)
    }

    /// `len` base bytes at `offset`, in a buffer of their own.
    pub(super) async fn base_bytes(&self, offset: u64, len: u64) -> Result<IoBuf> {
        let buf = IoBuf::for_overwrite(len as usize);
        if len == 0 {
            return Ok(buf);
        }
        self.read_base(offset, buf).await
    }
}

impl Image {
    /// Read `out.len()` bytes at `offset` into a slice: [`Image::read`]
    /// through a buffer from the pool, then one copy. For callers that hold
    /// no [`IoBuf`] (tests, tools reading a few bytes); transports use
    /// [`Image::read`] and send the buffer it fills.
    pub async fn read_slice(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let buf = self.read(offset, IoBuf::for_overwrite(out.len())).await?;
        out.copy_from_slice(&buf);
        Ok(())
    }
}
