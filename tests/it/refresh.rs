//! The refresh contract with a replica (issue "One render per expiry"): a refresh asks for a
//! regeneration, a replica's copy of its own cache never replaces a stored entry, responses
//! that are not stored keep their compression, and build assets are cached once per fleet.
//! Real `redis-server`, fake Next.js origin, gateways in-process, freshness in the gateway's
//! controlled clock.

use std::io::Read;
use std::time::Duration;

use http::HeaderValue;
use isrgate::proxy::refresh::Refreshed;

use crate::eventually;
use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, bus_live, config, settled};

const ISR: &str = "s-maxage=60, stale-while-revalidate=600";
const PREVIEW_MODE_ID: &str = "0123456789abcdef0123456789abcdef";
/// An App Router page's `Vary` (NEXTJS.md §1.8).
const VARY: &str =
    "RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Router-Segment-Prefetch";

async fn gateway(origin: &FakeNext, r: &RedisProcess, preview: bool) -> Gateway {
    let mut cfg = config(
        &[origin.url()],
        "",
        &format!("[redis]\nurl = \"{}\"\n", r.url()),
    );
    if preview {
        cfg.webhook.preview_mode_id = Some(HeaderValue::from_static(PREVIEW_MODE_ID));
    }
    let gw = Gateway::start(cfg).await;
    eventually!(10, bus_live(&gw), "bus subscribed");
    gw
}

fn isr(body: &str, x_nextjs_cache: &str) -> Route {
    Route::html(body)
        .header("cache-control", ISR)
        .header("x-nextjs-cache", x_nextjs_cache)
}

fn advance(gw: &Gateway, secs: u64) {
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.clock.advance(Duration::from_secs(secs));
}

fn inflate(gz: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

#[tokio::test]
async fn a_refresh_asks_for_a_regeneration_and_never_stores_the_replicas_stale_copy() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", isr("v1", "MISS"));
    })
    .await;
    let gw = gateway(&origin, &r, true).await;
    let c = Client::default();
    let url = gw.url("/p");
    assert_eq!(c.get(&url, &[]).await.header("x-cache"), "MISS");
    settled(&gw).await;
    let first = origin.last("/p").expect("seen");
    assert!(
        first.headers.get("x-prerender-revalidate").is_none(),
        "a first fill replaces nothing: no regeneration asked"
    );

    // Expired. The replica still holds an old copy and answers with it (it ignored the id).
    origin.route("/p", isr("v0-old", "STALE"));
    advance(&gw, 61);
    let stale = c.get(&url, &[]).await;
    assert_eq!(
        (stale.header("x-cache"), &stale.body[..]),
        ("STALE", &b"v1"[..])
    );
    eventually!(
        10,
        gw.state.metrics.fills_not_rendered.get() == 1,
        "the refresh got a copy and stored nothing"
    );
    let asked = origin.last("/p").expect("refresh seen");
    assert_eq!(
        asked.headers["x-prerender-revalidate"], PREVIEW_MODE_ID,
        "a refresh asks the replica to regenerate"
    );
    let again = c.get(&url, &[]).await;
    assert_eq!(
        &again.body[..],
        b"v1",
        "never back in time: the replica's older copy did not replace v1"
    );

    // The replica regenerates: the next refresh stores the render.
    origin.route("/p", isr("v2", "REVALIDATED"));
    eventually!(
        10,
        {
            let got = c.get(&url, &[]).await;
            got.header("x-cache") == "HIT" && &got.body[..] == b"v2"
        },
        "the regenerated page is served"
    );
    assert_eq!(
        c.get(&url, &[]).await.header("age"),
        "0",
        "Age counts from the render"
    );
}

#[tokio::test]
async fn without_the_preview_id_a_refresh_still_never_stores_a_stale_copy() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/q", isr("v1", "MISS"));
    })
    .await;
    let gw = gateway(&origin, &r, false).await;
    let c = Client::default();
    let url = gw.url("/q");
    c.get(&url, &[]).await;
    settled(&gw).await;
    origin.route("/q", isr("v0-old", "STALE"));
    advance(&gw, 61);
    assert_eq!(&c.get(&url, &[]).await.body[..], b"v1");
    eventually!(
        10,
        gw.state.metrics.fills_not_rendered.get() == 1,
        "the stale copy was refused"
    );
    assert!(
        origin
            .last("/q")
            .expect("seen")
            .headers
            .get("x-prerender-revalidate")
            .is_none(),
        "no id, no header"
    );
    assert_eq!(&c.get(&url, &[]).await.body[..], b"v1");
    // The replica's background render landed: its fresh answer is a render we take.
    origin.route("/q", isr("v2", "HIT"));
    eventually!(
        10,
        &c.get(&url, &[]).await.body[..] == b"v2",
        "the replica's new page is stored"
    );
}

#[tokio::test]
async fn responses_that_are_not_stored_reach_gzip_clients_compressed() {
    let r = RedisProcess::start();
    let script = "export function render(items){return items.map(i=>`<li>${i}</li>`).join('')}\n"
        .repeat(300);
    let body = script.clone();
    let origin = FakeNext::start(move |o| {
        o.route(
            "/private.js",
            Route::html(&body)
                .content_type("application/javascript")
                .header("cache-control", "private, no-cache, no-store"),
        );
    })
    .await;
    let gw = gateway(&origin, &r, false).await;
    let c = Client::default();
    let url = gw.url("/private.js");
    let gz = c.get(&url, &[("accept-encoding", "gzip, br")]).await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert!(
        gz.body.len() * 5 < script.len(),
        "{} bytes for {}",
        gz.body.len(),
        script.len()
    );
    assert_eq!(inflate(&gz.body), script.as_bytes());
    assert!(gz.header("vary").contains("Accept-Encoding"));
    let plain = c.get(&url, &[]).await;
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.body, script.as_bytes());
}

#[tokio::test]
async fn build_assets_are_fetched_once_for_the_fleet_and_served_gzip() {
    let r = RedisProcess::start();
    let chunk =
        "(self.webpackChunk=self.webpackChunk||[]).push([[255],{1:function(e){e.exports=1}}]);\n"
            .repeat(200);
    let body = chunk.clone();
    let origin = FakeNext::start(move |o| {
        o.route(
            "/_next/static/chunks/255-abc.js",
            Route::html(&body)
                .content_type("application/javascript; charset=UTF-8")
                .header("cache-control", "public, max-age=31536000, immutable"),
        );
    })
    .await;
    let g1 = gateway(&origin, &r, false).await;
    let g2 = gateway(&origin, &r, false).await;
    let c = Client::default();
    let path = "/_next/static/chunks/255-abc.js";
    // One public host, as behind a load balancer (the key includes it).
    let gzip = [("accept-encoding", "gzip"), ("host", "site.test")];
    let first = c.get(&g1.url(path), &gzip).await;
    assert_eq!(first.status, 200);
    assert_eq!(inflate_if_gzip(&first), chunk.as_bytes());
    eventually!(
        10,
        c.get(&g2.url(path), &gzip).await.header("x-cache") == "HIT",
        "the second gateway serves the asset from the shared cache"
    );
    let hit = c.get(&g2.url(path), &gzip).await;
    assert_eq!(hit.header("content-encoding"), "gzip");
    assert_eq!(inflate(&hit.body), chunk.as_bytes());
    assert_eq!(
        hit.header("content-type"),
        "application/javascript; charset=UTF-8"
    );
    assert_eq!(
        c.get(&g1.url(path), &[("rsc", "1"), ("host", "site.test")])
            .await
            .header("x-cache"),
        "HIT",
        "one representation whatever the request says"
    );
    assert_eq!(origin.count(path), 1, "one fetch for the fleet");
}

fn inflate_if_gzip(got: &crate::support::Got) -> Vec<u8> {
    if got.header("content-encoding") == "gzip" {
        inflate(&got.body)
    } else {
        got.body.to_vec()
    }
}

/// An App Router page: HTML and RSC vary on `RSC`, one ISR entry in Next.
fn app_page(html: &str, rsc: &str, html_cache: &str, rsc_cache: &str) -> Route {
    isr(html, html_cache).header("vary", VARY).with_rsc(
        isr(rsc, rsc_cache)
            .content_type("text/x-component")
            .header("vary", VARY),
    )
}

#[tokio::test]
async fn html_and_rsc_of_a_page_are_refreshed_by_one_render() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/app", app_page("h1", "r1", "MISS", "MISS"));
    })
    .await;
    let gw = gateway(&origin, &r, true).await;
    let c = Client::default();
    let url = gw.url("/app");
    let rsc = [("rsc", "1")];
    assert_eq!(&c.get(&url, &[]).await.body[..], b"h1");
    assert_eq!(&c.get(&url, &rsc).await.body[..], b"r1");
    settled(&gw).await;
    assert_eq!(origin.count("/app"), 2);

    // Expired. Regenerated, the replica renders h2; its RSC is then a HIT of that render. The
    // regeneration waits at the replica until both answers are in: on a busy machine it could
    // otherwise finish before the second request arrives (a HIT of r2, also right, but not
    // the stale answer this test is about).
    let gate = Gate::new();
    origin.route(
        "/app",
        app_page("h2", "r2", "REVALIDATED", "HIT").gated(&gate),
    );
    advance(&gw, 61);
    let (html, flight) = futures_util::join!(c.get(&url, &[]), c.get(&url, &rsc));
    gate.open();
    assert_eq!(
        (html.header("x-cache"), &html.body[..]),
        ("STALE", &b"h1"[..])
    );
    assert_eq!(
        (flight.header("x-cache"), &flight.body[..]),
        ("STALE", &b"r1"[..])
    );
    settled(&gw).await;
    let html = c.get(&url, &[]).await;
    let flight = c.get(&url, &rsc).await;
    assert_eq!(
        (html.header("x-cache"), &html.body[..]),
        ("HIT", &b"h2"[..])
    );
    assert_eq!(
        (flight.header("x-cache"), &flight.body[..]),
        ("HIT", &b"r2"[..])
    );
    assert_eq!(
        origin.count("/app"),
        4,
        "one regeneration and one read of its RSC, whichever variant went stale first"
    );
    let m = &gw.state.metrics;
    // Counted when the refresh task ends, just after its render landed.
    eventually!(
        10,
        m.refreshes_run() == 1,
        "one refresh: {}",
        m.refreshes_run()
    );
    assert_eq!(m.refreshes_of(Refreshed::Stored), 1);
    assert_eq!(m.fills_siblings.get(), 1);
    let sibling = origin.last("/app").expect("seen");
    assert!(
        sibling.headers.get("x-prerender-revalidate").is_none(),
        "the RSC is read from the render just made, not regenerated"
    );
    assert_eq!(sibling.target, "/app?_rsc");
    let cache = gw.state.cache.as_ref().expect("cache");
    let host = gw.addr.to_string();
    let at = |v| {
        let key = isrgate::cache::key::CacheKey::new("default", &host, "/app", None, &v);
        let now = cache.clock.now_ms();
        cache.l1.get(key.hash, now).expect("held").meta.stored_at_ms
    };
    assert_eq!(
        at(isrgate::cache::key::Variant::Html),
        at(isrgate::cache::key::Variant::Rsc),
        "one render time for both"
    );
}

/// The render time each gateway's L1 holds for `path`'s `variant` (requests sent with
/// `Host: site.test`).
fn rendered_at(gw: &Gateway, path: &str, variant: isrgate::cache::key::Variant) -> Option<u64> {
    let cache = gw.state.cache.as_ref().expect("cache");
    let key = isrgate::cache::key::CacheKey::new("default", "site.test", path, None, &variant);
    let now = cache.clock.now_ms();
    cache.l1.get(key.hash, now).map(|e| e.meta.stored_at_ms)
}

/// Cold start under load (seen in the real-Next e2e test): a page's first HTML fill brings the
/// replica's stale copy and is refreshed while the first RSC fill, asked before that refresh,
/// is still at the replica. The refresh's RSC read waits for that fill instead of skipping the
/// RSC: otherwise the older RSC lands after the new HTML and the two stay from two renders.
#[tokio::test]
async fn a_refresh_waits_for_the_rsc_fill_in_flight_and_keeps_both_from_its_render() {
    let r = RedisProcess::start();
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route("/app", app_page_rsc_gated("h0", "r0", "STALE", &gate));
    })
    .await;
    let gw = gateway(&origin, &r, true).await;
    let c = Client::default();
    let url = gw.url("/app");
    let rsc = [("rsc", "1"), ("host", "site.test")];
    let rsc_key = isrgate::cache::key::CacheKey::new(
        "default",
        "site.test",
        "/app",
        None,
        &isrgate::cache::key::Variant::Rsc,
    );
    let cache = gw.state.cache.as_ref().expect("cache");
    let rest = async {
        first_html_then_its_refresh(&c, &origin, &url).await;
        // The refresh rendered h1 and now waits on the RSC's flight.
        eventually!(
            10,
            cache.flights.followers(rsc_key.hash) == 1,
            "the refresh's RSC read did not wait for the RSC miss"
        );
        gate.open();
    };
    let (first_rsc, ()) = futures_util::join!(c.get(&url, &rsc), rest);
    assert_eq!(&first_rsc.body[..], b"r0");
    settled(&gw).await;
    let html = c.get(&url, &[("host", "site.test")]).await;
    let rsc = c.get(&url, &rsc).await;
    assert_eq!(
        (html.header("x-cache"), &html.body[..]),
        ("HIT", &b"h1"[..])
    );
    assert_eq!((rsc.header("x-cache"), &rsc.body[..]), ("HIT", &b"r1"[..]));
    use isrgate::cache::key::Variant;
    assert_eq!(
        rendered_at(&gw, "/app", Variant::Html),
        rendered_at(&gw, "/app", Variant::Rsc),
        "one render time for both"
    );
    assert_eq!(gw.state.metrics.fills_siblings.get(), 1);
    assert_eq!(
        origin.count("/app"),
        4,
        "two first fills, one regeneration, one read of its RSC"
    );
}

/// The same across gateways: the RSC's first fill runs on another gateway, which holds its
/// fleet lock; the refresh's RSC read waits for that lock.
#[tokio::test]
async fn a_refresh_waits_for_the_rsc_fill_on_another_gateway() {
    let r = RedisProcess::start();
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route("/app", app_page_rsc_gated("h0", "r0", "STALE", &gate));
    })
    .await;
    let g1 = gateway(&origin, &r, true).await;
    let g2 = gateway(&origin, &r, true).await;
    let c = Client::default();
    let rsc = [("rsc", "1"), ("host", "site.test")];
    let html = [("host", "site.test")];
    let rest = async {
        first_html_then_its_refresh(&c, &origin, &g1.url("/app")).await;
        eventually!(
            10,
            g1.state.metrics.lock_contended.get() == 1,
            "the refresh's RSC read did not wait for the other gateway's RSC fill"
        );
        gate.open();
    };
    let on_g2 = g2.url("/app");
    let (first_rsc, ()) = futures_util::join!(c.get(&on_g2, &rsc), rest);
    assert_eq!(&first_rsc.body[..], b"r0");
    settled(&g1).await;
    settled(&g2).await;
    for gw in [&g1, &g2] {
        eventually!(
            10,
            &c.get(&gw.url("/app"), &rsc).await.body[..] == b"r1",
            "the RSC of the refreshed render"
        );
        let html = c.get(&gw.url("/app"), &html).await;
        assert_eq!(
            (html.header("x-cache"), &html.body[..]),
            ("HIT", &b"h1"[..])
        );
    }
    use isrgate::cache::key::Variant;
    assert_eq!(
        rendered_at(&g1, "/app", Variant::Html),
        rendered_at(&g1, "/app", Variant::Rsc),
        "one render time for both"
    );
    assert_eq!(g1.state.metrics.fills_siblings.get(), 1);
    assert_eq!(
        origin.count("/app"),
        4,
        "two first fills, one regeneration, one read of its RSC"
    );
}

/// The RSC miss is asked after the refresh's regeneration, and the replica answers it with an
/// older copy from its cache (`HIT`; `@isrgate/next` says how old in `x-isrgate-age-ms`). Dated
/// when it was asked, the copy would count as newer than the refresh's render and the RSC would
/// stay from the older render; dated at its render, the refresh still stores its own RSC.
#[tokio::test]
async fn an_older_copy_asked_after_the_refresh_does_not_outrank_its_render() {
    use isrgate::cache::key::Variant;
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/app", app_page("h0", "r0", "MISS", "MISS"));
    })
    .await;
    let gw = gateway(&origin, &r, true).await;
    let c = Client::default();
    let url = gw.url("/app");
    let html = [("host", "site.test")];
    let rsc = [("rsc", "1"), ("host", "site.test")];
    assert_eq!(&c.get(&url, &html).await.body[..], b"h0");
    settled(&gw).await;
    advance(&gw, 61);

    // The refresh's regeneration and then the RSC miss reach the replica and are held there.
    let (render, copy) = (Gate::new(), Gate::new());
    let held = isr("h1", "REVALIDATED")
        .header("vary", VARY)
        .gated(&render)
        .with_rsc(
            isr("r0", "HIT")
                .content_type("text/x-component")
                .header("vary", VARY)
                .header("x-isrgate-age-ms", "100000")
                .gated(&copy),
        );
    origin.route("/app", held);
    let stale = c.get(&url, &html).await;
    assert_eq!(
        (stale.header("x-cache"), &stale.body[..]),
        ("STALE", &b"h0"[..])
    );
    eventually!(
        10,
        origin.count("/app") == 2,
        "the regeneration reached the replica"
    );
    advance(&gw, 1);
    let rsc_key =
        isrgate::cache::key::CacheKey::new("default", "site.test", "/app", None, &Variant::Rsc);
    let cache = gw.state.cache.as_ref().expect("cache");
    let rest = async {
        eventually!(
            10,
            origin.count("/app") == 3,
            "the RSC miss reached the replica"
        );
        origin.route("/app", app_page("h1", "r1", "REVALIDATED", "HIT"));
        render.open();
        eventually!(
            10,
            cache.flights.followers(rsc_key.hash) == 1,
            "the refresh's RSC read did not wait for the RSC miss"
        );
        copy.open();
    };
    let (first_rsc, ()) = futures_util::join!(c.get(&url, &rsc), rest);
    assert_eq!(&first_rsc.body[..], b"r0");
    settled(&gw).await;

    let html = c.get(&url, &html).await;
    let rsc = c.get(&url, &rsc).await;
    assert_eq!(
        (html.header("x-cache"), &html.body[..]),
        ("HIT", &b"h1"[..])
    );
    assert_eq!((rsc.header("x-cache"), &rsc.body[..]), ("HIT", &b"r1"[..]));
    assert_eq!(
        rsc.header("x-isrgate-age-ms"),
        "",
        "never passed to clients"
    );
    assert_eq!(
        rendered_at(&gw, "/app", Variant::Html),
        rendered_at(&gw, "/app", Variant::Rsc),
        "one render time for both"
    );
    assert_eq!(origin.count("/app"), 4, "the regeneration's RSC read once");
}

/// With the page's first RSC fill held at the replica: its first HTML fill (the replica's stale
/// copy, served and stored as stale), then stale answers until a refresh's regeneration reaches
/// the replica (one that finds the first fill's fleet lock not yet released leaves the render
/// to a later request).
async fn first_html_then_its_refresh(c: &Client, origin: &FakeNext, url: &str) {
    let html = [("host", "site.test")];
    eventually!(
        10,
        origin.count("/app") == 1,
        "the RSC miss reached the replica"
    );
    assert_eq!(&c.get(url, &html).await.body[..], b"h0");
    origin.route("/app", app_page("h1", "r1", "REVALIDATED", "HIT"));
    eventually!(
        10,
        {
            let stale = c.get(url, &html).await;
            assert_eq!(
                (stale.header("x-cache"), &stale.body[..]),
                ("STALE", &b"h0"[..])
            );
            origin.count("/app") == 3
        },
        "no refresh rendered"
    );
}

/// [`app_page`] whose RSC answers wait for `gate`.
fn app_page_rsc_gated(html: &str, rsc: &str, x_nextjs_cache: &str, gate: &Gate) -> Route {
    isr(html, x_nextjs_cache).header("vary", VARY).with_rsc(
        isr(rsc, x_nextjs_cache)
            .content_type("text/x-component")
            .header("vary", VARY)
            .gated(gate),
    )
}

/// A first fill that gets the replica's stale copy serves it as stale (it is what the replica
/// has) and refreshes once, by a regeneration: one render, not one per replica asked.
#[tokio::test]
async fn a_first_fill_of_a_stale_copy_is_served_stale_and_regenerated_once() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/s", isr("old copy", "STALE"));
    })
    .await;
    let gw = gateway(&origin, &r, true).await;
    let c = Client::default();
    let url = gw.url("/s");
    let first = c.get(&url, &[]).await;
    assert_eq!(
        (first.status.as_u16(), &first.body[..]),
        (200, &b"old copy"[..])
    );
    settled(&gw).await;
    origin.route("/s", isr("rendered", "REVALIDATED"));
    let stale = c.get(&url, &[]).await;
    assert_eq!(
        (stale.header("x-cache"), &stale.body[..]),
        ("STALE", &b"old copy"[..]),
        "stored as already stale"
    );
    settled(&gw).await;
    let fresh = c.get(&url, &[]).await;
    assert_eq!(
        (fresh.header("x-cache"), &fresh.body[..]),
        ("HIT", &b"rendered"[..])
    );
    assert_eq!(origin.count("/s"), 2, "the copy, then one regeneration");
    assert_eq!(
        origin.last("/s").expect("seen").headers["x-prerender-revalidate"],
        PREVIEW_MODE_ID
    );
}

/// A gateway finds a page's RSC stale; before its refresh takes its turn, another gateway has
/// refreshed the page as a whole (HTML and RSC of one new render). The HTML is then newer than
/// the stale RSC, as when a miss filled the HTML alone, but the page is current: no second
/// regeneration (two renders of one page in one window, seen in the expiry hammer).
#[tokio::test]
async fn an_rsc_found_stale_before_another_gateway_refreshed_the_page_renders_nothing() {
    use isrgate::cache::key::{CacheKey, Variant};
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/app", app_page("h1", "r1", "MISS", "MISS"));
    })
    .await;
    let g1 = gateway(&origin, &r, true).await;
    let g2 = gateway(&origin, &r, true).await;
    let c = Client::default();
    let html = [("host", "site.test")];
    let rsc = [("rsc", "1"), ("host", "site.test")];
    assert_eq!(&c.get(&g1.url("/app"), &html).await.body[..], b"h1");
    assert_eq!(&c.get(&g1.url("/app"), &rsc).await.body[..], b"r1");
    settled(&g1).await;
    // What g2's lookup finds once the page expires: the first render's RSC.
    let stale_rsc = c.get(&g2.url("/app"), &rsc).await;
    assert_eq!(
        (stale_rsc.header("x-cache"), &stale_rsc.body[..]),
        ("HIT", &b"r1"[..])
    );
    let rsc_key = CacheKey::new("default", "site.test", "/app", None, &Variant::Rsc);
    let cache2 = g2.state.cache.as_ref().expect("cache on");
    let stale = cache2
        .l1
        .get(rsc_key.hash, cache2.clock.now_ms())
        .expect("held");

    // g1 refreshes the page: one regeneration, its RSC read from that render.
    origin.route("/app", app_page("h2", "r2", "REVALIDATED", "HIT"));
    advance(&g1, 61);
    let served = c.get(&g1.url("/app"), &html).await;
    assert_eq!(
        (served.header("x-cache"), &served.body[..]),
        ("STALE", &b"h1"[..])
    );
    settled(&g1).await;
    assert_eq!(
        origin.count("/app"),
        4,
        "two first fills, one regeneration, its RSC"
    );

    // Only now does g2's refresh of the RSC it found stale take its turn.
    advance(&g2, 61);
    let head = http::Request::get("/app")
        .header("host", "site.test")
        .header("rsc", "1")
        .body(())
        .expect("head")
        .into_parts()
        .0;
    let up = isrgate::proxy::fill::upstream_head(&head, &Variant::Rsc);
    isrgate::proxy::refresh::spawn(&g2.state, cache2, rsc_key, up, Variant::Rsc, &stale);
    settled(&g2).await;
    let m = &g2.state.metrics;
    assert_eq!(
        (m.refreshes_of(Refreshed::Current), m.refreshes_run()),
        (1, 0),
        "the refresh found the page current, and rendered nothing"
    );
    assert_eq!(origin.count("/app"), 4, "no second regeneration");
    for (gw, query, body) in [(&g2, &rsc[..], "r2"), (&g2, &html[..], "h2")] {
        let got = c.get(&gw.url("/app"), query).await;
        assert_eq!(
            (got.header("x-cache"), &got.body[..]),
            ("HIT", body.as_bytes())
        );
    }
}
