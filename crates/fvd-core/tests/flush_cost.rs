//! What a flush costs in fdatasyncs (issue [commit]), counted at the
//! storage: every `Storage::flush` of the file backend is one fdatasync(2),
//! and the engine writes no FUA data. For each layout (sparse, compact),
//! cache mode (page cache, O_DIRECT) and preallocation mode:
//!
//! * the first flush after opening a clean image: 2 (the header that clears
//!   the clean flag must be durable before any journal block), plus 1 in
//!   a compact image whose first allocation grew the file (the new size
//!   must be durable before a table entry pointing into it; once per grow
//!   unit);
//! * then a flush after a first write to a base data block: **1**;
//! * a flush after a rewrite of a block the previous flush made local: 2
//!   (the rewrite first confirms the journal record, see `meta/commit.rs`);
//! * a flush after a write beyond the base range into allocated space: 1.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fvd_core::base::{Base, RawBase};
use fvd_core::executor::block_on;
use fvd_core::storage::file::FileOptions;
use fvd_core::storage::{AllocRun, CacheMode, FileStorage, IoFuture, Storage};
use fvd_core::{BaseSpec, CreateOptions, Format, Image, IoBuf, OpenOptions, Preallocation};

/// The file backend, counting fdatasyncs and FUA writes.
struct Counting {
    inner: FileStorage,
    fdatasyncs: AtomicU64,
}

impl Storage for Counting {
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        if fua {
            self.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.write_at(offset, buf, fua)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.fdatasyncs.fetch_add(1, Ordering::Relaxed);
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
        self.inner.set_len(len)
    }
    fn preallocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.inner.preallocate(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        self.inner.allocation(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

const MIB: u64 = 1 << 20;
const BASE: u64 = 32 * MIB;

fn file(path: &Path, cache: CacheMode, write: bool) -> Option<FileStorage> {
    let fo = FileOptions {
        write,
        create: false,
        cache,
        lock: write,
    };
    match FileStorage::open(path, fo) {
        Ok(f) => Some(f),
        // A file system without O_DIRECT (tmpfs): nothing to measure.
        Err(e) if cache == CacheMode::None => {
            eprintln!("SKIP cache=none: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Counts (first flush, each first-write flush, rewrite flush, write beyond
/// the base) for one configuration.
fn measure(
    dir: &Path,
    compact: bool,
    cache: CacheMode,
    prealloc: Preallocation,
) -> Option<[u64; 4]> {
    let base_path = dir.join("base.raw");
    if !base_path.exists() {
        let data: Vec<u8> = (0..BASE).map(|i| (i % 251) as u8 | 1).collect();
        std::fs::write(&base_path, data).unwrap();
    }
    let img = dir.join(format!("img-{compact}-{cache:?}-{}.fvd", prealloc.name()));
    let spec = BaseSpec {
        name: "base.raw".into(),
        format: Format::Raw,
    };
    let opts = CreateOptions {
        size: Some(2 * BASE),
        compact,
        preallocation: prealloc,
        ..CreateOptions::default()
    };
    block_on(fvd_core::create_path(&img, Some(&spec), opts, Some(false))).unwrap();
    let base: Arc<dyn Base> =
        Arc::new(RawBase::new(Arc::new(file(&base_path, cache, false)?)).unwrap());
    let storage = Arc::new(Counting {
        inner: file(&img, cache, true)?,
        fdatasyncs: AtomicU64::new(0),
    });
    let img = block_on(Image::open(
        storage.clone(),
        Some(base),
        OpenOptions::default(),
    ))
    .unwrap();
    let count = |f: &dyn Fn()| {
        let before = storage.fdatasyncs.load(Ordering::Relaxed);
        f();
        storage.fdatasyncs.load(Ordering::Relaxed) - before
    };
    let buf = vec![0x5au8; 4096];
    let write_flush = |off: u64| {
        block_on(img.write_slice(off, &buf, false)).unwrap();
        block_on(img.flush()).unwrap();
    };
    let first = count(&|| write_flush(0));
    // First writes into base data, each in a fresh 1 MiB chunk (compact
    // images allocate one; the first allocation grew the file above).
    let mut per_write = Vec::new();
    for i in 1..=16u64 {
        per_write.push(count(&|| write_flush(i * MIB + 8192)));
    }
    assert!(
        per_write.iter().all(|&n| n == per_write[0]),
        "first writes cost {per_write:?}"
    );
    let rewrite = count(&|| write_flush(16 * MIB + 8192));
    // Beyond the base, into storage the first write of it allocated.
    write_flush(BASE + 4 * MIB);
    let beyond = count(&|| write_flush(BASE + 4 * MIB + 8192));
    block_on(img.close()).unwrap();
    Some([first, per_write[0], rewrite, beyond])
}

#[test]
fn a_flush_after_a_first_write_to_base_data_costs_one_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = String::new();
    for compact in [false, true] {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            for prealloc in Preallocation::ALL {
                let Some(m) = measure(dir.path(), compact, cache, prealloc) else {
                    continue;
                };
                table.push_str(&format!(
                    "{} cache={cache:?} preallocation={}: first flush {}, first write {}, rewrite {}, beyond the base {}\n",
                    if compact { "compact" } else { "sparse" },
                    prealloc.name(),
                    m[0],
                    m[1],
                    m[2],
                    m[3]
                ));
                // A compact image's first allocation grows the file: one
                // more fdatasync, once per grow unit (not with `metadata`,
                // which maps every chunk at create).
                let grow = u64::from(compact && prealloc != Preallocation::Metadata);
                assert_eq!(m, [2 + grow, 1, 2, 1], "{table}");
            }
        }
    }
    // Written past the test harness's capture, so `cargo test` shows it.
    use std::io::Write;
    let _ = std::io::stdout().write_all(table.as_bytes());
}
