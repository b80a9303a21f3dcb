//! One error type for the whole engine: a small, stable kind plus context.
//!
//! Every transport maps [`ErrorKind`] to its own vocabulary in one place
//! ([`Error::errno`] is the shared step), so NBD, FUSE and the CLI agree on
//! what a failure means.

use std::fmt;
use std::io;

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// An I/O error from the storage under the image or the base.
    Io,
    /// The bytes are not an FVD image (wrong magic, impossible geometry).
    InvalidImage,
    /// The image uses something this build does not implement.
    Unsupported,
    /// The image's metadata contradicts itself (bad CRC, record out of range).
    Corrupt,
    /// A request lies outside the virtual disk.
    OutOfRange,
    /// A named file (base image) does not exist.
    NotFound,
    /// The image is open read-write elsewhere.
    Busy,
    /// A write to an image opened read-only.
    ReadOnly,
    /// The storage ran out of space.
    NoSpace,
    /// A caller passed an argument that makes no sense (size not a multiple of 512...).
    InvalidArgument,
    /// An encrypted image was opened without its key, or with a key that
    /// opens none of its key slots.
    KeyRequired,
}

/// An engine error: kind, a human message and an optional underlying I/O error.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

/// Result alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O error with a description of what was being done.
    pub fn io(what: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::ReadOnly,
            _ => match err.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::StorageFull => ErrorKind::NoSpace,
                _ => ErrorKind::Io,
            },
        };
        Error {
            kind,
            message: what.into(),
            source: Some(err),
        }
    }

    /// Shorthand for [`ErrorKind::Corrupt`].
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    /// Shorthand for [`ErrorKind::InvalidImage`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, message)
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn arg(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the underlying cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefix the message with more context (a file name, an operation).
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }

    /// The POSIX errno this error stands for, for transports (NBD, FUSE).
    pub fn errno(&self) -> i32 {
        if let Some(code) = self.source.as_ref().and_then(|e| e.raw_os_error()) {
            return code;
        }
        match self.kind {
            ErrorKind::Io | ErrorKind::Corrupt | ErrorKind::InvalidImage => libc::EIO,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument => libc::EINVAL,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::ReadOnly => libc::EPERM,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::KeyRequired => libc::EACCES,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(src) => write!(f, "{}: {}", self.message, src),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::from_raw_os_error(e.errno())
    }
}
