//! Steps 8-10 of the request flow for a cache candidate: fetch from a replica, decide whether
//! the answer may be stored (`cache::policy::admit`), and store it off the response path.
//!
//! Receives the key, the request head prepared by [`upstream_head`] (GET, identity encoding,
//! no conditional headers: the store needs a whole body, and conditionals are answered from the
//! entry) and the variant; hands on [`Filled::Stored`] (an entry to serve) or
//! [`Filled::Passed`] (a response to pass through as it came: not storable, or larger than
//! `max_entry_bytes`). The store write runs in its own task: a client never waits for Redis.

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

/// What a fill produced.
#[derive(Debug)]
pub enum Filled {
    /// Stored; serve this entry.
    Stored(Arc<Entry>),
    /// Not stored; serve this response as it is.
    Passed(Response<Body>),
}

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
    /// Awaited: a background refresh holds its key until the new entry is readable by every
    /// gateway, or the next request would find the old stale entry and refresh again.
    Awaited,
}

/// Fetches `key` from a replica and stores the answer when it may be stored.
pub async fn fill(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    head: Parts,
    variant: &Variant,
    now_ms: u64,
    write: Write,
) -> Result<Filled, ProxyError> {
    let vary_request = head.headers.clone();
    let reply = app.upstream.send(head, body::empty()).await?;
    let response = reply.into_response();
    let expect = expect(variant);
    let freshness = match policy::admit(
        &Method::GET,
        response.status(),
        response.headers(),
        expect,
        &cache.limits,
    ) {
        Ok(f) if !f.ttl().is_zero() => f,
        Ok(_) => {
            app.metrics.cache_not_stored.inc();
            return Ok(Filled::Passed(response));
        }
        Err(skip) => {
            app.metrics.cache_not_stored.inc();
            crate::metrics::Counter::inc_at(&app.metrics.cache_not_stored_by, skip as usize);
            tracing::debug!(key = %key.text, reason = skip.as_str(), "not stored");
            return Ok(Filled::Passed(response));
        }
    };
    // A replica that compressed anyway (our request asked for identity) is passed through:
    // its bytes are not the identity body this entry format stores.
    let encoded = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        app.metrics.cache_not_stored.inc();
        return Ok(Filled::Passed(response));
    }
    let (parts, mut body) = response.into_parts();
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::Upstream(UpstreamError::Body(e.to_string())))?;
        if let Ok(data) = frame.into_data() {
            collected.extend_from_slice(&data);
            if collected.len() > cache.cfg.max_entry_bytes {
                // Too large to store: serve what was read, then the rest as it comes.
                app.metrics.cache_not_stored.inc();
                let head =
                    http_body_util::Full::new(collected.freeze()).map_err(|never| match never {});
                let rest = body::boxed(StreamAfter {
                    first: Some(head),
                    rest: body,
                });
                return Ok(Filled::Passed(Response::from_parts(parts, rest)));
            }
        }
    }
    let identity: Bytes = collected.freeze();
    let stored_headers = parts
        .headers
        .iter()
        .filter(|(n, _)| !NOT_STORED.contains(&n.as_str()))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let mut meta = Meta::new(parts.status.as_u16(), stored_headers);
    meta.stored_at_ms = now_ms;
    let t = Times::new(now_ms, &freshness);
    (
        meta.fresh_until_ms,
        meta.stale_until_ms,
        meta.stale_if_error_until_ms,
    ) = (t.fresh_until, t.stale_until, t.stale_if_error_until);
    let vary = parts
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some(h) = key::vary_hash(vary, &vary_request) {
        meta.tags.push(format!("{VARY_TAG}{h:032x}"));
    }
    let entry = Arc::new(Entry::from_identity(meta, &identity));
    entry.remember_identity(identity);
    cache.l1.insert(key.hash, Arc::clone(&entry), now_ms);
    app.metrics.cache_stores.inc();
    let put = store(
        Arc::clone(cache),
        Arc::clone(&app.metrics),
        key.hex(),
        Arc::clone(&entry),
        freshness.ttl(),
    );
    match write {
        Write::Background => drop(tokio::spawn(put)),
        Write::Awaited => put.await,
    }
    Ok(Filled::Stored(entry))
}

/// Writes the entry to the store and tells the other gateways.
async fn store(
    cache: Arc<CacheState>,
    metrics: Arc<crate::metrics::Metrics>,
    hex: String,
    entry: Arc<Entry>,
    ttl: std::time::Duration,
) {
    {
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
        cache.announce(hex, &metrics).await;
    }
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
