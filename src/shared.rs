//! What a gateway has only with Redis, as one value: [`Shared`]. Code that works either way asks
//! the cache for it (`CacheState::shared`) and does the in-process thing when there is none;
//! nothing outside `cache::store` tells the two stores apart by their variant.
//!
//! With Redis the entries live in the shared store (`cache::store::Store`, either backend, used
//! for get/put/delete alike), and beside them the fleet shares:
//! - the Redis pool with its circuit breaker and latency ([`Shared::redis`]): fill locks
//!   (`cache::lock`), the invalidation function (`invalidate::apply`), the revalidation log's
//!   stream (`invalidate::log`), the rollout's hashes (`deploy`), `INFO` for the dashboard
//!   ([`Shared::info`]);
//! - the bus between gateways ([`Shared::bus`], [`Shared::publish`]).
//!
//! Key names are `cache::keys`'s. Receives the Redis settings; hands on connections, never
//! opens one itself until [`crate::invalidate::fleet::start`] (or a worker) starts them.

use std::time::Duration;

use fred::prelude::*;
use fred::types::InfoKind;

use crate::bus::{Bus, Message};
use crate::cache::store::{RedisSettings, RedisStore, Store, StoreError};

/// The shared Redis of the fleet: its pool, the entry store over that pool, and the bus.
#[derive(Clone)]
pub struct Shared {
    redis: RedisStore,
    /// The entries, over the same pool as `redis`.
    store: Store,
    bus: Bus,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Builds the bus's subscriber and the pool, without connecting (no runtime needed).
    pub fn new(settings: &RedisSettings, gateway_id: String) -> Result<Shared, StoreError> {
        let bus = Bus::new(settings, gateway_id)?;
        let redis = RedisStore::new(settings)?;
        Ok(Shared {
            store: Store::Redis(redis.clone()),
            redis,
            bus,
        })
    }

    /// The same Redis through a pool of the calling worker's own ([`RedisStore::sibling`]:
    /// same breaker and latency, not connected yet; start it from the worker's runtime), so a
    /// worker's reads and locks never hop to another thread. The bus is the gateway's one.
    pub fn for_worker(&self) -> Result<Shared, StoreError> {
        let redis = self.redis.sibling()?;
        Ok(Shared {
            store: Store::Redis(redis.clone()),
            redis,
            bus: self.bus.clone(),
        })
    }

    /// The Redis pool, for the commands of the modules that own them.
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// The entry store over this pool.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The bus between gateways.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Publishes `message` on the bus within `timeout`; errors are the caller's to count.
    pub async fn publish(&self, message: &Message, timeout: Duration) -> Result<(), StoreError> {
        crate::bus::publish(self.redis.pool(), message, timeout).await
    }

    /// Whether the circuit breaker skips Redis now.
    pub fn breaker_open(&self) -> bool {
        self.redis.breaker().is_open(crate::clock::monotonic_ms())
    }

    /// Whether every connection of the pool is up.
    pub fn is_connected(&self) -> bool {
        self.redis.is_connected()
    }

    /// The `INFO` section `kind` as Redis writes it (`name:value` lines), for the dashboard.
    pub async fn info(&self, kind: InfoKind) -> Result<String, StoreError> {
        let r = &self.redis;
        r.bounded(r.pool().next().info::<String>(Some(kind))).await
    }

    /// The keys in the database (`DBSIZE`), for the dashboard.
    pub async fn key_count(&self) -> Result<u64, StoreError> {
        let r = &self.redis;
        r.bounded(r.pool().next().dbsize::<u64>()).await
    }
}
