//! `GET /api/stats`: everything the dashboard shows about this gateway, as one JSON document.
//!
//! Its counters (`requests.hit`, `coalesce.lock_contended`, `errors.by_status.502`, …) are not
//! listed here: every series of the metrics table that names a place in this document is put
//! there ([`place`]), so a counter is declared once, in `crate::metrics::table`. What is built
//! here is what is derived (ratios, quantiles, renders saved, banners) or read from the
//! gateway's state (readiness, replicas, Redis, the newest server errors, the route table).
//! Ratios, rates and the latency tiles come from the sampled [`History`]; Redis facts
//! (`INFO memory`, `INFO stats`, `DBSIZE`) are read when the document is built, each bounded by
//! the store's command timeout, and are all `null` while Redis does not answer (the dashboard
//! says "Redis down", never "– of unlimited bytes").

use std::sync::Arc;

use fred::types::InfoKind;
use serde_json::{Value, json};

pub use super::history::{History, SAMPLE_EVERY};
use super::history::{Sample, TIMED};
use crate::app::AppState;
use crate::metrics::{Histogram, Metrics};
use crate::shared::Shared;

/// Puts every series of `metrics` that names a place in the stats document into `doc`
/// (`"requests.hit"`: the `hit` key of the `requests` object, made when missing); series with
/// the same place add up.
pub fn place(doc: &mut Value, metrics: &Metrics) {
    for family in metrics.families() {
        for series in family.series {
            let (Some(path), crate::metrics::Value::Count(n)) = (series.json, series.value) else {
                continue;
            };
            let mut at = &mut *doc;
            let mut keys = path.split('.').peekable();
            while let Some(key) = keys.next() {
                let Some(object) = at.as_object_mut() else {
                    break;
                };
                if keys.peek().is_none() {
                    let sum = object.get(key).and_then(Value::as_u64).unwrap_or(0) + n;
                    object.insert(key.to_owned(), json!(sum));
                    break;
                }
                at = object.entry(key).or_insert_with(|| json!({}));
            }
        }
    }
}

fn ms(h: &Histogram, q: f64) -> Value {
    match h.quantile(q) {
        Some(u64::MAX) => json!(">10000"),
        Some(v) => json!(v),
        None => Value::Null,
    }
}

/// A duration in microseconds as the document gives it: milliseconds, `">10000"` past the
/// last bucket, `null` for none.
fn ms_of_us(us: Option<u64>) -> Value {
    match us {
        Some(u64::MAX) => json!(">10000"),
        Some(v) => json!(v as f64 / 1e3),
        None => Value::Null,
    }
}

/// The document for `app`.
pub async fn stats(app: &Arc<AppState>, history: &History) -> Value {
    let m = &app.metrics;
    let now = Sample::now(m);
    let samples = history.samples();
    let replicas = replicas(app);
    let (cache, redis, fleet, log) = cache_parts(app).await;
    let banners = banners(app, &replicas, &redis, &now, &samples);
    let ratio = |secs: u64| now.hit_ratio_since(&since(&samples, now.at, secs));
    let mut doc = json!({
        "at": now.at,
        // As /readyz says it: from the SIGTERM on, while the listeners still accept for the
        // accept grace (`accepting`), then drain.
        "draining": app.stopping.is_cancelled(),
        "accepting": !app.draining.is_cancelled(),
        "readiness": readiness(app),
        "banners": banners,
        "requests": {
            "hit_ratio": { "1m": ratio(60), "5m": ratio(300), "1h": ratio(3_600) },
        },
        "saved": {
            // Requests that did not reach a replica: answered from the cache (fresh or stale),
            // or given another request's render; and the renders that were made.
            "by_cache": m.cache_hits.get() + m.cache_stale.get(),
            "by_coalescing": m.coalesced_local.get() + m.coalesced_remote.get(),
            "renders": m.renders.get(),
        },
        "latency": latency(m, history, now.at),
        "errors": {
            "total": now.errors_5xx,
            "last_minute": now.errors_5xx.saturating_sub(since(&samples, now.at, 60).errors_5xx),
            "recent": m.recent_errors.newest_first(),
        },
        "cache": cache,
        "coalesce": {
            "wait_p50_ms": ms(&m.follower_wait_ms, 0.5),
            "wait_p99_ms": ms(&m.follower_wait_ms, 0.99),
        },
        "replicas": replicas,
        "redis": redis,
        "fleet": fleet,
        "deploy": deploy(app),
        "routes": routes(app),
        "top_missed": m.missed_paths.top(10).into_iter().map(|(p, n)| json!({ "path": p, "misses": n })).collect::<Vec<_>>(),
        "revalidations": log,
        "series": series(&samples),
    });
    place(&mut doc, m);
    doc
}

/// The oldest sample at most `secs` old (all zeros when there is none: since start).
fn since(samples: &[Sample], now: u64, secs: u64) -> Sample {
    samples
        .iter()
        .find(|s| now.saturating_sub(s.at) <= secs)
        .copied()
        .unwrap_or_default()
}

/// `/readyz`'s answer, for the readiness tile.
fn readiness(app: &AppState) -> Value {
    let r = super::readiness(app);
    json!({
        "ready": r.unready.is_none(),
        "reason": r.unready.map(super::Unready::as_str),
        "replicas_healthy": r.healthy,
        "replicas": r.total,
        "redis": r.redis.as_str(),
        "invalidations": if r.loading { "loading" } else { "loaded" },
    })
}

/// Client latency p50 / p99 per cache outcome over about the last five minutes.
fn latency(m: &Metrics, history: &History, now: u64) -> Value {
    let (recent, window_s) = history.recent_latencies(m, now);
    let mut out = json!({ "window_s": window_s });
    for outcome in TIMED {
        out[outcome.as_str()] = json!({
            "count": recent.count(outcome),
            "p50_ms": ms_of_us(recent.quantile_us(outcome, 0.5)),
            "p99_ms": ms_of_us(recent.quantile_us(outcome, 0.99)),
        });
    }
    out
}

/// The charts' points: one per sampled interval. An interval without a cache answer has no
/// hit ratio and one without a hit or miss no latency (`null`: a gap, not a zero).
fn series(samples: &[Sample]) -> Vec<Value> {
    samples
        .windows(2)
        .map(|w| {
            let dt = w[1].at.saturating_sub(w[0].at).max(1) as f64;
            let per_s = |n: u64, o: u64| n.saturating_sub(o) as f64 / dt;
            let [hit50, hit99, miss50, miss99] = w[1].latency_us.map(ms_of_us);
            json!({
                "at": w[1].at,
                "rps": per_s(w[1].requests, w[0].requests),
                "errors_per_s": per_s(w[1].errors_5xx, w[0].errors_5xx),
                "stale_if_error_per_s": per_s(w[1].stale_if_error, w[0].stale_if_error),
                "hit_ratio": w[1].hit_ratio_since(&w[0]),
                "hit_p50_ms": hit50, "hit_p99_ms": hit99,
                "miss_p50_ms": miss50, "miss_p99_ms": miss99,
            })
        })
        .collect()
}

/// Replicas, with their health, latency and last error (and when it happened).
fn replicas(app: &AppState) -> Vec<Value> {
    app.upstream
        .replicas()
        .snapshot()
        .iter()
        .map(|r| {
            json!({
                "address": r.authority.to_string(),
                "healthy": r.is_healthy(),
                "build": r.build().map(|b| b.as_ref().clone()),
                "in_flight": r.in_flight(),
                "sent": r.sent(),
                "p50_ms": ms(&r.latency_ms, 0.5),
                "p99_ms": ms(&r.latency_ms, 0.99),
                "last_error": r.last_error().map(|(message, at_ms)| json!({ "message": message, "at_ms": at_ms })),
            })
        })
        .collect()
}

/// What needs a human, most urgent first.
fn banners(
    app: &AppState,
    replicas: &[Value],
    redis: &Value,
    now: &Sample,
    samples: &[Sample],
) -> Vec<String> {
    let mut banners: Vec<String> = Vec::new();
    if redis["configured"] == true && redis["connected"] != true {
        banners.push("Redis is down: serving from each gateway's L1 and the replicas; coalescing and invalidation are local only".into());
    }
    if let Some(why) = super::unready(app) {
        banners.push(format!("not ready: /readyz answers 503 ({})", why.as_str()));
    }
    let minute_ago = since(samples, now.at, 60);
    let errors = now.errors_5xx.saturating_sub(minute_ago.errors_5xx);
    if errors > 0 {
        banners.push(format!(
            "server errors: {errors} answers of 500 and above in the last minute"
        ));
    }
    let ejected: Vec<&str> = replicas
        .iter()
        .filter(|r| r["healthy"] == false)
        .filter_map(|r| r["address"].as_str())
        .collect();
    if !ejected.is_empty() {
        banners.push(format!("replicas out of rotation: {}", ejected.join(", ")));
    }
    if now.stale_if_error > minute_ago.stale_if_error {
        banners.push(format!(
            "serving stale-if-error: {} answers in the last minute came from stale entries because replicas failed",
            now.stale_if_error - minute_ago.stale_if_error
        ));
    }
    if redis["maxmemory"] == 0 {
        banners.push("Redis has no maxmemory: it grows until the host runs out of memory; set maxmemory and maxmemory-policy allkeys-lru".into());
    } else if redis["maxmemory_policy"] == "noeviction" {
        banners.push(
            "Redis maxmemory-policy is noeviction: writes fail once it is full; use allkeys-lru"
                .into(),
        );
    }
    banners
}

/// The cache, Redis, fleet and revalidation-log parts (placeholders with the cache off).
async fn cache_parts(app: &AppState) -> (Value, Value, Value, Value) {
    let Some(c) = &app.cache else {
        return (
            json!({ "enabled": false }),
            json!({ "configured": false }),
            json!({}),
            Value::Array(Vec::new()),
        );
    };
    let (entries, bytes) = c.l1.size();
    let redis = redis_facts(c.shared()).await;
    let log = match c.log.recent(c.redis(), 20).await {
        Ok(records) => Value::from(records),
        Err(e) => json!({ "error": format!("the revalidation log is unavailable: {e}") }),
    };
    let mut live = c.fleet.live();
    live.insert(0, c.gateway_id().to_owned());
    let cache = json!({
        "enabled": true,
        "store": c.store.kind(),
        "l1": { "entries": entries, "bytes": bytes, "max_bytes": c.cfg().l1_max_bytes },
        "invalidated_tags": c.epochs.len(),
    });
    let fleet = json!({
        "gateways": live,
        "this": c.gateway_id(),
        // What @isrgate/next reports; never the previewModeId.
        "builds": app.deploy.builds.all().iter().map(|b| json!({
            "id": b.id,
            "build_id": b.build_id,
            "built_ms": b.built_ms,
            "deployment_id": b.deployment_id,
            "next": b.next,
            "seen_ms": b.seen_ms,
        })).collect::<Vec<_>>(),
    });
    (cache, redis, fleet, log)
}

/// The route table: each route's counters, and the paths rendered most with their route.
fn routes(app: &AppState) -> Value {
    let configured = app
        .cache
        .as_ref()
        .map(|c| c.cfg().routes.clone())
        .unwrap_or_default();
    let rows = app.metrics.routes.read();
    let top: Vec<Value> = app
        .metrics
        .rendered_paths
        .top(10)
        .into_iter()
        .map(|(path, renders)| {
            // The row its renders counted in: a route without one (nothing of it stored)
            // counted in `other`.
            let name = crate::metrics::routes::name(&configured, &path);
            let route = if rows.iter().any(|r| r.name == name) {
                name
            } else {
                crate::metrics::routes::OTHER.to_owned()
            };
            json!({ "path": path, "renders": renders, "route": route })
        })
        .collect();
    json!({ "rows": rows, "top_rendered": top })
}

/// The builds this gateway's replicas run, the current one and the rollout.
fn deploy(app: &AppState) -> Value {
    let (tally, healthy) = app.deploy.tally();
    let status = app.deploy.status.snapshot();
    json!({
        "current": status.current,
        "pinned": status.pinned,
        "switched_ms": status.switched_ms,
        "pending": status.pending,
        "prewarm": status.prewarm,
        "healthy_replicas": healthy,
        "builds": tally.iter().map(|(pin, n)| json!({
            "build": pin.build,
            "healthy_replicas": n,
            "current": status.current.as_deref() == Some(pin.build.as_str()),
            "namespace": pin.namespace,
        })).collect::<Vec<_>>(),
    })
}

/// What the dashboard shows about Redis: its state, and (while it answers) memory, evictions,
/// keyspace hit rate and keys; every fact `null` while it does not.
async fn redis_facts(shared: Option<&Shared>) -> Value {
    let Some(shared) = shared else {
        return json!({ "configured": false });
    };
    let open = shared.breaker_open();
    let (memory, stats, keys) = tokio::join!(
        async { shared.info(InfoKind::Memory).await.ok() },
        async { shared.info(InfoKind::Stats).await.ok() },
        async { shared.key_count().await.ok() },
    );
    let r = shared.redis();
    let field = |info: &Option<String>, name: &str| {
        info.as_deref().and_then(|i| {
            i.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        })
    };
    let number =
        |info: &Option<String>, name: &str| field(info, name).and_then(|v| v.parse::<u64>().ok());
    let (hits, misses) = (
        number(&stats, "keyspace_hits"),
        number(&stats, "keyspace_misses"),
    );
    let hit_rate = match (hits, misses) {
        (Some(h), Some(m)) if h + m > 0 => json!(h as f64 / (h + m) as f64),
        _ => Value::Null,
    };
    json!({
        "configured": true,
        "connected": memory.is_some() && !open,
        "circuit_open": open,
        "latency_p50_ms": ms(r.latency_ms(), 0.5),
        "latency_p99_ms": ms(r.latency_ms(), 0.99),
        "used_memory": number(&memory, "used_memory"),
        "maxmemory": number(&memory, "maxmemory"),
        "maxmemory_policy": field(&memory, "maxmemory_policy"),
        "evicted_keys": number(&stats, "evicted_keys"),
        "expired_keys": number(&stats, "expired_keys"),
        "keyspace_hits": hits,
        "keyspace_misses": misses,
        "hit_rate": hit_rate,
        "keys": keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_go_where_the_table_places_them() {
        let m = Metrics::default();
        m.requests.add(5);
        m.cache_hits.add(2);
        m.served_stale(crate::cache::policy::StaleReason::OriginError);
        m.served_stale(crate::cache::policy::StaleReason::OriginTimeout);
        m.refreshed(crate::proxy::refresh::Refreshed::Stored);
        let mut doc = json!({ "requests": { "hit_ratio": {} } });
        place(&mut doc, &m);
        assert_eq!(doc["requests"]["total"], 5);
        assert_eq!(doc["requests"]["hit"], 2);
        assert_eq!(doc["requests"]["stale"], 0);
        assert_eq!(doc["requests"]["stale_if_error"], 2, "both origin reasons");
        assert_eq!(doc["requests"]["hit_ratio"], json!({}));
        assert_eq!(doc["coalesce"]["refreshes"]["stored"], 1);
        assert_eq!(doc["coalesce"]["lock_contended"], 0);
    }
}
