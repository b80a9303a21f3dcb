//! Owned buffers end to end: what the pool hands out again, and that the
//! engine does its I/O in the caller's buffer.
//!
//! The pool is process-wide, so the tests of this file take turns (one
//! lock) and count what the pool did while they ran.

use std::sync::{Arc, Mutex, MutexGuard};

use fvd_core::iobuf::{pool_limit, pool_stats};
use fvd_core::{CreateOptions, Format, IoBuf, PathOptions, create_path, open_path};

const MIB: usize = 1 << 20;

fn alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_dropped_buffer_is_handed_out_again_as_it_was() {
    let _g = alone();
    let len = 3 * MIB; // the 4 MiB class
    let mut a = IoBuf::for_overwrite(len);
    let at = a.as_ptr();
    a[..4096].fill(0x5a);
    // A view dropped while narrowed gives back the whole allocation.
    drop(a.narrow(4096..8192));
    let before = pool_stats();
    assert!(before.bytes >= 4 * MIB, "the pool holds the dropped buffer");

    let b = IoBuf::for_overwrite(len);
    let after = pool_stats();
    assert_eq!(b.as_ptr(), at, "the same allocation, from the pool");
    assert_eq!(b.len(), len, "with its whole window");
    // No zero-fill for a buffer that will be overwritten: the bytes of its
    // last user are still there.
    assert!(b[..4096].iter().all(|&x| x == 0x5a));
    assert_eq!(after.allocated, before.allocated, "nothing allocated");
    assert_eq!(after.reused, before.reused + 1);
    assert_eq!(after.bytes, before.bytes - 4 * MIB);

    // `zeroed` clears what it takes from the pool.
    drop(b);
    let z = IoBuf::zeroed(len);
    assert_eq!(z.as_ptr(), at);
    assert!(z.is_zero());
}

#[test]
fn buffers_larger_than_the_largest_class_are_not_kept() {
    let _g = alone();
    let before = pool_stats();
    drop(IoBuf::for_overwrite(33 * MIB));
    let mid = pool_stats();
    assert_eq!(mid.bytes, before.bytes, "not kept");
    drop(IoBuf::for_overwrite(33 * MIB));
    assert_eq!(pool_stats().allocated, before.allocated + 2);
}

#[test]
fn the_pool_never_holds_more_than_its_limit() {
    let _g = alone();
    // More 8 MiB buffers alive at once than the pool may keep.
    let n = pool_limit() / (8 * MIB) + 4;
    let bufs: Vec<IoBuf> = (0..n).map(|_| IoBuf::for_overwrite(8 * MIB)).collect();
    drop(bufs);
    assert!(pool_stats().bytes <= pool_limit());
}

/// 64 MiB written and read back through an FVD image file in 1 MiB
/// requests, 8 at a time (what `fvd convert` and an NBD client at QD8 do):
/// every request does its I/O in the buffer it was given, and the buffers
/// come from the pool, not from the allocator.
#[test]
fn large_requests_run_in_the_callers_buffer_from_the_pool() {
    let _g = alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.fvd");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let co = CreateOptions {
            size: Some(64 * MIB as u64),
            ..CreateOptions::default()
        };
        create_path(&path, None, co, None).await.unwrap();
        let img = Arc::new(
            open_path(&path, Format::Fvd, PathOptions::default())
                .await
                .unwrap(),
        );
        let before = pool_stats();
        for round in 0..8u64 {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..8u64 {
                let img = img.clone();
                tasks.spawn(async move {
                    let n = round * 8 + i;
                    let mut buf = IoBuf::for_overwrite(MIB);
                    buf.fill(n as u8 + 1);
                    let at = buf.as_ptr() as usize;
                    let back = img.write(n * MIB as u64, buf, false).await.unwrap();
                    assert_eq!(back.as_ptr() as usize, at, "write gives back its buffer");
                    assert_eq!(back.len(), MIB);
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        }
        img.flush().await.unwrap();
        for n in 0..64u64 {
            let buf = IoBuf::for_overwrite(MIB);
            let at = buf.as_ptr();
            let got = img.read(n * MIB as u64, buf).await.unwrap();
            assert_eq!(got.as_ptr(), at, "read fills the buffer it was given");
            assert!(got.iter().all(|&x| x == n as u8 + 1), "data of request {n}");
        }
        let after = pool_stats();
        // 128 requests of 1 MiB, at most 8 in flight (+ the engine's own
        // metadata buffers): a handful of allocations, the rest reused.
        let fresh = after.allocated - before.allocated;
        let reused = after.reused - before.reused;
        assert!(fresh <= 24, "{fresh} buffers allocated for 128 requests");
        assert!(reused >= 100, "only {reused} buffers reused");
        img.close().await.unwrap();
    });
}
