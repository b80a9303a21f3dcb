//! The tokio runtime the remote clients (NBD, HTTP(S), S3) run on.
//!
//! Bases are read from many places: the NBD server's tokio runtime, the
//! FUSE export's threads and the CLI through fvd-core's `block_on`, which
//! is no tokio runtime at all. So the clients do not run on the caller's
//! executor: one small runtime (two worker threads, started at the first
//! use and kept for the life of the process) owns every connection, and
//! [`spawn`] hands back a future that is only the receiving end of a
//! channel, which completes under any executor.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

/// Worker threads of the runtime: enough to overlap TLS and copying with
/// waiting on two cores.
const WORKERS: usize = 2;

/// The runtime (started at the first call).
pub(crate) fn handle() -> io::Result<Handle> {
    static RT: OnceLock<Result<Runtime, String>> = OnceLock::new();
    match RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("fvd-remote-io")
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the remote I/O runtime: {e}"))
    }) {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(msg) => Err(io::Error::other(msg.clone())),
    }
}

/// Run `fut` on the remote I/O runtime. The returned future waits on a
/// channel, so any executor can poll it; dropping it cancels the task.
pub(crate) fn spawn<T, F>(fut: F) -> Spawned<T>
where
    T: Send + 'static,
    F: Future<Output = io::Result<T>> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    match handle() {
        Ok(h) => {
            let task = h.spawn(async move {
                let _ = tx.send(fut.await);
            });
            Spawned {
                rx,
                abort: Some(task.abort_handle()),
            }
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            Spawned { rx, abort: None }
        }
    }
}

/// The result of a task on the remote I/O runtime (see [`spawn`]).
pub(crate) struct Spawned<T> {
    rx: oneshot::Receiver<io::Result<T>>,
    abort: Option<AbortHandle>,
}

impl<T> Future for Spawned<T> {
    type Output = io::Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.abort = None;
                Poll::Ready(r.unwrap_or_else(|_| {
                    Err(io::Error::other(
                        "the remote I/O task ended before completing the request",
                    ))
                }))
            }
        }
    }
}

impl<T> Drop for Spawned<T> {
    fn drop(&mut self) {
        if let Some(a) = self.abort.take() {
            a.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn completes_under_a_foreign_executor() {
        let r = fvd_core::executor::block_on(spawn(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(7)
        }));
        assert_eq!(r.unwrap(), 7);
        let e = fvd_core::executor::block_on(spawn::<(), _>(async { Err(io::Error::other("x")) }));
        assert_eq!(e.unwrap_err().to_string(), "x");
    }

    #[test]
    fn dropping_cancels() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        struct Flag(std::sync::mpsc::Sender<()>);
        impl Drop for Flag {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let f = spawn(async move {
            let _flag = Flag(tx);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(f);
        // Either the flag dropped, or the task never started and dropped
        // the sender with it: both mean the task is gone.
        let r = rx.recv_timeout(Duration::from_secs(5));
        assert!(
            !matches!(r, Err(std::sync::mpsc::RecvTimeoutError::Timeout)),
            "the task still runs"
        );
    }
}
