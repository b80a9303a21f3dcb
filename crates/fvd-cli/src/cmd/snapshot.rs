//! `fvd snapshot` — list, create, apply and delete internal snapshots, like
//! `qemu-img snapshot`, offline or (`--server`) on an image that `fvd
//! serve` exports.
//!
//! Offline the image is opened read-write with its lock (read-only with
//! `-l`; `-U` skips the lock to list an image in use). Through the server's
//! control socket, `-c` quiesces the requests in flight, commits, takes the
//! snapshot and resumes, all inside the server; `-l` and `-d` work there
//! too. `-a` needs the image closed (stop the server first), as qemu-img
//! needs it unused.

use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use fvd_core::image::snapshot::SnapshotSel;
use fvd_core::{Format, Opener};
use serde_json::json;

use crate::cmd::control;
use crate::common::{Output, at, open, parse_format, print_json};
use crate::snapshot_list::{SnapshotJson, table};

/// Arguments of `fvd snapshot`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("op").args(["list", "create", "apply", "delete"])))]
pub struct Args {
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    pub list: bool,
    /// Create a snapshot named SNAPSHOT.
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    pub create: Option<String>,
    /// Revert the disk to SNAPSHOT (an id, else a name).
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Delete the first snapshot named SNAPSHOT.
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    pub delete: Option<String>,
    /// Open without taking the lock (list an image in use).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Image format: fvd (the only one with internal snapshots).
    #[arg(short = 'f', value_name = "FMT", default_value = "fvd", value_parser = parse_format)]
    pub format: Format,
    /// Print nothing on success.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Output format of -l.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Work on the image an `fvd serve --control-socket PATH` exports,
    /// through that socket.
    #[arg(long, value_name = "PATH")]
    pub server: Option<PathBuf>,
    /// The image (optional with --server).
    pub image: Option<PathBuf>,
}

/// Run `fvd snapshot`.
pub async fn run(a: Args, opener: &Opener) -> Result<u8> {
    if a.format != Format::Fvd {
        let what = a
            .image
            .as_ref()
            .map_or("image".into(), |p| p.display().to_string());
        bail!(
            "{what}: internal snapshots need an fvd image, not {}",
            a.format.name()
        );
    }
    if let Some(sock) = &a.server {
        return run_online(&a, sock).await;
    }
    let Some(path) = a.image.clone() else {
        bail!("an image is required (or --server PATH)");
    };
    if let Some(name) = &a.create {
        let img = open(opener, &path, a.format, false, false).await?;
        let r = img.create_snapshot(name).await;
        img.close().await.map_err(|e| at(&path, e))?;
        r.map_err(|e| at(&path, e))?;
    } else if let Some(name) = &a.delete {
        let img = open(opener, &path, a.format, false, false).await?;
        let r = img.delete_snapshot(&SnapshotSel::Name(name.clone())).await;
        img.close().await.map_err(|e| at(&path, e))?;
        r.map_err(|e| at(&path, e))?;
    } else if let Some(name) = &a.apply {
        let img = open(opener, &path, a.format, false, false).await?;
        img.apply_snapshot(&SnapshotSel::IdOrName(name.clone()))
            .await
            .map_err(|e| at(&path, e))?;
    } else {
        let img = open(opener, &path, a.format, true, a.force_share).await?;
        let list: Vec<SnapshotJson> = img.snapshots().iter().map(SnapshotJson::from).collect();
        print_list(&a, &list)?;
    }
    Ok(0)
}

fn print_list(a: &Args, list: &[SnapshotJson]) -> Result<()> {
    match a.output {
        Output::Json => print_json(&list)?,
        Output::Human => print!("{}", table(list)),
    }
    Ok(())
}

/// The same operations through a server's control socket.
async fn run_online(a: &Args, sock: &std::path::Path) -> Result<u8> {
    let (cmd, args) = if let Some(name) = &a.create {
        ("snapshot-create", json!({ "name": name }))
    } else if let Some(name) = &a.delete {
        ("snapshot-delete", json!({ "name": name }))
    } else if a.apply.is_some() {
        bail!(
            "{}: a snapshot is applied with the image closed: stop the server, then run fvd snapshot -a without --server",
            sock.display()
        );
    } else {
        ("query-snapshots", json!({}))
    };
    let ret = control::request(sock, cmd, args).await?;
    if cmd == "query-snapshots" {
        let list: Vec<SnapshotJson> = serde_json::from_value(ret)
            .map_err(|e| anyhow!("{}: unexpected answer: {e}", sock.display()))?;
        print_list(a, &list)?;
    }
    Ok(0)
}
