//! FVD — the Fast Virtual Disk image format and its asynchronous engine.
//!
//! Layers, bottom up (each depends only on those below it; [`error`],
//! [`iobuf`], [`latency`] (counters of operations in flight and their
//! latency) and [`executor`], the runtime interface, sit under all):
//! * [`storage`] — positional async byte I/O (file, memory);
//! * [`format`](mod@format) — pure encode/decode of every on-disk structure;
//! * [`crypt`] — pure transforms of encrypted images: AES-XTS data sectors,
//!   the LUKS1 key slots;
//! * `meta` — bitmaps in memory, journal writer (group commit), recovery;
//! * [`base`] — what the engine reads base data through, and raw bases;
//! * [`image`] — the engine: the mapping layer ([`image::map`]) and the
//!   I/O of read/write/flush/discard/write_zeroes/block_status/cache;
//! * [`open`] — the [`Opener`]: images and base chains by path or URL, an
//!   FVD image as a base;
//! * [`check`] — consistency checks and repair;
//! * [`lifecycle`] — resize, commit, rebase and amend (offline, through the
//!   engine and the opener; one header switch as each step's commit point).
//!
//! docs/FORMAT.md specifies the on-disk format; docs/ARCHITECTURE.md the
//! ownership, lock order and flush ordering.

pub mod base;
pub mod check;
pub mod crypt;
pub mod error;
pub mod executor;
pub mod format;
pub mod image;
pub mod iobuf;
pub mod latency;
pub mod lifecycle;
pub mod live;
mod meta;
pub mod open;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
pub use format::Format;
pub use format::header::Preallocation;
pub use image::{
    CreateEncryption, CreateOptions, Extent, Image, KeySlotChange, OpenOptions, RequestMap, Run,
    Source, Target,
};
pub use iobuf::IoBuf;
pub use live::LiveImage;
pub use meta::Stats;
#[doc(hidden)]
pub use meta::{EarlyJournal, Mutation};
pub use open::{
    BaseSpec, KeyLookup, Location, Opener, PathOptions, create_path, create_raw,
    create_raw_preallocated, open_path,
};
