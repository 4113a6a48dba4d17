//! Stale-while-revalidate: a stale entry is served at once and refreshed in the background.
//!
//! Receives the key, the upstream head of the request that found the entry stale and that
//! entry; runs one fill in a tracked task of its own, so no client waits for it. The refresh
//! joins the key's flight like a miss (`coalesce::turn` with [`Wait::Skip`]): when the key is
//! already being filled on this gateway or another (its fleet lock is held), it does nothing
//! and the entry keeps being served stale until that fill lands. At most
//! `cache.max_background_refreshes` run at once per gateway: past that, a stale entry is served
//! without starting another refresh (a later request will).
//!
//! **One render per page.** The HTML and the RSC payload of an App Router page are one render
//! in Next (one ISR entry), and both expire together. So either one going stale refreshes the
//! page: under the permit of its HTML key, the HTML is regenerated and the RSC payload is then
//! fetched from the replica that rendered it ([`fill::Sibling`]), both with that render's time.
//! An RSC refresh that finds the HTML already fresh refreshes the RSC alone only if the HTML is
//! a later render than it (a miss filled it, without its sibling).
//!
//! Every refresh ends with a [`Refreshed`] outcome (`isrgate_refreshes_total{outcome}`). One
//! that failed at the origin is remembered for its key ([`Flights::refresh_failed`]): the
//! stale answers served for it afterwards count as `origin_error` / `origin_timeout`, not as
//! stale-while-revalidate, until an entry is stored for the key.
//!
//! [`Flights::refresh_failed`]: crate::cache::flight::Flights::refresh_failed

use std::sync::Arc;

use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Uri};

use super::coalesce::{self, Turn, Wait};
use super::fill::{self, Filled, Job, Pass, Sibling};
use crate::app::{AppState, CacheState};
use crate::cache::entry::Entry;
use crate::cache::key::{CacheKey, Variant};
use crate::cache::policy::StaleReason;
use crate::error::ProxyError;
use crate::http::RSC;
use crate::upstream::UpstreamError;

/// How a background refresh ended (the `outcome` label of `isrgate_refreshes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// Rendered and stored.
    Stored,
    /// The answer may not be stored (private, Set-Cookie, too large…): the stale copy was
    /// dropped.
    Uncacheable,
    /// Answered, not stored: the replica's own cached copy, or another build's answer.
    NotStored,
    /// The replica failed (5xx, connection refused or reset, no replica).
    OriginError,
    /// The replica did not answer in time.
    OriginTimeout,
    /// Failed on this side (the store, an internal error).
    Failed,
    /// Another gateway holds the key's fill lock: its render will land.
    Elsewhere,
    /// Nothing to do: the key was refreshed meanwhile.
    Current,
    /// Not started: `cache.max_background_refreshes` run already.
    OverLimit,
}

impl Refreshed {
    /// Every outcome, in `as usize` order (metrics are indexed by it).
    pub const ALL: [Refreshed; 9] = [
        Refreshed::Stored,
        Refreshed::Uncacheable,
        Refreshed::NotStored,
        Refreshed::OriginError,
        Refreshed::OriginTimeout,
        Refreshed::Failed,
        Refreshed::Elsewhere,
        Refreshed::Current,
        Refreshed::OverLimit,
    ];

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Refreshed::Stored => "stored",
            Refreshed::Uncacheable => "uncacheable",
            Refreshed::NotStored => "not_stored",
            Refreshed::OriginError => "origin_error",
            Refreshed::OriginTimeout => "origin_timeout",
            Refreshed::Failed => "failed",
            Refreshed::Elsewhere => "elsewhere",
            Refreshed::Current => "current",
            Refreshed::OverLimit => "over_limit",
        }
    }

    /// How a fill that failed with `e` ended.
    fn of_error(e: &ProxyError) -> Refreshed {
        match origin_failure(e) {
            Some(StaleReason::OriginTimeout) => Refreshed::OriginTimeout,
            Some(_) => Refreshed::OriginError,
            None => Refreshed::Failed,
        }
    }

    /// Why the stale answers of an entry whose refresh ended so are served, from now on.
    fn stale_reason(self) -> Option<StaleReason> {
        match self {
            Refreshed::OriginError => Some(StaleReason::OriginError),
            Refreshed::OriginTimeout => Some(StaleReason::OriginTimeout),
            _ => None,
        }
    }
}

/// What a failed fill says of the origin: it timed out (no response head in time, a stalled
/// replica) or failed (anything else on the replica's side); `None` when it was not the
/// origin's fault.
pub(super) fn origin_failure(e: &ProxyError) -> Option<StaleReason> {
    match e {
        ProxyError::Upstream(UpstreamError::Timeout { .. } | UpstreamError::Stalled { .. }) => {
            Some(StaleReason::OriginTimeout)
        }
        e if e.side() == crate::error::Side::Upstream => Some(StaleReason::OriginError),
        _ => None,
    }
}

/// Starts a background refresh of `key`, whose `stale` entry was just served, unless the bound
/// is reached.
pub fn spawn(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: CacheKey,
    mut head: Parts,
    variant: Variant,
    stale: &Entry,
) {
    let Ok(permit) = Arc::clone(&cache.refresh_permits).try_acquire_owned() else {
        app.metrics.refreshed(Refreshed::OverLimit);
        return;
    };
    anonymous(&mut head.headers);
    let (app, cache) = (Arc::clone(app), Arc::clone(cache));
    let page = is_app_page(stale) && matches!(variant, Variant::Html | Variant::Rsc);
    let page = page.then(|| Page::of(&cache, &head, stale));
    let rendered_at = stale.meta.stored_at_ms;
    let tasks = cache.tasks.clone();
    tasks.spawn(async move {
        let _permit = permit;
        let hash = key.hash;
        let outcome = if let Some(page) = page {
            refresh_page(&app, &cache, page, variant, rendered_at).await
        } else {
            refresh(&app, &cache, &key, head, &variant, rendered_at).await
        };
        app.metrics.refreshed(outcome);
        if let Some(reason) = outcome.stale_reason() {
            cache.flights.refresh_failed(hash, reason);
        }
    });
}

/// A refresh renders the shared entry for everyone, on nobody's behalf: it goes without the
/// credentials of the client whose request found the entry stale (`Cookie`, `Authorization`),
/// so that client's session can never shape, or leak into, what every other client is served
/// next (middleware rewriting by cookie, a page that reads one by mistake).
fn anonymous(headers: &mut http::HeaderMap) {
    for name in [
        http::header::COOKIE,
        http::header::AUTHORIZATION,
        http::header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
}

/// Whether an entry is an App Router page: it varies on `RSC` (Next sets `Vary: RSC, …` on
/// every App Router response, NEXTJS.md §1.8), so an RSC variant exists beside the HTML.
fn is_app_page(entry: &Entry) -> bool {
    let vary = entry
        .meta
        .headers
        .iter()
        .filter(|(n, _)| n == http::header::VARY);
    crate::cache::key::varies_on_rsc(vary.map(|(_, v)| v))
}

/// A page to refresh: the heads and keys of its HTML and RSC payload (the `Vary` slots of the
/// stale entry's values, when it varies beyond the key).
struct Page {
    html_head: Parts,
    rsc_head: Parts,
    html_key: CacheKey,
    rsc_key: CacheKey,
}

impl Page {
    fn of(cache: &CacheState, head: &Parts, stale: &Entry) -> Page {
        let (html_head, rsc_head) = (
            as_variant(head, &Variant::Html),
            as_variant(head, &Variant::Rsc),
        );
        let key = |head: &Parts, variant| {
            let primary = super::cached::key(cache, head, variant);
            super::lookup::slot_for(&primary, stale, &head.headers).unwrap_or(primary)
        };
        Page {
            html_key: key(&html_head, &Variant::Html),
            rsc_key: key(&rsc_head, &Variant::Rsc),
            html_head,
            rsc_head,
        }
    }
}

/// Refreshes the page whose `variant` went stale: its HTML, then its RSC from the same render.
async fn refresh_page(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    page: Page,
    variant: Variant,
    stale_rendered_at: u64,
) -> Refreshed {
    let Page {
        html_head,
        rsc_head,
        html_key,
        rsc_key,
    } = page;
    let turn = coalesce::turn(
        app,
        cache,
        &html_key,
        &html_head.headers,
        Wait::Skip,
        stale_rendered_at,
    )
    .await;
    let permit = match turn {
        Turn::Fill(permit) => permit,
        // The HTML is fresh and a later render than this stale RSC (two first fills, or a miss
        // that filled the HTML without its sibling). Refreshing the RSC alone would serve the
        // two variants from two renders for good: refresh the page as a whole instead, one
        // render for both, replacing that HTML a little early.
        Turn::Filled(html)
            if variant == Variant::Rsc && html.meta.stored_at_ms > stale_rendered_at =>
        {
            let seen = html.meta.stored_at_ms;
            // Unless the page was refreshed as a whole since this RSC was found stale (by
            // another gateway, between this lookup and this turn): its RSC is that render too.
            let rsc = coalesce::reread(app, cache, &rsc_key, &rsc_head.headers).await;
            if rsc.is_some_and(|rsc| rsc.meta.stored_at_ms >= seen) {
                return Refreshed::Current;
            }
            let again =
                coalesce::turn(app, cache, &html_key, &html_head.headers, Wait::Skip, seen).await;
            match again {
                Turn::Fill(permit) => permit,
                Turn::Busy => return Refreshed::Elsewhere,
                Turn::Filled(_) | Turn::Pass | Turn::Elsewhere(_) => return Refreshed::Current,
            }
        }
        Turn::Filled(_) | Turn::Pass | Turn::Elsewhere(_) => return Refreshed::Current,
        Turn::Busy => return Refreshed::Elsewhere,
    };
    let sibling = Sibling {
        key: &rsc_key,
        variant: &Variant::Rsc,
        head: rsc_head,
    };
    fill_refresh(
        app,
        cache,
        &html_key,
        html_head,
        &Variant::Html,
        permit,
        Some(sibling),
    )
    .await
}

/// Refreshes one key on its own.
async fn refresh(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    head: Parts,
    variant: &Variant,
    stale_rendered_at: u64,
) -> Refreshed {
    let seen = stale_rendered_at;
    let permit = match coalesce::turn(app, cache, key, &head.headers, Wait::Skip, seen).await {
        Turn::Fill(permit) => permit,
        // Refreshed just before by another request, here or on another gateway.
        Turn::Filled(_) | Turn::Pass | Turn::Elsewhere(_) => return Refreshed::Current,
        Turn::Busy => return Refreshed::Elsewhere,
    };
    fill_refresh(app, cache, key, head, variant, permit, None).await
}

async fn fill_refresh(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    head: Parts,
    variant: &Variant,
    permit: Option<crate::cache::flight::FillPermit>,
    sibling: Option<Sibling<'_>>,
) -> Refreshed {
    let job = Job::replacing(key, variant, head, sibling);
    match fill::fill(app, cache, job, permit).await {
        Ok(Filled::Stored(..) | Filled::Streaming(_)) => Refreshed::Stored,
        // A definitive answer that may not be stored (unpublished: a private 404; made
        // personal: Set-Cookie): the stale copy must not outlive it.
        Ok(Filled::Passed {
            why: Pass::Uncacheable,
            ..
        }) => {
            forget(app, cache, key).await;
            Refreshed::Uncacheable
        }
        Ok(Filled::Passed { why, .. }) => {
            tracing::debug!(key = %key.text, why = why.as_str(), "background refresh stored nothing; the stale entry stays");
            match why {
                Pass::Failed => Refreshed::OriginError,
                Pass::Copy | Pass::OtherBuild | Pass::Uncacheable => Refreshed::NotStored,
            }
        }
        Err(e) => {
            tracing::debug!(key = %key.text, error = %e, "background refresh failed; the stale entry stays");
            Refreshed::of_error(&e)
        }
    }
}

/// Headers of an RSC request that choose among RSC variants (prefetch, segment, router state):
/// a page's plain RSC payload is asked without them.
const RSC_REQUEST_HEADERS: [&str; 4] = [
    "next-router-state-tree",
    "next-router-prefetch",
    "next-router-segment-prefetch",
    "next-url",
];

/// The upstream head asking for `variant` (HTML or the plain RSC payload) of the page `head`
/// asks for. An RSC request carries an empty `_rsc` (the value Next 16.3+ expects of a request
/// with no prefetch, segment, router state or URL header, NEXTJS.md §2.2; older versions
/// ignore it); an HTML request carries none.
pub fn as_variant(head: &Parts, variant: &Variant) -> Parts {
    let mut req = http::Request::new(());
    *req.method_mut() = head.method.clone();
    *req.version_mut() = head.version;
    let mut headers = head.headers.clone();
    for name in RSC_REQUEST_HEADERS {
        headers.remove(name);
    }
    let rsc = *variant == Variant::Rsc;
    if rsc {
        headers.insert(RSC.clone(), HeaderValue::from_static("1"));
    } else {
        headers.remove(&RSC);
    }
    *req.headers_mut() = headers;
    *req.uri_mut() = with_rsc_query(&head.uri, rsc);
    // The other variant of the page comes from the same build.
    if let Some(pin) = head.extensions.get::<Arc<crate::upstream::pin::Pin>>() {
        req.extensions_mut().insert(Arc::clone(pin));
    }
    req.into_parts().0
}

/// `uri` without its `_rsc` query parameter, and with an empty one when `rsc`.
fn with_rsc_query(uri: &Uri, rsc: bool) -> Uri {
    let kept: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && *p != "_rsc" && !p.starts_with("_rsc="))
        .collect();
    let mut query = kept.join("&");
    if rsc {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str("_rsc");
    }
    let pq = if query.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{query}", uri.path())
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(pq).ok().or(parts.path_and_query);
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Removes `key` everywhere: this gateway's L1, the store, and (through the bus) every other
/// gateway's L1. A `Vary` slot's primary key goes too: it may hold the same render.
async fn forget(app: &AppState, cache: &CacheState, key: &CacheKey) {
    let primary = key.is_slot().then(|| key.primary_key());
    for key in std::iter::once(key).chain(primary.as_ref()) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    #[test]
    fn a_page_head_becomes_its_other_variant() {
        let html = head("/p?x=1", &[("host", "site.test"), ("accept", "text/html")]);
        let rsc = as_variant(&html, &Variant::Rsc);
        assert_eq!(rsc.uri, "/p?x=1&_rsc");
        assert_eq!(rsc.headers["rsc"], "1");
        assert_eq!(rsc.headers["host"], "site.test");
        let back = as_variant(
            &head(
                "/p?_rsc=abc12&x=1",
                &[
                    ("rsc", "1"),
                    ("next-router-state-tree", "%5B%5D"),
                    ("next-url", "/q"),
                    ("host", "site.test"),
                ],
            ),
            &Variant::Html,
        );
        assert_eq!(back.uri, "/p?x=1");
        for gone in ["rsc", "next-router-state-tree", "next-url"] {
            assert!(back.headers.get(gone).is_none(), "{gone}");
        }
        assert_eq!(as_variant(&head("/", &[]), &Variant::Rsc).uri, "/?_rsc");
    }
}
