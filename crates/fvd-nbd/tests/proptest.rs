//! Property tests: no decoder panics on arbitrary input, and encoders and
//! decoders round-trip.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use fvd_nbd::proto::consts::{self, *};
use fvd_nbd::proto::handshake::{self, ClientOption};
use fvd_nbd::proto::reply::{self, ChunkPayload, ReplyHeader, ReplyTo};
use fvd_nbd::proto::request::{self, Command, Request};
use fvd_nbd::proto::transmission::{self, TransmissionContext};
use proptest::prelude::*;

/// Random bytes, often prefixed by a valid magic so that decoders get past
/// their first check and exercise the deeper paths.
fn fuzz_input() -> impl Strategy<Value = Vec<u8>> {
    let prefixes: Vec<Vec<u8>> = vec![
        vec![],
        IHAVEOPT.to_be_bytes().to_vec(),
        [NBDMAGIC.to_be_bytes(), IHAVEOPT.to_be_bytes()].concat(),
        OPTION_REPLY_MAGIC.to_be_bytes().to_vec(),
        REQUEST_MAGIC.to_be_bytes().to_vec(),
        EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec(),
        SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec(),
        STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec(),
        EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec(),
    ];
    (
        proptest::sample::select(prefixes),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(mut prefix, tail)| {
            prefix.extend_from_slice(&tail);
            prefix
        })
}

fn small_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![Just(0u8), Just(1u8), Just(0xffu8), any::<u8>()],
        0..80,
    )
}

fn name() -> impl Strategy<Value = String> + Clone {
    "[a-zA-Z0-9:_\\-é/]{0,24}"
}

fn client_option() -> impl Strategy<Value = ClientOption> {
    let info_reqs = proptest::collection::vec(any::<u16>(), 0..8);
    let queries = proptest::collection::vec(name(), 0..6);
    prop_oneof![
        name().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        (name(), info_reqs.clone()).prop_map(|(name, info_requests)| ClientOption::Info {
            name,
            info_requests
        }),
        (name(), info_reqs).prop_map(|(name, info_requests)| ClientOption::Go {
            name,
            info_requests
        }),
        Just(ClientOption::StructuredReply),
        (name(), queries.clone())
            .prop_map(|(export, queries)| ClientOption::ListMetaContext { export, queries }),
        (name(), queries)
            .prop_map(|(export, queries)| ClientOption::SetMetaContext { export, queries }),
        Just(ClientOption::ExtendedHeaders),
        (12u32..).prop_map(ClientOption::Unknown),
        Just(ClientOption::Unknown(OPT_PEEK_EXPORT)),
        Just(ClientOption::Unknown(0)),
    ]
}

/// The kinds of chunk the server can produce, with their parameters.
#[derive(Debug, Clone)]
enum Chunk {
    None,
    Data(u64, Vec<u8>),
    Hole(u64, u32),
    Error(u32, String),
    ErrorOffset(u32, String, u64),
    Status(u32, Vec<(u32, u32)>),
    StatusExt(u32, Vec<(u64, u64)>),
}

fn chunk() -> impl Strategy<Value = Chunk> {
    prop_oneof![
        Just(Chunk::None),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(o, d)| Chunk::Data(o, d)),
        (any::<u64>(), 1u32..).prop_map(|(o, l)| Chunk::Hole(o, l)),
        (1u32.., ".{0,40}").prop_map(|(e, m)| Chunk::Error(e, m)),
        (1u32.., ".{0,40}", any::<u64>()).prop_map(|(e, m, o)| Chunk::ErrorOffset(e, m, o)),
        (
            any::<u32>(),
            proptest::collection::vec((1u32.., any::<u32>()), 1..10)
        )
            .prop_map(|(id, d)| Chunk::Status(id, d)),
        (
            any::<u32>(),
            proptest::collection::vec((1u64.., any::<u64>()), 1..10)
        )
            .prop_map(|(id, d)| Chunk::StatusExt(id, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn fuzz_decode_never_panics(bytes in fuzz_input()) {
        fvd_nbd::fuzz_decode(&bytes);
    }

    #[test]
    fn each_decoder_never_panics(bytes in fuzz_input(), code in any::<u32>(), t in any::<u16>(),
                                 flags in any::<u16>(), ext in any::<bool>()) {
        let _ = handshake::decode_greeting(&bytes);
        let _ = handshake::decode_client_flags(&bytes, flags);
        let _ = handshake::decode_option_header(&bytes);
        let _ = handshake::decode_option(code, &bytes);
        let _ = handshake::decode_option(code % 13, &bytes);
        let _ = handshake::decode_option_reply_header(&bytes);
        let _ = handshake::decode_export_name_reply(&bytes, ext);
        let _ = request::decode_request(&bytes, ext);
        let _ = reply::reply_header_len(&bytes, ext);
        let _ = reply::decode_reply_header(&bytes, ext);
        let _ = transmission::decode_block_status_payload(&bytes);
        let h = reply::ChunkHeader {
            flags,
            reply_type: t,
            cookie: 0,
            offset: ext.then_some(0),
            length: bytes.len() as u64,
        };
        let _ = reply::decode_chunk_payload(&h, &bytes);
        let h = reply::ChunkHeader { reply_type: t % 8, ..h };
        let _ = reply::decode_chunk_payload(&h, &bytes);
        let h = reply::ChunkHeader { reply_type: 0x8000 | (t % 4), ..h };
        let _ = reply::decode_chunk_payload(&h, &bytes);
        let oh = handshake::OptionReplyHeader {
            option: code,
            reply_type: code % 5,
            length: bytes.len() as u32,
        };
        let _ = handshake::decode_option_reply(&oh, &bytes);
    }

    #[test]
    fn option_payload_decoders_never_panic(payload in small_bytes(), code in 0u32..13) {
        if let Ok(opt) = handshake::decode_option(code, &payload) {
            // Anything accepted re-encodes to something that decodes equal.
            let enc = handshake::encode_option_payload(&opt).unwrap();
            prop_assert_eq!(handshake::decode_option(code, &enc).unwrap(), opt);
        }
    }

    #[test]
    fn option_round_trip(opt in client_option()) {
        let bytes = handshake::encode_option(&opt).unwrap();
        let h = handshake::decode_option_header(&bytes).unwrap();
        prop_assert!(h.check_len().is_ok());
        prop_assert_eq!(h.code, opt.code());
        prop_assert_eq!(h.length as usize, bytes.len() - OPTION_HEADER_LEN);
        let decoded = handshake::decode_option(h.code, &bytes[OPTION_HEADER_LEN..]).unwrap();
        prop_assert_eq!(decoded, opt);
    }

    #[test]
    fn request_round_trip(flags in any::<u16>(), cmd in any::<u16>(), cookie in any::<u64>(),
                          offset in any::<u64>(), len32 in any::<u32>(), len64 in any::<u64>()) {
        let mut req = Request {
            flags,
            command: Command::from_u16(cmd),
            cookie,
            offset,
            length: u64::from(len32),
        };
        let compact = request::encode_request(&req, false).unwrap();
        prop_assert_eq!(compact.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(request::decode_request(&compact, false).unwrap(), req);
        req.length = len64;
        let extended = request::encode_request(&req, true).unwrap();
        prop_assert_eq!(extended.len(), EXTENDED_REQUEST_HEADER_LEN);
        prop_assert_eq!(request::decode_request(&extended, true).unwrap(), req);
        prop_assert_eq!(request::encode_request(&req, false).is_ok(), len64 <= u64::from(u32::MAX));
    }

    #[test]
    fn validation_is_total(flags in any::<u16>(), cmd in 0u16..12, offset in any::<u64>(),
                           length in any::<u64>(), size in any::<u64>(), eflags in any::<u16>(),
                           sr in any::<bool>(), ext in any::<bool>(), bs in any::<bool>(),
                           min in prop_oneof![Just(0u32), Just(1), Just(512), any::<u32>()],
                           max in any::<u32>()) {
        let req = Request { flags, command: Command::from_u16(cmd), cookie: 0, offset, length };
        let ctx = TransmissionContext {
            export_size: size,
            export_flags: eflags,
            structured_replies: sr,
            extended_headers: ext,
            block_status: bs,
            min_block_size: min,
            max_payload: max,
        };
        match transmission::validate_request(&req, &ctx) {
            Ok(()) => {
                // Accepted requests never carry an oversize payload and, except
                // for the documented exceptions, lie within the export.
                prop_assert!(req.payload_len(ext) <= u64::from(max));
                let payload_form = ext && req.has_flags(CMD_FLAG_PAYLOAD_LEN);
                if !matches!(req.command, Command::Disc | Command::Flush | Command::Resize)
                    && !payload_form
                {
                    prop_assert!(offset.checked_add(length).is_some_and(|e| e <= size));
                }
            }
            Err(e) => prop_assert!([EPERM, EINVAL, ENOSPC].contains(&e)),
        }
    }

    #[test]
    fn chunk_round_trip(c in chunk(), cookie in any::<u64>(), req_off in any::<u64>(),
                        ext in any::<bool>(), done in any::<bool>()) {
        let to = if ext { ReplyTo::extended(cookie, req_off) } else { ReplyTo::compact(cookie) };
        let (bytes, expected, expect_done) = match &c {
            Chunk::None => (reply::none_done(to), ChunkPayload::None, true),
            Chunk::Data(o, d) => (
                reply::offset_data(to, *o, d, done).unwrap(),
                ChunkPayload::OffsetData { offset: *o, data: d },
                done,
            ),
            Chunk::Hole(o, l) => (
                reply::offset_hole(to, *o, *l, done).unwrap(),
                ChunkPayload::OffsetHole { offset: *o, length: *l },
                done,
            ),
            Chunk::Error(e, m) => (
                reply::error_chunk(to, *e, m, done),
                ChunkPayload::Error { error: *e, message: m.replace('\0', "") },
                done,
            ),
            Chunk::ErrorOffset(e, m, o) => (
                reply::error_offset_chunk(to, *e, m, *o, done),
                ChunkPayload::ErrorOffset { error: *e, message: m.replace('\0', ""), offset: *o },
                done,
            ),
            Chunk::Status(id, d) => (
                reply::block_status(to, *id, d, done).unwrap(),
                ChunkPayload::BlockStatus { context_id: *id, descriptors: d.clone() },
                done,
            ),
            Chunk::StatusExt(id, d) => {
                if !ext {
                    prop_assert!(reply::block_status_ext(to, *id, d, done).is_err());
                    return Ok(());
                }
                (
                    reply::block_status_ext(to, *id, d, done).unwrap(),
                    ChunkPayload::BlockStatusExt { context_id: *id, descriptors: d.clone() },
                    done,
                )
            }
        };
        let hlen = reply::reply_header_len(&bytes, ext).unwrap();
        let header = match reply::decode_reply_header(&bytes, ext).unwrap() {
            ReplyHeader::Chunk(h) => h,
            ReplyHeader::Simple(_) => return Err(TestCaseError::fail("simple reply")),
        };
        prop_assert_eq!(header.cookie, cookie);
        prop_assert_eq!(header.offset, ext.then_some(req_off));
        prop_assert_eq!(header.is_done(), expect_done);
        prop_assert_eq!(header.length as usize, bytes.len() - hlen);
        let payload = reply::decode_chunk_payload(&header, &bytes[hlen..]).unwrap();
        prop_assert_eq!(payload, expected);
    }

    #[test]
    fn simple_reply_round_trip(cookie in any::<u64>(), error in any::<u32>()) {
        let bytes = reply::encode_simple_reply(cookie, error);
        prop_assert_eq!(
            reply::decode_reply_header(&bytes, false).unwrap(),
            ReplyHeader::Simple(reply::SimpleReply { error, cookie })
        );
    }

    #[test]
    fn option_reply_round_trip(option in any::<u32>(), n in name(), id in any::<u32>(),
                               size in any::<u64>(), flags in any::<u16>()) {
        for bytes in [
            handshake::encode_server(&n).unwrap(),
            handshake::encode_meta_context(option, id, &n).unwrap(),
            handshake::encode_info_export(option, size, flags).to_vec(),
            handshake::encode_info_name(option, &n).unwrap(),
            handshake::encode_error_reply(option, consts::REP_ERR_INVALID, Some(&n)),
        ] {
            let h = handshake::decode_option_reply_header(&bytes).unwrap();
            prop_assert_eq!(h.length as usize, bytes.len() - OPTION_REPLY_HEADER_LEN);
            prop_assert!(handshake::decode_option_reply(&h, &bytes[OPTION_REPLY_HEADER_LEN..]).is_ok());
        }
    }
}
