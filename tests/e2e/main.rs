//! End to end against real Next.js (issue 7): `examples/nextjs` built once (`npm ci`,
//! `next build`), three `next start` replicas on free ports (each in its own copy of the
//! build, so each has its own on-disk ISR cache), a real `redis-server`, two gateways
//! in-process. Every process started here is stopped by PID on drop; one stack runs at a time.
//! `isr_expiry` holds the "one render per ISR expiry, never back in time" tests;
//! `rolling_deploy` builds the app a second time (build B) and watches a deploy from A to B
//! in headless Chromium.
//!
//! Ignored by default (it needs `node`, `npm` and about a minute): `.ci/run` runs it with
//! `cargo test --test e2e -- --ignored` when `node` is present. `NEXT_DIR` picks another copy
//! of the app: `tests/e2e/next16.sh` makes one on Next 16.4.6 and runs these tests against it
//! (`next_version.sh` for any version; `.ci/run` runs the package's tests on 14.2 too).

#[allow(unused_macros, unused_imports)]
#[path = "../it/support/mod.rs"]
mod support;

mod app_revalidation;
mod isr_expiry;
mod rolling_deploy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use isrgate::config::Config;
use isrgate::invalidate::webhook::Secrets;
use serde_json::Value;
use support::redis::RedisProcess;
use support::{Client, Gateway, Got, config};

const WEBHOOK_SECRET: &str = "e2e-webhook";
const REPLICA_SECRET: &str = "e2e-replica";

fn app_dir() -> PathBuf {
    std::env::var_os("NEXT_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nextjs"),
        PathBuf::from,
    )
}

/// `npm ci` + `next build`, once per test binary: build A, whose id is `isrgate-example`.
fn build() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = app_dir();
        if !dir.join("node_modules/.package-lock.json").exists() {
            let out = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&dir)
                .output()
                .expect("npm");
            assert!(
                out.status.success(),
                "npm ci: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        next_build(&dir, &[]);
        dir
    })
}

/// Build B of the same app (`rolling_deploy`), once per test binary: its sources copied to a
/// scratch directory under `target/` ([`link_modules`]), built with another id
/// (`BUILD_ID`, read by next.config's `generateBuildId`) and another page text
/// (`NEXT_PUBLIC_BUILD_LABEL`), so `app_dir()` keeps build A for every other test.
fn build_b() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let a = build();
        let name = a.file_name().map_or("app".into(), |n| n.to_string_lossy());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/e2e")
            .join(format!("{name}-build-b"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in std::fs::read_dir(a).expect("app dir") {
            let entry = entry.expect("app dir entry");
            let to = dir.join(entry.file_name());
            let copied = match entry.file_name().to_str() {
                Some(".next") => continue,
                Some("node_modules") => link_modules(&entry.path(), &entry.path(), &to),
                _ => copy_tree(&entry.path(), &to),
            };
            copied.unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
        }
        next_build(
            &dir,
            &[("BUILD_ID", BUILD_B), ("NEXT_PUBLIC_BUILD_LABEL", "B")],
        );
        dir
    })
}

/// A copy of `node_modules` (`root`) made of hard links: a real directory, because Turbopack
/// (Next 16's bundler) resolves nothing through a symlink that leaves the project. Its own
/// symlinks are kept, made absolute when they point out of it (`@isrgate/next`, installed from
/// a path); a file that cannot be linked (another file system) is copied.
fn link_modules(root: &Path, from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            link_modules(root, &entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from)?;
        let resolved = std::fs::canonicalize(from.parent().unwrap_or(root).join(&target));
        let root = std::fs::canonicalize(root)?;
        match resolved {
            Ok(out) if target.is_relative() && !out.starts_with(&root) => {
                std::os::unix::fs::symlink(out, to)
            }
            _ => std::os::unix::fs::symlink(target, to),
        }
    } else {
        std::fs::hard_link(from, to).or_else(|_| std::fs::copy(from, to).map(drop))
    }
}

/// The id of [`build_b`] (build A's is next.config's default, `isrgate-example`).
const BUILD_B: &str = "isrgate-example-b";

/// `next build` in `dir` with `env` added.
fn next_build(dir: &Path, env: &[(&str, &str)]) {
    let out = Command::new("npx")
        .args(["next", "build"])
        .current_dir(dir)
        .env("NEXT_TELEMETRY_DISABLED", "1")
        .envs(env.iter().copied())
        .output()
        .expect("node and npm must be installed");
    assert!(
        out.status.success(),
        "next build in {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private copy of the app `built` (`node_modules` linked, `.next/cache` left out): like a
/// container, a replica has its own on-disk ISR cache, starting from the build's pages.
fn replica_dir(built: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("isrgate-e2e-replica-")
        .tempdir()
        .expect("temp dir");
    for entry in std::fs::read_dir(built).expect("app dir") {
        let entry = entry.expect("app dir entry");
        let to = dir.path().join(entry.file_name());
        let copied = if entry.file_name() == "node_modules" {
            std::os::unix::fs::symlink(entry.path(), &to)
        } else {
            copy_tree(&entry.path(), &to)
        };
        copied.unwrap_or_else(|e| panic!("copy {}: {e}", entry.path().display()));
    }
    dir
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        // Build caches, and ISR entries a replica may have written there before.
        if from.ends_with(".next/cache") || from.ends_with(".next/server/route-cache") {
            return Ok(());
        }
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)
    } else {
        // Dated now: Next dates a prerendered page by its file's mtime, so the build's pages
        // start fresh, as right after a deploy, however long ago `next build` ran.
        std::fs::copy(from, to).map(drop)
    }
}

/// One `next start` replica, in its own copy of the app.
struct Replica {
    port: u16,
    child: Option<Child>,
    id: String,
    /// The fleet's Redis (`ISRGATE_REDIS_URL`: `@isrgate/next` is on) and the product data
    /// every replica shares (`PRODUCTS_DIR`, as a database would be).
    redis_url: String,
    products_dir: PathBuf,
    // Removed after `Drop` has stopped the process.
    dir: tempfile::TempDir,
}

impl Replica {
    /// A replica of build A on a free port, started.
    fn start(id: &str, redis_url: &str, products_dir: &Path) -> Replica {
        let mut r = Replica::new(id, build(), support::free_port(), redis_url, products_dir);
        r.spawn();
        r
    }

    /// A replica of the app `built` on `port`, not started yet ([`Replica::spawn`]).
    fn new(id: &str, built: &Path, port: u16, redis_url: &str, products_dir: &Path) -> Replica {
        Replica {
            port,
            child: None,
            id: id.into(),
            redis_url: redis_url.into(),
            products_dir: products_dir.into(),
            dir: replica_dir(built),
        }
    }

    fn spawn(&mut self) {
        // `next start` itself, not through npx, so the PID we hold is the server's.
        let child = Command::new("node")
            .args([
                "node_modules/next/dist/bin/next",
                "start",
                "-p",
                &self.port.to_string(),
                "-H",
                "127.0.0.1",
            ])
            .current_dir(self.dir.path())
            .env("REPLICA_ID", &self.id)
            .env("REVALIDATE_SECRET", REPLICA_SECRET)
            .env("ISRGATE_REDIS_URL", &self.redis_url)
            .env("PRODUCTS_DIR", &self.products_dir)
            .env("NEXT_TELEMETRY_DISABLED", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("next start");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "replica {} did not start",
                self.id
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `/api/renders` of this replica.
    async fn renders(&self) -> Value {
        let got = Client::default()
            .get(&format!("{}/api/renders", self.url()), &[])
            .await;
        serde_json::from_slice(&got.body).expect("renders JSON")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The build's `previewModeId`, read as the gateway reads it from `upstream.prerender_manifest`
/// (NEXTJS.md §4.1): with it in `x-prerender-revalidate`, a replica renders afresh.
fn preview_mode_id() -> http::HeaderValue {
    let path = build().join(".next/prerender-manifest.json");
    isrgate::config::read_preview_mode_id(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Stack {
    replicas: Vec<Replica>,
    gateways: Vec<Gateway>,
    redis: RedisProcess,
    _products: tempfile::TempDir,
    // Dropped last, after the replicas are stopped.
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

const HOST: &str = "shop.example";

/// One stack at a time: three `next start` per stack on a machine of a few cores, and the ISR
/// tests count renders per 3 s window; concurrent stacks would skew each other's timing.
static ONE_STACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn stack() -> Stack {
    stack_with(|_| {}).await
}

/// The stack with gateways that refresh by on-demand revalidation: the build's
/// `previewModeId` in `webhook.preview_mode_id` (NEXTJS.md §4.1).
async fn stack_revalidating() -> Stack {
    let id = preview_mode_id();
    stack_with(move |cfg| cfg.webhook.preview_mode_id = Some(id.clone())).await
}

/// Redis, three replicas and two gateways on the bus; `configure` edits each gateway's config.
async fn stack_with(configure: impl Fn(&mut Config)) -> Stack {
    let serial = ONE_STACK_AT_A_TIME.lock().await;
    build();
    let redis = RedisProcess::start();
    let products = tempfile::tempdir().expect("products dir");
    let replicas: Vec<Replica> = ["a", "b", "c"]
        .iter()
        .map(|id| Replica::start(id, &redis.url(), products.path()))
        .collect();
    let urls: Vec<String> = replicas.iter().map(Replica::url).collect();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let mut cfg = config(
            &urls,
            "",
            &format!(
                "[redis]\nurl = \"{}\"\n[health]\ninterval = \"0s\"\n[cache]\nnamespace = \"isrgate-example\"\n",
                redis.url()
            ),
        );
        cfg.webhook.secrets = Some(Secrets {
            bearer: WEBHOOK_SECRET.into(),
            hmac: WEBHOOK_SECRET.into(),
        });
        configure(&mut cfg);
        gateways.push(Gateway::start(cfg).await);
    }
    for gw in &gateways {
        eventually!(
            10,
            gw.state
                .cache
                .as_ref()
                .and_then(|c| c.bus())
                .is_some_and(|b| b.is_subscribed())
                && gw
                    .state
                    .cache
                    .as_ref()
                    .is_some_and(|c| c.fleet.live().len() == 1),
            "gateways on the bus"
        );
    }
    Stack {
        replicas,
        gateways,
        redis,
        _products: products,
        _serial: serial,
    }
}

async fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    get_with(&Client::default(), gw, path, headers).await
}

/// [`get`] on a client the caller keeps (its connections are reused).
async fn get_with(client: &Client, gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut all = vec![("host", HOST)];
    all.extend_from_slice(headers);
    client.get(&gw.url(path), &all).await
}

/// An RSC request as a browser makes it. Next 16 answers one without the `_rsc` value it
/// expects with a 307 to the URL carrying it (`nextjs-observed.md` §6); a browser follows it,
/// and so does this. Next 15 answers at once.
async fn rsc_get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    rsc_get_with(&Client::default(), gw, path, headers).await
}

/// [`rsc_get`] on a client the caller keeps.
async fn rsc_get_with(client: &Client, gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    let first = get_with(client, gw, path, headers).await;
    match rsc_redirect(&first) {
        Some(target) => get_with(client, gw, target, headers).await,
        None => first,
    }
}

/// Where Next 16 sends an RSC request without the `_rsc` value it expects (path and query),
/// if `got` is that redirect.
fn rsc_redirect(got: &Got) -> Option<&str> {
    let loc = got.header("location");
    (got.status == 307 && loc.contains("_rsc")).then(|| {
        loc.split_once("://")
            .map_or(loc, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]))
    })
}

/// The render marker of a page: `data-replica`/`data-count` and the render time.
fn marker(got: &Got) -> String {
    let body = String::from_utf8_lossy(&got.body);
    body.split("id=\"render\"")
        .nth(1)
        .and_then(|rest| rest.split("</p>").next())
        .map(str::to_owned)
        .unwrap_or_default()
}

/// A request straight to one replica, past the gateways.
async fn direct_get(r: &Replica, path: &str) -> Got {
    Client::default()
        .get(&format!("{}{path}", r.url()), &[("host", HOST)])
        .await
}

/// How many times `r` rendered `path`.
async fn renders_of(r: &Replica, path: &str) -> u64 {
    r.renders().await["renders"][path].as_u64().unwrap_or(0)
}

async fn total_renders(stack: &Stack, path: &str) -> u64 {
    let mut n = 0;
    for r in &stack.replicas {
        n += r.renders().await["renders"][path].as_u64().unwrap_or(0);
    }
    n
}

async fn webhook(gw: &Gateway, body: &str) -> Value {
    let got = Client::default()
        .send(
            "POST",
            &gw.url("/_isrgate/revalidate"),
            &[
                ("authorization", &format!("Bearer {WEBHOOK_SECRET}")),
                ("host", HOST),
            ],
            Bytes::from(body.to_owned()),
        )
        .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    serde_json::from_slice(&got.body).expect("webhook JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node/npm and a Next.js build; .ci/run runs it when node is present"]
async fn real_nextjs_behind_two_gateways() {
    let mut s = stack().await;
    let (g1, g2) = (&s.gateways[0], &s.gateways[1]);

    // Stampede: 100 concurrent cold requests through both gateways → 1 render in total.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let url = s.gateways[i % 2].url("/isr/three");
        tasks.push(tokio::spawn(async move {
            Client::default().get(&url, &[("host", HOST)]).await
        }));
    }
    let mut bodies = std::collections::HashSet::new();
    for t in tasks {
        let got = t.await.expect("request");
        assert_eq!(got.status, 200);
        bodies.insert(marker(&got));
    }
    assert_eq!(
        total_renders(&s, "/isr/three").await,
        1,
        "one render across 3 replicas"
    );
    assert_eq!(bodies.len(), 1, "everyone got the same render");

    // RSC and HTML never answer each other, both from cache.
    for _ in 0..2 {
        let html = get(g1, "/isr/one", &[]).await;
        assert!(html.header("content-type").starts_with("text/html"));
        let rsc = rsc_get(g2, "/isr/one", &[("rsc", "1")]).await;
        assert_eq!(rsc.header("content-type"), "text/x-component");
        assert!(!String::from_utf8_lossy(&rsc.body).starts_with("<!DOCTYPE"));
    }
    assert_eq!(
        rsc_get(g1, "/isr/one", &[("rsc", "1")])
            .await
            .header("x-cache"),
        "HIT"
    );
    assert_eq!(get(g2, "/isr/one", &[]).await.header("x-cache"), "HIT");
    let prefetch = rsc_get(
        g1,
        "/isr/two",
        &[("rsc", "1"), ("next-router-prefetch", "1")],
    )
    .await;
    assert_eq!(prefetch.status, 200);
    assert_eq!(prefetch.header("content-type"), "text/x-component");

    // Split brain gone: a path revalidation reaches every replica and both gateways. Each
    // replica holds the page first; afterwards each renders it again when asked.
    for r in &s.replicas {
        assert_eq!(direct_get(r, "/isr/one").await.status, 200);
    }
    let mut held = Vec::new();
    for r in &s.replicas {
        held.push(renders_of(r, "/isr/one").await);
    }
    let before = marker(&get(g1, "/isr/one", &[]).await);
    webhook(g1, r#"{"paths":["/isr/one"]}"#).await;
    let after1 = marker(&get(g1, "/isr/one", &[]).await);
    let after2 = marker(&get(g2, "/isr/one", &[]).await);
    assert_ne!(after1, before, "a new render after the webhook");
    assert_eq!(after1, after2, "both gateways show the same new render");
    for (r, held) in s.replicas.iter().zip(held) {
        eventually!(
            10,
            {
                direct_get(r, "/isr/one").await;
                renders_of(r, "/isr/one").await > held
            },
            "replica {} dropped its copy",
            r.id
        );
    }

    // Tag revalidation through the webhook, with the tag the page's data uses.
    let t1 = marker(&get(g2, "/tagged/1", &[]).await);
    assert_eq!(get(g2, "/tagged/1", &[]).await.header("x-cache"), "HIT");
    webhook(g2, r#"{"tags":["product-1"],"mode":"hard"}"#).await;
    let t2 = marker(&get(g1, "/tagged/1", &[]).await);
    assert_ne!(t1, t2, "the tagged page was rendered again");

    // Draft mode: the draft client bypasses the cache; others keep the cached page.
    get(g2, "/isr/two", &[]).await;
    let draft = get(g1, "/api/draft", &[]).await;
    let cookies: Vec<String> = draft
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .map(str::to_owned)
        .collect();
    let cookie = cookies.join("; ");
    assert!(cookie.contains("__prerender_bypass"), "{cookie}");
    let drafted = get(g1, "/isr/two", &[("cookie", &cookie)]).await;
    assert_eq!(drafted.header("x-cache"), "BYPASS");
    assert_eq!(get(g2, "/isr/two", &[]).await.header("x-cache"), "HIT");

    // Middleware redirect: Location points at the public host, never a replica.
    let redirect = get(g1, "/old", &[]).await;
    assert_eq!(redirect.status, 307);
    let location = redirect.header("location");
    assert!(!location.contains("127.0.0.1"), "{location}");

    // Header attacks never change what other clients get from the cache.
    let clean = marker(&get(g1, "/isr/two", &[]).await);
    for (name, value) in [
        (
            "x-middleware-subrequest",
            "middleware:middleware:middleware:middleware:middleware",
        ),
        ("x-now-route-matches", "slug=evil"),
        ("x-invoke-status", "500"),
        ("rsc", "0"),
        ("x-nextjs-data", "1"),
    ] {
        let got = get(g2, "/isr/two", &[(name, value)]).await;
        assert!(
            got.status.is_success() || got.status.is_redirection(),
            "{name}: {}",
            got.status
        );
    }
    let attacked = get(g2, "/isr/two?__nextDataReq=1", &[]).await;
    assert!(attacked.status.as_u16() < 500);
    assert_eq!(
        marker(&get(g1, "/isr/two", &[]).await),
        clean,
        "the cached page is unchanged"
    );
    assert!(
        get(g1, "/isr/two", &[])
            .await
            .header("content-type")
            .starts_with("text/html")
    );

    // Restart every replica (a deploy of the same build): no render storm.
    for r in &mut s.replicas {
        r.stop();
    }
    for r in &mut s.replicas {
        r.spawn();
    }
    for path in ["/isr/one", "/isr/two", "/isr/three", "/tagged/1"] {
        assert_eq!(get(g2, path, &[]).await.status, 200);
    }
    assert_eq!(
        total_renders(&s, "/isr/one").await
            + total_renders(&s, "/isr/two").await
            + total_renders(&s, "/isr/three").await
            + total_renders(&s, "/tagged/1").await,
        0,
        "cached pages came from Redis"
    );
}
