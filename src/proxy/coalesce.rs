//! Step 7 of the request flow: whose turn it is to fill a key, across the whole fleet.
//!
//! Receives a key that needs filling — a miss, a stale entry's background refresh, a re-warm
//! after a purge — and hands on a [`Turn`]: fill it (with a [`FillPermit`]), serve the entry
//! another fill just stored, fetch alone (the key's answers may not be shared), or nothing to do
//! (a refresh that found the key already being filled). The one flight per key lives in
//! `cache::flight`; this module decides, with the store, whether an entry already answers.
//!
//! - **Local single-flight**: the first request for a key on a gateway leads; later ones wait
//!   on its outcome, bounded by `coalesce.wait_timeout`, after which they fetch themselves. A
//!   leader that goes away wakes them with "abandoned" and the first takes over.
//! - **Fleet lock** (Redis only): the leader takes the key's fill lock before going upstream.
//!   A gateway that loses the race waits for the winner's bus message and re-reads the store
//!   every `coalesce.poll_interval` in case a message is lost; it takes the lock itself when
//!   the lock goes (the winner failed, or died and its lock expired). The winner re-reads the
//!   store first, so a fill that finished just before is not repeated.
//! - **Uncacheable answers**: waiting requests are released at once, and the key skips
//!   coalescing for `coalesce.hit_for_miss` on every gateway (Varnish's hit-for-miss).
//! - **Redis unavailable**: a lock call that fails means local single-flight only; a request
//!   never waits on Redis.

use std::sync::Arc;

use http::HeaderMap;
use tokio::time::Instant;

use super::lookup::{self, Found};
use crate::app::{AppState, CacheState};
use crate::cache::entry::Entry;
use crate::cache::flight::{Done, FillPermit, Joined, LockAttempt};
use crate::cache::key::CacheKey;
use crate::cache::store::RedisStore;
use crate::metrics::Metrics;

/// Whether a request waits for a fill in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait for it, bounded (a miss; a re-warm, which must not skip a render that may have
    /// started before its purge).
    Follow,
    /// Do not: someone is already filling (a background refresh).
    Skip,
}

/// Whose turn it is.
#[derive(Debug)]
pub enum Turn {
    /// Fill it, holding the permit (`None`: without coalescing — it is off, the key is in its
    /// hit-for-miss period, or the wait for another fill ran out).
    Fill(Option<FillPermit>),
    /// Another fill stored this entry meanwhile: serve it.
    Filled(Arc<Entry>),
    /// Another fill found the answer not storable: fetch alone.
    Pass,
    /// Being filled elsewhere and the caller does not wait ([`Wait::Skip`]).
    Busy,
    /// The fill this request waited for rendered for other values of the headers the answer
    /// varies on: the request's answer belongs to this `Vary` slot; take a turn there (so the
    /// requests with the same values share one render).
    Elsewhere(CacheKey),
}

/// Decides whose turn it is to fill `key` for a request with `vary_view` (the headers its
/// `Vary` is matched on). `seen` is the render time of the entry the caller's lookup found
/// (stale, or kept for stale-if-error; 0 for none): a fill that landed after it is served
/// instead of filling again.
pub async fn turn(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    vary_view: &HeaderMap,
    wait: Wait,
    seen: u64,
) -> Turn {
    let flights = &cache.flights;
    let cfg = flights.cfg();
    if wait == Wait::Follow && (!cfg.enabled || flights.is_pass(key.hash)) {
        if cfg.enabled {
            app.metrics.hit_for_miss.inc();
        }
        return Turn::Fill(None);
    }
    let deadline = Instant::now() + cfg.wait_timeout;
    loop {
        let follower = match (flights.join(key.hash), wait) {
            (Joined::Lead(permit), _) => {
                let lead = Lead {
                    wait,
                    deadline,
                    seen,
                };
                return lead.run(app, cache, key, vary_view, permit).await;
            }
            (Joined::Follow(_), Wait::Skip) => return Turn::Busy,
            (Joined::Follow(f), Wait::Follow) => f,
        };
        let started = Instant::now();
        let Ok(done) = tokio::time::timeout_at(deadline, follower.done()).await else {
            app.metrics.follower_timeouts.inc();
            return Turn::Fill(None);
        };
        match done {
            // The leader's entry answers this request only if it varies the same way (the
            // flight is per key, `Vary` beyond the key is per request) and no purge since its
            // render made it stale.
            Done::Filled(entry) if usable(cache, &entry, vary_view) => {
                app.metrics.coalesced_local.inc();
                observe_wait(&app.metrics, started);
                return Turn::Filled(entry);
            }
            Done::Filled(entry) => {
                return match lookup::slot_for(key, &entry, vary_view) {
                    Some(slot) => Turn::Elsewhere(slot),
                    None => Turn::Fill(None),
                };
            }
            Done::Pass => return Turn::Pass,
            // Take over: the first to join again leads.
            Done::Abandoned => continue,
        }
    }
}

/// [`turn`] for a miss that already leads the key's flight (its lookup took the permit, and
/// maybe the fleet lock with it: [`lookup::lookup_to_fill`]).
pub async fn turn_led(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    vary_view: &HeaderMap,
    seen: u64,
    permit: FillPermit,
) -> Turn {
    let lead = Lead {
        wait: Wait::Follow,
        deadline: Instant::now() + cache.flights.cfg().wait_timeout,
        seen,
    };
    lead.run(app, cache, key, vary_view, permit).await
}

/// This gateway's leader of a key's flight.
struct Lead {
    wait: Wait,
    deadline: Instant,
    seen: u64,
}

impl Lead {
    /// Serves what a fill that just ended stored, or wins the fleet lock, or waits for the
    /// gateway holding it.
    async fn run(
        self,
        app: &AppState,
        cache: &Arc<CacheState>,
        key: &CacheKey,
        vary_view: &HeaderMap,
        permit: FillPermit,
    ) -> Turn {
        // A fill that ended between this request's lookup and its join left its entry in the L1
        // or the in-process store (with Redis, the fleet lock's check covers the rest). Only a
        // render newer than the one the caller saw counts: a caller that asks to replace a
        // fresh entry (a page refresh bringing HTML and RSC back to one render) gets its turn.
        let ended = match cache.shared() {
            None => reread(app, cache, key, vary_view).await,
            Some(_) => cache
                .l1
                .get(key.hash, cache.clock.now_ms())
                .filter(|e| usable(cache, e, vary_view) && fresh(cache, e)),
        }
        .filter(|e| e.meta.stored_at_ms > self.seen);
        if let Some(entry) = ended {
            return filled(app, permit, entry, false).await;
        }
        // This worker's own connections when it has them: the lock is on the miss's path, and the
        // shared pool's connections live on the control thread (a hop there and back per command).
        let Some(shared) = app.shared(cache) else {
            return Turn::Fill(Some(permit));
        };
        let redis = shared.redis().clone();
        self.fleet(app, cache, key, vary_view, permit, &redis).await
    }

    /// Takes the key's fleet lock, or waits (bus messages, bounded polls) for the gateway that
    /// holds it. The lock is taken only while no render newer than the one the lookup saw is
    /// stored (one round trip, no re-read after it); once a re-read found such a render
    /// unusable here (another `Vary`, a purge), it is taken whatever is stored, and re-read
    /// after.
    async fn fleet(
        self,
        app: &AppState,
        cache: &CacheState,
        key: &CacheKey,
        vary_view: &HeaderMap,
        mut permit: FillPermit,
        redis: &RedisStore,
    ) -> Turn {
        let hex = key.hex();
        // Registered before the first attempt, so no message slips between a lost race and the
        // wait.
        let notify = permit.listen();
        let started = Instant::now();
        let mut contended = false;
        let mut unless_newer_than = Some(self.seen);
        loop {
            match permit.lock_fleet(redis, &hex, unless_newer_than).await {
                Ok(LockAttempt::Held) if unless_newer_than.is_some() => {
                    return Turn::Fill(Some(permit));
                }
                Ok(LockAttempt::Held) => {
                    // Whoever held it before may have just stored the entry.
                    return match reread(app, cache, key, vary_view).await {
                        Some(entry) => filled(app, permit, entry, true).await,
                        None => Turn::Fill(Some(permit)),
                    };
                }
                Ok(LockAttempt::Newer) => {
                    if let Some(entry) = reread(app, cache, key, vary_view).await {
                        return filled(app, permit, entry, true).await;
                    }
                    unless_newer_than = None;
                    continue;
                }
                Ok(LockAttempt::Contended) if self.wait == Wait::Skip => {
                    permit.release().await;
                    return Turn::Busy;
                }
                Ok(LockAttempt::Contended) => {}
                Err(e) => {
                    app.metrics.lock_fallbacks.inc();
                    tracing::debug!(error = %e, "fill lock unavailable; coalescing on this gateway only");
                    return Turn::Fill(Some(permit));
                }
            }
            if !contended {
                contended = true;
                app.metrics.lock_contended.inc();
            }
            let waited = wait_fleet(app, cache, key, vary_view, &notify, self.deadline).await;
            if let Some(waited) = waited {
                observe_wait(&app.metrics, started);
                return after_wait(app, permit, waited).await;
            }
        }
    }
}

/// The leader's turn after the gateway holding the fleet lock ended (or the wait did).
async fn after_wait(app: &AppState, permit: FillPermit, waited: Waited) -> Turn {
    match waited {
        Waited::Entry(entry) => filled(app, permit, entry, true).await,
        Waited::Pass => {
            permit.wake(Done::Pass);
            permit.release().await;
            Turn::Pass
        }
        Waited::TimedOut => {
            app.metrics.follower_timeouts.inc();
            Turn::Fill(Some(permit))
        }
    }
}

/// What a wait for another gateway's fill saw.
enum Waited {
    Entry(Arc<Entry>),
    Pass,
    TimedOut,
}

/// Waits one poll interval (or a bus message) for the gateway holding the fleet lock; `None`
/// when nothing happened yet and the lock should be tried again.
async fn wait_fleet(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    vary_view: &HeaderMap,
    notify: &tokio::sync::Notify,
    deadline: Instant,
) -> Option<Waited> {
    let poll = cache
        .flights
        .cfg()
        .poll_interval
        .min(deadline.saturating_duration_since(Instant::now()));
    let _ = tokio::time::timeout(poll, notify.notified()).await;
    if cache.flights.is_pass(key.hash) {
        return Some(Waited::Pass);
    }
    if let Some(entry) = reread(app, cache, key, vary_view).await {
        return Some(Waited::Entry(entry));
    }
    (Instant::now() >= deadline).then_some(Waited::TimedOut)
}

/// Serves an entry another fill stored, as the leader: this gateway's followers get it too.
async fn filled(app: &AppState, permit: FillPermit, entry: Arc<Entry>, remote: bool) -> Turn {
    if remote {
        app.metrics.coalesced_remote.inc();
    } else {
        app.metrics.coalesced_local.inc();
    }
    permit.wake(Done::Filled(Arc::clone(&entry)));
    permit.release().await;
    Turn::Filled(entry)
}

/// Whether a fill's entry can answer a request with `vary_view`: same `Vary` values, and
/// still valid under the invalidations known now.
fn usable(cache: &CacheState, entry: &Entry, vary_view: &HeaderMap) -> bool {
    lookup::vary_matches(entry, vary_view)
        && cache.epochs.check(
            entry.meta.render_epoch,
            entry.meta.tags.iter().map(String::as_str),
        ) == crate::cache::epochs::Validity::Valid
}

fn fresh(cache: &CacheState, entry: &Entry) -> bool {
    entry.meta.fresh_until_ms > cache.clock.now_ms()
}

/// A fresh entry in the store for this key, if a fill stored one meanwhile (a stale one is
/// what this fill is replacing).
pub(super) async fn reread(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    vary_view: &HeaderMap,
) -> Option<Arc<Entry>> {
    match lookup::lookup(app, cache, key, vary_view, cache.clock.now_ms())
        .await
        .found
    {
        Found::Fresh { entry, .. } => Some(entry),
        Found::Stale(_) | Found::StaleIfError(_) | Found::Miss(_) => None,
    }
}

fn observe_wait(metrics: &Metrics, since: Instant) {
    let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
    metrics.follower_wait_ms.observe(ms);
}
