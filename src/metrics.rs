//! Counters for every outcome, kept in one place. Relaxed atomics, each counter spread over a
//! few cache-line-sized slots with a slot per thread: the hot path pays one uncontended add per
//! event even when every worker counts the same outcome (one shared word would move between
//! the workers' cores on every hit). The Prometheus exposition reads these (admin listener).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::cache::policy::Skip;
use crate::proxy::classify::Bypass;

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

/// Every counter of the gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered (any status), including refused ones.
    pub requests: Counter,
    /// Requests proxied to a replica that answered.
    pub proxied: Counter,
    /// WebSocket (Upgrade) tunnels opened.
    pub tunnels: Counter,
    /// Requests refused by sanitizing (internal or ambiguous path, CONNECT).
    pub rejected: Counter,
    /// Requests whose body failed while streaming (client went away).
    pub client_body_errors: Counter,
    /// Connections cut because the client did not read a response in time.
    pub send_timeouts: Counter,
    /// Requests refused with 413.
    pub body_too_large: Counter,
    /// Requests shed with 503 at the concurrency limit.
    pub shed: Counter,
    /// Answered 502: no replica could be reached.
    pub upstream_unreachable: Counter,
    /// Answered 504: a replica did not answer in time.
    pub upstream_timeouts: Counter,
    /// Answered 502: the exchange failed after connecting.
    pub upstream_errors: Counter,
    /// Retries on another replica after a connect failure.
    pub upstream_retries: Counter,
    /// Build assets one build did not have, answered by another build's replica.
    pub asset_fallbacks: Counter,
    /// Server actions another build did not know, answered by the build that did.
    pub action_fallbacks: Counter,
    /// Fills not stored: the replica answered for another build than the request's.
    pub fills_other_build: Counter,
    /// Passive ejections of replicas.
    pub replica_ejections: Counter,
    /// Connections closed for a slow request head.
    pub header_timeouts: Counter,
    /// Connections closed idle.
    pub idle_closes: Counter,
    /// Answered from the cache, fresh (L1 or store).
    pub cache_hits: Counter,
    /// Of those, answered from the L1 without a store read.
    pub cache_l1_hits: Counter,
    /// Hits whose body the hit lane sent with `sendfile` (a sealed body).
    pub cache_sendfile_hits: Counter,
    /// Lookups that did not read the store because invalidations were still being loaded.
    pub cache_unsynced_misses: Counter,
    /// Answered stale while a background refresh runs.
    pub cache_stale: Counter,
    /// Answered stale because every replica failed (stale-if-error).
    pub cache_stale_if_error: Counter,
    /// Cacheable requests that went upstream (no usable entry).
    pub cache_misses: Counter,
    /// Requests that bypassed the cache (method, draft mode, Authorization, …).
    pub cache_bypass: Counter,
    /// The same, per reason, indexed by `proxy::classify::Bypass as usize`.
    pub cache_bypass_by: [Counter; Bypass::ALL.len()],
    /// Upstream answers to cacheable requests that were not stored (private, Set-Cookie, …).
    pub cache_not_stored: Counter,
    /// The same, per reason, indexed by `cache::policy::Skip as usize`; answers over
    /// `max_entry_bytes` or without any stale window count only in the total.
    pub cache_not_stored_by: [Counter; Skip::ALL.len()],
    /// Entries stored.
    pub cache_stores: Counter,
    /// Store reads or writes that failed or timed out (the request went on without them).
    pub store_errors: Counter,
    /// Stored bytes that did not decode (treated as a miss and overwritten).
    pub store_corrupt: Counter,
    /// Background refreshes started.
    pub refreshes: Counter,
    /// Background refreshes not started because another gateway holds the key's fill lock.
    pub refreshes_elsewhere: Counter,
    /// Fills replacing an entry that got a copy from the replica's own cache instead of a
    /// render (`x-nextjs-cache: STALE`, or `HIT` where a regeneration was asked): not stored.
    pub fills_not_rendered: Counter,
    /// Fills not kept because a later render of the key was already held (never back in time).
    pub fills_older: Counter,
    /// Other variants of a page stored from the render a refresh or re-warm just made.
    pub fills_siblings: Counter,
    /// L1 entries written to the store again after their first write failed (Redis was down).
    pub store_write_backs: Counter,
    /// Requests answered with their stale-if-error entry because the replica took longer than
    /// `cache.stale_if_error_wait` (the render went on in the background).
    pub stale_if_error_waits: Counter,
    /// `Vary` slots dropped because their URL had `cache.max_variants` more recently filled.
    pub cache_variants_dropped: Counter,
    /// Misses served from another request's render on this gateway (local single-flight).
    pub coalesced_local: Counter,
    /// Misses served from another gateway's render (lost the fleet lock race and waited).
    pub coalesced_remote: Counter,
    /// Fleet lock attempts that found the lock held by another gateway.
    pub lock_contended: Counter,
    /// Leaders that ended without an answer (dropped, failed mid-body): a follower took over.
    pub leaders_abandoned: Counter,
    /// Fills that went ahead without the fleet lock because Redis did not answer.
    pub lock_fallbacks: Counter,
    /// Followers that stopped waiting at `coalesce.wait_timeout` and fetched themselves.
    pub follower_timeouts: Counter,
    /// Misses fetched at once because the key was recently uncacheable (hit-for-miss).
    pub hit_for_miss: Counter,
    /// How long followers waited for a render (local and remote), milliseconds.
    pub follower_wait_ms: Histogram,
    /// Webhook calls applied.
    pub invalidations: Counter,
    /// Webhook calls refused (401, 400, 413, 422).
    pub webhook_refused: Counter,
    /// Lookups that found an entry invalidated since its render (served stale or missed).
    pub cache_invalidated: Counter,
    /// Paths that missed most (the dashboard's "top missed").
    pub missed_paths: TopPaths,
    /// Revalidate calls to Next.js replicas that succeeded.
    pub fanout_ok: Counter,
    /// Revalidate calls to Next.js replicas that failed after their retries.
    pub fanout_failed: Counter,
}

/// Counts per path, bounded: when full, the least-counted path gives way (space-saving), so
/// the heavy hitters survive. Only the miss path writes it.
#[derive(Debug, Default)]
pub struct TopPaths {
    counts: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// Paths tracked at most.
pub const TOP_PATHS_KEPT: usize = 512;

impl TopPaths {
    /// Counts one more for `path`.
    pub fn record(&self, path: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
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
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
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
    buckets: Box<[Counter]>,
    sum: Counter,
}

/// Bucket bounds of waits, milliseconds.
pub const WAIT_BOUNDS_MS: &[u64] = &[1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(WAIT_BOUNDS_MS)
    }
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending) plus `+Inf`.
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
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
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c.get();
            if seen >= rank {
                return Some(self.bounds.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }

    /// The bucket bounds (without `+Inf`).
    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn histogram_buckets_follow_le_semantics() {
        let h = super::Histogram::new(&[10, 100]);
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
        let h = super::Histogram::new(&[10, 100]);
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
