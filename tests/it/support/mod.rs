//! Test harness: real sockets on port 0, everything stopped on `Drop`.
//! - [`origin::FakeNext`]: a scripted Next.js-like origin.
//! - [`Gateway`]: isrgate started in-process (`Server::bind` + `run`).
//! - [`Client`]: a small HTTP/1.1 client returning status, headers and the whole body.
//! - [`redis::RedisProcess`]: a real `redis-server` on a free port (cache issues on).
//! - [`process::KillOnDrop`], [`process::on_free_ports`]: child processes killed on drop,
//!   started again on other ports when theirs was taken.
//! - [`chromium::Chromium`]: headless Chromium over DevTools (the dashboard, and the e2e's
//!   rolling deploy).
//! - [`eventually!`]: poll a condition with a deadline instead of sleeping.

#![allow(dead_code)]

pub mod chromium;
pub mod origin;
pub mod process;
pub mod redis;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use isrgate::config::{self, Config};
use isrgate::upstream::discovery::Resolve;
use isrgate::{AppState, Options, Server};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Polls `$cond` every 10 ms until it is true or `$secs` seconds pass, then panics with `$msg`.
#[macro_export]
macro_rules! eventually {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond { break; }
            if std::time::Instant::now() > deadline { panic!($($msg)+); }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }};
}

/// A config with both listeners on port 0 and `upstreams` as replicas. `listen_extra` is TOML
/// lines for `[listen]`; `extra` is TOML with section headers of its own, merged into the same
/// sections (so `[upstream]` in `extra` adds to the replicas line instead of repeating the table).
pub fn config(upstreams: &[String], listen_extra: &str, extra: &str) -> Config {
    // A test's shutdown has no load balancer to wait for: no accept grace unless it asks.
    let accept_grace = if listen_extra.contains("accept_grace") {
        ""
    } else {
        "accept_grace = \"0s\""
    };
    let mut sections: Vec<(String, Vec<String>)> = vec![
        (
            "listen".into(),
            vec![
                "addr = \"127.0.0.1:0\"".into(),
                accept_grace.into(),
                listen_extra.into(),
            ],
        ),
        (
            "upstream".into(),
            vec![format!(
                "replicas = [{}]",
                upstreams
                    .iter()
                    .map(|u| format!("{u:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        ),
        ("admin".into(), vec!["listen = \"127.0.0.1:0\"".into()]),
        // Many gateways share this test process: its RSS is no one gateway's to govern
        // (`tests/it/memory.rs` runs the binary, governor on).
        ("cache".into(), vec!["l1_governor = false".into()]),
    ];
    let mut current = String::from("listen");
    for line in extra.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            current = name.to_owned();
            if !sections.iter().any(|(n, _)| *n == current) {
                sections.push((current.clone(), Vec::new()));
            }
        } else if let Some((_, lines)) = sections.iter_mut().find(|(n, _)| *n == current) {
            lines.push(line.to_owned());
        }
    }
    let text: String = sections
        .iter()
        .map(|(name, lines)| format!("[{name}]\n{}\n", lines.join("\n")))
        .collect();
    config::from_toml(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

/// A running gateway.
pub struct Gateway {
    /// Public address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: Option<SocketAddr>,
    /// Shared state (metrics, replicas).
    pub state: Arc<AppState>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Gateway {
    /// Starts a gateway with `config`.
    pub async fn start(config: Config) -> Gateway {
        Self::start_with(config, Options::default()).await
    }

    /// Starts a gateway with a custom resolver.
    pub async fn start_resolving(config: Config, resolver: Arc<dyn Resolve>) -> Gateway {
        Self::start_with(
            config,
            Options {
                resolver,
                ..Options::default()
            },
        )
        .await
    }

    /// Starts a gateway with `options` (its own resolver, its own access-log subscriber).
    pub async fn start_with(config: Config, options: Options) -> Gateway {
        let server = Server::bind(config, options).expect("gateway binds");
        let (addr, admin, state) = (server.local_addr(), server.admin_addr(), server.state());
        let shutdown = CancellationToken::new();
        let task = Some(tokio::spawn(server.run(shutdown.clone())));
        // Past the start-up look (it asks each replica once for its build), so what a test
        // counts at its replicas is its own traffic.
        let mut started = state.started.subscribe();
        tokio::time::timeout(Duration::from_secs(30), started.wait_for(|s| *s))
            .await
            .expect("the gateway starts within 30 s")
            .expect("the gateway starts");
        Gateway {
            addr,
            admin,
            state,
            shutdown,
            task,
        }
    }

    /// `http://ADDR` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the drain (as SIGTERM does) and returns the task to await.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        self.shutdown.cancel();
        self.task.take().expect("running")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.state.hard_stop.cancel();
    }
}

/// A whole response.
#[derive(Debug)]
pub struct Got {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<HeaderMap>,
}

impl Got {
    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A loopback port no listener holds now and that no other test of this process was given
/// (the kernel may hand the same ephemeral port to two tests that bind port 0 a moment apart).
/// Another process may still take it before the test's child binds it: start children with
/// [`process::on_free_ports`], which tries again on another port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if GIVEN.lock().unwrap_or_else(|p| p.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct Client(HyperClient<HttpConnector, Full<Bytes>>);

impl Default for Client {
    fn default() -> Self {
        Self(HyperClient::builder(TokioExecutor::new()).build_http())
    }
}

impl Client {
    /// GET with extra headers.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Got {
        self.send("GET", url, headers, Bytes::new()).await
    }

    /// Any method.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Got {
        self.try_send(method, url, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"))
    }

    /// Any method; transport errors returned.
    pub async fn try_send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Got, String> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.0.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok(Got {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }
}

/// Waits (up to 30 s) until `gw`'s background cache work is over (`CacheState::tasks`): the
/// fills' body copies and store writes, refreshes, lock releases.
pub async fn settled(gw: &Gateway) {
    let cache = gw.state.cache.as_ref().expect("cache on");
    eventually!(
        30,
        cache.tasks.is_empty(),
        "{} background fills still running",
        cache.tasks.len()
    );
}

/// Whether `gw`'s bus subscription is live (Redis configured, connected and subscribed) and
/// the invalidations it loads on connecting are in (before that, Redis entries are not read).
pub fn bus_live(gw: &Gateway) -> bool {
    gw.state
        .cache
        .as_ref()
        .is_some_and(|c| c.bus().is_some_and(|b| b.is_subscribed()) && c.epochs.is_synced())
}
