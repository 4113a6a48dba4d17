//! Keeping entries: the L1 and the store (the store first when an entry is replaced), then
//! the announcement to the other gateways; never back in time (an entry rendered before the
//! one held, here or in the store, replaces neither).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{AppState, CacheState};
use crate::bus::Kind;
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::store::{Put, Stored};
use crate::proxy::lookup::stored_vary;

/// Puts a new entry in the L1 and the store, and tells the other gateways (they drop their L1
/// copy and read the new entry). Never back in time: an entry rendered before the one already
/// held (here or in the store) replaces neither. A store write that fails is counted; the
/// entry stays in this gateway's L1. `replaces`: see [`keep_all`].
pub async fn keep(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    entry: &Arc<Entry>,
    ttl: std::time::Duration,
    replaces: bool,
) {
    keep_all(app, cache, &[(key, entry, ttl)], replaces).await;
}

/// [`keep`] for entries of one render (a page's HTML and RSC): every store write in one
/// pipeline, which Redis runs back to back, so readers anywhere see the page's variants change
/// together; then the announcements. Each entry is kept under its [`homes`].
///
/// A fill that `replaces` entries writes the store before the L1 (and drops this gateway's
/// copies meanwhile): no gateway serves the new render before the fleet can read it, or
/// another gateway would answer with the previous render after it. A first fill has nothing
/// older anywhere, so its L1 copy comes first: this gateway serves it at once, even with the
/// store down.
pub(super) async fn keep_all(
    app: &AppState,
    cache: &CacheState,
    entries: &[(&CacheKey, &Arc<Entry>, Duration)],
    replaces: bool,
) {
    let mut all = Vec::with_capacity(entries.len() * 2);
    for (key, entry, ttl) in entries {
        let (primary, slot) = homes(key, entry);
        all.push((primary, *entry, *ttl));
        if let Some(slot) = slot {
            all.push((Cow::Owned(slot), *entry, *ttl));
        }
    }
    all.retain(|(key, entry, _)| !newer_here(app, cache, key, entry));
    for (key, entry, _) in &all {
        if replaces {
            cache.l1.remove(key.hash);
        } else {
            hold(app, cache, key, entry);
        }
    }
    let written = put_all(app, cache, &all).await;
    let mut stored = Vec::with_capacity(all.len());
    let mut dropped = Vec::new();
    for ((key, entry, ttl), written) in all.iter().zip(written) {
        if replaces && written != Written::Older {
            hold(app, cache, key, entry);
        }
        if written == Written::Stored {
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

/// What became of one store write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// The entry is in the store now.
    Stored,
    /// A newer render of the key is there: ours is not kept anywhere.
    Older,
    /// The store did not answer: the entry stays in this gateway's L1 and a later hit writes it
    /// again ([`write_back`]).
    Failed,
}

/// Writes `entries` to the store in one pipeline; what became of each, in order. An entry a
/// newer render beat leaves the L1 (readers read the newer one); one the store did not take is
/// remembered for [`write_back`].
async fn put_all(
    app: &AppState,
    cache: &CacheState,
    entries: &[(Cow<'_, CacheKey>, &Arc<Entry>, Duration)],
) -> Vec<Written> {
    let puts = entries
        .iter()
        .map(|(key, entry, ttl)| Put {
            key_hex: key.hex(),
            entry: Stored {
                meta: entry.meta.encode(),
                body: entry.gzip.clone(),
            },
            rendered_at_ms: entry.meta.stored_at_ms,
            ttl: *ttl,
        })
        .collect();
    match cache.store.put_all(puts).await {
        Ok(written) => written
            .into_iter()
            .zip(entries)
            .map(|(stored, (key, _, _))| {
                if stored {
                    app.metrics.cache_stores.inc();
                    Written::Stored
                } else {
                    app.metrics.fills_older.inc();
                    cache.l1.remove(key.hash);
                    Written::Older
                }
            })
            .collect(),
        Err(e) => {
            app.metrics.store_errors.inc();
            tracing::debug!(error = %e, "store write failed; the entries stay in this gateway's L1 and are written again when the store answers");
            for (key, _, _) in entries {
                cache.l1.mark_unstored(key.hash);
            }
            vec![Written::Failed; entries.len()]
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
        let written = put_all(&app, &cache, &[(Cow::Borrowed(&key), &entry, ttl)]).await;
        if written == [Written::Stored] {
            app.metrics.store_write_backs.inc();
            cache.announce(Kind::Filled, key.hex(), &app.metrics).await;
        }
    });
}

/// Whether the L1 holds a later render of the key than `entry` (counted: `entry` is not kept).
fn newer_here(app: &AppState, cache: &CacheState, key: &CacheKey, entry: &Entry) -> bool {
    let rendered_at = entry.meta.stored_at_ms;
    let newer = cache
        .l1
        .get(key.hash, rendered_at)
        .is_some_and(|held| held.meta.stored_at_ms > rendered_at);
    if newer {
        app.metrics.fills_older.inc();
    }
    newer
}

/// Puts `entry` in the L1 unless it holds a later render of the key.
fn hold(app: &AppState, cache: &CacheState, key: &CacheKey, entry: &Arc<Entry>) {
    if newer_here(app, cache, key, entry) {
        return;
    }
    let rendered_at = entry.meta.stored_at_ms;
    cache.l1.insert(key.hash, Arc::clone(entry), rendered_at);
    cache.flights.stored(key.hash);
    cache.recent.record(&entry.meta.tags);
}
