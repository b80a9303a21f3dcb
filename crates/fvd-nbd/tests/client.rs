//! The fvd-nbd client against scripted servers (written with the codec in
//! this file): pipelining with replies out of order and chunks of several
//! replies interleaved, simple, structured and extended replies, block
//! status, multi-conn, reconnects with requests in flight, and hostile
//! servers (bad magic, unknown cookie, oversized or truncated replies,
//! replies that do not cover a read, silence): a clear error, never a
//! panic.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fvd_nbd::client::{Address, Client, Config, Negotiation, NoRetry, RetryPolicy, Target};
use fvd_nbd::proto::consts::*;
use fvd_nbd::proto::handshake::{self, ClientOption};
use fvd_nbd::proto::reply::{self, ReplyTo};
use fvd_nbd::proto::request::{Command, Request, decode_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const SIZE: u64 = 16 << 20;

/// Byte `i` of the export.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9) >> 11) as u8
}

fn content(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(byte).collect()
}

/// What the scripted server negotiates.
#[derive(Clone, Copy)]
struct Offer {
    structured: bool,
    extended: bool,
    flags: u16,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            structured: true,
            extended: false,
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN,
        }
    }
}

/// The server side of one connection.
struct Peer {
    s: UnixStream,
    extended: bool,
    structured: bool,
}

impl Peer {
    /// Negotiate as `offer` says; false if the client went away.
    async fn handshake(s: UnixStream, offer: Offer) -> Option<Peer> {
        let mut p = Peer {
            s,
            extended: false,
            structured: false,
        };
        p.s.write_all(&handshake::encode_greeting(
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        ))
        .await
        .ok()?;
        let mut flags = [0u8; 4];
        p.s.read_exact(&mut flags).await.ok()?;
        loop {
            let mut h = [0u8; OPTION_HEADER_LEN];
            p.s.read_exact(&mut h).await.ok()?;
            let h = handshake::decode_option_header(&h).unwrap();
            let mut payload = vec![0u8; h.length as usize];
            p.s.read_exact(&mut payload).await.ok()?;
            let code = h.code;
            let out = match handshake::decode_option(code, &payload).unwrap() {
                ClientOption::ExtendedHeaders if offer.extended => {
                    p.extended = true;
                    p.structured = true;
                    handshake::encode_ack(code).to_vec()
                }
                ClientOption::StructuredReply if offer.structured => {
                    p.structured = true;
                    handshake::encode_ack(code).to_vec()
                }
                ClientOption::SetMetaContext { .. } if p.structured => {
                    let mut out =
                        handshake::encode_meta_context(code, 7, META_CONTEXT_BASE_ALLOCATION)
                            .unwrap();
                    out.extend_from_slice(&handshake::encode_ack(code));
                    out
                }
                ClientOption::Go { .. } => {
                    let mut out = handshake::encode_info_export(code, SIZE, offer.flags).to_vec();
                    out.extend_from_slice(&handshake::encode_ack(code));
                    p.s.write_all(&out).await.ok()?;
                    return Some(p);
                }
                _ => handshake::encode_error_reply(code, REP_ERR_UNSUP, None),
            };
            p.s.write_all(&out).await.ok()?;
        }
    }

    /// The next request (payloads are not expected); None at EOF or DISC.
    async fn request(&mut self) -> Option<Request> {
        let mut h = vec![0u8; Request::header_len(self.extended)];
        self.s.read_exact(&mut h).await.ok()?;
        let r = decode_request(&h, self.extended).unwrap();
        (r.command != Command::Disc).then_some(r)
    }

    fn to(&self, r: &Request) -> ReplyTo {
        ReplyTo::for_request(r, self.extended)
    }

    /// The whole correct reply to `r`.
    fn answer(&self, r: &Request) -> Vec<u8> {
        match r.command {
            Command::Read if self.structured => {
                reply::offset_data(self.to(r), r.offset, &content(r.offset, r.length), true)
                    .unwrap()
            }
            Command::Read => {
                let mut out = reply::encode_simple_reply(r.cookie, 0).to_vec();
                out.extend(content(r.offset, r.length));
                out
            }
            Command::BlockStatus if self.extended => reply::block_status_ext(
                self.to(r),
                7,
                &[
                    (r.length / 2, u64::from(STATE_HOLE | STATE_ZERO)),
                    (r.length / 2, 0),
                ],
                true,
            )
            .unwrap(),
            Command::BlockStatus => reply::block_status(
                self.to(r),
                7,
                &[
                    ((r.length / 2) as u32, STATE_HOLE | STATE_ZERO),
                    ((r.length / 2) as u32, 0),
                ],
                true,
            )
            .unwrap(),
            _ => reply::encode_simple_reply(r.cookie, EINVAL).to_vec(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes).await;
    }
}

/// A scripted server on a unix socket: `script` runs for every connection
/// (with its number, from 0).
struct Script {
    path: PathBuf,
    connections: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl Script {
    fn start<F, Fut>(script: F) -> Script
    where
        F: Fn(usize, UnixStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(n, s));
            }
        });
        Script {
            path,
            connections,
            _dir: dir,
        }
    }

    fn target(&self) -> Target {
        Target {
            address: Address::Unix(self.path.clone()),
            export: String::new(),
            name: "nbd+unix:///?socket=test".into(),
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    async fn client(&self, config: Config) -> io::Result<Client> {
        Client::connect(self.target(), config).await
    }
}

/// A few quick retries.
#[derive(Debug)]
struct Quick(u32);

impl RetryPolicy for Quick {
    fn attempts(&self) -> u32 {
        self.0
    }
    fn delay(&self, _failures: u32) -> Duration {
        Duration::from_millis(20)
    }
    fn is_transient(&self, e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::TimedOut
        )
    }
}

fn config() -> Config {
    Config {
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Reads at `i * 9000` of 4000 bytes, `n` of them at once (a client that
/// sent them one at a time would never get a reply from the servers that
/// wait for a batch: it fails after 20 s).
async fn many_reads(c: &Client, n: u64) {
    let futs: Vec<_> = (0..n).map(|i| (i, c.read(i * 9000, 4000))).collect();
    let all = async {
        for (i, f) in futs {
            let got = f.await.unwrap();
            assert!(got == content(i * 9000, 4000), "read {i}");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all)
        .await
        .expect("reads stuck: not pipelined?");
}

/// The server collects `batch` requests before answering any, then
/// answers them last first: the client must have had them all in flight
/// and match replies by cookie.
async fn reversing(offer: Offer, batch: usize, s: UnixStream) {
    let Some(mut p) = Peer::handshake(s, offer).await else {
        return;
    };
    loop {
        let mut reqs = Vec::new();
        while reqs.len() < batch {
            match p.request().await {
                Some(r) => reqs.push(r),
                None => return,
            }
        }
        for r in reqs.iter().rev() {
            let a = p.answer(r);
            p.send(&a).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_replies_out_of_order() {
    for offer in [
        Offer::default(),
        Offer {
            structured: false,
            ..Offer::default()
        },
        Offer {
            extended: true,
            ..Offer::default()
        },
    ] {
        let srv = Script::start(move |_, s| reversing(offer, 32, s));
        let c = srv
            .client(Config {
                connections: 1,
                ..config()
            })
            .await
            .unwrap();
        assert_eq!(c.info().structured, offer.structured);
        assert_eq!(c.info().extended, offer.extended);
        many_reads(&c, 32 * 4).await;
        assert_eq!(srv.connections(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_several_replies_interleave() {
    // Every read of a batch of 8 gets its second half as data first, then
    // (after the first chunks of all the others) its first half as data
    // or, for odd cookies, as a hole over zeros... which the client must
    // then report as zeros.
    let srv = Script::start(|_, s| async move {
        let Some(mut p) = Peer::handshake(s, Offer::default()).await else {
            return;
        };
        loop {
            let mut reqs = Vec::new();
            while reqs.len() < 8 {
                match p.request().await {
                    Some(r) => reqs.push(r),
                    None => return,
                }
            }
            for r in &reqs {
                let half = r.length / 2;
                let at = r.offset + half;
                let c =
                    reply::offset_data(p.to(r), at, &content(at, r.length - half), false).unwrap();
                p.send(&c).await;
            }
            for r in reqs.iter().rev() {
                let half = r.length / 2;
                let c = if r.cookie % 2 == 1 {
                    reply::offset_hole(p.to(r), r.offset, half as u32, true).unwrap()
                } else {
                    reply::offset_data(p.to(r), r.offset, &content(r.offset, half), true).unwrap()
                };
                p.send(&c).await;
            }
        }
    });
    let c = srv
        .client(Config {
            connections: 1,
            ..config()
        })
        .await
        .unwrap();
    for round in 0..4u64 {
        let futs: Vec<_> = (0..8u64)
            .map(|i| c.read((round * 8 + i) * 10_000, 4096))
            .collect();
        let mut zeros_first = 0;
        for (i, f) in futs.into_iter().enumerate() {
            let got = f.await.unwrap();
            let off = (round * 8 + i as u64) * 10_000;
            assert!(
                got[2048..] == content(off + 2048, 2048)[..],
                "second half {i}"
            );
            if got[..2048].iter().all(|&b| b == 0) {
                zeros_first += 1;
            } else {
                assert!(got[..2048] == content(off, 2048)[..], "first half {i}");
            }
        }
        assert_eq!(zeros_first, 4, "holes read as zeros");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_in_both_header_styles() {
    for extended in [false, true] {
        let offer = Offer {
            extended,
            ..Offer::default()
        };
        let srv = Script::start(move |_, s| reversing(offer, 1, s));
        let c = srv.client(config()).await.unwrap();
        assert_eq!(c.info().allocation_context, Some(7));
        let runs = c.allocation(4096, 8192).await.unwrap();
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert!(!runs[0].data && runs[0].length == 4096);
        assert!(runs[1].data && runs[1].length == 4096);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_only_where_the_server_allows_it() {
    for multi in [true, false] {
        let offer = Offer {
            flags: if multi {
                FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN
            } else {
                FLAG_HAS_FLAGS | FLAG_READ_ONLY
            },
            ..Offer::default()
        };
        // Replies come 20 ms late, so requests pile up.
        let srv = Script::start(move |_, s| async move {
            let Some(mut p) = Peer::handshake(s, offer).await else {
                return;
            };
            while let Some(r) = p.request().await {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let a = p.answer(&r);
                p.send(&a).await;
            }
        });
        let c = srv.client(config()).await.unwrap();
        many_reads(&c, 64).await;
        many_reads(&c, 64).await;
        if multi {
            assert!(srv.connections() > 1, "one connection under load");
            assert!(srv.connections() <= 4, "{}", srv.connections());
            assert_eq!(c.max_connections(), 4);
        } else {
            assert_eq!(srv.connections(), 1);
            assert_eq!(c.max_connections(), 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_reissued_on_a_new_connection() {
    // The first connection takes 16 requests and dies without a reply; the
    // next ones answer.
    let srv = Script::start(|n, s| async move {
        let Some(mut p) = Peer::handshake(s, Offer::default()).await else {
            return;
        };
        if n == 0 {
            for _ in 0..16 {
                if p.request().await.is_none() {
                    return;
                }
            }
            return;
        }
        while let Some(r) = p.request().await {
            let a = p.answer(&r);
            p.send(&a).await;
        }
    });
    let c = srv
        .client(Config {
            retry: Arc::new(Quick(3)),
            connections: 1,
            ..config()
        })
        .await
        .unwrap();
    many_reads(&c, 16).await;
    assert_eq!(srv.connections(), 2);

    // Without retries the same loss is an error that says what happened.
    let srv = Script::start(|_, s| async move {
        let Some(mut p) = Peer::handshake(s, Offer::default()).await else {
            return;
        };
        let _ = p.request().await;
    });
    let c = srv.client(config()).await.unwrap();
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(e.to_string().contains("closed by the server"), "{e}");
}

/// How a hostile server answers a request.
type Answer = fn(&Request, &Peer) -> Vec<u8>;

/// A server whose first connection answers the first read with
/// `answer(request, peer)` and hangs up; later connections behave. Returns
/// the read's error, after checking that the client goes on.
async fn hostile(answer: Answer) -> io::Error {
    let srv = Script::start(move |n, s| async move {
        let Some(mut p) = Peer::handshake(s, Offer::default()).await else {
            return;
        };
        while let Some(r) = p.request().await {
            let a = if n == 0 { answer(&r, &p) } else { p.answer(&r) };
            p.send(&a).await;
            if n == 0 {
                return;
            }
        }
    });
    let c = srv.client(config()).await.unwrap();
    let e = c.read(4096, 4096).await.unwrap_err();
    // The client goes on, on a new connection (the first try may still
    // meet the dying one).
    let mut ok = false;
    for _ in 0..5 {
        if let Ok(d) = c.read(0, 512).await {
            assert!(d == content(0, 512));
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "no read after {e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_servers_get_clear_errors() {
    let cases: Vec<(&str, Answer)> = vec![
        ("bad magic", |_, _| {
            vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        }),
        ("not in flight", |r, p| {
            let other = Request {
                cookie: r.cookie ^ 0xffff,
                ..*r
            };
            reply::none_done(ReplyTo::for_request(&other, p.extended))
        }),
        ("outside the read", |r, p| {
            reply::offset_data(p.to(r), r.offset, &vec![0u8; 1 << 20], true).unwrap()
        }),
        ("too large", |r, p| {
            let mut h = p
                .to(r)
                .header(REPLY_TYPE_BLOCK_STATUS, 1 << 30, true)
                .encode()
                .unwrap();
            h.extend_from_slice(&[0u8; 64]);
            h
        }),
        ("no data for offset", |r, p| {
            reply::offset_data(p.to(r), r.offset, &content(r.offset, 100), true).unwrap()
        }),
        ("closed by the server", |r, p| {
            let full = p.answer(r);
            full[..full.len() / 2].to_vec()
        }),
        ("unknown non-error reply chunk type", |r, p| {
            p.to(r).header(99, 0, true).encode().unwrap()
        }),
    ];
    for (want, answer) in cases {
        let e = hostile(answer).await;
        let msg = e.to_string();
        assert!(msg.contains(want), "{want}: {msg}");
        assert!(msg.starts_with("nbd+unix:///?socket=test: "), "{msg}");
    }
    // A server that offered no structured replies sends a chunk anyway.
    let srv = Script::start(|_, s| async move {
        let offer = Offer {
            structured: false,
            ..Offer::default()
        };
        let Some(mut p) = Peer::handshake(s, offer).await else {
            return;
        };
        if let Some(r) = p.request().await {
            p.send(&reply::none_done(ReplyTo::compact(r.cookie))).await;
        }
    });
    let c = srv.client(config()).await.unwrap();
    let e = c.read(0, 512).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("structured reply without negotiation"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_silence_and_bad_greetings() {
    // An error chunk is the request's failure, not the connection's.
    let srv = Script::start(|_, s| async move {
        let Some(mut p) = Peer::handshake(s, Offer::default()).await else {
            return;
        };
        while let Some(r) = p.request().await {
            let a = if r.offset == 0 {
                reply::error_chunk(p.to(&r), EIO, "disk on fire", true)
            } else {
                p.answer(&r)
            };
            p.send(&a).await;
        }
    });
    let c = srv.client(config()).await.unwrap();
    let e = c.read(0, 512).await.unwrap_err();
    assert!(
        e.to_string().contains("EIO") && e.to_string().contains("disk on fire"),
        "{e}"
    );
    assert!(c.read(512, 512).await.unwrap() == content(512, 512));
    assert_eq!(srv.connections(), 1);

    // A server that never answers: the I/O timeout.
    let srv = Script::start(|_, s| async move {
        let Some(mut p) = Peer::handshake(s, Offer::default()).await else {
            return;
        };
        while p.request().await.is_some() {}
    });
    let c = srv
        .client(Config {
            io_timeout: Duration::from_millis(300),
            ..config()
        })
        .await
        .unwrap();
    let e = c.read(0, 512).await.unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");

    // Not an NBD server at all.
    let srv = Script::start(|_, mut s| async move {
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
    });
    let e = srv.client(config()).await.unwrap_err();
    assert!(e.to_string().contains("not an NBD server"), "{e}");

    // A handshake reply far too large.
    let srv = Script::start(|_, mut s| async move {
        let _ = s
            .write_all(&handshake::encode_greeting(
                FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            ))
            .await;
        let mut buf = [0u8; 4 + OPTION_HEADER_LEN];
        let _ = s.read_exact(&mut buf).await;
        let mut h = handshake::encode_option_reply(OPT_EXTENDED_HEADERS, REP_ACK, &[]).unwrap();
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        let _ = s.write_all(&h).await;
    });
    let e = srv
        .client(Config {
            negotiation: Negotiation::default(),
            retry: Arc::new(NoRetry),
            ..config()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("too large"), "{e}");
}
