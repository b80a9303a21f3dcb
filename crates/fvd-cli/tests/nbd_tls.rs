//! `fvd serve` with TLS (STARTTLS, FORCEDTLS): a throwaway CA, server and
//! client certificates made with openssl; qemu-io and nbdinfo as real TLS
//! clients; plain-text clients and clients without a certificate refused.
//! Skipped (with a message) where openssl, qemu-io or nbdinfo is missing.

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

mod nbd_support;

use std::path::Path;

use fvd_core::Format;
use fvd_core::executor::block_on;
use fvd_nbd::client::{Address, Client as NbdClient, Config, Target, TlsConfig};
use fvd_nbd::proto::consts::*;
use fvd_nbd::proto::handshake::{self, OptionReply};
use nbd_support::*;

const MIB: u64 = 1 << 20;

fn openssl(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, all in `dir`; plus `client/` (CA, client cert and key, as
/// QEMU's tls-creds-x509 and libnbd expect them) and `anon/` (CA only).
fn make_pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fvd test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &a);
    for (who, cn, ext) in [
        (
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n",
        ),
        (
            "client",
            "/CN=fvd test client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n",
        ),
    ] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let extf = format!("{who}.ext");
        std::fs::write(dir.join(&extf), ext).unwrap();
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", cn]);
        openssl(dir, &a);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        );
    }
    for (sub, files) in [
        (
            "client",
            &["ca-cert.pem", "client-cert.pem", "client-key.pem"][..],
        ),
        ("anon", &["ca-cert.pem"][..]),
    ] {
        std::fs::create_dir(dir.join(sub)).unwrap();
        for f in files {
            std::fs::copy(dir.join(f), dir.join(sub).join(f)).unwrap();
        }
    }
}

fn qemu_tls(creds: &Path, sock: &Path, cmds: &[&str]) -> Out {
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        creds.display()
    );
    let image = format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    );
    qemu_io_opts(&["--object", &object, "--image-opts"], &image, cmds)
}

fn tls_args(d: &Path, with_ca: bool) -> Vec<String> {
    let mut v = vec![
        "--tls-cert".to_string(),
        d.join("server-cert.pem").display().to_string(),
        "--tls-key".to_string(),
        d.join("server-key.pem").display().to_string(),
    ];
    if with_ca {
        v.push("--tls-ca".into());
        v.push(d.join("ca-cert.pem").display().to_string());
    }
    v
}

#[test]
fn tls_with_client_certificates() {
    if missing(&["openssl", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_pki(d);
    let img = d.join("a.fvd");
    create_fvd(&img, Some(16 * MIB), None);
    let sock = d.join("s.sock");
    let args = tls_args(d, true);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::unix(&img, &sock, &refs);

    let o = qemu_tls(
        &d.join("client"),
        &sock,
        &[
            "write -P 0x5c 0 1M",
            "flush",
            "read -P 0x5c 0 1M",
            "write -z 512k 64k",
            "read -P 0 512k 64k",
        ],
    );
    assert!(o.ok && !o.text.contains("failed"), "{}", o.text);
    // No client certificate: the TLS handshake fails.
    let o = qemu_tls(&d.join("anon"), &sock, &["read 0 4k"]);
    assert!(
        !o.ok,
        "a client without certificate must be refused:\n{}",
        o.text
    );
    // Plain text: every option but STARTTLS/ABORT gets ERR_TLS_REQD.
    let o = qemu_io(&server.uri(), &["read 0 4k"]);
    assert!(!o.ok && o.text.contains("TLS"), "{}", o.text);
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    for code in [OPT_LIST, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS, 99] {
        let r = c.option(code, b"");
        assert!(
            matches!(
                r[0].1,
                OptionReply::Error {
                    reply_type: REP_ERR_TLS_REQD,
                    ..
                }
            ),
            "option {code}: {r:?}"
        );
    }
    // EXPORT_NAME cannot be refused politely: the server hangs up.
    c.send(&handshake::encode_option_request(OPT_EXPORT_NAME, b"").unwrap());
    assert!(c.closed_by_server());
    // ABORT is fine.
    let mut c = Client::connect(&sock, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert!(matches!(c.option(OPT_ABORT, b"")[0].1, OptionReply::Ack));

    // The fvd-nbd client over TLS with the client certificate reads what
    // qemu-io wrote; without a certificate, or without TLS, it is refused.
    let target = Target {
        address: Address::Unix(sock.clone()),
        export: String::new(),
        name: server.uri(),
    };
    let with = |client: Option<(&Path, &Path)>| Config {
        tls: Some(TlsConfig::from_files(&d.join("ca-cert.pem"), client, "localhost").unwrap()),
        ..Config::default()
    };
    let cert = (d.join("client-cert.pem"), d.join("client-key.pem"));
    let c = block_on(NbdClient::connect(
        target.clone(),
        with(Some((&cert.0, &cert.1))),
    ))
    .unwrap();
    assert!(c.info().tls);
    let head = block_on(c.read(0, 512 << 10)).unwrap();
    assert!(head.iter().all(|&b| b == 0x5c), "data written by qemu-io");
    block_on(c.write(2 * MIB, vec![0x3a; 4096], true)).unwrap();
    assert!(block_on(c.read(2 * MIB, 4096)).unwrap() == vec![0x3a; 4096]);
    drop(c);
    let e = block_on(NbdClient::connect(target.clone(), with(None))).unwrap_err();
    assert!(e.to_string().contains("Certificate"), "{e}");
    let e = block_on(NbdClient::connect(target, Config::default())).unwrap_err();
    assert!(e.to_string().contains("requires TLS"), "{e}");

    // libnbd over TLS with the client certificate, and without TLS.
    if have("nbdinfo") {
        let uri = format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            sock.display(),
            d.join("client").display()
        );
        let o = run("nbdinfo", &[&uri]);
        assert!(o.ok && o.text.contains("with TLS"), "{}", o.text);
        let o = run("nbdinfo", &[&server.uri()]);
        assert!(!o.ok, "{}", o.text);
    }
    assert!(server.terminate().success(), "{}", server.log());
    let report =
        fvd_core::executor::block_on(fvd_core::check::check_path(&img, Format::Fvd, None)).unwrap();
    assert_eq!(report.exit_code(), 0);
}

#[test]
fn tls_without_client_certificates() {
    if missing(&["openssl", "qemu-io"]) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_pki(d);
    let img = d.join("a.raw");
    create_raw(&img, 16 * MIB, &[]);
    let sock = d.join("s.sock");
    let mut args = tls_args(d, false);
    args.extend(["-f".to_string(), "raw".to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::unix(&img, &sock, &refs);
    // A client with only the CA is welcome when the server asks no certificate.
    let o = qemu_tls(
        &d.join("anon"),
        &sock,
        &["write -P 0x21 4k 4k", "read -P 0x21 4k 4k"],
    );
    assert!(o.ok && !o.text.contains("failed"), "{}", o.text);
    let o = qemu_io(&server.uri(), &["read 0 4k"]);
    assert!(!o.ok, "{}", o.text);
    assert!(server.terminate().success());
}
