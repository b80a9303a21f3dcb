//! Helpers shared by the integration tests of the `fvd` binary.
#![allow(dead_code)]

use std::hash::Hasher;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

#[allow(unused_imports)]
pub use fvd_testkit::{have_tools, skip};

/// What a finished process printed and how it exited.
#[derive(Debug)]
pub struct Run {
    /// Exit status (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panic with everything printed unless the exit status is `code`.
    pub fn expect_code(&self, code: i32, what: &str) -> &Self {
        assert_eq!(
            self.code, code,
            "{what}: exit status {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Panic unless the command succeeded.
    pub fn ok(&self, what: &str) -> &Self {
        self.expect_code(0, what)
    }
}

fn finish(out: std::process::Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run `prog args` in `dir`.
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    finish(out)
}

/// Run the `fvd` binary in `dir`.
pub fn fvd(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, env!("CARGO_BIN_EXE_fvd"), args)
}

/// Run the `fvd` binary in `dir` with `input` on standard input.
pub fn fvd_with_input(dir: &Path, args: &[&str], input: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fvd"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fvd");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    finish(child.wait_with_output().expect("wait fvd"))
}

/// A hash of a file's whole content.
pub fn file_hash(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&bytes);
    h.write_usize(bytes.len());
    h.finish()
}

/// Parse a JSON document printed by a command.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// Data ranges `[start, end)` of a `map --output=json` answer (qemu-img's or
/// ours), adjacent ones merged.
pub fn data_ranges(map: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().expect("map is an array") {
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        if !e["data"].as_bool().expect("data") {
            continue;
        }
        match out.last_mut() {
            Some(r) if r.1 == start => r.1 += len,
            _ => out.push((start, start + len)),
        }
    }
    out
}

/// Run `args` in `dir` and check the failure contract against `file`.
pub fn fails_cleanly(dir: &Path, args: &[&str], file: &str, needle: &str) -> Run {
    let path = dir.join(file);
    let before = path.exists().then(|| file_hash(&path));
    let r = fvd(dir, args);
    assert_ne!(r.code, 0, "{args:?} succeeded\nstdout:\n{}", r.stdout);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: not one line on stderr:\n{}",
        r.stderr
    );
    assert!(lines[0].starts_with("fvd: "), "{args:?}: {}", lines[0]);
    assert!(
        lines[0].contains(file),
        "{args:?}: message does not name {file}: {}",
        lines[0]
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: message does not say '{needle}': {}",
        lines[0]
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let after = path.exists().then(|| file_hash(&path));
    assert_eq!(before, after, "{args:?} changed {file}");
    r
}
