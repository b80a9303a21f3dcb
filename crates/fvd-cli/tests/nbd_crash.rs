//! Durability through `fvd serve`: kill -9 the server during a qemu-io
//! write load (copy-on-write writes over a raw base, with flushes), at
//! several points; after each kill the image must open (replaying its
//! journal), show no corruption, and hold every write whose flush had
//! completed. Skipped (with a message) where qemu-io is not installed.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod nbd_support;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use fvd_core::Format;
use fvd_core::check::{Repair, check_path};
use fvd_core::executor::block_on;
use nbd_support::*;

const MIB: u64 = 1 << 20;
const REGION: u64 = 16 * MIB;
const SLOT: u64 = 8192;
/// Each write covers [slot + HEAD, slot + HEAD + LEN): partial 4 KiB blocks
/// at both ends, so copy-on-write merges base data around it.
const HEAD: u64 = 1024;
const LEN: u64 = 6144;
const PER_ROUND: u64 = 8;
const ROUNDS: u64 = 150;

fn slot_offset(iter: u64, slot: u64) -> u64 {
    iter * REGION + slot * SLOT
}

fn pattern(slot: u64) -> u8 {
    (slot % 251) as u8 + 2
}

/// qemu-io commands of one iteration: rounds of writes, each round ended
/// by a flush and a marker read of `512 * (round + 1)` bytes whose output
/// line proves the flush before it completed.
fn commands(iter: u64) -> Vec<String> {
    let mut cmds = Vec::new();
    for r in 0..ROUNDS {
        for j in 0..PER_ROUND {
            let s = r * PER_ROUND + j;
            cmds.push(format!(
                "write -P {} {} {}",
                pattern(s),
                slot_offset(iter, s) + HEAD,
                LEN
            ));
        }
        cmds.push("flush".into());
        cmds.push(format!("read 0 {}", 512 * (r + 1)));
    }
    cmds
}

/// The last round whose marker appeared in qemu-io's output.
fn last_flushed_round(output: &str) -> Option<u64> {
    output
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("read ")?;
            let (n, tail) = rest.split_once('/')?;
            if !tail.ends_with("bytes at offset 0") {
                return None;
            }
            Some(n.parse::<u64>().ok()? / 512 - 1)
        })
        .max()
}

#[test]
fn kill_9_during_writes_keeps_flushed_data() {
    if missing(&["qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let size = 4 * REGION;
    let base = d.join("base.raw");
    create_raw(&base, size, &[(0, size)]);
    let img = d.join("a.fvd");
    create_fvd(&img, Some(size), Some(("base.raw", Format::Raw)));
    let sock = d.join("s.sock");
    let mut flushed: Vec<Option<u64>> = Vec::new();

    // Kill points: a little after the marker of these rounds shows up
    // (stdbuf makes qemu-io's output line-buffered so we can watch it).
    let line_buffered = have("stdbuf");
    for (iter, target) in [5u64, 30, 70, 110].into_iter().enumerate() {
        let iter = iter as u64;
        let mut server = Server::unix(&img, &sock, &[]);
        let mut args: Vec<String> = Vec::new();
        if line_buffered {
            args.extend(["-oL".into(), "qemu-io".into()]);
        }
        args.extend(["-f".into(), "raw".into()]);
        for c in commands(iter) {
            args.push("-c".into());
            args.push(c);
        }
        args.push(server.uri());
        let prog = if line_buffered { "stdbuf" } else { "qemu-io" };
        let mut client = Command::new(prog)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = client.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                all.push_str(&line);
                all.push('\n');
                let _ = tx.send(line);
            }
            all
        });
        if line_buffered {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(l) if last_flushed_round(&l).is_some_and(|r| r >= target) => break,
                    Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => break,
                }
            }
            std::thread::sleep(Duration::from_millis(2 * iter + 1));
        } else {
            std::thread::sleep(Duration::from_millis(200 + 250 * iter));
        }
        server.kill9();
        let out = reader.join().unwrap();
        let _ = client.wait();
        let last = last_flushed_round(&out);
        eprintln!("iteration {iter}: killed after round {target}, last flushed round {last:?}");
        flushed.push(last);

        // The crashed image: a dirty journal, maybe leaks, no corruption.
        let report = block_on(check_path(&img, Format::Fvd, None)).unwrap();
        assert!(report.corruptions.is_empty(), "{report:?}");

        // Restart: the journal is replayed; every flushed write is there.
        let mut server = Server::unix(&img, &sock, &[]);
        if let Some(r) = last {
            let cmds: Vec<String> = (0..(r + 1) * PER_ROUND)
                .map(|s| {
                    format!(
                        "read -P {} {} {}",
                        pattern(s),
                        slot_offset(iter, s) + HEAD,
                        LEN
                    )
                })
                .collect();
            let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
            let o = qemu_io_opts(&["-f", "raw", "-r"], &server.uri(), &refs);
            assert!(
                o.ok && !o.text.contains("failed"),
                "iteration {iter}: flushed writes lost:\n{}",
                o.text
            );
        }
        assert!(server.terminate().success(), "{}", server.log());
    }
    assert!(
        flushed.iter().any(|f| f.is_some_and(|r| r + 1 < ROUNDS)),
        "no kill landed in the middle of the load: {flushed:?}"
    );

    // Byte-exact check through the engine: around every write the base
    // data is intact; flushed writes hold their pattern; unflushed ones hold
    // either their pattern or the base, never a mix.
    let content = engine_content(&img, Format::Fvd);
    for (iter, last) in flushed.iter().enumerate() {
        let iter = iter as u64;
        for s in 0..ROUNDS * PER_ROUND {
            let o = slot_offset(iter, s);
            let at = |a: u64, b: u64| &content[a as usize..b as usize];
            let base_of = |a: u64, b: u64| (a..b).map(base_byte).collect::<Vec<u8>>();
            assert_eq!(at(o, o + HEAD), base_of(o, o + HEAD), "head of slot {s}");
            assert_eq!(
                at(o + HEAD + LEN, o + SLOT),
                base_of(o + HEAD + LEN, o + SLOT),
                "tail of slot {s}"
            );
            let data = at(o + HEAD, o + HEAD + LEN);
            let pat = vec![pattern(s); LEN as usize];
            let is_flushed = last.is_some_and(|r| s / PER_ROUND <= r);
            if is_flushed {
                assert_eq!(data, &pat[..], "iteration {iter} slot {s}");
            } else {
                assert!(
                    data == &pat[..] || data == base_of(o + HEAD, o + HEAD + LEN),
                    "iteration {iter} slot {s}: torn unflushed write"
                );
            }
        }
    }

    // After the clean shutdowns the image is clean; copy-on-write data
    // whose journal record died with the process may remain as leaks
    // (harmless, like qemu-img's), which repair removes.
    let report = block_on(check_path(&img, Format::Fvd, None)).unwrap();
    assert!(report.corruptions.is_empty(), "{report:?}");
    assert!(report.clean, "{report:?}");
    assert!(matches!(report.exit_code(), 0 | 3), "{report:?}");
    if report.exit_code() == 3 {
        eprintln!(
            "leaks after kill -9: {} bytes; repairing",
            report.leaked_bytes
        );
        block_on(check_path(&img, Format::Fvd, Some(Repair::Leaks))).unwrap();
        let report = block_on(check_path(&img, Format::Fvd, None)).unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?}");
    }
    assert_eq!(engine_content(&img, Format::Fvd), content);
}
