//! `ServerConfig::read_only_export` (`fvd serve --read-only-export`): the
//! export is read-only on the wire while the image stays writable for the
//! engine's own fills.

use std::sync::Arc;

use fvd_core::storage::MemStorage;
use fvd_core::{Image, OpenOptions};
use fvd_nbd::client::{Address, Client, Config, Target};
use fvd_nbd::proto::consts::{EINVAL, EPERM, FLAG_READ_ONLY, FLAG_SEND_FLUSH};
use fvd_nbd::proto::request::Command;
use fvd_nbd::server::{ListenAddr, Listener, Server, ServerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_get_eperm_while_the_image_stays_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let mem = Arc::new(MemStorage::from_bytes("img", &[7u8; 1 << 20]));
    let image = Arc::new(Image::open_raw(mem.clone(), OpenOptions { read_only: false }).unwrap());
    let config = ServerConfig {
        read_only_export: true,
        ..ServerConfig::default()
    };
    let server = Server::new(image.clone(), config).unwrap();
    let listener = Listener::bind(&ListenAddr::Unix(path.clone()))
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let target = Target {
        address: Address::Unix(path.clone()),
        export: String::new(),
        name: "read-only export".into(),
    };
    let c = Client::connect(target, Config::default()).await.unwrap();
    assert!(c.info().has_flag(FLAG_READ_ONLY));
    assert!(!c.info().has_flag(FLAG_SEND_FLUSH));
    // A client that writes anyway gets EPERM; TRIM and WRITE_ZEROES,
    // not advertised on a read-only export, EINVAL (as with `-r`). Nothing
    // reaches the image.
    for (cmd, payload, code) in [
        (Command::Write, vec![1u8; 4096], EPERM),
        (Command::Trim, Vec::new(), EINVAL),
        (Command::WriteZeroes, Vec::new(), EINVAL),
    ] {
        let r = c.call(cmd, 0, 0, 4096, payload).await.unwrap();
        assert_eq!(r.error(), code, "{cmd:?}");
    }
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
    assert!(mem.to_vec()[..8192].iter().all(|&b| b == 7));
    // The image itself is still writable (copy-on-read fills write it).
    assert!(!image.is_read_only());
    image.write_slice(4096, &[9u8; 4096], false).await.unwrap();
    assert_eq!(c.read(4096, 4096).await.unwrap(), vec![9u8; 4096]);
    drop(c);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
