//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `.ci/run`) driven over the DevTools protocol against a gateway with traffic and a real
//! `redis-server`. It signs in, checks the numbers against `/api/stats`, submits the purge
//! form, sees the Redis-down banner after Redis is killed, and saves screenshots to
//! `target/test-artifacts/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, config};

const TOKEN: &str = "browser-test-token";

/// A headless Chromium, killed on drop.
struct Chromium {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One DevTools page session.
struct Page {
    ws: Ws,
    next: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// [`Page::call`], with DevTools' error answer returned.
    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next += 1;
        let id = self.next;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("send to chromium");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .expect("chromium answers")
                .expect("devtools socket open")
                .expect("devtools frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("devtools JSON");
            if v["id"] == id {
                return match v.get("error") {
                    Some(_) => Err(v),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits until `expr` is truthy in the page.
    async fn until(&mut self, expr: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // An evaluation the page's navigation interrupted (a form just submitted) is
            // "not yet", not a failure.
            let asked = json!({
                "expression": format!("Boolean({expr})"),
                "returnByValue": true,
            });
            let r = self.try_call("Runtime.evaluate", asked).await;
            if r.is_ok_and(|r| r["result"]["value"] == true) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, name: &str) {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let b64 = shot["data"].as_str().expect("png data");
        let png = base64_decode(b64);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).expect("artifact dir");
        std::fs::write(dir.join(name), png).expect("write screenshot");
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = A.iter().position(|a| *a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

async fn launch() -> (Chromium, Page) {
    let dir = std::env::temp_dir().join(format!("isrgate-chromium-{}", std::process::id()));
    let mut child = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--window-size=1400,1600",
            &format!("--user-data-dir={}", dir.display()),
            "about:blank",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium must be installed (.ci/run installs Debian's chromium)");
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…" on stderr.
    let stderr = child.stderr.take().expect("stderr");
    let port = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                return rest.split('/').next().and_then(|p| p.parse::<u16>().ok());
            }
        }
        None
    })
    .await
    .expect("reader")
    .expect("chromium printed its DevTools address");
    let chromium = Chromium { child, dir };
    let list = Client::default()
        .get(&format!("http://127.0.0.1:{port}/json/list"), &[])
        .await;
    let targets: Value = serde_json::from_slice(&list.body).expect("targets");
    let ws_url = targets
        .as_array()
        .and_then(|t| t.iter().find(|t| t["type"] == "page"))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_owned();
    let (ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("devtools socket");
    let mut page = Page { ws, next: 0 };
    page.call("Page.enable", json!({})).await;
    page.call("Runtime.enable", json!({})).await;
    (chromium, page)
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
    let (_chromium, mut page) = launch().await;

    // Sign in through the form.
    page.call("Page.navigate", json!({ "url": format!("{admin}/") }))
        .await;
    page.until(
        "document.querySelector('input[name=token]')",
        "the sign-in form",
    )
    .await;
    page.eval(&format!(
        "document.querySelector('input[name=token]').value = '{TOKEN}'; document.forms[0].submit(); true"
    ))
    .await;
    page.until("document.getElementById('total') && /^[0-9]+$/.test(document.getElementById('total').textContent)", "the dashboard's numbers").await;

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
        let shown = page
            .eval(&format!("document.getElementById('{id}').textContent"))
            .await;
        assert_eq!(shown, stats["requests"][key].to_string(), "#{id}");
    }
    assert_eq!(stats["requests"]["hit"], 2);
    let replica = page
        .eval("document.getElementById('replicas').textContent")
        .await;
    assert!(
        replica
            .as_str()
            .is_some_and(|t| t.contains(&origin.addr.to_string()) && t.contains("healthy"))
    );
    let builds = page
        .eval("document.getElementById('builds').textContent")
        .await;
    assert!(
        builds.as_str().is_some_and(|t| t.contains("build-7")
            && t.contains("1 of 1")
            && t.contains("current")),
        "{builds}"
    );
    page.screenshot("dashboard.png").await;

    // The purge form runs the webhook's code: /a is a miss afterwards, and the log shows it.
    page.eval("document.getElementById('purge-path').value = '/a'; document.getElementById('purge-mode').value = 'hard'; document.getElementById('purge-go').click(); true").await;
    page.until(
        "document.getElementById('purge-result').textContent.startsWith('done: epoch ')",
        "the purge result",
    )
    .await;
    assert_eq!(c.get(&gw.url("/a"), &[]).await.header("x-cache"), "MISS");
    page.until(
        "document.getElementById('log').textContent.includes('epoch ')",
        "the purge in the log",
    )
    .await;

    // Redis dies: the banner says so.
    r.kill();
    page.until(
        "document.getElementById('banners').textContent.includes('Redis is down')",
        "the Redis-down banner",
    )
    .await;
    page.until(
        "document.getElementById('log').textContent.includes('unavailable')",
        "the log says it cannot be read",
    )
    .await;
    page.screenshot("dashboard-redis-down.png").await;
}
