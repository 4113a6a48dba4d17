//! `isrgate tail` follows requests live: across the fleet through Redis (every gateway relays
//! what the filters pass while the tail renews its session), or one gateway through its admin
//! API. Run as an operator runs it, the binary's stdout read line by line.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use crate::support::origin::{FakeNext, Route};
use crate::support::process::KillOnDrop;
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, config};

const BIN: &str = env!("CARGO_BIN_EXE_isrgate");
const TOKEN: &str = "tail-test-token";

/// `isrgate tail` running, its stdout as JSON lines; killed when dropped.
struct Tail {
    _child: KillOnDrop,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Tail {
    fn start(args: &[&str]) -> Tail {
        let mut child = Command::new(BIN)
            .arg("tail")
            .args(args)
            .args(["--json", "--config", "/dev/null"])
            .env("ISRGATE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("isrgate tail");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Tail {
            _child: KillOnDrop::new(child),
            lines,
        }
    }

    /// Every line received so far.
    fn drain(&self) -> Vec<serde_json::Value> {
        self.lines.try_iter().collect()
    }
}

async fn origin() -> FakeNext {
    FakeNext::start(|o| {
        o.route("/ok", Route::html("ok").header("cache-control", "no-store"));
        o.route(
            "/blog/a",
            Route::html("a").header("cache-control", "no-store"),
        );
        o.route("/broken", Route::status(502));
    })
    .await
}

fn gateway_id(gw: &Gateway) -> String {
    gw.state
        .cache
        .as_ref()
        .expect("cache")
        .gateway_id()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_the_whole_fleet_through_redis_with_its_filters() {
    let r = RedisProcess::start();
    let origin = origin().await;
    let redis = format!("[redis]\nurl = \"{}\"", r.url());
    let one = Gateway::start(config(&[origin.url()], "", &redis)).await;
    let two = Gateway::start(config(&[origin.url()], "", &redis)).await;
    let (id1, id2) = (gateway_id(&one), gateway_id(&two));
    let errors = Tail::start(&["--redis", &r.url(), "--status", "5xx"]);
    let only_two = Tail::start(&["--redis", &r.url(), "--gateway", &id2[..6]]);
    let c = Client::default();

    // Until both tails hear from the gateways they follow (a session starts with the tail's
    // first renewal, within a second). A session can begin between a round's `/ok` and its
    // `/broken`, so the gateway-filtered tail is waited on until it has heard an `/ok` too.
    let mut seen = Vec::new();
    let mut seen_two = Vec::new();
    crate::eventually!(
        30,
        {
            for gw in [&one, &two] {
                c.get(&gw.url("/ok"), &[]).await;
                c.get(&gw.url("/broken"), &[]).await;
            }
            seen.extend(errors.drain());
            seen_two.extend(only_two.drain());
            let from = |g: &str| seen.iter().any(|l| l["gateway"] == g);
            from(&id1) && from(&id2) && seen_two.iter().any(|l| l["status"] == 200)
        },
        "the tails did not hear from both gateways"
    );
    for l in &seen {
        assert_eq!(l["status"], 502, "{l}");
        assert_eq!(l["path"], "/broken", "{l}");
        assert_eq!(l["method"], "GET");
        assert!(
            l["elapsed_us"].as_u64().is_some() && l["request_id"].is_string(),
            "{l}"
        );
    }
    assert!(
        seen_two.iter().all(|l| l["gateway"] == id2.as_str()),
        "{seen_two:?}"
    );
    assert!(seen_two.iter().any(|l| l["status"] == 200), "{seen_two:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_one_gateway_through_its_admin_api() {
    let origin = origin().await;
    let mut cfg = config(&[origin.url()], "", "");
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = Some(TOKEN.into());
    }
    let gw = Gateway::start(cfg).await;
    let admin = format!("http://{}", gw.admin.expect("admin"));
    let blog = Tail::start(&[
        "--admin",
        &admin,
        "--path",
        "/blog/*",
        "--outcome",
        "bypass,miss",
    ]);
    let c = Client::default();
    let mut seen = Vec::new();
    crate::eventually!(
        30,
        {
            c.get(&gw.url("/ok"), &[]).await;
            c.get(&gw.url("/blog/a?token=s3cret"), &[]).await;
            seen.extend(blog.drain());
            !seen.is_empty()
        },
        "no line from the admin API"
    );
    for l in &seen {
        assert_eq!(l["path"], "/blog/a?token=[redacted]", "{l}");
        assert_eq!(l["status"], 200);
    }

    // A filter that cannot be read: exit 2, nothing followed.
    let out = Command::new(BIN)
        .args(["tail", "--admin", &admin, "--status", "6xx"])
        .output()
        .expect("isrgate tail");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("status"));
    // Nobody follows once the tail is gone (the gateway finds the connection closed when it
    // writes the next line): the request path is back to one atomic load.
    drop(blog);
    crate::eventually!(
        10,
        {
            c.get(&gw.url("/blog/a"), &[]).await;
            !gw.state.access.tail().active()
        },
        "the follower was not removed"
    );
}
