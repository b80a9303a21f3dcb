//! Running one parsed request on the engine and writing its status byte.
//!
//! Data is copied once each way between guest memory and an engine buffer
//! (an `IoBuf` from the pool: no allocation, no zero-fill): reads land in
//! the buffer and are copied into the guest's descriptors, writes are
//! gathered into it and the storage writes that buffer. Reading straight
//! into guest memory was considered and left out on purpose:
//! * guest memory is shared with a guest that may change it while the
//!   request is in flight; the engine works on write data (copy-on-write
//!   merges, zero checks, encryption) and a Rust slice over memory another
//!   party writes is unsound — vm-memory hands out only volatile access
//!   for that reason;
//! * a request's data is spread over several descriptors, the engine and
//!   storage take one contiguous buffer per run;
//! * `O_DIRECT` needs 512-byte-aligned memory, which guest buffers are
//!   only when the guest's driver makes them so.
//!
//! The copy runs at memory speed (about 0.1 ms per MiB here), well below
//! the I/O it accompanies.

use std::sync::atomic::{AtomicBool, Ordering};

use fvd_core::{Image, IoBuf};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestMemory};

use crate::config::{
    DeviceConfig, ID_BYTES, MAX_REQUEST_BYTES, MAX_ZERO_SECTORS, MAX_ZERO_SEGMENTS, SECTOR,
};
use crate::request::{Kind, Request, gather, scatter};

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Bytes of one discard / write-zeroes segment.
const ZERO_SEGMENT_LEN: u64 = 16;

/// The device state shared by every queue of one connection.
#[derive(Debug)]
pub struct Device {
    /// What the device looks like.
    pub config: DeviceConfig,
    /// Write cache on (`wce` = 1): writes complete before they are durable
    /// and flushes make them so. Off: every write is made durable (FUA).
    pub writeback: AtomicBool,
    /// Report failed requests on standard error.
    pub verbose: bool,
}

impl Device {
    /// A device with its write cache on (the virtio default when
    /// `VIRTIO_BLK_F_CONFIG_WCE` is offered and the driver keeps it).
    pub fn new(config: DeviceConfig, verbose: bool) -> Device {
        Device {
            config,
            writeback: AtomicBool::new(true),
            verbose,
        }
    }

    fn log(&self, req: &Request, what: &str) {
        if self.verbose {
            eprintln!(
                "fvd serve: vhost-user-blk: {:?} at sector {}: {what}",
                req.kind, req.sector
            );
        }
    }
}

/// How a request ended: its status and the bytes written into the chain's
/// device-writable part (the status byte included), for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Used length.
    pub written: u32,
}

impl Outcome {
    fn status(status: u8) -> Outcome {
        Outcome { status, written: 1 }
    }
}

/// Run `req` on `image` and write its status byte into guest memory.
pub async fn execute<M: GuestMemory>(
    image: &Image,
    dev: &Device,
    mem: &M,
    req: &Request,
) -> Outcome {
    let out = match run(image, dev, mem, req).await {
        Ok(o) => o,
        Err((status, why)) => {
            dev.log(req, &why);
            Outcome::status(status)
        }
    };
    if mem.write_obj(out.status, req.status).is_err() {
        dev.log(req, "status byte outside guest memory");
    }
    out
}

type Failed = (u8, String);

fn ioerr(why: impl Into<String>) -> Failed {
    (S_IOERR, why.into())
}

/// The byte range of `len` bytes from `sector`, checked against the disk.
fn byte_range(dev: &Device, sector: u64, len: u64) -> Result<u64, Failed> {
    if !len.is_multiple_of(SECTOR) {
        return Err(ioerr(format!("length {len} is not a multiple of 512")));
    }
    match sector.checked_add(len / SECTOR) {
        // No overflow: sector <= sectors() = size / 512.
        Some(end) if end <= dev.config.sectors() => Ok(sector * SECTOR),
        _ => Err(ioerr(format!(
            "{len} bytes from sector {sector} are past the end of the disk ({} sectors)",
            dev.config.sectors()
        ))),
    }
}

fn check_len(len: u64) -> Result<usize, Failed> {
    if len > MAX_REQUEST_BYTES {
        return Err(ioerr(format!(
            "{len} bytes of data exceed the {MAX_REQUEST_BYTES}-byte limit"
        )));
    }
    usize::try_from(len).map_err(|_| ioerr("request too large"))
}

fn engine(what: &str, e: fvd_core::Error) -> Failed {
    ioerr(format!("{what}: {e}"))
}

async fn run<M: GuestMemory>(
    image: &Image,
    dev: &Device,
    mem: &M,
    req: &Request,
) -> Result<Outcome, Failed> {
    let writable = |kind: Kind| {
        if dev.config.read_only {
            Err(ioerr(format!("{kind:?} on a read-only device")))
        } else {
            Ok(())
        }
    };
    match req.kind {
        Kind::In => {
            let len = req.writable_len();
            let n = check_len(len)?;
            let offset = byte_range(dev, req.sector, len)?;
            let buf = image
                .read(offset, IoBuf::for_overwrite(n))
                .await
                .map_err(|e| engine("read", e))?;
            scatter(mem, &req.writable, &buf)
                .map_err(|_| ioerr("read buffer outside guest memory"))?;
            let written = u32::try_from(len + 1).unwrap_or(u32::MAX);
            Ok(Outcome {
                status: S_OK,
                written,
            })
        }
        Kind::Out => {
            writable(req.kind)?;
            let len = req.readable_len();
            let n = check_len(len)?;
            let offset = byte_range(dev, req.sector, len)?;
            let mut buf = IoBuf::for_overwrite(n);
            gather(mem, &req.readable, &mut buf)
                .map_err(|_| ioerr("write buffer outside guest memory"))?;
            let fua = !dev.writeback.load(Ordering::Acquire);
            image
                .write(offset, buf, fua)
                .await
                .map_err(|e| engine("write", e))?;
            Ok(Outcome::status(S_OK))
        }
        Kind::Flush => {
            image.flush().await.map_err(|e| engine("flush", e))?;
            Ok(Outcome::status(S_OK))
        }
        Kind::GetId => {
            let mut id = [0u8; ID_BYTES];
            let serial = dev.config.serial.as_bytes();
            let n = serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&serial[..n]);
            let room = usize::try_from(req.writable_len().min(ID_BYTES as u64)).unwrap_or(0);
            scatter(mem, &req.writable, &id[..room])
                .map_err(|_| ioerr("ID buffer outside guest memory"))?;
            Ok(Outcome {
                status: S_OK,
                written: room as u32 + 1,
            })
        }
        Kind::Discard | Kind::WriteZeroes => {
            writable(req.kind)?;
            zero_segments(image, dev, mem, req).await?;
            Ok(Outcome::status(S_OK))
        }
        Kind::Unsupported(t) => Err((S_UNSUPP, format!("unsupported request type {t}"))),
    }
}

/// Discard and write-zeroes: an array of `{sector: le64, num_sectors: le32,
/// flags: le32}` segments, all checked before any is applied.
async fn zero_segments<M: GuestMemory>(
    image: &Image,
    dev: &Device,
    mem: &M,
    req: &Request,
) -> Result<(), Failed> {
    let len = req.readable_len();
    if len == 0 || !len.is_multiple_of(ZERO_SEGMENT_LEN) {
        return Err((
            S_UNSUPP,
            format!("segment list of {len} bytes is not a multiple of 16"),
        ));
    }
    let count = len / ZERO_SEGMENT_LEN;
    if count > u64::from(MAX_ZERO_SEGMENTS) {
        return Err((
            S_UNSUPP,
            format!("{count} segments exceed the limit of {MAX_ZERO_SEGMENTS}"),
        ));
    }
    let mut raw = vec![0u8; len as usize];
    gather(mem, &req.readable, &mut raw).map_err(|_| ioerr("segments outside guest memory"))?;
    let allowed_flags = if req.kind == Kind::WriteZeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    let mut ranges = Vec::with_capacity(count as usize);
    for seg in raw.chunks_exact(ZERO_SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        if flags & !allowed_flags != 0 {
            return Err((S_UNSUPP, format!("segment flags {flags:#x} not supported")));
        }
        if num > MAX_ZERO_SECTORS {
            return Err(ioerr(format!(
                "{num} sectors exceed the limit of {MAX_ZERO_SECTORS}"
            )));
        }
        let bytes = u64::from(num) * SECTOR;
        let offset = byte_range(dev, sector, bytes)?;
        ranges.push((
            offset,
            bytes,
            flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        ));
    }
    let fua = !dev.writeback.load(Ordering::Acquire);
    for (offset, bytes, unmap) in ranges {
        if bytes == 0 {
            continue;
        }
        let r = if req.kind == Kind::Discard {
            image.discard(offset, bytes).await
        } else {
            image.write_zeroes(offset, bytes, unmap, fua).await
        };
        r.map_err(|e| engine(&format!("{:?}", req.kind), e))?;
    }
    Ok(())
}
