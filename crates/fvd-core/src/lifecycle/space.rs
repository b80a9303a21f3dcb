//! Where a lifecycle operation puts the metadata regions it rewrites.
//!
//! A new bitmap or chunk table is never written over the one the current
//! header uses: it goes to space that header does not use, so that until the
//! header switch the old image is intact. In order of preference:
//!
//! 1. a **gap** of the metadata area — between `HEADER_AREA` and the data
//!    region, not covered by any region of the current header (a region a
//!    previous operation moved away from is such a gap), first fit;
//! 2. the **tail of the journal** — the image is clean, so its journal holds
//!    nothing to replay, and the new header starts a new journal epoch: the
//!    journal gives up its tail, keeping at least [`MIN_JOURNAL`];
//! 3. in a compact image, **moving the data region's start**: the data of
//!    the first physical chunks is moved to free chunks (journaled, like any
//!    write) and the data region then starts past them
//!    ([`Placement::Shift`]).
//!
//! docs/FORMAT.md §3 states these rules.

use crate::error::{Error, ErrorKind, Result};
use crate::format::header::{Extent, HEADER_AREA, Header, Region};

/// The journal keeps at least this much when it gives up its tail.
pub const MIN_JOURNAL: u64 = 1 << 20;

/// Bytes the data region's start moves by at a time: whole chunks, and a
/// multiple of 1 MiB so the data region stays 1 MiB aligned.
pub fn shift_unit(chunk_size: u64) -> u64 {
    chunk_size.max(1 << 20)
}

/// The outcome of planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Every region has a place; the header's region table says where.
    Placed,
    /// A compact image needs its data region to start this many bytes later.
    Shift(u64),
}

fn round4k(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// Free extents of `[HEADER_AREA, end)` not covered by `used`.
fn gaps(used: &[Extent], end: u64) -> Vec<Extent> {
    let mut taken: Vec<Extent> = used.iter().copied().filter(|e| e.length > 0).collect();
    taken.sort_by_key(|e| e.offset);
    let mut out = Vec::new();
    let mut pos = HEADER_AREA;
    for e in taken {
        if e.offset > pos && pos < end {
            out.push(Extent {
                offset: pos,
                length: e.offset.min(end) - pos,
            });
        }
        pos = pos.max(e.end());
    }
    if pos < end {
        out.push(Extent {
            offset: pos,
            length: end - pos,
        });
    }
    out
}

/// Place the regions `wanted` (each with its new length) in `new`, a copy
/// of `old` whose other regions stay where they are. The space `old` uses
/// is never handed out (except the journal's tail, see the module docs).
pub fn place(old: &Header, new: &mut Header, wanted: &[(Region, u64)]) -> Result<Placement> {
    let compact = new.incompatible & crate::format::header::INCOMPAT_COMPACT != 0;
    let data_offset = new.region(Region::Data).offset;
    let mut used: Vec<Extent> = Region::ALL
        .iter()
        .filter(|&&r| r != Region::Data)
        .flat_map(|&r| [old.region(r), new.region(r)])
        .collect();
    // A wanted region's current place in `new` is the old one: not reusable.
    let mut order: Vec<(Region, u64)> = wanted.to_vec();
    order.sort_by_key(|&(_, len)| std::cmp::Reverse(len));
    let mut journal = new.region(Region::Journal);
    let mut unplaced = 0u64;
    for &(r, len) in &order {
        let len = round4k(len);
        if len == 0 {
            new.regions[r as usize] = Extent::default();
            continue;
        }
        let gap = gaps(&used, data_offset)
            .into_iter()
            .find(|g| g.length >= len);
        let spot = match gap {
            Some(g) => Extent {
                offset: g.offset,
                length: len,
            },
            None if journal.length >= len + MIN_JOURNAL => {
                journal.length -= len;
                Extent {
                    offset: journal.end(),
                    length: len,
                }
            }
            None => {
                unplaced += len;
                continue;
            }
        };
        used.push(spot);
        new.regions[r as usize] = spot;
    }
    new.regions[Region::Journal as usize] = journal;
    if unplaced == 0 {
        return Ok(Placement::Placed);
    }
    if compact {
        // Everything wanted goes to the space freed at the start of the data
        // region, plus what is free at the end of the metadata area.
        let total: u64 = order.iter().map(|&(_, l)| round4k(l)).sum();
        let tail_gap = gaps(
            &Region::ALL
                .iter()
                .filter(|&&r| r != Region::Data)
                .map(|&r| old.region(r))
                .collect::<Vec<_>>(),
            data_offset,
        )
        .last()
        .filter(|g| g.end() == data_offset)
        .map_or(0, |g| g.length);
        let unit = shift_unit(new.chunk_size as u64);
        let shift = total.saturating_sub(tail_gap).div_ceil(unit).max(1) * unit;
        return Ok(Placement::Shift(shift));
    }
    Err(Error::new(
        ErrorKind::NoSpace,
        format!(
            "no room for {unplaced} bytes of new metadata: the metadata area has no gap that large and the journal ({} bytes) cannot give it up (it keeps {MIN_JOURNAL})",
            new.region(Region::Journal).length
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::{CreateLayout, compute_layout};

    fn header(size: u64, base: Option<u64>, compact: bool, journal: u64) -> Header {
        compute_layout(&CreateLayout {
            virtual_size: size,
            base: base.map(|b| ("b".into(), crate::format::Format::Raw, b, String::new())),
            block_size: Some(4096),
            journal_size: Some(journal),
            compact,
            chunk_size: None,
            encrypted: false,
        })
        .unwrap()
    }

    #[test]
    fn a_small_bitmap_goes_to_the_gap() {
        let old = header(1 << 30, Some(1 << 30), false, 8 << 20);
        let mut new = old.clone();
        let p = place(&old, &mut new, &[(Region::Bitmap, 32 << 10)]).unwrap();
        assert_eq!(p, Placement::Placed);
        let b = new.region(Region::Bitmap);
        for r in Region::ALL {
            let o = old.region(r);
            if r != Region::Data && o.length > 0 {
                assert!(
                    b.end() <= o.offset || b.offset >= o.end(),
                    "{r:?} overlapped"
                );
            }
        }
        new.validate().unwrap();
    }

    #[test]
    fn a_large_bitmap_takes_the_journal_tail() {
        let old = header(1 << 30, Some(1 << 30), false, 8 << 20);
        let mut new = old.clone();
        place(&old, &mut new, &[(Region::Bitmap, 4 << 20)]).unwrap();
        let j = new.region(Region::Journal);
        assert_eq!(j.length, 4 << 20);
        assert_eq!(new.region(Region::Bitmap).offset, j.end());
        new.validate().unwrap();
    }

    #[test]
    fn sparse_without_room_is_an_error_compact_shifts() {
        let old = header(1 << 30, Some(1 << 30), false, 1 << 20);
        let mut new = old.clone();
        assert!(place(&old, &mut new, &[(Region::Bitmap, 8 << 20)]).is_err());
        let old = header(1 << 30, None, true, 1 << 20);
        let mut new = old.clone();
        let p = place(&old, &mut new, &[(Region::Table, 8 << 20)]).unwrap();
        match p {
            Placement::Shift(s) => assert!(s >= 7 << 20 && s % (1 << 20) == 0, "{s}"),
            other => panic!("{other:?}"),
        }
    }
}
