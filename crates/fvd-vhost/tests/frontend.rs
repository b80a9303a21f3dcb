//! The vhost-user-blk backend through a real vhost-user connection: an
//! in-process front end (frontend_support) proven first against
//! qemu-storage-daemon's `--export type=vhost-user-blk`, then run against
//! `fvd_vhost::serve`; reconnects, disconnects in the middle of requests,
//! GET_VRING_BASE draining, malformed chains and shutdown with a front end
//! attached.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fvd_core::{CreateOptions, Format, PathOptions};
use fvd_vhost::{ExportConfig, ServeSummary};
use virtio_bindings::bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

mod frontend_support;

use frontend_support::{Desc, Driver, IOERR, OK, UNSUPP};

const DISK: u64 = 64 << 20;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIP: {tool} is not installed; this test needs it");
    }
    ok
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// qemu-storage-daemon exporting a raw file over vhost-user-blk.
struct Qsd(Child);

impl Qsd {
    fn start(image: &Path, sock: &Path, queues: usize) -> Qsd {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},discard=unmap",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                sock.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-storage-daemon");
        Qsd(child)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `fvd_vhost::serve` on its own runtime thread.
struct Ours {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<ServeSummary>>>,
}

impl Ours {
    fn start(image: &Path, sock: &Path, queues: u16, read_only: bool) -> Ours {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (image, sock) = (image.to_path_buf(), sock.to_path_buf());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let opts = PathOptions {
                    read_only,
                    ..PathOptions::default()
                };
                let img = Arc::new(
                    fvd_core::open_path(&image, Format::Fvd, opts)
                        .await
                        .unwrap(),
                );
                let mut cfg = ExportConfig::new(&sock);
                cfg.num_queues = queues;
                cfg.serial = "fvd-test".into();
                fvd_vhost::serve(img, cfg, async move {
                    let _ = rx.await;
                })
                .await
            })
        });
        Ours {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Shut down (like SIGTERM) and return how the run ended.
    fn stop(mut self) -> ServeSummary {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn create_fvd(path: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = CreateOptions {
            size: Some(DISK),
            ..CreateOptions::default()
        };
        fvd_core::create_path(path, None, opts, None).await.unwrap();
    });
}

/// The whole content and the check report of a closed FVD image.
fn fvd_content_and_check(path: &Path) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let report = fvd_core::check::check_path(path, Format::Fvd, None)
            .await
            .unwrap();
        assert_eq!(report.exit_code(), 0, "check: {report:?}");
        assert!(report.clean, "the image was not closed cleanly");
        let img = fvd_core::open_path(
            path,
            Format::Fvd,
            PathOptions {
                read_only: true,
                ..PathOptions::default()
            },
        )
        .await
        .unwrap();
        let mut all = vec![0u8; DISK as usize];
        img.read_slice(0, &mut all).await.unwrap();
        all
    })
}

/// A fresh FVD image served by fvd-vhost with `queues` queues, and a front
/// end connected to it.
fn fvd_export(queues: u16, read_only: bool) -> (tempfile::TempDir, PathBuf, Ours, Driver) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.fvd");
    create_fvd(&img);
    let sock = dir.path().join("fvd.sock");
    let ours = Ours::start(&img, &sock, queues, read_only);
    let d = Driver::connect(&sock, queues as usize);
    (dir, img, ours, d)
}

/// The same exercise for any vhost-user-blk backend; returns what the disk
/// must hold afterwards.
fn exercise(d: &mut Driver) -> Vec<u8> {
    let mut want = vec![0u8; DISK as usize];
    assert_eq!(d.capacity(), DISK / 512);
    // Write 64 KiB, read it back.
    let a = pattern(1, 64 << 10);
    assert_eq!(d.write(100, &a), OK);
    want[100 * 512..100 * 512 + a.len()].copy_from_slice(&a);
    let (st, got) = d.read(100, a.len() as u32);
    assert_eq!(st, OK);
    assert_eq!(got, a);
    assert_eq!(d.flush(), OK);
    // Discard 8 KiB, write zeroes over the next 8 KiB.
    assert_eq!(d.zero(VIRTIO_BLK_T_DISCARD, &[(100, 16, 0)]), OK);
    assert_eq!(
        d.zero(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(116, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]
        ),
        OK
    );
    want[100 * 512..132 * 512].fill(0);
    let (st, got) = d.read(100, a.len() as u32);
    assert_eq!(st, OK);
    assert_eq!(got, want[100 * 512..100 * 512 + a.len()]);
    assert_eq!(d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20).0, OK);
    // Out of range, and an unknown type.
    let cap = DISK / 512;
    assert_eq!(d.read(cap, 512).0, IOERR);
    assert_eq!(d.write(cap - 1, &[0u8; 1024]), IOERR);
    assert_eq!(d.request(0x55, 0, &[], 0).0, UNSUPP);
    // Many requests at once on both queues, completed in any order.
    let mut started = Vec::new();
    for i in 0..48u64 {
        let q = (i % 2) as usize;
        let data = pattern(i as u8, 4096);
        let (head, _, status) = d.start(q, VIRTIO_BLK_T_OUT, 4096 + i * 8, &data, 0);
        let off = ((4096 + i * 8) * 512) as usize;
        want[off..off + 4096].copy_from_slice(&data);
        started.push((q, head, status));
    }
    for (q, head, status) in started {
        d.wait(q, head);
        let st: u8 = d.mem().read_obj(GuestAddress(status)).unwrap();
        assert_eq!(st, OK);
    }
    let (st, got) = d.read(4096, 48 * 4096);
    assert_eq!(st, OK);
    assert_eq!(got, want[4096 * 512..4096 * 512 + 48 * 4096]);
    assert_eq!(d.flush(), OK);
    want
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn harness_proven_on_qemu_storage_daemon_then_run_on_fvd() {
    if !have("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 1. qemu-storage-daemon over a raw file: the harness itself is right.
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(DISK).unwrap();
    let sock = dir.path().join("qsd.sock");
    let qsd = Qsd::start(&raw, &sock, 2);
    let mut d = Driver::connect(&sock, 2);
    let want = exercise(&mut d);
    drop(d);
    drop(qsd);
    let got = std::fs::read(&raw).unwrap();
    assert_eq!(first_difference(&got, &want), None, "qemu-storage-daemon");
    // 2. The same exercise on fvd-vhost over an FVD image.
    let img = dir.path().join("disk.fvd");
    create_fvd(&img);
    let sock = dir.path().join("fvd.sock");
    let ours = Ours::start(&img, &sock, 2, false);
    let mut d = Driver::connect(&sock, 2);
    let want = exercise(&mut d);
    let id = d.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20).1;
    assert_eq!(&id[..8], b"fvd-test");
    drop(d);
    let summary = ours.stop();
    assert_eq!(summary.connections, 1);
    assert!(!sock.exists(), "the socket is removed at exit");
    let got = fvd_content_and_check(&img);
    assert_eq!(first_difference(&got, &want), None, "fvd-vhost");
}

#[test]
fn front_end_reconnects_and_disconnects_mid_request() {
    let (dir, img, ours, mut d) = fvd_export(1, false);
    let sock = dir.path().join("fvd.sock");
    // First front end writes and leaves cleanly.
    let a = pattern(7, 1 << 20);
    assert_eq!(d.write(0, &a), OK);
    drop(d);
    // Second one sees the data, then leaves with big writes in flight.
    let mut d = Driver::connect(&sock, 1);
    assert_eq!(d.read(0, a.len() as u32), (OK, a.clone()));
    let big = pattern(9, 8 << 20);
    for i in 0..6u64 {
        d.start(0, VIRTIO_BLK_T_OUT, 4096 + i * 16384, &big, 0);
    }
    drop(d);
    // A third one is served: the backend drained, committed and went on.
    let mut d = Driver::connect(&sock, 1);
    assert_eq!(d.read(0, a.len() as u32), (OK, a.clone()));
    assert_eq!(d.flush(), OK);
    drop(d);
    let summary = ours.stop();
    assert_eq!(summary.connections, 3);
    let got = fvd_content_and_check(&img);
    assert_eq!(&got[..a.len()], &a[..]);
    // Each interrupted write is all old or all new data, never a mix of
    // anything else.
    for i in 0..6usize {
        let off = (4096 + i * 16384) * 512;
        let part = &got[off..off + big.len()];
        assert!(
            part == &big[..] || part.iter().all(|&b| b == 0) || {
                // Writes may complete partially in whole blocks.
                part.chunks(4096)
                    .zip(big.chunks(4096))
                    .all(|(p, b)| p == b || p.iter().all(|&x| x == 0))
            },
            "write {i} left bytes it never had"
        );
    }
}

#[test]
fn get_vring_base_waits_for_requests_in_flight() {
    let (_dir, img, ours, mut d) = fvd_export(1, false);
    let big = pattern(3, 4 << 20);
    let heads: Vec<u16> = (0..8u64)
        .map(|i| d.start(0, VIRTIO_BLK_T_OUT, i * 8192, &big, 0).0)
        .collect();
    // The ring base is how many chains the backend took (the last kicks
    // may not have been seen yet); every one of them is finished when
    // GET_VRING_BASE answers, and the others were never started.
    let base = d.stop(0) as usize;
    assert!(base >= 1, "the backend took no chain");
    for (i, h) in heads.iter().enumerate() {
        assert_eq!(
            d.done(0, *h),
            i < base,
            "chain {i}: GET_VRING_BASE answered {base} while requests were in flight"
        );
    }
    drop(d);
    ours.stop();
    let got = fvd_content_and_check(&img);
    for i in 0..base {
        assert_eq!(&got[i * 8192 * 512..i * 8192 * 512 + big.len()], &big[..]);
    }
}

#[test]
fn malformed_chains_from_a_hostile_front_end() {
    let (_dir, img, ours, mut d) = fvd_export(1, false);
    let hdr = d.alloc(4096);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    d.mem().write_slice(&h, GuestAddress(hdr)).unwrap();
    let status = hdr + 512;
    let desc = |addr, len, write| Desc { addr, len, write };
    // No status byte (last descriptor read-only): returned with length 0.
    let a = d.submit(0, &[desc(hdr, 16, false), desc(hdr + 1024, 512, false)]);
    assert_eq!(d.wait(0, a), 0);
    // Header shorter than 16 bytes.
    let b = d.submit(0, &[desc(hdr, 8, false), desc(status, 1, true)]);
    assert_eq!(d.wait(0, b), 1);
    assert_eq!(d.mem().read_obj::<u8>(GuestAddress(status)).unwrap(), IOERR);
    // Data outside guest memory, and a length overflowing the address space.
    let c = d.submit(
        0,
        &[
            desc(hdr, 16, false),
            desc(1 << 40, 4096, false),
            desc(status, 1, true),
        ],
    );
    d.wait(0, c);
    assert_eq!(d.mem().read_obj::<u8>(GuestAddress(status)).unwrap(), IOERR);
    let e = d.submit(
        0,
        &[
            desc(hdr, 16, false),
            desc(u64::MAX - 100, 4096, false),
            desc(status, 1, true),
        ],
    );
    d.wait(0, e);
    assert_eq!(d.mem().read_obj::<u8>(GuestAddress(status)).unwrap(), IOERR);
    // A status byte outside guest memory: nothing to write, still returned.
    let f = d.submit(0, &[desc(hdr, 16, false), desc(1 << 40, 1, true)]);
    d.wait(0, f);
    // The device still works, and nothing was written by the bad chains.
    assert_eq!(d.read(0, 4096), (OK, vec![0u8; 4096]));
    drop(d);
    ours.stop();
    let got = fvd_content_and_check(&img);
    assert!(got.iter().all(|&b| b == 0));
}

#[test]
fn shutdown_with_a_front_end_attached_closes_cleanly() {
    let (_dir, img, ours, mut d) = fvd_export(1, false);
    let a = pattern(5, 256 << 10);
    assert_eq!(d.write(2048, &a), OK);
    // No flush from the driver: shutdown commits what was acknowledged.
    let summary = ours.stop();
    assert_eq!(summary.connections, 1);
    drop(d);
    let got = fvd_content_and_check(&img);
    assert_eq!(&got[2048 * 512..2048 * 512 + a.len()], &a[..]);
}

#[test]
fn read_only_export_refuses_writes_over_the_socket() {
    let (_dir, img, ours, mut d) = fvd_export(1, true);
    assert_ne!(
        d.features & (1 << VIRTIO_BLK_F_RO),
        0,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(d.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(d.write(0, &[1u8; 512]), IOERR);
    assert_eq!(d.read(0, 512), (OK, vec![0u8; 512]));
    drop(d);
    ours.stop();
    std::thread::sleep(Duration::from_millis(10));
    assert!(fvd_content_and_check(&img).iter().all(|&b| b == 0));
}
