//! Revalidations made inside the app reach the whole fleet (issue 16): `examples/nextjs` runs
//! `@isrgate/next` (`ISRGATE_REDIS_URL` on every replica, no `webhook.replica_path`, no
//! `[tag_rules]`). A server action, a route handler and a Pages API route each revalidate on one
//! replica; both gateways and the other replicas follow.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    HOST, REPLICA_SECRET, Replica, Stack, direct_get, get, marker, rsc_get, stack, webhook,
};
use crate::eventually;
use crate::support::{Client, Gateway, Got};

/// The price a `/tagged/<id>` page shows (`data-price`), from its HTML.
fn price(got: &Got) -> String {
    let body = String::from_utf8_lossy(&got.body);
    body.split("data-price=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

/// Runs the server action of `/admin/products/<id>` on `r` as a browser without JavaScript
/// does (the form's hidden `$ACTION_ID_…` field): it writes the price and calls
/// `revalidateTag('product-<id>')`. Returns the action's status (303 to the saved page).
async fn save_price(r: &Replica, id: &str, price: u32) -> u16 {
    let page = direct_get(r, &format!("/admin/products/{id}")).await;
    let html = String::from_utf8_lossy(&page.body);
    let action = html
        .split("name=\"$ACTION_ID_")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the form's action id");
    let boundary = "isrgate-e2e-boundary";
    let mut body = String::new();
    for (name, value) in [
        (format!("$ACTION_ID_{action}"), String::new()),
        ("id".to_owned(), id.to_owned()),
        ("price".to_owned(), price.to_string()),
    ] {
        body.push_str(&format!(
            "--{boundary}\r\ncontent-disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let got = Client::default()
        .send(
            "POST",
            &format!("{}/admin/products/{id}", r.url()),
            &[
                ("host", HOST),
                (
                    "content-type",
                    &format!("multipart/form-data; boundary={boundary}"),
                ),
            ],
            Bytes::from(body),
        )
        .await;
    got.status.as_u16()
}

/// Both gateways serve `/tagged/<id>` at `want`, in HTML and in RSC.
async fn both_show(gws: &[Gateway], id: &str, want: &str) -> bool {
    for gw in gws {
        let path = format!("/tagged/{id}");
        if price(&get(gw, &path, &[]).await) != want {
            return false;
        }
        let rsc = rsc_get(gw, &path, &[("rsc", "1")]).await;
        if !String::from_utf8_lossy(&rsc.body).contains(&format!("\"data-price\":{want}")) {
            return false;
        }
    }
    true
}

/// `POST /api/revalidate` of the example (a route handler calling `revalidatePath`) on `r`.
async fn revalidate_path_on(r: &Replica, path: &str) {
    let got = Client::default()
        .send(
            "POST",
            &format!("{}/api/revalidate", r.url()),
            &[
                ("host", HOST),
                ("x-revalidate-secret", REPLICA_SECRET),
                ("content-type", "application/json"),
            ],
            Bytes::from(format!(r#"{{"paths":["{path}"]}}"#)),
        )
        .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
}

/// Warms `paths` in both gateways until each answers a HIT.
async fn warm(s: &Stack, paths: &[&str]) {
    for path in paths {
        for gw in &s.gateways {
            eventually!(
                10,
                get(gw, path, &[]).await.header("x-cache") == "HIT",
                "{path} cached"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node/npm and a Next.js build; .ci/run runs it when node is present"]
async fn in_app_revalidations_reach_every_gateway_and_replica() {
    let mut s = stack().await;
    warm(&s, &["/tagged/1", "/tagged/2", "/isr/one"]).await;
    let first = price(&get(&s.gateways[0], "/tagged/1", &[]).await);
    assert!(!first.is_empty() && first != "4242");
    for r in &s.replicas {
        assert_eq!(price(&direct_get(r, "/tagged/1").await), first);
    }
    // A copy from a replica's cache says how old it is (the gateway dates its entry at the
    // render, not at the fill); the gateway keeps that to itself.
    let copy = direct_get(&s.replicas[0], "/tagged/1").await;
    assert_eq!(copy.header("x-nextjs-cache"), "HIT");
    let age = copy.header("x-isrgate-age-ms");
    assert!(age.parse::<u64>().is_ok(), "x-isrgate-age-ms: {age:?}");
    let served = get(&s.gateways[0], "/tagged/1", &[]).await;
    assert_eq!(served.header("x-isrgate-age-ms"), "");

    // A server action on replica b changes product 1 and calls revalidateTag('product-1').
    assert_eq!(save_price(&s.replicas[1], "1", 4242).await, 303);
    eventually!(
        10,
        both_show(&s.gateways, "1", "4242").await,
        "both gateways serve the new /tagged/1"
    );
    for gw in &s.gateways {
        assert_eq!(
            get(gw, "/tagged/2", &[]).await.header("x-cache"),
            "HIT",
            "another product's page is untouched"
        );
    }
    for r in [&s.replicas[0], &s.replicas[2]] {
        assert_eq!(
            price(&direct_get(r, "/tagged/1").await),
            "4242",
            "replica {} renders the new data",
            r.id
        );
    }

    // A route handler on replica c calls revalidatePath('/isr/one').
    let before = marker(&get(&s.gateways[0], "/isr/one", &[]).await);
    revalidate_path_on(&s.replicas[2], "/isr/one").await;
    for gw in &s.gateways {
        eventually!(
            10,
            marker(&get(gw, "/isr/one", &[]).await) != before,
            "a new render of /isr/one"
        );
    }

    // A webhook names the tag the page's data uses; no [tag_rules], no header of the app's.
    warm(&s, &["/tagged/1", "/tagged/2"]).await;
    let t1 = marker(&get(&s.gateways[0], "/tagged/1", &[]).await);
    webhook(&s.gateways[1], r#"{"tags":["product-1"],"mode":"hard"}"#).await;
    for gw in &s.gateways {
        let got = get(gw, "/tagged/1", &[]).await;
        assert_ne!(marker(&got), t1, "/tagged/1 was purged");
        assert_eq!(get(gw, "/tagged/2", &[]).await.header("x-cache"), "HIT");
    }

    // Redis dies: the action still answers and the pages still serve; once Redis is back
    // (empty), the next revalidation works.
    s.redis.kill();
    let started = Instant::now();
    assert_eq!(save_price(&s.replicas[0], "1", 5151).await, 303);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the action did not hang on Redis"
    );
    for gw in &s.gateways {
        assert_eq!(get(gw, "/tagged/1", &[]).await.status, 200);
    }
    s.redis.restart();
    for gw in &s.gateways {
        let cache = gw.state.cache.as_ref().expect("cache");
        eventually!(
            20,
            crate::support::bus_live(gw) && cache.epochs.is_synced(),
            "gateway back on Redis"
        );
    }
    assert_eq!(save_price(&s.replicas[1], "1", 6161).await, 303);
    eventually!(
        20,
        both_show(&s.gateways, "1", "6161").await,
        "the revalidation after the restart reached both gateways"
    );
}

/// `res.revalidate('/legacy/1')` in a Pages API route on replica b: the gateways' HTML and
/// `/_next/data` entries, and the other replicas' copies, go too. No `previewModeId` is
/// configured: the gateways learn it from the replicas' report, and their own regenerations
/// (a webhook's re-warm) are not reported back by the package as in-app revalidations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node/npm and a Next.js build; .ci/run runs it when node is present"]
async fn res_revalidate_in_a_pages_api_route_reaches_the_fleet() {
    let s = stack().await;
    let want = super::preview_mode_id();
    for gw in &s.gateways {
        let builds = &gw.state.deploy.builds;
        eventually!(
            15,
            builds.preview_mode_id(Some("isrgate-example")).as_ref() == Some(&want),
            "the gateway learned the build and its previewModeId"
        );
        let build = builds.get("isrgate-example").expect("a build");
        assert_eq!(build.build_id, "isrgate-example");
        assert!(build.next.is_some());
    }

    let data = "/_next/data/isrgate-example/legacy/1.json";
    warm(&s, &["/legacy/1", data]).await;
    let html_before = marker(&get(&s.gateways[0], "/legacy/1", &[]).await);
    let data_before = get(&s.gateways[0], data, &[]).await.body;
    // Every replica holds a copy of its own.
    let mut held = Vec::new();
    for r in &s.replicas {
        direct_get(r, "/legacy/1").await;
        held.push(marker(&direct_get(r, "/legacy/1").await));
    }
    let got = Client::default()
        .get(
            &format!(
                "{}/api/legacy-revalidate?path=/legacy/1",
                s.replicas[1].url()
            ),
            &[("host", HOST), ("x-revalidate-secret", REPLICA_SECRET)],
        )
        .await;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    for gw in &s.gateways {
        eventually!(
            10,
            marker(&get(gw, "/legacy/1", &[]).await) != html_before
                && get(gw, data, &[]).await.body != data_before,
            "a new /legacy/1 and data JSON"
        );
    }
    for (r, held) in s.replicas.iter().zip(&held) {
        eventually!(
            10,
            marker(&direct_get(r, "/legacy/1").await) != *held,
            "replica {} dropped its copy",
            r.id
        );
    }
    let reported = s.redis.cli(&["HGET", "isr:inv", "h:path:/legacy/1"]);
    assert!(reported.trim().parse::<u64>().is_ok(), "{reported}");

    // A webhook's re-warm regenerates the page with the learned previewModeId: not reported
    // back (no newer record of the path), and the re-warmed page stays cached.
    let answer = webhook(&s.gateways[0], r#"{"paths":["/legacy/1"]}"#).await;
    assert_eq!(
        s.redis.cli(&["HGET", "isr:inv", "h:path:/legacy/1"]),
        reported,
        "the re-warm was not reported as an in-app revalidation: {answer}"
    );
    warm(&s, &["/legacy/1"]).await;
    let settled = marker(&get(&s.gateways[0], "/legacy/1", &[]).await);
    for gw in &s.gateways {
        assert_eq!(marker(&get(gw, "/legacy/1", &[]).await), settled);
    }
}

/// Latency from an in-app revalidateTag returning (the server action's answer) to both gateways
/// serving the new page, HTML and RSC: `MEASURE_REVALIDATION=50 cargo test --test e2e --
/// --ignored measure` prints p50 and p99 over that many runs (the note of issue 16).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: MEASURE_REVALIDATION=50 cargo test --test e2e -- --ignored measure --nocapture"]
async fn measure_in_app_revalidation_latency() {
    let Some(runs) = std::env::var("MEASURE_REVALIDATION")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return;
    };
    let s = stack().await;
    warm(&s, &["/tagged/1"]).await;
    let mut took = Vec::new();
    for i in 0..runs {
        let want = 10_000 + i;
        let r = &s.replicas[(i % 3) as usize];
        assert_eq!(save_price(r, "1", want).await, 303);
        let returned = Instant::now();
        while !both_show(&s.gateways, "1", &want.to_string()).await {
            tokio::time::sleep(Duration::from_millis(2)).await;
            assert!(returned.elapsed() < Duration::from_secs(30), "run {i}");
        }
        took.push(returned.elapsed());
        // Cached again everywhere before the next run.
        warm(&s, &["/tagged/1"]).await;
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    println!(
        "in-app revalidateTag -> both gateways serve the new page (HTML and RSC), {} runs: p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        at(0.5),
        at(0.99),
        took[took.len() - 1]
    );
}
