//! `GET /api/stats`: everything the dashboard shows, as one JSON document, and the history it
//! draws its charts from.
//!
//! Its counters (`requests.hit`, `coalesce.lock_contended`, …) are not listed here: every
//! series of the metrics table that names a place in this document is put there ([`place`]),
//! so a counter is declared once, in `crate::metrics::table`. What is built here is what is
//! derived (ratios, quantiles, banners) or read from the gateway's state (replicas, Redis).
//!
//! [`History`] samples the counters every [`SAMPLE_EVERY`] for an hour (a ring, filled by a
//! task of the admin listener), so hit ratios over 1 m / 5 m / 1 h and request rates are
//! differences of two samples, never a scan. Redis facts (`INFO memory`, `DBSIZE`) are read
//! when the document is built, each bounded by the store's command timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::cache::store::Store;
use crate::metrics::{Histogram, Metrics};

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept (one hour).
const KEPT: usize = 720;

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

/// One sample of the counters the charts and ratios need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// UNIX seconds.
    pub at: u64,
    /// Requests answered.
    pub requests: u64,
    /// Fresh hits.
    pub hits: u64,
    /// Stale answers, any reason.
    pub stale: u64,
    /// Of those, served because replicas failed or timed out.
    pub stale_if_error: u64,
    /// Misses.
    pub misses: u64,
}

impl Sample {
    fn now(m: &Metrics) -> Sample {
        Sample {
            at: unix_now(),
            requests: m.requests.get(),
            hits: m.cache_hits.get(),
            stale: m.cache_stale.get(),
            stale_if_error: m.stale_origin_error.get() + m.stale_origin_timeout.get(),
            misses: m.cache_misses.get(),
        }
    }
}

/// The last hour of samples.
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    /// Records the counters now.
    pub fn sample(&self, m: &Metrics) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() == KEPT {
            s.pop_front();
        }
        s.push_back(Sample::now(m));
    }

    /// Samples the counters every [`SAMPLE_EVERY`] for the life of the process.
    pub fn start(self: &Arc<Self>, metrics: Arc<Metrics>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            loop {
                every.tick().await;
                me.sample(&metrics);
            }
        });
    }

    fn snapshot(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }
}

/// Share of cache answers served from the cache (fresh or stale) between `old` and `new`;
/// `None` without traffic.
fn hit_ratio(old: &Sample, new: &Sample) -> Option<f64> {
    let served = (new.hits - old.hits) + (new.stale - old.stale);
    let all = served + (new.misses - old.misses);
    (all > 0).then(|| served as f64 / all as f64)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ms(h: &Histogram, q: f64) -> Value {
    match h.quantile(q) {
        Some(u64::MAX) => json!(">10000"),
        Some(v) => json!(v),
        None => Value::Null,
    }
}

/// The document for `app`.
pub async fn stats(app: &Arc<AppState>, history: &History) -> Value {
    let m = &app.metrics;
    let now = Sample::now(m);
    let samples = history.snapshot();
    let ratio = |secs: u64| {
        let old = samples
            .iter()
            .find(|s| now.at.saturating_sub(s.at) <= secs)
            .copied()
            .unwrap_or_default();
        hit_ratio(&old, &now)
    };
    let replicas: Vec<Value> = app
        .upstream
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
                "last_error": r.last_error(),
            })
        })
        .collect();
    let mut banners: Vec<String> = Vec::new();
    let ejected: Vec<&str> = replicas
        .iter()
        .filter(|r| r["healthy"] == false)
        .filter_map(|r| r["address"].as_str())
        .collect();
    if !ejected.is_empty() {
        banners.push(format!("replicas out of rotation: {}", ejected.join(", ")));
    }
    let minute_ago = samples
        .iter()
        .find(|s| now.at.saturating_sub(s.at) <= 60)
        .copied()
        .unwrap_or_default();
    if now.stale_if_error > minute_ago.stale_if_error {
        banners.push(format!(
            "serving stale-if-error: {} answers in the last minute came from stale entries because replicas failed",
            now.stale_if_error - minute_ago.stale_if_error
        ));
    }
    let (cache, redis, fleet, log) = match &app.cache {
        Some(c) => {
            let (entries, bytes) = c.l1.size();
            let redis = redis_facts(&c.store).await;
            if redis["configured"] == true && redis["connected"] != true {
                banners.insert(0, "Redis is down: serving from each gateway's L1 and the replicas; coalescing and invalidation are local only".into());
            }
            if redis["maxmemory"] == 0 {
                banners.push("Redis has no maxmemory: it grows until the host runs out of memory; set maxmemory and maxmemory-policy allkeys-lru".into());
            } else if redis["maxmemory_policy"] == "noeviction" {
                banners.push("Redis maxmemory-policy is noeviction: writes fail once it is full; use allkeys-lru".into());
            }
            let log = match c.log.recent(&c.store, 20).await {
                Ok(records) => Value::from(records),
                Err(e) => json!({ "error": format!("the revalidation log is unavailable: {e}") }),
            };
            let mut live = c.fleet.live();
            live.insert(0, c.gateway_id().to_owned());
            (
                json!({
                    "enabled": true,
                    "store": c.store.kind(),
                    "l1": { "entries": entries, "bytes": bytes, "max_bytes": c.cfg().l1_max_bytes },
                    "invalidated_tags": c.epochs.len(),
                }),
                redis,
                json!({
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
                }),
                log,
            )
        }
        None => (
            json!({ "enabled": false }),
            json!({ "configured": false }),
            json!({}),
            Value::Array(Vec::new()),
        ),
    };
    let series: Vec<Value> = samples
        .windows(2)
        .map(|w| {
            let dt = w[1].at.saturating_sub(w[0].at).max(1) as f64;
            json!({
                "at": w[1].at,
                "rps": (w[1].requests - w[0].requests) as f64 / dt,
                "hit_ratio": hit_ratio(&w[0], &w[1]),
            })
        })
        .collect();
    let mut doc = json!({
        "at": now.at,
        // As /readyz says it: from the SIGTERM on, while the listeners still accept for the
        // accept grace (`accepting`), then drain.
        "draining": app.stopping.is_cancelled(),
        "accepting": !app.draining.is_cancelled(),
        "banners": banners,
        "requests": {
            "hit_ratio": { "1m": ratio(60), "5m": ratio(300), "1h": ratio(3_600) },
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
        "top_missed": m.missed_paths.top(10).into_iter().map(|(p, n)| json!({ "path": p, "misses": n })).collect::<Vec<_>>(),
        "revalidations": log,
        "series": series,
    });
    place(&mut doc, m);
    doc
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

/// What the dashboard shows about Redis.
async fn redis_facts(store: &Store) -> Value {
    let Store::Redis(r) = store else {
        return json!({ "configured": false });
    };
    let open = r.breaker().is_open(crate::upstream::replicas::now_ms());
    let info: Option<String> = r
        .bounded(r.pool().next().info(Some(fred::types::InfoKind::Memory)))
        .await
        .ok();
    let keys: Option<u64> = r.bounded(r.pool().next().dbsize()).await.ok();
    let field = |name: &str| {
        info.as_deref().and_then(|i| {
            i.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
                .map(|v| v.trim().to_owned())
        })
    };
    let number = |name: &str| field(name).and_then(|v| v.parse::<u64>().ok());
    json!({
        "configured": true,
        "connected": info.is_some() && !open,
        "circuit_open": open,
        "latency_p50_ms": ms(r.latency_ms(), 0.5),
        "latency_p99_ms": ms(r.latency_ms(), 0.99),
        "used_memory": number("used_memory"),
        "maxmemory": number("maxmemory"),
        "maxmemory_policy": field("maxmemory_policy"),
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

    #[test]
    fn hit_ratio_counts_stale_answers_as_served() {
        let old = Sample::default();
        let new = Sample {
            hits: 6,
            stale: 2,
            stale_if_error: 1,
            misses: 2,
            ..Sample::default()
        };
        assert_eq!(hit_ratio(&old, &new), Some(0.8));
        assert_eq!(hit_ratio(&new, &new), None);
    }
}
