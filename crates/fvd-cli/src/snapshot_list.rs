//! Snapshots as `fvd info`, `fvd snapshot -l` and the control socket show
//! them: qemu-img's JSON keys and its table. Below the commands that use it
//! (info, snapshot, control), so none of them imports another.

use fvd_core::image::snapshot::Snapshot;
use serde::Serialize;

use crate::size::human;

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
