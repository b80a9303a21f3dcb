//! `fvd profile show|export|import` — inspect and share prefetch profiles
//! (the order in which a run first read base data).

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use fvd_core::Format;
use fvd_core::Opener;

use crate::common::{at, open};

/// Arguments of `fvd profile`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

/// What to do with a profile.
#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Print the image's profile.
    Show {
        /// Print one line per range.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// The image.
        image: PathBuf,
    },
    /// Write the image's profile to a file (shareable by every image of its base).
    Export {
        /// The image.
        image: PathBuf,
        /// The profile file to write.
        file: PathBuf,
    },
    /// Store a profile file in the image.
    Import {
        /// The image.
        image: PathBuf,
        /// The profile file to read.
        file: PathBuf,
    },
}

/// Run `fvd profile`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    match a.action {
        Action::Show { verbose, image } => {
            let img = open(opener, &image, Format::Fvd, true, true).await?;
            let Some(p) = img.stored_profile().await.map_err(|e| at(&image, e))? else {
                outln!("{}: no prefetch profile", image.display());
                return Ok(0);
            };
            let bytes: u64 = p.iter().map(|e| e.1).sum();
            outln!(
                "{}: prefetch profile of {} ranges, {} bytes",
                image.display(),
                p.len(),
                bytes
            );
            if verbose {
                for (i, (off, len)) in p.iter().enumerate() {
                    outln!("{i:>6}  offset {off:#014x}  length {len}");
                }
            }
            Ok(0)
        }
        Action::Export { image, file } => {
            let img = open(opener, &image, Format::Fvd, true, true).await?;
            let p = img
                .stored_profile()
                .await
                .map_err(|e| at(&image, e))?
                .ok_or_else(|| anyhow!("{}: the image has no prefetch profile", image.display()))?;
            std::fs::write(&file, fvd_core::format::profile::encode(&p))
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            outln!("{}: wrote {} ranges", file.display(), p.len());
            Ok(0)
        }
        Action::Import { image, file } => {
            let bytes = std::fs::read(&file).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let img = open(opener, &image, Format::Fvd, false, false).await?;
            // Ranges are bytes of the base (docs/FORMAT.md §7).
            let limit = match img.header() {
                Some(h) if !h.base_name.is_empty() => {
                    fvd_core::format::profile::base_limit(h.base_size)
                }
                _ => bail!(
                    "{}: has no base image; a prefetch profile lists ranges of the base",
                    image.display()
                ),
            };
            let p = fvd_core::format::profile::decode(&bytes, limit)
                .map_err(|e| anyhow!("{}: {e}", file.display()))?;
            img.store_profile(&p).await.map_err(|e| at(&image, e))?;
            img.close().await.map_err(|e| at(&image, e))?;
            outln!(
                "{}: stored a profile of {} ranges",
                image.display(),
                p.len()
            );
            Ok(0)
        }
    }
}
