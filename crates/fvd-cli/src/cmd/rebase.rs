//! `fvd rebase` — put an image over another base, like `qemu-img rebase`.
//!
//! Safe mode (default) keeps what the guest reads: blocks read from the
//! old base that differ in the new one are copied into the image first.
//! `-u` only rewrites the reference and its validator (for a base that was
//! moved, renamed or changed on purpose; the old base is not read). `-b ''`
//! flattens: the image gets every block it still read from its base, and
//! no base. The new name is recorded as given and resolved against the
//! image's directory, as `fvd create -b` does.

use std::path::PathBuf;

use anyhow::{Result, bail};
use fvd_core::{Format, Opener};

use crate::common::{at, parse_format};

/// Arguments of `fvd rebase`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: fvd.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// The new base ('' for none: flatten).
    #[arg(short = 'b', value_name = "BASE", required = true)]
    pub base: String,
    /// Format of the new base (raw, fvd or qcow2); required unless -b ''.
    #[arg(short = 'F', value_name = "BASE_FMT", value_parser = parse_format)]
    pub base_format: Option<Format>,
    /// Unsafe: only change the reference; copy nothing.
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// Accepted for qemu-img compatibility (rebase prints nothing on success).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub image: PathBuf,
}

/// Run `fvd rebase`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    if a.format != Format::Fvd {
        bail!("{}: only fvd images have a base", a.image.display());
    }
    let img = a.image.display();
    let new = match (a.base.as_str(), a.base_format) {
        ("", None) => None,
        ("", Some(_)) => bail!("{img}: -F was given with -b '' (no base)"),
        (name, Some(f)) => Some((name, f)),
        (_, None) => {
            bail!("{img}: -F is required with -b: the base format is recorded, never probed")
        }
    };
    fvd_core::lifecycle::rebase::rebase_path(opener, &a.image, new, a.unsafe_mode)
        .await
        .map_err(|e| at(&a.image, e))?;
    let _ = a.quiet;
    Ok(0)
}
