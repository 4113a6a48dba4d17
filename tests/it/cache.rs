//! The shared cache end to end: real `redis-server`, fake Next.js origin, gateways in-process.
//! Render counts are the origin's request counts per path.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::*;
use isrgate::cache::key::{CacheKey, Variant};
use isrgate::cache::keys::entry_key;
use isrgate::cache::keys::lock_key;
use isrgate::cache::policy::Skip;
use isrgate::cache::store::{BREAKER_COOLDOWN, BREAKER_FAILURES};
use isrgate::proxy::classify::Bypass;

use crate::eventually;
use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, bus_live, config, settled};

const ISR: &str = "s-maxage=60, stale-while-revalidate=300";
const HTML: &str = "text/html; charset=utf-8";
const RSC: &str = "text/x-component";

fn page(body: &str, cc: &str) -> Route {
    Route::html(body).header("cache-control", cc)
}

fn with_redis(r: &RedisProcess, extra: &str) -> String {
    format!("[redis]\nurl = \"{}\"\n{extra}", r.url())
}

/// A gateway on `r`, returned once its bus is subscribed: its first connection flushes the
/// L1 (messages may have been missed), which must not race the test's first requests.
async fn gateway(origin: &FakeNext, r: &RedisProcess, extra: &str) -> Gateway {
    let gw = Gateway::start(config(&[origin.url()], "", &with_redis(r, extra))).await;
    eventually!(10, bus_live(&gw), "bus subscribed");
    gw
}

/// Waits until the fill of `path`'s HTML entry is over: Redis holds the entry (fills write it
/// in the background) and its fill lock is released (a refresh that found it held would leave
/// the key to its holder).
async fn stored(r: &RedisProcess, gw: &Gateway, path: &str) {
    let raw = raw(r).await;
    let hex = CacheKey::new("default", &gw.addr.to_string(), path, None, &Variant::Html).hex();
    let (entry, lock) = (entry_key(&hex), lock_key(&hex));
    eventually!(
        10,
        raw.exists::<u32, _>(&entry).await.unwrap_or(0) == 1
            && raw.exists::<u32, _>(&lock).await.unwrap_or(1) == 0,
        "{path} stored and its fill lock released"
    );
}

async fn raw(r: &RedisProcess) -> fred::prelude::Client {
    r.client().await
}

/// The Redis key of `path` requested through `gw` (Host = the gateway's address).
fn redis_key(gw: &Gateway, path: &str, variant: &Variant) -> String {
    entry_key(&CacheKey::new("default", &gw.addr.to_string(), path, None, variant).hex())
}

#[tokio::test]
async fn a_page_rendered_once_is_served_by_every_gateway_and_survives_restarts() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("<p>v1</p>", ISR));
    })
    .await;
    let extra = "[upstream]\n"; // same config for all
    let gw1 = gateway(&origin, &r, extra).await;
    let c = Client::default();
    let first = c.get(&gw1.url("/p"), &[]).await;
    assert_eq!(
        (first.status.as_u16(), first.header("x-cache")),
        (200, "MISS")
    );
    let raw = raw(&r).await;
    let key = redis_key(&gw1, "/p", &Variant::Html);
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "stored in Redis"
    );
    // Gateway 2 shares Redis: a HIT, no render. It must send the same Host to share the key.
    let gw2 = gateway(&origin, &r, extra).await;
    let host = gw1.addr.to_string();
    let second = c.get(&gw2.url("/p"), &[("host", &host)]).await;
    assert_eq!(second.header("x-cache"), "HIT");
    assert_eq!(second.body, "<p>v1</p>");
    assert_eq!(origin.count("/p"), 1, "one render for the fleet");
    drop((gw1, gw2));
    let gw3 = gateway(&origin, &r, extra).await;
    let third = c.get(&gw3.url("/p"), &[("host", &host)]).await;
    assert_eq!(
        third.header("x-cache"),
        "HIT",
        "restarted gateways read the shared cache"
    );
    assert_eq!(origin.count("/p"), 1);
    assert_eq!(third.header("cache-status"), "isrgate; hit");
}

#[tokio::test]
async fn html_and_rsc_never_answer_each_other_and_rsc_noise_shares_one_entry() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("<html>page</html>")
                .header("cache-control", ISR)
                .header("vary", "RSC, Next-Router-State-Tree, Next-Router-Prefetch"),
        );
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("content-type"), HTML);
    // The origin answers RSC requests with Flight: swap the route's body and type.
    origin.route(
        "/p",
        Route::html("0:[\"flight\"]")
            .content_type(RSC)
            .header("cache-control", ISR),
    );
    let rsc = c
        .get(
            &gw.url("/p?_rsc=abc"),
            &[("rsc", "1"), ("next-router-state-tree", "%5B1%5D")],
        )
        .await;
    assert_eq!(
        rsc.header("content-type"),
        RSC,
        "RSC request never gets the HTML entry"
    );
    assert_eq!(rsc.header("x-cache"), "MISS");
    let again = c
        .get(
            &gw.url("/p?_rsc=zzz"),
            &[("rsc", "1"), ("next-router-state-tree", "%5B2%5D")],
        )
        .await;
    assert_eq!(
        again.header("x-cache"),
        "HIT",
        "_rsc and the router state tree do not split entries"
    );
    assert_eq!(again.body, "0:[\"flight\"]");
    let html = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(
        (html.header("x-cache"), html.header("content-type")),
        ("HIT", HTML)
    );
    // Prefetch and segment variants are distinct entries.
    let pre = c
        .get(
            &gw.url("/p"),
            &[("rsc", "1"), ("next-router-prefetch", "1")],
        )
        .await;
    assert_eq!(pre.header("x-cache"), "MISS");
    let seg = c
        .get(
            &gw.url("/p"),
            &[("rsc", "1"), ("next-router-segment-prefetch", "/_tree")],
        )
        .await;
    assert_eq!(seg.header("x-cache"), "MISS");
    assert_eq!(origin.count("/p"), 4);
}

#[tokio::test]
async fn a_response_with_the_wrong_content_type_for_its_variant_is_not_stored() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        // CVE-2025-49005 / CVE-2026-44576 shape: HTML answered to an RSC request.
        o.route("/p", page("<html>not flight</html>", ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    for _ in 0..2 {
        let got = c.get(&gw.url("/p"), &[("rsc", "1")]).await;
        assert_eq!(got.header("x-cache"), "MISS");
    }
    assert_eq!(origin.count("/p"), 2);
}

#[tokio::test]
async fn vary_next_url_keys_on_it() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/photo",
            Route::html("modal")
                .content_type(RSC)
                .header("cache-control", ISR)
                .header("vary", "RSC, Next-Url"),
        );
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    let feed = [("rsc", "1"), ("next-url", "/feed")];
    let direct = [("rsc", "1"), ("next-url", "/photo")];
    assert_eq!(
        c.get(&gw.url("/photo"), &feed).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(
        c.get(&gw.url("/photo"), &feed).await.header("x-cache"),
        "HIT"
    );
    assert_eq!(
        c.get(&gw.url("/photo"), &direct).await.header("x-cache"),
        "MISS",
        "another Next-Url is another answer"
    );
    assert_eq!(origin.count("/photo"), 2);
}

#[tokio::test]
async fn every_never_store_rule_goes_to_the_origin_again_and_leaves_redis_empty() {
    let r = RedisProcess::start();
    let cases: Vec<(&str, Route)> = vec![
        ("/set-cookie", page("x", ISR).header("set-cookie", "a=1")),
        ("/private", page("x", "private, max-age=60")),
        ("/no-store", page("x", "no-store")),
        ("/no-cache", page("x", "no-cache, s-maxage=60")),
        ("/no-cc", Route::html("x")),
        ("/zero", page("x", "s-maxage=0")),
        ("/s204", Route::status(204).header("cache-control", ISR)),
        ("/s500", page("x", ISR).with_status(500)),
        (
            "/postponed",
            page("x", ISR).header("x-nextjs-postponed", "1"),
        ),
        (
            "/rewrite",
            page("x", ISR).header("x-middleware-rewrite", "/other"),
        ),
        (
            "/redirect-no-location",
            Route::status(307).header("cache-control", ISR),
        ),
        (
            "/not-found",
            page(
                "x",
                "private, no-cache, no-store, max-age=0, must-revalidate",
            )
            .with_status(404),
        ),
    ];
    let paths: Vec<&str> = cases.iter().map(|(p, _)| *p).collect();
    let origin = FakeNext::start(|o| {
        for (p, route) in cases {
            o.route(p, route);
        }
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    for p in &paths {
        for _ in 0..2 {
            let got = c.get(&gw.url(p), &[]).await;
            assert_ne!(got.header("x-cache"), "HIT", "{p}");
        }
        assert_eq!(origin.count(p), 2, "{p}: rendered again");
    }
    settled(&gw).await;
    let raw = raw(&r).await;
    for p in &paths {
        let key = redis_key(&gw, p, &Variant::Html);
        assert_eq!(
            raw.exists::<u32, _>(&key).await.expect("exists"),
            0,
            "{p} absent from Redis"
        );
    }
    assert_eq!(gw.state.metrics.cache_stores.get(), 0);
    let by = |skip: Skip| gw.state.metrics.cache_not_stored_by[skip as usize].get();
    assert_eq!(by(Skip::SetCookie), 2);
    assert_eq!(
        by(Skip::Private),
        4,
        "private answers, the unmatched 404 included"
    );
    assert_eq!(by(Skip::NoCacheControl), 2);
    assert_eq!(by(Skip::Postponed), 2);
    assert_eq!(by(Skip::MiddlewareRewrite), 2);
}

// Freshness in controlled time: each gateway's clock is moved across the deadlines
// (`state.cache.clock.advance`) instead of sleeping through them, and slow renders are gates
// the test opens, so nothing here depends on how fast the machine is.

/// Moves `gw`'s clock forward by `secs` seconds.
fn advance(gw: &Gateway, secs: u64) {
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.clock.advance(Duration::from_secs(secs));
}

#[tokio::test]
async fn fresh_then_stale_served_at_once_with_exactly_one_refresh_then_the_new_body() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("v1", "s-maxage=60, stale-while-revalidate=600"));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    let url = gw.url("/p");
    assert_eq!(c.get(&url, &[]).await.header("x-cache"), "MISS");
    stored(&r, &gw, "/p").await;
    advance(&gw, 59);
    let fresh = c.get(&url, &[]).await;
    assert_eq!(
        (fresh.header("x-cache"), &fresh.body[..]),
        ("HIT", &b"v1"[..])
    );
    assert_eq!(fresh.header("age"), "59");
    assert_eq!(origin.count("/p"), 1, "fresh: no render");

    // Past s-maxage, inside stale-while-revalidate; the refresh render is held at a gate.
    let gate = Gate::new();
    origin.route(
        "/p",
        page("v2", "s-maxage=60, stale-while-revalidate=600").gated(&gate),
    );
    advance(&gw, 2);
    let stale: Vec<_> = futures_util::future::join_all((0..10).map(|_| c.get(&url, &[]))).await;
    for s in &stale {
        assert_eq!((s.header("x-cache"), &s.body[..]), ("STALE", &b"v1"[..]));
        assert_eq!(
            s.header("cache-status"),
            "isrgate; hit; fwd=stale; detail=stale-while-revalidate"
        );
    }
    // Ten stale answers arrived while the one refresh was still held at the origin.
    eventually!(
        10,
        origin.count("/p") == 2,
        "the refresh reached the origin"
    );
    assert_eq!(gw.state.metrics.cache_stale.get(), 10);
    gate.open();
    eventually!(
        10,
        c.get(&url, &[]).await.body == "v2",
        "refreshed entry served"
    );
    assert_eq!(origin.count("/p"), 2, "exactly one background refresh");
}

#[tokio::test]
async fn past_the_stale_window_the_next_request_waits_for_a_render() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("v1", "s-maxage=60, stale-while-revalidate=60"));
    })
    .await;
    let gw = gateway(&origin, &r, "[cache]\ndefault_stale_if_error = \"0s\"").await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    stored(&r, &gw, "/p").await;
    let gate = Gate::new();
    origin.route("/p", page("v2", "s-maxage=60").gated(&gate));
    // Fresh for 60 s, stale for 60 more: at 121 s the entry (still in Redis) is unusable.
    advance(&gw, 121);
    let url = gw.url("/p");
    let waiting = tokio::spawn({
        let c = c.clone();
        async move { c.get(&url, &[]).await }
    });
    eventually!(10, origin.count("/p") == 2, "the miss went upstream");
    assert!(!waiting.is_finished(), "the client waits for the render");
    gate.open();
    let got = waiting.await.expect("request task");
    assert_eq!((got.header("x-cache"), &got.body[..]), ("MISS", &b"v2"[..]));
    assert_eq!(gw.state.metrics.cache_stale.get(), 0, "never served stale");
}

#[tokio::test]
async fn stale_if_error_covers_a_failing_and_a_dead_origin() {
    let r = RedisProcess::start();
    let mut origin = FakeNext::start(|o| {
        o.route("/p", page("good", "s-maxage=60, stale-if-error=600"));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    stored(&r, &gw, "/p").await;
    advance(&gw, 61);
    origin.route(
        "/p",
        Route::status(500).header("cache-control", "private, no-cache, no-store"),
    );
    let got = c.get(&gw.url("/p"), &[]).await;
    assert_eq!((got.status.as_u16(), &got.body[..]), (200, &b"good"[..]));
    assert_eq!(
        got.header("cache-status"),
        "isrgate; hit; detail=stale-if-error"
    );
    assert_eq!(origin.count("/p"), 2, "the replica was asked first");
    origin.stop().await;
    let got = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(
        (got.status.as_u16(), &got.body[..]),
        (200, &b"good"[..]),
        "replica down"
    );
    // A 5xx and a refused connection: both the origin's failure.
    assert_eq!(gw.state.metrics.stale_origin_error.get(), 2);
    assert_eq!(gw.state.metrics.cache_stale.get(), 2);
    // Past stale-if-error too: nothing covers for the dead replica any more.
    advance(&gw, 600);
    let got = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(got.status.as_u16(), 502, "{got:?}");
    assert_eq!(gw.state.metrics.stale_origin_error.get(), 2);
}

#[tokio::test]
async fn gzip_clients_get_the_bytes_redis_holds_identity_clients_the_original() {
    let r = RedisProcess::start();
    let html: String = (0..400)
        .map(|i| format!("<div class=\"row\">item {i}</div>"))
        .collect();
    let origin = FakeNext::start(|o| {
        o.route("/p", page(&html, ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "[cache]\nl1_max_bytes = 0").await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    let raw = raw(&r).await;
    let key = redis_key(&gw, "/p", &Variant::Html);
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "stored"
    );
    let stored: Bytes = raw.hget(&key, "b").await.expect("hget");
    let gz = c
        .get(&gw.url("/p"), &[("accept-encoding", "gzip, deflate, br")])
        .await;
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert_eq!(gz.body, stored, "byte for byte what Redis holds");
    assert!(
        stored.len() * 4 < html.len(),
        "gzip at rest: {} vs {}",
        stored.len(),
        html.len()
    );
    let plain = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(plain.body, html.as_bytes());
    let etag = plain.header("etag").to_owned();
    let nm = c.get(&gw.url("/p"), &[("if-none-match", &etag)]).await;
    assert_eq!(nm.status, 304);
    assert!(nm.body.is_empty());
    let head = c.send("HEAD", &gw.url("/p"), &[], Bytes::new()).await;
    assert_eq!((head.status.as_u16(), head.header("x-cache")), (200, "HIT"));
    assert_eq!(head.header("content-length"), html.len().to_string());
    assert!(head.body.is_empty());
    assert_eq!(origin.count("/p"), 1);
}

/// Strict mode reads the store on every hit and reuses its last decoding only for the very
/// same write: an entry rewritten in Redis (another gateway's fill) is served at once, an entry
/// gone from Redis is a miss, and identity clients get the rewritten body inflated afresh.
#[tokio::test]
async fn strict_mode_serves_what_redis_holds_now_not_what_it_decoded_before() {
    use isrgate::cache::entry::{Entry, Meta};
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("<p>first render</p>", ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "[cache]\nl1_max_bytes = 0").await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    let raw = raw(&r).await;
    let key = redis_key(&gw, "/p", &Variant::Html);
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "stored"
    );
    for _ in 0..2 {
        let hit = c.get(&gw.url("/p"), &[]).await;
        assert_eq!(
            (hit.header("x-cache"), &hit.body[..]),
            ("HIT", &b"<p>first render</p>"[..])
        );
    }
    // Another write under the key, as another gateway's fill would make it.
    let meta: Bytes = raw.hget(&key, "m").await.expect("hget");
    let mut meta = Meta::decode(&meta).expect("decodes");
    meta.stored_at_ms += 1;
    let rewritten = Entry::from_identity(meta, b"<p>second render</p>");
    let _: () = raw
        .hset(
            &key,
            vec![
                ("m", rewritten.meta.encode()),
                ("b", rewritten.gzip.clone()),
            ],
        )
        .await
        .expect("hset");
    let hit = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(
        (hit.header("x-cache"), &hit.body[..]),
        ("HIT", &b"<p>second render</p>"[..]),
        "the rewritten entry, inflated afresh"
    );
    let gz = c.get(&gw.url("/p"), &[("accept-encoding", "gzip")]).await;
    assert_eq!(gz.body, rewritten.gzip, "and its gzip bytes");
    let _: () = raw.del(&key).await.expect("del");
    let gone = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(gone.header("x-cache"), "MISS", "gone from Redis: a miss");
    assert_eq!(origin.count("/p"), 2);
}

#[tokio::test]
async fn redis_dying_never_fails_a_request_and_caching_resumes_when_it_returns() {
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/a", page("a", ISR));
        o.route("/b", page("b", ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    c.get(&gw.url("/a"), &[]).await;
    r.kill();
    for _ in 0..5 {
        let a = c.get(&gw.url("/a"), &[]).await;
        assert_eq!(
            (a.status.as_u16(), a.header("x-cache")),
            (200, "HIT"),
            "from the L1"
        );
        let b = c.get(&gw.url("/b"), &[]).await;
        assert_eq!(b.status, 200, "from the replica");
    }
    assert!(gw.state.metrics.store_errors.get() > 0);
    r.restart();
    let raw = raw(&r).await;
    let key = redis_key(&gw, "/b", &Variant::Html);
    // /b is in this gateway's L1 (a store write may have failed), and so is each new URL
    // whose write failed while the client reconnects: each try is a new URL.
    origin.route("/c", page("c", ISR));
    let mut n = 0;
    eventually!(
        15,
        {
            n += 1;
            let path = format!("/c?try={n}");
            c.get(&gw.url(&path), &[]).await;
            let key = entry_key(
                &CacheKey::new(
                    "default",
                    &gw.addr.to_string(),
                    "/c",
                    Some(&format!("try={n}")),
                    &Variant::Html,
                )
                .hex(),
            );
            settled(&gw).await;
            raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1
        },
        "caching resumed without a gateway restart"
    );
    let _ = key;
}

#[tokio::test]
async fn bypassed_requests_are_marked_and_never_cached() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("x", ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    for _ in 0..2 {
        let got = c
            .get(&gw.url("/p"), &[("cookie", "__prerender_bypass=1")])
            .await;
        assert_eq!(got.header("x-cache"), "BYPASS");
        assert_eq!(got.header("cache-status"), "isrgate; fwd=bypass");
    }
    assert_eq!(origin.count("/p"), 2);
    assert_eq!(
        gw.state.metrics.cache_bypass_by[Bypass::DraftMode as usize].get(),
        2
    );
    assert_eq!(
        c.get(&gw.url("/p"), &[]).await.header("x-cache"),
        "MISS",
        "the draft renders were not stored"
    );
}

#[tokio::test]
async fn a_fill_on_one_gateway_replaces_the_l1_copy_on_another() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("v1", ISR));
    })
    .await;
    let gw1 = gateway(&origin, &r, "").await;
    let gw2 = gateway(&origin, &r, "").await;
    // The first connection of the bus flushes the L1 (messages may have been missed before):
    // let that happen before warming, so the render counts below are exact. A live bus has
    // loaded the invalidations, which the flush comes before.
    for gw in [&gw1, &gw2] {
        eventually!(10, bus_live(gw), "bus subscribed");
    }
    let c = Client::default();
    let host = gw1.addr.to_string();
    let on = |gw: &Gateway| gw.url("/p");
    c.get(&on(&gw1), &[("host", &host)]).await;
    let raw = raw(&r).await;
    let key = redis_key(&gw1, "/p", &Variant::Html);
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "stored"
    );
    // gw2 now holds v1 fresh in its L1 for a minute.
    assert_eq!(c.get(&on(&gw2), &[("host", &host)]).await.body, "v1");
    // A new version is stored through a third gateway (as after a purge and a fill there).
    let _: i64 = raw.del(&key).await.expect("del");
    origin.route("/p", page("v2", ISR));
    let gw3 = gateway(&origin, &r, "").await;
    eventually!(10, bus_live(&gw3), "bus subscribed");
    assert_eq!(c.get(&on(&gw3), &[("host", &host)]).await.body, "v2");
    for gw in [&gw1, &gw2] {
        eventually!(
            10,
            c.get(&on(gw), &[("host", &host)]).await.body == "v2",
            "L1 copy dropped on the bus message"
        );
    }
    assert_eq!(origin.count("/p"), 2);
}

#[tokio::test]
async fn a_bus_reconnect_flushes_the_l1() {
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("v1", ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    eventually!(10, bus_live(&gw), "bus subscribed");
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "HIT");
    // The store write runs in the background: let it land, or fred would deliver it to the
    // restarted server and the entry would (rightly) still be there.
    let raw = raw(&r).await;
    let key = redis_key(&gw, "/p", &Variant::Html);
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "stored"
    );
    r.kill();
    r.restart();
    // The restarted Redis is empty (no persistence here) and messages may have been missed
    // meanwhile: once the bus reconnects, the L1 copy is gone and the page renders again.
    eventually!(
        10,
        {
            c.get(&gw.url("/p"), &[]).await;
            origin.count("/p") == 2
        },
        "L1 flushed after the bus reconnected"
    );
}

#[tokio::test]
async fn a_refresh_that_meets_an_unpublished_page_drops_the_stale_copy() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("v1", "s-maxage=60, stale-while-revalidate=600"));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    stored(&r, &gw, "/p").await;
    let raw = raw(&r).await;
    let key = redis_key(&gw, "/p", &Variant::Html);
    advance(&gw, 61);
    // Unpublished: the replica now answers a private 404.
    origin.route(
        "/p",
        Route::html("gone").with_status(404).header(
            "cache-control",
            "private, no-cache, no-store, max-age=0, must-revalidate",
        ),
    );
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "STALE");
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(1) == 0,
        "stale entry deleted"
    );
    let got = c.get(&gw.url("/p"), &[]).await;
    assert_eq!((got.status.as_u16(), got.header("x-cache")), (404, "MISS"));
}

#[tokio::test]
async fn vary_accept_splits_entries_and_images_ask_for_the_keyed_format() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/h", page("<p>html</p>", ISR).header("vary", "Accept"));
        o.route(
            "/_next/image",
            Route::html("img")
                .content_type("image/webp")
                .header("cache-control", "public, max-age=60")
                .header("vary", "Accept"),
        );
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    assert_eq!(
        c.get(&gw.url("/h"), &[("accept", "text/html")])
            .await
            .header("x-cache"),
        "MISS"
    );
    assert_eq!(
        c.get(&gw.url("/h"), &[("accept", "text/html")])
            .await
            .header("x-cache"),
        "HIT"
    );
    assert_eq!(
        c.get(&gw.url("/h"), &[("accept", "application/json")])
            .await
            .header("x-cache"),
        "MISS",
        "another Accept, another answer"
    );
    c.get(
        &gw.url("/_next/image?url=%2Fa.jpg&w=640&q=75"),
        &[("accept", "image/avif,image/webp,*/*")],
    )
    .await;
    let seen = origin.last("/_next/image").expect("seen");
    assert_eq!(
        seen.headers["accept"], "image/webp,*/*",
        "the optimizer is asked for the keyed format"
    );
    let other_browser = c
        .get(
            &gw.url("/_next/image?url=%2Fa.jpg&w=640&q=75"),
            &[("accept", "image/webp,image/apng,*/*;q=0.8")],
        )
        .await;
    assert_eq!(
        other_browser.header("x-cache"),
        "HIT",
        "same format, another Accept string: one entry"
    );
    assert_eq!(origin.count("/_next/image"), 1);
}

#[tokio::test]
async fn a_black_holed_redis_costs_a_few_timeouts_not_one_per_request() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        for i in 0..30 {
            o.route(&format!("/p{i}"), page("x", ISR));
        }
    })
    .await;
    let gw = gateway(&origin, &r, "[redis]\ncommand_timeout = \"200ms\"").await;
    let c = Client::default();
    eventually!(10, bus_live(&gw), "connected");
    // Commands that went to Redis (and waited for it): the breaker refuses the others at once.
    let sent = || {
        let cache = gw.state.cache.as_ref().expect("cache on");
        cache.redis().expect("a Redis store").latency_ms().count()
    };
    let before = sent();
    r.pause();
    let started = std::time::Instant::now();
    for i in 0..30 {
        let got = c.get(&gw.url(&format!("/p{i}")), &[]).await;
        assert_eq!(got.status, 200, "/p{i}");
    }
    // 30 requests read Redis 30 times, with no breaker. With it: the failures that open it
    // (and the writes in flight meanwhile), then one probe per cooldown of the time it took.
    let timeouts = sent() - before;
    let cooldowns = (started.elapsed().as_secs_f64() / BREAKER_COOLDOWN.as_secs_f64()).ceil();
    let allowed = 2 * u64::from(BREAKER_FAILURES) + cooldowns as u64;
    assert!(
        timeouts <= allowed,
        "{timeouts} commands waited for the black hole; {allowed} allowed"
    );
    r.resume();
    let raw = raw(&r).await;
    let key = redis_key(&gw, "/p0", &Variant::Html);
    eventually!(
        10,
        {
            c.get(&gw.url("/p0"), &[]).await;
            raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1
        },
        "caching resumed after the breaker closed"
    );
}

/// `rediss://` with a private CA and a client certificate (Redis's default
/// `tls-auth-clients yes`): two gateways share entries over TLS, one render in all.
#[tokio::test]
async fn gateways_share_entries_over_tls_with_a_client_certificate() {
    let r = RedisProcess::start_tls(true);
    let t = r.tls();
    let origin = FakeNext::start(|o| {
        o.route("/tls", page("<p>over tls</p>", ISR));
    })
    .await;
    let redis = format!(
        "[redis]\nurl = \"{}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        r.tls_url(),
        t.ca.display(),
        t.client_cert.display(),
        t.client_key.display()
    );
    let gw1 = Gateway::start(config(&[origin.url()], "", &redis)).await;
    let gw2 = Gateway::start(config(&[origin.url()], "", &redis)).await;
    // Both connected (the bus subscriber is the last connection to come up).
    eventually!(10, bus_live(&gw1) && bus_live(&gw2), "subscribed over TLS");
    let c = Client::default();
    let host = gw1.addr.to_string();
    let first = c.get(&gw1.url("/tls"), &[]).await;
    assert_eq!(first.header("x-cache"), "MISS");
    let settings = isrgate::cache::store::RedisSettings {
        url: r.tls_url(),
        pool_size: 1,
        command_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        tls: isrgate::cache::tls::RedisTls {
            ca_file: Some(t.ca.clone()),
            cert_file: Some(t.client_cert.clone()),
            key_file: Some(t.client_key.clone()),
        },
    };
    let raw = Builder::from_config(settings.fred_config().expect("tls config"))
        .build()
        .expect("client");
    raw.init().await.expect("connect over TLS");
    let key = redis_key(&gw1, "/tls", &Variant::Html);
    eventually!(
        10,
        raw.exists::<u32, _>(&key).await.unwrap_or(0) == 1,
        "stored over TLS"
    );
    let second = c.get(&gw2.url("/tls"), &[("host", &host)]).await;
    assert_eq!(
        second.header("x-cache"),
        "HIT",
        "gateway 2 reads it over TLS"
    );
    assert_eq!(second.body, first.body);
    assert_eq!(origin.count("/tls"), 1, "one render in all");
}

/// A server certificate that does not chain to the configured CA is refused: nothing is
/// read or stored (strict mode, so no L1 hides it), and requests still succeed from the origin
/// (a Redis failure never fails a request).
#[tokio::test]
async fn an_untrusted_redis_certificate_is_refused_and_requests_still_succeed() {
    let r = RedisProcess::start_tls(false);
    let other = RedisProcess::start_tls(false); // another CA
    let origin = FakeNext::start(|o| {
        o.route("/x", page("<p>x</p>", ISR));
    })
    .await;
    let redis = format!(
        "[cache]\nl1_max_bytes = 0\n[redis]\nurl = \"{}\"\ntls_ca_file = \"{}\"\nconnect_timeout = \"200ms\"\n",
        r.tls_url(),
        other.tls().ca.display()
    );
    let gw = Gateway::start(config(&[origin.url()], "", &redis)).await;
    let c = Client::default();
    for _ in 0..3 {
        let res = c.get(&gw.url("/x"), &[]).await;
        assert_eq!(res.status.as_u16(), 200);
        assert_eq!(res.header("x-cache"), "MISS", "no store to read from");
    }
    assert!(!bus_live(&gw));
    assert_eq!(origin.count("/x"), 3);
    assert!(
        gw.state.metrics.store_errors.get() >= 3,
        "each lookup failed"
    );
}

/// Keys are ordered by name, but repeated names keep their order: `searchParams.get('a')` is
/// the first value, so `?a=evil&a=good` and `?a=good&a=evil` are two pages and must never
/// answer each other (a poisoning vector when both were sorted into one key).
#[tokio::test]
async fn repeated_query_names_in_another_order_never_share_an_answer() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/q", page("q", ISR));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    let get = |q: &'static str| {
        let (c, url) = (c.clone(), gw.url(&format!("/q?{q}")));
        async move { c.get(&url, &[("host", "site.test")]).await }
    };
    assert_eq!(get("a=evil&a=good").await.header("x-cache"), "MISS");
    assert_eq!(get("a=good&a=evil").await.header("x-cache"), "MISS");
    assert_eq!(origin.count("/q"), 2, "one render each");
    let sent = origin.last("/q").expect("seen").target;
    assert_eq!(
        sent, "/q?a=good&a=evil",
        "the replica gets the query as asked"
    );
    // Other names may move: the order of the repeated ones is what counts.
    assert_eq!(get("b=1&a=good&a=evil").await.header("x-cache"), "MISS");
    assert_eq!(get("a=good&b=1&a=evil").await.header("x-cache"), "HIT");
    assert_eq!(get("a=evil&a=good").await.header("x-cache"), "HIT");
}

/// A replica that hangs (accepts, never answers) costs a request with a stale-if-error entry
/// `cache.stale_if_error_wait`, not the response header timeout; the render it started goes
/// on and is stored when the replica answers.
#[tokio::test]
async fn a_hung_replica_costs_the_stale_wait_then_its_render_still_lands() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("old", "s-maxage=60, stale-if-error=600"));
    })
    .await;
    let gw = gateway(
        &origin,
        &r,
        "[cache]\nstale_if_error_wait = \"200ms\"\n[upstream]\nresponse_header_timeout = \"60s\"",
    )
    .await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    stored(&r, &gw, "/p").await;
    advance(&gw, 61);
    let gate = Gate::new();
    origin.route("/p", page("new", ISR).gated(&gate));
    let got = c.get(&gw.url("/p"), &[]).await;
    assert_eq!((got.status.as_u16(), &got.body[..]), (200, &b"old"[..]));
    assert_eq!(
        got.header("cache-status"),
        "isrgate; hit; detail=stale-if-error"
    );
    assert_eq!(gw.state.metrics.stale_if_error_waits.get(), 1);
    // The replica answers at last: the render started for that request is stored.
    gate.open();
    eventually!(
        10,
        &c.get(&gw.url("/p"), &[]).await.body[..] == b"new",
        "the background render landed"
    );
    assert_eq!(
        origin.count("/p"),
        2,
        "one render for the stale answer and what followed"
    );
}

/// A background refresh renders the shared entry on nobody's behalf: the credentials of the
/// client whose request found the entry stale never reach the replica with it.
#[tokio::test]
async fn a_refresh_carries_no_credentials_of_the_client_that_triggered_it() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", page("v1", "s-maxage=60, stale-while-revalidate=600"));
    })
    .await;
    let gw = gateway(&origin, &r, "").await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    stored(&r, &gw, "/p").await;
    advance(&gw, 61);
    // (`Authorization` is never answered from the cache at all: such a request bypasses it.)
    let private = [("cookie", "session=alice"), ("accept-language", "fr")];
    let stale = c.get(&gw.url("/p"), &private).await;
    assert_eq!(stale.header("x-cache"), "STALE");
    eventually!(
        10,
        origin.count("/p") == 2,
        "the refresh reached the replica"
    );
    let seen = origin.last("/p").expect("seen").headers;
    assert!(
        seen.get("cookie").is_none() && seen.get("authorization").is_none(),
        "{seen:?}"
    );
    assert_eq!(
        seen["accept-language"], "fr",
        "other headers go as they came"
    );
}

/// A page that varies on `Accept-Language`, saying the value it was rendered for.
fn by_language() -> Route {
    Route::says_header("accept-language")
        .header("cache-control", ISR)
        .header("vary", "Accept-Language")
}

/// A gateway on its own Redis in front of a [`by_language`] page at `/lang`.
async fn language_page(extra: &str) -> (RedisProcess, FakeNext, Gateway) {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/lang", by_language());
    })
    .await;
    let gw = gateway(&origin, &r, extra).await;
    (r, origin, gw)
}

fn lang(l: &str) -> [(&str, &str); 1] {
    [("accept-language", l)]
}

#[tokio::test]
async fn two_vary_values_alternating_render_once_each_then_both_hit_on_every_gateway() {
    let (r, origin, gw) = language_page("").await;
    let c = Client::default();
    let mut seen = Vec::new();
    for i in 0..10 {
        let l = if i % 2 == 0 { "en" } else { "fr" };
        let got = c.get(&gw.url("/lang"), &lang(l)).await;
        assert_eq!(got.body, format!("<p>{l}</p>"), "request {i}");
        seen.push(got.header("x-cache").to_owned());
        if i == 1 {
            // Both renders stored (primary key and slot each) before they are asked again.
            eventually!(10, gw.state.metrics.cache_stores.get() == 4, "both stored");
        }
    }
    assert_eq!(seen[..2], ["MISS", "MISS"]);
    assert!(seen[2..].iter().all(|s| s == "HIT"), "{seen:?}");
    assert_eq!(origin.count("/lang"), 2, "one render per value");
    // Another gateway (its L1 empty) finds each value's own render in Redis.
    let other = Gateway::start(config(&[origin.url()], "", &with_redis(&r, ""))).await;
    eventually!(10, bus_live(&other), "bus subscribed");
    let host = [("host", gw.addr.to_string())];
    for l in ["en", "fr", "en"] {
        let headers = [("accept-language", l), ("host", host[0].1.as_str())];
        let got = c.get(&other.url("/lang"), &headers).await;
        assert_eq!(
            (got.header("x-cache"), got.body.as_ref()),
            ("HIT", format!("<p>{l}</p>").as_bytes()),
            "{l}"
        );
    }
    assert_eq!(origin.count("/lang"), 2);
}

#[tokio::test]
async fn an_odd_vary_value_does_not_evict_the_page_for_everyone() {
    let (_r, origin, gw) = language_page("").await;
    let c = Client::default();
    assert_eq!(
        c.get(&gw.url("/lang"), &lang("en")).await.header("x-cache"),
        "MISS"
    );
    eventually!(10, gw.state.metrics.cache_stores.get() == 2, "en stored");
    for odd in ["xx-evil", "zz, qq;q=0.1", ""] {
        let got = c.get(&gw.url("/lang"), &lang(odd)).await;
        assert_eq!(got.header("x-cache"), "MISS", "{odd:?}");
    }
    let got = c.get(&gw.url("/lang"), &lang("en")).await;
    assert_eq!(
        (got.header("x-cache"), got.body.as_ref()),
        ("HIT", b"<p>en</p>".as_slice())
    );
    assert_eq!(origin.count("/lang"), 4);
}

#[tokio::test]
async fn past_max_variants_the_least_recently_filled_slot_is_dropped_everywhere() {
    let (r, origin, gw) = language_page("[cache]\nmax_variants = 2\n").await;
    let c = Client::default();
    for (i, l) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(
            c.get(&gw.url("/lang"), &lang(l)).await.header("x-cache"),
            "MISS"
        );
        // Stored (the primary key and the slot) and the slot recorded in its URL's list
        // before the next value is filled: the slots are ranked by when they were recorded.
        let stores = 2 * (i as u64 + 1);
        eventually!(
            10,
            gw.state.metrics.cache_stores.get() == stores && slots_listed(&r) == (i + 1).min(2),
            "{l} stored and listed"
        );
    }
    eventually!(
        10,
        gw.state.metrics.cache_variants_dropped.get() == 1,
        "one slot dropped"
    );
    // The primary entry and two slots are left in Redis.
    let entries = r.cli(&["KEYS", "isr:*:e"]);
    assert_eq!(entries.lines().count(), 3, "{entries}");
    for l in ["b", "c"] {
        assert_eq!(
            c.get(&gw.url("/lang"), &lang(l)).await.header("x-cache"),
            "HIT",
            "{l}"
        );
    }
    assert_eq!(
        c.get(&gw.url("/lang"), &lang("a")).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(origin.count("/lang"), 4);
}

/// How many `Vary` slots the one URL in `r` has in its list.
fn slots_listed(r: &RedisProcess) -> usize {
    match r.cli(&["KEYS", "isr:*:v"]).lines().next() {
        Some(list) => r.cli(&["LLEN", list]).trim().parse().unwrap_or(0),
        None => 0,
    }
}

#[tokio::test]
async fn vary_slots_work_in_the_embedded_store_too() {
    let origin = FakeNext::start(|o| {
        o.route("/lang", by_language());
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    for (i, (l, want)) in [("en", "MISS"), ("fr", "MISS"), ("en", "HIT"), ("fr", "HIT")]
        .into_iter()
        .enumerate()
    {
        if i == 2 {
            eventually!(10, gw.state.metrics.cache_stores.get() == 4, "both stored");
        }
        let got = c.get(&gw.url("/lang"), &lang(l)).await;
        assert_eq!(
            (got.header("x-cache"), got.body.as_ref()),
            (want, format!("<p>{l}</p>").as_bytes())
        );
    }
    assert_eq!(origin.count("/lang"), 2);
}
