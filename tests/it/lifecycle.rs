//! Running under an orchestrator (issue 18): what `/readyz` and `/healthz` mean, the accept
//! grace after SIGTERM, and a second gateway on the same port. Gateways in-process on real
//! sockets; staleness driven by the gateway's clock, never by sleeping.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isrgate::config::DnsName;
use isrgate::upstream::discovery::Resolve;
use isrgate::{Options, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::eventually;
use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, bus_live, config, settled};

/// Checks every 100 ms; a replica is out after one failed check, back after one good one.
const FAST_CHECKS: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"200ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n";

async fn readyz(gw: &Gateway) -> (u16, serde_json::Value) {
    let url = format!("http://{}/readyz", gw.admin.expect("admin listener"));
    let got = Client::default().get(&url, &[]).await;
    let body = serde_json::from_slice(&got.body)
        .unwrap_or_else(|e| panic!("/readyz is JSON ({e}): {:?}", got.body));
    (got.status.as_u16(), body)
}

/// One request on a connection of its own (not a pooled one): whether a new connection is
/// accepted and served.
async fn on_a_new_connection(gw: &Gateway, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(gw.addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("no answer in 10 s"))??;
    Ok(answer)
}

/// A resolver that answers nothing until the test opens it: start-up waits on its first look.
struct HeldResolver(tokio::sync::Semaphore);

impl Resolve for HeldResolver {
    fn resolve<'a>(
        &'a self,
        _name: &'a DnsName,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let _ = self.0.acquire().await;
            Ok(Vec::new())
        })
    }
}

#[tokio::test]
async fn not_ready_before_the_start_up_look_but_alive() {
    let resolver = Arc::new(HeldResolver(tokio::sync::Semaphore::new(0)));
    // The first DNS look is bounded by dns_refresh (at least 2 s): long enough to look at.
    let cfg = config(
        &[],
        "",
        "[upstream]\ndns_name = \"nextjs.svc:3000\"\ndns_refresh = \"60s\"",
    );
    let server = Server::bind(
        cfg,
        Options {
            resolver: Arc::clone(&resolver) as Arc<dyn Resolve>,
            ..Options::default()
        },
    )
    .expect("binds");
    let (admin, state) = (server.admin_addr().expect("admin"), server.state());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(server.run(shutdown));
    let c = Client::default();
    let get = |path: &str| {
        let (c, url) = (c.clone(), format!("http://{admin}{path}"));
        async move { c.try_send("GET", &url, &[], bytes::Bytes::new()).await }
    };
    eventually!(
        10,
        get("/healthz").await.is_ok(),
        "the admin port answers during start-up"
    );
    let ready = get("/readyz").await.expect("readyz");
    let body: serde_json::Value = serde_json::from_slice(&ready.body).expect("json");
    assert_eq!(ready.status, 503, "{body}");
    assert_eq!(
        (&body["reason"], &body["started"], &body["accepting"]),
        (&"starting".into(), &false.into(), &false.into()),
        "{body}"
    );
    assert!(!*state.started.borrow());

    resolver.0.close();
    eventually!(
        10,
        get("/readyz").await.is_ok_and(|r| r.status == 200),
        "ready once the start-up look is done"
    );
}

#[tokio::test]
async fn ready_while_the_cache_serves_stale_with_every_replica_down() {
    let r = RedisProcess::start();
    let mut origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("good").header("cache-control", "s-maxage=60, stale-if-error=600"),
        );
    })
    .await;
    let extra = format!("[redis]\nurl = \"{}\"\n{FAST_CHECKS}", r.url());
    let gw = Gateway::start(config(&[origin.url()], "", &extra)).await;
    eventually!(10, bus_live(&gw), "bus subscribed");
    eventually!(10, readyz(&gw).await.0 == 200, "ready once started");
    let (_, ready) = readyz(&gw).await;
    assert_eq!(ready["reason"], serde_json::Value::Null, "{ready}");
    assert_eq!(ready["started"], true, "{ready}");
    assert_eq!(ready["cache"], "on", "{ready}");

    let c = Client::default();
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "MISS");
    let cache = gw.state.cache.as_ref().expect("cache on");
    settled(&gw).await;

    origin.stop().await;
    eventually!(
        10,
        readyz(&gw).await.1["replicas_healthy"] == 0,
        "the dead replica is seen unhealthy"
    );
    cache.clock.advance(Duration::from_secs(61));
    let got = c.get(&gw.url("/p"), &[]).await;
    assert_eq!((got.status.as_u16(), &got.body[..]), (200, &b"good"[..]));
    assert_eq!(
        got.header("cache-status"),
        "isrgate; hit; detail=stale-if-error"
    );
    let (status, ready) = readyz(&gw).await;
    assert_eq!(
        status, 200,
        "the cache hides the outage: the gateway stays in the Service: {ready}"
    );
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["replicas"], 1, "{ready}");
}

#[tokio::test]
async fn without_the_cache_no_healthy_replica_is_not_ready() {
    let mut origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p"));
    })
    .await;
    let extra = format!("[cache]\nenabled = false\n{FAST_CHECKS}");
    let gw = Gateway::start(config(&[origin.url()], "", &extra)).await;
    eventually!(10, readyz(&gw).await.0 == 200, "ready with its replica");
    origin.stop().await;
    eventually!(
        10,
        readyz(&gw).await.0 == 503,
        "nothing to serve: not ready"
    );
    let (_, ready) = readyz(&gw).await;
    assert_eq!(ready["reason"], "no_healthy_replica", "{ready}");
    assert_eq!(ready["cache"], "off", "{ready}");
}

#[tokio::test]
async fn not_ready_while_draining_and_alive_until_the_end() {
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route("/slow", Route::html("slow").gated(&gate));
    })
    .await;
    let mut gw = Gateway::start(config(&[origin.url()], "shutdown_grace = \"30s\"", "")).await;
    assert_eq!(readyz(&gw).await.0, 200);
    let url = gw.url("/slow");
    let in_flight = tokio::spawn(async move { Client::default().get(&url, &[]).await });
    eventually!(10, origin.count("/slow") == 1, "a request in flight");

    let run = gw.shutdown();
    eventually!(10, readyz(&gw).await.0 == 503, "not ready once stopping");
    let (_, ready) = readyz(&gw).await;
    assert_eq!(
        (&ready["reason"], &ready["draining"], &ready["accepting"]),
        (&"draining".into(), &true.into(), &false.into()),
        "no accept grace here: draining at once: {ready}"
    );
    let health = format!("http://{}/healthz", gw.admin.expect("admin"));
    assert_eq!(
        Client::default().get(&health, &[]).await.status,
        200,
        "alive while draining: a liveness probe must not restart a draining gateway"
    );

    gate.open();
    assert_eq!(in_flight.await.expect("task").status, 200);
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("drained once the request is done")
        .expect("task");
}

#[tokio::test]
async fn during_the_accept_grace_new_connections_are_served_then_refused() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p"));
    })
    .await;
    // Long enough for a loaded machine to check inside it.
    let grace = Duration::from_secs(10);
    let mut gw = Gateway::start(config(&[origin.url()], "accept_grace = \"10s\"", "")).await;
    assert!(
        on_a_new_connection(&gw, "/p")
            .await
            .expect("served")
            .starts_with("HTTP/1.1 200")
    );

    let asked = Instant::now();
    let run = gw.shutdown();
    eventually!(
        10,
        readyz(&gw).await.0 == 503,
        "not ready at once, accept grace or not"
    );
    let (_, ready) = readyz(&gw).await;
    assert_eq!(
        (&ready["draining"], &ready["accepting"]),
        (&true.into(), &true.into()),
        "{ready}"
    );
    let answer = on_a_new_connection(&gw, "/p").await;
    assert!(
        !gw.state.draining.is_cancelled(),
        "the machine was too slow to check inside the grace"
    );
    let answer = answer.expect("a new connection within the accept grace is accepted");
    assert!(answer.starts_with("HTTP/1.1 200"), "served: {answer}");

    eventually!(
        30,
        TcpStream::connect(gw.addr).await.is_err(),
        "the listener closes after the accept grace"
    );
    assert!(
        asked.elapsed() >= grace,
        "closed only after the grace: {:?}",
        asked.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("drained")
        .expect("task");
}

/// What `Server::bind` says for `config`: the error's text, or `None` when it bound.
fn bind_error(config: isrgate::Config) -> Option<String> {
    match Server::bind(config, Options::default()) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

#[tokio::test]
async fn a_second_gateway_on_the_same_port_is_refused_with_the_key_to_set() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p"));
    })
    .await;
    // Several workers: their sockets share the port among themselves, and no one else.
    let first = Gateway::start(config(&[origin.url()], "workers = 2", "")).await;
    for workers in ["workers = 1", "workers = 2"] {
        let mut second = config(&[origin.url()], workers, "");
        second.listen.addr = first.addr;
        let err = bind_error(second).unwrap_or_else(|| panic!("{workers}: bound a port in use"));
        assert!(
            err.contains(&format!("cannot listen on {} (listen.addr)", first.addr)),
            "{err}"
        );
        assert!(
            err.to_lowercase().contains("address already in use"),
            "{err}"
        );
        assert!(err.contains("listen.reuse_port = true"), "{err}");
    }
    // The first one still has the port to itself.
    let served: Vec<Got> = {
        let c = Client::default();
        let mut all = Vec::new();
        for _ in 0..3 {
            all.push(c.get(&first.url("/p"), &[]).await);
        }
        all
    };
    assert!(served.iter().all(|g| g.status == 200));

    // The admin listener is never shared either.
    let mut admin = config(&[origin.url()], "", "");
    admin.admin.as_mut().expect("admin on").listen = first.admin.expect("admin");
    let err = bind_error(admin).expect("admin port in use");
    assert!(err.contains("(admin.listen)"), "{err}");
}

#[tokio::test]
async fn with_reuse_port_two_gateways_share_the_port() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p"));
    })
    .await;
    let shared = "workers = 2\nreuse_port = true";
    let no_cache = "[cache]\nenabled = false\n";
    let first = Gateway::start(config(&[origin.url()], shared, no_cache)).await;
    let mut cfg = config(&[origin.url()], shared, no_cache);
    cfg.listen.addr = first.addr;
    let second = Gateway::start(cfg).await;
    assert_eq!(second.addr, first.addr);
    // New connections are spread over both processes' sockets by the kernel (4-tuple hash):
    // 40 of them all landing on one gateway is a one-in-2^39 chance.
    for _ in 0..40 {
        let answer = on_a_new_connection(&first, "/p").await.expect("served");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let (a, b) = (
        first.state.metrics.requests.get(),
        second.state.metrics.requests.get(),
    );
    assert_eq!(a + b, 40);
    assert!(a > 0 && b > 0, "both served: {a} and {b}");
}

/// The configuration shipped in `deploy/kubernetes/configmap.yaml` is one isrgate accepts, keys
/// and values (what `isrgate check-config` would say of it), with the shutdown timing that
/// `deployment.yaml`'s terminationGracePeriodSeconds is computed from (`validate.sh` checks
/// that arithmetic).
#[test]
fn the_kubernetes_configmap_is_a_valid_configuration() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/configmap.yaml"
    );
    let yaml = std::fs::read_to_string(path).expect("configmap.yaml");
    // The block scalar under `isrgate.toml: |`, its four spaces of indentation removed.
    let toml: String = yaml
        .lines()
        .skip_while(|l| l.trim() != "isrgate.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    assert!(toml.contains("[listen]"), "no isrgate.toml in {path}");
    let config = isrgate::config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(config.listen.accept_grace, Duration::from_secs(5));
    assert_eq!(config.listen.shutdown_grace, Duration::from_secs(30));
    assert!(!config.listen.reuse_port);
    assert_eq!(
        config.upstream.dns_name.map(|n| (n.host, n.port)),
        Some(("nextjs-headless".to_owned(), 3000))
    );
}
