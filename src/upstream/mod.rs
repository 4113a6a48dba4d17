//! Step 8 of the request flow: send a request to one Next.js replica and bring back its answer.
//!
//! Receives a sanitized request head and a streaming body; hands back the replica's response
//! head with a body that still streams ([`Reply`]). Owns the replica set ([`replicas`]), the
//! choice of replica ([`balance`]), health ([`health`], passive ejection in [`replicas`]),
//! discovery ([`discovery`]) and the pooled keep-alive client. A GET or HEAD without a body
//! whose exchange failed before a response head (connect or connection failure) is retried once
//! on another replica; nothing else is retried (the request may have changed state in the app).
//!
//! It does not look at what the response means (caching decisions belong to later stages) and
//! never buffers a body.

pub mod balance;
pub mod discovery;
pub mod health;
pub mod replicas;

use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::config;
use crate::http::body::{self, Body, Deadline, Guarded};
use crate::metrics::Metrics;
use replicas::{InFlight, Replica, ReplicaSet};

/// The pooled HTTP/1.1 client shared by requests and health checks.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Body>;

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
        source: hyper_util::client::legacy::Error,
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
    /// The exchange failed after connecting (reset, malformed response).
    #[error("exchange with {replica} failed: {source}")]
    Exchange {
        /// The replica.
        replica: String,
        /// Why.
        #[source]
        source: hyper_util::client::legacy::Error,
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
    deadline: Instant,
}

impl Reply {
    /// For a `101`: the raw response (to take its upgraded connection) and the in-flight guard,
    /// which the tunnel keeps for as long as it lives.
    pub fn into_upgrade(self) -> (Response<Incoming>, InFlight) {
        (self.response, self.in_flight)
    }

    /// The response with a body that keeps the replica's in-flight count until it ends and
    /// fails when the total timeout passes.
    pub fn into_response(self) -> Response<Body> {
        let (in_flight, deadline) = (self.in_flight, self.deadline);
        self.response
            .map(|b| body::boxed(Deadline::new(Guarded::new(b, in_flight), deadline)))
    }
}

/// The replicas and how to reach them.
#[derive(Debug)]
pub struct Upstream {
    client: Client,
    replicas: Arc<ReplicaSet>,
    cfg: config::Upstream,
    passive_failures: Option<u32>,
    ejection: Duration,
    preserve_header_case: bool,
    metrics: Arc<Metrics>,
}

/// Builds the pooled client.
pub fn client(cfg: &config::Upstream, preserve_header_case: bool) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle_per_replica)
        .http1_preserve_header_case(preserve_header_case)
        .set_host(false)
        .build(connector)
}

impl Upstream {
    /// An upstream over `replicas`.
    pub fn new(
        cfg: &config::Config,
        client: Client,
        replicas: Arc<ReplicaSet>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            replicas,
            cfg: cfg.upstream.clone(),
            passive_failures: cfg.health.passive_failures,
            ejection: cfg.health.ejection,
            preserve_header_case: cfg.listen.preserve_header_case,
            metrics,
        }
    }

    /// The same replicas and settings with a pool of its own (for another worker thread).
    pub fn with_own_pool(&self) -> Upstream {
        Upstream {
            client: client(&self.cfg, self.preserve_header_case),
            replicas: Arc::clone(&self.replicas),
            cfg: self.cfg.clone(),
            passive_failures: self.passive_failures,
            ejection: self.ejection,
            preserve_header_case: self.preserve_header_case,
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// The replica set.
    pub fn replicas(&self) -> &Arc<ReplicaSet> {
        &self.replicas
    }

    /// The pooled client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends `head` + `body` to a replica. A bodiless GET/HEAD is retried once on another
    /// replica when the first could not be connected to, or its connection failed before a
    /// response head came back (a pooled connection the replica was closing, a replica that
    /// died mid-request): idempotent, so safe, as nginx's `proxy_next_upstream error`. Timeouts
    /// are not retried: a replica that is slow to render would only be asked to render twice.
    pub async fn send(&self, head: Parts, body: Body) -> Result<Reply, UpstreamError> {
        let deadline = Instant::now() + self.cfg.total_timeout;
        let retry = (matches!(head.method, Method::GET | Method::HEAD) && body.is_end_stream())
            .then(|| copy_head(&head));
        let first = self.pick(None)?;
        let err = match self.attempt(&first, head, body, deadline).await {
            Err(e @ (UpstreamError::Connect { .. } | UpstreamError::Exchange { .. })) => e,
            other => return other,
        };
        let Some(head) = retry else { return Err(err) };
        let second = self.pick(Some(&first))?;
        if Arc::ptr_eq(&first, &second) {
            return Err(err);
        }
        self.metrics.upstream_retries.inc();
        tracing::debug!(error = %err, retry = %second.authority, "retrying on another replica");
        self.attempt(&second, head, body::empty(), deadline).await
    }

    fn pick(&self, avoid: Option<&Replica>) -> Result<Arc<Replica>, UpstreamError> {
        self.replicas
            .with(|list| balance::pick(list, avoid))
            .ok_or(UpstreamError::NoReplica)
    }

    async fn attempt(
        &self,
        replica: &Arc<Replica>,
        mut head: Parts,
        body: Body,
        deadline: Instant,
    ) -> Result<Reply, UpstreamError> {
        head.uri = replica_uri(replica, &head.uri);
        head.version = Version::HTTP_11;
        let in_flight = replica.begin();
        let wait = self
            .cfg
            .response_header_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let name = || replica.authority.to_string();
        match tokio::time::timeout(wait, self.client.request(Request::from_parts(head, body))).await
        {
            Ok(Ok(response)) => {
                replica.record_success();
                Ok(Reply {
                    response,
                    replica: Arc::clone(replica),
                    in_flight,
                    deadline,
                })
            }
            Ok(Err(source)) if source.is_connect() => {
                self.failed(replica);
                Err(UpstreamError::Connect {
                    replica: name(),
                    source,
                })
            }
            Ok(Err(source)) if caused_by::<http_body_util::LengthLimitError>(&source) => {
                Err(UpstreamError::BodyTooLarge)
            }
            Ok(Err(source)) if caused_by::<body::ClientBodyError>(&source) => {
                Err(UpstreamError::ClientBody(source.to_string()))
            }
            Ok(Err(source)) => Err(UpstreamError::Exchange {
                replica: name(),
                source,
            }),
            Err(_) => {
                self.failed(replica);
                Err(UpstreamError::Timeout {
                    replica: name(),
                    after: wait,
                })
            }
        }
    }

    fn failed(&self, replica: &Replica) {
        if replica.record_failure(self.passive_failures, self.ejection) {
            self.metrics.replica_ejections.inc();
            tracing::warn!(replica = %replica.authority, for_ = ?self.ejection, "replica ejected after consecutive failures");
        }
    }
}

fn replica_uri(replica: &Replica, original: &Uri) -> Uri {
    let pq = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    Uri::builder()
        .scheme(http::uri::Scheme::HTTP)
        .authority(replica.authority.clone())
        .path_and_query(pq)
        .build()
        .unwrap_or_else(|_| original.clone())
}

/// A copy of a request head for a retry (extensions carry the header-case map).
fn copy_head(head: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    *req.extensions_mut() = head.extensions.clone();
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
