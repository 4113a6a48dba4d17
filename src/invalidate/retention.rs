//! Keeping the invalidation records bounded: `isr:inv` in Redis and each gateway's map.
//!
//! A record `tag → epoch` matters only to entries rendered before `epoch` (`cache::epochs`).
//! Epochs are Redis server milliseconds or later (`invalidate.lua`), and no entry outlives
//! `cache.max_ttl`; so once `epoch + cache.max_ttl` is past (plus [`MARGIN`] for clocks and
//! renders in flight), no entry that record could concern exists any more, and it can go.
//!
//! One exception keeps records longer: a Next.js replica running `@isrgate/next` re-applies the
//! records newer than its build to its own ISR cache when it starts, and a build's pages
//! prerendered by `next build` never expire there. So a record newer than the oldest build a
//! replica of this gateway runs stays ([`horizon`]).
//!
//! One gateway of the fleet prunes the store per [`EVERY`] (a Redis lock); each prunes its own
//! map. Both a page at a time: a scan page, then a script that deletes those of its fields whose
//! epoch is still before the horizon, from the hash and from the index `isr:{isr:inv}:z`, so a tag
//! invalidated again meanwhile keeps its record. The same scan makes the snapshot of the records
//! kept (`super::snapshot`), swapped in at the end: hash, index and snapshot stay one story, and
//! a start reads at most one period of the index.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use tokio_util::sync::CancellationToken;

use super::scan::{PAGE, parse_record, scan_page};
use super::snapshot;
use crate::app::CacheState;
use crate::cache::keys::{INDEX_KEY, INV_KEY, PRUNE_LOCK_KEY};
use crate::cache::store::{RedisStore, StoreError};
use crate::deploy::Deploy;

/// How often the fleet prunes (and the lock's lifetime: one prune per period, fleet-wide).
pub const EVERY: Duration = Duration::from_secs(600);

/// Slack past `cache.max_ttl`: clock skew between Redis and the gateways, and a render that
/// started before an invalidation and was stored after it.
pub const MARGIN: Duration = Duration::from_secs(3600);

/// Fields one delete script looks at.
const DELETE_BATCH: usize = 1_000;

/// After a prune that failed: the next try (the lock was given back).
const RETRY: Duration = Duration::from_secs(30);

/// Deletes the fields of ARGV[2..] whose epoch is still older than ARGV[1], from the hash
/// KEYS[1] and its index KEYS[2]; returns how many.
const PRUNE_SCRIPT: &str = r"
local horizon = tonumber(ARGV[1])
local removed = 0
for i = 2, #ARGV do
  local v = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
  if v and v < horizon then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    removed = removed + 1
  end
end
return removed
";

/// The epoch before which records can go, at `now_ms`: `max_ttl` + [`MARGIN`] ago, or the
/// oldest build a replica runs (`oldest_build_ms`), whichever is earlier.
pub fn horizon(now_ms: u64, max_ttl: Duration, oldest_build_ms: Option<u64>) -> u64 {
    let keep = u64::try_from((max_ttl + MARGIN).as_millis()).unwrap_or(u64::MAX);
    let by_lifetime = now_ms.saturating_sub(keep);
    oldest_build_ms.map_or(by_lifetime, |b| b.min(by_lifetime))
}

/// What a prune of the store did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Records looked at.
    pub scanned: usize,
    /// Records deleted.
    pub removed: usize,
    /// Bytes of the snapshot swapped in (`None`: none was).
    pub snapshot: Option<usize>,
}

/// Deletes the records of `isr:inv` (and of its index) older than `horizon`, a page at a time
/// (each command bounded by `redis.command_timeout`), and swaps in a snapshot of the others.
/// The marks (`_epoch`, …) are never touched.
pub async fn prune(redis: &RedisStore, horizon: u64) -> Result<Pruned, StoreError> {
    let mut done = Pruned::default();
    let mut snap = snapshot::begin(redis).await?;
    let mut cursor = String::from("0");
    loop {
        let (next, fields) = scan_page(redis, &cursor, PAGE).await?;
        let mut old: Vec<&str> = Vec::new();
        for pair in fields.chunks_exact(2) {
            if let Some((tag, mode, epoch)) = parse_record(&pair[0], &pair[1]) {
                done.scanned += 1;
                if epoch < horizon {
                    old.push(&pair[0]);
                } else if let Some(b) = &mut snap {
                    b.push(tag, mode, epoch);
                }
            }
        }
        // A script runs alone on the server: a short one at a time.
        for batch in old.chunks(DELETE_BATCH) {
            let mut args = Vec::with_capacity(batch.len() + 1);
            args.push(horizon.to_string());
            args.extend(batch.iter().map(|f| (*f).to_owned()));
            let keys = vec![INV_KEY, INDEX_KEY];
            let removed: u64 = redis
                .bounded(redis.pool().next().eval(PRUNE_SCRIPT, keys, args))
                .await?;
            done.removed += usize::try_from(removed).unwrap_or(usize::MAX);
        }
        if next == "0" {
            break;
        }
        cursor = next;
    }
    if let Some((epoch, bytes)) = snap.and_then(snapshot::Builder::finish) {
        match snapshot::write(redis, &bytes, epoch).await {
            Ok(swapped) => done.snapshot = swapped.then_some(bytes.len()),
            // The prune itself is done; the next start scans.
            Err(e) => tracing::warn!(error = %e, "could not write the invalidation snapshot"),
        }
    }
    Ok(done)
}

/// Prunes this gateway's map, and (when this gateway takes the period's lock) the store,
/// [`EVERY`] until `stop`; the first time a few seconds after start, so a gateway that starts
/// on a history of millions of records bounds it at once. Control work, like the rollout:
/// nothing waits for it at shutdown (a prune cut between two pages loses nothing).
pub fn start(cache: &CacheState, deploy: Arc<Deploy>, stop: &CancellationToken) {
    let (redis, epochs, max_ttl) = (
        cache.redis().cloned(),
        Arc::clone(&cache.epochs),
        cache.cfg().max_ttl,
    );
    let stop = stop.clone();
    let me = format!("{:016x}", fastrand::u64(..));
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(1_000 + fastrand::u64(..4_000));
        loop {
            // After the first complete load: forgetting before it would let the load bring
            // the old records back into the map for a whole period.
            tokio::select! {
                () = stop.cancelled() => return,
                () = async {
                    tokio::time::sleep(wait).await;
                    epochs.first_sync().await;
                } => {}
            }
            wait = EVERY;
            let now = crate::clock::system_ms();
            let horizon = horizon(now, max_ttl, deploy.oldest_live_build_ms());
            epochs.forget_before(horizon);
            let Some(redis) = &redis else {
                continue;
            };
            match prune_once(redis, &me, horizon).await {
                Ok(Some(p)) => {
                    tracing::info!(
                        scanned = p.scanned,
                        removed = p.removed,
                        snapshot_bytes = p.snapshot,
                        horizon,
                        "pruned the invalidation records no cached page can need"
                    )
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune the invalidation records; next try in {RETRY:?}");
                    wait = RETRY;
                }
            }
        }
    });
}

/// [`prune`] when this gateway takes the period's lock; `None` when another one has it.
async fn prune_once(
    redis: &RedisStore,
    me: &str,
    horizon: u64,
) -> Result<Option<Pruned>, StoreError> {
    let px = Expiration::PX(i64::try_from(EVERY.as_millis()).unwrap_or(i64::MAX));
    let taken: Option<String> = redis
        .bounded(
            redis
                .pool()
                .set(PRUNE_LOCK_KEY, me, Some(px), Some(SetOptions::NX), false),
        )
        .await?;
    if taken.is_none() {
        return Ok(None);
    }
    let pruned = prune(redis, horizon).await;
    if pruned.is_err() {
        // Given back, so a gateway tries again within `RETRY`, not a period later.
        let release: Result<u64, _> = redis
            .bounded(
                redis
                    .pool()
                    .next()
                    .eval(RELEASE_SCRIPT, PRUNE_LOCK_KEY, vec![me.to_owned()]),
            )
            .await;
        if let Err(e) = release {
            tracing::debug!(error = %e, "could not give the prune lock back; it expires");
        }
    }
    pruned.map(Some)
}

/// Deletes the lock KEYS[1] when ARGV[1] holds it.
const RELEASE_SCRIPT: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_is_the_lifetime_ago_or_the_oldest_build() {
        let day = 86_400_000;
        let now = 100 * day;
        let week = Duration::from_secs(7 * 86_400);
        let by_lifetime = now - 7 * day - 3_600_000;
        assert_eq!(horizon(now, week, None), by_lifetime);
        assert_eq!(
            horizon(now, week, Some(50 * day)),
            50 * day,
            "a build older than that"
        );
        assert_eq!(horizon(now, week, Some(99 * day)), by_lifetime);
        assert_eq!(horizon(1_000, week, None), 0, "never below zero");
    }
}
