//! Per-physical-chunk counters that grow with the data region.
//!
//! Physical chunk numbers of a compact image are not bounded by its virtual
//! size once snapshots keep old chunks alive, so the pin counts and
//! refcounts the engine keeps per physical chunk live in segments allocated
//! on first use: segment `k` holds `base << k` counters, so a few dozen
//! segment slots cover every u32 chunk number while an image that never
//! grows past its virtual chunks keeps one segment of the size it always
//! had. A lookup is a shift, a leading-zero count and one atomic load of
//! the segment pointer; segments are never freed or moved, so references
//! stay valid for the array's lifetime.

use std::sync::OnceLock;

/// Counters indexed by physical chunk, all starting at their default (0).
#[derive(Debug)]
pub(crate) struct PhysArray<T> {
    shift: u32,
    segments: Box<[OnceLock<Box<[T]>>]>,
}

impl<T: Default> PhysArray<T> {
    /// An array whose first segment holds at least `first` counters.
    pub fn new(first: u64) -> Self {
        let base = first.max(1024).next_power_of_two();
        let shift = base.trailing_zeros();
        // Segments 0..k cover base * (2^k - 1) chunks: enough for u32.
        let count = (33 - shift.min(32) + 1) as usize;
        PhysArray {
            shift,
            segments: (0..count).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Segment and index within it of chunk `p`.
    #[inline]
    fn locate(&self, p: u64) -> (usize, usize) {
        let q = (p >> self.shift) + 1;
        let k = 63 - q.leading_zeros();
        let start = ((1u64 << k) - 1) << self.shift;
        (k as usize, (p - start) as usize)
    }

    /// The counter of chunk `p` (its segment allocated on first use).
    #[inline]
    pub fn get(&self, p: u64) -> &T {
        let (k, i) = self.locate(p);
        let seg = self.segments[k].get_or_init(|| {
            let n = 1usize << (self.shift as usize + k);
            (0..n).map(|_| T::default()).collect()
        });
        &seg[i]
    }

    /// The counter of chunk `p` if its segment exists (else it is at its
    /// default).
    #[inline]
    pub fn peek(&self, p: u64) -> Option<&T> {
        let (k, i) = self.locate(p);
        self.segments.get(k)?.get().map(|s| &s[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn every_chunk_number_has_its_own_counter() {
        let a: PhysArray<AtomicU32> = PhysArray::new(3000);
        let probes = [
            0u64,
            1,
            4095,
            4096,
            4097,
            12287,
            12288,
            1 << 20,
            u32::MAX as u64 - 1,
        ];
        for (i, &p) in probes.iter().enumerate() {
            a.get(p).store(i as u32 + 1, Ordering::Relaxed);
        }
        for (i, &p) in probes.iter().enumerate() {
            assert_eq!(a.get(p).load(Ordering::Relaxed), i as u32 + 1, "chunk {p}");
        }
        assert!(
            a.peek(2 << 20)
                .is_none_or(|c| c.load(Ordering::Relaxed) == 0)
        );
        assert_eq!(a.get(5).load(Ordering::Relaxed), 0);
    }

    #[test]
    fn segments_tile_the_chunk_numbers() {
        let a: PhysArray<AtomicU32> = PhysArray::new(1024);
        let mut prev = a.locate(0);
        assert_eq!(prev, (0, 0));
        for p in 1..100_000u64 {
            let cur = a.locate(p);
            assert!(
                cur == (prev.0, prev.1 + 1) || cur == (prev.0 + 1, 0),
                "chunk {p}: {cur:?} after {prev:?}"
            );
            prev = cur;
        }
    }
}
