//! `fvd snapshot` and `-l` on bad input: one line on standard error, a
//! non-zero exit, and the image unchanged.

mod common;

use common::{file_hash, fvd};

#[test]
fn bad_snapshot_requests_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fvd(d, &["create", "-o", "compact=on", "c.fvd", "8M"]).ok("create");
    fvd(d, &["io", "-c", "write -P 3 0 1M", "c.fvd"]).ok("io");
    fvd(d, &["snapshot", "-c", "s", "c.fvd"]).ok("snapshot");
    fvd(d, &["create", "sparse.fvd", "8M"]).ok("create");
    let before = (
        file_hash(&d.join("c.fvd")),
        file_hash(&d.join("sparse.fvd")),
    );
    let cases: &[(&[&str], &str)] = &[
        (&["snapshot", "-c", "x", "nosuch.fvd"], "nosuch.fvd"),
        (
            &["snapshot", "-c", "x", "sparse.fvd"],
            "fvd convert -o compact=on",
        ),
        (&["snapshot", "-d", "nosuch", "c.fvd"], "not found"),
        (&["snapshot", "-a", "nosuch", "c.fvd"], "not found"),
        (&["snapshot", "-c", "", "c.fvd"], "empty"),
        (&["snapshot", "-f", "raw", "-l", "c.fvd"], "fvd image"),
        (
            &["snapshot", "-c", "a", "-d", "b", "c.fvd"],
            "cannot be used with",
        ),
        (&["snapshot", "-l"], "image is required"),
        (&["snapshot", "-l", "--server", "no.sock"], "no.sock"),
        (
            &[
                "convert",
                "-l",
                "snapshot.name=nosuch",
                "-O",
                "raw",
                "c.fvd",
                "o.raw",
            ],
            "not found",
        ),
        (
            &[
                "convert",
                "-l",
                "snapshot.id=1,snapshot.x=2",
                "-O",
                "raw",
                "c.fvd",
                "o.raw",
            ],
            "snapshot.x",
        ),
        (
            &[
                "convert", "-l", "s", "-f", "raw", "-O", "raw", "c.fvd", "o.raw",
            ],
            "fvd source",
        ),
    ];
    for (args, want) in cases {
        let r = fvd(d, args);
        assert_ne!(r.code, 0, "{args:?} succeeded");
        let err = r.stderr.trim_end();
        assert!(!err.contains('\n'), "{args:?}: more than one line: {err}");
        assert!(err.starts_with("fvd: "), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: '{want}' not in: {err}");
    }
    assert!(!d.join("o.raw").exists(), "a failed convert leaves no file");
    assert_eq!(
        before,
        (
            file_hash(&d.join("c.fvd")),
            file_hash(&d.join("sparse.fvd"))
        )
    );
    // The documented way from the sparse layout: a compact copy.
    fvd(
        d,
        &["convert", "-o", "compact=on", "sparse.fvd", "compact.fvd"],
    )
    .ok("convert");
    fvd(d, &["snapshot", "-c", "x", "compact.fvd"]).ok("snapshot of the copy");
    // -l with an id, a name, both, or a bare id or name.
    let params = [
        "snapshot.id=1",
        "snapshot.name=s",
        "snapshot.id=1,snapshot.name=s",
        "1",
        "s",
    ];
    for (i, param) in params.into_iter().enumerate() {
        let out = format!("l{i}.raw");
        fvd(d, &["convert", "-l", param, "-O", "raw", "c.fvd", &out]).ok(param);
        let b = std::fs::read(d.join(&out)).unwrap();
        assert!(b[..1 << 20].iter().all(|&x| x == 3), "{param}");
    }
    let r = fvd(
        d,
        &[
            "convert",
            "-l",
            "snapshot.id=2,snapshot.name=s",
            "-O",
            "raw",
            "c.fvd",
            "n.raw",
        ],
    );
    assert_ne!(r.code, 0, "id and name must both match");
}
