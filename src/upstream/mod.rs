//! Step 8 of the request flow: send a request to one Next.js replica and bring back its answer.
//!
//! Receives a sanitized request head and a streaming body; hands back the replica's response
//! head with a body that still streams ([`Reply`]). Owns the replica set ([`replicas`]), the
//! choice of replica ([`balance`]), health ([`health`], passive ejection in [`replicas`]),
//! discovery ([`discovery`]) and the per-worker keep-alive pool ([`pool`]). A GET or HEAD without a body
//! whose exchange failed before a response head (connect or connection failure) is retried once
//! on another replica; nothing else is retried (the request may have changed state in the app).
//!
//! It does not look at what the response means (caching decisions belong to later stages) and
//! never buffers a body.

pub mod balance;
pub mod discovery;
pub mod health;
pub mod pin;
pub mod pool;
pub mod replicas;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::config;
use crate::http::body::{self, Body, Deadline, Guarded};
use crate::metrics::Metrics;
use replicas::{InFlight, Replica, ReplicaSet};

/// Why no response came back from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No replica is configured or discovered.
    #[error("no replica known")]
    NoReplica,
    /// The TCP connection could not be established.
    #[error("cannot connect to {replica}: {source}")]
    Connect {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: body::BoxError,
    },
    /// The replica stopped answering while this request waited: no response head, no
    /// answer to a probe either; it was ejected.
    #[error("{replica} stopped answering (no response head, no answer to a probe)")]
    Stalled {
        /// The replica.
        replica: String,
    },
    /// The response head did not arrive in time.
    #[error("{replica} sent no response head within {after:?}")]
    Timeout {
        /// The replica.
        replica: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The client's request body exceeded the limit while streaming.
    #[error("request body over the limit")]
    BodyTooLarge,
    /// The client's request body failed while streaming (the client went away).
    #[error("client request body failed: {0}")]
    ClientBody(String),
    /// The client's request body sent nothing for `listen.body_read_timeout`.
    #[error("client request body stalled")]
    ClientBodyStalled,
    /// The response body failed while it was being read for the cache.
    #[error("response body failed: {0}")]
    Body(String),
    /// The exchange failed after connecting (reset, malformed response).
    #[error("exchange with {replica} failed: {source}")]
    Exchange {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
}

/// A response head from a replica whose body is still streaming.
#[derive(Debug)]
pub struct Reply {
    /// The response as received.
    pub response: Response<Incoming>,
    /// Who answered.
    pub replica: Arc<Replica>,
    in_flight: InFlight,
    lease: pool::Lease,
    deadline: Instant,
}

impl Reply {
    /// For a `101`: the raw response (to take its upgraded connection) and the in-flight guard,
    /// which the tunnel keeps for as long as it lives.
    pub fn into_upgrade(self) -> (Response<Incoming>, InFlight) {
        self.lease.forget();
        (self.response, self.in_flight)
    }

    /// The response with a body that keeps the replica's in-flight count until it ends and
    /// fails when the total timeout passes.
    /// It carries who answered (an [`Answered`](crate::logging::access::AnsweredBy) extension,
    /// for the access log).
    pub fn into_response(self) -> Response<Body> {
        let (in_flight, lease, deadline) = (self.in_flight, self.lease, self.deadline);
        let answered = crate::logging::access::AnsweredBy(self.replica.authority.clone());
        let mut resp = self.response.map(|b| {
            let leased = pool::Leased::new(b, lease);
            body::boxed(Deadline::new(Guarded::new(leased, in_flight), deadline))
        });
        resp.extensions_mut().insert(answered);
        resp
    }
}

/// The replicas and how to reach them.
#[derive(Debug)]
pub struct Upstream {
    pool: Arc<pool::Pool>,
    replicas: Arc<ReplicaSet>,
    settings: Shared,
    metrics: Arc<Metrics>,
}

/// `[upstream]` and `[health]` as the request path, the health checks and discovery read
/// them: shared by every worker, replaced whole by a reload ([`Upstream::set_settings`]).
#[derive(Debug)]
pub struct Settings {
    /// `[upstream]`.
    pub upstream: config::Upstream,
    /// `[health]`.
    pub health: Arc<config::Health>,
}

/// The settings now, for whoever holds a clone.
pub type Shared = Arc<ArcSwap<Settings>>;

/// When and how a request that waits probes its replica (`health.stall_after`).
struct Stall<'a> {
    after: Duration,
    path: &'a http::uri::PathAndQuery,
    /// How long the probe waits: `health.timeout` or `after`, the longer. A replica whose
    /// event loop a heavy render holds for a moment is not taken for a frozen one (that would
    /// send its page to another replica to render again).
    probe_wait: Duration,
}

impl Settings {
    fn stall(&self) -> Option<Stall<'_>> {
        let h = &self.health;
        h.stall_after.map(|after| Stall {
            after,
            path: &h.path,
            probe_wait: after.max(h.timeout),
        })
    }
}

/// The pool settings of `cfg`.
fn pool_settings(cfg: &config::Upstream, preserve_header_case: bool) -> pool::Settings {
    pool::Settings {
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.pool_idle_timeout,
        max_idle_per_replica: cfg.pool_max_idle_per_replica,
        preserve_header_case,
    }
}

impl Upstream {
    /// An upstream over `replicas`, with a keep-alive pool for this worker.
    pub fn new(cfg: &config::Config, replicas: Arc<ReplicaSet>, metrics: Arc<Metrics>) -> Self {
        let settings = pool_settings(&cfg.upstream, cfg.listen.preserve_header_case);
        Self {
            pool: Arc::new(pool::Pool::new(settings)),
            replicas,
            settings: Arc::new(ArcSwap::from_pointee(Settings {
                upstream: cfg.upstream.clone(),
                health: Arc::new(cfg.health.clone()),
            })),
            metrics,
        }
    }

    /// The same replicas and settings with a pool of its own (for another worker thread).
    pub fn with_own_pool(&self) -> Upstream {
        Upstream {
            pool: Arc::new(self.pool.sibling()),
            replicas: Arc::clone(&self.replicas),
            settings: Arc::clone(&self.settings),
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// The settings, shared (health checks and discovery read them each round).
    pub fn settings(&self) -> &Shared {
        &self.settings
    }

    /// Replaces `[upstream]` and `[health]` for every worker (a reload): requests that start
    /// from now on use them; requests in flight finish under the ones they started with.
    /// `preserve_header_case` (`[listen]`) is fixed at start.
    pub fn set_settings(&self, upstream: config::Upstream, health: config::Health) {
        let case = self.pool.preserve_header_case();
        self.pool.set_settings(pool_settings(&upstream, case));
        self.settings.store(Arc::new(Settings {
            upstream,
            health: Arc::new(health),
        }));
    }

    /// The replica set.
    pub fn replicas(&self) -> &Arc<ReplicaSet> {
        &self.replicas
    }

    /// This worker's connection pool.
    pub fn pool(&self) -> &Arc<pool::Pool> {
        &self.pool
    }

    /// Sends `head` + `body` to a replica. A bodiless GET/HEAD is retried once on another
    /// replica when the first could not be connected to, or its connection failed before a
    /// response head came back (a pooled connection the replica was closing, a replica that
    /// died mid-request), or it stopped answering altogether (see [`Upstream::attempt`]):
    /// idempotent, so safe, as nginx's `proxy_next_upstream error`. Timeouts are not retried: a
    /// replica that is slow to render would only be asked to render twice.
    ///
    /// A request pinned to a build ([`pin::Pin`]) goes to a replica of that build; a build
    /// asset that build answers 404 for is asked of each other build's replicas, and the
    /// client gets the first answer that is not a 404 (a tab of build A still fetches A's
    /// chunks after build B took over).
    pub async fn send(&self, head: Parts, body: Body) -> Result<Reply, UpstreamError> {
        let pin = head.extensions.get::<Arc<pin::Pin>>().cloned();
        let asset = match &pin {
            Some(pin) if head.method == Method::GET && pin::is_build_asset(head.uri.path()) => {
                Some((copy_head(&head), Arc::clone(pin)))
            }
            _ => None,
        };
        let reply = self.send_pinned(head, body, pin.as_deref()).await?;
        match asset {
            Some((head, pin)) if reply.response.status() == http::StatusCode::NOT_FOUND => {
                let missing = |r: &Response<Incoming>| r.status() == http::StatusCode::NOT_FOUND;
                let found = self.elsewhere(&head, &pin.build, None, missing).await;
                if found.is_some() {
                    self.metrics.asset_fallbacks.inc();
                }
                Ok(found.unwrap_or(reply))
            }
            _ => Ok(reply),
        }
    }

    /// Sends a server action (a POST with `Next-Action`). While another build has healthy
    /// replicas, its body is kept (when it declares a length of at most 1 MiB, as browsers'
    /// action fetches do) so that, when the pinned build does not know the action (Next
    /// answers `x-nextjs-action-not-found`: a tab of another build), it goes to the other
    /// builds' replicas, one per build: an old tab's action reaches the build it came from.
    pub async fn send_action(&self, head: Parts, body: Body) -> Result<Reply, UpstreamError> {
        const MAX_KEPT: u64 = 1 << 20;
        let pin = head.extensions.get::<Arc<pin::Pin>>().cloned();
        let declared = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let Some(pin) =
            pin.filter(|p| declared.is_some_and(|n| n <= MAX_KEPT) && self.others(&p.build))
        else {
            return self.send(head, body).await;
        };
        let bytes = http_body_util::BodyExt::collect(body)
            .await
            .map_err(|e| UpstreamError::ClientBody(e.to_string()))?
            .to_bytes();
        let copy = copy_head(&head);
        let reply = self
            .send_pinned(head, body::full(bytes.clone()), Some(&pin))
            .await?;
        if !action_not_found(&reply.response) {
            return Ok(reply);
        }
        let found = self
            .elsewhere(&copy, &pin.build, Some(bytes), action_not_found)
            .await;
        if found.is_some() {
            self.metrics.action_fallbacks.inc();
        }
        Ok(found.unwrap_or(reply))
    }

    /// Whether a healthy replica runs another build than `build`.
    fn others(&self, build: &str) -> bool {
        self.replicas
            .with(|list| balance::pick_other(list, build, &[]).is_some())
    }

    /// Asks one replica of each other build than `build` (not retried, never stalled out);
    /// the first answer `missing` does not refuse, if any.
    async fn elsewhere(
        &self,
        head: &Parts,
        build: &str,
        body: Option<bytes::Bytes>,
        missing: fn(&Response<Incoming>) -> bool,
    ) -> Option<Reply> {
        let mut tried = vec![build.to_owned()];
        while let Some(replica) = self
            .replicas
            .with(|list| balance::pick_other(list, build, &tried))
        {
            let other = replica.build()?;
            tried.push(other.as_ref().clone());
            let deadline = Instant::now() + self.settings.load().upstream.total_timeout;
            let body = body.clone().map_or_else(body::empty, body::full);
            let attempt = self.attempt(&replica, copy_head(head), body, deadline, false);
            if let Ok(reply) = attempt.await {
                if !missing(&reply.response) {
                    return Some(reply);
                }
            }
        }
        None
    }

    async fn send_pinned(
        &self,
        head: Parts,
        body: Body,
        pin: Option<&pin::Pin>,
    ) -> Result<Reply, UpstreamError> {
        let build = pin.map(|p| p.build.as_str());
        let deadline = Instant::now() + self.settings.load().upstream.total_timeout;
        let retry = (matches!(head.method, Method::GET | Method::HEAD) && body.is_end_stream())
            .then(|| copy_head(&head));
        let first = self.pick(None, build)?;
        let err = match self
            .attempt(&first, head, body, deadline, retry.is_some())
            .await
        {
            Err(
                e @ (UpstreamError::Connect { .. }
                | UpstreamError::Exchange { .. }
                | UpstreamError::Stalled { .. }),
            ) => e,
            other => return other,
        };
        let Some(head) = retry else { return Err(err) };
        let second = self.pick(Some(&first), build)?;
        if Arc::ptr_eq(&first, &second) {
            return Err(err);
        }
        self.metrics.upstream_retries.inc();
        tracing::debug!(error = %err, retry = %second.authority, "retrying on another replica");
        self.attempt(&second, head, body::empty(), deadline, true)
            .await
    }

    /// Sends a bodiless `head` to `replica` itself, not retried elsewhere: a question only that
    /// replica can answer (the other variant of the page it just rendered, from its own
    /// cache).
    pub async fn send_to(
        &self,
        replica: &Arc<Replica>,
        head: Parts,
    ) -> Result<Reply, UpstreamError> {
        let deadline = Instant::now() + self.settings.load().upstream.total_timeout;
        self.attempt(replica, head, body::empty(), deadline, true)
            .await
    }

    fn pick(
        &self,
        avoid: Option<&Replica>,
        build: Option<&str>,
    ) -> Result<Arc<Replica>, UpstreamError> {
        self.replicas
            .with(|list| balance::pick(list, avoid, build))
            .ok_or(UpstreamError::NoReplica)
    }

    /// One exchange with `replica`. While it waits for the response head, a stall watch runs
    /// ([`Upstream::watch_stall`]): when the replica is found not answering at all, it is
    /// ejected, and this request gives up (`Stalled`) if it may be sent elsewhere
    /// (`abandon_on_stall`: bodiless GET/HEAD), else keeps waiting.
    async fn attempt(
        &self,
        replica: &Arc<Replica>,
        mut head: Parts,
        body: Body,
        deadline: Instant,
        abandon_on_stall: bool,
    ) -> Result<Reply, UpstreamError> {
        // HTTP/1.1 origin form; the Host header stays the client's (Next.js builds URLs from it).
        head.uri = origin_form(&head.uri);
        head.version = Version::HTTP_11;
        if !head.headers.contains_key(http::header::HOST) {
            if let Ok(v) = http::HeaderValue::from_str(replica.authority.as_str()) {
                head.headers.insert(http::header::HOST, v);
            }
        }
        let in_flight = replica.begin();
        // One look at the settings for the whole exchange (a reload in between changes the
        // next request, not this one).
        let settings = self.settings.load_full();
        let wait = settings
            .upstream
            .response_header_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let exchange = self
            .pool
            .send(&replica.authority, Request::from_parts(head, body));
        let started = std::time::Instant::now();
        let exchange = tokio::time::timeout(wait, exchange);
        tokio::pin!(exchange);
        let result = match settings.stall() {
            None => exchange.await,
            Some(stall) => tokio::select! {
                r = &mut exchange => r,
                () = self.watch_stall(replica, &stall, settings.health.ejection) => {
                    if abandon_on_stall {
                        replica.set_last_error("stopped answering".into());
                        return Err(UpstreamError::Stalled { replica: replica.authority.to_string() });
                    }
                    exchange.await
                }
            },
        };
        if result.as_ref().is_ok_and(Result::is_ok) {
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            replica.latency_ms.observe(ms);
        }
        let result = self.settle(replica, result, wait, &settings.health);
        if let Err(e) = &result {
            replica.set_last_error(e.to_string());
        }
        result.map(|(response, lease)| Reply {
            response,
            replica: Arc::clone(replica),
            in_flight,
            lease,
            deadline,
        })
    }

    /// Resolves when `replica` is ejected for not answering while a request waits on it. After
    /// `stall.after` without a response head, one request per replica probes `health.path`
    /// (waiting `stall.probe_wait`): a replica busy with a slow render still answers that, a
    /// frozen or wedged one does not and is ejected, so new requests avoid it within
    /// `stall_after` + `health.timeout` (3 s by default) instead of after three failed health
    /// checks or `response_header_timeout`. Never resolves otherwise.
    async fn watch_stall(&self, replica: &Replica, stall: &Stall<'_>, ejection: Duration) {
        let mut ejected = replica.stalls();
        tokio::time::sleep(stall.after).await;
        let found_out = |ejected: &tokio::sync::watch::Receiver<u64>| {
            ejected.has_changed().unwrap_or(false) || !replica.is_healthy()
        };
        if let Some(_probe) = replica.claim_probe() {
            // Found out meanwhile by another request's probe: no second one.
            if found_out(&ejected) {
                return;
            }
            if !health::probe(&self.pool, stall.path, stall.probe_wait, replica).await {
                replica.eject_stalled(ejection);
                self.metrics.replica_ejections.inc();
                tracing::warn!(
                    replica = %replica.authority,
                    waited = ?(stall.after + stall.probe_wait),
                    for_ = ?ejection,
                    "replica stopped answering (no response head, no answer to a probe); ejected"
                );
                return;
            }
        }
        // Alive, or another request is asking: wait for a verdict of ejection, if any.
        if ejected.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The outcome of one exchange with `replica`, counted.
    fn settle(
        &self,
        replica: &Replica,
        result: Result<
            Result<(Response<Incoming>, pool::Lease), pool::PoolError>,
            tokio::time::error::Elapsed,
        >,
        wait: std::time::Duration,
        health: &config::Health,
    ) -> Result<(Response<Incoming>, pool::Lease), UpstreamError> {
        let name = || replica.authority.to_string();
        match result {
            Ok(Ok((response, lease))) => {
                replica.record_success();
                replica.note_build(response.headers());
                Ok((response, lease))
            }
            Ok(Err(pool::PoolError::Connect(source))) => {
                self.failed(replica, health);
                Err(UpstreamError::Connect {
                    replica: name(),
                    source,
                })
            }
            Ok(Err(pool::PoolError::Exchange(source))) => Err(classify(name(), source)),
            Err(_) => {
                self.failed(replica, health);
                Err(UpstreamError::Timeout {
                    replica: name(),
                    after: wait,
                })
            }
        }
    }

    fn failed(&self, replica: &Replica, health: &config::Health) {
        if replica.record_failure(health.passive_failures, health.ejection) {
            self.metrics.replica_ejections.inc();
            tracing::warn!(replica = %replica.authority, for_ = ?health.ejection, "replica ejected after consecutive failures");
        }
    }
}

/// Next's answer to a server action this build does not know (404 or 409, by version).
fn action_not_found(response: &Response<Incoming>) -> bool {
    response.headers().contains_key("x-nextjs-action-not-found")
}

/// The request target in origin form (path and query), as HTTP/1.1 sends it to a server.
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    Uri::from(pq)
}

/// An exchange error, by cause: the client's body over the limit or failing is the client's
/// fault; anything else is the exchange's.
fn classify(replica: String, source: hyper::Error) -> UpstreamError {
    if caused_by::<http_body_util::LengthLimitError>(&source) {
        UpstreamError::BodyTooLarge
    } else if caused_by::<body::BodyStalled>(&source) {
        UpstreamError::ClientBodyStalled
    } else if caused_by::<body::ClientBodyError>(&source) {
        UpstreamError::ClientBody(source.to_string())
    } else {
        UpstreamError::Exchange { replica, source }
    }
}

/// A copy of a request head for a retry. Extensions are not copied: they hold hyper's
/// header-case map, a second header map to clone on every GET for a retry that almost never
/// happens; a retried request goes out with lower-case header names.
fn copy_head(head: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    if let Some(pin) = head.extensions.get::<Arc<pin::Pin>>() {
        req.extensions_mut().insert(Arc::clone(pin));
    }
    req.into_parts().0
}

fn caused_by<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}
