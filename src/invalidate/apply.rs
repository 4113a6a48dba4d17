//! Applying an invalidation (DESIGN.md "Invalidation: epochs, not deletes"): one Redis script
//! moves the epoch forward (never back, even in a Redis that lost its data: see [`APPLY`]), records the tag's newest soft or hard epoch in the hash `isr:inv`
//! (fields `s:<tag>` and `h:<tag>`, so no tag can collide with the counter field `_epoch` and a
//! soft purge never overwrites a hard one) and publishes the `inv` message on the bus,
//! atomically, so a gateway never sees the record without the
//! message or the other way round. O(1) in the number of entries: nothing is deleted.
//!
//! With the in-process store the invalidation is recorded in this gateway's map only.
//! `load` reads the whole hash into the map (at start and after every bus reconnect, when
//! messages may have been missed).

use fred::prelude::*;

use crate::bus::CHANNEL;
use crate::cache::epochs::{Epochs, Mode};
use crate::cache::store::{Store, StoreError};

/// The Redis hash of invalidations; field `_epoch` is the global counter.
pub const INV_KEY: &str = "isr:inv";

const EPOCH_FIELD: &str = "_epoch";

/// KEYS[1] = isr:inv; ARGV = gateway, mode, channel, the caller's newest known epoch, tags…
///
/// The new epoch is the greatest of: the stored counter + 1, the server's clock in
/// milliseconds, and the caller's newest known epoch + 1. The clock is what survives a Redis
/// that comes back empty (restarted without persistence, failed over to an empty replica,
/// FLUSHALL): the counter would start again at 1 while running gateways keep stamping entries
/// with the epoch they knew, and every purge would be older than the pages it should remove.
/// The caller's epoch covers a new primary whose clock is behind the old one's.
const APPLY: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local e = tonumber(redis.call('HGET', KEYS[1], '_epoch') or '0') + 1
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > e then e = now end
local known = tonumber(ARGV[4]) + 1
if known > e then e = known end
e = string.format('%.0f', e)
redis.call('HSET', KEYS[1], '_epoch', e)
local prefix = (ARGV[2] == 'hard') and 'h:' or 's:'
for i = 5, #ARGV do redis.call('HSET', KEYS[1], prefix .. ARGV[i], e) end
redis.call('PUBLISH', ARGV[3], 'inv ' .. e .. ' ' .. ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. table.concat(ARGV, ' ', 5))
return e
";

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
            let e: String = redis
                .bounded(redis.pool().next().eval(APPLY, INV_KEY, args))
                .await?;
            e.parse()
                .map_err(|_| StoreError::Unexpected("an epoch that is not a number"))?
        }
    };
    epochs.record(epoch, mode, tags.iter().map(String::as_str));
    Ok(epoch)
}

/// Loads every recorded invalidation from the store into `epochs`.
pub async fn load(store: &Store, epochs: &Epochs) -> Result<usize, StoreError> {
    let Store::Redis(redis) = store else {
        return Ok(0);
    };
    let all: std::collections::HashMap<String, String> =
        redis.bounded(redis.pool().hgetall(INV_KEY)).await?;
    let mut n = 0;
    for (tag, value) in &all {
        if tag == EPOCH_FIELD {
            if let Ok(e) = value.parse() {
                epochs.observe(e);
            }
            continue;
        }
        if let Some((name, mode, e)) = parse_record(tag, value) {
            epochs.record(e, mode, [name]);
            n += 1;
        }
    }
    Ok(n)
}

/// A field `s:<tag>` / `h:<tag>` and its epoch; anything else is skipped.
fn parse_record<'a>(field: &'a str, value: &str) -> Option<(&'a str, Mode, u64)> {
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
