//! A complete handshake and a few transmission requests, driven through
//! the codec only: the client's byte stream is built with the encoders and
//! parsed back with the decoders as a server would, and vice versa.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use fvd_nbd::proto::consts::*;
use fvd_nbd::proto::handshake::{self, ClientOption, InfoReply, OptionReply};
use fvd_nbd::proto::reply::{self, ChunkPayload, ReplyHeader, ReplyTo};
use fvd_nbd::proto::request::{self, Command, Request};
use fvd_nbd::proto::transmission::{self, TransmissionContext};

/// A byte stream consumed front to back.
struct Stream {
    data: Vec<u8>,
    pos: usize,
}

impl Stream {
    fn new(data: Vec<u8>) -> Self {
        Stream { data, pos: 0 }
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        s
    }

    fn peek(&self, n: usize) -> &[u8] {
        &self.data[self.pos..self.pos + n]
    }

    fn done(&self) -> bool {
        self.pos == self.data.len()
    }
}

const EXPORT_SIZE: u64 = 64 << 20;
const EXPORT_FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM;

/// Server-side handling of one option; returns the replies and whether
/// transmission starts.
fn serve_option(code: u32, payload: &[u8], extended: &mut bool) -> (Vec<u8>, bool) {
    let opt = match handshake::decode_option(code, payload) {
        Ok(opt) => opt,
        Err(e) => {
            return (
                handshake::encode_error_reply(code, e.option_reply_type(), Some(&e.to_string())),
                false,
            );
        }
    };
    match opt {
        ClientOption::ExtendedHeaders => {
            *extended = true;
            (handshake::encode_ack(code).to_vec(), false)
        }
        ClientOption::List => {
            let mut out = handshake::encode_server("disk").unwrap();
            out.extend_from_slice(&handshake::encode_ack(code));
            (out, false)
        }
        ClientOption::SetMetaContext { queries, .. } => {
            let mut out = Vec::new();
            if queries.iter().any(|q| q == META_CONTEXT_BASE_ALLOCATION) {
                out.extend(
                    handshake::encode_meta_context(code, 1, META_CONTEXT_BASE_ALLOCATION).unwrap(),
                );
            }
            out.extend_from_slice(&handshake::encode_ack(code));
            (out, false)
        }
        ClientOption::Go { name, .. } if name == "disk" => {
            let mut out = handshake::encode_info_export(code, EXPORT_SIZE, EXPORT_FLAGS).to_vec();
            out.extend_from_slice(&handshake::encode_ack(code));
            (out, true)
        }
        ClientOption::Go { .. } | ClientOption::Info { .. } => (
            handshake::encode_error_reply(code, REP_ERR_UNKNOWN, Some("no such export")),
            false,
        ),
        _ => (
            handshake::encode_error_reply(code, REP_ERR_UNSUP, None),
            false,
        ),
    }
}

#[test]
fn handshake_and_transmission() {
    // ---- Client side: everything it sends. ----
    let mut client =
        handshake::encode_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_vec();
    let options = [
        ClientOption::Unknown(42),
        ClientOption::ExtendedHeaders,
        ClientOption::List,
        ClientOption::SetMetaContext {
            export: "disk".into(),
            queries: vec![META_CONTEXT_BASE_ALLOCATION.into()],
        },
        ClientOption::Go {
            name: "nope".into(),
            info_requests: vec![],
        },
        ClientOption::Go {
            name: "disk".into(),
            info_requests: vec![INFO_BLOCK_SIZE],
        },
    ];
    for opt in &options {
        client.extend(handshake::encode_option(opt).unwrap());
    }
    // A malformed option in the middle would be answered with ERR_INVALID;
    // check that separately below. Now transmission requests.
    let write = Request {
        flags: CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        command: Command::Write,
        cookie: 1,
        offset: 4096,
        length: 5,
    };
    client.extend(request::encode_request(&write, true).unwrap());
    client.extend_from_slice(b"hello");
    let read = Request {
        flags: 0,
        command: Command::Read,
        cookie: 2,
        offset: EXPORT_SIZE - 512,
        length: 1024,
    };
    client.extend(request::encode_request(&read, true).unwrap());
    let disc = Request {
        flags: 0,
        command: Command::Disc,
        cookie: 3,
        offset: 0,
        length: 0,
    };
    client.extend(request::encode_request(&disc, true).unwrap());

    // ---- Server side: parse the stream and produce replies. ----
    let advertised = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
    let mut server_out = handshake::encode_greeting(advertised).to_vec();
    let mut s = Stream::new(client);
    let cflags = handshake::decode_client_flags(s.take(4), advertised).unwrap();
    assert_eq!(cflags, 3);
    let mut extended = false;
    loop {
        let h = handshake::decode_option_header(s.take(OPTION_HEADER_LEN)).unwrap();
        h.check_len().unwrap();
        let payload = s.take(h.length as usize).to_vec();
        let (out, go) = serve_option(h.code, &payload, &mut extended);
        server_out.extend(out);
        if go {
            break;
        }
    }
    assert!(extended);
    let ctx = TransmissionContext {
        extended_headers: true,
        block_status: true,
        ..TransmissionContext::new(EXPORT_SIZE, EXPORT_FLAGS)
    };
    let mut written = Vec::new();
    loop {
        let req = request::decode_request(s.take(EXTENDED_REQUEST_HEADER_LEN), true).unwrap();
        let payload = s.take(req.payload_len(true) as usize).to_vec();
        let to = ReplyTo::for_request(&req, true);
        if req.command == Command::Disc {
            break;
        }
        match transmission::validate_request(&req, &ctx) {
            Ok(()) => {
                written.extend(payload);
                server_out.extend(reply::none_done(to));
            }
            Err(e) => server_out.extend(reply::error_chunk(to, e, "rejected", true)),
        }
    }
    assert!(s.done());
    assert_eq!(written, b"hello");

    // ---- Client side: parse the server's stream. ----
    let mut s = Stream::new(server_out);
    assert_eq!(
        handshake::decode_greeting(s.take(GREETING_LEN)).unwrap(),
        advertised
    );
    let mut replies = Vec::new();
    loop {
        let h = handshake::decode_option_reply_header(s.take(OPTION_REPLY_HEADER_LEN)).unwrap();
        let payload = s.take(h.length as usize).to_vec();
        let r = handshake::decode_option_reply(&h, &payload).unwrap();
        let finished_go = h.option == OPT_GO && r == OptionReply::Ack;
        replies.push((h.option, r));
        if finished_go {
            break;
        }
    }
    let expected = vec![
        (
            42,
            OptionReply::Error {
                reply_type: REP_ERR_UNSUP,
                message: String::new(),
            },
        ),
        (OPT_EXTENDED_HEADERS, OptionReply::Ack),
        (
            OPT_LIST,
            OptionReply::Server {
                name: "disk".into(),
                details: String::new(),
            },
        ),
        (OPT_LIST, OptionReply::Ack),
        (
            OPT_SET_META_CONTEXT,
            OptionReply::MetaContext {
                id: 1,
                name: META_CONTEXT_BASE_ALLOCATION.into(),
            },
        ),
        (OPT_SET_META_CONTEXT, OptionReply::Ack),
        (
            OPT_GO,
            OptionReply::Error {
                reply_type: REP_ERR_UNKNOWN,
                message: "no such export".into(),
            },
        ),
        (
            OPT_GO,
            OptionReply::Info(InfoReply::Export {
                size: EXPORT_SIZE,
                flags: EXPORT_FLAGS,
            }),
        ),
        (OPT_GO, OptionReply::Ack),
    ];
    assert_eq!(replies, expected);

    // Transmission replies: write succeeded, read out of range failed.
    let mut results = Vec::new();
    while !s.done() {
        let n = reply::reply_header_len(s.peek(4), true).unwrap();
        let h = match reply::decode_reply_header(s.take(n), true).unwrap() {
            ReplyHeader::Chunk(h) => h,
            ReplyHeader::Simple(_) => panic!("simple reply in extended mode"),
        };
        let payload = s.take(h.length as usize).to_vec();
        let p = reply::decode_chunk_payload(&h, &payload).unwrap();
        results.push((h.cookie, h.offset, format!("{p:?}")));
    }
    assert_eq!(
        results,
        vec![
            (1, Some(4096), format!("{:?}", ChunkPayload::None)),
            (
                2,
                Some(EXPORT_SIZE - 512),
                format!(
                    "{:?}",
                    ChunkPayload::Error {
                        error: EINVAL,
                        message: "rejected".into()
                    }
                )
            ),
        ]
    );
}

#[test]
fn malformed_options_get_error_replies_and_negotiation_continues() {
    let mut extended = false;
    let cases: &[(u32, &[u8], u32)] = &[
        (OPT_STRUCTURED_REPLY, &[1], REP_ERR_INVALID),
        (OPT_EXTENDED_HEADERS, &[0, 0], REP_ERR_INVALID),
        (OPT_LIST, &[9], REP_ERR_INVALID),
        (OPT_STARTTLS, &[9], REP_ERR_INVALID),
        (OPT_GO, &[0, 0, 0, 9], REP_ERR_INVALID),
        (OPT_INFO, &[0, 0, 0, 1, 0xfe, 0, 0], REP_ERR_INVALID),
        (
            OPT_SET_META_CONTEXT,
            &[0, 0, 0, 0, 0, 0, 0, 2],
            REP_ERR_INVALID,
        ),
        (77, &[1, 2, 3], REP_ERR_UNSUP),
    ];
    for &(code, payload, expected) in cases {
        let (out, go) = serve_option(code, payload, &mut extended);
        assert!(!go);
        let h = handshake::decode_option_reply_header(&out).unwrap();
        assert_eq!(h.option, code);
        assert_eq!(h.reply_type, expected, "option {code}");
        assert_eq!(h.length as usize, out.len() - OPTION_REPLY_HEADER_LEN);
    }
    assert!(!extended);
}
