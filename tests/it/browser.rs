//! The dashboard in a real browser: headless Chromium (`support::chromium`) against a fleet of
//! three gateways on a real `redis-server`, two replicas and steady traffic. It signs in and
//! walks the on-call states in turn — normal, one replica down, every replica down, Redis down
//! — checking in each that the page shows what matters (fleet rows, errors with their time,
//! latency, renders saved, the route table, readiness, Redis) and that the page's script
//! reported no error; a full-page screenshot of each state goes to `target/test-artifacts/`.
//! Every wait polls the page or the gateway (`Tab::until`, `eventually!`), never a fixed sleep.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::eventually;
use crate::support::chromium::{Chromium, ConsoleErrors, Tab};
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, config};

const TOKEN: &str = "browser-test-token";
/// How long the page may take to show a state on a loaded machine.
const SHOWN: Duration = Duration::from_secs(60);

fn replica() -> impl FnOnce(&crate::support::origin::Routes<'_>) {
    |o| {
        let page = |body: &str, cc: &str| Route::html(body).header("cache-control", cc);
        o.route("/", page("home", "s-maxage=60"));
        for p in ["/blog/a", "/blog/b"] {
            o.route(p, page("post", "s-maxage=30"));
        }
        o.route("/products/1", page("product", "s-maxage=300"));
        o.route("/products/2", page("product", "s-maxage=300"));
        o.route("/about", page("about", "s-maxage=3600"));
        o.route("/search", page("results", "private, no-store"));
    }
}

/// A gateway of the fleet; the first one has the admin token the browser signs in with.
/// Active checks re-admit a replica but take 100 failures to eject one: a stopped replica is
/// ejected by the traffic's failures, which record its last error (an ejection by checks
/// records none, and would race the traffic to the stopped replica).
async fn gateway(replicas: &[String], r: &RedisProcess, token: bool) -> Gateway {
    let extra = format!(
        "[redis]\nurl = \"{}\"\n[health]\ninterval = \"1s\"\nunhealthy_threshold = 100\n[[routes]]\npath = \"/blog/{{slug}}\"\nttl = \"2m\"\n",
        r.url()
    );
    let mut cfg = config(replicas, "", &extra);
    if let (true, Some(admin)) = (token, cfg.admin.as_mut()) {
        admin.token = Some(TOKEN.into());
    }
    Gateway::start(cfg).await
}

/// Requests through `urls` in turn until `stop`, skipped while `paused`: mostly hits, a
/// render of a new product variant and an uncacheable search every ten requests.
fn traffic(urls: Vec<String>, paused: Arc<AtomicBool>, stop: CancellationToken) {
    tokio::spawn(async move {
        let c = Client::default();
        for i in 0usize.. {
            if stop.is_cancelled() {
                return;
            }
            if !paused.load(Relaxed) {
                let path = match i % 10 {
                    0 => format!("/products/2?v={i}"),
                    1 => format!("/search?q={i}"),
                    2 | 3 => "/blog/a".into(),
                    4 => "/blog/b".into(),
                    5 => "/products/1".into(),
                    6 => "/about".into(),
                    _ => "/".into(),
                };
                let url = format!("{}{path}", urls[i % urls.len()]);
                let _ = c.try_send("GET", &url, &[], Bytes::new()).await;
            }
            // The pace of the traffic, not a wait for anything.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
}

async fn stats(c: &Client, admin: &str) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let got = c
        .get(&format!("{admin}/api/stats"), &[("authorization", &auth)])
        .await;
    serde_json::from_slice(&got.body).expect("stats")
}

/// Waits until the page shows `expr`, with the page's text in the failure.
async fn shows(page: &mut Tab<ConsoleErrors>, expr: &str, what: &str) {
    if !page.until(expr, SHOWN).await {
        let text = page.eval("document.body.innerText").await;
        panic!("the dashboard never showed {what} ({expr}); it shows:\n{text:?}");
    }
}

/// The text of the element `id`.
async fn text(page: &mut Tab<ConsoleErrors>, id: &str) -> String {
    let got = page
        .eval(&format!("document.getElementById('{id}').innerText"))
        .await;
    got.and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The page's script reported nothing since the last check (events read so far: the eval
/// reads any that are pending), then a full-page screenshot.
async fn state_checked(page: &mut Tab<ConsoleErrors>, name: &str) {
    page.eval("1").await;
    let errors = std::mem::take(&mut page.events.0);
    assert!(errors.is_empty(), "{name}: the page reported {errors:#?}");
    page.screenshot(name, true)
        .await
        .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_errors_and_outages_in_a_real_browser() {
    let mut r = RedisProcess::start();
    // As in production: bounded, evicting (else the page rightly warns about it).
    r.cli(&["CONFIG", "SET", "maxmemory", "268435456"]);
    r.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let mut one = FakeNext::start(replica()).await;
    let mut two = FakeNext::start(replica()).await;
    // Replicas of a build (as with @isrgate/next): the builds panel and the fleet show it.
    one.set_build(Some("build-7"));
    two.set_build(Some("build-7"));
    let replicas = [one.url(), two.url()];
    let gw = gateway(&replicas, &r, true).await;
    let b = gateway(&replicas, &r, false).await;
    let leaving = gateway(&replicas, &r, false).await;
    eventually!(
        20,
        gw.state.deploy.current().is_some(),
        "the replicas' build is current"
    );
    let admin = format!("http://{}", gw.admin.expect("admin listener"));
    let c = Client::default();
    let (paused, stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
    let _stop = stop.clone().drop_guard();
    traffic(
        vec![gw.url(""), gw.url(""), b.url(""), leaving.url("")],
        Arc::clone(&paused),
        stop,
    );

    let chromium = Chromium::launch(1400, 1000, &[]).await;
    let mut page = chromium.tab(ConsoleErrors::default()).await;
    page.call(
        "Page.navigate",
        serde_json::json!({ "url": format!("{admin}/") }),
    )
    .await;
    shows(
        &mut page,
        "document.querySelector('input[name=token]')",
        "the sign-in form",
    )
    .await;
    page.eval(&format!(
        "document.querySelector('input[name=token]').value = '{TOKEN}'; document.forms[0].submit(); true"
    ))
    .await;

    // Normal: three live gateways with their rates, routes, renders saved, charts.
    shows(
        &mut page,
        "document.body.dataset.rendered && document.querySelectorAll('#fleet tr:not(.gone)').length === 3",
        "three live gateways",
    )
    .await;
    shows(
        &mut page,
        "[...document.querySelectorAll('#fleet tr')].every((r) => /[0-9.]+ %/.test(r.children[6].textContent))",
        "a hit ratio for every gateway, from successive snapshots",
    )
    .await;
    shows(
        &mut page,
        "document.querySelector('#chart-ratio polyline') && document.querySelector('#chart-latency polyline')",
        "charts of at least three samples",
    )
    .await;
    let fleet = text(&mut page, "fleet").await;
    assert!(
        fleet.contains("build-7") && fleet.contains("this gateway"),
        "{fleet}"
    );
    assert!(fleet.contains(env!("CARGO_PKG_VERSION")), "{fleet}");
    let routes = text(&mut page, "routes").await;
    for route in ["/blog/{slug}", "/products/*", "/about/*", "/"] {
        assert!(routes.contains(route), "{route} in {routes}");
    }
    assert!(
        routes.contains("≤ 5 min"),
        "the route's ttl of 2 min: {routes}"
    );
    let rendered = text(&mut page, "rendered").await;
    assert!(rendered.contains("/search"), "{rendered}");
    let errors = text(&mut page, "errors").await;
    assert!(errors.contains("no server error since"), "{errors}");
    assert_eq!(text(&mut page, "ready").await, "ready");
    let redis = text(&mut page, "redis").await;
    for fact in ["connected", "evicted keys", "keyspace hit rate", "memory"] {
        assert!(redis.contains(fact), "{fact} in {redis}");
    }
    // A period without traffic is a gap in a chart, not a zero.
    let drawn = page
        .eval(
            "(() => { const s = document.createElementNS('http://www.w3.org/2000/svg', 'svg'); s.style.width = '300px'; s.style.height = '120px'; document.body.append(s);
              chart(s, [0, 5, 10, 15, 20], [{ values: [0.5, null, 0.7, 0.8, 0.9], color: '#fff' }], { max: 1, fmt: String });
              const out = [s.querySelectorAll('polyline').length, s.querySelectorAll('circle').length]; s.remove(); return out; })()",
        )
        .await;
    assert_eq!(
        drawn,
        Some(serde_json::json!([1, 1])),
        "one lone point, one line"
    );

    state_checked(&mut page, "dashboard.png").await;

    // The numbers are this gateway's /api/stats (traffic paused so they hold still).
    paused.store(true, Relaxed);
    eventually!(
        30,
        {
            let s = stats(&c, &admin).await;
            let mut same = true;
            for (id, key) in [("total", "total"), ("hits", "hit"), ("misses", "miss")] {
                let shown = text(&mut page, id).await.parse::<u64>().ok();
                same &= shown.is_some() && shown == s["requests"][key].as_u64();
            }
            same
        },
        "the dashboard's counters are /api/stats's"
    );
    let builds = text(&mut page, "builds").await;
    assert!(
        builds.contains("build-7") && builds.contains("2 of 2") && builds.contains("current"),
        "{builds}"
    );

    // The purge form runs the webhook's code: /about is a miss afterwards, and the log shows it.
    page.eval("document.getElementById('purge-path').value = '/about'; document.getElementById('purge-mode').value = 'hard'; document.getElementById('purge-go').click(); true").await;
    shows(
        &mut page,
        "document.getElementById('purge-result').textContent.startsWith('done: epoch ')",
        "the purge result",
    )
    .await;
    assert_eq!(
        c.get(&gw.url("/about"), &[]).await.header("x-cache"),
        "MISS"
    );
    shows(
        &mut page,
        "document.getElementById('log').textContent.includes('epoch ')",
        "the purge in the log",
    )
    .await;
    paused.store(false, Relaxed);

    // One replica down and one gateway gone: the replica is ejected, the gateway greyed.
    two.stop().await;
    drop(leaving);
    shows(
        &mut page,
        "document.getElementById('replicas').textContent.includes('ejected')",
        "the stopped replica ejected",
    )
    .await;
    shows(
        &mut page,
        "document.querySelectorAll('#fleet tr.gone').length === 1",
        "the stopped gateway as gone",
    )
    .await;
    shows(
        &mut page,
        "document.getElementById('replicas').textContent.includes('ago')",
        "the replica's last error with its time",
    )
    .await;
    state_checked(&mut page, "dashboard-replica-down.png").await;

    // Every replica down: new pages are 502s, listed with their time; pages past their
    // freshness are served stale-if-error; the gateway stays ready (the cache serves).
    one.stop().await;
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.clock.advance(Duration::from_secs(301));
    shows(
        &mut page,
        "/502/.test(document.getElementById('errors').textContent) && document.getElementById('errors').textContent.includes('ago')",
        "the 502s with their time",
    )
    .await;
    shows(
        &mut page,
        "document.getElementById('t-502').classList.contains('alert') && document.getElementById('t-sie').classList.contains('alert') && Number(document.getElementById('e-sie').textContent) > 0",
        "the 502 and stale-if-error tiles lit",
    )
    .await;
    shows(
        &mut page,
        "document.getElementById('banners').textContent.includes('server errors')",
        "the server-error banner",
    )
    .await;
    shows(
        &mut page,
        "last.series.some((p) => p.errors_per_s > 0) && last.series.some((p) => p.stale_if_error_per_s > 0)",
        "a sampled interval with 5xx and stale-if-error answers (the chart's)",
    )
    .await;
    assert_eq!(text(&mut page, "ready").await, "ready");
    state_checked(&mut page, "dashboard-replicas-down.png").await;

    // Redis down (the replicas back): said so in the banner, the Redis panel and the fleet;
    // no "of unlimited".
    one.restart().await;
    two.restart().await;
    shows(
        &mut page,
        "!document.getElementById('replicas').textContent.includes('ejected')",
        "the replicas back in rotation",
    )
    .await;
    r.kill();
    shows(
        &mut page,
        "document.getElementById('banners').textContent.includes('Redis is down')",
        "the Redis-down banner",
    )
    .await;
    shows(
        &mut page,
        "document.getElementById('redis').textContent.includes('Redis down') && document.getElementById('fleet-note').textContent.includes('Redis is down')",
        "Redis down in its panel and the fleet's note",
    )
    .await;
    shows(
        &mut page,
        "document.getElementById('log').textContent.includes('unavailable')",
        "the log says it cannot be read",
    )
    .await;
    let body = page
        .eval("document.body.innerText")
        .await
        .unwrap_or_default();
    assert!(
        !body.to_string().contains("unlimited"),
        "no memory limit is claimed while Redis is down"
    );
    state_checked(&mut page, "dashboard-redis-down.png").await;
}
