//! Owned, 4 KiB-aligned I/O buffers, views of them, and the pool they come
//! from.
//!
//! A request's data lives in one [`IoBuf`] from end to end: the NBD server
//! reads a write's payload from the socket into it, the engine hands it (or
//! views of it, one per run of the mapping) to the storage, and a read's
//! buffer is the one the reply sends. Storage backends take and return
//! ownership so that an I/O running on another thread (the file backend's
//! pool, the AIO completion thread) never writes into memory its caller has
//! freed, and so that `O_DIRECT` gets aligned memory.
//!
//! **Views.** A buffer shows a window of its allocation: `Deref` gives that
//! window, and [`IoBuf::narrow`] moves it inside itself, so the engine can
//! issue the I/O of one run of a request on the run's part of the request's
//! buffer without copying. [`IoBuf::window`] records the window before it is
//! narrowed and [`IoBuf::widen`] puts it back when the storage returns the
//! buffer (refusing a window of another allocation, so a backend that
//! returned the wrong buffer is an error, not a silent mix-up).
//!
//! **The pool.** Buffers are allocated in power-of-two size classes from
//! 4 KiB to 32 MiB; a dropped buffer of a class goes back to a process-wide
//! pool (a mutex-protected free list per class) and the next buffer of that
//! class is taken from there, so a busy server or `fvd convert` does not map,
//! zero and unmap fresh memory for every request. The pool keeps at most
//! [`pool_limit`] bytes (`FVD_BUF_POOL_MIB`, default 64 MiB); buffers dropped
//! beyond that, and larger buffers, go back to the allocator. A length that
//! is not a class size gets the next class up (at most twice the memory).
//!
//! **Soundness invariant**: every byte of every allocation is initialised
//! from the moment it is allocated (`alloc_zeroed`) and only ever written
//! through `&mut [u8]`, so a buffer taken from the pool holds initialised
//! (if stale) bytes and handing any window of it out as `&[u8]` is sound.
//! Stale bytes are data of an earlier request: whoever takes a buffer with
//! [`IoBuf::for_overwrite`] must fill every byte it later sends or writes
//! (the engine's reads fill every run; storage reads fill short reads with
//! zeros). [`IoBuf::zeroed`] clears what it hands out.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Alignment of every buffer: enough for `O_DIRECT` on 4 KiB-sector devices.
pub const IO_ALIGN: usize = 4096;

/// log2 of the smallest size class.
const MIN_CLASS_SHIFT: u32 = 12;
/// log2 of the largest size class (32 MiB: the largest NBD or virtio request).
const MAX_CLASS_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// A heap buffer aligned to [`IO_ALIGN`] showing a window of its allocation.
pub struct IoBuf {
    ptr: NonNull<u8>,
    /// Bytes allocated (initialised, see the module docs).
    cap: usize,
    /// Length it was created with: windows lie inside `0..full`.
    full: usize,
    /// The window `Deref` shows.
    start: usize,
    end: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for IoBuf {}

/// A window of a buffer, taken with [`IoBuf::window`] to be restored with
/// [`IoBuf::widen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    alloc: usize,
    start: usize,
    end: usize,
}

impl IoBuf {
    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap.max(1), IO_ALIGN).expect("I/O buffer size overflows Layout")
    }

    /// A buffer of `len` bytes: from the pool if one of its class is free
    /// (`true`: it may hold stale bytes), else freshly allocated and zeroed.
    fn take(len: usize) -> (Self, bool) {
        let cap = capacity_for(len);
        let (ptr, reused) = match pool().take(cap) {
            Some(p) => (p, true),
            None => {
                pool().allocated.fetch_add(1, Ordering::Relaxed);
                let layout = Self::layout(cap);
                // SAFETY: layout has non-zero size. Zeroed memory is
                // initialised, which the soundness invariant needs.
                let p = unsafe { alloc_zeroed(layout) };
                let p = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
                (p, false)
            }
        };
        let b = IoBuf {
            ptr,
            cap,
            full: len,
            start: 0,
            end: len,
        };
        (b, reused)
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let (mut b, reused) = Self::take(len);
        if reused {
            b.fill(0);
        }
        b
    }

    /// A buffer of `len` bytes whose content is unspecified (initialised,
    /// possibly bytes of an earlier request): for buffers about to be filled
    /// completely, such as the target of a read.
    pub fn for_overwrite(len: usize) -> Self {
        Self::take(len).0
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::for_overwrite(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Length in bytes of the window.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when the window holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Shorten the window to its first `len` bytes (no reallocation).
    pub fn truncate(&mut self, len: usize) {
        self.end = self.start + self.len().min(len);
    }

    /// True when every byte of the window is zero.
    pub fn is_zero(&self) -> bool {
        is_zero(self)
    }

    /// The current window, to be restored with [`IoBuf::widen`].
    pub fn window(&self) -> Window {
        Window {
            alloc: self.ptr.as_ptr() as usize,
            start: self.start,
            end: self.end,
        }
    }

    /// Narrow the window to `range` of the current window (no copy).
    ///
    /// Panics if `range` is not inside the window, like slice indexing.
    pub fn narrow(mut self, range: Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= self.len(),
            "IoBuf::narrow: {range:?} outside a window of {} bytes",
            self.len()
        );
        self.end = self.start + range.end;
        self.start += range.start;
        self
    }

    /// Put back a window taken earlier from this buffer. A window of another
    /// buffer gives the buffer back unchanged, as the error.
    pub fn widen(mut self, w: Window) -> std::result::Result<Self, Self> {
        if w.alloc != self.ptr.as_ptr() as usize || w.start > w.end || w.end > self.full {
            return Err(self);
        }
        self.start = w.start;
        self.end = w.end;
        Ok(self)
    }
}

/// Allocation size of a buffer of `len` bytes: its size class, or whole
/// pages beyond the largest class.
fn capacity_for(len: usize) -> usize {
    let min = 1usize << MIN_CLASS_SHIFT;
    if len <= min {
        return min;
    }
    if len <= 1 << MAX_CLASS_SHIFT {
        return len.next_power_of_two();
    }
    len.div_ceil(IO_ALIGN) * IO_ALIGN
}

/// The class index of an allocation of `cap` bytes, if it is a class size.
fn class_of(cap: usize) -> Option<usize> {
    let shift = cap.trailing_zeros();
    (cap.is_power_of_two() && (MIN_CLASS_SHIFT..=MAX_CLASS_SHIFT).contains(&shift))
        .then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

/// Bytes the pool keeps at most: `FVD_BUF_POOL_MIB` MiB, default 64.
pub fn pool_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("FVD_BUF_POOL_MIB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(64)
            .saturating_mul(1 << 20)
    })
}

/// Bytes held by the pool now (free buffers waiting to be reused).
pub fn pool_bytes() -> usize {
    pool().bytes.load(Ordering::Relaxed)
}

/// What the process's buffer pool has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers allocated (and zeroed) by the allocator: the pool had none
    /// of their class free, or they are larger than the largest class.
    pub allocated: u64,
    /// Buffers taken from the pool (no allocation, no zero-fill).
    pub reused: u64,
    /// Bytes of free buffers the pool holds now.
    pub bytes: usize,
}

/// The pool's counters (process-wide).
pub fn pool_stats() -> PoolStats {
    let p = pool();
    PoolStats {
        allocated: p.allocated.load(Ordering::Relaxed),
        reused: p.reused.load(Ordering::Relaxed),
        bytes: p.bytes.load(Ordering::Relaxed),
    }
}

/// Free buffers per size class. Every buffer in it is a whole class-size
/// allocation with all its bytes initialised.
struct Pool {
    free: [Mutex<Vec<usize>>; CLASSES],
    bytes: AtomicUsize,
    limit: usize,
    /// Buffers that came from the allocator.
    allocated: AtomicU64,
    /// Buffers that came from a free list.
    reused: AtomicU64,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        free: std::array::from_fn(|_| Mutex::new(Vec::new())),
        bytes: AtomicUsize::new(0),
        limit: pool_limit(),
        allocated: AtomicU64::new(0),
        reused: AtomicU64::new(0),
    })
}

impl Pool {
    fn take(&self, cap: usize) -> Option<NonNull<u8>> {
        let class = class_of(cap)?;
        let p = self.free[class]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()?;
        self.bytes.fetch_sub(cap, Ordering::Relaxed);
        self.reused.fetch_add(1, Ordering::Relaxed);
        NonNull::new(p as *mut u8)
    }

    /// Keep `ptr` (an allocation of `cap` bytes) for reuse; false if the
    /// pool is full or `cap` is not a class size (the caller frees it).
    fn give(&self, ptr: NonNull<u8>, cap: usize) -> bool {
        let Some(class) = class_of(cap) else {
            return false;
        };
        // Reserve room first so that racing droppers never exceed the limit.
        let mut cur = self.bytes.load(Ordering::Relaxed);
        loop {
            if cur + cap > self.limit {
                return false;
            }
            match self.bytes.compare_exchange_weak(
                cur,
                cur + cap,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.free[class]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ptr.as_ptr() as usize);
        true
    }
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        // OR-reduce 64 bytes at a time; the compiler vectorises this loop.
        if c.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// `data` (which holds the bytes at offset `base`) cut into pieces at
/// multiples of `grain` (a power of two) of the offset, neighbours of the
/// same kind merged: `(range in data, all zero)`, in order, covering all of
/// `data`. A piece of data costs one 64-byte look at most grains (the scan
/// stops at the first non-zero byte); only zero grains are read to the end.
pub fn zero_runs(data: &[u8], base: u64, grain: u64) -> Vec<(Range<usize>, bool)> {
    debug_assert!(grain.is_power_of_two());
    let mut runs: Vec<(Range<usize>, bool)> = Vec::new();
    let mut i = 0usize;
    while i < data.len() {
        let abs = base + i as u64;
        let next = ((abs | (grain - 1)) + 1 - base) as usize;
        let j = next.min(data.len());
        let zero = is_zero(&data[i..j]);
        match runs.last_mut() {
            Some((r, z)) if *z == zero => r.end = j,
            _ => runs.push((i..j, zero)),
        }
        i = j;
    }
    runs
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: start <= end <= full <= cap; the allocation is valid and
        // initialised for cap bytes (module invariant).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(self.start), self.len()) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and the allocation is uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.start), self.len()) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if !pool().give(self.ptr, self.cap) {
            // SAFETY: allocated in `take` with this layout, owned by us.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20, (32 << 20) + 1] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.is_zero());
        }
    }

    #[test]
    fn classes() {
        assert_eq!(capacity_for(0), 4096);
        assert_eq!(capacity_for(4097), 8192);
        assert_eq!(capacity_for(1 << 20), 1 << 20);
        assert_eq!(capacity_for((1 << 20) + 512), 2 << 20);
        assert_eq!(capacity_for((32 << 20) + 1), (32 << 20) + 4096);
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(32 << 20), Some(CLASSES - 1));
        assert_eq!(class_of(3 << 12), None);
        assert_eq!(class_of((32 << 20) + 4096), None);
    }

    #[test]
    fn reused_buffers_are_cleared_by_zeroed() {
        // A size no other test uses, so the pool's free list is ours.
        let len = (8 << 20) + 17;
        let mut a = IoBuf::for_overwrite(len);
        a.fill(0xab);
        drop(a);
        assert!(IoBuf::zeroed(len).is_zero());
    }

    #[test]
    fn the_pool_keeps_at_most_its_limit() {
        let pool = Pool {
            free: std::array::from_fn(|_| Mutex::new(Vec::new())),
            bytes: AtomicUsize::new(0),
            limit: 12 << 10,
            allocated: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        };
        let layout = IoBuf::layout(8192);
        let mut ptrs = Vec::new();
        for _ in 0..2 {
            // SAFETY: non-zero size.
            ptrs.push(NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap());
        }
        assert!(pool.give(ptrs[0], 8192));
        assert!(!pool.give(ptrs[1], 8192), "over the limit");
        assert!(!pool.give(ptrs[1], 3 << 12), "not a class size");
        assert_eq!(pool.bytes.load(Ordering::Relaxed), 8192);
        assert_eq!(pool.take(8192), Some(ptrs[0]));
        assert_eq!(pool.take(8192), None);
        assert_eq!(pool.bytes.load(Ordering::Relaxed), 0);
        for p in ptrs {
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p.as_ptr(), layout) }
        }
    }

    #[test]
    fn windows_nest_and_widen_back() {
        let mut b = IoBuf::zeroed(10_000);
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8;
        }
        let outer = b.window();
        let mut part = b.narrow(1000..5000);
        assert_eq!(part.len(), 4000);
        assert_eq!(part[0], (1000 % 256) as u8);
        let mid = part.window();
        let inner = part.narrow(10..20);
        assert_eq!(
            &inner[..],
            &(1010..1020).map(|i| i as u8).collect::<Vec<_>>()[..]
        );
        part = inner.widen(mid).unwrap();
        assert_eq!(part.len(), 4000);
        part.truncate(3);
        assert_eq!(part.len(), 3);
        let b = part.widen(outer).unwrap();
        assert_eq!(b.len(), 10_000);
        // A window of another buffer is refused.
        let other = IoBuf::zeroed(10_000);
        let other = other.widen(outer).unwrap_err();
        assert_eq!(other.len(), 10_000);
    }

    #[test]
    #[should_panic]
    fn narrowing_outside_the_window_panics() {
        let _ = IoBuf::zeroed(100).narrow(50..101);
    }

    #[test]
    fn zero_runs_cut_at_the_grain_of_the_offset() {
        let mut b = vec![0u8; 5 * 4096];
        b[10] = 1;
        b[4096 * 2 + 5] = 1;
        b[4096 * 3] = 1;
        assert_eq!(
            zero_runs(&b, 0, 4096),
            vec![
                (0..4096, false),
                (4096..8192, true),
                (8192..16384, false),
                (16384..20480, true)
            ]
        );
        // Unaligned start: the first piece ends at the next 4 KiB boundary.
        let mut c = vec![0u8; 8192];
        c[100] = 1;
        assert_eq!(
            zero_runs(&c, 512, 4096),
            vec![(0..3584, false), (3584..8192, true)]
        );
        assert_eq!(zero_runs(&[0u8; 100], 7, 4096), vec![(0..100, true)]);
        assert!(zero_runs(&[], 7, 4096).is_empty());
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4096 + 13];
        assert!(is_zero(&v));
        for pos in [0, 7, 63, 64, 4095, 4096 + 12] {
            v[pos] = 1;
            assert!(!is_zero(&v), "byte {pos}");
            v[pos] = 0;
        }
    }
}
