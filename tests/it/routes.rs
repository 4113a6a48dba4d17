//! Per-route policy (`[[routes]]`): the operator's lifetimes win over the replica's, a route
//! can switch caching off, and nothing a route says makes a private answer cacheable.
//! Freshness is driven by the gateway's clock (`cache.clock.advance`), never slept through.

use std::time::Duration;

use isrgate::proxy::classify::Bypass;

use crate::support::origin::{FakeNext, Route};
use crate::support::{Client, Gateway, config};

fn page(body: &str, cache_control: &str) -> Route {
    Route::html(body).header("cache-control", cache_control)
}

fn advance(gw: &Gateway, secs: u64) {
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.clock.advance(Duration::from_secs(secs));
}

async fn gateway(origin: &FakeNext, route: &str) -> Gateway {
    Gateway::start(config(&[origin.url()], "", &format!("[[routes]]\n{route}"))).await
}

#[tokio::test]
async fn a_route_ttl_wins_over_the_replicas_s_maxage() {
    let origin = FakeNext::start(|o| {
        o.route("/blog/a", page("a", "s-maxage=3600"));
        o.route("/about", page("about", "s-maxage=3600"));
    })
    .await;
    let gw = gateway(&origin, "path = \"/blog/*\"\nttl = \"60s\"").await;
    let c = Client::default();
    for path in ["/blog/a", "/about"] {
        assert_eq!(c.get(&gw.url(path), &[]).await.header("x-cache"), "MISS");
        assert_eq!(c.get(&gw.url(path), &[]).await.header("x-cache"), "HIT");
    }
    advance(&gw, 61);
    let blog = c.get(&gw.url("/blog/a"), &[]).await;
    assert_ne!(blog.header("x-cache"), "HIT", "past the route's 60 s");
    assert_eq!(c.get(&gw.url("/about"), &[]).await.header("x-cache"), "HIT");
    assert_eq!(origin.count("/blog/a"), 2);
    assert_eq!(origin.count("/about"), 1);
}

#[tokio::test]
async fn a_route_ttl_caches_a_page_sent_without_freshness_but_never_a_private_one() {
    let origin = FakeNext::start(|o| {
        o.route("/news/today", Route::html("today"));
        o.route("/news/zero", page("zero", "s-maxage=0"));
        o.route("/news/mine", page("mine", "private, max-age=60"));
        o.route(
            "/news/cookie",
            page("cookie", "s-maxage=60").header("set-cookie", "s=1"),
        );
    })
    .await;
    let gw = gateway(&origin, "path = \"/news/*\"\nttl = \"5m\"").await;
    let c = Client::default();
    for path in ["/news/today", "/news/zero", "/news/mine", "/news/cookie"] {
        c.get(&gw.url(path), &[]).await;
        c.get(&gw.url(path), &[]).await;
    }
    assert_eq!(origin.count("/news/today"), 1, "no Cache-Control: cached");
    assert_eq!(origin.count("/news/zero"), 1, "s-maxage=0: cached");
    assert_eq!(origin.count("/news/mine"), 2, "private: never");
    assert_eq!(origin.count("/news/cookie"), 2, "Set-Cookie: never");
}

#[tokio::test]
async fn cache_false_sends_every_request_to_a_replica() {
    let origin = FakeNext::start(|o| {
        o.route("/account/orders", page("orders", "s-maxage=600"));
    })
    .await;
    let gw = gateway(&origin, "path = \"/account/*\"\ncache = false").await;
    let c = Client::default();
    for path in ["/account/orders", "/%61ccount/orders"] {
        let got = c.get(&gw.url(path), &[]).await;
        assert_eq!(got.header("x-cache"), "BYPASS", "{path}");
    }
    assert_eq!(origin.count("/account/orders"), 1);
    assert_eq!(
        gw.state.metrics.cache_bypass_by[Bypass::Route as usize].get(),
        2
    );
}

#[test]
fn check_config_names_each_bad_route() {
    let cases = [
        ("path = \"blog\"\nttl = \"1m\"", "routes[0].path"),
        ("path = \"/a/*/b\"\nttl = \"1m\"", "routes[0].path"),
        ("path = \"/a\"", "routes[0].path"),
        ("path = \"/a\"\nttl = \"0s\"", "routes[0].ttl"),
        ("path = \"/a\"\nttl = \"soon\"", "routes[0].ttl"),
        ("path = \"/a\"\nttl = \"30d\"", "routes[0].ttl"),
        (
            "path = \"/a\"\ncache = false\nttl = \"1m\"",
            "routes[0].cache",
        ),
        ("path = \"/a\"\nttl = \"1m\"\ntll = \"1m\"", "routes"),
    ];
    for (route, key) in cases {
        let text = format!("[[routes]]\n{route}\n");
        let err = isrgate::config::from_toml(&text)
            .expect_err(route)
            .to_string();
        assert!(err.contains(key), "{route}: {err}");
    }
    let ok = "[[routes]]\npath = \"/blog/{slug}\"\nttl = \"5m\"\nstale_while_revalidate = \"1h\"\n\
              [[routes]]\npath = \"/account/*\"\ncache = false\n";
    let cfg = isrgate::config::from_toml(ok).expect("valid");
    assert_eq!(cfg.cache.expect("cache").routes.len(), 2);
}
