//! Fill locks in Redis (DESIGN.md request flow step 7): at most one gateway of the fleet
//! renders a key at a time.
//!
//! A lock is the string [`lock_key`] (`isr:{<hex>}:l`) holding a random token, set with `SET … NX PX ttl`
//! (so a gateway that dies releases nothing and its lock expires), extended while a long render
//! runs, and released by compare-and-delete (a Lua script: only the holder of the token may
//! delete it, so a leader whose lock expired and was taken over cannot free its successor's).
//! The `{<hex>}` hash tag puts it in the entry's Cluster slot.
//!
//! Every call is bounded by the store's command timeout and goes through its circuit breaker:
//! callers treat an error as "no fleet lock" and fall back to local single-flight, never
//! waiting on Redis.

use std::time::Duration;

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};

use super::keys::{entry_key, lock_key};
use super::store::{RedisStore, StoreError, Stored};

/// Deletes the lock only if it still holds our token.
const RELEASE: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0";

/// Extends the lock only if it still holds our token.
const EXTEND: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0";

/// Takes the lock (KEYS[2]) unless the entry (KEYS[1]) holds a render newer than ARGV[3]: -1
/// then, 1 when taken, 0 when another holder has it. The two keys share a hash tag (one Cluster
/// slot), so a miss learns in one round trip whether a fill landed since its lookup.
const LOCK_UNLESS_NEWER: &str = "local r = redis.call('hget', KEYS[1], 'r') \
if r and tonumber(r) > tonumber(ARGV[3]) then return -1 end \
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end return 0";

/// Reads the entry (KEYS[1]), and takes the lock (KEYS[2]) when there is none: the entry's two
/// fields, or 1 when the lock was taken, 0 when another holder has it. A cold miss learns
/// "nothing stored" and "yours to fill" in one round trip.
const READ_OR_LOCK: &str = "local v = redis.call('hmget', KEYS[1], 'm', 'b') \
if v[1] and v[2] then return v end \
if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end return 0";

/// What [`RedisStore::read_or_lock`] found.
#[derive(Debug)]
pub enum ReadOrLock {
    /// The stored entry (no lock taken).
    Entry(Stored),
    /// Nothing stored, and the lock is ours.
    Locked(LockToken),
    /// Nothing stored, and another gateway holds the lock.
    Contended,
}

/// What [`RedisStore::try_lock_unless_newer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locked {
    /// Ours.
    Held(LockToken),
    /// Another gateway holds it.
    Contended,
    /// The store holds a render newer than the caller saw: read it instead.
    Newer,
}

/// A held lock: its key and our token. Not released on drop (that needs a round trip): the
/// owner calls [`RedisStore::unlock`], and a lock that is never released expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken {
    key: String,
    token: String,
}

impl LockToken {
    /// The lock of `key_hex` with a fresh random token (held once a `SET NX` with it succeeds).
    fn new(key_hex: &str) -> LockToken {
        LockToken {
            key: lock_key(key_hex),
            token: format!("{:032x}", fastrand::u128(..)),
        }
    }
}

impl RedisStore {
    /// Tries to take the fill lock of `key_hex` for `ttl`: `Some` when we hold it, `None` when
    /// another gateway does.
    pub async fn try_lock(
        &self,
        key_hex: &str,
        ttl: Duration,
    ) -> Result<Option<LockToken>, StoreError> {
        let held = LockToken::new(key_hex);
        let set: Option<String> = self
            .bounded(self.pool().set(
                &held.key,
                held.token.as_str(),
                Some(Expiration::PX(millis(ttl))),
                Some(SetOptions::NX),
                false,
            ))
            .await?;
        Ok(set.map(|_| held))
    }

    /// Takes the fill lock of `key_hex` for `ttl` unless the store already holds a render of
    /// the key newer than `seen_rendered_at_ms` (the render the caller's lookup saw; 0 for
    /// none): one round trip for "lock, or read what was filled meanwhile".
    pub async fn try_lock_unless_newer(
        &self,
        key_hex: &str,
        ttl: Duration,
        seen_rendered_at_ms: u64,
    ) -> Result<Locked, StoreError> {
        let held = LockToken::new(key_hex);
        let keys = vec![entry_key(key_hex), held.key.clone()];
        let args = vec![
            held.token.clone(),
            millis(ttl).to_string(),
            seen_rendered_at_ms.to_string(),
        ];
        let n: i64 = self
            .bounded(self.pool().next().eval(LOCK_UNLESS_NEWER, keys, args))
            .await?;
        Ok(match n {
            1 => Locked::Held(held),
            -1 => Locked::Newer,
            _ => Locked::Contended,
        })
    }

    /// Reads the entry of `key_hex` and, when there is none, takes its fill lock for `ttl` (see
    /// [`READ_OR_LOCK`]). For a miss that will fill the key whatever it finds missing.
    pub async fn read_or_lock(
        &self,
        key_hex: &str,
        ttl: Duration,
    ) -> Result<ReadOrLock, StoreError> {
        let held = LockToken::new(key_hex);
        let keys = vec![entry_key(key_hex), held.key.clone()];
        let args = vec![held.token.clone(), millis(ttl).to_string()];
        let v: fred::types::Value = self
            .bounded(self.pool().next().eval(READ_OR_LOCK, keys, args))
            .await?;
        Ok(match v {
            fred::types::Value::Array(fields) => {
                let mut fields = fields.into_iter().map(fred::types::Value::into_bytes);
                match (fields.next().flatten(), fields.next().flatten()) {
                    (Some(meta), Some(body)) => ReadOrLock::Entry(Stored { meta, body }),
                    _ => return Err(StoreError::Unexpected("an entry without its two fields")),
                }
            }
            v if v.as_i64() == Some(1) => ReadOrLock::Locked(held),
            _ => ReadOrLock::Contended,
        })
    }

    /// Extends a lock we hold to `ttl` from now; `false` when it is no longer ours (it expired,
    /// and maybe another gateway took it).
    pub async fn extend_lock(&self, held: &LockToken, ttl: Duration) -> Result<bool, StoreError> {
        let n: i64 = self
            .bounded(self.pool().next().eval(
                EXTEND,
                held.key.as_str(),
                vec![held.token.clone(), millis(ttl).to_string()],
            ))
            .await?;
        Ok(n == 1)
    }

    /// Releases a lock we hold; `false` when it was no longer ours.
    pub async fn unlock(&self, held: &LockToken) -> Result<bool, StoreError> {
        let n: i64 = self
            .bounded(
                self.pool()
                    .next()
                    .eval(RELEASE, held.key.as_str(), held.token.as_str()),
            )
            .await?;
        Ok(n == 1)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ttls_are_never_zero() {
        assert_eq!(millis(Duration::ZERO), 1, "PX 0 is an error in Redis");
    }
}
