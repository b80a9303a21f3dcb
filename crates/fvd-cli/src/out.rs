//! Standard output that never panics.
//!
//! `println!` panics when a write fails: a reader that went away (`fvd map
//! img | head`) or a full disk (`>/dev/full`). Every command prints through
//! [`outln!`] / [`out!`] instead. The first failed write is remembered and
//! later output is dropped, so the command still finishes its work (and
//! closes its image cleanly); `main` then exits quietly when the reader went
//! away (as qemu-img does) and with one error line for any other failure.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// The first error of a write to standard output, if any.
static FAILED: Mutex<Option<io::Error>> = Mutex::new(None);

fn failed() -> std::sync::MutexGuard<'static, Option<io::Error>> {
    FAILED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Write `args` to standard output (nothing once a write has failed).
pub fn write(args: fmt::Arguments<'_>) {
    let mut f = failed();
    if f.is_some() {
        return;
    }
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        *f = Some(e);
    }
}

/// Write raw bytes to standard output (nothing once a write has failed).
pub fn write_bytes(bytes: &[u8]) {
    let mut f = failed();
    if f.is_some() {
        return;
    }
    if let Err(e) = io::stdout().lock().write_all(bytes) {
        *f = Some(e);
    }
}

/// Flush standard output; a failure is remembered like a failed write.
pub fn flush() {
    let mut f = failed();
    if f.is_some() {
        return;
    }
    if let Err(e) = io::stdout().lock().flush() {
        *f = Some(e);
    }
}

/// After the command: flush, and say how output went. `Ok` when everything
/// was written or the reader went away (EPIPE: a quiet end, as with
/// `qemu-img map | head`); otherwise the error to report.
pub fn finish() -> Result<(), String> {
    flush();
    match &*failed() {
        None => Ok(()),
        Some(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Some(e) => Err(format!("cannot write to standard output: {e}")),
    }
}

/// `println!` that never panics (see the module documentation).
macro_rules! outln {
    () => {
        crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that never panics (see the module documentation).
macro_rules! out {
    ($($arg:tt)*) => {
        crate::out::write(format_args!($($arg)*))
    };
}
