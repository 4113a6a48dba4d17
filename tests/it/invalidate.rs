//! The revalidation webhook against two gateways sharing a real `redis-server`: epochs, tags,
//! soft and hard purges, acknowledgements, and every refusal leaving Redis untouched.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fred::prelude::*;
use isrgate::invalidate::webhook::{SIGNATURE, Secrets, TIMESTAMP, sign};

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, bus_live, config};

const HOST: &str = "shop.example";
const ISR: &str = "s-maxage=600, stale-while-revalidate=600";
const SECRET: &str = "test-webhook-secret";
const ADMIN_TOKEN: &str = "test-admin-token";

fn page(body: &str) -> Route {
    Route::html(body).header("cache-control", ISR)
}

async fn gateways(origin: &FakeNext, r: &RedisProcess, n: usize) -> Vec<Gateway> {
    let mut gws = Vec::new();
    for _ in 0..n {
        let mut cfg = config(
            &[origin.url()],
            "",
            &format!(
                "[redis]\nurl = \"{}\"\n[tag_rules]\n\"/p/{{id}}\" = [\"item-{{id}}\"]\n",
                r.url()
            ),
        );
        cfg.webhook.secrets = Some(Secrets {
            bearer: SECRET.into(),
            hmac: SECRET.into(),
        });
        if let Some(admin) = cfg.admin.as_mut() {
            admin.token = Some(ADMIN_TOKEN.into());
        }
        gws.push(Gateway::start(cfg).await);
    }
    for gw in &gws {
        eventually!(10, bus_live(gw), "bus subscribed");
    }
    // Everyone has heard everyone's heartbeat (acknowledgements are awaited from live ones).
    eventually!(
        10,
        gws.iter().all(|g| fleet(g).live().len() == n - 1),
        "fleet membership"
    );
    gws
}

fn fleet(gw: &Gateway) -> &isrgate::invalidate::fleet::Fleet {
    &gw.state.cache.as_ref().expect("cache").fleet
}

async fn get(gw: &Gateway, path: &str) -> Got {
    Client::default()
        .get(&gw.url(path), &[("host", HOST)])
        .await
}

async fn revalidate(gw: &Gateway, body: &str) -> Got {
    Client::default()
        .send(
            "POST",
            &gw.url("/_isrgate/revalidate"),
            &[
                ("authorization", &format!("Bearer {SECRET}")),
                ("content-type", "application/json"),
                ("host", HOST),
            ],
            Bytes::from(body.to_owned()),
        )
        .await
}

fn json(got: &Got) -> serde_json::Value {
    serde_json::from_slice(&got.body).expect("JSON answer")
}

async fn epoch_in_redis(r: &RedisProcess) -> Option<String> {
    r.client()
        .await
        .hget("isr:inv", "_epoch")
        .await
        .expect("hget")
}

/// Both gateways have the page cached (gateway 1 rendered it, gateway 2 read it), and the
/// fill is over: its fleet lock is released (a refresh that found it held would leave the key
/// to its holder, whose fill has ended).
async fn warm(r: &RedisProcess, gws: &[Gateway], path: &str, body: &str) {
    assert_eq!(&get(&gws[0], path).await.body[..], body.as_bytes());
    eventually!(
        10,
        get(&gws[1], path).await.header("x-cache") == "HIT",
        "gateway 2 hits"
    );
    eventually!(
        10,
        r.cli(&["KEYS", "isr:*:l"]).trim().is_empty(),
        "fill lock released"
    );
}

#[tokio::test]
async fn a_soft_path_purge_serves_stale_once_then_the_new_page_everywhere() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/news", page("v1"));
    })
    .await;
    let gws = gateways(&origin, &r, 2).await;
    warm(&r, &gws, "/news", "v1").await;
    assert_eq!(origin.count("/news"), 1);
    origin.route("/news", page("v2"));

    let answer = revalidate(&gws[0], r#"{"paths":["/news"],"rewarm":false}"#).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let report = json(&answer);
    assert_eq!(report["mode"], "soft");
    assert_eq!(report["tags"], serde_json::json!(["path:/news"]));
    assert_eq!(
        report["gateways"]["acknowledged"].as_array().map(Vec::len),
        Some(1),
        "gateway 2 acknowledged: {report}"
    );

    let stale = get(&gws[1], "/news").await;
    assert_eq!(
        (stale.header("x-cache"), &stale.body[..]),
        ("STALE", &b"v1"[..]),
        "cache-status {:?}, unsynced misses {}, store errors {}",
        stale.header("cache-status"),
        gws[1].state.metrics.cache_unsynced_misses.get(),
        gws[1].state.metrics.store_errors.get()
    );
    let m = &gws[1].state.metrics;
    eventually!(
        10,
        origin.count("/news") == 2,
        "one refresh: refreshes {} elsewhere {} fallbacks {} errors {}",
        m.refreshes_run(),
        m.refreshes_of(isrgate::proxy::refresh::Refreshed::Elsewhere),
        m.lock_fallbacks.get(),
        m.store_errors.get()
    );
    for gw in &gws {
        eventually!(
            10,
            {
                let g = get(gw, "/news").await;
                g.header("x-cache") == "HIT" && &g.body[..] == b"v2"
            },
            "the new page is a HIT"
        );
    }
    assert_eq!(
        origin.count("/news"),
        2,
        "exactly one refresh for the fleet"
    );
}

/// Two gateways on `r` that both hold `/a` as `a1`, and the origin now rendering `a2`.
async fn warmed_then_changed(r: &RedisProcess) -> (FakeNext, Vec<Gateway>) {
    let origin = FakeNext::start(|o| {
        o.route("/a", page("a1"));
    })
    .await;
    let gws = gateways(&origin, r, 2).await;
    warm(r, &gws, "/a", "a1").await;
    origin.route("/a", page("a2"));
    (origin, gws)
}

#[tokio::test]
async fn a_hard_purge_is_a_miss_on_every_gateway() {
    let r = RedisProcess::start();
    let (_origin, gws) = warmed_then_changed(&r).await;
    let answer = revalidate(&gws[1], r#"{"paths":["/a"],"mode":"hard","rewarm":false}"#).await;
    assert_eq!(answer.status, 200);
    let first = get(&gws[0], "/a").await;
    assert_eq!(
        (first.header("x-cache"), &first.body[..]),
        ("MISS", &b"a2"[..])
    );
    // Gateway 2 had a1 in its L1: its very next request is not a1 (a miss of its own, or the
    // entry gateway 1 just rendered).
    let second = get(&gws[1], "/a").await;
    assert_eq!(&second.body[..], b"a2", "{}", second.header("cache-status"));
    assert_ne!(second.header("x-cache"), "STALE");
}

#[tokio::test]
async fn tags_from_headers_rules_next_ancestry_and_purge_all() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/p/1",
            page("one").header("cache-tag", "product-1, products"),
        );
        o.route("/blog/post", page("post"));
        o.route("/other", page("other"));
    })
    .await;
    let gws = gateways(&origin, &r, 2).await;
    for p in ["/p/1", "/blog/post", "/other"] {
        get(&gws[0], p).await;
        assert_eq!(get(&gws[0], p).await.header("x-cache"), "HIT");
    }
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            r#"{"tags":["products"],"mode":"hard","rewarm":false}"#,
            &["/p/1"],
            &["/blog/post", "/other"],
        ),
        // revalidatePath('/blog', 'layout')
        (
            r#"{"tags":["_N_T_/blog/layout"],"mode":"hard","rewarm":false}"#,
            &["/blog/post"],
            &["/p/1", "/other"],
        ),
        // From the config rule "/p/{id}" = ["item-{id}"].
        (
            r#"{"tags":["item-1"],"mode":"hard","rewarm":false}"#,
            &["/p/1"],
            &["/blog/post", "/other"],
        ),
        (
            r#"{"tags":["*"],"mode":"hard","rewarm":false}"#,
            &["/p/1", "/blog/post", "/other"],
            &[],
        ),
    ];
    for (body, purged, kept) in cases {
        for p in purged.iter().chain(kept.iter()) {
            get(&gws[1], p).await; // cached everywhere first
        }
        assert_eq!(revalidate(&gws[0], body).await.status, 200);
        for p in *purged {
            assert_eq!(
                get(&gws[1], p).await.header("x-cache"),
                "MISS",
                "{body}: {p}"
            );
        }
        for p in *kept {
            assert_eq!(
                get(&gws[1], p).await.header("x-cache"),
                "HIT",
                "{body}: {p}"
            );
        }
    }
}

/// A render that started before the purge and finished after it is not fresh.
#[tokio::test]
async fn a_render_racing_a_purge_is_stale_at_once() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/slow", page("old").delay(Duration::from_millis(400)));
    })
    .await;
    let gws = gateways(&origin, &r, 1).await;
    let gw = &gws[0];
    let render = {
        let url = gw.url("/slow");
        tokio::spawn(async move { Client::default().get(&url, &[("host", HOST)]).await })
    };
    eventually!(10, origin.count("/slow") == 1, "render started");
    assert_eq!(
        revalidate(gw, r#"{"paths":["/slow"],"rewarm":false}"#)
            .await
            .status,
        200
    );
    assert_eq!(&render.await.expect("render").body[..], b"old");
    let next = get(gw, "/slow").await;
    assert_eq!(next.header("x-cache"), "STALE", "not served as fresh");
}

/// Headers, body, expected status, a word the answer must contain.
type Case<'a> = (Vec<(&'a str, &'a str)>, Bytes, u16, &'a str);

/// After the webhook returns, the page was rendered again: the next request anywhere is a HIT
/// on the new version, with one render per re-warmed variant.
#[tokio::test]
async fn rewarm_makes_the_next_request_a_hit_on_the_new_page() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/home", page("old"));
    })
    .await;
    let gws = gateways(&origin, &r, 2).await;
    warm(&r, &gws, "/home", "old").await;
    origin.route("/home", page("new"));
    let answer = revalidate(&gws[0], r#"{"paths":["/home"],"mode":"hard"}"#).await;
    assert_eq!(answer.status, 200);
    let report = json(&answer);
    assert_eq!(report["rewarm"][0]["outcome"], "stored", "{report}");
    assert_eq!(report["rewarm"][0]["variant"], "html");
    // The fake origin answers RSC requests with HTML: not stored (content type guard).
    assert_eq!(report["rewarm"][1]["variant"], "rsc");
    assert_eq!(
        origin.count("/home"),
        3,
        "first render + one per re-warmed variant"
    );
    for gw in &gws {
        let got = get(gw, "/home").await;
        assert_eq!((got.header("x-cache"), &got.body[..]), ("HIT", &b"new"[..]));
    }
    assert_eq!(origin.count("/home"), 3);
    // The log has it, newest first, on the admin listener.
    let admin = gws[1].admin.expect("admin listener");
    let log = Client::default()
        .get(
            &format!("http://{admin}/api/log"),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    let log: serde_json::Value = serde_json::from_slice(&log.body).expect("JSON log");
    assert_eq!(log[0]["epoch"], report["epoch"]);
    assert_eq!(log[0]["paths"], serde_json::json!(["/home"]));
}

/// Every replica gets the revalidate call; one that is down is retried and reported, and the
/// webhook still answers.
#[tokio::test]
async fn every_replica_is_told_and_a_dead_one_is_reported() {
    let r = RedisProcess::start();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            FakeNext::start(|o| {
                o.route("/api/revalidate", Route::html("{\"revalidated\":true}"));
            })
            .await,
        );
    }
    let urls: Vec<String> = replicas.iter().map(FakeNext::url).collect();
    let mut cfg = config(
        &urls,
        "",
        &format!(
            "[redis]\nurl = \"{}\"\n[webhook]\nreplica_path = \"/api/revalidate\"\nreplica_retries = 2\nreplica_timeout = \"1s\"\n[health]\ninterval = \"0s\"\n",
            r.url()
        ),
    );
    cfg.webhook.secrets = Some(Secrets {
        bearer: SECRET.into(),
        hmac: SECRET.into(),
    });
    cfg.webhook.fanout.secret = Some(http::HeaderValue::from_static("replica-secret"));
    let gw = Gateway::start(cfg).await;
    replicas[2].stop().await;
    let answer = revalidate(&gw, r#"{"paths":["/p"],"tags":["t1"],"rewarm":false}"#).await;
    assert_eq!(answer.status, 200);
    let report = json(&answer);
    let results = report["replicas"].as_array().expect("per-replica results");
    assert_eq!(results.len(), 3, "{report}");
    for (i, replica) in replicas.iter().enumerate().take(2) {
        assert_eq!(results[i]["ok"], true, "{report}");
        let seen = replica.last("/api/revalidate").expect("called");
        assert_eq!(seen.headers["x-revalidate-secret"], "replica-secret");
    }
    assert_eq!(results[2]["ok"], false);
    assert_eq!(results[2]["attempts"], 3, "retried twice: {report}");
    assert!(results[2]["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[tokio::test]
async fn refused_calls_change_nothing() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|_| {}).await;
    let gws = gateways(&origin, &r, 1).await;
    let url = gws[0].url("/_isrgate/revalidate");
    let c = Client::default();
    let body = br#"{"paths":["/a"]}"#;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let good_sig = sign(SECRET, now, body);
    let stale_ts = (now - 3_600).to_string();
    let stale_sig = sign(SECRET, now - 3_600, body);
    let now_s = now.to_string();
    let big = vec![b' '; 10 << 20];
    let bearer = format!("Bearer {SECRET}");
    let cases: Vec<Case<'_>> = vec![
        (vec![], Bytes::from_static(body), 401, "missing credentials"),
        (
            vec![("authorization", "Bearer nope")],
            Bytes::from_static(body),
            401,
            "wrong secret",
        ),
        (
            vec![(SIGNATURE, "sha256=00"), (TIMESTAMP, &now_s)],
            Bytes::from_static(body),
            401,
            "bad signature",
        ),
        (
            vec![(SIGNATURE, &stale_sig), (TIMESTAMP, &stale_ts)],
            Bytes::from_static(body),
            401,
            "replay window",
        ),
        (
            vec![("authorization", &bearer)],
            Bytes::from_static(b"{\"paths\":"),
            400,
            "JSON",
        ),
        (
            vec![("authorization", &bearer)],
            Bytes::from_static(br#"{"paths":["/a"],"purge":1}"#),
            400,
            "unknown field",
        ),
        (
            vec![("authorization", &bearer)],
            Bytes::from_static(b"{}"),
            422,
            "nothing to revalidate",
        ),
        (
            vec![("authorization", &bearer)],
            Bytes::from(big),
            413,
            "body over",
        ),
    ];
    for (headers, body, status, needle) in cases {
        let got = c.send("POST", &url, &headers, body).await;
        let text = String::from_utf8_lossy(&got.body).into_owned();
        assert_eq!(got.status.as_u16(), status, "{needle}: {text}");
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert_eq!(epoch_in_redis(&r).await, None, "no epoch was recorded");
    let get = c.get(&url, &[("authorization", &bearer)]).await;
    assert_eq!(get.status, 405);
    // The signed form works.
    let ok = c
        .send(
            "POST",
            &url,
            &[(SIGNATURE, &good_sig), (TIMESTAMP, &now_s)],
            Bytes::from_static(body),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert!(
        epoch_in_redis(&r).await.is_some(),
        "the signed call was applied"
    );
}

/// Redis gone while a purge is applied: the script may still be queued and run when Redis is
/// back, so the 503 says so, the calling gateway applies it at once, and it retries until
/// Redis takes it; nothing is left for the fleet to disagree on.
#[tokio::test]
async fn redis_down_is_a_503_the_caller_applies_it_and_retries_until_redis_takes_it() {
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/x", page("x1"));
    })
    .await;
    let gws = gateways(&origin, &r, 1).await;
    get(&gws[0], "/x").await;
    origin.route("/x", page("x2"));
    r.kill();
    let got = revalidate(&gws[0], r#"{"paths":["/x"],"mode":"hard","rewarm":false}"#).await;
    assert_eq!(got.status, 503, "{:?}", got.body);
    let text = String::from_utf8_lossy(&got.body).into_owned();
    assert!(
        text.contains("did not confirm") && text.contains("retry"),
        "{text}"
    );
    assert_eq!(
        &get(&gws[0], "/x").await.body[..],
        b"x2",
        "applied here at once"
    );
    r.restart();
    eventually!(
        15,
        epoch_in_redis(&r).await.is_some(),
        "the retry reached Redis"
    );
}

/// A purge refused while Redis is frozen used to be applied later by the other gateways (the
/// queued script ran on SIGCONT) but never by the one that answered 503: for seconds the fleet
/// disagreed. Now the caller applies it at once and the others get it when Redis answers.
#[tokio::test]
async fn a_purge_during_a_redis_freeze_ends_applied_on_every_gateway() {
    let r = RedisProcess::start();
    let (origin, gws) = warmed_then_changed(&r).await;
    r.pause();
    let got = revalidate(&gws[0], r#"{"paths":["/a"],"mode":"hard","rewarm":false}"#).await;
    r.resume();
    assert_eq!(got.status, 503, "{:?}", got.body);
    for gw in &gws {
        eventually!(
            10,
            &get(gw, "/a").await.body[..] == b"a2",
            "every gateway has the purge"
        );
    }
    assert!(origin.count("/a") >= 2);
}

#[tokio::test]
async fn without_a_secret_the_webhook_is_off() {
    let origin = FakeNext::start(|_| {}).await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let got = Client::default()
        .send(
            "POST",
            &gw.url("/_isrgate/revalidate"),
            &[],
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(got.status, 404);
    assert!(String::from_utf8_lossy(&got.body).contains("ISRGATE_WEBHOOK_SECRET"));
    // (Health checks may reach the replica meanwhile; the webhook's path never does.)
    assert_eq!(
        origin.count("/_isrgate/revalidate"),
        0,
        "never proxied to Next.js"
    );
}

/// `isrgate purge` applies through Redis (a running gateway gets it on the bus), or through a
/// gateway's admin API. Two workers: the command runs blocking while the gateway answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_command_reaches_running_gateways() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/cli", page("c1"));
    })
    .await;
    let gws = gateways(&origin, &r, 1).await;
    get(&gws[0], "/cli").await;
    assert_eq!(get(&gws[0], "/cli").await.header("x-cache"), "HIT");
    let bin = env!("CARGO_BIN_EXE_isrgate");
    let run = |args: Vec<String>| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env_remove("ISRGATE_CONFIG")
            .output()
            .expect("run isrgate purge");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = |more: &[&str]| {
        let mut v: Vec<String> = ["purge", "--config", "/dev/null", "--redis", &r.url()]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        v.extend(more.iter().map(|s| (*s).to_owned()));
        v
    };
    let (code, _, err) = run(base(&["--path", "no-slash"]));
    assert_eq!(code, Some(1));
    assert!(err.contains("paths[0]"), "{err}");
    // Without --redis it goes through a gateway's admin API: one that is not there is named.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let closed = format!("http://{}", nobody.local_addr().expect("addr"));
    drop(nobody);
    let (code, _, err) = run(vec![
        "purge".into(),
        "--config".into(),
        "/dev/null".into(),
        "--gateway".into(),
        closed.clone(),
        "--tag".into(),
        "t".into(),
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("cannot reach the gateway's admin API at {closed}"))
            && err.contains("refused"),
        "{err}"
    );
    assert_eq!(epoch_in_redis(&r).await, None, "refusals applied nothing");

    let (code, out, err) = run(base(&["--path", "/cli", "--hard"]));
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("epoch ") && out.contains("path:/cli"), "{out}");
    eventually!(
        10,
        get(&gws[0], "/cli").await.header("x-cache") == "MISS",
        "the running gateway applied it"
    );

    // Through the gateway's admin API: the webhook's whole path, in the log as the CLI's.
    assert_eq!(get(&gws[0], "/cli").await.header("x-cache"), "HIT");
    let admin = format!("http://{}", gws[0].admin.expect("admin listener"));
    let via = |token: &str| {
        vec![
            "purge".to_owned(),
            "--config".into(),
            "/dev/null".into(),
            "--gateway".into(),
            admin.clone(),
            "--token".into(),
            token.to_owned(),
            "--path".into(),
            "/cli".into(),
        ]
    };
    let (code, _, err) = run(via("wrong-token"));
    assert_eq!(code, Some(1));
    assert!(err.contains("refused the admin token"), "{err}");
    let (code, out, err) = run(via(ADMIN_TOKEN));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("invalidated (soft)") && out.contains("acknowledged by 0 other gateway(s)"),
        "{out}"
    );
    assert_eq!(get(&gws[0], "/cli").await.header("x-cache"), "STALE");
    let log = Client::default()
        .get(
            &format!("{admin}/api/log"),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    assert_eq!(json(&log)[0]["source"], "cli", "{}", json(&log));
}

/// With the build's previewModeId, re-warm asks the replica for a fresh render
/// (`x-prerender-revalidate`) and stores only an answer marked REVALIDATED.
#[tokio::test]
async fn rewarm_with_a_preview_mode_id_stores_only_fresh_renders() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/fresh",
            page("fresh").header("x-nextjs-cache", "REVALIDATED"),
        );
        o.route(
            "/own-copy",
            page("old copy").header("x-nextjs-cache", "HIT"),
        );
    })
    .await;
    let mut cfg = config(
        &[origin.url()],
        "",
        &format!("[redis]\nurl = \"{}\"\n", r.url()),
    );
    cfg.webhook.secrets = Some(Secrets {
        bearer: SECRET.into(),
        hmac: SECRET.into(),
    });
    cfg.webhook.preview_mode_id = Some(http::HeaderValue::from_static("preview-id-123"));
    let gw = Gateway::start(cfg).await;
    eventually!(10, bus_live(&gw), "bus");
    let answer = revalidate(&gw, r#"{"paths":["/fresh","/own-copy"]}"#).await;
    let report = json(&answer);
    assert_eq!(report["rewarm"][0]["outcome"], "stored", "{report}");
    assert_eq!(report["rewarm"][2]["path"], "/own-copy");
    assert_eq!(
        report["rewarm"][2]["outcome"], "not-revalidated",
        "{report}"
    );
    let seen = origin.last("/fresh").expect("rendered");
    assert_eq!(seen.headers["x-prerender-revalidate"], "preview-id-123");
    assert_eq!(get(&gw, "/fresh").await.header("x-cache"), "HIT");
    assert_eq!(get(&gw, "/own-copy").await.header("x-cache"), "MISS");
}

/// A purge by tag re-warms the paths this gateway recently stored under that tag.
#[tokio::test]
async fn a_tag_purge_rewarms_the_paths_recently_stored_under_it() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        for p in ["/shelf/1", "/shelf/2"] {
            o.route(p, page("old").header("cache-tag", "shelf"));
        }
    })
    .await;
    let gws = gateways(&origin, &r, 1).await;
    for p in ["/shelf/1", "/shelf/2"] {
        get(&gws[0], p).await;
        origin.route(p, page("new").header("cache-tag", "shelf"));
    }
    let report = json(&revalidate(&gws[0], r#"{"tags":["shelf"],"mode":"hard"}"#).await);
    let warmed: Vec<&str> = report["rewarm"]
        .as_array()
        .expect("rewarm results")
        .iter()
        .filter(|w| w["variant"] == "html" && w["outcome"] == "stored")
        .filter_map(|w| w["path"].as_str())
        .collect();
    assert_eq!(warmed, ["/shelf/2", "/shelf/1"], "{report}");
    for p in ["/shelf/1", "/shelf/2"] {
        let got = get(&gws[0], p).await;
        assert_eq!((got.header("x-cache"), &got.body[..]), ("HIT", &b"new"[..]));
    }
}

/// A tag that looks like the counter's field name is just a tag.
#[tokio::test]
async fn a_tag_named_like_the_epoch_counter_breaks_nothing() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|_| {}).await;
    let gws = gateways(&origin, &r, 1).await;
    let mut last = 0u64;
    for _ in 0..2 {
        let got = revalidate(
            &gws[0],
            r#"{"tags":["_epoch"],"mode":"hard","rewarm":false}"#,
        )
        .await;
        assert_eq!(got.status, 200, "{:?}", got.body);
        let counter: u64 = epoch_in_redis(&r)
            .await
            .and_then(|e| e.parse().ok())
            .expect("the counter is still a number");
        assert_eq!(
            json(&got)["epoch"],
            counter,
            "the counter is the purge's epoch"
        );
        assert!(counter > last, "and it only moves forward");
        last = counter;
    }
}

/// While a gateway's invalidations are incomplete (just started, or its bus reconnected and it
/// is reading them again) it reads no entry from Redis: a page purged meanwhile by another
/// gateway, whose message it missed, is never served. The gap is held open by hand here (what
/// the bus does on a reconnect, without the reload), since a real one lasts a round trip.
#[tokio::test]
async fn a_purge_missed_while_the_bus_was_away_is_never_served() {
    let r = RedisProcess::start();
    let (origin, gws) = warmed_then_changed(&r).await;

    let cache = gws[1].state.cache.as_ref().expect("cache");
    cache.epochs.unsynced();
    cache.l1.clear();
    // Another gateway's hard purge of /a, recorded in Redis; gateway 2 misses its message.
    let epoch = r.cli(&["HINCRBY", "isr:inv", "_epoch", "1"]);
    r.cli(&["HSET", "isr:inv", "h:path:/a", epoch.trim()]);

    let during = get(&gws[1], "/a").await;
    assert_eq!(
        (during.header("x-cache"), &during.body[..]),
        ("MISS", &b"a2"[..]),
        "the stored a1 was read and taken as valid"
    );
    assert!(gws[1].state.metrics.cache_unsynced_misses.get() >= 1);
    assert_eq!(origin.count("/a"), 2);

    // A real reconnect: the bus reads every invalidation again, and Redis is read again.
    r.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    eventually!(10, cache.epochs.is_synced(), "invalidations reloaded");
    let misses = gws[1].state.metrics.cache_unsynced_misses.get();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        bodies.push(get(&gws[1], "/a").await.body);
    }
    assert!(bodies.iter().all(|b| &b[..] == b"a2"), "{bodies:?}");
    assert_eq!(gws[1].state.metrics.cache_unsynced_misses.get(), misses);
    assert_eq!(get(&gws[1], "/a").await.header("x-cache"), "HIT");
}

/// A Redis that comes back empty (restarted without persistence, an empty replica promoted,
/// FLUSHALL) must not turn purges into no-ops: the gateways that stayed up keep stamping new
/// renders with the epoch they knew, so the next purge's epoch must be newer than that.
#[tokio::test]
async fn the_first_purge_after_redis_comes_back_empty_is_applied() {
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/a", page("a1"));
    })
    .await;
    let gws = gateways(&origin, &r, 2).await;
    for i in 0..5 {
        let body = format!(r#"{{"paths":["/other-{i}"],"mode":"hard","rewarm":false}}"#);
        assert_eq!(revalidate(&gws[0], &body).await.status, 200);
    }
    let known = gws[0].state.cache.as_ref().expect("cache").epochs.current();

    r.restart();
    for gw in &gws {
        let cache = gw.state.cache.as_ref().expect("cache");
        eventually!(
            10,
            bus_live(gw) && cache.epochs.is_synced(),
            "back on the new Redis"
        );
        assert!(
            cache.epochs.current() >= known,
            "a gateway never forgets an epoch"
        );
    }
    // Rendered after the restart by gateways that stayed up: stamped with the old epoch.
    warm(&r, &gws, "/a", "a1").await;
    origin.route("/a", page("a2"));

    let answer = revalidate(&gws[1], r#"{"paths":["/a"],"mode":"hard","rewarm":false}"#).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(json(&answer)["epoch"].as_u64().expect("epoch") > known);
    for gw in &gws {
        assert_eq!(
            &get(gw, "/a").await.body[..],
            b"a2",
            "the first purge took effect"
        );
    }
}

/// The key folds percent-encoding (`%78` is `x`, hex case does not matter), so the tags and a
/// purge's paths must too: a page filled through any spelling is reached by a purge of any
/// other, by its path, by Next's `_N_T_` tags, and in every variant (HTML, RSC, prefetch).
#[tokio::test]
async fn a_purge_reaches_a_page_whatever_spelling_filled_it() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|_| {}).await;
    // The replica sees each spelling as sent (and a re-warm's canonical one): one page.
    let serve = |html: &str, rsc: &str| {
        for spelling in ["/page/%78-ev1", "/page/x-ev1"] {
            let rsc = Route::html(rsc)
                .content_type("text/x-component")
                .header("cache-control", ISR);
            origin.route(spelling, page(html).with_rsc(rsc));
        }
    };
    let gws = gateways(&origin, &r, 1).await;
    let gw = &gws[0];
    let c = Client::default();
    let html = [("host", HOST)];
    let rsc = [("host", HOST), ("rsc", "1")];
    let prefetch = [("host", HOST), ("rsc", "1"), ("next-router-prefetch", "1")];
    for (name, body) in [
        (
            "path",
            r#"{"paths":["/page/x-ev1"],"mode":"hard","rewarm":false}"#,
        ),
        (
            "_N_T_ tag",
            r#"{"tags":["_N_T_/page/x-ev1/page"],"mode":"hard","rewarm":false}"#,
        ),
        (
            "soft purge of another spelling",
            r#"{"paths":["/page/%78-ev1"]}"#,
        ),
    ] {
        serve("v1", "r1");
        for headers in [&html[..], &rsc, &prefetch] {
            eventually!(
                10,
                c.get(&gw.url("/page/%78-ev1"), headers)
                    .await
                    .header("x-cache")
                    == "HIT",
                "{name}: {headers:?} filled"
            );
        }
        serve("v2", "r2");
        assert_eq!(revalidate(gw, body).await.status, 200, "{name}");
        for (headers, fresh) in [(&html[..], "v2"), (&rsc, "r2"), (&prefetch, "r2")] {
            let got = c.get(&gw.url("/page/%78-ev1"), headers).await;
            // A soft purge re-warms (a HIT on the new page) or answers the old one once while
            // it refreshes; after a hard one the old page is never answered.
            if body.contains("hard") {
                assert_eq!(
                    &got.body[..],
                    fresh.as_bytes(),
                    "{name}: {headers:?} was purged"
                );
            }
            eventually!(
                10,
                &c.get(&gw.url("/page/%78-ev1"), headers).await.body[..] == fresh.as_bytes(),
                "{name}: {headers:?} renders again"
            );
        }
    }
    // Non-ASCII: filled through lower-case escapes, purged as a CMS writes it (raw UTF-8).
    for spelling in ["/caf%c3%a9", "/caf%C3%A9"] {
        origin.route(spelling, page("c1"));
    }
    c.get(&gw.url("/caf%c3%a9"), &html).await;
    assert_eq!(
        c.get(&gw.url("/caf%C3%A9"), &html).await.header("x-cache"),
        "HIT"
    );
    for spelling in ["/caf%c3%a9", "/caf%C3%A9"] {
        origin.route(spelling, page("c2"));
    }
    let purge = revalidate(gw, r#"{"paths":["/café"],"mode":"hard","rewarm":false}"#).await;
    assert_eq!(purge.status, 200);
    assert_eq!(&c.get(&gw.url("/caf%c3%a9"), &html).await.body[..], b"c2");
}

/// What `@isrgate/next` does for an in-app `revalidateTag`: it calls the gateways' Redis
/// function itself (`FCALL`), and every gateway treats the tag as purged. The library is
/// loaded again when Redis comes back empty, so a replica's call works after the restart.
#[tokio::test]
async fn a_replica_calling_the_fleet_function_purges_every_gateway() {
    use isrgate::cache::keys::{INDEX_KEY, INV_KEY};
    use isrgate::invalidate::apply::FUNCTION;
    let mut r = RedisProcess::start();
    let (_origin, gws) = warmed_then_changed(&r).await;
    let fcall = |r: &RedisProcess, mode: &str| {
        r.cli(&[
            "FCALL",
            FUNCTION,
            "2",
            INV_KEY,
            INDEX_KEY,
            "next:replica-b:42",
            mode,
            "isr:bus",
            "0",
            "_N_T_/a",
        ])
    };
    let epoch = fcall(&r, "hard");
    assert!(epoch.trim().parse::<u64>().is_ok(), "{epoch}");
    for gw in &gws {
        eventually!(
            10,
            &get(gw, "/a").await.body[..] == b"a2",
            "the replica's purge reached every gateway"
        );
    }

    r.restart();
    // The gateways see the bus come back and load the library again.
    eventually!(
        10,
        fcall(&r, "soft").trim().parse::<u64>().is_ok(),
        "the library is loaded again"
    );
}

/// A Redis whose ACL refuses Functions to the gateway's user (or a Redis older than 7): purges
/// still work, sent as the same script.
#[tokio::test]
async fn without_functions_a_purge_goes_as_a_script() {
    let r = RedisProcess::start();
    r.cli(&[
        "ACL",
        "SETUSER",
        "gw",
        "on",
        ">pw",
        "~*",
        "&*",
        "+@all",
        "-function",
        "-fcall",
    ]);
    let origin = FakeNext::start(|o| {
        o.route("/a", page("a1"));
    })
    .await;
    let url = r.url().replacen("redis://", "redis://gw:pw@", 1);
    let mut cfg = config(&[origin.url()], "", &format!("[redis]\nurl = \"{url}\"\n"));
    cfg.webhook.secrets = Some(Secrets {
        bearer: SECRET.into(),
        hmac: SECRET.into(),
    });
    let gw = Gateway::start(cfg).await;
    eventually!(
        10,
        bus_live(&gw)
            && gw
                .state
                .cache
                .as_ref()
                .is_some_and(|c| c.epochs.is_synced()),
        "on the bus, invalidations loaded"
    );
    assert_eq!(get(&gw, "/a").await.header("x-cache"), "MISS");
    eventually!(
        10,
        get(&gw, "/a").await.header("x-cache") == "HIT",
        "cached"
    );
    origin.route("/a", page("a2"));
    let answer = revalidate(&gw, r#"{"paths":["/a"],"mode":"hard","rewarm":false}"#).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(&get(&gw, "/a").await.body[..], b"a2");
    assert!(
        r.cli(&["HGET", "isr:inv", "h:path:/a"])
            .trim()
            .parse::<u64>()
            .is_ok()
    );
}

/// `GET /api/inspect` and `isrgate inspect`: the key, where the entry is, its state, tags,
/// filler, and the purge that covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_says_what_is_cached_for_a_url_and_what_purged_it() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/seen", page("s1"));
    })
    .await;
    let gws = gateways(&origin, &r, 1).await;
    get(&gws[0], "/seen").await;
    assert_eq!(get(&gws[0], "/seen").await.header("x-cache"), "HIT");
    let admin = format!("http://{}", gws[0].admin.expect("admin listener"));
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let ask = |q: &str| {
        let url = format!("{admin}/api/inspect?{q}");
        let bearer = bearer.clone();
        async move {
            Client::default()
                .get(&url, &[("authorization", &bearer)])
                .await
        }
    };
    let got = ask(&format!("url=/seen&host={HOST}")).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let a = json(&got);
    let html = &a["variants"]["html"];
    let gateway = gws[0].state.cache.as_ref().expect("cache").gateway_id();
    assert_eq!(html["cached"], true, "{a}");
    assert_eq!(html["state"], "fresh");
    assert_eq!(html["filled_by"], gateway);
    assert_eq!(html["invalidation"], "none");
    assert!(
        html["key"].as_str().is_some_and(|k| k.contains("/seen")),
        "{a}"
    );
    assert!(
        html["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "path:/seen")),
        "{a}"
    );
    assert_eq!(
        a["variants"]["rsc"]["cached"], false,
        "never asked for: {a}"
    );

    revalidate(&gws[0], r#"{"paths":["/seen"],"rewarm":false}"#).await;
    let a = json(&ask(&format!("url=http://{HOST}/seen&variant=html")).await);
    assert_eq!(a["variants"]["html"]["invalidation"], "soft", "{a}");
    assert_eq!(a["variants"]["html"]["invalidated_by"], "path:/seen");
    assert!(
        a["variants"]["rsc"].is_null(),
        "only the variant asked: {a}"
    );

    for (bad, says) in [
        ("host=x", "url is missing"),
        ("url=/seen", "host is missing"),
        ("url=/seen&host=x&variant=jpeg", "variant"),
    ] {
        let got = ask(bad).await;
        assert_eq!(got.status, 400, "{bad}");
        assert!(String::from_utf8_lossy(&got.body).contains(says), "{bad}");
    }

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_isrgate"))
        .args([
            "inspect",
            "--config",
            "/dev/null",
            "--gateway",
            &admin,
            "--token",
            ADMIN_TOKEN,
        ])
        .args(["--host", HOST, "--variant", "html", "/seen"])
        .env_remove("ISRGATE_CONFIG")
        .output()
        .expect("run isrgate inspect");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("purged   yes, soft, by tag path:/seen"),
        "{text}"
    );
    assert!(
        text.contains(&format!("filled   by gateway {gateway}")),
        "{text}"
    );
}

/// The function records each tag in the hash and in its index under one epoch, under both its
/// names; a write by an older library (loaded again by an older gateway) misses the index, and
/// the next write marks the index incomplete up to it (`_unindexed`), as it does when the index
/// is gone while it should hold something (evicted).
#[tokio::test]
async fn the_function_indexes_records_and_marks_the_writes_that_missed_the_index() {
    use isrgate::cache::keys::{INDEX_KEY, INV_KEY};
    use isrgate::invalidate::apply::{FUNCTION, FUNCTION_V1, LIBRARY};
    let r = RedisProcess::start();
    let fcall = |function: &str, tag: &str| -> String {
        let keys: &[&str] = if function == FUNCTION_V1 {
            &["1", INV_KEY]
        } else {
            &["2", INV_KEY, INDEX_KEY]
        };
        let mut args = vec!["FCALL", function];
        args.extend_from_slice(keys);
        args.extend_from_slice(&["next:replica:1", "soft", "isr:bus", "0", tag]);
        r.cli(&args).trim().to_owned()
    };
    let hget = |field: &str| r.cli(&["HGET", INV_KEY, field]).trim().to_owned();
    let zscore = |field: &str| r.cli(&["ZSCORE", INDEX_KEY, field]).trim().to_owned();
    r.cli(&["FUNCTION", "LOAD", "REPLACE", LIBRARY]);

    let e = fcall(FUNCTION, "a");
    assert_eq!((hget("s:a"), zscore("s:a")), (e.clone(), e.clone()));
    assert_eq!((hget("_epoch"), hget("_indexed")), (e.clone(), e));
    let e = fcall(FUNCTION_V1, "b");
    assert_eq!(zscore("s:b"), e, "the old name indexes too");
    assert_eq!(hget("_unindexed"), "");

    r.cli(&[
        "FUNCTION",
        "LOAD",
        "REPLACE",
        include_str!("fixtures/invalidate_v1.lua"),
    ]);
    let missed = fcall(FUNCTION_V1, "c");
    assert_eq!(
        (hget("s:c"), zscore("s:c")),
        (missed.clone(), String::new())
    );
    assert!(fcall(FUNCTION, "d").contains("Function not found"));
    r.cli(&["FUNCTION", "LOAD", "REPLACE", LIBRARY]);
    let e = fcall(FUNCTION, "d");
    assert_eq!(
        hget("_unindexed"),
        missed,
        "the write that missed the index"
    );
    assert_eq!(hget("_indexed"), e);

    // The index gone while it holds the writes since the snapshot (none here: all of them).
    r.cli(&["DEL", INDEX_KEY]);
    fcall(FUNCTION, "e");
    assert_eq!(hget("_unindexed"), e);
}

/// A webhook call of `/p` and the tag `posts` with the secret, to `url`.
async fn call_webhook(url: &str, method: &str, extra: &[(&str, &str)]) -> Got {
    let auth = format!("Bearer {SECRET}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    let body = Bytes::from_static(br#"{"paths":["/p"],"tags":["posts"]}"#);
    Client::default().send(method, url, &headers, body).await
}

/// The revalidation report is one type: what the webhook answers on either listener reads back
/// as `isrgate::invalidate::Report`, the log keeps the same record, refusals are the same
/// answers on both listeners, and the admin listener names the peer that called, not what a
/// `X-Forwarded-For` it received claims.
#[tokio::test]
async fn both_listeners_answer_the_same_report_and_the_same_refusals() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("p").header("cache-control", "s-maxage=60"),
        );
    })
    .await;
    let gw = gateways(&origin, &r, 1).await.remove(0);
    let admin = gw.admin.expect("admin listener");
    let public = gw.url("/_isrgate/revalidate");
    let private = format!("http://{admin}/_isrgate/revalidate");
    let spoof = [("x-forwarded-for", "203.0.113.9")];

    let got = call_webhook(&public, "POST", &spoof).await;
    assert_eq!(got.status.as_u16(), 200, "{got:?}");
    let report: isrgate::invalidate::Report = serde_json::from_slice(&got.body).expect("a Report");
    assert_eq!(report.paths, ["/p"]);
    assert!(report.tags.contains(&"posts".to_owned()), "{report:?}");
    // The public listener rewrote the header: its last hop is the peer that connected.
    assert_eq!(report.source, "127.0.0.1");

    let got = call_webhook(&private, "POST", &spoof).await;
    assert_eq!(got.status.as_u16(), 200, "{got:?}");
    let report: isrgate::invalidate::Report = serde_json::from_slice(&got.body).expect("a Report");
    assert_eq!(report.source, "127.0.0.1", "the peer, not the header");

    // The log holds the same record.
    let cache = gw.state.cache.as_ref().expect("cache on");
    let logged = cache.log.recent(cache.redis(), 1).await.expect("log");
    let logged: isrgate::invalidate::Report =
        serde_json::from_value(logged[0].clone()).expect("a Report");
    assert_eq!(logged, report);

    for url in [&public, &private] {
        let got = call_webhook(url, "PUT", &[]).await;
        assert_eq!(got.status.as_u16(), 405, "{url}");
        assert_eq!(got.header("allow"), "POST", "{url}");
        let error: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
        assert!(
            error["error"].as_str().is_some_and(|e| e.contains("POST")),
            "{error}"
        );
    }
}
