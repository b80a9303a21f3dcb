//! `fvd check` — consistency of an image's metadata, like `qemu-img check`.
//!
//! Exit status as qemu-img defines it: 0 no errors, 1 the check could not
//! be completed, 2 corruptions, 3 leaked data only.

use std::path::PathBuf;

use anyhow::Result;
use fvd_core::Format;
use fvd_core::Opener;
use fvd_core::check::{CheckReport, Repair};
use serde::Serialize;

use crate::common::Output;
use crate::common::{at, parse_format, print_json};

/// What `-r` repairs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairArg {
    /// Free leaked data.
    Leaks,
    /// Leaks, plus replaying a dirty journal and fixing the bitmap.
    All,
}

/// Arguments of `fvd check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Repair: leaks or all.
    #[arg(short = 'r', value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairArg>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Print only the findings, not the summary of a clean image.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub image: PathBuf,
}

/// `check --output=json`, in qemu-img's key style.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
struct CheckJson {
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    check_errors: usize,
    corruptions: usize,
    leaks: usize,
    leaked_bytes: u64,
    journal_blocks: u64,
    journal_records: u64,
    clean: bool,
    repaired: Vec<String>,
    filename: String,
    format: &'static str,
}

fn print_human(a: &Args, r: &CheckReport) {
    for c in &r.corruptions {
        outln!("ERROR {c}");
    }
    for l in &r.leaks {
        outln!("Leaked {l}");
    }
    if !a.quiet {
        for n in &r.notes {
            outln!("Note: {n}");
        }
    }
    if !r.repaired.is_empty() {
        outln!("The following inconsistencies were found and repaired:");
        outln!();
        for x in &r.repaired {
            outln!("    {x}");
        }
        outln!();
        outln!("Double checking the fixed image now...");
    }
    let (nc, nl) = (r.corruptions.len(), r.leaks.len());
    if nc == 0 && nl == 0 {
        if !a.quiet {
            outln!("No errors were found on the image.");
        }
    } else {
        if nc > 0 {
            outln!();
            outln!("{nc} errors were found on the image.");
            outln!("Data may be corrupted, or further writes to the image may corrupt it.");
        }
        if nl > 0 {
            outln!();
            outln!("{nl} leaked clusters were found on the image.");
            outln!("This means waste of disk space, but no harm to data.");
        }
    }
    if !a.quiet {
        let (local, total) = r.local_blocks;
        if total > 0 {
            outln!(
                "{local}/{total} = {:.2}% of the base range is in the image",
                local as f64 * 100.0 / total as f64
            );
        }
        if !r.clean {
            outln!(
                "The image is not clean: its journal holds {} records in {} blocks to replay.",
                r.journal_records,
                r.journal_blocks
            );
        }
        outln!("Image end offset: {}", r.image_end_offset);
    }
}

/// Run `fvd check`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let repair = a.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    let r = fvd_core::check::check_with(opener, &a.image, a.format, repair)
        .await
        .map_err(|e| at(&a.image, e))?;
    let code = u8::try_from(r.exit_code()).unwrap_or(1);
    match a.output {
        Output::Json => {
            let (local, total) = r.local_blocks;
            print_json(&CheckJson {
                image_end_offset: r.image_end_offset,
                total_clusters: total,
                allocated_clusters: local,
                check_errors: r.check_errors.len(),
                corruptions: r.corruptions.len(),
                leaks: r.leaks.len(),
                leaked_bytes: r.leaked_bytes,
                journal_blocks: r.journal_blocks,
                journal_records: r.journal_records,
                clean: r.clean,
                repaired: r.repaired.clone(),
                filename: a.image.display().to_string(),
                format: a.format.name(),
            })?;
            for e in &r.check_errors {
                eprintln!("fvd: {}", named(&a.image, e));
            }
        }
        Output::Human => {
            if !r.check_errors.is_empty() {
                // The check could not run: say why, one line each, and nothing else.
                for e in &r.check_errors {
                    eprintln!("fvd: {}", named(&a.image, e));
                }
                return Ok(code);
            }
            print_human(&a, &r);
        }
    }
    Ok(code)
}

/// `msg` prefixed with the image name unless it already names it.
fn named(image: &std::path::Path, msg: &str) -> String {
    let p = image.display().to_string();
    if msg.starts_with(&p) {
        msg.to_string()
    } else {
        format!("{p}: {msg}")
    }
}
