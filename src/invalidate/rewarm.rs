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
use crate::proxy::fill::{self, Filled, Job, Pass, Sibling, SiblingFilled};
use crate::proxy::refresh::as_variant;

/// How re-warming one variant of a path ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rewarmed {
    /// The path.
    pub path: String,
    /// Which of the page's two renders.
    pub variant: Kind,
    /// How it ended.
    pub outcome: Outcome,
    /// The replica's status, when it answered.
    pub status: Option<u16>,
}

/// A page's HTML or its RSC payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `html`.
    Html,
    /// `rsc`.
    Rsc,
}

impl Kind {
    /// The name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Html => "html",
            Kind::Rsc => "rsc",
        }
    }
}

/// How a re-warm ended (`as_str`: its name in the report and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Rendered and stored.
    Stored,
    /// The answer may not be cached (private, `Set-Cookie`, no-store…).
    NotStored,
    /// The replica answered from its own cache: not a render newer than the purge.
    NotRevalidated,
    /// A replica of another build answered.
    OtherBuild,
    /// No answer, or a server error.
    Failed,
    /// A fill that started after the purge stored it meanwhile.
    Elsewhere,
}

impl Outcome {
    /// The name in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::NotStored => "not-stored",
            Outcome::NotRevalidated => "not-revalidated",
            Outcome::OtherBuild => "other-build",
            Outcome::Failed => "failed",
            Outcome::Elsewhere => "elsewhere",
        }
    }
}

impl From<Pass> for Outcome {
    fn from(why: Pass) -> Outcome {
        match why {
            Pass::Uncacheable => Outcome::NotStored,
            Pass::Failed => Outcome::Failed,
            Pass::Copy => Outcome::NotRevalidated,
            Pass::OtherBuild => Outcome::OtherBuild,
        }
    }
}

/// Most paths re-warmed by one call.
pub const MAX_PATHS: usize = 256;

/// What to re-warm: the paths named, then paths recently stored under the tags named (this
/// gateway's index), at most [`MAX_PATHS`].
pub fn targets(cache: &CacheState, r: &crate::invalidate::webhook::Revalidation) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    let from_tags = r.tags.iter().flat_map(|t| {
        let t = crate::cache::tags::canonical_tag(t);
        cache.recent.paths(&t).into_iter().rev()
    });
    for p in r.paths.iter().cloned().chain(from_tags) {
        let p = crate::cache::tags::page_path(&p).into_owned();
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
            (i, page(&app, &cache, &host, &path).await)
        });
    }
    let mut all = jobs.join_all().await;
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().flat_map(|(_, d)| d).collect()
}

/// Re-warms one path: its HTML, and its RSC from the same render (`fill::Sibling`); the RSC on
/// its own only when the HTML produced no render to take it from.
async fn page(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    host: &str,
    path: &str,
) -> Vec<Rewarmed> {
    let Some(mut html_head) = head(host, path) else {
        return vec![failed(path, Kind::Html), failed(path, Kind::Rsc)];
    };
    // Into the current build's namespace, from its replicas.
    app.deploy.pin(&mut html_head);
    let rsc_head = as_variant(&html_head, &Variant::Rsc);
    let html_key = crate::proxy::cached::key(cache, &html_head, &Variant::Html);
    let rsc_key = crate::proxy::cached::key(cache, &rsc_head, &Variant::Rsc);
    let sibling = Sibling {
        key: &rsc_key,
        variant: &Variant::Rsc,
        head: as_variant(&html_head, &Variant::Rsc),
    };
    let (html, rsc) = one(
        app,
        cache,
        (&html_key, &Variant::Html, html_head),
        path,
        Some(sibling),
    )
    .await;
    let rsc = match rsc {
        Some(rsc) => rsc,
        None => {
            one(app, cache, (&rsc_key, &Variant::Rsc, rsc_head), path, None)
                .await
                .0
        }
    };
    vec![html, rsc]
}

fn failed(path: &str, variant: Kind) -> Rewarmed {
    Rewarmed {
        path: path.to_owned(),
        variant,
        outcome: Outcome::Failed,
        status: None,
    }
}

/// The upstream head of a re-warm of `path`'s HTML for `host`.
fn head(host: &str, path: &str) -> Option<http::request::Parts> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .body(())
        .ok()?;
    if let Ok(h) = HeaderValue::from_str(host) {
        req.headers_mut().insert(header::HOST, h);
    }
    let (head, ()) = req.into_parts();
    Some(fill::upstream_head(&head, &Variant::Html))
}

/// Re-warms one key through the fill pipeline; with the sibling's result when it had one.
async fn one(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    (key, variant, head): (&CacheKey, &Variant, http::request::Parts),
    path: &str,
    sibling: Option<Sibling<'_>>,
) -> (Rewarmed, Option<Rewarmed>) {
    let name = |v: &Variant| {
        if *v == Variant::Html {
            Kind::Html
        } else {
            Kind::Rsc
        }
    };
    let mut result = failed(path, name(variant));
    // A fill in progress may have started before the purge (then its entry is already stale,
    // and this one fills after it): wait for it rather than skip.
    let permit = match coalesce::turn(app, cache, key, &head.headers, Wait::Follow, 0).await {
        Turn::Fill(permit) => permit,
        // The fill waited for rendered for other `Vary` values: render this one too.
        Turn::Elsewhere(_) => None,
        Turn::Filled(entry) => {
            (result.outcome, result.status) = (Outcome::Elsewhere, Some(entry.meta.status));
            return (result, None);
        }
        Turn::Pass | Turn::Busy => {
            result.outcome = Outcome::NotStored;
            return (result, None);
        }
    };
    let sibling_variant = sibling.as_ref().map(|s| name(s.variant));
    let job = Job::replacing(key, variant, head, sibling);
    let mut sibling_result = None;
    match fill::fill(app, cache, job, permit).await {
        Ok(Filled::Stored(entry, sibling)) => {
            (result.outcome, result.status) = (Outcome::Stored, Some(entry.meta.status));
            sibling_result = sibling
                .zip(sibling_variant)
                .map(|(s, v)| sibling_row(path, v, s));
        }
        Ok(Filled::Passed { response, why }) => {
            (result.outcome, result.status) = (why.into(), Some(response.status().as_u16()));
        }
        Ok(Filled::Streaming(_)) => {}
        Err(e) => tracing::debug!(path, error = %e, "re-warm failed"),
    }
    (result, sibling_result)
}

fn sibling_row(path: &str, variant: Kind, filled: SiblingFilled) -> Rewarmed {
    let (outcome, status) = match filled {
        SiblingFilled::Stored(e) => (Outcome::Stored, Some(e.meta.status)),
        SiblingFilled::Passed { status, why } => (why.into(), Some(status.as_u16())),
        SiblingFilled::Skipped => (Outcome::Elsewhere, None),
    };
    Rewarmed {
        path: path.to_owned(),
        variant,
        outcome,
        status,
    }
}
