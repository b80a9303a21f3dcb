//! Linux native AIO (`io_setup` / `io_submit` / `io_getevents`) for the
//! aligned `O_DIRECT` reads and writes of [`FileStorage`](super::FileStorage).
//!
//! Why: an allocating `O_DIRECT` write into a sparse ext4 file holds the
//! inode lock for the whole I/O when it is issued synchronously, so the
//! blocking pool's 16 threads serialise on it; submitted asynchronously the
//! lock is held only while blocks are allocated and the bio is queued
//! (docs/BENCHMARKS.md, NBD section: fio psync 10k IOPS vs libaio 29k).
//!
//! How a request runs:
//! 1. The caller (any thread, any executor) builds a [`Req`] that owns its
//!    buffer and a oneshot sender, puts it in a free slot of the table (at
//!    most [`MAX_IN_FLIGHT`] slots; when all are busy it waits at the back of
//!    the overflow queue) and submits one iocb, with the slot number as
//!    `aio_data`. Submission happens when `read_at`/`write_at` is called,
//!    as with the pool: a future dropped unpolled still performs its I/O.
//! 2. One completion thread per context blocks in `io_getevents`, takes each
//!    finished request out of its slot and completes it (the oneshot send
//!    wakes whichever executor polls the future), or, after a short
//!    transfer, puts the remainder at the front of the queue.
//! 3. After every batch of events the completion thread submits queued
//!    requests into the slots that were freed.
//!
//! Ownership: from submission until its event has been reaped, a request and
//! its buffer live in the slot table (or the queue), never in the future. A
//! dropped future only drops the oneshot receiver: the completion thread
//! drops the buffer after the kernel is done with it.
//!
//! Locking: a single mutex (`Shared::state`) guards the slots and the queue.
//! It is never held across a syscall (`io_submit` can block for a while on
//! the inode lock of an allocating write): a request is put in its slot
//! first, then submitted with the lock released, so its event may be reaped
//! before `io_submit` has returned. It is not taken while any other lock of
//! the storage is held.
//!
//! Shutdown ([`Aio`]'s `Drop`, run when the `FileStorage` is dropped): mark
//! the context closing, submit a zero-length read to wake the completion
//! thread, which keeps reaping until no request is in flight or queued and
//! then exits; join it, then `io_destroy`. The table (with any buffer) is
//! freed only after `io_destroy` has returned.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::iobuf::IoBuf;

/// Requests submitted to the kernel at once per context; more wait in a queue.
pub(crate) const MAX_IN_FLIGHT: usize = 128;
/// Offsets, lengths and buffers of AIO requests are multiples of this.
pub(crate) const SECTOR: u64 = 512;
/// Events reaped per `io_getevents` call.
const EVENTS_PER_CALL: usize = 64;
/// The completion thread wakes at least this often (to retry a submission
/// the kernel refused with `EAGAIN`, and to exit if its wake-up read could
/// not be submitted).
const IDLE_WAIT: Duration = Duration::from_millis(500);
/// `aio_data` of the zero-length probe and wake-up reads (not a slot).
const WAKE: u64 = u64::MAX;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
/// `RWF_DSYNC` from `<linux/fs.h>`: per-write `O_DSYNC` (Linux 4.7, in
/// `aio_rw_flags` since 4.13).
const RWF_DSYNC: i32 = 0x2;

type AioContext = libc::c_ulong;

/// `struct iocb` from `<linux/aio_abi.h>` (64 bytes).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event` from `<linux/aio_abi.h>` (32 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// Counts one request in a shared in-flight counter for as long as it lives
/// (the owner of the request drops it once the I/O is over, whether or not
/// anyone still waits for the result).
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(crate) fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write { dsync: bool },
}

/// One read or write, owning its buffer until it is completed.
struct Req {
    op: Op,
    offset: u64,
    buf: IoBuf,
    /// Bytes already transferred (a short transfer is resubmitted from here).
    done: usize,
    tx: oneshot::Sender<io::Result<IoBuf>>,
    /// Counts the request as in flight until it is dropped, after completion.
    _hold: InFlight,
}

impl Req {
    /// The iocb for the untransferred rest of the request.
    fn iocb(&mut self, fd: u32, data: u64) -> Iocb {
        let (opcode, flags) = match self.op {
            Op::Read => (IOCB_CMD_PREAD, 0),
            Op::Write { dsync } => (IOCB_CMD_PWRITE, if dsync { RWF_DSYNC } else { 0 }),
        };
        let rest = &mut self.buf[self.done..];
        Iocb {
            aio_data: data,
            aio_rw_flags: flags,
            aio_lio_opcode: opcode,
            aio_fildes: fd,
            aio_buf: rest.as_mut_ptr() as u64,
            aio_nbytes: rest.len() as u64,
            aio_offset: (self.offset + self.done as u64) as i64,
            ..Iocb::default()
        }
    }

    fn complete(self, r: io::Result<()>) {
        let Req { buf, tx, _hold, .. } = self;
        // No longer in flight before the waiter wakes up (and maybe issues
        // its next request).
        drop(_hold);
        // A closed receiver (dropped future) hands the value back: the buffer
        // is freed here, after the kernel finished with it.
        let _ = tx.send(r.map(|()| buf));
    }
}

struct State {
    /// Submitted requests by slot number (`aio_data`); `None` when free.
    slots: Vec<Option<Req>>,
    free: Vec<usize>,
    /// Requests waiting for a slot (or for the kernel after `EAGAIN`).
    queued: VecDeque<Req>,
    closing: bool,
}

struct Shared {
    ctx: AioContext,
    /// Keeps the descriptor open until after `io_destroy`.
    file: Arc<File>,
    fd: u32,
    state: Mutex<State>,
    /// The kernel accepts `RWF_DSYNC` in `aio_rw_flags`.
    dsync: AtomicBool,
    submitted: AtomicU64,
    queued: AtomicU64,
}

/// Counters for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct AioStats {
    /// iocbs accepted by `io_submit` (resubmissions included).
    pub submitted: u64,
    /// Requests that waited in the queue because every slot was busy.
    pub queued: u64,
}

fn errno_is(e: &io::Error, codes: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, iocb: &mut Iocb) -> io::Result<()> {
        let mut list = [iocb as *mut Iocb];
        loop {
            // SAFETY: `list` holds one pointer to a valid, initialised iocb;
            // the kernel copies it during the call. The memory the iocb names
            // (`aio_buf`, `aio_nbytes`) belongs to a request kept in the slot
            // table until its event is reaped (or to `Aio::wake_buf` for
            // zero-length reads, kept until after `io_destroy`).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    1 as libc::c_long,
                    list.as_mut_ptr(),
                )
            };
            match rc {
                1 => {
                    self.submitted.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                0 => return Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn get_events(&self, events: &mut [IoEvent], timeout: Duration) -> io::Result<usize> {
        let mut ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` is valid for `events.len()` io_event records and
        // `ts` for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.ctx,
                1 as libc::c_long,
                events.len() as libc::c_long,
                events.as_mut_ptr(),
                &mut ts as *mut libc::timespec,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// Submit a zero-length read (tagged [`WAKE`]) with `rw_flags`.
    fn submit_wake(&self, buf: &mut IoBuf, rw_flags: i32) -> io::Result<()> {
        let mut iocb = Iocb {
            aio_data: WAKE,
            aio_rw_flags: rw_flags,
            aio_lio_opcode: IOCB_CMD_PREAD,
            aio_fildes: self.fd,
            aio_buf: buf.as_mut_ptr() as u64,
            aio_nbytes: 0,
            aio_offset: 0,
            ..Iocb::default()
        };
        self.submit(&mut iocb)
    }

    /// Before the completion thread runs: does a zero-length read with
    /// `rw_flags` go through and complete?
    fn probe(&self, buf: &mut IoBuf, rw_flags: i32) -> bool {
        if self.submit_wake(buf, rw_flags).is_err() {
            return false;
        }
        let mut ev = [IoEvent::default()];
        loop {
            match self.get_events(&mut ev, Duration::from_secs(1)) {
                Ok(1) => return ev[0].res >= 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Not reaped in time: the completion thread will ignore its
                // event (WAKE); call the probe failed.
                _ => return false,
            }
        }
    }

    /// Put `req` in `slot` (taken from `st.free`) and submit it: `Ok(true)`.
    /// `EAGAIN` puts it at the front of the queue, to be retried by the
    /// completion thread: `Ok(false)`. Any other refusal gives it back.
    fn place_and_submit(
        &self,
        mut st: MutexGuard<'_, State>,
        slot: usize,
        mut req: Req,
    ) -> Result<bool, (io::Error, Req)> {
        let mut iocb = req.iocb(self.fd, slot as u64);
        st.slots[slot] = Some(req);
        drop(st);
        let Err(e) = self.submit(&mut iocb) else {
            return Ok(true);
        };
        // Not submitted: nobody else touches this slot, take the request back.
        let mut st = self.lock();
        let back = st.slots[slot].take();
        st.free.push(slot);
        let Some(req) = back else {
            return Ok(true);
        };
        if errno_is(&e, &[libc::EAGAIN]) {
            st.queued.push_front(req);
            return Ok(false);
        }
        if matches!(req.op, Op::Write { dsync: true })
            && errno_is(&e, &[libc::EINVAL, libc::EOPNOTSUPP])
        {
            self.dsync.store(false, Ordering::Relaxed);
        }
        Err((e, req))
    }

    /// From the caller: submit `req`, or queue it when every slot is busy.
    /// Gives it back if the kernel refused it (the caller uses the pool).
    fn start(&self, req: Req) -> Result<(), Req> {
        let mut st = self.lock();
        let Some(slot) = st.free.pop() else {
            st.queued.push_back(req);
            self.queued.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        self.place_and_submit(st, slot, req)
            .map(|_| ())
            .map_err(|(_, req)| req)
    }

    /// Completion thread: submit queued requests while slots are free.
    fn drain(&self) {
        loop {
            let mut st = self.lock();
            if st.queued.is_empty() {
                return;
            }
            let Some(slot) = st.free.pop() else {
                return;
            };
            let Some(req) = st.queued.pop_front() else {
                st.free.push(slot);
                return;
            };
            match self.place_and_submit(st, slot, req) {
                Ok(true) => {}
                // EAGAIN: back in the queue; retry after the next event.
                Ok(false) => return,
                Err((_, req)) => self.finish_blocking(req),
            }
        }
    }

    /// Completion thread, for a request the kernel refused to queue: do the
    /// rest with plain positional I/O (rare: the probe at open vetted AIO and
    /// `RWF_DSYNC` on this descriptor).
    fn finish_blocking(&self, mut req: Req) {
        let at = req.offset + req.done as u64;
        let done = req.done;
        let r = match req.op {
            Op::Read => super::sys::read_full(&self.file, at, &mut req.buf[done..]),
            Op::Write { dsync } => self
                .file
                .write_all_at(&req.buf[done..], at)
                .and_then(|()| if dsync { self.file.sync_data() } else { Ok(()) }),
        };
        req.complete(r);
    }

    /// Completion thread: what to do with a request whose event says `res`.
    /// Returns it when the rest must be resubmitted.
    fn on_event(mut req: Req, res: i64) -> Option<Req> {
        if res < 0 {
            let code = i32::try_from(-res).unwrap_or(libc::EIO);
            req.complete(Err(io::Error::from_raw_os_error(code)));
            return None;
        }
        let rest = req.buf.len() - req.done;
        let n = usize::try_from(res).unwrap_or(usize::MAX).min(rest);
        req.done += n;
        if req.done == req.buf.len() {
            req.complete(Ok(()));
            return None;
        }
        let aligned = (req.done as u64).is_multiple_of(SECTOR);
        match req.op {
            // A short read ends at the end of the file (an O_DIRECT read
            // returns less only there): past it the storage reads as zeros.
            // An aligned short read is retried once to be sure.
            Op::Read if n == 0 || !aligned => {
                let done = req.done;
                req.buf[done..].fill(0);
                req.complete(Ok(()));
                None
            }
            Op::Write { .. } if n == 0 || !aligned => {
                let msg = format!(
                    "short O_DIRECT write: {} of {} bytes",
                    req.done,
                    req.buf.len()
                );
                req.complete(Err(io::Error::new(io::ErrorKind::WriteZero, msg)));
                None
            }
            _ => Some(req),
        }
    }

    fn idle(st: &State) -> bool {
        st.free.len() == st.slots.len() && st.queued.is_empty()
    }
}

fn completion_thread(shared: Arc<Shared>) {
    let mut events = [IoEvent::default(); EVENTS_PER_CALL];
    let mut reaped: Vec<(Req, i64)> = Vec::with_capacity(EVENTS_PER_CALL);
    loop {
        match shared.get_events(&mut events, IDLE_WAIT) {
            Ok(n) => {
                {
                    let mut st = shared.lock();
                    for ev in &events[..n] {
                        if ev.data == WAKE {
                            continue;
                        }
                        let slot = ev.data as usize;
                        if let Some(req) = st.slots.get_mut(slot).and_then(Option::take) {
                            st.free.push(slot);
                            reaped.push((req, ev.res));
                        }
                    }
                }
                let mut again = Vec::new();
                for (req, res) in reaped.drain(..) {
                    if let Some(req) = Shared::on_event(req, res) {
                        again.push(req);
                    }
                }
                if !again.is_empty() {
                    let mut st = shared.lock();
                    for req in again.into_iter().rev() {
                        st.queued.push_front(req);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Cannot happen with a valid context; do not spin.
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
        shared.drain();
        let st = shared.lock();
        if st.closing && Shared::idle(&st) {
            return;
        }
    }
}

/// An AIO context for one `O_DIRECT` descriptor, with its completion thread.
pub(crate) struct Aio {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
    /// Target of the zero-length probe and wake-up reads.
    wake_buf: IoBuf,
}

impl Aio {
    /// Set up a context for `file` (opened with `O_DIRECT`); `None` if the
    /// kernel refuses (`ENOSYS`, `EAGAIN` past `/proc/sys/fs/aio-max-nr`) or
    /// the descriptor does not take AIO: the caller then uses its pool.
    pub(crate) fn new(file: Arc<File>) -> Option<Aio> {
        Self::with_slots(file, MAX_IN_FLIGHT)
    }

    /// [`Aio::new`] with at most `slots` requests in flight (tests use a
    /// handful, to exercise the queue).
    pub(crate) fn with_slots(file: Arc<File>, slots: usize) -> Option<Aio> {
        let slots = slots.max(1);
        let fd = u32::try_from(file.as_raw_fd()).ok()?;
        let mut ctx: AioContext = 0;
        // SAFETY: io_setup writes a context id to `ctx`, which is valid and
        // zero as the call requires.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                (slots + 2) as libc::c_long,
                &mut ctx as *mut AioContext,
            )
        };
        if rc != 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            ctx,
            file,
            fd,
            state: Mutex::new(State {
                slots: (0..slots).map(|_| None).collect(),
                free: (0..slots).rev().collect(),
                queued: VecDeque::new(),
                closing: false,
            }),
            dsync: AtomicBool::new(false),
            submitted: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        });
        let mut wake_buf = IoBuf::zeroed(SECTOR as usize);
        let destroy = |ctx: AioContext| {
            // SAFETY: `ctx` came from io_setup above and is destroyed once;
            // io_destroy waits for the only possible request, a zero-length
            // read into `wake_buf`, which is still alive.
            unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
        };
        if !shared.probe(&mut wake_buf, 0) {
            destroy(ctx);
            return None;
        }
        let dsync = shared.probe(&mut wake_buf, RWF_DSYNC);
        shared.dsync.store(dsync, Ordering::Relaxed);
        let s = shared.clone();
        let thread = match thread::Builder::new()
            .name("fvd-aio".into())
            .spawn(move || completion_thread(s))
        {
            Ok(t) => t,
            Err(_) => {
                destroy(ctx);
                return None;
            }
        };
        Some(Aio {
            shared,
            thread: Some(thread),
            wake_buf,
        })
    }

    /// True if FUA writes can go through AIO with `RWF_DSYNC`.
    pub(crate) fn dsync(&self) -> bool {
        self.shared.dsync.load(Ordering::Relaxed)
    }

    /// Read `buf.len()` bytes at `offset` (both, and the buffer address,
    /// multiples of [`SECTOR`]). `Err` gives the buffer back when the kernel
    /// refused the request: run it elsewhere. `hold` lives as long as the
    /// request.
    pub(crate) fn read(
        &self,
        offset: u64,
        buf: IoBuf,
        hold: InFlight,
    ) -> Result<impl Future<Output = io::Result<IoBuf>> + Send + 'static, IoBuf> {
        self.issue(Op::Read, offset, buf, hold)
    }

    /// Write `buf` at `offset` (aligned as for [`Aio::read`]); with `fua`
    /// through `RWF_DSYNC` (check [`Aio::dsync`] first).
    pub(crate) fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
        hold: InFlight,
    ) -> Result<impl Future<Output = io::Result<IoBuf>> + Send + 'static, IoBuf> {
        self.issue(Op::Write { dsync: fua }, offset, buf, hold)
    }

    fn issue(
        &self,
        op: Op,
        offset: u64,
        buf: IoBuf,
        hold: InFlight,
    ) -> Result<impl Future<Output = io::Result<IoBuf>> + Send + 'static, IoBuf> {
        let (tx, rx) = oneshot::channel();
        let req = Req {
            op,
            offset,
            buf,
            done: 0,
            tx,
            _hold: hold,
        };
        match self.shared.start(req) {
            Ok(()) => Ok(async move {
                match rx.await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::other(
                        "AIO completion thread ended before completing the request",
                    )),
                }
            }),
            Err(req) => Err(req.buf),
        }
    }

    /// Counters since the context was set up.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn stats(&self) -> AioStats {
        AioStats {
            submitted: self.shared.submitted.load(Ordering::Relaxed),
            queued: self.shared.queued.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        // Wake the completion thread now rather than at its next timeout; it
        // exits once nothing is in flight or queued.
        let _ = self.shared.submit_wake(&mut self.wake_buf, 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: the context came from io_setup and is destroyed once. The
        // completion thread exited with no request in flight, except possibly
        // a zero-length wake-up read (or, had the thread died, requests whose
        // buffers are still in the slot table); io_destroy waits for them, and
        // both `wake_buf` and the table are dropped only after it returns.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.shared.ctx) };
    }
}
