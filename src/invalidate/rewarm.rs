//! Re-warm: after an invalidation, render the named paths again before a user asks, so the next
//! request is a hit on the new version. Each path's HTML, then its RSC variant (one App Router
//! render gives both; NEXTJS.md §9 rule 16), through the same fill as a background refresh:
//! it takes the key's fleet lock, so a gateway already refreshing the key is not doubled
//! (reported as `elsewhere`), and the write is awaited, so a 200 from the webhook means the
//! entries are in the store.
//!
//! The key's host is the webhook request's `Host` (the public host when the CMS calls through
//! the load balancer). Paths reached only through a tag are not re-warmed (there is no
//! tag → paths index yet): their next request refreshes them.

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
    /// `stored`, `not-stored` (the answer may not be cached), `failed` or `elsewhere`
    /// (another gateway was rendering it).
    pub outcome: &'static str,
    /// The replica's status, when it answered.
    pub status: Option<u16>,
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
    let Some(lease) = coalesce::refresh_lease(app, cache, &key).await else {
        result.outcome = "elsewhere";
        return result;
    };
    let up = fill::upstream_head(&head, &variant);
    let now = crate::proxy::cached::now_ms();
    let filled = fill::fill(app, cache, &key, up, &variant, now, fill::Write::Awaited).await;
    lease.end(app, cache, &key.hex(), None).await;
    match filled {
        Ok(fill::Filled::Stored(entry)) => {
            result.outcome = "stored";
            result.status = Some(entry.meta.status);
        }
        Ok(fill::Filled::Passed(resp, _)) => {
            result.outcome = "not-stored";
            result.status = Some(resp.status().as_u16());
        }
        Err(e) => tracing::debug!(path, error = %e, "re-warm failed"),
    }
    result
}
