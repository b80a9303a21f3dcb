//! A latency histogram of fixed buckets kept in atomic counters, so that the
//! I/O path records into it without a lock and a metrics endpoint reads it
//! at any time (Prometheus' classic histogram: per-bucket counts, sum and
//! count).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the buckets, in seconds: 50 us to 10 s, about three per
/// decade, which spans a page-cache hit on a local base, a LAN round trip
/// and a slow object store (the last bucket, +Inf, is implicit).
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Counts of observed durations per bucket of [`LATENCY_BOUNDS`].
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// One counter per bound, then one for larger values.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A consistent-enough copy of a [`LatencyHistogram`] (each counter read
/// once; a concurrent observation may show in `count` but not yet in its
/// bucket, which scrapers tolerate).
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// `(upper bound in seconds, observations in this bucket alone)`; the
    /// last entry has the bound `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl LatencyHistogram {
    /// Record one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(b, c)| (b, c.load(Ordering::Relaxed)))
            .collect();
        LatencySnapshot {
            buckets,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// One operation in flight: counted in `in_flight` until dropped (also when
/// the operation's future is cancelled), and timed into `histogram` if any.
pub struct InFlight<'a> {
    in_flight: &'a AtomicU64,
    timed: Option<(&'a LatencyHistogram, Instant)>,
}

impl<'a> InFlight<'a> {
    /// Count one more operation in `in_flight`, timed into `histogram`.
    pub fn start(in_flight: &'a AtomicU64, histogram: Option<&'a LatencyHistogram>) -> Self {
        in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            in_flight,
            timed: histogram.map(|h| (h, Instant::now())),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some((h, t0)) = self.timed {
            h.observe(t0.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_bucket_of_their_upper_bound() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(10)); // <= 50 us
        h.observe(Duration::from_micros(50)); // == 50 us: bounds are inclusive
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(s.buckets[0], (0.000_05, 2));
        assert_eq!(s.buckets[6], (0.005, 1));
        assert_eq!(*s.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert!(
            (s.sum_seconds - 60.003_06).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }

    #[test]
    fn in_flight_counts_until_dropped_and_times_once() {
        let (n, h) = (AtomicU64::new(0), LatencyHistogram::default());
        let a = InFlight::start(&n, Some(&h));
        let b = InFlight::start(&n, None);
        assert_eq!(n.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(n.load(Ordering::Relaxed), 1);
        assert_eq!(h.snapshot().count, 1);
        drop(b);
        assert_eq!(n.load(Ordering::Relaxed), 0);
        assert_eq!(h.snapshot().count, 1, "an untimed operation adds no sample");
    }
}
