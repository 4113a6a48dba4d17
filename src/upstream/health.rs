//! Active health checks: every interval, request the configured path from every replica (in
//! parallel, each with its own timeout) and feed the verdicts to [`Replica::record_check`].
//! Any answer below 500 counts as alive: the check asks "does it serve", not "is this page OK".
//!
//! Passive ejection lives with the request path (`Replica::record_failure`, and the stall
//! probe of `super::Upstream`, which uses [`probe`]); a passing active check also re-admits a
//! passively ejected replica early.

use std::sync::Arc;

use http::{Request, header};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::pool::Pool;
use super::replicas::{Replica, ReplicaSet, build_of, sniff_build};
use crate::config::Health;
use crate::http::body;

/// Checks one replica once. A page whose response names no build (no `@isrgate/next`) is
/// read (up to 512 KiB) for the build id Next writes into it (`replicas::sniff_build`).
pub async fn check(pool: &Arc<Pool>, cfg: &Health, replica: &Replica) -> bool {
    let ask = probe_answer(pool, &cfg.path, cfg.timeout, replica);
    let Ok(Ok((resp, _lease))) = tokio::time::timeout(cfg.timeout, ask).await else {
        return false;
    };
    let alive = resp.status().as_u16() < 500;
    if alive && build_of(resp.headers()).is_none() {
        let read = http_body_util::Limited::new(resp.into_body(), SNIFF_MAX_BYTES);
        let body = tokio::time::timeout(cfg.timeout, http_body_util::BodyExt::collect(read)).await;
        if let Some(build) = body
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .as_deref()
            .and_then(sniff_build)
        {
            replica.note_sniffed_build(build);
        }
    }
    alive
}

/// Most of a page a health check reads looking for its build id.
const SNIFF_MAX_BYTES: usize = 512 * 1024;

async fn probe_answer(
    pool: &Arc<Pool>,
    path: &http::uri::PathAndQuery,
    timeout: std::time::Duration,
    replica: &Replica,
) -> Result<(http::Response<hyper::body::Incoming>, super::pool::Lease), ()> {
    let req = Request::get(path.as_str())
        .header(header::HOST, replica.authority.as_str())
        .header(header::USER_AGENT, "isrgate-health")
        .body(body::empty())
        .map_err(drop)?;
    match tokio::time::timeout(timeout, pool.send(&replica.authority, req)).await {
        Ok(Ok((resp, lease))) => {
            replica.note_build(resp.headers());
            Ok((resp, lease))
        }
        _ => Err(()),
    }
}

/// Asks `replica` for `path` once; `true` when it answered below 500 within `timeout`.
pub async fn probe(
    pool: &Arc<Pool>,
    path: &http::uri::PathAndQuery,
    timeout: std::time::Duration,
    replica: &Replica,
) -> bool {
    // The response body is not read: the connection is not reused, each probe opens its own
    // (it also proves the replica still accepts connections).
    probe_answer(pool, path, timeout, replica)
        .await
        .is_ok_and(|(resp, _)| resp.status().as_u16() < 500)
}

/// Runs checks on every replica each `health.interval` (after the previous round) until
/// `stop`. The settings are read again each time: a reload may change the interval, turn the
/// checks on (the loop looks every second while they are off) or off.
pub async fn run(pool: Arc<Pool>, set: Arc<ReplicaSet>, settings: Shared, stop: CancellationToken) {
    loop {
        let cfg = Arc::clone(&settings.load().health);
        let wait = cfg.interval.unwrap_or(CHECKS_OFF_LOOK);
        tokio::select! {
            _ = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let cfg = Arc::clone(&settings.load().health);
        if cfg.interval.is_none() {
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = round(&pool, &set, &cfg) => {}
        }
    }
}

/// How often [`run`] looks whether a reload turned active checks on.
const CHECKS_OFF_LOOK: std::time::Duration = std::time::Duration::from_secs(1);

/// Looks once at each of `replicas` not yet known to run a build, in parallel, each bounded
/// by the check's timeout, to learn its build; records no verdict. At start-up without active
/// checks, and for replicas discovery just added: requests are pinned to a replica's build
/// from its first, not keyed outside the build's namespace until a response names it.
pub async fn learn_builds(pool: &Arc<Pool>, cfg: &Arc<Health>, replicas: &[Arc<Replica>]) {
    let mut looks = JoinSet::new();
    for replica in replicas {
        if replica.build().is_some() {
            continue;
        }
        let (pool, cfg, replica) = (Arc::clone(pool), Arc::clone(cfg), Arc::clone(replica));
        looks.spawn(async move { check(&pool, &cfg, &replica).await });
    }
    while looks.join_next().await.is_some() {}
}

/// Checks every replica once, in parallel, and records the verdicts.
pub async fn round(pool: &Arc<Pool>, set: &ReplicaSet, cfg: &Arc<Health>) {
    let mut round = JoinSet::new();
    for replica in set.snapshot().iter().cloned() {
        let (pool, cfg) = (Arc::clone(pool), Arc::clone(cfg));
        round.spawn(async move {
            let ok = check(&pool, &cfg, &replica).await;
            match replica.record_check(ok, cfg.healthy_threshold, cfg.unhealthy_threshold) {
                Some(true) => tracing::info!(replica = %replica.authority, "replica healthy again"),
                Some(false) => tracing::warn!(replica = %replica.authority, path = %cfg.path, "replica failed health checks; ejected"),
                None => {}
            }
        });
    }
    while round.join_next().await.is_some() {}
}
