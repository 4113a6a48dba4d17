//! Stale-while-revalidate: a stale entry is served at once and refreshed in the background.
//!
//! Receives the key and the upstream head of the request that found the entry stale; runs one
//! fill in its own task, so no client waits for it. At most one refresh per key runs in the
//! fleet: one per gateway (the refreshing set), and only the gateway that takes the key's fill
//! lock (`coalesce::refresh_lease`); the others keep serving stale and queue nothing. At most
//! `cache.max_background_refreshes` run at once per gateway: past that, a stale entry is served
//! without starting another refresh (a later request will).

use std::sync::Arc;

use http::request::Parts;

use super::lookup::{self, Found};
use super::{coalesce, fill};
use crate::app::{AppState, CacheState};
use crate::cache::key::{CacheKey, Variant};

/// Removes the key from the refreshing set when the refresh ends, however it ends.
struct Refreshing {
    cache: Arc<CacheState>,
    hash: u128,
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        let mut set = self
            .cache
            .refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.remove(&self.hash);
    }
}

/// Starts a background refresh of `key` unless one is running or the bound is reached.
pub fn spawn(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: CacheKey,
    head: Parts,
    variant: Variant,
) {
    let Ok(permit) = Arc::clone(&cache.refresh_permits).try_acquire_owned() else {
        return;
    };
    {
        let mut set = cache.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key.hash) {
            return;
        }
    }
    let guard = Refreshing {
        cache: Arc::clone(cache),
        hash: key.hash,
    };
    let (app, cache) = (Arc::clone(app), Arc::clone(cache));
    tokio::spawn(async move {
        let _permit = permit;
        let _guard = guard;
        let Some(lease) = coalesce::refresh_lease(&app, &cache, &key).await else {
            app.metrics.refreshes_elsewhere.inc();
            return;
        };
        // Another gateway may have refreshed it just before we took the lock.
        let now = cache.clock.now_ms();
        if let Found::Fresh { .. } = lookup::lookup(&app, &cache, &key, &head.headers, now).await {
            lease.end(&app, &cache, &key.hex(), None).await;
            return;
        }
        app.metrics.refreshes.inc();
        let write = fill::Write::Awaited;
        let filled = fill::fill(&app, &cache, &key, head, &variant, now, write).await;
        lease.end(&app, &cache, &key.hex(), None).await;
        match filled {
            Ok(fill::Filled::Stored(_)) => {}
            // A definitive answer that may not be stored (unpublished: a private 404; made
            // personal: Set-Cookie): the stale copy must not outlive it.
            Ok(fill::Filled::Passed(resp, _)) if !resp.status().is_server_error() => {
                forget(&app, &cache, &key).await;
            }
            Ok(fill::Filled::Passed(..)) => {
                tracing::debug!(key = %key.text, "background refresh got a server error; the stale entry stays");
            }
            Err(e) => {
                tracing::debug!(key = %key.text, error = %e, "background refresh failed; the stale entry stays");
            }
        }
    });
}

/// Removes `key` everywhere: this gateway's L1, the store, and (through the bus) every other
/// gateway's L1.
async fn forget(app: &AppState, cache: &CacheState, key: &CacheKey) {
    cache.l1.remove(key.hash);
    let hex = key.hex();
    if let Err(e) = cache.store.delete(&hex).await {
        app.metrics.store_errors.inc();
        tracing::debug!(error = %e, "could not delete an entry that may no longer be stored");
        return;
    }
    cache
        .announce(crate::bus::Kind::Filled, hex, &app.metrics)
        .await;
}
