//! One upstream render per key across the fleet: several gateways in-process sharing a real
//! `redis-server`, a fake origin with a render delay. Render counts are the origin's request
//! counts for the path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{Expiration, SetOptions};
use isrgate::cache::key::{CacheKey, Variant};
use isrgate::cache::keys::lock_key;
use isrgate::proxy::refresh::Refreshed;

use crate::eventually;
use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, bus_live, config};

/// Every request sends this Host, so every gateway computes the same key.
const HOST: &str = "shop.example";
const ISR: &str = "s-maxage=60, stale-while-revalidate=300";

fn page(body: &str, cc: &str, render: Duration) -> Route {
    Route::html(body).header("cache-control", cc).delay(render)
}

/// `n` gateways on one Redis, each with its bus subscribed (so the test starts from a settled
/// fleet). Redis commands get 5 s: on a loaded test machine the serving default (250 ms) can
/// pass, and a gateway that finds Redis slow renders for itself, which is right but not what
/// these tests count.
async fn fleet(n: usize, origin: &FakeNext, r: &RedisProcess, extra: &str) -> Vec<Gateway> {
    let mut gws = Vec::new();
    for _ in 0..n {
        let toml = format!(
            "[redis]\nurl = \"{}\"\ncommand_timeout = \"5s\"\n{extra}",
            r.url()
        );
        gws.push(Gateway::start(config(&[origin.url()], "", &toml)).await);
    }
    for gw in &gws {
        eventually!(10, bus_live(gw), "bus subscribed");
    }
    gws
}

/// `per_gateway` concurrent GETs of `path` on each gateway.
async fn burst(gws: &[Gateway], path: &str, per_gateway: usize) -> Vec<Got> {
    let c = Client::default();
    let mut tasks = Vec::new();
    for gw in gws {
        for _ in 0..per_gateway {
            let (c, url) = (c.clone(), gw.url(path));
            tasks.push(tokio::spawn(
                async move { c.get(&url, &[("host", HOST)]).await },
            ));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

fn sum(gws: &[Gateway], f: impl Fn(&isrgate::metrics::Metrics) -> u64) -> u64 {
    gws.iter().map(|g| f(&g.state.metrics)).sum()
}

async fn raw(r: &RedisProcess) -> fred::prelude::Client {
    r.client().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_and_300_concurrent_misses_make_one_render() {
    let r = RedisProcess::start();
    let render = Duration::from_millis(200);
    let origin = FakeNext::start(|o| {
        o.route("/hot", page("<p>hot page</p>", ISR, render));
    })
    .await;
    let gws = fleet(3, &origin, &r, "").await;
    let results = burst(&gws, "/hot", 100).await;

    assert_eq!(origin.count("/hot"), 1, "one render for the whole fleet");
    for got in &results {
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"<p>hot page</p>");
    }
    let led = results
        .iter()
        .filter(|g| g.header("cache-status") == "isrgate; fwd=miss; stored")
        .count();
    assert_eq!(led, 1, "exactly one response rendered");
    let followed = sum(&gws, |m| m.coalesced_local.get() + m.coalesced_remote.get());
    assert!(followed >= 2, "the other gateways waited: {followed}");
    let hits = results
        .iter()
        .filter(|g| g.header("x-cache") == "HIT")
        .count();
    assert_eq!(
        led + hits + sum(&gws, |m| m.coalesced_local.get() + m.coalesced_remote.get()) as usize,
        300,
        "every response is the render, a follower of it, or a later hit"
    );
    // How fast followers are answered is measured (`benches/load.sh stampede`), not asserted:
    // the bus wake-up itself is checked by counters in the next test.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_on_other_gateways_are_woken_by_the_bus_not_the_poll() {
    let r = RedisProcess::start();
    let render = Duration::from_millis(200);
    let origin = FakeNext::start(|o| {
        o.route("/p", page("<p>p</p>", ISR, render));
    })
    .await;
    // A poll interval of 10 minutes: a follower that relied on it would not be answered
    // within the test client's 30 s, however loaded the machine.
    let gws = fleet(2, &origin, &r, "[coalesce]\npoll_interval = \"10m\"\n").await;
    let c = Client::default();
    let leader = {
        let (c, url) = (c.clone(), gws[0].url("/p"));
        tokio::spawn(async move { c.get(&url, &[("host", HOST)]).await })
    };
    eventually!(10, origin.count("/p") == 1, "the render started");
    let follower = c.get(&gws[1].url("/p"), &[("host", HOST)]).await;
    assert_eq!(leader.await.expect("leader").status, 200);
    assert_eq!(follower.status, 200);
    assert_eq!(
        follower.header("cache-status"),
        "isrgate; fwd=miss; collapsed"
    );
    assert_eq!(origin.count("/p"), 1);
    assert_eq!(gws[1].state.metrics.coalesced_remote.get(), 1);
    assert_eq!(gws[1].state.metrics.follower_wait_ms.count(), 1);
}

/// A gateway that took the lock and died (its lock stays until its TTL): the others wait, then
/// one of them takes over and renders once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_lock_expires_and_one_gateway_takes_over() {
    let r = RedisProcess::start();
    let render = Duration::from_millis(100);
    let origin = FakeNext::start(|o| {
        o.route("/orphan", page("<p>orphan</p>", ISR, render));
    })
    .await;
    // Followers wait up to a minute: one that did not take over once the lock expired would
    // not be answered within the test client's 30 s.
    let gws = fleet(3, &origin, &r, "[coalesce]\nwait_timeout = \"60s\"\n").await;
    let hex = CacheKey::new("default", HOST, "/orphan", None, &Variant::Html).hex();
    let dead_ttl = Duration::from_millis(1_500);
    // Before the lock is taken: however late the SET answers, the lock expires no sooner
    // than `dead_ttl` after this.
    let started = Instant::now();
    let set: Option<String> = raw(&r)
        .await
        .set(
            lock_key(&hex),
            "a-gateway-that-died",
            Some(Expiration::PX(dead_ttl.as_millis() as i64)),
            Some(SetOptions::NX),
            false,
        )
        .await
        .expect("set lock");
    assert!(set.is_some());
    let results = burst(&gws, "/orphan", 10).await;
    let elapsed = started.elapsed();
    assert!(
        results
            .iter()
            .all(|g| g.status == 200 && &g.body[..] == b"<p>orphan</p>")
    );
    assert_eq!(origin.count("/orphan"), 1, "one take-over render");
    assert!(
        elapsed >= dead_ttl - Duration::from_millis(200),
        "nobody rendered before the dead leader's lock expired: {elapsed:?}"
    );
}

/// The leader's upstream connection is cut mid-body: its client gets a broken response, the
/// followers on the other gateways complete with at most one extra render.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_mid_render_is_taken_over_with_one_extra_render() {
    let r = RedisProcess::start();
    let gate = Arc::new(tokio::sync::Notify::new());
    let route = Route::gated_stream(4, 1_000, 2, Arc::clone(&gate))
        .content_type("text/html; charset=utf-8")
        .header("cache-control", ISR);
    let origin = FakeNext::start(|o| {
        o.route("/cut", route);
    })
    .await;
    // Followers wait up to ten minutes and a lock lives as long: one that was not woken when
    // the cut leader let go (held to its wait, or to the lock's expiry) would not be answered
    // within the test client's 30 s.
    let gws = fleet(
        3,
        &origin,
        &r,
        "[coalesce]\nwait_timeout = \"10m\"\nlock_ttl = \"10m\"\n",
    )
    .await;
    let c = Client::default();
    let leader = {
        let (c, url) = (c.clone(), gws[0].url("/cut"));
        tokio::spawn(async move {
            c.try_send("GET", &url, &[("host", HOST)], Default::default())
                .await
        })
    };
    eventually!(10, origin.count("/cut") == 1, "the first render started");
    let followers: Vec<_> = gws[1..]
        .iter()
        .map(|gw| {
            let (c, url) = (c.clone(), gw.url("/cut"));
            tokio::spawn(async move { c.get(&url, &[("host", HOST)]).await })
        })
        .collect();
    eventually!(
        10,
        gws[1..]
            .iter()
            .all(|g| g.state.metrics.lock_contended.get() == 1),
        "the other gateways wait on the fleet lock"
    );
    // Cut every origin connection mid-body (the origin goes on listening: a take-over render
    // is never refused); the second render is not held.
    origin.cut();
    gate.notify_one();
    let cut = leader.await.expect("leader task");
    assert!(
        cut.as_ref().map_or(true, |g| g.body.len() < 4_000),
        "the leader's client saw the cut"
    );
    for f in followers {
        let got = f.await.expect("follower");
        assert_eq!(got.status, 200);
        assert_eq!(
            got.body.len(),
            4_000,
            "whole body from the take-over render"
        );
    }
    assert_eq!(
        origin.count("/cut"),
        2,
        "one extra render, not one per follower"
    );
    assert!(sum(&gws, |m| m.leaders_abandoned.get()) >= 1);
}

/// A key with s-maxage=1 under constant load from three gateways: about one refresh per second
/// for the fleet, and no client waits for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_under_load_refreshes_once_per_ttl_for_the_fleet() {
    let r = RedisProcess::start();
    let render = Duration::from_millis(300);
    let origin = FakeNext::start(|o| {
        o.route(
            "/ttl1",
            page(
                "<p>ttl</p>",
                "s-maxage=1, stale-while-revalidate=60",
                render,
            ),
        );
    })
    .await;
    let gws = fleet(3, &origin, &r, "").await;
    let c = Client::default();
    // Warm it once, so what follows is steady state: the entry in Redis and its fill lock
    // released (the warm-up's store write runs in the background; a gateway that looked
    // before it landed would wait on that fill, a collapsed MISS).
    assert_eq!(
        c.get(&gws[0].url("/ttl1"), &[("host", HOST)]).await.status,
        200
    );
    let hex = CacheKey::new("default", HOST, "/ttl1", None, &Variant::Html).hex();
    let raw = raw(&r).await;
    eventually!(
        10,
        raw.exists::<u32, _>(&isrgate::cache::keys::entry_key(&hex))
            .await
            .unwrap_or(0)
            == 1
            && raw.exists::<u32, _>(&lock_key(&hex)).await.unwrap_or(1) == 0,
        "warm entry stored"
    );
    let renders_before = origin.count("/ttl1");
    let waits = || {
        sum(&gws, |m| {
            m.follower_wait_ms.count() + m.follower_timeouts.get()
        })
    };
    let waits_before = waits();
    let run = Duration::from_secs(5);
    let started = Instant::now();
    let mut loops = Vec::new();
    for gw in &gws {
        for _ in 0..3 {
            let (c, url) = (c.clone(), gw.url("/ttl1"));
            loops.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while started.elapsed() < run {
                    let got = c.get(&url, &[("host", HOST)]).await;
                    outcomes.push(got.header("x-cache").to_owned());
                    // The pace of the load, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                outcomes
            }));
        }
    }
    let mut outcomes = Vec::new();
    for l in loops {
        outcomes.extend(l.await.expect("loop"));
    }
    let refreshes = origin.count("/ttl1") - renders_before;
    // The TTL windows the load really lasted (a loaded machine finishes its last requests
    // late, and a late request may find the entry stale once more).
    let windows = started.elapsed().as_secs_f64().ceil() as usize;
    assert!(
        refreshes <= windows + 1,
        "{refreshes} renders in {windows} one-second windows"
    );
    assert!(refreshes >= 2, "it did refresh: {refreshes}");
    // No request waited for a render, except where Redis itself did not answer in time (a
    // store read timing out is a miss by design; it happens only on a starved CI box).
    let missed = outcomes
        .iter()
        .filter(|o| *o != "HIT" && *o != "STALE")
        .count() as u64;
    let store_errors = sum(&gws, |m| m.store_errors.get());
    assert!(
        missed <= store_errors,
        "{missed} requests missed with {store_errors} store errors: {:?}",
        outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| *o != "HIT" && *o != "STALE")
            .collect::<Vec<_>>()
    );
    // A request that waited for a render, whatever it was answered, waited as a follower.
    let waited = waits() - waits_before;
    assert!(
        waited <= missed,
        "no client waited for a refresh: {waited} waits, {missed} misses"
    );
    assert!(
        sum(&gws, |m| m.refreshes_of(Refreshed::Elsewhere)) + sum(&gws, |m| m.refreshes_run())
            >= refreshes as u64
    );
}

/// The leader's answer is private: 50 waiting requests are released at once instead of
/// queueing for the wait timeout, and the next burst skips coalescing (hit-for-miss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncacheable_answer_releases_followers_at_once() {
    let r = RedisProcess::start();
    let render = Duration::from_millis(300);
    let origin = FakeNext::start(|o| {
        o.route("/me", page("<p>mine</p>", "private, no-store", render));
    })
    .await;
    // A follower held to its wait (ten minutes) would not be answered within the test
    // client's 30 s, and would count as a follower timeout.
    let gws = fleet(2, &origin, &r, "[coalesce]\nwait_timeout = \"10m\"\n").await;
    let results = burst(&gws, "/me", 25).await;
    assert!(results.iter().all(|g| g.status == 200));
    assert_eq!(
        sum(&gws, |m| m.follower_timeouts.get()),
        0,
        "released, not held to the wait"
    );
    assert_eq!(
        origin.count("/me"),
        50,
        "each fetched its own private answer"
    );
    // Within hit-for-miss, nobody waits on anybody.
    let again = burst(&gws, "/me", 25).await;
    assert!(again.iter().all(|g| g.status == 200));
    assert_eq!(sum(&gws, |m| m.follower_timeouts.get()), 0);
    assert_eq!(sum(&gws, |m| m.hit_for_miss.get()), 50);
}

/// Redis down: no fleet lock, but each gateway still renders a key once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_gateway_still_coalesces_locally() {
    let mut r = RedisProcess::start();
    let render = Duration::from_millis(200);
    let origin = FakeNext::start(|o| {
        o.route("/down", page("<p>down</p>", ISR, render));
    })
    .await;
    let gws = fleet(3, &origin, &r, "").await;
    r.kill();
    let results = burst(&gws, "/down", 20).await;
    assert!(
        results
            .iter()
            .all(|g| g.status == 200 && &g.body[..] == b"<p>down</p>")
    );
    assert_eq!(origin.count("/down"), 3, "one render per gateway");
    assert!(
        sum(&gws, |m| m.coalesced_local.get()) >= 30,
        "followers waited locally"
    );
}

/// The leader's client stops reading: the render is still stored at the replica's pace and the
/// followers are served at once, not after the leader's client times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_leader_client_does_not_hold_the_followers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = RedisProcess::start();
    // 16 MiB: far past what the leader's client can hold unread (its 4 KB receive buffer, the
    // gateway's send buffer of at most 4 MiB), under max_entry_bytes (64 MiB here).
    const CHUNKS: usize = 256;
    let route = Route::stream(CHUNKS, 64 * 1024)
        .content_type("text/html; charset=utf-8")
        .header("cache-control", ISR);
    let origin = FakeNext::start(|o| {
        o.route("/big", route);
    })
    .await;
    // The slow client is cut only after 10 minutes: a follower held by it would not be
    // answered within the test client's 30 s, whatever the machine's load. The follower waits
    // as long (not the 10 s default, which a loaded machine's copy and gzip of the body can
    // outlast, and then it renders for itself).
    let gws = fleet(
        1,
        &origin,
        &r,
        "[cache]\nmax_entry_bytes = 67108864\n[listen]\nsend_timeout = \"10m\"\n\
         [coalesce]\nwait_timeout = \"10m\"\n",
    )
    .await;
    let leader = tokio::net::TcpSocket::new_v4().expect("socket");
    leader.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut leader = leader.connect(gws[0].addr).await.expect("connect");
    leader
        .write_all(format!("GET /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut first = [0u8; 1024];
    let _ = leader.read(&mut first).await.expect("the head arrives");
    // The leader's client now reads nothing more.
    let follower = Client::default()
        .try_send(
            "GET",
            &gws[0].url("/big"),
            &[("host", HOST)],
            bytes::Bytes::new(),
        )
        .await
        .expect("the follower is served while the leader's client still reads nothing");
    assert_eq!(follower.status, 200);
    assert_eq!(follower.body.len(), CHUNKS * 64 * 1024);
    let m = &gws[0].state.metrics;
    assert_eq!(
        origin.count("/big"),
        1,
        "follower timeouts {}, abandoned {}",
        m.follower_timeouts.get(),
        m.leaders_abandoned.get()
    );
    assert_eq!(
        gws[0].state.metrics.coalesced_local.get(),
        1,
        "it followed the render"
    );
    drop(leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_miss_reads_and_locks_in_one_round_trip_before_the_render() {
    let r = RedisProcess::start();
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route(
            "/cold",
            Route::html("<p>cold</p>")
                .header("cache-control", ISR)
                .gated(&gate),
        );
    })
    .await;
    // A lock TTL far beyond the test, so no extension runs while it counts.
    let gws = fleet(1, &origin, &r, "[coalesce]\nlock_ttl = \"120s\"\n").await;
    // INFO commandstats counts the commands a script runs too: one EVAL running one HMGET and
    // one SET, and no HGET (the lock script of a separate round trip) is one round trip.
    let counted = ["eval", "hmget", "hget", "set"];
    let calls = || counted.map(|c| r.calls(c));
    let before = calls();
    let url = gws[0].url("/cold");
    let request = tokio::spawn(async move { Client::default().get(&url, &[("host", HOST)]).await });
    eventually!(10, origin.count("/cold") == 1, "the render started");
    let during = calls();
    let sent: Vec<u64> = during.iter().zip(before).map(|(d, b)| d - b).collect();
    assert_eq!(
        sent,
        [1, 1, 0, 1],
        "before the render: one script that read the entry and took the fill lock, nothing else"
    );
    assert!(
        r.cli(&["KEYS", "isr:*:l"]).contains(":l"),
        "the fill lock is held while the replica renders"
    );
    gate.open();
    let got = request.await.expect("request");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("cache-status"), "isrgate; fwd=miss; stored");
    eventually!(
        10,
        r.cli(&["KEYS", "isr:*:l"]).trim().is_empty(),
        "lock released"
    );
}

/// Requests waiting for a render made for another `Vary` value share one render of their own
/// value (its slot's flight), not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_with_another_vary_value_share_one_render_of_theirs() {
    let r = RedisProcess::start();
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route(
            "/lang",
            Route::says_header("accept-language")
                .header("cache-control", ISR)
                .header("vary", "Accept-Language")
                .gated(&gate),
        );
    })
    .await;
    let gws = fleet(1, &origin, &r, "").await;
    let get = |l: &'static str| {
        let url = gws[0].url("/lang");
        tokio::spawn(async move {
            Client::default()
                .get(&url, &[("host", HOST), ("accept-language", l)])
                .await
        })
    };
    let leader = get("en");
    eventually!(10, origin.count("/lang") == 1, "the en render started");
    let waiters: Vec<_> = (0..5).map(|_| get("fr")).collect();
    let primary = CacheKey::new("default", HOST, "/lang", None, &Variant::Html).hash;
    let flights = &gws[0].state.cache.as_ref().expect("cache").flights;
    eventually!(
        10,
        flights.followers(primary) == 5,
        "the fr requests wait for the en render"
    );
    gate.open();
    assert_eq!(leader.await.expect("leader").body, "<p>en</p>");
    for w in waiters {
        assert_eq!(w.await.expect("waiter").body, "<p>fr</p>");
    }
    assert_eq!(origin.count("/lang"), 2, "one render per value");
}
