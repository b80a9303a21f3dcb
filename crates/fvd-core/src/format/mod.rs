//! Pure encode/decode and validation of every on-disk structure.
//!
//! Nothing here does I/O. Every decoder is total: malformed bytes give an
//! [`Error`], never a panic. docs/FORMAT.md is the
//! specification these modules implement; keep the two in step.

use crate::error::{Error, ErrorKind, Result};

pub mod bitmap;
pub mod header;
pub mod journal;
pub mod layout;
pub mod profile;
pub mod snapshot;

/// Image formats `fvd` reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// FVD.
    Fvd,
    /// A raw disk image.
    Raw,
    /// A qcow2 image: read-only, through a base provider (fvd-remote).
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fvd" => Ok(Format::Fvd),
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown format '{other}' (expected fvd, raw or qcow2)"),
            )),
        }
    }
}

impl Format {
    /// Name as written in headers and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Format::Fvd => "fvd",
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

pub(crate) fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Round `v` up to a multiple of `align` (a power of two).
pub fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}
