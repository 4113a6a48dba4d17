//! The dashboard in a real browser: headless Chromium (`support::chromium`, Debian's
//! `chromium`, installed by `.ci/run`) against a gateway with traffic and a real
//! `redis-server`. It signs in, checks the numbers against `/api/stats`, submits the purge
//! form, sees the Redis-down banner after Redis is killed, and saves screenshots to
//! `target/test-artifacts/`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::chromium::{Chromium, ConsoleErrors, Tab};
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, config};

const TOKEN: &str = "browser-test-token";

/// Waits until the page shows `expr`.
async fn until(page: &mut Tab<ConsoleErrors>, expr: &str, what: &str) {
    assert!(
        page.until(expr, Duration::from_secs(30)).await,
        "timed out waiting for {what}"
    );
}

/// `expr`'s value in the page.
async fn eval(page: &mut Tab<ConsoleErrors>, expr: &str) -> Value {
    page.eval(expr).await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/a",
            Route::html("a").header("cache-control", "s-maxage=60"),
        );
        o.route(
            "/b",
            Route::html("b").header("cache-control", "s-maxage=60"),
        );
    })
    .await;
    let mut cfg = config(
        &[origin.url()],
        "",
        &format!("[redis]\nurl = \"{}\"\n", r.url()),
    );
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = Some(TOKEN.into());
    }
    // A replica of a build (as with @isrgate/next): the builds panel shows it.
    origin.set_build(Some("build-7"));
    let gw = Gateway::start(cfg).await;
    crate::eventually!(
        10,
        gw.state.deploy.current().is_some(),
        "the replica's build is current"
    );
    let c = Client::default();
    for p in ["/a", "/a", "/a", "/b"] {
        c.get(&gw.url(p), &[]).await;
    }
    let admin = format!("http://{}", gw.admin.expect("admin listener"));
    let chromium = Chromium::launch(1400, 1600, &[]).await;
    let mut page = chromium.tab(ConsoleErrors::default()).await;

    // Sign in through the form.
    page.call("Page.navigate", json!({ "url": format!("{admin}/") }))
        .await;
    until(
        &mut page,
        "document.querySelector('input[name=token]')",
        "the sign-in form",
    )
    .await;
    page.eval(&format!(
        "document.querySelector('input[name=token]').value = '{TOKEN}'; document.forms[0].submit(); true"
    ))
    .await;
    until(&mut page, "document.getElementById('total') && /^[0-9]+$/.test(document.getElementById('total').textContent)", "the dashboard's numbers").await;

    // The numbers match /api/stats.
    let stats: Value = serde_json::from_slice(
        &c.get(
            &format!("{admin}/api/stats"),
            &[("authorization", &format!("Bearer {TOKEN}"))],
        )
        .await
        .body,
    )
    .expect("stats");
    for (id, key) in [("total", "total"), ("hits", "hit"), ("misses", "miss")] {
        let shown = eval(
            &mut page,
            &format!("document.getElementById('{id}').textContent"),
        )
        .await;
        assert_eq!(shown, stats["requests"][key].to_string(), "#{id}");
    }
    assert_eq!(stats["requests"]["hit"], 2);
    let replica = eval(&mut page, "document.getElementById('replicas').textContent").await;
    assert!(
        replica
            .as_str()
            .is_some_and(|t| t.contains(&origin.addr.to_string()) && t.contains("healthy"))
    );
    let builds = eval(&mut page, "document.getElementById('builds').textContent").await;
    assert!(
        builds.as_str().is_some_and(|t| t.contains("build-7")
            && t.contains("1 of 1")
            && t.contains("current")),
        "{builds}"
    );
    page.screenshot("dashboard.png", true)
        .await
        .expect("screenshot");

    // The purge form runs the webhook's code: /a is a miss afterwards, and the log shows it.
    page.eval("document.getElementById('purge-path').value = '/a'; document.getElementById('purge-mode').value = 'hard'; document.getElementById('purge-go').click(); true").await;
    until(
        &mut page,
        "document.getElementById('purge-result').textContent.startsWith('done: epoch ')",
        "the purge result",
    )
    .await;
    assert_eq!(c.get(&gw.url("/a"), &[]).await.header("x-cache"), "MISS");
    until(
        &mut page,
        "document.getElementById('log').textContent.includes('epoch ')",
        "the purge in the log",
    )
    .await;

    // Redis dies: the banner says so.
    r.kill();
    until(
        &mut page,
        "document.getElementById('banners').textContent.includes('Redis is down')",
        "the Redis-down banner",
    )
    .await;
    until(
        &mut page,
        "document.getElementById('log').textContent.includes('unavailable')",
        "the log says it cannot be read",
    )
    .await;
    page.screenshot("dashboard-redis-down.png", true)
        .await
        .expect("screenshot");
    page.eval("1").await;
    assert!(
        page.events.0.is_empty(),
        "the page reported {:?}",
        page.events.0
    );
}
