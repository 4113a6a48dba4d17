//! The client request-duration histogram, `isrgate_request_duration_seconds{status,outcome}`:
//! one histogram per status class and cache outcome, all made at start, so recording a request
//! is two index computations, a bucket search and two relaxed adds: no label is formatted or
//! looked up, nothing is allocated. Recorded where the access line is written
//! (`logging::access`, and the hit lane for the requests it answers), whether or not the log
//! is on.

use std::borrow::Cow;
use std::time::Duration;

use super::family::{Expose, Kind, Labels, Series};
use super::{Histogram, Unit};

/// Bucket bounds of client request durations, microseconds: 50 µs to 10 s, so a hit (tens to
/// hundreds of microseconds) lands in a bucket of its own, not in the first of a millisecond
/// histogram.
pub const REQUEST_BOUNDS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Buckets of a request-duration histogram, `+Inf` included.
pub const BUCKETS: usize = REQUEST_BOUNDS_US.len() + 1;

/// What the cache did for a request, as the `outcome` label says it (the `x-cache` the client
/// got: `HIT`, `STALE`, `MISS`, `BYPASS`; `none` without one: the cache is off, or the request
/// was refused or failed before the cache answered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Fresh from the cache.
    Hit,
    /// Stale from the cache, for any reason (`isrgate_stale_served_total` says which).
    Stale,
    /// Went to a replica (or waited for another request's render).
    Miss,
    /// Not a cache candidate.
    Bypass,
    /// No cache outcome.
    None,
}

impl CacheOutcome {
    /// Every outcome, in index order.
    pub const ALL: [CacheOutcome; 5] = [
        CacheOutcome::Hit,
        CacheOutcome::Stale,
        CacheOutcome::Miss,
        CacheOutcome::Bypass,
        CacheOutcome::None,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Stale => "stale",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypass => "bypass",
            CacheOutcome::None => "none",
        }
    }

    /// The outcome an `x-cache` value says (`None` for anything else).
    pub fn of_x_cache(value: &[u8]) -> CacheOutcome {
        match value {
            b"HIT" => CacheOutcome::Hit,
            b"STALE" => CacheOutcome::Stale,
            b"MISS" => CacheOutcome::Miss,
            b"BYPASS" => CacheOutcome::Bypass,
            _ => CacheOutcome::None,
        }
    }
}

/// Status classes, `1xx` to `5xx` (a status outside 100..=599 counts in the nearest).
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The request-duration histograms, one per (status class, outcome).
#[derive(Debug)]
pub struct RequestDurations {
    by: Box<[Histogram]>,
}

impl Default for RequestDurations {
    fn default() -> Self {
        let n = STATUS_CLASSES.len() * CacheOutcome::ALL.len();
        RequestDurations {
            by: (0..n)
                .map(|_| Histogram::new(REQUEST_BOUNDS_US, Unit::Micros))
                .collect(),
        }
    }
}

impl RequestDurations {
    /// Records one request answered with `status` and `outcome` that took `elapsed`.
    pub fn observe(&self, status: u16, outcome: CacheOutcome, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, STATUS_CLASSES.len()) - 1;
        let i = class * CacheOutcome::ALL.len() + outcome as usize;
        if let Some(h) = self.by.get(i) {
            h.observe(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// Requests answered with a status of `class` (1 to 5: `5xx` is 5), whatever the outcome.
    pub fn count_class(&self, class: u16) -> u64 {
        let Some(i) = usize::from(class).checked_sub(1) else {
            return 0;
        };
        let n = CacheOutcome::ALL.len();
        self.by
            .get(i * n..(i + 1) * n)
            .map_or(0, |hs| hs.iter().map(Histogram::count).sum())
    }

    /// The requests of `outcome`, whatever their status, per bucket of
    /// [`REQUEST_BOUNDS_US`] (the last `+Inf`): the dashboard's latency by cache outcome.
    pub fn buckets_of(&self, outcome: CacheOutcome) -> [u64; BUCKETS] {
        let mut sum = [0; BUCKETS];
        for class in 0..STATUS_CLASSES.len() {
            let Some(h) = self
                .by
                .get(class * CacheOutcome::ALL.len() + outcome as usize)
            else {
                continue;
            };
            let (buckets, _) = h.snapshot();
            for (total, (_, n)) in sum.iter_mut().zip(buckets) {
                *total += n;
            }
        }
        sum
    }

    /// The histogram of one (status class, outcome), for tests.
    pub fn of(&self, status: u16, outcome: CacheOutcome) -> &Histogram {
        let class = usize::from(status / 100).clamp(1, STATUS_CLASSES.len()) - 1;
        &self.by[class * CacheOutcome::ALL.len() + outcome as usize]
    }
}

impl Expose for RequestDurations {
    const KIND: Kind = Kind::Histogram;
    /// Only the series that saw a request: 25 mostly empty histograms would be noise.
    fn expose(&self, _: Labels, _: Option<&'static str>, out: &mut Vec<Series>) {
        for (class_index, class) in STATUS_CLASSES.iter().enumerate() {
            for outcome in CacheOutcome::ALL {
                let h = &self.by[class_index * CacheOutcome::ALL.len() + outcome as usize];
                if h.count() == 0 {
                    continue;
                }
                out.push(Series {
                    labels: vec![
                        ("status", Cow::Borrowed(*class)),
                        ("outcome", Cow::Borrowed(outcome.as_str())),
                    ],
                    value: h.value(),
                    json: None,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_lands_in_its_class_outcome_and_bucket() {
        let d = RequestDurations::default();
        d.observe(200, CacheOutcome::Hit, Duration::from_micros(80));
        d.observe(304, CacheOutcome::Hit, Duration::from_millis(3));
        d.observe(502, CacheOutcome::None, Duration::from_secs(60));
        let (buckets, sum) = d.of(200, CacheOutcome::Hit).snapshot();
        assert_eq!(buckets[0], (Some(50), 0));
        assert_eq!(buckets[1], (Some(100), 1), "80 µs: the 100 µs bucket");
        assert_eq!(sum, 80);
        assert_eq!(d.of(301, CacheOutcome::Hit).quantile(1.0), Some(5_000));
        assert_eq!(d.of(599, CacheOutcome::None).quantile(1.0), Some(u64::MAX));
        assert_eq!(d.of(200, CacheOutcome::Miss).count(), 0);
        let mut series = Vec::new();
        d.expose(Labels::None, None, &mut series);
        assert_eq!(series.len(), 3, "only series that saw a request");
        d.observe(500, CacheOutcome::Hit, Duration::from_micros(80));
        let hits = d.buckets_of(CacheOutcome::Hit);
        assert_eq!((hits[1], hits[6], hits.iter().sum::<u64>()), (2, 1, 3));
    }

    #[test]
    fn x_cache_values_name_outcomes() {
        assert_eq!(CacheOutcome::of_x_cache(b"HIT"), CacheOutcome::Hit);
        assert_eq!(CacheOutcome::of_x_cache(b"STALE"), CacheOutcome::Stale);
        assert_eq!(CacheOutcome::of_x_cache(b"hit"), CacheOutcome::None);
    }
}
