//! Helpers shared by the workspace's integration tests; a dev-dependency
//! only.
//!
//! Tests that drive real peers (qemu-img, qemu-nbd, nbdkit, nginx, fio...)
//! skip, with a line saying why, where a tool is missing; `.ci/run`
//! installs them all, so in CI nothing is skipped. This is the one probe
//! for those tools.

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

/// True if every tool of `tools` is installed; otherwise prints which one
/// is missing (the calling test skips itself).
pub fn have_tools(tools: &[&str]) -> bool {
    match tools.iter().find(|t| find_tool(t).is_none()) {
        Some(t) => {
            eprintln!("SKIP: {t} is not installed; this test needs it");
            false
        }
        None => true,
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
        assert!(!have_tools(&["sh", "fvd-no-such-tool"]));
    }
}
