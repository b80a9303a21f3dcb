//! Transmission replies: simple replies, structured reply chunks
//! (20-byte header) and extended reply chunks (32-byte header).
//!
//! Simple reply (16 bytes): magic `0x67446698`, error (u32), cookie (u64);
//! for a successful `NBD_CMD_READ` the data follows.
//!
//! Structured chunk header (20 bytes): magic `0x668e33ef`, flags (u16),
//! type (u16), cookie (u64), payload length (u32).
//!
//! Extended chunk header (32 bytes): magic `0x6e8a278c`, flags (u16), type
//! (u16), cookie (u64), offset (u64, MUST equal the request's offset),
//! payload length (u64).
//!
//! With extended headers the server MUST NOT send simple replies; use
//! [`none_done`] for payload-less success and [`error_chunk`] for errors.

use crate::proto::consts::{self, MAX_STRING_LEN};
use crate::proto::error::{DecodeError, EncodeError};
use crate::proto::request::Request;
use crate::proto::wire::{Reader, len_u64, need, put_u16, put_u32, put_u64, sanitize_message};

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

/// A simple reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SimpleReply {
    /// NBD error code (0 for success).
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encodes the 16-byte simple reply.
    pub fn encode(&self) -> [u8; consts::SIMPLE_REPLY_LEN] {
        encode_simple_reply(self.cookie, self.error)
    }
}

/// Encodes a 16-byte simple reply: magic, error, cookie.
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; consts::SIMPLE_REPLY_LEN] {
    let mut out = [0u8; consts::SIMPLE_REPLY_LEN];
    let (magic, rest) = out.split_at_mut(4);
    let (err, ck) = rest.split_at_mut(4);
    magic.copy_from_slice(&consts::SIMPLE_REPLY_MAGIC.to_be_bytes());
    err.copy_from_slice(&error.to_be_bytes());
    ck.copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Header of a structured (compact) or extended reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub reply_type: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// `None` for a 20-byte structured header; `Some(request offset)` for a
    /// 32-byte extended header.
    pub offset: Option<u64>,
    /// Payload length (must fit in 32 bits for structured headers).
    pub length: u64,
}

impl ChunkHeader {
    /// Whether this is an extended (32-byte) header.
    pub fn is_extended(&self) -> bool {
        self.offset.is_some()
    }

    /// Whether `NBD_REPLY_FLAG_DONE` is set.
    pub fn is_done(&self) -> bool {
        self.flags & consts::REPLY_FLAG_DONE != 0
    }

    /// Whether the chunk type is an error type (bit 15 set).
    pub fn is_error(&self) -> bool {
        self.reply_type & consts::REPLY_TYPE_FLAG_ERROR != 0
    }

    /// Size of the encoded header: 20 or 32 bytes.
    pub fn encoded_len(&self) -> usize {
        if self.is_extended() {
            consts::EXTENDED_REPLY_HEADER_LEN
        } else {
            consts::STRUCTURED_REPLY_HEADER_LEN
        }
    }

    /// Appends the encoded header to `out`. Fails if a structured header's
    /// length does not fit in 32 bits.
    pub fn append_to(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self.offset {
            None => {
                let len = u32::try_from(self.length).map_err(|_| EncodeError::TooLong {
                    what: "structured reply payload",
                    len: self.length,
                    max: u64::from(u32::MAX),
                })?;
                put_u32(out, consts::STRUCTURED_REPLY_MAGIC);
                put_u16(out, self.flags);
                put_u16(out, self.reply_type);
                put_u64(out, self.cookie);
                put_u32(out, len);
            }
            Some(offset) => {
                put_u32(out, consts::EXTENDED_REPLY_MAGIC);
                put_u16(out, self.flags);
                put_u16(out, self.reply_type);
                put_u64(out, self.cookie);
                put_u64(out, offset);
                put_u64(out, self.length);
            }
        }
        Ok(())
    }

    /// Encodes the header into a new vector.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.append_to(&mut out)?;
        Ok(out)
    }

    /// Writes the header into the start of `out` and returns the number of
    /// bytes written (20 or 32).
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let bytes = self.encode()?;
        let have = out.len();
        let dst = out
            .get_mut(..bytes.len())
            .ok_or(EncodeError::BufferTooSmall {
                need: bytes.len(),
                have,
            })?;
        dst.copy_from_slice(&bytes);
        Ok(bytes.len())
    }
}

/// Any reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// A structured or extended chunk header.
    Chunk(ChunkHeader),
}

impl ReplyHeader {
    /// The cookie the reply refers to.
    pub fn cookie(&self) -> u64 {
        match self {
            ReplyHeader::Simple(s) => s.cookie,
            ReplyHeader::Chunk(c) => c.cookie,
        }
    }
}

/// Reads the magic in the first 4 bytes of `buf` and returns the size of
/// the reply header it announces: 16 (simple) or 20 (structured) in
/// compact mode, 32 in extended mode. Lets a client read the magic first
/// and then the rest of the header.
pub fn reply_header_len(buf: &[u8], extended: bool) -> Result<usize, DecodeError> {
    need(buf, 4)?;
    let magic = Reader::new(buf).u32().unwrap_or_default();
    match (magic, extended) {
        (consts::SIMPLE_REPLY_MAGIC, false) => Ok(consts::SIMPLE_REPLY_LEN),
        (consts::STRUCTURED_REPLY_MAGIC, false) => Ok(consts::STRUCTURED_REPLY_HEADER_LEN),
        (consts::EXTENDED_REPLY_MAGIC, true) => Ok(consts::EXTENDED_REPLY_HEADER_LEN),
        (found, true) => Err(DecodeError::BadMagic {
            expected: u64::from(consts::EXTENDED_REPLY_MAGIC),
            found: u64::from(found),
        }),
        (found, false) => Err(DecodeError::BadMagic {
            expected: u64::from(consts::SIMPLE_REPLY_MAGIC),
            found: u64::from(found),
        }),
    }
}

/// Decodes a reply header from the start of `buf`. In compact mode
/// (`extended == false`) simple and structured headers are accepted; in
/// extended mode only extended headers are. Bytes after the header are
/// ignored.
pub fn decode_reply_header(buf: &[u8], extended: bool) -> Result<ReplyHeader, DecodeError> {
    let len = reply_header_len(buf, extended)?;
    need(buf, len)?;
    let mut r = Reader::new(buf);
    let magic = r.u32().unwrap_or_default();
    if magic == consts::SIMPLE_REPLY_MAGIC {
        return Ok(ReplyHeader::Simple(SimpleReply {
            error: r.u32().unwrap_or_default(),
            cookie: r.u64().unwrap_or_default(),
        }));
    }
    let flags = r.u16().unwrap_or_default();
    let reply_type = r.u16().unwrap_or_default();
    let cookie = r.u64().unwrap_or_default();
    let (offset, length) = if extended {
        (
            Some(r.u64().unwrap_or_default()),
            r.u64().unwrap_or_default(),
        )
    } else {
        (None, u64::from(r.u32().unwrap_or_default()))
    };
    Ok(ReplyHeader::Chunk(ChunkHeader {
        flags,
        reply_type,
        cookie,
        offset,
        length,
    }))
}

// ---------------------------------------------------------------------------
// Chunk encoders (server side)
// ---------------------------------------------------------------------------

/// Identifies the request a chunk answers and the header style to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplyTo {
    /// Cookie of the request.
    pub cookie: u64,
    /// `None` for structured (compact) headers; `Some(offset of the
    /// request)` for extended headers.
    pub request_offset: Option<u64>,
}

impl ReplyTo {
    /// Reply with 20-byte structured headers.
    pub fn compact(cookie: u64) -> Self {
        ReplyTo {
            cookie,
            request_offset: None,
        }
    }

    /// Reply with 32-byte extended headers to a request at `request_offset`.
    pub fn extended(cookie: u64, request_offset: u64) -> Self {
        ReplyTo {
            cookie,
            request_offset: Some(request_offset),
        }
    }

    /// Reply to `req` in the negotiated header style.
    pub fn for_request(req: &Request, extended: bool) -> Self {
        if extended {
            ReplyTo::extended(req.cookie, req.offset)
        } else {
            ReplyTo::compact(req.cookie)
        }
    }

    /// Whether extended headers are used.
    pub fn is_extended(&self) -> bool {
        self.request_offset.is_some()
    }

    /// The chunk header for a chunk of `reply_type` with `length` payload
    /// bytes.
    pub fn header(&self, reply_type: u16, length: u64, done: bool) -> ChunkHeader {
        ChunkHeader {
            flags: if done { consts::REPLY_FLAG_DONE } else { 0 },
            reply_type,
            cookie: self.cookie,
            offset: self.request_offset,
            length,
        }
    }
}

fn start_chunk(
    to: ReplyTo,
    reply_type: u16,
    payload_len: u64,
    done: bool,
    extra_capacity: usize,
) -> Result<Vec<u8>, EncodeError> {
    let header = to.header(reply_type, payload_len, done);
    let mut out = Vec::with_capacity(header.encoded_len().saturating_add(extra_capacity));
    header.append_to(&mut out)?;
    Ok(out)
}

/// A complete `NBD_REPLY_TYPE_NONE` chunk with `NBD_REPLY_FLAG_DONE` set.
pub fn none_done(to: ReplyTo) -> Vec<u8> {
    // A zero-length payload always fits in either header style.
    start_chunk(to, consts::REPLY_TYPE_NONE, 0, true, 0).unwrap_or_default()
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk followed by the
/// 8-byte data offset; the caller appends (or writes) exactly `data_len`
/// data bytes after it.
///
/// Fails if `data_len` is zero (the spec requires at least one byte) or if
/// `8 + data_len` does not fit in the header's length field.
pub fn offset_data_header(
    to: ReplyTo,
    data_offset: u64,
    data_len: u64,
    done: bool,
) -> Result<Vec<u8>, EncodeError> {
    if data_len == 0 {
        return Err(EncodeError::Invalid(
            "OFFSET_DATA chunk needs at least one byte",
        ));
    }
    let payload_len = data_len.checked_add(8).ok_or(EncodeError::TooLong {
        what: "OFFSET_DATA payload",
        len: data_len,
        max: u64::MAX.saturating_sub(8),
    })?;
    let mut out = start_chunk(to, consts::REPLY_TYPE_OFFSET_DATA, payload_len, done, 8)?;
    put_u64(&mut out, data_offset);
    Ok(out)
}

/// A complete `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data` read at
/// `data_offset`.
pub fn offset_data(
    to: ReplyTo,
    data_offset: u64,
    data: &[u8],
    done: bool,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = offset_data_header(to, data_offset, len_u64(data.len()), done)?;
    out.extend_from_slice(data);
    Ok(out)
}

/// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: u64 offset, u32 hole
/// size. The hole size stays 32 bits with extended headers too (the spec
/// defines no 64-bit hole chunk), so larger holes must be split. Fails if
/// `hole_len` is zero.
pub fn offset_hole(
    to: ReplyTo,
    hole_offset: u64,
    hole_len: u32,
    done: bool,
) -> Result<Vec<u8>, EncodeError> {
    if hole_len == 0 {
        return Err(EncodeError::Invalid("OFFSET_HOLE size must be nonzero"));
    }
    let mut out = start_chunk(to, consts::REPLY_TYPE_OFFSET_HOLE, 12, done, 12)?;
    put_u64(&mut out, hole_offset);
    put_u32(&mut out, hole_len);
    Ok(out)
}

fn error_payload(error: u32, message: &str) -> (u32, String) {
    // The spec requires a nonzero error in error chunks.
    let error = if error == 0 { consts::EIO } else { error };
    (error, sanitize_message(message, MAX_STRING_LEN))
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk: u32 error, u16 message length,
/// message.
///
/// Never fails: the message is truncated on a character boundary to 4096
/// bytes and stripped of NUL characters, and an `error` of 0 (forbidden by
/// the spec) is sent as `NBD_EIO`.
pub fn error_chunk(to: ReplyTo, error: u32, message: &str, done: bool) -> Vec<u8> {
    let (error, msg) = error_payload(error, message);
    // msg.len() <= 4096, so these conversions cannot fail.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let payload_len = 6u64.saturating_add(u64::from(msg_len));
    let mut out =
        start_chunk(to, consts::REPLY_TYPE_ERROR, payload_len, done, msg.len()).unwrap_or_default();
    put_u32(&mut out, error);
    put_u16(&mut out, msg_len);
    out.extend_from_slice(msg.as_bytes());
    out
}

/// A complete `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: u32 error, u16 message
/// length, message, u64 offset at which the error occurred. Same message
/// and error sanitising as [`error_chunk`].
pub fn error_offset_chunk(
    to: ReplyTo,
    error: u32,
    message: &str,
    error_offset: u64,
    done: bool,
) -> Vec<u8> {
    let (error, msg) = error_payload(error, message);
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let payload_len = 14u64.saturating_add(u64::from(msg_len));
    let mut out = start_chunk(
        to,
        consts::REPLY_TYPE_ERROR_OFFSET,
        payload_len,
        done,
        msg.len().saturating_add(8),
    )
    .unwrap_or_default();
    put_u32(&mut out, error);
    put_u16(&mut out, msg_len);
    out.extend_from_slice(msg.as_bytes());
    put_u64(&mut out, error_offset);
    out
}

fn descriptor_payload_len(
    fixed: u64,
    count: usize,
    each: u64,
    what: &'static str,
) -> Result<u64, EncodeError> {
    len_u64(count)
        .checked_mul(each)
        .and_then(|n| n.checked_add(fixed))
        .ok_or(EncodeError::TooLong {
            what,
            len: len_u64(count),
            max: u64::MAX.checked_div(each).unwrap_or(0),
        })
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: u32 context id, then
/// `(u32 extent length, u32 status flags)` descriptors. Usable with either
/// header style.
///
/// Fails if `descriptors` is empty, an extent length is zero, or the
/// payload does not fit the header's length field.
pub fn block_status(
    to: ReplyTo,
    context_id: u32,
    descriptors: &[(u32, u32)],
    done: bool,
) -> Result<Vec<u8>, EncodeError> {
    if descriptors.is_empty() {
        return Err(EncodeError::Invalid(
            "block status needs at least one extent",
        ));
    }
    if descriptors.iter().any(|&(len, _)| len == 0) {
        return Err(EncodeError::Invalid(
            "block status extent length must be nonzero",
        ));
    }
    let payload_len = descriptor_payload_len(4, descriptors.len(), 8, "block status payload")?;
    let mut out = start_chunk(
        to,
        consts::REPLY_TYPE_BLOCK_STATUS,
        payload_len,
        done,
        usize::try_from(payload_len).unwrap_or(0),
    )?;
    put_u32(&mut out, context_id);
    for &(len, status) in descriptors {
        put_u32(&mut out, len);
        put_u32(&mut out, status);
    }
    Ok(out)
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` chunk: u32 context id, u32
/// descriptor count, then `(u64 extent length, u64 status flags)`
/// descriptors. Only valid with extended headers.
///
/// The descriptor count field is filled in when it fits in 32 bits and is
/// 0 otherwise (the spec lets 0 mean "derive from the length"). Fails if
/// `to` is not extended, `descriptors` is empty, or an extent length is
/// zero.
pub fn block_status_ext(
    to: ReplyTo,
    context_id: u32,
    descriptors: &[(u64, u64)],
    done: bool,
) -> Result<Vec<u8>, EncodeError> {
    if !to.is_extended() {
        return Err(EncodeError::Invalid(
            "BLOCK_STATUS_EXT requires extended headers",
        ));
    }
    if descriptors.is_empty() {
        return Err(EncodeError::Invalid(
            "block status needs at least one extent",
        ));
    }
    if descriptors.iter().any(|&(len, _)| len == 0) {
        return Err(EncodeError::Invalid(
            "block status extent length must be nonzero",
        ));
    }
    let payload_len =
        descriptor_payload_len(8, descriptors.len(), 16, "extended block status payload")?;
    let mut out = start_chunk(
        to,
        consts::REPLY_TYPE_BLOCK_STATUS_EXT,
        payload_len,
        done,
        usize::try_from(payload_len).unwrap_or(0),
    )?;
    put_u32(&mut out, context_id);
    put_u32(&mut out, u32::try_from(descriptors.len()).unwrap_or(0));
    for &(len, status) in descriptors {
        put_u64(&mut out, len);
        put_u64(&mut out, status);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Chunk payload decoding (client side)
// ---------------------------------------------------------------------------

/// A decoded chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData {
        /// Absolute offset of the data in the export.
        offset: u64,
        /// The data (at least one byte).
        data: &'a [u8],
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Absolute offset of the hole.
        offset: u64,
        /// Hole size (nonzero).
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Metadata context id.
        context_id: u32,
        /// `(extent length, status flags)` descriptors.
        descriptors: Vec<(u32, u32)>,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`.
    BlockStatusExt {
        /// Metadata context id.
        context_id: u32,
        /// `(extent length, status flags)` descriptors.
        descriptors: Vec<(u64, u64)>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// NBD error code (nonzero).
        error: u32,
        /// Message, decoded leniently (invalid UTF-8 replaced).
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// NBD error code (nonzero).
        error: u32,
        /// Message, decoded leniently.
        message: String,
        /// Offset at which the error occurred.
        offset: u64,
    },
    /// An error chunk of a type this crate does not know (bit 15 set): the
    /// reply has failed but the connection can continue.
    UnknownError {
        /// The chunk type.
        reply_type: u16,
        /// NBD error code.
        error: u32,
        /// Message, decoded leniently.
        message: String,
    },
}

impl ChunkPayload<'_> {
    /// The error code and message of an error chunk (of any error type).
    pub fn error(&self) -> Option<(u32, &str)> {
        match self {
            ChunkPayload::Error { error, message }
            | ChunkPayload::ErrorOffset { error, message, .. }
            | ChunkPayload::UnknownError { error, message, .. } => Some((*error, message.as_str())),
            _ => None,
        }
    }
}

fn bad_chunk(reply_type: u16, reason: &'static str) -> DecodeError {
    DecodeError::InvalidChunk { reply_type, reason }
}

/// Decodes the payload of a chunk; `payload.len()` must equal
/// `header.length`. Every length rule of the spec is enforced (exact
/// sizes, descriptor multiples, nonzero hole and extent lengths, nonzero
/// error values, `NONE` only as the final chunk, `BLOCK_STATUS_EXT` only
/// with extended headers). Unknown non-error types fail with
/// [`DecodeError::UnknownChunkType`] (the client must disconnect).
pub fn decode_chunk_payload<'a>(
    header: &ChunkHeader,
    payload: &'a [u8],
) -> Result<ChunkPayload<'a>, DecodeError> {
    let len = len_u64(payload.len());
    if len != header.length {
        return Err(DecodeError::LengthMismatch {
            what: "reply chunk payload",
            expected: header.length,
            found: len,
        });
    }
    let t = header.reply_type;
    let mut r = Reader::new(payload);
    match t {
        consts::REPLY_TYPE_NONE => {
            if !payload.is_empty() {
                return Err(bad_chunk(t, "NONE chunk with payload"));
            }
            if !header.is_done() {
                return Err(bad_chunk(t, "NONE chunk without DONE flag"));
            }
            Ok(ChunkPayload::None)
        }
        consts::REPLY_TYPE_OFFSET_DATA => {
            if payload.len() < 9 {
                return Err(bad_chunk(t, "OFFSET_DATA length must be at least 9"));
            }
            let offset = r.u64().unwrap_or_default();
            Ok(ChunkPayload::OffsetData {
                offset,
                data: r.rest(),
            })
        }
        consts::REPLY_TYPE_OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(bad_chunk(t, "OFFSET_HOLE length must be 12"));
            }
            let offset = r.u64().unwrap_or_default();
            let length = r.u32().unwrap_or_default();
            if length == 0 {
                return Err(bad_chunk(t, "OFFSET_HOLE size must be nonzero"));
            }
            Ok(ChunkPayload::OffsetHole { offset, length })
        }
        consts::REPLY_TYPE_BLOCK_STATUS => {
            let body = payload.len().saturating_sub(4);
            if payload.len() < 12 || !body.is_multiple_of(8) {
                return Err(bad_chunk(t, "BLOCK_STATUS length must be 4 + 8*n, n >= 1"));
            }
            let context_id = r.u32().unwrap_or_default();
            let mut descriptors = Vec::with_capacity(body / 8);
            while let (Some(len), Some(status)) = (r.u32(), r.u32()) {
                if len == 0 {
                    return Err(bad_chunk(t, "extent length must be nonzero"));
                }
                descriptors.push((len, status));
            }
            Ok(ChunkPayload::BlockStatus {
                context_id,
                descriptors,
            })
        }
        consts::REPLY_TYPE_BLOCK_STATUS_EXT => {
            if !header.is_extended() {
                return Err(bad_chunk(t, "BLOCK_STATUS_EXT without extended headers"));
            }
            let body = payload.len().saturating_sub(8);
            if payload.len() < 24 || !body.is_multiple_of(16) {
                return Err(bad_chunk(
                    t,
                    "BLOCK_STATUS_EXT length must be 8 + 16*n, n >= 1",
                ));
            }
            let context_id = r.u32().unwrap_or_default();
            let count = r.u32().unwrap_or_default();
            let n = body / 16;
            if count != 0 && usize::try_from(count).ok() != Some(n) {
                return Err(bad_chunk(t, "descriptor count does not match length"));
            }
            let mut descriptors = Vec::with_capacity(n);
            while let (Some(len), Some(status)) = (r.u64(), r.u64()) {
                if len == 0 {
                    return Err(bad_chunk(t, "extent length must be nonzero"));
                }
                descriptors.push((len, status));
            }
            Ok(ChunkPayload::BlockStatusExt {
                context_id,
                descriptors,
            })
        }
        _ if header.is_error() => {
            let error = r
                .u32()
                .ok_or_else(|| bad_chunk(t, "error chunk too short"))?;
            let msg_len = r
                .u16()
                .ok_or_else(|| bad_chunk(t, "error chunk too short"))?;
            let msg = r
                .bytes(usize::from(msg_len))
                .ok_or_else(|| bad_chunk(t, "message length exceeds chunk"))?;
            if error == 0 {
                return Err(bad_chunk(t, "error value must be nonzero"));
            }
            let message = String::from_utf8_lossy(msg).into_owned();
            match t {
                consts::REPLY_TYPE_ERROR => {
                    if !r.is_empty() {
                        return Err(bad_chunk(t, "trailing bytes after error message"));
                    }
                    Ok(ChunkPayload::Error { error, message })
                }
                consts::REPLY_TYPE_ERROR_OFFSET => {
                    let offset = r
                        .u64()
                        .ok_or_else(|| bad_chunk(t, "missing error offset"))?;
                    if !r.is_empty() {
                        return Err(bad_chunk(t, "trailing bytes after error offset"));
                    }
                    Ok(ChunkPayload::ErrorOffset {
                        error,
                        message,
                        offset,
                    })
                }
                _ => Ok(ChunkPayload::UnknownError {
                    reply_type: t,
                    error,
                    message,
                }),
            }
        }
        other => Err(DecodeError::UnknownChunkType(other)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::consts::*;

    fn split(bytes: &[u8], extended: bool) -> (ChunkHeader, &[u8]) {
        let n = reply_header_len(bytes, extended).unwrap();
        match decode_reply_header(bytes, extended).unwrap() {
            ReplyHeader::Chunk(h) => (h, &bytes[n..]),
            ReplyHeader::Simple(s) => panic!("unexpected simple reply {s:?}"),
        }
    }

    fn decode_all(bytes: &[u8], extended: bool) -> (ChunkHeader, ChunkPayload<'_>) {
        let (h, payload) = split(bytes, extended);
        (h, decode_chunk_payload(&h, payload).unwrap())
    }

    #[test]
    fn simple_reply_layout() {
        let r = encode_simple_reply(0x0102_0304_0506_0708, EINVAL);
        assert_eq!(
            r,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(reply_header_len(&r, false), Ok(16));
        assert_eq!(
            decode_reply_header(&r, false),
            Ok(ReplyHeader::Simple(SimpleReply {
                error: 22,
                cookie: 0x0102_0304_0506_0708
            }))
        );
        assert_eq!(
            SimpleReply {
                error: 22,
                cookie: 0x0102_0304_0506_0708
            }
            .encode(),
            r
        );
        // Simple replies are not allowed with extended headers.
        assert!(matches!(
            decode_reply_header(&r, true),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn structured_header_layout() {
        let h = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            reply_type: REPLY_TYPE_OFFSET_HOLE,
            cookie: 0x1122,
            offset: None,
            length: 12,
        };
        let bytes = h.encode().unwrap();
        let expected: [u8; 20] = [
            0x66, 0x8e, 0x33, 0xef, // magic
            0, 1, // flags
            0, 2, // type
            0, 0, 0, 0, 0, 0, 0x11, 0x22, // cookie
            0, 0, 0, 12, // length
        ];
        assert_eq!(bytes, expected);
        assert_eq!(h.encoded_len(), 20);
        assert_eq!(
            decode_reply_header(&bytes, false),
            Ok(ReplyHeader::Chunk(h))
        );
        let mut buf = [0u8; 40];
        assert_eq!(h.encode_into(&mut buf), Ok(20));
        assert_eq!(&buf[..20], &expected);
        assert!(matches!(
            h.encode_into(&mut [0u8; 19]),
            Err(EncodeError::BufferTooSmall { need: 20, have: 19 })
        ));
        let too_long = ChunkHeader {
            length: 1 << 32,
            ..h
        };
        assert!(too_long.encode().is_err());
    }

    #[test]
    fn extended_header_layout() {
        let h = ChunkHeader {
            flags: 0,
            reply_type: REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie: 7,
            offset: Some(0x0102_0304_0506_0708),
            length: 0x0000_0001_0000_0000,
        };
        let bytes = h.encode().unwrap();
        let expected: [u8; 32] = [
            0x6e, 0x8a, 0x27, 0x8c, // magic
            0, 0, // flags
            0, 6, // type
            0, 0, 0, 0, 0, 0, 0, 7, // cookie
            1, 2, 3, 4, 5, 6, 7, 8, // offset
            0, 0, 0, 1, 0, 0, 0, 0, // length
        ];
        assert_eq!(bytes, expected);
        assert_eq!(h.encoded_len(), 32);
        assert_eq!(reply_header_len(&bytes, true), Ok(32));
        assert_eq!(decode_reply_header(&bytes, true), Ok(ReplyHeader::Chunk(h)));
        assert!(decode_reply_header(&bytes, false).is_err());
        assert!(matches!(
            decode_reply_header(&bytes[..31], true),
            Err(DecodeError::Truncated { need: 32, have: 31 })
        ));
        assert!(matches!(
            reply_header_len(&bytes[..3], true),
            Err(DecodeError::Truncated { need: 4, have: 3 })
        ));
    }

    fn targets() -> [ReplyTo; 2] {
        [ReplyTo::compact(42), ReplyTo::extended(42, 4096)]
    }

    #[test]
    fn reply_to_for_request() {
        let req = Request {
            flags: 0,
            command: crate::proto::request::Command::Read,
            cookie: 9,
            offset: 512,
            length: 512,
        };
        assert_eq!(ReplyTo::for_request(&req, false), ReplyTo::compact(9));
        assert_eq!(ReplyTo::for_request(&req, true), ReplyTo::extended(9, 512));
    }

    #[test]
    fn none_chunk() {
        for to in targets() {
            let bytes = none_done(to);
            let (h, p) = decode_all(&bytes, to.is_extended());
            assert_eq!(p, ChunkPayload::None);
            assert!(h.is_done());
            assert_eq!(h.cookie, 42);
            assert_eq!(h.offset, to.request_offset);
        }
        assert_eq!(none_done(ReplyTo::compact(1)).len(), 20);
        assert_eq!(none_done(ReplyTo::extended(1, 0)).len(), 32);
    }

    #[test]
    fn offset_data_chunk() {
        for to in targets() {
            for done in [false, true] {
                let bytes = offset_data(to, 8192, b"hello", done).unwrap();
                let (h, p) = decode_all(&bytes, to.is_extended());
                assert_eq!(h.is_done(), done);
                assert_eq!(h.length, 13);
                assert_eq!(
                    p,
                    ChunkPayload::OffsetData {
                        offset: 8192,
                        data: b"hello"
                    }
                );
                let header = offset_data_header(to, 8192, 5, done).unwrap();
                assert_eq!(&bytes[..header.len()], &header[..]);
            }
            assert!(offset_data(to, 0, b"", true).is_err());
        }
        let compact = offset_data(ReplyTo::compact(1), 0x10, b"x", true).unwrap();
        assert_eq!(
            &compact[16..],
            &[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0x10, b'x']
        );
        // 2^32 - 8 data bytes fit a compact header, one more does not.
        assert!(offset_data_header(ReplyTo::compact(1), 0, (1 << 32) - 9, true).is_ok());
        assert!(offset_data_header(ReplyTo::compact(1), 0, (1 << 32) - 8, true).is_err());
        assert!(offset_data_header(ReplyTo::extended(1, 0), 0, 1 << 40, true).is_ok());
        assert!(offset_data_header(ReplyTo::extended(1, 0), 0, u64::MAX, true).is_err());
    }

    #[test]
    fn offset_hole_chunk() {
        for to in targets() {
            let bytes = offset_hole(to, 1 << 33, 65536, true).unwrap();
            let (h, p) = decode_all(&bytes, to.is_extended());
            assert_eq!(h.length, 12);
            assert_eq!(
                p,
                ChunkPayload::OffsetHole {
                    offset: 1 << 33,
                    length: 65536
                }
            );
            assert!(offset_hole(to, 0, 0, true).is_err());
        }
        let bytes = offset_hole(ReplyTo::compact(0), 1, 2, false).unwrap();
        assert_eq!(
            &bytes[4..],
            &[
                0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2
            ]
        );
    }

    #[test]
    fn error_chunks() {
        for to in targets() {
            let bytes = error_chunk(to, EIO, "disk on fire", true);
            let (h, p) = decode_all(&bytes, to.is_extended());
            assert!(h.is_error());
            assert_eq!(h.length, 6 + 12);
            assert_eq!(
                p,
                ChunkPayload::Error {
                    error: EIO,
                    message: "disk on fire".into()
                }
            );
            let bytes = error_offset_chunk(to, ENOSPC, "", 12345, false);
            let (h, p) = decode_all(&bytes, to.is_extended());
            assert_eq!(h.length, 14);
            assert!(!h.is_done());
            assert_eq!(
                p,
                ChunkPayload::ErrorOffset {
                    error: ENOSPC,
                    message: String::new(),
                    offset: 12345
                }
            );
            // Error 0 is not allowed on the wire.
            let zero = error_chunk(to, 0, "x", true);
            let (_, p) = decode_all(&zero, to.is_extended());
            assert_eq!(
                p,
                ChunkPayload::Error {
                    error: EIO,
                    message: "x".into()
                }
            );
            // Messages are capped at 4096 bytes.
            let long = "ab".repeat(4000);
            let capped = error_chunk(to, EIO, &long, true);
            let (h, _) = decode_all(&capped, to.is_extended());
            assert_eq!(h.length, 6 + 4096);
        }
        let bytes = error_chunk(ReplyTo::compact(0), EPERM, "no", true);
        assert_eq!(&bytes[4..8], &[0, 1, 0x80, 0x01]);
        assert_eq!(&bytes[20..], &[0, 0, 0, 1, 0, 2, b'n', b'o']);
        let bytes = error_offset_chunk(ReplyTo::compact(0), EPERM, "no", 3, true);
        assert_eq!(&bytes[6..8], &[0x80, 0x02]);
        assert_eq!(
            &bytes[20..],
            &[0, 0, 0, 1, 0, 2, b'n', b'o', 0, 0, 0, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn block_status_chunks() {
        let descs = [(4096u32, STATE_HOLE | STATE_ZERO), (512, 0)];
        for to in targets() {
            let bytes = block_status(to, 1, &descs, true).unwrap();
            let (h, p) = decode_all(&bytes, to.is_extended());
            assert_eq!(h.length, 4 + 16);
            assert_eq!(
                p,
                ChunkPayload::BlockStatus {
                    context_id: 1,
                    descriptors: descs.to_vec()
                }
            );
            assert!(block_status(to, 1, &[], true).is_err());
            assert!(block_status(to, 1, &[(0, 0)], true).is_err());
        }
        let bytes = block_status(ReplyTo::compact(0), 0x0a, &[(0x200, 3)], true).unwrap();
        assert_eq!(&bytes[6..8], &[0, 5]);
        assert_eq!(
            &bytes[16..],
            &[0, 0, 0, 12, 0, 0, 0, 0x0a, 0, 0, 2, 0, 0, 0, 0, 3]
        );

        let ext = [(1u64 << 40, u64::from(STATE_ZERO)), (1, 1 << 63)];
        let to = ReplyTo::extended(5, 0);
        let bytes = block_status_ext(to, 2, &ext, false).unwrap();
        assert_eq!(&bytes[24..32], &[0, 0, 0, 0, 0, 0, 0, 40]);
        assert_eq!(&bytes[32..40], &[0, 0, 0, 2, 0, 0, 0, 2]);
        assert_eq!(
            &bytes[40..56],
            &[0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        let (h, p) = decode_all(&bytes, true);
        assert!(!h.is_done());
        assert_eq!(
            p,
            ChunkPayload::BlockStatusExt {
                context_id: 2,
                descriptors: ext.to_vec()
            }
        );
        assert!(block_status_ext(ReplyTo::compact(5), 2, &ext, true).is_err());
        assert!(block_status_ext(to, 2, &[], true).is_err());
        assert!(block_status_ext(to, 2, &[(0, 1)], true).is_err());
    }

    fn hdr(reply_type: u16, length: u64, flags: u16, extended: bool) -> ChunkHeader {
        ChunkHeader {
            flags,
            reply_type,
            cookie: 0,
            offset: extended.then_some(0),
            length,
        }
    }

    #[test]
    fn chunk_payload_rejections() {
        let d = REPLY_FLAG_DONE;
        let cases: Vec<(ChunkHeader, Vec<u8>, &str)> = vec![
            (
                hdr(REPLY_TYPE_NONE, 1, d, false),
                vec![0],
                "NONE with payload",
            ),
            (
                hdr(REPLY_TYPE_NONE, 0, 0, false),
                vec![],
                "NONE without DONE",
            ),
            (
                hdr(REPLY_TYPE_OFFSET_DATA, 8, d, false),
                vec![0; 8],
                "DATA too short",
            ),
            (
                hdr(REPLY_TYPE_OFFSET_HOLE, 11, d, false),
                vec![0; 11],
                "HOLE short",
            ),
            (
                hdr(REPLY_TYPE_OFFSET_HOLE, 13, d, false),
                vec![0; 13],
                "HOLE long",
            ),
            (
                hdr(REPLY_TYPE_OFFSET_HOLE, 12, d, false),
                vec![0; 12],
                "HOLE zero size",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS, 4, d, false),
                vec![0; 4],
                "no descriptors",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS, 13, d, false),
                vec![0; 13],
                "bad multiple",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS, 12, d, false),
                vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                "zero extent",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS_EXT, 24, d, false),
                vec![0; 24],
                "EXT without extended headers",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS_EXT, 8, d, true),
                vec![0; 8],
                "EXT empty",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS_EXT, 20, d, true),
                vec![0; 20],
                "EXT short",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS_EXT, 24, d, true),
                [
                    &[0, 0, 0, 1, 0, 0, 0, 2][..],
                    &[0, 0, 0, 0, 0, 0, 0, 1][..],
                    &[0; 8][..],
                ]
                .concat(),
                "EXT count mismatch",
            ),
            (
                hdr(REPLY_TYPE_BLOCK_STATUS_EXT, 24, d, true),
                vec![0; 24],
                "EXT zero extent",
            ),
            (
                hdr(REPLY_TYPE_ERROR, 5, d, false),
                vec![0, 0, 0, 5, 0],
                "ERROR short",
            ),
            (
                hdr(REPLY_TYPE_ERROR, 7, d, false),
                vec![0, 0, 0, 5, 0, 2, b'a'],
                "message beyond chunk",
            ),
            (
                hdr(REPLY_TYPE_ERROR, 7, d, false),
                vec![0, 0, 0, 5, 0, 0, b'a'],
                "ERROR trailing",
            ),
            (
                hdr(REPLY_TYPE_ERROR, 6, d, false),
                vec![0; 6],
                "ERROR zero error",
            ),
            (
                hdr(REPLY_TYPE_ERROR_OFFSET, 13, d, false),
                vec![0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                "ERROR_OFFSET short",
            ),
            (
                hdr(REPLY_TYPE_ERROR_OFFSET, 15, d, false),
                vec![0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                "ERROR_OFFSET trailing",
            ),
            (hdr(3, 0, d, false), vec![], "unknown type"),
            (
                hdr(REPLY_TYPE_OFFSET_DATA, 10, d, false),
                vec![0; 9],
                "length mismatch",
            ),
        ];
        for (h, payload, what) in cases {
            assert!(decode_chunk_payload(&h, &payload).is_err(), "{what}");
        }
        assert_eq!(
            decode_chunk_payload(&hdr(3, 0, d, false), &[]),
            Err(DecodeError::UnknownChunkType(3))
        );
    }

    #[test]
    fn unknown_error_chunk() {
        let h = hdr(0x8005, 9, REPLY_FLAG_DONE, false);
        let p = decode_chunk_payload(&h, &[0, 0, 0, 22, 0, 2, b'h', b'i', 0xff]).unwrap();
        assert_eq!(
            p,
            ChunkPayload::UnknownError {
                reply_type: 0x8005,
                error: 22,
                message: "hi".into()
            }
        );
    }
}
