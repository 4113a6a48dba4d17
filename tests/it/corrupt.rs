//! A stored entry whose metadata decodes but whose body does not inflate (a damaged Redis
//! value, a bit flipped at rest): it is counted as corrupt and the request is a miss, never an
//! error the gateway makes up. Real `redis-server`, fake Next.js origin, two gateways on one
//! Redis (the second has an empty L1, so it reads the damaged bytes).

use std::time::Duration;

use isrgate::cache::key::{CacheKey, Variant};
use isrgate::cache::keys::entry_key;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, bus_live, config};

/// A page large enough to be stored gzipped.
fn html(word: &str) -> String {
    format!("<html>{}</html>", format!("<p>{word}</p>").repeat(200))
}

async fn gateway(origin: &FakeNext, r: &RedisProcess) -> Gateway {
    let extra = format!("[redis]\nurl = \"{}\"\n", r.url());
    let gw = Gateway::start(config(&[origin.url()], "", &extra)).await;
    eventually!(5, bus_live(&gw), "bus subscribed");
    gw
}

/// A gzip body that does not inflate: a valid header, then nonsense.
const DAMAGED: &[u8] = b"\x1f\x8b\x08\x00damaged";

/// Stores `/p` through `gw`, then replaces its gzip body in Redis with [`DAMAGED`] (the
/// metadata stays valid). Returns the Redis key.
async fn stored_then_damaged(r: &RedisProcess, gw: &Gateway, host: &str) -> String {
    use fred::interfaces::{HashesInterface as _, KeysInterface as _};
    let got = Client::default()
        .get(&gw.url("/p"), &[("host", host)])
        .await;
    assert_eq!(got.status.as_u16(), 200);
    let key = entry_key(&CacheKey::new("default", host, "/p", None, &Variant::Html).hex());
    let raw = r.client().await;
    eventually!(
        5,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "/p stored"
    );
    let () = raw.hset(&key, ("b", DAMAGED)).await.expect("hset");
    key
}

fn corrupt_count(gw: &Gateway) -> u64 {
    gw.state.metrics.store_corrupt.get()
}

#[tokio::test]
async fn a_body_that_does_not_inflate_is_a_miss_the_replica_answers() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html(&html("v1")).header("cache-control", "s-maxage=60"),
        );
    })
    .await;
    let (gw1, gw2) = (gateway(&origin, &r).await, gateway(&origin, &r).await);
    let key = stored_then_damaged(&r, &gw1, "site.test").await;
    let got = Client::default()
        .get(&gw2.url("/p"), &[("host", "site.test")])
        .await;
    assert_eq!(got.status.as_u16(), 200);
    assert_eq!(&got.body[..], html("v1").as_bytes());
    assert_eq!(corrupt_count(&gw2), 1);
    assert_eq!(origin.count("/p"), 2, "rendered again");
    // The render replaced the damaged bytes (not taken for another gateway's fill).
    use fred::interfaces::HashesInterface as _;
    let raw = r.client().await;
    eventually!(
        5,
        raw.hget::<bytes::Bytes, _, _>(&key, "b")
            .await
            .is_ok_and(|b| b != DAMAGED),
        "the damaged body replaced"
    );
}

/// Past its freshness, a damaged entry kept for stale-if-error cannot cover for a failing
/// replica: the client gets the replica's own 5xx (then, with the replica gone, the gateway's
/// 502 for it), not an error of the gateway's making, and the damage is counted.
#[tokio::test]
async fn a_damaged_stale_if_error_entry_leaves_the_replicas_answer() {
    let r = RedisProcess::start();
    let mut origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html(&html("v1")).header("cache-control", "s-maxage=60, stale-if-error=600"),
        );
    })
    .await;
    let (gw1, gw2) = (gateway(&origin, &r).await, gateway(&origin, &r).await);
    stored_then_damaged(&r, &gw1, "site.test").await;
    let cache = gw2.state.cache.as_ref().expect("cache on");
    cache.clock.advance(Duration::from_secs(61));
    origin.route("/p", Route::status(500).header("cache-control", "no-store"));
    let c = Client::default();
    let got = c.get(&gw2.url("/p"), &[("host", "site.test")]).await;
    assert_eq!(got.status.as_u16(), 500, "the replica's answer: {got:?}");
    assert_eq!(corrupt_count(&gw2), 1);
    assert_eq!(
        gw2.state.metrics.stale_origin_error.get(),
        0,
        "nothing stale served"
    );
    origin.stop().await;
    let got = c.get(&gw2.url("/p"), &[("host", "site.test")]).await;
    assert_eq!(got.status.as_u16(), 502, "the replica is gone: {got:?}");
    assert_eq!(corrupt_count(&gw2), 2);
}
