//! Who fills a key: one fill at a time per key on this gateway (local single-flight) and, with
//! Redis, in the whole fleet (the key's fill lock, `cache::lock`). A miss, a background
//! refresh, a re-warm and a webhook's re-render all ask here, so they share one flight per key.
//!
//! The right to fill is a [`FillPermit`], an RAII value modelled on pingora-cache's
//! `WritePermit` (`lock.rs`): it covers the local flight and, once taken, the fleet lock (kept
//! alive by a tracked extender task while the render runs). [`FillPermit::wake`] tells the
//! requests waiting on this gateway how the fill ended; [`FillPermit::release`] gives the
//! fleet lock back. A permit dropped before either (its request cancelled, a panic, an early
//! return) wakes its followers with [`Done::Abandoned`] — the first of them fills instead — and
//! releases the fleet lock from a tracked task, so nobody waits for it to expire.
//!
//! Waiting never polls locally: followers wait on the flight's `watch` channel. Waiting for
//! another gateway's fill is driven by bus messages ([`Flights::notify`]), registered per key
//! while a permit holder listens ([`FillPermit::listen`]); the caller re-reads the store on a
//! bounded interval only in case a message was lost.
//!
//! Nothing here goes upstream or reads entries: deciding whether an entry already answers is
//! the caller's (`proxy::coalesce`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::task::TaskTracker;

use super::entry::Entry;
use super::lock::{LockToken, Locked};
use super::policy::StaleReason;
use super::store::{RedisStore, StoreError};
use crate::config;
use crate::metrics::Metrics;
use crate::sync::lock;

/// How a fill ended, as the requests waiting on it see it.
#[derive(Debug, Clone)]
pub enum Done {
    /// Stored: serve this.
    Filled(Arc<Entry>),
    /// Not stored (uncacheable, too large, a server error): fetch for yourselves.
    Pass,
    /// The filler went away without an answer: one of you fills instead.
    Abandoned,
}

type Flight = watch::Sender<Option<Done>>;

/// How long a key's refresh failure is remembered without a store (an origin down longer
/// counts one stale answer per key as stale-while-revalidate again, then learns).
const FAILURE_KEPT: Duration = Duration::from_secs(3_600);

/// The flights of one gateway process (shared by its workers).
pub struct Flights {
    cfg: arc_swap::ArcSwap<config::Coalesce>,
    local: Mutex<HashMap<u128, Arc<Flight>>>,
    listeners: Mutex<HashMap<u128, Arc<Notify>>>,
    passes: Option<moka::sync::Cache<u128, ()>>,
    /// Keys whose last background refresh failed at the origin, and how: their stale answers
    /// count under that reason until an entry is stored for them (here or, through the bus,
    /// on another gateway).
    failing: moka::sync::Cache<u128, StaleReason>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Flights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flights").field("cfg", &self.cfg).finish()
    }
}

/// What joining a key's flight gave.
pub enum Joined {
    /// This request fills the key.
    Lead(FillPermit),
    /// Another request on this gateway fills it: wait for it.
    Follow(Follower),
}

/// A request waiting for another request's fill on this gateway.
pub struct Follower(watch::Receiver<Option<Done>>);

impl Follower {
    /// How the fill ended (a flight that ends without a word was abandoned).
    pub async fn done(mut self) -> Done {
        match self.0.wait_for(Option::is_some).await {
            Ok(d) => d.clone().unwrap_or(Done::Abandoned),
            Err(_) => Done::Abandoned,
        }
    }
}

impl Flights {
    /// No flights yet. `tasks` tracks the lock extenders and releases (shutdown waits for them).
    pub fn new(cfg: config::Coalesce, metrics: Arc<Metrics>, tasks: TaskTracker) -> Flights {
        let passes = (!cfg.hit_for_miss.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.hit_for_miss)
                .build()
        });
        Flights {
            cfg: arc_swap::ArcSwap::from_pointee(cfg),
            local: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            passes,
            failing: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_KEPT)
                .build(),
            metrics,
            tasks,
        }
    }

    /// The `[coalesce]` settings now.
    pub fn cfg(&self) -> config::Coalesce {
        **self.cfg.load()
    }

    /// Replaces the `[coalesce]` settings (a reload; `hit_for_miss` is fixed at start).
    pub fn set_cfg(&self, cfg: config::Coalesce) {
        self.cfg.store(Arc::new(cfg));
    }

    /// Leads the key's flight, or follows the one in progress.
    pub fn join(self: &Arc<Self>, hash: u128) -> Joined {
        let mut local = lock(&self.local);
        if let Some(flight) = local.get(&hash) {
            return Joined::Follow(Follower(flight.subscribe()));
        }
        Joined::Lead(self.lead(&mut local, hash))
    }

    /// Leads the key's flight if none is in progress (a refresh does not queue behind a fill).
    pub fn try_lead(self: &Arc<Self>, hash: u128) -> Option<FillPermit> {
        let mut local = lock(&self.local);
        (!local.contains_key(&hash)).then(|| self.lead(&mut local, hash))
    }

    fn lead(self: &Arc<Self>, local: &mut HashMap<u128, Arc<Flight>>, hash: u128) -> FillPermit {
        let flight = Arc::new(watch::Sender::new(None));
        local.insert(hash, Arc::clone(&flight));
        FillPermit {
            flights: Arc::clone(self),
            hash,
            flight,
            woken: AtomicBool::new(false),
            fleet: None,
            listening: None,
        }
    }

    /// How many requests on this gateway wait for the key's flight in progress (0 for none).
    pub fn followers(&self, hash: u128) -> usize {
        lock(&self.local)
            .get(&hash)
            .map_or(0, |flight| flight.receiver_count())
    }

    /// Another gateway said something about the key (bus): wake this gateway's listener.
    pub fn notify(&self, hash: u128) {
        let listener = lock(&self.listeners).get(&hash).cloned();
        if let Some(n) = listener {
            // A stored permit: a wake-up between two waits is not lost.
            n.notify_one();
        }
    }

    /// The key's answer may not be stored: for `coalesce.hit_for_miss`, misses fetch for
    /// themselves instead of queueing behind a fill whose answer they cannot share.
    pub fn remember_pass(&self, hash: u128) {
        if let Some(p) = &self.passes {
            p.insert(hash, ());
        }
    }

    /// An entry was stored for the key: it is cacheable again, and its origin answered.
    pub fn stored(&self, hash: u128) {
        if let Some(p) = &self.passes {
            p.invalidate(&hash);
        }
        self.failing.invalidate(&hash);
    }

    /// A background refresh of the key failed at the origin, for `reason`.
    pub fn refresh_failed(&self, hash: u128, reason: StaleReason) {
        self.failing.insert(hash, reason);
    }

    /// Why a stale answer for the key is served now: what its last refresh met, else
    /// stale-while-revalidate.
    pub fn stale_reason(&self, hash: u128) -> StaleReason {
        self.failing.get(&hash).unwrap_or(StaleReason::Swr)
    }

    /// Whether the key is in its hit-for-miss period.
    pub fn is_pass(&self, hash: u128) -> bool {
        self.passes.as_ref().is_some_and(|p| p.contains_key(&hash))
    }
}

/// The right to fill one key (see the module doc). Not `Clone`: one holder.
pub struct FillPermit {
    flights: Arc<Flights>,
    hash: u128,
    flight: Arc<Flight>,
    woken: AtomicBool,
    fleet: Option<FleetLock>,
    listening: Option<Arc<Notify>>,
}

impl std::fmt::Debug for FillPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillPermit")
            .field("hash", &format_args!("{:032x}", self.hash))
            .field("fleet", &self.fleet.is_some())
            .finish()
    }
}

/// What taking the fleet lock gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockAttempt {
    /// Held (and extended while the permit lives).
    Held,
    /// Another gateway holds it: it is filling the key.
    Contended,
    /// Not taken: the store holds a render newer than the one the caller saw (a fill landed
    /// since its lookup).
    Newer,
}

impl FillPermit {
    /// The key's hash.
    pub fn hash(&self) -> u128 {
        self.hash
    }

    /// Whether this permit holds the key's fleet lock.
    pub fn holds_fleet_lock(&self) -> bool {
        self.fleet.is_some()
    }

    /// Takes the key's fleet lock (`key_hex`) for `coalesce.lock_ttl`, extended every third of
    /// it while the permit lives; with `unless_newer_than`, only if the store holds no render of
    /// the key newer than that (the caller's lookup saw that one; 0 for none). An error means
    /// Redis did not answer in time: fill with local single-flight only.
    pub async fn lock_fleet(
        &mut self,
        redis: &RedisStore,
        key_hex: &str,
        unless_newer_than: Option<u64>,
    ) -> Result<LockAttempt, StoreError> {
        if self.fleet.is_some() {
            return Ok(LockAttempt::Held);
        }
        let ttl = self.flights.cfg().lock_ttl;
        let held = match unless_newer_than {
            Some(seen) => match redis.try_lock_unless_newer(key_hex, ttl, seen).await? {
                Locked::Held(held) => held,
                Locked::Contended => return Ok(LockAttempt::Contended),
                Locked::Newer => return Ok(LockAttempt::Newer),
            },
            None => match redis.try_lock(key_hex, ttl).await? {
                Some(held) => held,
                None => return Ok(LockAttempt::Contended),
            },
        };
        self.hold_fleet(redis, held, key_hex);
        Ok(LockAttempt::Held)
    }

    /// Keeps the key's fleet lock, taken by the caller for `coalesce.lock_ttl` (a cold miss's
    /// read-or-lock), on a permit that holds none yet: extended while the permit lives, released
    /// with it.
    pub fn hold_fleet(&mut self, redis: &RedisStore, held: LockToken, key_hex: &str) {
        let ttl = self.flights.cfg().lock_ttl;
        let extender =
            self.flights
                .tasks
                .spawn(extend(redis.clone(), held.clone(), ttl, key_hex.to_owned()));
        debug_assert!(self.fleet.is_none(), "one fleet lock per permit");
        self.fleet = Some(FleetLock {
            redis: redis.clone(),
            held,
            extender,
        });
    }

    /// Registers for bus messages about this key (unregistered when the permit goes): waits
    /// for another gateway's fill are woken by [`Flights::notify`].
    pub fn listen(&mut self) -> Arc<Notify> {
        if let Some(n) = &self.listening {
            return Arc::clone(n);
        }
        let n = Arc::clone(lock(&self.flights.listeners).entry(self.hash).or_default());
        self.listening = Some(Arc::clone(&n));
        n
    }

    /// Tells the requests waiting on this gateway how the fill ended (once; later calls do
    /// nothing). New requests for the key start a new flight from here on.
    pub fn wake(&self, done: Done) {
        if self.woken.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut local = lock(&self.flights.local);
            if local
                .get(&self.hash)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                local.remove(&self.hash);
            }
        }
        self.flight.send_replace(Some(done));
    }

    /// Gives the fleet lock back (after [`FillPermit::wake`]; a permit never woken wakes its
    /// followers with [`Done::Abandoned`] first). A release that fails is counted; the lock
    /// expires by itself.
    pub async fn release(mut self) {
        self.wake(Done::Abandoned);
        if let Some(fleet) = self.fleet.take() {
            fleet.extender.abort();
            if let Err(e) = fleet.redis.unlock(&fleet.held).await {
                self.flights.metrics.store_errors.inc();
                tracing::debug!(error = %e, "fill lock release failed; it expires by itself");
            }
        }
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        if !self.woken.load(Ordering::Acquire) {
            self.flights.metrics.leaders_abandoned.inc();
            self.wake(Done::Abandoned);
        }
        if let Some(n) = self.listening.take() {
            let mut listeners = lock(&self.flights.listeners);
            if listeners
                .get(&self.hash)
                .is_some_and(|l| Arc::ptr_eq(l, &n))
            {
                listeners.remove(&self.hash);
            }
        }
        if let Some(fleet) = self.fleet.take() {
            fleet.extender.abort();
            // Released from a task of its own: the successor need not wait for the TTL.
            if tokio::runtime::Handle::try_current().is_ok() {
                self.flights.tasks.spawn(async move {
                    let _ = fleet.redis.unlock(&fleet.held).await;
                });
            }
        }
    }
}

/// A held fleet lock and the task keeping it alive.
struct FleetLock {
    redis: RedisStore,
    held: LockToken,
    extender: tokio::task::JoinHandle<()>,
}

/// Extends `held` every third of `ttl` until aborted or lost.
async fn extend(redis: RedisStore, held: LockToken, ttl: Duration, key_hex: String) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        match redis.extend_lock(&held, ttl).await {
            Ok(true) | Err(_) => {}
            Ok(false) => {
                tracing::warn!(key = %key_hex, "fill lock lost during a long render; another gateway may render too");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flights() -> Arc<Flights> {
        let cfg = crate::config::Config::defaults()
            .cache
            .expect("cache on by default")
            .coalesce;
        Arc::new(Flights::new(
            cfg,
            Arc::new(Metrics::default()),
            TaskTracker::new(),
        ))
    }

    #[tokio::test]
    async fn one_leader_per_key_and_followers_get_its_outcome() {
        let f = flights();
        let Joined::Lead(permit) = f.join(7) else {
            panic!("first joiner leads")
        };
        let Joined::Follow(follower) = f.join(7) else {
            panic!("second joiner follows")
        };
        assert!(
            f.try_lead(7).is_none(),
            "a refresh does not queue behind a fill"
        );
        assert!(
            matches!(f.join(8), Joined::Lead(_)),
            "other keys are independent"
        );
        permit.wake(Done::Pass);
        assert!(matches!(follower.done().await, Done::Pass));
        assert!(
            f.try_lead(7).is_some(),
            "woken: the next request starts a new flight"
        );
        permit.release().await;
    }

    #[tokio::test]
    async fn a_dropped_permit_abandons_its_flight() {
        let f = flights();
        let Joined::Lead(permit) = f.join(1) else {
            panic!("leads")
        };
        let Joined::Follow(follower) = f.join(1) else {
            panic!("follows")
        };
        drop(permit);
        assert!(matches!(follower.done().await, Done::Abandoned));
        assert_eq!(f.metrics.leaders_abandoned.get(), 1);
        assert!(
            matches!(f.join(1), Joined::Lead(_)),
            "a follower takes over"
        );
    }

    #[tokio::test]
    async fn bus_messages_wake_the_listening_permit_only_while_it_lives() {
        let f = flights();
        let mut permit = f.try_lead(3).expect("leads");
        let n = permit.listen();
        f.notify(3);
        tokio::time::timeout(Duration::from_secs(5), n.notified())
            .await
            .expect("woken by a stored permit");
        drop(permit);
        assert!(lock(&f.listeners).is_empty(), "unregistered on drop");
    }
}
