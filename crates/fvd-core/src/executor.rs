//! What the engine needs from the runtime it runs under, in one place.
//!
//! The engine's `async fn`s run under any executor: its storage I/O
//! completes on the file backend's own threads, so they need no reactor.
//! Three things come from the host:
//! * [`block_on`] — a minimal executor for synchronous callers (CLI tools,
//!   FUSE threads): parking the calling thread is all it takes;
//! * a [`Spawner`] — the only way the engine starts background work
//!   (copy-on-read fills after the guest read has been answered,
//!   `Image::enable_background`); without one it never spawns;
//! * a [`Clock`] — time, sleeps and randomness for prefetch pacing
//!   ([`ThreadClock`] works anywhere; `fvd serve` uses tokio's timers; the
//!   simulator uses virtual time).

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::Duration;

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Run `fut` to completion on the current thread.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => thread::park(),
        }
    }
}

/// Runs a future in the background (a tokio `spawn`, or the simulator's).
pub type Spawner = Arc<dyn Fn(Pin<Box<dyn Future<Output = ()> + Send + 'static>>) + Send + Sync>;

/// Virtual or real time, and randomness, for background work.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary start.
    fn now(&self) -> Duration;
    /// Resolve after `d`.
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
    /// A random number.
    fn random(&self) -> u64;
}

/// Real time with each sleep on a short-lived thread of its own: works
/// under any executor, [`block_on`] and plain threads included. Under tokio
/// a clock on tokio's timers costs no thread per sleep (`fvd serve`'s).
pub struct ThreadClock {
    start: std::time::Instant,
    seed: AtomicU64,
}

impl Default for ThreadClock {
    fn default() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9);
        ThreadClock {
            start: std::time::Instant::now(),
            seed: AtomicU64::new(nanos | 1),
        }
    }
}

impl Clock for ThreadClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            let _ = tx.send(());
        });
        Box::pin(async move {
            let _ = rx.await;
        })
    }

    fn random(&self) -> u64 {
        // xorshift64*, shared across callers.
        let mut x = self.seed.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.seed.store(x, Ordering::Relaxed);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Run two futures concurrently on the current task; both results.
pub(crate) async fn join2<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none()
            && let Poll::Ready(v) = a.as_mut().poll(cx)
        {
            ra = Some(v);
        }
        if rb.is_none()
            && let Poll::Ready(v) = b.as_mut().poll(cx)
        {
            rb = Some(v);
        }
        if ra.is_some() && rb.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (
        ra.expect("polled to completion"),
        rb.expect("polled to completion"),
    )
}
