//! Keeping entries: the L1, then the store, then the announcement to the other gateways;
//! never back in time (an entry rendered before the one held, here or in the store, replaces
//! neither).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{AppState, CacheState};
use crate::bus::Kind;
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::store::Stored;
use crate::proxy::lookup::stored_vary;

/// Puts a new entry in the L1 and the store, and tells the other gateways (they drop their L1
/// copy and read the new entry). Never back in time: an entry rendered before the one already
/// held (here or in the store) replaces neither. A store write that fails is counted; the
/// entry stays in this gateway's L1.
pub async fn keep(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    entry: &Arc<Entry>,
    ttl: std::time::Duration,
) {
    keep_all(app, cache, &[(key, entry, ttl)]).await;
}

/// [`keep`] for entries of one render (a page's HTML and RSC), as nearly together as the
/// store allows: every L1 copy first, then every store write, then every announcement, so
/// no gateway holds one of them new and the other old for longer than those writes take.
/// Each entry is kept under its [`homes`].
pub(super) async fn keep_all(
    app: &AppState,
    cache: &CacheState,
    entries: &[(&CacheKey, &Arc<Entry>, Duration)],
) {
    let mut all = Vec::with_capacity(entries.len() * 2);
    for (key, entry, ttl) in entries {
        let (primary, slot) = homes(key, entry);
        all.push((primary, *entry, *ttl));
        if let Some(slot) = slot {
            all.push((Cow::Owned(slot), *entry, *ttl));
        }
    }
    let held: Vec<_> = all
        .iter()
        .filter(|(key, entry, _)| hold(app, cache, key, entry))
        .collect();
    let mut stored = Vec::with_capacity(held.len());
    let mut dropped = Vec::new();
    for (key, entry, ttl) in held {
        if put(app, cache, key, entry, *ttl).await {
            stored.push(key.hex());
            if key.is_slot() {
                dropped.extend(track(app, cache, key, *ttl).await);
            }
        }
    }
    for hex in stored {
        cache.announce(Kind::Filled, hex, &app.metrics).await;
    }
    for hex in dropped {
        drop_slot(app, cache, hex).await;
    }
}

/// Where an entry is kept: under its URL's primary key (which holds the latest render,
/// whichever `Vary` values it was made for: every gateway learns the names from it) and, when
/// it varies on request headers beyond the key, also under the slot of its values, where
/// requests with those values find it whatever was rendered after it for others.
fn homes<'k>(key: &'k CacheKey, entry: &Entry) -> (Cow<'k, CacheKey>, Option<CacheKey>) {
    let vary = stored_vary(entry);
    let primary = if key.is_slot() {
        Cow::Owned(key.primary_key())
    } else {
        Cow::Borrowed(key)
    };
    let slot = vary.map(|h| primary.with_vary(h));
    (primary, slot)
}

/// Records a slot just stored in its primary key's list; the slots past `cache.max_variants`
/// that it pushed out.
async fn track(app: &AppState, cache: &CacheState, slot: &CacheKey, ttl: Duration) -> Vec<String> {
    let primary = format!("{:032x}", slot.primary);
    let max = cache.cfg().max_variants;
    match cache
        .store
        .track_slot(&primary, &slot.hex(), max, ttl)
        .await
    {
        Ok(dropped) => dropped,
        Err(e) => {
            app.metrics.store_errors.inc();
            tracing::debug!(error = %e, "could not record a Vary slot; it lives until its TTL");
            Vec::new()
        }
    }
}

/// Removes a slot pushed out of its URL's list: here, in the store, and (through the bus)
/// from every gateway's L1.
async fn drop_slot(app: &AppState, cache: &CacheState, hex: String) {
    if let Ok(hash) = u128::from_str_radix(&hex, 16) {
        cache.l1.remove(hash);
    }
    if let Err(e) = cache.store.delete(&hex).await {
        app.metrics.store_errors.inc();
        tracing::debug!(error = %e, "could not delete a dropped Vary slot; it lives until its TTL");
    }
    cache.announce(Kind::Filled, hex, &app.metrics).await;
    app.metrics.cache_variants_dropped.inc();
}

/// Writes `entry` to the store; `true` when it is there now. A newer render already there
/// wins (ours leaves the L1 too); a failed write is remembered so a later hit writes it again
/// ([`write_back`]).
async fn put(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    entry: &Arc<Entry>,
    ttl: Duration,
) -> bool {
    let bytes = Stored {
        meta: entry.meta.encode(),
        body: entry.gzip.clone(),
    };
    match cache
        .store
        .put(&key.hex(), bytes, entry.meta.stored_at_ms, ttl)
        .await
    {
        Ok(true) => {
            app.metrics.cache_stores.inc();
            true
        }
        Ok(false) => {
            // A newer render got there first: drop ours here too, read theirs.
            app.metrics.fills_older.inc();
            cache.l1.remove(key.hash);
            false
        }
        Err(e) => {
            app.metrics.store_errors.inc();
            cache.l1.mark_unstored(key.hash);
            tracing::debug!(error = %e, "store write failed; the entry stays in this gateway's L1 and is written again when the store answers");
            false
        }
    }
}

/// Writes an L1 entry whose store write failed (Redis was down) once the store answers
/// again, on one of its hits: nothing this gateway rendered is lost to the fleet, and the
/// other gateways stop rendering it for themselves. In a tracked task; one at a time per key.
pub fn write_back(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    entry: &Arc<Entry>,
) {
    if !cache.l1.take_unstored(key.hash) {
        return;
    }
    if !cache.store.is_available() {
        cache.l1.mark_unstored(key.hash);
        return;
    }
    let until = entry
        .meta
        .stale_until_ms
        .max(entry.meta.stale_if_error_until_ms);
    let ttl = Duration::from_millis(until.saturating_sub(cache.clock.now_ms()));
    if ttl.is_zero() {
        return;
    }
    let (app, cache, key, entry) = (
        Arc::clone(app),
        Arc::clone(cache),
        key.clone(),
        Arc::clone(entry),
    );
    let tasks = cache.tasks.clone();
    tasks.spawn(async move {
        if put(&app, &cache, &key, &entry, ttl).await {
            app.metrics.store_write_backs.inc();
            cache.announce(Kind::Filled, key.hex(), &app.metrics).await;
        }
    });
}

/// Puts `entry` in the L1 unless it holds a later render of the key; `false` then.
fn hold(app: &AppState, cache: &CacheState, key: &CacheKey, entry: &Arc<Entry>) -> bool {
    let rendered_at = entry.meta.stored_at_ms;
    let newer_here = cache
        .l1
        .get(key.hash, rendered_at)
        .is_some_and(|held| held.meta.stored_at_ms > rendered_at);
    if newer_here {
        app.metrics.fills_older.inc();
        return false;
    }
    cache.l1.insert(key.hash, Arc::clone(entry), rendered_at);
    cache.flights.stored(key.hash);
    cache.recent.record(&entry.meta.tags);
    true
}
