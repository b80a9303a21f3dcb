//! Owned, 4 KiB-aligned I/O buffers.
//!
//! Storage backends take and return ownership of buffers so that an I/O
//! running on another thread (the file backend's pool) never writes into
//! memory its caller has freed, and so that `O_DIRECT` always gets aligned
//! memory.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer: enough for `O_DIRECT` on 4 KiB-sector devices.
pub const IO_ALIGN: usize = 4096;

/// A heap buffer aligned to [`IO_ALIGN`], with a length fixed at creation.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    fn layout(cap: usize) -> Layout {
        Layout::from_size_align(cap.max(1), IO_ALIGN).expect("I/O buffer size overflows Layout")
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let cap = len.div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf { ptr, len, cap }
    }

    /// A buffer of `len` bytes whose content is unspecified (but initialised).
    ///
    /// Only used where the buffer is about to be filled completely.
    pub fn for_overwrite(len: usize) -> Self {
        let cap = len.div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        // Initialise the memory so that handing it out as &[u8] is sound; the cost is a
        // memset, far below the I/O it precedes.
        // SAFETY: ptr is valid for cap bytes.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, cap) };
        IoBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::for_overwrite(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shorten the buffer to `len` bytes (no reallocation).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// True when every byte is zero.
    pub fn is_zero(&self) -> bool {
        is_zero(self)
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

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid and initialised for cap >= len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid, initialised and uniquely owned for cap >= len bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed/for_overwrite with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_sized() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.is_zero());
        }
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
