//! The last hour of the gateway's counters, which the dashboard's ratios and charts are drawn
//! from: [`History`] samples them every [`SAMPLE_EVERY`] (a task of the admin listener), so a
//! hit ratio over 1 m / 5 m / 1 h or a request rate is the difference of two samples, never a
//! scan.
//!
//! Each sample also keeps the client latency of its own interval (p50 and p99 of hits and of
//! misses, from `isrgate_request_duration_seconds`): the previous sample's buckets are kept to
//! subtract. Bucket snapshots are kept once a minute for the last few minutes too, so the
//! latency tiles cover about the last five minutes rather than the process's whole life.
//! An interval without a request has no ratio and no latency (`None`): the charts draw a gap,
//! not a 0 % hit ratio.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::requests::{BUCKETS, REQUEST_BOUNDS_US};
use crate::metrics::{CacheOutcome, Metrics};

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept (one hour).
const KEPT: usize = 720;
/// Latency window of the tiles, seconds.
pub const LATENCY_WINDOW_S: u64 = 300;
/// Minute snapshots kept (one more than the window needs).
const MINUTES_KEPT: usize = 7;

/// The cache outcomes the dashboard shows latency for, in [`Latencies`] order.
pub const TIMED: [CacheOutcome; 4] = [
    CacheOutcome::Hit,
    CacheOutcome::Stale,
    CacheOutcome::Miss,
    CacheOutcome::Bypass,
];

/// Request-duration buckets of each of [`TIMED`], cumulative since start (or, after
/// [`Latencies::since`], of an interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latencies([[u64; BUCKETS]; TIMED.len()]);

impl Default for Latencies {
    fn default() -> Self {
        Latencies([[0; BUCKETS]; TIMED.len()])
    }
}

impl Latencies {
    /// The counters now.
    pub fn now(m: &Metrics) -> Latencies {
        Latencies(TIMED.map(|o| m.request_duration.buckets_of(o)))
    }

    /// What was added between `old` and `self`.
    pub fn since(&self, old: &Latencies) -> Latencies {
        let mut d = *self;
        for (new, old) in d.0.iter_mut().zip(&old.0) {
            for (n, o) in new.iter_mut().zip(old) {
                *n = n.saturating_sub(*o);
            }
        }
        d
    }

    /// Requests of `outcome` counted.
    pub fn count(&self, outcome: CacheOutcome) -> u64 {
        self.of(outcome).iter().sum()
    }

    /// Quantile `q` of `outcome`'s durations, microseconds (a bucket's upper bound; `u64::MAX`
    /// past the last); `None` without a request.
    pub fn quantile_us(&self, outcome: CacheOutcome, q: f64) -> Option<u64> {
        crate::metrics::quantile(REQUEST_BOUNDS_US, self.of(outcome), q)
    }

    fn of(&self, outcome: CacheOutcome) -> &[u64] {
        TIMED
            .iter()
            .position(|o| *o == outcome)
            .and_then(|i| self.0.get(i))
            .map_or(&[], |b| b.as_slice())
    }
}

/// One sample of the counters the charts and ratios need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// UNIX seconds.
    pub at: u64,
    /// Requests answered.
    pub requests: u64,
    /// Fresh hits.
    pub hits: u64,
    /// Stale answers, any reason.
    pub stale: u64,
    /// Of those, served because replicas failed or timed out.
    pub stale_if_error: u64,
    /// Misses.
    pub misses: u64,
    /// Answers of 500 and above.
    pub errors_5xx: u64,
    /// Client latency over the interval this sample ends, microseconds: hit p50, hit p99,
    /// miss p50, miss p99 (`None`: no such request in it).
    pub latency_us: [Option<u64>; 4],
}

impl Sample {
    /// The counters now (no latency: that is a property of an interval).
    pub fn now(m: &Metrics) -> Sample {
        Sample {
            at: crate::clock::system_ms() / 1000,
            requests: m.requests.get(),
            hits: m.cache_hits.get(),
            stale: m.cache_stale.get(),
            stale_if_error: m.stale_origin_error.get() + m.stale_origin_timeout.get(),
            misses: m.cache_misses.get(),
            errors_5xx: m.request_duration.count_class(5),
            latency_us: [None; 4],
        }
    }

    /// Share of cache answers served from the cache (fresh or stale) between `old` and
    /// `self`; `None` without traffic.
    pub fn hit_ratio_since(&self, old: &Sample) -> Option<f64> {
        let served = self.hits.saturating_sub(old.hits) + self.stale.saturating_sub(old.stale);
        let all = served + self.misses.saturating_sub(old.misses);
        (all > 0).then(|| served as f64 / all as f64)
    }
}

/// What [`History`] holds.
#[derive(Debug, Default)]
struct Kept {
    samples: VecDeque<Sample>,
    /// The buckets at the last sample (the next interval's latency is the difference).
    last: Latencies,
    /// (UNIX seconds, buckets) about once a minute, newest last.
    minutes: VecDeque<(u64, Latencies)>,
}

/// The last hour of samples.
#[derive(Debug, Default)]
pub struct History {
    kept: Mutex<Kept>,
}

impl History {
    /// Records the counters now.
    pub fn sample(&self, m: &Metrics) {
        let mut sample = Sample::now(m);
        let latencies = Latencies::now(m);
        let mut kept = crate::sync::lock(&self.kept);
        let interval = latencies.since(&kept.last);
        sample.latency_us = [
            interval.quantile_us(CacheOutcome::Hit, 0.5),
            interval.quantile_us(CacheOutcome::Hit, 0.99),
            interval.quantile_us(CacheOutcome::Miss, 0.5),
            interval.quantile_us(CacheOutcome::Miss, 0.99),
        ];
        kept.last = latencies;
        if kept.samples.len() == KEPT {
            kept.samples.pop_front();
        }
        kept.samples.push_back(sample);
        let minute_passed = kept
            .minutes
            .back()
            .is_none_or(|(at, _)| sample.at >= at + 60);
        if minute_passed {
            if kept.minutes.len() == MINUTES_KEPT {
                kept.minutes.pop_front();
            }
            kept.minutes.push_back((sample.at, latencies));
        }
    }

    /// Samples the counters every [`SAMPLE_EVERY`] for the life of the process.
    pub fn start(self: &Arc<Self>, metrics: Arc<Metrics>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            loop {
                every.tick().await;
                me.sample(&metrics);
            }
        });
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let kept = crate::sync::lock(&self.kept);
        kept.samples.iter().copied().collect()
    }

    /// Request durations since about [`LATENCY_WINDOW_S`] ago (since start when the process
    /// is younger), and about how many seconds that is.
    pub fn recent_latencies(&self, m: &Metrics, now: u64) -> (Latencies, u64) {
        let kept = crate::sync::lock(&self.kept);
        let base = kept
            .minutes
            .iter()
            .rev()
            .find(|(at, _)| now.saturating_sub(*at) >= LATENCY_WINDOW_S)
            .copied()
            .unwrap_or_else(|| {
                let first = kept.minutes.front().map_or(now, |(at, _)| *at);
                (first, Latencies::default())
            });
        drop(kept);
        let (since, old) = base;
        (Latencies::now(m).since(&old), now.saturating_sub(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_ratio_counts_stale_answers_as_served_and_none_without_traffic() {
        let old = Sample::default();
        let new = Sample {
            hits: 6,
            stale: 2,
            stale_if_error: 1,
            misses: 2,
            ..Sample::default()
        };
        assert_eq!(new.hit_ratio_since(&old), Some(0.8));
        assert_eq!(new.hit_ratio_since(&new), None);
    }

    #[test]
    fn each_sample_has_the_latency_of_its_own_interval() {
        let m = Metrics::default();
        let history = History::default();
        m.answered(200, CacheOutcome::Hit, 0, Duration::from_micros(80));
        m.answered(200, CacheOutcome::Miss, 0, Duration::from_millis(40));
        history.sample(&m);
        history.sample(&m);
        m.answered(200, CacheOutcome::Hit, 0, Duration::from_millis(3));
        history.sample(&m);
        let samples = history.samples();
        assert_eq!(
            samples[0].latency_us,
            [Some(100), Some(100), Some(50_000), Some(50_000)]
        );
        assert_eq!(samples[1].latency_us, [None; 4], "nothing in that interval");
        assert_eq!(samples[2].latency_us[..2], [Some(5_000), Some(5_000)]);
        let (recent, _) = history.recent_latencies(&m, crate::clock::system_ms() / 1000);
        assert_eq!(
            recent.count(CacheOutcome::Hit),
            2,
            "the process is younger than the window"
        );
    }
}
