//! The checksum table of a base cache (`<key>.sums`, docs/FORMAT.md §12).
//!
//! A 4 KiB header naming what is cached (base URL, validator, size, block
//! size), then one 8-byte entry per cache block: the CRC-32C of the block's
//! bytes and its bitwise complement. An entry is *present* only when both
//! halves agree, so a zeroed entry (never filled, or evicted), a torn entry
//! and a flipped bit all read as "absent" and the block is fetched again.
//! The entry is the only presence record: the engine never trusts the data
//! file without it, and checks every block it reads against it.
//!
//! Pure encode/decode: no I/O here.

/// First bytes of a checksum table.
pub const MAGIC: [u8; 8] = *b"FVDCACHE";
/// Version of the layout below.
pub const VERSION: u32 = 1;
/// Bytes of the header; the entries follow it.
pub const HEADER_SIZE: u64 = 4096;
/// Bytes per entry.
pub const ENTRY_SIZE: u64 = 8;
/// Offset of the header's CRC field.
const CRC_AT: usize = 28;
/// Where the URL starts.
const NAMES_AT: usize = 32;

/// What a cache holds: checked at every open, so a cache never serves data
/// of another base (or of another block size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableHeader {
    /// Bytes per cache block (a power of two).
    pub block_size: u32,
    /// Size of the base in bytes.
    pub base_size: u64,
    /// The base's name as the cache key was made from it.
    pub url: String,
    /// The base's validator (`Base::validator`: size, ETag, Last-Modified).
    pub validator: String,
}

impl TableHeader {
    /// The 4 KiB header; an error if the URL and validator do not fit.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let (u, v) = (self.url.as_bytes(), self.validator.as_bytes());
        if NAMES_AT + u.len() + v.len() > HEADER_SIZE as usize {
            return Err(format!(
                "the base URL and validator take {} bytes; a cache header holds at most {}",
                u.len() + v.len(),
                HEADER_SIZE as usize - NAMES_AT
            ));
        }
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.base_size.to_le_bytes());
        b[24..26].copy_from_slice(&(u.len() as u16).to_le_bytes());
        b[26..28].copy_from_slice(&(v.len() as u16).to_le_bytes());
        b[NAMES_AT..NAMES_AT + u.len()].copy_from_slice(u);
        b[NAMES_AT + u.len()..NAMES_AT + u.len() + v.len()].copy_from_slice(v);
        let crc = crc32c::crc32c(&b);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decode a header; an error names the field that is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER_SIZE as usize {
            return Err("the checksum table is shorter than its header".into());
        }
        let b = &b[..HEADER_SIZE as usize];
        if b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or([0; 2]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("version {version} (this fvd reads {VERSION})"));
        }
        let mut zeroed = b.to_vec();
        zeroed[CRC_AT..CRC_AT + 4].fill(0);
        if crc32c::crc32c(&zeroed) != u32_at(CRC_AT) {
            return Err("header checksum mismatch".into());
        }
        let block_size = u32_at(12);
        let base_size = u64::from_le_bytes(b[16..24].try_into().unwrap_or([0; 8]));
        let (ul, vl) = (u16_at(24) as usize, u16_at(26) as usize);
        if NAMES_AT + ul + vl > b.len() {
            return Err("URL and validator lengths run past the header".into());
        }
        let text = |r: std::ops::Range<usize>| {
            String::from_utf8(b[r].to_vec()).map_err(|_| "a name is not UTF-8".to_string())
        };
        Ok(TableHeader {
            block_size,
            base_size,
            url: text(NAMES_AT..NAMES_AT + ul)?,
            validator: text(NAMES_AT + ul..NAMES_AT + ul + vl)?,
        })
    }
}

/// Offset of block `b`'s entry in the table file.
pub fn entry_offset(b: u64) -> u64 {
    HEADER_SIZE + b * ENTRY_SIZE
}

/// Length of the table file for `blocks` blocks.
pub fn table_len(blocks: u64) -> u64 {
    entry_offset(blocks)
}

/// The entry of a block whose bytes have CRC-32C `crc`.
pub fn encode_entry(crc: u32) -> [u8; 8] {
    let mut e = [0u8; 8];
    e[0..4].copy_from_slice(&crc.to_le_bytes());
    e[4..8].copy_from_slice(&(!crc).to_le_bytes());
    e
}

/// The entry of an absent block.
pub const ABSENT: [u8; 8] = [0; 8];

/// The CRC an entry records, or `None` for an absent (zeroed, torn or
/// damaged) entry.
pub fn decode_entry(e: &[u8]) -> Option<u32> {
    let crc = u32::from_le_bytes(e.get(0..4)?.try_into().ok()?);
    let check = u32::from_le_bytes(e.get(4..8)?.try_into().ok()?);
    (check == !crc).then_some(crc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TableHeader {
        TableHeader {
            block_size: 65536,
            base_size: 12345,
            url: "https://example.com/base.raw".into(),
            validator: "size=12345 etag=\"abc\"".into(),
        }
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let b = header().encode().unwrap();
        assert_eq!(TableHeader::decode(&b).unwrap(), header());
        for i in [0, 9, 13, 20, 40, 4000] {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(TableHeader::decode(&d).is_err(), "flip at {i} accepted");
        }
        assert!(TableHeader::decode(&b[..100]).is_err());
        let long = TableHeader {
            url: "x".repeat(5000),
            ..header()
        };
        assert!(long.encode().is_err());
    }

    #[test]
    fn entries_are_present_only_when_both_halves_agree() {
        assert_eq!(decode_entry(&encode_entry(0)), Some(0));
        assert_eq!(decode_entry(&encode_entry(0xdead_beef)), Some(0xdead_beef));
        assert_eq!(decode_entry(&ABSENT), None);
        let mut torn = encode_entry(7);
        torn[5] ^= 1;
        assert_eq!(decode_entry(&torn), None);
        assert_eq!(decode_entry(&[1, 2]), None);
    }
}
