//! The fleet view (`GET /api/fleet`): any gateway answers for the whole fleet, each gateway
//! named by its host with its version and readiness, and a gateway that stops is shown as
//! gone within a few seconds.

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, config};

const TOKEN: &str = "fleet-view-token";

async fn gateway(origin: &FakeNext, r: &RedisProcess) -> Gateway {
    let mut cfg = config(
        &[origin.url()],
        "",
        &format!("[redis]\nurl = \"{}\"", r.url()),
    );
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = Some(TOKEN.into());
    }
    Gateway::start(cfg).await
}

async fn fleet(c: &Client, gw: &Gateway) -> serde_json::Value {
    let url = format!("http://{}/api/fleet", gw.admin.expect("admin"));
    let auth = format!("Bearer {TOKEN}");
    let got = c.get(&url, &[("authorization", &auth)]).await;
    assert_eq!(got.status, 200);
    serde_json::from_slice(&got.body).expect("json")
}

fn row<'a>(view: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    view["gateways"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_gateway_shows_the_whole_fleet_and_a_stopped_one_as_gone() {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("p").header("cache-control", "s-maxage=60"),
        );
    })
    .await;
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(gateway(&origin, &r).await);
    }
    let ids: Vec<String> = gws
        .iter()
        .map(|g| {
            g.state
                .cache
                .as_ref()
                .expect("cache")
                .gateway_id()
                .to_owned()
        })
        .collect();
    let c = Client::default();
    for _ in 0..3 {
        c.get(&gws[2].url("/p"), &[]).await;
    }
    let mut view: serde_json::Value;
    eventually!(
        20,
        {
            view = fleet(&c, &gws[0]).await;
            ids.iter()
                .all(|id| row(&view, id).is_some_and(|r| r["live"] == true))
                && row(&view, &ids[2]).is_some_and(|r| r["requests"] == 3)
        },
        "the first gateway does not see the fleet: {view:#}"
    );
    let me = &view["gateways"][0];
    assert_eq!(me["id"], ids[0].as_str());
    assert_eq!(me["me"], true);
    for id in &ids {
        let r = row(&view, id).expect("row");
        assert_eq!(r["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(r["ready"], true, "{r}");
        assert!(
            r["host"]
                .as_str()
                .is_some_and(|h| !h.is_empty() && h != "-"),
            "{r}"
        );
    }
    let third = row(&view, &ids[2]).expect("row");
    assert_eq!(
        (third["hits"].as_u64(), third["misses"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(view["totals"]["live"], 3);
    assert!(view["totals"]["requests"].as_u64() >= Some(3));

    // One stops: the others show it as gone (not live) within a few seconds, not dropped.
    let stopped = gws.remove(1);
    drop(stopped);
    eventually!(
        15,
        {
            view = fleet(&c, &gws[0]).await;
            row(&view, &ids[1]).is_some_and(|r| r["live"] == false)
        },
        "the stopped gateway is not shown as gone: {view:#}"
    );
    assert_eq!(view["totals"]["live"], 2);
    assert_eq!(view["totals"]["gone"], 1);
}
