//! The file-size limit of the host file system, named when a sparse image
//! would not fit under it.
//!
//! A sparse-layout image is one file of `data_offset + virtual_size` bytes
//! (holes cost nothing), so its size is bounded by the largest file the
//! host file system allows: 16 TiB on ext4 with 4 KiB blocks. Growing past
//! it fails with `EFBIG`; the limit itself is found by bisection with
//! `set_len` (about 45 truncates of the still-sparse file) so the message
//! can name it.

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

/// `n` bytes in binary units, as `16 TiB` or `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The largest length `storage` accepts, between `ok` (known to work) and
/// `too_big` (known to fail with EFBIG). The length is `ok` again after.
async fn largest_file(storage: &dyn Storage, ok: u64, too_big: u64) -> u64 {
    let (mut lo, mut hi) = (ok, too_big);
    while hi - lo > 4096 {
        let mid = lo + (hi - lo) / 2;
        match storage.set_len(mid).await {
            Ok(()) => lo = mid,
            Err(_) => hi = mid,
        }
    }
    let _ = storage.set_len(ok).await;
    lo / 4096 * 4096
}

/// Grow the file under a sparse-layout image to `len` bytes for a virtual
/// disk of `virtual_size`. When the host file system cannot hold a file
/// that large, the error names its limit and suggests a compact image.
pub async fn grow_sparse_file(storage: &dyn Storage, len: u64, virtual_size: u64) -> Result<()> {
    let before = storage
        .len()
        .map_err(|e| Error::io(format!("{}: size", storage.describe()), e))?;
    match storage.set_len(len).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
            let limit = largest_file(storage, before, len).await;
            Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "a sparse image of {} needs a file of {len} bytes, but the largest file this file system allows is {}; use -o compact=on (a compact image's file grows with its data)",
                    human_bytes(virtual_size),
                    human_bytes(limit)
                ),
            ))
        }
        Err(e) => Err(Error::io(format!("{}: set size", storage.describe()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(16 << 40), "16 TiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
