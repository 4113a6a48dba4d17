//! `isrgate deploy`: what an operator asks of the rollout from a shell, through Redis (the
//! same state the gateways read every second): `status`, `switch <build>` (make it current on
//! every gateway and hold it there), `auto` (hand the choice back to the rollout rule).
//!
//! A gateway's `POST /api/deploy` does the same and can also check that a replica of the
//! build is healthy; from here only the fleet's record of builds is known, so `switch` accepts
//! a build some gateway has seen (`isr:deploy:seen`) or some replica reports (`isr:builds`).

use std::collections::HashMap;

use fred::prelude::*;

use super::rollout::Ledger;
use crate::cache::keys::{BUILDS_KEY, DEPLOY_SEEN_KEY};
use crate::cache::store::{RedisSettings, RedisStore, StoreError};
use crate::config::Config;

/// Why an operator's call failed; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No shared store: each gateway decides alone.
    #[error(
        "deploy needs the shared store: set redis.url or --redis (without Redis, use each gateway's POST /api/deploy)"
    )]
    NoRedis,
    /// Nobody has seen the build.
    #[error("no gateway has seen build {build:?} and no replica reports it (known: {known})")]
    Unknown {
        /// The build asked for.
        build: String,
        /// What is known.
        known: String,
    },
    /// Redis failed.
    #[error("{0}; nothing changed")]
    Store(#[from] StoreError),
}

fn connect(config: &Config) -> Result<RedisStore, OperatorError> {
    let redis = config.redis.as_ref().ok_or(OperatorError::NoRedis)?;
    Ok(RedisStore::connect(&RedisSettings::for_cli(redis))?)
}

/// The builds the fleet knows: first seen by a gateway, and reported by replicas.
async fn known(redis: &RedisStore) -> Result<Vec<(String, Option<u64>)>, StoreError> {
    let seen: HashMap<String, String> =
        redis.bounded(redis.pool().hgetall(DEPLOY_SEEN_KEY)).await?;
    let reported: HashMap<String, String> = redis.bounded(redis.pool().hgetall(BUILDS_KEY)).await?;
    let mut all: Vec<(String, Option<u64>)> = seen
        .iter()
        .map(|(b, ms)| (b.clone(), ms.parse().ok()))
        .collect();
    for b in reported.keys() {
        if !seen.contains_key(b) {
            all.push((b.clone(), None));
        }
    }
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(all)
}

/// The rollout as the fleet records it, as lines of text.
pub async fn status(config: &Config) -> Result<String, OperatorError> {
    let redis = connect(config)?;
    let agreed = Ledger::Redis(redis.clone()).agreed().await?;
    let known = known(&redis).await?;
    let mut out = format!(
        "current build: {}{}\n",
        agreed.current.as_deref().unwrap_or("(none yet)"),
        if agreed.pinned {
            " (held by an operator; `isrgate deploy auto` releases it)"
        } else {
            ""
        }
    );
    if agreed.switched_ms > 0 {
        out.push_str(&format!(
            "current since: {} ms after the UNIX epoch\n",
            agreed.switched_ms
        ));
    }
    if let Some(p) = &agreed.prewarmed {
        out.push_str(&format!("last pre-warmed: {p}\n"));
    }
    out.push_str("builds (newest first):\n");
    for (b, first) in &known {
        let first = first.map_or_else(
            || "reported, not yet served".to_owned(),
            |ms| format!("first seen at {ms}"),
        );
        out.push_str(&format!("  {b}  {first}\n"));
    }
    Ok(out)
}

/// Makes `build` current on every gateway and holds it there.
pub async fn switch(config: &Config, build: &str) -> Result<(), OperatorError> {
    let redis = connect(config)?;
    let known = known(&redis).await?;
    if !known.iter().any(|(b, _)| b == build) {
        let names: Vec<&str> = known.iter().map(|(b, _)| b.as_str()).collect();
        return Err(OperatorError::Unknown {
            build: build.to_owned(),
            known: if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
        });
    }
    let ledger = Ledger::Redis(redis);
    let current = ledger.agreed().await?.current;
    ledger
        .switch(
            current.as_deref(),
            build,
            crate::clock::system_ms(),
            Some(true),
        )
        .await?;
    Ok(())
}

/// Hands the choice of the current build back to the rollout rule.
pub async fn auto(config: &Config) -> Result<(), OperatorError> {
    Ledger::Redis(connect(config)?).unpin().await?;
    Ok(())
}
