//! Headless Chromium (Debian's `chromium`, installed by `.ci/run`) over the DevTools protocol:
//! one driver for the dashboard test (`tests/it/browser.rs`) and the rolling-deploy test
//! (`tests/e2e/rolling_deploy.rs`, which includes this harness by `#[path]`).
//!
//! A [`Tab`] reads DevTools frames only while it waits for the answer to a command, and hands
//! every event it meets on the way to its [`Events`] hook: the dashboard test keeps console
//! errors and exceptions ([`ConsoleErrors`]), the e2e test failed requests too. Events that
//! arrive between commands are read with the next one (any [`Tab::eval`] drains them).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::Client;
use super::process::KillOnDrop;

/// How long one DevTools command may take on a loaded machine.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium, killed on drop (its profile directory removed with it).
pub struct Chromium {
    _child: KillOnDrop,
    /// The DevTools port.
    port: u16,
    _profile: tempfile::TempDir,
}

/// What a tab does with the DevTools events it reads.
pub trait Events: Send {
    /// Domains to enable besides `Page` and `Runtime` (their events come only once enabled).
    const DOMAINS: &'static [&'static str] = &[];

    /// One event: its method (`Runtime.exceptionThrown`) and params.
    fn event(&mut self, method: &str, params: &Value);
}

/// Keeps what says the page's script went wrong: `console.error` and `console.assert`
/// calls, uncaught exceptions, a crashed page.
#[derive(Debug, Default)]
pub struct ConsoleErrors(pub Vec<String>);

impl Events for ConsoleErrors {
    fn event(&mut self, method: &str, params: &Value) {
        self.0.extend(script_error(method, params));
    }
}

/// The error an event reports about the page's script, if it reports one.
pub fn script_error(method: &str, p: &Value) -> Option<String> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    match method {
        "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => {
            let args: Vec<String> = p["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    a["value"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| text(&a["description"]))
                })
                .collect();
            Some(format!("console.error: {}", args.join(" ")))
        }
        "Runtime.exceptionThrown" => {
            let d = &p["exceptionDetails"];
            let what = d["exception"]["description"]
                .as_str()
                .map_or_else(|| text(&d["text"]), str::to_owned);
            Some(format!("exception: {what}"))
        }
        "Inspector.targetCrashed" => Some("the page crashed".into()),
        _ => None,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One DevTools page session; `events` holds what its hook recorded.
pub struct Tab<E> {
    ws: Ws,
    next: u64,
    /// The hook every event read goes to.
    pub events: E,
}

impl Chromium {
    /// Starts Chromium with a window of `width` × `height` and `extra` switches.
    pub async fn launch(width: u32, height: u32, extra: &[&str]) -> Chromium {
        let profile = tempfile::Builder::new()
            .prefix("isrgate-chromium-")
            .tempdir()
            .expect("profile dir");
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--hide-scrollbars",
                &format!("--window-size={width},{height}"),
                &format!("--user-data-dir={}", profile.path().display()),
            ])
            .args(extra)
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium must be installed (.ci/run installs Debian's chromium)");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/…" on stderr, which is
        // read to its end so Chromium never blocks on it.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let port = line
                    .split("ws://127.0.0.1:")
                    .nth(1)
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|p| p.parse::<u16>().ok());
                if let Some(port) = port {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(port);
                    }
                }
            }
        });
        let mut chromium = Chromium {
            _child: KillOnDrop::new(child),
            port: 0,
            _profile: profile,
        };
        chromium.port = tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .expect("chromium starts")
            .expect("chromium printed its DevTools address");
        chromium
    }

    /// A new tab whose events go to `events`, with `Page`, `Runtime` and `E::DOMAINS` on.
    pub async fn tab<E: Events>(&self, events: E) -> Tab<E> {
        let made = Client::default()
            .send(
                "PUT",
                &format!("http://127.0.0.1:{}/json/new?about:blank", self.port),
                &[],
                Bytes::new(),
            )
            .await;
        let target: Value = serde_json::from_slice(&made.body).expect("new target");
        let ws_url = target["webSocketDebuggerUrl"]
            .as_str()
            .expect("a page target")
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("devtools socket");
        let mut tab = Tab {
            ws,
            next: 0,
            events,
        };
        for domain in ["Page", "Runtime"].iter().chain(E::DOMAINS) {
            tab.call(&format!("{domain}.enable"), json!({})).await;
        }
        tab
    }
}

impl<E: Events> Tab<E> {
    /// Sends a command and returns its result; panics on DevTools' error answer.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// Sends a command and reads frames until its answer, handing the events on the way to
    /// the hook; DevTools' error answer is returned.
    pub async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next += 1;
        let id = self.next;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("send to chromium");
        loop {
            let frame = tokio::time::timeout(COMMAND_TIMEOUT, self.ws.next())
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
            if let Some(event) = v["method"].as_str() {
                self.events.event(event, &v["params"]);
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise it returns); `None` while the page has
    /// no context to run it in (a navigation under way) or when it throws.
    pub async fn eval(&mut self, expr: &str) -> Option<Value> {
        let asked = json!({ "expression": expr, "returnByValue": true, "awaitPromise": true });
        let r = self.try_call("Runtime.evaluate", asked).await.ok()?;
        if r.get("exceptionDetails").is_some() {
            return None;
        }
        Some(r["result"]["value"].clone())
    }

    /// Waits until `expr` is truthy in the page, up to `within`; whether it became so.
    pub async fn until(&mut self, expr: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self
                .eval(&format!("Boolean({expr})"))
                .await
                .is_some_and(|v| v == true)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the viewport (`full`: of the whole page, however long) as
    /// `target/test-artifacts/<name>`; where it went, or DevTools' refusal.
    pub async fn screenshot(&mut self, name: &str, full: bool) -> Result<PathBuf, Value> {
        let mut params = json!({ "format": "png" });
        if full {
            let layout = self.try_call("Page.getLayoutMetrics", json!({})).await?;
            let size = &layout["cssContentSize"];
            params["captureBeyondViewport"] = json!(true);
            params["clip"] = json!({
                "x": 0, "y": 0, "scale": 1,
                "width": size["width"], "height": size["height"],
            });
        }
        let shot = self.try_call("Page.captureScreenshot", params).await?;
        let png = base64_decode(shot["data"].as_str().unwrap_or_default());
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).expect("artifact dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        Ok(path)
    }
}

/// Standard base64 (DevTools' screenshots), padding ignored.
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
