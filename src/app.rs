//! [`AppState`]: everything a request needs. One per worker thread: the connection pool to the
//! replicas is the worker's own (its connection tasks live on the worker's runtime, so a request
//! never hops threads), everything else (config, metrics, replica set, request ids, lifecycle
//! tokens) is shared by all workers.
//!
//! [`CacheState`]: the cache, one per process and shared by the workers: the settings a reload
//! replaces, the entry store, what exists only with Redis ([`crate::shared::Shared`]), the L1,
//! flights, invalidation epochs, the fleet, the revalidation log, the clock and the tracked
//! background tasks shutdown waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arc_swap::{ArcSwap, Guard};
use http::HeaderValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, Message};
use crate::cache::decoded::Decoded;
use crate::cache::epochs::Epochs;
use crate::cache::flight::Flights;
use crate::cache::l1::L1;
use crate::cache::policy;
use crate::cache::store::{MemorySettings, MemoryStore, RedisSettings, RedisStore, Store};
use crate::config::Config;
use crate::invalidate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::upstream::Upstream;

/// State of one worker (see the module doc for what is shared).
#[derive(Debug)]
pub struct AppState {
    /// The running configuration (shared by the workers; a reload replaces it: read it with
    /// [`AppState::config`]).
    pub(crate) config: Arc<ArcSwap<Config>>,
    /// Sanitizing policy derived from `config.listen`.
    pub policy: crate::config::SanitizePolicy,
    /// Replicas (shared) and this worker's client to reach them.
    pub upstream: Upstream,
    /// The builds the replicas run, the current one, and which one each request goes to.
    pub deploy: Arc<crate::deploy::Deploy>,
    /// The cache (shared by all workers); `None` when disabled.
    pub cache: Option<Arc<CacheState>>,
    /// This worker's own Redis connections ([`Shared::for_worker`], started by the worker on
    /// its runtime): the hit path's reads and the miss path's fill locks. `None`: the cache's.
    pub own_redis: Option<Shared>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Request id source.
    pub request_ids: Arc<RequestIds>,
    /// Asks the control runtime for a reload (`crate::reload`).
    pub reloads: crate::reload::Reloads,
    /// The access log (shared by all workers).
    pub access: Arc<crate::logging::access::AccessLog>,
    /// Permits for requests in progress, one pool for the whole process
    /// (`listen.max_concurrent_requests`).
    pub concurrency: Arc<tokio::sync::Semaphore>,
    /// Background work tied to requests (tunnels); waited for at shutdown.
    pub tasks: TaskTracker,
    /// When the process started serving state (the fleet view's uptime).
    pub started_at: std::time::SystemTime,
    /// True once the start-up look (replicas' builds, the fleet's current build) is done and
    /// the listeners serve; connections made before wait in the listen backlog.
    pub started: Arc<tokio::sync::watch::Sender<bool>>,
    /// Cancelled when a shutdown is asked (SIGTERM): `/readyz` says no at once, while the
    /// listeners still accept for `listen.accept_grace` (`lib::lifecycle`).
    pub stopping: CancellationToken,
    /// Cancelled when the drain starts (after the accept grace): listeners close, connections
    /// finish.
    pub draining: CancellationToken,
    /// Cancelled when the shutdown grace period is over: whatever still runs is cut.
    pub hard_stop: CancellationToken,
}

impl AppState {
    /// The configuration now. A reload may replace it between two calls: read it once per
    /// decision; hold an `Arc` (`load_full`) rather than this guard across an `.await`.
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// The store the hit path reads: this worker's own connections, or the cache's store.
    pub fn reads<'a>(&'a self, cache: &'a CacheState) -> &'a Store {
        self.own_redis.as_ref().map_or(&cache.store, Shared::store)
    }

    /// The shared Redis as this worker reaches it: its own connections, or the cache's; `None`
    /// without Redis.
    pub fn shared<'a>(&'a self, cache: &'a CacheState) -> Option<&'a Shared> {
        self.own_redis.as_ref().or(cache.shared())
    }

    /// The state for another worker: the same shared parts, pools of its own (upstream, and
    /// Redis reads; the latter started by the worker, on its runtime).
    pub fn for_worker(&self) -> AppState {
        AppState {
            config: Arc::clone(&self.config),
            policy: self.policy.clone(),
            upstream: self.upstream.with_own_pool(),
            deploy: Arc::clone(&self.deploy),
            cache: self.cache.clone(),
            own_redis: self
                .cache
                .as_ref()
                .and_then(|c| c.shared())
                .and_then(|s| {
                    s.for_worker()
                        .inspect_err(|e| tracing::warn!(error = %e, "worker reads through the shared Redis pool"))
                        .ok()
                }),
            metrics: Arc::clone(&self.metrics),
            // Its own ids (a prefix of its own, a counter of its own): one shared counter
            // would move between the workers' cores on every request.
            request_ids: Arc::new(RequestIds::default()),
            access: Arc::clone(&self.access),
            reloads: self.reloads.clone(),
            concurrency: Arc::clone(&self.concurrency),
            tasks: self.tasks.clone(),
            started_at: self.started_at,
            started: Arc::clone(&self.started),
            // Read by `/readyz` only (the control runtime), never on the request path.
            stopping: self.stopping.clone(),
            // Children, not clones: every connection polls these on each wake, and a token is
            // a mutex; a worker's own child keeps that lock on its own core (cancelling the
            // parent cancels them all).
            draining: self.draining.child_token(),
            hard_stop: self.hard_stop.child_token(),
        }
    }
}

/// Everything the cache stages share: the store, the L1, the admission limits, the flights
/// (who fills which key) and the background work filling them; with Redis, the [`Shared`] rest
/// (bus, locks, the invalidation function, the log stream).
#[derive(Debug)]
pub struct CacheState {
    /// `[cache]` settings: read them with [`CacheState::cfg`]; a reload replaces them
    /// ([`CacheState::set_cfg`]).
    cfg: ArcSwap<crate::config::Cache>,
    /// The entries: Redis or in-process (get, put, delete alike).
    pub store: Store,
    /// In-process copies in front of the store.
    pub l1: L1,
    /// Strict mode: entries as last decoded from the store (reused on identical bytes).
    pub decoded: Decoded,
    /// Bound on background refreshes at once.
    pub refresh_permits: Arc<tokio::sync::Semaphore>,
    /// What exists only with Redis: the pool, the bus ([`CacheState::shared`]).
    shared: Option<Shared>,
    /// Who fills which key (local flights, fleet locks, hit-for-miss).
    pub flights: Arc<Flights>,
    /// Background fills (a leader's body copy and store write, refreshes) and lock releases:
    /// shutdown waits for them (`lib::lifecycle`).
    pub tasks: TaskTracker,
    /// Invalidations known to this gateway (tag → epoch).
    pub epochs: Arc<Epochs>,
    /// The other gateways (heartbeats, acknowledgements).
    pub fleet: Arc<Fleet>,
    /// The revalidation log.
    pub log: crate::invalidate::log::Log,
    /// The wall clock entry deadlines are read against.
    pub clock: crate::clock::Clock,
    /// Identity bodies are sealed when inflated (the hit lane runs and `sendfile`s them).
    pub seal_bodies: bool,
    /// Paths recently stored per tag (re-warm after a purge by tag).
    pub recent: crate::cache::tags::RecentPaths,
    /// The access log's live followers (`isrgate tail` sessions arrive on the bus).
    pub tail: Arc<crate::logging::tail::Tail>,
    /// This gateway's id on the bus and in logs.
    gateway_id: String,
}

impl CacheState {
    /// Whether a fill seals its identity body: the lane runs and the L1 keeps the entry (in
    /// strict mode a filled entry is dropped once answered, and hits decode their own).
    pub fn seal_fills(&self) -> bool {
        self.seal_bodies && self.l1.enabled()
    }

    /// Builds the cache from its settings; the Redis pool is built here and connected by
    /// [`CacheState::start`] inside a runtime. `seal_bodies`: the hit lane runs (see
    /// [`crate::cache::sealed`]).
    pub fn new(
        cfg: crate::config::Cache,
        redis: Option<&crate::config::Redis>,
        seal_bodies: bool,
        metrics: Arc<crate::metrics::Metrics>,
        tail: Arc<crate::logging::tail::Tail>,
    ) -> Result<CacheState, crate::cache::store::StoreError> {
        let gateway_id = format!("{:016x}", fastrand::u64(..));
        tail.set_gateway(&gateway_id);
        let shared = match redis.map(RedisSettings::from) {
            Some(s) => Some(Shared::new(&s, gateway_id.clone())?),
            None => None,
        };
        let store = match &shared {
            Some(shared) => shared.store().clone(),
            None => Store::Memory(MemoryStore::new(MemorySettings {
                max_bytes: cfg.memory_max_bytes,
            })),
        };
        let tasks = TaskTracker::new();
        let epochs = Arc::new(Epochs::default());
        if shared.is_some() {
            // Empty in front of a shared store: complete once the bus's first connect loaded
            // every invalidation (`BusListener`), and no shared entry is served before.
            epochs.unsynced();
        }
        Ok(CacheState {
            l1: L1::new(cfg.l1_max_bytes),
            // The L1 keeps decoded entries itself; only strict mode needs the memo.
            decoded: Decoded::new(if cfg.l1_max_bytes == 0 {
                cfg.decoded_max_bytes
            } else {
                0
            }),
            refresh_permits: Arc::new(tokio::sync::Semaphore::new(cfg.max_background_refreshes)),
            shared,
            store,
            flights: Arc::new(Flights::new(cfg.coalesce, metrics, tasks.clone())),
            tasks,
            epochs,
            fleet: Arc::new(Fleet::default()),
            log: crate::invalidate::log::Log::default(),
            clock: crate::clock::Clock::default(),
            seal_bodies,
            recent: crate::cache::tags::RecentPaths::default(),
            tail,
            gateway_id,
            cfg: ArcSwap::from_pointee(cfg),
        })
    }

    /// The `[cache]` settings now (a reload may replace them between two calls: read once
    /// per decision).
    pub fn cfg(&self) -> Guard<Arc<crate::config::Cache>> {
        self.cfg.load()
    }

    /// Replaces the settings that can change live (`crate::reload` keeps the others as they
    /// were): policy, routes, tag rules, coalescing.
    pub fn set_cfg(&self, cfg: crate::config::Cache) {
        self.flights.set_cfg(cfg.coalesce);
        self.cfg.store(Arc::new(cfg));
    }

    /// What exists only with Redis (the pool, the bus); `None` with the in-process store.
    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    /// The shared Redis pool: shorthand for `shared()`'s [`Shared::redis`], for the steps that
    /// only send it commands.
    pub fn redis(&self) -> Option<&RedisStore> {
        self.shared().map(Shared::redis)
    }

    /// The bus: shorthand for `shared()`'s [`Shared::bus`].
    pub fn bus(&self) -> Option<&Bus> {
        self.shared().map(Shared::bus)
    }

    /// The admission caps of the settings now.
    pub fn limits(&self) -> policy::Limits {
        let cfg = self.cfg.load();
        policy::Limits {
            default_stale_if_error: cfg.default_stale_if_error,
            max_stale_while_revalidate: cfg.max_stale_while_revalidate,
            max_ttl: cfg.max_ttl,
        }
    }

    /// Tells the other gateways what happened to the key `key_hex` (`Filled`: the entry was
    /// stored or deleted, they drop their L1 copy and read the store again; `Pass` and
    /// `Released`: see `bus`). Best effort: a failure is counted.
    pub async fn announce(
        &self,
        kind: crate::bus::Kind,
        key_hex: String,
        metrics: &crate::metrics::Metrics,
    ) {
        let Some(shared) = &self.shared else {
            return;
        };
        let message = Message::Key {
            kind,
            key: key_hex,
            gateway: shared.bus().gateway_id().to_owned(),
        };
        let timeout = std::time::Duration::from_millis(250);
        if let Err(e) = shared.publish(&message, timeout).await {
            metrics.store_errors.inc();
            tracing::debug!(error = %e, "bus publish failed");
        }
    }

    /// This gateway's id (on the bus, in webhook reports).
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Starts the store's connections (Redis), the bus and the heartbeat on the current
    /// runtime (`invalidate::fleet`), the L1's upkeep and its memory governor; they stop with
    /// `stop`.
    pub fn start(&self, stop: &CancellationToken) {
        crate::invalidate::fleet::start(self, stop);
        self.l1
            .maintain_every(std::time::Duration::from_secs(1), stop);
        let cfg = self.cfg();
        if cfg.l1_governor {
            // Without Redis the process holds the store's entries too.
            let store = match self.shared {
                None => cfg.memory_max_bytes,
                Some(_) => 0,
            };
            let bound = cfg.l1_max_bytes.saturating_add(store);
            crate::cache::governor::start(&self.l1, bound, stop);
        }
    }
}

/// Request ids: a random per-process prefix and a counter, so ids are unique across a fleet
/// without coordination and cost one atomic add.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            prefix: fastrand::u32(..),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// The next id, e.g. `5f1c2a9e-000000000000002a`: hex digits written into a stack buffer
    /// (a `format!` here was 2k instructions of the request path).
    pub fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Relaxed);
        let mut buf = [0u8; 25];
        for (i, slot) in buf[..8].iter_mut().enumerate() {
            *slot = HEX[(self.prefix >> (28 - 4 * i)) as usize & 0xf];
        }
        buf[8] = b'-';
        for (i, slot) in buf[9..].iter_mut().enumerate() {
            *slot = HEX[(n >> (60 - 4 * i)) as usize & 0xf];
        }
        HeaderValue::from_bytes(&buf).expect("invariant: hex digits and '-' are valid header bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefix_dash_counter_in_hex() {
        let ids = RequestIds {
            prefix: 0x5f1c_2a9e,
            next: AtomicU64::new(0x2a),
        };
        assert_eq!(ids.next(), "5f1c2a9e-000000000000002a");
        assert_eq!(ids.next(), "5f1c2a9e-000000000000002b");
    }
}
