//! The prefetch clock of `fvd serve` and `fvd prefetch`: sleeps on tokio's
//! timers, where [`ThreadClock`] would start an OS thread per sleep.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use fvd_core::executor::{Clock, ThreadClock};

/// Real time whose sleeps are tokio timers; must be used inside a tokio
/// runtime with the time driver on.
#[derive(Default)]
pub struct TokioClock {
    /// Start time and random numbers.
    base: ThreadClock,
}

impl Clock for TokioClock {
    fn now(&self) -> Duration {
        self.base.now()
    }

    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(tokio::time::sleep(d))
    }

    fn random(&self) -> u64 {
        self.base.random()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sleeps_are_tokio_timers() {
        // With tokio's clock paused, a sleep on an OS thread would take the
        // full second of real time; a tokio timer completes at once as the
        // runtime advances its virtual time.
        let clock = TokioClock::default();
        let t = std::time::Instant::now();
        clock.sleep(Duration::from_secs(1)).await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}
