//! `isr:inv` stays bounded: a gateway starting on a long history loads it a page at a time,
//! and the records no cached page can need any more are pruned, in Redis and in every map.

use std::time::{SystemTime, UNIX_EPOCH};

use isrgate::cache::epochs::Validity;
use isrgate::cache::store::Store;
use isrgate::invalidate::retention;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Gateway, config};

const DAY_MS: u64 = 86_400_000;

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    u64::try_from(since.as_millis()).expect("ms")
}

/// Writes `n` hard records `h:<prefix><i>` at `epoch` inside Redis (one script: a test with
/// hundreds of thousands of records does not send them one by one).
fn records(r: &RedisProcess, prefix: &str, n: usize, epoch: u64) {
    let script = "for i = 1, tonumber(ARGV[2]) do \
                  redis.call('HSET', KEYS[1], 'h:' .. ARGV[1] .. i, ARGV[3]) end return 1";
    let out = r.cli(&[
        "EVAL",
        script,
        "1",
        "isr:inv",
        prefix,
        &n.to_string(),
        &epoch.to_string(),
    ]);
    assert_eq!(out.trim(), "1", "{out}");
}

/// A gateway on `r` (`cache.max_ttl` 7 days, the default) and the replica it needs.
async fn gateway(r: &RedisProcess) -> (FakeNext, Gateway) {
    let origin = FakeNext::start(|o| {
        o.route("/", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "",
        &format!("[redis]\nurl = \"{}\"\n[cache]\nmax_ttl = \"7d\"", r.url()),
    ))
    .await;
    (origin, gw)
}

fn hlen(r: &RedisProcess) -> usize {
    r.cli(&["HLEN", "isr:inv"]).trim().parse().expect("HLEN")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_loads_in_pages_and_what_no_page_can_need_is_pruned() {
    let r = RedisProcess::start();
    let now = now_ms();
    // 250,000 records from a month ago (cache.max_ttl is 7 days), 60,000 from a minute ago.
    records(&r, "old-", 250_000, now - 30 * DAY_MS);
    records(&r, "new-", 60_000, now - 60_000);
    r.cli(&["HSET", "isr:inv", "_epoch", &(now - 60_000).to_string()]);
    assert_eq!(hlen(&r), 310_001);

    let (_origin, gw) = gateway(&r).await;
    let cache = gw.state.cache.as_ref().expect("cache");
    eventually!(
        60,
        cache.epochs.was_ever_synced(),
        "310,001 fields loaded (a page at a time: one HGETALL of them outlives the timeout)"
    );
    // A page rendered two minutes ago under a recent tag is invalid: the load reached it.
    let before = now - 120_000;
    assert_eq!(cache.epochs.check(before, ["new-59999"]), Validity::Invalid);

    // The first prune runs a few seconds after start: the month-old records go, in Redis and
    // in the gateway's map; the recent ones and the counter stay.
    eventually!(120, hlen(&r) == 60_001, "old records pruned from Redis");
    assert!(!r.cli(&["HGET", "isr:inv", "_epoch"]).trim().is_empty());
    eventually!(
        10,
        cache.epochs.check(0, ["old-7"]) == Validity::Valid,
        "and from the map"
    );
    assert_eq!(cache.epochs.check(before, ["new-7"]), Validity::Invalid);
}

#[tokio::test]
async fn a_prune_keeps_the_counter_recent_records_and_fields_it_does_not_know() {
    let r = RedisProcess::start();
    let (_origin, gw) = gateway(&r).await;
    let Some(Store::Redis(redis)) = gw.state.cache.as_ref().map(|c| &c.store) else {
        panic!("a Redis store");
    };
    for (field, value) in [
        ("_epoch", "100"),
        ("h:gone", "10"),
        ("s:gone", "49"),
        ("s:kept", "50"),
        ("h:kept", "99"),
        ("x:unknown", "1"),
        ("h:not-a-number", "abc"),
    ] {
        r.cli(&["HSET", "isr:inv", field, value]);
    }
    let pruned = retention::prune(redis, 50).await.expect("prune");
    assert_eq!((pruned.scanned, pruned.removed), (4, 2), "{pruned:?}");
    let mut left: Vec<String> = r
        .cli(&["HKEYS", "isr:inv"])
        .lines()
        .map(str::to_owned)
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["_epoch", "h:kept", "h:not-a-number", "s:kept", "x:unknown"]
    );
}
