//! Giving freed chunks of compact images back to the file system.
//!
//! A chunk smaller than a file-system block (4 KiB) shares its block with
//! neighbours; punching it alone only zeroes its bytes and the block stays
//! allocated. So frees are punched in runs of physically adjacent chunks
//! (a discard of many consecutive small chunks frees whole blocks), and a
//! clean close punches every 4 KiB page of the data region that no chunk in
//! use touches — nothing else runs then, so no allocation can race it.

use super::Image;
use super::compact::{Compact, EMPTY};
use crate::error::Result;

/// File-system block size assumed for sharing (pages of the leak check).
const PAGE: u64 = 4096;

impl Image {
    /// Punch the physical chunks `phys` (just freed, not yet reusable), one
    /// discard per run of adjacent chunks. `virt` names the request in errors.
    pub(super) async fn punch_chunks(&self, c: &Compact, phys: &[u32], virt: u64) -> Result<()> {
        let mut sorted = phys.to_vec();
        sorted.sort_unstable();
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let host = c.data_offset + sorted[i] as u64 * c.chunk_size;
            let len = (j - i) as u64 * c.chunk_size;
            self.zero_host(host, virt, len, true).await?;
            i = j;
        }
        Ok(())
    }

    /// After a clean close of a compact image with chunks smaller than a
    /// page: punch every page below the highest chunk in use that holds no
    /// chunk in use.
    pub(super) async fn reclaim_shared_pages(&self) -> Result<()> {
        let Some(c) = self.map.compact() else {
            return Ok(());
        };
        // Chunks only snapshots hold are not in the table: leave images
        // with snapshots alone.
        let held = (0..c.high_water()).any(|p| c.refcount(p as u32) > 0);
        if c.chunk_size >= PAGE || held {
            return Ok(());
        }
        let table = c.table_snapshot();
        for (off, len) in unused_runs(&table, c.chunk_size, high_water(&table)) {
            self.zero_host(c.data_offset + off, 0, len, true).await?;
        }
        Ok(())
    }
}

/// One past the highest physical chunk `table` uses (0 if none).
pub(crate) fn high_water(table: &[u32]) -> u64 {
    table
        .iter()
        .filter(|&&p| p != EMPTY)
        .map(|&p| p as u64 + 1)
        .max()
        .unwrap_or(0)
}

/// Runs `(offset, length)`, relative to the data region, of the space below
/// physical chunk `high` that no entry of `table` uses: whole chunks, or
/// whole pages when chunks are smaller than a page (a page with one chunk
/// in use stays). The data region starts 1 MiB aligned: its pages are the
/// file's.
pub(crate) fn unused_runs(table: &[u32], chunk_size: u64, high: u64) -> Vec<(u64, u64)> {
    let unit = chunk_size.max(PAGE);
    let per_unit = unit / chunk_size;
    let units = high.div_ceil(per_unit) as usize;
    let mut used = vec![false; units];
    for &p in table.iter().filter(|&&p| p != EMPTY) {
        if let Some(u) = used.get_mut((p as u64 / per_unit) as usize) {
            *u = true;
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, _) in used.iter().enumerate().filter(|(_, u)| !**u) {
        let off = i as u64 * unit;
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += unit,
            _ => out.push((off, unit)),
        }
    }
    out
}
