//! Keeping entries: the L1, then the store, then the announcement to the other gateways;
//! never back in time (an entry rendered before the one held, here or in the store, replaces
//! neither).

use std::sync::Arc;

use crate::app::{AppState, CacheState};
use crate::bus::Kind;
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::store::Stored;

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
pub(super) async fn keep_all(
    app: &AppState,
    cache: &CacheState,
    entries: &[(&CacheKey, &Arc<Entry>, std::time::Duration)],
) {
    let held: Vec<_> = entries
        .iter()
        .filter(|(key, entry, _)| hold(app, cache, key, entry))
        .collect();
    let mut stored = Vec::with_capacity(held.len());
    for (key, entry, ttl) in held {
        let rendered_at = entry.meta.stored_at_ms;
        let hex = key.hex();
        let bytes = Stored {
            meta: entry.meta.encode(),
            body: entry.gzip.clone(),
        };
        match cache.store.put(&hex, bytes, rendered_at, *ttl).await {
            Ok(true) => {
                app.metrics.cache_stores.inc();
                stored.push(hex);
            }
            Ok(false) => {
                // A newer render got there first: drop ours here too, read theirs.
                app.metrics.fills_older.inc();
                cache.l1.remove(key.hash);
            }
            Err(e) => {
                app.metrics.store_errors.inc();
                tracing::debug!(error = %e, "store write failed; the entry stays in this gateway's L1");
            }
        }
    }
    for hex in stored {
        cache.announce(Kind::Filled, hex, &app.metrics).await;
    }
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
