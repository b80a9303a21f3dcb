//! `fvd serve` driven by the fvd-nbd client step by step (raw bytes where
//! a test plays a broken client):
//! option negotiation (every option, its errors, the server-side
//! fallbacks), old-style `EXPORT_NAME` with simple replies, extended
//! headers, block status, and robustness against broken clients.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod nbd_support;

use fvd_core::Format;
use fvd_nbd::proto::consts::*;
use fvd_nbd::proto::handshake::{self, ClientOption, InfoReply, OptionReply};
use fvd_nbd::proto::request::{Command as Cmd, Request, encode_request};
use nbd_support::*;

const SIZE: u64 = 16 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("a.fvd");
    create_fvd(&p, Some(SIZE), None);
    p
}

fn err_type(r: &OptionReply) -> u32 {
    match r {
        OptionReply::Error { reply_type, .. } => *reply_type,
        OptionReply::Ack => REP_ACK,
        other => panic!("unexpected reply {other:?}"),
    }
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    handshake::encode_option_payload(&ClientOption::SetMetaContext {
        export: export.into(),
        queries: queries.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap()
}

#[test]
fn export_name_and_simple_replies() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);

    // A fixed-newstyle client without NO_ZEROES: 134-byte EXPORT_NAME reply.
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE);
    c.send(&handshake::encode_option_request(OPT_EXPORT_NAME, b"").unwrap());
    let r = c.read_n(134);
    let (size, flags) = handshake::decode_export_name_reply(&r, false).unwrap();
    assert_eq!(size, SIZE);
    assert_ne!(flags & FLAG_SEND_FLUSH, 0);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(flags & FLAG_SEND_DF, 0, "no DF without structured replies");
    assert_eq!(flags & FLAG_READ_ONLY, 0);

    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.request(Cmd::Write, CMD_FLAG_FUA, 1, 4096, 8192, &data);
    let r = c.reply();
    assert_eq!((r.cookie, r.error()), (1, 0));
    c.request(Cmd::Read, 0, 2, 4096, 8192, &[]);
    let r = c.reply();
    assert!(r.simple);
    assert_eq!((r.cookie, r.error()), (2, 0));
    assert_eq!(r.data, data);
    c.request(Cmd::Flush, 0, 3, 0, 0, &[]);
    assert_eq!(c.reply().error(), 0);
    c.request(Cmd::Trim, 0, 4, 4096, 4096, &[]);
    assert_eq!(c.reply().error(), 0);
    c.request(Cmd::WriteZeroes, CMD_FLAG_NO_HOLE, 5, 8192, 4096, &[]);
    assert_eq!(c.reply().error(), 0);
    c.request(Cmd::Read, 0, 6, 4096, 8192, &[]);
    assert_eq!(c.reply().data, vec![0u8; 8192]);
    c.request(Cmd::Cache, 0, 7, 0, 65536, &[]);
    assert_eq!(c.reply().error(), 0);
    // No metadata context, no structured replies: block status is refused.
    c.request(Cmd::BlockStatus, 0, 8, 0, 4096, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    // Out of range, unknown command, forbidden flag.
    c.request(Cmd::Read, 0, 9, SIZE - 512, 1024, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    c.request(Cmd::Write, 0, 10, SIZE, 512, &[0u8; 512]);
    assert_eq!(c.reply().error(), ENOSPC);
    c.request(Cmd::Unknown(42), 0, 11, 0, 0, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    c.request(Cmd::Read, CMD_FLAG_DF, 12, 0, 512, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    // Still in sync after all the errors.
    c.request(Cmd::Read, 0, 13, 4096, 4096, &[]);
    assert_eq!(c.reply().data, vec![0u8; 4096]);
    c.request(Cmd::Disc, 0, 14, 0, 0, &[]);
    assert!(c.closed_by_server());

    // A non-fixed newstyle client (flags 0) with NO_ZEROES unset.
    let mut c = Client::connect(&sock, 0);
    c.send(&handshake::encode_option_request(OPT_EXPORT_NAME, b"").unwrap());
    let (size, _) = handshake::decode_export_name_reply(&c.read_n(134), false).unwrap();
    assert_eq!(size, SIZE);
    c.request(Cmd::Read, 0, 1, 8192, 512, &[]);
    let got = c.reply().data;
    assert_eq!(got, vec![0u8; 512]);
    // A non-fixed client may send nothing but EXPORT_NAME.
    let mut c = Client::connect(&sock, 0);
    c.send(&handshake::encode_option_request(OPT_LIST, b"").unwrap());
    assert!(c.closed_by_server());
    // EXPORT_NAME with an unknown name: the only answer is a hang-up.
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.send(&handshake::encode_option_request(OPT_EXPORT_NAME, b"nope").unwrap());
    assert!(c.closed_by_server());

    assert!(server.running());
    assert!(server.terminate().success());
}

#[test]
fn option_negotiation() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &["--export-name", "disk"]);
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    // Unknown options: ERR_UNSUP, and the negotiation goes on.
    for code in [4, 12, 99, 0x7fff_ffff] {
        let r = c.option(code, b"junk");
        assert_eq!(err_type(&r[0].1), REP_ERR_UNSUP, "option {code}");
    }
    // LIST: one export, then ACK.
    let r = c.option(OPT_LIST, b"");
    assert_eq!(r.len(), 2);
    assert!(matches!(&r[0].1, OptionReply::Server { name, .. } if name == "disk"));
    // LIST with a payload is invalid.
    assert_eq!(err_type(&c.option(OPT_LIST, b"x")[0].1), REP_ERR_INVALID);
    // STARTTLS without TLS configured.
    assert_eq!(err_type(&c.option(OPT_STARTTLS, b"")[0].1), REP_ERR_UNSUP);
    // Oversized option payload: read, dropped, TOO_BIG.
    let big = vec![7u8; (handshake::MAX_OPTION_LEN + 1000) as usize];
    assert_eq!(err_type(&c.option(99, &big)[0].1), REP_ERR_TOO_BIG);
    // Malformed GO payload.
    assert_eq!(
        err_type(&c.option(OPT_GO, &[0, 0, 0, 9])[0].1),
        REP_ERR_INVALID
    );
    // INFO for an unknown export, then for the right one.
    let info = |name: &str| {
        handshake::encode_option_payload(&ClientOption::Info {
            name: name.into(),
            info_requests: vec![INFO_NAME, INFO_BLOCK_SIZE],
        })
        .unwrap()
    };
    assert_eq!(
        err_type(&c.option(OPT_INFO, &info("other"))[0].1),
        REP_ERR_UNKNOWN
    );
    let r = c.option(OPT_INFO, &info("disk"));
    assert!(r.iter().any(
        |(_, x)| matches!(x, OptionReply::Info(InfoReply::Export { size, .. }) if *size == SIZE)
    ));
    assert!(
        r.iter()
            .any(|(_, x)| matches!(x, OptionReply::Info(InfoReply::Name(n)) if n == "disk"))
    );
    assert!(r.iter().any(|(_, x)| matches!(
        x,
        OptionReply::Info(InfoReply::BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 33554432
        })
    )));
    // Metadata contexts need structured replies first.
    let set = meta_payload("disk", &["base:allocation"]);
    assert_eq!(
        err_type(&c.option(OPT_SET_META_CONTEXT, &set)[0].1),
        REP_ERR_INVALID
    );
    // Structured replies, twice.
    assert_eq!(err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1), REP_ACK);
    assert_eq!(
        err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1),
        REP_ERR_INVALID
    );
    // Extended headers after structured replies; then structured is refused.
    assert_eq!(err_type(&c.option(OPT_EXTENDED_HEADERS, b"")[0].1), REP_ACK);
    assert_eq!(
        err_type(&c.option(OPT_EXTENDED_HEADERS, b"")[0].1),
        REP_ERR_INVALID
    );
    assert_eq!(
        err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1),
        REP_ERR_EXT_HEADER_REQD
    );
    c.extended = true;
    c.structured = true;
    // LIST_META_CONTEXT with no query lists both contexts.
    let list = handshake::encode_option_payload(&ClientOption::ListMetaContext {
        export: "disk".into(),
        queries: vec![],
    })
    .unwrap();
    let names: Vec<String> = c
        .option(OPT_LIST_META_CONTEXT, &list)
        .into_iter()
        .filter_map(|(_, r)| match r {
            OptionReply::MetaContext { name, .. } => Some(name),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["base:allocation", "qemu:allocation-depth"]);
    // SET for the wrong export, then a real selection (unknown names ignored).
    assert_eq!(
        err_type(
            &c.option(
                OPT_SET_META_CONTEXT,
                &meta_payload("x", &["base:allocation"])
            )[0]
            .1
        ),
        REP_ERR_UNKNOWN
    );
    let set = meta_payload(
        "disk",
        &["base:allocation", "x-foo:bar", "qemu:allocation-depth"],
    );
    let ids: Vec<(u32, String)> = c
        .option(OPT_SET_META_CONTEXT, &set)
        .into_iter()
        .filter_map(|(_, r)| match r {
            OptionReply::MetaContext { id, name } => Some((id, name)),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    let base_id = ids.iter().find(|(_, n)| n == "base:allocation").unwrap().0;
    let depth_id = ids
        .iter()
        .find(|(_, n)| n == "qemu:allocation-depth")
        .unwrap()
        .0;

    let (size, flags) = c.go("disk");
    assert_eq!(size, SIZE);
    for f in [
        FLAG_HAS_FLAGS,
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_DF,
        FLAG_CAN_MULTI_CONN,
        FLAG_SEND_CACHE,
        FLAG_SEND_FAST_ZERO,
        FLAG_BLOCK_STATUS_PAYLOAD,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }

    // Extended-header transmission: a write, a sparse read, block status.
    let data = vec![0x5au8; 65536];
    c.request(Cmd::Write, CMD_FLAG_PAYLOAD_LEN, 1, 1 << 20, 65536, &data);
    assert_eq!(c.reply().error(), 0);
    c.request(Cmd::Read, 0, 2, (1 << 20) - 65536, 3 * 65536, &[]);
    let r = c.reply();
    assert!(!r.simple);
    assert!(
        r.chunks.iter().any(|c| matches!(c, Chunk::Hole { .. })),
        "{:?}",
        r.chunks
    );
    let got = r.data;
    assert_eq!(&got[..65536], &[0u8; 65536][..]);
    assert_eq!(&got[65536..131072], &data[..]);
    assert_eq!(&got[131072..], &[0u8; 65536][..]);
    // DF: one data chunk.
    c.request(Cmd::Read, CMD_FLAG_DF, 3, 0, 4 * 65536, &[]);
    let chunks = c.reply().chunks;
    assert_eq!(chunks.len(), 1);
    assert!(matches!(
        chunks[0],
        Chunk::Data {
            offset: 0,
            length: 262144
        }
    ));
    // Block status for both contexts.
    c.request(Cmd::BlockStatus, 0, 4, 0, SIZE, &[]);
    let chunks = c.reply().chunks;
    assert_eq!(chunks.len(), 2);
    for ch in &chunks {
        let Chunk::Status {
            context_id: id,
            descriptors: d,
        } = ch
        else {
            panic!("{ch:?}")
        };
        assert_eq!(d.iter().map(|x| x.0).sum::<u64>(), SIZE);
        if *id == base_id {
            assert_eq!(
                d,
                &vec![
                    (1 << 20, u64::from(STATE_HOLE | STATE_ZERO)),
                    (65536, 0),
                    (SIZE - (1 << 20) - 65536, u64::from(STATE_HOLE | STATE_ZERO))
                ]
            );
        } else {
            assert_eq!(*id, depth_id);
            assert_eq!(d, &vec![(SIZE, 1)]);
        }
    }
    // REQ_ONE and the payload form selecting one context.
    let payload =
        fvd_nbd::proto::transmission::encode_block_status_payload(SIZE - (1 << 20), &[base_id]);
    c.request(
        Cmd::BlockStatus,
        CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_REQ_ONE,
        5,
        1 << 20,
        payload.len() as u64,
        &payload,
    );
    assert_eq!(
        c.reply().chunks,
        vec![Chunk::Status {
            context_id: base_id,
            descriptors: vec![(65536, 0)]
        }]
    );
    // A context id that was not selected.
    let payload = fvd_nbd::proto::transmission::encode_block_status_payload(SIZE, &[77]);
    c.request(
        Cmd::BlockStatus,
        CMD_FLAG_PAYLOAD_LEN,
        6,
        0,
        payload.len() as u64,
        &payload,
    );
    assert_eq!(c.reply().error(), EINVAL);
    // Errors come as error chunks.
    c.request(Cmd::Read, 0, 7, SIZE, 1, &[]);
    let r = c.reply();
    assert!(!r.simple && matches!(r.chunks[0], Chunk::Error { error: EINVAL, .. }));
    // Options after GO are not requests: the server hangs up.
    c.send(&handshake::encode_option_request(OPT_LIST, &[0u8; 16]).unwrap());
    assert!(c.closed_by_server());

    // ABORT ends a negotiation politely.
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(err_type(&c.option(OPT_ABORT, b"")[0].1), REP_ACK);
    assert!(c.closed_by_server());
    // GO for the empty name on an export named "disk" is refused.
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE);
    let go = handshake::encode_option_payload(&ClientOption::Go {
        name: String::new(),
        info_requests: vec![],
    })
    .unwrap();
    assert_eq!(err_type(&c.option(OPT_GO, &go)[0].1), REP_ERR_UNKNOWN);

    assert!(server.terminate().success());
}

#[test]
fn server_forced_fallbacks() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let sock = t.path().join("s.sock");
    {
        let mut server = Server::unix(&img, &sock, &["--no-extended-headers"]);
        let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(
            err_type(&c.option(OPT_EXTENDED_HEADERS, b"")[0].1),
            REP_ERR_UNSUP
        );
        assert_eq!(err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1), REP_ACK);
        c.structured = true;
        let set = meta_payload("", &["base:allocation"]);
        assert_eq!(c.option(OPT_SET_META_CONTEXT, &set).len(), 2);
        let (_, flags) = c.go("");
        assert_ne!(flags & FLAG_SEND_DF, 0);
        assert_eq!(flags & FLAG_BLOCK_STATUS_PAYLOAD, 0);
        c.request(Cmd::Write, 0, 1, 0, 4096, &[1u8; 4096]);
        assert_eq!(c.reply().error(), 0);
        c.request(Cmd::Read, 0, 2, 0, 4096, &[]);
        let r = c.reply();
        assert!(!r.simple);
        assert_eq!(r.data, vec![1u8; 4096]);
        c.request(Cmd::BlockStatus, CMD_FLAG_REQ_ONE, 3, 0, 65536, &[]);
        assert_eq!(
            c.reply().chunks,
            vec![Chunk::Status {
                context_id: 0,
                descriptors: vec![(4096, 0)]
            }]
        );
        assert!(server.terminate().success());
    }
    {
        let mut server = Server::unix(&img, &sock, &["--no-structured-replies"]);
        let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        assert_eq!(
            err_type(&c.option(OPT_EXTENDED_HEADERS, b"")[0].1),
            REP_ERR_UNSUP
        );
        assert_eq!(
            err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1),
            REP_ERR_UNSUP
        );
        let (_, flags) = c.go("");
        assert_eq!(flags & FLAG_SEND_DF, 0);
        c.request(Cmd::Read, 0, 2, 0, 4096, &[]);
        let r = c.reply();
        assert!(r.simple);
        assert_eq!(r.error(), 0);
        assert_eq!(r.data, vec![1u8; 4096]);
        assert!(server.terminate().success());
    }
}

#[test]
fn broken_clients_do_not_hurt_the_server() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);
    let ready = |extended: bool| {
        let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        if extended {
            assert_eq!(err_type(&c.option(OPT_EXTENDED_HEADERS, b"")[0].1), REP_ACK);
            c.extended = true;
            c.structured = true;
        }
        c.go("");
        c
    };
    // A healthy connection kept open throughout.
    let mut healthy = ready(true);
    healthy.request(Cmd::Write, 0, 1, 0, 512, &[9u8; 512]);
    assert_eq!(healthy.reply().error(), 0);

    // Garbage instead of an option header.
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE);
    c.send(&[0xffu8; 16]);
    assert!(c.closed_by_server());
    // Unknown client flags.
    let mut c = Client::connect(&sock, 0x80);
    assert!(c.closed_by_server());
    // Bad request magic.
    let mut c = ready(false);
    c.send(&[0x12u8; 28]);
    assert!(c.closed_by_server());
    // A compact request in extended mode is a bad magic too.
    let mut c = ready(true);
    let compact = Request {
        flags: 0,
        command: Cmd::Read,
        cookie: 1,
        offset: 0,
        length: 512,
    };
    let mut bytes = encode_request(&compact, false).unwrap();
    bytes.extend_from_slice(&[0u8; 4]);
    c.send(&bytes);
    assert!(c.closed_by_server());
    // A 4 GiB write: EINVAL, then a hang-up (the payload is not read).
    let mut c = ready(false);
    c.request(Cmd::Write, 0, 77, 0, u64::from(u32::MAX), &[0u8; 4096]);
    let r = c.reply();
    assert_eq!((r.cookie, r.error()), (77, EINVAL));
    assert!(c.closed_by_server());
    // The same with extended headers and a 2^40 payload.
    let mut c = ready(true);
    c.request(Cmd::Write, CMD_FLAG_PAYLOAD_LEN, 78, 0, 1 << 40, &[0u8; 64]);
    assert_eq!(c.reply().error(), EINVAL);
    assert!(c.closed_by_server());
    // Out of range, oversized read, unknown command: errors, connection lives.
    let mut c = ready(false);
    c.request(Cmd::Read, 0, 1, u64::MAX - 10, 100, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    c.request(Cmd::Read, 0, 2, 0, 64 << 20, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    c.request(Cmd::Write, 0, 3, SIZE - 100, 200, &[1u8; 200]);
    assert_eq!(c.reply().error(), ENOSPC);
    c.request(Cmd::Unknown(200), 0, 4, 0, 0, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    c.request(Cmd::Trim, 0, 5, SIZE, 1, &[]);
    assert_eq!(c.reply().error(), EINVAL);
    c.request(Cmd::Read, 0, 6, 0, 512, &[]);
    assert_eq!(c.reply().data, vec![9u8; 512]);
    // Vanishing mid-request: half a payload, then gone.
    let mut c = ready(false);
    c.request(Cmd::Write, 0, 1, 0, 1 << 20, &[3u8; 1000]);
    drop(c);
    // Vanishing mid-header and mid-handshake.
    let mut c = ready(true);
    c.send(&[0x21, 0xe4]);
    drop(c);
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE);
    c.send(&handshake::encode_option_request(OPT_GO, &[0u8; 20]).unwrap()[..10]);
    drop(c);
    // Many requests, then gone without reading a single reply.
    let mut c = ready(false);
    for i in 0..300 {
        c.request(Cmd::Read, 0, i, 0, 1 << 20, &[]);
    }
    drop(c);

    // The healthy connection and new ones still work.
    healthy.request(Cmd::Read, 0, 2, 0, 512, &[]);
    assert_eq!(healthy.reply().data, vec![9u8; 512]);
    let mut c = ready(false);
    c.request(Cmd::Read, 0, 1, 0, 512, &[]);
    assert_eq!(c.reply().data, vec![9u8; 512]);
    assert!(server.running(), "{}", server.log());
    assert!(server.terminate().success());
    let report =
        fvd_core::executor::block_on(fvd_core::check::check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(report.exit_code(), 0);
    assert!(report.clean);
}

#[test]
fn many_requests_in_flight() {
    let t = tempfile::tempdir().unwrap();
    let img = image(t.path());
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1), REP_ACK);
    c.structured = true;
    c.go("");
    // 256 writes sent back to back (more than the server's in-flight
    // limit), then all replies; then 256 reads, likewise.
    let n = 256u64;
    for i in 0..n {
        let data = vec![i as u8; 65536];
        c.request(Cmd::Write, 0, 1000 + i, i * 65536, 65536, &data);
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let r = c.reply();
        assert_eq!(r.error(), 0);
        assert!(seen.insert(r.cookie));
    }
    assert_eq!(seen.len() as u64, n);
    for i in 0..n {
        c.request(Cmd::Read, 0, i, i * 65536, 65536, &[]);
    }
    for _ in 0..n {
        let r = c.reply();
        let i = r.cookie;
        assert_eq!(r.data, vec![i as u8; 65536], "read {i}");
    }
    c.request(Cmd::Flush, 0, 1, 0, 0, &[]);
    assert_eq!(c.reply().error(), 0);
    assert!(server.terminate().success());
}

#[test]
fn cache_copies_base_data_into_the_image() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let base = d.join("base.raw");
    create_raw(&base, SIZE, &[(0, SIZE)]);
    let img = d.join("a.fvd");
    create_fvd(&img, Some(SIZE), Some(("base.raw", Format::Raw)));
    let sock = d.join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(err_type(&c.option(OPT_STRUCTURED_REPLY, b"")[0].1), REP_ACK);
    c.structured = true;
    let set = meta_payload("", &["qemu:allocation-depth"]);
    let ids: Vec<u32> = c
        .option(OPT_SET_META_CONTEXT, &set)
        .into_iter()
        .filter_map(|(_, r)| match r {
            OptionReply::MetaContext { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1);
    c.go("");
    let depth = |c: &mut Client| {
        c.request(Cmd::BlockStatus, 0, 9, 0, SIZE, &[]);
        let chunks = c.reply().chunks;
        let Chunk::Status {
            context_id: id,
            descriptors: d,
        } = &chunks[0]
        else {
            panic!("{chunks:?}")
        };
        assert_eq!(*id, ids[0]);
        d.clone()
    };
    assert_eq!(depth(&mut c), vec![(SIZE, 2)]);
    c.request(Cmd::Cache, 0, 1, 1 << 20, 1 << 20, &[]);
    assert_eq!(c.reply().error(), 0);
    assert_eq!(
        depth(&mut c),
        vec![(1 << 20, 2), (1 << 20, 1), (SIZE - (2 << 20), 2)]
    );
    c.request(Cmd::Read, 0, 2, 1 << 20, 1 << 20, &[]);
    let want: Vec<u8> = ((1u64 << 20)..(2 << 20)).map(base_byte).collect();
    assert_eq!(c.reply().data, want);
    assert!(server.terminate().success());
}
