//! The prefetch profile: byte ranges of the base in the order a run (say, a
//! VM's first boot) first read them. Stored in the image's profile region,
//! or in a file shared by every image of one base. Ranges are in bytes, so
//! a profile works for images with any block size.

use super::{get_u32, get_u64, put_u32, put_u64};
use crate::error::{Error, Result};

/// Magic of a profile ("FVDP").
pub const MAGIC: u32 = u32::from_le_bytes(*b"FVDP");
/// Profile format version.
pub const VERSION: u32 = 1;
/// Bytes before the entries.
pub const HEADER: usize = 32;
/// Bytes per entry.
pub const ENTRY: usize = 16;

/// Encode `entries` ((offset, length) pairs, in order).
pub fn encode(entries: &[(u64, u64)]) -> Vec<u8> {
    let mut b = vec![0u8; HEADER + entries.len() * ENTRY];
    put_u32(&mut b, 0, MAGIC);
    put_u32(&mut b, 4, VERSION);
    put_u64(&mut b, 8, entries.len() as u64);
    for (i, (off, len)) in entries.iter().enumerate() {
        put_u64(&mut b, HEADER + i * ENTRY, *off);
        put_u64(&mut b, HEADER + i * ENTRY + 8, *len);
    }
    let crc = crc32c::crc32c(&b[HEADER..]);
    put_u32(&mut b, 16, crc);
    b
}

/// The bound of profile ranges for a base of `base_size` bytes: its size
/// rounded up to a whole 512-byte sector (the sector holding an unaligned
/// end belongs to the base, docs/FORMAT.md §2.5).
pub fn base_limit(base_size: u64) -> u64 {
    base_size.div_ceil(512).saturating_mul(512)
}

/// Decode a profile; `limit` bounds the byte ranges: the size of the base
/// (docs/FORMAT.md §7), whatever the size of the image.
pub fn decode(b: &[u8], limit: u64) -> Result<Vec<(u64, u64)>> {
    if b.len() < HEADER || get_u32(b, 0) != MAGIC {
        return Err(Error::invalid("not an FVD prefetch profile (bad magic)"));
    }
    if get_u32(b, 4) != VERSION {
        return Err(Error::invalid(format!(
            "prefetch profile version {} is not supported",
            get_u32(b, 4)
        )));
    }
    let n = get_u64(b, 8);
    let bytes = n
        .checked_mul(ENTRY as u64)
        .and_then(|x| x.checked_add(HEADER as u64));
    let Some(end) = bytes.filter(|&e| e <= b.len() as u64) else {
        return Err(Error::corrupt(format!(
            "prefetch profile claims {n} entries but is only {} bytes",
            b.len()
        )));
    };
    let body = &b[HEADER..end as usize];
    if crc32c::crc32c(body) != get_u32(b, 16) {
        return Err(Error::corrupt("prefetch profile checksum mismatch"));
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        let off = get_u64(body, i * ENTRY);
        let len = get_u64(body, i * ENTRY + 8);
        if len == 0 {
            return Err(Error::corrupt(format!(
                "prefetch profile entry {i} (offset {off}) has length 0"
            )));
        }
        if off.checked_add(len).is_none_or(|e| e > limit) {
            return Err(Error::corrupt(format!(
                "prefetch profile entry {i} ({off}+{len}) lies outside the base ({limit} bytes)"
            )));
        }
        out.push((off, len));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let e = vec![(4096, 8192), (0, 512), (1 << 30, 1 << 20)];
        let b = encode(&e);
        assert_eq!(decode(&b, 2 << 30).unwrap(), e);
        assert!(decode(&b, 1 << 30).is_err(), "entry past the base accepted");
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 1;
            if let Ok(d) = decode(&c, 2 << 30) {
                assert_eq!(d, e, "flip at {i} changed the content silently");
            }
        }
        assert!(decode(&b[..b.len() - 1], 2 << 30).is_err());
        assert!(decode(&[0u8; 8], 1).is_err());
    }
}
