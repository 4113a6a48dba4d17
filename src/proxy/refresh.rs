//! Stale-while-revalidate: a stale entry is served at once and refreshed in the background.
//!
//! Receives the key and the upstream head of the request that found the entry stale; runs one
//! fill in its own task, so no client waits for it. At most one refresh per key runs on a
//! gateway (the refreshing set; the fleet-wide lock comes with coalescing), and at most
//! `cache.max_background_refreshes` at once: past that, a stale entry is served without
//! starting another refresh (a later request will).

use std::sync::Arc;

use http::request::Parts;

use super::fill;
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
    app.metrics.refreshes.inc();
    let (app, cache) = (Arc::clone(app), Arc::clone(cache));
    tokio::spawn(async move {
        let _permit = permit;
        let _guard = guard;
        let now = super::cached::now_ms();
        let write = fill::Write::Awaited;
        match fill::fill(&app, &cache, &key, head, &variant, now, write).await {
            Ok(fill::Filled::Stored(_)) => {}
            // A definitive answer that may not be stored (unpublished: a private 404; made
            // personal: Set-Cookie): the stale copy must not outlive it.
            Ok(fill::Filled::Passed(resp)) if !resp.status().is_server_error() => {
                forget(&app, &cache, &key).await;
            }
            Ok(fill::Filled::Passed(_)) => {
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
    cache.announce(hex, &app.metrics).await;
}
