//! The in-process L1 in front of the shared store (DESIGN.md request flow step 5).
//!
//! Receives decoded entries after a store read or a fill; hands back `Arc<Entry>` so a hit
//! copies no body (STYLE rule 8). Bounded by bytes (each entry's [`Entry::footprint`]: both
//! bodies, metadata, prepared heads), not by count. An L1 copy never outlives its freshness: it
//! expires at the entry's `fresh_until`, and [`L1::get`] refuses anything past it, so staleness
//! is always decided from the shared store, the same way on every gateway. It can be disabled ("strict mode": every hit reads the store).
//!
//! Invalidation of L1 copies (another gateway filled the key, a purge, a reconnect that may have
//! missed messages) goes through [`L1::remove`] and [`L1::clear`]; the bus that calls them is a
//! later stage.
//!
//! What the process holds besides the entries (requests in flight, what the allocator keeps)
//! is the memory governor's (`cache::governor`): it makes new entries weigh more than their
//! footprint ([`L1::set_scale`]), so the L1 settles at `max_bytes / scale`, and sheds entries at
//! once when it raises the scale ([`L1::shed_to`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::entry::Entry;

/// What the L1 holds per key: the entry, how long it stays fresh, and the generation it was
/// inserted under.
type Held = (Arc<Entry>, Duration, u64);

struct UntilFresh;

impl moka::Expiry<u128, Held> for UntilFresh {
    fn expire_after_create(
        &self,
        _key: &u128,
        value: &Held,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.1)
    }

    fn expire_after_update(
        &self,
        _key: &u128,
        value: &Held,
        _updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

/// The L1 cache; `Clone` shares it.
#[derive(Clone)]
pub struct L1 {
    cache: Option<moka::sync::Cache<u128, Held>>,
    /// Bumped by [`L1::clear`]: entries of an older generation are never returned. moka's own
    /// `invalidate_all` is lazy and timestamp-based; a flush after a bus reconnect must be
    /// exact.
    generation: Arc<AtomicU64>,
    /// Keys whose entry this L1 holds but the store write failed (Redis down): written again
    /// on a later hit, once the store answers (`proxy::fill::write_back`).
    unstored: Arc<Unstored>,
    /// Bytes inserted since the cache last ran its upkeep (see [`L1::insert`]).
    unkept: Arc<AtomicU64>,
    /// Past this many [`L1::unkept`] bytes an insert runs the upkeep itself.
    keep_every: u64,
    /// Woken with each of those upkeeps: the memory governor looks at the process then, not
    /// only on its tick (a burst of 300 KB fills takes in the whole bound in a fraction of one).
    took_in: Arc<tokio::sync::Notify>,
    /// What a new entry weighs per byte of footprint, in [`SCALE_ONE`]ths (see
    /// [`L1::set_scale`]).
    scale: Arc<AtomicU32>,
}

/// [`L1::scale`] 1.0: an entry weighs its footprint.
const SCALE_ONE: u32 = 1024;

/// What an entry of `footprint` bytes weighs at `scale` ([`SCALE_ONE`]ths).
fn weight(footprint: usize, scale: u32) -> u32 {
    let w = (footprint as u64).saturating_mul(u64::from(scale)) / u64::from(SCALE_ONE);
    u32::try_from(w).unwrap_or(u32::MAX)
}

/// Share of the capacity that may be inserted before an insert runs the upkeep: the most the
/// L1 overshoots its bound between two upkeeps.
const OVERSHOOT_DIVISOR: u64 = 32;

/// Most keys remembered as unstored; past it, the oldest failures are simply not retried
/// (their entries still serve here, and refill when they expire).
const MAX_UNSTORED: usize = 10_000;

#[derive(Default)]
struct Unstored {
    /// `keys.len()`, read without the lock on every hit.
    count: std::sync::atomic::AtomicUsize,
    keys: std::sync::Mutex<std::collections::HashSet<u128>>,
}

impl Unstored {
    fn keys(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u128>> {
        crate::sync::lock(&self.keys)
    }

    fn mark(&self, key: u128) {
        let mut keys = self.keys();
        if keys.len() < MAX_UNSTORED && keys.insert(key) {
            self.count.store(keys.len(), Ordering::Release);
        }
    }

    fn take(&self, key: u128) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut keys = self.keys();
        let taken = keys.remove(&key);
        self.count.store(keys.len(), Ordering::Release);
        taken
    }

    fn clear(&self) {
        self.keys().clear();
        self.count.store(0, Ordering::Release);
    }
}

impl std::fmt::Debug for L1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cache {
            Some(c) => f
                .debug_struct("L1")
                .field("entries", &c.entry_count())
                .field("bytes", &c.weighted_size())
                .finish(),
            None => f.write_str("L1(disabled)"),
        }
    }
}

impl L1 {
    /// An L1 holding at most `max_bytes`; `0` disables it.
    pub fn new(max_bytes: u64) -> L1 {
        let generation = Arc::new(AtomicU64::new(0));
        let scale = Arc::new(AtomicU32::new(SCALE_ONE));
        if max_bytes == 0 {
            return L1 {
                cache: None,
                generation,
                unstored: Arc::default(),
                unkept: Arc::default(),
                keep_every: u64::MAX,
                took_in: Arc::default(),
                scale,
            };
        }
        let weigh = Arc::clone(&scale);
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            // What an entry really holds, metadata and prepared heads included: the bound is on
            // memory, not on body bytes. Scaled up while the process needs the room.
            .weigher(move |_k: &u128, v: &Held| {
                weight(v.0.footprint(), weigh.load(Ordering::Relaxed))
            })
            .expire_after(UntilFresh)
            .build();
        L1 {
            cache: Some(cache),
            generation,
            unstored: Arc::default(),
            unkept: Arc::default(),
            keep_every: (max_bytes / OVERSHOOT_DIVISOR).max(1),
            took_in: Arc::default(),
            scale,
        }
    }

    /// The bound the L1 was built with, bytes (0: disabled).
    pub fn max_bytes(&self) -> u64 {
        self.cache
            .as_ref()
            .and_then(|c| c.policy().max_capacity())
            .unwrap_or(0)
    }

    /// How much more than its footprint each entry inserted from now on weighs (at least 1).
    /// The L1's capacity is fixed, so at `scale` it holds `max_bytes / scale` bytes once its
    /// entries have turned over; [`L1::shed_to`] makes room at once.
    pub fn set_scale(&self, scale: f64) {
        let fixed = (scale.max(1.0) * f64::from(SCALE_ONE)).min(f64::from(u32::MAX));
        self.scale.store(fixed as u32, Ordering::Relaxed);
    }

    /// The current scale (see [`L1::set_scale`]).
    pub fn scale(&self) -> f64 {
        f64::from(self.scale.load(Ordering::Relaxed)) / f64::from(SCALE_ONE)
    }

    /// Resolves once the L1 has taken in another `max_bytes / 32` bytes since this was last
    /// awaited (at once if it already has).
    pub async fn took_in(&self) {
        self.took_in.notified().await;
    }

    /// Drops entries until those held account for at most `keep` bytes of footprint; returns
    /// the bytes dropped. Which entries go is the map's order (by key hash: as good as random
    /// for recency): this is the memory governor's way out when entries turn over too slowly
    /// (moka admits a new entry only if it is asked for more often than what it would
    /// replace, so a scan of new pages replaces few), not the eviction policy.
    pub fn shed_to(&self, keep: u64) -> u64 {
        let Some(cache) = &self.cache else { return 0 };
        cache.run_pending_tasks();
        let held: u64 = cache.iter().map(|(_, v)| v.0.footprint() as u64).sum();
        let mut excess = held.saturating_sub(keep);
        let goal = excess;
        for (key, v) in cache.iter() {
            if excess == 0 {
                break;
            }
            cache.invalidate(&*key);
            excess = excess.saturating_sub(v.0.footprint() as u64);
        }
        cache.run_pending_tasks();
        goal - excess
    }

    /// Whether the L1 is in use.
    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The entry for `key` if it is held and still fresh at `now_ms`.
    pub fn get(&self, key: u128, now_ms: u64) -> Option<Arc<Entry>> {
        let (entry, _, generation) = self.cache.as_ref()?.get(&key)?;
        let current = self.generation.load(Ordering::Acquire);
        (generation == current && now_ms < entry.meta.fresh_until_ms).then_some(entry)
    }

    /// Holds `entry` until its freshness ends; an entry already stale at `now_ms` is not held.
    ///
    /// moka applies inserts and evicts only when its upkeep runs, which it schedules by the
    /// number of operations, not their weight: a burst of 300 KB fills overshot a 64 MiB bound
    /// by tens of MiB (issue 15). So every `capacity / 32` bytes inserted, the inserting
    /// request runs the upkeep itself (it is a miss, already paying for a render) and wakes
    /// the memory governor ([`L1::took_in`]).
    pub fn insert(&self, key: u128, entry: Arc<Entry>, now_ms: u64) {
        let Some(cache) = &self.cache else { return };
        let fresh_for = entry.meta.fresh_until_ms.saturating_sub(now_ms);
        if fresh_for == 0 {
            cache.invalidate(&key);
            return;
        }
        let bytes = entry.footprint() as u64;
        let generation = self.generation.load(Ordering::Acquire);
        cache.insert(key, (entry, Duration::from_millis(fresh_for), generation));
        let unkept = self.unkept.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if unkept >= self.keep_every && self.unkept.swap(0, Ordering::AcqRel) > 0 {
            cache.run_pending_tasks();
            self.took_in.notify_one();
        }
    }

    /// Drops `key` (another gateway replaced it, or it was purged).
    pub fn remove(&self, key: u128) {
        if let Some(c) = &self.cache {
            c.invalidate(&key);
        }
        self.unstored.take(key);
    }

    /// Remembers that the store write of `key`'s entry failed (only while this L1 holds it).
    pub fn mark_unstored(&self, key: u128) {
        if self.cache.is_some() {
            self.unstored.mark(key);
        }
    }

    /// Whether `key`'s entry still has to be written to the store; forgotten by this call (the
    /// caller writes it, or marks it again). One atomic load when nothing is pending.
    pub fn take_unstored(&self, key: u128) -> bool {
        self.unstored.take(key)
    }

    /// Drops everything (after a reconnect that may have missed invalidations): from this
    /// call on, nothing inserted before it is returned.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(c) = &self.cache {
            c.invalidate_all();
        }
        self.unstored.clear();
    }

    /// Runs the L1's upkeep every `every` until `stop`: moka drops evicted and expired
    /// entries only when its upkeep runs, which traffic triggers; without it, what the last
    /// burst evicted (sealed bodies included) would stay in memory until the next requests.
    pub fn maintain_every(&self, every: Duration, stop: &tokio_util::sync::CancellationToken) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => cache.run_pending_tasks(),
                }
            }
        });
    }

    /// `(entries, bytes)` held, for the dashboard.
    pub fn size(&self) -> (u64, u64) {
        self.cache.as_ref().map_or((0, 0), |c| {
            c.run_pending_tasks();
            (c.entry_count(), c.weighted_size())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::Meta;

    fn entry(fresh_until_ms: u64, body_len: usize) -> Arc<Entry> {
        let meta = Meta {
            status: 200,
            headers: Vec::new(),
            render_epoch: 0,
            stored_at_ms: 0,
            fresh_until_ms,
            stale_until_ms: fresh_until_ms + 60_000,
            stale_if_error_until_ms: fresh_until_ms + 60_000,
            tags: Vec::new(),
            etag: String::new(),
            identity_len: 0,
            filled_by: String::new(),
        };
        let body: Vec<u8> = (0..body_len).map(|i| (i * 7919 % 251) as u8).collect();
        Arc::new(Entry::from_identity(meta, &body))
    }

    #[test]
    fn hit_shares_the_entry_and_refuses_stale() {
        let l1 = L1::new(1 << 20);
        let e = entry(10_000, 100);
        l1.insert(1, Arc::clone(&e), 1_000);
        let got = l1.get(1, 2_000).expect("fresh hit");
        assert!(Arc::ptr_eq(&got, &e), "no copy on a hit");
        assert!(l1.get(1, 10_000).is_none(), "never served past fresh_until");
        assert!(l1.get(2, 2_000).is_none());
    }

    #[test]
    fn already_stale_entries_are_not_held_and_replace_older_copies() {
        let l1 = L1::new(1 << 20);
        l1.insert(1, entry(10_000, 10), 1_000);
        l1.insert(1, entry(5_000, 10), 6_000);
        assert!(l1.get(1, 6_001).is_none());
    }

    #[test]
    fn a_burst_of_large_fills_never_holds_much_past_the_bound() {
        let cap = 4 << 20;
        let l1 = L1::new(cap);
        let one = entry(10_000, 300 << 10).footprint() as u64;
        for key in 0..200 {
            l1.insert(key, entry(10_000, 300 << 10), 0);
        }
        // What the map really holds, upkeep or not (no `run_pending_tasks` here).
        let cache = l1.cache.as_ref().expect("enabled");
        let held: u64 = cache.iter().map(|(_, v)| v.0.footprint() as u64).sum();
        assert!(
            held <= cap + cap / OVERSHOOT_DIVISOR + one,
            "{held} bytes held for a {cap}-byte bound"
        );
    }

    #[tokio::test]
    async fn taking_in_a_32nd_of_the_bound_wakes_whoever_waits_for_it() {
        let l1 = L1::new(1 << 20);
        let early = tokio::time::timeout(Duration::from_millis(20), l1.took_in()).await;
        assert!(early.is_err(), "nothing taken in yet");
        for key in 0..4 {
            l1.insert(key, entry(u64::MAX / 2, 16 << 10), 0);
        }
        tokio::time::timeout(Duration::from_secs(5), l1.took_in())
            .await
            .expect("woken: 64 KiB taken in, past 1 MiB / 32");
    }

    #[test]
    fn remove_clear_and_disabled() {
        let l1 = L1::new(1 << 20);
        l1.insert(1, entry(10_000, 10), 0);
        l1.insert(2, entry(10_000, 10), 0);
        l1.remove(1);
        assert!(l1.get(1, 1).is_none());
        assert!(l1.get(2, 1).is_some());
        l1.clear();
        assert!(l1.get(2, 1).is_none());
        let off = L1::new(0);
        assert!(!off.enabled());
        off.insert(1, entry(10_000, 10), 0);
        assert!(off.get(1, 1).is_none());
    }

    #[test]
    fn unstored_keys_are_taken_once_and_forgotten_with_their_entry() {
        let l1 = L1::new(1 << 20);
        assert!(!l1.take_unstored(1), "nothing pending");
        l1.mark_unstored(1);
        l1.mark_unstored(2);
        assert!(l1.take_unstored(1));
        assert!(
            !l1.take_unstored(1),
            "taken once: the taker writes it or marks it again"
        );
        l1.remove(2);
        assert!(
            !l1.take_unstored(2),
            "an entry gone from the L1 has nothing to write back"
        );
        l1.mark_unstored(3);
        l1.clear();
        assert!(!l1.take_unstored(3));
        let off = L1::new(0);
        off.mark_unstored(1);
        assert!(
            !off.take_unstored(1),
            "strict mode holds no entry to write back"
        );
    }

    #[test]
    fn bounded_by_bytes() {
        let l1 = L1::new(64 * 1024);
        for k in 0..100u128 {
            l1.insert(k, entry(u64::MAX / 2, 8 * 1024), 0);
        }
        let (count, bytes) = l1.size();
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(count < 100);
    }
}
