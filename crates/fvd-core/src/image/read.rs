//! Reads: the bitmap lookup every request starts with, and reads from the
//! image and from the base.

use std::ops::Range;
use std::sync::atomic::Ordering;

use super::compact::EMPTY;
use super::{Image, RequestMap, expect_len};
use crate::error::{Error, ErrorKind, Result};
use crate::iobuf::IoBuf;
use crate::meta::Meta;

impl Image {
    /// Map a read request: the bitmap lookup every request starts with.
    pub fn map_request(&self, offset: u64, len: u64) -> RequestMap {
        let blocks = self.blocks_of(offset, len);
        let in_image = match &self.meta {
            Some(m) if !blocks.is_empty() => {
                if m.local.all_set(blocks.clone()) {
                    true
                } else if m.local.none_set(blocks) && offset + len <= self.base_range() {
                    return RequestMap::Base;
                } else {
                    return RequestMap::Mixed;
                }
            }
            _ => true,
        };
        debug_assert!(in_image);
        match &self.compact {
            None => RequestMap::Image(self.geo.data_offset + offset),
            Some(c) => {
                let r = Self::chunks_of(c, offset, len);
                match c.lookup(r.start) {
                    p if p != EMPTY && r.end - r.start == 1 => {
                        RequestMap::Image(c.host_offset(p, offset))
                    }
                    _ => RequestMap::Mixed,
                }
            }
        }
    }

    /// Read `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let t0 = self.latency.start();
        let r = self.read_untimed(offset, buf).await;
        self.latency.finish(t0);
        r
    }

    pub(super) async fn read_untimed(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.foreground_ops.fetch_add(1, Ordering::Relaxed);
        let blocks = self.blocks_of(offset, len);
        let meta = match &self.meta {
            Some(m) if !blocks.is_empty() && !m.local.all_set(blocks.clone()) => m,
            _ => return self.read_local(offset, buf).await,
        };
        if m_none_local(meta, &blocks) && offset + len <= self.base_range() {
            return self.read_from_base(offset, buf).await;
        }
        for (s, e, from_base) in self.segments(meta, offset, len) {
            let part = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if from_base {
                self.read_from_base(s, part).await?;
            } else {
                self.read_local(s, part).await?;
            }
        }
        Ok(())
    }

    /// Split `[offset, offset+len)` into runs in the image and in the base.
    pub(super) fn segments(&self, meta: &Meta, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let end = offset + len;
        let bs = self.geo.block_size;
        let mut segs: Vec<(u64, u64, bool)> = Vec::new();
        let mut push = |s: u64, e: u64, from_base: bool| {
            if s >= e {
                return;
            }
            match segs.last_mut() {
                Some(last) if last.1 == s && last.2 == from_base => last.1 = e,
                _ => segs.push((s, e, from_base)),
            }
        };
        let mut pos = offset;
        for (b0, b1, local) in meta.local.runs(self.blocks_of(offset, len)) {
            let s = (b0 * bs).max(offset);
            let e = (b1 * bs).min(end);
            if local {
                push(s, e, false);
            } else {
                let be = e.min(self.base_range());
                push(s, be, true);
                push(be, e, false);
            }
            pos = e;
        }
        push(pos, end, false);
        segs
    }

    /// Read data that lives in the image (sparse offset or through the table).
    pub(super) async fn read_local(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let Some(c) = &self.compact else {
            return self
                .read_host(self.geo.data_offset + offset, offset, out)
                .await;
        };
        let mut pos = offset;
        for chunk in Self::chunks_of(c, offset, out.len() as u64) {
            let e = ((chunk + 1) * c.chunk_size).min(offset + out.len() as u64);
            let part = &mut out[(pos - offset) as usize..(e - offset) as usize];
            match c.pin(chunk) {
                None => part.fill(0),
                Some((p, _pin)) => self.read_host(c.host_offset(p, pos), pos, part).await?,
            }
            pos = e;
        }
        Ok(())
    }

    pub(super) async fn read_host(&self, host: u64, virt: u64, out: &mut [u8]) -> Result<()> {
        let buf = self
            .storage
            .read_at(host, IoBuf::for_overwrite(out.len()))
            .await
            .map_err(self.io_err("read", virt))?;
        expect_len(
            &buf,
            out.len(),
            &format!("{}: read at offset {virt}", self.describe()),
        )?;
        out.copy_from_slice(&buf);
        Ok(())
    }

    pub(super) async fn read_base(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let base = self
            .base
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
        let buf = base
            .read_at(offset, IoBuf::for_overwrite(out.len()))
            .await
            .map_err(|e| {
                Error::io(
                    format!("{}: base read at offset {offset}", base.describe()),
                    e,
                )
            })?;
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

    pub(super) async fn base_bytes(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        if len > 0 {
            self.read_base(offset, &mut v).await?;
        }
        Ok(v)
    }
}

pub(super) fn m_none_local(meta: &Meta, blocks: &Range<u64>) -> bool {
    meta.local.none_set(blocks.clone())
}
