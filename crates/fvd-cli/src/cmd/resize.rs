//! `fvd resize` — change the virtual size, like `qemu-img resize`.
//!
//! `SIZE` is absolute, or relative with `+`/`-` (`fvd resize img +10G`,
//! `fvd resize --shrink img -- -1G`). Shrinking needs `--shrink`: data past
//! the new end is lost. Growing exposes zeros, also where the image grows
//! over its base. Works on sparse and compact FVD images, on block devices
//! (a sparse image needs the device grown first, or the image's grow
//! command), and on raw image files.
//!
//! An image a running `fvd serve --control-socket PATH` exports is resized
//! through that socket, as `fvd snapshot --server` does: `fvd resize
//! --server PATH [IMAGE] SIZE`. The server lets the requests in flight
//! finish, holds new ones, resizes and reopens the image, then serves
//! them on it; NBD clients see the new size when they reconnect.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use fvd_core::{Format, Opener};

use serde_json::json;

use crate::cmd::control;
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
    /// Resize the image an `fvd serve --control-socket PATH` exports,
    /// through that socket (the server keeps running).
    #[arg(long, value_name = "PATH")]
    pub server: Option<PathBuf>,
    /// The image (optional with --server).
    #[arg(value_name = "IMAGE", allow_hyphen_values = true)]
    pub first: String,
    /// New size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
}

impl Args {
    /// The image and the size asked for: `IMAGE SIZE`, or with `--server`
    /// also only `SIZE`.
    fn operands(&self) -> Result<(Option<PathBuf>, &str)> {
        match (&self.size, &self.server) {
            (Some(size), _) => Ok((Some(PathBuf::from(&self.first)), size)),
            (None, Some(_)) => Ok((None, &self.first)),
            (None, None) => bail!("a size is required: fvd resize IMAGE [+|-]SIZE"),
        }
    }
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
    let (image, spec) = a.operands()?;
    if let Some(sock) = &a.server {
        return run_online(&a, sock, image.as_deref(), spec).await;
    }
    let path = &image.expect("IMAGE SIZE without --server");
    let current = match a.format {
        Format::Fvd => current_size(path)?,
        Format::Raw => std::fs::metadata(path)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?
            .len(),
        Format::Qcow2 => bail!("{}: fvd resizes fvd and raw images", path.display()),
    };
    let size = new_size(current, spec).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    warn_shrink(&a, &path.display().to_string(), current, size);
    match a.format {
        Format::Raw => fvd_core::lifecycle::resize::resize_raw_path(path, size, a.shrink)
            .map_err(|e| at(path, e))?,
        _ => fvd_core::lifecycle::resize::resize_path(opener, path, size, a.shrink)
            .await
            .map_err(|e| {
                let busy = e.kind() == fvd_core::ErrorKind::Busy;
                let e = at(path, e);
                if busy {
                    // A running `fvd serve` resizes it through its control socket.
                    anyhow!("{e}; if fvd serve exports it, resize it with --server CONTROL_SOCKET")
                } else {
                    e
                }
            })?,
    };
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}

fn warn_shrink(a: &Args, what: &str, current: u64, size: u64) {
    if size < current && a.shrink && !a.quiet {
        eprintln!("fvd: warning: shrinking {what} deletes all data past {size} bytes");
    }
}

/// Resize through a server's control socket (`block_resize`).
async fn run_online(
    a: &Args,
    sock: &std::path::Path,
    image: Option<&std::path::Path>,
    spec: &str,
) -> Result<u8> {
    if a.format != Format::Fvd {
        bail!(
            "{}: a server resizes fvd images only (a raw file is resized with the server stopped)",
            sock.display()
        );
    }
    let stats = control::request(sock, "query-stats", json!({})).await?;
    let what = image.map_or_else(
        || format!("the image of {}", sock.display()),
        |p| p.display().to_string(),
    );
    let current = exported_size(&stats)
        .ok_or_else(|| anyhow!("{}: the server did not report the size", sock.display()))?;
    let size = new_size(current, spec).map_err(|e| anyhow!("{what}: {e}"))?;
    warn_shrink(a, &what, current, size);
    let mut args = json!({ "size": size, "shrink": a.shrink });
    if let Some(p) = image {
        // The server checks it is the image it exports (from its own
        // working directory: send the whole path).
        let full = std::fs::canonicalize(p).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        args["file"] = json!(full);
    }
    control::request(sock, "block_resize", args).await?;
    if !a.quiet {
        outln!("Image resized.");
    }
    Ok(0)
}

/// The virtual size in a `query-stats` answer.
fn exported_size(stats: &serde_json::Value) -> Option<u64> {
    stats
        .get("virtual-size")
        .and_then(serde_json::Value::as_u64)
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
