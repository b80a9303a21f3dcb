//! Walking a chain of FVD bases by their headers alone, before anything is
//! opened or locked.
//!
//! Opening a chain that loops (A over B over A) would otherwise fail in a
//! misleading way: a read-write open of A holds its exclusive lock when A is
//! reached again as a base ("image is in use"), and read-only opens recurse
//! until the depth limit. The walk names the loop instead. It only reports
//! loops: any other problem (a missing base, a bad header) is left to the
//! real open, which has the better message.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Location, Opener};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::format::header::{HEADER_AREA, decode_slots};

/// Longest walk (the open's chain depth limit is below it).
const MAX_WALK: usize = 64;

/// Identity of a file: device and inode.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The base path named by the FVD image at `path`, when that base is
/// itself an FVD image file (the only kind that can continue a chain).
fn fvd_base_of(path: &Path) -> Option<PathBuf> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_file() && !meta.file_type().is_block_device() {
        return None;
    }
    let mut area = vec![0u8; HEADER_AREA as usize];
    f.read_exact(&mut area).ok()?;
    drop::<File>(f);
    let (h, _) = decode_slots(&area).ok()?;
    match h.base() {
        Some((name, Format::Fvd)) if h.base_range() > 0 => {
            match Opener::local().resolve(&Location::Path(path.to_path_buf()), name) {
                Ok(Location::Path(p)) => Some(p),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Fail with "base chain loops back to …" if following the FVD bases of
/// the image at `path` reaches a file already in the chain.
pub fn check_no_loop(path: &Path) -> Result<()> {
    let mut seen: Vec<(u64, u64)> = identity(path).into_iter().collect();
    let mut current = path.to_path_buf();
    for _ in 0..MAX_WALK {
        let Some(base) = fvd_base_of(&current) else {
            return Ok(());
        };
        let Some(id) = identity(&base) else {
            return Ok(());
        };
        if seen.contains(&id) {
            return Err(Error::invalid(format!(
                "{}: base chain loops back to {}",
                path.display(),
                base.display()
            )));
        }
        seen.push(id);
        current = base;
    }
    Ok(())
}

/// True if following the FVD bases from the image at `start` (itself
/// included) reaches the file at `target`: making `start` the base of
/// `target` would close a loop.
pub fn reaches(start: &Path, target: &Path) -> bool {
    let Some(goal) = identity(target) else {
        return false;
    };
    let mut current = start.to_path_buf();
    for _ in 0..MAX_WALK {
        if identity(&current) == Some(goal) {
            return true;
        }
        match fvd_base_of(&current) {
            Some(next) => current = next,
            None => return false,
        }
    }
    false
}
