//! `fvd map` — where the data of an image is, like `qemu-img map`.
//!
//! Depth 0 is the image itself, 1 its base, 2 the base's base (FVD chains).
//! The data region of an FVD image is raw-like: every byte of it is present;
//! a hole reads as zeros.

use std::path::{Path, PathBuf};

use anyhow::Result;
use fvd_core::{Format, Image, Location, Opener, Source};

use crate::common::Output;
use crate::common::{extents, open, parse_format};

/// Arguments of `fvd map`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Open without taking the shared lock.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// The image.
    pub image: PathBuf,
}

/// One line of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First virtual byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer: 0 the image, 1 its base...
    pub depth: u32,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (not a hole).
    pub data: bool,
    /// Offset in the file of that layer, when there is one.
    pub offset: Option<u64>,
    /// File of that layer.
    pub file: String,
}

/// An image and what lies under it.
struct Layer {
    img: Image,
    path: PathBuf,
    under: Option<Under>,
}

/// The base of a layer.
enum Under {
    /// Any other base: where it is.
    Raw(String),
    /// An FVD base, mapped layer by layer.
    Fvd(Box<Layer>),
}

/// Open `path` and every FVD base under it (each read-only).
async fn open_chain(
    opener: &Opener,
    path: &Path,
    format: Format,
    force_share: bool,
    depth: usize,
) -> Result<Layer> {
    let img = open(opener, path, format, true, force_share).await?;
    let here = Location::Path(path.to_path_buf());
    let base = img
        .header()
        .and_then(|h| h.base())
        .filter(|_| img.base().is_some());
    let under = match base {
        Some((name, format)) if depth < opener.max_depth() => {
            match (opener.resolve(&here, name)?, format) {
                (Location::Path(bpath), Format::Fvd) => Some(Under::Fvd(Box::new(
                    Box::pin(open_chain(
                        opener,
                        &bpath,
                        Format::Fvd,
                        force_share,
                        depth + 1,
                    ))
                    .await?,
                ))),
                (l, _) => Some(Under::Raw(l.display())),
            }
        }
        _ => None,
    };
    Ok(Layer {
        img,
        path: path.to_path_buf(),
        under,
    })
}

/// The map of `[start, start+len)` of `layer`, at `depth`.
fn map_layer<'a>(
    layer: &'a Layer,
    start: u64,
    len: u64,
    depth: u32,
    out: &'a mut Vec<MapEntry>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
    Box::pin(async move {
        let file = layer.path.display().to_string();
        for e in extents(&layer.img, &layer.path, start, len).await? {
            match (e.source, &layer.under) {
                (Source::Base, Some(Under::Fvd(b))) => {
                    map_layer(b, e.start, e.length, depth + 1, out).await?;
                }
                (Source::Base, under) => push(
                    out,
                    MapEntry {
                        start: e.start,
                        length: e.length,
                        depth: depth + 1,
                        zero: e.zero,
                        data: !e.zero,
                        offset: Some(e.start),
                        file: match under {
                            Some(Under::Raw(p)) => p.clone(),
                            _ => String::new(),
                        },
                    },
                ),
                (Source::Image, _) => push(
                    out,
                    MapEntry {
                        start: e.start,
                        length: e.length,
                        depth,
                        zero: e.zero,
                        data: !e.zero,
                        offset: e.host_offset,
                        file: file.clone(),
                    },
                ),
            }
        }
        Ok(())
    })
}

/// Append, merging with the previous entry when it continues it.
fn push(out: &mut Vec<MapEntry>, e: MapEntry) {
    if e.length == 0 {
        return;
    }
    if let Some(l) = out.last_mut()
        && l.depth == e.depth
        && l.zero == e.zero
        && l.data == e.data
        && l.file == e.file
        && l.start + l.length == e.start
        && l.offset.map(|o| o + l.length) == e.offset
    {
        l.length += e.length;
        return;
    }
    out.push(e);
}

/// The whole map of the image at `path`.
pub async fn image_map(
    opener: &Opener,
    path: &Path,
    format: Format,
    force_share: bool,
) -> Result<Vec<MapEntry>> {
    let chain = open_chain(opener, path, format, force_share, 0).await?;
    let mut out = Vec::new();
    let size = chain.img.virtual_size();
    map_layer(&chain, 0, size, 0, &mut out).await?;
    Ok(out)
}

/// One entry as `qemu-img map --output=json` prints it.
pub fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": true, \"zero\": {}, \"data\": {}, \"compressed\": false",
        e.start, e.length, e.depth, e.zero, e.data
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// `%#-16x` of C: `0` for zero, else `0x…`, left-aligned in 16 columns.
fn alt_hex(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Run `fvd map`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    let map = image_map(opener, &a.image, a.format, a.force_share).await?;
    match a.output {
        Output::Json => {
            if map.is_empty() {
                outln!("[]");
            }
            let n = map.len();
            for (i, e) in map.iter().enumerate() {
                let open = if i == 0 { "[" } else { "" };
                let close = if i + 1 == n { "]" } else { "," };
                outln!("{open}{}{close}", json_entry(e));
            }
        }
        Output::Human => {
            outln!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            // Data extents only, merged across layers when they continue each other.
            let mut rows: Vec<(u64, u64, u64, &str)> = Vec::new();
            for e in map.iter().filter(|e| e.data) {
                let Some(off) = e.offset else { continue };
                match rows.last_mut() {
                    Some(r) if r.0 + r.1 == e.start && r.2 + r.1 == off && r.3 == e.file => {
                        r.1 += e.length
                    }
                    _ => rows.push((e.start, e.length, off, &e.file)),
                }
            }
            for (s, l, o, f) in rows {
                outln!("{}{}{}{f}", alt_hex(s), alt_hex(l), alt_hex(o));
            }
        }
    }
    Ok(0)
}
