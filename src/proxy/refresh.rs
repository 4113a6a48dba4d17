//! Stale-while-revalidate: a stale entry is served at once and refreshed in the background.
//!
//! Receives the key and the upstream head of the request that found the entry stale; runs one
//! fill in a tracked task of its own, so no client waits for it. The refresh joins the key's
//! flight like a miss (`coalesce::turn` with [`Wait::Skip`]): when the key is already being
//! filled on this gateway or another (its fleet lock is held), it does nothing and the entry
//! keeps being served stale until that fill lands. At most `cache.max_background_refreshes`
//! run at once per gateway: past that, a stale entry is served without starting another
//! refresh (a later request will).

use std::sync::Arc;

use http::request::Parts;

use super::coalesce::{self, Turn, Wait};
use super::fill::{self, Client, Filled, Job, Pass};
use crate::app::{AppState, CacheState};
use crate::cache::key::{CacheKey, Variant};

/// Starts a background refresh of `key` unless the bound is reached.
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
    let (app, cache) = (Arc::clone(app), Arc::clone(cache));
    let tasks = cache.tasks.clone();
    tasks.spawn(async move {
        let _permit = permit;
        refresh(&app, &cache, &key, head, &variant).await;
    });
}

async fn refresh(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    head: Parts,
    variant: &Variant,
) {
    let permit = match coalesce::turn(app, cache, key, &head.headers, Wait::Skip).await {
        Turn::Fill(permit) => permit,
        // Refreshed just before by another request, here or on another gateway.
        Turn::Filled(_) | Turn::Pass => return,
        Turn::Busy => {
            app.metrics.refreshes_elsewhere.inc();
            return;
        }
    };
    app.metrics.refreshes.inc();
    let job = Job {
        key,
        variant,
        head,
        client: Client::Nobody,
        replaces: true,
    };
    match fill::fill(app, cache, job, permit).await {
        Ok(Filled::Stored(_) | Filled::Streaming(_)) => {}
        // A definitive answer that may not be stored (unpublished: a private 404; made
        // personal: Set-Cookie): the stale copy must not outlive it.
        Ok(Filled::Passed {
            why: Pass::Uncacheable,
            ..
        }) => forget(app, cache, key).await,
        Ok(Filled::Passed { why, .. }) => {
            tracing::debug!(key = %key.text, why = why.as_str(), "background refresh stored nothing; the stale entry stays");
        }
        Err(e) => {
            tracing::debug!(key = %key.text, error = %e, "background refresh failed; the stale entry stays");
        }
    }
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
