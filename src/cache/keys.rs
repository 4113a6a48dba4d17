//! Every Redis key and pub/sub channel isrgate uses, spelled once. Nothing else in the crate
//! writes an `isr:` name: the modules that own a key's commands import its name from here.
//!
//! The names are a wire contract, never to be changed: gateways of the previous version run
//! beside this one during a rolling upgrade, and the `@isrgate/next` package (packages/next)
//! spells some of them in JavaScript. The tests below pin every name as it is.
//!
//! | Name | Type | Written by | TTL |
//! |------|------|------------|-----|
//! | `isr:{<hex>}:e` ([`entry_key`]) | hash: `m` metadata, `b` gzip body, `r` render time (UNIX ms) | `cache::store` (`put`, a script: never over a newer render) | the entry's: fresh + stale windows, capped (`PEXPIRE` in the same script) |
//! | `isr:{<hex>}:l` ([`lock_key`]) | string: the holder's random token | `cache::lock` (`SET NX PX`, compare-and-delete) | `coalesce.lock_ttl`, extended while the render runs |
//! | `isr:{<hex>}:v` ([`slots_key`]) | list: the `Vary` slots of a primary key, newest first | `cache::store` (`track_slot`) | raised to at least the newest slot's TTL |
//! | `isr:inv` ([`INV_KEY`]) | hash: `s:<tag>` / `h:<tag>` → epoch; marks `_epoch`, `_indexed`, `_unindexed`, `_snapped` | the Redis function of `invalidate.lua` (gateways: webhook, `isrgate purge`; replicas: `@isrgate/next`); `invalidate::retention` prunes it | none (pruned past the retention horizon) |
//! | `isr:{isr:inv}:z` ([`INDEX_KEY`]) | sorted set: member `s:<tag>` / `h:<tag>`, score the epoch | the Redis function; trimmed by the snapshot swap | none |
//! | `isr:{isr:inv}:snap` ([`SNAPSHOT_KEY`]) | string: the snapshot (`invalidate::snapshot`) | `invalidate::snapshot::write` (a load that scanned, the pruner) | none (`PERSIST` on swap) |
//! | `isr:{isr:inv}:snap:new:<16 hex>` ([`unfinished_snapshot_key`]) | string: a snapshot being written | `invalidate::snapshot::write`, renamed over `SNAPSHOT_KEY` | 10 min until renamed |
//! | `isr:inv:prune` ([`PRUNE_LOCK_KEY`]) | string: the pruning gateway's id | `invalidate::retention` (`SET NX PX`) | one pruning period (10 min) |
//! | `isr:log` ([`LOG_KEY`]) | stream: field `r`, one JSON record per revalidation | `invalidate::log` (`XADD`) | none (`MAXLEN ~ 1000`) |
//! | `isr:builds` ([`BUILDS_KEY`]) | hash: build identity → JSON | `@isrgate/next` replicas (every 30 s; they `HDEL` builds unseen for a day); read by `deploy::builds`, `isrgate deploy` | none |
//! | `isr:deploy` ([`DEPLOY_KEY`]) | hash: `current`, `switched_ms`, `pinned`, `prewarmed` | `deploy::rollout` (a compare-and-set script), `isrgate deploy` | none |
//! | `isr:deploy:seen` ([`DEPLOY_SEEN_KEY`]) | hash: build → when first seen (UNIX ms) | `deploy::rollout` (`HSETNX`) | none (kept to the newest 64) |
//! | `isr:deploy:lock` ([`DEPLOY_LOCK_KEY`]) | string: the pre-warming gateway | `deploy::rollout` (`SET NX PX`) | 15 s, renewed while pre-warming |
//! | `isr:hot:<day>` ([`hot_key`]) | sorted set: `<host> <path>` → requests counted | `deploy::hot` (`ZINCRBY` every 10 s) | 2 days (`EXPIRE`) |
//! | channel `isr:bus` ([`BUS_CHANNEL`]) | pub/sub (`bus::Message`) | gateways; the Redis function's `inv` message; `@isrgate/next` subscribes | — |
//! | channel `isr:tail:<session>` ([`tail_channel`]) | pub/sub: access lines for one `isrgate tail` | gateways following that session (`logging::tail`) | — |
//!
//! `<hex>` is a cache key's 128-bit hash in 32 hex digits (`cache::key`); `<day>` is days since
//! 1970, UTC. No name carries the cache namespace: it is inside the hash, so two namespaces
//! never share an entry, and the fleet-wide keys are one per Redis database.
//!
//! **Redis Cluster.** A script or `MULTI` may only touch keys of one slot, and a key's slot is
//! the hash of its `{…}` tag when it has one. So:
//! - everything about one cache key is tagged with its hash, `{<hex>}`: the entry, its fill
//!   lock (read-or-lock and lock-unless-newer read the entry and take the lock in one script)
//!   and its list of `Vary` slots. The slots' own entries hash elsewhere: the caller deletes
//!   them one by one;
//! - the invalidation keys are tagged `{isr:inv}`, the whole name of [`INV_KEY`] (which has no
//!   tag, so its slot is the hash of `isr:inv`): the index, the snapshot and a snapshot being
//!   written all land in `isr:inv`'s slot, as the function and the snapshot swap (`RENAME`)
//!   need. The `isr:` before the tag keeps every key under `isr:` (ACL patterns `~isr:*`,
//!   `SCAN MATCH isr:*`);
//! - the other keys are each used alone, and channels have no slot.
//!
//! **The JavaScript side** (packages/next/lib/fleet.js) spells `INV_KEY = 'isr:inv'`,
//! `INDEX_KEY = 'isr:{isr:inv}:z'`, `BUILDS_KEY = 'isr:builds'` and `CHANNEL = 'isr:bus'`, and
//! the function names `isrgate_invalidate_v2` / `_v1` (`invalidate::apply`). The Lua library
//! (src/invalidate/invalidate.lua) receives the keys as `KEYS[1]` and `KEYS[2]` and the channel
//! as `ARGV[3]`; only for a v1 caller, which passes one key, it names the index from the first
//! key (`'isr:{' .. KEYS[1] .. '}:z'`, [`INDEX_KEY`] again).

/// The hash of invalidation records; field `_epoch` is the global counter
/// (`invalidate::load` lists the other `_` fields).
pub const INV_KEY: &str = "isr:inv";

/// The index of the records by epoch, in [`INV_KEY`]'s Cluster slot.
pub const INDEX_KEY: &str = "isr:{isr:inv}:z";

/// The snapshot of the records, in [`INV_KEY`]'s Cluster slot.
pub const SNAPSHOT_KEY: &str = "isr:{isr:inv}:snap";

/// The lock of the gateway pruning the records this period.
pub const PRUNE_LOCK_KEY: &str = "isr:inv:prune";

/// The revalidation log's stream.
pub const LOG_KEY: &str = "isr:log";

/// The hash the replicas report their builds in.
pub const BUILDS_KEY: &str = "isr:builds";

/// The hash of the fleet's rollout state.
pub const DEPLOY_KEY: &str = "isr:deploy";

/// Build → when a gateway first saw a replica of it (UNIX ms).
pub const DEPLOY_SEEN_KEY: &str = "isr:deploy:seen";

/// Held by the gateway pre-warming a build.
pub const DEPLOY_LOCK_KEY: &str = "isr:deploy:lock";

/// The channel every gateway subscribes to (`bus`).
pub const BUS_CHANNEL: &str = "isr:bus";

/// The entry of the cache key `key_hex`.
pub fn entry_key(key_hex: &str) -> String {
    format!("isr:{{{key_hex}}}:e")
}

/// The fill lock of the cache key `key_hex` (in its entry's slot).
pub fn lock_key(key_hex: &str) -> String {
    format!("isr:{{{key_hex}}}:l")
}

/// The list of `Vary` slots of the primary key `primary_hex` (in the primary's slot).
pub fn slots_key(primary_hex: &str) -> String {
    format!("isr:{{{primary_hex}}}:v")
}

/// A snapshot being written, `nonce` telling writers apart (in [`INV_KEY`]'s slot, so the swap
/// may rename it).
pub fn unfinished_snapshot_key(nonce: u64) -> String {
    format!("{SNAPSHOT_KEY}:new:{nonce:016x}")
}

/// The hot set of the UTC day `day` (days since 1970).
pub fn hot_key(day: u64) -> String {
    format!("isr:hot:{day}")
}

/// The channel one `isrgate tail` session's lines are published on.
pub fn tail_channel(session: &str) -> String {
    format!("isr:tail:{session}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire contract: these strings are read by older gateways and by `@isrgate/next`.
    #[test]
    fn names_are_exactly_the_wire_names() {
        assert_eq!(INV_KEY, "isr:inv");
        assert_eq!(INDEX_KEY, "isr:{isr:inv}:z");
        assert_eq!(SNAPSHOT_KEY, "isr:{isr:inv}:snap");
        assert_eq!(PRUNE_LOCK_KEY, "isr:inv:prune");
        assert_eq!(LOG_KEY, "isr:log");
        assert_eq!(BUILDS_KEY, "isr:builds");
        assert_eq!(DEPLOY_KEY, "isr:deploy");
        assert_eq!(DEPLOY_SEEN_KEY, "isr:deploy:seen");
        assert_eq!(DEPLOY_LOCK_KEY, "isr:deploy:lock");
        assert_eq!(BUS_CHANNEL, "isr:bus");
        let hex = "0123456789abcdef0123456789abcdef";
        assert_eq!(entry_key(hex), format!("isr:{{{hex}}}:e"));
        assert_eq!(entry_key("ab12"), "isr:{ab12}:e");
        assert_eq!(lock_key("ab12"), "isr:{ab12}:l");
        assert_eq!(slots_key("ab12"), "isr:{ab12}:v");
        assert_eq!(
            unfinished_snapshot_key(0xbeef),
            "isr:{isr:inv}:snap:new:000000000000beef"
        );
        assert_eq!(hot_key(20_000), "isr:hot:20000");
        assert_eq!(tail_channel("s1"), "isr:tail:s1");
    }

    /// The names `@isrgate/next` spells in JavaScript are these.
    #[test]
    fn the_javascript_side_spells_the_same_names() {
        let js = include_str!("../../packages/next/lib/fleet.js");
        for (name, value) in [
            ("INV_KEY", INV_KEY),
            ("INDEX_KEY", INDEX_KEY),
            ("BUILDS_KEY", BUILDS_KEY),
            ("CHANNEL", BUS_CHANNEL),
        ] {
            let line = format!("const {name} = '{value}';");
            assert!(js.contains(&line), "fleet.js lacks {line}");
        }
    }

    /// Every key about one cache key, and every invalidation key, shares one Cluster slot: the
    /// scripts that touch several of them need it.
    #[test]
    fn keys_used_together_share_a_hash_tag() {
        fn tag(key: &str) -> &str {
            let open = key.find('{').map_or(0, |i| i + 1);
            let close = key[open..].find('}').map_or(key.len(), |i| open + i);
            if open == 0 || close == open {
                key
            } else {
                &key[open..close]
            }
        }
        assert_eq!(tag(&entry_key("ab")), "ab");
        assert_eq!(tag(&lock_key("ab")), "ab");
        assert_eq!(tag(&slots_key("ab")), "ab");
        for k in [INDEX_KEY, SNAPSHOT_KEY, &unfinished_snapshot_key(1)] {
            assert_eq!(tag(k), INV_KEY, "{k}");
        }
        assert_eq!(tag(INV_KEY), INV_KEY);
    }
}
