//! Transmission requests: compact (28-byte) and extended (32-byte)
//! headers.
//!
//! Compact header: magic `0x25609513` (u32), command flags (u16), type
//! (u16), cookie (u64), offset (u64), length (u32).
//!
//! Extended header: magic `0x21e41c71` (u32), command flags (u16), type
//! (u16), cookie (u64), offset (u64), length (u64).
//!
//! A payload follows the header for `NBD_CMD_WRITE` and, with extended
//! headers, for any request carrying `NBD_CMD_FLAG_PAYLOAD_LEN`; see
//! [`Request::payload_len`].

use crate::proto::consts;
use crate::proto::error::{DecodeError, EncodeError};
use crate::proto::wire::{Reader, need, put_u16, put_u32, put_u64};

/// A transmission command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1).
    Write,
    /// `NBD_CMD_DISC` (2).
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// `NBD_CMD_RESIZE` (8, experimental extension).
    Resize,
    /// Any other type value. [`Command::from_u16`] never produces
    /// `Unknown` for one of the known values.
    Unknown(u16),
}

impl Command {
    /// Classifies a wire type value.
    pub fn from_u16(value: u16) -> Command {
        match value {
            consts::CMD_READ => Command::Read,
            consts::CMD_WRITE => Command::Write,
            consts::CMD_DISC => Command::Disc,
            consts::CMD_FLUSH => Command::Flush,
            consts::CMD_TRIM => Command::Trim,
            consts::CMD_CACHE => Command::Cache,
            consts::CMD_WRITE_ZEROES => Command::WriteZeroes,
            consts::CMD_BLOCK_STATUS => Command::BlockStatus,
            consts::CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    /// The wire type value.
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => consts::CMD_READ,
            Command::Write => consts::CMD_WRITE,
            Command::Disc => consts::CMD_DISC,
            Command::Flush => consts::CMD_FLUSH,
            Command::Trim => consts::CMD_TRIM,
            Command::Cache => consts::CMD_CACHE,
            Command::WriteZeroes => consts::CMD_WRITE_ZEROES,
            Command::BlockStatus => consts::CMD_BLOCK_STATUS,
            Command::Resize => consts::CMD_RESIZE,
            Command::Unknown(v) => v,
        }
    }

    /// The spec name of the command, for logging.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disc => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::Cache => "NBD_CMD_CACHE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
            Command::Resize => "NBD_CMD_RESIZE",
            Command::Unknown(_) => "unknown",
        }
    }
}

impl From<u16> for Command {
    fn from(value: u16) -> Self {
        Command::from_u16(value)
    }
}

impl From<Command> for u16 {
    fn from(value: Command) -> Self {
        value.to_u16()
    }
}

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type.
    pub command: Command,
    /// Opaque cookie (formerly "handle") echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length: the effect length, or the payload length for
    /// `NBD_CMD_WRITE` and (extended headers) `NBD_CMD_FLAG_PAYLOAD_LEN`.
    /// Always below 2^32 for compact headers.
    pub length: u64,
}

impl Request {
    /// Header size for the given mode: 32 when `extended`, else 28.
    pub fn header_len(extended: bool) -> usize {
        if extended {
            consts::EXTENDED_REQUEST_HEADER_LEN
        } else {
            consts::REQUEST_HEADER_LEN
        }
    }

    /// Whether the given command flag bits are all set.
    pub fn has_flags(&self, flags: u16) -> bool {
        self.flags & flags == flags
    }

    /// Number of payload bytes that follow this request header on the
    /// wire: `length` for `NBD_CMD_WRITE` (in both modes), `length` for
    /// any request with `NBD_CMD_FLAG_PAYLOAD_LEN` when `extended`, else
    /// zero.
    ///
    /// A server must consume these bytes even when it rejects the request,
    /// or else close the connection. If the value exceeds what the server
    /// is willing to buffer (see `transmission::MAX_PAYLOAD`), the server
    /// should either read and discard it before replying `NBD_EINVAL`, or
    /// initiate a hard disconnect (the spec permits a disconnect for
    /// payloads it deems a denial of service, but not below 2^25 bytes).
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == Command::Write
            || (extended && self.has_flags(consts::CMD_FLAG_PAYLOAD_LEN))
        {
            self.length
        } else {
            0
        }
    }
}

/// Decodes a request header from the start of `buf` (28 bytes, or 32 if
/// `extended`). Bytes beyond the header are ignored (they are the payload
/// or the next request). A wrong magic (including the magic of the other
/// header style) is an error after which the server must close the
/// connection.
pub fn decode_request(buf: &[u8], extended: bool) -> Result<Request, DecodeError> {
    let expected_magic = if extended {
        consts::EXTENDED_REQUEST_MAGIC
    } else {
        consts::REQUEST_MAGIC
    };
    // Check the magic as soon as it is available so that a peer using the
    // wrong header style is reported as such rather than as truncated.
    need(buf, 4)?;
    let mut r = Reader::new(buf);
    let magic = r.u32().unwrap_or_default();
    if magic != expected_magic {
        return Err(DecodeError::BadMagic {
            expected: u64::from(expected_magic),
            found: u64::from(magic),
        });
    }
    need(buf, Request::header_len(extended))?;
    let flags = r.u16().unwrap_or_default();
    let command = Command::from_u16(r.u16().unwrap_or_default());
    let cookie = r.u64().unwrap_or_default();
    let offset = r.u64().unwrap_or_default();
    let length = if extended {
        r.u64().unwrap_or_default()
    } else {
        u64::from(r.u32().unwrap_or_default())
    };
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// Encodes a request header (28 bytes, or 32 if `extended`). The payload,
/// if any, is not included. Fails for compact headers when `length` does
/// not fit in 32 bits.
pub fn encode_request(req: &Request, extended: bool) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(Request::header_len(extended));
    if extended {
        put_u32(&mut out, consts::EXTENDED_REQUEST_MAGIC);
    } else {
        put_u32(&mut out, consts::REQUEST_MAGIC);
    }
    put_u16(&mut out, req.flags);
    put_u16(&mut out, req.command.to_u16());
    put_u64(&mut out, req.cookie);
    put_u64(&mut out, req.offset);
    if extended {
        put_u64(&mut out, req.length);
    } else {
        let len = u32::try_from(req.length).map_err(|_| EncodeError::TooLong {
            what: "compact request length",
            len: req.length,
            max: u64::from(u32::MAX),
        })?;
        put_u32(&mut out, len);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::consts::*;

    const ALL: [(u16, Command); 10] = [
        (0, Command::Read),
        (1, Command::Write),
        (2, Command::Disc),
        (3, Command::Flush),
        (4, Command::Trim),
        (5, Command::Cache),
        (6, Command::WriteZeroes),
        (7, Command::BlockStatus),
        (8, Command::Resize),
        (9, Command::Unknown(9)),
    ];

    #[test]
    fn command_codes() {
        for (code, cmd) in ALL {
            assert_eq!(Command::from_u16(code), cmd);
            assert_eq!(cmd.to_u16(), code);
            assert_eq!(u16::from(Command::from(code)), code);
        }
        assert_eq!(Command::from_u16(0xffff), Command::Unknown(0xffff));
        assert_eq!(Command::Unknown(3).name(), "unknown");
        assert_eq!(Command::WriteZeroes.name(), "NBD_CMD_WRITE_ZEROES");
    }

    #[test]
    fn compact_layout() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1112_1314_1516_1718,
            length: 0x2122_2324,
        };
        let bytes = encode_request(&req, false).unwrap();
        let expected: [u8; 28] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags
            0x00, 0x01, // type
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, // offset
            0x21, 0x22, 0x23, 0x24, // length
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode_request(&bytes, false), Ok(req));
    }

    #[test]
    fn extended_layout() {
        let req = Request {
            flags: CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            command: Command::BlockStatus,
            cookie: 0xaabb,
            offset: 0x200,
            length: 0x0000_0001_0000_0000,
        };
        let bytes = encode_request(&req, true).unwrap();
        let expected: [u8; 32] = [
            0x21, 0xe4, 0x1c, 0x71, // magic
            0x00, 0x28, // flags
            0x00, 0x07, // type
            0, 0, 0, 0, 0, 0, 0xaa, 0xbb, // cookie
            0, 0, 0, 0, 0, 0, 0x02, 0x00, // offset
            0, 0, 0, 1, 0, 0, 0, 0, // length
        ];
        assert_eq!(bytes, expected);
        assert_eq!(decode_request(&bytes, true), Ok(req));
        // A 64-bit length cannot be sent in a compact header.
        assert!(matches!(
            encode_request(&req, false),
            Err(EncodeError::TooLong { .. })
        ));
    }

    #[test]
    fn round_trip_every_command() {
        for extended in [false, true] {
            for (code, cmd) in ALL {
                let req = Request {
                    flags: code,
                    command: cmd,
                    cookie: u64::from(code) * 977,
                    offset: u64::from(code) << 20,
                    length: 4096,
                };
                let bytes = encode_request(&req, extended).unwrap();
                assert_eq!(bytes.len(), Request::header_len(extended));
                assert_eq!(decode_request(&bytes, extended), Ok(req));
                // Trailing payload bytes are ignored.
                let mut with_payload = bytes.clone();
                with_payload.extend_from_slice(&[0xee; 7]);
                assert_eq!(decode_request(&with_payload, extended), Ok(req));
            }
        }
    }

    #[test]
    fn rejections() {
        let req = Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        let compact = encode_request(&req, false).unwrap();
        let extended = encode_request(&req, true).unwrap();
        // Wrong header style.
        assert_eq!(
            decode_request(&compact, true),
            Err(DecodeError::BadMagic {
                expected: u64::from(EXTENDED_REQUEST_MAGIC),
                found: u64::from(REQUEST_MAGIC)
            })
        );
        assert_eq!(
            decode_request(&extended, false),
            Err(DecodeError::BadMagic {
                expected: u64::from(REQUEST_MAGIC),
                found: u64::from(EXTENDED_REQUEST_MAGIC)
            })
        );
        // Historic and corrupted magics.
        let mut bad = compact.clone();
        bad[..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        assert!(matches!(
            decode_request(&bad, false),
            Err(DecodeError::BadMagic { .. })
        ));
        // Truncation at every length.
        for n in 0..28 {
            assert_eq!(
                decode_request(&compact[..n], false),
                Err(DecodeError::Truncated {
                    need: if n < 4 { 4 } else { 28 },
                    have: n
                })
            );
        }
        for n in 0..32 {
            assert_eq!(
                decode_request(&extended[..n], true),
                Err(DecodeError::Truncated {
                    need: if n < 4 { 4 } else { 32 },
                    have: n
                })
            );
        }
    }

    #[test]
    fn payload_lengths() {
        let mk = |command, flags, length| Request {
            flags,
            command,
            cookie: 0,
            offset: 0,
            length,
        };
        let cases = [
            (mk(Command::Write, 0, 4096), false, 4096),
            (mk(Command::Write, 0, 4096), true, 4096),
            (mk(Command::Write, CMD_FLAG_PAYLOAD_LEN, 4096), true, 4096),
            (mk(Command::Read, 0, 4096), false, 0),
            (mk(Command::Read, 0, 4096), true, 0),
            (mk(Command::BlockStatus, CMD_FLAG_PAYLOAD_LEN, 16), true, 16),
            (mk(Command::BlockStatus, CMD_FLAG_PAYLOAD_LEN, 16), false, 0),
            (mk(Command::Trim, CMD_FLAG_PAYLOAD_LEN, 8), true, 8),
            (mk(Command::Trim, 0, 8), true, 0),
            (mk(Command::Unknown(99), CMD_FLAG_PAYLOAD_LEN, 3), true, 3),
            (mk(Command::Disc, 0, 0), false, 0),
        ];
        for (req, extended, expected) in cases {
            assert_eq!(req.payload_len(extended), expected, "{req:?} {extended}");
        }
    }
}
