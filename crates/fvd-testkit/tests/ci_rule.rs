//! The CI rule of [`fvd_testkit::skip`]: a missing tool skips a test for a
//! developer and fails it under CI.

use std::process::Command;

/// Run by the test below in a child process (with `FVD_CI_PROBE` set):
/// probes for a tool that does not exist.
#[test]
fn probe_child() {
    if std::env::var_os("FVD_CI_PROBE").is_none() {
        return;
    }
    assert!(!fvd_testkit::have_tools(&["fvd-no-such-tool"]));
}

fn run_probe(ci: Option<&str>) -> (bool, String) {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "probe_child", "--nocapture", "--test-threads=1"])
        .env("FVD_CI_PROBE", "1")
        .env_remove("CI");
    if let Some(v) = ci {
        c.env("CI", v);
    }
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_missing_tool_fails_under_ci_and_skips_otherwise() {
    let (ok, text) = run_probe(None);
    assert!(ok, "without CI a missing tool is a skip:\n{text}");
    assert!(
        text.contains("SKIP: fvd-no-such-tool is not installed"),
        "{text}"
    );
    for v in ["1", "true"] {
        let (ok, text) = run_probe(Some(v));
        assert!(!ok, "CI={v}: a missing tool must fail:\n{text}");
        assert!(text.contains("CI is set"), "{text}");
    }
    let (ok, text) = run_probe(Some("0"));
    assert!(ok, "CI=0 is not CI:\n{text}");
}
