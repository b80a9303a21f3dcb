//! Helpers shared by the commands: opening images, error messages that name
//! the file, `-o` option lists, JSON printing and extent walks.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use fvd_core::{Extent, Format, Image, Opener, PathOptions};
use serde::Serialize;

use crate::size::parse_size;

/// Largest range asked of `block_status` at once.
pub const STATUS_WINDOW: u64 = 1 << 30;

/// Parse a format name given with `-f`, `-F` or `-O`.
pub fn parse_format(s: &str) -> std::result::Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Turn an engine error into one message that names `path` (engine messages
/// usually start with it already; those that do not get it as a prefix).
pub fn at(path: &Path, e: fvd_core::Error) -> anyhow::Error {
    let p = path.display().to_string();
    let msg = e.to_string();
    if msg.starts_with(&p) || msg.contains(&format!("{p}:")) {
        anyhow!(msg)
    } else {
        anyhow!("{p}: {msg}")
    }
}

/// Open an image by path (its bases through `opener`).
pub async fn open(
    opener: &Opener,
    path: &Path,
    format: Format,
    read_only: bool,
    force_share: bool,
) -> Result<Image> {
    let opts = PathOptions {
        read_only,
        force_share: force_share && read_only,
        ..PathOptions::default()
    };
    open_with(opener, path, format, opts).await
}

/// [`open`] with every option of [`PathOptions`] (e.g. a cache mode).
pub async fn open_with(
    opener: &Opener,
    path: &Path,
    format: Format,
    opts: PathOptions,
) -> Result<Image> {
    opener.open(path, format, opts).await.map_err(|e| {
        let read_only_file = !opts.read_only && e.kind() == fvd_core::ErrorKind::ReadOnly;
        let err = at(path, e);
        if read_only_file {
            anyhow!("{err} (the file cannot be written; open it read-only)")
        } else {
            err
        }
    })
}

/// A `--cache`/`-t` value: writeback, none or unsafe.
pub fn parse_cache(s: &str) -> std::result::Result<fvd_core::storage::CacheMode, String> {
    s.parse()
}

/// Options given with `-o key=value,...` (create and convert).
#[derive(Debug, Default, Clone)]
pub struct ImageOptions {
    /// `block_size=`
    pub block_size: Option<u32>,
    /// `journal_size=`
    pub journal_size: Option<u64>,
    /// `detect_zeroes=on|off`
    pub detect_zeroes: Option<bool>,
    /// `copy_on_read=on|off`
    pub copy_on_read: Option<bool>,
    /// `backing_file=` (same as `-b`)
    pub backing_file: Option<String>,
    /// `backing_fmt=` (same as `-F`)
    pub backing_fmt: Option<Format>,
    /// `size=` (same as the SIZE argument)
    pub size: Option<u64>,
    /// `compact=on|off`: the chunk-table layout
    pub compact: Option<bool>,
    /// `chunk_size=`
    pub chunk_size: Option<u32>,
    /// `grow_unit=`
    pub grow_unit: Option<u64>,
    /// `grow_cmd=` (a literal comma is written `,,` as in qemu-img)
    pub grow_cmd: Option<String>,
    /// `encrypt.format=luks`
    pub encrypt_format: Option<String>,
    /// `encrypt.key-secret=ID`
    pub encrypt_key_secret: Option<String>,
    /// `encrypt.iter-time=MS`
    pub encrypt_iter_time: Option<u64>,
    /// `-o help` was given: list the options instead of acting.
    pub help: bool,
}

impl ImageOptions {
    /// True if any `encrypt.*` option was given.
    pub fn encrypt_given(&self) -> bool {
        self.encrypt_format.is_some()
            || self.encrypt_key_secret.is_some()
            || self.encrypt_iter_time.is_some()
    }
}

/// The encryption of a new image at `img` from its `encrypt.*` options;
/// the image's key is remembered so that it can be opened right away.
pub fn create_encryption(
    o: &ImageOptions,
    img: &Path,
) -> Result<Option<fvd_core::CreateEncryption>> {
    if !o.encrypt_given() {
        return Ok(None);
    }
    match o.encrypt_format.as_deref() {
        Some("luks") => {}
        Some(f) => bail!(
            "{}: encrypt.format '{f}' is not supported (luks)",
            img.display()
        ),
        None => bail!(
            "{}: encrypt.format=luks is required with encrypt.* options",
            img.display()
        ),
    }
    let id = o.encrypt_key_secret.as_deref().ok_or_else(|| {
        anyhow!(
            "{}: encrypt.key-secret=ID is required (with --object secret,id=ID,file=PATH)",
            img.display()
        )
    })?;
    let secret = crate::secrets::secret(id).map_err(|e| anyhow!("{}: {e}", img.display()))?;
    crate::secrets::assign(img, id)?;
    let ms = o.encrypt_iter_time.unwrap_or(2000);
    Ok(Some(fvd_core::CreateEncryption {
        secret,
        iterations: fvd_core::crypt::luks::iterations_for(ms),
    }))
}

/// Refuse data work on an encrypted image opened without its key, with
/// one line saying how to give it.
pub fn require_key(img: &Image, path: &Path) -> Result<()> {
    if img.has_key() {
        return Ok(());
    }
    bail!(
        "{}: the image is encrypted; give its passphrase with --object secret,id=ID,file=PATH (and encrypt.key-secret=ID in --image-opts when several secrets are given)",
        path.display()
    )
}

/// Every `-o` key `fvd create` knows, with a description for `-o help`.
pub const CREATE_KEYS: [(&str, &str); 14] = [
    (
        "block_size",
        "bytes per bitmap block: a power of two from 512 to 1M (default: 4K, larger for huge bases)",
    ),
    ("journal_size", "size of the metadata journal (default 8M)"),
    (
        "detect_zeroes",
        "on|off: scan the base at create and mark its zero-filled blocks local, so writes there need no copy-on-write (default on with a base)",
    ),
    (
        "copy_on_read",
        "on|off: copy base data into the image when it is read (default on for nbd:// and http(s):// bases)",
    ),
    ("backing_file", "base image (same as -b)"),
    (
        "backing_fmt",
        "base image format: raw, fvd or qcow2 (same as -F)",
    ),
    ("size", "virtual disk size (same as the SIZE argument)"),
    (
        "compact",
        "on|off: map data through a one-level chunk table (thin provisioning without a sparse file system, e.g. on a block device)",
    ),
    (
        "chunk_size",
        "bytes per chunk of a compact image: a power of two (default 1M)",
    ),
    (
        "grow_unit",
        "a compact image on a file grows by this much when full (default 64M)",
    ),
    (
        "grow_cmd",
        "command run when a compact image on a block device is full; {path} and {bytes} are substituted (write ,, for a comma)",
    ),
    (
        "encrypt.format",
        "luks: encrypt the data (AES-256-XTS, LUKS1 key slots, as qcow2's encrypt.format=luks)",
    ),
    (
        "encrypt.key-secret",
        "ID of the --object secret holding the passphrase of key slot 0",
    ),
    (
        "encrypt.iter-time",
        "milliseconds of PBKDF2 work to open a key slot (default 2000)",
    ),
];

/// The `-o` keys `fvd convert` accepts for its output.
pub const CONVERT_KEYS: [&str; 8] = [
    "block_size",
    "journal_size",
    "compact",
    "chunk_size",
    "grow_unit",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.iter-time",
];

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("option {key}: expected on or off, got '{v}'"),
    }
}

/// Split an option list at single commas; `,,` stands for a literal comma.
fn split_options(list: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().expect("never empty").push(',');
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().expect("never empty").push(c);
        }
    }
    out
}

/// Parse every `-o` list; only keys in `allowed` are accepted.
pub fn parse_image_options(lists: &[String], allowed: &[&str]) -> Result<ImageOptions> {
    let mut o = ImageOptions::default();
    for list in lists {
        for item in split_options(list)
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
        {
            if item == "help" || item == "?" {
                o.help = true;
                continue;
            }
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| anyhow!("option '{item}' needs a value (key=value)"))?;
            if !allowed.contains(&key) {
                bail!(
                    "unknown option '{key}' (known: {}; see -o help)",
                    allowed.join(", ")
                );
            }
            let size = |v: &str| parse_size(v).map_err(|e| anyhow!("option {key}: {e}"));
            match key {
                "block_size" => {
                    let v = size(val)?;
                    o.block_size = Some(
                        u32::try_from(v)
                            .map_err(|_| anyhow!("option block_size: {v} is too large"))?,
                    );
                }
                "journal_size" => o.journal_size = Some(size(val)?),
                "size" => o.size = Some(size(val)?),
                "detect_zeroes" => o.detect_zeroes = Some(parse_bool(key, val)?),
                "compact" => o.compact = Some(parse_bool(key, val)?),
                "chunk_size" => {
                    let v = size(val)?;
                    o.chunk_size = Some(
                        u32::try_from(v)
                            .map_err(|_| anyhow!("option chunk_size: {v} is too large"))?,
                    );
                }
                "grow_unit" => o.grow_unit = Some(size(val)?),
                "grow_cmd" => o.grow_cmd = Some(val.to_string()),
                "encrypt.format" => o.encrypt_format = Some(val.to_string()),
                "encrypt.key-secret" => o.encrypt_key_secret = Some(val.to_string()),
                "encrypt.iter-time" => {
                    o.encrypt_iter_time = Some(val.parse().map_err(|_| {
                        anyhow!("option encrypt.iter-time: '{val}' is not a number of milliseconds")
                    })?)
                }
                "copy_on_read" => o.copy_on_read = Some(parse_bool(key, val)?),
                "backing_file" => o.backing_file = Some(val.to_string()),
                "backing_fmt" => {
                    o.backing_fmt =
                        Some(parse_format(val).map_err(|e| anyhow!("option {key}: {e}"))?)
                }
                _ => bail!("unknown option '{key}'"),
            }
        }
    }
    Ok(o)
}

/// Print `value` as pretty JSON with qemu-img's four-space indentation.
pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    value.serialize(&mut ser)?;
    out.push(b'\n');
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&out)?;
    stdout.flush()?;
    Ok(())
}

/// The extents of `[offset, offset+len)`, asked in windows so that huge
/// images never need one huge answer, with neighbours of the same kind merged.
pub async fn extents(img: &Image, path: &Path, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let n = STATUS_WINDOW.min(end - pos);
        let part = img.block_status(pos, n).await.map_err(|e| at(path, e))?;
        for e in part {
            match out.last_mut() {
                Some(l)
                    if l.source == e.source
                        && l.zero == e.zero
                        && l.start + l.length == e.start
                        && l.host_offset.map(|h| h + l.length) == e.host_offset =>
                {
                    l.length += e.length
                }
                _ => out.push(e),
            }
        }
        pos += n;
    }
    Ok(out)
}

/// One run of a comparison of two extent lists over the same range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRun {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The first list says the run reads as zeros.
    pub zero_a: bool,
    /// The second list says the run reads as zeros.
    pub zero_b: bool,
}

/// Overlay two extent lists covering the same range: runs on which both
/// lists keep the same zero/data answer.
pub fn overlay(a: &[Extent], b: &[Extent]) -> Vec<ZeroRun> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let mut pos = match (a.first(), b.first()) {
        (Some(x), Some(y)) => x.start.max(y.start),
        _ => return out,
    };
    while i < a.len() && j < b.len() {
        let ea = a[i].start + a[i].length;
        let eb = b[j].start + b[j].length;
        let end = ea.min(eb);
        if end > pos {
            out.push(ZeroRun {
                start: pos,
                end,
                zero_a: a[i].zero,
                zero_b: b[j].zero,
            });
            pos = end;
        }
        if ea == end {
            i += 1;
        }
        if eb == end {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fvd_core::Source;

    fn ext(start: u64, length: u64, zero: bool) -> Extent {
        Extent {
            start,
            length,
            source: Source::Image,
            zero,
            host_offset: None,
        }
    }

    #[test]
    fn overlay_splits_at_every_boundary() {
        let a = [ext(0, 10, true), ext(10, 10, false)];
        let b = [ext(0, 5, false), ext(5, 15, true)];
        let r = overlay(&a, &b);
        let got: Vec<_> = r
            .iter()
            .map(|z| (z.start, z.end, z.zero_a, z.zero_b))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 5, true, false),
                (5, 10, true, true),
                (10, 20, false, true)
            ]
        );
    }

    #[test]
    fn options_parse_and_refuse_unknown_keys() {
        let o = parse_image_options(
            &[
                "block_size=64K,detect_zeroes=off".into(),
                "journal_size=1M".into(),
            ],
            &["block_size", "detect_zeroes", "journal_size"],
        )
        .unwrap();
        assert_eq!(o.block_size, Some(65536));
        assert_eq!(o.detect_zeroes, Some(false));
        assert_eq!(o.journal_size, Some(1 << 20));
        let o = parse_image_options(
            &["compact=on,chunk_size=64K,grow_cmd=echo a,,b {bytes}".into()],
            &["compact", "chunk_size", "grow_cmd"],
        )
        .unwrap();
        assert_eq!(o.compact, Some(true));
        assert_eq!(o.chunk_size, Some(65536));
        assert_eq!(o.grow_cmd.as_deref(), Some("echo a,b {bytes}"));
        let e = parse_image_options(&["cluster_size=64k".into()], &["block_size"]).unwrap_err();
        assert!(e.to_string().contains("cluster_size"), "{e}");
        assert!(parse_image_options(&["detect_zeroes=maybe".into()], &["detect_zeroes"]).is_err());
    }
}
