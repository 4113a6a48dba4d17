//! The webhook path (DESIGN.md "Webhook fan-out"), in order: [`auth`] → [`webhook`] (parse:
//! the gateway's own body, or a CMS's payload from [`cms`] mapped by [`rules`]) →
//! [`apply`] (epochs in Redis, published on the bus) → acknowledgements from every live
//! gateway ([`fleet`]) → [`fanout`] to every Next.js replica → [`rewarm`] → [`log`] → the
//! answer, which reports each step.
//!
//! `POST /_isrgate/revalidate` on the public listener (the CMS reaches it through the load
//! balancer) and on the admin listener. Every refusal (401, 400, 413, 422) happens before
//! anything is applied. A Redis that fails while applying is a 503: "nothing was invalidated"
//! when the script cannot have been sent (the circuit breaker is open); otherwise Redis may
//! still run it, so this gateway applies it at once and retries until Redis confirms
//! ([`provisional`]), and the fleet converges on the invalidation rather than disagreeing.
//! After a 200, no gateway that acknowledged serves the old version as fresh.

pub mod apply;
pub mod auth;
pub mod cms;
pub mod fanout;
pub mod fleet;
pub mod load;
pub mod log;
pub mod report;
pub mod retention;
pub mod rewarm;
pub mod rules;
pub mod scan;
pub mod snapshot;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use crate::app::AppState;
use crate::http::body::Body;
pub use report::Report;

/// The webhook's path on the public and admin listeners.
pub const PATH: &str = "/_isrgate/revalidate";

/// Answers a call to [`PATH`]; never fails (errors are responses). `source` names the caller
/// in the log ([`source`] on the public listener, the peer's address on the admin one).
pub async fn handle<B>(app: &Arc<AppState>, head: Parts, body: B, source: &str) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match revalidate(app, head, body, source).await {
        Ok(report) => crate::http::reply::json(StatusCode::OK, &report.to_value()),
        Err(e) => e.to_response(),
    }
}

/// Checks a call (method, size, credentials, body) and runs it.
async fn revalidate<B>(
    app: &Arc<AppState>,
    head: Parts,
    body: B,
    source: &str,
) -> Result<Report, Error>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cache = app.cache.as_ref().ok_or(Error::CacheDisabled)?;
    let config = app.config.load_full();
    let hook = &config.webhook;
    let secrets = hook.secrets.as_ref().ok_or(Error::WebhookDisabled)?;
    let refused = |rejected| Error::Refused {
        rejected,
        allow_get: hook.allow_query_secret,
    };
    webhook::check_method(&head.method, hook.allow_query_secret).map_err(refused)?;
    let raw = match Limited::new(body, hook.max_body_bytes).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Error::TooLarge(hook.max_body_bytes));
        }
        Err(e) => return Err(Error::Body(e.to_string())),
    };
    let policy = auth::Policy {
        secrets,
        window: hook.signature_window,
        allow_query_secret: hook.allow_query_secret,
    };
    let query = head.uri.query();
    let revalidation = auth::authenticate(
        &head.headers,
        query,
        &raw,
        &policy,
        crate::clock::unix_secs(std::time::SystemTime::now()),
    )
    .and_then(|()| webhook::read(&head.headers, &raw, query, hook.format, &hook.rules))
    .inspect_err(|_| app.metrics.webhook_refused.inc())
    .map_err(refused)?;
    let host = head
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    run(app, cache, &revalidation, host, source).await
}

/// Why a revalidation was refused or not done: the one answer of the webhook (on both
/// listeners) and of the admin API's purge. Refusals change nothing; `Unconfirmed` was
/// applied here and is retried ([`provisional`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 404: no cache to invalidate.
    #[error("the cache is disabled: nothing to revalidate")]
    CacheDisabled,
    /// 404: no secret configured.
    #[error("the webhook is disabled: set ISRGATE_WEBHOOK_SECRET to enable it")]
    WebhookDisabled,
    /// 400, 401, 403, 405 (with `Allow`), 422: the call as sent.
    #[error("{rejected}")]
    Refused {
        /// What was wrong.
        rejected: webhook::Rejected,
        /// `GET` is accepted too (`webhook.allow_query_secret`), for `Allow`.
        allow_get: bool,
    },
    /// 413: the body is over `webhook.max_body_bytes`.
    #[error("body over {0} bytes")]
    TooLarge(usize),
    /// 400: the body could not be read.
    #[error("body: {0}")]
    Body(String),
    /// 503: Redis may still run the invalidation; this gateway applied it and retries.
    #[error(
        "Redis did not confirm the invalidation ({0}): this gateway applied it and retries it until Redis takes it, other gateways get it then; retry the call (it is safe to apply twice)"
    )]
    Unconfirmed(crate::cache::store::StoreError),
    /// 503: Redis refused or could not be reached; nothing was applied.
    #[error("Redis is unavailable ({0}); nothing was invalidated, retry later")]
    Unavailable(crate::cache::store::StoreError),
    /// 500: the revalidation's task ended abnormally (a bug): it may be partly done.
    #[error(
        "the revalidation stopped unexpectedly ({0}); it may be partly applied: see the revalidation log, and retry (it is safe to apply twice)"
    )]
    Aborted(String),
}

impl Error {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::CacheDisabled | Error::WebhookDisabled => StatusCode::NOT_FOUND,
            Error::Refused { rejected, .. } => rejected.status(),
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Body(_) => StatusCode::BAD_REQUEST,
            Error::Unconfirmed(_) | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Aborted(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `{"error": message}` with the status (and `Allow` on a 405).
    pub fn to_response(&self) -> Response<Body> {
        let status = self.status();
        let mut r = crate::http::reply::error(status, &self.to_string());
        if let Error::Refused { allow_get, .. } = self
            && status == StatusCode::METHOD_NOT_ALLOWED
        {
            let allow = if *allow_get { "GET, POST" } else { "POST" };
            r.headers_mut()
                .insert(header::ALLOW, http::HeaderValue::from_static(allow));
        }
        r
    }
}

/// Applies a checked revalidation and reports every step (the webhook's and the dashboard's
/// purge form's one path). On error nothing was applied, but for [`Error::Unconfirmed`].
///
/// Runs in its own task: once the invalidation is applied, a caller that goes away (a CMS
/// timing out) does not cut the fan-out, the re-warm or the log short.
pub async fn run(
    app: &Arc<AppState>,
    cache: &Arc<crate::app::CacheState>,
    revalidation: &webhook::Revalidation,
    host: &str,
    source: &str,
) -> Result<Report, Error> {
    let (app, cache, revalidation) = (Arc::clone(app), Arc::clone(cache), revalidation.clone());
    let (host, source) = (host.to_owned(), source.to_owned());
    let task =
        tokio::spawn(async move { steps(&app, &cache, &revalidation, &host, &source).await });
    match task.await {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) if e.may_run_later() => Err(Error::Unconfirmed(e)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "revalidation not applied: the store failed");
            Err(Error::Unavailable(e))
        }
        // Only a panic gets here; say so rather than hang the caller.
        Err(e) => {
            tracing::error!(error = %e, "the revalidation task panicked");
            Err(Error::Aborted(e.to_string()))
        }
    }
}

async fn steps(
    app: &Arc<AppState>,
    cache: &Arc<crate::app::CacheState>,
    revalidation: &webhook::Revalidation,
    host: &str,
    source: &str,
) -> Result<Report, crate::cache::store::StoreError> {
    let config = app.config.load_full();
    let hook = &config.webhook;
    let now = crate::clock::unix_secs(std::time::SystemTime::now());
    let started = Instant::now();
    let tags = revalidation.all_tags();
    let gateway = cache.gateway_id();
    let expected = cache.fleet.live();
    let applied = apply::apply(
        cache.redis(),
        &cache.epochs,
        gateway,
        revalidation.mode,
        &tags,
    )
    .await;
    let epoch = match applied {
        Ok(epoch) => epoch,
        Err(e) => {
            if e.may_run_later() {
                provisional(app, cache, revalidation.mode, tags);
            }
            return Err(e);
        }
    };
    app.metrics.invalidations.inc();
    let acks = cache
        .fleet
        .wait_acks(epoch, expected, hook.ack_timeout)
        .await;
    let acked_ms = millis(started.elapsed());
    let replicas = fanout::fanout(app, &hook.fanout, &revalidation.paths, &revalidation.tags).await;
    // A miss between the first apply and a replica's own revalidation may have stored that
    // replica's old copy under the new epoch: record the tags once more, now that the replicas
    // are told.
    let reapplied = match &replicas {
        Some(results) if results.iter().any(|r| r.ok) => Some(
            apply::apply(
                cache.redis(),
                &cache.epochs,
                gateway,
                revalidation.mode,
                &tags,
            )
            .await
            .map_err(|e| e.to_string()),
        ),
        _ => None,
    };
    let rewarm = if revalidation.rewarm && hook.rewarm_concurrency > 0 {
        let paths = rewarm::targets(cache, revalidation);
        rewarm::rewarm(app, cache, host, &paths, hook.rewarm_concurrency).await
    } else {
        Vec::new()
    };
    tracing::info!(
        epoch, mode = revalidation.mode.as_str(), tags = ?tags,
        acked = acks.received.len(), missing = ?acks.missing, "revalidated"
    );
    let (epoch_after_fanout, reapply_error) = match reapplied {
        Some(Ok(epoch)) => (Some(epoch), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let report = Report {
        epoch,
        at_unix: now,
        source: source.to_owned(),
        mode: revalidation.mode,
        paths: revalidation.paths.clone(),
        tags,
        entry: revalidation.entry.clone(),
        gateways: report::Gateways {
            applied_by: gateway.to_owned(),
            acknowledged: acks.received,
            missing: acks.missing,
            elapsed_ms: acked_ms,
        },
        replicas,
        epoch_after_fanout,
        reapply_error,
        rewarm,
        elapsed_ms: millis(started.elapsed()),
    };
    if let Err(e) = cache.log.record(cache.redis(), &report.to_value()).await {
        tracing::warn!(error = %e, "revalidation log not written");
    }
    Ok(report)
}

/// Who called, for the log, on the public listener: the last `X-Forwarded-For` hop, which
/// the gateway itself wrote (`proxy::sanitize::forward`: the peer that connected), or "-".
/// Not for the admin listener, where nothing rewrote the header.
pub fn source(head: &Parts) -> String {
    head.headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next_back())
        .map_or_else(|| "-".to_owned(), |v| v.trim().to_owned())
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// Why `isrgate purge` could not invalidate.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// No Redis configured: the in-process store belongs to a running gateway.
    #[error(
        "purge needs the shared store: set redis.url or --redis (without Redis, call the running gateway's POST /_isrgate/revalidate)"
    )]
    NoRedis,
    /// The paths or tags are not acceptable.
    #[error("{0}")]
    Rejected(#[from] webhook::Rejected),
    /// Redis failed; nothing was invalidated.
    #[error("{0}; nothing was invalidated")]
    Store(#[from] crate::cache::store::StoreError),
}

/// Redis did not say whether it ran the apply script (a timeout, a dropped connection): the
/// command may still be queued and run when Redis answers again, and then every other gateway
/// applies it while this one, which answered 503, would not. So this gateway records it at
/// once under a local epoch (newer than anything it has stamped) and retries the script in a
/// tracked task until Redis takes it, with backoff, for at most [`RETRY_FOR`] or until
/// shutdown. Applying an invalidation twice changes nothing: the fleet ends up agreeing.
fn provisional(
    app: &Arc<AppState>,
    cache: &Arc<crate::app::CacheState>,
    mode: crate::cache::epochs::Mode,
    tags: Vec<String>,
) {
    let local = cache.epochs.current() + 1;
    cache
        .epochs
        .record(local, mode, tags.iter().map(String::as_str));
    tracing::warn!(tags = ?tags, "Redis did not confirm an invalidation; applied on this gateway, retrying until Redis takes it");
    let (cache, stop) = (Arc::clone(cache), app.draining.clone());
    cache.tasks.clone().spawn(async move {
        let started = Instant::now();
        let mut delay = Duration::from_millis(250);
        while started.elapsed() < RETRY_FOR {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            let gateway = cache.gateway_id();
            match apply::apply(cache.redis(), &cache.epochs, gateway, mode, &tags).await {
                Ok(epoch) => {
                    tracing::info!(epoch, tags = ?tags, "invalidation applied after Redis recovered");
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "invalidation retry failed"),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        tracing::error!(tags = ?tags, "invalidation never confirmed by Redis: other gateways may not have it; purge again");
    });
}

/// How long an unconfirmed invalidation is retried.
const RETRY_FOR: Duration = Duration::from_secs(600);

/// `isrgate purge`: applies an invalidation straight to Redis (the same script as the webhook,
/// so every running gateway gets it on the bus). Returns the epoch and the tags recorded.
pub async fn purge(
    config: &crate::config::Config,
    paths: Vec<String>,
    tags: Vec<String>,
    mode: crate::cache::epochs::Mode,
) -> Result<(u64, Vec<String>), PurgeError> {
    let revalidation = webhook::Revalidation::new(paths, tags, mode, false)?;
    let redis = config.redis.as_ref().ok_or(PurgeError::NoRedis)?;
    let settings = crate::cache::store::RedisSettings::for_cli(redis);
    let redis = crate::cache::store::RedisStore::connect(&settings)?;
    let all = revalidation.all_tags();
    let epochs = crate::cache::epochs::Epochs::default();
    let epoch = apply::apply(Some(&redis), &epochs, "cli", mode, &all).await?;
    Ok((epoch, all))
}
