//! The NBD protocol as bytes: a pure codec, without I/O.
//!
//! It covers the fixed newstyle handshake ([`handshake`]), compact and
//! extended transmission requests ([`request`]), simple, structured and
//! extended replies ([`reply`]), and request validation
//! ([`transmission`]). Constants live in [`consts`], errors in [`error`].
//! The client ([`crate::client`]) and the server ([`crate::server`]) are
//! built on it; nothing here depends on them.
//!
//! Every decoder is total: it returns an error rather than panicking on
//! any input, never allocates more than a small multiple of its input, and
//! uses checked arithmetic throughout.

pub mod consts;
pub mod error;
pub mod handshake;
pub mod reply;
pub mod request;
pub mod transmission;
mod wire;

pub use error::{
    DecodeError, EncodeError, nbd_error_from_errno, nbd_error_from_io_error, nbd_error_from_io_kind,
};
pub use handshake::{ClientOption, MAX_OPTION_LEN, OptionHeader};
pub use reply::{ChunkHeader, ChunkPayload, ReplyHeader, ReplyTo, SimpleReply};
pub use request::{Command, Request, decode_request, encode_request};
pub use transmission::{MAX_PAYLOAD, TransmissionContext, validate_request};

/// Runs every decoder of the crate on `bytes` (for fuzzing). It must never
/// panic, whatever the input; results are discarded.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) {
    use wire::Reader;

    let mut r = Reader::new(bytes);
    let selector = r.u32().unwrap_or_default();
    let rest = r.rest();

    // Handshake.
    let _ = handshake::decode_greeting(bytes);
    let _ = handshake::decode_client_flags(bytes, u16::try_from(selector & 3).unwrap_or(0));
    if let Ok(h) = handshake::decode_option_header(bytes) {
        let _ = h.check_len();
        let payload = bytes.get(consts::OPTION_HEADER_LEN..).unwrap_or_default();
        let _ = handshake::decode_option(h.code, payload);
    }
    for code in 0..=12 {
        if let Ok(opt) = handshake::decode_option(code, bytes) {
            // Whatever decodes must re-encode and decode to the same value.
            if let Ok(enc) = handshake::encode_option_payload(&opt) {
                let _ = handshake::decode_option(code, &enc);
            }
        }
    }
    let _ = handshake::decode_option(selector, rest);
    let _ = handshake::decode_export_name_reply(bytes, false);
    let _ = handshake::decode_export_name_reply(bytes, true);
    if let Ok(h) = handshake::decode_option_reply_header(bytes) {
        let payload = bytes
            .get(consts::OPTION_REPLY_HEADER_LEN..)
            .unwrap_or_default();
        let _ = handshake::decode_option_reply(&h, payload);
    }
    for reply_type in [
        consts::REP_ACK,
        consts::REP_SERVER,
        consts::REP_INFO,
        consts::REP_META_CONTEXT,
        consts::REP_ERR_UNSUP,
        selector,
    ] {
        let h = handshake::OptionReplyHeader {
            option: consts::OPT_GO,
            reply_type,
            length: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        };
        let _ = handshake::decode_option_reply(&h, bytes);
    }

    // Requests and their validation.
    for extended in [false, true] {
        if let Ok(req) = request::decode_request(bytes, extended) {
            let _ = req.payload_len(extended);
            let mut ctx = transmission::TransmissionContext::new(
                u64::from(selector).wrapping_mul(4096),
                u16::try_from(selector >> 16).unwrap_or(0),
            );
            ctx.extended_headers = extended;
            ctx.structured_replies = selector & 1 != 0;
            ctx.block_status = selector & 2 != 0;
            ctx.min_block_size = selector & 0xfff;
            let _ = transmission::validate_request(&req, &ctx);
            let _ = request::encode_request(&req, extended);
        }
    }
    let _ = transmission::decode_block_status_payload(bytes);

    // Replies.
    for extended in [false, true] {
        let _ = reply::reply_header_len(bytes, extended);
        if let Ok(reply::ReplyHeader::Chunk(h)) = reply::decode_reply_header(bytes, extended) {
            let payload = bytes.get(h.encoded_len()..).unwrap_or_default();
            let _ = reply::decode_chunk_payload(&h, payload);
        }
    }
    let len = reply::ChunkHeader {
        flags: 0,
        reply_type: 0,
        cookie: 0,
        offset: None,
        length: 0,
    };
    for reply_type in [
        consts::REPLY_TYPE_NONE,
        consts::REPLY_TYPE_OFFSET_DATA,
        consts::REPLY_TYPE_OFFSET_HOLE,
        consts::REPLY_TYPE_BLOCK_STATUS,
        consts::REPLY_TYPE_BLOCK_STATUS_EXT,
        consts::REPLY_TYPE_ERROR,
        consts::REPLY_TYPE_ERROR_OFFSET,
        u16::try_from(selector & 0xffff).unwrap_or(0),
    ] {
        for offset in [None, Some(0)] {
            let h = reply::ChunkHeader {
                flags: u16::try_from(selector >> 16).unwrap_or(0),
                reply_type,
                offset,
                length: u64::try_from(rest.len()).unwrap_or(u64::MAX),
                ..len
            };
            let _ = reply::decode_chunk_payload(&h, rest);
        }
    }
}
