//! `fvd demo` — copy-on-write and free writes on a built-in example.
//!
//! Builds a 64 MiB raw base with data and zero regions and a 96 MiB FVD image
//! over it (zero detection on), then performs five kinds of writes through
//! the engine, each followed by a flush, and prints what each cost, taken
//! from the engine's I/O counters.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use fvd_core::{BaseSpec, CreateOptions, Format, Image, IoBuf, PathOptions, Stats};

use crate::common::at;
use crate::size::human;

/// Size of the demo base.
pub const BASE_SIZE: u64 = 64 << 20;
/// Virtual size of the demo image (larger than the base).
pub const IMAGE_SIZE: u64 = 96 << 20;
const MIB: u64 = 1 << 20;

/// Arguments of `fvd demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for the demo files (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the files of a temporary directory (files in --dir are always kept).
    #[arg(long)]
    pub keep: bool,
}

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Snap {
    data_bytes: u64,
    base_read: u64,
    journal: u64,
    header: u64,
    fsyncs: u64,
}

impl Snap {
    fn of(s: &Stats) -> Snap {
        Snap {
            data_bytes: s.data_write_bytes.load(Ordering::Relaxed),
            base_read: s.base_read_bytes.load(Ordering::Relaxed),
            journal: s.journal_writes.load(Ordering::Relaxed),
            header: s.header_writes.load(Ordering::Relaxed),
            fsyncs: s.storage_flushes.load(Ordering::Relaxed),
        }
    }

    fn minus(self, o: Snap) -> Snap {
        Snap {
            data_bytes: self.data_bytes - o.data_bytes,
            base_read: self.base_read - o.base_read,
            journal: self.journal - o.journal,
            header: self.header - o.header,
            fsyncs: self.fsyncs - o.fsyncs,
        }
    }
}

/// Content of the base's data regions: never zero.
fn base_byte(off: u64) -> u8 {
    ((off / 512) as u8).wrapping_mul(31) | 1
}

/// Byte ranges of the base and whether they hold data (`true`), explicit
/// zeros (`false`) or nothing (holes are left out).
const BASE_LAYOUT: [(u64, u64, bool); 4] = [
    (0, 8 * MIB, true),
    (16 * MIB, 24 * MIB, true),
    (24 * MIB, 32 * MIB, false),
    (32 * MIB, 48 * MIB, true),
];

/// Write the demo base and return the expected content of the image.
fn make_base(path: &Path) -> Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.set_len(BASE_SIZE)
        .with_context(|| format!("{}: set size", path.display()))?;
    let mut model = vec![0u8; IMAGE_SIZE as usize];
    for (s, e, data) in BASE_LAYOUT {
        let part = &mut model[s as usize..e as usize];
        if data {
            for (i, b) in part.iter_mut().enumerate() {
                *b = base_byte(s + i as u64);
            }
        }
        f.write_all_at(part, s)
            .with_context(|| format!("{}: write", path.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("{}: sync", path.display()))?;
    Ok(model)
}

/// One demo write.
struct Step {
    tag: &'static str,
    what: &'static str,
    offset: u64,
    len: u64,
    pattern: u8,
}

const STEPS: [Step; 5] = [
    Step {
        tag: "(a)",
        what: "first write to a base data block",
        offset: MIB,
        len: 4096,
        pattern: 0xa1,
    },
    Step {
        tag: "(b)",
        what: "rewrite of that block",
        offset: MIB,
        len: 4096,
        pattern: 0xb2,
    },
    Step {
        tag: "(c)",
        what: "write beyond the base",
        offset: 80 * MIB,
        len: 64 << 10,
        pattern: 0xc3,
    },
    Step {
        tag: "(d)",
        what: "write to a zero-filled base block",
        offset: 10 * MIB,
        len: 4096,
        pattern: 0xd4,
    },
    Step {
        tag: "(e)",
        what: "512 B into another base data block",
        offset: 20 * MIB + 1024,
        len: 512,
        pattern: 0xe5,
    },
];

/// A fresh directory under the system's temporary directory.
fn temp_dir() -> Result<PathBuf> {
    let root = std::env::temp_dir();
    for n in 0..1000u32 {
        let d = root.join(format!("fvd-demo-{}-{n}", std::process::id()));
        match std::fs::create_dir(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create", d.display())),
        }
    }
    bail!("{}: cannot create a demo directory", root.display())
}

/// Run `fvd demo`.
pub async fn run(a: Args) -> Result<u8> {
    let (dir, keep) = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("{}: cannot create", d.display()))?;
            (d.clone(), true)
        }
        None => (temp_dir()?, a.keep),
    };
    let result = match demo(&dir).await {
        Ok((base, image)) => {
            super::demo_nbd::serve_and_drive(&dir, &image, base_byte).map(|()| (base, image))
        }
        Err(e) => Err(e),
    };
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let (base, image) = result?;
    println!();
    if keep {
        println!("Files:");
        println!("  base:  {} (raw, {})", base.display(), human(BASE_SIZE));
        println!("  image: {} (fvd, {})", image.display(), human(IMAGE_SIZE));
    } else {
        println!(
            "The demo files in {} were removed; run 'fvd demo --keep' (or --dir DIR) to keep them.",
            dir.display()
        );
    }
    println!("Try next:");
    println!("  fvd info {}", image.display());
    println!("  fvd map {}", image.display());
    println!("  fvd check {}", image.display());
    println!(
        "  fvd compare -F raw {} {}",
        image.display(),
        base.display()
    );
    Ok(0)
}

async fn demo(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let base = dir.join("base.raw");
    let image = dir.join("demo.fvd");
    if image.exists() {
        bail!(
            "{}: file exists; remove it or pick another --dir",
            image.display()
        );
    }
    let mut model = make_base(&base)?;
    println!(
        "Base {}: {} raw; data at 0-8M, 16-24M, 32-48M; zeros elsewhere (24-32M written as zeros)",
        base.display(),
        human(BASE_SIZE)
    );
    let spec = BaseSpec {
        name: "base.raw".into(),
        format: Format::Raw,
    };
    let co = CreateOptions {
        size: Some(IMAGE_SIZE),
        ..CreateOptions::default()
    };
    fvd_core::create_path(&image, Some(&spec), co, Some(true))
        .await
        .map_err(|e| at(&image, e))?;
    let img = fvd_core::open_path(&image, Format::Fvd, PathOptions::default())
        .await
        .map_err(|e| at(&image, e))?;
    let (local, total) = img.local_blocks();
    println!(
        "Image {}: {} fvd over base.raw, block size {}, detect_zeroes=on: {local} of {total} base blocks are zero and already local",
        image.display(),
        human(IMAGE_SIZE),
        img.block_size()
    );
    println!();
    println!(
        "{:<5} {:<36} {:>10} {:>10} {:>8} {:>7} {:>7}",
        "step",
        "kind of write (each + flush)",
        "data bytes",
        "base read",
        "journal",
        "header",
        "fsyncs"
    );
    for s in &STEPS {
        let before = Snap::of(img.stats());
        let mut buf = IoBuf::for_overwrite(s.len as usize);
        buf.fill(s.pattern);
        img.write(s.offset, buf, false)
            .await
            .map_err(|e| at(&image, e))?;
        img.flush().await.map_err(|e| at(&image, e))?;
        let d = Snap::of(img.stats()).minus(before);
        model[s.offset as usize..(s.offset + s.len) as usize].fill(s.pattern);
        println!(
            "{:<5} {:<36} {:>10} {:>10} {:>8} {:>7} {:>7}",
            s.tag, s.what, d.data_bytes, d.base_read, d.journal, d.header, d.fsyncs
        );
    }
    println!();
    println!(
        "(a) and (e) copy on write: their first flush journals the new bits (one journal write;"
    );
    println!(
        "    the first also clears the clean flag in the header). (e) merges the rest of the block"
    );
    println!(
        "    from the base. (b), (c) and (d) are free writes: no metadata, only the data fsync."
    );
    verify(&img, &image, &model).await?;
    println!("Verified: all {} read back as expected.", human(IMAGE_SIZE));
    img.close().await.map_err(|e| at(&image, e))?;
    println!("Closed cleanly (bitmap checkpointed, clean flag set).");
    Ok((base, image))
}

/// Read the whole image back and compare it with the model.
async fn verify(img: &Image, path: &Path, model: &[u8]) -> Result<()> {
    const STEP: usize = 4 << 20;
    for (i, want) in model.chunks(STEP).enumerate() {
        let off = (i * STEP) as u64;
        let got = img
            .read(off, IoBuf::for_overwrite(want.len()))
            .await
            .map_err(|e| at(path, e))?;
        if let Some(p) = got.iter().zip(want).position(|(x, y)| x != y) {
            bail!(
                "{}: read-back mismatch at offset {}",
                path.display(),
                off + p as u64
            );
        }
    }
    Ok(())
}
