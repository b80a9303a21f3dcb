//! The block bitmap: one bit per block of the base range, 1 = in the image.
//!
//! On disk: block `n` is bit `n % 8` (least significant first) of byte
//! `n / 8`. In memory the bits live in `AtomicU64` words (the same bit
//! order when the words are stored little-endian), so lookups on the I/O
//! path take no lock.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A fixed-size bitmap with lock-free reads and updates.
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl AtomicBitmap {
    /// All-zero bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        AtomicBitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Load from on-disk bytes. Fails if bits past `bits` are set.
    pub fn from_bytes(bits: u64, bytes: &[u8]) -> Result<Self> {
        let need = bits.div_ceil(8) as usize;
        if bytes.len() < need {
            return Err(Error::corrupt(format!(
                "bitmap is {} bytes, need {need}",
                bytes.len()
            )));
        }
        let bm = Self::new(bits);
        for (i, w) in bm.words.iter().enumerate() {
            let mut a = [0u8; 8];
            let start = i * 8;
            let end = (start + 8).min(need);
            a[..end - start].copy_from_slice(&bytes[start..end]);
            w.store(u64::from_le_bytes(a), Ordering::Relaxed);
        }
        if let Some(extra) = bm.stray_bits(&bytes[..need]) {
            return Err(Error::corrupt(format!(
                "bitmap has bit {extra} set beyond the base range"
            )));
        }
        Ok(bm)
    }

    fn stray_bits(&self, bytes: &[u8]) -> Option<u64> {
        let rem = self.bits % 8;
        if rem != 0 {
            let last = bytes[bytes.len() - 1];
            let mask = !((1u8 << rem) - 1);
            if last & mask != 0 {
                return Some(self.bits - rem + (last & mask).trailing_zeros() as u64);
            }
        }
        // A word past the byte boundary was zero-filled in from_bytes; only the
        // partial byte can hold stray bits.
        None
    }

    /// Encode into `len` bytes (zero padded).
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (i, w) in self.words.iter().enumerate() {
            let b = w.load(Ordering::Acquire).to_le_bytes();
            let start = i * 8;
            if start >= len {
                break;
            }
            let end = (start + 8).min(len);
            out[start..end].copy_from_slice(&b[..end - start]);
        }
        out
    }

    /// Encode the bytes `[start, start+len)` of the on-disk form.
    pub fn bytes_range(&self, start: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        for (k, byte) in out.iter_mut().enumerate() {
            let pos = start + k;
            let word = pos / 8;
            if word >= self.words.len() {
                break;
            }
            *byte = (self.words[word].load(Ordering::Acquire) >> ((pos % 8) * 8)) as u8;
        }
        out
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Bit `i`.
    pub fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Set bit `i`; returns its previous value.
    pub fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(m, Ordering::AcqRel) & m != 0
    }

    /// Clear bit `i`; returns its previous value.
    pub fn clear(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!m, Ordering::AcqRel) & m != 0
    }

    /// Set every bit of `r`.
    pub fn set_range(&self, r: Range<u64>) {
        self.for_words(r, |w, m| {
            w.fetch_or(m, Ordering::AcqRel);
        });
    }

    /// Clear every bit of `r`.
    pub fn clear_range(&self, r: Range<u64>) {
        self.for_words(r, |w, m| {
            w.fetch_and(!m, Ordering::AcqRel);
        });
    }

    fn for_words(&self, r: Range<u64>, mut f: impl FnMut(&AtomicU64, u64)) {
        let mut i = r.start;
        while i < r.end {
            let word = i / 64;
            let lo = i % 64;
            let hi = (r.end - word * 64).min(64);
            let m = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(&self.words[word as usize], m);
            i = word * 64 + hi;
        }
    }

    /// True if every bit of `r` is set (true for an empty range).
    pub fn all_set(&self, r: Range<u64>) -> bool {
        let mut all = true;
        self.for_words(r, |w, m| all &= w.load(Ordering::Acquire) & m == m);
        all
    }

    /// True if no bit of `r` is set.
    pub fn none_set(&self, r: Range<u64>) -> bool {
        let mut none = true;
        self.for_words(r, |w, m| none &= w.load(Ordering::Acquire) & m == 0);
        none
    }

    /// The run of equal bits that starts at bit `start`: one past its last
    /// bit (scanning no further than `limit`) and the bits' value. Reads a
    /// word at a time and allocates nothing: the mapping of every request
    /// starts here.
    #[inline]
    pub fn run_at(&self, start: u64, limit: u64) -> (u64, bool) {
        let w = self.words[(start / 64) as usize].load(Ordering::Acquire);
        let v = (w >> (start % 64)) & 1 != 0;
        // The first bit that differs from `v`, at or after `start`.
        let flip = if v { u64::MAX } else { 0 };
        let mut differs = (w ^ flip) >> (start % 64);
        let mut i = start;
        loop {
            if differs != 0 {
                return ((i + differs.trailing_zeros() as u64).min(limit), v);
            }
            i = (i / 64 + 1) * 64;
            if i >= limit {
                return (limit, v);
            }
            differs = self.words[(i / 64) as usize].load(Ordering::Acquire) ^ flip;
        }
    }

    /// Runs of equal bits over `r`: (start, end, value).
    pub fn runs(&self, r: Range<u64>) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut i = r.start;
        while i < r.end {
            let (j, v) = self.run_at(i, r.end);
            out.push((i, j, v));
            i = j;
        }
        out
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Copy every bit from `other` (same length).
    pub fn copy_from(&self, other: &AtomicBitmap) {
        for (a, b) in self.words.iter().zip(other.words.iter()) {
            a.store(b.load(Ordering::Acquire), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_order_is_lsb_first() {
        let b = AtomicBitmap::new(20);
        b.set(0);
        b.set(9);
        b.set(19);
        assert_eq!(b.to_bytes(3), vec![0b0000_0001, 0b0000_0010, 0b0000_1000]);
        let c = AtomicBitmap::from_bytes(20, &b.to_bytes(4096)).unwrap();
        assert!(c.get(0) && c.get(9) && c.get(19) && !c.get(1));
        assert_eq!(b.bytes_range(1, 2), vec![0b10, 0b1000]);
    }

    #[test]
    fn stray_bits_rejected() {
        assert!(AtomicBitmap::from_bytes(20, &[0, 0, 0x10]).is_err());
        assert!(AtomicBitmap::from_bytes(20, &[0, 0]).is_err());
        assert!(AtomicBitmap::from_bytes(20, &[0xff, 0xff, 0x0f]).is_ok());
    }

    #[test]
    fn ranges() {
        let b = AtomicBitmap::new(300);
        b.set_range(3..200);
        assert!(b.all_set(3..200));
        assert!(!b.all_set(2..200));
        assert!(b.none_set(200..300));
        assert_eq!(b.count_ones(), 197);
        assert_eq!(
            b.runs(0..300),
            vec![(0, 3, false), (3, 200, true), (200, 300, false)]
        );
        b.clear_range(64..128);
        assert_eq!(
            b.runs(60..130),
            vec![(60, 64, true), (64, 128, false), (128, 130, true)]
        );
    }

    #[test]
    fn run_at_matches_a_bit_by_bit_scan() {
        // Patterns that cross word boundaries, full words of each value and
        // the unused bits of the last word.
        let b = AtomicBitmap::new(333);
        b.set_range(5..9);
        b.set_range(63..65);
        b.set_range(128..256);
        b.set(300);
        b.set_range(320..333);
        for start in 0..333 {
            for limit in start + 1..=333 {
                let v = b.get(start);
                let naive = (start..limit).find(|&i| b.get(i) != v).unwrap_or(limit);
                assert_eq!(b.run_at(start, limit), (naive, v), "{start}..{limit}");
            }
        }
    }
}
