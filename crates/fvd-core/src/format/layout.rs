//! Where each region goes in a new image.

use super::header::{
    Extent, FLAG_CLEAN, HEADER_AREA, Header, INCOMPAT_COMPACT, INCOMPAT_ENCRYPTED, MAX_BASE_NAME,
    MAX_BASE_VALIDATOR, MAX_VIRTUAL_SIZE, REGION_COUNT, Region, valid_block_size,
};
use super::{Format, round_up};
use crate::error::{Error, Result};

/// Default bitmap size limit that picks the block size.
pub const MAX_DEFAULT_BITMAP_BYTES: u64 = 4 << 20;
/// The same limit for compact images, whose chunk table takes 4 MiB per TiB:
/// bitmap + table stay within 6 MiB per TiB.
pub const MAX_DEFAULT_COMPACT_BITMAP_BYTES: u64 = 2 << 20;
/// Smallest default block size.
pub const MIN_DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default journal size.
pub const DEFAULT_JOURNAL_SIZE: u64 = 8 << 20;
/// Default chunk size (compact images; recorded for all).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Reserved size of the snapshot directory.
pub const SNAPSHOT_DIR_SIZE: u64 = 64 << 10;
/// Reserved size of the key-slot area of an image that is not encrypted.
pub const KEY_SLOTS_SIZE: u64 = 256 << 10;
/// Size of the key-slot area of an encrypted image: its LUKS1 header and
/// eight slots of key material (2,068,480 bytes), rounded up to 4 KiB.
pub const ENCRYPTED_KEY_SLOTS_SIZE: u64 = crate::crypt::luks::AREA_BYTES.next_multiple_of(4096);
/// Reserved size of the prefetch profile.
pub const PROFILE_SIZE: u64 = 1 << 20;
/// Alignment of the data region.
pub const DATA_ALIGN: u64 = 1 << 20;
/// Default limit of copy-on-read bytes in flight.
pub const DEFAULT_MAX_COR_BYTES: u64 = 16 << 20;
/// Default storage growth step of compact images on files.
pub const DEFAULT_GROW_UNIT: u64 = 64 << 20;

/// What a new image looks like.
#[derive(Debug, Clone)]
pub struct CreateLayout {
    /// Virtual disk size (multiple of 512).
    pub virtual_size: u64,
    /// (name, format, size, validator) of the base, if any.
    pub base: Option<(String, Format, u64, String)>,
    /// Bytes per bitmap bit; `None` picks the default.
    pub block_size: Option<u32>,
    /// Journal bytes; `None` picks the default.
    pub journal_size: Option<u64>,
    /// Use the chunk table.
    pub compact: bool,
    /// Bytes per chunk; `None` picks the default.
    pub chunk_size: Option<u32>,
    /// Encrypted (feature `ENCRYPTED`): a key-slot region large enough for
    /// a LUKS1 header.
    pub encrypted: bool,
}

/// The default block size for a base range: the smallest power of two
/// >= 4 KiB that keeps the bitmap <= 4 MiB.
pub fn default_block_size(base_range: u64) -> u32 {
    block_size_for(base_range, MAX_DEFAULT_BITMAP_BYTES)
}

/// The smallest power of two >= 4 KiB keeping the bitmap within `limit` bytes.
fn block_size_for(base_range: u64, limit: u64) -> u32 {
    let mut bs = MIN_DEFAULT_BLOCK_SIZE as u64;
    while base_range.div_ceil(bs).div_ceil(8) > limit && bs < 1 << 20 {
        bs *= 2;
    }
    bs as u32
}

/// Compute the header of a new image.
pub fn compute_layout(c: &CreateLayout) -> Result<Header> {
    if !c.virtual_size.is_multiple_of(512) {
        return Err(Error::arg(format!(
            "image size {} is not a multiple of 512",
            c.virtual_size
        )));
    }
    if c.virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::arg(format!(
            "image size {} is too large (max 2^62)",
            c.virtual_size
        )));
    }
    let (base_name, base_format, base_size, base_validator) = match c.base.clone() {
        Some((name, format, size, validator)) => (name, Some(format), size, validator),
        None => (String::new(), None, 0, String::new()),
    };
    if base_name.len() > MAX_BASE_NAME {
        return Err(Error::arg(format!(
            "base name is longer than {MAX_BASE_NAME} bytes"
        )));
    }
    if base_validator.len() > MAX_BASE_VALIDATOR {
        return Err(Error::arg("base validator is too long"));
    }
    let base_range = if base_name.is_empty() {
        0
    } else {
        base_size.min(c.virtual_size)
    };
    let block_size = match c.block_size {
        Some(bs) if !valid_block_size(bs) => {
            return Err(Error::arg(format!(
                "block_size {bs} must be a power of two from 512 to 1M"
            )));
        }
        Some(bs) => bs,
        None if c.compact => block_size_for(base_range, MAX_DEFAULT_COMPACT_BITMAP_BYTES),
        None => default_block_size(base_range),
    };
    let chunk_size = c.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE.max(block_size));
    if !chunk_size.is_power_of_two() || chunk_size < block_size || chunk_size > 1 << 30 {
        return Err(Error::arg(format!(
            "chunk_size {chunk_size} must be a power of two from block_size to 1G"
        )));
    }
    let journal_size = round_up(
        c.journal_size.unwrap_or(DEFAULT_JOURNAL_SIZE).max(4096),
        4096,
    );
    let bitmap_len = round_up(base_range.div_ceil(block_size as u64).div_ceil(8), 4096);
    let chunks = c.virtual_size.div_ceil(chunk_size as u64);
    let table_len = if c.compact {
        round_up(chunks * 4, 4096)
    } else {
        0
    };
    let refcount_len = if c.compact {
        round_up(chunks * 2, 4096)
    } else {
        0
    };

    let mut regions = [Extent::default(); REGION_COUNT];
    let mut pos = HEADER_AREA;
    let mut place = |r: Region, len: u64| {
        regions[r as usize] = Extent {
            offset: if len > 0 { pos } else { 0 },
            length: len,
        };
        pos += len;
    };
    place(Region::Bitmap, bitmap_len);
    place(Region::Table, table_len);
    place(Region::Journal, journal_size);
    place(Region::Snapshots, SNAPSHOT_DIR_SIZE);
    place(Region::Refcounts, refcount_len);
    place(
        Region::KeySlots,
        if c.encrypted {
            ENCRYPTED_KEY_SLOTS_SIZE
        } else {
            KEY_SLOTS_SIZE
        },
    );
    place(Region::Profile, PROFILE_SIZE);
    let data_offset = round_up(pos, DATA_ALIGN);
    regions[Region::Data as usize] = Extent {
        offset: data_offset,
        length: if c.compact { 0 } else { c.virtual_size },
    };

    let h = Header {
        generation: 1,
        incompatible: if c.compact { INCOMPAT_COMPACT } else { 0 }
            | if c.encrypted { INCOMPAT_ENCRYPTED } else { 0 },
        compatible: 0,
        autoclear: 0,
        flags: FLAG_CLEAN,
        virtual_size: c.virtual_size,
        base_size,
        block_size,
        chunk_size,
        journal_epoch: 1,
        grow_unit: super::layout::DEFAULT_GROW_UNIT,
        max_cor_bytes: DEFAULT_MAX_COR_BYTES,
        regions,
        base_format,
        base_name,
        base_validator,
        grow_cmd: String::new(),
    };
    h.validate()?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_block_sizes_match_the_spec() {
        assert_eq!(default_block_size(0), 4096);
        assert_eq!(default_block_size(128 << 30), 4096);
        assert_eq!(default_block_size((128 << 30) + 4096), 8192);
        assert_eq!(default_block_size(1 << 40), 32 << 10);
        assert_eq!(default_block_size(u64::MAX / 4), 1 << 20);
    }

    #[test]
    fn one_tib_bitmap_is_four_mib() {
        let h = compute_layout(&CreateLayout {
            virtual_size: 1 << 40,
            base: Some(("b".into(), Format::Raw, 1 << 40, String::new())),
            block_size: None,
            journal_size: None,
            compact: false,
            chunk_size: None,
            encrypted: false,
        })
        .unwrap();
        assert_eq!(h.region(Region::Bitmap).length, 4 << 20);
        assert_eq!(h.region(Region::Data).offset % DATA_ALIGN, 0);
    }

    #[test]
    fn one_tib_compact_metadata_is_six_mib() {
        let h = compute_layout(&CreateLayout {
            virtual_size: 1 << 40,
            base: Some(("b".into(), Format::Raw, 1 << 40, String::new())),
            block_size: None,
            journal_size: None,
            compact: true,
            chunk_size: None,
            encrypted: false,
        })
        .unwrap();
        assert_eq!(h.block_size, 64 << 10);
        assert_eq!(
            h.region(Region::Bitmap).length + h.region(Region::Table).length,
            6 << 20
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut c = CreateLayout {
            virtual_size: 1000,
            base: None,
            block_size: None,
            journal_size: None,
            compact: false,
            chunk_size: None,
            encrypted: false,
        };
        assert!(compute_layout(&c).is_err());
        c.virtual_size = 1 << 20;
        c.block_size = Some(3000);
        assert!(compute_layout(&c).is_err());
        c.block_size = Some(256);
        assert!(compute_layout(&c).is_err());
        c.block_size = Some(2 << 20);
        assert!(compute_layout(&c).is_err());
    }
}
