//! Parsing virtio-blk requests out of descriptor chains (virtio 1.2 §5.2.6).
//!
//! A request is a device-readable 16-byte header (`type`, `ioprio`,
//! `sector`), then device-readable data (writes, discard segments), then
//! device-writable data (reads, the ID), and finally one device-writable
//! status byte: the last byte of the chain. The framing of these parts into
//! descriptors is the driver's choice, so parts may share or span
//! descriptors. Everything here is guest-controlled: every length is checked,
//! nothing panics, and a chain that cannot be understood gets
//! `VIRTIO_BLK_S_IOERR` when it has a status byte to carry it.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Bytes of the request header.
pub const HEADER_LEN: u64 = 16;

/// A contiguous piece of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `VIRTIO_BLK_T_IN`: read into the writable data.
    In,
    /// `VIRTIO_BLK_T_OUT`: write the readable data.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the serial into the writable data.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: segments in the readable data.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: segments in the readable data.
    WriteZeroes,
    /// Anything else (answered `VIRTIO_BLK_S_UNSUPP`).
    Unsupported(u32),
}

impl Kind {
    fn from_type(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            other => Kind::Unsupported(other),
        }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Index of the chain's head descriptor (what the used ring reports).
    pub head: u16,
    /// What is asked.
    pub kind: Kind,
    /// First sector.
    pub sector: u64,
    /// Device-readable bytes after the header.
    pub readable: Vec<Segment>,
    /// Device-writable bytes before the status byte.
    pub writable: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Bytes of device-readable data.
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Bytes of device-writable data.
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }
}

/// Why a chain is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// No writable status byte at the end: nothing can be reported; the
    /// chain is returned with length 0.
    NoStatus(&'static str),
    /// A status byte exists but the rest is malformed: `VIRTIO_BLK_S_IOERR`.
    Malformed(GuestAddress, &'static str),
}

/// Sum of segment lengths.
pub fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Parse the descriptors of one chain (`descs`, in chain order, as the
/// `DescriptorChain` iterator yields them; it has already resolved indirect
/// tables and stopped at loops or out-of-range indices).
pub fn parse<M: GuestMemory>(
    mem: &M,
    head: u16,
    descs: &[Descriptor],
) -> Result<Request, ParseError> {
    let last = descs
        .last()
        .ok_or(ParseError::NoStatus("empty descriptor chain"))?;
    if last.has_next() {
        // The iterator stopped before the chain's end: a loop, an index past
        // the table, or an unreadable descriptor.
        return Err(ParseError::NoStatus("broken descriptor chain"));
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::NoStatus(
            "the last descriptor is not a writable status byte",
        ));
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ParseError::NoStatus("status address overflows"))?;
    let bad = |why| ParseError::Malformed(status, why);

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        let mut len = u64::from(d.len());
        if i + 1 == descs.len() {
            len -= 1; // the status byte
        }
        if len == 0 {
            continue;
        }
        if d.addr().checked_add(len).is_none() {
            return Err(bad("descriptor address overflows"));
        }
        let seg = Segment {
            addr: d.addr(),
            len,
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err(bad("device-readable descriptor after a writable one"));
        } else {
            readable.push(seg);
        }
    }
    if total(&readable) < HEADER_LEN {
        return Err(bad("request header shorter than 16 bytes"));
    }
    let (header_segs, readable) = split_at(&readable, HEADER_LEN);
    let mut header = [0u8; HEADER_LEN as usize];
    gather(mem, &header_segs, &mut header).map_err(|_| bad("header outside guest memory"))?;
    let kind = Kind::from_type(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok(Request {
        head,
        kind,
        sector: u64::from_le_bytes(sector),
        readable,
        writable,
        status,
    })
}

/// Split `segs` into the first `at` bytes and the rest.
pub fn split_at(segs: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = at;
    for s in segs {
        if left == 0 {
            tail.push(*s);
        } else if s.len <= left {
            head.push(*s);
            left -= s.len;
        } else {
            head.push(Segment {
                addr: s.addr,
                len: left,
            });
            tail.push(Segment {
                addr: s.addr.unchecked_add(left),
                len: s.len - left,
            });
            left = 0;
        }
    }
    (head, tail)
}

/// Copy guest memory `segs` into `buf` (as many bytes as `buf` holds).
pub fn gather<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for s in segs {
        if pos >= buf.len() {
            break;
        }
        let n = (buf.len() - pos).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        mem.read_slice(&mut buf[pos..pos + n], s.addr)?;
        pos += n;
    }
    Ok(())
}

/// Copy `buf` into guest memory `segs` (as many bytes as `buf` holds).
pub fn scatter<M: GuestMemory>(
    mem: &M,
    segs: &[Segment],
    buf: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut pos = 0usize;
    for s in segs {
        if pos >= buf.len() {
            break;
        }
        let n = (buf.len() - pos).min(usize::try_from(s.len).unwrap_or(usize::MAX));
        mem.write_slice(&buf[pos..pos + n], s.addr)?;
        pos += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = 2; // VRING_DESC_F_WRITE
    const N: u16 = 1; // VRING_DESC_F_NEXT

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    #[test]
    fn three_descriptor_read() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_IN, 7);
        let d = [
            Descriptor::new(0x100, 16, N, 1),
            Descriptor::new(0x1000, 4096, W | N, 2),
            Descriptor::new(0x3000, 1, W, 0),
        ];
        let r = parse(&m, 5, &d).unwrap();
        assert_eq!(r.head, 5);
        assert_eq!(r.kind, Kind::In);
        assert_eq!(r.sector, 7);
        assert_eq!(r.writable_len(), 4096);
        assert_eq!(r.readable_len(), 0);
        assert_eq!(r.status, GuestAddress(0x3000));
    }

    #[test]
    fn parts_sharing_descriptors() {
        // Header and write data in one descriptor; data and status in another.
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 1);
        let d = [
            Descriptor::new(0x100, 16 + 512, N, 1),
            Descriptor::new(0x2000, 1, W, 0),
        ];
        let r = parse(&m, 0, &d).unwrap();
        assert_eq!(r.kind, Kind::Out);
        assert_eq!(
            r.readable,
            vec![Segment {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );
        header(&m, 0x200, VIRTIO_BLK_T_IN, 0);
        let d = [
            Descriptor::new(0x200, 16, N, 1),
            Descriptor::new(0x1000, 513, W, 0),
        ];
        let r = parse(&m, 0, &d).unwrap();
        assert_eq!(r.writable_len(), 512);
        assert_eq!(r.status, GuestAddress(0x1200));
        // A header split over two descriptors.
        header(&m, 0x300, VIRTIO_BLK_T_FLUSH, 0);
        let d = [
            Descriptor::new(0x300, 10, N, 1),
            Descriptor::new(0x30a, 6, N, 2),
            Descriptor::new(0x400, 1, W, 0),
        ];
        assert_eq!(parse(&m, 0, &d).unwrap().kind, Kind::Flush);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        assert!(matches!(parse(&m, 0, &[]), Err(ParseError::NoStatus(_))));
        // Status not writable.
        let d = [
            Descriptor::new(0x100, 16, N, 1),
            Descriptor::new(0x200, 1, 0, 0),
        ];
        assert!(matches!(parse(&m, 0, &d), Err(ParseError::NoStatus(_))));
        // Truncated chain (the last one still says NEXT).
        let d = [
            Descriptor::new(0x100, 16, N, 1),
            Descriptor::new(0x200, 1, W | N, 9),
        ];
        assert!(matches!(parse(&m, 0, &d), Err(ParseError::NoStatus(_))));
        // Short header.
        let d = [
            Descriptor::new(0x100, 8, N, 1),
            Descriptor::new(0x200, 1, W, 0),
        ];
        assert_eq!(
            parse(&m, 0, &d),
            Err(ParseError::Malformed(
                GuestAddress(0x200),
                "request header shorter than 16 bytes"
            ))
        );
        // Readable after writable.
        let d = [
            Descriptor::new(0x100, 16, N, 1),
            Descriptor::new(0x1000, 512, W | N, 2),
            Descriptor::new(0x2000, 512, N, 3),
            Descriptor::new(0x300, 1, W, 0),
        ];
        assert!(matches!(parse(&m, 0, &d), Err(ParseError::Malformed(..))));
        // Header outside guest memory.
        let d = [
            Descriptor::new(0xffff_0000, 16, N, 1),
            Descriptor::new(0x300, 1, W, 0),
        ];
        assert!(matches!(parse(&m, 0, &d), Err(ParseError::Malformed(..))));
        // Address overflow.
        let d = [
            Descriptor::new(0x100, 16, N, 1),
            Descriptor::new(u64::MAX - 10, 100, W | N, 2),
            Descriptor::new(0x300, 1, W, 0),
        ];
        assert!(matches!(parse(&m, 0, &d), Err(ParseError::Malformed(..))));
        // Unknown type parses (answered UNSUPP later).
        header(&m, 0x100, 99, 0);
        let d = [
            Descriptor::new(0x100, 16, N, 1),
            Descriptor::new(0x300, 1, W, 0),
        ];
        assert_eq!(parse(&m, 0, &d).unwrap().kind, Kind::Unsupported(99));
    }

    #[test]
    fn gather_scatter_across_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 5,
            },
        ];
        scatter(&m, &segs, b"abcdefgh").unwrap();
        let mut out = [0u8; 8];
        gather(&m, &segs, &mut out).unwrap();
        assert_eq!(&out, b"abcdefgh");
        let mut b = [0u8; 2];
        m.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(&b, b"de");
        let (h, t) = split_at(&segs, 4);
        assert_eq!(total(&h), 4);
        assert_eq!(t[0].addr, GuestAddress(0x2001));
    }
}
