//! qemu-img as the oracle of internal snapshots: the same random log of
//! writes, zeroings, discards and snapshot creates, applies and deletes is
//! replayed on a qcow2 image (qemu-io, `qemu-img snapshot`) and on a
//! compact FVD image (`fvd io`, `fvd snapshot`); then every snapshot is
//! converted out by both tools (`convert -l snapshot.name=S -O raw`) and
//! compared byte for byte, as are the live disks and the snapshot lists
//! (ids and names). With and without a base, with chunks of 64 KiB and of
//! 1 MiB. Skipped where QEMU's tools are missing.

mod common;

use std::path::Path;

use common::{fvd, run_in};
use fvd_testkit::have_tools;

const SIZE: u64 = 24 << 20;

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One step of the log.
enum Step {
    /// qemu-io commands for both images.
    Io(String),
    Create(String),
    Apply(String),
    Delete(String),
}

fn log(seed: u64) -> Vec<Step> {
    let mut r = Rng(seed | 1);
    let mut names: Vec<String> = Vec::new();
    let mut next = 0;
    let mut out = Vec::new();
    for _ in 0..36 {
        match r.below(12) {
            0..=5 => {
                let unit = [512u64, 4096, 65536][r.below(3) as usize];
                let off = r.below(SIZE / unit) * unit;
                let len = ((r.below(40) + 1) * unit).min(SIZE - off);
                out.push(Step::Io(format!(
                    "write -P {} {off} {len}",
                    r.below(254) + 1
                )));
            }
            6 => {
                let off = r.below(SIZE / 4096) * 4096;
                let len = ((r.below(64) + 1) * 4096).min(SIZE - off);
                out.push(Step::Io(format!("write -z {off} {len}")));
            }
            7 => {
                // qcow2 ignores discards of partial clusters: whole ones only.
                let off = r.below(SIZE / 65536) * 65536;
                let len = ((r.below(24) + 1) * 65536).min(SIZE - off);
                out.push(Step::Io(format!("discard {off} {len}")));
            }
            8 | 9 => {
                let name = format!("snap{next}");
                next += 1;
                names.push(name.clone());
                out.push(Step::Create(name));
            }
            10 if !names.is_empty() => {
                let n = names[r.below(names.len() as u64) as usize].clone();
                out.push(Step::Apply(n));
            }
            11 if !names.is_empty() => {
                let n = names.remove(r.below(names.len() as u64) as usize);
                out.push(Step::Delete(n));
            }
            _ => {}
        }
    }
    out
}

/// The ID and TAG columns of a `snapshot -l` listing.
fn ids_and_tags(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .skip(2)
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap_or("").into(), w.next().unwrap_or("").into())
        })
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// Returns the number of snapshots compared.
fn replay(seed: u64, chunk: &str, with_base: bool) -> usize {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let what = format!("seed {seed}, chunk {chunk}, base {with_base}");
    let mut q_create = vec!["create", "-f", "qcow2", "-o", "cluster_size=64k"];
    let mut f_create = vec!["create", "-o"];
    let fopts = format!("compact=on,chunk_size={chunk}");
    f_create.push(&fopts);
    if with_base {
        let mut r = Rng(seed ^ 0xba5e);
        let base: Vec<u8> = (0..SIZE * 3 / 4 + 1536).map(|_| r.next() as u8).collect();
        std::fs::write(d.join("base.raw"), base).unwrap();
        q_create.extend(["-b", "base.raw", "-F", "raw"]);
        f_create.extend(["-b", "base.raw", "-F", "raw"]);
    }
    let size = SIZE.to_string();
    q_create.extend(["q.qcow2", &size]);
    f_create.extend(["f.fvd", &size]);
    run_in(d, "qemu-img", &q_create).ok("qemu-img create");
    fvd(d, &f_create).ok("fvd create");
    for (i, step) in log(seed).into_iter().enumerate() {
        let ctx = format!("{what}, step {i}");
        match step {
            Step::Io(c) => {
                run_in(d, "qemu-io", &["-f", "qcow2", "-c", &c, "q.qcow2"]).ok(&ctx);
                fvd(d, &["io", "-c", &c, "f.fvd"]).ok(&ctx);
            }
            Step::Create(n) => {
                run_in(d, "qemu-img", &["snapshot", "-c", &n, "q.qcow2"]).ok(&ctx);
                fvd(d, &["snapshot", "-c", &n, "f.fvd"]).ok(&ctx);
            }
            Step::Apply(n) => {
                run_in(d, "qemu-img", &["snapshot", "-a", &n, "q.qcow2"]).ok(&ctx);
                fvd(d, &["snapshot", "-a", &n, "f.fvd"]).ok(&ctx);
            }
            Step::Delete(n) => {
                run_in(d, "qemu-img", &["snapshot", "-d", &n, "q.qcow2"]).ok(&ctx);
                fvd(d, &["snapshot", "-d", &n, "f.fvd"]).ok(&ctx);
            }
        }
    }
    let ql = run_in(d, "qemu-img", &["snapshot", "-l", "q.qcow2"]);
    let fl = fvd(d, &["snapshot", "-l", "f.fvd"]);
    ql.ok(&what);
    fl.ok(&what);
    let list = ids_and_tags(&ql.stdout);
    assert_eq!(list, ids_and_tags(&fl.stdout), "{what}: snapshot lists");
    for (id, name) in &list {
        for (param, tag) in [
            (format!("snapshot.name={name}"), "n"),
            (format!("snapshot.id={id}"), "i"),
        ] {
            let (qo, fo) = (format!("q-{id}{tag}.raw"), format!("f-{id}{tag}.raw"));
            run_in(
                d,
                "qemu-img",
                &["convert", "-l", &param, "-O", "raw", "q.qcow2", &qo],
            )
            .ok(&what);
            fvd(d, &["convert", "-l", &param, "-O", "raw", "f.fvd", &fo]).ok(&what);
            assert!(
                same_file(&d.join(&qo), &d.join(&fo)),
                "{what}: snapshot {id} '{name}' ({param}) differs from qemu-img's"
            );
        }
    }
    run_in(d, "qemu-img", &["convert", "-O", "raw", "q.qcow2", "q.raw"]).ok(&what);
    fvd(d, &["convert", "-O", "raw", "f.fvd", "f.raw"]).ok(&what);
    assert!(
        same_file(&d.join("q.raw"), &d.join("f.raw")),
        "{what}: live disks differ"
    );
    let c = fvd(d, &["check", "f.fvd"]);
    c.ok(&what);
    list.len()
}

#[test]
fn snapshots_match_qemu_img_without_base() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let n: usize = (1..=3).map(|s| replay(s, "64k", false)).sum::<usize>() + replay(4, "1M", false);
    assert!(n >= 4, "only {n} snapshots compared");
}

#[test]
fn snapshots_match_qemu_img_with_base() {
    if !have_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let n: usize =
        (11..=13).map(|s| replay(s, "64k", true)).sum::<usize>() + replay(14, "1M", true);
    assert!(n >= 4, "only {n} snapshots compared");
}

#[test]
fn info_json_lists_snapshots_with_qemu_img_keys() {
    if !have_tools(&["qemu-img"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    run_in(d, "qemu-img", &["create", "-f", "qcow2", "q.qcow2", "1M"]).ok("create");
    run_in(d, "qemu-img", &["snapshot", "-c", "one", "q.qcow2"]).ok("snapshot");
    fvd(d, &["create", "-o", "compact=on", "f.fvd", "1M"]).ok("create");
    fvd(d, &["snapshot", "-c", "one", "f.fvd"]).ok("snapshot");
    let q = common::json(&run_in(d, "qemu-img", &["info", "--output=json", "q.qcow2"]).stdout);
    let f = common::json(&fvd(d, &["info", "--output=json", "f.fvd"]).stdout);
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v["snapshots"][0]
            .as_object()
            .expect("a snapshot")
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&q), keys(&f));
    assert_eq!(q["snapshots"][0]["id"], f["snapshots"][0]["id"]);
    assert_eq!(q["snapshots"][0]["name"], f["snapshots"][0]["name"]);
    // The text listing has qemu-img's columns, character for character
    // apart from the date.
    let ql = run_in(d, "qemu-img", &["snapshot", "-l", "q.qcow2"]).stdout;
    let fl = fvd(d, &["snapshot", "-l", "f.fvd"]).stdout;
    let blank_date = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                let mut b = l.to_string();
                if l.len() == 80 && l.as_bytes()[38] == b'-' {
                    b.replace_range(34..53, "DATE");
                }
                b
            })
            .collect()
    };
    assert_eq!(blank_date(&ql), blank_date(&fl));
    // No snapshots: no listing, and no key.
    fvd(d, &["snapshot", "-d", "one", "f.fvd"]).ok("delete");
    assert_eq!(fvd(d, &["snapshot", "-l", "f.fvd"]).stdout, "");
    let f = common::json(&fvd(d, &["info", "--output=json", "f.fvd"]).stdout);
    assert!(f.get("snapshots").is_none());
}
