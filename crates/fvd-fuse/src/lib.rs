//! FUSE single-file export of FVD images.
//!
//! An image's virtual disk appears as one regular file, mounted over an
//! existing regular file (the way `qemu-storage-daemon --export
//! type=fuse,mountpoint=FILE` does it). The file can be read and written
//! with ordinary and `O_DIRECT` I/O, synced (`fsync` makes data durable),
//! hole-punched and zeroed with `fallocate`, attached to a loop device, and
//! so on. Its size is the virtual size and never changes.
//!
//! * [`fs`] — the file system: request handling on top of [`fvd_core::Image`];
//! * [`mount`] — mounting, the serving threads, signals and unmounting.

pub mod fs;
pub mod mount;

pub use fs::{DiskFile, FileOptions};
pub use mount::{Ending, MountOptions, ServeError, serve};
