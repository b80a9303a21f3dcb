//! `fvd serve --vhost-user-blk PATH`: the same image, cache, read-only,
//! copy-on-read and prefetch options as the NBD export, offered to virtual
//! machines as a vhost-user-blk device instead (like qemu-storage-daemon's
//! `--export type=vhost-user-blk`). The transport lives in `fvd-vhost`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use fvd_core::Image;
use fvd_vhost::server::DEFAULT_QUEUE_SIZE;
use fvd_vhost::server::device_config;
use fvd_vhost::{ExportConfig, Socket, serve_on};

use super::serve_extras::Extras;

/// Options of `fvd serve` about the vhost-user-blk export.
#[derive(clap::Args, Debug, Default)]
pub struct VhostArgs {
    /// Export over vhost-user-blk on this unix socket (mode 0600, removed on
    /// exit) instead of NBD: for QEMU's vhost-user-blk-pci, cloud-hypervisor
    /// and Firecracker. One front end at a time; it may reconnect.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["socket", "bind", "tls_cert", "export_name", "shared"]
    )]
    pub vhost_user_blk: Option<PathBuf>,
    /// Request queues of the vhost-user-blk device (like QEMU's num-queues).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        requires = "vhost_user_blk"
    )]
    pub num_queues: u16,
    /// Largest virtqueue size the vhost-user-blk front end may choose.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUEUE_SIZE, requires = "vhost_user_blk")]
    pub queue_size: u16,
}

/// The serve options the vhost-user-blk export uses.
pub struct Export<'a> {
    /// The image's path (for messages and the GET_ID serial).
    pub path: &'a Path,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Exported read-only.
    pub read_only: bool,
    /// Stop after the first front end leaves.
    pub once: bool,
    /// Report connections and failed requests.
    pub verbose: bool,
    /// Queues and queue size.
    pub args: &'a VhostArgs,
}

/// Serve `image` (already open, copy-on-read and prefetch applied) over
/// vhost-user-blk on `listening` (bound on `a.socket`, or inherited through
/// socket activation) until a signal, or with `--once` the first
/// disconnect. `accepting` runs once the export is announced (the pid file,
/// the `--fork` parent); what it returns is kept until the end.
pub async fn run<F, G>(
    image: Arc<Image>,
    extras: Extras,
    a: Export<'_>,
    listening: Socket,
    signal: F,
    accepting: impl FnOnce() -> Result<G>,
) -> Result<u8>
where
    F: std::future::Future<Output = ()> + Send,
{
    // An inherited socket is named by its own path.
    let socket = match listening.path() {
        p if p.as_os_str().is_empty() => a.socket.clone(),
        p => p.to_path_buf(),
    };
    let path = a.path.display().to_string();
    let serial: String = a
        .path
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(20).collect())
        .unwrap_or_default();
    let cfg = ExportConfig {
        socket: socket.clone(),
        num_queues: a.args.num_queues,
        queue_size: a.args.queue_size,
        serial,
        once: a.once,
        verbose: a.verbose,
    };
    let announced = device_config(&image, &cfg)
        .map_err(|e| anyhow!("{path}: {e}"))
        .and_then(|_| {
            eprintln!(
                "fvd serve: serving {path} over vhost-user-blk at {}{}",
                socket.display(),
                if a.read_only { " (read-only)" } else { "" }
            );
            accepting()
        });
    let guard = match announced {
        Ok(g) => g,
        Err(e) => {
            drop(listening);
            let _ = image.close().await;
            return Err(e);
        }
    };
    let summary = match serve_on(image.clone(), cfg, listening, signal).await {
        Ok(s) => s,
        Err(e) => {
            let _ = image.close().await;
            return Err(anyhow!("{path}: {e}"));
        }
    };
    extras.finish(&image);
    drop(guard);
    if a.verbose {
        eprintln!(
            "fvd serve: stopped after {} front-end connection(s); {path} closed cleanly",
            summary.connections
        );
    }
    Ok(0)
}
