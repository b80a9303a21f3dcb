//! Clients that connect and say nothing must not lock others out (issue
//! 16, defect 7): connections still negotiating do not count against
//! `--shared`, and an idle crowd never keeps a new client from its greeting.

mod nbd_support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use fvd_nbd::proto::consts::*;
use fvd_nbd::proto::request::Command as Cmd;
use nbd_support::*;

/// Connect and time how long the 18-byte greeting takes.
fn greeting_time(sock: &Path) -> Duration {
    let t0 = Instant::now();
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g)
        .unwrap_or_else(|e| panic!("no greeting after {:?}: {e}", t0.elapsed()));
    t0.elapsed()
}

/// A client that negotiated (fixed newstyle, GO) and then does nothing.
fn negotiated_idle(sock: &Path) -> Client {
    let mut c = Client::connect(sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    c.go("");
    c
}

#[test]
fn idle_connections_do_not_lock_clients_out() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.fvd");
    create_fvd(&img, Some(1 << 20), None);
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &[]);
    // More silent connections than --shared (16) and than the negotiation
    // limit (32).
    let silent: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let waited = greeting_time(&sock);
    assert!(waited < Duration::from_secs(1), "greeted after {waited:?}");
    // A real client completes a whole session among them.
    let mut c = negotiated_idle(&sock);
    c.request(Cmd::Read, 0, 1, 0, 4096, &[]);
    let r = c.reply();
    assert_eq!(r.error(), 0);
    assert_eq!(r.data, vec![0u8; 4096]);
    drop(c);
    drop(silent);
    assert!(server.running());
    server.terminate();
}

#[test]
fn negotiated_idle_clients_leave_greetings_alone_and_shared_waits() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.fvd");
    create_fvd(&img, Some(1 << 20), None);
    let sock = t.path().join("s.sock");
    let mut server = Server::unix(&img, &sock, &["--shared", "16"]);
    let mut idle: Vec<Client> = (0..20).map(|_| negotiated_idle(&sock)).collect();
    let waited = greeting_time(&sock);
    assert!(waited < Duration::from_secs(1), "greeted after {waited:?}");
    // The 21st negotiated client waits for a slot (--shared 16): its read
    // is answered only once one of the first 16 leaves.
    let mut late = negotiated_idle(&sock);
    late.request(Cmd::Read, 0, 7, 0, 512, &[]);
    assert!(
        late.reply_within(Duration::from_millis(500)).is_none(),
        "served beyond --shared"
    );
    // Five leave: the four waiting idle clients and the late one get slots.
    idle.truncate(15);
    let r = late.reply();
    assert_eq!(r.error(), 0);
    assert_eq!(r.cookie, 7);
    drop(idle);
    drop(late);
    server.terminate();
}
