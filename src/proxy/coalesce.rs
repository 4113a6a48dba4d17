//! Step 7 of the request flow: one upstream render per key across the whole fleet.
//!
//! Receives a cache candidate that missed; decides which request renders it and hands on
//! [`Fetched`]: the entry another request rendered, this request's own render (streamed to its
//! client while a copy is stored), or an answer that may not be stored.
//!
//! - **Local single-flight**: the first request for a key on a gateway leads; later ones follow
//!   and wait on the leader's outcome (a `watch` channel: no polling), bounded by
//!   `coalesce.wait_timeout`, after which they fetch themselves. Leadership is an RAII value
//!   ([`Leading`]): a leader dropped or failed without an outcome wakes its followers with
//!   "abandoned" and the first of them takes over (pingora-cache `lock.rs` is the model).
//! - **Fleet lock** (Redis only): the local leader takes the key's fill lock
//!   (`cache::lock`) before going upstream. A gateway that loses the race waits for the
//!   winner's bus message (`bus`: one subscription per gateway, dispatched here by key) and
//!   re-reads Redis every `coalesce.poll_interval` in case a message is lost; it takes the lock
//!   itself when the lock goes (the winner failed or died and its lock expired). The winner
//!   re-reads the store first (a render that finished just before is not repeated), extends the
//!   lock while it renders, stores, announces, then releases.
//! - **Uncacheable answers**: followers are released at once to fetch for themselves, and the
//!   key skips coalescing for `coalesce.hit_for_miss` on every gateway (Varnish's
//!   hit-for-miss), so the next burst does not queue behind a render whose answer it cannot
//!   share.
//! - **Redis unavailable**: a lock call that fails (bounded by the store's command timeout and
//!   circuit breaker) means local single-flight only; a request never waits on Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response, header};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::fill::{self, Answer, Copied, Filled, Write};
use super::lookup::{self, Found};
use super::serve::{self, Outcome};
use crate::app::{AppState, CacheState};
use crate::bus::Kind;
use crate::cache::entry::Entry;
use crate::cache::key::{CacheKey, Variant};
use crate::cache::lock::Held;
use crate::cache::store::{RedisStore, Store};
use crate::config;
use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::metrics::Metrics;

/// What a miss got.
#[derive(Debug)]
pub enum Fetched {
    /// Rendered by another request (on this gateway or another): serve the entry.
    Followed(Arc<Entry>),
    /// Rendered by this request and stored, body complete.
    Stored(Arc<Entry>),
    /// Rendered by this request: the replica's response, streaming to the client while a copy
    /// is stored.
    Led(Response<Body>),
    /// Not stored (uncacheable, a server error, too large): pass it through.
    Passed(Response<Body>),
}

/// How a leader's render ended, as its followers see it.
#[derive(Debug, Clone)]
enum Done {
    /// Stored: serve this.
    Filled(Arc<Entry>),
    /// Not stored: fetch for yourselves.
    Pass,
    /// The leader went away without an answer: one of you takes over.
    Abandoned,
}

type Flight = watch::Sender<Option<Done>>;

/// The coalescing state of one gateway process (shared by its workers).
pub struct Coalescer {
    cfg: config::Coalesce,
    flights: Mutex<HashMap<u128, Arc<Flight>>>,
    waiters: Mutex<HashMap<u128, Arc<Notify>>>,
    passes: Option<moka::sync::Cache<u128, ()>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").field("cfg", &self.cfg).finish()
    }
}

impl Coalescer {
    /// Empty state for `cfg`.
    pub fn new(cfg: config::Coalesce) -> Coalescer {
        let passes = (!cfg.hit_for_miss.is_zero()).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cfg.hit_for_miss)
                .build()
        });
        Coalescer {
            cfg,
            flights: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            passes,
        }
    }

    /// What another gateway said about a key (from the bus).
    pub fn on_message(&self, kind: Kind, hash: u128) {
        if kind == Kind::Pass {
            self.remember_pass(hash);
        }
        let waiter = lock(&self.waiters).get(&hash).cloned();
        if let Some(n) = waiter {
            // A stored permit: a wake-up between two waits is not lost.
            n.notify_one();
        }
    }

    /// An entry was stored for the key: it is cacheable again.
    pub fn stored(&self, hash: u128) {
        if let Some(p) = &self.passes {
            p.invalidate(&hash);
        }
    }

    fn remember_pass(&self, hash: u128) {
        if let Some(p) = &self.passes {
            p.insert(hash, ());
        }
    }

    fn is_pass(&self, hash: u128) -> bool {
        self.passes.as_ref().is_some_and(|p| p.contains_key(&hash))
    }

    /// Leads the key's flight, or follows the one in progress.
    fn join(self: &Arc<Self>, hash: u128, metrics: &Arc<Metrics>) -> Role {
        let mut flights = lock(&self.flights);
        if let Some(flight) = flights.get(&hash) {
            return Role::Follower(flight.subscribe());
        }
        let flight = Arc::new(watch::Sender::new(None));
        flights.insert(hash, Arc::clone(&flight));
        Role::Leader(Leading {
            coalescer: Arc::clone(self),
            metrics: Arc::clone(metrics),
            hash,
            flight,
            done: false,
        })
    }

    /// Registers this gateway's interest in bus messages about `hash`.
    fn wait_on(self: &Arc<Self>, hash: u128) -> Waiting {
        let notify = Arc::clone(lock(&self.waiters).entry(hash).or_default());
        Waiting {
            coalescer: Arc::clone(self),
            hash,
            notify,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Role {
    Leader(Leading),
    Follower(watch::Receiver<Option<Done>>),
}

/// The duty to end a flight. Dropped without [`Leading::finish`], it tells the followers the
/// render was abandoned.
struct Leading {
    coalescer: Arc<Coalescer>,
    metrics: Arc<Metrics>,
    hash: u128,
    flight: Arc<Flight>,
    done: bool,
}

impl Leading {
    fn finish(mut self, done: Done) {
        self.done = true;
        self.close(done);
    }

    fn close(&self, done: Done) {
        {
            let mut flights = lock(&self.coalescer.flights);
            if flights
                .get(&self.hash)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                flights.remove(&self.hash);
            }
        }
        self.flight.send_replace(Some(done));
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.leaders_abandoned.inc();
            self.close(Done::Abandoned);
        }
    }
}

/// Interest in bus messages about one key; unregistered on drop.
struct Waiting {
    coalescer: Arc<Coalescer>,
    hash: u128,
    notify: Arc<Notify>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiters = lock(&self.coalescer.waiters);
        // Only the registration we made; one per key per process (the local leader).
        if waiters
            .get(&self.hash)
            .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
        {
            waiters.remove(&self.hash);
        }
    }
}

/// Everything a miss needs to go upstream.
pub struct Miss<'a> {
    /// The key.
    pub key: &'a CacheKey,
    /// The head to send upstream (`fill::upstream_head`).
    pub head: Parts,
    /// The variant.
    pub variant: &'a Variant,
    /// The headers `Vary` is matched on (a re-read of the store must match like a lookup).
    pub vary_view: &'a HeaderMap,
}

/// Gets the entry for a missed key: follows a render in progress or leads one.
pub async fn fetch(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    miss: Miss<'_>,
) -> Result<Fetched, ProxyError> {
    let co = &cache.coalesce;
    let hash = miss.key.hash;
    if !co.cfg.enabled {
        return direct(app, cache, miss).await;
    }
    if co.is_pass(hash) {
        app.metrics.hit_for_miss.inc();
        return direct(app, cache, miss).await;
    }
    let deadline = Instant::now() + co.cfg.wait_timeout;
    loop {
        let mut rx = match co.join(hash, &app.metrics) {
            Role::Leader(leading) => return lead(app, cache, miss, leading, deadline).await,
            Role::Follower(rx) => rx,
        };
        let started = Instant::now();
        let waited = tokio::time::timeout_at(deadline, async {
            match rx.wait_for(Option::is_some).await {
                Ok(d) => d.clone().unwrap_or(Done::Abandoned),
                // The flight ended without a word: treat as abandoned.
                Err(_) => Done::Abandoned,
            }
        })
        .await;
        let Ok(done) = waited else {
            app.metrics.follower_timeouts.inc();
            return direct(app, cache, miss).await;
        };
        match done {
            // The leader's entry answers this request only if it varies the same way (the
            // flight is per key, `Vary` beyond the key is per request) and no purge since its
            // render made it stale.
            Done::Filled(entry) if usable(cache, &entry, miss.vary_view) => {
                app.metrics.coalesced_local.inc();
                observe_wait(&app.metrics, started);
                return Ok(Fetched::Followed(entry));
            }
            Done::Filled(_) => return direct(app, cache, miss).await,
            Done::Pass => return direct(app, cache, miss).await,
            // Take over: the first to join again leads.
            Done::Abandoned => continue,
        }
    }
}

/// Whether a render's entry can answer a request with `vary_view`: same `Vary` values, and
/// still valid under the invalidations known now.
fn usable(cache: &CacheState, entry: &Entry, vary_view: &HeaderMap) -> bool {
    lookup::vary_matches(entry, vary_view)
        && cache.epochs.check(
            entry.meta.render_epoch,
            entry.meta.tags.iter().map(String::as_str),
        ) == crate::cache::epochs::Validity::Valid
}

fn observe_wait(metrics: &Metrics, since: Instant) {
    let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
    metrics.follower_wait_ms.observe(ms);
}

/// Fetches without coalescing (coalescing off, hit-for-miss, or a follower that gave up).
async fn direct(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    miss: Miss<'_>,
) -> Result<Fetched, ProxyError> {
    let now = cache.clock.now_ms();
    let write = Write::Background;
    match fill::fill(app, cache, miss.key, miss.head, miss.variant, now, write).await? {
        Filled::Stored(entry) => Ok(Fetched::Stored(entry)),
        Filled::Passed(response, uncacheable) => {
            if uncacheable {
                cache.coalesce.remember_pass(miss.key.hash);
            }
            Ok(Fetched::Passed(response))
        }
    }
}

/// This gateway's leader: wins the fleet lock (or follows the gateway that holds it), then
/// renders.
async fn lead(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    miss: Miss<'_>,
    leading: Leading,
    deadline: Instant,
) -> Result<Fetched, ProxyError> {
    // A render that ended between this request's lookup and its join left its entry in the L1
    // (or the in-process store; with Redis, the re-read after the fleet lock covers it).
    let ended = match &cache.store {
        Store::Memory(_) => reread(app, cache, &miss).await,
        Store::Redis(_) => cache
            .l1
            .get(miss.key.hash, cache.clock.now_ms())
            .filter(|e| usable(cache, e, miss.vary_view)),
    };
    if let Some(entry) = ended {
        app.metrics.coalesced_local.inc();
        leading.finish(Done::Filled(Arc::clone(&entry)));
        return Ok(Fetched::Followed(entry));
    }
    let redis = match &cache.store {
        Store::Redis(r) => Some(r.clone()),
        Store::Memory(_) => None,
    };
    let mut held = None;
    if let Some(redis) = &redis {
        match follow_fleet(app, cache, redis, &miss, deadline).await {
            Fleet::Lead(h) => held = h,
            Fleet::Entry(entry) => {
                leading.finish(Done::Filled(Arc::clone(&entry)));
                return Ok(Fetched::Followed(entry));
            }
            Fleet::Pass => {
                leading.finish(Done::Pass);
                return direct(app, cache, miss).await;
            }
        }
    }
    let lease = Lease::new(cache, redis, held, miss.key);
    render(app, cache, miss, leading, lease).await
}

/// What the fleet lock said.
enum Fleet {
    /// Render; with the lock when `Some` (`None`: Redis did not answer, or the wait ran out).
    Lead(Option<Held>),
    /// Another gateway rendered it.
    Entry(Arc<Entry>),
    /// Another gateway found it uncacheable.
    Pass,
}

/// Takes the key's fill lock, or waits for the gateway holding it.
async fn follow_fleet(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    redis: &RedisStore,
    miss: &Miss<'_>,
    deadline: Instant,
) -> Fleet {
    let co = &cache.coalesce;
    let hex = miss.key.hex();
    // Registered before the first attempt, so no message can slip between a lost race and the
    // wait.
    let waiting = co.wait_on(miss.key.hash);
    let started = Instant::now();
    let mut contended = false;
    loop {
        match redis.try_lock(&hex, co.cfg.lock_ttl).await {
            Ok(Some(held)) => {
                // Whoever held it before may have just stored the entry.
                if let Some(entry) = reread(app, cache, miss).await {
                    release(app, cache, Some(redis), Some(&held), None).await;
                    app.metrics.coalesced_remote.inc();
                    return Fleet::Entry(entry);
                }
                return Fleet::Lead(Some(held));
            }
            Ok(None) => {}
            Err(e) => {
                app.metrics.lock_fallbacks.inc();
                tracing::debug!(error = %e, "fill lock unavailable; coalescing on this gateway only");
                return Fleet::Lead(None);
            }
        }
        if !contended {
            contended = true;
            app.metrics.lock_contended.inc();
        }
        let wait = co
            .cfg
            .poll_interval
            .min(deadline.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(wait, waiting.notify.notified()).await;
        if co.is_pass(miss.key.hash) {
            return Fleet::Pass;
        }
        if let Some(entry) = reread(app, cache, miss).await {
            app.metrics.coalesced_remote.inc();
            observe_wait(&app.metrics, started);
            return Fleet::Entry(entry);
        }
        if Instant::now() >= deadline {
            app.metrics.follower_timeouts.inc();
            return Fleet::Lead(None);
        }
    }
}

/// A fresh entry in the store for this miss, if a render stored one meanwhile (a stale one is
/// what this miss is replacing).
async fn reread(app: &AppState, cache: &CacheState, miss: &Miss<'_>) -> Option<Arc<Entry>> {
    match lookup::lookup(app, cache, miss.key, miss.vary_view, cache.clock.now_ms()).await {
        Found::Fresh { entry, .. } => Some(entry),
        Found::Stale(_) | Found::StaleIfError(_) | Found::Miss => None,
    }
}

/// The fleet lock held for a render (if any), kept alive while the render runs.
pub struct Lease {
    redis: Option<RedisStore>,
    held: Option<Held>,
    extender: Option<tokio::task::JoinHandle<()>>,
}

impl Lease {
    fn new(
        cache: &CacheState,
        redis: Option<RedisStore>,
        held: Option<Held>,
        key: &CacheKey,
    ) -> Lease {
        let ttl = cache.coalesce.cfg.lock_ttl;
        let extender = match (&redis, &held) {
            (Some(r), Some(h)) => {
                let (r, h, text) = (r.clone(), h.clone(), key.text.clone());
                Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        match r.extend_lock(&h, ttl).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(key = %text, "fill lock lost during a long render; another gateway may render too");
                                return;
                            }
                            Err(_) => {}
                        }
                    }
                }))
            }
            _ => None,
        };
        Lease {
            redis,
            held,
            extender,
        }
    }

    /// Stops extending, releases the lock and says why on the bus (`None` when the caller
    /// already announced the entry).
    pub async fn end(mut self, app: &AppState, cache: &CacheState, hex: &str, said: Option<Kind>) {
        if let Some(e) = self.extender.take() {
            e.abort();
        }
        let held = self.held.take();
        release(
            app,
            cache,
            self.redis.as_ref(),
            held.as_ref(),
            said.map(|k| (k, hex)),
        )
        .await;
    }
}

impl Drop for Lease {
    /// A lease dropped without [`Lease::end`] (its request was cancelled mid-fill) still frees
    /// the lock, so a successor does not wait for it to expire.
    fn drop(&mut self) {
        if let Some(e) = self.extender.take() {
            e.abort();
        }
        if let (Some(redis), Some(held)) = (self.redis.take(), self.held.take()) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = redis.unlock(&held).await;
                });
            }
        }
    }
}

/// Releases a held lock; `say` publishes what happened first (`pass`: waiters fetch for
/// themselves) or after (`released`: waiters race for the lock).
async fn release(
    app: &AppState,
    cache: &CacheState,
    redis: Option<&RedisStore>,
    held: Option<&Held>,
    say: Option<(Kind, &str)>,
) {
    let (Some(redis), Some(held)) = (redis, held) else {
        return;
    };
    if let Some((Kind::Pass, hex)) = say {
        cache
            .announce(Kind::Pass, hex.to_owned(), &app.metrics)
            .await;
    }
    if let Err(e) = redis.unlock(held).await {
        app.metrics.store_errors.inc();
        tracing::debug!(error = %e, "fill lock release failed; it expires by itself");
    }
    if let Some((Kind::Released, hex)) = say {
        cache
            .announce(Kind::Released, hex.to_owned(), &app.metrics)
            .await;
    }
}

/// Renders as the leader: the client gets the replica's response as it streams, followers get
/// the entry once the body is in.
async fn render(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    miss: Miss<'_>,
    leading: Leading,
    lease: Lease,
) -> Result<Fetched, ProxyError> {
    let hex = miss.key.hex();
    let now = cache.clock.now_ms();
    let answer = fill::request(app, cache, miss.key, miss.head, miss.variant).await;
    let (pending, upstream_body) = match answer {
        Err(e) => {
            // The lock first, so the follower that takes over can take it.
            lease.end(app, cache, &hex, Some(Kind::Released)).await;
            drop(leading);
            return Err(e);
        }
        Ok(Answer::Pass {
            response,
            uncacheable,
        }) => {
            let said = if uncacheable {
                cache.coalesce.remember_pass(miss.key.hash);
                Kind::Pass
            } else {
                Kind::Released
            };
            leading.finish(Done::Pass);
            lease.end(app, cache, &hex, Some(said)).await;
            return Ok(Fetched::Passed(response));
        }
        Ok(Answer::Storable(pending, body)) => (pending, body),
    };
    let (status, mut headers, len) = pending.client_head();
    headers.insert(header::AGE, HeaderValue::from_static("0"));
    serve::mark(&mut headers, Outcome::Miss { stored: true });
    serve::add_vary_accept_encoding(&mut headers);
    let (tx, client_body) = body::Channel::new(16, len);
    let (app, cache, key) = (Arc::clone(app), Arc::clone(cache), miss.key.clone());
    tokio::spawn(async move {
        let leading = Mutex::new(Some(leading));
        let max = cache.cfg.max_entry_bytes;
        let copied = fill::copy(upstream_body, Some(tx), max, || {
            // Followers stop waiting now, not when the big body ends.
            cache.coalesce.remember_pass(key.hash);
            if let Some(l) = lock(&leading).take() {
                l.finish(Done::Pass);
            }
        })
        .await;
        let leading = lock(&leading).take();
        match copied {
            Ok(Copied::Whole(identity)) => {
                let entry = pending.entry(identity, now, &cache.cfg, cache.seal_fills());
                if let Some(l) = leading {
                    l.finish(Done::Filled(Arc::clone(&entry)));
                }
                fill::keep(&app, &cache, &key, &entry, pending.ttl(), Write::Awaited).await;
                lease.end(&app, &cache, &hex, None).await;
            }
            Ok(Copied::TooLarge) => {
                app.metrics.cache_not_stored.inc();
                lease.end(&app, &cache, &hex, Some(Kind::Pass)).await;
            }
            Err(e) => {
                tracing::debug!(key = %key.text, error = %e, "render failed mid-body; a follower takes over");
                lease.end(&app, &cache, &hex, Some(Kind::Released)).await;
                drop(leading);
            }
        }
    });
    let mut response = Response::new(body::boxed(client_body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(Fetched::Led(response))
}

/// Takes the fleet lock for a background refresh of `key`: `Some` to refresh (holding the
/// lock, or without it when Redis is unavailable or not configured), `None` when another
/// gateway holds it (it is refreshing or filling: serve stale, do nothing).
pub async fn refresh_lease(app: &AppState, cache: &CacheState, key: &CacheKey) -> Option<Lease> {
    let Store::Redis(redis) = &cache.store else {
        return Some(Lease::new(cache, None, None, key));
    };
    match redis
        .try_lock(&key.hex(), cache.coalesce.cfg.lock_ttl)
        .await
    {
        Ok(Some(h)) => Some(Lease::new(cache, Some(redis.clone()), Some(h), key)),
        Ok(None) => None,
        Err(_) => {
            app.metrics.lock_fallbacks.inc();
            Some(Lease::new(cache, None, None, key))
        }
    }
}
