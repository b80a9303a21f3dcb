//! A small pool of blocking I/O threads, usable from any executor.
//!
//! Why a pool and not io_uring: the pool works under tokio, under the
//! simulator's executor and from plain threads alike, needs no reactor
//! integration, and on the page cache a `pwrite` costs a few microseconds
//! either way; docs/ARCHITECTURE.md records the measurement.
//!
//! Jobs own everything they touch (buffers move in and out), so a dropped
//! future never leaves a thread writing into freed memory: the job finishes
//! and its result is discarded.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

/// A fixed set of worker threads that run blocking closures.
pub struct Pool {
    queue: Arc<Queue>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl Pool {
    /// Start `threads` workers.
    pub fn new(threads: usize) -> Self {
        let queue = Arc::new(Queue {
            jobs: Mutex::new((VecDeque::new(), false)),
            ready: Condvar::new(),
        });
        let workers = (0..threads.max(1))
            .map(|i| {
                let q = queue.clone();
                thread::Builder::new()
                    .name(format!("fvd-io-{i}"))
                    .spawn(move || worker(q))
                    .expect("cannot start an I/O thread")
            })
            .collect();
        Pool { queue, workers }
    }

    /// Run `f` on a worker; the returned future resolves with its result.
    pub fn run<T, F>(&self, f: F) -> impl Future<Output = io::Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        {
            let mut g = self.queue.jobs.lock().unwrap_or_else(|p| p.into_inner());
            g.0.push_back(job);
        }
        self.queue.ready.notify_one();
        async move {
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(io::Error::other(
                    "I/O thread ended before completing the request",
                )),
            }
        }
    }
}

fn worker(q: Arc<Queue>) {
    loop {
        let job = {
            let mut g = q.jobs.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = g.0.pop_front() {
                    break j;
                }
                if g.1 {
                    return;
                }
                g = q.ready.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        };
        job();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let mut g = self.queue.jobs.lock().unwrap_or_else(|p| p.into_inner());
            g.1 = true;
        }
        self.queue.ready.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
