//! The snapshot directory (docs/FORMAT.md §10.1) and the refcount table
//! (§10.2) of images with internal snapshots.
//!
//! The directory region holds two **copies** (A/B, like the header slots):
//! each a head, then one entry per snapshot. A writer always writes the copy
//! not holding the newest valid directory, with `generation + 1`, and makes
//! it durable: that write is the commit point of a snapshot create or
//! delete, and a torn write leaves the other copy in force. Nothing here
//! does I/O; every decoder is total.

use super::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::error::{Error, Result};

/// Magic of a directory copy.
pub const DIR_MAGIC: [u8; 4] = *b"FVDS";
/// Bytes of a copy's head.
pub const DIR_HEAD: usize = 64;
/// Bytes of an entry before its name.
pub const ENTRY_FIXED: usize = 80;
/// Longest snapshot name.
pub const MAX_NAME: usize = 1024;
/// Entry flag: the snapshot has a bitmap copy (its image had a base range).
pub const SNAP_HAS_BITMAP: u16 = 1 << 0;
/// Every entry flag this version defines.
pub const SNAP_FLAGS_KNOWN: u16 = SNAP_HAS_BITMAP;
/// `icount` of a snapshot taken without instruction counting.
pub const NO_ICOUNT: u64 = u64::MAX;
/// Smallest directory region that can hold snapshots (two 4 KiB copies).
pub const MIN_DIR_REGION: u64 = 8192;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Unique id, >= 1 (qemu-img's `ID`).
    pub id: u64,
    /// Name (qemu-img's `TAG`); need not be unique.
    pub name: String,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u64,
    /// Creation time: nanoseconds within the second.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, in nanoseconds (0: no VM state).
    pub vm_clock_nsec: u64,
    /// Bytes of saved VM state (always 0: fvd saves disk state only).
    pub vm_state_size: u64,
    /// Virtual size of the disk when the snapshot was taken.
    pub disk_size: u64,
    /// Instruction count, or [`NO_ICOUNT`].
    pub icount: u64,
    /// `SNAP_*` flags.
    pub flags: u16,
    /// First physical chunk of the snapshot's chunk table copy.
    pub table_chunk: u64,
    /// First physical chunk of its bitmap copy (with [`SNAP_HAS_BITMAP`]).
    pub bitmap_chunk: u64,
    /// Bits of its bitmap copy (the base blocks at the snapshot).
    pub bitmap_bits: u64,
}

impl SnapshotEntry {
    /// Encoded length: the fixed part and the name padded to 8 bytes.
    pub fn encoded_len(&self) -> usize {
        ENTRY_FIXED + self.name.len().div_ceil(8) * 8
    }

    /// True if the snapshot reads blocks whose bit is 0 from the base.
    pub fn has_bitmap(&self) -> bool {
        self.flags & SNAP_HAS_BITMAP != 0
    }

    /// Entries of its table copy, for chunks of `chunk_size` bytes.
    pub fn table_entries(&self, chunk_size: u64) -> u64 {
        self.disk_size.div_ceil(chunk_size)
    }

    /// Physical chunks its table copy occupies.
    pub fn table_chunks(&self, chunk_size: u64) -> u64 {
        (self.table_entries(chunk_size) * 4).div_ceil(chunk_size)
    }

    /// Bytes of its bitmap copy (0 without one).
    pub fn bitmap_bytes(&self) -> u64 {
        if self.has_bitmap() {
            self.bitmap_bits.div_ceil(8)
        } else {
            0
        }
    }

    /// Physical chunks its bitmap copy occupies.
    pub fn bitmap_chunks(&self, chunk_size: u64) -> u64 {
        self.bitmap_bytes().div_ceil(chunk_size)
    }

    fn encode_into(&self, b: &mut [u8]) {
        put_u64(b, 0, self.id);
        put_u64(b, 8, self.date_sec);
        put_u32(b, 16, self.date_nsec);
        put_u16(b, 20, self.name.len() as u16);
        put_u16(b, 22, self.flags);
        put_u64(b, 24, self.vm_clock_nsec);
        put_u64(b, 32, self.vm_state_size);
        put_u64(b, 40, self.disk_size);
        put_u64(b, 48, self.icount);
        put_u64(b, 56, self.table_chunk);
        put_u64(b, 64, self.bitmap_chunk);
        put_u64(b, 72, self.bitmap_bits);
        b[ENTRY_FIXED..ENTRY_FIXED + self.name.len()].copy_from_slice(self.name.as_bytes());
    }

    /// Decode the entry at the start of `b`: the entry and its length.
    fn decode(b: &[u8]) -> Result<(SnapshotEntry, usize)> {
        if b.len() < ENTRY_FIXED {
            return Err(Error::corrupt("snapshot directory: truncated entry"));
        }
        let name_len = get_u16(b, 20) as usize;
        let len = ENTRY_FIXED + name_len.div_ceil(8) * 8;
        if name_len == 0 || name_len > MAX_NAME || len > b.len() {
            return Err(Error::corrupt(format!(
                "snapshot directory: entry name of {name_len} bytes does not fit"
            )));
        }
        let name = std::str::from_utf8(&b[ENTRY_FIXED..ENTRY_FIXED + name_len])
            .map_err(|_| Error::corrupt("snapshot directory: a name is not UTF-8"))?;
        let e = SnapshotEntry {
            id: get_u64(b, 0),
            name: name.to_string(),
            date_sec: get_u64(b, 8),
            date_nsec: get_u32(b, 16),
            flags: get_u16(b, 22),
            vm_clock_nsec: get_u64(b, 24),
            vm_state_size: get_u64(b, 32),
            disk_size: get_u64(b, 40),
            icount: get_u64(b, 48),
            table_chunk: get_u64(b, 56),
            bitmap_chunk: get_u64(b, 64),
            bitmap_bits: get_u64(b, 72),
        };
        if e.id == 0 {
            return Err(Error::corrupt("snapshot directory: an entry has id 0"));
        }
        if e.flags & !SNAP_FLAGS_KNOWN != 0 {
            return Err(Error::corrupt(format!(
                "snapshot directory: snapshot {} has unknown flags {:#x}",
                e.id, e.flags
            )));
        }
        if e.date_nsec >= 1_000_000_000 {
            return Err(Error::corrupt(format!(
                "snapshot directory: snapshot {} has date_nsec {}",
                e.id, e.date_nsec
            )));
        }
        Ok((e, len))
    }
}

/// Where the refcount table lives and how many counts it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefcountLocation {
    /// File offset: the refcount region's, or a run of physical chunks.
    pub offset: u64,
    /// Counts it holds (chunks at or past it have count 0).
    pub entries: u64,
}

impl RefcountLocation {
    /// Bytes it occupies.
    pub fn bytes(&self) -> u64 {
        self.entries * 2
    }
}

/// The decoded directory: what one valid copy says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Directory {
    /// Generation of the copy it was read from (0: none valid).
    pub generation: u64,
    /// The refcount table.
    pub refcounts: RefcountLocation,
    /// Id of the snapshot an interrupted apply is switching to (0: none).
    pub applying: u64,
    /// The snapshots, in creation order.
    pub entries: Vec<SnapshotEntry>,
}

impl Directory {
    /// Bytes the directory needs in one copy.
    pub fn encoded_len(&self) -> usize {
        DIR_HEAD
            + self
                .entries
                .iter()
                .map(SnapshotEntry::encoded_len)
                .sum::<usize>()
    }

    /// Encode into one copy of `copy_len` bytes with `generation`.
    pub fn encode(&self, generation: u64, copy_len: usize) -> Result<Vec<u8>> {
        let used = self.encoded_len();
        if used > copy_len {
            return Err(Error::new(
                crate::error::ErrorKind::NoSpace,
                format!(
                    "the snapshot directory is full ({} snapshots need {used} bytes, {copy_len} fit); delete snapshots first",
                    self.entries.len()
                ),
            ));
        }
        let mut b = vec![0u8; copy_len];
        b[0..4].copy_from_slice(&DIR_MAGIC);
        put_u64(&mut b, 8, generation);
        put_u32(&mut b, 16, used as u32);
        put_u32(&mut b, 20, self.entries.len() as u32);
        put_u64(&mut b, 24, self.refcounts.offset);
        put_u64(&mut b, 32, self.refcounts.entries);
        put_u64(&mut b, 40, self.applying);
        let mut pos = DIR_HEAD;
        for e in &self.entries {
            e.encode_into(&mut b[pos..]);
            pos += e.encoded_len();
        }
        let crc = crc32c::crc32c(&b[8..used]);
        put_u32(&mut b, 4, crc);
        Ok(b)
    }

    /// Decode one copy. `Ok(None)`: not a valid copy (wrong magic or CRC:
    /// never written, or torn). A copy whose CRC matches but whose content
    /// contradicts itself is corruption.
    pub fn decode(b: &[u8]) -> Result<Option<Directory>> {
        if b.len() < DIR_HEAD || b[0..4] != DIR_MAGIC {
            return Ok(None);
        }
        let used = get_u32(b, 16) as usize;
        if !(DIR_HEAD..=b.len()).contains(&used) {
            return Ok(None);
        }
        if crc32c::crc32c(&b[8..used]) != get_u32(b, 4) {
            return Ok(None);
        }
        let count = get_u32(b, 20) as usize;
        let mut d = Directory {
            generation: get_u64(b, 8),
            refcounts: RefcountLocation {
                offset: get_u64(b, 24),
                entries: get_u64(b, 32),
            },
            applying: get_u64(b, 40),
            entries: Vec::with_capacity(count.min(4096)),
        };
        let mut pos = DIR_HEAD;
        for _ in 0..count {
            let (e, len) = SnapshotEntry::decode(&b[pos..used])?;
            if d.entries.iter().any(|x| x.id == e.id) {
                return Err(Error::corrupt(format!(
                    "snapshot directory: id {} is used twice",
                    e.id
                )));
            }
            d.entries.push(e);
            pos += len;
        }
        if pos != used {
            return Err(Error::corrupt(format!(
                "snapshot directory: {count} entries end at byte {pos}, the head says {used}"
            )));
        }
        if d.applying != 0 && !d.entries.iter().any(|e| e.id == d.applying) {
            return Err(Error::corrupt(format!(
                "snapshot directory: an apply of snapshot {} is pending, but there is no such snapshot",
                d.applying
            )));
        }
        Ok(Some(d))
    }

    /// The id a new snapshot gets: one more than the largest (as qemu-img).
    pub fn next_id(&self) -> u64 {
        self.entries.iter().map(|e| e.id).max().unwrap_or(0) + 1
    }

    /// The snapshot with id `id`.
    pub fn by_id(&self, id: u64) -> Option<&SnapshotEntry> {
        self.entries.iter().find(|e| e.id == id)
    }
}

/// Decode the directory region (both copies, each `region.len() / 2`
/// bytes): the newest valid copy and its index, or `None` when neither is
/// valid. On equal generations copy 0 wins.
pub fn decode_copies(region: &[u8]) -> Result<Option<(Directory, usize)>> {
    let half = region.len() / 2;
    let a = Directory::decode(&region[..half])?;
    let b = Directory::decode(&region[half..2 * half])?;
    Ok(match (a, b) {
        (Some(a), Some(b)) if b.generation > a.generation => Some((b, 1)),
        (Some(a), _) => Some((a, 0)),
        (None, Some(b)) => Some((b, 1)),
        (None, None) => None,
    })
}

/// Refcount table bytes `[start, start+len)` of `counts` (little-endian u16
/// per physical chunk; zeros past the counts given).
pub fn refcount_bytes(counts: impl Fn(u64) -> u16, entries: u64, start: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    refcount_bytes_into(counts, entries, start, &mut out);
    out
}

/// [`refcount_bytes`] written into `out` (its length is the range's; every
/// byte of it is written).
pub fn refcount_bytes_into(counts: impl Fn(u64) -> u16, entries: u64, start: u64, out: &mut [u8]) {
    // The table is a run of u16: from an odd start the first byte is the
    // high half of an entry; then whole entries; then maybe a low half.
    let count = |p: u64| if p < entries { counts(p) } else { 0 };
    let head = (start % 2) as usize;
    if head == 1
        && let Some(b) = out.first_mut()
    {
        *b = count(start / 2).to_le_bytes()[1];
    }
    let mut pos = start + head as u64;
    let skip = head.min(out.len());
    let mut pairs = out[skip..].chunks_exact_mut(2);
    for pair in &mut pairs {
        pair.copy_from_slice(&count(pos / 2).to_le_bytes());
        pos += 2;
    }
    if let [b] = pairs.into_remainder() {
        *b = count(pos / 2).to_le_bytes()[0];
    }
}

/// Decode a refcount table.
pub fn decode_refcounts(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|x| u16::from_le_bytes([x[0], x[1]]))
        .collect()
}

/// Decode a chunk-table copy (`entries` u32 values).
pub fn decode_table(b: &[u8], entries: u64) -> Result<Vec<u32>> {
    if (b.len() as u64) < entries * 4 {
        return Err(Error::corrupt("snapshot table copy is truncated"));
    }
    Ok(b[..entries as usize * 4]
        .chunks_exact(4)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
        .collect())
}

/// Encode a chunk table.
pub fn encode_table(table: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; table.len() * 4];
    encode_table_into(table, &mut b);
    b
}

/// [`encode_table`] into `out` (`4 × table.len()` bytes).
pub fn encode_table_into(table: &[u32], out: &mut [u8]) {
    for (d, e) in out.chunks_exact_mut(4).zip(table) {
        d.copy_from_slice(&e.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            id,
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 1 << 30,
            icount: NO_ICOUNT,
            flags: SNAP_HAS_BITMAP,
            table_chunk: 7,
            bitmap_chunk: 9,
            bitmap_bits: 1000,
        }
    }

    fn dir() -> Directory {
        Directory {
            generation: 0,
            refcounts: RefcountLocation {
                offset: 1 << 20,
                entries: 4096,
            },
            applying: 0,
            entries: vec![entry(1, "first"), entry(3, "a longer name here")],
        }
    }

    #[test]
    fn directory_round_trips() {
        let d = dir();
        let b = d.encode(5, 4096).unwrap();
        let got = Directory::decode(&b).unwrap().unwrap();
        assert_eq!(got.generation, 5);
        assert_eq!(got.entries, d.entries);
        assert_eq!(got.refcounts, d.refcounts);
        assert_eq!(d.next_id(), 4);
    }

    #[test]
    fn newer_valid_copy_wins_and_torn_copies_are_ignored() {
        let d = dir();
        let mut region = vec![0u8; 8192];
        assert!(decode_copies(&region).unwrap().is_none());
        region[..4096].copy_from_slice(&d.encode(1, 4096).unwrap());
        let mut newer = d.clone();
        newer.entries.pop();
        region[4096..].copy_from_slice(&newer.encode(2, 4096).unwrap());
        let (got, copy) = decode_copies(&region).unwrap().unwrap();
        assert_eq!((copy, got.entries.len()), (1, 1));
        // A torn newer copy: the older one is in force.
        region[4096 + 70] ^= 0xff;
        let (got, copy) = decode_copies(&region).unwrap().unwrap();
        assert_eq!((copy, got.entries.len()), (0, 2));
    }

    #[test]
    fn full_directory_is_refused() {
        let mut d = dir();
        for i in 10..200 {
            d.entries.push(entry(i, "name"));
        }
        assert!(d.encode(1, 4096).is_err());
    }

    #[test]
    fn contradictions_under_a_good_crc_are_corruption() {
        let mut d = dir();
        d.entries[1].id = 1;
        let b = d.encode(1, 4096).unwrap();
        assert!(Directory::decode(&b).is_err());
        let mut d = dir();
        d.applying = 99;
        let b = d.encode(1, 4096).unwrap();
        assert!(Directory::decode(&b).is_err());
    }

    #[test]
    fn decoding_never_panics_on_garbage() {
        let mut b = dir().encode(1, 4096).unwrap();
        for i in 0..4096 {
            let saved = b[i];
            b[i] = b[i].wrapping_add(0x5b);
            let _ = Directory::decode(&b);
            // With the CRC fixed up the content checks run too.
            let used = (get_u32(&b, 16) as usize).clamp(DIR_HEAD, 4096);
            let crc = crc32c::crc32c(&b[8..used]);
            let mut fixed = b.clone();
            put_u32(&mut fixed, 4, crc);
            let _ = Directory::decode(&fixed);
            b[i] = saved;
        }
    }

    #[test]
    fn refcount_bytes_encode_each_count_little_endian() {
        let counts = [1u16, 0x0203, 0, 7];
        let all = refcount_bytes(|p| counts[p as usize], 4, 0, 8);
        assert_eq!(all, vec![1, 0, 3, 2, 0, 0, 7, 0]);
        assert_eq!(decode_refcounts(&all), counts);
        // A window starting in the middle, and zeros past the counts.
        assert_eq!(
            refcount_bytes(|p| counts[p as usize], 4, 3, 7),
            vec![2, 0, 0, 7, 0, 0, 0]
        );
        // An even start with an odd length ends on a low half.
        assert_eq!(
            refcount_bytes(|p| counts[p as usize], 4, 0, 3),
            vec![1, 0, 3]
        );
        assert_eq!(refcount_bytes(|p| counts[p as usize], 4, 5, 1), vec![0]);
    }
}
