//! `bench/prefetch.py --smoke`: the remote-base benchmark runs end to end on
//! a 32 MiB base behind real servers (nbdkit with rate, delay and log
//! filters; qemu-storage-daemon; fio; qemu-io) and what it measures holds:
//! FVD fetches each byte read once and nothing on the second pass, qcow2's
//! clusters make it fetch more for random reads, prefetch leaves the image
//! all-local, and the trace replay ran in every mode. Skipped with a note
//! when a tool is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/prefetch.py")
}

#[test]
fn prefetch_benchmark_smoke_run() {
    if !fvd_testkit::have_tools(&[
        "python3",
        "nbdkit",
        "fio",
        "qemu-io",
        "qemu-img",
        "qemu-storage-daemon",
        "setpriv",
    ]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let work = tmp.path().join("work");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&work).expect("mkdir");
    let mut child = Command::new("python3")
        .arg(script())
        .args(["--smoke", "--fvd", env!("CARGO_BIN_EXE_fvd")])
        .arg("--workdir")
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bench/prefetch.py");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(240) {
            // SAFETY: plain kill(2) on our own child; SIGTERM lets it clean up.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench/prefetch.py failed:\n{stderr}");

    let json = std::fs::read_dir(&out)
        .expect("results dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a results .json");
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("read json")).expect("parse json");
    let r = &doc["results"];
    let size = 32u64 << 20;

    let rows = r["a"].as_array().expect("part a rows");
    assert_eq!(rows.len(), 6, "two cases x three systems");
    for row in rows {
        let sys = row["system"].as_str().unwrap();
        let case = row["case"].as_str().unwrap();
        let p1 = row["pass1"]["fetched"].as_u64().unwrap();
        let p2 = row["pass2"]["fetched"].as_u64().unwrap();
        let unique = row["unique"].as_u64().unwrap();
        assert!(
            unique > 0 && p1 >= unique,
            "{sys} / {case}: fetched {p1} < unique {unique}"
        );
        assert_eq!(p2, 0, "{sys} / {case}: the second pass fetched {p2} bytes");
        if sys.starts_with("FVD") {
            assert_eq!(p1, unique, "FVD / {case}: fetched {p1}, unique {unique}");
            let stats = &row["fvd-stats"];
            assert_eq!(stats["base-bytes-read"].as_u64(), Some(p1), "{stats}");
        }
        if sys.starts_with("qcow2") && case.contains("random") {
            assert!(
                p1 > 4 * unique,
                "qcow2 fetches whole 64 KiB clusters: {p1} vs {unique}"
            );
        }
    }

    let b = &r["b"];
    assert_eq!(b["all_local"], serde_json::Value::Bool(true), "{b}");
    assert_eq!(
        b["fetched"].as_u64(),
        Some(size),
        "prefetch reads each byte once: {b}"
    );

    let c = r["c"]["runs"].as_array().expect("part c runs");
    assert!(c.iter().any(|x| x["mode"] == "off"));
    assert!(
        c.iter()
            .any(|x| x["mode"] == "adaptive" && x["prefetched"].as_u64().unwrap() > 0)
    );
    // Once the guest went idle, prefetch finished.
    assert!(
        c.iter()
            .filter(|x| x["mode"] == "adaptive")
            .all(|x| x["done_state"] == "done"),
        "{c:?}"
    );

    let d = r["d"]["runs"].as_array().expect("part d runs");
    for mode in ["off", "adaptive", "profile"] {
        let x = d.iter().find(|x| x["mode"] == mode).expect(mode);
        assert!(x["seconds"].as_f64().unwrap() > 0.0);
        if mode != "off" {
            assert!(x["prefetched"].as_u64().unwrap() > 0, "{mode}: {x}");
        }
    }
    assert!(r["d"]["record_fetched"].as_u64().unwrap() > 0);

    let left: Vec<_> = std::fs::read_dir(&work)
        .expect("workdir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the harness left {left:?}");
}
