//! `fvd convert` — copy an image into a new one, like `qemu-img convert`.
//!
//! Sparse-aware: the source is walked by block status and its zero extents
//! are skipped; data extents are read in chunks of up to 2 MiB, several in
//! flight at once, and 4 KiB pieces that turn out to be all zeros are not
//! written either (the new image reads zeros there already).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow, bail};
use fvd_core::Opener;
use fvd_core::{CreateOptions, Format, Image};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use crate::common::{
    CONVERT_KEYS, STATUS_WINDOW, at, create_encryption, extents, open, parse_format,
    parse_image_options, require_key,
};

/// Largest piece read and written at once.
pub const CHUNK: u64 = 2 << 20;
/// Granularity of the zero scan inside a piece.
pub const ZERO_GRAIN: u64 = 4096;
/// Pieces in flight at once.
pub const IN_FLIGHT: usize = 8;

/// Arguments of `fvd convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Source format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Output format: fvd (default) or raw.
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "fvd", value_parser = parse_format)]
    pub output_format: Format,
    /// Options of the new image: block_size=N, journal_size=N, compact=on|off,
    /// chunk_size=N, grow_unit=N.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Give the new image this base (qemu-img's backing file), recorded as
    /// given: only what the source holds over its own base is copied, so
    /// the source's base must read the same as BASE (e.g. the same file).
    #[arg(short = 'B', value_name = "BASE", requires = "base_format")]
    pub base: Option<String>,
    /// Format of -B's base: raw, fvd or qcow2.
    #[arg(short = 'F', value_name = "BASE_FMT", value_parser = parse_format, requires = "base")]
    pub base_format: Option<Format>,
    /// Open the source without taking the shared lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Copy the source's internal snapshot SNAPSHOT_PARAM instead of its
    /// live disk: snapshot.id=ID, snapshot.name=NAME, or an id or name.
    #[arg(short = 'l', value_name = "SNAPSHOT_PARAM")]
    pub snapshot: Option<String>,
    /// Source image.
    pub source: PathBuf,
    /// New image (must not exist).
    pub target: PathBuf,
}

/// Run `fvd convert`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let opts = parse_image_options(&a.options, &CONVERT_KEYS)
        .map_err(|e| anyhow!("{}: {e}", a.target.display()))?;
    if opts.help {
        println!("Supported options:");
        for (k, d) in crate::common::CREATE_KEYS
            .iter()
            .filter(|(k, _)| CONVERT_KEYS.contains(k))
        {
            println!("  {k:<16} - {d}");
        }
        return Ok(0);
    }
    let any_option = opts.block_size.is_some()
        || opts.journal_size.is_some()
        || opts.compact.is_some()
        || opts.chunk_size.is_some()
        || opts.grow_unit.is_some()
        || opts.encrypt_given();
    if a.output_format != Format::Fvd && a.base.is_some() {
        bail!(
            "{}: -B needs fvd output (a raw image has no base)",
            a.target.display()
        );
    }
    if a.output_format == Format::Raw && any_option {
        bail!(
            "{}: -o options are not supported for raw output",
            a.target.display()
        );
    }
    if a.output_format == Format::Qcow2 {
        bail!(
            "{}: fvd writes fvd and raw images; qcow2 is read-only here",
            a.target.display()
        );
    }
    if a.target.exists() {
        bail!(
            "{}: file exists; fvd convert never overwrites an image (remove it first)",
            a.target.display()
        );
    }
    let src = match &a.snapshot {
        Some(param) => {
            if a.format != Format::Fvd {
                bail!("{}: -l needs an fvd source", a.source.display());
            }
            let sel = fvd_core::image::snapshot::SnapshotSel::parse_param(param)
                .map_err(|e| anyhow!("-l {param}: {e}"))?;
            let opts = fvd_core::PathOptions {
                read_only: true,
                force_share: a.force_share,
                ..Default::default()
            };
            opener
                .open_snapshot(&a.source, opts, &sel)
                .await
                .map_err(|e| at(&a.source, e))?
        }
        None => open(opener, &a.source, a.format, true, a.force_share).await?,
    };
    let src = Arc::new(src);
    require_key(&src, &a.source)?;
    let src_size = src.virtual_size();
    let dst_size = match a.output_format {
        Format::Fvd => src_size.div_ceil(512) * 512,
        Format::Raw | Format::Qcow2 => src_size,
    };
    match a.output_format {
        Format::Raw | Format::Qcow2 => {
            fvd_core::create_raw(&a.target, dst_size).map_err(|e| at(&a.target, e))?
        }
        Format::Fvd => {
            let co = CreateOptions {
                size: Some(dst_size),
                block_size: opts.block_size,
                journal_size: opts.journal_size,
                compact: opts.compact.unwrap_or(false),
                chunk_size: opts.chunk_size,
                grow_unit: opts.grow_unit,
                encryption: create_encryption(&opts, &a.target)?,
                ..CreateOptions::default()
            };
            let base = a
                .base
                .clone()
                .zip(a.base_format)
                .map(|(name, format)| fvd_core::BaseSpec { name, format });
            // Every block the source holds is written: no zero scan.
            let detect = base.as_ref().map(|_| false);
            opener
                .create(&a.target, base.as_ref(), co, detect)
                .await
                .map_err(|e| at(&a.target, e))?;
        }
    }
    let result = async {
        let dst = Arc::new(open(opener, &a.target, a.output_format, false, false).await?);
        let bar = a.progress.then(|| progress_bar(src_size));
        let over_base = a.base.is_some();
        copy(
            &src,
            &a.source,
            &dst,
            &a.target,
            src_size,
            over_base,
            bar.as_ref(),
        )
        .await?;
        dst.close().await.map_err(|e| at(&a.target, e))?;
        if let Some(b) = bar {
            b.finish();
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        // The new image is incomplete: do not leave it behind.
        let _ = std::fs::remove_file(&a.target);
    }
    result.map(|()| 0)
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len.max(1));
    let style =
        ProgressStyle::with_template("    ({percent:>3}/100%) [{bar:40}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Copy the first `size` bytes of `src` into `dst`. With `over_base`,
/// `dst` has a base that reads like `src`'s: what `src` reads from its base
/// is not copied, and its zeros are written (the base may hold data there).
#[allow(clippy::too_many_arguments)]
pub async fn copy(
    src: &Arc<Image>,
    src_path: &Path,
    dst: &Arc<Image>,
    dst_path: &Path,
    size: u64,
    over_base: bool,
    bar: Option<&ProgressBar>,
) -> Result<()> {
    let mut tasks: JoinSet<Result<u64>> = JoinSet::new();
    // Buffers go back here after each piece: no allocation per piece.
    let pool: BufPool = Arc::new(Mutex::new(Vec::new()));
    let mut pos = 0;
    while pos < size {
        let win = STATUS_WINDOW.min(size - pos);
        for e in extents(src, src_path, pos, win).await? {
            let from_base = over_base && e.source == fvd_core::Source::Base;
            if e.zero || from_base {
                if e.zero && !from_base && over_base {
                    dst.write_zeroes(e.start, e.length, true, false)
                        .await
                        .map_err(|er| at(dst_path, er))?;
                }
                if let Some(b) = bar {
                    b.inc(e.length);
                }
                continue;
            }
            let end = e.start + e.length;
            let mut off = e.start;
            while off < end {
                let piece_end = ((off / CHUNK + 1) * CHUNK).min(end);
                while tasks.len() >= IN_FLIGHT {
                    finish_one(&mut tasks, bar).await?;
                }
                let (s, d) = (src.clone(), dst.clone());
                let (sp, dp) = (src_path.to_path_buf(), dst_path.to_path_buf());
                let len = piece_end - off;
                let pool = pool.clone();
                tasks.spawn(async move {
                    let mut buf = pool
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pop()
                        .unwrap_or_else(|| vec![0u8; CHUNK as usize]);
                    let r = copy_piece(&s, &sp, &d, &dp, off, &mut buf[..len as usize]).await;
                    pool.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
                    r
                });
                off = piece_end;
            }
        }
        pos += win;
    }
    while !tasks.is_empty() {
        finish_one(&mut tasks, bar).await?;
    }
    Ok(())
}

async fn finish_one(tasks: &mut JoinSet<Result<u64>>, bar: Option<&ProgressBar>) -> Result<()> {
    if let Some(r) = tasks.join_next().await {
        let n = r.map_err(|e| anyhow!("copy task failed: {e}"))??;
        if let Some(b) = bar {
            b.inc(n);
        }
    }
    Ok(())
}

/// Buffers of [`CHUNK`] bytes shared by the copy tasks.
type BufPool = Arc<Mutex<Vec<Vec<u8>>>>;

/// Copy `[off, off+buf.len())` through `buf`, skipping 4 KiB pieces that
/// read as zeros.
async fn copy_piece(
    src: &Image,
    src_path: &Path,
    dst: &Image,
    dst_path: &Path,
    off: u64,
    buf: &mut [u8],
) -> Result<u64> {
    let len = buf.len() as u64;
    src.read(off, buf).await.map_err(|e| at(src_path, e))?;
    for (s, e) in nonzero_runs(buf, off) {
        dst.write(off + s as u64, &buf[s..e], false)
            .await
            .map_err(|e| at(dst_path, e))?;
    }
    Ok(len)
}

/// Runs of `buf` (which starts at virtual offset `base`) that hold a non-zero
/// byte, at 4 KiB granularity aligned to the virtual disk.
pub fn nonzero_runs(buf: &[u8], base: u64) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0usize;
    while i < buf.len() {
        let abs = base + i as u64;
        let next = ((abs / ZERO_GRAIN + 1) * ZERO_GRAIN - base) as usize;
        let j = next.min(buf.len());
        if !fvd_core::iobuf::is_zero(&buf[i..j]) {
            match runs.last_mut() {
                Some(r) if r.1 == i => r.1 = j,
                _ => runs.push((i, j)),
            }
        }
        i = j;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pieces_are_skipped_at_4k_grain() {
        let mut b = vec![0u8; 5 * 4096];
        b[10] = 1;
        b[4096 * 2 + 5] = 1;
        b[4096 * 3] = 1;
        assert_eq!(nonzero_runs(&b, 0), vec![(0, 4096), (8192, 16384)]);
        // Unaligned start: the first piece ends at the next 4 KiB boundary.
        let mut c = vec![0u8; 8192];
        c[100] = 1;
        assert_eq!(nonzero_runs(&c, 512), vec![(0, 3584)]);
        assert!(nonzero_runs(&[0u8; 100], 7).is_empty());
    }
}
