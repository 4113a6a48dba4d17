//! The admin listener: token, `/metrics` (strictly checked exposition whose counters move),
//! `/api/stats`, `/readyz` states, the session cookie and the purge API.

use std::collections::HashMap;

use bytes::Bytes;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, config};

const TOKEN: &str = "admin-token-for-tests";
const ISR: &str = "s-maxage=60, stale-while-revalidate=300";
/// What Prometheus asks for when it prefers OpenMetrics.
const OPENMETRICS: &str =
    "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

async fn gateway(origin: &FakeNext, r: Option<&RedisProcess>, token: Option<&str>) -> Gateway {
    let redis = r.map_or_else(String::new, |r| format!("[redis]\nurl = \"{}\"\n", r.url()));
    let mut cfg = config(&[origin.url()], "", &redis);
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = token.map(str::to_owned);
    }
    Gateway::start(cfg).await
}

async fn admin_get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Got {
    let admin = gw.admin.expect("admin listener");
    Client::default()
        .get(&format!("http://{admin}{path}"), headers)
        .await
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// `/metrics` with the token and `accept`, if any.
async fn scrape(gw: &Gateway, accept: Option<&str>) -> Got {
    let auth = bearer();
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend(accept.map(|a| ("accept", a)));
    admin_get(gw, "/metrics", &headers).await
}

/// Moves the gateway's clock (freshness) forward.
fn advance(gw: &Gateway, secs: u64) {
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.clock.advance(std::time::Duration::from_secs(secs));
}

/// A strict reading of the classic text format 0.0.4, as `promtool check metrics` wants it:
/// every sample's family was declared by `# HELP` and then `# TYPE` (its full name: a counter's
/// ends `_total`), a family is declared once, values are numbers, no `# EOF`. Returns
/// `name{labels}` → value.
fn parse_text(text: &str) -> HashMap<String, f64> {
    let mut helped: Option<String> = None;
    let mut family: Option<(String, String)> = None;
    let mut declared = std::collections::HashSet::new();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("# HELP name text");
            assert!(!help.trim().is_empty(), "help of {name}");
            helped = Some(name.to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert_eq!(helped.as_deref(), Some(name), "# HELP before # TYPE {name}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{kind}");
            assert!(declared.insert(name.to_owned()), "{name} declared twice");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name}");
            }
            family = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let v: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("value of {line:?}"))
        };
        let name = series.split('{').next().unwrap_or_default();
        let (fname, kind) = family.as_ref().expect("a sample after its # TYPE");
        let suffixes: &[&str] = if kind == "histogram" {
            &["_bucket", "_sum", "_count"]
        } else {
            &[""]
        };
        assert!(
            suffixes.iter().any(|s| name == format!("{fname}{s}")),
            "{name} is not in family {fname}"
        );
        samples.insert(series.to_owned(), v);
    }
    samples
}

/// A strict reading of the OpenMetrics text: every sample belongs to a family declared by
/// `# TYPE` before it, names and labels are well formed, values are numbers, and it ends with
/// `# EOF`. Returns `name{labels}` → value.
fn parse_openmetrics(text: &str) -> HashMap<String, f64> {
    let mut families: Vec<(String, String)> = Vec::new();
    let mut samples = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(name_ok(name), "family name {name:?}");
            assert!(
                ["counter", "gauge", "histogram", "info", "unknown"].contains(&kind),
                "{kind}"
            );
            families.push((name.to_owned(), kind.to_owned()));
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("sample: series value");
        let v: f64 = value
            .parse()
            .or_else(|_| {
                if value == "+Inf" {
                    Ok(f64::INFINITY)
                } else {
                    Err(())
                }
            })
            .unwrap_or_else(|()| panic!("value of {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(name_ok(name), "sample name {name:?}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{labels}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(
                        name_ok(k) && v.starts_with('"') && v.ends_with('"'),
                        "{pair}"
                    );
                }
            }
        }
        let family = families.last().expect("a sample after its # TYPE");
        let suffixes = match family.1.as_str() {
            "counter" => vec!["_total", "_created"],
            "histogram" => vec!["_bucket", "_sum", "_count", "_created"],
            "info" => vec!["_info"],
            _ => vec![""],
        };
        assert!(
            suffixes.iter().any(|s| name == format!("{}{s}", family.0)),
            "{name} is not in family {family:?}"
        );
        samples.insert(series.to_owned(), v);
    }
    samples
}

#[tokio::test]
async fn the_token_guards_everything_but_health() {
    let origin = FakeNext::start(|_| {}).await;
    let gw = gateway(&origin, None, Some(TOKEN)).await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(admin_get(&gw, path, &[]).await.status, 200, "{path}");
    }
    for path in ["/metrics", "/api/stats", "/api/log"] {
        assert_eq!(admin_get(&gw, path, &[]).await.status, 401, "{path}");
        let wrong = admin_get(&gw, path, &[("authorization", "Bearer nope")]).await;
        assert_eq!(wrong.status, 401, "{path}");
        let ok = admin_get(&gw, path, &[("authorization", &bearer())]).await;
        assert_eq!(ok.status, 200, "{path}");
    }
    // The dashboard asks a browser to sign in; the form sets a session cookie.
    let page = admin_get(&gw, "/", &[]).await;
    assert_eq!(page.status, 401);
    assert!(String::from_utf8_lossy(&page.body).contains("name=\"token\""));
    let admin = gw.admin.expect("admin");
    let login = Client::default()
        .send(
            "POST",
            &format!("http://{admin}/login"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from(format!("token={TOKEN}")),
        )
        .await;
    assert_eq!(login.status, 303);
    let cookie = login
        .header("set-cookie")
        .split(';')
        .next()
        .unwrap_or("")
        .to_owned();
    assert!(login.header("set-cookie").contains("HttpOnly"));
    assert!(
        !cookie.contains(TOKEN),
        "the cookie is not the token itself"
    );
    let dashboard = admin_get(&gw, "/", &[("cookie", &cookie)]).await;
    assert_eq!(dashboard.status, 200);
    assert!(String::from_utf8_lossy(&dashboard.body).contains("/api/stats"));
    // Without a configured token the API is off, and says how to turn it on.
    let off = gateway(&origin, None, None).await;
    let got = admin_get(&off, "/metrics", &[("authorization", &bearer())]).await;
    assert_eq!(got.status, 403);
    assert!(String::from_utf8_lossy(&got.body).contains("ISRGATE_ADMIN_TOKEN"));
}

#[tokio::test]
async fn metrics_parse_strictly_and_move_with_traffic() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p").header("cache-control", ISR));
        o.route(
            "/s",
            Route::html("s").header("cache-control", "s-maxage=1, stale-while-revalidate=60"),
        );
    })
    .await;
    let gw = gateway(&origin, None, Some(TOKEN)).await;
    let c = Client::default();
    let before = parse_openmetrics(&String::from_utf8_lossy(
        &scrape(&gw, Some(OPENMETRICS)).await.body,
    ));
    assert_eq!(before["isrgate_cache_requests_total{outcome=\"hit\"}"], 0.0);
    c.get(&gw.url("/p"), &[]).await; // miss
    c.get(&gw.url("/p"), &[]).await; // hit
    c.get(&gw.url("/p"), &[("authorization", "Basic x")]).await; // bypass
    c.get(&gw.url("/s"), &[]).await; // miss
    advance(&gw, 2);
    assert_eq!(c.get(&gw.url("/s"), &[]).await.header("x-cache"), "STALE");
    let got = scrape(&gw, Some(OPENMETRICS)).await;
    assert!(
        got.header("content-type")
            .starts_with("application/openmetrics-text")
    );
    let m = parse_openmetrics(&String::from_utf8_lossy(&got.body));
    for (series, want) in [
        ("isrgate_cache_requests_total{outcome=\"hit\"}", 1.0),
        ("isrgate_cache_requests_total{outcome=\"miss\"}", 2.0),
        ("isrgate_cache_requests_total{outcome=\"stale\"}", 1.0),
        ("isrgate_cache_requests_total{outcome=\"bypass\"}", 1.0),
        ("isrgate_cache_bypass_total{reason=\"authorization\"}", 1.0),
    ] {
        assert_eq!(m.get(series), Some(&want), "{series}");
    }
    let replica = origin.addr.to_string();
    let count = format!("isrgate_upstream_response_seconds_count{{replica=\"{replica}\"}}");
    assert!(m.get(&count).is_some_and(|n| *n >= 3.0), "{count}");
    assert!(m.contains_key("isrgate_coalesce_wait_seconds_bucket{le=\"+Inf\"}"));
}

#[tokio::test]
async fn stats_show_a_scripted_scenario_and_readyz_reports_redis() {
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/a", Route::html("a").header("cache-control", ISR));
        o.route("/b", Route::html("b").header("cache-control", ISR));
    })
    .await;
    let gw = gateway(&origin, Some(&r), Some(TOKEN)).await;
    eventually!(
        10,
        gw.state
            .cache
            .as_ref()
            .and_then(|c| c.bus())
            .is_some_and(|b| b.is_subscribed()),
        "bus"
    );
    eventually!(
        10,
        {
            let ready = admin_get(&gw, "/readyz", &[]).await.body;
            serde_json::from_slice::<serde_json::Value>(&ready).expect("json")["redis"] == "ok"
        },
        "Redis ok once the pool is connected"
    );
    let c = Client::default();
    for _ in 0..3 {
        c.get(&gw.url("/b"), &[]).await;
    }
    c.get(&gw.url("/a"), &[]).await;
    let purge = Client::default()
        .send(
            "POST",
            &format!("http://{}/api/purge", gw.admin.expect("admin")),
            &[
                ("authorization", &bearer()),
                ("content-type", "application/json"),
                // As the dashboard's form sends it.
                ("x-isrgate-client", "dashboard"),
            ],
            Bytes::from_static(br#"{"paths":["/a"],"mode":"hard"}"#),
        )
        .await;
    assert_eq!(purge.status, 200, "{:?}", purge.body);
    let s: serde_json::Value = serde_json::from_slice(
        &admin_get(&gw, "/api/stats", &[("authorization", &bearer())])
            .await
            .body,
    )
    .expect("stats JSON");
    assert_eq!(s["requests"]["miss"], 2);
    assert_eq!(s["requests"]["hit"], 2);
    assert_eq!(s["replicas"][0]["address"], origin.addr.to_string());
    assert_eq!(s["replicas"][0]["healthy"], true);
    assert_eq!(s["redis"]["configured"], true);
    assert_eq!(s["redis"]["connected"], true);
    assert!(s["redis"]["used_memory"].as_u64().is_some_and(|m| m > 0));
    assert!(s["redis"]["keys"].as_u64().is_some_and(|k| k >= 2), "{s}");
    assert_eq!(s["cache"]["store"], "redis");
    assert_eq!(s["fleet"]["gateways"].as_array().map(Vec::len), Some(1));
    assert_eq!(s["top_missed"][0]["misses"], 1);
    assert_eq!(s["revalidations"][0]["paths"], serde_json::json!(["/a"]));
    assert_eq!(s["revalidations"][0]["source"], "dashboard");
    // The test server runs without maxmemory: the dashboard says so, and nothing is down.
    let banners = s["banners"].as_array().expect("banners");
    assert!(
        banners
            .iter()
            .any(|b| b.as_str().is_some_and(|b| b.contains("maxmemory"))),
        "{s}"
    );
    assert!(
        !banners
            .iter()
            .any(|b| b.as_str().is_some_and(|b| b.contains("down"))),
        "{s}"
    );

    r.kill();
    eventually!(
        10,
        {
            let ready = admin_get(&gw, "/readyz", &[]).await;
            let v: serde_json::Value = serde_json::from_slice(&ready.body).expect("json");
            ready.status == 200 && v["redis"] == "degraded"
        },
        "Redis down is degraded, still ready"
    );
    let s: serde_json::Value = serde_json::from_slice(
        &admin_get(&gw, "/api/stats", &[("authorization", &bearer())])
            .await
            .body,
    )
    .expect("stats JSON");
    assert!(
        s["banners"][0]
            .as_str()
            .is_some_and(|b| b.starts_with("Redis is down")),
        "{s}"
    );
}

/// What the dashboard's error tiles, latency, renders-saved tiles and route table are built
/// from: a 500 of the app and a 502 of the gateway are kept with their time and path (a
/// credential in the query redacted) and counted by status; a page's hits, miss and render
/// count under its first segment with its freshness lifetime; what no stored page proves counts
/// as `other`.
#[tokio::test]
async fn stats_keep_the_newest_server_errors_and_count_renders_per_route() {
    let r = RedisProcess::start();
    let mut origin = FakeNext::start(|o| {
        o.route("/blog/a", Route::html("a").header("cache-control", ISR));
        o.route("/boom", Route::status(500));
    })
    .await;
    let gw = gateway(&origin, Some(&r), Some(TOKEN)).await;
    let c = Client::default();
    let before = isrgate::clock::system_ms();
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/blog/a"), &[]).await.status, 200);
    }
    assert_eq!(c.get(&gw.url("/boom?token=hunter2"), &[]).await.status, 500);
    origin.stop().await;
    assert_eq!(c.get(&gw.url("/nowhere"), &[]).await.status, 502);
    let s: serde_json::Value = serde_json::from_slice(
        &admin_get(&gw, "/api/stats", &[("authorization", &bearer())])
            .await
            .body,
    )
    .expect("stats JSON");

    let errors = &s["errors"];
    assert_eq!(errors["total"], 2, "{errors}");
    assert_eq!(errors["by_status"]["500"], 1, "{errors}");
    assert_eq!(errors["by_status"]["502"], 1, "{errors}");
    let recent = errors["recent"].as_array().expect("recent errors");
    assert_eq!(recent.len(), 2, "{errors}");
    assert_eq!(
        (recent[0]["status"].as_u64(), recent[0]["path"].as_str()),
        (Some(502), Some("/nowhere"))
    );
    assert_eq!(recent[1]["path"], "/boom?token=[redacted]");
    assert_eq!(recent[1]["replica"], origin.addr.to_string());
    let at = recent[0]["at_ms"].as_u64().expect("at_ms");
    assert!(at >= before && at <= isrgate::clock::system_ms(), "{at}");

    let rows = s["routes"]["rows"].as_array().expect("route rows");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {rows:?}"))
    };
    let blog = row("/blog/*");
    assert_eq!(
        (blog["hits"].as_u64(), blog["misses"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(
        (blog["renders"].as_u64(), blog["stored"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(blog["median_ttl_s"], 60, "s-maxage=60");
    let other = row("other");
    assert_eq!(
        (other["misses"].as_u64(), other["renders"].as_u64()),
        (Some(2), Some(1))
    );
    let top = &s["routes"]["top_rendered"];
    assert!(
        top.as_array().is_some_and(|t| t
            .iter()
            .any(|p| p["path"] == "/boom" && p["route"] == "other")),
        "{top}"
    );
    assert_eq!(s["saved"]["by_cache"], 2);
    assert_eq!(s["saved"]["renders"], 2, "the page and the 500");
    assert_eq!(s["latency"]["hit"]["count"], 2);
    assert!(
        s["latency"]["hit"]["p99_ms"].is_number(),
        "{}",
        s["latency"]
    );
    assert_eq!(
        s["readiness"]["ready"], true,
        "the cache serves: still ready"
    );
    assert!(s["redis"]["evicted_keys"].is_u64(), "{}", s["redis"]);
    assert!(s["redis"]["hit_rate"].is_number(), "{}", s["redis"]);

    let metrics = String::from_utf8_lossy(&scrape(&gw, None).await.body).into_owned();
    for line in [
        "isrgate_server_errors_total{status=\"500\"} 1",
        "isrgate_server_errors_total{status=\"502\"} 1",
        "isrgate_renders_total 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn plain_scrapers_get_the_text_format_with_help_and_type_for_every_family() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p").header("cache-control", ISR));
    })
    .await;
    let gw = gateway(&origin, None, Some(TOKEN)).await;
    Client::default().get(&gw.url("/p"), &[]).await;
    for accept in [None, Some("text/plain"), Some("*/*")] {
        let got = scrape(&gw, accept).await;
        assert_eq!(
            got.header("content-type"),
            "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        let text = String::from_utf8_lossy(&got.body);
        assert!(!text.contains("# EOF"), "{accept:?}");
        let m = parse_text(&text);
        assert_eq!(m["isrgate_cache_requests_total{outcome=\"miss\"}"], 1.0);
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            m.keys().any(|k| k.starts_with("isrgate_build_info{")
                && k.contains(&format!("version=\"{version}\""))),
            "{text}"
        );
    }
    // Ready as /readyz says it.
    eventually!(
        10,
        parse_text(&String::from_utf8_lossy(&scrape(&gw, None).await.body))["isrgate_ready"] == 1.0,
        "isrgate_ready 1 once /readyz says 200"
    );
    assert_eq!(admin_get(&gw, "/readyz", &[]).await.status, 200);
    // OpenMetrics only for a scraper that asks for it.
    let got = scrape(&gw, Some("application/openmetrics-text; version=1.0.0")).await;
    assert!(
        got.header("content-type")
            .starts_with("application/openmetrics-text")
    );
    let m = parse_openmetrics(&String::from_utf8_lossy(&got.body));
    assert_eq!(
        m["isrgate_build_info{version=\"0.1.0\",revision=\"unknown\",target=\"x86_64\"}"
            .replace("0.1.0", env!("CARGO_PKG_VERSION"))
            .replace("x86_64", std::env::consts::ARCH)
            .as_str()],
        1.0
    );
}

/// `promtool check metrics` (Debian's `prometheus` package, installed by `.ci/run`) reads the
/// live exposition of a gateway with traffic and finds nothing to say.
#[tokio::test]
async fn promtool_finds_no_problem_in_the_live_exposition() {
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: promtool is not installed (Debian package `prometheus`)");
        return;
    }
    let mut r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p").header("cache-control", ISR));
    })
    .await;
    let gw = gateway(&origin, Some(&r), Some(TOKEN)).await;
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    c.get(&gw.url("/p"), &[]).await;
    c.get(&gw.url("/p.rsc"), &[]).await;
    let body = scrape(&gw, None).await.body;
    let check = |body: Bytes| {
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool runs");
        use std::io::Write as _;
        promtool
            .stdin
            .take()
            .expect("stdin")
            .write_all(&body)
            .expect("write to promtool");
        let out = promtool.wait_with_output().expect("promtool ends");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool: {said}"
        );
    };
    check(body);
    // With Redis down too (its gauges and histogram still well formed).
    r.kill();
    check(scrape(&gw, None).await.body);
}

#[tokio::test]
async fn requests_are_timed_by_status_class_and_cache_outcome_in_sub_millisecond_buckets() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("page").header("cache-control", ISR));
    })
    .await;
    let gw = gateway(&origin, None, Some(TOKEN)).await;
    let c = Client::default();
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "MISS");
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "HIT");
    assert_eq!(c.get(&gw.url("/p.rsc"), &[]).await.status, 404);
    let m = parse_text(&String::from_utf8_lossy(&scrape(&gw, None).await.body));
    let series = |suffix: &str, labels: &str| {
        format!("isrgate_request_duration_seconds{suffix}{{{labels}}}")
    };
    let hit = "status=\"2xx\",outcome=\"hit\"";
    assert_eq!(m[&series("_count", hit)], 1.0);
    assert_eq!(m[&series("_count", "status=\"2xx\",outcome=\"miss\"")], 1.0);
    assert_eq!(m[&series("_count", "status=\"4xx\",outcome=\"none\"")], 1.0);
    // The hit's buckets start at 50 µs: a hit is not lost in a first bucket of 1 ms.
    for le in [
        "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "10", "+Inf",
    ] {
        let bucket = series("_bucket", &format!("{hit},le=\"{le}\""));
        assert!(m.contains_key(&bucket), "{bucket}");
    }
    assert_eq!(m[&series("_bucket", &format!("{hit},le=\"+Inf\""))], 1.0);
    let sent = m["isrgate_response_body_bytes_total"];
    assert!(sent >= 8.0, "two bodies of 4 bytes and a 404: {sent}");
    // The same in the process: the hit landed in exactly one bucket of its series.
    let h = gw
        .state
        .metrics
        .request_duration
        .of(200, isrgate::metrics::CacheOutcome::Hit);
    assert_eq!(h.count(), 1);
}

/// Next.js sends `stale-while-revalidate` of a year: with the replicas down, the stale answers
/// are the origin's failure (stale-if-error), told apart by what happened, not by the header.
#[tokio::test]
async fn stale_served_while_the_replicas_are_down_counts_as_origin_error_though_swr_allowed_it() {
    let mut origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("p").header(
                "cache-control",
                "s-maxage=1, stale-while-revalidate=31536000",
            ),
        );
    })
    .await;
    let gw = gateway(&origin, None, Some(TOKEN)).await;
    let c = Client::default();
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "MISS");
    advance(&gw, 2);
    origin.stop().await;
    let m = &gw.state.metrics;
    // The first stale answer starts the refresh that finds the replica down.
    assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "STALE");
    eventually!(
        10,
        m.refreshes_of(isrgate::proxy::refresh::Refreshed::OriginError) == 1,
        "the refresh failed"
    );
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/p"), &[]).await.header("x-cache"), "STALE");
    }
    assert_eq!((m.stale_swr.get(), m.stale_origin_error.get()), (1, 3));
    let text = scrape(&gw, None).await.body;
    let scraped = parse_text(&String::from_utf8_lossy(&text));
    assert_eq!(
        scraped["isrgate_stale_served_total{reason=\"origin_error\"}"],
        3.0
    );
    assert_eq!(scraped["isrgate_stale_served_total{reason=\"swr\"}"], 1.0);
    assert_eq!(
        scraped["isrgate_cache_requests_total{outcome=\"stale\"}"],
        4.0
    );
    let s: serde_json::Value = serde_json::from_slice(
        &admin_get(&gw, "/api/stats", &[("authorization", &bearer())])
            .await
            .body,
    )
    .expect("stats JSON");
    assert_eq!(s["requests"]["stale_if_error"], 3, "{s}");
    assert_eq!(s["requests"]["stale"], 1, "{s}");
    assert!(
        s["banners"].as_array().is_some_and(|b| b
            .iter()
            .any(|b| b.as_str().is_some_and(|b| b.contains("stale-if-error")))),
        "{s}"
    );
}

/// `/metrics` needs the token unless `admin.metrics_auth` says otherwise; nothing else opens.
#[tokio::test]
async fn metrics_need_no_token_only_where_configured() {
    let origin = FakeNext::start(|_| {}).await;
    let start = |auth: &str, token: Option<&str>| {
        let mut cfg = config(
            &[origin.url()],
            "",
            &format!("[admin]\nmetrics_auth = {auth:?}"),
        );
        if let Some(admin) = cfg.admin.as_mut() {
            admin.token = token.map(str::to_owned);
        }
        Gateway::start(cfg)
    };
    let token = start("token", Some(TOKEN)).await;
    assert_eq!(admin_get(&token, "/metrics", &[]).await.status, 401);
    // The test client is on loopback: open there, and without any token configured.
    for (auth, tok) in [
        ("loopback", Some(TOKEN)),
        ("loopback", None),
        ("none", None),
    ] {
        let gw = start(auth, tok).await;
        let got = admin_get(&gw, "/metrics", &[]).await;
        assert_eq!(got.status, 200, "{auth} {tok:?}");
        assert!(
            String::from_utf8_lossy(&got.body).contains("# TYPE isrgate_requests_total counter")
        );
        let stats = admin_get(&gw, "/api/stats", &[]).await.status;
        assert!(
            stats == 401 || stats == 403,
            "{auth}: /api/stats still guarded ({stats})"
        );
    }
}

/// Every `isrgate_…` name in `text` (a word starting with it).
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("isrgate_") {
        let before = text.len() - rest.len() + i;
        let word_start = text[..before]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if word_start {
            names.push(tail[..end].to_owned());
        }
        rest = &tail[end.max(1)..];
    }
    names
}

/// The alert rules, the Grafana dashboard and the README name only metrics a gateway exposes,
/// and the README's metric table lists every family.
#[tokio::test]
async fn deploy_files_and_the_readme_name_only_metrics_that_exist() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|_| {}).await;
    let gw = gateway(&origin, Some(&r), Some(TOKEN)).await;
    let text = String::from_utf8_lossy(&scrape(&gw, None).await.body).into_owned();
    let families: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let exists = |name: &str| {
        families.contains(name)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| families.contains(f)))
    };
    // Names that are not metrics: the session cookie, the Lua function, the signature header.
    let not_metrics = ["isrgate_admin", "isrgate_invalidate", "isrgate_signature"];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "deploy/prometheus/alerts.yaml",
        "deploy/grafana/isrgate.json",
        "deploy/kubernetes/servicemonitor.yaml",
        "README.md",
    ] {
        let content = std::fs::read_to_string(root.join(file)).expect(file);
        for name in metric_names(&content) {
            if name == "isrgate_" || not_metrics.iter().any(|n| name.starts_with(n)) {
                continue;
            }
            assert!(
                exists(&name),
                "{file} names {name}, which /metrics does not have"
            );
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    for family in &families {
        assert!(
            readme.contains(&format!("| `{family}` |")),
            "the README's metric table lacks {family}"
        );
    }
    serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(root.join("deploy/grafana/isrgate.json")).expect("dashboard"),
    )
    .expect("the Grafana dashboard is JSON");
}
