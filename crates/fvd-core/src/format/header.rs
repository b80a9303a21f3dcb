//! The image header: two 4 KiB slots at offsets 0 and 4096.
//!
//! The header is updated in place rarely (checkpoint, clean close). Each
//! update goes to the slot holding the older generation, so a torn header
//! write leaves the other slot — the previous state — intact. A reader takes
//! the valid slot with the highest generation. See docs/FORMAT.md §2.

use super::{Format, get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};
use crate::error::{Error, ErrorKind, Result};

/// Magic bytes at offset 0 of each header slot.
pub const MAGIC: [u8; 8] = *b"\x89FVD\r\n\x1a\n";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Size of one header slot.
pub const HEADER_SLOT_SIZE: usize = 4096;
/// Bytes reserved for both header slots at the start of the image.
pub const HEADER_AREA: u64 = 2 * HEADER_SLOT_SIZE as u64;
/// Longest base image name.
pub const MAX_BASE_NAME: usize = 1024;
/// Longest base validator string.
pub const MAX_BASE_VALIDATOR: usize = 256;
/// Longest storage-grow command.
pub const MAX_GROW_CMD: usize = 1024;

/// Incompatible feature: data is addressed through the chunk table.
pub const INCOMPAT_COMPACT: u64 = 1 << 0;
/// Incompatible feature: data is encrypted; key slots are in use.
pub const INCOMPAT_ENCRYPTED: u64 = 1 << 1;
/// Incompatible feature: internal snapshots share chunks (refcounts in use).
pub const INCOMPAT_SNAPSHOTS: u64 = 1 << 2;
/// Every incompatible bit this version defines.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_COMPACT | INCOMPAT_ENCRYPTED | INCOMPAT_SNAPSHOTS;
/// Compatible feature: the prefetch profile region holds a recorded profile.
pub const COMPAT_PREFETCH_PROFILE: u64 = 1 << 0;
/// Every compatible bit this version defines.
pub const COMPAT_KNOWN: u64 = COMPAT_PREFETCH_PROFILE;
/// Every autoclear bit this version defines (none yet).
pub const AUTOCLEAR_KNOWN: u64 = 0;

/// Names of the incompatible feature bits.
pub const INCOMPAT_NAMES: [(u64, &str); 3] = [
    (INCOMPAT_COMPACT, "compact"),
    (INCOMPAT_ENCRYPTED, "encrypted"),
    (INCOMPAT_SNAPSHOTS, "snapshots"),
];
/// Names of the compatible feature bits.
pub const COMPAT_NAMES: [(u64, &str); 1] = [(COMPAT_PREFETCH_PROFILE, "prefetch-profile")];
/// Names of the autoclear feature bits (none yet).
pub const AUTOCLEAR_NAMES: [(u64, &str); 0] = [];

/// The names of the set bits of a feature word (`names`: one of the
/// `*_NAMES` tables), and the set bits this version has no name for.
pub fn feature_names(bits: u64, names: &[(u64, &'static str)]) -> (Vec<&'static str>, u64) {
    let known = names
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|&(_, n)| n)
        .collect();
    let unknown = names.iter().fold(bits, |rest, (b, _)| rest & !b);
    (known, unknown)
}

/// Flag: the image was closed cleanly; the journal holds nothing to replay.
pub const FLAG_CLEAN: u64 = 1 << 0;
/// Flag: every block of the base range is in the image; the base is never opened.
pub const FLAG_ALL_LOCAL: u64 = 1 << 1;
/// Flag: copy-on-read is on by default for this image.
pub const FLAG_COPY_ON_READ: u64 = 1 << 2;
/// Flag: bits for zero-filled base blocks were set at create time; the image
/// storage must read zeros where it was never written.
pub const FLAG_ZERO_DETECTED: u64 = 1 << 3;
/// Every flag this version defines.
pub const FLAGS_KNOWN: u64 = FLAG_CLEAN | FLAG_ALL_LOCAL | FLAG_COPY_ON_READ | FLAG_ZERO_DETECTED;

/// Regions, in the order of the region table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Region {
    /// One bit per block of the base range.
    Bitmap = 0,
    /// One u32 per chunk of the virtual disk (compact images).
    Table = 1,
    /// The metadata journal.
    Journal = 2,
    /// Internal snapshot directory.
    Snapshots = 3,
    /// Refcounts of chunks used by snapshots.
    Refcounts = 4,
    /// Encryption key slots.
    KeySlots = 5,
    /// Recorded prefetch order.
    Profile = 6,
    /// Guest data.
    Data = 7,
}

/// Number of entries in the region table.
pub const REGION_COUNT: usize = 8;

impl Region {
    /// Every region in table order.
    pub const ALL: [Region; REGION_COUNT] = [
        Region::Bitmap,
        Region::Table,
        Region::Journal,
        Region::Snapshots,
        Region::Refcounts,
        Region::KeySlots,
        Region::Profile,
        Region::Data,
    ];

    /// Lower-case name used in messages and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Region::Bitmap => "bitmap",
            Region::Table => "table",
            Region::Journal => "journal",
            Region::Snapshots => "snapshots",
            Region::Refcounts => "refcounts",
            Region::KeySlots => "key-slots",
            Region::Profile => "prefetch-profile",
            Region::Data => "data",
        }
    }
}

/// Where a region lives in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extent {
    /// Byte offset, 4 KiB aligned.
    pub offset: u64,
    /// Length in bytes, a multiple of 4 KiB (the data region excepted).
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Incremented on every header write; picks the newer slot.
    pub generation: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// Size of the virtual disk in bytes (multiple of 512).
    pub virtual_size: u64,
    /// Size of the base image in bytes when the image was created.
    pub base_size: u64,
    /// Bytes per bitmap bit.
    pub block_size: u32,
    /// Bytes per chunk-table entry (compact images; else the value reserved for them).
    pub chunk_size: u32,
    /// Journal blocks of this epoch are valid; older ones are ignored.
    pub journal_epoch: u64,
    /// Compact images on files grow by this many bytes.
    pub grow_unit: u64,
    /// Limit of copy-on-read bytes in flight.
    pub max_cor_bytes: u64,
    /// The region table.
    pub regions: [Extent; REGION_COUNT],
    /// Base image format; `None` when there is no base.
    pub base_format: Option<Format>,
    /// Base image name (a path relative to the image's directory, or absolute).
    pub base_name: String,
    /// What identified the base at create time (size, ETag...).
    pub base_validator: String,
    /// Command that grows a block device (compact images).
    pub grow_cmd: String,
}

mod off {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const HEADER_SIZE: usize = 12;
    pub const GENERATION: usize = 16;
    pub const INCOMPAT: usize = 24;
    pub const COMPAT: usize = 32;
    pub const AUTOCLEAR: usize = 40;
    pub const FLAGS: usize = 48;
    pub const VIRTUAL_SIZE: usize = 56;
    pub const BASE_SIZE: usize = 64;
    pub const BLOCK_SIZE: usize = 72;
    pub const CHUNK_SIZE: usize = 76;
    pub const JOURNAL_EPOCH: usize = 80;
    pub const GROW_UNIT: usize = 88;
    pub const MAX_COR: usize = 96;
    pub const REGIONS: usize = 128;
    pub const BASE_FORMAT: usize = 256;
    pub const BASE_NAME_LEN: usize = 272;
    pub const BASE_VALIDATOR_LEN: usize = 274;
    pub const GROW_CMD_LEN: usize = 276;
    pub const BASE_NAME: usize = 512;
    pub const BASE_VALIDATOR: usize = 1536;
    pub const GROW_CMD: usize = 1792;
    pub const CRC: usize = 4092;
}

/// Length of the base format field.
const BASE_FORMAT_LEN: usize = 16;

impl Header {
    /// Size of the bitmap in bits: blocks of the base range.
    pub fn base_blocks(&self) -> u64 {
        self.base_range().div_ceil(self.block_size as u64)
    }

    /// Bytes of the virtual disk backed by the base: min(base size rounded
    /// up to a whole 512-byte sector, virtual size). The sector holding an
    /// unaligned base end is backed by the base as a whole (zeros past the
    /// base's end), so its bit governs all of it.
    pub fn base_range(&self) -> u64 {
        if self.flags & FLAG_ALL_LOCAL != 0 {
            0
        } else {
            self.recorded_base_range()
        }
    }

    /// The base range the recorded base defines, whether or not `ALL_LOCAL`
    /// is set (a snapshot taken before the base was detached still reads
    /// from it).
    pub fn recorded_base_range(&self) -> u64 {
        if self.base_name.is_empty() {
            0
        } else {
            self.base_size
                .min(self.virtual_size)
                .div_ceil(512)
                .saturating_mul(512)
        }
    }

    /// Bits of the bitmap over [`Header::recorded_base_range`].
    pub fn recorded_base_blocks(&self) -> u64 {
        self.recorded_base_range().div_ceil(self.block_size as u64)
    }

    /// A region's extent.
    pub fn region(&self, r: Region) -> Extent {
        self.regions[r as usize]
    }

    /// True if the clean flag is set.
    pub fn is_clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    /// True if every block of the base range is in the image (the base is
    /// no longer read).
    pub fn is_all_local(&self) -> bool {
        self.flags & FLAG_ALL_LOCAL != 0
    }

    /// True if copy-on-read is on by default.
    pub fn copy_on_read(&self) -> bool {
        self.flags & FLAG_COPY_ON_READ != 0
    }

    /// True if zero-filled base blocks were marked local at create time.
    pub fn zero_detected(&self) -> bool {
        self.flags & FLAG_ZERO_DETECTED != 0
    }

    /// True for the compact layout (data through the chunk table).
    pub fn is_compact(&self) -> bool {
        self.incompatible & INCOMPAT_COMPACT != 0
    }

    /// The base as recorded: its name and format, if the image has one.
    pub fn base(&self) -> Option<(&str, Format)> {
        self.base_format.map(|f| (self.base_name.as_str(), f))
    }

    /// Encode into one 4 KiB slot, CRC included.
    pub fn encode(&self) -> [u8; HEADER_SLOT_SIZE] {
        let mut b = [0u8; HEADER_SLOT_SIZE];
        b[off::MAGIC..off::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, off::VERSION, VERSION);
        put_u32(&mut b, off::HEADER_SIZE, HEADER_SLOT_SIZE as u32);
        put_u64(&mut b, off::GENERATION, self.generation);
        put_u64(&mut b, off::INCOMPAT, self.incompatible);
        put_u64(&mut b, off::COMPAT, self.compatible);
        put_u64(&mut b, off::AUTOCLEAR, self.autoclear);
        put_u64(&mut b, off::FLAGS, self.flags);
        put_u64(&mut b, off::VIRTUAL_SIZE, self.virtual_size);
        put_u64(&mut b, off::BASE_SIZE, self.base_size);
        put_u32(&mut b, off::BLOCK_SIZE, self.block_size);
        put_u32(&mut b, off::CHUNK_SIZE, self.chunk_size);
        put_u64(&mut b, off::JOURNAL_EPOCH, self.journal_epoch);
        put_u64(&mut b, off::GROW_UNIT, self.grow_unit);
        put_u64(&mut b, off::MAX_COR, self.max_cor_bytes);
        for (i, r) in self.regions.iter().enumerate() {
            put_u64(&mut b, off::REGIONS + i * 16, r.offset);
            put_u64(&mut b, off::REGIONS + i * 16 + 8, r.length);
        }
        let fmt = self.base_format.map_or("", Format::name).as_bytes();
        let n = fmt.len().min(BASE_FORMAT_LEN);
        b[off::BASE_FORMAT..off::BASE_FORMAT + n].copy_from_slice(&fmt[..n]);
        put_str(
            &mut b,
            off::BASE_NAME_LEN,
            off::BASE_NAME,
            MAX_BASE_NAME,
            &self.base_name,
        );
        put_str(
            &mut b,
            off::BASE_VALIDATOR_LEN,
            off::BASE_VALIDATOR,
            MAX_BASE_VALIDATOR,
            &self.base_validator,
        );
        put_str(
            &mut b,
            off::GROW_CMD_LEN,
            off::GROW_CMD,
            MAX_GROW_CMD,
            &self.grow_cmd,
        );
        let crc = crc32c::crc32c(&b[..off::CRC]);
        put_u32(&mut b, off::CRC, crc);
        b
    }

    /// Decode and validate one slot. `file_desc` names the image in errors.
    pub fn decode(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_SLOT_SIZE {
            return Err(Error::invalid(format!(
                "file too short for an FVD header ({} bytes, need {HEADER_SLOT_SIZE})",
                b.len()
            )));
        }
        let b = &b[..HEADER_SLOT_SIZE];
        if b[..8] != MAGIC {
            return Err(Error::invalid("not an FVD image (bad magic)"));
        }
        let version = get_u32(b, off::VERSION);
        if version != VERSION {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "FVD version {version} is not supported (this build reads version {VERSION})"
                ),
            ));
        }
        let stored = get_u32(b, off::CRC);
        let crc = crc32c::crc32c(&b[..off::CRC]);
        if stored != crc {
            return Err(Error::corrupt(format!(
                "header checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
            )));
        }
        let hsize = get_u32(b, off::HEADER_SIZE);
        if hsize as usize != HEADER_SLOT_SIZE {
            return Err(Error::corrupt(format!(
                "header_size is {hsize}, expected {HEADER_SLOT_SIZE}"
            )));
        }
        let mut regions = [Extent::default(); REGION_COUNT];
        for (i, r) in regions.iter_mut().enumerate() {
            r.offset = get_u64(b, off::REGIONS + i * 16);
            r.length = get_u64(b, off::REGIONS + i * 16 + 8);
        }
        let fmt_raw = &b[off::BASE_FORMAT..off::BASE_FORMAT + BASE_FORMAT_LEN];
        let fmt_len = fmt_raw
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(BASE_FORMAT_LEN);
        let base_format = match std::str::from_utf8(&fmt_raw[..fmt_len]) {
            Err(_) => return Err(Error::corrupt("base_format is not UTF-8")),
            Ok("") => None,
            Ok(name) => Some(name.parse::<Format>().map_err(|_| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("base format '{name}' is not supported"),
                )
            })?),
        };
        let h = Header {
            generation: get_u64(b, off::GENERATION),
            incompatible: get_u64(b, off::INCOMPAT),
            compatible: get_u64(b, off::COMPAT),
            autoclear: get_u64(b, off::AUTOCLEAR),
            flags: get_u64(b, off::FLAGS),
            virtual_size: get_u64(b, off::VIRTUAL_SIZE),
            base_size: get_u64(b, off::BASE_SIZE),
            block_size: get_u32(b, off::BLOCK_SIZE),
            chunk_size: get_u32(b, off::CHUNK_SIZE),
            journal_epoch: get_u64(b, off::JOURNAL_EPOCH),
            grow_unit: get_u64(b, off::GROW_UNIT),
            max_cor_bytes: get_u64(b, off::MAX_COR),
            regions,
            base_format,
            base_name: get_str(
                b,
                off::BASE_NAME_LEN,
                off::BASE_NAME,
                MAX_BASE_NAME,
                "base_name",
            )?,
            base_validator: get_str(
                b,
                off::BASE_VALIDATOR_LEN,
                off::BASE_VALIDATOR,
                MAX_BASE_VALIDATOR,
                "base_validator",
            )?,
            grow_cmd: get_str(
                b,
                off::GROW_CMD_LEN,
                off::GROW_CMD,
                MAX_GROW_CMD,
                "grow_cmd",
            )?,
        };
        h.validate()?;
        Ok(h)
    }

    /// Check every field against the rules of docs/FORMAT.md.
    pub fn validate(&self) -> Result<()> {
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "unknown incompatible feature bits {unknown:#x}; this image needs a newer fvd"
                ),
            ));
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(Error::corrupt(format!(
                "unknown flag bits {:#x}",
                self.flags & !FLAGS_KNOWN
            )));
        }
        if !self.virtual_size.is_multiple_of(512) {
            return Err(Error::corrupt(format!(
                "virtual_size {} is not a multiple of 512",
                self.virtual_size
            )));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(format!(
                "virtual_size {} is larger than 2^62",
                self.virtual_size
            )));
        }
        if !valid_block_size(self.block_size) {
            return Err(Error::corrupt(format!(
                "block_size {} is not a power of two between 512 and 1 MiB",
                self.block_size
            )));
        }
        if !self.chunk_size.is_power_of_two()
            || self.chunk_size < self.block_size
            || self.chunk_size > 1 << 30
        {
            return Err(Error::corrupt(format!(
                "chunk_size {} is not a power of two between block_size and 1 GiB",
                self.chunk_size
            )));
        }
        match (self.base_format, self.base_name.is_empty()) {
            (None, true) | (Some(_), false) => {}
            (None, false) => {
                return Err(Error::corrupt("base_name is set but base_format is empty"));
            }
            (Some(f), true) => {
                return Err(Error::corrupt(format!(
                    "base_format '{}' is set but base_name is empty",
                    f.name()
                )));
            }
        }
        self.validate_regions()
    }

    fn validate_regions(&self) -> Result<()> {
        let mut used: Vec<(u64, u64, Region)> = Vec::new();
        for r in Region::ALL {
            let e = self.region(r);
            if !e.offset.is_multiple_of(4096) {
                return Err(Error::corrupt(format!(
                    "{} region offset {} is not 4 KiB aligned",
                    r.name(),
                    e.offset
                )));
            }
            if r != Region::Data && !e.length.is_multiple_of(4096) {
                return Err(Error::corrupt(format!(
                    "{} region length {} is not a multiple of 4 KiB",
                    r.name(),
                    e.length
                )));
            }
            if e.offset
                .checked_add(e.length)
                .is_none_or(|end| end > MAX_FILE_SIZE)
            {
                return Err(Error::corrupt(format!(
                    "{} region extends past 2^63 bytes",
                    r.name()
                )));
            }
            if e.length > 0 && e.offset < HEADER_AREA {
                return Err(Error::corrupt(format!(
                    "{} region overlaps the header",
                    r.name()
                )));
            }
            if e.length > 0 {
                used.push((e.offset, e.end(), r));
            }
        }
        used.sort();
        for w in used.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(Error::corrupt(format!(
                    "{} and {} regions overlap",
                    w[0].2.name(),
                    w[1].2.name()
                )));
            }
        }
        let bitmap_needed = self.base_blocks().div_ceil(8);
        if self.region(Region::Bitmap).length < bitmap_needed {
            return Err(Error::corrupt(format!(
                "bitmap region is {} bytes, the base range needs {bitmap_needed}",
                self.region(Region::Bitmap).length
            )));
        }
        if self.base_blocks() > MAX_BITMAP_BITS {
            return Err(Error::corrupt("bitmap has more than 2^35 bits"));
        }
        let j = self.region(Region::Journal);
        if j.length < 4096 {
            return Err(Error::corrupt("journal region is missing"));
        }
        let keys = self.region(Region::KeySlots).length;
        if self.incompatible & INCOMPAT_ENCRYPTED != 0 && keys < crate::crypt::luks::AREA_BYTES {
            return Err(Error::corrupt(format!(
                "key-slot region is {keys} bytes, an encrypted image needs {} for its LUKS header",
                crate::crypt::luks::AREA_BYTES
            )));
        }
        if self.incompatible & INCOMPAT_ENCRYPTED != 0
            && !self.region(Region::Data).offset.is_multiple_of(512)
        {
            return Err(Error::corrupt(
                "data region of an encrypted image is not sector aligned",
            ));
        }
        let data = self.region(Region::Data);
        if self.incompatible & INCOMPAT_COMPACT == 0 && data.length < self.virtual_size {
            return Err(Error::corrupt(format!(
                "data region is {} bytes, the virtual disk needs {}",
                data.length, self.virtual_size
            )));
        }
        if self.incompatible & INCOMPAT_COMPACT != 0 {
            // The data region runs to the end of the storage: it must start
            // after every other region.
            let last = used.iter().map(|u| u.1).max().unwrap_or(0);
            if data.offset < HEADER_AREA || data.offset < last {
                return Err(Error::corrupt(
                    "data region of a compact image overlaps the metadata",
                ));
            }
            let chunks = self.virtual_size.div_ceil(self.chunk_size as u64);
            if self.region(Region::Table).length < chunks * 4 {
                return Err(Error::corrupt(
                    "chunk table region is smaller than the virtual disk needs",
                ));
            }
        }
        Ok(())
    }
}

/// Largest virtual size accepted (keeps all offset arithmetic far from overflow).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;
const MAX_FILE_SIZE: u64 = 1 << 63;
/// Largest bitmap accepted: 4 GiB of bits (512 GiB... of blocks at 512 B is far beyond any default).
const MAX_BITMAP_BITS: u64 = 1 << 35;

/// True if `bs` is a power of two between 512 B and 1 MiB.
pub fn valid_block_size(bs: u32) -> bool {
    bs.is_power_of_two() && (512..=1 << 20).contains(&bs)
}

fn put_str(b: &mut [u8], len_off: usize, off: usize, max: usize, s: &str) {
    let bytes = s.as_bytes();
    let n = bytes.len().min(max);
    put_u16(b, len_off, n as u16);
    b[off..off + n].copy_from_slice(&bytes[..n]);
}

fn get_str(b: &[u8], len_off: usize, off: usize, max: usize, what: &str) -> Result<String> {
    let n = get_u16(b, len_off) as usize;
    if n > max {
        return Err(Error::corrupt(format!("{what} length {n} exceeds {max}")));
    }
    let s = std::str::from_utf8(&b[off..off + n])
        .map_err(|_| Error::corrupt(format!("{what} is not UTF-8")))?;
    if s.contains('\0') {
        return Err(Error::corrupt(format!("{what} contains a NUL byte")));
    }
    Ok(s.to_string())
}

/// Pick the newest valid header of the two slots in `area` (8 KiB).
///
/// Returns the header and the slot index it came from. If neither slot is
/// valid, the error of slot 0 is returned (it names the real problem: wrong
/// magic for a non-FVD file).
pub fn decode_slots(area: &[u8]) -> Result<(Header, usize)> {
    let s0 = Header::decode(area);
    let s1 = if area.len() >= 2 * HEADER_SLOT_SIZE {
        Header::decode(&area[HEADER_SLOT_SIZE..])
    } else {
        Err(Error::invalid("second header slot missing"))
    };
    match (s0, s1) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation {
            (b, 1)
        } else {
            (a, 0)
        }),
        (Ok(a), Err(_)) => Ok((a, 0)),
        (Err(e), Err(_)) => Err(e),
        (Err(e0), Ok(b)) => {
            // Slot 0 torn during an update is fine; slot 0 of a different format is not.
            if area.len() >= 8 && area[..8] != MAGIC && e0.kind() == ErrorKind::InvalidImage {
                return Err(e0);
            }
            Ok((b, 1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::{CreateLayout, compute_layout};

    fn sample() -> Header {
        compute_layout(&CreateLayout {
            virtual_size: 10 << 30,
            base: Some((
                "base.raw".into(),
                Format::Raw,
                8 << 30,
                "size=8589934592".into(),
            )),
            block_size: None,
            journal_size: None,
            compact: false,
            chunk_size: None,
            encrypted: false,
        })
        .unwrap()
    }

    #[test]
    fn checksum_is_crc32c_castagnoli() {
        // The check value docs/FORMAT.md gives for the header and journal CRC.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn equal_generations_pick_slot_0() {
        let h = sample();
        let mut area = vec![0u8; 8192];
        area[..4096].copy_from_slice(&h.encode());
        let mut other = h.clone();
        other.journal_epoch = 9;
        area[4096..].copy_from_slice(&other.encode());
        let (got, slot) = decode_slots(&area).unwrap();
        assert_eq!((got.journal_epoch, slot), (h.journal_epoch, 0));
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let b = sample().encode();
        for byte in 0..HEADER_SLOT_SIZE {
            let mut c = b;
            c[byte] ^= 0x10;
            assert!(Header::decode(&c).is_err(), "flip at byte {byte} accepted");
        }
    }

    #[test]
    fn truncated_is_rejected() {
        let b = sample().encode();
        for len in [0, 7, 8, 100, 4091] {
            assert!(Header::decode(&b[..len]).is_err());
        }
    }

    #[test]
    fn unknown_incompatible_bit_is_named() {
        let mut h = sample();
        h.incompatible |= 1 << 40;
        let e = Header::decode(&h.encode()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("incompatible"), "{e}");
    }

    #[test]
    fn unknown_compatible_bit_is_accepted() {
        let mut h = sample();
        h.compatible |= 1 << 40;
        assert!(Header::decode(&h.encode()).is_ok());
    }

    #[test]
    fn newer_slot_wins_and_torn_slot_is_skipped() {
        let mut h = sample();
        let mut area = vec![0u8; 8192];
        area[..4096].copy_from_slice(&h.encode());
        h.generation += 1;
        h.journal_epoch = 7;
        area[4096..].copy_from_slice(&h.encode());
        let (got, slot) = decode_slots(&area).unwrap();
        assert_eq!((got.journal_epoch, slot), (7, 1));
        area[4096 + 100] ^= 1; // tear slot 1
        let (got, slot) = decode_slots(&area).unwrap();
        assert_eq!((got.journal_epoch, slot), (1, 0));
    }

    #[test]
    fn raw_bytes_are_not_an_image() {
        let area = vec![0xabu8; 8192];
        let e = decode_slots(&area).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
