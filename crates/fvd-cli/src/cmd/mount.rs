//! `fvd mount` — export an image's virtual disk as one file over FUSE.
//!
//! The disk is mounted over an existing regular file (as
//! `qemu-storage-daemon --export type=fuse,mountpoint=FILE` does). The
//! command stays in the foreground; once the file is usable it prints the
//! mount point on a line of its own (and writes `--pidfile`). It ends with
//! status 0 when the file is unmounted (`umount FILE`, `fusermount3 -u
//! FILE`) or on SIGINT/SIGTERM/SIGHUP, after closing the image cleanly.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use fvd_core::Opener;
use fvd_core::storage::CacheMode;
use fvd_core::{Format, PathOptions};
use fvd_fuse::{Ending, FileOptions, MountOptions};

use crate::common::{at, parse_format, require_key};

fn parse_cache(s: &str) -> std::result::Result<CacheMode, String> {
    s.parse::<CacheMode>()
}

fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=fvd_fuse::mount::MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a thread count from 1 to {}",
            fvd_fuse::mount::MAX_THREADS
        )),
    }
}

/// Arguments of `fvd mount`.
#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Image format: fvd (default) or raw.
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Export read-only (file mode 0444, writes fail with EROFS).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Host cache mode for the image file: writeback (default) or none (O_DIRECT).
    #[arg(long, value_name = "MODE", default_value = "writeback", value_parser = parse_cache)]
    pub cache: CacheMode,
    /// Threads serving FUSE requests.
    #[arg(long, value_name = "N", default_value_t = fvd_fuse::mount::DEFAULT_THREADS, value_parser = parse_threads)]
    pub threads: usize,
    /// Let other users open the file (permissions then follow its mode).
    #[arg(long = "allow-other")]
    pub allow_other: bool,
    /// Write the process id to this file once the export is ready; removed at exit.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// The image.
    pub image: PathBuf,
    /// An existing regular file to mount the disk over.
    pub mountpoint: PathBuf,
}

fn write_pidfile(path: &Path) -> Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
        .with_context(|| format!("{}: cannot write the pid file", path.display()))
}

/// Run `fvd mount`.
pub async fn run(a: MountArgs, opener: &Opener) -> Result<u8> {
    if let Err(e) = fvd_fuse::mount::check_mountpoint(&a.mountpoint) {
        bail!("{e}");
    }
    let opts = PathOptions {
        read_only: a.read_only,
        cache: a.cache,
        force_share: false,
    };
    let image = opener
        .open(&a.image, a.format, opts)
        .await
        .map_err(|e| at(&a.image, e))?;
    require_key(&image, &a.image)?;
    let image = Arc::new(image);
    let mount_opts = MountOptions {
        file: FileOptions {
            read_only: a.read_only,
            ..FileOptions::default()
        },
        threads: a.threads,
        allow_other: a.allow_other,
        fs_name: a.image.display().to_string(),
    };
    let mountpoint = a.mountpoint.clone();
    let pidfile = a.pidfile.clone();
    // Serving blocks: it runs on a thread of its own, off the runtime.
    let served = tokio::task::spawn_blocking(move || {
        let mut ready_err = None;
        let r = fvd_fuse::serve(image, &mountpoint, &mount_opts, || {
            if let Some(p) = &pidfile
                && let Err(e) = write_pidfile(p)
            {
                ready_err = Some(e);
            }
            // The ready line: scripts wait for it before using the file.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", mountpoint.display());
            let _ = out.flush();
        });
        if let Some(p) = &pidfile {
            let _ = std::fs::remove_file(p);
        }
        (r, ready_err)
    })
    .await
    .context("the FUSE export thread failed")?;
    let (ending, ready_err) = served;
    let ending = ending.map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(e) = ready_err {
        eprintln!("fvd: {e:#}");
    }
    match ending {
        Ending::Unmounted | Ending::Signal(_) => Ok(0),
        Ending::Forced(sig) => {
            eprintln!(
                "fvd: {}: stopped by signal {sig} while still in use; image closed",
                a.mountpoint.display()
            );
            Ok(1)
        }
    }
}
