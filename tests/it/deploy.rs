//! Two builds side by side (issue 17), with fake replicas that mark their responses with their
//! build (`x-isrgate-build`, as `@isrgate/next` makes a replica do): builds are discovered,
//! each has its own namespace, requests go to the build they name, assets a build lacks come
//! from another, the current build is switched once a new build has its share and agreed by
//! every gateway through Redis, the hot set is pre-rendered before the switch, and a purge
//! reaches every build.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use isrgate::config::DnsName;
use isrgate::upstream::discovery::Resolve;
use serde_json::Value;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, config};

const HOST: &str = "shop.example";
const ISR: &str = "s-maxage=600, stale-while-revalidate=600";
const TOKEN: &str = "test-admin-token";

/// A replica of `build` whose pages say which build rendered them.
async fn replica(build: &str, pages: &[&str]) -> FakeNext {
    let b = build.to_owned();
    let pages: Vec<String> = pages.iter().map(|p| (*p).to_owned()).collect();
    let r = FakeNext::start(move |o| {
        for p in &pages {
            o.route(
                p,
                Route::html(&format!("<p>{p} of build {b}</p>")).header("cache-control", ISR),
            );
        }
        o.route("/", Route::html("ok"));
    })
    .await;
    r.set_build(Some(build));
    r
}

/// The replicas' Service, as DNS discovery sees it (a Kubernetes headless service): replicas
/// join it as a rollout starts them, without reusing anyone's port.
#[derive(Default)]
struct Service(Mutex<Vec<SocketAddr>>);

impl Service {
    fn add(&self, r: &FakeNext) {
        self.0.lock().expect("lock").push(r.addr);
    }
}

impl Resolve for Service {
    fn resolve<'a>(
        &'a self,
        _name: &'a DnsName,
    ) -> Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>
    {
        let addrs = self.0.lock().expect("lock").clone();
        Box::pin(async move { Ok(addrs) })
    }
}

/// A gateway over `replicas`, checking them every 100 ms unless `extra` says otherwise.
async fn gateway(replicas: &[&FakeNext], redis: Option<&RedisProcess>, deploy: &str) -> Gateway {
    gateway_with(replicas, redis, "[health]\ninterval = \"100ms\"\n", deploy).await
}

/// A gateway over the replicas `service` lists, found by DNS every 50 ms.
async fn gateway_over(
    service: &Arc<Service>,
    redis: Option<&RedisProcess>,
    deploy: &str,
) -> Gateway {
    let redis = redis.map_or_else(String::new, |r| format!("[redis]\nurl = \"{}\"\n", r.url()));
    let mut cfg = config(
        &[],
        "",
        &format!(
            "{redis}[upstream]\ndns_name = \"next.svc:3000\"\ndns_refresh = \"50ms\"\n[health]\ninterval = \"100ms\"\n[deploy]\n{deploy}\n"
        ),
    );
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = Some(TOKEN.into());
    }
    Gateway::start_resolving(cfg, Arc::clone(service) as Arc<dyn Resolve>).await
}

async fn gateway_with(
    replicas: &[&FakeNext],
    redis: Option<&RedisProcess>,
    extra: &str,
    deploy: &str,
) -> Gateway {
    let urls: Vec<String> = replicas.iter().map(|r| r.url()).collect();
    let redis = redis.map_or_else(String::new, |r| format!("[redis]\nurl = \"{}\"\n", r.url()));
    let mut cfg = config(&urls, "", &format!("{redis}{extra}[deploy]\n{deploy}\n"));
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = Some(TOKEN.into());
    }
    Gateway::start(cfg).await
}

async fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut all = vec![("host", HOST)];
    all.extend_from_slice(headers);
    Client::default().get(&gw.url(path), &all).await
}

fn body(got: &Got) -> String {
    String::from_utf8_lossy(&got.body).into_owned()
}

async fn stats(gw: &Gateway) -> Value {
    let got = Client::default()
        .get(
            &format!("http://{}/api/stats", gw.admin.expect("admin")),
            &[("authorization", &format!("Bearer {TOKEN}"))],
        )
        .await;
    serde_json::from_slice(&got.body).expect("stats JSON")
}

fn current(gw: &Gateway) -> Option<String> {
    gw.state.deploy.current().map(|p| p.build.clone())
}

#[tokio::test]
async fn builds_are_discovered_namespaced_and_routed_by_every_signal() {
    let a = replica("A", &["/p", "/_next/data/A/p.json"]).await;
    let b = replica("B", &["/p", "/_next/data/B/p.json"]).await;
    let service = Arc::new(Service::default());
    service.add(&a);
    let gw = gateway_over(&service, None, "prewarm_paths = 0").await;
    eventually!(
        10,
        current(&gw).as_deref() == Some("A"),
        "build A discovered and current"
    );

    assert_eq!(body(&get(&gw, "/p", &[]).await), "<p>/p of build A</p>");
    let hit = get(&gw, "/p", &[]).await;
    assert_eq!(hit.header("x-cache"), "HIT");
    assert_eq!(
        hit.header("x-isrgate-build"),
        "",
        "the build mark stays internal"
    );
    // A build that has no replica is no destination: the current build answers.
    assert_eq!(
        get(&gw, "/p", &[("x-deployment-id", "B")])
            .await
            .header("x-cache"),
        "HIT"
    );

    // B comes up: one of two healthy replicas is its share (50 %), so it becomes current.
    service.add(&b);
    eventually!(10, current(&gw).as_deref() == Some("B"), "build B current");
    let fresh = get(&gw, "/p", &[]).await;
    assert_eq!(body(&fresh), "<p>/p of build B</p>", "B's own namespace");
    assert_eq!(fresh.header("x-cache"), "MISS");
    assert_eq!(a.count("/p"), 1);

    // An A client still gets A, from A's namespace, by each signal.
    for (path, headers) in [("/p", vec![("x-deployment-id", "A")]), ("/p?dpl=A", vec![])] {
        let got = get(&gw, path, &headers).await;
        assert_eq!(body(&got), "<p>/p of build A</p>", "{path} {headers:?}");
    }
    let data = get(&gw, "/_next/data/A/p.json", &[]).await;
    assert_eq!(body(&data), "<p>/_next/data/A/p.json of build A</p>");
    assert_eq!(b.count("/_next/data/A/p.json"), 0, "never asked of B");
    assert_eq!(a.count("/p"), 1, "A's entry served from A's namespace");

    let s = stats(&gw).await;
    assert_eq!(s["deploy"]["current"], "B");
    let builds: Vec<&str> = s["deploy"]["builds"]
        .as_array()
        .expect("builds")
        .iter()
        .filter_map(|b| b["build"].as_str())
        .collect();
    assert_eq!(builds, ["B", "A"], "newest first");
}

#[tokio::test]
async fn an_asset_one_build_lacks_comes_from_the_other_and_is_cached_once() {
    let a = FakeNext::start(|o| {
        o.route("/", Route::html("ok"));
        o.route(
            "/_next/static/chunks/a1.js",
            Route::html("a1()")
                .content_type("application/javascript")
                .header("cache-control", "public, max-age=31536000, immutable"),
        );
    })
    .await;
    a.set_build(Some("A"));
    let b = replica("B", &[]).await;
    let gw = gateway(&[&a, &b], None, "prewarm_paths = 0\nswitch_percent = 50").await;
    eventually!(10, gw.state.deploy.tally().0.len() == 2, "both builds seen");
    gw.state.deploy.choose("B", true).await.expect("B chosen");

    for _ in 0..3 {
        let got = get(&gw, "/_next/static/chunks/a1.js", &[]).await;
        assert_eq!(got.status, 200, "A's chunk through a B-current gateway");
        assert_eq!(body(&got), "a1()");
    }
    assert_eq!(
        a.count("/_next/static/chunks/a1.js"),
        1,
        "stored once, build-independent"
    );
    assert!(b.count("/_next/static/chunks/a1.js") <= 1);
    let missing = get(&gw, "/_next/static/chunks/none.js", &[]).await;
    assert_eq!(missing.status, 404, "no build has it");
}

#[tokio::test]
async fn the_switch_is_agreed_by_every_gateway_and_an_operator_can_hold_it() {
    let r = RedisProcess::start();
    let a = replica("A", &["/p"]).await;
    let b = replica("B", &["/p"]).await;
    let service = Arc::new(Service::default());
    service.add(&a);
    let gw1 = gateway_over(&service, Some(&r), "prewarm_paths = 0").await;
    let gw2 = gateway_over(&service, Some(&r), "prewarm_paths = 0").await;
    eventually!(
        10,
        current(&gw1).as_deref() == Some("A") && current(&gw2).as_deref() == Some("A"),
        "A agreed"
    );

    // An operator holds A: B's replicas come up, nothing switches.
    let admin = |gw: &Gateway, body: &str| {
        let url = format!("http://{}/api/deploy", gw.admin.expect("admin"));
        let body = Bytes::from(body.to_owned());
        async move {
            Client::default()
                .send(
                    "POST",
                    &url,
                    &[("authorization", &format!("Bearer {TOKEN}"))],
                    body,
                )
                .await
        }
    };
    assert_eq!(admin(&gw1, r#"{"current":"A"}"#).await.status, 200);
    let refused = admin(&gw1, r#"{"current":"Z"}"#).await;
    assert_eq!(refused.status, 409);
    let error: Value = serde_json::from_slice(&refused.body).expect("JSON");
    assert_eq!(
        error["error"],
        "no healthy replica runs build \"Z\" (builds with healthy replicas: A)"
    );
    assert_eq!(
        admin(&gw1, r#"{"current":"A","auto":true}"#).await.status,
        400
    );
    service.add(&b);
    eventually!(
        10,
        gw2.state
            .deploy
            .tally()
            .0
            .iter()
            .any(|(p, n)| p.build == "B" && *n == 1),
        "B seen"
    );
    // Seen, healthy, half the replicas, but held: a few rollout ticks later A is still current.
    let seen = gw1.state.deploy.status.snapshot().switched_ms;
    for gw in [&gw1, &gw2] {
        eventually!(
            10,
            gw.state.deploy.tally().0.len() == 2,
            "both builds on each gateway"
        );
    }
    assert_eq!(current(&gw1).as_deref(), Some("A"));
    assert_eq!(current(&gw2).as_deref(), Some("A"));

    // Handed back: both gateways move to B, with one switch between them.
    assert_eq!(admin(&gw2, r#"{"auto":true}"#).await.status, 200);
    eventually!(
        10,
        current(&gw1).as_deref() == Some("B") && current(&gw2).as_deref() == Some("B"),
        "B agreed"
    );
    let switched = r.cli(&["HGET", "isr:deploy", "switched_ms"]);
    assert!(switched.trim().parse::<u64>().expect("ms") >= seen);
    assert_eq!(body(&get(&gw1, "/p", &[]).await), "<p>/p of build B</p>");
    assert_eq!(body(&get(&gw2, "/p", &[]).await), "<p>/p of build B</p>");
    assert_eq!(
        get(&gw2, "/p", &[]).await.header("x-cache"),
        "HIT",
        "one namespace for the fleet"
    );
}

#[tokio::test]
async fn a_purge_reaches_every_build() {
    let r = RedisProcess::start();
    let a = replica("A", &["/p"]).await;
    let b = replica("B", &["/p"]).await;
    let gw = gateway(&[&a, &b], Some(&r), "prewarm_paths = 0").await;
    eventually!(10, gw.state.deploy.tally().0.len() == 2, "both builds seen");
    for build in ["A", "B"] {
        get(&gw, "/p", &[("x-deployment-id", build)]).await;
        let hit = get(&gw, "/p", &[("x-deployment-id", build)]).await;
        assert_eq!(hit.header("x-cache"), "HIT", "{build}");
    }
    let cache = gw.state.cache.as_ref().expect("cache");
    let purge = isrgate::invalidate::webhook::parse(
        br#"{"paths":["/p"],"mode":"hard","rewarm":false}"#,
        None,
    )
    .expect("purge");
    isrgate::invalidate::run(&gw.state, cache, &purge, HOST, "test")
        .await
        .expect("purged");
    for (build, replica) in [("A", &a), ("B", &b)] {
        let got = get(&gw, "/p", &[("x-deployment-id", build)]).await;
        assert_eq!(got.header("x-cache"), "MISS", "{build} purged");
        assert_eq!(replica.count("/p"), 2, "{build} rendered again");
    }
}

#[tokio::test]
async fn a_replica_that_answers_for_another_build_is_not_stored_under_the_pinned_one() {
    let a = replica("A", &["/p"]).await;
    // No active checks: only live traffic tells the gateway what the replica runs.
    let gw = gateway_with(
        &[&a],
        None,
        "[health]\ninterval = \"0s\"\n",
        "prewarm_paths = 0",
    )
    .await;
    get(&gw, "/", &[]).await;
    eventually!(10, current(&gw).as_deref() == Some("A"), "A current");
    // Restarted in place on build B: the next request still goes to it as an A replica.
    a.set_build(Some("B"));
    let got = get(&gw, "/p", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-cache"), "MISS");
    assert_eq!(gw.state.metrics.fills_other_build.get(), 1);
    eventually!(
        10,
        current(&gw).as_deref() == Some("B"),
        "B current: A has no replica"
    );
    let again = get(&gw, "/p", &[]).await;
    assert_eq!(again.header("x-cache"), "MISS", "B's namespace was empty");
    assert_eq!(get(&gw, "/p", &[]).await.header("x-cache"), "HIT");
}

#[tokio::test]
async fn isrgate_deploy_switches_holds_and_releases_from_a_shell() {
    let r = RedisProcess::start();
    let a = replica("A", &["/p"]).await;
    let b = replica("B", &["/p"]).await;
    let gw = gateway(&[&a, &b], Some(&r), "prewarm_paths = 0").await;
    eventually!(
        10,
        gw.state.deploy.tally().0.len() == 2 && current(&gw).is_some(),
        "both builds seen, one current"
    );
    let isrgate = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_isrgate"))
            .args(["deploy", "--config", "/dev/null", "--redis", &r.url()])
            .args(args)
            .output()
            .expect("isrgate runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let other = if current(&gw).as_deref() == Some("A") {
        "B"
    } else {
        "A"
    };
    let (code, text) = isrgate(&["switch", other]);
    assert_eq!(code, Some(0), "{text}");
    eventually!(
        10,
        current(&gw).as_deref() == Some(other),
        "the gateway adopts the operator's build"
    );
    let (code, text) = isrgate(&["status"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("current build: {other} (held by an operator")),
        "{text}"
    );
    assert!(
        text.contains("  A  first seen at") && text.contains("  B  first seen at"),
        "{text}"
    );

    let (code, text) = isrgate(&["switch", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        text.contains("no gateway has seen build \"nope\""),
        "{text}"
    );
    assert_eq!(
        current(&gw).as_deref(),
        Some(other),
        "a refused switch changes nothing"
    );

    let (code, text) = isrgate(&["auto"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(r.cli(&["HGET", "isr:deploy", "pinned"]).trim(), "0");
}

#[tokio::test]
async fn a_server_action_of_the_other_build_reaches_the_build_that_knows_it() {
    let a = FakeNext::start(|o| {
        o.route("/", Route::html("ok"));
        o.route(
            "/form",
            Route::status(404).header("x-nextjs-action-not-found", "1"),
        );
    })
    .await;
    a.set_build(Some("A"));
    let b = FakeNext::start(|o| {
        o.route("/", Route::html("ok"));
        o.route("/form", Route::echo());
    })
    .await;
    b.set_build(Some("B"));
    let gw = gateway(&[&a, &b], None, "prewarm_paths = 0").await;
    eventually!(10, gw.state.deploy.tally().0.len() == 2, "both builds seen");
    gw.state.deploy.choose("A", true).await.expect("A current");

    let action = Bytes::from_static(br#"["$K1"]"#);
    let got = Client::default()
        .send(
            "POST",
            &gw.url("/form"),
            &[
                ("host", HOST),
                ("next-action", "7f00b4"),
                ("content-type", "text/plain"),
            ],
            action.clone(),
        )
        .await;
    assert_eq!(got.status, 200, "B knew the action");
    assert_eq!(got.body, action, "the same body, sent again");
    assert_eq!((a.count("/form"), b.count("/form")), (1, 1));
    assert_eq!(gw.state.metrics.action_fallbacks.get(), 1);
}

#[tokio::test]
async fn without_the_package_the_build_is_read_from_the_page_next_wrote() {
    let pages = FakeNext::start(|o| {
        o.route(
            "/",
            Route::html(r#"<script id="__NEXT_DATA__" type="application/json">{"page":"/","buildId":"pages-7"}</script>"#),
        );
        o.route("/p", Route::html("<p>p</p>").header("cache-control", ISR));
    })
    .await;
    let gw = gateway(&[&pages], None, "prewarm_paths = 0").await;
    eventually!(
        10,
        current(&gw).as_deref() == Some("pages-7"),
        "the build id in the health check's page"
    );
    get(&gw, "/p", &[]).await;
    assert_eq!(
        get(&gw, "/p", &[]).await.header("x-cache"),
        "HIT",
        "its namespace serves"
    );
}

/// A replica of `build` whose pages are App Router pages (HTML and RSC).
async fn app_replica(build: &str, pages: &[&str]) -> FakeNext {
    let b = build.to_owned();
    let pages: Vec<String> = pages.iter().map(|p| (*p).to_owned()).collect();
    let r = FakeNext::start(move |o| {
        for p in &pages {
            let rsc = Route::html(&format!("0:{{\"b\":\"{b}\",\"p\":\"{p}\"}}"))
                .content_type("text/x-component")
                .header("cache-control", ISR)
                .header("vary", "RSC, Next-Router-State-Tree, Next-Router-Prefetch");
            o.route(
                p,
                Route::html(&format!("<p>{p} of build {b}</p>"))
                    .header("cache-control", ISR)
                    .header("vary", "RSC, Next-Router-State-Tree, Next-Router-Prefetch")
                    .with_rsc(rsc),
            );
        }
        o.route("/", Route::html("ok"));
    })
    .await;
    r.set_build(Some(build));
    r
}

#[tokio::test]
async fn the_hot_set_is_rendered_on_the_new_build_before_it_becomes_current() {
    let r = RedisProcess::start();
    let hot = ["/h1", "/h2", "/h3", "/h4", "/h5"];
    let a = app_replica("A", &hot).await;
    let b = app_replica("B", &hot).await;
    let service = Arc::new(Service::default());
    service.add(&a);
    let gw = gateway_over(&service, Some(&r), "prewarm_paths = 10\nprewarm_rate = 0").await;
    eventually!(10, current(&gw).as_deref() == Some("A"), "A current");
    // Traffic on A: one request in 16 is counted, so 640 each is plenty.
    for path in hot {
        for _ in 0..640 {
            get(&gw, path, &[]).await;
        }
    }
    for path in hot {
        assert_eq!(a.count(path), 1, "A rendered {path} once");
    }

    service.add(&b);
    eventually!(
        20,
        current(&gw).as_deref() == Some("B"),
        "B current after its pre-warm"
    );
    let prewarm = gw
        .state
        .deploy
        .status
        .snapshot()
        .prewarm
        .expect("a pre-warm ran");
    assert!(prewarm.finished, "{prewarm:?}");
    assert_eq!((prewarm.total, prewarm.failed), (10, 0), "{prewarm:?}");
    for path in hot {
        let html = get(&gw, path, &[]).await;
        assert_eq!(html.header("x-cache"), "HIT", "{path} at the switch");
        assert_eq!(body(&html), format!("<p>{path} of build B</p>"));
        let rsc = get(&gw, path, &[("rsc", "1")]).await;
        assert_eq!(rsc.header("x-cache"), "HIT", "{path} RSC at the switch");
        assert_eq!(b.count(path), 2, "{path}: one HTML and one RSC render on B");
    }
}
