//! A few worker threads, each owning one connection, running blocking jobs.
//!
//! Remote bases use blocking sockets: a job runs on a worker thread with
//! that worker's own state (its connection, opened lazily), and its result
//! comes back through a oneshot channel. The returned futures complete
//! under any executor — tokio, the CLI's `block_on`, the simulator — since
//! nothing but the channel ties them to the worker.
//!
//! Workers are started on demand, up to a limit, so a base read one request
//! at a time holds one connection. A dropped future does not cancel its job
//! (the job owns its buffer); the result is discarded. When the pool is
//! dropped the workers finish the queued jobs, drop their state (closing
//! their connections) and exit.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::oneshot;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

struct State<S> {
    jobs: VecDeque<Job<S>>,
    idle: usize,
    threads: usize,
    max_threads: usize,
    closed: bool,
}

struct Shared<S> {
    state: Mutex<State<S>>,
    ready: Condvar,
    name: String,
}

/// Worker threads with per-thread state `S` (a connection).
pub struct Workers<S: Default + Send + 'static> {
    shared: Arc<Shared<S>>,
}

impl<S: Default + Send + 'static> Workers<S> {
    /// A pool of at most `max_threads` workers named `name-N`; none is
    /// started until the first job.
    pub fn new(name: &str, max_threads: usize) -> Self {
        Workers {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                    max_threads: max_threads.max(1),
                    closed: false,
                }),
                ready: Condvar::new(),
                name: name.to_string(),
            }),
        }
    }

    /// Run `f` on a worker with its state; the future resolves with the
    /// result.
    pub fn run<T, F>(&self, f: F) -> impl Future<Output = io::Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&mut S) -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |s: &mut S| {
            let _ = tx.send(f(s));
        });
        let spawn_error = self.submit(job).err();
        async move {
            if let Some(e) = spawn_error {
                return Err(e);
            }
            match rx.await {
                Ok(r) => r,
                Err(_) => Err(io::Error::other(
                    "a remote I/O thread ended before completing the request",
                )),
            }
        }
    }

    /// Change the most workers started from now on (running ones stay).
    pub fn set_max_threads(&self, n: usize) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.max_threads = n.max(1);
    }

    fn submit(&self, job: Job<S>) -> io::Result<()> {
        let sh = &self.shared;
        let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        st.jobs.push_back(job);
        if st.jobs.len() > st.idle && st.threads < st.max_threads {
            let index = st.threads;
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{index}", sh.name))
                .spawn(move || worker(shared));
            match spawned {
                Ok(_) => st.threads += 1,
                Err(e) if st.threads == 0 => {
                    st.jobs.pop_back();
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot start a remote I/O thread: {e}"),
                    ));
                }
                // Other workers will pick the job up.
                Err(_) => {}
            }
        }
        drop(st);
        sh.ready.notify_one();
        Ok(())
    }
}

impl<S: Default + Send + 'static> Drop for Workers<S> {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.closed = true;
        drop(st);
        self.shared.ready.notify_all();
    }
}

fn worker<S: Default + Send + 'static>(shared: Arc<Shared<S>>) {
    let mut state = S::default();
    loop {
        let job = {
            let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = st.jobs.pop_front() {
                    break j;
                }
                if st.closed {
                    st.threads -= 1;
                    return;
                }
                st.idle += 1;
                st = shared.ready.wait(st).unwrap_or_else(|p| p.into_inner());
                st.idle -= 1;
            }
        };
        job(&mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fvd_core::executor::block_on;

    #[test]
    fn runs_jobs_with_per_thread_state() {
        let w: Workers<Option<u32>> = Workers::new("test", 3);
        let futs: Vec<_> = (0..20u32)
            .map(|i| {
                w.run(move |s| {
                    let n = s.get_or_insert(0);
                    *n += 1;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    Ok(i)
                })
            })
            .collect();
        let got: Vec<u32> = futs.into_iter().map(|f| block_on(f).unwrap()).collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        let threads = w.shared.state.lock().unwrap().threads;
        assert!((1..=3).contains(&threads), "{threads}");
    }

    #[test]
    fn errors_come_back() {
        let w: Workers<()> = Workers::new("test", 1);
        let r: io::Result<()> = block_on(w.run(|_| Err(io::Error::other("boom"))));
        assert_eq!(r.unwrap_err().to_string(), "boom");
    }
}
