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
pub mod retention;
pub mod rewarm;
pub mod rules;
pub mod scan;
pub mod snapshot;
pub mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::request::Parts;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use crate::app::AppState;
use crate::http::body::Body;

/// The webhook's path on the public and admin listeners.
pub const PATH: &str = "/_isrgate/revalidate";

/// Answers a call to [`PATH`]; never fails (errors are responses).
pub async fn handle<B>(app: &Arc<AppState>, head: Parts, body: B) -> Response<Body>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(cache) = &app.cache else {
        return answer(
            StatusCode::NOT_FOUND,
            "the cache is disabled: nothing to revalidate",
        );
    };
    let config = app.config.load_full();
    let hook = &config.webhook;
    let Some(secrets) = &hook.secrets else {
        return answer(
            StatusCode::NOT_FOUND,
            "the webhook is disabled: set ISRGATE_WEBHOOK_SECRET to enable it",
        );
    };
    if let Err(e) = webhook::check_method(&head.method, hook.allow_query_secret) {
        return refused(&e, hook.allow_query_secret);
    }
    let raw = match Limited::new(body, hook.max_body_bytes).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body over {} bytes", hook.max_body_bytes),
            );
        }
        Err(e) => return answer(StatusCode::BAD_REQUEST, &format!("body: {e}")),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let policy = auth::Policy {
        secrets,
        window: hook.signature_window,
        allow_query_secret: hook.allow_query_secret,
    };
    let query = head.uri.query();
    let checked = auth::authenticate(&head.headers, query, &raw, &policy, now)
        .and_then(|()| webhook::read(&head.headers, &raw, query, hook.format, &hook.rules));
    let revalidation = match checked {
        Ok(r) => r,
        Err(e) => {
            app.metrics.webhook_refused.inc();
            return refused(&e, hook.allow_query_secret);
        }
    };
    let host = head
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    match run(app, cache, &revalidation, host, &source(&head)).await {
        Ok(report) => json(StatusCode::OK, &report),
        Err(e) if e.may_run_later() => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "Redis did not confirm the invalidation ({e}): this gateway applied it and retries \
                 it until Redis takes it, other gateways get it then; retry the call (it is \
                 safe to apply twice)"
            ),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "revalidation not applied: the store failed");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("Redis is unavailable ({e}); nothing was invalidated, retry later"),
            )
        }
    }
}

/// Applies a checked revalidation and reports every step (the webhook's and the dashboard's
/// purge form's one path). On error nothing was applied.
///
/// Runs in its own task: once the invalidation is applied, a caller that goes away (a CMS
/// timing out) does not cut the fan-out, the re-warm or the log short.
pub async fn run(
    app: &Arc<AppState>,
    cache: &Arc<crate::app::CacheState>,
    revalidation: &webhook::Revalidation,
    host: &str,
    source: &str,
) -> Result<serde_json::Value, crate::cache::store::StoreError> {
    let (app, cache, revalidation) = (Arc::clone(app), Arc::clone(cache), revalidation.clone());
    let (host, source) = (host.to_owned(), source.to_owned());
    let task =
        tokio::spawn(async move { steps(&app, &cache, &revalidation, &host, &source).await });
    match task.await {
        Ok(done) => done,
        // Only a panic gets here; say so rather than hang the caller.
        Err(e) => Err(crate::cache::store::StoreError::Aborted(e.to_string())),
    }
}

async fn steps(
    app: &Arc<AppState>,
    cache: &Arc<crate::app::CacheState>,
    revalidation: &webhook::Revalidation,
    host: &str,
    source: &str,
) -> Result<serde_json::Value, crate::cache::store::StoreError> {
    let config = app.config.load_full();
    let hook = &config.webhook;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
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
    let rewarmed = if revalidation.rewarm && hook.rewarm_concurrency > 0 {
        let paths = rewarm::targets(cache, revalidation);
        rewarm::rewarm(app, cache, host, &paths, hook.rewarm_concurrency).await
    } else {
        Vec::new()
    };
    tracing::info!(
        epoch, mode = revalidation.mode.as_str(), tags = ?tags,
        acked = acks.received.len(), missing = ?acks.missing, "revalidated"
    );
    let report = serde_json::json!({
        "epoch": epoch,
        "at_unix": now,
        "source": source,
        "mode": revalidation.mode.as_str(),
        "paths": revalidation.paths,
        "tags": tags,
        "entry": revalidation.entry,
        "gateways": {
            "applied_by": gateway,
            "acknowledged": acks.received,
            "missing": acks.missing,
            "elapsed_ms": acked_ms,
        },
        "replicas": replicas,
        "epoch_after_fanout": reapplied.as_ref().and_then(|r| r.as_ref().ok()),
        "reapply_error": reapplied.as_ref().and_then(|r| r.as_ref().err()),
        "rewarm": rewarmed,
        "elapsed_ms": millis(started.elapsed()),
    });
    if let Err(e) = cache.log.record(cache.redis(), &report).await {
        tracing::warn!(error = %e, "revalidation log not written");
    }
    Ok(report)
}

/// Who called, for the log: the client address the forwarding headers name, or "-".
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

/// The answer to a refused call (with `Allow` on a 405).
fn refused(e: &webhook::Rejected, allow_get: bool) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = answer(status, &e.to_string());
    if status == StatusCode::METHOD_NOT_ALLOWED {
        let allow = if allow_get { "GET, POST" } else { "POST" };
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static(allow));
    }
    r
}

fn answer(status: StatusCode, message: &str) -> Response<Body> {
    crate::http::reply::error(status, message)
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    crate::http::reply::json(status, value)
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
