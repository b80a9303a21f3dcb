//! Compact images: allocation, safe reuse of freed chunks, crashes around
//! discard and reuse, and running out of space.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fvd_core::executor::block_on;
use fvd_core::storage::{AllocRun, IoFuture, MemStorage, Storage};
use fvd_core::{CreateOptions, ErrorKind, Image, IoBuf, OpenOptions, Source};

const MIB: u64 = 1 << 20;

fn compact_opts(size: u64) -> CreateOptions {
    CreateOptions {
        size: Some(size),
        compact: true,
        chunk_size: Some(MIB as u32),
        grow_unit: Some(MIB),
        ..Default::default()
    }
}

fn new_image(disk: &MemStorage, size: u64) -> Image {
    block_on(fvd_core::image::create(disk, &compact_opts(size), None)).unwrap();
    reopen(disk)
}

fn reopen(disk: &MemStorage) -> Image {
    block_on(Image::open(
        Arc::new(disk.clone()),
        None,
        OpenOptions::default(),
    ))
    .unwrap()
}

/// Host offset of the chunk holding virtual offset `v`.
fn host_of(img: &Image, v: u64) -> Option<u64> {
    let ext = block_on(img.block_status(v, 4096)).unwrap();
    assert_eq!(ext[0].source, Source::Image);
    ext[0].host_offset.map(|h| h - v % MIB)
}

fn read(img: &Image, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    block_on(img.read_slice(off, &mut b)).unwrap();
    b
}

#[test]
fn chunks_are_allocated_in_first_write_order() {
    let disk = MemStorage::new("img");
    let img = new_image(&disk, 64 * MIB);
    for (i, v) in [40u64, 3, 17].iter().enumerate() {
        block_on(img.write_slice(v * MIB, &[i as u8 + 1; 4096], false)).unwrap();
    }
    let data = host_of(&img, 40 * MIB).unwrap();
    assert_eq!(host_of(&img, 3 * MIB), Some(data + MIB));
    assert_eq!(host_of(&img, 17 * MIB), Some(data + 2 * MIB));
    assert_eq!(host_of(&img, 5 * MIB), None);
    let u = img.chunk_usage().unwrap();
    assert_eq!((u.allocated, u.chunks), (3, 64));
}

#[test]
fn freed_chunk_is_reused_only_after_the_free_is_durable() {
    let disk = MemStorage::new("img");
    let img = new_image(&disk, 64 * MIB);
    block_on(img.write_slice(0, &vec![0xaa; MIB as usize], false)).unwrap();
    block_on(img.flush()).unwrap();
    let p0 = host_of(&img, 0).unwrap();
    block_on(img.discard(0, MIB)).unwrap();
    assert_eq!(host_of(&img, 0), None);
    // The free is not durable yet: a new allocation must not take p0.
    block_on(img.write_slice(5 * MIB, &[0xbb; 4096], false)).unwrap();
    assert_ne!(host_of(&img, 5 * MIB), Some(p0));
    block_on(img.flush()).unwrap();
    // Now it may.
    block_on(img.write_slice(9 * MIB, &[0xcc; 4096], false)).unwrap();
    assert_eq!(host_of(&img, 9 * MIB), Some(p0));
    assert!(read(&img, 0, 4096).iter().all(|&b| b == 0));
    assert!(
        read(&img, 9 * MIB + 4096, 4096).iter().all(|&b| b == 0),
        "a reused chunk must read zeros"
    );
}

#[test]
fn crash_after_discard_and_reuse_never_shows_another_ranges_data() {
    for flush_discard in [false, true] {
        let disk = MemStorage::new("img");
        let img = new_image(&disk, 64 * MIB);
        block_on(img.write_slice(0, &vec![0xaa; MIB as usize], false)).unwrap();
        block_on(img.flush()).unwrap();
        block_on(img.discard(0, MIB)).unwrap();
        if flush_discard {
            block_on(img.flush()).unwrap();
        }
        // Memory storage makes every data write durable at once, so the crash
        // below keeps the new chunk's data even though nothing was flushed.
        block_on(img.write_slice(7 * MIB, &vec![0xdd; MIB as usize], false)).unwrap();
        drop(img); // crash: no flush, no close
        let img = reopen(&disk);
        let c0 = read(&img, 0, MIB as usize);
        let ok = if flush_discard {
            c0.iter().all(|&b| b == 0)
        } else {
            // The discard was never flushed: its old content may come back.
            c0.iter().all(|&b| b == 0) || c0.iter().all(|&b| b == 0xaa)
        };
        assert!(
            ok,
            "discarded range shows another range's data (flushed discard: {flush_discard})"
        );
        let c7 = read(&img, 7 * MIB, MIB as usize);
        assert!(
            c7.iter().all(|&b| b == 0),
            "an unflushed allocation survived the crash"
        );
        // The unflushed allocation's data is a leak (space), never corruption.
        let r = block_on(fvd_core::check::check_storage(&disk, None)).unwrap();
        assert!(
            r.corruptions.is_empty() && r.check_errors.is_empty(),
            "{r:?}"
        );
    }
}

#[test]
fn unflushed_allocation_is_forgotten_after_a_crash() {
    let disk = MemStorage::new("img");
    let img = new_image(&disk, 64 * MIB);
    block_on(img.write_slice(3 * MIB, &[0x77; 4096], false)).unwrap();
    drop(img);
    let img = reopen(&disk);
    assert_eq!(host_of(&img, 3 * MIB), None);
    // The chunk is free again and reused by the next write.
    block_on(img.write_slice(8 * MIB, &[0x78; 4096], false)).unwrap();
    assert!(read(&img, 8 * MIB + 4096, 4096).iter().all(|&b| b == 0));
    block_on(img.close()).unwrap();
}

/// Memory storage that cannot grow past `limit` bytes (like a full device).
struct Limited {
    inner: MemStorage,
    limit: AtomicU64,
}

impl Storage for Limited {
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        if offset + buf.len() as u64 > self.limit.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(io::Error::from_raw_os_error(
                libc_enospc(),
            ))));
        }
        self.inner.write_at(offset, buf, fua)
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
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        if len > self.limit.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(io::Error::from_raw_os_error(
                libc_enospc(),
            ))));
        }
        self.inner.set_len(len)
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.inner.allocation(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn describe(&self) -> String {
        "limited".into()
    }
}

fn libc_enospc() -> i32 {
    28
}

#[test]
fn out_of_space_fails_the_write_and_keeps_the_image_consistent() {
    let inner = MemStorage::new("img");
    block_on(fvd_core::image::create(
        &inner,
        &compact_opts(256 * MIB),
        None,
    ))
    .unwrap();
    let data_offset = inner.len().unwrap();
    let disk = Arc::new(Limited {
        inner: inner.clone(),
        limit: AtomicU64::new(data_offset + 4 * MIB),
    });
    let img = block_on(Image::open(disk.clone(), None, OpenOptions::default())).unwrap();
    for i in 0..4 {
        block_on(img.write_slice(i * 10 * MIB, &[i as u8 + 1; 4096], false)).unwrap();
    }
    let e = block_on(img.write_slice(100 * MIB, &[9; 4096], false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    block_on(img.flush()).unwrap();
    // The earlier writes survive; the failed one left nothing behind.
    assert!(read(&img, 100 * MIB, 4096).iter().all(|&b| b == 0));
    for i in 0..4u64 {
        assert!(
            read(&img, i * 10 * MIB, 4096)
                .iter()
                .all(|&b| b == i as u8 + 1)
        );
    }
    // Space freed by a discard (once durable) makes room again.
    block_on(img.discard(0, MIB)).unwrap();
    block_on(img.flush()).unwrap();
    block_on(img.write_slice(100 * MIB, &[9; 4096], false)).unwrap();
    block_on(img.close()).unwrap();
    let r = block_on(fvd_core::check::check_storage(disk.as_ref(), None)).unwrap();
    assert_eq!(r.exit_code(), 0, "{r:?}");
    assert_eq!(r.chunks, Some((4, 256)));
}
