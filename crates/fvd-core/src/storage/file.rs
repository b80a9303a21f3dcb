//! File and block-device storage: positional I/O on a small blocking pool,
//! and Linux native AIO for aligned `O_DIRECT` reads and writes.
//!
//! Which engine runs what, with `CacheMode::None` (`O_DIRECT`): reads and
//! writes whose offset, length and buffer address are multiples of 512 go
//! to the file's AIO context (`aio.rs`; FUA writes too, with `RWF_DSYNC`, if
//! the kernel takes it), except a write with no other request of the file
//! in flight (see `write_at`); partial-sector writes (read-modify-write
//! under `SectorLocks`), unaligned reads, flush, discard, write-zeroes,
//! resizing and allocation queries run on the pool. With
//! `CacheMode::Writeback`, or when AIO is unavailable or disabled
//! (`FVD_AIO=0`), everything runs on the pool. No lock of this file is held
//! while an AIO request is submitted.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::aio::{self, Aio, InFlight};
use super::pool::Pool;
use super::sys::{fallocate, file_len, read_full, seek};
use super::{AllocRun, IoFuture, Storage, Transform, coalesce};
use crate::error::{Error, ErrorKind, Result};
use crate::iobuf::IoBuf;

/// Host page-cache use, named as QEMU names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Through the page cache; flush = fdatasync.
    #[default]
    Writeback,
    /// `O_DIRECT`: no page cache; I/O is aligned to 512 bytes.
    None,
    /// Through the page cache, and flushes and FUA do nothing: nothing is
    /// durable until the kernel writes it back, so a host crash can leave
    /// the image torn. For copies that are thrown away if the host
    /// crashes; it is `qemu-img convert`'s default for its output.
    Unsafe,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" | "direct" => Ok(CacheMode::None),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(format!(
                "unknown cache mode '{other}' (expected writeback, none or unsafe)"
            )),
        }
    }
}

/// How to open a file.
#[derive(Debug, Clone, Copy)]
pub struct FileOptions {
    /// Open for writing.
    pub write: bool,
    /// Create the file (it must not exist).
    pub create: bool,
    /// Page-cache mode.
    pub cache: CacheMode,
    /// Take an advisory lock: exclusive when writing, shared otherwise.
    pub lock: bool,
}

impl FileOptions {
    /// Read-only, locked shared, through the page cache.
    pub fn read_only() -> Self {
        FileOptions {
            write: false,
            create: false,
            cache: CacheMode::Writeback,
            lock: true,
        }
    }
    /// Read-write, locked exclusive, through the page cache.
    pub fn read_write() -> Self {
        FileOptions {
            write: true,
            create: false,
            cache: CacheMode::Writeback,
            lock: true,
        }
    }
}

const DIRECT_ALIGN: u64 = 512;

/// A regular file or block device.
pub struct FileStorage {
    file: Arc<File>,
    path: PathBuf,
    direct: bool,
    is_block_device: bool,
    /// `CacheMode::Unsafe`: flushes and FUA are not passed on.
    no_flush: bool,
    pool: Option<Pool>,
    /// Linux AIO for aligned O_DIRECT reads and writes (`None`: the pool does
    /// them). Its `Drop` waits for every request it has in flight.
    aio: Option<Aio>,
    /// Reads and writes in flight on either engine (counted when `aio` is set).
    inflight: Arc<AtomicUsize>,
    /// A write that finds nothing else in flight runs on the pool (see
    /// `write_at`); tests turn this off to drive AIO with lone requests.
    lone_writes_on_pool: bool,
    /// Serialises read-modify-writes of partial sectors (O_DIRECT only).
    rmw: Arc<SectorLocks>,
}

/// Threads per file's I/O pool: `FVD_IO_THREADS`, default 16. `0` runs every I/O inline
/// on the calling thread (used to measure what the pool costs).
fn pool_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("FVD_IO_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16)
    })
}

/// Linux native AIO for aligned `O_DIRECT` reads and writes: on unless
/// `FVD_AIO=0` (then the pool does them, as with the page cache). If the
/// kernel refuses an AIO context (`ENOSYS`, or `EAGAIN` past
/// `/proc/sys/fs/aio-max-nr`) the pool is used silently.
fn aio_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FVD_AIO").map_or(true, |v| v.trim() != "0"))
}

/// Refuse what is neither a regular file nor a block device (a directory,
/// a FIFO, a socket, a character device), then clear `O_NONBLOCK` again.
fn check_file_type(file: &File, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
    let t = meta.file_type();
    if t.is_dir() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{}: is a directory", path.display()),
        ));
    }
    if !t.is_file() && !t.is_block_device() {
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a character device"
        };
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{}: is not a regular file or block device (it is {kind})",
                path.display()
            ),
        ));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; only the status flags change.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(Error::io(
            format!("{}: fcntl", path.display()),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl FileStorage {
    /// Open `path` as storage.
    pub fn open(path: &Path, opts: FileOptions) -> Result<Self> {
        Self::open_with(path, opts, aio_enabled())
    }

    /// [`FileStorage::open`], with AIO for `O_DIRECT` allowed or not.
    fn open_with(path: &Path, opts: FileOptions, allow_aio: bool) -> Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(opts.write);
        if opts.create {
            oo.create_new(true);
        }
        // O_NONBLOCK: opening a FIFO must not wait for a peer; anything
        // but a regular file or block device is refused just below.
        let mut flags = libc::O_NONBLOCK;
        if opts.cache == CacheMode::None {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EISDIR) {
                return Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{}: is a directory", path.display()),
                );
            }
            let what = if opts.create {
                "cannot create"
            } else {
                "cannot open"
            };
            Error::io(format!("{}: {what}", path.display()), e)
        })?;
        check_file_type(&file, path)?;
        if opts.lock {
            let how = if opts.write {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // A lock can be held for an instant by a process that another
            // thread of ours forked (it shares the descriptor until its exec
            // closes it): try a few times before calling the image busy.
            let mut tries = 0;
            let rc = loop {
                // SAFETY: flock on a valid descriptor we own.
                let rc = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
                let busy =
                    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK);
                if !busy || tries == 5 {
                    break rc;
                }
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            if rc != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "{}: image is in use by another process (it is locked)",
                            path.display()
                        ),
                    ));
                }
                return Err(Error::io(format!("{}: cannot lock", path.display()), err));
            }
        }
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("{}: stat", path.display()), e))?;
        use std::os::unix::fs::FileTypeExt;
        let is_block_device = meta.file_type().is_block_device();
        let direct = opts.cache == CacheMode::None;
        let file = Arc::new(file);
        Ok(FileStorage {
            aio: (direct && allow_aio)
                .then(|| Aio::new(file.clone()))
                .flatten(),
            file,
            inflight: Arc::new(AtomicUsize::new(0)),
            lone_writes_on_pool: true,
            path: path.to_path_buf(),
            direct,
            is_block_device,
            no_flush: opts.cache == CacheMode::Unsafe,
            pool: match pool_threads() {
                0 => None,
                n => Some(Pool::new(n)),
            },
            rmw: Arc::new(SectorLocks::default()),
        })
    }

    /// True when aligned `O_DIRECT` reads and writes go through Linux AIO.
    pub fn uses_aio(&self) -> bool {
        self.aio.is_some()
    }

    /// The AIO context, if `buf` at `offset` is a request it can take.
    fn aio_for(&self, offset: u64, buf: &IoBuf) -> Option<&Aio> {
        let aio = self.aio.as_ref()?;
        let len = buf.len() as u64;
        let ok = len > 0
            && offset.is_multiple_of(aio::SECTOR)
            && len.is_multiple_of(aio::SECTOR)
            && (buf.as_ptr() as usize).is_multiple_of(aio::SECTOR as usize)
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= i64::MAX as u64);
        ok.then_some(aio)
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for block devices (no sparse file system underneath).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    fn run<T, F>(&self, f: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        match &self.pool {
            Some(p) => Box::pin(p.run(f)),
            None => Box::pin(std::future::ready(f())),
        }
    }
}

fn datasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Aligned span covering [offset, offset+len) for O_DIRECT.
fn align_span(offset: u64, len: usize) -> (u64, usize) {
    let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
    let end = (offset + len as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    (start, (end - start) as usize)
}

fn direct_read(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let (start, span) = align_span(offset, buf.len());
    if start == offset && span == buf.len() && (buf.as_ptr() as usize).is_multiple_of(512) {
        return read_full(file, offset, buf);
    }
    let mut bounce = IoBuf::for_overwrite(span);
    read_full(file, start, &mut bounce)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
    Ok(())
}

/// Striped locks over 512-byte sectors.
///
/// With O_DIRECT a write that starts or ends inside a sector must read the
/// whole sector, patch it and write it back; two such writes to different
/// bytes of one sector, run at once, would each put back the other's old
/// bytes. Every read-modify-write holds the locks of its partial head and
/// tail sectors (lower stripe first, so two writers never wait on each
/// other in opposite orders). Whole-sector writes take no lock: they cannot
/// lose another writer's bytes without overlapping them.
struct SectorLocks {
    stripes: [std::sync::Mutex<()>; 64],
}

impl Default for SectorLocks {
    fn default() -> Self {
        SectorLocks {
            stripes: std::array::from_fn(|_| std::sync::Mutex::new(())),
        }
    }
}

impl SectorLocks {
    fn lock_ends(
        &self,
        offset: u64,
        len: usize,
    ) -> (
        std::sync::MutexGuard<'_, ()>,
        Option<std::sync::MutexGuard<'_, ()>>,
    ) {
        let n = self.stripes.len() as u64;
        let head = (offset / DIRECT_ALIGN % n) as usize;
        let tail = ((offset + len as u64 - 1) / DIRECT_ALIGN % n) as usize;
        let (lo, hi) = (head.min(tail), head.max(tail));
        let lock = |i: usize| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner());
        let first = lock(lo);
        let second = (hi != lo).then(|| lock(hi));
        (first, second)
    }
}

fn direct_write(file: &File, locks: &SectorLocks, offset: u64, data: &[u8]) -> io::Result<()> {
    let (start, span) = align_span(offset, data.len());
    if start == offset && span == data.len() {
        if (data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN as usize) {
            return file.write_all_at(data, offset);
        }
        // Whole sectors from memory O_DIRECT refuses (a view of a buffer
        // that starts mid-sector): through an aligned copy, no lock needed.
        let bounce = IoBuf::from_slice(data);
        return file.write_all_at(&bounce, offset);
    }
    let _held = locks.lock_ends(offset, data.len());
    // Read-modify-write of the partial sectors at both ends.
    let mut bounce = IoBuf::for_overwrite(span);
    read_full(file, start, &mut bounce)?;
    let skip = (offset - start) as usize;
    bounce[skip..skip + data.len()].copy_from_slice(data);
    file.write_all_at(&bounce, start)
}

fn allocation_map(file: &File, offset: u64, len: u64) -> io::Result<Vec<AllocRun>> {
    let end = offset + len;
    let size = file_len(file)?;
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end {
        if pos >= size {
            runs.push(AllocRun {
                length: end - pos,
                data: false,
            });
            break;
        }
        let data = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(size),
            // No SEEK_DATA support: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => pos,
            Err(e) => return Err(e),
        };
        if data > pos {
            let hole_end = data.min(end);
            runs.push(AllocRun {
                length: hole_end - pos,
                data: false,
            });
            pos = hole_end;
            continue;
        }
        let hole = seek(file, pos, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .max(pos + 1);
        let data_end = hole.min(end);
        runs.push(AllocRun {
            length: data_end - pos,
            data: true,
        });
        pos = data_end;
    }
    Ok(coalesce(runs))
}

impl FileStorage {
    /// A read, then `after` (if any) over its bytes: on the pool thread
    /// that read them, or, for a read through AIO, where the completion
    /// is awaited.
    fn read_then(&self, offset: u64, buf: IoBuf, after: Option<Transform>) -> IoFuture<'_, IoBuf> {
        let mut buf = match self.aio_for(offset, &buf) {
            Some(aio) => match aio.read(offset, buf, InFlight::new(&self.inflight)) {
                Ok(fut) => {
                    return match after {
                        None => Box::pin(fut),
                        Some(f) => Box::pin(async move {
                            let mut buf = fut.await?;
                            f(&mut buf);
                            Ok(buf)
                        }),
                    };
                }
                Err(buf) => buf,
            },
            None => buf,
        };
        let file = self.file.clone();
        let direct = self.direct;
        let hold = self.aio.as_ref().map(|_| InFlight::new(&self.inflight));
        self.run(move || {
            let _hold = hold;
            if direct {
                direct_read(&file, offset, &mut buf)?;
            } else {
                read_full(&file, offset, &mut buf)?;
            }
            if let Some(f) = after {
                f(&mut buf);
            }
            Ok(buf)
        })
    }

    /// `before` (if any) over `buf`, then a write: on the pool thread that
    /// writes, or, for a write through AIO, before it is submitted.
    fn write_after(
        &self,
        offset: u64,
        mut buf: IoBuf,
        fua: bool,
        mut before: Option<Transform>,
    ) -> IoFuture<'_, IoBuf> {
        let fua = fua && !self.no_flush;
        // A write with nothing else in flight runs on the pool: ext4 converts
        // the unwritten extents of an asynchronous allocating write in a
        // kworker, one more wake-up than a synchronous pwrite, which costs a
        // lone request ~15-20% (fio, 4 KiB QD1 into a sparse file: psync
        // 14.5-15.4k vs libaio 12.0-12.7k IOPS); AIO pays off once requests
        // overlap (docs/BENCHMARKS.md).
        let lone = self.lone_writes_on_pool && self.inflight.load(Ordering::Relaxed) == 0;
        if let Some(aio) = self.aio_for(offset, &buf)
            // Without RWF_DSYNC a FUA write is write + fdatasync on the pool.
            && !lone
            && (!fua || aio.dsync())
        {
            if let Some(f) = before.take() {
                f(&mut buf);
            }
            match aio.write(offset, buf, fua, InFlight::new(&self.inflight)) {
                Ok(fut) => return Box::pin(fut),
                Err(b) => buf = b,
            }
        }
        let file = self.file.clone();
        let direct = self.direct;
        let locks = self.rmw.clone();
        let hold = self.aio.as_ref().map(|_| InFlight::new(&self.inflight));
        self.run(move || {
            let _hold = hold;
            if let Some(f) = before {
                f(&mut buf);
            }
            if direct {
                direct_write(&file, &locks, offset, &buf)?;
            } else {
                file.write_all_at(&buf, offset)?;
            }
            if fua {
                datasync(&file)?;
            }
            Ok(buf)
        })
    }
}

impl Storage for FileStorage {
    fn read_at(&self, offset: u64, buf: IoBuf) -> IoFuture<'_, IoBuf> {
        self.read_then(offset, buf, None)
    }

    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        self.write_after(offset, buf, fua, None)
    }

    fn read_at_then(&self, offset: u64, buf: IoBuf, after: Transform) -> IoFuture<'_, IoBuf> {
        self.read_then(offset, buf, Some(after))
    }

    fn write_at_after(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        before: Transform,
    ) -> IoFuture<'_, IoBuf> {
        self.write_after(offset, buf, fua, Some(before))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        if self.no_flush {
            return Box::pin(std::future::ready(Ok(())));
        }
        let file = self.file.clone();
        self.run(move || datasync(&file))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let file = self.file.clone();
        let direct = self.direct.then(|| self.rmw.clone());
        self.run(move || {
            if len == 0 {
                return Ok(());
            }
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(&file, mode, offset, len) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    write_zero_bytes(&file, offset, len, direct.as_deref())
                }
                Err(e) => Err(e),
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let file = self.file.clone();
        let direct = self.direct.then(|| self.rmw.clone());
        self.run(move || {
            if len == 0 {
                return Ok(());
            }
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match fallocate(&file, mode, offset, len) {
                Ok(()) => Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                    ) =>
                {
                    write_zero_bytes(&file, offset, len, direct.as_deref())
                }
                Err(e) => Err(e),
            }
        })
    }

    fn len(&self) -> io::Result<u64> {
        file_len(&self.file)
    }

    fn preallocate(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let file = self.file.clone();
        let is_dev = self.is_block_device;
        self.run(move || {
            if is_dev || len == 0 {
                return Ok(());
            }
            fallocate(&file, libc::FALLOC_FL_KEEP_SIZE, offset, len)
        })
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, ()> {
        let file = self.file.clone();
        let is_dev = self.is_block_device;
        self.run(move || {
            if is_dev {
                let have = file_len(&file)?;
                if have < len {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                return Ok(());
            }
            file.set_len(len)
        })
    }

    fn allocation(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<AllocRun>> {
        let file = self.file.clone();
        let is_dev = self.is_block_device;
        self.run(move || {
            if is_dev {
                return Ok(vec![AllocRun {
                    length: len,
                    data: true,
                }]);
            }
            allocation_map(&file, offset, len)
        })
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        if self.is_block_device {
            return file_len(&self.file);
        }
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Write zeros over a range (`direct`: O_DIRECT, with its sector locks).
fn write_zero_bytes(
    file: &File,
    offset: u64,
    len: u64,
    direct: Option<&SectorLocks>,
) -> io::Result<()> {
    const STEP: u64 = 1 << 20;
    let zeros = IoBuf::zeroed(STEP as usize);
    let mut pos = offset;
    while pos < offset + len {
        let n = STEP.min(offset + len - pos) as usize;
        if let Some(locks) = direct {
            direct_write(file, locks, pos, &zeros[..n])?;
        } else {
            file.write_all_at(&zeros[..n], pos)?;
        }
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// No O_DIRECT in the temporary directory (tmpfs): skip, or fail under
    /// CI ([`fvd_testkit::skip`]), where TMPDIR must be on a disk file system.
    fn skip_without_direct_io(e: &crate::Error) {
        fvd_testkit::skip(&format!("no O_DIRECT in the temporary directory: {e}"));
    }

    use super::*;
    use crate::executor::block_on;

    /// Writers patching different bytes of the same sectors through O_DIRECT
    /// at once: every writer's bytes survive (no lost read-modify-write).
    #[test]
    fn concurrent_partial_sector_writes_keep_every_writer_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        const SECTORS: u64 = 64;
        const WRITERS: u64 = 8;
        const SLICE: u64 = DIRECT_ALIGN / WRITERS;
        std::fs::write(&path, vec![0u8; (SECTORS * DIRECT_ALIGN) as usize]).expect("write");
        let opts = FileOptions {
            cache: CacheMode::None,
            ..FileOptions::read_write()
        };
        let storage = match FileStorage::open(&path, opts) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                skip_without_direct_io(&e);
                return;
            }
        };
        let threads: Vec<_> = (0..WRITERS)
            .map(|w| {
                let storage = storage.clone();
                std::thread::spawn(move || {
                    for round in 0..20u8 {
                        for s in 0..SECTORS {
                            let byte = (w as u8 + 1).wrapping_mul(31).wrapping_add(round);
                            let at = s * DIRECT_ALIGN + w * SLICE;
                            let buf = IoBuf::from_slice(&[byte; SLICE as usize]);
                            block_on(storage.write_at(at, buf, false)).expect("write");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer");
        }
        let data = block_on(storage.read_at(0, IoBuf::zeroed((SECTORS * DIRECT_ALIGN) as usize)))
            .expect("read");
        for s in 0..SECTORS {
            for w in 0..WRITERS {
                let want = (w as u8 + 1).wrapping_mul(31).wrapping_add(19);
                let at = (s * DIRECT_ALIGN + w * SLICE) as usize;
                assert!(
                    data[at..at + SLICE as usize].iter().all(|&b| b == want),
                    "sector {s}: writer {w}'s bytes were lost"
                );
            }
        }
    }
    fn direct_opts() -> FileOptions {
        FileOptions {
            cache: CacheMode::None,
            ..FileOptions::read_write()
        }
    }

    /// Open `path` with O_DIRECT (AIO allowed or not); `None` (after a note)
    /// where the file system refuses O_DIRECT.
    fn open_direct(path: &Path, allow_aio: bool) -> Option<FileStorage> {
        match FileStorage::open_with(path, direct_opts(), allow_aio) {
            Ok(s) => {
                if allow_aio && !s.uses_aio() {
                    eprintln!("NOTE: no AIO context here; testing the pool path");
                }
                Some(s)
            }
            Err(e) => {
                skip_without_direct_io(&e);
                None
            }
        }
    }

    /// Poll every future until all are ready (a minimal join_all).
    async fn join_all<T>(mut futs: Vec<IoFuture<'_, T>>) -> Vec<io::Result<T>> {
        use std::task::Poll;
        let mut out: Vec<Option<io::Result<T>>> = futs.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
                if o.is_none() {
                    match f.as_mut().poll(cx) {
                        Poll::Ready(r) => *o = Some(r),
                        Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        out.into_iter()
            .map(|o| o.expect("every future completed"))
            .collect()
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const CHUNK: u64 = 64 << 10;
    const CHUNKS: u64 = 512;
    const THREADS: u64 = 4;
    const BATCH: usize = 64;

    /// Several threads, each with BATCH requests in flight at once (more than
    /// the AIO context's 128 slots in total), on chunks of their own:
    /// aligned writes (some FUA), partial-sector writes (pool), whole-chunk
    /// reads checked against each thread's model, reads past the end.
    fn concurrent_against_model(allow_aio: bool, slots: Option<usize>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let size = CHUNK * CHUNKS;
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create sparse file");
        let Some(mut storage) = open_direct(&path, allow_aio) else {
            return;
        };
        if let (Some(n), true) = (slots, storage.uses_aio()) {
            storage.aio = Aio::with_slots(storage.file.clone(), n);
        }
        let storage = Arc::new(storage);
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let storage = storage.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                    let mut model = vec![0u8; size as usize];
                    let mine: Vec<u64> = (0..CHUNKS).filter(|c| c % THREADS == t).collect();
                    let mut stamp = 0u8;
                    for _round in 0..25 {
                        // BATCH distinct chunks of this thread, so that the
                        // requests of one batch never overlap.
                        let mut pick = mine.clone();
                        for i in 0..BATCH {
                            let j = i + rng.below((pick.len() - i) as u64) as usize;
                            pick.swap(i, j);
                        }
                        let mut futs: Vec<IoFuture<'_, IoBuf>> = Vec::new();
                        let mut checks: Vec<Option<(u64, usize)>> = Vec::new();
                        for &c in &pick[..BATCH] {
                            let base = c * CHUNK;
                            stamp = stamp.wrapping_add(1);
                            match rng.below(10) {
                                0..=3 => {
                                    // Aligned write: sectors within the chunk.
                                    let s0 = rng.below(CHUNK / 512);
                                    let n = 1 + rng.below(CHUNK / 512 - s0);
                                    let (at, len) = (base + s0 * 512, (n * 512) as usize);
                                    let data: Vec<u8> = (0..len)
                                        .map(|i| stamp ^ (i as u8).wrapping_mul(7) ^ t as u8)
                                        .collect();
                                    model[at as usize..at as usize + len].copy_from_slice(&data);
                                    let fua = rng.below(4) == 0;
                                    futs.push(storage.write_at(at, IoBuf::from_slice(&data), fua));
                                    checks.push(None);
                                }
                                4 => {
                                    // Partial sectors: read-modify-write on the pool.
                                    let at = base + rng.below(CHUNK - 2000);
                                    let len = 1 + rng.below(1999) as usize;
                                    let data = vec![stamp | 1; len];
                                    model[at as usize..at as usize + len].copy_from_slice(&data);
                                    futs.push(storage.write_at(
                                        at,
                                        IoBuf::from_slice(&data),
                                        false,
                                    ));
                                    checks.push(None);
                                }
                                5 => {
                                    // Past the end: zeros, whatever the buffer held.
                                    let at = size + rng.below(64) * 4096;
                                    futs.push(
                                        storage.read_at(at, IoBuf::from_slice(&[0xa5; 8192])),
                                    );
                                    checks.push(Some((u64::MAX, 8192)));
                                }
                                _ => {
                                    futs.push(
                                        storage.read_at(
                                            base,
                                            IoBuf::from_slice(&[0x5a; CHUNK as usize]),
                                        ),
                                    );
                                    checks.push(Some((base, CHUNK as usize)));
                                }
                            }
                        }
                        let results = block_on(join_all(futs));
                        for (r, check) in results.into_iter().zip(checks) {
                            let buf = r.expect("I/O");
                            match check {
                                None => {}
                                Some((u64::MAX, _)) => assert!(buf.is_zero(), "read past the end"),
                                Some((at, len)) => assert!(
                                    buf[..] == model[at as usize..at as usize + len],
                                    "thread {t}: chunk at {at} differs from the model"
                                ),
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        let models: Vec<Vec<u8>> = threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        let mut want = vec![0u8; size as usize];
        for c in 0..CHUNKS {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            want[r.clone()].copy_from_slice(&models[(c % THREADS) as usize][r]);
        }
        let got = block_on(storage.read_at(0, IoBuf::zeroed(size as usize))).expect("read");
        assert!(
            got[..] == want[..],
            "whole-file read differs from the model"
        );
        if let Some(aio) = &storage.aio {
            let st = aio.stats();
            eprintln!("AIO {st:?}");
            assert!(st.submitted > 0, "AIO was not used: {st:?}");
            if slots.is_some() {
                assert!(
                    st.queued > 0,
                    "the in-flight bound was never reached: {st:?}"
                );
            }
        }
        drop(storage);
        let on_disk = std::fs::read(&path).expect("read back");
        assert!(on_disk == want, "file content differs from the model");
    }

    #[test]
    fn aio_concurrent_requests_match_model() {
        concurrent_against_model(true, None);
    }

    /// The same with 3 slots: most requests wait in the queue and are
    /// submitted by the completion thread.
    #[test]
    fn aio_queued_requests_match_model() {
        concurrent_against_model(true, Some(3));
    }

    #[test]
    fn pool_concurrent_requests_match_model() {
        concurrent_against_model(false, None);
    }

    #[test]
    fn aio_is_used_for_direct_files_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        std::fs::write(&path, [0u8; 4096]).expect("write");
        let Some(s) = open_direct(&path, true) else {
            return;
        };
        if std::path::Path::new("/proc/sys/fs/aio-max-nr").exists() {
            assert!(s.uses_aio(), "io_setup works here but AIO is not used");
        }
        drop(s);
        let s = open_direct(&path, false).expect("open");
        assert!(!s.uses_aio());
        drop(s);
        let s = FileStorage::open_with(&path, FileOptions::read_write(), true).expect("open");
        assert!(!s.uses_aio(), "AIO is for O_DIRECT only");
    }

    #[test]
    fn aio_fua_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let Some(s) = open_direct_created(&path) else {
            return;
        };
        if let Some(aio) = &s.aio {
            eprintln!("RWF_DSYNC accepted: {}", aio.dsync());
        }
        let mut want = vec![0u8; 1 << 20];
        let futs: Vec<IoFuture<'_, IoBuf>> = (0..64u64)
            .map(|i| {
                let data = vec![i as u8 + 1; 8192];
                want[(i * 16384) as usize..(i * 16384) as usize + 8192].copy_from_slice(&data);
                s.write_at(i * 16384, IoBuf::from_slice(&data), true)
            })
            .collect();
        for r in block_on(join_all(futs)) {
            r.expect("FUA write");
        }
        let got = block_on(s.read_at(0, IoBuf::zeroed(1 << 20))).expect("read");
        assert!(got[..] == want[..]);
        drop(s);
        let len = 63 * 16384 + 8192;
        assert!(std::fs::read(&path).expect("read back")[..] == want[..len]);
    }

    /// A new empty file, opened with O_DIRECT; every aligned request goes
    /// through AIO, lone writes included.
    fn open_direct_created(path: &Path) -> Option<FileStorage> {
        std::fs::File::create(path).expect("create");
        let mut s = open_direct(path, true)?;
        s.lone_writes_on_pool = false;
        Some(s)
    }

    /// Wait until nothing is in flight (the counter of dropped requests
    /// falls when they complete).
    fn wait_idle(s: &FileStorage) {
        let start = std::time::Instant::now();
        while s.inflight.load(Ordering::Relaxed) != 0 {
            assert!(start.elapsed().as_secs() < 20, "requests never completed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn lone_writes_run_on_the_pool_overlapping_ones_on_aio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("create");
        let Some(s) = open_direct(&path, true) else {
            return;
        };
        let Some(aio) = &s.aio else {
            return;
        };
        let before = aio.stats().submitted;
        for i in 0..4u64 {
            block_on(s.write_at(i * 4096, IoBuf::from_slice(&[1; 4096]), false)).expect("write");
        }
        assert_eq!(aio.stats().submitted, before, "lone writes went to AIO");
        let futs: Vec<IoFuture<'_, IoBuf>> = (0..16u64)
            .map(|i| s.write_at(i * 8192, IoBuf::from_slice(&[2; 4096]), false))
            .collect();
        for r in block_on(join_all(futs)) {
            r.expect("write");
        }
        assert!(
            aio.stats().submitted > before,
            "overlapping writes did not use AIO"
        );
        assert_eq!(
            s.inflight.load(Ordering::Relaxed),
            0,
            "in-flight count leaked"
        );
        // Reads go through AIO alone too.
        let before = aio.stats().submitted;
        let got = block_on(s.read_at(0, IoBuf::zeroed(4096))).expect("read");
        assert!(got.iter().all(|&b| b == 2));
        assert_eq!(aio.stats().submitted, before + 1);
        assert_eq!(
            s.inflight.load(Ordering::Relaxed),
            0,
            "in-flight count leaked"
        );
    }

    #[test]
    fn aio_reads_past_the_end_return_zeros() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        // A size that is not a multiple of the sector: the O_DIRECT read
        // across the end returns an unaligned short count.
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &data).expect("write");
        let Some(s) = open_direct(&path, true) else {
            return;
        };
        let junk = |n: usize| IoBuf::from_slice(&vec![0xee; n]);
        let got = block_on(s.read_at(0, junk(16384))).expect("read across the end");
        assert!(got[..10_000] == data[..]);
        assert!(got[10_000..].iter().all(|&b| b == 0), "bytes past the end");
        let got = block_on(s.read_at(1 << 20, junk(8192))).expect("read past the end");
        assert!(got.is_zero());
        // A size that is a multiple of the sector: an aligned short count,
        // then nothing.
        block_on(s.set_len(8192)).expect("truncate");
        let got = block_on(s.read_at(4096, junk(16384))).expect("read across the end");
        assert!(got[..4096] == data[4096..8192]);
        assert!(got[4096..].iter().all(|&b| b == 0), "bytes past the end");
    }

    #[test]
    fn aio_write_then_read_same_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let Some(s) = open_direct_created(&path) else {
            return;
        };
        let mut rng = Rng(42);
        for (i, (at, len)) in [
            (0u64, 512usize),
            (4096, 4096),
            (512, 1536),
            (3 << 20, 1 << 20),
            (10 << 20, 4 << 20),
            (20 << 20, 4096),
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8 | 1).collect();
            block_on(s.write_at(at, IoBuf::from_slice(&data), i % 2 == 1)).expect("write");
            let got = block_on(s.read_at(at, IoBuf::zeroed(len))).expect("read");
            assert!(got[..] == data[..], "write then read at {at}+{len}");
        }
        assert_eq!(s.len().expect("len"), (20 << 20) + 4096);
    }

    /// Futures dropped before completion (polled once, or never): no crash,
    /// the storage keeps working, and the writes still land (they were
    /// submitted when `write_at` was called, as with the pool).
    #[test]
    fn aio_dropped_futures_are_harmless() {
        dropped_futures(None);
    }

    /// The same with 4 slots: dropping the storage must also submit and wait
    /// for the requests still queued.
    #[test]
    fn aio_dropped_futures_with_queued_requests() {
        dropped_futures(Some(4));
    }

    fn dropped_futures(slots: Option<usize>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let Some(mut s) = open_direct_created(&path) else {
            return;
        };
        if let (Some(n), true) = (slots, s.uses_aio()) {
            s.aio = Aio::with_slots(s.file.clone(), n);
        }
        // Sparse, so that the writes allocate without extending the file
        // (ext4 runs extending O_DIRECT writes synchronously in io_submit).
        s.file.set_len(8 << 20).expect("set_len");
        const N: u64 = 300;
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for i in 0..N {
            let mut w = s.write_at(i * 4096, IoBuf::from_slice(&[i as u8 + 1; 4096]), false);
            let mut r = s.read_at(i * 4096, IoBuf::zeroed(65536));
            if i % 2 == 0 {
                let _ = w.as_mut().poll(&mut cx);
                let _ = r.as_mut().poll(&mut cx);
            }
        }
        // The storage still works, with those requests possibly in flight.
        let data = IoBuf::from_slice(&[0x77; 8192]);
        block_on(s.write_at(N * 4096, data, false)).expect("write");
        let got = block_on(s.read_at(N * 4096, IoBuf::zeroed(8192))).expect("read");
        assert!(got.iter().all(|&b| b == 0x77));
        wait_idle(&s);
        // Dropping the storage waits for whatever is still in flight.
        for i in 0..N {
            drop(s.write_at(
                (N + 2 + i) * 4096,
                IoBuf::from_slice(&[i as u8 + 1; 4096]),
                false,
            ));
        }
        drop(s);
        let on_disk = std::fs::read(&path).expect("read back");
        for i in 0..N {
            for at in [i * 4096, (N + 2 + i) * 4096] {
                let block = &on_disk[at as usize..at as usize + 4096];
                assert!(
                    block.iter().all(|&b| b == i as u8 + 1),
                    "dropped write at {at} did not land"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn aio_futures_complete_under_tokio() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let Some(s) = open_direct_created(&path) else {
            return;
        };
        let s = Arc::new(s);
        let tasks: Vec<_> = (0..200u64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let data = IoBuf::from_slice(&[i as u8; 4096]);
                    s.write_at(i * 4096, data, i % 5 == 0).await.expect("write");
                    let got = s
                        .read_at(i * 4096, IoBuf::zeroed(4096))
                        .await
                        .expect("read");
                    assert!(got.iter().all(|&b| b == i as u8));
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
    }

    /// A transform that flips every byte and records the thread it ran on.
    fn flip(seen: &Arc<std::sync::Mutex<Vec<String>>>) -> Transform {
        let seen = seen.clone();
        Box::new(move |b: &mut [u8]| {
            b.iter_mut().for_each(|x| *x = !*x);
            let name = std::thread::current().name().unwrap_or("").to_string();
            seen.lock().expect("lock").push(name);
        })
    }

    /// `write_at_after` / `read_at_then` run their transform exactly once,
    /// on the pool thread that does the I/O (page cache), and around AIO
    /// (O_DIRECT: before the submission, after the completion) and the
    /// pool fallback of partial sectors.
    #[test]
    fn transforms_run_once_next_to_the_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let flipped: Vec<u8> = data.iter().map(|x| !x).collect();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));

        let path = dir.path().join("cached");
        std::fs::File::create(&path).expect("create");
        let s = FileStorage::open(&path, FileOptions::read_write()).expect("open");
        block_on(s.write_at_after(4096, IoBuf::from_slice(&data), false, flip(&seen)))
            .expect("write");
        let raw = block_on(s.read_at(4096, IoBuf::zeroed(8192))).expect("read");
        assert!(raw[..] == flipped[..], "written once transformed");
        let back = block_on(s.read_at_then(4096, IoBuf::zeroed(8192), flip(&seen))).expect("read");
        assert!(back[..] == data[..], "read back once transformed");
        let names = std::mem::take(&mut *seen.lock().expect("lock"));
        assert_eq!(names.len(), 2);
        if s.pool.is_some() {
            assert!(
                names.iter().all(|n| n.starts_with("fvd-io-")),
                "transforms ran off the I/O threads: {names:?}"
            );
        }

        let path = dir.path().join("direct");
        let Some(s) = open_direct_created(&path) else {
            return;
        };
        // Aligned (AIO when there is a context), then a partial sector
        // (the pool's read-modify-write).
        for (at, len) in [(0u64, 8192usize), (8192 + 100, 1000)] {
            block_on(s.write_at_after(at, IoBuf::from_slice(&data[..len]), true, flip(&seen)))
                .expect("write");
            let raw = block_on(s.read_at(at, IoBuf::zeroed(len))).expect("read");
            assert!(
                raw[..] == flipped[..len],
                "{at}+{len}: written once transformed"
            );
            let back = block_on(s.read_at_then(at, IoBuf::zeroed(len), flip(&seen))).expect("read");
            assert!(
                back[..] == data[..len],
                "{at}+{len}: read back once transformed"
            );
        }
        assert_eq!(seen.lock().expect("lock").len(), 4);
        wait_idle(&s);
    }
}
