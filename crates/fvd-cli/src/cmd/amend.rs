//! `fvd amend` — change image options in place, like `qemu-img amend`:
//! `copy_on_read=on|off`, `grow_cmd=CMD`, `grow_unit=SIZE`,
//! `max_cor_bytes=SIZE`, `prefetch_profile=off` (drops the stored profile).
//! What fixes the layout (block_size, chunk_size, compact, journal_size)
//! cannot change in place; the size and the base have commands of their
//! own (resize, rebase).

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use fvd_core::lifecycle::amend::Amendments;
use fvd_core::{Format, Opener};

use crate::common::{at, parse_format, parse_image_options};

/// The keys `fvd amend -o` takes, with a description for `-o help`.
pub const AMEND_KEYS: [(&str, &str); 5] = [
    (
        "copy_on_read",
        "on|off: copy base data into the image when it is read",
    ),
    (
        "grow_cmd",
        "command run when a compact image on a block device is full ({path} and {bytes} are substituted; write ,, for a comma; empty: none)",
    ),
    (
        "grow_unit",
        "a compact image on a file grows by this much when full",
    ),
    ("max_cor_bytes", "copy-on-read bytes in flight at most"),
    ("prefetch_profile", "off: drop the stored prefetch profile"),
];

/// Keys `fvd create` knows that amend cannot change, and what to use instead.
const FIXED: [(&str, &str); 8] = [
    ("size", "use fvd resize"),
    ("backing_file", "use fvd rebase"),
    ("backing_fmt", "use fvd rebase"),
    (
        "block_size",
        "it fixes the layout; fvd convert writes a new image",
    ),
    (
        "chunk_size",
        "it fixes the layout; fvd convert writes a new image",
    ),
    (
        "compact",
        "it fixes the layout; fvd convert writes a new image",
    ),
    (
        "journal_size",
        "it fixes the layout; fvd convert writes a new image",
    ),
    ("detect_zeroes", "it only applies when an image is created"),
];

/// Arguments of `fvd amend`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: fvd.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Options to change (-o help lists them).
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    pub options: Vec<String>,
    /// Accepted for qemu-img compatibility (amend prints nothing on success).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    #[arg(required_unless_present = "options")]
    pub image: Option<PathBuf>,
}

/// Run `fvd amend`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let name = a
        .image
        .as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default();
    for list in &a.options {
        for item in list.split(',') {
            let key = item.split('=').next().unwrap_or("");
            if let Some((k, why)) = FIXED.iter().find(|(k, _)| *k == key) {
                bail!("{name}option {k} cannot be changed by amend: {why}");
            }
        }
    }
    let keys: Vec<&str> = AMEND_KEYS.iter().map(|(k, _)| *k).collect();
    let o = parse_image_options(&a.options, &keys).map_err(|e| anyhow!("{name}{e}"))?;
    if o.help {
        outln!("Amendable options:");
        for (k, d) in AMEND_KEYS {
            outln!("  {k:<16} - {d}");
        }
        return Ok(0);
    }
    let Some(path) = a.image.as_ref() else {
        bail!("no image file name given");
    };
    if a.format != Format::Fvd {
        bail!("{}: only fvd images have options to amend", path.display());
    }
    let am = Amendments {
        copy_on_read: o.copy_on_read,
        grow_cmd: o.grow_cmd.clone(),
        grow_unit: o.grow_unit,
        max_cor_bytes: o.max_cor_bytes,
        prefetch_profile: o.prefetch_profile,
    };
    if am.is_empty() {
        bail!(
            "{}: no option to change (-o help lists them)",
            path.display()
        );
    }
    fvd_core::lifecycle::amend::amend_path(opener, path, &am)
        .await
        .map_err(|e| at(path, e))?;
    let _ = a.quiet;
    Ok(0)
}
