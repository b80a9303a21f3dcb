//! Decoding and encoding errors, and the mapping from host `errno`
//! values to NBD error codes.

use crate::proto::consts;

/// Error returned when bytes received from the peer do not form a valid
/// protocol message.
///
/// During option haggling, a [`DecodeError`] for a known option is
/// answered with the reply type given by [`DecodeError::option_reply_type`]
/// (normally `NBD_REP_ERR_INVALID`); errors in fixed-size framing
/// (magic numbers, client flags, transmission request headers) mean the
/// peer is not speaking the protocol and the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A magic number did not have the expected value.
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// The magic number the protocol requires here.
        expected: u64,
        /// The value actually received.
        found: u64,
    },
    /// The buffer is shorter than the fixed-size structure being decoded.
    #[error("truncated message: need {need} bytes, have {have}")]
    Truncated {
        /// Number of bytes required.
        need: usize,
        /// Number of bytes available.
        have: usize,
    },
    /// A length exceeds a protocol or implementation limit.
    #[error("{what} too long: {len} bytes (maximum {max})")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// The offending length.
        len: u64,
        /// The maximum permitted.
        max: u64,
    },
    /// A length field disagrees with the number of bytes present.
    #[error("{what}: length mismatch (expected {expected}, found {found})")]
    LengthMismatch {
        /// What was being decoded.
        what: &'static str,
        /// Length implied by the message structure.
        expected: u64,
        /// Length actually present or announced.
        found: u64,
    },
    /// A protocol string was not valid UTF-8.
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which string.
        what: &'static str,
    },
    /// A protocol string contained a NUL character, which the spec forbids.
    #[error("{what} contains a NUL character")]
    ContainsNul {
        /// Which string.
        what: &'static str,
    },
    /// The payload of a known option is malformed; the server answers with
    /// `NBD_REP_ERR_INVALID`.
    #[error("invalid payload for option {code}: {reason}")]
    InvalidOption {
        /// The option code.
        code: u32,
        /// Human-readable reason.
        reason: &'static str,
    },
    /// The client set flag bits that the spec does not define.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The client set a known flag that the server did not advertise.
    #[error("client flags {0:#x} were not advertised by the server")]
    UnadvertisedClientFlags(u32),
    /// An option reply from the server is malformed.
    #[error("invalid option reply type {reply_type:#x}: {reason}")]
    InvalidOptionReply {
        /// The reply type.
        reply_type: u32,
        /// Human-readable reason.
        reason: &'static str,
    },
    /// A structured or extended reply chunk is malformed.
    #[error("invalid reply chunk type {reply_type}: {reason}")]
    InvalidChunk {
        /// The chunk type.
        reply_type: u16,
        /// Human-readable reason.
        reason: &'static str,
    },
    /// A reply chunk has a type that is unknown and not an error type; the
    /// client must initiate a hard disconnect.
    #[error("unknown non-error reply chunk type {0}")]
    UnknownChunkType(u16),
    /// A block status request payload (`NBD_CMD_FLAG_PAYLOAD_LEN`) is
    /// malformed.
    #[error("invalid block status payload: {0}")]
    InvalidBlockStatusPayload(&'static str),
}

impl DecodeError {
    /// The option reply type a server should send when decoding an option
    /// payload failed: `NBD_REP_ERR_TOO_BIG` for over-long payloads and
    /// strings, `NBD_REP_ERR_INVALID` for everything else.
    pub fn option_reply_type(&self) -> u32 {
        match self {
            DecodeError::TooLong { .. } => consts::REP_ERR_TOO_BIG,
            _ => consts::REP_ERR_INVALID,
        }
    }
}

impl From<DecodeError> for std::io::Error {
    fn from(e: DecodeError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Error returned by encoders when the arguments cannot be represented as a
/// valid protocol message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A value is too large for its field or exceeds a protocol limit.
    #[error("{what} too long: {len} (maximum {max})")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// The offending length.
        len: u64,
        /// The maximum permitted.
        max: u64,
    },
    /// The arguments violate a protocol rule.
    #[error("invalid message: {0}")]
    Invalid(&'static str),
    /// The caller-provided output buffer is too small.
    #[error("output buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes required.
        need: usize,
        /// Bytes available.
        have: usize,
    },
}

impl From<EncodeError> for std::io::Error {
    fn from(e: EncodeError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// Host errno values used by [`nbd_error_from_errno`] (Linux numbering).
#[cfg(any(target_os = "linux", target_os = "android"))]
mod host {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOVERFLOW: i32 = 75;
    /// `ENOTSUP`, which Linux defines equal to `EOPNOTSUPP`.
    pub const ENOTSUP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

/// Maps a host `errno` value to the NBD error code to put on the wire.
///
/// `EPERM`, `EACCES` and `EROFS` map to `NBD_EPERM`; `EIO` to `NBD_EIO`;
/// `ENOMEM` to `NBD_ENOMEM`; `EINVAL` to `NBD_EINVAL`; `ENOSPC`, `EDQUOT`
/// and `EFBIG` to `NBD_ENOSPC`; `EOVERFLOW` to `NBD_EOVERFLOW`;
/// `ENOTSUP`/`EOPNOTSUPP` to `NBD_ENOTSUP`; `ESHUTDOWN` to `NBD_ESHUTDOWN`;
/// anything else (including 0 and negative values) to `NBD_EIO`.
///
/// On Linux the numbering is matched directly; on other platforms the
/// value is classified through [`std::io::ErrorKind`].
pub fn nbd_error_from_errno(errno: i32) -> u32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        match errno {
            host::EPERM | host::EACCES | host::EROFS => consts::EPERM,
            host::EIO => consts::EIO,
            host::ENOMEM => consts::ENOMEM,
            host::EINVAL => consts::EINVAL,
            host::ENOSPC | host::EDQUOT | host::EFBIG => consts::ENOSPC,
            host::EOVERFLOW => consts::EOVERFLOW,
            host::ENOTSUP => consts::ENOTSUP,
            host::ESHUTDOWN => consts::ESHUTDOWN,
            _ => consts::EIO,
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        if errno <= 0 {
            return consts::EIO;
        }
        nbd_error_from_io_kind(std::io::Error::from_raw_os_error(errno).kind())
    }
}

/// Maps an [`std::io::ErrorKind`] to an NBD error code (used when no raw
/// OS error is available). Unrecognised kinds map to `NBD_EIO`.
pub fn nbd_error_from_io_kind(kind: std::io::ErrorKind) -> u32 {
    use std::io::ErrorKind as K;
    match kind {
        K::PermissionDenied | K::ReadOnlyFilesystem => consts::EPERM,
        K::OutOfMemory => consts::ENOMEM,
        K::InvalidInput => consts::EINVAL,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => consts::ENOSPC,
        K::Unsupported => consts::ENOTSUP,
        _ => consts::EIO,
    }
}

/// Maps an [`std::io::Error`] to an NBD error code: through
/// [`nbd_error_from_errno`] when it carries a raw OS error, otherwise
/// through [`nbd_error_from_io_kind`].
pub fn nbd_error_from_io_error(err: &std::io::Error) -> u32 {
    match err.raw_os_error() {
        Some(errno) => nbd_error_from_errno(errno),
        None => nbd_error_from_io_kind(err.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table() {
        let table: &[(i32, u32)] = &[
            (1, consts::EPERM),
            (13, consts::EPERM),
            (30, consts::EPERM),
            (5, consts::EIO),
            (12, consts::ENOMEM),
            (22, consts::EINVAL),
            (28, consts::ENOSPC),
            (122, consts::ENOSPC),
            (27, consts::ENOSPC),
            (75, consts::EOVERFLOW),
            (95, consts::ENOTSUP),
            (108, consts::ESHUTDOWN),
            (0, consts::EIO),
            (-1, consts::EIO),
            (2, consts::EIO),
            (i32::MAX, consts::EIO),
            (i32::MIN, consts::EIO),
        ];
        for &(errno, nbd) in table {
            assert_eq!(nbd_error_from_errno(errno), nbd, "errno {errno}");
        }
    }

    #[test]
    fn io_error_mapping() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            nbd_error_from_io_error(&Error::from_raw_os_error(28)),
            consts::ENOSPC
        );
        assert_eq!(
            nbd_error_from_io_error(&Error::new(ErrorKind::PermissionDenied, "x")),
            consts::EPERM
        );
        assert_eq!(
            nbd_error_from_io_error(&Error::new(ErrorKind::InvalidInput, "x")),
            consts::EINVAL
        );
        assert_eq!(
            nbd_error_from_io_error(&Error::new(ErrorKind::UnexpectedEof, "x")),
            consts::EIO
        );
        assert_eq!(
            nbd_error_from_io_kind(ErrorKind::StorageFull),
            consts::ENOSPC
        );
        assert_eq!(
            nbd_error_from_io_kind(ErrorKind::Unsupported),
            consts::ENOTSUP
        );
    }

    #[test]
    fn option_reply_type_mapping() {
        let too_long = DecodeError::TooLong {
            what: "x",
            len: 1,
            max: 0,
        };
        assert_eq!(too_long.option_reply_type(), consts::REP_ERR_TOO_BIG);
        let invalid = DecodeError::InvalidOption {
            code: 8,
            reason: "x",
        };
        assert_eq!(invalid.option_reply_type(), consts::REP_ERR_INVALID);
    }
}
