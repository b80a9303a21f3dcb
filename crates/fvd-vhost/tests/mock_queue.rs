//! The backend driven through virtio-queue's `MockSplitQueue` (the driver
//! side of a split virtqueue in test memory): requests of every type, out of
//! order completion, EVENT_IDX, draining in `stop_vring`, and malformed or
//! hostile chains, which must get an error status (or a zero-length used
//! entry) and leave the image consistent.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fvd_core::storage::{AllocRun, IoFuture, MemStorage, Storage};
use fvd_core::{CreateOptions, Format, Image, IoBuf, OpenOptions, PathOptions};
use fvd_vhost::backend::{AtomicMem, BlkBackend, Mem, Vring};
use fvd_vhost::config::{DeviceConfig, WCE_OFFSET};
use fvd_vhost::execute::{S_IOERR, S_OK, S_UNSUPP};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const QSIZE: u16 = 64;
const DISK: u64 = 64 << 20;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;
/// Where request headers, data and status bytes live in test memory.
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x18_0000;

struct Rig {
    rt: tokio::runtime::Runtime,
    mem: Mem,
    image: Arc<Image>,
    backend: Arc<BlkBackend>,
    vring: Vring,
    call: EventFd,
    /// The driver's side of the queue. Creating one initialises the rings,
    /// so there is exactly one, over a leaked handle on the test memory.
    mock: MockSplitQueue<'static, Mem>,
    next_desc: u16,
    _dir: tempfile::TempDir,
}

fn open_image(rt: &tokio::runtime::Runtime, path: &Path, read_only: bool) -> Arc<Image> {
    rt.block_on(async {
        if !path.exists() {
            let opts = CreateOptions {
                size: Some(DISK),
                ..CreateOptions::default()
            };
            fvd_core::create_path(path, None, opts, None).await.unwrap();
        }
        let opts = PathOptions {
            read_only,
            ..PathOptions::default()
        };
        Arc::new(fvd_core::open_path(path, Format::Fvd, opts).await.unwrap())
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// In-memory storage whose writes at offset 0 wait until the test opens
/// the gate: a request that stays in flight as long as the test wants.
struct GatedStorage {
    inner: MemStorage,
    gate: tokio::sync::Semaphore,
}

impl Storage for GatedStorage {
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            if offset == 0 {
                let _pass = self.gate.acquire().await;
            }
            self.inner.write_at(offset, buf, fua).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.write_zeroes(offset, len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.inner.set_len(len)
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.inner.allocation(offset, len)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

impl Rig {
    fn new(read_only: bool, event_idx: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let path = dir.path().join("disk.fvd");
        if read_only {
            drop(open_image(&rt, &path, false));
        }
        let image = open_image(&rt, &path, read_only);
        Rig::build(rt, image, dir, read_only, event_idx)
    }

    /// A raw disk on `GatedStorage`, and its gate.
    fn gated() -> (Rig, Arc<GatedStorage>) {
        let storage = Arc::new(GatedStorage {
            inner: MemStorage::from_bytes("gated", &vec![0u8; DISK as usize]),
            gate: tokio::sync::Semaphore::new(0),
        });
        let image = Arc::new(Image::open_raw(storage.clone(), OpenOptions::default()).unwrap());
        let rig = Rig::build(runtime(), image, tempfile::tempdir().unwrap(), false, false);
        (rig, storage)
    }

    fn build(
        rt: tokio::runtime::Runtime,
        image: Arc<Image>,
        dir: tempfile::TempDir,
        read_only: bool,
        event_idx: bool,
    ) -> Rig {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let atomic: AtomicMem = GuestMemoryAtomic::new(mem.clone());
        let config = DeviceConfig {
            size: DISK,
            num_queues: 1,
            queue_size: QSIZE,
            read_only,
            block_size: image.block_size(),
            serial: "mock-serial".into(),
        };
        let backend = Arc::new(BlkBackend::new(
            image.clone(),
            config,
            rt.handle().clone(),
            false,
        ));
        backend.update_memory(atomic.clone()).unwrap();
        backend.set_event_idx(event_idx);
        let leaked: &'static Mem = Box::leak(Box::new(mem.clone()));
        let mock = MockSplitQueue::create(leaked, GuestAddress(0), QSIZE);
        let vring = Vring::new(atomic, QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring
            .set_queue_info(
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = call.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` is a fresh descriptor we own.
        vring.set_call(Some(unsafe { File::from_raw_fd(fd) }));
        Rig {
            rt,
            mem,
            image,
            backend,
            vring,
            call,
            mock,
            next_desc: 0,
            _dir: dir,
        }
    }

    fn mock(&self) -> &MockSplitQueue<'static, Mem> {
        &self.mock
    }

    /// Put one chain of `(addr, len, flags)` descriptors on the ring
    /// (NEXT links added here unless `raw`); returns its head index.
    fn push(&mut self, descs: &[(u64, u32, u16)], raw: bool) -> u16 {
        let head = self.next_desc;
        let n = descs.len() as u16;
        let chain: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = i as u16;
                let (flags, next) = if raw {
                    (flags, (head + i + 1) % QSIZE)
                } else if i + 1 < n {
                    (flags | N, head + i + 1)
                } else {
                    (flags & !N, 0)
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock().add_desc_chains(&chain, head).unwrap();
        self.next_desc = (head + n) % QSIZE;
        head
    }

    fn header(&self, slot: u64, t: u32, sector: u64) -> u64 {
        let at = HDR + slot * 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS + slot))
            .unwrap();
        at
    }

    /// A request of type `t` with `data` descriptors; status at slot `slot`.
    fn request(&mut self, slot: u64, t: u32, sector: u64, data: &[(u64, u32, u16)]) -> u16 {
        let h = self.header(slot, t, sector);
        let mut d = vec![(h, 16, 0)];
        d.extend_from_slice(data);
        d.push((STATUS + slot, 1, W));
        self.push(&d, false)
    }

    fn kick(&self) {
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mock().used().idx().load()
    }

    /// Wait until the used ring holds `n` entries; return them (id, len).
    fn wait_used(&self, n: u16) -> Vec<(u32, u32)> {
        let t = Instant::now();
        while self.used_idx() < n {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "only {} of {n} requests completed",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let m = self.mock();
        (0..n)
            .map(|i| {
                let e = m.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
    }

    fn status(&self, slot: u64) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS + slot)).unwrap()
    }

    fn signals(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.rt
            .block_on(self.image.read_slice(offset, &mut v))
            .unwrap();
        v
    }

    fn check_image(&self) {
        self.rt.block_on(self.image.flush()).unwrap();
        let report = self
            .rt
            .block_on(fvd_core::check::check_storage(
                self.image.storage().as_ref(),
                None,
            ))
            .unwrap();
        assert_eq!(report.exit_code(), 0, "check: {report:?}");
    }
}

#[test]
fn write_then_read_back_across_descriptors() {
    let mut r = Rig::new(false, false);
    // 8 KiB write from two descriptors, at sector 8.
    r.fill(DATA, 4096, 0xa1);
    r.fill(DATA + 0x10000, 4096, 0xb2);
    r.request(
        0,
        VIRTIO_BLK_T_OUT,
        8,
        &[(DATA, 4096, 0), (DATA + 0x10000, 4096, 0)],
    );
    r.kick();
    assert_eq!(r.wait_used(1)[0].1, 1);
    assert_eq!(r.status(0), S_OK);
    let disk = r.disk(8 * 512, 8192);
    assert!(disk[..4096].iter().all(|&b| b == 0xa1));
    assert!(disk[4096..].iter().all(|&b| b == 0xb2));
    // Read it back into three descriptors of odd sizes.
    let rd = r.request(
        1,
        VIRTIO_BLK_T_IN,
        8,
        &[
            (DATA + 0x40000, 1024, W),
            (DATA + 0x50000, 6144, W),
            (DATA + 0x60000, 1024, W),
        ],
    );
    r.request(2, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.request(3, VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x70000, 20, W)]);
    r.kick();
    let used = r.wait_used(4);
    assert_eq!([r.status(1), r.status(2), r.status(3)], [S_OK; 3]);
    let read_len = used.iter().find(|(id, _)| *id == u32::from(rd)).unwrap().1;
    assert_eq!(read_len, 8192 + 1, "used length of a read: data + status");
    let mut got = r.read_mem(DATA + 0x40000, 1024);
    got.extend(r.read_mem(DATA + 0x50000, 6144));
    got.extend(r.read_mem(DATA + 0x60000, 1024));
    assert_eq!(got, disk);
    assert_eq!(&r.read_mem(DATA + 0x70000, 11), b"mock-serial");
    r.check_image();
}

#[test]
fn requests_complete_out_of_order() {
    let (mut r, storage) = Rig::gated();
    // A write that the storage holds back, then a read and a GET_ID: those
    // two complete while the write is still in flight.
    r.fill(DATA, 4096, 0x5a);
    let w = r.request(0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 4096, 0)]);
    let rd = r.request(1, VIRTIO_BLK_T_IN, 64, &[(DATA + 0x10000, 4096, W)]);
    let id = r.request(2, VIRTIO_BLK_T_GET_ID, 0, &[(HDR + 0x1000, 20, W)]);
    r.kick();
    let used = r.wait_used(2);
    let mut first: Vec<u32> = used.iter().map(|e| e.0).collect();
    first.sort_unstable();
    assert_eq!(first, vec![u32::from(rd), u32::from(id)]);
    assert_eq!(r.status(0), 0xff, "the write is still in flight");
    assert_eq!(r.backend.inflight(), 1);
    storage.gate.add_permits(1);
    let used = r.wait_used(3);
    assert_eq!(used[2].0, u32::from(w), "the write completes last");
    assert_eq!(r.status(0), S_OK);
    assert!(r.disk(0, 4096).iter().all(|&b| b == 0x5a));
}

#[test]
fn discard_and_write_zeroes() {
    let mut r = Rig::new(false, false);
    r.fill(DATA, 1 << 20, 0x77);
    r.request(0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 1 << 20, 0)]);
    r.kick();
    r.wait_used(1);
    // Two discard segments and one write-zeroes (with unmap) segment.
    let mem = r.mem.clone();
    let seg = |at: u64, sector: u64, num: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(at)).unwrap();
    };
    seg(DATA + 0x20_0000, 0, 8, 0);
    seg(DATA + 0x20_0010, 64, 8, 0);
    seg(
        DATA + 0x20_0100,
        128,
        16,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    r.request(1, VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x20_0000, 32, 0)]);
    r.request(
        2,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[(DATA + 0x20_0100, 16, 0)],
    );
    // Bad ones: discard with the unmap flag; a partial segment; a segment
    // past the end; too many segments.
    seg(DATA + 0x20_0200, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    r.request(3, VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x20_0200, 16, 0)]);
    r.request(4, VIRTIO_BLK_T_DISCARD, 0, &[(DATA + 0x20_0200, 12, 0)]);
    seg(DATA + 0x20_0300, DISK / 512 - 4, 8, 0);
    r.request(
        5,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[(DATA + 0x20_0300, 16, 0)],
    );
    r.request(
        6,
        VIRTIO_BLK_T_DISCARD,
        0,
        &[(DATA + 0x20_0000, 17 * 16, 0)],
    );
    r.kick();
    r.wait_used(7);
    assert_eq!(
        (1..7).map(|s| r.status(s)).collect::<Vec<_>>(),
        vec![S_OK, S_OK, S_UNSUPP, S_UNSUPP, S_IOERR, S_UNSUPP]
    );
    let disk = r.disk(0, 1 << 20);
    let zero = |a: usize, b: usize| disk[a * 512..b * 512].iter().all(|&x| x == 0);
    let kept = |a: usize, b: usize| disk[a * 512..b * 512].iter().all(|&x| x == 0x77);
    assert!(zero(0, 8) && zero(64, 72) && zero(128, 144));
    assert!(kept(8, 64) && kept(72, 128) && kept(144, 2048));
    r.check_image();
}

#[test]
fn out_of_range_unaligned_and_unknown_requests_fail_cleanly() {
    let mut r = Rig::new(false, false);
    let last = DISK / 512;
    r.request(0, VIRTIO_BLK_T_IN, last, &[(DATA, 512, W)]);
    r.request(1, VIRTIO_BLK_T_OUT, last - 1, &[(DATA, 1024, 0)]);
    r.request(2, VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, 0)]);
    r.request(3, VIRTIO_BLK_T_IN, 0, &[(DATA, 100, W)]);
    r.request(4, 0x55, 0, &[]);
    // Data outside guest memory (the backend maps 64 MiB).
    r.request(5, VIRTIO_BLK_T_OUT, 0, &[(1 << 40, 4096, 0)]);
    r.request(6, VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 4096, 4096, W)]);
    // Larger than the request size limit.
    r.request(7, VIRTIO_BLK_T_IN, 0, &[(DATA, u32::MAX - 511, W)]);
    // Still works afterwards.
    r.request(8, VIRTIO_BLK_T_IN, last - 1, &[(DATA, 512, W)]);
    r.kick();
    r.wait_used(9);
    assert_eq!(
        (0..9).map(|s| r.status(s)).collect::<Vec<_>>(),
        vec![
            S_IOERR, S_IOERR, S_IOERR, S_IOERR, S_UNSUPP, S_IOERR, S_IOERR, S_IOERR, S_OK
        ]
    );
    assert!(
        r.disk(0, 1 << 20).iter().all(|&b| b == 0),
        "nothing was written"
    );
    r.check_image();
}

#[test]
fn malformed_chains_are_returned_without_a_panic() {
    let mut r = Rig::new(false, false);
    // No writable status byte: used with length 0, nothing to write.
    let h0 = r.header(0, VIRTIO_BLK_T_IN, 0);
    let a = r.push(&[(h0, 16, 0), (STATUS, 1, 0)], false);
    // Header too short: IOERR through the status byte.
    let h1 = r.header(1, VIRTIO_BLK_T_OUT, 0);
    let b = r.push(&[(h1, 8, 0), (STATUS + 1, 1, W)], false);
    // Readable data after writable data.
    let h2 = r.header(2, VIRTIO_BLK_T_OUT, 0);
    let c = r.push(
        &[
            (h2, 16, 0),
            (DATA, 512, W),
            (DATA + 512, 512, 0),
            (STATUS + 2, 1, W),
        ],
        false,
    );
    // A chain whose NEXT points past the table, and a looping chain.
    let h3 = r.header(3, VIRTIO_BLK_T_IN, 0);
    let d = r.next_desc;
    r.mock()
        .add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(h3, 16, N, 500))],
            d,
        )
        .unwrap();
    r.next_desc += 1;
    let e = r.next_desc;
    r.mock()
        .add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(h3, 16, N, e + 1)),
                RawDescriptor::from(SplitDescriptor::new(DATA, 512, W | N, e)),
            ],
            e,
        )
        .unwrap();
    r.next_desc += 2;
    // Then a good request.
    let f = r.request(4, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.kick();
    let used = r.wait_used(6);
    let len_of = |head: u16| {
        used.iter()
            .find(|(id, _)| *id == u32::from(head))
            .map(|e| e.1)
    };
    assert_eq!(len_of(a), Some(0));
    assert_eq!(len_of(d), Some(0));
    assert_eq!(len_of(e), Some(0));
    assert_eq!(len_of(b), Some(1));
    assert_eq!(len_of(c), Some(1));
    assert_eq!(
        [r.status(1), r.status(2), r.status(4)],
        [S_IOERR, S_IOERR, S_OK]
    );
    assert_eq!(len_of(f), Some(1));
    r.check_image();
}

#[test]
fn read_only_devices_refuse_writes() {
    let mut r = Rig::new(true, false);
    r.fill(DATA, 512, 1);
    r.request(0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, 0)]);
    r.request(1, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, 0)]);
    r.request(2, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]);
    r.request(3, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.kick();
    r.wait_used(4);
    assert_eq!(
        (0..4).map(|s| r.status(s)).collect::<Vec<_>>(),
        vec![S_IOERR, S_IOERR, S_OK, S_OK]
    );
    assert!(r.read_mem(DATA, 512).iter().all(|&b| b == 0));
}

#[test]
fn event_idx_notifies_only_when_the_driver_asks() {
    let mut r = Rig::new(false, true);
    // used_event (after the avail ring) = 3: notify once the 4th entry is used.
    let used_event = r.mock().avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    r.mem.write_obj(3u16, GuestAddress(used_event)).unwrap();
    for s in 0..3 {
        r.request(s, VIRTIO_BLK_T_GET_ID, 0, &[(DATA + s * 64, 20, W)]);
    }
    r.kick();
    r.wait_used(3);
    r.backend.wait_idle();
    assert_eq!(r.signals(), 0, "no interrupt before used_event is crossed");
    r.request(3, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.kick();
    r.wait_used(4);
    r.backend.wait_idle();
    assert_eq!(r.signals(), 1, "one interrupt when entry 4 is used");
    // With notifications re-enabled, the backend published avail_event: the
    // driver is asked to kick for the next chain.
    let avail_event = r.mock().used_addr().0 + 4 + 8 * u64::from(QSIZE);
    let ev: u16 = r.mem.read_obj(GuestAddress(avail_event)).unwrap();
    assert_eq!(ev, 4);
}

#[test]
fn stop_vring_waits_for_requests_in_flight() {
    let mut r = Rig::new(false, false);
    r.fill(DATA, 4 << 20, 0x3c);
    for s in 0..4 {
        r.request(s, VIRTIO_BLK_T_OUT, s * 8192, &[(DATA, 4 << 20, 0)]);
    }
    r.kick();
    // As GET_VRING_BASE does: the ring is stopped, then the backend drains.
    r.vring.set_queue_ready(false);
    r.backend.stop_vring(0).unwrap();
    assert_eq!(r.backend.inflight(), 0);
    assert_eq!(
        r.used_idx(),
        4,
        "every request completed before stop_vring returned"
    );
    assert!((0..4).all(|s| r.status(s) == S_OK));
    // A kick on a stopped ring pops nothing.
    r.request(4, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.kick();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.used_idx(), 4);
    r.check_image();
}

#[test]
fn config_space_and_write_cache_switch() {
    let r = Rig::new(false, false);
    let cfg = r.backend.get_config(0, 64);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK / 512
    );
    assert_eq!(cfg[WCE_OFFSET], 1);
    r.backend.set_config(WCE_OFFSET as u32, &[0]).unwrap();
    assert_eq!(r.backend.get_config(0, 64)[WCE_OFFSET], 0);
    assert!(r.backend.set_config(0, &[1, 2, 3, 4]).is_err());
}

#[test]
fn a_closed_backend_pops_nothing_but_finishes_what_it_started() {
    let mut r = Rig::new(false, false);
    r.fill(DATA, 4 << 20, 0x11);
    r.request(0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 4 << 20, 0)]);
    r.kick();
    r.backend.close();
    r.request(1, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.kick();
    r.backend.wait_idle();
    assert_eq!(r.used_idx(), 1, "only the request popped before close");
    assert_eq!(r.status(0), S_OK);
    assert_eq!(r.status(1), 0xff, "never started");
}
