//! Normal I/O never touches snapshot metadata: the FVD paper's promise that
//! "the refcount table is never updated during normal execution of the VM".
//! Every write, zeroing and discard the engine issues is recorded at the
//! storage; guest writes (into chunks of their own, into chunks shared with
//! snapshots: copy-on-write), discards, write-zeroes, flushes and a close
//! must not land in the refcount table, the snapshot directory or a
//! snapshot's table copy. Only snapshot operations write those.

use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use fvd_core::executor::block_on;
use fvd_core::format::header::{Header, Region};
use fvd_core::format::snapshot::decode_copies;
use fvd_core::storage::{AllocRun, IoFuture, MemStorage, Storage};
use fvd_core::{CreateOptions, Image, IoBuf, OpenOptions};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

/// Memory storage that records the byte ranges every write, zeroing and
/// discard covers.
struct Recording {
    inner: MemStorage,
    touched: Mutex<Vec<(&'static str, Range<u64>)>>,
}

impl Recording {
    fn note(&self, what: &'static str, offset: u64, len: u64) {
        self.touched
            .lock()
            .unwrap()
            .push((what, offset..offset + len));
    }

    fn take(&self) -> Vec<(&'static str, Range<u64>)> {
        std::mem::take(&mut self.touched.lock().unwrap())
    }
}

impl Storage for Recording {
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        self.note("write", offset, buf.len() as u64);
        self.inner.write_at(offset, buf, fua)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.note("discard", offset, len);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.note("write_zeroes", offset, len);
        self.inner.write_zeroes(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        self.inner.set_len(len)
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.inner.allocation(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn describe(&self) -> String {
        "recording".into()
    }
}

fn header(disk: &MemStorage) -> Header {
    block_on(fvd_core::image::read_header(disk)).unwrap().0
}

/// The byte ranges of snapshot metadata: the refcount region, the
/// directory region, and (with snapshots) the refcount table wherever it
/// lives and every snapshot's table and bitmap copy.
fn snapshot_metadata(disk: &MemStorage) -> Vec<(String, Range<u64>)> {
    let h = header(disk);
    let mut out = Vec::new();
    for (name, r) in [
        ("refcount region", Region::Refcounts),
        ("snapshot directory", Region::Snapshots),
    ] {
        let e = h.region(r);
        out.push((name.to_string(), e.offset..e.offset + e.length));
    }
    let dir = h.region(Region::Snapshots);
    let mut bytes = vec![0u8; dir.length as usize];
    disk.read_sync(dir.offset, &mut bytes);
    if let Some((d, _)) = decode_copies(&bytes).unwrap() {
        let rc = d.refcounts;
        out.push(("refcount table".into(), rc.offset..rc.offset + rc.bytes()));
        let data = h.region(Region::Data).offset;
        for s in &d.entries {
            let t = data + s.table_chunk * CHUNK;
            out.push((
                format!("table copy of {}", s.name),
                t..t + s.table_chunks(CHUNK) * CHUNK,
            ));
            if s.has_bitmap() {
                let b = data + s.bitmap_chunk * CHUNK;
                out.push((
                    format!("bitmap copy of {}", s.name),
                    b..b + s.bitmap_chunks(CHUNK) * CHUNK,
                ));
            }
        }
    }
    out
}

fn open(disk: &Arc<Recording>) -> Image {
    block_on(Image::open(disk.clone(), None, OpenOptions::default())).unwrap()
}

/// Guest I/O of every kind: first writes, overwrites (of shared chunks
/// too, once a snapshot exists), partial-chunk writes, write-zeroes,
/// discards, flushes.
fn guest_io(img: &Image, round: u8) {
    for c in 0..24u64 {
        let off = c * CHUNK + (c % 3) * 4096;
        block_on(img.write_slice(off, &[round ^ c as u8; 8192], false)).unwrap();
    }
    block_on(img.flush()).unwrap();
    block_on(img.write_slice(30 * CHUNK, &vec![round; 3 * CHUNK as usize], true)).unwrap();
    block_on(img.write_zeroes(2 * CHUNK, CHUNK, false, false)).unwrap();
    block_on(img.write_zeroes(9 * CHUNK + 4096, 4096, true, false)).unwrap();
    block_on(img.discard(5 * CHUNK, 2 * CHUNK)).unwrap();
    block_on(img.discard(40 * CHUNK, CHUNK)).unwrap();
    block_on(img.flush()).unwrap();
}

fn assert_untouched(disk: &Recording, meta: &[(String, Range<u64>)], when: &str) {
    let touched = disk.take();
    assert!(!touched.is_empty(), "{when}: the I/O wrote nothing at all");
    for (what, r) in &touched {
        for (name, m) in meta {
            assert!(
                r.end <= m.start || r.start >= m.end,
                "{when}: a {what} of {r:?} touched the {name} ({m:?})"
            );
        }
    }
}

#[test]
fn normal_io_never_touches_refcounts_directory_or_snapshot_tables() {
    let inner = MemStorage::new("img");
    let opts = CreateOptions {
        size: Some(8 * MIB),
        compact: true,
        chunk_size: Some(CHUNK as u32),
        ..Default::default()
    };
    block_on(fvd_core::image::create(&inner, &opts, None)).unwrap();
    let disk = Arc::new(Recording {
        inner: inner.clone(),
        touched: Mutex::new(Vec::new()),
    });

    // No snapshot yet: no I/O may reach the refcount or directory regions.
    let img = open(&disk);
    disk.take();
    guest_io(&img, 1);
    assert_untouched(&disk, &snapshot_metadata(&inner), "without snapshots");

    // A snapshot shares every chunk written so far. Writes into them copy
    // (the counts stay as they are: the old chunks belong to the snapshot).
    block_on(img.create_snapshot("a")).unwrap();
    let meta = snapshot_metadata(&inner);
    assert!(meta.iter().any(|(n, _)| n == "table copy of a"), "{meta:?}");
    disk.take();
    guest_io(&img, 2);
    assert!(
        img.stats()
            .chunks_copied
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "no shared chunk was copied: the test does not test copy-on-write"
    );
    assert_untouched(&disk, &meta, "with one snapshot");

    // Two snapshots, one of them deleted; then a reopen (its recovery and
    // close write only the live metadata).
    disk.take();
    block_on(img.create_snapshot("b")).unwrap();
    block_on(img.delete_snapshot(&fvd_core::image::snapshot::SnapshotSel::Name("a".into())))
        .unwrap();
    let meta = snapshot_metadata(&inner);
    // The recorder sees snapshot operations write the ranges it guards.
    let ops = disk.take();
    for name in ["refcount table", "snapshot directory", "table copy of b"] {
        let (_, m) = meta.iter().find(|(n, _)| n == name).unwrap();
        assert!(
            ops.iter().any(|(_, r)| r.start < m.end && m.start < r.end),
            "create/delete never wrote the {name}: {ops:?}"
        );
    }
    disk.take();
    guest_io(&img, 3);
    block_on(img.close()).unwrap();
    drop(img);
    let img = open(&disk);
    guest_io(&img, 4);
    block_on(img.close()).unwrap();
    assert_untouched(&disk, &meta, "after a delete and a reopen");

    // What the snapshot holds is still round 2's data.
    let view = block_on(Image::open_snapshot(
        Arc::new(inner.clone()),
        None,
        &fvd_core::image::snapshot::SnapshotSel::Name("b".into()),
    ))
    .unwrap();
    let mut got = vec![0u8; 8192];
    block_on(view.read_slice(7 * CHUNK + 4096, &mut got)).unwrap();
    assert!(got.iter().all(|&b| b == 2 ^ 7), "snapshot b changed");
}
