//! `fvd resize` — change the virtual size, like `qemu-img resize`.
//!
//! `SIZE` is absolute, or relative with `+`/`-` (`fvd resize img +10G`,
//! `fvd resize --shrink img -- -1G`). Shrinking needs `--shrink`: data past
//! the new end is lost. Growing exposes zeros, also where the image grows
//! over its base. Works on sparse and compact FVD images, on block devices
//! (a sparse image needs the device grown first, or the image's grow
//! command), and on raw image files. The image must not be in use (online
//! resize through a running `fvd serve` is not available yet).

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use fvd_core::{Format, Opener};

use crate::common::{at, parse_format};
use crate::size::parse_size;

/// Arguments of `fvd resize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Allow the image to shrink (data past the new end is lost).
    #[arg(long)]
    pub shrink: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub image: PathBuf,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// The new size for `spec` given the current `size`.
pub fn new_size(size: u64, spec: &str) -> Result<u64> {
    let (sign, digits) = match spec.as_bytes().first() {
        Some(b'+') => (1, &spec[1..]),
        Some(b'-') => (-1, &spec[1..]),
        _ => (0, spec),
    };
    let n = parse_size(digits).map_err(|e| anyhow!("size '{spec}': {e}"))?;
    match sign {
        1 => size
            .checked_add(n)
            .ok_or_else(|| anyhow!("size '{spec}': too large")),
        -1 => size
            .checked_sub(n)
            .ok_or_else(|| anyhow!("size '{spec}': the image is only {size} bytes")),
        _ => Ok(n),
    }
}

/// The virtual size in the header of the FVD image at `path` (read
/// directly: the resize itself opens and checks the image).
fn current_size(path: &std::path::Path) -> Result<u64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut area = vec![0u8; fvd_core::format::header::HEADER_AREA as usize];
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let t = f
        .metadata()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?
        .file_type();
    use std::os::unix::fs::FileTypeExt;
    if !t.is_file() && !t.is_block_device() {
        bail!("{}: is not a regular file or block device", path.display());
    }
    let n = f
        .read(&mut area)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let (h, _) = fvd_core::format::header::decode_slots(&area[..n])
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(h.virtual_size)
}

/// Run `fvd resize`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let path = &a.image;
    let current = match a.format {
        Format::Fvd => current_size(path)?,
        Format::Raw => std::fs::metadata(path)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?
            .len(),
        Format::Qcow2 => bail!("{}: fvd resizes fvd and raw images", path.display()),
    };
    let size = new_size(current, &a.size).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if size < current && a.shrink && !a.quiet {
        eprintln!(
            "fvd: warning: shrinking {} deletes all data past {size} bytes",
            path.display()
        );
    }
    match a.format {
        Format::Raw => fvd_core::lifecycle::resize::resize_raw_path(path, size, a.shrink)
            .map_err(|e| at(path, e))?,
        _ => fvd_core::lifecycle::resize::resize_path(opener, path, size, a.shrink)
            .await
            .map_err(|e| at(path, e))?,
    };
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(new_size(1 << 20, "2M").unwrap(), 2 << 20);
        assert_eq!(new_size(1 << 20, "+1M").unwrap(), 2 << 20);
        assert_eq!(new_size(2 << 20, "-1M").unwrap(), 1 << 20);
        assert!(new_size(1 << 20, "-2M").is_err());
        assert!(new_size(1 << 20, "x").is_err());
    }
}
