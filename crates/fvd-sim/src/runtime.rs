//! The simulated runtime: a single-threaded executor with virtual time and
//! seeded scheduling, and the engine's spawner and clock on it.
//!
//! * Tasks are plain futures (they need not be `Send`); the executor polls
//!   them on the calling thread.
//! * Time is virtual (nanoseconds). It advances only when no task is
//!   runnable: then the earliest timer fires. Timers due at the same instant
//!   fire in a seeded random order, and among runnable tasks the next one to
//!   poll is picked at random, so one seed fixes one interleaving.
//! * A run stops when the main future completes, when nothing is left to do
//!   (a hang, if the main future is still pending), or at a deadline — the
//!   simulator's crash point: every event due at or before the deadline has
//!   happened, nothing after it has.
//! * The engine's background work runs here too: [`SimHandle::spawner`] is
//!   an [`fvd_core::executor::Spawner`] (background copy-on-read fills) whose
//!   tasks join the executor at its next step, and [`SimClock`] is a
//!   [`Clock`] (prefetch) on virtual time and the seeded random stream.
//!
//! Shared state sits behind a `Mutex` only because wakers and the storage
//! futures must be `Send + Sync`; nothing ever contends for it.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use crate::rng::Rng;
use fvd_core::executor::{Clock, Spawner};

/// Index used in the ready queue for the future passed to `block_on`.
const MAIN: usize = usize::MAX;

/// Why a run returned without the main future completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// No task is runnable and no timer is pending: whatever the main future
    /// waits for will never happen.
    Idle,
    /// The next event lies beyond the deadline (a crash point).
    Deadline,
}

struct TimerEntry {
    waker: Option<Waker>,
}

struct State {
    now: u64,
    rng: Rng,
    ready: Vec<(usize, u64)>,
    /// Per task slot: generation + 1 of the entry queued in `ready`, or 0.
    queued: Vec<u64>,
    main_queued: bool,
    timers: BinaryHeap<Reverse<(u64, u64, u64)>>,
    timer_entries: BTreeMap<u64, TimerEntry>,
    next_timer: u64,
    deadline: Option<u64>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Tasks spawned through a [`SimHandle`], not yet taken by the executor.
    incoming: Mutex<Vec<SendFuture>>,
    faults: AtomicU64,
    polls: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn incoming(&self) -> MutexGuard<'_, Vec<SendFuture>> {
        self.incoming.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, idx: usize, generation: u64) {
        let mut st = self.lock();
        if idx == MAIN {
            if !st.main_queued {
                st.main_queued = true;
                st.ready.push((MAIN, 0));
            }
            return;
        }
        if idx < st.queued.len() && st.queued[idx] == generation + 1 {
            return;
        }
        if idx >= st.queued.len() {
            st.queued.resize(idx + 1, 0);
        }
        st.queued[idx] = generation + 1;
        st.ready.push((idx, generation));
    }
}

struct TaskWaker {
    shared: Arc<Shared>,
    idx: usize,
    generation: u64,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.shared.enqueue(self.idx, self.generation);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.enqueue(self.idx, self.generation);
    }
}

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
type SendFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

struct Slot {
    generation: u64,
    fut: Option<LocalFuture>,
    waker: Waker,
}

/// Identifies a spawned task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskId {
    idx: usize,
    generation: u64,
}

/// The simulator's executor. See the module documentation.
pub struct Executor {
    shared: Arc<Shared>,
    slots: RefCell<Vec<Option<Slot>>>,
    generations: RefCell<Vec<u64>>,
    free: RefCell<Vec<usize>>,
}

/// A cheap, `Send + Sync` handle to the executor's clock, timers and random
/// stream. Storage backends and tasks hold one.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

thread_local! {
    static CURRENT: RefCell<Option<SimHandle>> = const { RefCell::new(None) };
}

/// The handle of the executor running on this thread, if any.
pub fn current() -> Option<SimHandle> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Sleep for virtual time `d` on the executor running on this thread.
///
/// # Panics
/// When called outside `Executor::block_on`/`run`.
pub fn sleep(d: Duration) -> Sleep {
    current()
        .expect("fvd_sim::sleep called outside the simulator")
        .sleep(d)
}

impl Executor {
    /// A new executor at virtual time 0 whose scheduling is drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Executor {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    now: 0,
                    rng: Rng::new(seed),
                    ready: Vec::new(),
                    queued: Vec::new(),
                    main_queued: false,
                    timers: BinaryHeap::new(),
                    timer_entries: BTreeMap::new(),
                    next_timer: 0,
                    deadline: None,
                }),
                incoming: Mutex::new(Vec::new()),
                faults: AtomicU64::new(0),
                polls: AtomicU64::new(0),
            }),
            slots: RefCell::new(Vec::new()),
            generations: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        }
    }

    /// A handle to this executor's clock, timers and randomness.
    pub fn handle(&self) -> SimHandle {
        SimHandle {
            shared: self.shared.clone(),
        }
    }

    /// Current virtual time in nanoseconds.
    pub fn now(&self) -> u64 {
        self.shared.lock().now
    }

    /// Stop runs once the next event lies after virtual time `t` (None: never).
    pub fn set_deadline(&self, t: Option<u64>) {
        self.shared.lock().deadline = t;
    }

    /// The current deadline.
    pub fn deadline(&self) -> Option<u64> {
        self.shared.lock().deadline
    }

    /// Number of live tasks (spawned through a handle and not yet started
    /// included).
    pub fn tasks(&self) -> usize {
        self.slots.borrow().iter().filter(|s| s.is_some()).count() + self.shared.incoming().len()
    }

    /// Start `fut` as a task; it runs during later `block_on`/`run` calls.
    pub fn spawn(&self, fut: impl Future<Output = ()> + 'static) -> TaskId {
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(None);
                self.generations.borrow_mut().push(0);
                slots.len() - 1
            }
        };
        let generation = {
            let mut g = self.generations.borrow_mut();
            g[idx] += 1;
            g[idx]
        };
        let waker = Waker::from(Arc::new(TaskWaker {
            shared: self.shared.clone(),
            idx,
            generation,
        }));
        self.slots.borrow_mut()[idx] = Some(Slot {
            generation,
            fut: Some(Box::pin(fut)),
            waker,
        });
        self.shared.enqueue(idx, generation);
        TaskId { idx, generation }
    }

    /// True while the task has not finished (and was not dropped).
    pub fn is_alive(&self, id: TaskId) -> bool {
        matches!(self.slots.borrow().get(id.idx), Some(Some(s)) if s.generation == id.generation)
    }

    /// Drop every task and timer (a crash). Virtual time keeps running.
    pub fn clear(&self) {
        // Take the futures out before dropping them: their destructors may
        // wake other tasks or drop timers, which touch the shared state (or
        // even spawn: loop until nothing is left).
        loop {
            let incoming = std::mem::take(&mut *self.shared.incoming());
            let had_tasks = self.slots.borrow().iter().any(|s| s.is_some());
            if incoming.is_empty() && !had_tasks {
                break;
            }
            drop(incoming);
            self.clear_slots();
        }
        let mut st = self.shared.lock();
        st.ready.clear();
        st.queued.iter_mut().for_each(|q| *q = 0);
        st.main_queued = false;
        st.timers.clear();
        st.timer_entries.clear();
    }

    fn clear_slots(&self) {
        let dead: Vec<Slot> = {
            let mut slots = self.slots.borrow_mut();
            let mut free = self.free.borrow_mut();
            free.clear();
            let mut out = Vec::new();
            for (i, s) in slots.iter_mut().enumerate() {
                if let Some(s) = s.take() {
                    out.push(s);
                }
                free.push(i);
            }
            free.reverse();
            out
        };
        drop(dead);
    }

    /// Start the tasks spawned through handles since the last step.
    fn adopt_incoming(&self) {
        let incoming = std::mem::take(&mut *self.shared.incoming());
        for f in incoming {
            self.spawn(f);
        }
    }

    /// Run the spawned tasks until nothing is left to do or the deadline.
    pub fn run(&self) -> Stop {
        match self.block_on(std::future::pending::<()>()) {
            Ok(()) => unreachable!("pending() never completes"),
            Err(s) => s,
        }
    }

    /// Drive `fut` (and every spawned task) until `fut` completes.
    ///
    /// Returns `Err(Stop::Deadline)` at the deadline and `Err(Stop::Idle)` if
    /// `fut` can never complete (a hang).
    pub fn block_on<F: Future>(&self, fut: F) -> Result<F::Output, Stop> {
        let prev = CURRENT.with(|c| c.borrow_mut().replace(self.handle()));
        let r = self.drive(fut);
        CURRENT.with(|c| *c.borrow_mut() = prev);
        r
    }

    fn drive<F: Future>(&self, fut: F) -> Result<F::Output, Stop> {
        let mut fut = pin!(fut);
        let main_waker = Waker::from(Arc::new(TaskWaker {
            shared: self.shared.clone(),
            idx: MAIN,
            generation: 0,
        }));
        self.shared.enqueue(MAIN, 0);
        loop {
            self.adopt_incoming();
            let next = {
                let mut st = self.shared.lock();
                if st.ready.is_empty() {
                    None
                } else {
                    let n = st.ready.len() as u64;
                    let i = st.rng.below(n) as usize;
                    let e = st.ready.swap_remove(i);
                    if e.0 == MAIN {
                        st.main_queued = false;
                    } else if st.queued.get(e.0) == Some(&(e.1 + 1)) {
                        st.queued[e.0] = 0;
                    }
                    Some(e)
                }
            };
            match next {
                Some((MAIN, _)) => {
                    self.shared.polls.fetch_add(1, Ordering::Relaxed);
                    let mut cx = Context::from_waker(&main_waker);
                    if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                        return Ok(v);
                    }
                }
                Some((idx, generation)) => self.poll_task(idx, generation),
                None => {
                    if !self.fire_timer()? {
                        return Err(Stop::Idle);
                    }
                }
            }
        }
    }

    fn poll_task(&self, idx: usize, generation: u64) {
        let taken = {
            let mut slots = self.slots.borrow_mut();
            match slots.get_mut(idx) {
                Some(Some(s)) if s.generation == generation => {
                    s.fut.take().map(|f| (f, s.waker.clone()))
                }
                _ => None,
            }
        };
        let Some((mut f, waker)) = taken else { return };
        self.shared.polls.fetch_add(1, Ordering::Relaxed);
        let mut cx = Context::from_waker(&waker);
        let done = f.as_mut().poll(&mut cx).is_ready();
        let mut slots = self.slots.borrow_mut();
        // The slot may have been cleared (and reused) while polling.
        let same = matches!(slots.get(idx), Some(Some(s)) if s.generation == generation);
        if same {
            if done {
                slots[idx] = None;
                self.free.borrow_mut().push(idx);
            } else if let Some(s) = slots[idx].as_mut() {
                s.fut = Some(f);
                return;
            }
        }
        drop(slots);
        drop(f);
    }

    /// Fire the earliest timer. Ok(false): no timer left. Err: past the deadline.
    fn fire_timer(&self) -> Result<bool, Stop> {
        let waker = {
            let mut st = self.shared.lock();
            let deadline = st.deadline;
            loop {
                let Some(&Reverse((t, _, id))) = st.timers.peek() else {
                    return Ok(false);
                };
                if !st.timer_entries.contains_key(&id) {
                    st.timers.pop();
                    continue;
                }
                if deadline.is_some_and(|d| t > d) {
                    if let Some(d) = deadline {
                        st.now = st.now.max(d);
                    }
                    return Err(Stop::Deadline);
                }
                st.timers.pop();
                st.now = st.now.max(t);
                let e = st.timer_entries.remove(&id).expect("checked above");
                break e.waker;
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(true)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.clear();
    }
}

impl SimHandle {
    /// Current virtual time in nanoseconds.
    pub fn now(&self) -> u64 {
        self.shared.lock().now
    }

    /// Stop runs once the next event lies after virtual time `t` (None:
    /// never). Tasks use it to schedule a crash.
    pub fn set_deadline(&self, t: Option<u64>) {
        self.shared.lock().deadline = t;
    }

    /// The current deadline.
    pub fn deadline(&self) -> Option<u64> {
        self.shared.lock().deadline
    }

    /// Start `fut` as a task of the executor; it joins the run at the
    /// executor's next step (in spawn order, so runs stay deterministic).
    /// Unlike [`Executor::spawn`] this works from any task or storage
    /// future, which is what the engine's background work needs.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.shared.incoming().push(Box::pin(fut));
    }

    /// An engine [`Spawner`] running background work (copy-on-read fills)
    /// as tasks of this executor.
    pub fn spawner(&self) -> Spawner {
        let h = self.clone();
        Arc::new(move |f: SendFuture| h.spawn(f))
    }

    /// A [`Clock`] on this executor's virtual time and random stream.
    pub fn clock(&self) -> SimClock {
        SimClock { sim: self.clone() }
    }

    /// A future that completes after virtual time `d`.
    pub fn sleep(&self, d: Duration) -> Sleep {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sleep_ns(ns)
    }

    /// A future that completes after `ns` virtual nanoseconds.
    pub fn sleep_ns(&self, ns: u64) -> Sleep {
        let now = self.now();
        Sleep {
            shared: self.shared.clone(),
            deadline: now.saturating_add(ns),
            id: None,
        }
    }

    /// 64 bits from the simulation's random stream.
    pub fn random(&self) -> u64 {
        self.shared.lock().rng.next_u64()
    }

    /// Run `f` with the simulation's random stream.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut Rng) -> T) -> T {
        f(&mut self.shared.lock().rng)
    }

    /// Record that a fault was injected (see [`SimHandle::faults_injected`]).
    pub fn note_fault(&self) {
        self.shared.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Faults injected so far by every backend of this simulation.
    pub fn faults_injected(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }

    /// Task polls so far (a measure of work done).
    pub fn polls(&self) -> u64 {
        self.shared.polls.load(Ordering::Relaxed)
    }
}

/// The engine's [`Clock`] in the simulator: virtual time, virtual sleeps,
/// and numbers from the simulation's seeded random stream.
#[derive(Clone)]
pub struct SimClock {
    sim: SimHandle,
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.sim.now())
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(self.sim.sleep(d))
    }

    fn random(&self) -> u64 {
        self.sim.random()
    }
}

/// A virtual-time sleep; see [`SimHandle::sleep`].
pub struct Sleep {
    shared: Arc<Shared>,
    deadline: u64,
    id: Option<u64>,
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut st = this.shared.lock();
        if st.now >= this.deadline {
            if let Some(id) = this.id.take() {
                st.timer_entries.remove(&id);
            }
            return Poll::Ready(());
        }
        match this.id {
            Some(id) => match st.timer_entries.get_mut(&id) {
                Some(e) => e.waker = Some(cx.waker().clone()),
                None => {
                    // Fired but time was moved back? Cannot happen; re-arm.
                    this.id = None;
                    drop(st);
                    return Pin::new(this).poll(cx);
                }
            },
            None => {
                let id = st.next_timer;
                st.next_timer += 1;
                let tie = st.rng.next_u64();
                st.timers.push(Reverse((this.deadline, tie, id)));
                st.timer_entries.insert(
                    id,
                    TimerEntry {
                        waker: Some(cx.waker().clone()),
                    },
                );
                this.id = Some(id);
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.shared.lock().timer_entries.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn timers_advance_virtual_time() {
        let ex = Executor::new(1);
        let h = ex.handle();
        let r = ex.block_on(async {
            h.sleep(Duration::from_millis(5)).await;
            h.now()
        });
        assert_eq!(r, Ok(5_000_000));
    }

    #[test]
    fn deadline_stops_a_run_and_clear_drops_tasks() {
        let ex = Executor::new(2);
        let h = ex.handle();
        let hits = Rc::new(Cell::new(0));
        for i in 0..10u64 {
            let h = h.clone();
            let hits = hits.clone();
            ex.spawn(async move {
                h.sleep_ns(i * 100).await;
                hits.set(hits.get() + 1);
            });
        }
        ex.set_deadline(Some(450));
        assert_eq!(ex.run(), Stop::Deadline);
        assert_eq!(hits.get(), 5);
        ex.clear();
        ex.set_deadline(None);
        assert_eq!(ex.run(), Stop::Idle);
        assert_eq!(hits.get(), 5);
    }

    #[test]
    fn handle_spawns_and_clock_runs_on_virtual_time() {
        use std::sync::atomic::AtomicUsize;
        let ex = Executor::new(4);
        let h = ex.handle();
        let clock = h.clock();
        let done = Arc::new(AtomicUsize::new(0));
        let spawn = h.spawner();
        for i in 0..3u64 {
            let (c, d) = (clock.clone(), done.clone());
            spawn(Box::pin(async move {
                c.sleep(Duration::from_micros(i + 1)).await;
                d.fetch_add(1, Ordering::Relaxed);
            }));
        }
        // Spawned outside a run: pending until the executor runs.
        assert_eq!(ex.tasks(), 3);
        assert_eq!(ex.run(), Stop::Idle);
        assert_eq!(done.load(Ordering::Relaxed), 3);
        assert_eq!(clock.now(), Duration::from_micros(3));
        // A task spawning through the handle: the new task joins the run.
        let h2 = h.clone();
        let d = done.clone();
        ex.block_on(async move {
            h2.spawn(async move {
                d.fetch_add(1, Ordering::Relaxed);
            });
        })
        .unwrap();
        assert_eq!(ex.run(), Stop::Idle);
        assert_eq!(done.load(Ordering::Relaxed), 4);
        // A crash drops tasks spawned but not started yet.
        let d = done.clone();
        h.spawn(async move {
            d.fetch_add(1, Ordering::Relaxed);
        });
        ex.clear();
        assert_eq!(ex.tasks(), 0);
        assert_eq!(ex.run(), Stop::Idle);
        assert_eq!(done.load(Ordering::Relaxed), 4);
        // Same seed, same random numbers.
        let other = Executor::new(4).handle().clock();
        assert_eq!(Executor::new(4).handle().clock().random(), other.random());
    }

    #[test]
    fn hang_is_reported() {
        let ex = Executor::new(3);
        let r = ex.block_on(std::future::pending::<()>());
        assert_eq!(r, Err(Stop::Idle));
    }

    #[test]
    fn same_seed_same_interleaving() {
        fn order(seed: u64) -> Vec<u64> {
            let ex = Executor::new(seed);
            let h = ex.handle();
            let log = Rc::new(RefCell::new(Vec::new()));
            for i in 0..20u64 {
                let log = log.clone();
                let h = h.clone();
                ex.spawn(async move {
                    h.sleep_ns(10).await;
                    log.borrow_mut().push(i);
                });
            }
            ex.run();
            log.take()
        }
        assert_eq!(order(9), order(9));
        assert_ne!(order(9), order(10));
    }
}
