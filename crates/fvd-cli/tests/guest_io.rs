//! Linux guests (QEMU 10, TCG) booting from FVD disks served by `fvd serve`,
//! over vhost-user-blk and over NBD: the guest's root file system comes from
//! the image's base (the disk's first partition), and its test writes a
//! pattern with `dd oflag=direct`, syncs, reads it back, discards part of it
//! and powers off. The host then checks the image with `fvd check` and
//! compares its content byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
mod guest_support;

use guest_support::{
    Attach, DATA_START, Kit, MIB, Server, assert_check_clean, boot, boot_watching, build_base,
    content, pattern,
};

const FVD: &str = env!("CARGO_BIN_EXE_fvd");
const DISK: u64 = 128 * MIB;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's test: 8 MiB of pattern at the start of the scratch
/// partition (two writers on two vCPUs), read back; then 1 MiB at +2 MiB
/// discarded and read as zeros.
const DATA_SCRIPT: &str = r#"
D=/dev/vda2
echo "FVD-SERIAL $(cat /sys/block/vda/serial 2>/dev/null)"
echo "FVD-CACHE $(cat /sys/block/vda/queue/write_cache)"
echo "FVD-QUEUES $(ls /sys/block/vda/mq | wc -l)"
yes fvd-guest-pattern-0123456789 | head -c 8388608 > /tmp/p
# Two writers pinned to the two vCPUs (one queue each when there are two).
second=1
[ "$(nproc)" -gt 1 ] && second=2
taskset 1 dd if=/tmp/p of=$D bs=1M count=4 oflag=direct conv=fsync 2>/dev/null &
taskset $second dd if=/tmp/p of=$D bs=1M count=4 skip=4 seek=4 oflag=direct conv=fsync 2>/dev/null &
wait
sync
dd if=$D of=/tmp/r bs=1M count=8 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/r
echo "FVD-CHECK readback ok"
blkdiscard -o 2097152 -l 1048576 $D
dd if=$D of=/tmp/z bs=1M skip=2 count=1 iflag=direct 2>/dev/null
head -c 1048576 /dev/zero > /tmp/zero
cmp /tmp/zero /tmp/z
echo "FVD-CHECK discard ok"
# The driver turns the write cache off (a virtio config write): every write
# is then durable when it completes.
echo "write through" > /sys/block/vda/cache_type
echo "FVD-CACHE-NOW $(cat /sys/block/vda/cache_type)"
dd if=/tmp/p of=$D bs=4k count=1 seek=2048 oflag=direct 2>/dev/null
"#;

/// `fvd create -q -F raw -b BASE EXTRA... IMAGE DISK`.
fn create_over(base: &str, image: &Path, extra: &[&str]) {
    let out = Command::new(FVD)
        .args(["create", "-q", "-F", "raw", "-b", base])
        .args(extra)
        .arg(image)
        .arg(DISK.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fvd create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the disk must hold after the data script.
fn expected(base: &[u8]) -> Vec<u8> {
    let mut want = vec![0u8; DISK as usize];
    want[..base.len()].copy_from_slice(base);
    let d = DATA_START as usize;
    want[d..d + 8 * MIB as usize].copy_from_slice(&pattern(8 * MIB as usize));
    want[d + 2 * MIB as usize..d + 3 * MIB as usize].fill(0);
    // The write-through 4 KiB write at +8 MiB.
    want[d + 8 * MIB as usize..d + 8 * MIB as usize + 4096].copy_from_slice(&pattern(4096));
    want
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `vhost`: over vhost-user-blk with two vCPUs and two queues (the guest
/// driver spreads requests over them); else over NBD.
fn data_round_trip(vhost: bool) {
    let Some(kit) = Kit::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = build_base(kit, dir.path(), DATA_SCRIPT, DISK);
    let image = dir.path().join("disk.fvd");
    create_over(&base.display().to_string(), &image, &[]);
    let sock = dir.path().join("disk.sock");
    let attach = if vhost {
        Attach::VhostUser(&sock)
    } else {
        Attach::Nbd(&sock)
    };
    let (serve_args, qemu_extra): (&[&str], &[&str]) = if vhost {
        (&["--cache", "none", "--num-queues", "2"], &["-smp", "2"])
    } else {
        (&["--cache", "none"], &[])
    };
    let mut server = Server::fvd(&image, attach, serve_args);
    let guest = boot(kit, attach, qemu_extra, BOOT_TIMEOUT);
    guest.assert_ok(if vhost { "vhost-user-blk" } else { "NBD" });
    assert!(guest.console.contains("FVD-CHECK readback ok"));
    assert!(guest.console.contains("FVD-CHECK discard ok"));
    assert_eq!(
        guest.value("FVD-CACHE").as_deref(),
        Some("write back"),
        "{}",
        guest.console
    );
    if vhost {
        // VIRTIO_BLK_T_GET_ID answers the image's file name.
        assert_eq!(guest.value("FVD-SERIAL").as_deref(), Some("disk.fvd"));
        assert_eq!(
            guest.value("FVD-QUEUES").as_deref(),
            Some("2"),
            "{}",
            guest.console
        );
    }
    // The server leaves when the front end does (--once), committing and
    // closing the image.
    let st = server
        .wait_exit(Duration::from_secs(30))
        .expect("fvd serve --once did not exit after the guest powered off");
    let log = server.log();
    assert!(st.success(), "fvd serve failed: {log}");
    assert!(log.contains("closed cleanly"), "{log}");
    assert_eq!(
        guest.value("FVD-CACHE-NOW").as_deref(),
        Some("write through")
    );
    if vhost {
        // The config write reached the backend (VHOST_USER_SET_CONFIG).
        assert!(log.contains("write cache off (write through)"), "{log}");
    }
    assert_check_clean(&image);
    let base_bytes = std::fs::read(&base).unwrap();
    let got = content(&image, "fvd");
    let want = expected(&base_bytes);
    assert_eq!(got.len(), want.len());
    if let Some(at) = first_difference(&got, &want) {
        panic!(
            "the image differs from what the guest wrote at byte {at} ({:#x} vs {:#x})",
            got[at], want[at]
        );
    }
}

#[test]
fn guest_boots_from_fvd_over_vhost_user_blk_and_its_writes_land() {
    data_round_trip(true);
}

#[test]
fn guest_boots_from_fvd_over_nbd_and_its_writes_land() {
    data_round_trip(false);
}

/// Sum of `count=` of the Read lines of an nbdkit log filter file.
fn nbdkit_read_bytes(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains(" Read ") && !l.contains("return"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("count="))
                .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        })
        .sum()
}

/// Unique bytes below `limit` the guest read, from QEMU's
/// `virtio_blk_handle_read` trace (sector and sector count per request).
fn unique_guest_read_bytes(trace: &str, limit: u64) -> u64 {
    let mut ranges: Vec<(u64, u64)> = trace
        .lines()
        .filter(|l| l.contains("virtio_blk_handle_read"))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let after = |k: &str| {
                words
                    .iter()
                    .position(|w| *w == k)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let s = after("sector")?;
            let n = after("nsectors")?;
            Some((s * 512, (s + n) * 512))
        })
        .map(|(a, b)| (a.min(limit), b.min(limit)))
        .filter(|(a, b)| a < b)
        .collect();
    ranges.sort_unstable();
    let (mut total, mut end) = (0u64, 0u64);
    for (a, b) in ranges {
        let a = a.max(end);
        if b > a {
            total += b - a;
            end = b;
        }
    }
    total
}

/// A guest boots from an FVD image whose base is remote (nbdkit, with its
/// log filter counting bytes) and copy-on-read is on: the base serves no
/// more than the unique bytes the boot read, and a second boot reads
/// nothing from it.
#[test]
fn guest_boot_over_a_remote_base_fetches_no_more_than_it_reads() {
    let Some(kit) = Kit::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let script = "cat /bin/busybox > /dev/null\necho 'FVD-CHECK read ok'\n";
    let base = build_base(kit, dir.path(), script, DISK);
    let base_sock = dir.path().join("base.sock");
    let base_log = dir.path().join("base-requests.log");
    let _nbdkit = Server::start(
        "nbdkit",
        &[
            "-f",
            "-U",
            &base_sock.display().to_string(),
            "--filter=log",
            "file",
            &base.display().to_string(),
            &format!("logfile={}", base_log.display()),
        ],
        &base_sock,
        &dir.path().join("nbdkit.log"),
    );
    let image = dir.path().join("disk.fvd");
    let uri = format!("nbd+unix:///?socket={}", base_sock.display());
    create_over(&uri, &image, &["-o", "copy_on_read=on"]);
    let base_read = || nbdkit_read_bytes(&std::fs::read_to_string(&base_log).unwrap_or_default());
    let mut rounds = Vec::new();
    for round in 0..2 {
        let before = base_read();
        let sock = dir.path().join(format!("disk{round}.sock"));
        let trace = dir.path().join(format!("trace{round}.log"));
        let mut server = Server::fvd(&image, Attach::Nbd(&sock), &["--copy-on-read", "on"]);
        let guest = boot(
            kit,
            Attach::Nbd(&sock),
            &[
                "-trace",
                &format!("enable=virtio_blk_handle_read,file={}", trace.display()),
            ],
            BOOT_TIMEOUT,
        );
        guest.assert_ok("boot over a remote base");
        let st = server
            .wait_exit(Duration::from_secs(30))
            .expect("fvd serve exits");
        assert!(st.success(), "{}", server.log());
        let fetched = base_read() - before;
        let unique = unique_guest_read_bytes(
            &std::fs::read_to_string(&trace).unwrap_or_default(),
            DATA_START,
        );
        rounds.push((fetched, unique));
    }
    eprintln!("boots over a remote base: (bytes from the base, unique bytes read): {rounds:?}");
    let (fetched, unique) = rounds[0];
    assert!(
        unique > MIB,
        "the boot read only {unique} bytes of the base range?"
    );
    assert!(
        fetched <= unique,
        "the base served {fetched} bytes for a boot that read {unique} unique bytes"
    );
    assert!(fetched > 0, "nothing came from the base");
    assert_eq!(
        rounds[1].0, 0,
        "the second boot fetched {} bytes from the base again (it read {} unique bytes)",
        rounds[1].0, rounds[1].1
    );
    assert_check_clean(&image);
}

/// The guest of this test writes, then pauses while the host restarts
/// `fvd serve` (SIGTERM: drain, commit, close; then a new process on the
/// same image and socket); QEMU reconnects (`reconnect-ms`) and the guest
/// reads back what it wrote before the restart and writes again.
#[test]
fn guest_survives_a_vhost_user_blk_backend_restart() {
    let Some(kit) = Kit::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
D=/dev/vda2
yes fvd-guest-pattern-0123456789 | head -c 4194304 > /tmp/p
dd if=/tmp/p of=$D bs=1M count=4 oflag=direct conv=fsync 2>/dev/null
echo "FVD-PHASE written"
sleep 3
dd if=$D of=/tmp/r bs=1M count=4 iflag=direct 2>/dev/null
cmp /tmp/p /tmp/r
dd if=/tmp/p of=$D bs=1M count=4 seek=4 oflag=direct conv=fsync 2>/dev/null
echo "FVD-CHECK after restart ok"
"#;
    let base = build_base(kit, dir.path(), script, DISK);
    let image = dir.path().join("disk.fvd");
    create_over(&base.display().to_string(), &image, &[]);
    let sock = dir.path().join("disk.sock");
    let attach = Attach::VhostUserReconnect(&sock);
    let mut first = Some(Server::fvd_with(&image, attach, &["--cache", "none"]));
    let mut second = None;
    let guest = boot_watching(kit, attach, &[], BOOT_TIMEOUT, &mut |line| {
        if line.contains("FVD-PHASE written")
            && let Some(mut s) = first.take()
        {
            let st = s.terminate().expect("fvd serve was running");
            assert!(st.success(), "SIGTERM with a guest attached: {}", s.log());
            assert!(s.log().contains("closed cleanly"), "{}", s.log());
            assert_check_clean(&image);
            second = Some(Server::fvd_with(&image, attach, &["--cache", "none"]));
        }
    });
    guest.assert_ok("backend restart");
    assert!(guest.console.contains("FVD-CHECK after restart ok"));
    let mut server = second.expect("the backend was restarted");
    let st = server.terminate().unwrap();
    assert!(st.success(), "{}", server.log());
    assert!(
        server.log().contains("connected"),
        "QEMU reconnected: {}",
        server.log()
    );
    assert_check_clean(&image);
    let got = content(&image, "fvd");
    let d = DATA_START as usize;
    let p = pattern(4 * MIB as usize);
    assert_eq!(&got[d..d + p.len()], &p[..]);
    assert_eq!(&got[d + p.len()..d + 2 * p.len()], &p[..]);
}
