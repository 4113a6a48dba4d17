//! What goes through the gateway comes out unchanged: status, headers (multi-valued, case),
//! bodies of every framing, HEAD, 304, trailers, request bodies, upgrades, h2c.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::origin::{FakeNext, Route};
use crate::support::{Client, Gateway, config};

/// The proxy layer on its own: with the cache on, candidates are fetched without the client's
/// conditional headers (to get storable bodies), which the cache tests cover.
async fn gateway_for(origin: &FakeNext) -> Gateway {
    Gateway::start(config(&[origin.url()], "", "[cache]\nenabled = false")).await
}

#[tokio::test]
async fn status_and_multi_valued_headers_pass_through() {
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("teapot")
                .with_status(418)
                .header("x-multi", "a")
                .header("x-multi", "b")
                .header("set-cookie", "a=1")
                .header("set-cookie", "b=2")
                .header("cache-control", "private"),
        );
    })
    .await;
    let gw = gateway_for(&origin).await;
    let got = Client::default().get(&gw.url("/p"), &[]).await;
    assert_eq!(got.status, 418);
    assert_eq!(got.body, "teapot");
    let multi: Vec<_> = got.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    let cookies: Vec<_> = got.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(got.header("cache-control"), "private");
    assert!(!got.header("x-request-id").is_empty());
}

/// Reads one HTTP/1.1 response head (and whatever body bytes follow in the same reads) as text.
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .expect("read timed out")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A one-shot origin that records the raw request bytes and answers with raw bytes, so header
/// name case can be checked on the wire in both directions.
async fn raw_origin(
    response: &'static str,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let text = String::from_utf8_lossy(&buf).into_owned();
            if text.starts_with("GET /health") || text.starts_with("GET / ") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
                continue;
            }
            s.write_all(response.as_bytes()).await.expect("write");
            return text;
        }
    });
    (addr, task)
}

#[tokio::test]
async fn header_name_case_is_preserved_both_ways() {
    let (addr, seen) =
        raw_origin("HTTP/1.1 200 OK\r\nX-Custom-Case: Yes\r\nContent-Length: 1\r\n\r\nx").await;
    let gw = Gateway::start(config(&[format!("http://{addr}")], "", "")).await;
    let head = raw_exchange(
        gw.addr,
        "GET /p HTTP/1.1\r\nHost: shop.example\r\nX-Client-Case: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.contains("\r\nX-Custom-Case: Yes\r\n"), "{head}");
    let request = seen.await.expect("origin task");
    assert!(request.contains("\r\nX-Client-Case: 1\r\n"), "{request}");
}

#[tokio::test]
async fn content_length_and_chunked_bodies_keep_their_framing() {
    let origin = FakeNext::start(|o| {
        o.route("/fixed", Route::html("0123456789"));
        o.route("/chunked", Route::stream(3, 1000));
    })
    .await;
    let gw = gateway_for(&origin).await;
    let head = raw_exchange(
        gw.addr,
        "GET /fixed HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 10\r\n"),
        "{head}"
    );
    let head = raw_exchange(
        gw.addr,
        "GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked\r\n"),
        "{head}"
    );
    let got = Client::default().get(&gw.url("/chunked"), &[]).await;
    assert_eq!(got.body.len(), 3000);
    assert!(
        got.body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i % 251) as u8)
    );
}

#[tokio::test]
async fn twenty_megabytes_stream_through_without_buffering() {
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 320; // 20 MiB
    const GATE_AFTER: usize = 16; // 1 MiB, then the origin waits
    let gate = Arc::new(tokio::sync::Notify::new());
    let origin = FakeNext::start(|o| {
        o.route(
            "/big",
            Route::gated_stream(CHUNKS, CHUNK, GATE_AFTER, Arc::clone(&gate)),
        );
    })
    .await;
    let gw = gateway_for(&origin).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let resp = client
        .get(gw.url("/big").parse().expect("uri"))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut received, mut gate_opened, mut offset) = (0usize, false, 0usize);
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first MiB must arrive while the origin still holds the rest")
    {
        let data = frame.expect("frame").into_data().unwrap_or_default();
        assert!(data.iter().all(|b| {
            let ok = *b == (offset % 251) as u8;
            offset += 1;
            ok
        }));
        received += data.len();
        if !gate_opened && received >= GATE_AFTER * CHUNK {
            assert_eq!(
                received,
                GATE_AFTER * CHUNK,
                "nothing past the gate can exist yet"
            );
            gate.notify_one();
            gate_opened = true;
        }
    }
    assert!(gate_opened);
    assert_eq!(received, CHUNKS * CHUNK);
}

#[tokio::test]
async fn head_and_304_have_no_body_and_keep_their_headers() {
    let origin = FakeNext::start(|o| {
        o.route("/h", Route::html("0123456789").header("etag", "\"v1\""));
        o.route("/nm", Route::status(304).header("etag", "\"v1\""));
    })
    .await;
    let gw = gateway_for(&origin).await;
    let c = Client::default();
    let got = c.send("HEAD", &gw.url("/h"), &[], Bytes::new()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), "10");
    assert!(got.body.is_empty());
    let got = c.get(&gw.url("/nm"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(got.status, 304);
    assert_eq!(got.header("etag"), "\"v1\"");
    assert!(got.body.is_empty());
    let seen = origin.last("/nm").expect("seen");
    assert_eq!(seen.headers["if-none-match"], "\"v1\"");
}

#[tokio::test]
async fn trailers_reach_a_client_that_accepts_them() {
    let origin = FakeNext::start(|o| {
        o.route(
            "/t",
            Route::trailers("body", &[("x-checksum", "abc")]).header("trailer", "x-checksum"),
        );
    })
    .await;
    let gw = gateway_for(&origin).await;
    let got = Client::default()
        .get(&gw.url("/t"), &[("te", "trailers")])
        .await;
    assert_eq!(got.body, "body");
    let trailers = got.trailers.expect("trailers forwarded");
    assert_eq!(trailers["x-checksum"], "abc");
}

#[tokio::test]
async fn request_bodies_stream_to_the_replica() {
    let origin = FakeNext::start(|o| {
        o.route("/echo", Route::echo());
    })
    .await;
    let gw = gateway_for(&origin).await;
    let payload: Bytes = (0..1_000_000u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    let got = Client::default()
        .send(
            "POST",
            &gw.url("/echo"),
            &[("content-type", "application/octet-stream")],
            payload.clone(),
        )
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, payload);
}

#[tokio::test]
async fn websocket_echo_through_the_tunnel() {
    let origin = FakeNext::start(|o| {
        o.route("/ws", Route::upgrade_echo());
    })
    .await;
    let gw = gateway_for(&origin).await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "second message"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("echo in time")
            .expect("a frame")
            .expect("ok frame");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
    assert_eq!(gw.state.metrics.tunnels.get(), 1);
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("over h2"));
    })
    .await;
    let gw = gateway_for(&origin).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<Bytes>>();
    let resp = client
        .get(gw.url("/p").parse().expect("uri"))
        .await
        .expect("h2c response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "over h2");
    // The replica got HTTP/1.1 with a Host header derived from :authority.
    let seen = origin.last("/p").expect("seen");
    assert_eq!(seen.headers["host"], gw.addr.to_string().as_str());
}
