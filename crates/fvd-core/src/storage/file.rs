//! File and block-device storage: positional I/O on a small blocking pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use super::pool::Pool;
use super::{AllocRun, IoFuture, Storage, coalesce};
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
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" | "direct" => Ok(CacheMode::None),
            other => Err(format!(
                "unknown cache mode '{other}' (expected writeback or none)"
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
    pool: Option<Pool>,
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

impl FileStorage {
    /// Open `path` as storage.
    pub fn open(path: &Path, opts: FileOptions) -> Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(opts.write);
        if opts.create {
            oo.create_new(true);
        }
        if opts.cache == CacheMode::None {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(path).map_err(|e| {
            let what = if opts.create {
                "cannot create"
            } else {
                "cannot open"
            };
            Error::io(format!("{}: {what}", path.display()), e)
        })?;
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
        Ok(FileStorage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            direct: opts.cache == CacheMode::None,
            is_block_device,
            pool: match pool_threads() {
                0 => None,
                n => Some(Pool::new(n)),
            },
            rmw: Arc::new(SectorLocks::default()),
        })
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

fn read_full(file: &File, mut offset: u64, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                offset += n as u64;
                buf = &mut buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a valid descriptor with integer arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
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
    let mut bounce = IoBuf::zeroed(span);
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
        return file.write_all_at(data, offset);
    }
    let _held = locks.lock_ends(offset, data.len());
    // Read-modify-write of the partial sectors at both ends.
    let mut bounce = IoBuf::zeroed(span);
    read_full(file, start, &mut bounce)?;
    let skip = (offset - start) as usize;
    bounce[skip..skip + data.len()].copy_from_slice(data);
    file.write_all_at(&bounce, start)
}

fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a valid descriptor; we only use positional I/O elsewhere.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

fn file_len(file: &File) -> io::Result<u64> {
    Ok(seek(file, 0, libc::SEEK_END)?.unwrap_or(0))
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

impl Storage for FileStorage {
    fn read_at(&self, offset: u64, mut buf: IoBuf) -> IoFuture<'_, IoBuf> {
        let file = self.file.clone();
        let direct = self.direct;
        self.run(move || {
            if direct {
                direct_read(&file, offset, &mut buf)?;
            } else {
                read_full(&file, offset, &mut buf)?;
            }
            Ok(buf)
        })
    }

    fn write_at(&self, offset: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, IoBuf> {
        let file = self.file.clone();
        let direct = self.direct;
        let locks = self.rmw.clone();
        self.run(move || {
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

    fn flush(&self) -> IoFuture<'_, ()> {
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
                eprintln!("SKIP: no O_DIRECT here: {e}");
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
}
