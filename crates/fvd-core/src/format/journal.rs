//! Journal blocks: self-contained, checksummed 4 KiB units of metadata records.
//!
//! A block is valid only if its magic and CRC32C match, its epoch equals the
//! header's `journal_epoch` and its sequence number equals its index in the
//! journal region. Replay applies the records of valid blocks 0, 1, 2, ...
//! in order and stops at the first invalid one. See docs/FORMAT.md §5.

use super::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::error::{Error, Result};

/// Size of one journal block.
pub const BLOCK_SIZE: usize = 4096;
/// Magic at the start of every journal block ("FVDJ").
pub const MAGIC: u32 = u32::from_le_bytes(*b"FVDJ");
/// Bytes of block header before the records.
pub const BLOCK_HEADER: usize = 32;
/// Bytes available for records in one block.
pub const PAYLOAD: usize = BLOCK_SIZE - BLOCK_HEADER;

const REC_SET_BITS: u16 = 1;
const REC_CLEAR_BITS: u16 = 2;
const REC_TABLE: u16 = 3;

/// One metadata update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Set bitmap bits `[first, first+count)`.
    SetBits {
        /// First block.
        first: u64,
        /// Number of blocks (> 0).
        count: u32,
    },
    /// Clear bitmap bits `[first, first+count)`.
    ClearBits {
        /// First block.
        first: u64,
        /// Number of blocks (> 0).
        count: u32,
    },
    /// Overwrite chunk-table entries starting at `first`.
    Table {
        /// First chunk index.
        first: u64,
        /// New entries.
        entries: Vec<u32>,
    },
}

impl Record {
    /// Encoded size in bytes (a multiple of 8).
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::SetBits { .. } | Record::ClearBits { .. } => 16,
            Record::Table { entries, .. } => 16 + (entries.len() * 4).div_ceil(8) * 8,
        }
    }

    /// Most table entries one record may carry (so it fits in a block).
    pub const MAX_TABLE_ENTRIES: usize = (PAYLOAD - 16) / 4;

    fn encode_into(&self, b: &mut [u8]) {
        match self {
            Record::SetBits { first, count } | Record::ClearBits { first, count } => {
                let t = if matches!(self, Record::SetBits { .. }) {
                    REC_SET_BITS
                } else {
                    REC_CLEAR_BITS
                };
                put_u16(b, 0, t);
                put_u32(b, 4, *count);
                put_u64(b, 8, *first);
            }
            Record::Table { first, entries } => {
                put_u16(b, 0, REC_TABLE);
                put_u32(b, 4, entries.len() as u32);
                put_u64(b, 8, *first);
                for (i, e) in entries.iter().enumerate() {
                    put_u32(b, 16 + 4 * i, *e);
                }
            }
        }
    }
}

/// A decoded journal block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Epoch the block was written in.
    pub epoch: u64,
    /// Index of the block in the journal.
    pub seq: u64,
    /// Its records, in order.
    pub records: Vec<Record>,
}

/// Encode a block. The records must fit ([`pack`] guarantees it).
pub fn encode_block(epoch: u64, seq: u64, records: &[Record]) -> [u8; BLOCK_SIZE] {
    let mut b = [0u8; BLOCK_SIZE];
    put_u32(&mut b, 0, MAGIC);
    put_u64(&mut b, 8, epoch);
    put_u64(&mut b, 16, seq);
    put_u16(&mut b, 24, records.len() as u16);
    let mut pos = BLOCK_HEADER;
    for r in records {
        let n = r.encoded_len();
        assert!(pos + n <= BLOCK_SIZE, "journal records overflow a block");
        r.encode_into(&mut b[pos..pos + n]);
        pos += n;
    }
    put_u16(&mut b, 26, (pos - BLOCK_HEADER) as u16);
    let crc = crc32c::crc32c(&b[8..]);
    put_u32(&mut b, 4, crc);
    b
}

/// Decode the block at index `seq` of a journal in epoch `epoch`.
///
/// `Ok(None)` means "not a block of this epoch at this position": the end of
/// the journal. `Err` means the block checks out (CRC, epoch, sequence) but
/// its content is malformed — corruption, not a torn write.
pub fn decode_block(b: &[u8], epoch: u64, seq: u64) -> Result<Option<Block>> {
    if b.len() < BLOCK_SIZE || get_u32(b, 0) != MAGIC {
        return Ok(None);
    }
    let b = &b[..BLOCK_SIZE];
    if get_u32(b, 4) != crc32c::crc32c(&b[8..]) {
        return Ok(None);
    }
    if get_u64(b, 8) != epoch || get_u64(b, 16) != seq {
        return Ok(None);
    }
    let n = get_u16(b, 24) as usize;
    let used = get_u16(b, 26) as usize;
    if used > PAYLOAD {
        return Err(Error::corrupt(format!(
            "journal block {seq}: record bytes {used} exceed the block"
        )));
    }
    let mut records = Vec::with_capacity(n.min(PAYLOAD / 16));
    let mut pos = BLOCK_HEADER;
    let end = BLOCK_HEADER + used;
    for i in 0..n {
        if pos + 16 > end {
            return Err(Error::corrupt(format!(
                "journal block {seq}: record {i} is truncated"
            )));
        }
        let t = get_u16(b, pos);
        let count = get_u32(b, pos + 4);
        let first = get_u64(b, pos + 8);
        let rec = match t {
            REC_SET_BITS | REC_CLEAR_BITS => {
                if count == 0 {
                    return Err(Error::corrupt(format!(
                        "journal block {seq}: record {i} covers no blocks"
                    )));
                }
                if t == REC_SET_BITS {
                    Record::SetBits { first, count }
                } else {
                    Record::ClearBits { first, count }
                }
            }
            REC_TABLE => {
                let len = 16 + (count as usize * 4).div_ceil(8) * 8;
                if count == 0 || pos + len > end {
                    return Err(Error::corrupt(format!(
                        "journal block {seq}: table record {i} has a bad length"
                    )));
                }
                let entries = (0..count as usize)
                    .map(|k| get_u32(b, pos + 16 + 4 * k))
                    .collect();
                Record::Table { first, entries }
            }
            other => {
                return Err(Error::corrupt(format!(
                    "journal block {seq}: unknown record type {other}"
                )));
            }
        };
        pos += rec.encoded_len();
        records.push(rec);
    }
    Ok(Some(Block {
        epoch,
        seq,
        records,
    }))
}

/// Split records into groups that each fit one block, keeping their order.
pub fn pack(records: &[Record]) -> Vec<Vec<Record>> {
    let mut blocks: Vec<Vec<Record>> = Vec::new();
    let mut used = PAYLOAD;
    for r in records {
        let n = r.encoded_len();
        if used + n > PAYLOAD {
            blocks.push(Vec::new());
            used = 0;
        }
        blocks
            .last_mut()
            .expect("a block was just pushed")
            .push(r.clone());
        used += n;
    }
    blocks
}

/// Split groups of records into blocks: a group that fits in one block is
/// never split across two (so it becomes durable atomically); a group larger
/// than a block is split at record boundaries.
pub fn pack_groups(groups: &[Vec<Record>]) -> Vec<Vec<Record>> {
    let mut blocks: Vec<Vec<Record>> = Vec::new();
    let mut used = PAYLOAD;
    for g in groups {
        let size: usize = g.iter().map(Record::encoded_len).sum();
        if size <= PAYLOAD && used + size > PAYLOAD {
            blocks.push(Vec::new());
            used = 0;
        }
        for r in g {
            let n = r.encoded_len();
            if used + n > PAYLOAD {
                blocks.push(Vec::new());
                used = 0;
            }
            blocks
                .last_mut()
                .expect("a block was just pushed")
                .push(r.clone());
            used += n;
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::SetBits { first: 5, count: 3 },
            Record::Table {
                first: 9,
                entries: vec![1, 2, 0xffff_ffff],
            },
            Record::ClearBits {
                first: 1 << 33,
                count: 1,
            },
        ]
    }

    #[test]
    fn round_trip() {
        let b = encode_block(7, 3, &sample());
        let got = decode_block(&b, 7, 3).unwrap().unwrap();
        assert_eq!(got.records, sample());
    }

    #[test]
    fn wrong_epoch_or_position_ends_the_journal() {
        let b = encode_block(7, 3, &sample());
        assert_eq!(decode_block(&b, 8, 3).unwrap(), None);
        assert_eq!(decode_block(&b, 7, 4).unwrap(), None);
        assert_eq!(decode_block(&[0u8; BLOCK_SIZE], 7, 3).unwrap(), None);
    }

    #[test]
    fn torn_blocks_end_the_journal() {
        let b = encode_block(7, 3, &sample());
        for sector in 1..8 {
            let mut t = b;
            t[sector * 512..].fill(0xa5);
            assert_eq!(
                decode_block(&t, 7, 3).unwrap(),
                None,
                "torn at sector {sector}"
            );
        }
    }

    /// The rules docs/FORMAT.md §5.1 states for the record count and the
    /// declared record bytes.
    #[test]
    fn record_count_and_record_bytes() {
        let reseal = |b: &mut [u8; BLOCK_SIZE]| {
            let crc = crc32c::crc32c(&b[8..]);
            put_u32(b, 4, crc);
        };
        // A TABLE record of 3 entries is padded to 32 bytes.
        let t3 = Record::Table {
            first: 0,
            entries: vec![1, 2, 3],
        };
        assert_eq!(t3.encoded_len(), 32);
        let b = encode_block(1, 0, std::slice::from_ref(&t3));
        assert_eq!(get_u16(&b, 26), 32);
        // Declared bytes beyond the counted records are ignored.
        let mut b = encode_block(1, 0, &[Record::SetBits { first: 0, count: 1 }]);
        put_u16(&mut b, 26, 48);
        reseal(&mut b);
        assert_eq!(decode_block(&b, 1, 0).unwrap().unwrap().records.len(), 1);
        // Fewer declared bytes than the counted records need: corruption.
        let mut b = encode_block(1, 0, std::slice::from_ref(&t3));
        put_u16(&mut b, 26, 28);
        reseal(&mut b);
        assert!(decode_block(&b, 1, 0).is_err());
        // More than a block's payload: corruption.
        let mut b = encode_block(1, 0, &[]);
        put_u16(&mut b, 26, PAYLOAD as u16 + 8);
        reseal(&mut b);
        assert!(decode_block(&b, 1, 0).is_err());
    }

    #[test]
    fn bad_content_with_valid_crc_is_corruption() {
        let mut b = encode_block(7, 3, &[Record::SetBits { first: 0, count: 1 }]);
        put_u16(&mut b, BLOCK_HEADER, 99);
        let crc = crc32c::crc32c(&b[8..]);
        put_u32(&mut b, 4, crc);
        assert!(decode_block(&b, 7, 3).is_err());
    }

    #[test]
    fn groups_stay_in_one_block() {
        let small = vec![
            Record::Table {
                first: 0,
                entries: vec![1; 500],
            },
            Record::SetBits { first: 0, count: 8 },
        ];
        // 2,032 bytes per group: two fit in a block, the third starts a new one.
        let blocks = pack_groups(&[small.clone(), small.clone(), small.clone()]);
        assert_eq!(blocks.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 2]);
        let big: Vec<Record> = (0..600)
            .map(|i| Record::SetBits { first: i, count: 1 })
            .collect();
        let blocks = pack_groups(std::slice::from_ref(&big));
        assert_eq!(blocks.concat(), big);
    }

    #[test]
    fn pack_fills_blocks() {
        let recs: Vec<Record> = (0..1000)
            .map(|i| Record::SetBits {
                first: i * 2,
                count: 1,
            })
            .collect();
        let blocks = pack(&recs);
        assert_eq!(blocks.len(), 1000usize.div_ceil(PAYLOAD / 16));
        assert_eq!(blocks.concat(), recs);
        let big = vec![Record::Table {
            first: 0,
            entries: vec![0; Record::MAX_TABLE_ENTRIES],
        }];
        assert_eq!(pack(&big).len(), 1);
        let _ = encode_block(1, 0, &pack(&big)[0]);
    }
}
