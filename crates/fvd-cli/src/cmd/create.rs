//! `fvd create` — a new image, like `qemu-img create`.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use fvd_core::{BaseSpec, CreateOptions, Format, Opener};

use crate::common::{CREATE_KEYS, at, create_encryption, parse_format, parse_image_options};
use crate::size::parse_size;

/// Arguments of `fvd create`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Base image ("backing file"), recorded as given; a relative name is
    /// resolved against the image's directory. URLs (nbd://, nbd+unix://,
    /// http://, https://) name remote bases.
    #[arg(short = 'b', value_name = "BASE")]
    pub base: Option<String>,
    /// Format of the base image (raw, fvd or qcow2); required with -b.
    #[arg(short = 'F', value_name = "BASE_FMT", value_parser = parse_format)]
    pub base_format: Option<Format>,
    /// Options: block_size=N, journal_size=N, detect_zeroes=on|off,
    /// copy_on_read=on|off, compact=on|off, chunk_size=N, grow_unit=N,
    /// grow_cmd=CMD (-o help lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Image file to create.
    #[arg(required_unless_present = "options")]
    pub image: Option<PathBuf>,
    /// Virtual size (512, 64K, 10G, 1.5G...); defaults to the base size.
    pub size: Option<String>,
}

/// Print the `-o help` list.
fn print_option_help() {
    println!("Supported options:");
    for (k, d) in CREATE_KEYS {
        println!("  {k:<16} - {d}");
    }
}

/// Parse SIZE for `image`: a whole number of bytes, a multiple of 512.
pub fn image_size(image: &Path, text: &str) -> Result<u64> {
    let n = parse_size(text).map_err(|e| anyhow!("{}: {e}", image.display()))?;
    check_multiple(image, n)?;
    Ok(n)
}

fn check_multiple(image: &Path, n: u64) -> Result<()> {
    if !n.is_multiple_of(512) {
        bail!("{}: size {n} is not a multiple of 512", image.display());
    }
    Ok(())
}

/// Run `fvd create`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let keys: Vec<&str> = CREATE_KEYS.iter().map(|(k, _)| *k).collect();
    let name = a
        .image
        .as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default();
    let opts = parse_image_options(&a.options, &keys).map_err(|e| anyhow!("{name}{e}"))?;
    if opts.help {
        print_option_help();
        return Ok(0);
    }
    let Some(img) = a.image.as_ref() else {
        bail!("no image file name given");
    };
    let base = a.base.clone().or(opts.backing_file.clone());
    let base_format = a.base_format.or(opts.backing_fmt);
    let size = match (&a.size, opts.size) {
        (Some(s), _) => Some(image_size(img, s)?),
        (None, Some(n)) => {
            check_multiple(img, n)?;
            Some(n)
        }
        (None, None) => None,
    };
    match a.format {
        Format::Qcow2 => bail!(
            "{}: fvd creates fvd and raw images; use qemu-img for qcow2",
            img.display()
        ),
        Format::Raw => {
            if base.is_some() {
                bail!("{}: raw images cannot have a base image", img.display());
            }
            let used = [
                ("block_size", opts.block_size.is_some()),
                ("journal_size", opts.journal_size.is_some()),
                ("detect_zeroes", opts.detect_zeroes.is_some()),
                ("copy_on_read", opts.copy_on_read.is_some()),
                ("compact", opts.compact.is_some()),
                ("chunk_size", opts.chunk_size.is_some()),
                ("grow_unit", opts.grow_unit.is_some()),
                ("grow_cmd", opts.grow_cmd.is_some()),
                ("encrypt.*", opts.encrypt_given()),
            ];
            if let Some((k, _)) = used.iter().find(|(_, set)| *set) {
                bail!(
                    "{}: option {k} is not supported for raw images",
                    img.display()
                );
            }
            let size = size.ok_or_else(|| {
                anyhow!(
                    "{}: an image size is required for raw images",
                    img.display()
                )
            })?;
            fvd_core::create_raw(img, size).map_err(|e| at(img, e))?;
            if !a.quiet {
                println!("Formatting '{}', fmt=raw size={size}", img.display());
            }
            Ok(0)
        }
        Format::Fvd => {
            let spec = match (base, base_format) {
                (Some(name), Some(format)) => Some(BaseSpec { name, format }),
                (Some(_), None) => {
                    bail!("-F is required with -b: the base format is recorded, never probed")
                }
                (None, Some(_)) => bail!("-F was given without a base image (-b)"),
                (None, None) => None,
            };
            if spec.is_none() && size.is_none() {
                bail!(
                    "{}: an image size is required when there is no base image",
                    img.display()
                );
            }
            let co = CreateOptions {
                size,
                block_size: opts.block_size,
                journal_size: opts.journal_size,
                // Copy-on-read is on by default for remote bases: every byte
                // fetched over the network once is kept.
                copy_on_read: opts.copy_on_read.unwrap_or_else(|| {
                    spec.as_ref()
                        .is_some_and(|b| fvd_core::open::is_url(&b.name))
                }),
                compact: opts.compact.unwrap_or(false),
                chunk_size: opts.chunk_size,
                grow_unit: opts.grow_unit,
                grow_cmd: opts.grow_cmd.clone(),
                encryption: create_encryption(&opts, img)?,
                ..CreateOptions::default()
            };
            let h = opener
                .create(img, spec.as_ref(), co, opts.detect_zeroes)
                .await
                .map_err(|e| at(img, e))?;
            if !a.quiet {
                let mut line = format!(
                    "Formatting '{}', fmt=fvd size={}",
                    img.display(),
                    h.virtual_size
                );
                if let Some((name, format)) = h.base() {
                    line.push_str(&format!(
                        " backing_file={name} backing_fmt={}",
                        format.name()
                    ));
                }
                line.push_str(&format!(" block_size={}", h.block_size));
                if h.is_compact() {
                    line.push_str(&format!(" compact=on chunk_size={}", h.chunk_size));
                }
                if h.incompatible & fvd_core::format::header::INCOMPAT_ENCRYPTED != 0 {
                    line.push_str(" encrypt.format=luks");
                }
                println!("{line}");
            }
            Ok(0)
        }
    }
}
