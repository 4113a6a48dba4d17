//! The gateway's counters and histograms, and the one table that declares them.
//!
//! The hot path pays one relaxed add per event: each [`Counter`] is spread over a few
//! cache-line-sized slots with a slot per thread, so workers counting the same outcome do not
//! move one shared word between their cores on every hit. Every family is declared once, in
//! [`table`] (name, HELP, fields, labels, place in `/api/stats`); `/metrics`
//! (`admin::prometheus`, in the classic text format or OpenMetrics) and `/api/stats`
//! (`admin::stats`) are generated from [`Metrics::families`] at read time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

pub mod errors;
pub mod family;
pub mod requests;
pub mod routes;
pub mod table;

pub use family::{Family, Kind, Series, Value};
pub use requests::CacheOutcome;
pub use table::Metrics;

/// Slots a counter is spread over (threads beyond this share them, still correctly).
const SLOTS: usize = 4;

/// One slot, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot(AtomicU64);

/// This thread's slot: threads take slots in the order they first count something.
fn slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Relaxed) % SLOTS;
    }
    SLOT.with(|s| *s)
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter([Slot; SLOTS]);

impl Counter {
    /// Adds one to `counters[index]` when it exists (per-reason arrays; never panics).
    pub fn inc_at(counters: &[Counter], index: usize) {
        if let Some(c) = counters.get(index) {
            c.inc();
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0[slot()].0.fetch_add(n, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Relaxed)))
    }
}

/// Counts per path, bounded: when full, the least-counted path gives way (space-saving), so
/// the heavy hitters survive. Only misses and renders write them, never a hit.
#[derive(Debug, Default)]
pub struct TopPaths {
    counts: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Paths tracked at most.
pub const TOP_PATHS_KEPT: usize = 512;

impl TopPaths {
    /// Counts one more for `path`.
    pub fn record(&self, path: &str) {
        let mut counts = crate::sync::lock(&self.counts);
        if let Some(n) = counts.get_mut(path) {
            *n += 1;
            return;
        }
        let mut start = 0;
        if counts.len() >= TOP_PATHS_KEPT {
            if let Some((victim, n)) = counts
                .iter()
                .min_by_key(|(_, n)| **n)
                .map(|(k, n)| (k.clone(), *n))
            {
                counts.remove(&victim);
                start = n;
            }
        }
        counts.insert(path.to_owned(), start + 1);
    }

    /// The `n` most counted paths, most first.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let counts = crate::sync::lock(&self.counts);
        let mut all: Vec<(String, u64)> = counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// A histogram with fixed bucket bounds (Prometheus `le` semantics: a value counts in the
/// first bucket whose bound is not below it; the last bucket is `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    unit: Unit,
    buckets: Box<[Counter]>,
    sum: Counter,
}

/// The unit a histogram records in (exposed in seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Milliseconds.
    Millis,
    /// Microseconds.
    Micros,
}

impl Unit {
    fn per_second(self) -> f64 {
        match self {
            Unit::Millis => 1e3,
            Unit::Micros => 1e6,
        }
    }
}

/// Bucket bounds of waits, milliseconds.
pub const WAIT_BOUNDS_MS: &[u64] = &[1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(WAIT_BOUNDS_MS, Unit::Millis)
    }
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending, in `unit`) plus `+Inf`.
    pub fn new(bounds: &'static [u64], unit: Unit) -> Histogram {
        Histogram {
            bounds,
            unit,
            buckets: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum: Counter::default(),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        Counter::inc_at(&self.buckets, i);
        self.sum.add(value);
    }

    /// `(bound, count in that bucket)` pairs, `None` for `+Inf`, and the sum of values.
    pub fn snapshot(&self) -> (Vec<(Option<u64>, u64)>, u64) {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, c)| (self.bounds.get(i).copied(), c.get()))
            .collect();
        (buckets, self.sum.get())
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(Counter::get).sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1): an over-estimate by at
    /// most one bucket; `None` with no values, `Some(u64::MAX)` past the last bound.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(Counter::get).collect();
        quantile(self.bounds, &counts, q)
    }

    /// The bucket bounds (without `+Inf`).
    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }

    /// Its value for the exposition: cumulative buckets and sum, in seconds.
    pub fn value(&self) -> Value {
        let per_second = self.unit.per_second();
        let (buckets, sum) = self.snapshot();
        let mut seen = 0;
        let buckets = buckets
            .into_iter()
            .map(|(bound, n)| {
                seen += n;
                (bound.map_or(f64::INFINITY, |b| b as f64 / per_second), seen)
            })
            .collect();
        Value::Histogram {
            buckets,
            sum: sum as f64 / per_second,
        }
    }
}

/// The upper bound of the bucket holding quantile `q` (0..=1) of `counts` (per bucket, not
/// cumulative; one more than `bounds`, the last `+Inf`): an over-estimate by at most one
/// bucket; `None` with no values, `Some(u64::MAX)` past the last bound.
pub fn quantile(bounds: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bounds.get(i).copied().unwrap_or(u64::MAX));
        }
    }
    Some(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn histogram_buckets_follow_le_semantics() {
        let h = super::Histogram::new(&[10, 100], super::Unit::Millis);
        for v in [0, 10, 11, 100, 101, 5_000] {
            h.observe(v);
        }
        let (buckets, sum) = h.snapshot();
        assert_eq!(buckets, vec![(Some(10), 2), (Some(100), 2), (None, 2)]);
        assert_eq!(sum, 5_222);
        assert_eq!(h.count(), 6);
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let h = super::Histogram::new(&[10, 100], super::Unit::Millis);
        assert_eq!(h.quantile(0.5), None);
        for v in [1, 2, 3, 50] {
            h.observe(v);
        }
        assert_eq!(h.quantile(0.5), Some(10));
        assert_eq!(h.quantile(0.99), Some(100));
        h.observe(1_000);
        assert_eq!(h.quantile(1.0), Some(u64::MAX));
    }
}
