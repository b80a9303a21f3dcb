//! The FUSE file system: one regular file, the image's virtual disk.
//!
//! The mount's root inode *is* the file (the mount point is a regular file,
//! so the kernel takes the root's type from it), so there are no directory
//! operations. Every request runs to completion on the session thread that
//! received it: the data of a write lives in that thread's request buffer
//! until the engine has taken it, and a read fills a buffer of its own, so
//! concurrent requests never share memory. Files are opened with
//! `FOPEN_DIRECT_IO` (no page cache for the FUSE inode, so buffered and
//! `O_DIRECT` users always see the same bytes) and
//! `FOPEN_PARALLEL_DIRECT_WRITES` (the kernel does not serialise writers;
//! the engine orders overlapping copy-on-write itself).

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use fvd_core::executor::block_on;
use fvd_core::{Image, IoBuf};

/// Inode number of the root, which is the exported file.
const ROOT: INodeNo = INodeNo(1);

/// How long the kernel may cache the file's attributes.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// Block size reported by `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// File handle of an open that may write; read-only opens get 0.
const FH_WRITABLE: u64 = 1;

/// Largest read or write the kernel is asked to send (1 MiB).
pub const DEFAULT_MAX_IO: u32 = 1 << 20;

/// Background requests (async direct I/O, read-ahead) the kernel may queue.
const MAX_BACKGROUND: u16 = 128;

/// Settings of the exported file.
#[derive(Debug, Clone, Copy)]
pub struct FileOptions {
    /// Export read-only: mode 0444, writes refused with `EROFS`.
    pub read_only: bool,
    /// Largest single read or write (bytes); the kernel splits larger ones.
    pub max_io: u32,
    /// Owner reported for the file.
    pub uid: u32,
    /// Group reported for the file.
    pub gid: u32,
}

impl Default for FileOptions {
    fn default() -> Self {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FileOptions {
            read_only: false,
            max_io: DEFAULT_MAX_IO,
            uid,
            gid,
        }
    }
}

/// Attributes that `setattr` may change (kept in memory only).
#[derive(Debug, Clone, Copy)]
struct Owned {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

/// The exported file: a FUSE [`Filesystem`] serving one image.
pub struct DiskFile {
    image: Arc<Image>,
    size: u64,
    opts: FileOptions,
    created: SystemTime,
    owned: Mutex<Owned>,
}

impl DiskFile {
    /// A file exporting `image`'s virtual disk.
    pub fn new(image: Arc<Image>, opts: FileOptions) -> Self {
        let now = SystemTime::now();
        let read_only = opts.read_only || image.is_read_only();
        let opts = FileOptions { read_only, ..opts };
        DiskFile {
            size: image.virtual_size(),
            image,
            opts,
            created: now,
            owned: Mutex::new(Owned {
                perm: if read_only { 0o444 } else { 0o644 },
                uid: opts.uid,
                gid: opts.gid,
                atime: now,
                mtime: now,
                ctime: now,
            }),
        }
    }

    /// The image being served.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    fn owned(&self) -> Owned {
        *self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self) -> FileAttr {
        let o = self.owned();
        // The image file's allocation: one fstat, cheap enough per getattr.
        let blocks = match self.image.storage().allocated_bytes() {
            Ok(b) => b.div_ceil(512),
            Err(_) => self.size.div_ceil(512),
        };
        FileAttr {
            ino: ROOT,
            size: self.size,
            blocks,
            atime: o.atime,
            mtime: o.mtime,
            ctime: o.ctime,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: o.perm,
            nlink: 1,
            uid: o.uid,
            gid: o.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    /// Report an engine error on stderr and turn it into an errno.
    fn fail(&self, what: &str, offset: u64, len: u64, e: fvd_core::Error) -> Errno {
        eprintln!(
            "fvd: {}: {what} {offset}+{len} failed: {e}",
            self.image.describe()
        );
        Errno::from_i32(e.errno())
    }

    fn flush_image(&self, what: &str) -> Result<(), Errno> {
        block_on(self.image.flush()).map_err(|e| self.fail(what, 0, self.size, e))
    }

    /// `fallocate(2)` on the file; `Err` carries the errno to return.
    fn do_fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        const KNOWN: i32 = libc::FALLOC_FL_KEEP_SIZE
            | libc::FALLOC_FL_PUNCH_HOLE
            | libc::FALLOC_FL_ZERO_RANGE
            | libc::FALLOC_FL_COLLAPSE_RANGE
            | libc::FALLOC_FL_INSERT_RANGE
            | libc::FALLOC_FL_UNSHARE_RANGE;
        if mode & !KNOWN != 0
            || mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0
        {
            return Err(Errno::EOPNOTSUPP);
        }
        let Some(end) = offset.checked_add(length) else {
            return Err(Errno::EFBIG);
        };
        // The size never changes: without KEEP_SIZE only ranges inside the
        // file are accepted (they would not change it either).
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > self.size {
            return Err(Errno::EOPNOTSUPP);
        }
        let end = end.min(self.size);
        if offset >= end {
            return Ok(());
        }
        let len = end - offset;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if punch && zero {
            return Err(Errno::EINVAL);
        }
        if !punch && !zero {
            // Plain allocation (or unshare): the range keeps its data and
            // every block of the disk can always be written.
            return if self.opts.read_only {
                Err(Errno::EROFS)
            } else {
                Ok(())
            };
        }
        if self.opts.read_only {
            return Err(Errno::EROFS);
        }
        let r = if punch {
            block_on(self.image.discard(offset, len))
        } else {
            block_on(self.image.write_zeroes(offset, len, false, false))
        };
        r.map_err(|e| self.fail(if punch { "discard" } else { "zero" }, offset, len, e))
    }
}

impl Filesystem for DiskFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(self.opts.max_io);
        let _ = config.set_max_readahead(self.opts.max_io);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        let caps = config.capabilities();
        // Several requests in flight for one AIO direct I/O (libaio, io_uring),
        // and shared mappings of a direct-I/O file where the kernel allows them.
        for want in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if caps.contains(want) {
                let _ = config.add_capabilities(want);
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        reply.attr(&ATTR_TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        // The disk has a fixed size: "truncating" to it is fine, anything
        // else is refused.
        if let Some(s) = size
            && s != self.size
        {
            return reply.error(Errno::EOPNOTSUPP);
        }
        {
            let mut o = self.owned.lock().unwrap_or_else(|p| p.into_inner());
            let now = SystemTime::now();
            let at = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => now,
            };
            if let Some(m) = mode {
                o.perm = (m & 0o7777) as u16;
            }
            if let Some(u) = uid {
                o.uid = u;
            }
            if let Some(g) = gid {
                o.gid = g;
            }
            if let Some(t) = atime {
                o.atime = at(t);
            }
            if let Some(t) = mtime {
                o.mtime = at(t);
            }
            o.ctime = now;
        }
        reply.attr(&ATTR_TTL, &self.attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if writable && self.opts.read_only {
            return reply.error(Errno::EROFS);
        }
        let fh = if writable { FH_WRITABLE } else { 0 };
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        if offset >= self.size {
            return reply.data(&[]);
        }
        let len = (self.size - offset).min(u64::from(size)) as usize;
        // The reply sends the buffer the engine read into.
        match block_on(self.image.read(offset, IoBuf::for_overwrite(len))) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(self.fail("read", offset, len as u64, e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        if self.opts.read_only {
            return reply.error(Errno::EROFS);
        }
        if data.is_empty() {
            return reply.written(0);
        }
        if offset >= self.size {
            // Like writing past the end of a block device.
            return reply.error(Errno::ENOSPC);
        }
        // A write running over the end is cut short.
        let len = (self.size - offset).min(data.len() as u64) as usize;
        let data = &data[..len];
        // O_SYNC includes the O_DSYNC bit.
        let fua = flags.0 & libc::O_DSYNC != 0;
        // `data` is fuser's request buffer, reused for the next request: the
        // engine gets a copy it owns.
        match block_on(self.image.write(offset, IoBuf::from_slice(data), fua)) {
            Ok(_) => reply.written(len as u32),
            Err(e) => reply.error(self.fail("write", offset, len as u64, e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Called on every close(): only opens that could write have
        // anything to flush.
        if fh.0 != FH_WRITABLE || self.opts.read_only {
            return reply.ok();
        }
        match self.flush_image("flush") {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_image("fsync") {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush_image("fsync") {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size.div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, 1, 0, BLOCK, 255, BLOCK);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        if self.opts.read_only && mask.contains(AccessFlags::W_OK) {
            return reply.error(Errno::EROFS);
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self.do_fallocate(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fvd_core::OpenOptions;
    use fvd_core::storage::MemStorage;

    const SIZE: u64 = 1 << 20;

    fn file(read_only: bool) -> (DiskFile, Arc<MemStorage>) {
        let mem = Arc::new(MemStorage::from_bytes("mem", &vec![0xee; SIZE as usize]));
        let image = Image::open_raw(mem.clone(), OpenOptions { read_only }).expect("open raw");
        let opts = FileOptions {
            read_only,
            ..FileOptions::default()
        };
        (DiskFile::new(Arc::new(image), opts), mem)
    }

    #[test]
    fn fallocate_modes() {
        let (f, mem) = file(false);
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        // Punch and zero inside the file.
        f.do_fallocate(4096, 8192, punch).expect("punch");
        f.do_fallocate(65536, 100, zero).expect("zero range");
        let data = mem.to_vec();
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert!(data[65536..65636].iter().all(|&b| b == 0));
        assert_eq!(data[4095], 0xee);
        assert_eq!(data[12288], 0xee);
        assert_eq!(data[65636], 0xee);
        // Past the end: only with KEEP_SIZE, and then clipped.
        assert_eq!(f.do_fallocate(SIZE - 10, 20, zero), Err(Errno::EOPNOTSUPP));
        assert_eq!(f.do_fallocate(0, SIZE + 1, 0), Err(Errno::EOPNOTSUPP));
        f.do_fallocate(SIZE - 10, 20, zero | keep)
            .expect("clipped zero");
        assert!(mem.to_vec()[(SIZE - 10) as usize..].iter().all(|&b| b == 0));
        f.do_fallocate(SIZE + 4096, 4096, punch)
            .expect("beyond the end");
        // Plain allocation keeps the data.
        f.do_fallocate(0, SIZE, 0).expect("allocate");
        assert_eq!(mem.to_vec()[0], 0xee);
        // Size-changing and contradictory modes.
        for mode in [
            libc::FALLOC_FL_COLLAPSE_RANGE,
            libc::FALLOC_FL_INSERT_RANGE,
            1 << 20,
        ] {
            assert_eq!(f.do_fallocate(0, 4096, mode), Err(Errno::EOPNOTSUPP));
        }
        assert_eq!(f.do_fallocate(0, 4096, punch | zero), Err(Errno::EINVAL));
        assert_eq!(f.do_fallocate(u64::MAX, 2, punch), Err(Errno::EFBIG));
    }

    #[test]
    fn read_only_file() {
        let (f, _) = file(true);
        let a = f.attr();
        assert_eq!(a.perm, 0o444);
        assert_eq!(a.size, SIZE);
        assert_eq!(a.kind, FileType::RegularFile);
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(f.do_fallocate(0, 4096, punch), Err(Errno::EROFS));
    }
}
