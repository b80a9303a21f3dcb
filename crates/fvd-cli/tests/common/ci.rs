//! Skipping a test for want of a tool, or failing it under CI.
//!
//! A test that needs a tool (qemu-img, nbdkit, nginx, fio...), root or a
//! device returns early when it is missing, so a developer without the tool
//! still runs the rest. Under CI (`CI` set to anything but `0` or `false`;
//! `.ci/run` exports `CI=1` after installing every tool) a missing tool is
//! a failure instead: a green CI means every test ran.
//!
//! The one implementation, included by every test helper module (and by
//! fvd-remote's) with `#[path]`.
#![allow(dead_code)]

/// True when running under CI.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skip the calling test because of `why` (print it), or, under CI, fail.
pub fn skip(why: &str) {
    if under_ci() {
        panic!("{why} (CI is set: a missing tool fails the test; .ci/run installs them all)");
    }
    eprintln!("SKIP: {why}");
}
