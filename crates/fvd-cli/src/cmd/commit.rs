//! `fvd commit` — write the image's own data into its base, like
//! `qemu-img commit`. The base must be a local raw or fvd image; it grows
//! to the image's size if it is smaller. The image is then empty over the
//! updated base, unless `-d` keeps its data. Other images over the same
//! base see it change: their base fingerprints make them refuse to open.

use std::path::PathBuf;

use anyhow::{Result, bail};
use fvd_core::{Format, Opener};

use crate::common::{at, parse_format};

/// Arguments of `fvd commit`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: fvd (the only one with a base).
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Keep the image's data (do not empty it after the commit).
    #[arg(short = 'd')]
    pub keep: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub image: PathBuf,
}

/// Run `fvd commit`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    if a.format != Format::Fvd {
        bail!(
            "{}: only fvd images have a base to commit into",
            a.image.display()
        );
    }
    fvd_core::lifecycle::commit::commit_path(opener, &a.image, a.keep)
        .await
        .map_err(|e| at(&a.image, e))?;
    if !a.quiet {
        outln!("Image committed.");
    }
    Ok(0)
}
