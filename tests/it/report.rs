//! The revalidation report is one type: what the webhook answers on either listener reads back
//! as `isrgate::invalidate::Report`, the log keeps the same record, refusals are the same
//! answers on both listeners, and the admin listener names the peer that called, not what a
//! `X-Forwarded-For` it received claims.

use bytes::Bytes;
use isrgate::invalidate::Report;
use isrgate::invalidate::webhook::Secrets;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, bus_live, config};

const SECRET: &str = "report-secret";

async fn gateway(origin: &FakeNext, r: &RedisProcess) -> Gateway {
    let mut cfg = config(
        &[origin.url()],
        "",
        &format!("[redis]\nurl = \"{}\"\n", r.url()),
    );
    cfg.webhook.secrets = Some(Secrets {
        bearer: SECRET.into(),
        hmac: SECRET.into(),
    });
    let gw = Gateway::start(cfg).await;
    eventually!(5, bus_live(&gw), "bus subscribed");
    gw
}

async fn call(url: &str, method: &str, extra: &[(&str, &str)]) -> Got {
    let auth = format!("Bearer {SECRET}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    let body = Bytes::from_static(br#"{"paths":["/p"],"tags":["posts"]}"#);
    Client::default().send(method, url, &headers, body).await
}

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
    let gw = gateway(&origin, &r).await;
    let admin = gw.admin.expect("admin listener");
    let public = gw.url("/_isrgate/revalidate");
    let private = format!("http://{admin}/_isrgate/revalidate");
    let spoof = [("x-forwarded-for", "203.0.113.9")];

    let got = call(&public, "POST", &spoof).await;
    assert_eq!(got.status.as_u16(), 200, "{got:?}");
    let report: Report = serde_json::from_slice(&got.body).expect("a Report");
    assert_eq!(report.paths, ["/p"]);
    assert!(report.tags.contains(&"posts".to_owned()), "{report:?}");
    // The public listener rewrote the header: its last hop is the peer that connected.
    assert_eq!(report.source, "127.0.0.1");

    let got = call(&private, "POST", &spoof).await;
    assert_eq!(got.status.as_u16(), 200, "{got:?}");
    let report: Report = serde_json::from_slice(&got.body).expect("a Report");
    assert_eq!(report.source, "127.0.0.1", "the peer, not the header");

    // The log holds the same record.
    let cache = gw.state.cache.as_ref().expect("cache on");
    let logged = cache.log.recent(cache.redis(), 1).await.expect("log");
    let logged: Report = serde_json::from_value(logged[0].clone()).expect("a Report");
    assert_eq!(logged, report);

    for url in [&public, &private] {
        let got = call(url, "PUT", &[]).await;
        assert_eq!(got.status.as_u16(), 405, "{url}");
        assert_eq!(got.header("allow"), "POST", "{url}");
        let error: serde_json::Value = serde_json::from_slice(&got.body).expect("JSON");
        assert!(
            error["error"].as_str().is_some_and(|e| e.contains("POST")),
            "{error}"
        );
    }
}
