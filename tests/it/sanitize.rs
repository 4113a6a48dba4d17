//! Nothing a client sends reaches Next.js internals: every stripped header and query key is
//! checked at the origin, forwarded headers cannot be spoofed, redirects never point at a
//! replica.

use crate::support::origin::{FakeNext, Route};
use crate::support::{Client, Gateway, config};

/// Every header NEXTJS.md §9 rules 6-7 names, plus samples of the prefixed families.
const STRIPPED: &[(&str, &str)] = &[
    (
        "x-middleware-subrequest",
        "middleware:middleware:middleware:middleware:middleware",
    ),
    ("x-middleware-subrequest-id", "1"),
    ("x-middleware-invoke", "1"),
    ("x-middleware-rewrite", "/admin"),
    ("x-middleware-redirect", "/x"),
    ("x-middleware-set-cookie", "a=b"),
    ("x-middleware-skip", "1"),
    ("x-middleware-next", "1"),
    ("x-middleware-override-headers", "x"),
    ("x-middleware-request-authorization", "x"),
    ("x-invoke-status", "500"),
    ("x-invoke-path", "/admin"),
    ("x-invoke-query", "{}"),
    ("x-invoke-error", "x"),
    ("x-invoke-output", "x"),
    ("x-now-route-matches", "1"),
    ("x-matched-path", "/admin"),
    ("x-invocation-id", "1"),
    ("next-resume", "1"),
    ("x-next-resume-state-length", "1"),
    ("x-prerender-revalidate", "secret"),
    ("x-prerender-revalidate-if-generated", "1"),
    ("x-next-revalidated-tags", "t"),
    ("x-next-revalidate-tag-token", "t"),
    ("x-next-cache-tags", "t"),
    ("x-vercel-id", "x"),
    ("x-vercel-sc-headers", "x"),
    ("next-hmr-refresh", "1"),
    ("x-isrgate-tags", "t"),
    ("x-isrgate-refresh", "1"),
    ("x-isrgate-debug", "1"),
    ("x-isrgate-debug-token", "t"),
    ("x-nextjs-data", "1"),
    ("rsc", "0"),
    ("next-router-prefetch", "x"),
];

#[tokio::test]
async fn each_internal_header_is_stripped_before_the_origin() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    for (name, value) in STRIPPED {
        let got = c
            .get(&gw.url("/p"), &[(name, value), ("x-control", "kept")])
            .await;
        assert_eq!(got.status, 200, "{name}");
        let seen = origin.last("/p").expect("seen");
        assert!(
            !seen.headers.contains_key(*name),
            "{name} reached the origin"
        );
        assert_eq!(
            seen.headers["x-control"], "kept",
            "{name}: other headers must pass"
        );
    }
}

#[tokio::test]
async fn allowed_values_of_conditional_headers_pass() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
        o.route("/_next/data/build/p.json", Route::html("{}"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    c.get(
        &gw.url("/p"),
        &[("rsc", "1"), ("next-router-prefetch", "1")],
    )
    .await;
    let seen = origin.last("/p").expect("seen");
    assert_eq!(seen.headers["rsc"], "1");
    assert_eq!(seen.headers["next-router-prefetch"], "1");
    c.get(
        &gw.url("/_next/data/build/p.json"),
        &[("x-nextjs-data", "1")],
    )
    .await;
    let seen = origin.last("/_next/data/build/p.json").expect("seen");
    assert_eq!(seen.headers["x-nextjs-data"], "1");
}

#[tokio::test]
async fn each_internal_query_key_is_stripped_others_kept_verbatim() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    for key in [
        "__nextDataReq=1",
        "nxtPslug=admin",
        "nxtIslug=x",
        "%6ExtPslug=admin",
        "%5F%5FnextDataReq=1",
    ] {
        c.get(&gw.url(&format!("/p?a=1&{key}&b=%20x&_rsc=abc")), &[])
            .await;
        let seen = origin.last("/p").expect("seen");
        assert_eq!(seen.target, "/p?a=1&b=%20x&_rsc=abc", "{key}");
    }
}

#[tokio::test]
async fn internal_path_suffixes_are_refused_before_the_origin() {
    let origin = FakeNext::start(|o| {
        o.route("/p.rsc", Route::html("flight"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    for path in [
        "/p.rsc",
        "/p.prefetch.rsc",
        "/p.segments/x.segment.rsc",
        "/x.action",
        "/p%2Ersc",
    ] {
        let got = c.get(&gw.url(path), &[]).await;
        assert_eq!(got.status, 404, "{path}");
        assert_eq!(got.body, "Not Found\n", "{path}: our 404, not the origin's");
    }
    assert_eq!(origin.count("/p.rsc"), 0);
    assert_eq!(gw.state.metrics.rejected.get(), 5);
}

#[tokio::test]
async fn forwarded_headers_cannot_be_spoofed() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    Client::default()
        .get(
            &gw.url("/p"),
            &[
                ("host", "shop.example"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "https"),
                ("x-real-ip", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6;host=evil.example"),
                ("x-request-id", "spoofed"),
            ],
        )
        .await;
    let h = origin.last("/p").expect("seen").headers;
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "shop.example");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(!h.contains_key("forwarded"));
    assert_eq!(
        h["host"], "shop.example",
        "Host goes through as the client sent it"
    );
    let ours = h["x-request-id"].to_str().expect("id");
    assert_ne!(ours, "spoofed");
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_are_extended() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(
        &[origin.url()],
        "trusted_proxies = [\"127.0.0.0/8\"]",
        "",
    ))
    .await;
    let c = Client::default();
    let sent = [
        ("host", "shop.example"),
        ("x-forwarded-for", "6.6.6.6, 203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "www.example"),
        ("x-request-id", "lb-123"),
    ];
    let got = c.get(&gw.url("/p"), &sent).await;
    assert_eq!(
        got.header("x-request-id"),
        "lb-123",
        "a trusted proxy's request id is kept"
    );
    let h = origin.last("/p").expect("seen").headers;
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 203.0.113.7, 127.0.0.1");
    assert_eq!(
        h["x-real-ip"], "203.0.113.7",
        "right-most untrusted hop is the client"
    );
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["x-forwarded-host"], "shop.example",
        "X-Forwarded-Host is opt-in"
    );

    let gw = Gateway::start(config(
        &[origin.url()],
        "trusted_proxies = [\"127.0.0.0/8\"]\ntrust_forwarded_host = true",
        "",
    ))
    .await;
    c.get(&gw.url("/p"), &sent).await;
    assert_eq!(
        origin.last("/p").expect("seen").headers["x-forwarded-host"],
        "www.example"
    );
}

#[tokio::test]
async fn repeated_rsc_headers_are_dropped() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    Client::default()
        .get(&gw.url("/p"), &[("rsc", "1"), ("rsc", "0")])
        .await;
    assert!(!origin.last("/p").expect("seen").headers.contains_key("rsc"));
}

#[tokio::test]
async fn ambiguous_paths_and_connect_are_refused() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    for path in [
        "/p.rsc/.",
        "/x/../p",
        "/x/%2e%2e/p",
        "/_next/data/%2E%2E/p",
        "/a%5Cb",
    ] {
        let got = c.get(&gw.url(path), &[]).await;
        assert_eq!(got.status, 400, "{path}");
    }
    let got = c
        .send(
            "CONNECT",
            &format!("http://{}", gw.addr),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(got.status, 405);
    assert_eq!(origin.count("/p"), 0);
}

#[tokio::test]
async fn connection_tokens_cannot_strip_what_we_set() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("ok"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    Client::default()
        .get(
            &gw.url("/p"),
            &[
                ("host", "shop.example"),
                ("connection", "host, x-forwarded-for, x-forwarded-host"),
            ],
        )
        .await;
    let h = origin.last("/p").expect("seen").headers;
    assert_eq!(h["host"], "shop.example");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], "shop.example");
}

#[tokio::test]
async fn location_pointing_at_a_replica_is_rewritten_to_the_public_host() {
    let mut origin = FakeNext::start(|_| {}).await;
    let internal = format!("http://{}/login?next=%2Fa", origin.addr);
    let loopback = format!("http://localhost:{}/b", origin.addr.port());
    origin.route("/r1", Route::status(307).header("location", &internal));
    origin.route("/r2", Route::status(308).header("location", &loopback));
    origin.route(
        "/r3",
        Route::status(302).header("location", "https://auth.example/x"),
    );
    origin.route("/r4", Route::status(302).header("location", "/relative"));
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    let host = [("host", "shop.example")];
    assert_eq!(
        c.get(&gw.url("/r1"), &host).await.header("location"),
        "http://shop.example/login?next=%2Fa"
    );
    assert_eq!(
        c.get(&gw.url("/r2"), &host).await.header("location"),
        "http://shop.example/b"
    );
    assert_eq!(
        c.get(&gw.url("/r3"), &host).await.header("location"),
        "https://auth.example/x"
    );
    assert_eq!(
        c.get(&gw.url("/r4"), &host).await.header("location"),
        "/relative"
    );
    origin.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_do_not_cross() {
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("ok")
                .header("keep-alive", "timeout=99")
                .header("x-out", "1"),
        );
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let got = Client::default()
        .get(
            &gw.url("/p"),
            &[
                ("connection", "x-hop"),
                ("x-hop", "1"),
                ("proxy-authorization", "Basic x"),
            ],
        )
        .await;
    let h = origin.last("/p").expect("seen").headers;
    assert!(!h.contains_key("x-hop"));
    assert!(!h.contains_key("proxy-authorization"));
    assert!(got.headers.get("keep-alive").is_none());
    assert_eq!(got.header("x-out"), "1");
}

/// One raw HTTP/1.1 exchange on a new connection (`Connection: close` is added).
async fn raw(addr: std::net::SocketAddr, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{head}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 9112 §3.2: a request with no Host (HTTP/1.1), two, or one that is not `host[:port]` is
/// a 400 that reaches no replica and caches nothing — so a second Host line can never make a
/// replica render a page that is then cached under an innocent host.
#[tokio::test]
async fn requests_without_exactly_one_valid_host_are_refused() {
    let origin = FakeNext::start(|o| {
        o.route(
            "/p",
            Route::html("p").header("cache-control", "s-maxage=600"),
        );
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    for head in [
        "GET /p HTTP/1.1\r\n",
        "GET /p HTTP/1.1\r\nHost: site.test\r\nHost: evil.test\r\n",
        "GET /p HTTP/1.1\r\nHost: site.test evil\r\n",
        "GET /p HTTP/1.1\r\nHost: site.test/evil\r\n",
        "GET /p HTTP/1.1\r\nHost: site.test@evil.test\r\n",
        "GET /p HTTP/1.1\r\nHost: \r\n",
    ] {
        let answer = raw(gw.addr, head).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{head:?} → {answer}");
    }
    assert_eq!(
        origin.count("/p"),
        0,
        "no refused request reached the replica"
    );
    let innocent = raw(gw.addr, "GET /p HTTP/1.1\r\nHost: site.test\r\n").await;
    assert!(innocent.starts_with("HTTP/1.1 200"), "{innocent}");
    assert!(
        innocent.contains("x-cache: MISS"),
        "nothing was cached by the refused ones: {innocent}"
    );
    assert_eq!(origin.count("/p"), 1);
}

/// Methods no replica should be asked, the asterisk form, and a body declared larger than any
/// limit are answered by the gateway, never forwarded.
#[tokio::test]
async fn trace_unknown_methods_asterisk_and_huge_bodies_stop_at_the_gateway() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html("p"));
        o.route("*", Route::html("star"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    for (head, status) in [
        ("TRACE /p HTTP/1.1\r\nHost: site.test\r\n", "405"),
        ("TRACK /p HTTP/1.1\r\nHost: site.test\r\n", "405"),
        ("get /p HTTP/1.1\r\nHost: site.test\r\n", "501"),
        ("PROPFIND /p HTTP/1.1\r\nHost: site.test\r\n", "501"),
        ("OPTIONS * HTTP/1.1\r\nHost: site.test\r\n", "400"),
        (
            "POST /p HTTP/1.1\r\nHost: site.test\r\nContent-Length: 18446744073709551615\r\n",
            "413",
        ),
    ] {
        let answer = raw(gw.addr, head).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{head:?} → {answer}"
        );
    }
    assert_eq!(
        (origin.count("/p"), origin.count("*")),
        (0, 0),
        "nothing reached the replica"
    );
}

/// Next's cache headers and `@isrgate/next`'s tags and ages never reach a client, whichever path the
/// response takes: stored, passed (not storable) or bypassed (a POST here).
#[tokio::test]
async fn internal_response_headers_never_reach_clients() {
    let internal = [
        ("x-nextjs-cache", "HIT"),
        ("x-next-cache-tags", "_N_T_/p,secret-tag"),
        ("x-isrgate-tags", "_N_T_/p,secret-tag"),
        ("x-isrgate-age-ms", "1000"),
    ];
    let origin = FakeNext::start(|o| {
        let mut stored = Route::html("p").header("cache-control", "s-maxage=60");
        let mut passed = Route::html("q").header("cache-control", "private");
        for (n, v) in internal {
            stored = stored.header(n, v);
            passed = passed.header(n, v);
        }
        o.route("/p", stored);
        o.route("/q", passed);
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    let mut got = vec![
        c.get(&gw.url("/p"), &[]).await,
        c.get(&gw.url("/p"), &[]).await,
        c.get(&gw.url("/q"), &[]).await,
    ];
    got.push(
        c.send("POST", &gw.url("/p"), &[], bytes::Bytes::from_static(b"x"))
            .await,
    );
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.status, 200, "response {i}");
        for (n, _) in internal {
            assert!(r.headers.get(n).is_none(), "response {i} carries {n}");
        }
    }
    assert_eq!(got[1].header("x-cache"), "HIT");
    assert_eq!(got[3].header("x-cache"), "BYPASS");
}
