//! The vhost-user backend of one front-end connection.
//!
//! Threads: vhost-user-backend runs one thread reading the vhost-user socket
//! (it calls `update_memory`, `get_config`, `stop_vring`, ...) and one epoll
//! worker thread per queue (`queues_per_thread` maps queue *i* to thread
//! *i*), which calls [`BlkBackend::handle_event`] when the driver kicks.
//! The worker only pops and parses chains; each request then runs as its
//! own task on the tokio runtime given to [`BlkBackend::new`], so requests of
//! one queue run concurrently on the engine and complete in any order.
//!
//! Completion takes the vring's lock, adds the chain to the used ring and
//! signals the driver when `needs_notification` says so (with EVENT_IDX,
//! only when the driver's `used_event` was crossed). Popping disables
//! notifications, drains the available ring, then re-enables them and
//! drains again if the driver added chains meanwhile, so no kick is lost.
//!
//! Lock order: a vring's lock is taken alone (never while holding another
//! vring's lock or the in-flight counters' locks).
//!
//! Drain rules: every popped request holds an [`InflightGuard`] until its
//! used-ring entry is written. `stop_vring` (the front end's
//! `GET_VRING_BASE`, after the library marked the ring not ready so no more
//! chains are popped) waits until the queue has nothing in flight, then
//! commits the image, so the ring base the front end gets back describes
//! finished, durable requests. After a disconnect the server calls
//! [`BlkBackend::close`] (no chain is popped any more, the workers exit) and
//! then waits for every queue the same way.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use fvd_core::Image;
use tokio::runtime::Handle;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_queue::QueueOwnedT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::config::{DeviceConfig, WCE_OFFSET};
use crate::execute::{Device, S_IOERR, execute};
use crate::request::{ParseError, Request, parse};

/// Guest memory as vhost-user-backend maps it (no dirty-page bitmap).
pub type Mem = GuestMemoryMmap<()>;
/// The swappable view of guest memory shared with the library.
pub type AtomicMem = GuestMemoryAtomic<Mem>;
/// One virtqueue with its notifiers.
pub type Vring = VringRwLock<AtomicMem>;

/// Requests in flight on one queue.
#[derive(Debug, Default)]
pub struct Inflight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl Inflight {
    /// Count one request in until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        InflightGuard(self.clone())
    }

    /// Requests in flight now.
    pub fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Block until nothing is in flight.
    pub fn wait_idle(&self) {
        let mut n = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One request in flight; dropping it (after completion, or if its task is
/// cancelled) counts it out.
#[derive(Debug)]
pub struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// The virtio-blk backend of one connection.
pub struct BlkBackend {
    image: Arc<Image>,
    rt: Handle,
    dev: Arc<Device>,
    mem: RwLock<Option<AtomicMem>>,
    event_idx: AtomicBool,
    queues: Vec<Arc<Inflight>>,
    exits: Mutex<Vec<EventNotifier>>,
    /// False once the connection is over: no more chains are popped. A
    /// worker holds the read lock for a whole pass over its ring, so after
    /// [`BlkBackend::close`] took the write lock no request can start.
    open: RwLock<bool>,
}

impl BlkBackend {
    /// A backend serving `image` as the device `config`; requests run on `rt`.
    pub fn new(image: Arc<Image>, config: DeviceConfig, rt: Handle, verbose: bool) -> BlkBackend {
        let queues = (0..config.num_queues.max(1))
            .map(|_| Arc::new(Inflight::default()))
            .collect();
        BlkBackend {
            image,
            rt,
            dev: Arc::new(Device::new(config, verbose)),
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            queues,
            exits: Mutex::new(Vec::new()),
            open: RwLock::new(true),
        }
    }

    /// End of the connection: pop nothing more (waits for a pass over a
    /// ring in progress), and ask the worker threads to exit. Requests
    /// already started still complete; [`BlkBackend::wait_idle`] waits
    /// for them.
    pub fn close(&self) {
        *self.open.write().unwrap_or_else(PoisonError::into_inner) = false;
        self.stop_workers();
    }

    /// The device state (configuration and write cache mode).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Requests in flight on every queue.
    pub fn inflight(&self) -> usize {
        self.queues.iter().map(|q| q.count()).sum()
    }

    /// Block until no queue has a request in flight.
    pub fn wait_idle(&self) {
        for q in &self.queues {
            q.wait_idle();
        }
    }

    /// Ask the library's worker threads to exit (after the connection ended).
    pub fn stop_workers(&self) {
        for n in self
            .exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = n.notify();
        }
    }

    /// Commit the image from a thread outside the runtime, waiting for it.
    fn commit_blocking(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let image = self.image.clone();
        self.rt.spawn(async move {
            let _ = tx.send(image.flush().await);
        });
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("fvd serve: vhost-user-blk: flush failed: {e}"),
            Err(_) => eprintln!("fvd serve: vhost-user-blk: flush did not run"),
        }
    }

    /// Which queue the `device_event`-th vring of worker `thread_id` is.
    fn queue_index(&self, thread_id: usize, device_event: u16) -> usize {
        let mask = self
            .queues_per_thread()
            .get(thread_id)
            .copied()
            .unwrap_or(0);
        (0..64)
            .filter(|b| mask >> b & 1 == 1)
            .nth(usize::from(device_event))
            .unwrap_or(usize::MAX)
    }

    /// Pop every available chain of queue `queue`, start its request, and
    /// answer malformed chains at once.
    pub fn process_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let open = self.open.read().unwrap_or_else(PoisonError::into_inner);
        if !*open {
            return Ok(());
        }
        let Some(atomic) = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let Some(inflight) = self.queues.get(queue) else {
            return Ok(());
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut state = vring.get_mut();
        loop {
            if event_idx {
                let _ = state.disable_notification();
            }
            let chains: Vec<_> = match state.get_queue_mut().iter(mem.clone()) {
                Ok(it) => it.collect(),
                Err(_) => return Ok(()), // not ready: stopped or never started
            };
            let mut used = false;
            for chain in chains {
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain.collect();
                match parse(&*mem, head, &descs) {
                    Ok(req) => self.start(req, vring.clone(), mem.clone(), inflight.begin()),
                    Err(e) => {
                        self.answer_malformed(&mut state, &mem, head, e);
                        used = true;
                    }
                }
            }
            if used && state.needs_notification().unwrap_or(true) {
                let _ = state.signal_used_queue();
            }
            if !event_idx {
                return Ok(());
            }
            match state.enable_notification() {
                Ok(true) => continue, // chains arrived while notifications were off
                _ => return Ok(()),
            }
        }
    }

    fn answer_malformed(
        &self,
        state: &mut VringState<AtomicMem>,
        mem: &Mem,
        head: u16,
        e: ParseError,
    ) {
        let (len, why) = match e {
            ParseError::Malformed(status, why) => {
                let _ = mem.write_obj(S_IOERR, status);
                (1, why)
            }
            ParseError::NoStatus(why) => (0, why),
        };
        if self.dev.verbose {
            eprintln!("fvd serve: vhost-user-blk: chain {head}: {why}");
        }
        let _ = state.add_used(head, len);
    }

    /// Run `req` as a task; complete it on `vring` when done.
    fn start(
        &self,
        req: Request,
        vring: Vring,
        mem: GuestMemoryLoadGuard<Mem>,
        guard: InflightGuard,
    ) {
        let image = self.image.clone();
        let dev = self.dev.clone();
        self.rt.spawn(async move {
            let out = execute(&image, &dev, &*mem, &req).await;
            complete(&vring, req.head, out.written);
            drop(guard);
        });
    }
}

/// Put a finished chain on the used ring and notify the driver if it wants.
pub fn complete(vring: &Vring, head: u16, written: u32) {
    let mut state = vring.get_mut();
    if state.add_used(head, written).is_err() {
        return;
    }
    if state.needs_notification().unwrap_or(true) {
        let _ = state.signal_used_queue();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.dev.config.queue_size)
    }

    fn features(&self) -> u64 {
        self.dev.config.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        DeviceConfig::protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let wce = self.dev.writeback.load(Ordering::Acquire);
        self.dev.config.read(wce, offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match (usize::try_from(offset), buf) {
            (Ok(WCE_OFFSET), [wce]) => {
                let was = self.dev.writeback.swap(*wce != 0, Ordering::AcqRel);
                if self.dev.verbose && was != (*wce != 0) {
                    eprintln!(
                        "fvd serve: vhost-user-blk: write cache {}",
                        if *wce != 0 {
                            "on (write back)"
                        } else {
                            "off (write through)"
                        }
                    );
                }
                if was && *wce == 0 {
                    // Switching to write-through: what the cache held
                    // becomes durable now.
                    self.commit_blocking();
                }
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the wce field of the configuration is writable",
            )),
        }
    }

    fn update_memory(&self, mem: AtomicMem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        let ours = notifier.try_clone().ok()?;
        self.exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ours);
        Some((consumer, notifier))
    }

    fn reset_device(&self) {
        self.wait_idle();
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(q) = self.queues.get(queue_index as usize) {
            q.wait_idle();
        }
        self.commit_blocking();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        self.process_queue(self.queue_index(thread_id, device_event), vring)
    }
}
