//! The HTTP/1.1 hit lane (`server::lane`): L1 hits answered from the socket, every other
//! exchange lent to hyper on the same keep-alive connection, and answers byte-for-byte those
//! of the driver. Raw sockets, so what is on the wire is what is asserted.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use isrgate::cache::key::{CacheKey, Variant};
use isrgate::cache::keys::lock_key;
use isrgate::cache::sealed::Held;

use crate::eventually;
use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Gateway, bus_live, config, settled};

const ISR: &str = "s-maxage=60, stale-while-revalidate=300";

/// One response as read off the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    /// Header lines in order, names as sent.
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Wire {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }

    /// Every header but the ones that differ per response, sorted.
    fn stable_headers(&self) -> Vec<(String, String)> {
        let mut h: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| !["date", "x-request-id", "age"].contains(&n.as_str()))
            .cloned()
            .collect();
        h.sort();
        h
    }
}

/// A client connection that reads responses one at a time (Content-Length or chunked).
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(gw: &Gateway) -> Conn {
        let s = TcpStream::connect(gw.addr).await.expect("connect");
        Conn { s, buf: Vec::new() }
    }

    async fn send(&mut self, raw: &str) {
        self.s.write_all(raw.as_bytes()).await.expect("write");
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut chunk))
            .await
            .expect("read timed out")
            .expect("read");
        assert!(n > 0, "connection closed mid-response: {:?}", self.buf);
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next response; `head_only` for the answer to a HEAD.
    async fn response(&mut self, head_only: bool) -> Wire {
        let (len, status, headers) = loop {
            let mut lines = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut lines);
            if let httparse::Status::Complete(len) = r.parse(&self.buf).expect("valid response") {
                let headers = r
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_owned(), value)
                    })
                    .collect::<Vec<_>>();
                break (len, r.code.expect("status"), headers);
            }
            self.fill().await;
        };
        self.buf.drain(..len);
        let mut wire = Wire {
            status,
            headers,
            body: Bytes::new(),
        };
        if head_only || status == 304 {
            return wire;
        }
        if wire.header("transfer-encoding") == "chunked" {
            wire.body = self.chunked().await;
        } else {
            let n: usize = wire.header("content-length").parse().unwrap_or(0);
            while self.buf.len() < n {
                self.fill().await;
            }
            wire.body = Bytes::from(self.buf.drain(..n).collect::<Vec<_>>());
        }
        wire
    }

    async fn chunked(&mut self) -> Bytes {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await;
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.trim(), 16).expect("chunk size");
            while self.buf.len() < line_end + 2 + size + 2 {
                self.fill().await;
            }
            body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
            self.buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return Bytes::from(body);
            }
        }
    }

    /// Whether the server closed the connection (within 30 s).
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: site.test\r\n{extra}\r\n")
}

async fn origin() -> FakeNext {
    FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("<p>page</p>").header("cache-control", ISR),
        );
        o.route("/api", Route::echo().header("cache-control", "no-store"));
    })
    .await
}

#[tokio::test]
async fn hits_misses_and_request_bodies_share_one_keep_alive_connection() {
    let origin = origin().await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let mut c = Conn::open(&gw).await;

    c.send(&get("/p", "")).await;
    let miss = c.response(false).await;
    assert_eq!((miss.status, miss.header("x-cache")), (200, "MISS"));
    c.send(&get("/p", "")).await;
    let hit = c.response(false).await;
    assert_eq!(
        (hit.header("x-cache"), &hit.body[..]),
        ("HIT", &b"<p>page</p>"[..])
    );
    assert_eq!(hit.header("cache-status"), "isrgate; hit");
    assert_eq!(hit.header("content-length"), "11");

    // A request with a body, lent to hyper and the driver, on the same connection.
    c.send("POST /api HTTP/1.1\r\nHost: site.test\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    let echoed = c.response(false).await;
    assert_eq!((echoed.status, &echoed.body[..]), (200, &b"hello"[..]));
    assert_eq!(echoed.header("x-cache"), "BYPASS");

    // Two requests in one write (pipelined): answered in order.
    c.send(&format!("{}{}", get("/p", ""), get("/nothing", "")))
        .await;
    let first = c.response(false).await;
    let second = c.response(false).await;
    assert_eq!(first.header("x-cache"), "HIT");
    assert_eq!(second.status, 404);

    // HEAD from the lane: the GET entry's head, no body, then the connection goes on.
    c.send("HEAD /p HTTP/1.1\r\nHost: site.test\r\n\r\n").await;
    let head = c.response(true).await;
    assert_eq!((head.status, head.header("content-length")), (200, "11"));
    c.send(&get("/p", "")).await;
    assert_eq!(c.response(false).await.body, "<p>page</p>");

    let ids: std::collections::HashSet<_> = [&miss, &hit, &echoed, &first, &second, &head]
        .iter()
        .map(|w| w.header("x-request-id").to_owned())
        .collect();
    assert_eq!(ids.len(), 6, "one request id each: {ids:?}");
    assert_eq!((origin.count("/p"), origin.count("/api")), (1, 1));
    // The four hits on /p were the lane's (the L1), the rest went through the driver.
    assert_eq!(gw.state.metrics.cache_l1_hits.get(), 4);
    assert_eq!(gw.state.metrics.requests.get(), 7);
}

/// Two gateways on one Redis, the same cache settings (`cache`), one with the lane and one
/// without: every hit must be the same response, but for `Date`, `Age` and `x-request-id`.
async fn lane_hits_equal_driver_hits(cache: &str) {
    let r = RedisProcess::start();
    let origin = FakeNext::start(|o| {
        // Over `cache::sealed::MIN_BYTES`: the lane sends the identity body by file.
        let html: String = (0..1500).map(|i| format!("<li>item {i}</li>")).collect();
        o.route(
            "/p",
            Route::html(&html)
                .header("cache-control", ISR)
                .header("vary", "RSC, Next-Router-State-Tree")
                .header("x-nextjs-cache", "HIT")
                .header("x-powered-by", "Next.js")
                .header("link", "</_next/static/a.css>; rel=preload; as=\"style\"")
                .header("etag", "\"abc\""),
        );
        o.route(
            "/r",
            Route::html("0:[\"$\",\"div\",null,{}]")
                .content_type("text/x-component")
                .header("cache-control", ISR)
                .header("vary", "RSC, Next-Router-State-Tree, Next-Router-Prefetch"),
        );
    })
    .await;
    let settings = format!("[redis]\nurl = \"{}\"\n[cache]\n{cache}\n", r.url());
    let lane = Gateway::start(config(&[origin.url()], "", &settings)).await;
    let driver = Gateway::start(config(&[origin.url()], "hit_lane = false", &settings)).await;
    eventually!(10, bus_live(&lane) && bus_live(&driver), "buses subscribed");
    let (mut a, mut b) = (Conn::open(&lane).await, Conn::open(&driver).await);
    // Rendered once through the lane gateway, then a hit on both.
    for path in ["/p", "/r?_rsc=1"] {
        let rsc = if path.starts_with("/r") {
            "RSC: 1\r\n"
        } else {
            ""
        };
        a.send(&get(path, rsc)).await;
        assert_eq!(a.response(false).await.header("x-cache"), "MISS");
        eventually!(
            10,
            {
                b.send(&get(path, rsc)).await;
                b.response(false).await.header("x-cache") == "HIT"
            },
            "{path} stored in Redis"
        );
    }
    let hits = lane.state.metrics.cache_hits.get();
    for (request, head_only) in [
        (get("/p", ""), false),
        (get("/p", "Accept-Encoding: gzip, deflate, br\r\n"), false),
        (
            "HEAD /p HTTP/1.1\r\nHost: site.test\r\n\r\n".to_owned(),
            true,
        ),
        (
            get(
                "/r?_rsc=2",
                "RSC: 1\r\nNext-Router-State-Tree: %5B%22%22%5D\r\n",
            ),
            false,
        ),
    ] {
        a.send(&request).await;
        b.send(&request).await;
        let (ours, theirs) = (a.response(head_only).await, b.response(head_only).await);
        assert_eq!(
            (ours.status, ours.header("x-cache")),
            (200, "HIT"),
            "{request}"
        );
        assert_eq!(ours.status, theirs.status, "{request}");
        assert_eq!(ours.stable_headers(), theirs.stable_headers(), "{request}");
        assert_eq!(ours.body, theirs.body, "{request}");
        for per_response in ["date", "x-request-id", "age"] {
            assert!(!ours.header(per_response).is_empty(), "{per_response}");
        }
    }
    assert_eq!(
        origin.count("/p") + origin.count("/r"),
        2,
        "one render each"
    );
    assert_eq!(lane.state.metrics.cache_hits.get(), hits + 4);
    if cfg!(target_os = "linux") {
        assert_eq!(
            lane.state.metrics.cache_sendfile_hits.get(),
            1,
            "identity /p"
        );
    }

    // A conditional request is the driver's (a 304), through the lane gateway too.
    a.send(&get("/p", "")).await;
    let etag = a.response(false).await.header("etag").to_owned();
    a.send(&get("/p", &format!("If-None-Match: {etag}\r\n")))
        .await;
    let revalidated = a.response(false).await;
    assert_eq!(
        (revalidated.status, revalidated.header("x-cache")),
        (304, "HIT")
    );
}

#[tokio::test]
async fn a_lane_hit_from_the_l1_is_the_answer_the_driver_gives() {
    lane_hits_equal_driver_hits("").await;
}

#[tokio::test]
async fn a_lane_hit_from_redis_in_strict_mode_is_the_answer_the_driver_gives() {
    lane_hits_equal_driver_hits("l1_max_bytes = 0").await;
}

/// Strict mode reads Redis on every request: through the lane, a request the lane lends reads
/// it no more often than without the lane (the driver uses the lane's lookup).
#[tokio::test]
async fn a_lent_request_reads_the_store_once() {
    let mut reads = Vec::new();
    for listen in ["", "hit_lane = false"] {
        let r = RedisProcess::start();
        let origin = origin().await;
        let settings = format!(
            "[redis]\nurl = \"{}\"\n[cache]\nl1_max_bytes = 0\n",
            r.url()
        );
        let gw = Gateway::start(config(&[origin.url()], listen, &settings)).await;
        eventually!(10, bus_live(&gw), "bus subscribed");
        let mut c = Conn::open(&gw).await;
        c.send(&get("/p", "")).await;
        let etag = c.response(false).await.header("etag").to_owned();
        eventually!(
            10,
            {
                c.send(&get("/p", "")).await;
                c.response(false).await.header("x-cache") == "HIT"
            },
            "stored"
        );
        // The fill is over (its write landed and its lock is gone): nothing rewrites the
        // entry behind the requests counted below.
        let hex = CacheKey::new("default", "site.test", "/p", None, &Variant::Html).hex();
        eventually!(
            10,
            r.cli(&["EXISTS", &lock_key(&hex)]).trim() == "0",
            "fill lock released"
        );
        r.cli(&["CONFIG", "RESETSTAT"]);
        for request in [
            get("/p", ""),
            get("/p", &format!("If-None-Match: {etag}\r\n")),
            get("/nothing", ""),
            get("/p", "Accept-Encoding: gzip\r\n"),
        ] {
            c.send(&request).await;
            c.response(false).await;
        }
        // Entry reads: `HGET m` (metadata first, strict mode) and `HMGET m b`.
        reads.push((r.calls("hget"), r.calls("hmget")));
    }
    assert_eq!(
        reads[0], reads[1],
        "store reads (HGET, HMGET) with the lane, without it"
    );
    assert!(
        reads[0].0 >= 4,
        "strict mode reads every request: {reads:?}"
    );
}

#[tokio::test]
async fn what_the_lane_does_not_frame_goes_to_hyper_for_the_rest_of_the_connection() {
    let origin = origin().await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let mut c = Conn::open(&gw).await;
    c.send(&get("/p", "")).await;
    assert_eq!(c.response(false).await.header("x-cache"), "MISS");
    c.send(
        "POST /api HTTP/1.1\r\nHost: site.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await;
    let echoed = c.response(false).await;
    assert_eq!((echoed.status, &echoed.body[..]), (200, &b"abcde"[..]));
    // hyper serves the connection from here on: still a hit, now the driver's.
    let l1_hits = gw.state.metrics.cache_l1_hits.get();
    c.send(&get("/p", "")).await;
    let hit = c.response(false).await;
    assert_eq!(
        (hit.header("x-cache"), &hit.body[..]),
        ("HIT", &b"<p>page</p>"[..])
    );
    assert_eq!(gw.state.metrics.cache_l1_hits.get(), l1_hits + 1);

    // Bytes that are not HTTP get hyper's 400, and the connection closes.
    let mut bad = Conn::open(&gw).await;
    bad.send("GET / HTTP/1.1\r\nHost site.test\r\n\r\n").await;
    assert_eq!(bad.response(false).await.status, 400);
    assert!(bad.closed().await);

    // `Connection: close` is honoured: the answer, then the end of the connection.
    let mut closing = Conn::open(&gw).await;
    closing.send(&get("/p", "Connection: close\r\n")).await;
    let last = closing.response(false).await;
    assert_eq!(
        (last.header("x-cache"), last.header("connection")),
        ("HIT", "close")
    );
    assert!(closing.closed().await);
}

/// An origin with a cacheable `/p` and a `/slow` held at the returned gate, and a gateway.
async fn slow_origin_and_gateway() -> (Gate, FakeNext, Gateway) {
    let gate = Gate::new();
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("<p>page</p>").header("cache-control", ISR),
        );
        o.route("/slow", Route::html("slow").gated(&gate));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    (gate, origin, gw)
}

/// Waits (at most 30 s) for a gateway's drain to end.
async fn drained(stopped: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(30), stopped)
        .await
        .expect("drained in time")
        .expect("server task");
}

#[tokio::test]
async fn draining_closes_idle_lane_connections_and_finishes_lent_exchanges() {
    let (gate, origin, mut gw) = slow_origin_and_gateway().await;
    let mut idle = Conn::open(&gw).await;
    idle.send(&get("/p", "")).await;
    idle.response(false).await;
    idle.send(&get("/p", "")).await;
    assert_eq!(idle.response(false).await.header("x-cache"), "HIT");
    let mut busy = Conn::open(&gw).await;
    busy.send(&get("/slow", "")).await;
    eventually!(10, origin.count("/slow") == 1, "slow request at the origin");

    let stopped = gw.shutdown();
    assert!(idle.closed().await, "an idle connection is closed at once");
    gate.open();
    let last = busy.response(false).await;
    assert_eq!((last.status, &last.body[..]), (200, &b"slow"[..]));
    assert_eq!(
        last.header("connection"),
        "close",
        "the lent answer says it is the last"
    );
    assert!(busy.closed().await);
    drained(stopped).await;
}

/// A `Content-Length` so large that head + body would wrap a `u64` is hyper's to refuse: the
/// lane must neither loop on it (the worker would never yield again) nor read it as 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_that_wraps_is_refused_and_the_worker_goes_on() {
    let origin = origin().await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let template =
        "POST /api HTTP/1.1\r\nHost: site.test\r\nContent-Length: 00000000000000000000\r\n\r\n";
    // head length + Content-Length == 2^64: the sum wraps to exactly 0.
    let wraps = u64::MAX - template.len() as u64 + 1;
    let raw = template.replace("00000000000000000000", &format!("{wraps:020}"));
    assert_eq!(raw.len(), template.len());
    let mut c = Conn::open(&gw).await;
    c.send(&raw).await;
    let refused = c.response(true).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    assert!(c.closed().await);
    let mut next = Conn::open(&gw).await;
    next.send(&get("/p", "")).await;
    assert_eq!(next.response(false).await.status, 200);
    assert_eq!(origin.count("/api"), 0);
}

/// Draining with a second request pipelined behind a lent one: the lent answer says
/// `Connection: close` and is the last; the second is left for the client to send again.
#[tokio::test]
async fn draining_ends_a_connection_after_its_answer_in_progress() {
    let (gate, origin, mut gw) = slow_origin_and_gateway().await;
    let mut c = Conn::open(&gw).await;
    c.send(&get("/p", "")).await;
    c.response(false).await;
    c.send(&format!("{}{}", get("/slow", ""), get("/p", "")))
        .await;
    eventually!(10, origin.count("/slow") == 1, "slow request at the origin");
    let stopped = gw.shutdown();
    gate.open();
    let last = c.response(false).await;
    assert_eq!((last.status, &last.body[..]), (200, &b"slow"[..]));
    assert_eq!(last.header("connection"), "close");
    assert!(c.closed().await, "the pipelined request is not answered");
    drained(stopped).await;
}

/// A page of `n` bytes where every position is told apart (an offset slip shows).
fn large_page(n: usize) -> String {
    let mut s = String::with_capacity(n + 32);
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!("<i>{i:08}</i>"));
        i += 1;
    }
    s.truncate(n);
    s
}

/// The L1's copy of the HTML entry for `path` on `site.test`.
fn l1_entry(gw: &Gateway, path: &str) -> std::sync::Arc<isrgate::cache::entry::Entry> {
    let cache = gw.state.cache.as_ref().expect("cache on");
    let key = CacheKey::new("default", "site.test", path, None, &Variant::Html);
    cache
        .l1
        .get(key.hash, cache.clock.now_ms())
        .expect("in the L1")
}

/// Large identity bodies go out of sealed memory files by `sendfile` (`cache::sealed`): the
/// miss reads its body back from the file, hits are byte-for-byte the page whether the client
/// reads at once, pipelines, reads slowly (the socket fills and the send resumes) or leaves in
/// the middle of one; and none of that changes the entry.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn large_identity_bodies_are_sent_from_sealed_files_byte_for_byte() {
    let page = large_page(1 << 20);
    let origin = FakeNext::start(|o| {
        o.route("/big", Route::html(&page).header("cache-control", ISR));
        o.route(
            "/p",
            Route::html("<p>page</p>").header("cache-control", ISR),
        );
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let mut c = Conn::open(&gw).await;
    c.send(&get("/big", "")).await;
    let miss = c.response(false).await;
    assert_eq!(miss.header("x-cache"), "MISS");
    assert!(miss.body == page.as_bytes(), "the miss's body");

    assert!(
        matches!(l1_entry(&gw, "/big").identity(false), Ok(Held::Sealed(_))),
        "the fill sealed the identity body"
    );

    c.send(&get("/big", "")).await;
    let hit = c.response(false).await;
    assert_eq!(hit.header("x-cache"), "HIT");
    assert_eq!(hit.header("content-length"), (1 << 20).to_string());
    assert!(hit.body == page.as_bytes(), "the hit's body");
    assert_eq!(
        gw.state.metrics.cache_sendfile_hits.get(),
        1,
        "sent by file"
    );

    // Pipelined: two sealed bodies and a small one, in order, nothing between them.
    c.send(&get("/p", "")).await;
    assert_eq!(c.response(false).await.header("x-cache"), "MISS");
    c.send(&format!(
        "{}{}{}",
        get("/big", ""),
        get("/p", ""),
        get("/big", "")
    ))
    .await;
    for expected in [page.as_bytes(), b"<p>page</p>", page.as_bytes()] {
        let r = c.response(false).await;
        assert_eq!(r.header("x-cache"), "HIT");
        assert!(r.body == expected, "a pipelined body");
    }
    c.send("HEAD /big HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await;
    let head = c.response(true).await;
    assert_eq!(head.header("content-length"), (1 << 20).to_string());
    c.send(&get("/p", "")).await;
    assert_eq!(
        c.response(false).await.body,
        "<p>page</p>",
        "no stray body bytes"
    );

    // A slow reader with a small receive buffer: the socket fills, `sendfile` stops part way
    // and goes on when it drains.
    let slow = tokio::net::TcpSocket::new_v4().expect("socket");
    slow.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut slow = Conn {
        s: slow.connect(gw.addr).await.expect("connect"),
        buf: Vec::new(),
    };
    slow.send(&get("/big", "")).await;
    // Nothing is read until the body has begun to arrive: a 4 KB buffer holds little of it.
    slow.s.readable().await.expect("readable");
    assert!(
        slow.response(false).await.body == page.as_bytes(),
        "the slow reader's body"
    );

    // A client gone in the middle of a body: the next one still gets all of it.
    let mut gone = Conn::open(&gw).await;
    gone.send(&get("/big", "")).await;
    gone.fill().await;
    drop(gone);
    let mut after = Conn::open(&gw).await;
    after.send(&get("/big", "")).await;
    assert!(
        after.response(false).await.body == page.as_bytes(),
        "after a client left"
    );

    // gzip clients get the stored gzip bytes (from the heap), which inflate to the page.
    after.send(&get("/big", "Accept-Encoding: gzip\r\n")).await;
    let gz = after.response(false).await;
    assert_eq!(gz.header("content-encoding"), "gzip");
    let mut inflated = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&gz.body[..]),
        &mut inflated,
    )
    .expect("gzip");
    assert!(
        inflated == page.as_bytes(),
        "the gzip body inflates to the page"
    );
    assert_eq!(origin.count("/big"), 1, "one render");
    // Every identity GET of /big after the miss went by file; HEAD and gzip did not.
    assert_eq!(gw.state.metrics.cache_sendfile_hits.get(), 6);
}

/// A gateway without the lane keeps identity bodies on the heap: nothing sends them by file.
#[tokio::test]
async fn without_the_lane_identity_bodies_stay_on_the_heap() {
    let page = large_page(64 * 1024);
    let origin = FakeNext::start(|o| {
        o.route("/big", Route::html(&page).header("cache-control", ISR));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "hit_lane = false", "")).await;
    let mut c = Conn::open(&gw).await;
    for expected in ["MISS", "HIT"] {
        c.send(&get("/big", "")).await;
        let r = c.response(false).await;
        assert_eq!(r.header("x-cache"), expected);
        assert!(r.body == page.as_bytes());
    }
    assert!(matches!(
        l1_entry(&gw, "/big").identity(false),
        Ok(Held::Heap(_))
    ));
    assert_eq!(gw.state.metrics.cache_sendfile_hits.get(), 0);
}

/// A stale hit within stale-while-revalidate is answered in the lane too, byte for byte as the
/// driver answers it, and starts the one refresh of the key (the fleet's, through its lock).
#[tokio::test]
async fn a_stale_hit_is_answered_in_the_lane_as_the_driver_answers_it_and_starts_one_refresh() {
    let r = RedisProcess::start();
    let html: String = (0..1500).map(|i| format!("<li>item {i}</li>")).collect();
    let page = Route::html(&html)
        .header("cache-control", ISR)
        .header("vary", "Accept")
        .header("x-nextjs-cache", "MISS");
    let first = page.clone();
    let origin = FakeNext::start(move |o| {
        o.route("/p", first);
    })
    .await;
    let settings = format!("[redis]\nurl = \"{}\"\n", r.url());
    let lane = Gateway::start(config(&[origin.url()], "", &settings)).await;
    let driver = Gateway::start(config(&[origin.url()], "hit_lane = false", &settings)).await;
    eventually!(10, bus_live(&lane) && bus_live(&driver), "buses subscribed");
    let (mut a, mut b) = (Conn::open(&lane).await, Conn::open(&driver).await);
    a.send(&get("/p", "")).await;
    assert_eq!(a.response(false).await.header("x-cache"), "MISS");
    eventually!(
        10,
        {
            b.send(&get("/p", "")).await;
            b.response(false).await.header("x-cache") == "HIT"
        },
        "/p stored in Redis"
    );
    settled(&lane).await;

    // Past s-maxage; the refresh is held at the origin until the comparisons are done.
    let gate = Gate::new();
    origin.route("/p", page.gated(&gate));
    for gw in [&lane, &driver] {
        let c = gw.state.cache.as_ref().expect("cache");
        c.clock.advance(Duration::from_secs(61));
    }
    let stale_before = lane.state.metrics.cache_stale.get();
    let sendfile_before = lane.state.metrics.cache_sendfile_hits.get();
    for (request, head_only) in [
        (get("/p", ""), false),
        (get("/p", "Accept-Encoding: gzip\r\n"), false),
        (
            "HEAD /p HTTP/1.1\r\nHost: site.test\r\n\r\n".to_owned(),
            true,
        ),
    ] {
        a.send(&request).await;
        b.send(&request).await;
        let (ours, theirs) = (a.response(head_only).await, b.response(head_only).await);
        assert_eq!(
            (ours.status, ours.header("x-cache")),
            (200, "STALE"),
            "{request}"
        );
        assert_eq!(ours.stable_headers(), theirs.stable_headers(), "{request}");
        assert_eq!(ours.body, theirs.body, "{request}");
        assert_eq!(ours.header("age"), "61");
    }
    assert_eq!(lane.state.metrics.cache_stale.get(), stale_before + 3);
    if cfg!(target_os = "linux") {
        assert_eq!(
            lane.state.metrics.cache_sendfile_hits.get(),
            sendfile_before + 1,
            "the lane wrote the stale identity body itself"
        );
    }
    eventually!(
        10,
        origin.count("/p") == 2,
        "one refresh reached the origin"
    );
    gate.open();
    eventually!(
        10,
        {
            a.send(&get("/p", "")).await;
            a.response(false).await.header("x-cache") == "HIT"
        },
        "the refreshed page is a fresh hit"
    );
    assert_eq!(origin.count("/p"), 2, "one refresh for both gateways");
}
