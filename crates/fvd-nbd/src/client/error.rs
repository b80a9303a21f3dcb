//! Why a request failed, and whether another try may help.
//!
//! A [`Failure`] is cheap to clone: when a connection dies, every request
//! in flight on it gets a copy of the reason. Socket errors are classified
//! by the caller's [`RetryPolicy`]; NBD-level faults are classified here:
//! a server shutting down (`NBD_ESHUTDOWN`) or a connection lost with
//! requests in flight is worth another try on a new connection, a broken
//! protocol or an error the server reports for a request is not.

use std::io;
use std::time::Duration;

use crate::proto::consts;

/// How a client retries a request whose connection failed (fvd-remote's
/// `Policy` implements it from its `FVD_REMOTE_*` settings).
pub trait RetryPolicy: Send + Sync + std::fmt::Debug {
    /// Tries of one request, the first included (at least 1).
    fn attempts(&self) -> u32;
    /// The pause after `failures` failed tries (`failures >= 1`).
    fn delay(&self, failures: u32) -> Duration;
    /// Whether a socket error (refused, reset, timed out...) is worth
    /// another try on a new connection.
    fn is_transient(&self, e: &io::Error) -> bool;
}

/// No retries: every failure is reported at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRetry;

impl RetryPolicy for NoRetry {
    fn attempts(&self) -> u32 {
        1
    }
    fn delay(&self, _failures: u32) -> Duration {
        Duration::ZERO
    }
    fn is_transient(&self, _e: &io::Error) -> bool {
        false
    }
}

/// How a failure is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// A socket error: the retry policy decides.
    Socket,
    /// Worth another try on a new connection.
    Transient,
    /// Trying again will not help.
    Permanent,
}

/// A failed request or connection.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: io::ErrorKind,
    pub(crate) class: Class,
    pub(crate) message: String,
}

impl Failure {
    /// A socket error while doing `what` (which names the target).
    pub(crate) fn io(what: &str, e: &io::Error) -> Failure {
        let detail = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_string(),
            io::ErrorKind::UnexpectedEof => "connection closed by the server".to_string(),
            _ => e.to_string(),
        };
        Failure {
            kind: e.kind(),
            class: Class::Socket,
            message: format!("{what}: {detail}"),
        }
    }

    /// The server broke the protocol: the connection cannot go on.
    pub(crate) fn protocol(target: &str, msg: impl std::fmt::Display) -> Failure {
        Failure {
            kind: io::ErrorKind::InvalidData,
            class: Class::Permanent,
            message: format!("{target}: NBD protocol error: {msg}"),
        }
    }

    /// A permanent failure of `kind`.
    pub(crate) fn permanent(kind: io::ErrorKind, message: String) -> Failure {
        Failure {
            kind,
            class: Class::Permanent,
            message,
        }
    }

    /// A transient failure.
    pub(crate) fn transient(kind: io::ErrorKind, message: String) -> Failure {
        Failure {
            kind,
            class: Class::Transient,
            message,
        }
    }

    /// The server answered `what` with the NBD error `code`.
    pub(crate) fn server(target: &str, what: &str, code: u32, message: &str) -> Failure {
        let text = format!(
            "{target}: {what} failed on the server: {}{}",
            nbd_error_name(code),
            if message.is_empty() {
                String::new()
            } else {
                format!(" ({message})")
            }
        );
        if code == consts::ESHUTDOWN {
            Failure::transient(io::ErrorKind::ConnectionAborted, text)
        } else {
            Failure::permanent(server_error_kind(code), text)
        }
    }

    /// Whether another try may help, by `policy` for socket errors.
    pub(crate) fn is_transient(&self, policy: &dyn RetryPolicy) -> bool {
        match self.class {
            Class::Transient => true,
            Class::Permanent => false,
            Class::Socket => policy.is_transient(&self.to_io()),
        }
    }

    /// Whether trying again cannot help, whatever the policy.
    pub(crate) fn is_permanent(&self) -> bool {
        self.class == Class::Permanent
    }

    /// As an `io::Error` (the message names the target).
    pub(crate) fn to_io(&self) -> io::Error {
        io::Error::new(self.kind, self.message.clone())
    }

    /// As an `io::Error` after `tries` tries.
    pub(crate) fn after_tries(&self, tries: u32) -> io::Error {
        if tries > 1 {
            io::Error::new(
                self.kind,
                format!("{} (gave up after {tries} tries)", self.message),
            )
        } else {
            self.to_io()
        }
    }
}

/// The `io::ErrorKind` an NBD error code reads as.
fn server_error_kind(code: u32) -> io::ErrorKind {
    match code {
        consts::EPERM => io::ErrorKind::PermissionDenied,
        consts::ENOMEM => io::ErrorKind::OutOfMemory,
        consts::EINVAL | consts::EOVERFLOW => io::ErrorKind::InvalidInput,
        consts::ENOSPC => io::ErrorKind::StorageFull,
        consts::ENOTSUP => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    }
}

/// The name and meaning of an NBD error code, for messages.
pub fn nbd_error_name(code: u32) -> String {
    match code {
        consts::EPERM => "EPERM (operation not permitted)".into(),
        consts::EIO => "EIO (input/output error)".into(),
        consts::ENOMEM => "ENOMEM (out of memory)".into(),
        consts::EINVAL => "EINVAL (invalid argument)".into(),
        consts::ENOSPC => "ENOSPC (no space left)".into(),
        consts::EOVERFLOW => "EOVERFLOW (value too large)".into(),
        consts::ENOTSUP => "ENOTSUP (not supported)".into(),
        consts::ESHUTDOWN => "ESHUTDOWN (server shutting down)".into(),
        other => format!("error {other}"),
    }
}

/// The meaning of an option error reply type, for messages.
pub fn option_error_name(code: u32) -> String {
    match code {
        consts::REP_ERR_UNSUP => "unsupported option".into(),
        consts::REP_ERR_POLICY => "forbidden by server policy".into(),
        consts::REP_ERR_INVALID => "invalid request".into(),
        consts::REP_ERR_PLATFORM => "not supported on this platform".into(),
        consts::REP_ERR_TLS_REQD => "TLS required".into(),
        consts::REP_ERR_UNKNOWN => "unknown export".into(),
        consts::REP_ERR_SHUTDOWN => "server shutting down".into(),
        consts::REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required".into(),
        consts::REP_ERR_TOO_BIG => "request too big".into(),
        consts::REP_ERR_EXT_HEADER_REQD => "extended headers required".into(),
        other => format!("error {other:#x}"),
    }
}
