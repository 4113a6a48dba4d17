//! Applying an invalidation (README "Invalidate by epoch"): one Redis function,
//! `isrgate_invalidate_v2` of the library in `invalidate.lua`, moves the epoch forward (never
//! back, even in a Redis that lost its data), records the tag's newest soft or hard epoch in the
//! hash `isr:inv` (fields `s:<tag>` and `h:<tag>`, so no tag can collide with the counter field
//! `_epoch` and a soft purge never overwrites a hard one) and in its index `{isr:inv}:z`, and
//! publishes the `inv` message on the bus, atomically, so a gateway never sees the record
//! without the message or the other way round. O(1) in the number of entries: nothing is
//! deleted.
//!
//! The library is the fleet's one implementation of that step: the Next.js replicas running
//! `@isrgate/next` call the same function for their in-app revalidations (older ones call
//! `isrgate_invalidate_v1`, which the library keeps). [`load`] loads it (at start and after
//! every bus reconnect, when Redis may have come back empty) before it reads the whole hash into
//! the map, a page at a time; a Redis without Functions (< 7) gets the same text as a script.
//! `super::retention` keeps the hash bounded.
//!
//! With the in-process store the invalidation is recorded in this gateway's map only.

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use crate::bus::CHANNEL;
use crate::cache::epochs::{Epochs, Mode};
use crate::cache::store::{RedisStore, Store, StoreError};

/// The Redis hash of invalidations; field `_epoch` is the global counter (`invalidate.lua`
/// lists the other `_` fields).
pub const INV_KEY: &str = "isr:inv";

/// The index of the records by epoch (a sorted set: member `s:<tag>` / `h:<tag>`, score the
/// epoch). `{isr:inv}` is the hash tag: its content is [`INV_KEY`]'s whole name, so in a Redis
/// Cluster every key here hashes to `INV_KEY`'s slot, as a script touching them all needs.
pub const INDEX_KEY: &str = "{isr:inv}:z";

const EPOCH_FIELD: &str = "_epoch";

/// The library (`#!lua name=isrgate`): see the file for the arguments and the epoch rule.
pub const LIBRARY: &str = include_str!("invalidate.lua");

/// The function the library registers; the version is the argument list's (v2: both keys).
pub const FUNCTION: &str = "isrgate_invalidate_v2";

/// The same function under the name callers from before the index use (one key, the index
/// named from it): older gateways and `@isrgate/next` packages.
pub const FUNCTION_V1: &str = "isrgate_invalidate_v1";

/// Records the invalidation of `tags` in the store (and so on every gateway) and in `epochs`;
/// returns its epoch. On error nothing was recorded anywhere.
pub async fn apply(
    store: &Store,
    epochs: &Epochs,
    gateway: &str,
    mode: Mode,
    tags: &[String],
) -> Result<u64, StoreError> {
    let epoch = match store {
        Store::Memory(_) => epochs.current() + 1,
        Store::Redis(redis) => {
            let mut args = vec![
                gateway.to_owned(),
                mode.as_str().to_owned(),
                CHANNEL.to_owned(),
                epochs.current().to_string(),
            ];
            args.extend(tags.iter().cloned());
            let e = call(redis, args).await?;
            e.parse()
                .map_err(|_| StoreError::Unexpected("an epoch that is not a number"))?
        }
    };
    epochs.record(epoch, mode, tags.iter().map(String::as_str));
    Ok(epoch)
}

/// Calls the function; loads the library first when Redis lost it (restarted empty), and sends
/// it as a script where this Redis has no Functions (< 7) or the gateway's user may not use
/// them.
async fn call(redis: &RedisStore, args: Vec<String>) -> Result<String, StoreError> {
    let (pool, keys) = (redis.pool(), vec![INV_KEY, INDEX_KEY]);
    let first = redis
        .bounded(pool.next().fcall(FUNCTION, keys.clone(), args.clone()))
        .await;
    let Err(StoreError::Redis(e)) = &first else {
        return first;
    };
    // Not found: Redis restarted empty, or an older gateway loaded its library (without v2).
    let usable = if e.details().contains("Function not found") {
        load_library(redis).await?
    } else if unsupported(e) {
        false
    } else {
        return first;
    };
    if usable {
        redis.bounded(pool.next().fcall(FUNCTION, keys, args)).await
    } else {
        redis.bounded(pool.next().eval(script(), keys, args)).await
    }
}

/// Redis refused a Functions command as such: too old (< 7), or not allowed by the ACL.
fn unsupported(e: &fred::error::Error) -> bool {
    let details = e.details().to_ascii_lowercase();
    details.contains("unknown command") || details.contains("noperm")
}

/// The library as a script (`EVAL`): without the `#!lua` line, which only `FUNCTION LOAD`
/// reads.
fn script() -> &'static str {
    LIBRARY.split_once('\n').map_or(LIBRARY, |(_, rest)| rest)
}

/// Loads the library (replacing an older copy); `false` when this Redis refuses Functions.
async fn load_library(redis: &RedisStore) -> Result<bool, StoreError> {
    let client = redis.pool().next();
    let loaded: Result<String, _> = if client.is_clustered() {
        redis
            .bounded(client.function_load_cluster(true, LIBRARY))
            .await
    } else {
        redis.bounded(client.function_load(true, LIBRARY)).await
    };
    match loaded {
        Ok(_) => Ok(true),
        Err(StoreError::Redis(e)) if unsupported(&e) => {
            tracing::warn!(
                error = %e,
                "cannot load the isrgate Redis function (Redis 7 or Valkey, and FUNCTION allowed for this user): invalidations still work, but @isrgate/next replicas cannot record theirs"
            );
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Fields asked for per `HSCAN` page: each page is one command bounded by
/// `redis.command_timeout`, so a hash of any size loads (a single `HGETALL` of 400,000 fields
/// took 600 ms, past the timeout, and was retried forever).
pub(crate) const PAGE: u32 = 10_000;

/// Loads the library (so replicas can call it) and every recorded invalidation from the store
/// into `epochs`, a page at a time. Invalidations applied meanwhile reach `epochs` from the bus
/// too, and a record only ever moves a tag's epoch forward, so the order does not matter.
pub async fn load(store: &Store, epochs: &Epochs) -> Result<usize, StoreError> {
    let Store::Redis(redis) = store else {
        return Ok(0);
    };
    load_library(redis).await?;
    let mut n = 0;
    let mut cursor = String::from("0");
    loop {
        let (next, fields) = scan_page(redis, &cursor, PAGE).await?;
        for pair in fields.chunks_exact(2) {
            let (field, value) = (&pair[0], &pair[1]);
            if field == EPOCH_FIELD {
                if let Ok(e) = value.parse() {
                    epochs.observe(e);
                }
            } else if let Some((name, mode, e)) = parse_record(field, value) {
                epochs.record(e, mode, [name]);
                n += 1;
            }
        }
        if next == "0" {
            return Ok(n);
        }
        cursor = next;
    }
}

/// One `HSCAN` page of `isr:inv` from `cursor`: the next cursor (`"0"` at the end) and the
/// fields and values, flat. A page that fails is asked again, from the same cursor (what was
/// read stays read), for half as many fields, a few times: a slow or loaded Redis, or a slow
/// gateway, gets pages it can answer within the command timeout.
pub(crate) async fn scan_page(
    redis: &RedisStore,
    cursor: &str,
    count: u32,
) -> Result<(String, Vec<String>), StoreError> {
    let mut count = count;
    let mut tries = 1;
    loop {
        match scan_page_once(redis, cursor, count).await {
            Err(e) if tries < 5 && !matches!(e, StoreError::CircuitOpen) => {
                tracing::debug!(error = %e, count, "an isr:inv page failed; asking for fewer fields");
                count = (count / 2).max(100);
                tries += 1;
            }
            result => return result,
        }
    }
}

async fn scan_page_once(
    redis: &RedisStore,
    cursor: &str,
    count: u32,
) -> Result<(String, Vec<String>), StoreError> {
    let hscan = CustomCommand::new_static("HSCAN", ClusterHash::FirstKey, false);
    let args = vec![
        INV_KEY.to_owned(),
        cursor.to_owned(),
        "COUNT".to_owned(),
        count.to_string(),
    ];
    redis.bounded(redis.pool().next().custom(hscan, args)).await
}

/// A field `s:<tag>` / `h:<tag>` and its epoch; anything else is skipped.
pub(crate) fn parse_record<'a>(field: &'a str, value: &str) -> Option<(&'a str, Mode, u64)> {
    let (mode, tag) = match field.split_once(':')? {
        ("s", tag) => (Mode::Soft, tag),
        ("h", tag) => (Mode::Hard, tag),
        _ => return None,
    };
    Some((tag, mode, value.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_or_are_skipped() {
        assert_eq!(parse_record("h:t", "12"), Some(("t", Mode::Hard, 12)));
        assert_eq!(
            parse_record("s:_epoch", "3"),
            Some(("_epoch", Mode::Soft, 3))
        );
        for (field, value) in [("t", "12"), ("x:t", "1"), ("s:t", "x"), ("_epoch", "4")] {
            assert_eq!(parse_record(field, value), None, "{field}");
        }
    }
}
