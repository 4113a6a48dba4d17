//! The per-worker keep-alive pool: connections are reused once a response is read to the end,
//! never while a body is abandoned, and not after `pool_idle_timeout`.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::origin::{FakeNext, Route};
use crate::support::{Client, Gateway, config};

/// One worker, so every request uses the same pool; no health checks (they connect too). The
/// gateway's one look at each replica before it serves (its build) opens a connection of its
/// own: the counts start after it.
const ONE_POOL: &str = "workers = 1";
const NO_CHECKS: &str = "[health]\ninterval = \"0s\"";

#[tokio::test]
async fn sequential_requests_share_one_connection_head_and_304_included() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("page"));
        o.route("/nm", Route::status(304).header("etag", "\"1\""));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], ONE_POOL, NO_CHECKS)).await;
    let looked = origin.connections();
    let c = Client::default();
    for _ in 0..10 {
        assert_eq!(c.get(&gw.url("/p"), &[]).await.body, "page");
        assert_eq!(
            c.send("HEAD", &gw.url("/p"), &[], Bytes::new())
                .await
                .status,
            200
        );
        assert_eq!(c.get(&gw.url("/nm"), &[]).await.status, 304);
    }
    assert_eq!(origin.count("/p"), 20);
    assert_eq!(
        origin.connections() - looked,
        1,
        "one keep-alive connection for 30 exchanges"
    );
}

#[tokio::test]
async fn an_abandoned_body_does_not_poison_the_next_exchange() {
    let origin = FakeNext::start(|o| {
        o.route("/big", Route::stream(64, 64 * 1024));
        o.route("/p", Route::html("page"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], ONE_POOL, NO_CHECKS)).await;
    let looked = origin.connections();
    // Read the head and a little of a 4 MiB body, then hang up.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 16 * 1024];
    assert!(s.read(&mut buf).await.expect("read") > 0);
    drop(s);
    let c = Client::default();
    for _ in 0..5 {
        let got = c.get(&gw.url("/p"), &[]).await;
        assert_eq!((got.status.as_u16(), &got.body[..]), (200, &b"page"[..]));
    }
    assert_eq!(
        origin.connections() - looked,
        2,
        "the dirty connection is not reused; one new one is"
    );
}

#[tokio::test]
async fn idle_connections_expire() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("page"));
    })
    .await;
    let gw = Gateway::start(config(
        &[origin.url()],
        ONE_POOL,
        "[upstream]\npool_idle_timeout = \"200ms\"\n[health]\ninterval = \"0s\"",
    ))
    .await;
    let looked = origin.connections();
    let c = Client::default();
    c.get(&gw.url("/p"), &[]).await;
    c.get(&gw.url("/p"), &[]).await;
    assert_eq!(origin.connections() - looked, 1);
    // Idle past the timeout, in real time: the pool reads the monotonic clock at checkout.
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.get(&gw.url("/p"), &[]).await;
    assert_eq!(
        origin.connections() - looked,
        2,
        "an idle connection past pool_idle_timeout is not reused"
    );
}
