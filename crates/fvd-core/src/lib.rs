//! FVD — the Fast Virtual Disk image format and its asynchronous engine.
//!
//! Layers, bottom up (each depends only on those below it):
//! * [`storage`] — positional async byte I/O (file, memory);
//! * [`format`] — pure encode/decode of every on-disk structure;
//! * `meta` — bitmaps in memory, journal writer (group commit), recovery;
//! * [`image`] — the engine: read/write/flush/discard/write_zeroes/block_status;
//! * [`base`] — read-only bases (raw, FVD chains);
//! * [`open`] — opening and creating images by path;
//! * [`lifecycle`] — resize, commit, rebase and amend.
//!
//! docs/FORMAT.md specifies the on-disk format; docs/ARCHITECTURE.md the
//! ownership, lock order and flush ordering.

pub mod base;
pub mod check;
pub mod error;
pub mod executor;
pub mod format;
pub mod image;
pub mod iobuf;
pub mod lifecycle;
mod meta;
pub mod open;
pub mod sim;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
pub use image::{CreateOptions, Extent, Image, OpenOptions, RequestMap, Source};
pub use iobuf::IoBuf;
pub use meta::Stats;
pub use open::{BaseSpec, Format, PathOptions, create_path, create_raw, open_path};
