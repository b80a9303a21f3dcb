//! Block-range locks that serialise copy-on-write (and, later, copy-on-read
//! fills) against other writes to the same blocks.
//!
//! Only requests that touch blocks not yet committed to the image take a
//! lock; writes to local blocks run unlocked, as they would on a raw file.
//! A guard releases its range when dropped, so a failing request cannot
//! leave a range locked.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

struct Held {
    id: u64,
    start: u64,
    end: u64,
    released: Arc<Notify>,
}

/// A set of locked block ranges.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<(Vec<Held>, u64)>,
}

/// Holds `[start, end)` until dropped.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Lock blocks `[start, end)`, waiting for overlapping holders.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let wait_on = {
                let mut g = self.held.lock().unwrap_or_else(|p| p.into_inner());
                match g.0.iter().find(|h| h.start < end && start < h.end) {
                    Some(h) => h.released.clone(),
                    None => {
                        g.1 += 1;
                        let id = g.1;
                        g.0.push(Held {
                            id,
                            start,
                            end,
                            released: Arc::new(Notify::new()),
                        });
                        return RangeGuard { locks: self, id };
                    }
                }
            };
            // The holder calls notify_waiters() after removing itself, under the
            // mutex we just released; register before re-checking to not miss it.
            let notified = wait_on.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let still_held = {
                let g = self.held.lock().unwrap_or_else(|p| p.into_inner());
                g.0.iter().any(|h| Arc::ptr_eq(&h.released, &wait_on))
            };
            if still_held {
                notified.await;
            }
        }
    }

    /// Number of ranges currently held (for tests and stats).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = g.0.iter().position(|h| h.id == self.id) {
            let h = g.0.swap_remove(pos);
            h.released.notify_waiters();
        }
    }
}
