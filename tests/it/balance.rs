//! Load sharing, retry on connect failure, passive ejection and re-admission, DNS discovery.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use isrgate::config::DnsName;
use isrgate::upstream::discovery::Resolve;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::{Client, Gateway, config};

async fn origins(n: usize) -> Vec<FakeNext> {
    let mut v = Vec::new();
    for i in 0..n {
        let body = format!("replica {i}");
        v.push(
            FakeNext::start(|o| {
                o.route("/p", Route::html(&body));
                o.route("/health", Route::status(200));
            })
            .await,
        );
    }
    v
}

async fn hammer(gw: &Gateway, total: usize, concurrency: usize) -> Vec<u16> {
    let client = Client::default();
    let url = gw.url("/p");
    let mut statuses = Vec::with_capacity(total);
    for _ in 0..total / concurrency {
        let batch = (0..concurrency).map(|_| {
            let (c, u) = (client.clone(), url.clone());
            tokio::spawn(async move {
                c.try_send("GET", &u, &[], Bytes::new())
                    .await
                    .map_or(0, |g| g.status.as_u16())
            })
        });
        for h in futures_util::future::join_all(batch).await {
            statuses.push(h.expect("task"));
        }
    }
    statuses
}

#[tokio::test]
async fn three_replicas_share_load_within_twenty_percent() {
    let os = origins(3).await;
    let urls: Vec<String> = os.iter().map(FakeNext::url).collect();
    let gw = Gateway::start(config(&urls, "", "")).await;
    let statuses = hammer(&gw, 900, 30).await;
    assert!(statuses.iter().all(|s| *s == 200));
    for o in &os {
        let share = o.count("/p") as f64 / 300.0;
        assert!(
            (0.8..=1.2).contains(&share),
            "counts {:?}",
            os.iter().map(|o| o.count("/p")).collect::<Vec<_>>()
        );
    }
}

/// Health checks every second: requests must meet the dead replica before a check does (at
/// 100 ms a check sometimes ejected it first, and no request was ever retried around it).
#[tokio::test]
async fn a_killed_replica_is_retried_around_ejected_and_readmitted() {
    let mut os = origins(3).await;
    let urls: Vec<String> = os.iter().map(FakeNext::url).collect();
    let gw = Gateway::start(config(
        &urls,
        "",
        "[health]\npath = \"/health\"\ninterval = \"1s\"\ntimeout = \"200ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\npassive_failures = 1\nejection = \"300ms\"",
    ))
    .await;
    assert!(hammer(&gw, 60, 10).await.iter().all(|s| *s == 200));
    os[1].stop().await;
    // Mid-run: every GET still succeeds; the ones that drew the dead replica were retried.
    let statuses = hammer(&gw, 300, 10).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "failed GETs: {statuses:?}"
    );
    assert!(
        gw.state.metrics.upstream_retries.get() >= 1,
        "retry on connect failure observed"
    );
    assert!(
        gw.state.metrics.replica_ejections.get() >= 1,
        "dead replica ejected"
    );
    let dead = os[1].url().trim_start_matches("http://").to_owned();
    let dead_healthy = || {
        gw.state.upstream.replicas().with(|l| {
            l.iter()
                .any(|r| r.authority.as_str() == dead && r.is_healthy())
        })
    };
    eventually!(
        10,
        !dead_healthy(),
        "dead replica must be marked unhealthy by checks"
    );
    let before = os[1].count("/p");
    os[1].restart().await;
    eventually!(
        10,
        dead_healthy(),
        "replica must be re-admitted after it comes back"
    );
    assert!(hammer(&gw, 300, 10).await.iter().all(|s| *s == 200));
    assert!(
        os[1].count("/p") > before + 30,
        "re-admitted replica takes traffic again"
    );
}

#[tokio::test]
async fn all_replicas_down_is_a_502_and_a_stalled_one_a_504() {
    let mut dead = origins(1).await;
    let url = dead[0].url();
    dead[0].stop().await;
    let gw = Gateway::start(config(&[url], "", "")).await;
    let got = Client::default().get(&gw.url("/p"), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.body, "Upstream unavailable\n");
    assert!(!got.header("x-request-id").is_empty());

    let slow = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("late").delay(std::time::Duration::from_secs(3)),
        );
    })
    .await;
    let gw = Gateway::start(config(
        &[slow.url()],
        "",
        "[upstream]\nresponse_header_timeout = \"200ms\"",
    ))
    .await;
    let got = Client::default().get(&gw.url("/p"), &[]).await;
    assert_eq!(got.status, 504);
    assert_eq!(got.body, "Upstream timed out\n");
}

/// A resolver whose answer the test changes; it counts the lookups it answered.
#[derive(Default)]
struct ScriptedResolver(Mutex<Vec<SocketAddr>>, AtomicUsize);

impl ScriptedResolver {
    /// Lookups answered so far.
    fn asked(&self) -> usize {
        self.1.load(Ordering::SeqCst)
    }
}

impl Resolve for ScriptedResolver {
    fn resolve<'a>(
        &'a self,
        _name: &'a DnsName,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        let addrs = self.0.lock().expect("lock").clone();
        self.1.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { Ok(addrs) })
    }
}

#[tokio::test]
async fn dns_discovery_follows_a_changing_address_set() {
    let os = origins(2).await;
    let resolver = Arc::new(ScriptedResolver::default());
    *resolver.0.lock().expect("lock") = vec![os[0].addr];
    let gw = Gateway::start_resolving(
        config(
            &[],
            "",
            "[upstream]\ndns_name = \"nextjs.svc:3000\"\ndns_refresh = \"50ms\"",
        ),
        resolver.clone(),
    )
    .await;
    let c = Client::default();
    for _ in 0..20 {
        assert_eq!(c.get(&gw.url("/p"), &[]).await.body, "replica 0");
    }
    *resolver.0.lock().expect("lock") = vec![os[1].addr];
    eventually!(
        10,
        gw.state
            .upstream
            .replicas()
            .authorities()
            .iter()
            .map(|a| a.as_str().to_owned())
            .collect::<Vec<_>>()
            == [os[1].addr.to_string()],
        "replica set must follow DNS"
    );
    let before = os[0].count("/p");
    for _ in 0..20 {
        assert_eq!(c.get(&gw.url("/p"), &[]).await.body, "replica 1");
    }
    assert_eq!(os[0].count("/p"), before);
    // An empty answer (a DNS blip) keeps the last set instead of emptying the pool. Lookups
    // run one after another: once three more began, the second (read after the change) was
    // answered empty and handled.
    resolver.0.lock().expect("lock").clear();
    let asked = resolver.asked();
    eventually!(
        10,
        resolver.asked() >= asked + 3,
        "the gateway looks the name up again"
    );
    assert_eq!(c.get(&gw.url("/p"), &[]).await.status, 200);
}

#[tokio::test]
async fn dns_discovery_resolves_for_real_through_the_system_resolver() {
    let os = origins(1).await;
    let name = format!("[upstream]\ndns_name = \"localhost:{}\"", os[0].addr.port());
    let gw = Gateway::start(config(&[], "", &name)).await;
    let got = Client::default().get(&gw.url("/p"), &[]).await;
    assert_eq!(got.status, 200, "localhost resolved through getaddrinfo");
    assert!(
        gw.state
            .upstream
            .replicas()
            .authorities()
            .iter()
            .any(|a| a.as_str() == os[0].addr.to_string()),
        "{:?}",
        gw.state.upstream.replicas().authorities()
    );
}

#[tokio::test]
async fn a_connection_dropped_before_the_response_is_retried_for_idempotent_requests() {
    // Replica A accepts and closes at once, as a replica does when it dies mid-request or
    // closes an idle keep-alive socket the moment it is reused.
    let dropper = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dropper_addr = dropper.local_addr().expect("addr");
    let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&dropped);
    tokio::spawn(async move {
        while let Ok((s, _)) = dropper.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let good = origins(1).await;
    let gw = Gateway::start(config(
        &[format!("http://{dropper_addr}"), good[0].url()],
        "",
        "[health]\ninterval = \"0s\"\npassive_failures = 0",
    ))
    .await;
    let c = Client::default();
    for _ in 0..40 {
        assert_eq!(c.get(&gw.url("/p"), &[]).await.status, 200);
    }
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the dropping replica was tried"
    );
    assert!(gw.state.metrics.upstream_retries.get() > 0);
    // A POST is not retried: it may have changed state in the app.
    let mut saw_502 = false;
    for _ in 0..40 {
        let got = c
            .send("POST", &gw.url("/p"), &[], Bytes::from_static(b"x"))
            .await;
        saw_502 |= got.status == 502;
    }
    assert!(
        saw_502,
        "non-idempotent requests fail instead of being replayed"
    );
}

/// A replica that accepts connections and then answers nothing (a frozen process, a wedged
/// event loop) is found out by one probe after `health.stall_after` and ejected: the GETs
/// waiting on it go to the other replica, and new requests avoid it, long before
/// `response_header_timeout` (here 120 s) or an active health check (off here).
#[tokio::test]
async fn a_replica_that_stops_answering_is_avoided_and_its_gets_go_elsewhere() {
    use crate::support::origin::Gate;
    let frozen_gate = Gate::new();
    let frozen = FakeNext::start(|o| {
        o.route("*", Route::html("frozen").gated(&frozen_gate));
    })
    .await;
    let alive = FakeNext::start(|o| {
        o.route("*", Route::html("alive"));
    })
    .await;
    let gw = Gateway::start(config(
        &[frozen.url(), alive.url()],
        "",
        "[upstream]\nresponse_header_timeout = \"120s\"\n[health]\ninterval = \"0s\"\nstall_after = \"300ms\"\ntimeout = \"300ms\"\n[cache]\nenabled = false\n",
    ))
    .await;
    let client = Client::default();
    let started = std::time::Instant::now();
    // Both replicas get some of these at once; every one is answered by the live replica.
    let all = (0..6).map(|i| {
        let (c, u) = (client.clone(), gw.url(&format!("/page-{i}")));
        tokio::spawn(async move { c.get(&u, &[]).await })
    });
    for got in futures_util::future::join_all(all).await {
        let got = got.expect("task");
        assert_eq!((got.status.as_u16(), &got.body[..]), (200, &b"alive"[..]));
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "answered long before response_header_timeout"
    );
    assert_eq!(gw.state.metrics.replica_ejections.get(), 1);
    assert!(gw.state.metrics.upstream_retries.get() >= 1);
    let sent_to_frozen = frozen.total();
    for i in 0..6 {
        let got = client.get(&gw.url(&format!("/later-{i}")), &[]).await;
        assert_eq!(&got.body[..], b"alive");
    }
    assert_eq!(
        frozen.total(),
        sent_to_frozen,
        "the frozen replica is avoided"
    );
}

/// A replica busy with a slow render still answers a probe: nothing is ejected, the slow
/// request gets its answer.
#[tokio::test]
async fn a_slow_render_is_not_a_stall() {
    let origin = FakeNext::start(|o| {
        o.route(
            "/slow",
            Route::html("slow").delay(std::time::Duration::from_millis(900)),
        );
        o.route("*", Route::status(200));
    })
    .await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "",
        "[health]\ninterval = \"0s\"\nstall_after = \"200ms\"\n[cache]\nenabled = false\n",
    ))
    .await;
    let got = Client::default().get(&gw.url("/slow"), &[]).await;
    assert_eq!((got.status.as_u16(), &got.body[..]), (200, &b"slow"[..]));
    assert_eq!(gw.state.metrics.replica_ejections.get(), 0);
}
