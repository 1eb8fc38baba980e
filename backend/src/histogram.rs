//! A latency histogram kept in atomics: an observation on the serving path is two relaxed
//! atomic adds (`prometheus-client`'s own histogram takes a lock per observation). Requests
//! record into one ([`crate::metrics::Metrics`]), the blob store its lock waits into another;
//! [`crate::metrics`] renders both. A module of its own, so that the store, which the metrics
//! read, does not depend on them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (inclusive, in nanoseconds) of the latency histograms' buckets: 25 us to 1 s.
/// A served request costs tens of microseconds; a lock wait is bounded by `--lock-wait-ms`
/// (default 100 ms).
const BOUNDS_NS: [u64; 14] = [
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// A latency histogram: one atomic per bucket (not cumulative; summed when rendered).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

/// A consistent-enough copy of a [`Histogram`]: cumulative counts per bound, then `+Inf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound in ns, observations <= bound)`, ascending; the last bound is `u64::MAX`
    /// for `+Inf`.
    pub cumulative: Vec<(u64, u64)>,
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    /// All observations (the `+Inf` bucket).
    pub fn count(&self) -> u64 {
        self.cumulative.last().map_or(0, |(_, n)| *n)
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let at = BOUNDS_NS.partition_point(|b| *b < ns);
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Reads the buckets.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = BOUNDS_NS
            .iter()
            .copied()
            .chain([u64::MAX])
            .zip(&self.buckets)
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(25)); // exactly on the first bound
        h.observe(Duration::from_nanos(25_001)); // just above it
        h.observe(Duration::from_secs(5)); // past the last bound
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], (25_000, 1));
        assert_eq!(s.cumulative[1], (50_000, 2));
        assert_eq!(s.cumulative[BOUNDS_NS.len() - 1], (1_000_000_000, 2));
        assert_eq!(s.cumulative[BOUNDS_NS.len()], (u64::MAX, 3));
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_ns, 25_000 + 25_001 + 5_000_000_000);
    }
}
