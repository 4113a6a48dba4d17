//! Re-warm: after an invalidation, render the named paths again before a user asks, so the next
//! request is a hit on the new version. Each path's HTML, then its RSC variant (one App Router
//! render gives both; NEXTJS.md §9 rule 16), through the same fill as a background refresh:
//! it takes the key's fleet lock, so a gateway already refreshing the key is not doubled
//! (reported as `elsewhere`), and the write is awaited, so a 200 from the webhook means the
//! entries are in the store.
//!
//! With `ISRGATE_PREVIEW_MODE_ID` (the build's `previewModeId`, from
//! `.next/prerender-manifest.json`) the requests carry `x-prerender-revalidate`, so the
//! replica renders afresh, and only an answer marked `x-nextjs-cache: REVALIDATED` is stored.
//!
//! The key's host is the webhook request's `Host` (the public host when the CMS calls through
//! the load balancer). Paths reached through a tag are re-warmed when this gateway stored
//! them recently (`cache::tags::RecentPaths`); others refresh on their next request.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, header};

use crate::app::{AppState, CacheState};
use crate::cache::key::{CacheKey, Variant};
use crate::proxy::{coalesce, fill};

/// How re-warming one variant of a path ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rewarmed {
    /// The path.
    pub path: String,
    /// `html` or `rsc`.
    pub variant: &'static str,
    /// `stored`, `not-stored` (the answer may not be cached), `not-revalidated` (the replica
    /// answered from its own cache), `failed`, or `elsewhere` (another render held the key
    /// for a whole lock lifetime).
    pub outcome: &'static str,
    /// The replica's status, when it answered.
    pub status: Option<u16>,
}

/// How often a re-warm retries a key whose lock another render holds.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(25);

/// Most paths re-warmed by one call.
pub const MAX_PATHS: usize = 256;

/// What to re-warm: the paths named, then paths recently stored under the tags named (this
/// gateway's index), at most [`MAX_PATHS`].
pub fn targets(cache: &CacheState, r: &crate::invalidate::webhook::Revalidation) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    let from_tags = r
        .tags
        .iter()
        .flat_map(|t| cache.recent.paths(t).into_iter().rev());
    for p in r.paths.iter().cloned().chain(from_tags) {
        let p = crate::cache::tags::page_path(&p).to_owned();
        if paths.len() == MAX_PATHS {
            break;
        }
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

/// Re-renders `paths` for `host`, `concurrency` paths at a time.
pub async fn rewarm(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    host: &str,
    paths: &[String],
    concurrency: usize,
) -> Vec<Rewarmed> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut jobs = tokio::task::JoinSet::new();
    for (i, path) in paths.iter().enumerate() {
        let (app, cache, permits) = (Arc::clone(app), Arc::clone(cache), Arc::clone(&permits));
        let (host, path) = (host.to_owned(), path.clone());
        jobs.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut done = Vec::with_capacity(2);
            for variant in [Variant::Html, Variant::Rsc] {
                done.push(one(&app, &cache, &host, &path, variant).await);
            }
            (i, done)
        });
    }
    let mut all = jobs.join_all().await;
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().flat_map(|(_, d)| d).collect()
}

async fn one(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    host: &str,
    path: &str,
    variant: Variant,
) -> Rewarmed {
    let name = if variant == Variant::Html {
        "html"
    } else {
        "rsc"
    };
    let mut result = Rewarmed {
        path: path.to_owned(),
        variant: name,
        outcome: "failed",
        status: None,
    };
    let Ok(mut req) = Request::builder().method(Method::GET).uri(path).body(()) else {
        return result;
    };
    if let Ok(h) = HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, h);
    }
    if variant == Variant::Rsc {
        req.headers_mut().insert(
            http::HeaderName::from_static("rsc"),
            HeaderValue::from_static("1"),
        );
    }
    let (head, ()) = req.into_parts();
    let key = CacheKey::new(&cache.cfg.namespace, host, path, None, &variant);
    // A render holding the key's lock may have started before the purge (then its entry is
    // already stale): wait for it, up to one lock lifetime, rather than skip.
    let give_up = tokio::time::Instant::now() + cache.cfg.coalesce.lock_ttl;
    let lease = loop {
        if let Some(lease) = coalesce::refresh_lease(app, cache, &key).await {
            break lease;
        }
        if tokio::time::Instant::now() >= give_up {
            result.outcome = "elsewhere";
            return result;
        }
        tokio::time::sleep(LOCK_RETRY).await;
    };
    let mut up = fill::upstream_head(&head, &variant);
    if let Some(id) = &app.config.webhook.preview_mode_id {
        up.headers.insert(PRERENDER_REVALIDATE.clone(), id.clone());
    }
    let now = cache.clock.now_ms();
    let outcome = render(app, cache, &key, up, &variant, now).await;
    lease.end(app, cache, &key.hex(), None).await;
    match outcome {
        Ok((outcome, status)) => (result.outcome, result.status) = (outcome, Some(status)),
        Err(e) => tracing::debug!(path, error = %e, "re-warm failed"),
    }
    result
}

/// Next's on-demand revalidation header (NEXTJS.md §4): with the build's `previewModeId` the
/// replica renders afresh instead of answering from its own (maybe stale) cache.
static PRERENDER_REVALIDATE: http::HeaderName =
    http::HeaderName::from_static("x-prerender-revalidate");

/// Renders and stores one variant; with a preview mode id, only an answer the replica marks
/// `x-nextjs-cache: REVALIDATED` (a fresh render, not its old copy) is stored.
async fn render(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    up: http::request::Parts,
    variant: &Variant,
    now: u64,
) -> Result<(&'static str, u16), crate::error::ProxyError> {
    let (pending, body) = match fill::request(app, cache, key, up, variant).await? {
        fill::Answer::Storable(p, b) => (p, b),
        fill::Answer::Pass { response, .. } => {
            return Ok(("not-stored", response.status().as_u16()));
        }
    };
    let status = pending.status().as_u16();
    if app.config.webhook.preview_mode_id.is_some() && !pending.revalidated() {
        return Ok(("not-revalidated", status));
    }
    let max = cache.cfg.max_entry_bytes;
    match fill::copy(body, None, max, || {}).await? {
        fill::Copied::Whole(identity) => {
            let entry = pending.entry(identity, now, &cache.cfg, cache.seal_fills());
            fill::keep(app, cache, key, &entry, pending.ttl(), fill::Write::Awaited).await;
            Ok(("stored", status))
        }
        fill::Copied::TooLarge => Ok(("not-stored", status)),
    }
}
