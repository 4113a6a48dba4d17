//! Steps 8-10 of the request flow for a cache candidate: fetch from a replica, decide whether
//! the answer may be stored (`cache::policy::admit`), and store it off the response path.
//!
//! Receives the key, the request head prepared by [`upstream_head`] (GET, identity encoding,
//! no conditional headers: the store needs a whole body, and conditionals are answered from the
//! entry) and the variant. [`request`] sends it and judges the answer's head ([`Answer`]);
//! [`copy`] reads a storable body (forwarding it to a streaming client, keeping a copy) and
//! [`Pending::entry`] makes the entry; [`keep`] puts it in the L1 and the store. [`fill`] is
//! all of it for a caller that waits for the whole body (refreshes, uncoalesced fetches).
//! Which request fetches is decided before, by `coalesce`.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response};
use http_body_util::BodyExt;

use super::lookup::VARY_TAG;
use crate::app::{AppState, CacheState};
use crate::cache::entry::{Entry, Meta};
use crate::cache::key::{self, CacheKey, Variant};
use crate::cache::policy::{self, Expect, Times};
use crate::cache::store::Stored;
use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::upstream::UpstreamError;

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

/// How the store write of a fill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    /// In its own task: a client is waiting for the response, never for Redis.
    Background,
    /// Awaited: the caller holds its key (a refresh, a fill lock) until the new entry is
    /// readable by every gateway, or the next request would find no entry and render again.
    Awaited,
}

/// A replica's answer to a cache candidate, once its head is in.
#[derive(Debug)]
pub enum Answer {
    /// May be stored: read the body, then [`Pending::entry`].
    Storable(Pending, Body),
    /// Not storable: pass it through as it came.
    Pass {
        /// The response.
        response: Response<Body>,
        /// The answer says the key is not cacheable (private, Set-Cookie, too large…), as
        /// opposed to a server error: remember it for a while (hit-for-miss).
        uncacheable: bool,
    },
}

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
}

/// Sends `head` upstream and decides from the answer's head whether it may be stored.
pub async fn request(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    head: Parts,
    variant: &Variant,
) -> Result<Answer, ProxyError> {
    let vary_request = head.headers.clone();
    let path = head.uri.path().to_owned();
    let render_epoch = cache.epochs.current();
    let reply = app.upstream.send(head, body::empty()).await?;
    let response = reply.into_response();
    let pass = |response, uncacheable| {
        app.metrics.cache_not_stored.inc();
        Ok(Answer::Pass {
            response,
            uncacheable,
        })
    };
    let freshness = match policy::admit(
        &Method::GET,
        response.status(),
        response.headers(),
        expect(variant),
        &cache.limits,
    ) {
        Ok(f) if !f.ttl().is_zero() => f,
        Ok(_) => return pass(response, true),
        Err(skip) => {
            crate::metrics::Counter::inc_at(&app.metrics.cache_not_stored_by, skip as usize);
            tracing::debug!(key = %key.text, reason = skip.as_str(), "not stored");
            let uncacheable = !response.status().is_server_error();
            return pass(response, uncacheable);
        }
    };
    // A replica that compressed anyway (our request asked for identity) is passed through:
    // its bytes are not the identity body this entry format stores.
    let encoded = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return pass(response, true);
    }
    let (parts, body) = response.into_parts();
    let pending = Pending {
        parts,
        freshness,
        vary_request,
        path,
        render_epoch,
    };
    Ok(Answer::Storable(pending, body))
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

    /// Whether the replica says it rendered afresh for an on-demand revalidation
    /// (`x-nextjs-cache: REVALIDATED`).
    pub fn revalidated(&self) -> bool {
        self.parts
            .headers
            .get("x-nextjs-cache")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"REVALIDATED"))
    }

    /// The answer, for a body that turned out too large to store.
    pub fn into_response(self, body: Body) -> Response<Body> {
        Response::from_parts(self.parts, body)
    }

    /// The entry for the identity body, rendered at `now_ms`, tagged as `cfg` says; the body
    /// is sealed for the hit lane if `seal`.
    pub fn entry(
        &self,
        identity: Bytes,
        now_ms: u64,
        cfg: &crate::config::Cache,
        seal: bool,
    ) -> Arc<Entry> {
        let stored_headers = self
            .stored_headers()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let mut meta = Meta::new(self.parts.status.as_u16(), stored_headers);
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
        let entry = Arc::new(Entry::from_identity(meta, &identity));
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

/// What a fill produced.
#[derive(Debug)]
pub enum Filled {
    /// Stored; serve this entry.
    Stored(Arc<Entry>),
    /// Not stored; serve this response as it is. `uncacheable` as in [`Answer::Pass`].
    Passed(Response<Body>, bool),
}

/// Fetches `key` from a replica, reads the whole body and stores the answer when it may be
/// stored (no coalescing: the caller decided this request fetches).
pub async fn fill(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    head: Parts,
    variant: &Variant,
    now_ms: u64,
    write: Write,
) -> Result<Filled, ProxyError> {
    let (pending, mut body) = match request(app, cache, key, head, variant).await? {
        Answer::Storable(p, b) => (p, b),
        Answer::Pass {
            response,
            uncacheable,
        } => return Ok(Filled::Passed(response, uncacheable)),
    };
    let max = cache.cfg.max_entry_bytes;
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::Upstream(UpstreamError::Body(e.to_string())))?;
        if let Ok(data) = frame.into_data() {
            collected.extend_from_slice(&data);
            if collected.len() > max {
                // Too large to store: serve what was read, then the rest as it comes.
                app.metrics.cache_not_stored.inc();
                let head =
                    http_body_util::Full::new(collected.freeze()).map_err(|never| match never {});
                let rest = body::boxed(StreamAfter {
                    first: Some(head),
                    rest: body,
                });
                return Ok(Filled::Passed(pending.into_response(rest), true));
            }
        }
    }
    let entry = pending.entry(collected.freeze(), now_ms, &cache.cfg, cache.seal_fills());
    keep(app, cache, key, &entry, pending.ttl(), write).await;
    Ok(Filled::Stored(entry))
}

/// Puts a new entry in the L1 and the store (awaited or in the background) and tells the other
/// gateways.
pub async fn keep(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    entry: &Arc<Entry>,
    ttl: std::time::Duration,
    write: Write,
) {
    cache
        .l1
        .insert(key.hash, Arc::clone(entry), entry.meta.stored_at_ms);
    cache.coalesce.stored(key.hash);
    cache.recent.record(&entry.meta.tags);
    app.metrics.cache_stores.inc();
    let put = store(
        Arc::clone(cache),
        Arc::clone(&app.metrics),
        key.hex(),
        Arc::clone(entry),
        ttl,
    );
    match write {
        Write::Background => drop(tokio::spawn(put)),
        Write::Awaited => put.await,
    }
}

/// Writes the entry to the store and tells the other gateways.
async fn store(
    cache: Arc<CacheState>,
    metrics: Arc<crate::metrics::Metrics>,
    hex: String,
    entry: Arc<Entry>,
    ttl: std::time::Duration,
) {
    let stored = Stored {
        meta: entry.meta.encode(),
        body: entry.gzip.clone(),
    };
    if let Err(e) = cache.store.put(&hex, stored, ttl).await {
        metrics.store_errors.inc();
        tracing::debug!(error = %e, "store write failed; the entry stays in this gateway's L1");
        return;
    }
    // Other gateways drop their L1 copy of this key and read the new entry.
    cache
        .announce(crate::bus::Kind::Filled, hex, &metrics)
        .await;
}

/// What the variant's body must be (`cache::policy::admit` checks the content type).
pub fn expect(variant: &Variant) -> Expect {
    match variant {
        Variant::Html => Expect::Html,
        Variant::Rsc | Variant::RscPrefetch(_) | Variant::RscSegment(_) => Expect::Rsc,
        Variant::DataJson => Expect::Json,
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

pin_project_lite::pin_project! {
    /// A body that yields `first` and then `rest`.
    struct StreamAfter<A, B> {
        #[pin]
        first: Option<A>,
        #[pin]
        rest: B,
    }
}

impl<A, B> http_body::Body for StreamAfter<A, B>
where
    A: http_body::Body<Data = Bytes>,
    B: http_body::Body<Data = Bytes>,
    A::Error: Into<body::BoxError>,
    B::Error: Into<body::BoxError>,
{
    type Data = Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let mut this = self.project();
        if let Some(first) = this.first.as_mut().as_pin_mut() {
            match first.poll_frame(cx) {
                Poll::Ready(Some(f)) => return Poll::Ready(Some(f.map_err(Into::into))),
                Poll::Ready(None) => this.first.set(None),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.rest
            .poll_frame(cx)
            .map(|o| o.map(|f| f.map_err(Into::into)))
    }
}
