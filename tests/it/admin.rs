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
        &admin_get(&gw, "/metrics", &[("authorization", &bearer())])
            .await
            .body,
    ));
    assert_eq!(before["isrgate_cache_requests_total{outcome=\"hit\"}"], 0.0);
    c.get(&gw.url("/p"), &[]).await; // miss
    c.get(&gw.url("/p"), &[]).await; // hit
    c.get(&gw.url("/p"), &[("authorization", "Basic x")]).await; // bypass
    c.get(&gw.url("/s"), &[]).await; // miss
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(c.get(&gw.url("/s"), &[]).await.header("x-cache"), "STALE");
    let got = admin_get(&gw, "/metrics", &[("authorization", &bearer())]).await;
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
        5,
        gw.state
            .cache
            .as_ref()
            .and_then(|c| c.bus.as_ref())
            .is_some_and(|b| b.is_subscribed()),
        "bus"
    );
    eventually!(
        5,
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
        5,
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
