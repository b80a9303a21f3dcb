//! An in-process vhost-user-blk front end (the `vhost` crate's `Frontend`
//! for the control messages, and a small split-virtqueue driver of our own
//! for the data path) with guest memory in a shared-memory file, as QEMU's
//! `memory-backend-memfd,share=on` provides it. The tests run it against
//! qemu-storage-daemon first, which proves the harness, then against ours.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size.
pub const MEM_SIZE: u64 = 64 << 20;
/// Queue size the driver uses.
pub const QSIZE: u16 = 128;
/// Bytes reserved per queue for its rings.
const RING_AREA: u64 = 0x1_0000;
/// Where data buffers start.
const BUF_START: u64 = 4 << 20;

/// `VIRTIO_BLK_S_*` as bytes.
pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
/// I/O error.
pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Unsupported request.
pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// One descriptor the driver puts in a chain: guest address, length,
/// device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    chains: HashMap<u16, Vec<u16>>,
    done: HashMap<u16, u32>,
}

/// A connected front end.
pub struct Driver {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    _file: std::fs::File,
    rings: Vec<Ring>,
    next_buf: u64,
    /// Features acknowledged.
    pub features: u64,
}

/// The feature bits this driver understands.
fn wanted() -> u64 {
    (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_MQ)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1 << VIRTIO_BLK_F_DISCARD)
        | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1 << VIRTIO_BLK_F_RO)
        | vhost::vhost_user::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

impl Driver {
    /// Connect to `socket`, negotiate, share memory and start `queues` queues.
    pub fn connect(socket: &Path, queues: usize) -> Driver {
        let t = Instant::now();
        let mut fe = loop {
            match Frontend::connect(socket, queues as u64) {
                Ok(f) => break f,
                Err(e) if t.elapsed() < Duration::from_secs(20) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect {}: {e}", socket.display()),
            }
        };
        let file = tempfile::tempfile_in("/dev/shm").expect("shared memory file");
        file.set_len(MEM_SIZE).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let features = offered & wanted();
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
        let nq = fe.get_queue_num().unwrap();
        assert!(nq as usize >= queues, "backend offers {nq} queues");
        let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: host,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        let mut rings = Vec::new();
        for q in 0..queues {
            let base = q as u64 * RING_AREA;
            let desc = base;
            let avail = desc + 16 * u64::from(QSIZE);
            let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
            fe.set_vring_num(q, QSIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host + desc,
                    used_ring_addr: host + used,
                    avail_ring_addr: host + avail,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(0).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            rings.push(Ring {
                desc,
                avail,
                used,
                kick,
                call,
                free: (0..QSIZE).rev().collect(),
                avail_idx: 0,
                last_used: 0,
                chains: HashMap::new(),
                done: HashMap::new(),
            });
        }
        Driver {
            fe,
            mem,
            _file: file,
            rings,
            next_buf: BUF_START,
            features,
        }
    }

    /// `size` bytes of the configuration space from `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let (_, payload) = self
            .fe
            .get_config(
                offset,
                size,
                VhostUserConfigFlags::WRITABLE,
                &vec![0; size as usize],
            )
            .unwrap();
        payload.to_vec()
    }

    /// Capacity in sectors, from the configuration space.
    pub fn capacity(&mut self) -> u64 {
        u64::from_le_bytes(self.config(0, 8).try_into().unwrap())
    }

    /// The control channel (for messages the tests send directly).
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Reserve `len` bytes of buffer space (wraps around; the tests keep
    /// far less than the buffer area in flight).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = (len + 4095) & !4095;
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_START;
        }
        let at = self.next_buf;
        self.next_buf += len;
        at
    }

    /// Put a chain on queue `q` and kick; returns its head.
    pub fn submit(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let ring = &mut self.rings[q];
        assert!(ring.free.len() >= descs.len(), "queue {q} is full");
        let ids: Vec<u16> = (0..descs.len()).map(|_| ring.free.pop().unwrap()).collect();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                ids[i + 1]
            } else {
                0
            };
            let at = ring.desc + 16 * u64::from(ids[i]);
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, GuestAddress(at)).unwrap();
        }
        let head = ids[0];
        let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        fence(Ordering::SeqCst);
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        ring.chains.insert(head, ids);
        ring.kick.write(1).unwrap();
        head
    }

    fn reap(&mut self, q: usize) {
        let ring = &mut self.rings[q];
        fence(Ordering::SeqCst);
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        while ring.last_used != idx {
            let e = ring.used + 4 + 8 * u64::from(ring.last_used % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let head = id as u16;
            if let Some(ids) = ring.chains.remove(&head) {
                ring.free.extend(ids);
            }
            ring.done.insert(head, len);
            ring.last_used = ring.last_used.wrapping_add(1);
        }
    }

    /// Wait for chain `head` of queue `q`; its used length.
    pub fn wait(&mut self, q: usize, head: u16) -> u32 {
        let t = Instant::now();
        loop {
            self.reap(q);
            if let Some(len) = self.rings[q].done.remove(&head) {
                return len;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "request {head} on queue {q} never completed"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether chain `head` of queue `q` has completed (without waiting).
    pub fn done(&mut self, q: usize, head: u16) -> bool {
        self.reap(q);
        self.rings[q].done.contains_key(&head)
    }

    /// Chains of queue `q` not completed yet.
    pub fn pending(&mut self, q: usize) -> usize {
        self.reap(q);
        self.rings[q].chains.len()
    }

    /// Start a request: header, `out` (device-readable data, copied into
    /// guest memory), `in_len` writable bytes, status. Returns (head,
    /// address of the writable data, address of the status byte).
    pub fn start(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (u16, u64, u64) {
        let hdr = self.alloc(16 + 1);
        let status = hdr + 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let mut descs = vec![Desc {
            addr: hdr,
            len: 16,
            write: false,
        }];
        if !out.is_empty() {
            let at = self.alloc(out.len() as u64);
            self.mem.write_slice(out, GuestAddress(at)).unwrap();
            descs.push(Desc {
                addr: at,
                len: out.len() as u32,
                write: false,
            });
        }
        let data = if in_len > 0 {
            let at = self.alloc(u64::from(in_len));
            descs.push(Desc {
                addr: at,
                len: in_len,
                write: true,
            });
            at
        } else {
            0
        };
        descs.push(Desc {
            addr: status,
            len: 1,
            write: true,
        });
        (self.submit(q, &descs), data, status)
    }

    /// Run one request to completion: (status, data read).
    pub fn request(&mut self, t: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, Vec<u8>) {
        let (head, data, status) = self.start(0, t, sector, out, in_len);
        self.wait(0, head);
        let st: u8 = self.mem.read_obj(GuestAddress(status)).unwrap();
        let mut buf = vec![0u8; in_len as usize];
        if in_len > 0 {
            self.mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
        }
        (st, buf)
    }

    /// Write `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.request(VIRTIO_BLK_T_OUT, sector, data, 0).0
    }

    /// Read `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.request(VIRTIO_BLK_T_IN, sector, &[], len)
    }

    /// Flush.
    pub fn flush(&mut self) -> u8 {
        self.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0).0
    }

    /// Discard or write zeroes (`t`) over `(sector, sectors, flags)` segments.
    pub fn zero(&mut self, t: u32, segs: &[(u64, u32, u32)]) -> u8 {
        let mut raw = Vec::new();
        for &(s, n, f) in segs {
            raw.extend_from_slice(&s.to_le_bytes());
            raw.extend_from_slice(&n.to_le_bytes());
            raw.extend_from_slice(&f.to_le_bytes());
        }
        self.request(t, 0, &raw, 0).0
    }

    /// Stop queue `q` as QEMU does when the VM stops: GET_VRING_BASE,
    /// which returns once the backend finished what it took from the ring.
    pub fn stop(&mut self, q: usize) -> u32 {
        self.fe.get_vring_base(q).unwrap()
    }
}
