//! Per-request and per-connection limits, load shedding and graceful shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::{Client, Gateway, config};

async fn echo_origin() -> FakeNext {
    FakeNext::start(|o| {
        o.route("/echo", Route::echo());
        o.route("/p", Route::html("ok"));
        o.route(
            "/slow",
            Route::html("slow").delay(Duration::from_millis(600)),
        );
    })
    .await
}

#[tokio::test]
async fn oversize_bodies_get_413_declared_or_streamed() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(&[origin.url()], "max_body_bytes = 1000", "")).await;
    let c = Client::default();
    let got = c
        .send("POST", &gw.url("/echo"), &[], Bytes::from(vec![b'x'; 1001]))
        .await;
    assert_eq!(got.status, 413);
    assert_eq!(got.body, "Request body too large\n");
    assert_eq!(
        origin.count("/echo"),
        0,
        "a declared oversize body never reaches the origin"
    );
    let ok = c
        .send("POST", &gw.url("/echo"), &[], Bytes::from(vec![b'x'; 1000]))
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body.len(), 1000);

    // Chunked (no Content-Length): the limit is counted while streaming.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let mut req = b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"1F4\r\n");
        req.extend_from_slice(&[b'y'; 500]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&req).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert_eq!(gw.state.metrics.body_too_large.get(), 2);
}

#[tokio::test]
async fn oversize_request_head_gets_431() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(&[origin.url()], "max_header_bytes = 16384", "")).await;
    let big = "v".repeat(20_000);
    let got = Client::default()
        .try_send("GET", &gw.url("/p"), &[("x-big", &big)], Bytes::new())
        .await;
    match got {
        Ok(g) => assert_eq!(g.status, 431),
        Err(e) => panic!("expected a 431 response, got transport error {e}"),
    }
    assert_eq!(origin.count("/p"), 0);
}

#[tokio::test]
async fn slow_request_head_is_cut_but_idle_keep_alive_is_not() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "header_read_timeout = \"300ms\"\nidle_timeout = \"60s\"",
        "",
    ))
    .await;

    // Slowloris: a partial head, then silence.
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /p HTTP/1.1\r\nHost: a\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    // Cut at the header timeout: not before it, and long before the idle timeout.
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the gateway must close the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert_eq!(gw.state.metrics.header_timeouts.get(), 1);

    // A keep-alive connection idle longer than the header timeout is still usable.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    for _ in 0..2 {
        s.write_all(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut [0u8; 4096]))
            .await
            .expect("response")
            .expect("read");
        assert!(n > 0);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(origin.count("/p"), 2);
}

/// A connection that never sends a byte is cut at `header_read_timeout`, not held for
/// `idle_timeout`: silent sockets must not pile up to the descriptor limit.
#[tokio::test]
async fn a_silent_connection_is_cut_at_the_header_timeout() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "header_read_timeout = \"300ms\"\nidle_timeout = \"120s\"",
        "",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut [0u8; 64]))
        .await
        .expect("closed long before the idle timeout")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert_eq!(gw.state.metrics.header_timeouts.get(), 1);
    assert_eq!(origin.count("/p"), 0);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(&[origin.url()], "idle_timeout = \"300ms\"", "")).await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    assert!(s.read(&mut buf).await.expect("read") > 0);
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gw.state.metrics.idle_closes.get(), 1);
}

#[tokio::test]
async fn over_the_concurrency_limit_requests_are_shed_with_503() {
    let origin = echo_origin().await;
    // Without coalescing: two requests for one path must both be in flight.
    let no_coalescing = "[coalesce]\nenabled = false\n";
    let gw = Gateway::start(config(
        &[origin.url()],
        "max_concurrent_requests = 2",
        no_coalescing,
    ))
    .await;
    let c = Client::default();
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (c, u) = (c.clone(), gw.url("/slow"));
            tokio::spawn(async move { c.get(&u, &[]).await.status })
        })
        .collect();
    crate::eventually!(
        10,
        origin.count("/slow") == 2,
        "two slow requests in flight"
    );
    let shed = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(shed.status, 503);
    assert_eq!(shed.header("retry-after"), "1");
    assert!(
        !shed.header("x-request-id").is_empty(),
        "shed responses carry a request id too"
    );
    assert_eq!(origin.count("/p"), 0);
    for h in slow {
        assert_eq!(h.await.expect("task"), 200);
    }
    assert_eq!(
        c.get(&gw.url("/p"), &[]).await.status,
        200,
        "capacity returns"
    );
    assert_eq!(gw.state.metrics.shed.get(), 1);
}

/// The drain waits for the request in flight, and no longer: its grace is ten minutes, so a
/// drain held to it would miss the 30 s bound.
#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_refuses_new_ones() {
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route("/held", Route::html("held").gated(&gate));
    })
    .await;
    let mut gw = Gateway::start(config(&[origin.url()], "shutdown_grace = \"10m\"", "")).await;
    let c = Client::default();
    let url = gw.url("/held");
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.get(&url, &[]).await }
    });
    crate::eventually!(10, origin.count("/held") == 1, "request in flight");
    let run = gw.shutdown();
    let readyz = format!("http://{}/readyz", gw.admin.expect("admin"));
    crate::eventually!(
        10,
        c.get(&readyz, &[]).await.status == 503,
        "not ready while draining"
    );
    let ready = c.get(&readyz, &[]).await;
    assert!(String::from_utf8_lossy(&ready.body).contains("\"draining\":true"));
    gate.open();
    let got = in_flight.await.expect("task");
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "held");
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("drain ends once in-flight work is done")
        .expect("task");
    assert!(
        TcpStream::connect(gw.addr).await.is_err(),
        "listener closed"
    );
}

/// A request that never ends is cut at the grace: not before, and the drain ends then.
#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let never = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route("/stuck", Route::html("never").gated(&never));
    })
    .await;
    let mut gw = Gateway::start(config(&[origin.url()], "shutdown_grace = \"300ms\"", "")).await;
    let url = gw.url("/stuck");
    let _stuck = tokio::spawn(async move {
        Client::default()
            .try_send("GET", &url, &[], Bytes::new())
            .await
    });
    crate::eventually!(10, origin.count("/stuck") == 1, "request in flight");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), gw.shutdown())
        .await
        .expect("exits within the grace bound")
        .expect("task");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_and_frees_the_replica() {
    let origin = FakeNext::start(|o| {
        o.route("/big", Route::stream(320, 64 * 1024));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "send_timeout = \"300ms\"", "")).await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    // Read nothing: socket buffers fill and the gateway's writes block.
    crate::eventually!(
        10,
        gw.state.metrics.send_timeouts.get() == 1,
        "slow reader cut"
    );
    let in_flight = || {
        gw.state
            .upstream
            .replicas()
            .with(|l| l.iter().map(|r| r.in_flight()).sum::<u32>())
    };
    crate::eventually!(
        10,
        in_flight() == 0,
        "the replica's in-flight slot is released"
    );
    drop(s);
}

#[tokio::test]
async fn a_client_aborting_its_upload_is_its_own_fault() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\npartial")
        .await
        .expect("write");
    crate::eventually!(10, origin.count("/echo") == 1, "upload reached the replica");
    drop(s);
    crate::eventually!(
        10,
        gw.state.metrics.client_body_errors.get() == 1,
        "counted as client error"
    );
    assert_eq!(gw.state.metrics.upstream_errors.get(), 0);
    let in_flight = || {
        gw.state
            .upstream
            .replicas()
            .with(|l| l.iter().map(|r| r.in_flight()).sum::<u32>())
    };
    crate::eventually!(10, in_flight() == 0, "in-flight released");
}

#[tokio::test]
async fn h2_connections_are_not_cut_by_the_header_timeout_between_requests() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "header_read_timeout = \"200ms\"\nidle_timeout = \"10s\"",
        "",
    ))
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<Bytes>>();
    for _ in 0..3 {
        let resp = client
            .get(gw.url("/p").parse().expect("uri"))
            .await
            .expect("h2 response");
        assert_eq!(resp.status(), 200);
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(gw.state.metrics.header_timeouts.get(), 0);
}

/// An upload that stops sending is cut at `body_read_timeout` with 408: it must not hold a
/// concurrency permit and a replica connection for the whole upstream timeout.
#[tokio::test]
async fn a_stalled_request_body_is_cut_with_408() {
    let origin = echo_origin().await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "body_read_timeout = \"1s\"\nidle_timeout = \"120s\"",
        "",
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nten bytes.")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(gw.state.metrics.client_body_errors.get(), 1);
    // A body that keeps coming, however slowly, is not cut.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    for b in [b"a", b"b", b"c", b"d"] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b).await.expect("write");
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("abcd"),
        "{text}"
    );
}
