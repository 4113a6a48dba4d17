//! Steps 8-10 of the request flow for a cache candidate: the fill pipeline. Every fill — a
//! coalesced miss, a background refresh, a re-warm after a purge — is one call to [`fill`]:
//! fetch from a replica, decide whether the answer may be stored (`cache::policy::admit`),
//! read the body (streamed to the client if one waits, keeping a copy), make the entry, keep it
//! in the L1 and the store, then wake the requests that waited and release the key's
//! [`FillPermit`]. Which request fills is decided before, by `coalesce`.
//!
//! Receives a [`Job`]: the key, the variant, the request head prepared by [`upstream_head`]
//! (GET, identity encoding, no conditional headers: the store needs a whole body, and
//! conditionals are answered from the entry) and who waits. Hands on [`Filled`]. There is no
//! second copy of this sequence: [`request`], [`copy`], [`Pending::entry`] and [`keep`] are its
//! steps, not alternatives to it.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body_util::BodyExt;

use super::lookup::VARY_TAG;
use super::serve::{self, Outcome};
use crate::app::{AppState, CacheState};
use crate::bus::Kind;
use crate::cache::entry::{Entry, IMMUTABLE_GZIP_LEVEL, Meta};
use crate::cache::flight::{Done, FillPermit, Fleet};
use crate::cache::key::{self, CacheKey, Variant};
use crate::cache::policy::{self, Expect, Times};
use crate::cache::store::{Store, Stored};
use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::upstream::UpstreamError;
use crate::upstream::replicas::Replica;

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
enum Answer {
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
}

impl Pass {
    /// Label for logs and re-warm reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Pass::Uncacheable => "not-stored",
            Pass::Failed => "failed",
            Pass::Copy => "not-revalidated",
        }
    }
}

/// Where an answer's body comes from, by the replica's `x-nextjs-cache` (NEXTJS.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Rendered for this request (`MISS`, `REVALIDATED`), or not from Next's ISR cache at all
    /// (no header): newer than anything stored before the request went out.
    Render,
    /// The replica's cached copy, fresh by its clock (`HIT`): rendered at an unknown time.
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

/// Next's on-demand revalidation header (NEXTJS.md §4.1): with the build's `previewModeId` the
/// replica regenerates the page (HTML and RSC together) instead of answering from its cache,
/// and says `x-nextjs-cache: REVALIDATED`.
static PRERENDER_REVALIDATE: HeaderName = HeaderName::from_static("x-prerender-revalidate");
static X_NEXTJS_CACHE: HeaderName = HeaderName::from_static("x-nextjs-cache");

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
    /// When the request went upstream (the gateway's clock, UNIX ms): a render the replica
    /// made for it happened after this, so it is the entry's render time (the base of `Age`).
    sent_at_ms: u64,
    /// The replica that answered.
    replica: Arc<Replica>,
    /// The replica rendered for this request (not a copy from its cache).
    rendered: bool,
}

/// Sends `head` upstream and decides from the answer's head whether it may be stored. A fill
/// that `replaces` an entry asks for a regeneration when the build's `previewModeId` is known,
/// and never stores a copy from the replica's own cache (see [`Pass::Copy`]).
async fn request(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    mut head: Parts,
    variant: &Variant,
    replaces: bool,
    to: Option<&Arc<Replica>>,
) -> Result<Answer, ProxyError> {
    let preview = app.config.webhook.preview_mode_id.as_ref();
    let regenerate = replaces && preview.is_some();
    if let (true, Some(id)) = (regenerate, preview) {
        head.headers
            .insert(PRERENDER_REVALIDATE.clone(), id.clone());
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
    let pass = |response, why| {
        app.metrics.cache_not_stored.inc();
        Ok(Answer::Pass { response, why })
    };
    let freshness = match policy::admit(
        &Method::GET,
        response.status(),
        response.headers(),
        expect(variant),
        &cache.limits,
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
    let copy = match source {
        Source::Render => false,
        Source::StaleCopy => replaces,
        Source::Copy => regenerate,
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
    let (parts, body) = response.into_parts();
    let pending = Pending {
        parts,
        freshness,
        vary_request,
        path,
        render_epoch,
        sent_at_ms,
        replica,
        rendered: source == Source::Render,
    };
    Ok(Answer::Storable(Box::new(pending), body))
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

    /// The entry for the identity body, rendered when the request went upstream, tagged as
    /// `cfg` says; the body is sealed for the hit lane if `seal`.
    pub fn entry(&self, identity: Bytes, cfg: &crate::config::Cache, seal: bool) -> Arc<Entry> {
        let stored_headers = self
            .stored_headers()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut meta = Meta::new(self.parts.status.as_u16(), stored_headers);
        let now_ms = self.sent_at_ms;
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

    /// How long the store keeps the entry.
    pub fn ttl(&self) -> std::time::Duration {
        self.freshness.ttl()
    }
}

/// How reading a storable body ended.
#[derive(Debug)]
pub enum Copied {
    /// The whole identity body.
    Whole(Bytes),
    /// Over `max_entry_bytes`: not kept (the client, if any, got all of it).
    TooLarge,
}

/// Reads `body` to its end, keeping a copy of up to `max` bytes and forwarding every frame to
/// `client` while it listens (a client that goes away does not stop the copy: the entry is
/// still wanted). `too_large` runs once, as soon as the body passes `max`.
///
/// A slow client does not slow the copy down: frames it has no room for wait in a backlog of
/// up to `max` bytes (they are the same `Bytes` as the copy, not duplicates), and what is left
/// when the replica is done is handed over by a task of its own. Only a client that falls
/// further behind than that makes the copy wait (bounded by the listener's send timeout).
pub async fn copy(
    mut body: Body,
    client: Option<body::Sender>,
    max: usize,
    too_large: impl FnOnce(),
) -> Result<Copied, ProxyError> {
    let mut kept: Option<Vec<Bytes>> = Some(Vec::new());
    let mut len = 0usize;
    let mut too_large = Some(too_large);
    let mut out = Forward::new(client, max);
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let message = e.to_string();
                out.fail(e).await;
                return Err(ProxyError::Upstream(UpstreamError::Body(message)));
            }
        };
        if let (Some(chunks), Some(data)) = (kept.as_mut(), frame.data_ref()) {
            len += data.len();
            if len > max {
                kept = None;
                if let Some(f) = too_large.take() {
                    f();
                }
            } else {
                chunks.push(data.clone());
            }
        }
        out.push(frame).await;
    }
    out.finish();
    Ok(match kept {
        Some(chunks) if chunks.len() == 1 => {
            Copied::Whole(chunks.into_iter().next().unwrap_or_default())
        }
        Some(chunks) => {
            let mut whole = BytesMut::with_capacity(len);
            for c in chunks {
                whole.extend_from_slice(&c);
            }
            Copied::Whole(whole.freeze())
        }
        None => Copied::TooLarge,
    })
}

/// The client side of [`copy`]: frames go to the client as fast as it takes them, the rest
/// waits in a bounded backlog.
struct Forward {
    tx: Option<body::Sender>,
    backlog: std::collections::VecDeque<http_body::Frame<Bytes>>,
    backlog_bytes: usize,
    max_backlog: usize,
}

impl Forward {
    fn new(tx: Option<body::Sender>, max_backlog: usize) -> Forward {
        Forward {
            tx,
            backlog: std::collections::VecDeque::new(),
            backlog_bytes: 0,
            max_backlog,
        }
    }

    fn size(frame: &http_body::Frame<Bytes>) -> usize {
        frame.data_ref().map_or(0, Bytes::len)
    }

    /// Moves backlog frames to the client while it has room; `false` when it went away.
    fn drain_ready(&mut self) -> bool {
        let Some(tx) = &self.tx else { return false };
        while let Some(frame) = self.backlog.pop_front() {
            let n = Forward::size(&frame);
            match tx.try_send(Ok(frame)) {
                Ok(()) => self.backlog_bytes -= n,
                Err(tokio::sync::mpsc::error::TrySendError::Full(Ok(frame))) => {
                    self.backlog.push_front(frame);
                    return true;
                }
                Err(_) => {
                    self.tx = None;
                    self.backlog.clear();
                    self.backlog_bytes = 0;
                    return false;
                }
            }
        }
        true
    }

    async fn push(&mut self, frame: http_body::Frame<Bytes>) {
        if self.tx.is_none() {
            return;
        }
        self.backlog_bytes += Forward::size(&frame);
        self.backlog.push_back(frame);
        if !self.drain_ready() {
            return;
        }
        // Far behind: wait for the client (its send timeout bounds this).
        while self.backlog_bytes > self.max_backlog {
            let (Some(tx), Some(frame)) = (&self.tx, self.backlog.pop_front()) else {
                return;
            };
            self.backlog_bytes -= Forward::size(&frame);
            if tx.send(Ok(frame)).await.is_err() {
                self.tx = None;
                self.backlog.clear();
                self.backlog_bytes = 0;
            }
        }
    }

    async fn fail(&mut self, e: body::BoxError) {
        if let Some(tx) = self.tx.take() {
            for frame in self.backlog.drain(..) {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Err(e)).await;
        }
    }

    /// Hands what is left to the client in the background.
    fn finish(mut self) {
        if !self.drain_ready() || self.backlog.is_empty() {
            return;
        }
        let (Some(tx), backlog) = (self.tx.take(), std::mem::take(&mut self.backlog)) else {
            return;
        };
        tokio::spawn(async move {
            for frame in backlog {
                if tx.send(Ok(frame)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Who waits for a fill's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A client: it gets the replica's response as it streams; the copy is stored by a
    /// tracked task of its own (the client never waits for the store).
    Waiting,
    /// Nobody (a refresh, a re-warm): the fill ends once the entry is readable by every
    /// gateway, or the next request would find no entry and render again.
    Nobody,
}

/// What to fill.
#[derive(Debug)]
pub struct Job<'a> {
    /// The key.
    pub key: &'a CacheKey,
    /// Its variant (what the body must be).
    pub variant: &'a Variant,
    /// The head to send upstream ([`upstream_head`], with the forwarding headers).
    pub head: Parts,
    /// Who waits for the answer.
    pub client: Client,
    /// The fill replaces an entry past its freshness (a refresh, a re-warm, a miss over an
    /// entry kept for stale-if-error): the replica is asked to regenerate, and a copy from its
    /// own cache never replaces the entry ([`Pass::Copy`]).
    pub replaces: bool,
    /// The page's other variant, stored from the same render (HTML and RSC of an App Router
    /// page, told by its `Vary: RSC`): fetched from the replica that just rendered, before the
    /// permit is released.
    pub sibling: Option<Sibling<'a>>,
}

/// How filling a [`Sibling`] ended.
#[derive(Debug)]
pub enum SiblingFilled {
    /// Stored, with the render's time.
    Stored(Arc<Entry>),
    /// Not stored.
    Passed {
        /// The replica's status.
        status: http::StatusCode,
        /// Why.
        why: Pass,
    },
    /// Being filled on this gateway already, or the replica could not be asked.
    Skipped,
}

/// The other variant of a page, filled from the render a [`Job`] just made.
#[derive(Debug)]
pub struct Sibling<'a> {
    /// Its key.
    pub key: &'a CacheKey,
    /// Its variant.
    pub variant: &'a Variant,
    /// Its upstream head.
    pub head: Parts,
}

/// What a fill produced.
#[derive(Debug)]
pub enum Filled {
    /// For a waiting client: the replica's response, streaming while a copy is stored.
    Streaming(Response<Body>),
    /// For nobody: stored, and readable by every gateway; with how the job's sibling was
    /// filled, when it had one and the replica rendered.
    Stored(Arc<Entry>, Option<SiblingFilled>),
    /// Not stored: the answer as it came (a fill for nobody drops its body unread).
    Passed {
        /// The response.
        response: Response<Body>,
        /// Why it was not stored.
        why: Pass,
    },
}

/// The fill pipeline, the one sequence every fill goes through — a miss, a background
/// refresh, a re-warm: request → admit → copy (to the client, if one waits) → entry → keep,
/// then the permit's followers are woken and its fleet lock released. `permit` is `None` for a
/// fill without coalescing.
pub async fn fill(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    job: Job<'_>,
    permit: Option<FillPermit>,
) -> Result<Filled, ProxyError> {
    let key = job.key;
    let answer = request(app, cache, key, job.head, job.variant, job.replaces, None).await;
    let (pending, body) = match answer {
        Ok(Answer::Storable(p, b)) => (p, b),
        Ok(Answer::Pass { response, why }) => {
            end(app, cache, key, permit, Ended::Passed(why)).await;
            return Ok(Filled::Passed { response, why });
        }
        Err(e) => {
            end(app, cache, key, permit, Ended::Failed).await;
            return Err(e);
        }
    };
    match job.client {
        Client::Waiting => Ok(Filled::Streaming(stream(
            app,
            cache,
            key.clone(),
            pending,
            body,
            permit,
        ))),
        Client::Nobody => {
            Ok(fill_for_nobody(app, cache, key, pending, body, permit, job.sibling).await?)
        }
    }
}

/// The rest of a fill nobody waits for: the body read whole, the page's other variant read
/// from the same render when there is one, both kept together, then the permit released.
async fn fill_for_nobody(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    pending: Box<Pending>,
    body: Body,
    permit: Option<FillPermit>,
    sibling: Option<Sibling<'_>>,
) -> Result<Filled, ProxyError> {
    let status = pending.status();
    let entry = match copy(body, None, cache.cfg.max_entry_bytes, || {}).await {
        Ok(Copied::Whole(identity)) => pending.entry(identity, &cache.cfg, cache.seal_fills()),
        Ok(Copied::TooLarge) => {
            app.metrics.cache_not_stored.inc();
            end(app, cache, key, permit, Ended::Passed(Pass::Uncacheable)).await;
            // Larger than `cache.max_entry_bytes`: not kept, as if not storable.
            return Ok(Filled::Passed {
                response: empty_response(status),
                why: Pass::Uncacheable,
            });
        }
        Err(e) => {
            end(app, cache, key, permit, Ended::Failed).await;
            return Err(e);
        }
    };
    let app_page = key::varies_on_rsc(pending.parts.headers.get_all(header::VARY));
    let mut read = None;
    if let (Some(sibling), true) = (sibling, pending.rendered && app_page) {
        read = Some(read_sibling(app, cache, sibling, &pending).await);
    }
    let mut kept = vec![(key, &entry, pending.ttl())];
    if let Some(SiblingRead::Read {
        key, entry, ttl, ..
    }) = &read
    {
        kept.push((*key, entry, *ttl));
    }
    keep_all(app, cache, &kept).await;
    if let Some(p) = &permit {
        p.wake(Done::Filled(Arc::clone(&entry)));
    }
    end(app, cache, key, permit, Ended::Stored).await;
    let sibling = match read {
        None => None,
        Some(read) => Some(read.finish(app).await),
    };
    Ok(Filled::Stored(entry, sibling))
}

fn empty_response(status: http::StatusCode) -> Response<Body> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = status;
    response
}

/// Starts copying a storable answer to a waiting client (and the store) in a tracked task;
/// the client's response, whose body streams as the replica sends it.
fn stream(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: CacheKey,
    pending: Box<Pending>,
    upstream_body: Body,
    permit: Option<FillPermit>,
) -> Response<Body> {
    let (status, mut headers, len) = pending.client_head();
    headers.insert(header::AGE, HeaderValue::from_static("0"));
    serve::mark(&mut headers, Outcome::Miss { stored: true });
    serve::add_vary_accept_encoding(&mut headers);
    let (tx, client_body) = body::Channel::new(16, len);
    let (app, cache) = (Arc::clone(app), Arc::clone(cache));
    let tasks = cache.tasks.clone();
    tasks.spawn(async move {
        let max = cache.cfg.max_entry_bytes;
        let copied = copy(upstream_body, Some(tx), max, || {
            // Followers stop waiting now, not when the big body ends.
            cache.flights.remember_pass(key.hash);
            if let Some(p) = &permit {
                p.wake(Done::Pass);
            }
        })
        .await;
        if let Err(e) = settle(&app, &cache, &key, &pending, copied, permit).await {
            tracing::debug!(key = %key.text, error = %e, "render failed mid-body; a follower takes over");
        }
    });
    let mut response = Response::new(body::boxed(client_body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Ends a fill once its body is read: the entry is made and kept (or the fill passes or
/// fails), then followers are woken and the permit released either way.
async fn settle(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    pending: &Pending,
    copied: Result<Copied, ProxyError>,
    permit: Option<FillPermit>,
) -> Result<Option<Arc<Entry>>, ProxyError> {
    let kept = made(app, cache, key, pending, copied, permit.as_ref()).await;
    end(app, cache, key, permit, ended(&kept)).await;
    kept
}

/// The entry of a body read whole, woken to the permit's followers and kept; `None` when it
/// was too large to keep.
async fn made(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    pending: &Pending,
    copied: Result<Copied, ProxyError>,
    permit: Option<&FillPermit>,
) -> Result<Option<Arc<Entry>>, ProxyError> {
    match copied? {
        Copied::Whole(identity) => {
            let entry = pending.entry(identity, &cache.cfg, cache.seal_fills());
            if let Some(p) = permit {
                p.wake(Done::Filled(Arc::clone(&entry)));
            }
            keep(app, cache, key, &entry, pending.ttl()).await;
            Ok(Some(entry))
        }
        Copied::TooLarge => {
            app.metrics.cache_not_stored.inc();
            Ok(None)
        }
    }
}

fn ended(kept: &Result<Option<Arc<Entry>>, ProxyError>) -> Ended {
    match kept {
        Ok(Some(_)) => Ended::Stored,
        Ok(None) => Ended::Passed(Pass::Uncacheable),
        Err(_) => Ended::Failed,
    }
}

/// A page's other variant, read from the replica that just rendered the page.
enum SiblingRead<'a> {
    /// Read whole, with the render's time; kept together with the page's entry, then its
    /// permit is released.
    Read {
        key: &'a CacheKey,
        entry: Arc<Entry>,
        ttl: std::time::Duration,
        permit: FillPermit,
    },
    /// Nothing to keep.
    Done(SiblingFilled),
}

impl SiblingRead<'_> {
    /// Wakes and releases the sibling's permit once it is kept.
    async fn finish(self, app: &AppState) -> SiblingFilled {
        match self {
            SiblingRead::Read { entry, permit, .. } => {
                app.metrics.fills_siblings.inc();
                permit.wake(Done::Filled(Arc::clone(&entry)));
                permit.release().await;
                SiblingFilled::Stored(entry)
            }
            SiblingRead::Done(filled) => filled,
        }
    }
}

/// Reads the page's other variant from the replica that just rendered it (it answers from the
/// render it just made), with that render's time, under a permit of its own (local and fleet):
/// a refresh of that variant elsewhere waits for this one instead of rendering again. Skipped
/// when the sibling is being filled already; anything but a storable answer leaves its entry
/// as it is (it refreshes on its own).
async fn read_sibling<'a>(
    app: &AppState,
    cache: &CacheState,
    sibling: Sibling<'a>,
    of: &Pending,
) -> SiblingRead<'a> {
    let skipped = SiblingRead::Done(SiblingFilled::Skipped);
    let Some(mut permit) = cache.flights.try_lead(sibling.key.hash) else {
        return skipped;
    };
    if let Store::Redis(redis) = &cache.store {
        if let Ok(Fleet::Contended) = permit.lock_fleet(redis, &sibling.key.hex()).await {
            return skipped;
        }
    }
    let to = Some(&of.replica);
    let answer = request(
        app,
        cache,
        sibling.key,
        sibling.head,
        sibling.variant,
        false,
        to,
    );
    let (mut pending, body) = match answer.await {
        Ok(Answer::Storable(p, b)) => (p, b),
        Ok(Answer::Pass { response, why }) => {
            let status = response.status();
            return SiblingRead::Done(SiblingFilled::Passed { status, why });
        }
        Err(_) => return skipped,
    };
    pending.sent_at_ms = of.sent_at_ms;
    pending.render_epoch = pending.render_epoch.min(of.render_epoch);
    match copy(body, None, cache.cfg.max_entry_bytes, || {}).await {
        Ok(Copied::Whole(identity)) => SiblingRead::Read {
            key: sibling.key,
            entry: pending.entry(identity, &cache.cfg, cache.seal_fills()),
            ttl: pending.ttl(),
            permit,
        },
        Ok(Copied::TooLarge) => SiblingRead::Done(SiblingFilled::Passed {
            status: pending.status(),
            why: Pass::Uncacheable,
        }),
        Err(_) => skipped,
    }
}

/// How a fill ended, for its permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Stored (and announced by the store write).
    Stored,
    /// Not stored, for this reason.
    Passed(Pass),
    /// Failed: one of the waiting requests fills instead.
    Failed,
}

/// Wakes the permit's followers, says on the bus what happened and releases the fleet lock.
/// An uncacheable answer is said before the release (every gateway's waiters fetch for
/// themselves rather than take the lock); anything else that stored nothing is said after
/// (waiters race for the lock). A copy from the replica's cache sends this gateway's waiters
/// to fetch for themselves: what they get is the replica's answer, whoever asks.
async fn end(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    permit: Option<FillPermit>,
    ended: Ended,
) {
    if ended == Ended::Passed(Pass::Uncacheable) {
        cache.flights.remember_pass(key.hash);
    }
    let Some(permit) = permit else { return };
    let fleet = permit.holds_fleet_lock();
    match ended {
        Ended::Stored => permit.release().await,
        Ended::Passed(Pass::Uncacheable) => {
            permit.wake(Done::Pass);
            if fleet {
                cache.announce(Kind::Pass, key.hex(), &app.metrics).await;
            }
            permit.release().await;
        }
        Ended::Passed(Pass::Copy) => {
            permit.wake(Done::Pass);
            permit.release().await;
            if fleet {
                cache
                    .announce(Kind::Released, key.hex(), &app.metrics)
                    .await;
            }
        }
        Ended::Passed(Pass::Failed) | Ended::Failed => {
            if ended == Ended::Failed {
                // The render went away without an answer (the replica failed mid-way).
                app.metrics.leaders_abandoned.inc();
            }
            permit.wake(Done::Abandoned);
            permit.release().await;
            if fleet {
                cache
                    .announce(Kind::Released, key.hex(), &app.metrics)
                    .await;
            }
        }
    }
}

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
async fn keep_all(
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
    for name in ["x-nextjs-cache", "x-next-cache-tags"] {
        headers.remove(HeaderName::from_static(name));
    }
}
