//! `fvd convert` — copy an image into a new one, like `qemu-img convert`.
//!
//! Sparse-aware: the source is walked by block status and its zero extents
//! are skipped (those shorter than [`GAP`] between data are read through,
//! one read instead of two); data is read in pieces of up to 2 MiB, several
//! in flight at once, and 4 KiB pieces that turn out to be all zeros are not
//! written (the new image reads zeros there already). Each piece is read
//! into one buffer from the engine's pool and its non-zero runs are written
//! from views of that buffer: the data is never copied in user space.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use fvd_core::iobuf::zero_runs;
use fvd_core::storage::CacheMode;
use fvd_core::{CreateOptions, Extent, Format, Image, IoBuf, Opener, PathOptions, Source};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use crate::common::{
    CONVERT_KEYS, STATUS_WINDOW, at, create_encryption, extents, open, open_with, parse_cache,
    parse_format, parse_image_options, require_key,
};

/// Largest piece read and written at once.
pub const CHUNK: u64 = 2 << 20;
/// Granularity of the zero scan inside a piece.
pub const ZERO_GRAIN: u64 = 4096;
/// Pieces in flight at once.
pub const IN_FLIGHT: usize = 8;
/// Zero extents shorter than this between data are read with the data:
/// reading a few zero pages costs less than one more request.
pub const GAP: u64 = 64 << 10;

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
    /// Cache mode of the new image: writeback (default: the copy is
    /// durable when the command returns), none (O_DIRECT) or unsafe (no
    /// fdatasync at all, like qemu-img convert's default).
    #[arg(short = 't', value_name = "CACHE", default_value = "writeback", value_parser = parse_cache)]
    pub cache: CacheMode,
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
        let opts = PathOptions {
            cache: a.cache,
            ..PathOptions::default()
        };
        let dst = Arc::new(open_with(opener, &a.target, a.output_format, opts).await?);
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
    let mut pos = 0;
    while pos < size {
        let win = STATUS_WINDOW.min(size - pos);
        let extents = extents(src, src_path, pos, win).await?;
        if over_base {
            // Zeros the source holds over its base hide base data: the new
            // image must hide it too.
            for e in extents
                .iter()
                .filter(|e| e.zero && e.source != Source::Base)
            {
                dst.write_zeroes(e.start, e.length, true, false)
                    .await
                    .map_err(|er| at(dst_path, er))?;
            }
        }
        let data = data_ranges(&extents, over_base);
        if let Some(b) = bar {
            let copied: u64 = data.iter().map(|r| r.end - r.start).sum();
            b.inc(win - copied);
        }
        for r in data {
            let mut off = r.start;
            while off < r.end {
                let piece_end = ((off / CHUNK + 1) * CHUNK).min(r.end);
                while tasks.len() >= IN_FLIGHT {
                    finish_one(&mut tasks, bar).await?;
                }
                let (s, d) = (src.clone(), dst.clone());
                let (sp, dp) = (src_path.to_path_buf(), dst_path.to_path_buf());
                let len = piece_end - off;
                tasks.spawn(async move { copy_piece(&s, &sp, &d, &dp, off, len, over_base).await });
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

/// The ranges to copy: the data extents (without those in the source's
/// base when the new image has that base), joined across zero extents
/// shorter than [`GAP`] (never across base data that stays in the base).
fn data_ranges(extents: &[Extent], over_base: bool) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    // Whether the gap since the last data extent may be read through.
    let mut bridge = true;
    for e in extents.iter().filter(|e| e.length > 0) {
        let from_base = over_base && e.source == Source::Base;
        if e.zero || from_base {
            bridge &= !from_base;
            continue;
        }
        let end = e.start + e.length;
        match out.last_mut() {
            Some(last) if bridge && e.start - last.end < GAP => last.end = end,
            _ => out.push(e.start..end),
        }
        bridge = true;
    }
    out
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

/// Copy `[off, off+len)` through one buffer, skipping 4 KiB pieces that
/// read as zeros (over a base they are written as zeroes: the base may
/// hold data there); each non-zero run is written from a view of the
/// buffer.
async fn copy_piece(
    src: &Image,
    src_path: &Path,
    dst: &Image,
    dst_path: &Path,
    off: u64,
    len: u64,
    over_base: bool,
) -> Result<u64> {
    let mut buf = src
        .read(off, IoBuf::for_overwrite(len as usize))
        .await
        .map_err(|e| at(src_path, e))?;
    let whole = buf.window();
    for (r, zero) in zero_runs(&buf, off, ZERO_GRAIN) {
        let at_off = off + r.start as u64;
        if zero {
            if over_base {
                dst.write_zeroes(at_off, r.len() as u64, true, false)
                    .await
                    .map_err(|e| at(dst_path, e))?;
            }
            continue;
        }
        let part = dst
            .write(at_off, buf.narrow(r), false)
            .await
            .map_err(|e| at(dst_path, e))?;
        buf = part
            .widen(whole)
            .map_err(|_| anyhow!("{}: write returned another buffer", dst_path.display()))?;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_zero_gaps_are_read_through() {
        let e = |start: u64, length: u64, zero: bool| Extent {
            start,
            length,
            source: Source::Image,
            zero,
            host_offset: None,
        };
        let extents = [
            e(0, 4096, true),
            e(4096, 8192, false),
            e(12288, GAP - 1, true),
            e(12288 + GAP - 1, 100, false),
            e(12388 + GAP - 1, GAP, true),
            e(12388 + 2 * GAP - 1, 7, false),
            e(12395 + 2 * GAP - 1, 1 << 20, true),
        ];
        assert_eq!(
            data_ranges(&extents, false),
            vec![
                4096..12388 + GAP - 1,
                12388 + 2 * GAP - 1..12395 + 2 * GAP - 1
            ]
        );
        assert!(data_ranges(&[e(0, 1 << 20, true)], false).is_empty());
    }

    #[test]
    fn over_a_base_base_data_is_neither_copied_nor_read_through() {
        let e = |start: u64, length: u64, zero: bool, source: Source| Extent {
            start,
            length,
            source,
            zero,
            host_offset: None,
        };
        let extents = [
            e(0, 4096, false, Source::Image),
            e(4096, 4096, false, Source::Base),
            e(8192, 4096, false, Source::Image),
            e(12288, 4096, true, Source::Image),
            e(16384, 4096, false, Source::Image),
        ];
        // Over the base: the base extent splits the ranges; the image's
        // zero extent is still read through.
        assert_eq!(data_ranges(&extents, true), vec![0..4096, 8192..20480]);
        // Without a base in the new image everything is copied.
        assert_eq!(data_ranges(&extents, false), vec![0..20480]);
    }
}
