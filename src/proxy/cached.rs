//! The driver for cache candidates (request flow steps 4-11): key → lookup → serve, or (on a
//! miss) coalesce → fill → serve; stale entries are served while one refresh runs; an entry
//! inside stale-if-error covers for failing replicas.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderMap, Method, Response, header};

use super::coalesce::{self, Turn, Wait};
use super::fill::{self, Filled, Job, Pass};
use super::forwarded::Peer;
use super::lookup::{self, Found, Lookup, Missed};
use super::refresh;
use super::respond::{self, Ask, Outcome};
use crate::app::{AppState, CacheState};
use crate::cache::entry::Entry;
use crate::cache::flight::FillPermit;
use crate::cache::key::{CacheKey, Variant};
use crate::cache::policy::StaleReason;
use crate::error::ProxyError;
use crate::http::body::{self, Body};
use crate::http::gzip;
use crate::metrics::routes::RouteEvent;
use crate::upstream::pin::{Pin, is_build_asset};

/// A cache candidate's answer, and what it was made from (what the debug header tells,
/// `proxy::debug`).
#[derive(Debug)]
pub struct Served {
    /// The response.
    pub response: Response<Body>,
    /// How it relates to the cache.
    pub outcome: Outcome,
    /// The key the answer belongs to (the `Vary` slot, when the lookup found one).
    pub key: CacheKey,
    /// The entry it was made from: a hit, a stale or collapsed answer, a render stored before
    /// it was answered; `None` for a replica's answer (streamed while stored, or not stored).
    pub entry: Option<Arc<Entry>>,
    /// Why the lookup found nothing usable (`None` for a hit or a stale answer).
    pub missed: Option<Missed>,
    /// Why the replica's answer was not stored, when the fill said.
    pub not_stored: Option<Pass>,
    /// Why a stale answer was served (`Stale`, `StaleIfError`).
    pub stale: Option<StaleReason>,
}

impl Served {
    /// An answer from `entry`, found by the lookup.
    fn found(response: Response<Body>, outcome: Outcome, key: CacheKey, entry: Arc<Entry>) -> Self {
        Served {
            response,
            outcome,
            key,
            entry: Some(entry),
            missed: None,
            not_stored: None,
            stale: None,
        }
    }

    /// The answer to a miss (a render, or a stale entry kept for a failing replica).
    fn missed(answered: Answered, key: CacheKey, missed: Missed) -> Self {
        Served {
            response: answered.response,
            outcome: answered.outcome,
            key,
            entry: answered.entry,
            missed: Some(missed),
            not_stored: answered.not_stored,
            stale: answered.stale,
        }
    }
}

/// A miss's answer, and what it was made from.
struct Answered {
    response: Response<Body>,
    outcome: Outcome,
    /// The entry it was made from, if any.
    entry: Option<Arc<Entry>>,
    /// Why the replica's answer was not stored, when the fill said.
    not_stored: Option<Pass>,
    /// Why a stale entry answered.
    stale: Option<StaleReason>,
}

impl Answered {
    /// A replica's answer.
    fn replica((response, outcome): (Response<Body>, Outcome), not_stored: Option<Pass>) -> Self {
        Answered {
            response,
            outcome,
            entry: None,
            not_stored,
            stale: None,
        }
    }
}

/// Answers a cache candidate.
pub async fn drive(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    peer: &Peer,
    mut head: Parts,
    variant: Variant,
) -> Result<Served, ProxyError> {
    let now = cache.clock.now_ms();
    // The lane's key and lookup, when it lent the request and the driver classified it the
    // same way: one store read and one key per request, whoever answers it.
    let lent = head
        .extensions
        .remove::<super::fast_path::Looked>()
        .filter(|l| l.variant == variant)
        .map(super::fast_path::Looked::into_lookup);
    let (key, lent) = match lent {
        Some((key, lookup)) => (key, Some(lookup)),
        None => (key(cache, &head, &variant), None),
    };
    count_hot(app, &head, &variant);
    let c = Candidate {
        app,
        cache,
        peer,
        variant,
        now,
    };
    let looked = match lent {
        Some(lookup) => lookup,
        None => {
            let vary_view = c.vary_view(&head);
            let vary_view = vary_view.as_ref().unwrap_or(&head.headers);
            if head.method == Method::GET {
                lookup::lookup_to_fill(app, cache, &key, vary_view, now).await
            } else {
                lookup::lookup(app, cache, &key, vary_view, now).await
            }
        }
    };
    let Lookup {
        found,
        slot,
        permit,
    } = looked;
    // Where the answer belongs: the request's `Vary` slot when the key's entry varies.
    let key = slot.unwrap_or(key);
    match c.answer_found(&head, key, found) {
        Ok(served) => Ok(served),
        Err(missing) => c.miss(head, missing, permit).await,
    }
}

/// One cache candidate on its way through the driver.
struct Candidate<'a> {
    app: &'a Arc<AppState>,
    cache: &'a Arc<CacheState>,
    peer: &'a Peer,
    variant: Variant,
    now: u64,
}

/// What a lookup left for the miss: the key, the entry kept for stale-if-error, why it missed,
/// and the render time of what it found (for the fill to tell a newer render from it: a
/// damaged entry must be replaced, not served again as another gateway's fill).
struct Missing {
    key: CacheKey,
    fallback: Option<Arc<Entry>>,
    missed: Missed,
    seen: u64,
}

impl Candidate<'_> {
    /// The headers `Vary` is matched on, when not the request's own: for images the Accept of
    /// the negotiated format the replica is asked for (the fill computed its tag the same way).
    fn vary_view(&self, head: &Parts) -> Option<HeaderMap> {
        matches!(self.variant, Variant::Image(_))
            .then(|| fill::upstream_head(head, &self.variant).headers)
    }

    /// What goes to a replica: the upstream head with the forwarding headers (a hit never
    /// builds it).
    fn upstream(&self, head: &Parts) -> Parts {
        let mut up = fill::upstream_head(head, &self.variant);
        super::sanitize::forward(&self.app.policy, self.peer, &mut up);
        up
    }

    fn ask<'h>(&self, head: &'h Parts) -> Ask<'h> {
        Ask {
            headers: &head.headers,
            head: head.method == Method::HEAD,
            seal: self.cache.seal_bodies,
        }
    }

    /// A fresh or stale entry answers (a stale one starts its refresh); anything else is
    /// [`Missing`].
    fn answer_found(&self, head: &Parts, key: CacheKey, found: Found) -> Result<Served, Missing> {
        let (app, cache, now) = (self.app, self.cache, self.now);
        let entry = match found {
            Found::Fresh { entry, from_l1 } => {
                if let Some(r) = respond::response(&entry, self.ask(head), Outcome::Hit, now) {
                    app.metrics.cache_hits.inc();
                    count_route(app, cache, head, RouteEvent::Hit);
                    if from_l1 {
                        fill::write_back(app, cache, &key, &entry);
                        app.metrics.cache_l1_hits.inc();
                    }
                    return Ok(Served::found(r, Outcome::Hit, key, entry));
                }
                entry
            }
            Found::Stale(entry) => {
                // Why this answer is stale: what the key's last refresh met, not this one's.
                let reason = cache.flights.stale_reason(key.hash);
                let up = self.upstream(head);
                refresh::spawn(app, cache, key.clone(), up, self.variant.clone(), &entry);
                if let Some(r) = respond::response(&entry, self.ask(head), Outcome::Stale, now) {
                    app.metrics.served_stale(reason);
                    count_route(app, cache, head, RouteEvent::Stale);
                    let mut served = Served::found(r, Outcome::Stale, key, entry);
                    served.stale = Some(reason);
                    return Ok(served);
                }
                entry
            }
            // Past stale-while-revalidate: kept in case the replicas fail.
            Found::StaleIfError(entry) => {
                let seen = entry.meta.stored_at_ms;
                return Err(Missing {
                    key,
                    fallback: Some(entry),
                    missed: Missed::Expired,
                    seen,
                });
            }
            Found::Miss(missed) => {
                return Err(Missing {
                    key,
                    fallback: None,
                    missed,
                    seen: 0,
                });
            }
        };
        corrupt(app, cache, &key);
        Err(Missing {
            key,
            fallback: None,
            missed: Missed::Corrupt,
            seen: entry.meta.stored_at_ms,
        })
    }

    /// A miss: a render (or another request's), or the stale entry kept for failing replicas.
    async fn miss(
        &self,
        mut head: Parts,
        missing: Missing,
        permit: Option<FillPermit>,
    ) -> Result<Served, ProxyError> {
        let (app, cache) = (self.app, self.cache);
        let Missing {
            key,
            fallback,
            missed,
            seen,
        } = missing;
        app.metrics.missed_paths.record(head.uri.path());
        if head.method == Method::HEAD && fallback.is_none() {
            // A HEAD miss goes upstream as a HEAD: filling would fetch a body only to drop it.
            super::sanitize::forward(&app.policy, self.peer, &mut head);
            app.metrics.cache_misses.inc();
            count_route(app, cache, &head, RouteEvent::Miss);
            let reply = Box::pin(app.upstream.send(head, body::empty())).await?;
            let answered = passed(reply.into_response(), &HeaderMap::new(), false);
            return Ok(Served::missed(
                Answered::replica(answered, None),
                key,
                missed,
            ));
        }
        let fill = Fill {
            // The client's answer names its key: a clone per miss (a render), none per hit.
            key: key.clone(),
            // Kept here too: a corrupt entry sends the request on (below).
            variant: self.variant.clone(),
            head: self.upstream(&head),
            vary: self
                .vary_view(&head)
                .unwrap_or_else(|| head.headers.clone()),
            seen,
            replaces: fallback.is_some(),
            permit,
        };
        let ask = self.ask(&head);
        let answered = match fill.answer(app, cache, fallback, ask, self.now).await {
            // The entry the miss was to be answered with does not inflate: the replica answers.
            Err(ProxyError::CorruptEntry) => {
                corrupt(app, cache, &key);
                let up = self.upstream(&head);
                let reply = Box::pin(app.upstream.send(up, body::empty())).await?;
                let answered = passed(reply.into_response(), &head.headers, ask.head);
                Ok(Answered::replica(answered, None))
            }
            answered => answered,
        };
        // One outcome per request: a stale-if-error answer counted itself as stale.
        let event = if matches!(
            answered,
            Ok(Answered {
                outcome: Outcome::StaleIfError,
                ..
            })
        ) {
            RouteEvent::Stale
        } else {
            app.metrics.cache_misses.inc();
            RouteEvent::Miss
        };
        count_route(app, cache, &head, event);
        Ok(Served::missed(answered?, key, missed))
    }
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
    ) -> Result<Answered, ProxyError> {
        let wait = cache.cfg().stale_if_error_wait;
        let fetched = match &fallback {
            Some(stale) if !wait.is_zero() => match self.bounded(app, cache, wait).await {
                Some(fetched) => fetched,
                None => {
                    app.metrics.stale_if_error_waits.inc();
                    let stale = Arc::clone(stale);
                    return stale_if_error(app, stale, ask, now, StaleReason::OriginTimeout, None);
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
            Filled::Passed { response, why } => Fetched::Passed(response, why),
        })
    }
}

/// Counts a page request for the hot set a new build pre-renders (`deploy::hot`): here for
/// what the driver answers, in `fast_path` for what the lane answers.
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
    /// Not stored (uncacheable, a server error), for this reason: pass it through.
    Passed(Response<Body>, Pass),
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
) -> Result<Answered, ProxyError> {
    let entry = |entry: Arc<Entry>, outcome| {
        let response =
            respond::response(&entry, ask, outcome, now).ok_or(ProxyError::CorruptEntry)?;
        Ok(Answered {
            response,
            outcome,
            entry: Some(entry),
            not_stored: None,
            stale: None,
        })
    };
    match fetched {
        Ok(Fetched::Stored(e)) => entry(e, Outcome::Miss { stored: true }),
        Ok(Fetched::Followed(e)) => entry(e, Outcome::Collapsed),
        Ok(Fetched::Led(resp)) => {
            let answered = (gzip_for(resp, ask), Outcome::Miss { stored: true });
            Ok(Answered::replica(answered, None))
        }
        Ok(Fetched::Passed(resp, why)) => {
            let stale = fallback.filter(|_| resp.status().is_server_error());
            let reason = StaleReason::OriginError;
            match stale.map(|stale| stale_if_error(app, stale, ask, now, reason, Some(why))) {
                Some(Ok(answered)) => Ok(answered),
                // No stale entry, or one that does not inflate: the replica's own answer.
                None | Some(Err(_)) => Ok(Answered::replica(
                    passed(resp, ask.headers, ask.head),
                    Some(why),
                )),
            }
        }
        Err(e) => match (fallback, refresh::origin_failure(&e)) {
            // A stale entry that does not inflate leaves the replica's failure as the answer.
            (Some(stale), Some(reason)) => {
                stale_if_error(app, stale, ask, now, reason, None).or(Err(e))
            }
            _ => Err(e),
        },
    }
}

/// The stale entry kept for failing replicas, served because of `reason`, as the answer;
/// `not_stored`: why the replica's own answer was not (a 5xx). An entry that does not inflate
/// is counted as corrupt and answers nothing ([`ProxyError::CorruptEntry`]).
fn stale_if_error(
    app: &AppState,
    entry: Arc<Entry>,
    ask: Ask<'_>,
    now: u64,
    reason: StaleReason,
    not_stored: Option<Pass>,
) -> Result<Answered, ProxyError> {
    let outcome = Outcome::StaleIfError;
    let Some(response) = respond::response(&entry, ask, outcome, now) else {
        app.metrics.store_corrupt.inc();
        tracing::warn!("a stale entry kept for stale-if-error did not inflate");
        return Err(ProxyError::CorruptEntry);
    };
    app.metrics.served_stale(reason);
    Ok(Answered {
        response,
        outcome,
        entry: Some(entry),
        not_stored,
        stale: Some(reason),
    })
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
        && etag.is_some_and(|e| respond::if_none_match(request, &e))
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
    respond::mark(resp.headers_mut(), outcome);
    (resp, outcome)
}

/// The response compressed on the way when the client accepts gzip and it is worth it (the
/// replica was asked for identity).
fn gzip_for(resp: Response<Body>, ask: Ask<'_>) -> Response<Body> {
    if !ask.head
        && respond::accepts_gzip(ask.headers)
        && gzip::compressible(resp.status(), resp.headers())
    {
        gzip::encode(resp)
    } else {
        resp
    }
}

/// An entry that did not inflate: counted, dropped from the L1, and the request is a miss.
fn corrupt(app: &AppState, cache: &CacheState, key: &CacheKey) {
    app.metrics.store_corrupt.inc();
    cache.l1.remove(key.hash);
    tracing::warn!(key = %key.text, "stored body did not inflate; fetching again");
}
