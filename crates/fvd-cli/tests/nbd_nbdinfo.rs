//! `fvd serve` seen by libnbd's nbdinfo: advertised capabilities, block
//! sizes, protocol fallbacks, and the `base:allocation` and
//! `qemu:allocation-depth` maps against the engine's own block status.
//! Skipped (with a message) where nbdinfo or qemu-io is not installed.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod nbd_support;

use fvd_core::{Format, Source};
use nbd_support::*;

const MIB: u64 = 1 << 20;

/// `(offset, length, type)` lines of `nbdinfo --map[=CONTEXT]`.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u64)> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    let o = run("nbdinfo", &[&arg, uri]);
    assert!(o.ok, "{}", o.text);
    o.text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 3 {
                return None;
            }
            Some((f[0].parse().ok()?, f[1].parse().ok()?, f[2].parse().ok()?))
        })
        .collect()
}

fn can(uri: &str, what: &str) -> bool {
    let o = run("nbdinfo", &["--can", what, uri]);
    assert!(
        o.text.trim().is_empty() || !o.text.contains("nbdinfo:"),
        "{}",
        o.text
    );
    o.ok
}

#[test]
fn capabilities_match_what_is_advertised() {
    if missing(&["nbdinfo"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("a.fvd");
    create_fvd(&img, Some(64 * MIB), None);
    let sock = t.path().join("s.sock");

    let mut server = Server::unix(&img, &sock, &[]);
    let uri = server.uri();
    for what in [
        "connect",
        "flush",
        "fua",
        "trim",
        "zero",
        "cache",
        "multi-conn",
        "df",
        "fast-zero",
        "structured-reply",
    ] {
        assert!(can(&uri, what), "--can {what}");
    }
    let o = run("nbdinfo", &["--is", "read-only", &uri]);
    assert!(!o.ok, "writable export reported read-only");
    let o = run("nbdinfo", &["--json", &uri]);
    assert!(o.ok, "{}", o.text);
    let v: serde_json::Value = serde_json::from_str(&o.text).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(64 * MIB));
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1));
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 * MIB));
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(contexts, ["base:allocation", "qemu:allocation-depth"]);
    assert_eq!(v["protocol"].as_str(), Some("newstyle-fixed"));
    assert!(server.terminate().success());

    // Read-only: no write capability, still cache/multi-conn/df.
    let mut server = Server::unix(&img, &sock, &["--read-only", "--export-name", "ro"]);
    let uri = server.uri_named("ro");
    for what in ["flush", "fua", "trim", "zero", "fast-zero"] {
        assert!(!can(&uri, what), "read-only export: --can {what}");
    }
    for what in ["cache", "multi-conn", "df"] {
        assert!(can(&uri, what), "read-only export: --can {what}");
    }
    assert!(run("nbdinfo", &["--is", "read-only", &uri]).ok);
    let o = run("nbdinfo", &["--list", &server.uri()]);
    assert!(o.ok && o.text.contains("export=\"ro\""), "{}", o.text);
    assert!(server.terminate().success());

    // Without structured replies: simple packets, no DF, no contexts.
    let mut server = Server::unix(&img, &sock, &["--no-structured-replies"]);
    let uri = server.uri();
    let o = run("nbdinfo", &[&uri]);
    assert!(
        o.ok && o.text.contains("using simple packets"),
        "{}",
        o.text
    );
    assert!(!can(&uri, "df"));
    assert!(!can(&uri, "structured-reply"));
    assert!(can(&uri, "flush"));
    assert!(server.terminate().success());

    // --cache=none asks for 512-byte blocks.
    let mut server = Server::unix(&img, &sock, &["--cache=none"]);
    let o = run("nbdinfo", &["--json", &server.uri()]);
    let v: serde_json::Value = serde_json::from_str(&o.text).unwrap();
    assert_eq!(v["exports"][0]["block_size_minimum"].as_u64(), Some(512));
    assert!(server.terminate().success());
}

#[test]
fn maps_match_the_engine() {
    if missing(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = d.join("base.raw");
    create_raw(&base, 16 * MIB, &[(0, 2 * MIB), (6 * MIB, 2 * MIB)]);
    let img = d.join("a.fvd");
    create_fvd(&img, Some(32 * MIB), Some(("base.raw", Format::Raw)));
    let sock = d.join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);
    let uri = server.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x41 1M 64k",
            "write -P 0x42 4M 8k",
            "write -z 6M 1M",
            "discard 7M 4k",
            "write -P 0x43 20M 2M",
            "flush",
        ],
    );
    let extents = engine_extents(&img, Format::Fvd);

    // base:allocation: hole+zero (3) exactly where the engine reads zeros.
    let map = nbdinfo_map(&uri, None);
    let got = merge_runs(map.iter().map(|&(o, l, ty)| {
        assert!(ty == 0 || ty == 3, "type {ty}");
        (o, l, ty == 3)
    }));
    assert_eq!(got, zero_runs(&extents));

    // qemu:allocation-depth: 1 for data in the image, 2 for the base.
    let depth = nbdinfo_map(&uri, Some("qemu:allocation-depth"));
    let got: Vec<(u64, u64, u64)> = {
        let mut v: Vec<(u64, u64, u64)> = Vec::new();
        for (o, l, ty) in depth {
            match v.last_mut() {
                Some(last) if last.2 == ty && last.0 + last.1 == o => last.1 += l,
                _ => v.push((o, l, ty)),
            }
        }
        v
    };
    let mut want: Vec<(u64, u64, u64)> = Vec::new();
    for e in &extents {
        let ty = match e.source {
            Source::Image => 1,
            Source::Base => 2,
        };
        match want.last_mut() {
            Some(last) if last.2 == ty => last.1 += e.length,
            _ => want.push((e.start, e.length, ty)),
        }
    }
    assert_eq!(got, want);
    assert!(want.iter().any(|w| w.2 == 2) && want.iter().any(|w| w.2 == 1));

    assert!(server.terminate().success());
    let report =
        fvd_core::executor::block_on(fvd_core::check::check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(report.exit_code(), 0, "{report:?}");
}
