//! Latency histograms for `/metrics`: fixed buckets of atomic counters, so recording costs a
//! few atomic adds and never a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: from a cached read (a millisecond) to a decision
/// waiting behind a peer's batch (seconds).
pub const BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram (Prometheus's cumulative buckets are summed when written).
#[derive(Default, Debug)]
pub struct Histogram {
    /// Observations in each bucket alone (at most its bound, above the one before).
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(bucket) = BUCKETS_S.iter().position(|bound| seconds <= *bound) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The cumulative counts of each bucket (`le` its bound), then of all (`le="+Inf"`), and
    /// the sum of the observations in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut running = 0;
        let buckets = BUCKETS_S
            .iter()
            .zip(&self.buckets)
            .map(|(bound, count)| {
                running += count.load(Ordering::Relaxed);
                (*bound, running)
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, count, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_slowest_count_only_in_the_total() {
        let histogram = Histogram::default();
        for ms in [0, 3, 3, 40, 20_000] {
            histogram.observe(Duration::from_millis(ms));
        }
        let (buckets, count, sum) = histogram.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 20.046).abs() < 1e-9, "{sum}");
        let at = |bound: f64| buckets.iter().find(|(b, _)| *b == bound).unwrap().1;
        assert_eq!(at(0.001), 1);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(0.05), 4);
        assert_eq!(at(10.0), 4, "20 s is above every bound");
    }
}
