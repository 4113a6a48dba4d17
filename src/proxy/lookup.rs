//! Step 5 of the request flow: find a usable entry for a key, L1 first, then the store.
//!
//! Receives the key and the request headers (for `Vary`); hands on what the cache has:
//! [`Found::Fresh`] (serve it), [`Found::Stale`] (serve it and refresh in the background),
//! [`Found::StaleIfError`] (keep it in case the replicas fail) or [`Found::Miss`] with why
//! ([`Missed`], what the debug header says of a miss). A store that fails or times out is a
//! miss (counted, logged at most every few seconds): Redis never fails a request. Bytes that do not decode are a miss too, and the fill overwrites them. While the
//! gateway's invalidations are incomplete (start, bus reconnect) the store is not read: an
//! entry purged meanwhile would look valid.
//!
//! **`Vary` slots** (design note). A response that varies on request headers beyond the key
//! (`Vary: Accept-Language`; Next's `Vary: Next-Url` on interception routes) is kept under two
//! keys: the URL's primary key, which always holds the latest render whichever values it was
//! made for, and the slot of its values (`CacheKey::with_vary`). A lookup reads the primary
//! key; when its entry was made for other values, the entry's `Vary` names say which slot is
//! the request's, and that slot is read (one more read, only for such URLs; a fresh primary
//! entry stays in the L1, so on a warm gateway both reads are in memory). So variants never
//! evict each other, an odd value costs its own slot and nothing else, fills and refreshes of
//! a slot coalesce on the slot's own flight, and a gateway that never saw the URL finds every
//! variant from Redis. Each URL keeps at most `cache.max_variants` slots, the most recently
//! filled (`fill::keep`); invalidation needs nothing more: every copy carries its tags and
//! render epoch.
//!
//! A GET that would fill the key on a miss looks up with [`lookup_to_fill`]: it reads Redis
//! with a script that also takes the fill lock when nothing is stored, and then leads the
//! key's flight, so a cold miss reaches the replica after one round trip to Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http::HeaderMap;

use crate::app::{AppState, CacheState};
use crate::cache::entry::{Entry, Meta};
use crate::cache::epochs::Validity;
use crate::cache::flight::FillPermit;
use crate::cache::key::{self, CacheKey};
use crate::cache::lock::ReadOrLock;
use crate::cache::policy::{self, State};
use crate::cache::store::{StoreError, Stored};

/// What the cache holds for a request.
#[derive(Debug, Clone)]
pub enum Found {
    /// Fresh; `from_l1` says no store read was needed.
    Fresh {
        /// The entry.
        entry: Arc<Entry>,
        /// Served from the L1.
        from_l1: bool,
    },
    /// Past freshness, within stale-while-revalidate.
    Stale(Arc<Entry>),
    /// Past stale-while-revalidate, within stale-if-error.
    StaleIfError(Arc<Entry>),
    /// Nothing usable, for this reason.
    Miss(Missed),
}

/// Why a lookup found nothing usable: the reason a miss gives in the debug header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// Nothing stored for the key (or its `Vary` slot), or another gateway is rendering it.
    Absent,
    /// Stored, but past every window it could be served in.
    Expired,
    /// Stored, and purged hard since it was rendered.
    Invalidated,
    /// The stored answer varies on other request headers than the slot was made for.
    Vary,
    /// The store was not read: this gateway's invalidations are not all loaded (start, bus
    /// reconnect), so a shared entry could not be judged.
    Unsynced,
    /// The store failed or did not answer in time.
    StoreError,
    /// The stored bytes did not decode.
    Corrupt,
}

impl Missed {
    /// Label for the debug header and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Missed::Absent => "absent",
            Missed::Expired => "expired",
            Missed::Invalidated => "invalidated",
            Missed::Vary => "vary",
            Missed::Unsynced => "unsynced",
            Missed::StoreError => "store_error",
            Missed::Corrupt => "corrupt",
        }
    }
}

/// Prefix of the tag recording which `Vary` values an entry was stored for.
pub const VARY_TAG: &str = "vary:";

/// What a lookup found, and where.
#[derive(Debug)]
pub struct Lookup {
    /// What the cache holds for the request.
    pub found: Found,
    /// The `Vary` slot the request's answer belongs to, when the primary key's entry varies
    /// on headers whose values differ from the request's: what fills and refreshes use.
    pub slot: Option<CacheKey>,
    /// The flight of the key the answer belongs to, when a miss's lookup took the lead
    /// ([`lookup_to_fill`]).
    pub permit: Option<FillPermit>,
}

/// One slot's verdict: an answer, or "it lives in this other slot".
enum Judged {
    Found(Found),
    Elsewhere(CacheKey),
}

impl Judged {
    fn miss(why: Missed) -> Judged {
        Judged::Found(Found::Miss(why))
    }
}

/// Looks `key` up at `now_ms` for a request with `headers`. When the primary slot holds a
/// render for other values of the headers it varies on, the request's own slot is looked up
/// (one more read, only then).
pub async fn lookup(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> Lookup {
    let slot = match one(app, cache, key, headers, now_ms).await {
        Judged::Found(found) => return Lookup::found(found),
        Judged::Elsewhere(slot) => slot,
    };
    let found = match one(app, cache, &slot, headers, now_ms).await {
        Judged::Found(found) => found,
        Judged::Elsewhere(_) => Found::Miss(Missed::Vary),
    };
    Lookup {
        found,
        slot: Some(slot),
        permit: None,
    }
}

impl Lookup {
    fn found(found: Found) -> Lookup {
        Lookup {
            found,
            slot: None,
            permit: None,
        }
    }
}

/// One slot looked up: the L1, then the store.
async fn one(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> Judged {
    if let Some(judged) = from_l1(app, cache, key, headers, now_ms) {
        return judged;
    }
    if !synced(app, cache) {
        return Judged::miss(Missed::Unsynced);
    }
    from_store(app, cache, key, headers, now_ms).await
}

/// What the store holds for `key`, judged for a request with `headers`.
async fn from_store(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> Judged {
    match Box::pin(read(app, cache, key, now_ms)).await {
        Ok(entry) => judge(app, cache, key, entry, headers, now_ms),
        Err(why) => Judged::miss(why),
    }
}

/// A lookup by a request that fills the key when nothing usable is found (a GET miss). With
/// Redis, the store read also takes the key's fill lock when nothing is stored: a cold miss
/// costs one round trip to Redis, not two (a read, then a lock). The request then leads the
/// key's flight on this gateway, holding that lock: the permit comes back with the miss, for
/// [`super::coalesce::turn_led`]. A read that finds an entry (fresh, stale or anything else)
/// takes nothing, so reading never stands in the way of a refresh or a sibling fill; a lock
/// taken while another flight of the key is in progress here is given back at once. A
/// request whose answer lives in a `Vary` slot reads (and locks) that slot the same way.
pub async fn lookup_to_fill(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> Lookup {
    let slot = match one_to_fill(app, cache, key, headers, now_ms).await {
        (Judged::Found(found), permit) => {
            return Lookup {
                found,
                slot: None,
                permit,
            };
        }
        (Judged::Elsewhere(slot), _) => slot,
    };
    let (found, permit) = match one_to_fill(app, cache, &slot, headers, now_ms).await {
        (Judged::Found(found), permit) => (found, permit),
        (Judged::Elsewhere(_), _) => (Found::Miss(Missed::Vary), None),
    };
    Lookup {
        found,
        slot: Some(slot),
        permit,
    }
}

/// [`lookup_to_fill`] of one slot.
async fn one_to_fill(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> (Judged, Option<FillPermit>) {
    if let Some(judged) = from_l1(app, cache, key, headers, now_ms) {
        return (judged, None);
    }
    if !synced(app, cache) {
        return (Judged::miss(Missed::Unsynced), None);
    }
    let flights = &cache.flights;
    let redis = match app.shared(cache) {
        Some(shared)
            if flights.cfg().enabled && !cache.decoded.enabled() && !flights.is_pass(key.hash) =>
        {
            shared.redis()
        }
        _ => return (from_store(app, cache, key, headers, now_ms).await, None),
    };
    let hex = key.hex();
    match redis.read_or_lock(&hex, flights.cfg().lock_ttl).await {
        Ok(ReadOrLock::Entry(stored)) => {
            let judged = match decode(app, cache, key, stored) {
                Some(entry) => judge(app, cache, key, entry, headers, now_ms),
                None => Judged::miss(Missed::Corrupt),
            };
            (judged, None)
        }
        Ok(ReadOrLock::Locked(held)) => match flights.try_lead(key.hash) {
            Some(mut permit) => {
                permit.hold_fleet(redis, held, &hex);
                (Judged::miss(Missed::Absent), Some(permit))
            }
            None => {
                let redis = redis.clone();
                cache.tasks.spawn(async move {
                    let _ = redis.unlock(&held).await;
                });
                (Judged::miss(Missed::Absent), None)
            }
        },
        // Another gateway holds the lock: nothing is stored, it is rendering.
        Ok(ReadOrLock::Contended) => (Judged::miss(Missed::Absent), None),
        Err(e) => {
            failed(app, now_ms, &e);
            (Judged::miss(Missed::StoreError), None)
        }
    }
}

/// The L1's answer, if it holds the key: for these `Vary` values, or the slot that has them.
fn from_l1(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> Option<Judged> {
    let entry = cache.l1.get(key.hash, now_ms)?;
    if !vary_matches(&entry, headers) {
        // Another slot's render (or, in a slot, a render that varies on other names now:
        // the store is read, and the fill fixes it).
        return match elsewhere(key, &entry, headers) {
            Judged::Elsewhere(slot) => Some(Judged::Elsewhere(slot)),
            Judged::Found(_) => None,
        };
    }
    Some(Judged::Found(match validity(app, cache, &entry) {
        Validity::Valid => Found::Fresh {
            entry,
            from_l1: true,
        },
        // The store holds the same render: the same verdict.
        Validity::Stale => Found::Stale(entry),
        Validity::Invalid => {
            cache.l1.remove(key.hash);
            Found::Miss(Missed::Invalidated)
        }
    }))
}

/// Where the answer to a request lives when `entry`, stored under `key`, was rendered for
/// other values of the headers it varies on: the primary key's slot for the request's values
/// (a slot's own entry that does not match is a miss: the names it varies on changed).
fn elsewhere(key: &CacheKey, entry: &Entry, headers: &HeaderMap) -> Judged {
    match slot_for(key, entry, headers) {
        Some(slot) => Judged::Elsewhere(slot),
        None => Judged::miss(Missed::Vary),
    }
}

/// The slot of primary `key` for the request's values of the headers `entry` varies on;
/// `None` for a slot key or an entry that varies on nothing beyond the key.
pub fn slot_for(key: &CacheKey, entry: &Entry, headers: &HeaderMap) -> Option<CacheKey> {
    if key.is_slot() {
        return None;
    }
    key::vary_hash(vary_names(entry), headers).map(|h| key.with_vary(h))
}

/// The `Vary` values stored with an entry.
fn vary_names(entry: &Entry) -> impl Iterator<Item = &str> {
    entry
        .meta
        .headers
        .iter()
        .filter(|(n, _)| n == http::header::VARY)
        .filter_map(|(_, v)| v.to_str().ok())
}

/// Whether the store may be read: while invalidations may be missing (just started, or the bus
/// reconnected and they are being read again) a shared entry cannot be judged, so none is
/// read. The L1 holds only what was filled since (it is flushed on reconnect).
fn synced(app: &AppState, cache: &CacheState) -> bool {
    let synced = cache.epochs.is_synced();
    if !synced {
        app.metrics.cache_unsynced_misses.inc();
    }
    synced
}

/// What a stored entry is worth to a request with `headers` at `now_ms` (a fresh one is kept
/// in the L1, even when it answers other `Vary` values: it tells where the request's slot is).
fn judge(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    entry: Arc<Entry>,
    headers: &HeaderMap,
    now_ms: u64,
) -> Judged {
    if !vary_matches(&entry, headers) {
        let fresh = policy::state(&entry.meta.times(), now_ms) == State::Fresh
            && epoch_validity(cache, &entry) == Validity::Valid;
        if fresh {
            cache.l1.insert(key.hash, Arc::clone(&entry), now_ms);
        }
        return elsewhere(key, &entry, headers);
    }
    let state = match (
        policy::state(&entry.meta.times(), now_ms),
        validity(app, cache, &entry),
    ) {
        (_, Validity::Invalid) => return Judged::miss(Missed::Invalidated),
        (State::Expired, _) => return Judged::miss(Missed::Expired),
        // Invalidated softly: at most stale, whatever its own deadlines say; past its
        // stale-while-revalidate window it stays usable only for stale-if-error.
        (State::Fresh, Validity::Stale) => State::Stale,
        (state, _) => state,
    };
    Judged::Found(match state {
        State::Fresh => {
            cache.l1.insert(key.hash, Arc::clone(&entry), now_ms);
            Found::Fresh {
                entry,
                from_l1: false,
            }
        }
        State::Stale => Found::Stale(entry),
        State::StaleIfError => Found::StaleIfError(entry),
        State::Expired => Found::Miss(Missed::Expired),
    })
}

/// The L1's fresh, valid copy for `key` that matches the request's `Vary` values, if it holds
/// one (with the `Vary` slot it was found in, when not the primary key); no store read, no
/// side effects (nothing counted, nothing evicted). The hit lane asks this first; anything
/// short of a plain hit goes through [`lookup`], which decides again.
pub fn l1_fresh(
    cache: &CacheState,
    key: &CacheKey,
    headers: &HeaderMap,
    now_ms: u64,
) -> Option<(Arc<Entry>, Option<CacheKey>)> {
    let mut entry = cache.l1.get(key.hash, now_ms)?;
    let mut slot = None;
    if !vary_matches(&entry, headers) {
        let Judged::Elsewhere(other) = elsewhere(key, &entry, headers) else {
            return None;
        };
        entry = cache.l1.get(other.hash, now_ms)?;
        if !vary_matches(&entry, headers) {
            return None;
        }
        slot = Some(other);
    }
    (epoch_validity(cache, &entry) == Validity::Valid).then_some((entry, slot))
}

/// The entry the store holds for `key`, decoded; or why there is none: nothing stored, a
/// store failure (counted, logged at most every few seconds), bytes that do not decode.
///
/// In strict mode ([`crate::cache::decoded`] enabled) the metadata is read first: when it is
/// exactly the metadata decoded last time for the key, that entry is the answer, without
/// moving its body again; otherwise (and with an L1) the whole entry is read in one command.
async fn read(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    now_ms: u64,
) -> Result<Arc<Entry>, Missed> {
    let store = app.reads(cache);
    let hex = key.hex();
    if cache.decoded.enabled() {
        match store.get_meta(&hex).await {
            Ok(Some(meta)) => {
                if let Some(entry) = cache.decoded.get(key.hash, &meta) {
                    return Ok(entry);
                }
            }
            Ok(None) => return Err(Missed::Absent),
            Err(e) => {
                failed(app, now_ms, &e);
                return Err(Missed::StoreError);
            }
        }
    }
    match store.get(&hex).await {
        Ok(Some(stored)) => decode(app, cache, key, stored).ok_or(Missed::Corrupt),
        Ok(None) => Err(Missed::Absent),
        Err(e) => {
            failed(app, now_ms, &e);
            Err(Missed::StoreError)
        }
    }
}

/// A stored entry decoded (and remembered for strict mode); `None`, counted and logged, when
/// its bytes do not decode (the fill overwrites them).
fn decode(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    stored: Stored,
) -> Option<Arc<Entry>> {
    let meta = match Meta::decode(&stored.meta) {
        Ok(m) => m,
        Err(e) => {
            app.metrics.store_corrupt.inc();
            tracing::warn!(key = %key.text, error = %e, "stored entry does not decode; treating as a miss");
            return None;
        }
    };
    // The body is a slice of the Redis client's read buffer: kept as it is, one small entry
    // in the L1 would hold that whole buffer alive (many times its own size). The L1 is sized
    // by what entries weigh, so an entry owns exactly its bytes.
    let entry = Arc::new(Entry::new(
        meta,
        bytes::Bytes::copy_from_slice(&stored.body),
    ));
    if cache.decoded.enabled() {
        let meta = bytes::Bytes::copy_from_slice(&stored.meta);
        cache.decoded.insert(key.hash, meta, &entry);
    }
    Some(entry)
}

/// A store read that failed: counted, logged at most every few seconds.
fn failed(app: &AppState, now_ms: u64, e: &StoreError) {
    app.metrics.store_errors.inc();
    warn_rate_limited(now_ms, e);
}

/// What the invalidations known to this gateway say of `entry` (nothing counted).
fn epoch_validity(cache: &CacheState, entry: &Entry) -> Validity {
    cache.epochs.check(
        entry.meta.render_epoch,
        entry.meta.tags.iter().map(String::as_str),
    )
}

/// What the invalidations say about an entry (counted when it is no longer valid).
fn validity(app: &AppState, cache: &CacheState, entry: &Entry) -> Validity {
    let v = epoch_validity(cache, entry);
    if v != Validity::Valid {
        app.metrics.cache_invalidated.inc();
    }
    v
}

/// Whether the request has the values of the headers the stored response varies on (beyond
/// those already in the key): the fill records them as a `vary:<hash>` tag exactly when there
/// are any, so an entry without the tag matches at once (the hit path does no `Vary` parsing).
pub fn vary_matches(entry: &Entry, headers: &HeaderMap) -> bool {
    let Some(tag) = vary_tag(entry) else {
        return true;
    };
    // A stored Vary that no longer names an extra header (or a tag that does not parse)
    // matches nothing: refetch.
    let stored = u128::from_str_radix(tag, 16).ok();
    stored.is_some() && key::vary_hash(vary_names(entry), headers) == stored
}

/// The hash of the `Vary` values an entry was stored for; `None` when it varies on nothing
/// beyond the key.
pub fn stored_vary(entry: &Entry) -> Option<u128> {
    vary_tag(entry).and_then(|h| u128::from_str_radix(h, 16).ok())
}

fn vary_tag(entry: &Entry) -> Option<&str> {
    entry
        .meta
        .tags
        .iter()
        .find_map(|t| t.strip_prefix(VARY_TAG))
}

fn warn_rate_limited(now_ms: u64, e: &dyn std::fmt::Display) {
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let last = LAST_MS.load(Relaxed);
    if now_ms.saturating_sub(last) >= 10_000
        && LAST_MS
            .compare_exchange(last, now_ms, Relaxed, Relaxed)
            .is_ok()
    {
        tracing::warn!(error = %e, "cache store unavailable; serving from L1 and replicas (logged at most every 10 s)");
    }
}
