//! Handshake phase: server greeting, client flags, option requests and
//! option replies (fixed newstyle negotiation).
//!
//! Server-side flow, in terms of this module:
//!
//! 1. send [`encode_greeting`];
//! 2. read 4 bytes, [`decode_client_flags`] (close on error);
//! 3. loop: read 16 bytes, [`decode_option_header`] (close on error);
//!    if [`OptionHeader::check_len`] fails, close the connection (or
//!    discard `length` bytes and answer `NBD_REP_ERR_TOO_BIG`); otherwise
//!    read `length` bytes and [`decode_option`]. A decode error for a
//!    known option is answered with [`encode_error_reply`] using
//!    [`DecodeError::option_reply_type`]; [`ClientOption::Unknown`] is
//!    answered with `NBD_REP_ERR_UNSUP`.

use crate::proto::consts::{self, MAX_STRING_LEN};
use crate::proto::error::{DecodeError, EncodeError};
use crate::proto::wire::{
    Reader, add_len, check_string, decode_string, len_u32, len_u64, need, put_u16, put_u32,
    put_u64, sanitize_message,
};

/// Largest option payload (in bytes) the server accepts. Servers check
/// this with [`OptionHeader::check_len`] before reading the payload, and
/// [`decode_option`] rejects longer payloads.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

// ---------------------------------------------------------------------------
// Greeting and client flags
// ---------------------------------------------------------------------------

/// Encodes the newstyle server greeting: `NBDMAGIC`, `IHAVEOPT`, then the
/// 16-bit handshake flags (18 bytes).
pub fn encode_greeting(handshake_flags: u16) -> [u8; consts::GREETING_LEN] {
    let mut out = [0u8; consts::GREETING_LEN];
    let (magic1, rest) = out.split_at_mut(8);
    let (magic2, flags) = rest.split_at_mut(8);
    magic1.copy_from_slice(&consts::NBDMAGIC.to_be_bytes());
    magic2.copy_from_slice(&consts::IHAVEOPT.to_be_bytes());
    flags.copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Decodes the newstyle server greeting (client side) and returns the
/// handshake flags. Oldstyle servers (whose second magic is
/// `cliserv_magic`) are rejected with [`DecodeError::BadMagic`].
pub fn decode_greeting(buf: &[u8]) -> Result<u16, DecodeError> {
    need(buf, consts::GREETING_LEN)?;
    let mut r = Reader::new(buf);
    let m1 = r.u64().unwrap_or_default();
    if m1 != consts::NBDMAGIC {
        return Err(DecodeError::BadMagic {
            expected: consts::NBDMAGIC,
            found: m1,
        });
    }
    let m2 = r.u64().unwrap_or_default();
    if m2 != consts::IHAVEOPT {
        return Err(DecodeError::BadMagic {
            expected: consts::IHAVEOPT,
            found: m2,
        });
    }
    Ok(r.u16().unwrap_or_default())
}

/// Encodes the 32-bit client flags.
pub fn encode_client_flags(client_flags: u32) -> [u8; consts::CLIENT_FLAGS_LEN] {
    client_flags.to_be_bytes()
}

/// Decodes the 32-bit client flags sent after the greeting.
///
/// Fails with [`DecodeError::UnknownClientFlags`] if bits other than
/// `NBD_FLAG_C_FIXED_NEWSTYLE` / `NBD_FLAG_C_NO_ZEROES` are set, and with
/// [`DecodeError::UnadvertisedClientFlags`] if the client set a flag whose
/// handshake counterpart is absent from `advertised` (the handshake flags
/// the server sent). In both cases the server MUST close the connection.
pub fn decode_client_flags(buf: &[u8], advertised: u16) -> Result<u32, DecodeError> {
    need(buf, consts::CLIENT_FLAGS_LEN)?;
    let flags = Reader::new(buf).u32().unwrap_or_default();
    let unknown = flags & !consts::CLIENT_FLAGS_KNOWN;
    if unknown != 0 {
        return Err(DecodeError::UnknownClientFlags(unknown));
    }
    // Client flag bit n answers handshake flag bit n.
    let unadvertised = flags & !u32::from(advertised);
    if unadvertised != 0 {
        return Err(DecodeError::UnadvertisedClientFlags(unadvertised));
    }
    Ok(flags)
}

// ---------------------------------------------------------------------------
// Option requests
// ---------------------------------------------------------------------------

/// Header of an option request: `IHAVEOPT`, option code, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`NBD_OPT_*`).
    pub code: u32,
    /// Length of the payload that follows the header.
    pub length: u32,
}

impl OptionHeader {
    /// Checks the announced payload length against [`MAX_OPTION_LEN`].
    /// Call this before reading (and allocating for) the payload.
    pub fn check_len(&self) -> Result<(), DecodeError> {
        if self.length > MAX_OPTION_LEN {
            Err(DecodeError::TooLong {
                what: "option payload",
                len: u64::from(self.length),
                max: u64::from(MAX_OPTION_LEN),
            })
        } else {
            Ok(())
        }
    }

    /// Encodes the 16-byte header.
    pub fn encode(&self) -> [u8; consts::OPTION_HEADER_LEN] {
        encode_option_header(self.code, self.length)
    }
}

/// Decodes the first 16 bytes of `buf` as an option request header after
/// checking the `IHAVEOPT` magic. The length is *not* limited here; see
/// [`OptionHeader::check_len`].
pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, DecodeError> {
    need(buf, consts::OPTION_HEADER_LEN)?;
    let mut r = Reader::new(buf);
    let magic = r.u64().unwrap_or_default();
    if magic != consts::IHAVEOPT {
        return Err(DecodeError::BadMagic {
            expected: consts::IHAVEOPT,
            found: magic,
        });
    }
    Ok(OptionHeader {
        code: r.u32().unwrap_or_default(),
        length: r.u32().unwrap_or_default(),
    })
}

/// Encodes an option request header.
pub fn encode_option_header(code: u32, length: u32) -> [u8; consts::OPTION_HEADER_LEN] {
    let mut out = [0u8; consts::OPTION_HEADER_LEN];
    let (magic, rest) = out.split_at_mut(8);
    let (c, l) = rest.split_at_mut(4);
    magic.copy_from_slice(&consts::IHAVEOPT.to_be_bytes());
    c.copy_from_slice(&code.to_be_bytes());
    l.copy_from_slice(&length.to_be_bytes());
    out
}

/// An option request sent by the client during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: the whole payload is the export name.
    ExportName(String),
    /// `NBD_OPT_ABORT`. Any payload is ignored, as the spec requires.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info {
        /// Export name (empty selects the default export).
        name: String,
        /// Requested `NBD_INFO_*` items, in the order sent.
        info_requests: Vec<u16>,
    },
    /// `NBD_OPT_GO`.
    Go {
        /// Export name (empty selects the default export).
        name: String,
        /// Requested `NBD_INFO_*` items, in the order sent.
        info_requests: Vec<u16>,
    },
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext {
        /// Export the query refers to.
        export: String,
        /// Query strings (possibly empty: list everything).
        queries: Vec<String>,
    },
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext {
        /// Export the selection refers to.
        export: String,
        /// Query strings (empty: select nothing).
        queries: Vec<String>,
    },
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// Any other option code; its payload is ignored. The server answers
    /// `NBD_REP_ERR_UNSUP` and continues.
    Unknown(u32),
}

impl ClientOption {
    /// The option code of this option.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => consts::OPT_EXPORT_NAME,
            ClientOption::Abort => consts::OPT_ABORT,
            ClientOption::List => consts::OPT_LIST,
            ClientOption::StartTls => consts::OPT_STARTTLS,
            ClientOption::Info { .. } => consts::OPT_INFO,
            ClientOption::Go { .. } => consts::OPT_GO,
            ClientOption::StructuredReply => consts::OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext { .. } => consts::OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext { .. } => consts::OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => consts::OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(code) => *code,
        }
    }
}

fn invalid(code: u32, reason: &'static str) -> DecodeError {
    DecodeError::InvalidOption { code, reason }
}

fn expect_empty(code: u32, payload: &[u8], opt: ClientOption) -> Result<ClientOption, DecodeError> {
    if payload.is_empty() {
        Ok(opt)
    } else {
        Err(invalid(code, "option does not take a payload"))
    }
}

/// Decodes an option request from its code and payload.
///
/// Lengths are validated strictly: every embedded length must lie within
/// the payload and the payload must be consumed exactly. Strings must be
/// UTF-8 without NUL and at most 4096 bytes. `NBD_OPT_LIST`,
/// `NBD_OPT_STARTTLS`, `NBD_OPT_STRUCTURED_REPLY` and
/// `NBD_OPT_EXTENDED_HEADERS` with a non-empty payload are rejected with
/// [`DecodeError::InvalidOption`] (answer `NBD_REP_ERR_INVALID`).
/// `NBD_OPT_ABORT` ignores any payload, as the spec requires. Unknown codes
/// decode to [`ClientOption::Unknown`].
pub fn decode_option(code: u32, payload: &[u8]) -> Result<ClientOption, DecodeError> {
    if len_u64(payload.len()) > u64::from(MAX_OPTION_LEN) {
        return Err(DecodeError::TooLong {
            what: "option payload",
            len: len_u64(payload.len()),
            max: u64::from(MAX_OPTION_LEN),
        });
    }
    match code {
        consts::OPT_EXPORT_NAME => Ok(ClientOption::ExportName(decode_string(
            payload,
            "export name",
        )?)),
        consts::OPT_ABORT => Ok(ClientOption::Abort),
        consts::OPT_LIST => expect_empty(code, payload, ClientOption::List),
        consts::OPT_STARTTLS => expect_empty(code, payload, ClientOption::StartTls),
        consts::OPT_STRUCTURED_REPLY => expect_empty(code, payload, ClientOption::StructuredReply),
        consts::OPT_EXTENDED_HEADERS => expect_empty(code, payload, ClientOption::ExtendedHeaders),
        consts::OPT_INFO | consts::OPT_GO => {
            let (name, info_requests) = decode_info_payload(code, payload)?;
            if code == consts::OPT_INFO {
                Ok(ClientOption::Info {
                    name,
                    info_requests,
                })
            } else {
                Ok(ClientOption::Go {
                    name,
                    info_requests,
                })
            }
        }
        consts::OPT_LIST_META_CONTEXT | consts::OPT_SET_META_CONTEXT => {
            let (export, queries) = decode_meta_payload(code, payload)?;
            if code == consts::OPT_LIST_META_CONTEXT {
                Ok(ClientOption::ListMetaContext { export, queries })
            } else {
                Ok(ClientOption::SetMetaContext { export, queries })
            }
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` payload: u32 name length, name,
/// u16 count, count * u16 information requests.
fn decode_info_payload(code: u32, payload: &[u8]) -> Result<(String, Vec<u16>), DecodeError> {
    let mut r = Reader::new(payload);
    let name_len = r
        .u32()
        .ok_or_else(|| invalid(code, "payload shorter than name length field"))?;
    let name_bytes = r
        .bytes_u32(name_len)
        .ok_or_else(|| invalid(code, "name length exceeds payload"))?;
    let count = r
        .u16()
        .ok_or_else(|| invalid(code, "missing information request count"))?;
    let expected = usize::from(count).saturating_mul(2);
    if r.remaining() != expected {
        return Err(invalid(
            code,
            "information request count does not match payload length",
        ));
    }
    let name = decode_string(name_bytes, "export name")?;
    let mut requests = Vec::with_capacity(usize::from(count));
    while let Some(item) = r.u16() {
        requests.push(item);
    }
    Ok((name, requests))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` payload: u32 export name length,
/// name, u32 query count, then (u32 length, query) per query.
fn decode_meta_payload(code: u32, payload: &[u8]) -> Result<(String, Vec<String>), DecodeError> {
    let mut r = Reader::new(payload);
    let name_len = r
        .u32()
        .ok_or_else(|| invalid(code, "payload shorter than export name length field"))?;
    let name_bytes = r
        .bytes_u32(name_len)
        .ok_or_else(|| invalid(code, "export name length exceeds payload"))?;
    let export = decode_string(name_bytes, "export name")?;
    let count = r
        .u32()
        .ok_or_else(|| invalid(code, "missing query count"))?;
    // Each query needs at least its 4-byte length field; reject counts the
    // payload cannot possibly hold before allocating anything.
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    if count > r.remaining() / 4 {
        return Err(invalid(code, "query count exceeds payload"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = r
            .u32()
            .ok_or_else(|| invalid(code, "query length field exceeds payload"))?;
        let bytes = r
            .bytes_u32(len)
            .ok_or_else(|| invalid(code, "query length exceeds payload"))?;
        queries.push(decode_string(bytes, "metadata context query")?);
    }
    if !r.is_empty() {
        return Err(invalid(code, "trailing bytes after queries"));
    }
    Ok((export, queries))
}

/// Encodes the payload of an option request (client side).
///
/// Fails if a string violates the protocol rules (NUL, over 4096 bytes),
/// if there are more than 65535 information requests, or if the payload
/// would exceed [`MAX_OPTION_LEN`].
pub fn encode_option_payload(opt: &ClientOption) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    match opt {
        ClientOption::ExportName(name) => {
            check_string(name, "export name")?;
            out.extend_from_slice(name.as_bytes());
        }
        ClientOption::Abort
        | ClientOption::List
        | ClientOption::StartTls
        | ClientOption::StructuredReply
        | ClientOption::ExtendedHeaders
        | ClientOption::Unknown(_) => {}
        ClientOption::Info {
            name,
            info_requests,
        }
        | ClientOption::Go {
            name,
            info_requests,
        } => {
            check_string(name, "export name")?;
            let count = u16::try_from(info_requests.len()).map_err(|_| EncodeError::TooLong {
                what: "information request list",
                len: len_u64(info_requests.len()),
                max: u64::from(u16::MAX),
            })?;
            put_u32(&mut out, len_u32(name.len(), "export name")?);
            out.extend_from_slice(name.as_bytes());
            put_u16(&mut out, count);
            for &item in info_requests {
                put_u16(&mut out, item);
            }
        }
        ClientOption::ListMetaContext { export, queries }
        | ClientOption::SetMetaContext { export, queries } => {
            check_string(export, "export name")?;
            put_u32(&mut out, len_u32(export.len(), "export name")?);
            out.extend_from_slice(export.as_bytes());
            put_u32(&mut out, len_u32(queries.len(), "query list")?);
            for q in queries {
                check_string(q, "metadata context query")?;
                put_u32(&mut out, len_u32(q.len(), "metadata context query")?);
                out.extend_from_slice(q.as_bytes());
            }
        }
    }
    if len_u64(out.len()) > u64::from(MAX_OPTION_LEN) {
        return Err(EncodeError::TooLong {
            what: "option payload",
            len: len_u64(out.len()),
            max: u64::from(MAX_OPTION_LEN),
        });
    }
    Ok(out)
}

/// Encodes a complete option request (header and payload), client side.
pub fn encode_option(opt: &ClientOption) -> Result<Vec<u8>, EncodeError> {
    let payload = encode_option_payload(opt)?;
    encode_option_request(opt.code(), &payload)
}

/// Encodes a complete option request with an arbitrary payload (useful to
/// send unknown or deliberately malformed options in tests).
pub fn encode_option_request(code: u32, payload: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let len = len_u32(payload.len(), "option payload")?;
    let mut out = Vec::with_capacity(add_len(consts::OPTION_HEADER_LEN, payload.len(), "option")?);
    out.extend_from_slice(&encode_option_header(code, len));
    out.extend_from_slice(payload);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Option replies (server side encoders)
// ---------------------------------------------------------------------------

/// Encodes an option reply: magic, option, reply type, payload length,
/// payload. Fails only if the payload exceeds 2^32 - 1 bytes.
pub fn encode_option_reply(
    option: u32,
    reply_type: u32,
    payload: &[u8],
) -> Result<Vec<u8>, EncodeError> {
    let len = len_u32(payload.len(), "option reply payload")?;
    let mut out = Vec::with_capacity(add_len(
        consts::OPTION_REPLY_HEADER_LEN,
        payload.len(),
        "option reply",
    )?);
    put_option_reply_header(&mut out, option, reply_type, len);
    out.extend_from_slice(payload);
    Ok(out)
}

fn put_option_reply_header(out: &mut Vec<u8>, option: u32, reply_type: u32, len: u32) {
    put_u64(out, consts::OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, len);
}

fn fixed_reply<const N: usize>(option: u32, reply_type: u32, payload: &[u8]) -> [u8; N] {
    let mut v = Vec::with_capacity(N);
    put_option_reply_header(
        &mut v,
        option,
        reply_type,
        u32::try_from(payload.len()).unwrap_or(u32::MAX),
    );
    v.extend_from_slice(payload);
    let mut out = [0u8; N];
    for (dst, src) in out.iter_mut().zip(v.iter()) {
        *dst = *src;
    }
    out
}

/// Encodes `NBD_REP_ACK` for `option` (20 bytes, no payload).
pub fn encode_ack(option: u32) -> [u8; consts::OPTION_REPLY_HEADER_LEN] {
    fixed_reply(option, consts::REP_ACK, &[])
}

/// Encodes one `NBD_REP_SERVER` entry of an `NBD_OPT_LIST` reply:
/// u32 name length, name.
pub fn encode_server(name: &str) -> Result<Vec<u8>, EncodeError> {
    check_string(name, "export name")?;
    let mut payload = Vec::with_capacity(add_len(4, name.len(), "export name")?);
    put_u32(&mut payload, len_u32(name.len(), "export name")?);
    payload.extend_from_slice(name.as_bytes());
    encode_option_reply(consts::OPT_LIST, consts::REP_SERVER, &payload)
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_EXPORT` (size, transmission flags)
/// in reply to `option` (`NBD_OPT_INFO` or `NBD_OPT_GO`): 32 bytes.
pub fn encode_info_export(option: u32, size: u64, transmission_flags: u16) -> [u8; 32] {
    let mut payload = Vec::with_capacity(12);
    put_u16(&mut payload, consts::INFO_EXPORT);
    put_u64(&mut payload, size);
    put_u16(&mut payload, transmission_flags);
    fixed_reply(option, consts::REP_INFO, &payload)
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` (minimum, preferred,
/// maximum block size) in reply to `option`: 34 bytes.
pub fn encode_info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> [u8; 34] {
    let mut payload = Vec::with_capacity(14);
    put_u16(&mut payload, consts::INFO_BLOCK_SIZE);
    put_u32(&mut payload, minimum);
    put_u32(&mut payload, preferred);
    put_u32(&mut payload, maximum);
    fixed_reply(option, consts::REP_INFO, &payload)
}

fn encode_info_string(option: u32, info_type: u16, s: &str) -> Result<Vec<u8>, EncodeError> {
    check_string(s, "information string")?;
    let mut payload = Vec::with_capacity(add_len(2, s.len(), "information string")?);
    put_u16(&mut payload, info_type);
    payload.extend_from_slice(s.as_bytes());
    encode_option_reply(option, consts::REP_INFO, &payload)
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_NAME` (canonical export name).
pub fn encode_info_name(option: u32, name: &str) -> Result<Vec<u8>, EncodeError> {
    encode_info_string(option, consts::INFO_NAME, name)
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
pub fn encode_info_description(option: u32, description: &str) -> Result<Vec<u8>, EncodeError> {
    encode_info_string(option, consts::INFO_DESCRIPTION, description)
}

/// Encodes `NBD_REP_META_CONTEXT`: u32 context id, context name. For
/// `NBD_OPT_LIST_META_CONTEXT` the id SHOULD be zero.
pub fn encode_meta_context(
    option: u32,
    context_id: u32,
    name: &str,
) -> Result<Vec<u8>, EncodeError> {
    check_string(name, "metadata context name")?;
    let mut payload = Vec::with_capacity(add_len(4, name.len(), "metadata context name")?);
    put_u32(&mut payload, context_id);
    payload.extend_from_slice(name.as_bytes());
    encode_option_reply(option, consts::REP_META_CONTEXT, &payload)
}

/// Encodes an error reply (`reply_type` should be one of the
/// `REP_ERR_*` constants) with an optional human-readable message.
///
/// The message is sanitised rather than rejected: NUL characters are
/// dropped and it is truncated on a character boundary to 4096 bytes, so
/// this never fails.
pub fn encode_error_reply(option: u32, reply_type: u32, message: Option<&str>) -> Vec<u8> {
    let msg = sanitize_message(message.unwrap_or(""), MAX_STRING_LEN);
    let mut out = Vec::with_capacity(consts::OPTION_REPLY_HEADER_LEN.saturating_add(msg.len()));
    // The sanitised message is at most 4096 bytes, so it fits in u32.
    put_option_reply_header(
        &mut out,
        option,
        reply_type,
        u32::try_from(msg.len()).unwrap_or(0),
    );
    out.extend_from_slice(msg.as_bytes());
    out
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME`: u64 export size, u16
/// transmission flags, then 124 zero bytes unless `no_zeroes` (the client
/// set `NBD_FLAG_C_NO_ZEROES`). 10 or 134 bytes.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + consts::EXPORT_NAME_REPLY_ZEROES);
    put_u64(&mut out, size);
    put_u16(&mut out, transmission_flags);
    if !no_zeroes {
        out.resize(10 + consts::EXPORT_NAME_REPLY_ZEROES, 0);
    }
    out
}

/// Decodes the reply to `NBD_OPT_EXPORT_NAME` (client side) and returns
/// `(size, transmission_flags)`. Requires 10 bytes, or 134 when
/// `no_zeroes` is false; the reserved bytes are not checked.
pub fn decode_export_name_reply(buf: &[u8], no_zeroes: bool) -> Result<(u64, u16), DecodeError> {
    let len = if no_zeroes {
        10
    } else {
        10 + consts::EXPORT_NAME_REPLY_ZEROES
    };
    need(buf, len)?;
    let mut r = Reader::new(buf);
    Ok((r.u64().unwrap_or_default(), r.u16().unwrap_or_default()))
}

// ---------------------------------------------------------------------------
// Option replies (client side decoders)
// ---------------------------------------------------------------------------

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being replied to.
    pub option: u32,
    /// Reply type (`NBD_REP_*`).
    pub reply_type: u32,
    /// Payload length.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Whether the reply type is an error (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.reply_type & consts::REP_FLAG_ERROR != 0
    }
}

/// Decodes the first 20 bytes of `buf` as an option reply header after
/// checking the option reply magic.
pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, DecodeError> {
    need(buf, consts::OPTION_REPLY_HEADER_LEN)?;
    let mut r = Reader::new(buf);
    let magic = r.u64().unwrap_or_default();
    if magic != consts::OPTION_REPLY_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: consts::OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: r.u32().unwrap_or_default(),
        reply_type: r.u32().unwrap_or_default(),
        length: r.u32().unwrap_or_default(),
    })
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        maximum: u32,
    },
    /// An information type this crate does not know (clients must ignore
    /// it).
    Unknown {
        /// The information type.
        info_type: u16,
        /// Its raw data.
        data: Vec<u8>,
    },
}

/// A decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReply {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`.
    Server {
        /// Export name.
        name: String,
        /// Implementation-specific details following the name (often
        /// empty), decoded leniently.
        details: String,
    },
    /// `NBD_REP_INFO`.
    Info(InfoReply),
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id.
        id: u32,
        /// Context name.
        name: String,
    },
    /// Any error reply (bit 31 set).
    Error {
        /// The `NBD_REP_ERR_*` type.
        reply_type: u32,
        /// The message, decoded leniently (invalid UTF-8 replaced).
        message: String,
    },
    /// A non-error reply type this crate does not know.
    Unknown {
        /// The reply type.
        reply_type: u32,
        /// The raw payload.
        payload: Vec<u8>,
    },
}

fn bad_reply(reply_type: u32, reason: &'static str) -> DecodeError {
    DecodeError::InvalidOptionReply { reply_type, reason }
}

/// Decodes an option reply payload; `payload.len()` must equal
/// `header.length`.
///
/// Names are decoded strictly (UTF-8, no NUL, at most 4096 bytes); error
/// messages and `NBD_REP_SERVER` details are only for display and are
/// decoded leniently.
pub fn decode_option_reply(
    header: &OptionReplyHeader,
    payload: &[u8],
) -> Result<OptionReply, DecodeError> {
    if len_u64(payload.len()) != u64::from(header.length) {
        return Err(DecodeError::LengthMismatch {
            what: "option reply payload",
            expected: u64::from(header.length),
            found: len_u64(payload.len()),
        });
    }
    let t = header.reply_type;
    if header.is_error() {
        return Ok(OptionReply::Error {
            reply_type: t,
            message: String::from_utf8_lossy(payload).into_owned(),
        });
    }
    let mut r = Reader::new(payload);
    match t {
        consts::REP_ACK => {
            if payload.is_empty() {
                Ok(OptionReply::Ack)
            } else {
                Err(bad_reply(t, "ACK with payload"))
            }
        }
        consts::REP_SERVER => {
            let len = r.u32().ok_or_else(|| bad_reply(t, "missing name length"))?;
            let name = r
                .bytes_u32(len)
                .ok_or_else(|| bad_reply(t, "name length exceeds payload"))?;
            Ok(OptionReply::Server {
                name: decode_string(name, "export name")?,
                details: String::from_utf8_lossy(r.rest()).into_owned(),
            })
        }
        consts::REP_INFO => decode_info_reply(payload).map(OptionReply::Info),
        consts::REP_META_CONTEXT => {
            let id = r.u32().ok_or_else(|| bad_reply(t, "missing context id"))?;
            Ok(OptionReply::MetaContext {
                id,
                name: decode_string(r.rest(), "metadata context name")?,
            })
        }
        _ => Ok(OptionReply::Unknown {
            reply_type: t,
            payload: payload.to_vec(),
        }),
    }
}

fn decode_info_reply(payload: &[u8]) -> Result<InfoReply, DecodeError> {
    let t = consts::REP_INFO;
    let mut r = Reader::new(payload);
    let info_type = r
        .u16()
        .ok_or_else(|| bad_reply(t, "missing information type"))?;
    match info_type {
        consts::INFO_EXPORT => {
            if payload.len() != 12 {
                return Err(bad_reply(t, "NBD_INFO_EXPORT length must be 12"));
            }
            Ok(InfoReply::Export {
                size: r.u64().unwrap_or_default(),
                flags: r.u16().unwrap_or_default(),
            })
        }
        consts::INFO_NAME => Ok(InfoReply::Name(decode_string(r.rest(), "export name")?)),
        consts::INFO_DESCRIPTION => Ok(InfoReply::Description(decode_string(
            r.rest(),
            "export description",
        )?)),
        consts::INFO_BLOCK_SIZE => {
            if payload.len() != 14 {
                return Err(bad_reply(t, "NBD_INFO_BLOCK_SIZE length must be 14"));
            }
            Ok(InfoReply::BlockSize {
                minimum: r.u32().unwrap_or_default(),
                preferred: r.u32().unwrap_or_default(),
                maximum: r.u32().unwrap_or_default(),
            })
        }
        other => Ok(InfoReply::Unknown {
            info_type: other,
            data: r.rest().to_vec(),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proto::consts::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(g.len(), 18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0x00, 0x03]);
        assert_eq!(decode_greeting(&g), Ok(3));
    }

    #[test]
    fn greeting_rejections() {
        let mut g = encode_greeting(1);
        assert!(matches!(
            decode_greeting(&g[..17]),
            Err(DecodeError::Truncated { need: 18, have: 17 })
        ));
        g[0] = b'X';
        assert!(matches!(
            decode_greeting(&g),
            Err(DecodeError::BadMagic {
                expected: NBDMAGIC,
                ..
            })
        ));
        let mut old = Vec::new();
        old.extend_from_slice(&NBDMAGIC.to_be_bytes());
        old.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        old.extend_from_slice(&[0, 0]);
        assert_eq!(
            decode_greeting(&old),
            Err(DecodeError::BadMagic {
                expected: IHAVEOPT,
                found: CLISERV_MAGIC
            })
        );
    }

    #[test]
    fn client_flags_table() {
        let adv = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        let cases: &[(u32, u16, Result<u32, DecodeError>)] = &[
            (0, adv, Ok(0)),
            (1, adv, Ok(1)),
            (2, adv, Ok(2)),
            (3, adv, Ok(3)),
            (
                3,
                FLAG_FIXED_NEWSTYLE,
                Err(DecodeError::UnadvertisedClientFlags(2)),
            ),
            (1, 0, Err(DecodeError::UnadvertisedClientFlags(1))),
            (4, adv, Err(DecodeError::UnknownClientFlags(4))),
            (
                0x8000_0001,
                adv,
                Err(DecodeError::UnknownClientFlags(0x8000_0000)),
            ),
        ];
        for (flags, advertised, expected) in cases {
            let bytes = encode_client_flags(*flags);
            assert_eq!(
                &decode_client_flags(&bytes, *advertised),
                expected,
                "{flags:#x}"
            );
        }
        assert!(matches!(
            decode_client_flags(&[0, 0, 0], adv),
            Err(DecodeError::Truncated { need: 4, have: 3 })
        ));
    }

    #[test]
    fn option_header_layout() {
        let h = encode_option_header(OPT_GO, 0x0102_0304);
        assert_eq!(
            h,
            [
                b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 7, 1, 2, 3, 4
            ]
        );
        assert_eq!(
            decode_option_header(&h),
            Ok(OptionHeader {
                code: 7,
                length: 0x0102_0304
            })
        );
        assert!(decode_option_header(&h).unwrap().check_len().is_err());
        let ok = OptionHeader {
            code: 7,
            length: MAX_OPTION_LEN,
        };
        assert!(ok.check_len().is_ok());
        assert_eq!(decode_option_header(&ok.encode()), Ok(ok));
        let mut bad = h;
        bad[7] = b'U';
        assert!(matches!(
            decode_option_header(&bad),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(matches!(
            decode_option_header(&h[..15]),
            Err(DecodeError::Truncated { need: 16, have: 15 })
        ));
    }

    fn all_options() -> Vec<ClientOption> {
        vec![
            ClientOption::ExportName(String::new()),
            ClientOption::ExportName("disk0".into()),
            ClientOption::ExportName("ünïcödé".into()),
            ClientOption::Abort,
            ClientOption::List,
            ClientOption::StartTls,
            ClientOption::Info {
                name: "a".into(),
                info_requests: vec![],
            },
            ClientOption::Info {
                name: String::new(),
                info_requests: vec![INFO_EXPORT, INFO_BLOCK_SIZE],
            },
            ClientOption::Go {
                name: "export".into(),
                info_requests: vec![INFO_NAME, INFO_DESCRIPTION, 77],
            },
            ClientOption::StructuredReply,
            ClientOption::ListMetaContext {
                export: "e".into(),
                queries: vec![],
            },
            ClientOption::ListMetaContext {
                export: String::new(),
                queries: vec!["base:".into(), "qemu:".into()],
            },
            ClientOption::SetMetaContext {
                export: "e".into(),
                queries: vec![META_CONTEXT_BASE_ALLOCATION.into()],
            },
            ClientOption::ExtendedHeaders,
            ClientOption::Unknown(4),
            ClientOption::Unknown(12),
            ClientOption::Unknown(0),
            ClientOption::Unknown(u32::MAX),
        ]
    }

    #[test]
    fn option_round_trips() {
        for opt in all_options() {
            let bytes = encode_option(&opt).unwrap();
            let h = decode_option_header(&bytes).unwrap();
            assert_eq!(h.code, opt.code());
            h.check_len().unwrap();
            let payload = &bytes[OPTION_HEADER_LEN..];
            assert_eq!(payload.len(), h.length as usize);
            assert_eq!(decode_option(h.code, payload).unwrap(), opt);
        }
    }

    #[test]
    fn option_payload_layouts() {
        let go = encode_option_payload(&ClientOption::Go {
            name: "ab".into(),
            info_requests: vec![3, 1],
        })
        .unwrap();
        assert_eq!(go, [0, 0, 0, 2, b'a', b'b', 0, 2, 0, 3, 0, 1]);
        let set = encode_option_payload(&ClientOption::SetMetaContext {
            export: "x".into(),
            queries: vec!["b:".into()],
        })
        .unwrap();
        assert_eq!(set, [0, 0, 0, 1, b'x', 0, 0, 0, 1, 0, 0, 0, 2, b'b', b':']);
        let name = encode_option_payload(&ClientOption::ExportName("xy".into())).unwrap();
        assert_eq!(name, b"xy");
    }

    #[test]
    fn options_without_payload_reject_data() {
        for code in [
            OPT_LIST,
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            OPT_EXTENDED_HEADERS,
        ] {
            let e = decode_option(code, &[0]).unwrap_err();
            assert!(matches!(e, DecodeError::InvalidOption { code: c, .. } if c == code));
            assert_eq!(e.option_reply_type(), REP_ERR_INVALID);
        }
        // The spec says servers SHOULD ignore data sent with NBD_OPT_ABORT.
        assert_eq!(
            decode_option(OPT_ABORT, &[1, 2, 3]),
            Ok(ClientOption::Abort)
        );
        // Unknown options ignore their payload.
        assert_eq!(decode_option(4, &[1, 2, 3]), Ok(ClientOption::Unknown(4)));
        assert_eq!(decode_option(1000, &[]), Ok(ClientOption::Unknown(1000)));
    }

    #[test]
    fn info_payload_rejections() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "empty"),
            (&[0, 0, 0], "short name length"),
            (&[0, 0, 0, 5, b'a'], "name beyond payload"),
            (&[0, 0, 0, 1, b'a'], "missing count"),
            (&[0, 0, 0, 1, b'a', 0], "half count"),
            (&[0, 0, 0, 1, b'a', 0, 1], "count beyond payload"),
            (&[0, 0, 0, 1, b'a', 0, 1, 0], "half request"),
            (&[0, 0, 0, 1, b'a', 0, 0, 0, 0], "trailing bytes"),
            (&[0, 0, 0, 1, b'a', 0, 1, 0, 0, 9], "odd trailing byte"),
            (&[0xff, 0xff, 0xff, 0xff, 0, 0], "huge name length"),
        ];
        for code in [OPT_INFO, OPT_GO] {
            for (payload, what) in cases {
                let e = decode_option(code, payload).unwrap_err();
                assert!(
                    matches!(e, DecodeError::InvalidOption { .. }),
                    "{what}: {e:?}"
                );
                assert_eq!(e.option_reply_type(), REP_ERR_INVALID, "{what}");
            }
            assert_eq!(
                decode_option(code, &[0, 0, 0, 1, 0xff, 0, 0]),
                Err(DecodeError::InvalidUtf8 {
                    what: "export name"
                })
            );
            assert_eq!(
                decode_option(code, &[0, 0, 0, 1, 0, 0, 0]),
                Err(DecodeError::ContainsNul {
                    what: "export name"
                })
            );
        }
    }

    #[test]
    fn meta_payload_rejections() {
        let cases: &[(&[u8], &str)] = &[
            (&[], "empty"),
            (&[0, 0, 0, 2, b'a'], "name beyond payload"),
            (&[0, 0, 0, 0], "missing count"),
            (&[0, 0, 0, 0, 0, 0, 0, 1], "count beyond payload"),
            (
                &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
                "huge count",
            ),
            (
                &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, b'a', b':'],
                "query beyond payload",
            ),
            (&[0, 0, 0, 0, 0, 0, 0, 0, 1], "trailing byte"),
            (
                &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 7],
                "trailing after query",
            ),
        ];
        for code in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            for (payload, what) in cases {
                let e = decode_option(code, payload).unwrap_err();
                assert!(
                    matches!(e, DecodeError::InvalidOption { .. }),
                    "{what}: {e:?}"
                );
            }
            assert_eq!(
                decode_option(code, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0x80]),
                Err(DecodeError::InvalidUtf8 {
                    what: "metadata context query"
                })
            );
        }
    }

    #[test]
    fn oversize_and_long_names() {
        let big = vec![b'a'; MAX_OPTION_LEN as usize + 1];
        let e = decode_option(OPT_EXPORT_NAME, &big).unwrap_err();
        assert!(matches!(e, DecodeError::TooLong { .. }));
        assert_eq!(e.option_reply_type(), REP_ERR_TOO_BIG);
        // Unknown options are limited too.
        assert!(decode_option(999, &big).is_err());
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(matches!(
            decode_option(OPT_EXPORT_NAME, &long),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(encode_option(&ClientOption::ExportName("a".repeat(MAX_STRING_LEN + 1))).is_err());
        assert!(encode_option(&ClientOption::ExportName("a\0".into())).is_err());
        let too_many = ClientOption::Go {
            name: String::new(),
            info_requests: vec![0; 65536],
        };
        assert!(encode_option(&too_many).is_err());
        let too_big = ClientOption::SetMetaContext {
            export: String::new(),
            queries: vec!["x:".repeat(100); 400],
        };
        assert!(matches!(
            encode_option(&too_big),
            Err(EncodeError::TooLong { .. })
        ));
        assert_eq!(
            encode_option_request(5, &[]).unwrap(),
            encode_option_header(5, 0)
        );
    }

    #[test]
    fn option_reply_layouts() {
        let ack = encode_ack(OPT_STRUCTURED_REPLY);
        let expected: [u8; 20] = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // magic
            0, 0, 0, 8, // option
            0, 0, 0, 1, // NBD_REP_ACK
            0, 0, 0, 0, // length
        ];
        assert_eq!(ack, expected);
        let info = encode_info_export(OPT_GO, 0x1122_3344_5566_7788, 0x0103);
        assert_eq!(&info[12..16], &[0, 0, 0, 3]);
        assert_eq!(&info[16..20], &[0, 0, 0, 12]);
        assert_eq!(
            &info[20..],
            &[
                0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x01, 0x03
            ]
        );
        let bs = encode_info_block_size(OPT_INFO, 1, 4096, 1 << 25);
        assert_eq!(&bs[16..20], &[0, 0, 0, 14]);
        assert_eq!(&bs[20..], &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
        let server = encode_server("ab").unwrap();
        assert_eq!(&server[8..12], &[0, 0, 0, 3]);
        assert_eq!(&server[12..16], &[0, 0, 0, 2]);
        assert_eq!(&server[16..20], &[0, 0, 0, 6]);
        assert_eq!(&server[20..], &[0, 0, 0, 2, b'a', b'b']);
        let mc = encode_meta_context(OPT_SET_META_CONTEXT, 7, "base:allocation").unwrap();
        assert_eq!(&mc[12..16], &[0, 0, 0, 4]);
        assert_eq!(&mc[20..24], &[0, 0, 0, 7]);
        assert_eq!(&mc[24..], b"base:allocation");
        let err = encode_error_reply(OPT_GO, REP_ERR_UNKNOWN, Some("no such export"));
        assert_eq!(&err[12..16], &[0x80, 0, 0, 6]);
        assert_eq!(&err[16..20], &[0, 0, 0, 14]);
        assert_eq!(&err[20..], b"no such export");
        assert_eq!(encode_error_reply(9, REP_ERR_UNSUP, None).len(), 20);
        let long = encode_error_reply(9, REP_ERR_UNSUP, Some(&"é".repeat(3000)));
        assert_eq!(long.len(), 20 + 4096);
    }

    #[test]
    fn export_name_reply() {
        let r = encode_export_name_reply(1 << 30, 0x0001, false);
        assert_eq!(r.len(), 134);
        assert_eq!(&r[..10], &[0, 0, 0, 0, 0x40, 0, 0, 0, 0, 1]);
        assert!(r[10..].iter().all(|&b| b == 0));
        assert_eq!(decode_export_name_reply(&r, false), Ok((1 << 30, 1)));
        let r = encode_export_name_reply(5, 3, true);
        assert_eq!(r.len(), 10);
        assert_eq!(decode_export_name_reply(&r, true), Ok((5, 3)));
        assert!(decode_export_name_reply(&r, false).is_err());
    }

    fn roundtrip_reply(bytes: &[u8]) -> (OptionReplyHeader, OptionReply) {
        let h = decode_option_reply_header(bytes).unwrap();
        let r = decode_option_reply(&h, &bytes[OPTION_REPLY_HEADER_LEN..]).unwrap();
        (h, r)
    }

    #[test]
    fn option_reply_round_trips() {
        let cases: Vec<(Vec<u8>, u32, OptionReply)> = vec![
            (encode_ack(OPT_ABORT).to_vec(), OPT_ABORT, OptionReply::Ack),
            (
                encode_server("disk").unwrap(),
                OPT_LIST,
                OptionReply::Server {
                    name: "disk".into(),
                    details: String::new(),
                },
            ),
            (
                encode_info_export(OPT_GO, 42, 0x4d).to_vec(),
                OPT_GO,
                OptionReply::Info(InfoReply::Export {
                    size: 42,
                    flags: 0x4d,
                }),
            ),
            (
                encode_info_name(OPT_INFO, "canon").unwrap(),
                OPT_INFO,
                OptionReply::Info(InfoReply::Name("canon".into())),
            ),
            (
                encode_info_description(OPT_INFO, "a disk").unwrap(),
                OPT_INFO,
                OptionReply::Info(InfoReply::Description("a disk".into())),
            ),
            (
                encode_info_block_size(OPT_GO, 512, 4096, 65536).to_vec(),
                OPT_GO,
                OptionReply::Info(InfoReply::BlockSize {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 65536,
                }),
            ),
            (
                encode_meta_context(OPT_LIST_META_CONTEXT, 0, "base:allocation").unwrap(),
                OPT_LIST_META_CONTEXT,
                OptionReply::MetaContext {
                    id: 0,
                    name: "base:allocation".into(),
                },
            ),
            (
                encode_error_reply(OPT_GO, REP_ERR_POLICY, Some("nope")),
                OPT_GO,
                OptionReply::Error {
                    reply_type: REP_ERR_POLICY,
                    message: "nope".into(),
                },
            ),
            (
                encode_option_reply(OPT_GO, REP_INFO, &[0, 9, 1, 2]).unwrap(),
                OPT_GO,
                OptionReply::Info(InfoReply::Unknown {
                    info_type: 9,
                    data: vec![1, 2],
                }),
            ),
            (
                encode_option_reply(OPT_GO, 77, &[5]).unwrap(),
                OPT_GO,
                OptionReply::Unknown {
                    reply_type: 77,
                    payload: vec![5],
                },
            ),
        ];
        for (bytes, option, expected) in cases {
            let (h, r) = roundtrip_reply(&bytes);
            assert_eq!(h.option, option);
            assert_eq!(r, expected);
        }
        for t in [
            REP_ERR_UNSUP,
            REP_ERR_POLICY,
            REP_ERR_INVALID,
            REP_ERR_PLATFORM,
            REP_ERR_TLS_REQD,
            REP_ERR_UNKNOWN,
            REP_ERR_SHUTDOWN,
            REP_ERR_BLOCK_SIZE_REQD,
            REP_ERR_TOO_BIG,
            REP_ERR_EXT_HEADER_REQD,
        ] {
            let (h, r) = roundtrip_reply(&encode_error_reply(1, t, None));
            assert!(h.is_error());
            assert_eq!(
                r,
                OptionReply::Error {
                    reply_type: t,
                    message: String::new()
                }
            );
        }
    }

    #[test]
    fn option_reply_rejections() {
        let bad_magic = [0u8; 20];
        assert!(matches!(
            decode_option_reply_header(&bad_magic),
            Err(DecodeError::BadMagic { .. })
        ));
        assert!(decode_option_reply_header(&encode_ack(1)[..19]).is_err());
        let hdr = |t, len| OptionReplyHeader {
            option: 1,
            reply_type: t,
            length: len,
        };
        let cases: &[(OptionReplyHeader, &[u8])] = &[
            (hdr(REP_ACK, 1), &[0]),
            (hdr(REP_ACK, 2), &[0]),
            (hdr(REP_SERVER, 2), &[0, 0]),
            (hdr(REP_SERVER, 5), &[0, 0, 0, 2, b'a']),
            (hdr(REP_INFO, 1), &[0]),
            (hdr(REP_INFO, 11), &[0; 11]),
            (hdr(REP_INFO, 13), &[0; 13]),
            (hdr(REP_INFO, 13), &[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            (hdr(REP_META_CONTEXT, 3), &[0, 0, 0]),
            (hdr(REP_META_CONTEXT, 5), &[0, 0, 0, 0, 0xc3]),
        ];
        for (h, payload) in cases {
            assert!(
                decode_option_reply(h, payload).is_err(),
                "{h:?} {payload:?}"
            );
        }
    }
}
