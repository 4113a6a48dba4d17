//! Where entries live between requests (DESIGN.md request flow steps 5 and 10): the shared
//! store that every gateway reads and writes, or the in-process one for the embedded default.
//!
//! Receives a key hash (32 hex digits, from `cache::key`) and an entry as two byte strings
//! (encoded metadata, gzip body, from `cache::entry`); hands back the same bytes. It never looks
//! inside them, never decides freshness (the TTL it is given is already fresh + stale windows,
//! capped) and never fails a request: callers treat an error as a miss or a skipped store.
//!
//! - [`Store::Memory`]: moka, byte-weighted, per-entry TTL. What `isrgate serve` uses with no
//!   Redis configured; each gateway process then has its own cache.
//! - [`Store::Redis`]: fred pool. Layout (DESIGN.md "Entries", names in [`super::keys`]): the
//!   hash [`entry_key`] with fields `m` (metadata), `b` (body) and `r` (render time), written
//!   with its TTL by one script so an entry never exists without it; the `{<hex>}` hash tag
//!   keeps everything about one key in one Cluster slot. Every command is bounded by
//!   `command_timeout`; a lost connection is retried in the background with exponential
//!   backoff, and commands fail fast meanwhile.
//!
//! The variants are matched here only. What exists only with Redis (the bus, fill locks, the
//! invalidation function, the log stream, `INFO`) is reached through `crate::shared::Shared`,
//! which callers ask the cache for; [`RedisStore`] is its pool, with the circuit breaker every
//! command goes through (`RedisStore::bounded`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;

use super::keys::{entry_key, slots_key};

/// One write of [`Store::put_all`]: `entry` under `key_hex`, rendered at `rendered_at_ms`, kept
/// for `ttl`.
#[derive(Debug)]
pub struct Put {
    /// The entry's key (hex).
    pub key_hex: String,
    /// The entry.
    pub entry: Stored,
    /// Its render time (`Meta::stored_at_ms`): an older write never replaces a newer one.
    pub rendered_at_ms: u64,
    /// How long the store keeps it.
    pub ttl: Duration,
}

/// One stored entry, as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Encoded metadata (`cache::entry::Meta::encode`).
    pub meta: Bytes,
    /// The gzip body.
    pub body: Bytes,
}

impl Stored {
    fn weight(&self) -> u32 {
        u32::try_from(self.meta.len() + self.body.len()).unwrap_or(u32::MAX)
    }
}

/// A store operation failed; the caller carries on without the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// No answer within `command_timeout`.
    #[error("redis command timed out after {0:?}")]
    Timeout(Duration),
    /// The TLS files named in `[redis]` cannot be used.
    #[error("redis TLS ({key}): {reason}", key = .0.key, reason = .0.reason)]
    Tls(#[from] crate::cache::tls::TlsError),
    /// The task doing the work ended abnormally.
    #[error("aborted: {0}")]
    Aborted(String),
    /// Redis answered with something no command of ours returns.
    #[error("redis answered unexpectedly: {0}")]
    Unexpected(&'static str),
    /// Skipped: Redis failed repeatedly just now (the circuit breaker is open).
    #[error("redis skipped: circuit breaker open")]
    CircuitOpen,
}

impl StoreError {
    /// Whether the command may still run in Redis: it was sent, or queued by the client to be
    /// sent on reconnect, and no answer came (a timeout, a dropped connection), or it ran and
    /// its answer made no sense. A command the breaker or a TLS setup refused never left.
    pub fn may_run_later(&self) -> bool {
        matches!(
            self,
            StoreError::Redis(_) | StoreError::Timeout(_) | StoreError::Unexpected(_)
        )
    }
}

/// Consecutive failures that open the breaker.
pub const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker skips Redis before letting calls through again.
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(2);

/// A circuit breaker for the store: a Redis that times out (a black hole drops packets and
/// answers nothing) would otherwise cost every L1 miss the full `command_timeout`. After
/// [`BREAKER_FAILURES`] consecutive failures it opens: calls fail at once. Once
/// [`BREAKER_COOLDOWN`] has passed, one call — the probe — goes through while every other
/// still fails at once; the probe's success closes the breaker, its failure opens it for
/// another cooldown. So a frozen Redis costs one `command_timeout` per cooldown, not one per
/// request that arrived meanwhile, and the log says so once per opening, not once per failure.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: std::sync::atomic::AtomicU32,
    /// 0 while closed; otherwise when the next probe may go.
    open_until_ms: std::sync::atomic::AtomicU64,
    probing: std::sync::atomic::AtomicBool,
}

/// Lets another call probe when the probe's future is dropped before it ended (after it
/// ended, `success` / `failure` already did).
struct ProbeGuard<'a>(&'a Breaker);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0
            .probing
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Whether a call may go, by [`Breaker::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Closed: go.
    Go,
    /// Open and cooled down: this call is the probe.
    Probe,
    /// Open: fail at once.
    Refuse,
}

impl Breaker {
    /// Whether a call at `now_ms` would be refused: open and cooling down, or its probe in
    /// flight. (Cooled down with no probe yet, the next call is the probe: it may go.)
    pub fn is_open(&self, now_ms: u64) -> bool {
        use std::sync::atomic::Ordering::{Acquire, Relaxed};
        let until = self.open_until_ms.load(Relaxed);
        until != 0 && (now_ms < until || self.probing.load(Acquire))
    }

    fn admit(&self, now_ms: u64) -> Admit {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed};
        let until = self.open_until_ms.load(Relaxed);
        if until == 0 {
            return Admit::Go;
        }
        if now_ms < until {
            return Admit::Refuse;
        }
        match self.probing.compare_exchange(false, true, AcqRel, Acquire) {
            Ok(_) => Admit::Probe,
            Err(_) => Admit::Refuse,
        }
    }

    /// A call succeeded; `true` when it was the probe that closed the breaker.
    fn success(&self, admitted: Admit) -> bool {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if admitted != Admit::Probe {
            return false;
        }
        self.open_until_ms.store(0, Relaxed);
        self.probing.store(false, Release);
        true
    }

    /// A call failed at `now_ms`; `true` when this failure opened the breaker (a failed probe
    /// only keeps it open).
    fn failure(&self, now_ms: u64, admitted: Admit) -> bool {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let until = now_ms + BREAKER_COOLDOWN.as_millis() as u64;
        if admitted == Admit::Probe {
            self.open_until_ms.store(until, Relaxed);
            self.probing.store(false, Release);
            return false;
        }
        self.failures.fetch_add(1, Relaxed) + 1 >= BREAKER_FAILURES
            && self
                .open_until_ms
                .compare_exchange(0, until, Relaxed, Relaxed)
                .is_ok()
    }
}

/// Connections of a worker thread's own pool ([`RedisStore::sibling`]), at most: fred
/// pipelines commands on a connection, so two are plenty for one thread, and a gateway on a
/// many-core machine does not open `redis.pool_size` connections per core.
pub const WORKER_POOL_SIZE: usize = 2;

/// Settings of the Redis store.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`, sentinel and cluster URLs as
    /// fred reads them).
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Bound on every command (a slow Redis must not slow requests down).
    pub command_timeout: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// PEM files for `rediss://` URLs (ignored for `redis://`).
    pub tls: crate::cache::tls::RedisTls,
}

/// The gateway's settings: `[redis]` as configured.
impl From<&crate::config::Redis> for RedisSettings {
    fn from(redis: &crate::config::Redis) -> RedisSettings {
        RedisSettings {
            url: redis.url.clone(),
            pool_size: redis.pool_size,
            command_timeout: redis.command_timeout,
            connect_timeout: redis.connect_timeout,
            tls: redis.tls.clone(),
        }
    }
}

impl RedisSettings {
    /// One connection for a command-line call (`isrgate purge`, `isrgate deploy`): its
    /// commands may wait as long as a connection may take to open.
    pub fn for_cli(redis: &crate::config::Redis) -> RedisSettings {
        // A person waits for one answer: a busy machine or a far Redis gets seconds, not the
        // serving path's 250 ms.
        let patient = Duration::from_secs(5);
        let configured = RedisSettings::from(redis);
        RedisSettings {
            pool_size: 1,
            command_timeout: configured
                .connect_timeout
                .max(configured.command_timeout)
                .max(patient),
            connect_timeout: configured.connect_timeout.max(patient),
            ..configured
        }
    }

    /// The fred configuration: the URL, with our TLS settings when it asks for TLS.
    pub fn fred_config(&self) -> Result<Config, StoreError> {
        let mut config = Config::from_url(&self.url)?;
        if config.tls.is_some() {
            config.tls = Some(self.tls.fred_config()?);
        }
        Ok(config)
    }
}

/// Settings of the in-process store.
#[derive(Debug, Clone, Copy)]
pub struct MemorySettings {
    /// Bytes of metadata and body kept, at most.
    pub max_bytes: u64,
}

/// The entry store: get, put and delete, whichever backend (build one with its variant; only
/// this module matches them).
#[derive(Clone)]
pub enum Store {
    /// In-process (embedded default).
    Memory(MemoryStore),
    /// Shared Redis / Valkey.
    Redis(RedisStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Store {
    /// `memory` or `redis`, for logs and the dashboard.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// Whether the store answers at all now (the Redis circuit breaker is closed): a write
    /// retried while it is open would fail at once.
    pub fn is_available(&self) -> bool {
        match self {
            Store::Memory(_) => true,
            Store::Redis(r) => !r.breaker().is_open(crate::clock::monotonic_ms()),
        }
    }

    /// The entry under `key_hex`, if any.
    pub async fn get(&self, key_hex: &str) -> Result<Option<Stored>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(key_hex)),
            Store::Redis(r) => r.get(key_hex).await,
        }
    }

    /// Only the metadata of the entry under `key_hex` (a few hundred bytes): enough to tell
    /// whether it is still the entry decoded last time ([`crate::cache::decoded`]).
    pub async fn get_meta(&self, key_hex: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(key_hex).map(|s| s.meta)),
            Store::Redis(r) => {
                let key = entry_key(key_hex);
                r.bounded(r.pool.hget(key, "m")).await
            }
        }
    }

    /// Removes the entry under `key_hex` (the replica no longer allows storing it).
    pub async fn delete(&self, key_hex: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.cache.invalidate(key_hex);
                Ok(())
            }
            Store::Redis(r) => {
                let key = entry_key(key_hex);
                r.bounded(r.pool.del::<(), _>(key)).await
            }
        }
    }

    /// Stores an entry rendered at `rendered_at_ms` for `ttl`, replacing the entry there unless
    /// that one was rendered later: `Ok(false)` when a newer render is kept (two fills that
    /// raced, a copy from a replica's cache arriving after a render). One comparison in the
    /// store, so no interleaving of gateways can put an older page over a newer one.
    pub async fn put(
        &self,
        key_hex: &str,
        entry: Stored,
        rendered_at_ms: u64,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.put(key_hex, entry, rendered_at_ms, ttl)),
            Store::Redis(r) => {
                let put = Put {
                    key_hex: key_hex.to_owned(),
                    entry,
                    rendered_at_ms,
                    ttl,
                };
                let written = r.put_all(vec![put]).await?;
                written
                    .first()
                    .copied()
                    .ok_or(StoreError::Unexpected("no answer to a write"))
            }
        }
    }

    /// [`Store::put`] for several entries (a page's HTML and RSC of one render) written together:
    /// in one script call, so readers anywhere see them change at once (on Cluster, whose slots
    /// differ, in one pipeline). One answer per entry, in order; an error is the whole batch's.
    pub async fn put_all(&self, puts: Vec<Put>) -> Result<Vec<bool>, StoreError> {
        match self {
            Store::Memory(m) => Ok(puts
                .into_iter()
                .map(|p| m.put(&p.key_hex, p.entry, p.rendered_at_ms, p.ttl))
                .collect()),
            Store::Redis(r) => r.put_all(puts).await,
        }
    }

    /// Records that `slot_hex`, a `Vary` slot of `primary_hex`, was just filled for `ttl`, and
    /// keeps at most `max` slots per primary key (the most recently filled): the slots dropped,
    /// for the caller to delete (Varnish and Fastly bound variants per object the same way, so
    /// one odd header value cannot fill the cache with copies of a page).
    pub async fn track_slot(
        &self,
        primary_hex: &str,
        slot_hex: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.track_slot(primary_hex, slot_hex, max)),
            Store::Redis(r) => {
                let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
                let args: Vec<fred::types::Value> = vec![
                    slot_hex.into(),
                    i64::try_from(max).unwrap_or(i64::MAX).into(),
                    ttl_ms.into(),
                ];
                let track = r.pool.next().eval(TRACK_SLOT, slots_key(primary_hex), args);
                r.bounded(track).await
            }
        }
    }
}

/// Records that the `Vary` slot `ARGV[1]` of a primary key was just filled, in the primary's
/// list of slots `KEYS[1]` (most recent first), keeps the list to `ARGV[2]` slots and its TTL
/// at least `ARGV[3]` ms; returns the slots dropped from it (their entries are deleted by the
/// caller: they hash to other Cluster slots).
const TRACK_SLOT: &str = "redis.call('lrem', KEYS[1], 0, ARGV[1]) \
redis.call('lpush', KEYS[1], ARGV[1]) \
local out = {} \
while redis.call('llen', KEYS[1]) > tonumber(ARGV[2]) do table.insert(out, redis.call('rpop', KEYS[1])) end \
if redis.call('pttl', KEYS[1]) < tonumber(ARGV[3]) then redis.call('pexpire', KEYS[1], ARGV[3]) end \
return out";

/// Writes each entry `KEYS[i]` (`m` metadata, `b` body, `r` render time in UNIX ms, then its
/// TTL: `ARGV[4i-3..4i]` = render time, metadata, body, TTL ms) unless the entry there has a
/// later render time; one answer per key, 1 written or 0 refused. Entries written before `r`
/// existed have none and are replaced. One call is atomic: readers see all its keys change at
/// once.
const PUT_UNLESS_NEWER: &str = "local out = {} \
for i, key in ipairs(KEYS) do \
local a = (i - 1) * 4 \
local r = redis.call('hget', key, 'r') \
if r and tonumber(r) > tonumber(ARGV[a + 1]) then out[i] = 0 else \
redis.call('hset', key, 'm', ARGV[a + 2], 'b', ARGV[a + 3], 'r', ARGV[a + 1]) \
redis.call('pexpire', key, ARGV[a + 4]) out[i] = 1 end \
end \
return out";

/// Primary keys whose `Vary` slots the in-process store keeps track of.
const SLOT_LISTS: u64 = 100_000;

/// The in-process store.
#[derive(Clone)]
pub struct MemoryStore {
    cache: moka::sync::Cache<String, (Stored, Duration, u64)>,
    /// Each primary key's `Vary` slots, most recently filled first (see [`Store::track_slot`]);
    /// bookkeeping only: the entries themselves are bounded by `cache`'s bytes.
    slots: moka::sync::Cache<String, Arc<[String]>>,
}

struct PerEntryTtl;

impl moka::Expiry<String, (Stored, Duration, u64)> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &(Stored, Duration, u64),
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.1)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &(Stored, Duration, u64),
        _updated_at: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

impl MemoryStore {
    /// An empty store holding at most `max_bytes`.
    pub fn new(settings: MemorySettings) -> MemoryStore {
        let cache = moka::sync::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|k: &String, v: &(Stored, Duration, u64)| {
                v.0.weight()
                    .saturating_add(u32::try_from(k.len()).unwrap_or(u32::MAX))
            })
            .expire_after(PerEntryTtl)
            .build();
        let slots = moka::sync::Cache::builder()
            .max_capacity(SLOT_LISTS)
            .time_to_idle(Duration::from_secs(24 * 3600))
            .build();
        MemoryStore { cache, slots }
    }

    fn track_slot(&self, primary_hex: &str, slot_hex: &str, max: usize) -> Vec<String> {
        use moka::ops::compute::Op;
        let mut dropped = Vec::new();
        self.slots
            .entry(primary_hex.to_owned())
            .and_compute_with(|held| {
                let mut list = vec![slot_hex.to_owned()];
                if let Some(held) = held {
                    list.extend(held.value().iter().filter(|s| *s != slot_hex).cloned());
                }
                dropped = list.split_off(max.max(1).min(list.len()));
                Op::Put(Arc::from(list))
            });
        dropped
    }

    fn get(&self, key_hex: &str) -> Option<Stored> {
        self.cache.get(key_hex).map(|(s, _, _)| s)
    }

    fn put(&self, key_hex: &str, entry: Stored, rendered_at_ms: u64, ttl: Duration) -> bool {
        use moka::ops::compute::Op;
        let done = self
            .cache
            .entry(key_hex.to_owned())
            .and_compute_with(|held| match held {
                Some(e) if e.value().2 > rendered_at_ms => Op::Nop,
                _ => Op::Put((entry, ttl, rendered_at_ms)),
            });
        !matches!(done, moka::ops::compute::CompResult::Unchanged(_))
    }
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    settings: std::sync::Arc<RedisSettings>,
    breaker: std::sync::Arc<Breaker>,
    latency_ms: std::sync::Arc<crate::metrics::Histogram>,
}

/// How the pool and the bus (re)connect: forever, 10 ms after a loss doubling up to 5 s, with
/// fred's 0-50 ms of jitter. fred waits the first delay before the very first connection too:
/// at 100 ms (what it was) that was 100-150 ms of every start before the first command.
pub(crate) fn reconnect_policy() -> ReconnectPolicy {
    ReconnectPolicy::new_exponential(0, 10, 5_000, 2)
}

impl RedisStore {
    /// Builds the pool and starts connecting in the background (inside a tokio runtime): a
    /// Redis that is down at start does not stop the gateway from starting; commands fail
    /// (fast) until it is reachable.
    pub fn connect(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        let store = RedisStore::new(settings)?;
        store.start();
        Ok(store)
    }

    /// Starts the connection tasks on the current runtime (they live as long as the pool).
    pub fn start(&self) {
        drop(self.pool.connect());
    }

    /// Builds the pool without connecting (no runtime needed); see [`RedisStore::start`].
    pub fn new(settings: &RedisSettings) -> Result<RedisStore, StoreError> {
        let pool = Builder::from_config(settings.fred_config()?)
            .with_config(|c| {
                // Keep retrying the first connection instead of failing start-up.
                c.fail_fast = false;
            })
            .with_connection_config(|c| {
                c.connection_timeout = settings.connect_timeout;
                c.internal_command_timeout = settings.connect_timeout;
                // A command in flight when the connection drops is not retried at length.
                c.max_command_attempts = 1;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .with_performance_config(|c| {
                c.default_command_timeout = settings.command_timeout;
            })
            .set_policy(reconnect_policy())
            .build_pool(settings.pool_size.max(1))?;
        Ok(RedisStore {
            pool,
            settings: std::sync::Arc::new(settings.clone()),
            breaker: std::sync::Arc::new(Breaker::default()),
            latency_ms: std::sync::Arc::default(),
        })
    }

    /// Another pool to the same Redis, sharing this one's circuit breaker and latency
    /// histogram, not connected yet: [`start`](RedisStore::start) it on the runtime whose
    /// tasks will use it. fred runs a pool's connections as tasks of the runtime that
    /// connected it, so a worker thread reading through the shared pool hands every command
    /// to another thread and back (two wake-ups); with a pool of its own it never leaves its
    /// thread.
    pub fn sibling(&self) -> Result<RedisStore, StoreError> {
        let settings = RedisSettings {
            pool_size: self.settings.pool_size.min(WORKER_POOL_SIZE),
            ..(*self.settings).clone()
        };
        let mut sibling = RedisStore::new(&settings)?;
        sibling.breaker = std::sync::Arc::clone(&self.breaker);
        sibling.latency_ms = std::sync::Arc::clone(&self.latency_ms);
        Ok(sibling)
    }

    /// The circuit breaker (for readiness and the dashboard).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Time per command, ms (including the wait for a connection).
    pub fn latency_ms(&self) -> &crate::metrics::Histogram {
        &self.latency_ms
    }

    /// Whether every connection of the pool is up.
    pub fn is_connected(&self) -> bool {
        self.pool.clients().iter().all(|c| c.is_connected())
    }

    /// The underlying pool (for the bus and the lock code that share it).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub(crate) async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, fred::error::Error>>,
    ) -> Result<T, StoreError> {
        let now = crate::clock::monotonic_ms();
        let admitted = self.breaker.admit(now);
        if admitted == Admit::Refuse {
            return Err(StoreError::CircuitOpen);
        }
        // A probe whose caller goes away (a cancelled request) must not leave the breaker
        // waiting for an answer that never comes: the next call probes instead.
        let _probe = (admitted == Admit::Probe).then(|| ProbeGuard(&self.breaker));
        // fred bounds commands itself; this also bounds the wait for a connection.
        let started = Instant::now();
        let limit = self.settings.command_timeout;
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        self.latency_ms
            .observe(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        match &result {
            Ok(_) => {
                if self.breaker.success(admitted) {
                    tracing::info!("Redis answers again (circuit breaker closed)");
                }
            }
            Err(e) => {
                if self.breaker.failure(crate::clock::monotonic_ms(), admitted) {
                    tracing::warn!(error = %e, cooldown = ?BREAKER_COOLDOWN, "Redis failing; skipping it, probing with one command every cooldown (circuit breaker open)");
                }
            }
        }
        result
    }

    async fn get(&self, key_hex: &str) -> Result<Option<Stored>, StoreError> {
        let key = entry_key(key_hex);
        let (meta, body): (Option<Bytes>, Option<Bytes>) =
            self.bounded(self.pool.hmget(key, vec!["m", "b"])).await?;
        Ok(match (meta, body) {
            (Some(meta), Some(body)) => Some(Stored { meta, body }),
            _ => None,
        })
    }

    /// One script call for all of `puts` (atomic), except on Cluster, where a page's keys live
    /// in different slots: there one call per key, pipelined (Redis runs each node's back to
    /// back, but another client's read can fall between two of them).
    async fn put_all(&self, puts: Vec<Put>) -> Result<Vec<bool>, StoreError> {
        let client = self.pool.next();
        if !client.is_clustered() {
            let (keys, args): (Vec<String>, Vec<Vec<Value>>) =
                puts.into_iter().map(put_args).unzip();
            let args: Vec<Value> = args.into_iter().flatten().collect();
            let written: Vec<i64> = self
                .bounded(client.eval(PUT_UNLESS_NEWER, keys, args))
                .await?;
            return Ok(written.into_iter().map(|n| n == 1).collect());
        }
        // fred has no `eval` on a pipeline: the same EVAL as a command, routed by its key.
        let eval = fred::types::CustomCommand::new_static(
            "EVAL",
            fred::types::ClusterHash::Offset(2),
            false,
        );
        let pipe = client.pipeline();
        for p in puts {
            let (key, rest) = put_args(p);
            let mut args: Vec<Value> = vec![PUT_UNLESS_NEWER.into(), 1.into(), key.into()];
            args.extend(rest);
            // Queued in memory; sent by `try_all`.
            let () = pipe.custom(eval.clone(), args).await?;
        }
        let sent = async {
            let answers = pipe.try_all::<Vec<i64>>().await.into_iter();
            answers.map(|n| n.map(|n| n == [1])).collect()
        };
        self.bounded(sent).await
    }
}

/// A write's key and its four script arguments (`PUT_UNLESS_NEWER`).
fn put_args(p: Put) -> (String, Vec<Value>) {
    let ttl_ms = i64::try_from(p.ttl.as_millis()).unwrap_or(i64::MAX).max(1);
    let args = vec![
        p.rendered_at_ms.to_string().into(),
        p.entry.meta.into(),
        p.entry.body.into(),
        ttl_ms.into(),
    ];
    (entry_key(&p.key_hex), args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: usize) -> Stored {
        Stored {
            meta: Bytes::from(vec![1u8; 8]),
            body: Bytes::from(vec![7u8; n]),
        }
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_probes_with_one_call() {
        let b = Breaker::default();
        let cooled = 1_000 + BREAKER_COOLDOWN.as_millis() as u64;
        for _ in 0..BREAKER_FAILURES - 1 {
            assert!(!b.failure(1_000, b.admit(1_000)));
        }
        b.success(Admit::Go);
        for _ in 0..BREAKER_FAILURES - 1 {
            assert!(
                !b.failure(1_000, Admit::Go),
                "the count restarted after a success"
            );
        }
        assert!(
            b.failure(1_000, Admit::Go),
            "the fifth consecutive failure opens it"
        );
        assert!(
            !b.failure(1_000, Admit::Go),
            "opened once, not once per failure"
        );
        assert_eq!(b.admit(cooled - 1), Admit::Refuse);
        assert_eq!(b.admit(cooled), Admit::Probe, "cooled down: one probe");
        assert_eq!(b.admit(cooled), Admit::Refuse, "and only one");
        assert!(
            !b.failure(cooled, Admit::Probe),
            "a failed probe keeps it open"
        );
        assert_eq!(b.admit(cooled + 1), Admit::Refuse, "for another cooldown");
        let later = cooled + BREAKER_COOLDOWN.as_millis() as u64;
        assert_eq!(b.admit(later), Admit::Probe);
        assert!(b.success(Admit::Probe), "the probe's success closes it");
        assert_eq!(b.admit(later), Admit::Go);
        assert!(!b.is_open(later));
        assert!(!b.is_open(0), "closed");
    }

    #[tokio::test]
    async fn memory_store_round_trips_and_expires() {
        let s = Store::Memory(MemoryStore::new(MemorySettings { max_bytes: 1 << 20 }));
        s.put("k", stored(10), 1, Duration::from_millis(80))
            .await
            .expect("put");
        assert_eq!(s.get("k").await.expect("get"), Some(stored(10)));
        assert_eq!(s.get("other").await.expect("get"), None);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            s.get("k").await.expect("get"),
            None,
            "expired after its TTL"
        );
    }

    #[test]
    fn memory_store_keeps_the_most_recently_filled_slots() {
        let m = MemoryStore::new(MemorySettings { max_bytes: 10_000 });
        assert!(m.track_slot("p", "a", 2).is_empty());
        assert!(m.track_slot("p", "b", 2).is_empty());
        assert!(
            m.track_slot("p", "a", 2).is_empty(),
            "a again: the most recent"
        );
        assert_eq!(m.track_slot("p", "c", 2), ["b"]);
        assert!(m.track_slot("q", "b", 2).is_empty(), "per primary key");
        assert_eq!(m.track_slot("p", "d", 1), ["c", "a"]);
    }

    #[tokio::test]
    async fn memory_store_is_bounded_by_bytes() {
        let m = MemoryStore::new(MemorySettings { max_bytes: 10_000 });
        for i in 0..50 {
            m.put(&format!("k{i}"), stored(1_000), 1, Duration::from_secs(60));
        }
        m.cache.run_pending_tasks();
        assert!(
            m.cache.weighted_size() <= 10_000,
            "{}",
            m.cache.weighted_size()
        );
        assert!(m.cache.entry_count() < 50);
    }
}
