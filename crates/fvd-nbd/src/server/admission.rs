//! Which connections the server lets in, and when.
//!
//! Two limits, so that clients which never speak cannot lock out those that
//! do:
//! * **negotiating** — a connection is greeted as soon as it is accepted and
//!   then has [`super::ServerConfig::handshake_timeout`] to finish the
//!   option haggling. At most [`super::ServerConfig::max_handshakes`]
//!   negotiate at once; when one more arrives, the connection that has been
//!   negotiating longest is dropped (a well-behaved client takes
//!   milliseconds, so the one dropped is idle). Negotiating connections do
//!   not count against `max_clients`;
//! * **transmission** — [`super::ServerConfig::max_clients`] (`--shared`)
//!   connections serve requests at once; one more that finished its
//!   handshake waits for a slot before its requests are read (as clients
//!   past qemu-nbd's `--shared` wait in its listen backlog).
//!
//! [`Connections`] counts every connection, for `--once` and for the drain
//! at shutdown.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

/// Connections negotiating now, oldest first, each with the sender that
/// drops it.
pub(crate) struct Handshakes {
    limit: usize,
    queue: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    next: AtomicU64,
}

/// A negotiating connection's place; leaving it (drop) frees the place.
pub(crate) struct Ticket {
    owner: Arc<Handshakes>,
    id: u64,
}

impl Handshakes {
    /// At most `limit` connections negotiating at once (at least 1).
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            limit: limit.max(1),
            queue: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, oneshot::Sender<()>)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admit a new connection to negotiation, dropping the oldest one when
    /// the limit is reached. The receiver completes if this one is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> (Ticket, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut q = self.lock();
        while q.len() >= self.limit {
            match q.pop_front() {
                Some((_, evict)) => {
                    let _ = evict.send(());
                }
                None => break,
            }
        }
        q.push_back((id, tx));
        drop(q);
        (
            Ticket {
                owner: self.clone(),
                id,
            },
            rx,
        )
    }

    /// Connections negotiating now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let id = self.id;
        self.owner.lock().retain(|(i, _)| *i != id);
    }
}

/// Every open connection, counted; wakes waiters when none is left.
#[derive(Default)]
pub(crate) struct Connections {
    open: AtomicUsize,
    none_left: Notify,
}

impl Connections {
    /// A connection was accepted.
    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
    }

    /// A connection ended; true if it was the last one.
    pub(crate) fn closed(&self) -> bool {
        let last = self.open.fetch_sub(1, Ordering::AcqRel) == 1;
        if last {
            self.none_left.notify_waiters();
        }
        last
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Wait until no connection is open.
    pub(crate) async fn all_closed(&self) {
        loop {
            let notified = self.none_left.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_negotiation_is_dropped_at_the_limit() {
        let h = Handshakes::new(2);
        let (t1, mut r1) = h.enter();
        let (_t2, mut r2) = h.enter();
        assert!(r1.try_recv().is_err() && r2.try_recv().is_err());
        let (_t3, _r3) = h.enter();
        assert!(r1.try_recv().is_ok(), "the oldest is dropped");
        assert!(r2.try_recv().is_err());
        assert_eq!(h.len(), 2);
        drop(t1);
        assert_eq!(h.len(), 2, "an evicted ticket frees nothing twice");
    }
}
