//! Helpers shared by the workspace's integration tests; a dev-dependency
//! only.
//!
//! Tests that drive real peers (qemu-img, qemu-nbd, nbdkit, nginx, fio...)
//! or need root, a device (/dev/fuse, /dev/kvm, loop devices) or a file
//! system feature skip, with a line saying why, where it is missing — so a
//! developer without the tool still runs the rest. Under CI (`CI` set to
//! anything but `0` or `false`; `.ci/run` exports `CI=1` after installing
//! every tool) a missing tool, device or privilege fails the test instead:
//! a green CI means every test ran. [`skip`] is that rule, and
//! [`have_tools`] the one probe for tools; every skip site goes through
//! them.

use std::path::{Path, PathBuf};

/// Where the tool `name` is: the first executable of that name on `PATH`,
/// else in `/usr/sbin` or `/sbin` (nginx and losetup live there, outside a
/// normal user's `PATH`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when running under CI.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The calling test cannot run because of `why` (a missing tool, device or
/// privilege): print it (the test then returns early), or, under CI, fail.
pub fn skip(why: &str) {
    if under_ci() {
        panic!("{why} (CI is set: a missing tool fails the test; .ci/run installs them all)");
    }
    eprintln!("SKIP: {why}");
}

/// True if every tool of `tools` is installed; otherwise [`skip`]s naming
/// the one missing (the calling test returns early).
pub fn have_tools(tools: &[&str]) -> bool {
    match tools.iter().find(|t| find_tool(t).is_none()) {
        Some(t) => {
            skip(&format!("{t} is not installed; this test needs it"));
            false
        }
        None => true,
    }
}

/// Wait until `p` exists (a server's socket or pid file), at most 20 s;
/// panics naming the path if it never appears.
pub fn wait_path(p: &Path) {
    let t = std::time::Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_is_installed_and_only_that() {
        // `sh` is on every machine that runs these tests.
        let sh = find_tool("sh").expect("sh");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert!(have_tools(&["sh"]));
        assert!(find_tool("fvd-no-such-tool").is_none());
    }
}
