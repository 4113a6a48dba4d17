//! Re-warm: after an invalidation, render the named paths again before a user asks, so the next
//! request is a hit on the new version. Each path's HTML, then its RSC variant (one App Router
//! render gives both; NEXTJS.md §9 rule 16), through the fill pipeline like any other fill: it
//! joins the key's flight (a fill already running is waited for, woken by its end, not
//! polled; one that stored a valid entry meanwhile is reported as `elsewhere`), and the fill
//! ends once the entry is in the store, so a 200 from the webhook means the entries are there.
//!
//! A re-warm replaces: with the build's `previewModeId` known the replica is asked to
//! regenerate (`x-prerender-revalidate`), and a copy from its own cache is never stored
//! (`not-revalidated`).
//!
//! The key's host is the webhook request's `Host` (the public host when the CMS calls through
//! the load balancer). Paths reached through a tag are re-warmed when this gateway stored
//! them recently (`cache::tags::RecentPaths`); others refresh on their next request.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, header};

use crate::app::{AppState, CacheState};
use crate::cache::key::{CacheKey, Variant};
use crate::proxy::coalesce::{self, Turn, Wait};
use crate::proxy::fill::{self, Client, Filled, Job};

/// How re-warming one variant of a path ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rewarmed {
    /// The path.
    pub path: String,
    /// `html` or `rsc`.
    pub variant: &'static str,
    /// `stored`, `not-stored` (the answer may not be cached), `not-revalidated` (the replica
    /// answered from its own cache), `failed`, or `elsewhere` (a fill that started after the
    /// purge stored it meanwhile).
    pub outcome: &'static str,
    /// The replica's status, when it answered.
    pub status: Option<u16>,
}

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
    let head = fill::upstream_head(&head, &variant);
    // A fill in progress may have started before the purge (then its entry is already stale,
    // and this one fills after it): wait for it rather than skip.
    let permit = match coalesce::turn(app, cache, &key, &head.headers, Wait::Follow).await {
        Turn::Fill(permit) => permit,
        Turn::Filled(entry) => {
            (result.outcome, result.status) = ("elsewhere", Some(entry.meta.status));
            return result;
        }
        Turn::Pass | Turn::Busy => {
            result.outcome = "not-stored";
            return result;
        }
    };
    let job = Job {
        key: &key,
        variant: &variant,
        head,
        client: Client::Nobody,
        replaces: true,
    };
    match fill::fill(app, cache, job, permit).await {
        Ok(Filled::Stored(entry)) => {
            (result.outcome, result.status) = ("stored", Some(entry.meta.status));
        }
        Ok(Filled::Passed { response, why }) => {
            (result.outcome, result.status) = (why.as_str(), Some(response.status().as_u16()));
        }
        Ok(Filled::Streaming(_)) => {}
        Err(e) => tracing::debug!(path, error = %e, "re-warm failed"),
    }
    result
}
