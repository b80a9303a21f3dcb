//! block_status: which layer holds each extent and whether it reads as
//! zeros.

use super::{Extent, Image, Source};
use crate::error::{Error, ErrorKind, Result};

impl Image {
    /// Where the data of `[offset, offset+len)` is and whether it reads as zeros.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let segs = match &self.meta {
            Some(m) => self.segments(m, offset, len),
            None => vec![(offset, offset + len, false)],
        };
        for (s, e, from_base) in segs {
            if from_base {
                let base = self
                    .base
                    .as_ref()
                    .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
                let runs = base
                    .allocation(s, e - s)
                    .await
                    .map_err(|er| Error::io(format!("{}: block status", base.describe()), er))?;
                push_runs(&mut out, s, e, Source::Base, None, runs);
            } else {
                self.local_status(&mut out, s, e).await?;
            }
        }
        Ok(out)
    }

    pub(super) async fn local_status(&self, out: &mut Vec<Extent>, s: u64, e: u64) -> Result<()> {
        let Some(c) = &self.compact else {
            let runs = self
                .storage
                .allocation(self.geo.data_offset + s, e - s)
                .await
                .map_err(self.io_err("block status", s))?;
            push_runs(
                out,
                s,
                e,
                Source::Image,
                Some(self.geo.data_offset + s),
                runs,
            );
            return Ok(());
        };
        let mut pos = s;
        for ch in Self::chunks_of(c, s, e - s) {
            let ce = ((ch + 1) * c.chunk_size).min(e);
            match c.pin(ch) {
                None => push_runs(out, pos, ce, Source::Image, None, vec![]),
                Some((p, _pin)) => {
                    let host = c.host_offset(p, pos);
                    let runs = self
                        .storage
                        .allocation(host, ce - pos)
                        .await
                        .map_err(self.io_err("block status", pos))?;
                    push_runs(out, pos, ce, Source::Image, Some(host), runs);
                }
            }
            pos = ce;
        }
        Ok(())
    }
}

/// Append allocation runs of `[s, e)` as extents (holes read as zeros; a
/// missing tail of the runs is a hole).
pub(super) fn push_runs(
    out: &mut Vec<Extent>,
    s: u64,
    e: u64,
    source: Source,
    host: Option<u64>,
    runs: Vec<crate::storage::AllocRun>,
) {
    let mut p = s;
    let mut push = |start: u64, length: u64, zero: bool, host_offset: Option<u64>| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(l)
                if l.source == source
                    && l.zero == zero
                    && l.start + l.length == start
                    && l.host_offset.map(|h| h + l.length) == host_offset =>
            {
                l.length += length
            }
            _ => out.push(Extent {
                start,
                length,
                source,
                zero,
                host_offset,
            }),
        }
    };
    for r in runs {
        let length = r.length.min(e - p);
        push(p, length, !r.data, host.map(|h| h + (p - s)));
        p += length;
    }
    if p < e {
        push(p, e - p, true, host.map(|h| h + (p - s)));
    }
}
