//! A cheap fingerprint of a local base's content, recorded in the image's
//! base validator at create time and verified at every open.
//!
//! A local base is recorded by its size only, so a base rewritten in place
//! (same size, other bytes) would silently change what the image reads.
//! The fingerprint is a CRC-32C over the base's size and a fixed sample of
//! its content: the first and the last MiB (boot sectors, partition tables,
//! GPT backups, file-system superblocks) and 62 blocks of 4 KiB spread
//! evenly in between. Reading 2.25 MiB costs a few milliseconds from the
//! page cache; a change outside the sample goes unnoticed (a full checksum
//! would read the whole base at every open).
//!
//! It is appended to the validator as `;fingerprint=XXXXXXXX` (8 hex
//! digits, docs/FORMAT.md §2.5). Remote bases (URLs) have their own
//! validators (ETag, Last-Modified) and get no fingerprint: sampling them
//! at every open would cost round trips.

use super::Base;
use crate::error::{Error, Result};
use crate::format::header::{Header, MAX_BASE_VALIDATOR};
use crate::iobuf::IoBuf;

/// The validator key of the fingerprint.
const KEY: &str = ";fingerprint=";
/// Bytes read at each end of the base.
const END_BYTES: u64 = 1 << 20;
/// Blocks sampled between the ends.
const SAMPLES: u64 = 62;
/// Bytes per sampled block.
const SAMPLE_BYTES: u64 = 4096;

/// The ranges `(offset, length)` of a base of `size` bytes that the
/// fingerprint reads.
fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    let mut out = vec![(0, END_BYTES.min(size))];
    for i in 1..=SAMPLES {
        let at = (size / (SAMPLES + 1) * i) / SAMPLE_BYTES * SAMPLE_BYTES;
        out.push((at, SAMPLE_BYTES.min(size - at.min(size))));
    }
    let tail = size.saturating_sub(END_BYTES);
    out.push((tail, size - tail));
    out.retain(|&(_, len)| len > 0);
    out
}

/// The fingerprint of `base`'s current content.
pub async fn fingerprint(base: &dyn Base) -> Result<u32> {
    let size = base.size();
    let mut crc = crc32c::crc32c(&size.to_le_bytes());
    for (off, len) in sample_ranges(size) {
        let buf = base
            .read_at(off, IoBuf::zeroed(len as usize))
            .await
            .map_err(|e| Error::io(format!("{}: read at offset {off}", base.describe()), e))?;
        crc = crc32c::crc32c_append(crc, &buf);
    }
    Ok(crc)
}

/// The validator to record for `base`: its own, plus the fingerprint when
/// `with_fingerprint` (a base named by a path) and it fits the header field.
pub async fn validator(base: &dyn Base, with_fingerprint: bool) -> Result<String> {
    let v = base.validator();
    if !with_fingerprint || v.len() + KEY.len() + 8 > MAX_BASE_VALIDATOR {
        return Ok(v);
    }
    Ok(format!("{v}{KEY}{:08x}", fingerprint(base).await?))
}

/// Split a recorded validator into the base's own part and the
/// fingerprint, if it has one.
pub fn split(recorded: &str) -> (&str, Option<u32>) {
    match recorded.rsplit_once(KEY) {
        Some((rest, hex)) if hex.len() == 8 => match u32::from_str_radix(hex, 16) {
            Ok(fp) => (rest, Some(fp)),
            Err(_) => (recorded, None),
        },
        _ => (recorded, None),
    }
}

/// The validator of an image whose commit into its base is under way:
/// the base may have grown past `base_size` and changed where the image
/// holds its own data (so the image still reads the same); the base is not
/// checked until `fvd commit` finishes and records the new validator.
pub const COMMIT_IN_PROGRESS: &str = "commit-in-progress";

/// Check that `base` is the base the image header `h` recorded (`desc`
/// names the image): its size and the validator's own part. The engine
/// does this at every open; the content fingerprint is the opener's
/// ([`verify_content`]).
pub fn verify_identity(desc: &str, h: &Header, base: &dyn Base) -> Result<()> {
    let recorded = h.base_validator.as_str();
    if recorded == COMMIT_IN_PROGRESS {
        return Ok(());
    }
    if base.size() != h.base_size {
        return Err(Error::invalid(format!(
            "{desc}: base image '{}' changed: it was {} bytes at create time and is {} now",
            base.describe(),
            h.base_size,
            base.size()
        )));
    }
    if recorded.is_empty() {
        return Ok(());
    }
    let (own, _) = split(recorded);
    let now = base.validator();
    if now != own {
        return Err(Error::invalid(format!(
            "{desc}: base image '{}' changed: it was '{own}' at create time and is '{now}' now",
            base.describe()
        )));
    }
    Ok(())
}

/// Check `base`'s content against the fingerprint the image header `h`
/// recorded, if any (`desc` names the image). The opener calls it for
/// every image it opens over a base, unless force-shared (`-U`).
pub async fn verify_content(desc: &str, h: &Header, base: &dyn Base) -> Result<()> {
    if h.base_validator == COMMIT_IN_PROGRESS {
        return Ok(());
    }
    let Some(fp) = split(&h.base_validator).1 else {
        return Ok(());
    };
    let current = fingerprint(base).await?;
    if current != fp {
        return Err(Error::invalid(format!(
            "{desc}: base image '{}' changed: its content no longer matches the fingerprint recorded at create time ({fp:08x}, now {current:08x}); if the change was intended, accept the base with 'fvd rebase -u', or look with -U",
            base.describe()
        )));
    }
    Ok(())
}

/// [`verify_identity`], then [`verify_content`]: what the opener checks
/// of the base of every image it opens (not force-shared).
pub async fn verify(desc: &str, h: &Header, base: &dyn Base) -> Result<()> {
    verify_identity(desc, h, base)?;
    verify_content(desc, h, base).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_both_ends_and_stay_inside() {
        for size in [0u64, 512, 4096, 1 << 20, (3 << 20) + 512, 1 << 40] {
            let r = sample_ranges(size);
            for &(o, l) in &r {
                assert!(o + l <= size, "{size}: {o}+{l}");
            }
            if size > 0 {
                assert_eq!(r[0].0, 0);
                let last = r.last().unwrap();
                assert_eq!(last.0 + last.1, size);
            }
        }
    }

    #[test]
    fn split_finds_the_fingerprint() {
        assert_eq!(
            split("size=5;fingerprint=0000abcd"),
            ("size=5", Some(0xabcd))
        );
        assert_eq!(split("size=5"), ("size=5", None));
        assert_eq!(
            split("size=5;fingerprint=xyz"),
            ("size=5;fingerprint=xyz", None)
        );
    }
}
