//! A real Next.js rolling deploy (issue 17): `examples/nextjs` built twice, A and B (another
//! id and another page text: `build_b`); two A replicas behind two gateways that also list two
//! ports for B's replicas, not listening yet; a round-robin TCP balancer in front of the
//! gateways. A headless Chromium keeps loading pages through gateway 1, gateway 2 and the
//! balancer in turn (full loads, and from the home page `<Link>` clicks: RSC fetches); a tab
//! opened before the deploy navigates after it; a client keeps asking both gateways for the hot
//! pages, HTML and RSC. Then B's replicas start, the gateways pre-warm B and switch on their
//! own, and A's replicas are stopped.
//!
//! It proves: no page with a failed or 404 asset; no page that failed to hydrate, or whose HTML
//! and JavaScript come from two builds (the page's `data-build` against the build of the
//! script that marked it hydrated); nothing of A served once both gateways switched; every
//! page of the hot set a HIT of B the moment each gateway switched; no client error but Next's
//! own fall-back to a full load ([`is_skew_fallback`]); a hit ratio after the switch at least
//! 0.9 of the one before. It prints issue 17's numbers: client errors, renders of the new build
//! before and after the switch, and the hit ratios of the window after the switch and the
//! window before, 20 s each (`ROLLING_WINDOW_SECS=60` for the minute). Screenshots:
//! `target/test-artifacts/rolling-deploy-{before,after}.png`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use isrgate::AppState;
use isrgate::deploy::rollout::Ledger;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::support::chromium::{Chromium, Events, Tab, script_error};
use super::support::redis::RedisProcess;
use super::support::{Client, Gateway, Got, config, free_port};
use super::{BUILD_B, HOST, ONE_STACK_AT_A_TIME, Replica, build, build_b, rsc_redirect};
use crate::eventually;

/// The hot set the client keeps asking for: every page of the app that the cache keeps.
const HOT: [&str; 5] = ["/", "/isr/one", "/isr/two", "/tagged/1", "/products"];
/// The pages the browser loads: the hot set but `/products`, whose images the example lacks
/// (`/_next/image` answers 400 for them in either build).
const BROWSED: [&str; 4] = ["/", "/isr/one", "/isr/two", "/tagged/1"];
/// Build A's id (next.config's `generateBuildId`).
const BUILD_A: &str = "isrgate-example";
const ADMIN_TOKEN: &str = "e2e-admin";
/// The client's pace: one request per this, alternating gateways.
const PACE: Duration = Duration::from_millis(25);

/// The hit-ratio windows before and after the switch: 20 s, or `ROLLING_WINDOW_SECS`.
fn window() -> Duration {
    let secs = std::env::var("ROLLING_WINDOW_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node/npm, chromium and two Next.js builds; .ci/run runs it when node is present"]
async fn a_browser_never_sees_a_broken_or_old_page_during_a_rolling_deploy() {
    let _serial = ONE_STACK_AT_A_TIME.lock().await;
    let mut fleet = Fleet::start().await;
    let gateways = &fleet.gateways;

    // The traffic: a client on both gateways, and a browser on each gateway and on the
    // balancer in front of both.
    let stop = CancellationToken::new();
    let switched = Arc::new(OnceLock::new());
    let samples = Arc::new(Mutex::new(Vec::new()));
    let client = tokio::spawn(ask_hot_pages(
        gateways.iter().map(|g| g.addr).collect(),
        Arc::clone(&samples),
        stop.clone(),
    ));
    let counted = tokio::spawn(count_fleet(
        gateways
            .iter()
            .map(|g| Arc::clone(&g.state.metrics))
            .collect(),
        stop.clone(),
    ));
    // History goes back by loading the page, never to a document kept from before.
    let chromium = Chromium::launch(1000, 800, &["--disable-features=BackForwardCache"]).await;
    let entries = vec![
        ("gateway 1", gateways[0].url("")),
        ("gateway 2", gateways[1].url("")),
        ("balancer", format!("http://{}", fleet.lb.addr)),
    ];
    let visits = Arc::new(Mutex::new(Vec::new()));
    let browser = tokio::spawn(browse(
        tab(&chromium).await,
        entries,
        Arc::clone(&visits),
        Arc::clone(&switched),
        stop.clone(),
    ));
    let started = Instant::now();
    let visited = |since: Instant| {
        let visits = visits.lock().expect("visits");
        visits.iter().filter(|v| v.started > since).count()
    };
    let (hot, lacking) = fleet
        .until_hot(|| started.elapsed() >= window() && visited(started) >= 3)
        .await;
    let mut failures: Vec<String> = lacking.into_iter().collect();

    // A tab opened before the deploy and left open: it navigates once A is gone.
    let mut old_tab = tab(&chromium).await;
    let old_visit = Instant::now();
    let home = old_tab.load(&format!("http://{}/", fleet.lb.addr)).await;

    // The deploy: B's replicas start on their ports; each gateway switches on its own.
    let watchers: Vec<_> = (0..gateways.len())
        .map(|i| {
            let gw = &gateways[i];
            let (state, hot, b) = (Arc::clone(&gw.state), hot.clone(), fleet.b_urls());
            tokio::spawn(watch_switch(i, state, gw.addr, hot, b))
        })
        .collect();
    let b_started = Instant::now();
    let b = fleet.start_b();
    let mut switches = Vec::new();
    for w in watchers {
        let switch = tokio::time::timeout(Duration::from_secs(240), w)
            .await
            .expect("each gateway switches to build B within the pre-warm timeout")
            .expect("watcher");
        switches.push(switch);
    }
    let first_switch = switches.iter().map(|s| s.at).min().expect("two gateways");
    let complete = switches.iter().map(|s| s.at).max().expect("two gateways");
    switched.set(complete).expect("switched once");

    // The old build goes away; the old tab navigates; traffic goes on for the window after
    // the switch, and until the browser has been through every entry since.
    tokio::task::block_in_place(|| fleet.a.iter_mut().for_each(Replica::stop));
    let a_stopped = Instant::now();
    let old_visit = old_tab.navigate_across(home, old_visit).await;
    visits.lock().expect("visits").push(old_visit);
    eventually!(
        window().as_secs() + 120,
        first_switch.elapsed() >= window() && visited(a_stopped) >= 3,
        "the window after the switch"
    );
    stop.cancel();
    client.await.expect("client");
    let counts = counted.await.expect("counts");
    browser.await.expect("browser");
    drop(chromium);

    let mut renders_after = HashMap::new();
    for r in &b {
        add_renders(&mut renders_after, &r.renders().await);
    }
    let mut gateway_stats = Vec::new();
    for gw in gateways {
        gateway_stats.push(stats(gw).await);
    }
    let report = Report {
        samples: std::mem::take(&mut *samples.lock().expect("samples")),
        visits: std::mem::take(&mut *visits.lock().expect("visits")),
        switches,
        b_started,
        first_switch,
        complete,
        a_stopped,
        renders_after,
        gateway_stats,
        counts,
    };
    failures.extend(report.print_and_check());
    assert!(
        failures.is_empty(),
        "the rolling deploy failed:\n- {}",
        failures.join("\n- ")
    );
}

/// Two replicas of build A, two gateways that also list two ports for build B's replicas
/// (not listening yet), a round-robin balancer in front of the gateways, and Redis.
struct Fleet {
    a: Vec<Replica>,
    b_ports: Vec<u16>,
    gateways: Vec<Gateway>,
    lb: Balancer,
    redis: RedisProcess,
    products: tempfile::TempDir,
}

impl Fleet {
    async fn start() -> Fleet {
        tokio::task::block_in_place(|| {
            build();
            build_b();
        });
        let redis = RedisProcess::start();
        let products = tempfile::tempdir().expect("products dir");
        let a: Vec<Replica> = ["a1", "a2"]
            .iter()
            .map(|id| Replica::start(id, &redis.url(), products.path()))
            .collect();
        let b_ports = vec![free_port(), free_port()];
        let mut urls: Vec<String> = a.iter().map(Replica::url).collect();
        urls.extend(b_ports.iter().map(|p| format!("http://127.0.0.1:{p}")));
        let mut gateways = Vec::new();
        for _ in 0..2 {
            let extra = format!(
                "[redis]\nurl = \"{}\"\n[health]\ninterval = \"200ms\"\n",
                redis.url()
            );
            let mut cfg = config(&urls, "", &extra);
            if let Some(admin) = cfg.admin.as_mut() {
                admin.token = Some(ADMIN_TOKEN.into());
            }
            gateways.push(Gateway::start(cfg).await);
        }
        for gw in &gateways {
            eventually!(
                30,
                current(gw).as_deref() == Some(BUILD_A) && gw.state.deploy.tally().1 == 2,
                "build A current, B's ports down: {:?}",
                gw.state.deploy.tally()
            );
        }
        let lb = Balancer::start([gateways[0].addr, gateways[1].addr]).await;
        Fleet {
            a,
            b_ports,
            gateways,
            lb,
            redis,
            products,
        }
    }

    fn b_urls(&self) -> Vec<String> {
        self.b_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect()
    }

    /// Starts build B's replicas, each in a copy of the build made now (as a new container
    /// starts from its image: its prerendered pages dated now).
    fn start_b(&self) -> Vec<Replica> {
        tokio::task::block_in_place(|| {
            let mut b: Vec<Replica> = ["b1", "b2"]
                .iter()
                .zip(&self.b_ports)
                .map(|(id, port)| {
                    Replica::new(
                        id,
                        build_b(),
                        *port,
                        &self.redis.url(),
                        self.products.path(),
                    )
                })
                .collect();
            b.iter_mut().for_each(Replica::spawn);
            b
        })
    }

    /// Waits until the hot pages are in the hot set (one request in 16 counted, flushed to
    /// Redis every 10 s) and `ready()`; returns the hot set. A hot set still without them a
    /// minute later is reported, and the deploy goes on.
    async fn until_hot(&self, ready: impl Fn() -> bool) -> (Vec<(String, String)>, Option<String>) {
        let state = &self.gateways[0].state;
        let deadline = Instant::now() + Duration::from_secs(60) + window();
        loop {
            let top = hot_set(state).await;
            let hot = HOT
                .iter()
                .all(|p| top.iter().any(|h| h.0 == HOST && h.1 == *p));
            if ready() && (hot || Instant::now() > deadline) {
                println!("the hot set before the deploy: {top:?}");
                let lacking =
                    (!hot).then(|| format!("a minute on, the hot set lacks hot pages: {top:?}"));
                return (top, lacking);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The current build of `gw`.
fn current(gw: &Gateway) -> Option<String> {
    gw.state.deploy.current().map(|p| p.build.clone())
}

/// The hot set as the pre-warm reads it: `deploy.prewarm_paths` pages, as (host, path).
async fn hot_set(state: &AppState) -> Vec<(String, String)> {
    let Ledger::Redis(redis) = &state.deploy.ledger else {
        panic!("the gateways share Redis")
    };
    let n = state.config().deploy.prewarm_paths;
    let top = state
        .deploy
        .hot
        .top(Some(redis), n, isrgate::clock::system_ms());
    top.await.into_iter().map(|h| (h.host, h.path)).collect()
}

/// What a gateway's `/api/stats` says of the rollout and of its requests.
async fn stats(gw: &Gateway) -> Value {
    let got = Client::default()
        .get(
            &format!("http://{}/api/stats", gw.admin.expect("admin listener")),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    let all: Value = serde_json::from_slice(&got.body).expect("stats JSON");
    json!({ "deploy": all["deploy"], "requests": all["requests"] })
}

/// A replica's `/api/renders`.
async fn renders_of(client: &Client, replica: &str) -> Value {
    let got = client.get(&format!("{replica}/api/renders"), &[]).await;
    serde_json::from_slice(&got.body).unwrap_or_default()
}

/// Adds a replica's renders to `all`, by path.
fn add_renders(all: &mut HashMap<String, u64>, renders: &Value) {
    for (path, n) in renders["renders"].as_object().into_iter().flatten() {
        *all.entry(path.clone()).or_default() += n.as_u64().unwrap_or(0);
    }
}

/// The build a page (HTML, or RSC payload) names in its footer (`data-build`).
fn build_in(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let rest = &text[text.find("data-build")? + "data-build".len()..];
    let value = rest.trim_start_matches(['=', '"', ':', '\\']);
    let label: String = value
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    (!label.is_empty()).then_some(label)
}

// ---------------------------------------------------------------------------------------------
// The client on the hot pages.

/// One response the client got.
struct Sample {
    sent: Instant,
    gateway: usize,
    rsc: bool,
    path: &'static str,
    status: u16,
    cache: String,
    build: Option<String>,
}

/// Asks for the hot pages, HTML and RSC, alternating gateways, one request per [`PACE`].
async fn ask_hot_pages(
    gateways: Vec<SocketAddr>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: CancellationToken,
) {
    let client = Client::default();
    let mut tick = tokio::time::interval(PACE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0usize.. {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let gateway = i % gateways.len();
        let path = HOT[(i / 2) % HOT.len()];
        let rsc = (i / (2 * HOT.len())) % 2 == 1;
        let mut headers = vec![("host", HOST)];
        if rsc {
            headers.push(("rsc", "1"));
        }
        let sent = Instant::now();
        let got = fetch(&client, gateways[gateway], path, &headers).await;
        let sample = match got {
            Ok(got) => Sample {
                sent,
                gateway,
                rsc,
                path,
                status: got.status.as_u16(),
                cache: got.header("x-cache").to_owned(),
                build: build_in(&got.body),
            },
            Err(e) => Sample {
                sent,
                gateway,
                rsc,
                path,
                status: 0,
                cache: e,
                build: None,
            },
        };
        samples.lock().expect("samples").push(sample);
    }
}

/// A GET of `path` from the gateway at `addr`; an RSC request follows Next 16's redirect to
/// the URL with its `_rsc` value, as a browser does.
async fn fetch(
    client: &Client,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Got, String> {
    let get = |path: &str| {
        let url = format!("http://{addr}{path}");
        async move { client.try_send("GET", &url, headers, Bytes::new()).await }
    };
    let first = get(path).await?;
    match rsc_redirect(&first) {
        Some(target) => get(target).await,
        None => Ok(first),
    }
}

/// The fleet's cache answers so far: hits (fresh or stale) and misses of both gateways.
struct Count {
    at: Instant,
    hits: u64,
    misses: u64,
}

/// Reads the gateways' counters every 250 ms until `stop`: the hit ratio of all their
/// traffic (browser and client, pages, RSC, assets) over any window.
async fn count_fleet(
    metrics: Vec<Arc<isrgate::metrics::Metrics>>,
    stop: CancellationToken,
) -> Vec<Count> {
    let mut counts = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        counts.push(Count {
            at: Instant::now(),
            hits: metrics
                .iter()
                .map(|m| m.cache_hits.get() + m.cache_stale.get())
                .sum(),
            misses: metrics.iter().map(|m| m.cache_misses.get()).sum(),
        });
        tokio::select! {
            () = stop.cancelled() => return counts,
            _ = tick.tick() => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The switch, seen from each gateway.

/// A page of the hot set asked for the moment a gateway switched.
struct Probe {
    host: String,
    path: String,
    variant: &'static str,
    status: u16,
    cache: String,
    build: Option<String>,
}

/// What a gateway served of its hot set the moment it switched.
struct Switch {
    gateway: usize,
    at: Instant,
    probes: Vec<Probe>,
    /// Renders B's replicas had made by then, by path.
    renders_before: HashMap<String, u64>,
}

/// Waits until `state`'s gateway makes build B current, then at once asks it for every page
/// of `hot_before` (the hot set when the deploy began) and of [`HOT`], HTML and RSC, with no
/// build signal (a new session).
async fn watch_switch(
    gateway: usize,
    state: Arc<AppState>,
    addr: SocketAddr,
    hot_before: Vec<(String, String)>,
    b_replicas: Vec<String>,
) -> Switch {
    loop {
        if state.deploy.current().is_some_and(|p| p.build == BUILD_B) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at = Instant::now();
    // The pages the client made hot, and whatever else the hot set held when the deploy
    // began (pages that became hot since may come after the pre-warm read it).
    let mut hot: Vec<(String, String)> = HOT
        .iter()
        .map(|p| (HOST.to_owned(), (*p).to_owned()))
        .collect();
    for page in hot_before {
        if !hot.contains(&page) {
            hot.push(page);
        }
    }
    let client = Client::default();
    // Renders so far first: the probes below may make some.
    let mut renders_before = HashMap::new();
    for url in &b_replicas {
        add_renders(&mut renders_before, &renders_of(&client, url).await);
    }
    let mut probes = Vec::new();
    for (host, path) in hot {
        for (variant, headers) in [
            ("html", vec![("host", host.as_str())]),
            ("rsc", vec![("host", host.as_str()), ("rsc", "1")]),
        ] {
            let got = fetch(&client, addr, &path, &headers).await;
            let (status, cache, build) = match got {
                Ok(got) => (
                    got.status.as_u16(),
                    got.header("x-cache").to_owned(),
                    build_in(&got.body),
                ),
                Err(e) => (0, e, None),
            };
            probes.push(Probe {
                host: host.clone(),
                path: path.clone(),
                variant,
                status,
                cache,
                build,
            });
        }
    }
    Switch {
        gateway,
        at,
        probes,
        renders_before,
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report {
    samples: Vec<Sample>,
    visits: Vec<Visit>,
    switches: Vec<Switch>,
    b_started: Instant,
    first_switch: Instant,
    complete: Instant,
    a_stopped: Instant,
    renders_after: HashMap<String, u64>,
    gateway_stats: Vec<Value>,
    counts: Vec<Count>,
}

impl Report {
    /// Prints the numbers; returns what failed.
    fn print_and_check(&self) -> Vec<String> {
        let w = window();
        println!("== rolling deploy A -> B (window {} s)", w.as_secs());
        println!(
            "B started; switch on gateway {} after {:.1} s, on both after {:.1} s; A stopped {:.1} s after that",
            self.switches
                .iter()
                .min_by_key(|s| s.at)
                .map_or(0, |s| s.gateway + 1),
            secs(self.b_started, self.first_switch),
            secs(self.b_started, self.complete),
            secs(self.complete, self.a_stopped),
        );
        for s in &self.gateway_stats {
            println!("gateway: {s}");
        }
        let mut failures = self.hot_pages_at_the_switch();
        self.print_renders();
        failures.extend(self.hit_ratios());
        let (client_errors, client_failures) = self.client();
        failures.extend(client_failures);
        failures.extend(self.browser(client_errors));
        failures
    }

    /// Every page of the hot set a HIT of build B when its gateway switched. What the hot set
    /// also counted but no cache keeps (Chromium's `/favicon.ico`, a 404) is only listed.
    fn hot_pages_at_the_switch(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for s in &self.switches {
            let (pages, other): (Vec<&Probe>, Vec<&Probe>) =
                s.probes.iter().partition(|p| p.status != 404);
            let missed: Vec<String> = pages
                .iter()
                .filter(|p| p.cache != "HIT" || p.build.as_deref() != Some("B"))
                .map(|p| format!("{p} of build {:?}", p.build))
                .collect();
            let other: Vec<String> = other.iter().map(ToString::to_string).collect();
            println!(
                "gateway {} at its switch: {} of {} hot pages x variants a HIT of build B; not pages: {other:?}",
                s.gateway + 1,
                pages.len() - missed.len(),
                pages.len()
            );
            if !missed.is_empty() {
                let missed = missed.join(", ");
                failures.push(format!("gateway {} at its switch: {missed}", s.gateway + 1));
            }
        }
        failures
    }

    /// Renders on the new build: the pre-warm's, as the gateway that ran it counts them, and
    /// Next's own (a page served from the build's prerendered copy is no render).
    fn print_renders(&self) {
        for (i, s) in self.gateway_stats.iter().enumerate() {
            let p = &s["deploy"]["prewarm"];
            if !p.is_null() {
                println!(
                    "pre-warm by gateway {}: {} of {} pages x variants done: {} rendered, {} already fresh, {} failed",
                    i + 1,
                    p["done"],
                    p["total"],
                    p["rendered"],
                    p["fresh"],
                    p["failed"]
                );
            }
        }
        let before = self
            .switches
            .iter()
            .min_by_key(|s| s.at)
            .map(|s| s.renders_before.clone())
            .unwrap_or_default();
        let total = |m: &HashMap<String, u64>| m.values().sum::<u64>();
        let mut after: Vec<(String, u64)> = self
            .renders_after
            .iter()
            .map(|(p, n)| (p.clone(), n - before.get(p).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        after.sort();
        let mut before_list: Vec<_> = before.iter().collect();
        before_list.sort();
        println!(
            "renders on build B: {} before the switch {before_list:?}, {} after {after:?}",
            total(&before),
            total(&self.renders_after) - total(&before)
        );
    }

    /// The hit ratio of the window after the switch against the window before: the client's
    /// (the hot pages) and all the gateways' traffic (the browser's too: assets, prefetches).
    fn hit_ratios(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let (w, switch) = (window(), self.first_switch);
        let client = |from: Instant, to: Instant| {
            let answered = self
                .samples
                .iter()
                .filter(|s| s.sent >= from && s.sent < to && s.status == 200);
            let (mut hits, mut all) = (0u64, 0u64);
            for s in answered {
                all += 1;
                hits += u64::from(s.cache == "HIT" || s.cache == "STALE");
            }
            (hits, all)
        };
        let count_at = |t: Instant| {
            self.counts
                .iter()
                .min_by_key(|c| c.at.max(t) - c.at.min(t))
                .map_or((0, 0), |c| (c.hits, c.hits + c.misses))
        };
        let fleet = |from: Instant, to: Instant| {
            let ((h0, a0), (h1, a1)) = (count_at(from), count_at(to));
            (h1 - h0, a1 - a0)
        };
        for (whose, ratio) in [
            (
                "the client's",
                &client as &dyn Fn(Instant, Instant) -> (u64, u64),
            ),
            ("all the gateways' traffic's", &fleet),
        ] {
            let (hb, ab) = ratio(switch - w, switch);
            let (ha, aa) = ratio(switch, switch + w);
            let rb = hb as f64 / ab.max(1) as f64;
            let ra = ha as f64 / aa.max(1) as f64;
            println!(
                "{whose} hit ratio: {rb:.3} ({hb}/{ab}) in the {} s before the switch, {ra:.3} ({ha}/{aa}) in the {} s after: {:.3} of it",
                w.as_secs(),
                w.as_secs(),
                ra / rb.max(f64::EPSILON)
            );
            if ra < 0.9 * rb {
                failures.push(format!(
                    "{whose} hit ratio after the switch {ra:.3} < 0.9 x {rb:.3} before"
                ));
            }
        }
        let misses_after: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.sent >= switch && s.cache == "MISS")
            .map(|s| format!("{s} at +{:.2} s", secs(switch, s.sent)))
            .collect();
        println!("client misses after the switch: {misses_after:?}");
        failures
    }

    /// The client: no errors, nothing of A once both gateways switched. Returns its errors.
    fn client(&self) -> (usize, Vec<String>) {
        let mut failures = Vec::new();
        let errors: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.status != 200)
            .map(|s| format!("{s}: {} {}", s.status, s.cache))
            .collect();
        let old: Vec<String> = self
            .samples
            .iter()
            .filter(|s| s.sent > self.complete && s.build.as_deref() != Some("B"))
            .map(|s| format!("{s}: build {:?}", s.build))
            .collect();
        println!(
            "client: {} requests, {} errors, {} not of build B after the switch",
            self.samples.len(),
            errors.len(),
            old.len()
        );
        if !errors.is_empty() {
            failures.push(format!("client errors: {}", errors.join("; ")));
        }
        if !old.is_empty() {
            failures.push(format!("not build B after the switch: {}", old.join("; ")));
        }
        (errors.len(), failures)
    }

    /// The browser: no failed asset, no error but Next's fall-back to a full load, every page
    /// hydrated by its own build's JavaScript, only B once both gateways switched.
    fn browser(&self, client_errors: usize) -> Vec<String> {
        let mut failures = Vec::new();
        let views = self.visits.iter().flat_map(|v| &v.views);
        println!(
            "browser: {} visits, {} pages ({} by client-side navigation)",
            self.visits.len(),
            views.clone().count(),
            views.filter(|v| v.soft).count()
        );
        let mut by_phase = [0usize; 3];
        for v in &self.visits {
            by_phase[usize::from(v.started > self.first_switch)
                + usize::from(v.started > self.complete)] += 1;
        }
        println!(
            "browser visits: {} before the switch, {} during, {} after",
            by_phase[0], by_phase[1], by_phase[2]
        );
        let mut skew_fallbacks = Vec::new();
        for v in &self.visits {
            let at = if v.started >= self.b_started {
                format!("+{:.1}", secs(self.b_started, v.started))
            } else {
                format!("-{:.1}", secs(v.started, self.b_started))
            };
            let what = |fail: &str| format!("visit at {at} s via {} of {}: {fail}", v.via, v.page);
            if !v.asset_failures.is_empty() {
                failures.push(what(&format!("assets {}", v.asset_failures.join(", "))));
            }
            let (fallbacks, errors): (Vec<&String>, Vec<&String>) =
                v.errors.iter().partition(|e| is_skew_fallback(e));
            if !errors.is_empty() {
                let errors: Vec<&str> = errors.iter().map(|e| e.as_str()).collect();
                failures.push(what(&format!("client errors {}", errors.join(" | "))));
            }
            skew_fallbacks.extend(fallbacks.into_iter().map(|f| what(f)));
            for view in &v.views {
                if !view.hydrated {
                    failures.push(what(&format!("{} did not hydrate", view.path)));
                } else if view.html_build != view.js_build {
                    failures.push(what(&format!(
                        "{} mixes builds: HTML {}, JavaScript {}",
                        view.path, view.html_build, view.js_build
                    )));
                }
                if v.started > self.complete && view.html_build != "B" {
                    failures.push(what(&format!(
                        "{} of build {} after the switch",
                        view.path, view.html_build
                    )));
                }
            }
        }
        let reloaded: Vec<String> = self
            .visits
            .iter()
            .flat_map(|v| v.views.iter().map(move |view| (v, view)))
            .filter(|(_, view)| view.reloaded)
            .map(|(v, view)| format!("{} via {}", view.path, v.via))
            .collect();
        println!("client-side navigations that reloaded the page (a build change): {reloaded:?}");
        let browser_errors: usize = self.visits.iter().map(|v| v.errors.len()).sum();
        println!(
            "client errors: {} ({client_errors} of the client, {browser_errors} in the browser, of which {} Next's own fall-back to a full load on a payload of another build: {skew_fallbacks:?})",
            client_errors + browser_errors,
            skew_fallbacks.len()
        );
        failures
    }
}

/// Seconds from `a` to `b`.
fn secs(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64()
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rsc = if self.rsc { " (rsc)" } else { "" };
        write!(f, "{}{rsc} on gateway {}", self.path, self.gateway + 1)
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = self;
        write!(
            f,
            "{}{} {}: {} {}",
            p.host, p.path, p.variant, p.status, p.cache
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The browser loop.

/// One visit: a full load, and on the home page client-side navigations from it.
struct Visit {
    started: Instant,
    via: &'static str,
    page: &'static str,
    views: Vec<View>,
    /// `/_next/static/` requests that failed or did not answer 200.
    asset_failures: Vec<String>,
    /// Console errors, exceptions, failed requests.
    errors: Vec<String>,
}

/// A page as the browser showed it.
struct View {
    path: String,
    /// The build the page's HTML (or RSC payload) names.
    html_build: String,
    /// The build of the JavaScript that hydrated it.
    js_build: String,
    hydrated: bool,
    /// A client-side navigation.
    soft: bool,
    /// A client-side navigation that ended in a full load (Next does so when the payload is
    /// of another build).
    reloaded: bool,
}

/// Loads and navigates pages through `entries` in turn until `stop`.
async fn browse(
    mut tab: Tab<Observer>,
    entries: Vec<(&'static str, String)>,
    visits: Arc<Mutex<Vec<Visit>>>,
    switched: Arc<OnceLock<Instant>>,
    stop: CancellationToken,
) {
    let mut shot_after = false;
    for i in 0usize.. {
        if stop.is_cancelled() {
            return;
        }
        let (via, base) = &entries[i % entries.len()];
        let page = BROWSED[(i / entries.len()) % BROWSED.len()];
        let started = Instant::now();
        let mut views = Vec::new();
        if let Some(view) = tab.load(&format!("{base}{page}")).await {
            let home = view.path == "/" && view.hydrated;
            views.push(view);
            if home {
                for link in ["/isr/one", "/tagged/1"] {
                    let Some(view) = tab.click(link).await else {
                        break;
                    };
                    let ok = view.hydrated;
                    views.push(view);
                    if !ok || !tab.back_home().await {
                        break;
                    }
                }
            }
        }
        if i == 0 {
            tab.shot("rolling-deploy-before.png").await;
        }
        if !shot_after && switched.get().is_some_and(|at| started > *at) {
            tab.shot("rolling-deploy-after.png").await;
            shot_after = true;
        }
        let seen = tab.events.take_seen();
        visits.lock().expect("visits").push(Visit {
            started,
            via,
            page,
            views,
            asset_failures: seen.asset_failures,
            errors: seen.errors,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// A round-robin TCP balancer: each connection to the next gateway, as an L4 load balancer.

struct Balancer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(targets: [SocketAddr; 2]) -> Balancer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("balancer binds");
        let addr = listener.local_addr().expect("balancer address");
        let task = tokio::spawn(async move {
            for n in 0usize.. {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                let target = targets[n % targets.len()];
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Balancer { addr, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The browser: the shared DevTools driver (`support::chromium`), with the Network and Log
// domains on and a hook that records every failed request, console error and exception.

/// How long a page may take to load and hydrate on a busy machine.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the browser reported since the last [`Observer::take_seen`].
#[derive(Default)]
struct Seen {
    asset_failures: Vec<String>,
    errors: Vec<String>,
}

/// The e2e's hook on a tab's events: request id → URL while the request runs, and [`Seen`].
#[derive(Default)]
struct Observer {
    urls: HashMap<String, String>,
    seen: Seen,
}

impl Observer {
    fn take_seen(&mut self) -> Seen {
        std::mem::take(&mut self.seen)
    }
}

impl Events for Observer {
    const DOMAINS: &'static [&'static str] = &["Log", "Network"];

    /// Records what an event says went wrong.
    fn event(&mut self, event: &str, p: &Value) {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        if let Some(error) = script_error(event, p) {
            self.seen.errors.push(error);
            return;
        }
        match event {
            "Network.requestWillBeSent" => {
                self.urls
                    .insert(text(&p["requestId"]), text(&p["request"]["url"]));
            }
            "Network.responseReceived" => {
                let url = text(&p["response"]["url"]);
                let status = p["response"]["status"].as_u64().unwrap_or(0);
                if is_asset(&url) && status != 200 {
                    self.seen.asset_failures.push(format!("{status} {url}"));
                } else if status >= 400 && !is_favicon(&url) {
                    self.seen.errors.push(format!("{status} {url}"));
                }
            }
            "Network.loadingFinished" => {
                self.urls.remove(&text(&p["requestId"]));
            }
            "Network.loadingFailed" => {
                let url = self.urls.remove(&text(&p["requestId"])).unwrap_or_default();
                // Requests a navigation cancelled (prefetches of the page left) are no failure.
                let aborted = p["canceled"] == true || p["errorText"] == "net::ERR_ABORTED";
                if aborted || is_favicon(&url) {
                    return;
                }
                let failure = format!("{} {url}", text(&p["errorText"]));
                if is_asset(&url) {
                    self.seen.asset_failures.push(failure);
                } else {
                    self.seen.errors.push(failure);
                }
            }
            "Log.entryAdded" if p["entry"]["level"] == "error" => {
                let url = text(&p["entry"]["url"]);
                if !is_favicon(&url) && !is_asset(&url) {
                    self.seen
                        .errors
                        .push(format!("log: {} {url}", text(&p["entry"]["text"])));
                }
            }
            _ => {}
        }
    }
}

/// A tab of `chromium` that records what goes wrong, with the cache off: every request reaches
/// the gateways, no browser cache between a build and the next.
async fn tab(chromium: &Chromium) -> Tab<Observer> {
    let mut tab = chromium.tab(Observer::default()).await;
    tab.call("Network.setCacheDisabled", json!({ "cacheDisabled": true }))
        .await;
    tab
}

/// The e2e's steps on a page: loads, `<Link>` clicks and what the page shows.
impl Tab<Observer> {
    /// A full load of `url`; `None` when the browser could not navigate at all.
    async fn load(&mut self, url: &str) -> Option<View> {
        // The old document is marked, so the new one is known when it is there.
        self.eval("window.__left = true").await;
        let nav = self
            .try_call("Page.navigate", json!({ "url": url }))
            .await
            .ok()?;
        if let Some(e) = nav["errorText"].as_str() {
            self.events.seen.errors.push(format!("navigate {url}: {e}"));
            return None;
        }
        let loaded = self
            .until(
                "!window.__left && document.readyState === 'complete'",
                PAGE_TIMEOUT,
            )
            .await;
        if !loaded {
            self.events.seen.errors.push(format!("{url} did not load"));
        }
        Some(self.view(false, false).await)
    }

    /// Clicks the `<Link>` to `path` on the page (a client-side navigation) and waits for it.
    async fn click(&mut self, path: &str) -> Option<View> {
        self.eval("window.__left = false").await;
        let clicked = self
            .eval(&format!(
                "(() => {{ const a = document.querySelector('a[href=\"{path}\"]'); a && a.click(); return !!a; }})()"
            ))
            .await;
        if clicked != Some(Value::Bool(true)) {
            self.events.seen.errors.push(format!("no link to {path}"));
            return None;
        }
        let arrived = format!(
            "location.pathname === '{path}' && document.getElementById('render') && document.readyState === 'complete'"
        );
        if !self.until(&arrived, PAGE_TIMEOUT).await {
            self.events
                .seen
                .errors
                .push(format!("navigation to {path} never arrived"));
        }
        let reloaded = self.eval("window.__left !== false").await != Some(Value::Bool(false));
        Some(self.view(true, reloaded).await)
    }

    /// The rest of a visit to the home page loaded (`home`) before the deploy: once A is
    /// gone, client-side navigations to a page its router prefetched and to one it did not
    /// (a dynamic page), each followed by a way back.
    async fn navigate_across(&mut self, home: Option<View>, started: Instant) -> Visit {
        let mut views: Vec<View> = home.into_iter().collect();
        for link in ["/isr/two", "/dynamic"] {
            views.extend(self.click(link).await);
            self.back_home().await;
        }
        let seen = self.events.take_seen();
        Visit {
            started,
            via: "a tab left open across the deploy (balancer)",
            page: "/",
            views,
            asset_failures: seen.asset_failures,
            errors: seen.errors,
        }
    }

    /// Back to the home page (the router's own history, no request), hydrated.
    async fn back_home(&mut self) -> bool {
        self.eval("history.back()").await;
        self.until(
            "location.pathname === '/' && document.querySelector('h1')?.textContent === 'isrgate example' && document.documentElement.dataset.hydrated",
            PAGE_TIMEOUT,
        )
        .await
    }

    /// The page now: its path, its build, and whether (and by which build) it hydrated.
    async fn view(&mut self, soft: bool, reloaded: bool) -> View {
        let hydrated = self
            .until("document.documentElement.dataset.hydrated", PAGE_TIMEOUT)
            .await;
        let page = self
            .eval(
                "({ path: location.pathname, html: document.getElementById('build')?.dataset.build ?? '', js: document.documentElement.dataset.hydrated ?? '' })",
            )
            .await
            .unwrap_or_default();
        let field = |k: &str| page[k].as_str().unwrap_or_default().to_owned();
        View {
            path: field("path"),
            html_build: field("html"),
            js_build: field("js"),
            hydrated,
            soft,
            reloaded,
        }
    }

    /// A screenshot of the viewport; none when the page cannot be captured now.
    async fn shot(&mut self, name: &str) {
        let _ = self.screenshot(name, false).await;
    }
}

/// Next's client, given an RSC payload of another build for a client-side navigation (a tab
/// that loaded the old build navigates after the switch, with no build signal to route it by:
/// the app sets no `deploymentId`), logs this and loads the page in full: the recovery the
/// README describes, counted apart from other client errors.
fn is_skew_fallback(error: &str) -> bool {
    error.contains("Failed to fetch RSC payload")
        && error.contains("Falling back to browser navigation")
}

/// A build asset: content-hashed, the same bytes in every build that has it.
fn is_asset(url: &str) -> bool {
    url.contains("/_next/static/")
}

/// Chromium asks for `/favicon.ico` on its own; the example has none.
fn is_favicon(url: &str) -> bool {
    url.ends_with("/favicon.ico")
}
