//! The fleet as one view: every gateway publishes a compact stats snapshot on the bus every
//! [`EVERY`] (a few hundred bytes), every gateway keeps the others' last ones
//! (`invalidate::fleet::Fleet::stats`), and any gateway's `GET /api/fleet` (the dashboard's
//! fleet table) answers the whole fleet: totals and one row per gateway, named by its host
//! (the pod name on Kubernetes), with its version, build, uptime, readiness and rates; a
//! gateway that fell silent is shown as gone for five minutes.
//!
//! Owns the snapshot's shape and its publishing; the numbers come from `metrics` and the
//! readiness from `admin::readiness`.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::bus::Message;

/// How often a gateway publishes its snapshot.
pub const EVERY: Duration = Duration::from_secs(2);

/// One gateway, as the others see it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Host name (the pod's name on Kubernetes).
    pub host: String,
    /// isrgate's version.
    pub version: String,
    /// The build it serves (the rollout's current one), if known.
    pub build: Option<String>,
    /// When it started (UNIX seconds).
    pub started: u64,
    /// Ready for traffic, and why not.
    pub ready: bool,
    /// The reason it is not ready (`/readyz`'s).
    pub reason: Option<String>,
    /// Healthy replicas / replicas it knows.
    pub replicas: (usize, usize),
    /// Counters since it started.
    pub requests: u64,
    /// Answers from the cache, fresh.
    pub hits: u64,
    /// Answers from the cache, stale.
    pub stale: u64,
    /// Misses (a render, or a follower of one).
    pub misses: u64,
    /// Requests the cache did not handle.
    pub bypass: u64,
    /// Requests sent to a replica.
    pub upstream: u64,
    /// Requests that waited for another request's render instead of rendering.
    pub coalesced: u64,
    /// Answers of 500 and above.
    pub errors_5xx: u64,
    /// Renders a replica made for the cache (a gateway of an older version sends none).
    #[serde(default)]
    pub renders: u64,
    /// Bytes its L1 holds.
    pub l1_bytes: u64,
}

impl Snapshot {
    /// This gateway now.
    pub fn of(app: &AppState) -> Snapshot {
        let m = &app.metrics;
        let readiness = super::readiness(app);
        let started = crate::clock::unix_secs(app.started_at);
        Snapshot {
            host: host_name(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build: app.deploy.current().map(|p| p.build.clone()),
            started,
            ready: readiness.unready.is_none(),
            reason: readiness.unready.map(|u| u.as_str().to_owned()),
            replicas: (readiness.healthy, readiness.total),
            requests: m.requests.get(),
            hits: m.cache_hits.get(),
            stale: m.cache_stale.get(),
            misses: m.cache_misses.get(),
            bypass: m.cache_bypass.get(),
            upstream: m.proxied.get(),
            coalesced: m.coalesced_local.get() + m.coalesced_remote.get(),
            errors_5xx: m.request_duration.count_class(5),
            renders: m.renders.get(),
            l1_bytes: app.cache.as_ref().map_or(0, |c| c.l1.size().1),
        }
    }
}

/// The host's name: `HOSTNAME` (set by Kubernetes and Docker to the pod's or container's
/// name), else the kernel's.
fn host_name() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "-".to_owned())
    })
    .clone()
}

/// Publishes this gateway's snapshot every [`EVERY`] until `stop` (with Redis only: without
/// it the fleet is this gateway; and unless `redis.publish_stats = false`).
pub async fn publish(app: Arc<AppState>, stop: CancellationToken) {
    let Some(cache) = app.cache.clone() else {
        return;
    };
    if app
        .config()
        .redis
        .as_ref()
        .is_some_and(|r| !r.publish_stats)
    {
        tracing::info!("redis.publish_stats = false: this gateway is not in the fleet view");
        return;
    }
    let Some(shared) = cache.shared() else {
        return;
    };
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let Ok(json) = serde_json::to_string(&Snapshot::of(&app)) else {
            continue;
        };
        let message = Message::Stats {
            gateway: cache.gateway_id().to_owned(),
            json,
        };
        // Best effort: a lost snapshot is replaced by the next one.
        let _ = shared.publish(&message, EVERY).await;
    }
}

/// One row of `/api/fleet`.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The gateway's id (bus, logs, `isrgate tail --gateway`).
    pub id: String,
    /// This gateway (the one answering).
    pub me: bool,
    /// Heard from within three heartbeats.
    pub live: bool,
    /// Seconds since its last snapshot.
    pub heard_s: f64,
    /// Its snapshot.
    #[serde(flatten)]
    pub snapshot: Snapshot,
}

/// `GET /api/fleet`: this gateway and every other one heard from in the last five minutes,
/// this one first, then by host name; and the live ones' totals.
pub fn answer(app: &AppState) -> serde_json::Value {
    let me = Snapshot::of(app);
    let mut rows = Vec::new();
    if let Some(cache) = &app.cache {
        for (id, heard) in cache.fleet.stats() {
            let Ok(snapshot) = serde_json::from_str::<Snapshot>(&heard.json) else {
                continue;
            };
            let ago = heard.at.elapsed();
            rows.push(Row {
                id,
                me: false,
                live: crate::invalidate::fleet::is_live(ago),
                heard_s: ago.as_secs_f64(),
                snapshot,
            });
        }
    }
    rows.sort_by(|a, b| a.snapshot.host.cmp(&b.snapshot.host).then(a.id.cmp(&b.id)));
    let id = app
        .cache
        .as_ref()
        .map_or_else(|| "-".to_owned(), |c| c.gateway_id().to_owned());
    rows.insert(
        0,
        Row {
            id,
            me: true,
            live: true,
            heard_s: 0.0,
            snapshot: me,
        },
    );
    let live: Vec<&Snapshot> = rows
        .iter()
        .filter(|r| r.live)
        .map(|r| &r.snapshot)
        .collect();
    let sum = |f: fn(&Snapshot) -> u64| live.iter().map(|s| f(s)).sum::<u64>();
    serde_json::json!({
        "gateways": rows,
        "totals": {
            "live": live.len(),
            "gone": rows.iter().filter(|r| !r.live).count(),
            "ready": live.iter().filter(|s| s.ready).count(),
            "requests": sum(|s| s.requests),
            "hits": sum(|s| s.hits),
            "stale": sum(|s| s.stale),
            "misses": sum(|s| s.misses),
            "bypass": sum(|s| s.bypass),
            "upstream": sum(|s| s.upstream),
            "coalesced": sum(|s| s.coalesced),
            "errors_5xx": sum(|s| s.errors_5xx),
            "renders": sum(|s| s.renders),
        },
    })
}
