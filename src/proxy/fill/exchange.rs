//! The fill's question to a replica and the verdict on its answer's head: the upstream head
//! of a candidate ([`upstream_head`]), the request (a regeneration when the fill replaces an
//! entry and the build's `previewModeId` is known), and whether the answer may be stored
//! ([`Pass`] says why not) — admission (`cache::policy::admit`), the content type the variant
//! expects, and never a copy from the replica's own cache where a render is needed. Hands on
//! a [`Pending`] entry: everything but the body.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};

use crate::app::{AppState, CacheState};
use crate::cache::entry::{Entry, IMMUTABLE_GZIP_LEVEL, Meta};
use crate::cache::key::{self, CacheKey, Variant};
use crate::cache::policy::{self, Expect, Times};
use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::upstream::pin::Pin;
use crate::upstream::replicas::Replica;

use super::super::lookup::VARY_TAG;

/// Response headers not kept in an entry: framing and encoding (ours differ), validators and
/// age (ours), and Next.js internals a client must not see (NEXTJS.md §9 rule 22).
const NOT_STORED: &[&str] = &[
    "date",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "etag",
    "age",
    "x-nextjs-cache",
    "x-next-cache-tags",
    "x-isrgate-tags",
    "x-isrgate-build",
    "x-isrgate-age-ms",
    "x-cache",
    "cache-status",
];

/// The head to send upstream for a candidate: GET whatever the client used (HEAD is served from
/// the GET entry), identity encoding (we compress ourselves), no conditional or range headers.
pub fn upstream_head(head: &Parts, variant: &Variant) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = Method::GET;
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    let mut headers = head.headers.clone();
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // An image is keyed on the negotiated format: ask the optimizer for exactly that one, or
    // a client's wider Accept could store a format other clients cannot read (rule 5).
    if let Variant::Image(format) = variant {
        let accept = match format {
            key::ImageFormat::Avif => "image/avif,image/webp,*/*",
            key::ImageFormat::Webp => "image/webp,*/*",
            key::ImageFormat::Original => "*/*",
        };
        headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    }
    *req.headers_mut() = headers;
    // Extensions carry hyper's header-case map: the replica sees the client's header case.
    *req.extensions_mut() = head.extensions.clone();
    req.into_parts().0
}

/// A replica's answer to a cache candidate, once its head is in.
#[derive(Debug)]
pub(super) enum Admission {
    /// May be stored: read the body, then [`Pending::entry`].
    Storable(Box<Pending>, Body),
    /// Not storable: pass it through as it came.
    Pass {
        /// The response.
        response: Response<Body>,
        /// Why it is not stored.
        why: Pass,
    },
}

/// Why an answer is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The answer says the key is not cacheable (private, Set-Cookie, too large…): remembered
    /// for a while (hit-for-miss), and a stale copy must not outlive it.
    Uncacheable,
    /// A server error: the key may be cacheable next time; a stale entry covers for it.
    Failed,
    /// The fill replaces an entry and the replica answered from its own cache
    /// (`x-nextjs-cache: STALE`, or `HIT` where a regeneration was asked): not a render newer
    /// than what is stored, so it must not replace it (never back in time).
    Copy,
    /// The replica answered for another build than the request is pinned to (it restarted
    /// on a new build, or no replica of the pinned build was up): the client gets it, the
    /// pinned build's namespace does not (`crate::deploy`).
    OtherBuild,
}

impl Pass {
    /// Label for logs and re-warm reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Pass::Uncacheable => "not-stored",
            Pass::Failed => "failed",
            Pass::Copy => "not-revalidated",
            Pass::OtherBuild => "other-build",
        }
    }
}

/// Where an answer's body comes from, by the replica's `x-nextjs-cache` (NEXTJS.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Rendered for this request (`MISS`, `REVALIDATED`), or not from Next's ISR cache at all
    /// (no header): newer than anything stored before the request went out.
    Render,
    /// The replica's cached copy, fresh by its clock (`HIT`): rendered before the request
    /// went out, as long before as its `x-isrgate-age-ms` says ([`copy_rendered_at`]).
    Copy,
    /// The replica's stale copy (`STALE`); it is rendering the next one in the background.
    StaleCopy,
}

fn source(headers: &http::HeaderMap) -> Source {
    match headers
        .get(&X_NEXTJS_CACHE)
        .map(|v| v.as_bytes().trim_ascii())
    {
        Some(v) if v.eq_ignore_ascii_case(b"HIT") => Source::Copy,
        Some(v) if v.eq_ignore_ascii_case(b"STALE") => Source::StaleCopy,
        _ => Source::Render,
    }
}

/// When a copy from the replica's cache was rendered: `sent_at_ms` (when the request went
/// upstream, after the copy was made) less the age `@isrgate/next` reported as the replica read
/// it. Counted back from our own clock, the replica's clock never skews it; without the report
/// (no package, Pages without headers, a malformed value) it is `sent_at_ms`, the latest it can be.
fn copy_rendered_at(headers: &http::HeaderMap, sent_at_ms: u64) -> u64 {
    let age_ms = headers
        .get(&X_ISRGATE_AGE_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    sent_at_ms.saturating_sub(age_ms)
}

/// Next's on-demand revalidation header (NEXTJS.md §4.1): with the build's `previewModeId` the
/// replica regenerates the page (HTML and RSC together) instead of answering from its cache,
/// and says `x-nextjs-cache: REVALIDATED`.
static PRERENDER_REVALIDATE: HeaderName = HeaderName::from_static("x-prerender-revalidate");
/// Sent with it: the regeneration is the gateway's own refresh, which `@isrgate/next` must not
/// report back to the fleet as an in-app `res.revalidate` (that would purge what it refreshes).
static ISRGATE_REFRESH: HeaderName = HeaderName::from_static("x-isrgate-refresh");
static X_NEXTJS_CACHE: HeaderName = HeaderName::from_static("x-nextjs-cache");
/// `@isrgate/next`'s report on a copy from the replica's cache: how long ago (ms, by the
/// replica's clock) it was rendered when the replica read it.
static X_ISRGATE_AGE_MS: HeaderName = HeaderName::from_static("x-isrgate-age-ms");

/// What an entry needs besides its body: the response head, its freshness and the request
/// headers its `Vary` is matched on.
#[derive(Debug)]
pub struct Pending {
    parts: http::response::Parts,
    freshness: policy::Freshness,
    vary_request: http::HeaderMap,
    /// The request's path (the entry's tags derive from it).
    path: String,
    /// The invalidation epoch read before the request went upstream: an invalidation that
    /// lands while the replica renders makes this entry stale at once.
    render_epoch: u64,
    /// The entry's render time (the gateway's clock, UNIX ms; the base of `Age` and what orders
    /// writes, never back in time): when the request went upstream for a render made for it
    /// (which came after), that less the copy's age for a copy from the replica's cache.
    rendered_at_ms: u64,
    /// The replica that answered.
    replica: Arc<Replica>,
    /// The replica rendered for this request (not a copy from its cache).
    rendered: bool,
    /// The fill replaces an entry (`Job::replaces`).
    replaces: bool,
    /// This gateway (`CacheState::gateway_id`), recorded in the entry.
    filled_by: String,
}

/// Sends `head` upstream and decides from the answer's head whether it may be stored. A fill
/// that `replaces` an entry asks for a regeneration when the build's `previewModeId` is known,
/// and never stores a copy from the replica's own cache (see [`Pass::Copy`]).
pub(super) async fn request(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    mut head: Parts,
    variant: &Variant,
    replaces: bool,
    to: Option<&Arc<Replica>>,
) -> Result<Admission, ProxyError> {
    let pin = head.extensions.get::<Arc<Pin>>().cloned();
    let preview = if replaces {
        app.deploy.preview_mode_id(
            pin.as_deref(),
            app.config().webhook.preview_mode_id.as_ref(),
        )
    } else {
        None
    };
    let regenerate = preview.is_some();
    if let Some(id) = preview {
        head.headers.insert(PRERENDER_REVALIDATE.clone(), id);
        head.headers
            .insert(ISRGATE_REFRESH.clone(), HeaderValue::from_static("1"));
    }
    let vary_request = head.headers.clone();
    let path = head.uri.path().to_owned();
    let render_epoch = cache.epochs.current();
    let sent_at_ms = cache.clock.now_ms();
    let reply = match to {
        Some(replica) => app.upstream.send_to(replica, head).await?,
        None => app.upstream.send(head, body::empty()).await?,
    };
    let replica = Arc::clone(&reply.replica);
    let response = reply.into_response();
    let cfg = cache.cfg();
    // Every answer a replica gave a fill is a render the cache did not save (`renders`).
    let pass = |response, why| {
        app.metrics.cache_not_stored.inc();
        app.metrics.rendered(&cfg.routes, &path, None);
        Ok(Admission::Pass { response, why })
    };
    // Assets are keyed without a build: whichever build had it answered right.
    let other_build = pin.as_ref().is_some_and(|p| !replica.runs(&p.build))
        && !crate::upstream::pin::is_build_asset(&path);
    if other_build {
        app.metrics.fills_other_build.inc();
        tracing::debug!(key = %key.text, replica = %replica.authority, "answered for another build; not stored");
        return pass(response, Pass::OtherBuild);
    }
    let route = crate::cache::routes::find(&cfg.routes, &path).map(|r| &r.lifetimes);
    let freshness = match policy::admit_for(
        &Method::GET,
        response.status(),
        response.headers(),
        expect(variant),
        &cache.limits(),
        route,
    ) {
        Ok(f) if !f.ttl().is_zero() => f,
        Ok(_) => return pass(response, Pass::Uncacheable),
        Err(skip) => {
            crate::metrics::Counter::inc_at(&app.metrics.cache_not_stored_by, skip as usize);
            tracing::debug!(key = %key.text, reason = skip.as_str(), "not stored");
            let why = if response.status().is_server_error() {
                Pass::Failed
            } else {
                Pass::Uncacheable
            };
            return pass(response, why);
        }
    };
    let source = source(response.headers());
    let (copy, rendered_at_ms) = match source {
        Source::Render => (false, sent_at_ms),
        Source::StaleCopy => (replaces, copy_rendered_at(response.headers(), sent_at_ms)),
        Source::Copy => (regenerate, copy_rendered_at(response.headers(), sent_at_ms)),
    };
    if copy {
        app.metrics.fills_not_rendered.inc();
        tracing::debug!(key = %key.text, "the replica answered from its own cache; the stored entry stays");
        return pass(response, Pass::Copy);
    }
    // A replica that compressed anyway (our request asked for identity) is passed through:
    // its bytes are not the identity body this entry format stores.
    let encoded = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return pass(response, Pass::Uncacheable);
    }
    // The route table's TTL is the freshness lifetime (Next's `revalidate`), not the whole
    // stored life (a year of stale-while-revalidate with Next 15).
    app.metrics
        .rendered(&cfg.routes, &path, Some(freshness.fresh));
    let (parts, body) = response.into_parts();
    let pending = Pending {
        parts,
        freshness,
        vary_request,
        path,
        render_epoch,
        rendered_at_ms,
        replica,
        rendered: source == Source::Render,
        replaces,
        filled_by: cache.gateway_id().to_owned(),
    };
    Ok(Admission::Storable(Box::new(pending), body))
}

impl Pending {
    /// The head a client gets while the body streams (the leader of a fill): the headers the
    /// entry will hold and the replica's Content-Length; no ETag yet (it is the body's hash).
    pub fn client_head(&self) -> (http::StatusCode, http::HeaderMap, Option<u64>) {
        let mut headers = http::HeaderMap::with_capacity(self.parts.headers.len() + 4);
        for (n, v) in self.stored_headers() {
            headers.append(n.clone(), v.clone());
        }
        let len = self
            .parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = len {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        (self.parts.status, headers, len)
    }

    fn stored_headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.parts
            .headers
            .iter()
            .filter(|(n, _)| !NOT_STORED.contains(&n.as_str()))
    }

    /// The answer's status.
    pub fn status(&self) -> http::StatusCode {
        self.parts.status
    }

    /// The entry for the identity body, dated at its render time, tagged as `cfg` says; the
    /// body is sealed for the hit lane if `seal`.
    pub fn entry(&self, identity: Bytes, cfg: &crate::config::Cache, seal: bool) -> Arc<Entry> {
        // Each value copied into its own allocation: the replica's values are slices of the
        // connection's read buffer (8 KiB and up, grown to the size of large bodies), and an
        // entry holding them would keep that whole buffer alive for as long as it is cached.
        let stored_headers = self
            .stored_headers()
            .map(|(n, v)| (n.clone(), owned(v)))
            .collect();
        let mut meta = Meta::new(self.parts.status.as_u16(), stored_headers);
        meta.filled_by = self.filled_by.clone();
        let now_ms = self.rendered_at_ms;
        meta.stored_at_ms = now_ms;
        meta.render_epoch = self.render_epoch;
        meta.tags = crate::cache::tags::entry_tags(
            &self.path,
            &self.parts.headers,
            &cfg.tag_headers,
            &cfg.tag_rules,
        );
        let t = Times::new(now_ms, &self.freshness);
        (
            meta.fresh_until_ms,
            meta.stale_until_ms,
            meta.stale_if_error_until_ms,
        ) = (t.fresh_until, t.stale_until, t.stale_if_error_until);
        let vary = self
            .parts
            .headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok());
        if let Some(h) = key::vary_hash(vary, &self.vary_request) {
            meta.tags.push(format!("{VARY_TAG}{h:032x}"));
        }
        let entry = Arc::new(if self.freshness.immutable {
            Entry::from_identity_at(meta, &identity, IMMUTABLE_GZIP_LEVEL)
        } else {
            Entry::from_identity(meta, &identity)
        });
        entry.remember_identity(identity, seal);
        entry
    }

    /// Whether the replica rendered this answer for the request and it is an App Router page
    /// (`Vary: RSC`): the page's other variant can then be read from the same render.
    pub(super) fn renders_a_page(&self) -> bool {
        self.rendered && key::varies_on_rsc(self.parts.headers.get_all(header::VARY))
    }

    /// The replica that answered.
    pub(super) fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// The answer's render time (`Meta::stored_at_ms`).
    pub(super) fn rendered_at(&self) -> u64 {
        self.rendered_at_ms
    }

    /// Makes this the other variant of `page`'s render: its render time, and the invalidation
    /// epoch read before that render.
    pub(super) fn same_render_as(&mut self, page: &Pending) {
        self.rendered_at_ms = page.rendered_at_ms;
        self.render_epoch = self.render_epoch.min(page.render_epoch);
    }

    /// Whether the fill replaces an entry (the store is written before the L1: `keep_all`).
    pub(super) fn replaces(&self) -> bool {
        self.replaces
    }

    /// How long the store keeps the entry.
    pub fn ttl(&self) -> std::time::Duration {
        self.freshness.ttl()
    }
}

/// `value` in an allocation of its own, not a slice of a larger buffer.
fn owned(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// What the variant's body must be (`cache::policy::admit` checks the content type).
pub fn expect(variant: &Variant) -> Expect {
    match variant {
        Variant::Html => Expect::Html,
        Variant::Rsc | Variant::RscPrefetch(_) | Variant::RscSegment(_) => Expect::Rsc,
        Variant::DataJson => Expect::Json,
        Variant::Asset => Expect::Any,
        Variant::Image(_) => Expect::Image,
    }
}

/// Names of headers clients get on a passed-through candidate response that they must not
/// see (rule 22): the same internals an entry drops.
pub fn strip_internal_response_headers(headers: &mut http::HeaderMap) {
    for name in [
        "x-nextjs-cache",
        "x-next-cache-tags",
        "x-isrgate-tags",
        "x-isrgate-build",
        "x-isrgate-age-ms",
    ] {
        headers.remove(HeaderName::from_static(name));
    }
}
