//! block_status: which layer holds each extent and whether it reads as
//! zeros.

use super::{Extent, Image, Source, Target};
use crate::error::{Error, ErrorKind, Result};

impl Image {
    /// Where the data of `[offset, offset+len)` is and whether it reads as zeros.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let _gate = self.enter().await;
        let mut out: Vec<Extent> = Vec::new();
        for run in self.map.request(offset, len) {
            let (s, e) = (run.start, run.end());
            match run.target {
                Target::Base => {
                    let base = self
                        .base
                        .as_ref()
                        .ok_or_else(|| Error::new(ErrorKind::Io, "base image is not open"))?;
                    let runs = base.allocation(s, e - s).await.map_err(|er| {
                        Error::io(format!("{}: block status", base.describe()), er)
                    })?;
                    push_runs(&mut out, s, e, Source::Base, None, runs);
                }
                Target::Host(host) => {
                    let runs = self
                        .storage
                        .allocation(host, e - s)
                        .await
                        .map_err(self.io_err("block status", s))?;
                    push_runs(&mut out, s, e, Source::Image, Some(host), runs);
                }
                Target::Unallocated => push_runs(&mut out, s, e, Source::Image, None, vec![]),
            }
        }
        Ok(out)
    }
}

/// Append allocation runs of `[s, e)` as extents (holes read as zeros; a
/// missing tail of the runs is a hole).
fn push_runs(
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
