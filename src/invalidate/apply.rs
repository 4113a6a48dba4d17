//! Applying an invalidation (README "Invalidate by epoch"): one Redis function,
//! `isrgate_invalidate_v2` of the library in `invalidate.lua`, moves the epoch forward (never
//! back, even in a Redis that lost its data), records the tag's newest soft or hard epoch in the
//! hash `isr:inv` (fields `s:<tag>` and `h:<tag>`, so no tag can collide with the counter field
//! `_epoch` and a soft purge never overwrites a hard one) and in its index `isr:{isr:inv}:z`, and
//! publishes the `inv` message on the bus, atomically, so a gateway never sees the record
//! without the message or the other way round. O(1) in the number of entries: nothing is
//! deleted.
//!
//! The library is the fleet's one implementation of that step: the Next.js replicas running
//! `@isrgate/next` call the same function for their in-app revalidations (older ones call
//! `isrgate_invalidate_v1`, which the library keeps). [`load_library`] loads it (at start and
//! after every bus reconnect, when Redis may have come back empty, from `super::load`); a Redis
//! without Functions (< 7) gets the same text as a script. `super::retention` keeps the hash
//! bounded; `super::snapshot` and `super::load` keep a start fast whatever its size.
//!
//! With the in-process store the invalidation is recorded in this gateway's map only.

use fred::prelude::*;

use crate::cache::epochs::{Epochs, Mode};
use crate::cache::keys::{BUS_CHANNEL, INDEX_KEY, INV_KEY};
use crate::cache::store::{RedisStore, StoreError};

/// The library (`#!lua name=isrgate`): see the file for the arguments and the epoch rule. Its
/// keys come as `KEYS` ([`INV_KEY`], [`INDEX_KEY`]) and the bus channel as `ARGV[3]`: the
/// library spells no name of its own except the index of a v1 caller, named from `KEYS[1]`
/// (`crate::cache::keys`).
pub const LIBRARY: &str = include_str!("invalidate.lua");

/// The function the library registers; the version is the argument list's (v2: both keys).
pub const FUNCTION: &str = "isrgate_invalidate_v2";

/// The same function under the name callers from before the index use (one key, the index
/// named from it): older gateways and `@isrgate/next` packages.
pub const FUNCTION_V1: &str = "isrgate_invalidate_v1";

/// Records the invalidation of `tags` in the shared `redis` (and so on every gateway) and in
/// `epochs`, or in `epochs` alone without Redis; returns its epoch. On error nothing was
/// recorded anywhere.
pub async fn apply(
    redis: Option<&RedisStore>,
    epochs: &Epochs,
    gateway: &str,
    mode: Mode,
    tags: &[String],
) -> Result<u64, StoreError> {
    let epoch = match redis {
        None => epochs.current() + 1,
        Some(redis) => {
            let mut args = vec![
                gateway.to_owned(),
                mode.as_str().to_owned(),
                BUS_CHANNEL.to_owned(),
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
pub(crate) async fn load_library(redis: &RedisStore) -> Result<bool, StoreError> {
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
