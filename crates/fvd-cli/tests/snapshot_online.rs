//! Snapshots of a running image: fio writes through `fvd serve` (its nbd
//! engine) while `fvd snapshot -c --server` takes a snapshot through the
//! control socket. fio logs every write with its completion time and
//! latency; the snapshot must hold every write completed before the
//! request was sent, none issued after the answer came back, and each 4 KiB
//! block whole (old or new, never torn). Also: list and delete online, the
//! control socket's protocol and errors, and `serve -l`.

mod nbd_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nbd_support::{Server, ok};

const SIZE: u64 = 256 << 20;
const BLOCK: u64 = 4096;

fn fvd(dir: &Path, args: &[&str]) -> std::process::Output {
    nbd_support::fvd_in(dir, args)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn fio_with_nbd() -> bool {
    if !fvd_testkit::have_tools(&["fio"]) {
        return false;
    }
    let ok = Command::new("fio")
        .arg("--enghelp=nbd")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("uri"))
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: this fio has no nbd ioengine");
    }
    ok
}

fn fio(dir: &Path, uri: &str, args: &[&str]) -> Command {
    let mut c = Command::new("fio");
    c.current_dir(dir)
        .arg("--name=job")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--size={SIZE}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn snapshot_through_the_control_socket_while_fio_writes() {
    if !fio_with_nbd() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        &fvd(
            d,
            &[
                "create",
                "-o",
                "compact=on,chunk_size=64k",
                "img.fvd",
                "256M",
            ],
        ),
        "create",
    );
    let ctl = d.join("ctl.sock");
    let mut server = Server::unix(
        &d.join("img.fvd"),
        &d.join("nbd.sock"),
        &["--control-socket", ctl.to_str().unwrap()],
    );
    let uri = server.uri();
    // Every block old data first.
    let out = fio(
        d,
        &uri,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--buffer_pattern=0x11",
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Then new data at random blocks, while the snapshot is taken.
    let writer = fio(
        d,
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
            "--runtime=4",
            "--rate_iops=4000",
            "--randrepeat=0",
            "--buffer_pattern=0x22",
            "--write_lat_log=w",
            "--log_offset=1",
            "--log_unix_epoch=1",
        ],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let sent = now_ms();
    let r = fvd(
        d,
        &[
            "snapshot",
            "-c",
            "during",
            "--server",
            ctl.to_str().unwrap(),
        ],
    );
    let answered = now_ms();
    ok(&r, "snapshot -c --server");
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The snapshot is listed online, with the creation the server made.
    let list = ok(
        &fvd(d, &["snapshot", "-l", "--server", ctl.to_str().unwrap()]),
        "snapshot -l --server",
    );
    assert!(list.contains("during"), "{list}");
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
    assert!(!ctl.exists(), "the control socket is removed at exit");

    // Per block: a write completed before the request, or issued after the
    // answer (fio's times are milliseconds: a margin on both sides).
    let log = std::fs::read_to_string(d.join("w_lat.1.log")).expect("fio latency log");
    let mut before: HashMap<u64, bool> = HashMap::new();
    let mut issued_before_answer: HashMap<u64, bool> = HashMap::new();
    let mut writes = 0;
    let mut written: HashMap<u64, bool> = HashMap::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 5 || f[2] != "1" {
            continue;
        }
        let done: f64 = f[0].parse().unwrap();
        let lat_ms = f[1].parse::<f64>().unwrap() / 1e6;
        let block = f[4].parse::<u64>().unwrap() / BLOCK;
        writes += 1;
        written.insert(block, true);
        if done < sent - 5.0 {
            before.insert(block, true);
        }
        if done - lat_ms <= answered + 5.0 {
            issued_before_answer.insert(block, true);
        }
    }
    assert!(writes > 1000, "fio wrote only {writes} times");
    ok(
        &fvd(
            d,
            &[
                "convert",
                "-l",
                "snapshot.name=during",
                "-O",
                "raw",
                "img.fvd",
                "snap.raw",
            ],
        ),
        "convert -l",
    );
    let snap = std::fs::read(d.join("snap.raw")).unwrap();
    let (mut new_seen, mut old_after) = (0, 0);
    for (b, chunk) in snap.chunks(BLOCK as usize).enumerate() {
        let b = b as u64;
        let val = if chunk.iter().all(|&x| x == 0x11) {
            0x11
        } else if chunk.iter().all(|&x| x == 0x22) {
            0x22
        } else {
            panic!("snapshot block {b} is neither old nor new data (torn or foreign)");
        };
        if before.contains_key(&b) {
            assert_eq!(
                val, 0x22,
                "block {b}: a write acknowledged before the request is missing"
            );
            new_seen += 1;
        }
        if val == 0x22 {
            assert!(
                issued_before_answer.contains_key(&b),
                "block {b}: holds a write issued after the snapshot was taken"
            );
        } else if !issued_before_answer.contains_key(&b) && written.contains_key(&b) {
            old_after += 1;
        }
    }
    assert!(
        new_seen > 100,
        "only {new_seen} blocks written before the request"
    );
    assert!(
        old_after > 100,
        "only {old_after} blocks written only after the answer"
    );
    ok(&fvd(d, &["check", "img.fvd"]), "check");
}

/// One request line on the control socket; the answer line.
fn ask(sock: &Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn control_socket_protocol_list_delete_and_errors() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        &fvd(d, &["create", "-o", "compact=on", "img.fvd", "16M"]),
        "create",
    );
    ok(&fvd(d, &["io", "-c", "write -P 5 0 1M", "img.fvd"]), "io");
    ok(
        &fvd(d, &["snapshot", "-c", "offline", "img.fvd"]),
        "snapshot",
    );
    let ctl = d.join("ctl.sock");
    let mut server = Server::unix(
        &d.join("img.fvd"),
        &d.join("nbd.sock"),
        &["--control-socket", ctl.to_str().unwrap()],
    );
    let cmds = ask(&ctl, r#"{"execute":"query-commands"}"#);
    assert!(cmds["return"].as_array().unwrap().len() >= 5, "{cmds}");
    let a = ask(
        &ctl,
        r#"{"execute":"snapshot-create","arguments":{"name":"online"},"id":7}"#,
    );
    assert_eq!(a["return"]["name"], "online", "{a}");
    assert_eq!(a["return"]["id"], "2", "{a}");
    assert_eq!(a["id"], 7, "the request's id comes back");
    let l = ask(&ctl, r#"{"execute":"query-snapshots"}"#);
    let names: Vec<&str> = l["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["offline", "online"]);
    let del = ask(
        &ctl,
        r#"{"execute":"snapshot-delete","arguments":{"id":"1"}}"#,
    );
    assert_eq!(del["return"]["name"], "offline", "{del}");
    let s = ask(&ctl, r#"{"execute":"query-stats"}"#);
    assert!(s["return"]["uptime-seconds"].is_number(), "{s}");
    // Errors: one line each, the connection stays usable.
    for (req, class) in [
        ("not json", "GenericError"),
        (r#"{"execute":"no-such-thing"}"#, "CommandNotFound"),
        (
            r#"{"execute":"snapshot-delete","arguments":{"name":"gone"}}"#,
            "GenericError",
        ),
        (r#"{"execute":"snapshot-create"}"#, "GenericError"),
        (
            r#"{"execute":"snapshot-create","arguments":"x"}"#,
            "GenericError",
        ),
        (r#"{"arguments":{}}"#, "GenericError"),
    ] {
        let e = ask(&ctl, req);
        assert_eq!(e["error"]["class"], class, "{req}: {e}");
        assert!(!e["error"]["desc"].as_str().unwrap().is_empty());
    }
    let r = fvd(
        d,
        &[
            "snapshot",
            "-d",
            "online",
            "--server",
            ctl.to_str().unwrap(),
        ],
    );
    ok(&r, "snapshot -d --server");
    let r = fvd(
        d,
        &["snapshot", "-a", "x", "--server", ctl.to_str().unwrap()],
    );
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("stop the server"));
    // The image is in use: offline commands are refused, nothing changes.
    let r = fvd(d, &["snapshot", "-c", "x", "img.fvd"]);
    assert!(!r.status.success());
    // -U lists an image in use.
    ok(
        &fvd(d, &["snapshot", "-l", "-U", "img.fvd"]),
        "snapshot -l -U",
    );
    assert_eq!(server.terminate().code(), Some(0));
    assert_eq!(ok(&fvd(d, &["snapshot", "-l", "img.fvd"]), "list"), "");
    ok(&fvd(d, &["check", "img.fvd"]), "check");
}

#[test]
fn serve_exports_a_snapshot_read_only() {
    if !fvd_testkit::have_tools(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ok(
        &fvd(d, &["create", "-o", "compact=on", "img.fvd", "16M"]),
        "create",
    );
    ok(&fvd(d, &["io", "-c", "write -P 5 0 1M", "img.fvd"]), "io");
    ok(&fvd(d, &["snapshot", "-c", "s", "img.fvd"]), "snapshot");
    ok(&fvd(d, &["io", "-c", "write -P 6 0 1M", "img.fvd"]), "io");
    let server = Server::unix(
        &d.join("img.fvd"),
        &d.join("nbd.sock"),
        &["-l", "snapshot.name=s"],
    );
    let uri = server.uri();
    let r = nbd_support::qemu_io_opts(&["-r", "-f", "raw"], &uri, &["read -P 5 0 1M"]);
    assert!(r.ok && !r.text.contains("failed"), "{}", r.text);
    let w = nbd_support::qemu_io(&uri, &["write -P 7 0 4k"]);
    assert!(
        !w.ok || w.text.contains("failed") || w.text.contains("denied"),
        "a snapshot export is read-only: {}",
        w.text
    );
    drop(server);
    let r = fvd(d, &["serve", "-k", "x.sock", "-l", "nosuch", "img.fvd"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("not found"));
}
