//! `GET /metrics`: every counter of `crate::metrics` (and the gauges the dashboard shows) in
//! the OpenMetrics text format, through `prometheus-client`. The counters stay plain atomics
//! on the hot path; this collector reads them at scrape time, so a scrape costs the request
//! path nothing.
//!
//! Names follow Prometheus conventions: `isrgate_` prefix, `_total` counters, `_seconds`
//! histograms, labels for outcomes and reasons (`isrgate_cache_requests_total{outcome="hit"}`).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::app::AppState;
use crate::cache::policy::Skip;
use crate::cache::store::Store;
use crate::metrics::{Counter, Histogram};
use crate::proxy::classify::Bypass;

/// The OpenMetrics content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition text for `app`.
pub fn render(app: &Arc<AppState>) -> String {
    let mut registry = Registry::with_prefix("isrgate");
    registry.register_collector(Box::new(Scrape(Arc::clone(app))));
    let mut out = String::with_capacity(16 * 1024);
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[derive(Debug)]
struct Scrape(Arc<AppState>);

type Enc<'a> = DescriptorEncoder<'a>;

fn counter(e: &mut Enc<'_>, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge<N: EncodeGaugeValue>(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    v: N,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family with one label.
fn counters(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A millisecond histogram as a `_seconds` histogram, with optional labels.
fn seconds(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    series: &[(Option<(&str, String)>, &Histogram)],
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (label, h) in series {
        let (buckets, sum_ms) = h.snapshot();
        let buckets: Vec<(f64, u64)> = buckets
            .into_iter()
            // prometheus-client writes `+Inf` for `f64::MAX` (as its own histograms end).
            .map(|(bound, n)| (bound.map_or(f64::MAX, |b| b as f64 / 1000.0), n))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = sum_ms as f64 / 1000.0;
        match label {
            Some((k, v)) => {
                let labels = [(*k, v.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
            None => family.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?,
        }
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let app = &self.0;
        let m = &app.metrics;
        counter(
            &mut e,
            "requests",
            "Requests answered (any status).",
            m.requests.get(),
        )?;
        counters(
            &mut e,
            "cache_requests",
            "Cache candidates and bypassed requests by outcome.",
            "outcome",
            &[
                ("hit", m.cache_hits.get()),
                ("stale", m.cache_stale.get()),
                ("stale_if_error", m.cache_stale_if_error.get()),
                ("miss", m.cache_misses.get()),
                ("bypass", m.cache_bypass.get()),
            ],
        )?;
        let by = |all: &[Counter], names: &[&'static str]| -> Vec<(&'static str, u64)> {
            names.iter().zip(all).map(|(n, c)| (*n, c.get())).collect()
        };
        let bypass: Vec<&str> = Bypass::ALL.iter().map(|b| b.as_str()).collect();
        counters(
            &mut e,
            "cache_bypass",
            "Requests that bypassed the cache, by reason.",
            "reason",
            &by(&m.cache_bypass_by, &bypass),
        )?;
        let skip: Vec<&str> = Skip::ALL.iter().map(|s| s.as_str()).collect();
        counters(
            &mut e,
            "cache_not_stored",
            "Upstream answers to cache candidates that were not stored, by reason.",
            "reason",
            &by(&m.cache_not_stored_by, &skip),
        )?;
        counter(
            &mut e,
            "cache_l1_hits",
            "Hits answered from the in-process L1.",
            m.cache_l1_hits.get(),
        )?;
        counter(
            &mut e,
            "cache_unsynced_misses",
            "Lookups that skipped the store while invalidations were being loaded (start, bus reconnect).",
            m.cache_unsynced_misses.get(),
        )?;
        counter(
            &mut e,
            "cache_sendfile_hits",
            "Hits whose body the hit lane sent with sendfile() from a sealed memory file.",
            m.cache_sendfile_hits.get(),
        )?;
        counter(
            &mut e,
            "cache_stores",
            "Entries stored.",
            m.cache_stores.get(),
        )?;
        counter(
            &mut e,
            "cache_invalidated",
            "Lookups that found an entry invalidated since its render.",
            m.cache_invalidated.get(),
        )?;
        counters(
            &mut e,
            "coalesced_followers",
            "Misses served from another request's render instead of rendering.",
            "where",
            &[
                ("local", m.coalesced_local.get()),
                ("remote", m.coalesced_remote.get()),
            ],
        )?;
        seconds(
            &mut e,
            "coalesce_wait_seconds",
            "How long followers waited for a render.",
            &[(None, &m.follower_wait_ms)],
        )?;
        counter(
            &mut e,
            "lock_contended",
            "Fleet lock attempts that found the lock held.",
            m.lock_contended.get(),
        )?;
        counter(
            &mut e,
            "leaders_abandoned",
            "Renders abandoned by their leader (a follower took over).",
            m.leaders_abandoned.get(),
        )?;
        counter(
            &mut e,
            "lock_fallbacks",
            "Fills without the fleet lock because Redis did not answer.",
            m.lock_fallbacks.get(),
        )?;
        counter(
            &mut e,
            "follower_timeouts",
            "Followers that stopped waiting and fetched themselves.",
            m.follower_timeouts.get(),
        )?;
        counter(
            &mut e,
            "hit_for_miss",
            "Misses fetched at once because the key was recently uncacheable.",
            m.hit_for_miss.get(),
        )?;
        counters(
            &mut e,
            "refreshes",
            "Background refreshes (stale-while-revalidate).",
            "result",
            &[
                ("started", m.refreshes.get()),
                ("elsewhere", m.refreshes_elsewhere.get()),
            ],
        )?;
        counter(
            &mut e,
            "fills_not_rendered",
            "Fills replacing an entry that got the replica's cached copy instead of a render (not stored).",
            m.fills_not_rendered.get(),
        )?;
        counter(
            &mut e,
            "stale_if_error_waits",
            "Requests answered stale (stale-if-error) because the replica took longer than cache.stale_if_error_wait.",
            m.stale_if_error_waits.get(),
        )?;
        counter(
            &mut e,
            "cache_variants_dropped",
            "Vary slots dropped because their URL had cache.max_variants more recently filled ones.",
            m.cache_variants_dropped.get(),
        )?;
        counter(
            &mut e,
            "fills_older",
            "Fills not kept because a later render of the key was already stored.",
            m.fills_older.get(),
        )?;
        counter(
            &mut e,
            "fills_siblings",
            "Other variants of a page (RSC of an HTML refresh, and back) stored from the same render.",
            m.fills_siblings.get(),
        )?;
        counter(
            &mut e,
            "store_write_backs",
            "Entries written to Redis again, on a hit, after their first write failed.",
            m.store_write_backs.get(),
        )?;
        counters(
            &mut e,
            "upstream_errors",
            "Requests answered with an upstream error, by kind.",
            "kind",
            &[
                ("unreachable", m.upstream_unreachable.get()),
                ("timeout", m.upstream_timeouts.get()),
                ("exchange", m.upstream_errors.get()),
            ],
        )?;
        counter(
            &mut e,
            "upstream_retries",
            "Retries on another replica after a connect failure.",
            m.upstream_retries.get(),
        )?;
        counter(
            &mut e,
            "asset_fallbacks",
            "Build assets (/_next/static) one build answered 404 for, served by another build's replica.",
            m.asset_fallbacks.get(),
        )?;
        counter(
            &mut e,
            "action_fallbacks",
            "Server actions (Next-Action) the pinned build did not know, answered by another build's replica.",
            m.action_fallbacks.get(),
        )?;
        counter(
            &mut e,
            "fills_other_build",
            "Fills not stored: the replica answered for another build than the request was pinned to.",
            m.fills_other_build.get(),
        )?;
        counter(
            &mut e,
            "replica_ejections",
            "Replicas ejected after consecutive failures.",
            m.replica_ejections.get(),
        )?;
        let replicas = app.upstream.replicas().snapshot();
        let latency: Vec<(Option<(&str, String)>, &Histogram)> = replicas
            .iter()
            .map(|r| (Some(("replica", r.authority.to_string())), &r.latency_ms))
            .collect();
        seconds(
            &mut e,
            "upstream_response_seconds",
            "Time to the response head, per replica.",
            &latency,
        )?;
        let healthy = replicas.iter().filter(|r| r.is_healthy()).count();
        gauge(
            &mut e,
            "replicas_healthy",
            "Replicas eligible for traffic.",
            healthy as i64,
        )?;
        gauge(&mut e, "replicas", "Replicas known.", replicas.len() as i64)?;
        counters(
            &mut e,
            "refused",
            "Requests or connections refused by the listener, by reason.",
            "reason",
            &[
                ("rejected", m.rejected.get()),
                ("body_too_large", m.body_too_large.get()),
                ("shed", m.shed.get()),
                ("header_timeout", m.header_timeouts.get()),
                ("send_timeout", m.send_timeouts.get()),
            ],
        )?;
        counter(
            &mut e,
            "invalidations",
            "Revalidation webhook calls applied.",
            m.invalidations.get(),
        )?;
        counter(
            &mut e,
            "webhook_refused",
            "Revalidation webhook calls refused.",
            m.webhook_refused.get(),
        )?;
        counters(
            &mut e,
            "fanout_calls",
            "Revalidate calls to Next.js replicas, by result.",
            "result",
            &[("ok", m.fanout_ok.get()), ("failed", m.fanout_failed.get())],
        )?;
        counter(
            &mut e,
            "store_errors",
            "Store reads or writes that failed or timed out.",
            m.store_errors.get(),
        )?;
        counter(
            &mut e,
            "store_corrupt",
            "Stored bytes that did not decode.",
            m.store_corrupt.get(),
        )?;
        if let Some(cache) = &app.cache {
            let (entries, bytes) = cache.l1.size();
            gauge(
                &mut e,
                "l1_entries",
                "Entries in the in-process L1.",
                entries as i64,
            )?;
            gauge(
                &mut e,
                "l1_bytes",
                "Bytes held by the in-process L1.",
                bytes as i64,
            )?;
            gauge(
                &mut e,
                "sealed_bodies",
                "Identity bodies in sealed memory files, which the hit lane sendfile()s \
                 (one open descriptor each; at most a quarter of the descriptor limit).",
                crate::cache::sealed::Sealed::live() as i64,
            )?;
            gauge(
                &mut e,
                "sealed_bytes",
                "Memory the sealed bodies hold (shared memory: not in the process's RSS).",
                crate::cache::sealed::Sealed::live_bytes() as i64,
            )?;
            gauge(
                &mut e,
                "l1_scale",
                "How many times its footprint each new L1 entry weighs: above 1 while the \
                 process's growth (RSS + sealed bodies) presses on cache.l1_max_bytes.",
                cache.l1.scale(),
            )?;
            gauge(
                &mut e,
                "fleet_gateways",
                "Gateways alive on the bus, this one included.",
                cache.fleet.live().len() as i64 + 1,
            )?;
            gauge(
                &mut e,
                "invalidated_tags",
                "Tags with a recorded invalidation.",
                cache.epochs.len() as i64,
            )?;
            if let Store::Redis(r) = &cache.store {
                let open = r.breaker().is_open(crate::upstream::replicas::now_ms());
                gauge(
                    &mut e,
                    "redis_circuit_open",
                    "1 while the Redis circuit breaker skips Redis.",
                    i64::from(open),
                )?;
                gauge(
                    &mut e,
                    "redis_connected",
                    "1 while every pooled Redis connection is up.",
                    i64::from(r.is_connected()),
                )?;
                seconds(
                    &mut e,
                    "redis_command_seconds",
                    "Time per Redis command.",
                    &[(None, r.latency_ms())],
                )?;
            }
        }
        Ok(())
    }
}
