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
use fvd_core::image::snapshot::{Snapshot, SnapshotSel};
use fvd_core::{Format, Opener};
use serde::Serialize;
use serde_json::json;

use crate::cmd::control;
use crate::cmd::info::Output;
use crate::common::{at, open, parse_format, print_json};
use crate::size::human;

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

/// A snapshot in `info --output=json` and on the control socket, with
/// qemu-img's keys.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotJson {
    /// Id (a string, as qemu-img's).
    pub id: String,
    /// Name.
    pub name: String,
    /// Bytes of VM state (0).
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: u64,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, seconds.
    pub vm_clock_sec: u64,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count (absent when not recorded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

impl From<&Snapshot> for SnapshotJson {
    fn from(s: &Snapshot) -> Self {
        SnapshotJson {
            id: s.id.to_string(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: (s.icount != fvd_core::format::snapshot::NO_ICOUNT).then_some(s.icount),
        }
    }
}

/// The snapshot table as qemu-img prints it (`Snapshot list:`, then one
/// row per snapshot); nothing for no snapshots.
pub fn table(snaps: &[SnapshotJson]) -> String {
    if snaps.is_empty() {
        return String::new();
    }
    let row = |id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str| {
        format!("{id:<7} {tag:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}\n")
    };
    let mut out = String::from("Snapshot list:\n");
    out += &row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT");
    for s in snaps {
        let secs = s.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            s.vm_clock_nsec / 1_000_000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        out += &row(
            &s.id,
            &s.name,
            &human(s.vm_state_size),
            &local_time(s.date_sec),
            &clock,
            &icount,
        );
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` in the local time zone, as qemu-img shows dates.
fn local_time(secs: u64) -> String {
    let t = secs as libc::time_t;
    // SAFETY: localtime_r only writes the struct we own; a zeroed tm is a
    // valid value to start from.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
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
