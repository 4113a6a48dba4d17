//! The entry store against a real `redis-server`: layout, TTL, and failure behaviour (errors
//! come back within the command bound; the same store recovers when Redis returns).

use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use isrgate::cache::keys::entry_key;
use isrgate::cache::store::{RedisSettings, RedisStore, Store, Stored};

use crate::eventually;
use crate::support::redis::RedisProcess;

fn settings(r: &RedisProcess) -> RedisSettings {
    RedisSettings {
        url: r.url(),
        pool_size: 2,
        command_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        tls: Default::default(),
    }
}

fn entry(body: &'static [u8]) -> Stored {
    Stored {
        meta: Bytes::from_static(b"\x01meta"),
        body: Bytes::from_static(body),
    }
}

async fn raw_client(r: &RedisProcess) -> Client {
    let c = Builder::from_config(Config::from_url(&r.url()).expect("url"))
        .build()
        .expect("client");
    c.init().await.expect("connect");
    c
}

#[tokio::test]
async fn entries_round_trip_with_the_documented_layout_and_ttl() {
    let r = RedisProcess::start();
    let store = Store::Redis(RedisStore::connect(&settings(&r)).expect("store"));
    let key = "0123456789abcdef0123456789abcdef";
    eventually!(
        10,
        store
            .put(key, entry(b"\x1f\x8bgzip"), 1, Duration::from_secs(60))
            .await
            .is_ok(),
        "put"
    );
    assert_eq!(
        store.get(key).await.expect("get"),
        Some(entry(b"\x1f\x8bgzip"))
    );
    assert_eq!(
        store
            .get("ffffffffffffffffffffffffffffffff")
            .await
            .expect("get"),
        None
    );

    let raw = raw_client(&r).await;
    let k = entry_key(key);
    assert_eq!(k, format!("isr:{{{key}}}:e"));
    let body: Bytes = raw.hget(&k, "b").await.expect("hget");
    assert_eq!(&body[..], b"\x1f\x8bgzip");
    let pttl: i64 = raw.pttl(&k).await.expect("pttl");
    assert!(
        (59_000..=60_000).contains(&pttl),
        "TTL set with the entry: {pttl}"
    );
}

#[tokio::test]
async fn a_dead_redis_errors_within_the_bound_and_the_same_store_recovers() {
    let mut r = RedisProcess::start();
    let store = Store::Redis(RedisStore::connect(&settings(&r)).expect("store"));
    let key = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    eventually!(
        10,
        store
            .put(key, entry(b"v1"), 1, Duration::from_secs(60))
            .await
            .is_ok(),
        "put"
    );
    r.kill();
    // Each call ends in an error, not a hang: bounded by the 300 ms command and connect
    // timeouts (a bound far above them, so a loaded machine does not fail it).
    for _ in 0..3 {
        let started = Instant::now();
        assert!(store.get(key).await.is_err(), "Redis is down");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "bounded: {:?}",
            started.elapsed()
        );
    }
    r.restart();
    // Redis keeps nothing on disk here: the entry is gone, but the store works again.
    eventually!(
        10,
        store
            .put(key, entry(b"v2"), 1, Duration::from_secs(60))
            .await
            .is_ok(),
        "reconnected: {}",
        r.log()
    );
    assert_eq!(store.get(key).await.expect("get"), Some(entry(b"v2")));
}

#[tokio::test]
async fn a_store_built_while_redis_is_down_starts_working_when_it_comes_up() {
    let mut r = RedisProcess::start();
    r.kill();
    let store =
        Store::Redis(RedisStore::connect(&settings(&r)).expect("building never waits for Redis"));
    assert!(store.get("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").await.is_err());
    r.restart();
    eventually!(
        10,
        store.get("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").await.is_ok(),
        "connected later"
    );
}

/// Never back in time: a write carrying an earlier render time than the stored entry's is
/// refused, in Redis and in the in-process store alike; an equal or later one replaces it.
#[tokio::test]
async fn an_older_render_never_replaces_a_newer_one() {
    let r = RedisProcess::start();
    let redis = Store::Redis(RedisStore::connect(&settings(&r)).expect("store"));
    let memory = Store::Memory(isrgate::cache::store::MemoryStore::new(
        isrgate::cache::store::MemorySettings { max_bytes: 1 << 20 },
    ));
    let key = "cccccccccccccccccccccccccccccccc";
    let ttl = Duration::from_secs(60);
    eventually!(
        10,
        redis.put(key, entry(b"new"), 2_000, ttl).await.is_ok(),
        "connected"
    );
    for store in [&redis, &memory] {
        let kind = store.kind();
        assert!(
            store
                .put(key, entry(b"new"), 2_000, ttl)
                .await
                .expect("put")
        );
        assert!(
            !store
                .put(key, entry(b"old"), 1_999, ttl)
                .await
                .expect("put"),
            "{kind}: an older render is refused"
        );
        assert_eq!(
            store.get(key).await.expect("get"),
            Some(entry(b"new")),
            "{kind}"
        );
        assert!(
            store
                .put(key, entry(b"newer"), 2_001, ttl)
                .await
                .expect("put")
        );
        assert_eq!(
            store.get(key).await.expect("get"),
            Some(entry(b"newer")),
            "{kind}"
        );
    }
    let raw = raw_client(&r).await;
    let rendered: String = raw.hget(entry_key(key), "r").await.expect("hget");
    assert_eq!(rendered, "2001", "the render time is kept beside the entry");
}

/// A page's entries of one render go in one pipeline: each is written unless a newer render
/// of its key is stored, answered in order, with the layout and TTL of a single write.
#[tokio::test]
async fn entries_written_together_are_each_refused_only_over_a_newer_render() {
    use isrgate::cache::store::Put;
    let r = RedisProcess::start();
    let redis = Store::Redis(RedisStore::connect(&settings(&r)).expect("store"));
    let memory = Store::Memory(isrgate::cache::store::MemoryStore::new(
        isrgate::cache::store::MemorySettings { max_bytes: 1 << 20 },
    ));
    let (html, rsc) = (
        "dddddddddddddddddddddddddddddddd",
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    );
    let ttl = Duration::from_secs(60);
    let put = |key: &str, body: &'static [u8], rendered_at_ms| Put {
        key_hex: key.to_owned(),
        entry: entry(body),
        rendered_at_ms,
        ttl,
    };
    eventually!(
        10,
        redis.put(rsc, entry(b"r-later"), 3_000, ttl).await.is_ok(),
        "connected"
    );
    memory
        .put(rsc, entry(b"r-later"), 3_000, ttl)
        .await
        .expect("put");
    let evals_before = evals(&r);
    for store in [&redis, &memory] {
        let kind = store.kind();
        let written = store
            .put_all(vec![put(html, b"h", 2_000), put(rsc, b"r", 2_000)])
            .await
            .expect("put_all");
        assert_eq!(written, [true, false], "{kind}: the RSC has a newer render");
        assert_eq!(
            store.get(html).await.expect("get"),
            Some(entry(b"h")),
            "{kind}"
        );
        assert_eq!(
            store.get(rsc).await.expect("get"),
            Some(entry(b"r-later")),
            "{kind}"
        );
    }
    assert_eq!(
        evals(&r),
        evals_before + 1,
        "both in one script call: readers see them change at once"
    );
    let raw = raw_client(&r).await;
    let (rendered, ttl_ms): (String, i64) = (
        raw.hget(entry_key(html), "r").await.expect("hget"),
        raw.pttl(entry_key(html)).await.expect("pttl"),
    );
    assert_eq!(rendered, "2000");
    assert!((1..=60_000).contains(&ttl_ms), "pttl {ttl_ms}");
}

/// How many `EVAL` calls Redis has run.
fn evals(r: &RedisProcess) -> u64 {
    let stats = r.cli(&["INFO", "commandstats"]);
    let line = stats.lines().find(|l| l.starts_with("cmdstat_eval:"));
    let calls = line.and_then(|l| l.split(['=', ',']).nth(1));
    calls.and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The miss's one round trip: the fill lock is taken only while no render newer than the one
/// the lookup saw is stored.
#[tokio::test]
async fn the_fill_lock_is_refused_when_a_newer_render_landed() {
    use isrgate::cache::lock::Locked;
    let r = RedisProcess::start();
    let redis = RedisStore::connect(&settings(&r)).expect("store");
    let store = Store::Redis(redis.clone());
    let key = "dddddddddddddddddddddddddddddddd";
    let ttl = Duration::from_secs(5);
    eventually!(
        10,
        store
            .put(key, entry(b"v"), 1_000, Duration::from_secs(60))
            .await
            .is_ok(),
        "connected"
    );
    assert_eq!(
        redis
            .try_lock_unless_newer(key, ttl, 999)
            .await
            .expect("eval"),
        Locked::Newer,
        "a render newer than the one seen is stored: read it"
    );
    let Locked::Held(held) = redis
        .try_lock_unless_newer(key, ttl, 1_000)
        .await
        .expect("eval")
    else {
        panic!("the stored render is the one seen: the lock is ours")
    };
    assert_eq!(
        redis
            .try_lock_unless_newer(key, ttl, 1_000)
            .await
            .expect("eval"),
        Locked::Contended
    );
    assert!(redis.unlock(&held).await.expect("unlock"));
    assert!(matches!(
        redis
            .try_lock_unless_newer("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee", ttl, 0)
            .await
            .expect("eval"),
        Locked::Held(_)
    ));
}

#[tokio::test]
async fn a_read_takes_the_fill_lock_only_when_nothing_is_stored() {
    use isrgate::cache::lock::ReadOrLock;
    let r = RedisProcess::start();
    let redis = RedisStore::connect(&settings(&r)).expect("store");
    let store = Store::Redis(redis.clone());
    let (stored, empty) = (
        "abababababababababababababababab",
        "cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd",
    );
    let ttl = Duration::from_secs(5);
    eventually!(
        10,
        store
            .put(stored, entry(b"body"), 1_000, Duration::from_secs(60))
            .await
            .is_ok(),
        "connected"
    );
    let ReadOrLock::Entry(read) = redis.read_or_lock(stored, ttl).await.expect("eval") else {
        panic!("an entry is stored: it is the answer")
    };
    assert_eq!(
        (&read.meta[..], &read.body[..]),
        (&b"\x01meta"[..], &b"body"[..])
    );
    assert!(
        redis.try_lock(stored, ttl).await.expect("set").is_some(),
        "reading a stored entry took no lock"
    );
    let ReadOrLock::Locked(held) = redis.read_or_lock(empty, ttl).await.expect("eval") else {
        panic!("nothing stored, nobody filling: the lock is ours")
    };
    assert!(matches!(
        redis.read_or_lock(empty, ttl).await.expect("eval"),
        ReadOrLock::Contended
    ));
    assert!(redis.unlock(&held).await.expect("unlock"));
    assert!(matches!(
        redis.read_or_lock(empty, ttl).await.expect("eval"),
        ReadOrLock::Locked(_)
    ));
}

/// A frozen Redis costs one command timeout per breaker cooldown (the probe), not one per
/// call that arrives when the cooldown ends: before, every call of the half-open moment went
/// through and waited the whole timeout (a p99 spike every cooldown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_probed_with_one_command_per_cooldown() {
    use isrgate::cache::store::{BREAKER_COOLDOWN, StoreError};
    let r = RedisProcess::start();
    let redis = RedisStore::connect(&settings(&r)).expect("store");
    let store = Store::Redis(redis.clone());
    eventually!(10, store.get("ab").await.is_ok(), "connected");
    r.pause();
    let wave = || {
        let store = store.clone();
        async move {
            let calls: Vec<_> = (0..20)
                .map(|_| {
                    let store = store.clone();
                    tokio::spawn(async move { store.get("ab").await })
                })
                .collect();
            let mut timeouts = 0;
            for c in calls {
                // Anything but "skipped" waited for a Redis that does not answer.
                match c.await.expect("call") {
                    Err(StoreError::CircuitOpen) | Ok(_) => {}
                    Err(_) => timeouts += 1,
                }
            }
            timeouts
        }
    };
    assert!(wave().await >= 5, "the first failures open the breaker");
    let (mut timeouts, started) = (0, Instant::now());
    while started.elapsed() < BREAKER_COOLDOWN * 5 / 2 {
        timeouts += wave().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.resume();
    assert!(
        (1..=4).contains(&timeouts),
        "one probe per cooldown, not a wave of timeouts: {timeouts}"
    );
    eventually!(
        10,
        store.get("ab").await.is_ok(),
        "the probe closes it once Redis answers"
    );
}
