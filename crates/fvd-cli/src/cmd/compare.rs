//! `fvd compare` — do two images hold the same content? Like `qemu-img
//! compare`: exit 0 when identical, 1 on a mismatch, 2 on an error.
//!
//! Regions both images report as zeros are skipped without reading; where
//! only one side reports zeros only the other is read and checked for zeros.
//! A mismatch is reported at the offset of the first differing 512-byte
//! sector, as qemu-img does.

use std::path::{Path, PathBuf};

use anyhow::Result;
use fvd_core::Opener;
use fvd_core::{Format, Image, IoBuf};

use crate::common::{STATUS_WINDOW, at, extents, open, overlay, parse_format, require_key};

/// Bytes compared per read.
pub const COMPARE_CHUNK: u64 = 1 << 20;

/// Arguments of `fvd compare`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Format of the first image: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format_a: Format,
    /// Format of the second image: fvd (default) or raw.
    #[arg(short = 'F', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format_b: Format,
    /// Strict mode: images of different sizes are different.
    #[arg(short = 's')]
    pub strict: bool,
    /// Print nothing; only the exit status tells.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Open both images without taking the shared lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// First image.
    pub image_a: PathBuf,
    /// Second image.
    pub image_b: PathBuf,
}

/// One side of the comparison, with the buffer of its last read (buffers
/// come from the engine's pool: no allocation per chunk).
struct Side<'a> {
    img: &'a Image,
    path: &'a Path,
    buf: Option<IoBuf>,
}

impl<'a> Side<'a> {
    fn new(img: &'a Image, path: &'a Path) -> Self {
        Side {
            img,
            path,
            buf: None,
        }
    }

    /// Read `len` (at most [`COMPARE_CHUNK`]) bytes at `off`.
    async fn read(&mut self, off: u64, len: u64) -> Result<&[u8]> {
        // The previous buffer goes back to the pool first.
        self.buf = None;
        let buf = self
            .img
            .read(off, IoBuf::for_overwrite(len as usize))
            .await
            .map_err(|e| at(self.path, e))?;
        Ok(self.buf.insert(buf))
    }
}

/// Offset of the 512-byte sector holding byte `idx` of a buffer at `base`.
fn sector_of(base: u64, idx: usize) -> u64 {
    (base + idx as u64) / 512 * 512
}

/// Index of the first byte where `x` and `y` differ.
fn first_difference(x: &[u8], y: &[u8]) -> Option<usize> {
    if x == y {
        return None;
    }
    x.iter().zip(y.iter()).position(|(p, q)| p != q)
}

/// Compare `[start, end)` of both sides; `zero_a`/`zero_b` say a side is
/// known to read as zeros there. Returns the mismatch offset, if any.
async fn compare_run(
    a: &mut Side<'_>,
    b: &mut Side<'_>,
    start: u64,
    end: u64,
    zero_a: bool,
    zero_b: bool,
) -> Result<Option<u64>> {
    let mut off = start;
    while off < end {
        let len = COMPARE_CHUNK.min(end - off);
        let found = match (zero_a, zero_b) {
            (true, true) => None,
            (true, false) => first_nonzero(b.read(off, len).await?),
            (false, true) => first_nonzero(a.read(off, len).await?),
            (false, false) => {
                let (x, y) = tokio::join!(a.read(off, len), b.read(off, len));
                first_difference(x?, y?)
            }
        };
        if let Some(i) = found {
            return Ok(Some(sector_of(off, i)));
        }
        off += len;
    }
    Ok(None)
}

fn first_nonzero(buf: &[u8]) -> Option<usize> {
    if fvd_core::iobuf::is_zero(buf) {
        None
    } else {
        buf.iter().position(|&x| x != 0)
    }
}

/// Compare the common part, then the tail of the larger image against zeros.
async fn compare(a: &mut Side<'_>, b: &mut Side<'_>) -> Result<Option<u64>> {
    let (sa, sb) = (a.img.virtual_size(), b.img.virtual_size());
    let common = sa.min(sb);
    let mut pos = 0;
    while pos < common {
        let win = STATUS_WINDOW.min(common - pos);
        let ea = extents(a.img, a.path, pos, win).await?;
        let eb = extents(b.img, b.path, pos, win).await?;
        for r in overlay(&ea, &eb) {
            if let Some(off) = compare_run(a, b, r.start, r.end, r.zero_a, r.zero_b).await? {
                return Ok(Some(off));
            }
        }
        pos += win;
    }
    Ok(None)
}

/// Check that `[from, size)` of `side` reads as zeros.
async fn tail_is_zero(side: &mut Side<'_>, from: u64) -> Result<Option<u64>> {
    let size = side.img.virtual_size();
    let mut pos = from;
    while pos < size {
        let win = STATUS_WINDOW.min(size - pos);
        for e in extents(side.img, side.path, pos, win).await? {
            if e.zero {
                continue;
            }
            let mut off = e.start;
            let end = e.start + e.length;
            while off < end {
                let len = COMPARE_CHUNK.min(end - off);
                if let Some(i) = first_nonzero(side.read(off, len).await?) {
                    return Ok(Some(sector_of(off, i)));
                }
                off += len;
            }
        }
        pos += win;
    }
    Ok(None)
}

/// Run `fvd compare`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let ia = open(opener, &a.image_a, a.format_a, true, a.force_share).await?;
    let ib = open(opener, &a.image_b, a.format_b, true, a.force_share).await?;
    require_key(&ia, &a.image_a)?;
    require_key(&ib, &a.image_b)?;
    let say = |s: &str| {
        if !a.quiet {
            println!("{s}");
        }
    };
    let (sa, sb) = (ia.virtual_size(), ib.virtual_size());
    if a.strict && sa != sb {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let mut side_a = Side::new(&ia, &a.image_a);
    let mut side_b = Side::new(&ib, &a.image_b);
    if let Some(off) = compare(&mut side_a, &mut side_b).await? {
        say(&format!("Content mismatch at offset {off}!"));
        return Ok(1);
    }
    if sa != sb {
        say("Warning: Image size mismatch!");
        let (larger, common) = if sa > sb {
            (&mut side_a, sb)
        } else {
            (&mut side_b, sa)
        };
        if let Some(off) = tail_is_zero(larger, common).await? {
            say(&format!("Content mismatch at offset {off}!"));
            return Ok(1);
        }
    }
    say("Images are identical.");
    Ok(0)
}
