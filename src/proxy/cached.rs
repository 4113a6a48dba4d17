//! The driver for cache candidates (request flow steps 4-11): key → lookup → serve, or (on a
//! miss) coalesce → fill → serve; stale entries are served while one refresh runs; an entry
//! inside stale-if-error covers for failing replicas.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderMap, Method, Response, header};

use super::coalesce::{self, Turn, Wait};
use super::fill::{self, Filled, Job};
use super::forwarded::Peer;
use super::lookup::{self, Found, Lookup};
use super::refresh;
use super::serve::{self, Ask, Outcome};
use crate::app::{AppState, CacheState};
use crate::cache::entry::Entry;
use crate::cache::flight::FillPermit;
use crate::cache::key::{CacheKey, Variant};
use crate::cache::policy::StaleReason;
use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::http::gzip;
use crate::metrics::routes::RouteEvent;
use crate::upstream::UpstreamError;
use crate::upstream::pin::{Pin, is_build_asset};

/// Answers a cache candidate.
pub async fn serve(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    peer: &Peer,
    mut head: Parts,
    variant: Variant,
) -> Result<(Response<Body>, Outcome), ProxyError> {
    let now = cache.clock.now_ms();
    let key = key(cache, &head, &variant);
    count_hot(app, &head, &variant);
    let ask = Ask {
        headers: &head.headers,
        head: head.method == Method::HEAD,
        seal: cache.seal_bodies,
    };
    // `Vary` is matched on what the replica is asked: for images that is the Accept of the
    // negotiated format, not the client's own (the fill computed its tag the same way).
    let image_view =
        matches!(variant, Variant::Image(_)).then(|| fill::upstream_head(&head, &variant).headers);
    let vary_view = image_view.as_ref().unwrap_or(&head.headers);
    // What goes to a replica carries the forwarding headers; a hit never builds it.
    let upstream = |head: &Parts| {
        let mut up = fill::upstream_head(head, &variant);
        super::sanitize::forward(&app.policy, peer, &mut up);
        up
    };
    // The hit lane lends what it did not answer with the lookup it made: one store read.
    let looked = match head.extensions.remove::<super::hit::Looked>() {
        Some(looked) if looked.hash == key.hash => looked.into_lookup(),
        _ if head.method == Method::GET => {
            lookup::lookup_to_fill(app, cache, &key, vary_view, now).await
        }
        _ => lookup::lookup(app, cache, &key, vary_view, now).await,
    };
    let Lookup {
        found,
        slot,
        permit,
    } = looked;
    // Where the answer belongs: the request's `Vary` slot when the key's entry varies.
    let key = slot.unwrap_or(key);
    let fallback = match found {
        Found::Fresh { entry, from_l1 } => {
            if let Some(r) = serve::response(&entry, ask, Outcome::Hit, now) {
                app.metrics.cache_hits.inc();
                count_route(app, cache, &head, RouteEvent::Hit);
                if from_l1 {
                    fill::write_back(app, cache, &key, &entry);
                    app.metrics.cache_l1_hits.inc();
                }
                return Ok((r, Outcome::Hit));
            }
            corrupt(app, cache, &key);
            None
        }
        Found::Stale(entry) => {
            // Why this answer is stale: what the key's last refresh met, not this one's.
            let reason = cache.flights.stale_reason(key.hash);
            refresh::spawn(
                app,
                cache,
                key.clone(),
                upstream(&head),
                variant.clone(),
                &entry,
            );
            if let Some(r) = serve::response(&entry, ask, Outcome::Stale, now) {
                app.metrics.served_stale(reason);
                count_route(app, cache, &head, RouteEvent::Stale);
                return Ok((r, Outcome::Stale));
            }
            corrupt(app, cache, &key);
            None
        }
        Found::StaleIfError(entry) => Some(entry),
        Found::Miss => None,
    };
    app.metrics.missed_paths.record(head.uri.path());
    // The route table counts the miss once it is answered (a HEAD miss hands `head` on).
    let uri = head.uri.clone();
    let answered = if ask.head && fallback.is_none() {
        // A HEAD miss goes upstream as a HEAD: filling would fetch a body only to drop it.
        super::sanitize::forward(&app.policy, peer, &mut head);
        match Box::pin(app.upstream.send(head, body::empty())).await {
            Ok(reply) => Ok(passed(reply.into_response(), &HeaderMap::new(), false)),
            Err(e) => Err(e.into()),
        }
    } else {
        let fill = Fill {
            key,
            head: upstream(&head),
            variant,
            vary: vary_view.clone(),
            seen: fallback.as_ref().map_or(0, |e| e.meta.stored_at_ms),
            replaces: fallback.is_some(),
            permit,
        };
        fill.answer(app, cache, fallback, ask, now).await
    };
    // One outcome per request: a stale-if-error answer counted itself as stale.
    let event = if matches!(answered, Ok((_, Outcome::StaleIfError))) {
        RouteEvent::Stale
    } else {
        app.metrics.cache_misses.inc();
        RouteEvent::Miss
    };
    app.metrics
        .routes
        .count(&cache.cfg().routes, uri.path(), event);
    answered
}

/// Counts an answer from the cache in the route table (`metrics::routes`).
pub(crate) fn count_route(app: &AppState, cache: &CacheState, head: &Parts, event: RouteEvent) {
    app.metrics
        .routes
        .count(&cache.cfg().routes, head.uri.path(), event);
}

/// A miss, owned so it can outlive its request (a fill bounded by `stale_if_error_wait`).
struct Fill {
    /// The key the answer belongs to (a `Vary` slot, when the lookup found one).
    key: CacheKey,
    variant: Variant,
    head: Parts,
    /// The headers `Vary` is matched on.
    vary: HeaderMap,
    /// Render time of the entry the lookup found (0 for none).
    seen: u64,
    /// The lookup found an entry it keeps for stale-if-error.
    replaces: bool,
    permit: Option<FillPermit>,
}

impl Fill {
    /// The client's answer: the fill's, or, when the replica fails or (with
    /// `cache.stale_if_error_wait`) is slow, the stale entry kept for that.
    async fn answer(
        self,
        app: &Arc<AppState>,
        cache: &Arc<CacheState>,
        fallback: Option<Arc<Entry>>,
        ask: Ask<'_>,
        now: u64,
    ) -> Result<(Response<Body>, Outcome), ProxyError> {
        let wait = cache.cfg().stale_if_error_wait;
        let fetched = match &fallback {
            Some(stale) if !wait.is_zero() => match self.bounded(app, cache, wait).await {
                Some(fetched) => fetched,
                None => {
                    app.metrics.stale_if_error_waits.inc();
                    return stale_if_error(app, stale, ask, now, StaleReason::OriginTimeout);
                }
            },
            _ => Box::pin(self.run(app, cache)).await,
        };
        answer_miss(app, fetched, fallback, ask, now)
    }

    /// Runs the miss in a tracked task and waits for it at most `wait`: `None` when the
    /// replica did not answer in time. The task goes on (and stores the render); the caller
    /// answers with its stale entry (Varnish's grace, nginx's `proxy_cache_use_stale timeout`).
    async fn bounded(
        self,
        app: &Arc<AppState>,
        cache: &Arc<CacheState>,
        wait: std::time::Duration,
    ) -> Option<Result<Fetched, ProxyError>> {
        let (app, cache) = (Arc::clone(app), Arc::clone(cache));
        let task = cache
            .tasks
            .clone()
            .spawn(async move { Box::pin(self.run(&app, &cache)).await });
        match tokio::time::timeout(wait, task).await {
            Ok(Ok(fetched)) => Some(fetched),
            // A panicked fill: the stale entry answers.
            Ok(Err(_)) | Err(_) => None,
        }
    }

    /// Serves the fill another request made meanwhile, or fills the key itself. A request
    /// that waited for a render made for other `Vary` values takes its turn in its own slot.
    async fn run(
        self,
        app: &Arc<AppState>,
        cache: &Arc<CacheState>,
    ) -> Result<Fetched, ProxyError> {
        let Fill {
            mut key,
            variant,
            head,
            vary,
            seen,
            replaces,
            permit,
        } = self;
        let mut turn = match permit {
            Some(permit) => coalesce::turn_led(app, cache, &key, &vary, seen, permit).await,
            None => coalesce::turn(app, cache, &key, &vary, Wait::Follow, seen).await,
        };
        if let Turn::Elsewhere(slot) = turn {
            // Only a primary key sends elsewhere: this turn ends with a render.
            key = slot;
            turn = coalesce::turn(app, cache, &key, &vary, Wait::Follow, seen).await;
        }
        let permit = match turn {
            Turn::Filled(entry) => return Ok(Fetched::Followed(entry)),
            Turn::Fill(permit) => permit,
            Turn::Pass | Turn::Busy | Turn::Elsewhere(_) => None,
        };
        let job = Job::waiting(&key, &variant, head, replaces);
        Ok(match fill::fill(app, cache, job, permit).await? {
            Filled::Streaming(response) => Fetched::Led(response),
            Filled::Stored(entry, _) => Fetched::Stored(entry),
            Filled::Passed { response, .. } => Fetched::Passed(response),
        })
    }
}

/// Counts a page request for the hot set a new build pre-renders (`deploy::hot`): here for
/// what the driver answers, in `hit` for what the lane answers.
pub(crate) fn count_hot(app: &AppState, head: &Parts, variant: &Variant) {
    let query = match variant {
        Variant::Html => head.uri.query(),
        Variant::Rsc => None,
        _ => return,
    };
    if head.method != Method::GET {
        return;
    }
    let host = head.headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(host) = host {
        app.deploy.hot.count(host, head.uri.path(), query);
    }
}

/// What a miss got.
#[derive(Debug)]
enum Fetched {
    /// Rendered by another request (on this gateway or another): serve the entry.
    Followed(Arc<Entry>),
    /// Rendered and stored for this request.
    Stored(Arc<Entry>),
    /// Rendered for this request: the replica's response, streaming while a copy is stored.
    Led(Response<Body>),
    /// Not stored (uncacheable, a server error): pass it through.
    Passed(Response<Body>),
}

/// The request's cache key (the host is the request's: `Host` or `:authority`), in the
/// namespace of the build it is pinned to (`crate::deploy`); build assets are keyed without
/// one (content-hashed: the same bytes in every build that has them).
pub(crate) fn key(cache: &CacheState, head: &Parts, variant: &Variant) -> CacheKey {
    key_pinned(cache, head, variant, head.extensions.get::<Arc<Pin>>())
}

/// [`key`] for a head whose pin is not in its extensions (the hit lane keeps it aside: an
/// extension map is an allocation per request).
pub(crate) fn key_pinned(
    cache: &CacheState,
    head: &Parts,
    variant: &Variant,
    pin: Option<&Arc<Pin>>,
) -> CacheKey {
    let host = head
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    // The namespace is fixed at start (a reload keeps it), but read through the settings.
    let cfg;
    let namespace = match pin {
        Some(pin) if !is_build_asset(head.uri.path()) => pin.namespace.as_str(),
        _ => {
            cfg = cache.cfg();
            cfg.namespace.as_str()
        }
    };
    CacheKey::new(namespace, host, head.uri.path(), head.uri.query(), variant)
}

/// The client's answer to a miss: the fetched entry or response, or the stale entry kept in
/// case the replicas failed.
fn answer_miss(
    app: &AppState,
    fetched: Result<Fetched, ProxyError>,
    fallback: Option<Arc<Entry>>,
    ask: Ask<'_>,
    now: u64,
) -> Result<(Response<Body>, Outcome), ProxyError> {
    let entry = |entry: &Entry, outcome| {
        let r = serve::response(entry, ask, outcome, now).ok_or(ProxyError::Upstream(
            UpstreamError::Body("entry did not inflate".into()),
        ))?;
        Ok((r, outcome))
    };
    match fetched {
        Ok(Fetched::Stored(e)) => entry(&e, Outcome::Miss { stored: true }),
        Ok(Fetched::Followed(e)) => entry(&e, Outcome::Collapsed),
        Ok(Fetched::Led(resp)) => Ok((gzip_for(resp, ask), Outcome::Miss { stored: true })),
        Ok(Fetched::Passed(resp)) if resp.status().is_server_error() => match fallback {
            Some(stale) => stale_if_error(app, &stale, ask, now, StaleReason::OriginError),
            None => Ok(passed(resp, ask.headers, ask.head)),
        },
        Ok(Fetched::Passed(resp)) => Ok(passed(resp, ask.headers, ask.head)),
        Err(e) => match (fallback, refresh::origin_failure(&e)) {
            (Some(stale), Some(reason)) => stale_if_error(app, &stale, ask, now, reason),
            _ => Err(e),
        },
    }
}

/// The stale entry kept for a failing replica, served because of `reason`.
fn stale_if_error(
    app: &AppState,
    entry: &Entry,
    ask: Ask<'_>,
    now: u64,
    reason: StaleReason,
) -> Result<(Response<Body>, Outcome), ProxyError> {
    let answer = serve::response(entry, ask, Outcome::StaleIfError, now);
    let r = answer.ok_or(ProxyError::Upstream(UpstreamError::Body(
        "stale entry did not inflate".into(),
    )))?;
    app.metrics.served_stale(reason);
    Ok((r, Outcome::StaleIfError))
}

/// A response that was not stored, as the client gets it. The replica was asked without the
/// client's conditional headers (to get a storable whole body); when the answer is not stored,
/// the client's `If-None-Match` is answered here as the replica would have: 304 on a match.
/// It was also asked for identity encoding (we compress what we store ourselves): a client
/// that accepts gzip gets it compressed on the way (level 1, streamed).
fn passed(
    mut resp: Response<Body>,
    request: &http::HeaderMap,
    head: bool,
) -> (Response<Body>, Outcome) {
    fill::strip_internal_response_headers(resp.headers_mut());
    let etag = resp
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if resp.status() == http::StatusCode::OK
        && etag.is_some_and(|e| serve::if_none_match(request, &e))
    {
        *resp.status_mut() = http::StatusCode::NOT_MODIFIED;
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        resp = resp.map(|_| body::empty());
    } else if head {
        resp = resp.map(|_| body::empty());
    } else {
        resp = gzip_for(
            resp,
            Ask {
                headers: request,
                head,
                seal: false,
            },
        );
    }
    let outcome = Outcome::Miss { stored: false };
    serve::mark(resp.headers_mut(), outcome);
    (resp, outcome)
}

/// The response compressed on the way when the client accepts gzip and it is worth it (the
/// replica was asked for identity).
fn gzip_for(resp: Response<Body>, ask: Ask<'_>) -> Response<Body> {
    if !ask.head
        && serve::accepts_gzip(ask.headers)
        && gzip::compressible(resp.status(), resp.headers())
    {
        gzip::encode(resp)
    } else {
        resp
    }
}

fn corrupt(app: &AppState, cache: &CacheState, key: &CacheKey) {
    app.metrics.store_corrupt.inc();
    cache.l1.remove(key.hash);
    tracing::warn!(key = %key.text, "stored body did not inflate; fetching again");
}
