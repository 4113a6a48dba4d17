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

use super::pool::Pool;
use super::replicas::{Replica, ReplicaSet};
use crate::config::Health;
use crate::http::body;

/// Checks one replica once.
pub async fn check(pool: &Arc<Pool>, cfg: &Health, replica: &Replica) -> bool {
    probe(pool, &cfg.path, cfg.timeout, replica).await
}

/// Asks `replica` for `path` once; `true` when it answered below 500 within `timeout`.
pub async fn probe(
    pool: &Arc<Pool>,
    path: &http::uri::PathAndQuery,
    timeout: std::time::Duration,
    replica: &Replica,
) -> bool {
    let Ok(req) = Request::get(path.as_str())
        .header(header::HOST, replica.authority.as_str())
        .header(header::USER_AGENT, "isrgate-health")
        .body(body::empty())
    else {
        return false;
    };
    // The response body is not read: the connection is not reused, each check opens its own
    // (a few per interval, and it also proves the replica still accepts connections).
    match tokio::time::timeout(timeout, pool.send(&replica.authority, req)).await {
        Ok(Ok((resp, _lease))) => {
            replica.note_build(resp.headers());
            resp.status().as_u16() < 500
        }
        _ => false,
    }
}

/// Runs checks on every replica each `cfg.interval` until `stop`.
pub async fn run(pool: Arc<Pool>, set: Arc<ReplicaSet>, cfg: Health, stop: CancellationToken) {
    let Some(every) = cfg.interval else { return };
    let cfg = Arc::new(cfg);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut round = JoinSet::new();
        for replica in set.snapshot().iter().cloned() {
            let (pool, cfg) = (Arc::clone(&pool), Arc::clone(&cfg));
            round.spawn(async move {
                let ok = check(&pool, &cfg, &replica).await;
                match replica.record_check(ok, cfg.healthy_threshold, cfg.unhealthy_threshold) {
                    Some(true) => tracing::info!(replica = %replica.authority, "replica healthy again"),
                    Some(false) => tracing::warn!(replica = %replica.authority, path = %cfg.path, "replica failed health checks; ejected"),
                    None => {}
                }
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = async { while round.join_next().await.is_some() {} } => {}
        }
    }
}
