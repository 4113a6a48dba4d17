//! `isr:inv` stays bounded: a gateway starting on a long history loads it a page at a time,
//! and the records no cached page can need any more are pruned, in Redis and in every map. A
//! start reads the snapshot and the index after it when they hold every record, and scans the
//! hash when they may not (a damaged snapshot, records written by an older library).

use std::time::{SystemTime, UNIX_EPOCH};

use isrgate::cache::epochs::{Epochs, Validity};
use isrgate::cache::store::RedisStore;
use isrgate::invalidate::load::{self, Via};
use isrgate::invalidate::retention;
use isrgate::invalidate::snapshot::{self, Snapshot};

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
    // Redis commands get 5 s: a page of thousands of records can outlast the serving default
    // (250 ms) on a loaded machine, and a failed read makes the load scan instead, which is
    // right but not the path these tests check.
    let gw = Gateway::start(config(
        &[origin.url()],
        "",
        &format!(
            "[redis]\nurl = \"{}\"\ncommand_timeout = \"5s\"\n[cache]\nmax_ttl = \"7d\"",
            r.url()
        ),
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
    // in the gateway's map; the recent ones and the marks (`_epoch`, `_snapped`) stay.
    eventually!(120, hlen(&r) == 60_002, "old records pruned from Redis");
    assert!(!r.cli(&["HGET", "isr:inv", "_epoch"]).trim().is_empty());
    eventually!(
        10,
        cache.epochs.check(0, ["old-7"]) == Validity::Valid,
        "and from the map"
    );
    assert_eq!(cache.epochs.check(before, ["new-7"]), Validity::Invalid);
    // The prune's snapshot holds the kept records only, and a start reads it.
    let redis = redis_of(&gw);
    eventually!(
        30,
        snapshot_records(redis).await == 60_000,
        "the prune swapped in its snapshot"
    );
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!((via, epochs.len()), (Via::Snapshot, 60_000));
}

/// Records in the snapshot (0: none, or damaged).
async fn snapshot_records(redis: &RedisStore) -> usize {
    let bytes = snapshot::read(redis)
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    Snapshot::decode(&bytes).map_or(0, |s| s.records)
}

#[tokio::test]
async fn a_prune_keeps_the_counter_recent_records_and_fields_it_does_not_know() {
    let r = RedisProcess::start();
    // The gateway's own pruner must not run first (its horizon would take every record
    // here): another "gateway" holds the period's lock.
    r.cli(&["SET", "isr:inv:prune", "the-test", "PX", "600000"]);
    let (_origin, gw) = gateway(&r).await;
    let redis = redis_of(&gw);
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
    for field in ["h:gone", "s:gone", "s:kept", "h:kept"] {
        let epoch = r.cli(&["HGET", "isr:inv", field]);
        r.cli(&["ZADD", "isr:{isr:inv}:z", epoch.trim(), field]);
    }
    let pruned = retention::prune(redis, 50).await.expect("prune");
    assert_eq!((pruned.scanned, pruned.removed), (4, 2), "{pruned:?}");
    assert!(pruned.snapshot.is_some(), "{pruned:?}");
    assert_eq!(
        sorted_lines(&r.cli(&["HKEYS", "isr:inv"])),
        [
            "_epoch",
            "_snapped",
            "h:kept",
            "h:not-a-number",
            "s:kept",
            "x:unknown"
        ]
    );
    // One story in the three: the pruned records left the index too, the snapshot holds the
    // kept ones, and the index keeps only what is newer than the snapshot (nothing here).
    assert_eq!(r.cli(&["HGET", "isr:inv", "_snapped"]).trim(), "100");
    assert_eq!(r.cli(&["ZCARD", "isr:{isr:inv}:z"]).trim(), "0");
    let bytes = snapshot::read(redis)
        .await
        .expect("read")
        .expect("a snapshot");
    let snap = Snapshot::decode(&bytes).expect("decodes");
    let mut held: Vec<_> = snap
        .iter()
        .map(|(t, m, e)| format!("{}:{t}={e}", &m.as_str()[..1]))
        .collect();
    held.sort();
    assert_eq!(held, ["h:kept=99", "s:kept=50"]);

    // A snapshot older than the one there is never swapped in.
    let (_, older) = snapshot::Builder::new(99).finish().expect("small");
    assert!(!snapshot::write(redis, &older, 99).await.expect("write"));
    assert_eq!(r.cli(&["HGET", "isr:inv", "_snapped"]).trim(), "100");
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut lines: Vec<String> = s.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// The gateway's Redis store.
fn redis_of(gw: &Gateway) -> &RedisStore {
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.redis().expect("a Redis store")
}

/// Calls the invalidate function `function` as a replica would, for `tag`; the epoch.
fn fcall(r: &RedisProcess, function: &str, tag: &str) -> u64 {
    let keys: &[&str] = if function.ends_with("v1") {
        &["1", "isr:inv"]
    } else {
        &["2", "isr:inv", "isr:{isr:inv}:z"]
    };
    let mut args = vec!["FCALL", function];
    args.extend_from_slice(keys);
    args.extend_from_slice(&["next:replica:1", "hard", "isr:bus", "0", tag]);
    let out = r.cli(&args);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{function}: {out}"))
}

/// A load into a map of its own, as a starting gateway's; the snapshot it made is written.
async fn load_fresh(redis: &RedisStore) -> (Via, Epochs) {
    let epochs = Epochs::default();
    let loaded = load::load(redis, &epochs).await.expect("load");
    let via = loaded.via;
    loaded.leave_snapshot(redis).await;
    (via, epochs)
}

/// `n` records from a day ago (kept: `cache.max_ttl` is 7 days) written as a pre-index fleet
/// did, a gateway, and no pruner (another "gateway" holds the period's lock): only loads
/// write snapshots here.
async fn history(n: usize) -> (RedisProcess, FakeNext, Gateway, u64) {
    let r = RedisProcess::start();
    r.cli(&["SET", "isr:inv:prune", "the-test", "PX", "600000"]);
    let day_ago = now_ms() - DAY_MS;
    records(&r, "old-", n, day_ago);
    r.cli(&["HSET", "isr:inv", "_epoch", &day_ago.to_string()]);
    let (origin, gw) = gateway(&r).await;
    // Its start scanned (records from before the index, no snapshot) and left a snapshot.
    eventually!(
        30,
        r.cli(&["HGET", "isr:inv", "_snapped"]).trim() == day_ago.to_string(),
        "the start's scan left a snapshot"
    );
    (r, origin, gw, day_ago)
}

/// The snapshot and the index hold every record once a scan left its snapshot: a start
/// reads them (one snapshot, the index since), is ready, and honours a record of the snapshot
/// and one written after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_reads_the_snapshot_and_the_index_after_it() {
    let (r, _origin, gw, day_ago) = history(100_000).await;
    let redis = redis_of(&gw);
    let recent = fcall(&r, "isrgate_invalidate_v2", "recent");
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(via, Via::Snapshot);
    assert_eq!(epochs.len(), 100_001);
    assert_eq!(epochs.check(day_ago - 1, ["old-77"]), Validity::Invalid);
    assert_eq!(epochs.check(day_ago, ["old-77"]), Validity::Valid);
    assert_eq!(epochs.check(recent - 1, ["recent"]), Validity::Invalid);
    assert_eq!(epochs.current(), recent);

    // A whole gateway on it: ready once loaded, with both.
    let (_origin2, gw2) = gateway(&r).await;
    let cache = gw2.state.cache.as_ref().expect("cache");
    eventually!(30, cache.epochs.was_ever_synced(), "loaded");
    assert_eq!(
        cache.epochs.check(day_ago - 1, ["old-99999"]),
        Validity::Invalid
    );
    assert_eq!(
        cache.epochs.check(recent - 1, ["recent"]),
        Validity::Invalid
    );
}

/// A snapshot that does not decode (or is gone) is said and scanned around, and the scan leaves
/// a good one; so is an index that lost records, and a mark that is not a number.
#[tokio::test]
async fn a_damaged_snapshot_falls_back_to_a_scan_and_is_replaced() {
    let (r, _origin, gw, day_ago) = history(2_000).await;
    let redis = redis_of(&gw);
    let recent = fcall(&r, "isrgate_invalidate_v2", "recent");
    assert_eq!(load_fresh(redis).await.0, Via::Snapshot);

    for damage in [
        &["SETRANGE", "isr:{isr:inv}:snap", "40", "garbage"][..],
        &["SET", "isr:{isr:inv}:snap", "short"],
        &["DEL", "isr:{isr:inv}:snap"],
    ] {
        r.cli(damage);
        let (via, epochs) = load_fresh(redis).await;
        assert_eq!(via, Via::ScanDamaged, "{damage:?}");
        assert_eq!(epochs.check(day_ago - 1, ["old-1"]), Validity::Invalid);
        assert_eq!(epochs.check(recent - 1, ["recent"]), Validity::Invalid);
        assert_eq!(
            load_fresh(redis).await.0,
            Via::Snapshot,
            "replaced after {damage:?}"
        );
    }

    // The index evicted (allkeys-lru) or deleted: a load finds its newest write missing; a
    // write finds the index gone and says so for the loads after it.
    let lost = fcall(&r, "isrgate_invalidate_v2", "lost");
    r.cli(&["DEL", "isr:{isr:inv}:z"]);
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(via, Via::ScanIndexLost);
    assert_eq!(epochs.check(lost - 1, ["lost"]), Validity::Invalid);
    let lost = fcall(&r, "isrgate_invalidate_v2", "lost-again");
    r.cli(&["DEL", "isr:{isr:inv}:z"]);
    let after = fcall(&r, "isrgate_invalidate_v2", "after-it");
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(via, Via::ScanUnindexed);
    assert_eq!(epochs.check(lost - 1, ["lost-again"]), Validity::Invalid);
    assert_eq!(epochs.check(after - 1, ["after-it"]), Validity::Invalid);

    r.cli(&["HSET", "isr:inv", "_unindexed", "soon"]);
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(via, Via::ScanDamaged);
    assert_eq!(epochs.check(recent - 1, ["recent"]), Validity::Invalid);
}

/// An older gateway loads its library again (a rolling upgrade): its writes miss the index.
/// A start after them scans, whether such a write is the newest or a newer one went into the
/// index since, and honours it; once a snapshot holds it, starts are fast again.
#[tokio::test]
async fn records_an_older_library_wrote_after_the_snapshot_are_honoured() {
    let (r, _origin, gw, _) = history(2_000).await;
    let redis = redis_of(&gw);
    assert_eq!(load_fresh(redis).await.0, Via::Snapshot);

    let old_library = include_str!("fixtures/invalidate_v1.lua");
    r.cli(&["FUNCTION", "LOAD", "REPLACE", old_library]);
    let unindexed = fcall(&r, "isrgate_invalidate_v1", "by-an-old-writer");
    assert_eq!(
        r.cli(&["ZSCORE", "isr:{isr:inv}:z", "h:by-an-old-writer"])
            .trim(),
        ""
    );
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(via, Via::ScanUnindexed, "the newest write missed the index");
    assert_eq!(
        epochs.check(unindexed - 1, ["by-an-old-writer"]),
        Validity::Invalid
    );

    // Another one, then an indexed write after it (the load above reloaded today's library,
    // and left a snapshot: the old library again).
    r.cli(&["FUNCTION", "LOAD", "REPLACE", old_library]);
    let unindexed = fcall(&r, "isrgate_invalidate_v1", "by-an-old-writer-again");
    r.cli(&[
        "FUNCTION",
        "LOAD",
        "REPLACE",
        isrgate::invalidate::apply::LIBRARY,
    ]);
    let indexed = fcall(&r, "isrgate_invalidate_v2", "indexed");
    assert_eq!(
        r.cli(&["HGET", "isr:inv", "_unindexed"]).trim(),
        unindexed.to_string()
    );
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(via, Via::ScanUnindexed, "an older write missed the index");
    assert_eq!(
        epochs.check(unindexed - 1, ["by-an-old-writer-again"]),
        Validity::Invalid
    );
    assert_eq!(epochs.check(indexed - 1, ["indexed"]), Validity::Invalid);

    // Today's library under the old name (an older @isrgate/next) writes the index.
    let by_v1 = fcall(&r, "isrgate_invalidate_v1", "by-an-old-package");
    let (via, epochs) = load_fresh(redis).await;
    assert_eq!(
        via,
        Via::Snapshot,
        "the scan's snapshot holds the unindexed ones"
    );
    assert_eq!(
        epochs.check(by_v1 - 1, ["by-an-old-package"]),
        Validity::Invalid
    );
    assert_eq!(
        epochs.check(unindexed - 1, ["by-an-old-writer-again"]),
        Validity::Invalid
    );
}

/// The index is read a page at a time from the snapshot's epoch on, even past one epoch with
/// more records than a page (one invalidation of many tags).
#[tokio::test]
async fn the_index_is_read_in_pages_whatever_the_epochs() {
    let (r, _origin, gw, day_ago) = history(10).await;
    let script = "for i = 1, tonumber(ARGV[2]) do \
                  redis.call('HSET', KEYS[1], 'h:' .. ARGV[1] .. i, ARGV[3]) \
                  redis.call('ZADD', KEYS[2], ARGV[3], 'h:' .. ARGV[1] .. i) end \
                  redis.call('HSET', KEYS[1], '_epoch', ARGV[3], '_indexed', ARGV[3]) return 1";
    let (one, two) = (day_ago + 1_000, day_ago + 2_000);
    for (prefix, n, epoch) in [("one-", "12000", one), ("two-", "13000", two)] {
        let epoch = epoch.to_string();
        let args = [
            "EVAL",
            script,
            "2",
            "isr:inv",
            "isr:{isr:inv}:z",
            prefix,
            n,
            &epoch,
        ];
        assert_eq!(r.cli(&args).trim(), "1");
    }
    let epochs = Epochs::default();
    let loaded = load::load(redis_of(&gw), &epochs).await.expect("load");
    assert_eq!(loaded.via, Via::Snapshot);
    assert_eq!(loaded.records, 10 + 12_000 + 13_000, "each once");
    assert_eq!(epochs.len(), 10 + 12_000 + 13_000);
    assert_eq!(epochs.check(one - 1, ["one-11999"]), Validity::Invalid);
    assert_eq!(epochs.check(two - 1, ["two-1"]), Validity::Invalid);
    assert_eq!(epochs.check(two, ["two-1"]), Validity::Valid);
}
