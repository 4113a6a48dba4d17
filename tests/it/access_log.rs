//! The access log (`logging::access`): one line per request whichever path answered it (the
//! hit lane, or hyper and the driver), as one flat JSON object with exact fields. Each gateway
//! writes its lines to a buffer of its own (`Options::access_log`), so no test depends on a
//! process-wide subscriber another test may have set.

use bytes::Bytes;
use isrgate::Options;
use isrgate::logging::{self, Buffer};
use serde_json::{Value, json};

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::{Client, Gateway, Got, config, free_port};

const ISR: &str = "s-maxage=60, stale-while-revalidate=300";
const PAGE: &str = "<p>hello, access log</p>";

/// A gateway and the lines it logged.
struct Logged {
    gw: Gateway,
    log: Buffer,
}

/// A gateway in front of `replica`, logging JSON to a buffer; `extra` is more TOML (with
/// section headers) for `support::config`.
async fn gateway(replica: &str, listen_extra: &str, extra: &str) -> Logged {
    let config = config(
        &[replica.to_owned()],
        listen_extra,
        &format!("[log]\nformat = \"json\"\n{extra}"),
    );
    let log = Buffer::default();
    let access_log = Some(logging::dispatch(&config.log, log.clone(), false));
    let options = Options {
        access_log,
        ..Options::default()
    };
    let gw = Gateway::start_with(config, options).await;
    Logged { gw, log }
}

impl Logged {
    fn lines(&self) -> Vec<Value> {
        self.log
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// The access line of `got` (found by its `x-request-id`), once written: a streamed body's
    /// line is written when the body ends, maybe just after the client read it.
    async fn line_of(&self, got: &Got) -> Value {
        let id = got.header("x-request-id");
        assert!(!id.is_empty(), "no x-request-id: {got:?}");
        let find = || self.lines().into_iter().find(|l| l["request_id"] == id);
        eventually!(
            10,
            find().is_some(),
            "no line for {id} in:\n{}",
            self.log.text()
        );
        find().expect("found")
    }

    /// [`Self::line_of`], with the fields that differ per run checked and removed: the
    /// timestamp, the elapsed time, and the client's port.
    async fn fixed_line_of(&self, got: &Got) -> Value {
        let mut line = self.line_of(got).await;
        let m = line.as_object_mut().expect("an object");
        let ts = m.remove("timestamp").expect("timestamp");
        assert!(ts.as_str().is_some_and(|t| t.ends_with('Z')), "{ts}");
        let elapsed = m.remove("elapsed_us").expect("elapsed_us");
        assert!(elapsed.is_u64(), "{elapsed}");
        let peer = m.remove("peer").expect("peer");
        assert!(
            peer.as_str().is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{peer}"
        );
        assert!(
            m.values().all(|v| !v.is_object() && !v.is_array()),
            "flat: {m:?}"
        );
        line
    }

    /// The line every request of this test has, with its own values.
    fn expected(
        &self,
        got: &Got,
        method: &str,
        path: &str,
        cache: [&str; 2],
        replica: &str,
    ) -> Value {
        json!({
            "level": "INFO",
            "target": "isrgate::access",
            "method": method,
            "path": path,
            "status": got.status.as_u16(),
            "cache": cache[0],
            "cache_status": cache[1],
            "replica": replica,
            "bytes": got.body.len(),
            "request_id": got.header("x-request-id"),
            "host": self.gw.addr.to_string(),
        })
    }
}

/// A miss, then hits until one is served, with its line; `lane`: the hit lane is on.
async fn miss_hit_bypass(lane: bool) {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html(PAGE).header("cache-control", ISR));
    })
    .await;
    let replica = origin.url().trim_start_matches("http://").to_owned();
    let logged = gateway(&origin.url(), &format!("hit_lane = {lane}"), "").await;
    let client = Client::default();
    let url = logged.gw.url("/p");

    let miss = client.get(&url, &[]).await;
    assert_eq!(miss.header("x-cache"), "MISS");
    assert_eq!(
        logged.fixed_line_of(&miss).await,
        logged.expected(
            &miss,
            "GET",
            "/p",
            ["MISS", "isrgate; fwd=miss; stored"],
            &replica
        )
    );

    // The fill is stored off the response path: ask until the cache answers.
    let mut hit = client.get(&url, &[]).await;
    eventually!(10, hit.header("x-cache") == "HIT", "never a hit: {hit:?}");
    while hit.header("x-cache") != "HIT" {
        hit = client.get(&url, &[]).await;
    }
    assert_eq!(hit.body, PAGE);
    assert_eq!(
        logged.fixed_line_of(&hit).await,
        logged.expected(&hit, "GET", "/p", ["HIT", "isrgate; hit"], "-"),
        "lane: {lane}"
    );

    let post = client
        .send(
            "POST",
            &url,
            &[("content-type", "text/plain")],
            Bytes::from_static(b"x"),
        )
        .await;
    assert_eq!(post.header("x-cache"), "BYPASS");
    assert_eq!(
        logged.fixed_line_of(&post).await,
        logged.expected(
            &post,
            "POST",
            "/p",
            ["BYPASS", "isrgate; fwd=bypass"],
            &replica
        )
    );
}

#[tokio::test]
async fn hits_in_the_lane_misses_and_bypasses_have_one_line_each() {
    miss_hit_bypass(true).await;
}

#[tokio::test]
async fn hits_through_hyper_have_the_same_line() {
    miss_hit_bypass(false).await;
}

#[tokio::test]
async fn an_upstream_failure_names_the_replica_that_failed() {
    let dead = format!("127.0.0.1:{}", free_port());
    let logged = gateway(&format!("http://{dead}"), "", "[health]\ninterval = \"0s\"").await;
    let got = Client::default().get(&logged.gw.url("/down"), &[]).await;
    assert_eq!(got.status, 502);
    assert_eq!(
        logged.fixed_line_of(&got).await,
        logged.expected(&got, "GET", "/down", ["-", "-"], &dead)
    );
}

#[tokio::test]
async fn secrets_in_queries_never_reach_the_log() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html(PAGE));
    })
    .await;
    let logged = gateway(&origin.url(), "", "").await;
    let client = Client::default();
    let page = client
        .get(&logged.gw.url("/p?token=hunter2&x=1"), &[])
        .await;
    let hook = client
        .send(
            "POST",
            &logged.gw.url("/_isrgate/revalidate?secret=hunter2&path=/p"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        logged.line_of(&page).await["path"],
        "/p?token=[redacted]&x=1"
    );
    assert_eq!(
        logged.line_of(&hook).await["path"],
        "/_isrgate/revalidate?secret=[redacted]&path=/p"
    );
    assert!(
        !logged.log.text().contains("hunter2"),
        "{}",
        logged.log.text()
    );
}

#[tokio::test]
async fn log_access_false_writes_no_line() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html(PAGE).header("cache-control", ISR));
    })
    .await;
    let logged = gateway(&origin.url(), "", "[log]\naccess = false").await;
    let client = Client::default();
    let url = logged.gw.url("/p");
    client.get(&url, &[]).await;
    let mut hit = client.get(&url, &[]).await;
    eventually!(10, hit.header("x-cache") == "HIT", "never a hit");
    while hit.header("x-cache") != "HIT" {
        hit = client.get(&url, &[]).await;
    }
    // A hit's line is written before its response is: none came.
    assert_eq!(logged.log.text(), "");
    // Switched on live (a reload), the next request has its line.
    logged.gw.state.access.set_enabled(true);
    let got = client.get(&url, &[]).await;
    assert_eq!(logged.line_of(&got).await["cache"], "HIT");
}

/// `log.format = "pretty"`: the same fields in the same order, logfmt values (quoted when
/// they hold a space).
#[tokio::test]
async fn text_lines_carry_the_same_fields() {
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html(PAGE));
    })
    .await;
    let config = config(&[origin.url()], "", "");
    let log = Buffer::default();
    let options = Options {
        access_log: Some(logging::dispatch(&config.log, log.clone(), false)),
        ..Options::default()
    };
    let gw = Gateway::start_with(config, options).await;
    let got = Client::default().get(&gw.url("/p?a=1"), &[]).await;
    let id = got.header("x-request-id").to_owned();
    eventually!(10, log.text().contains(&id), "no line: {}", log.text());
    let text = log.text();
    let line = text.lines().find(|l| l.contains(&id)).expect("the line");
    let expected = format!(
        " INFO isrgate::access: method=GET path=/p?a=1 status=200 cache=MISS cache_status=\"isrgate; fwd=miss\" replica={} bytes={} elapsed_us=",
        origin.url().trim_start_matches("http://"),
        PAGE.len(),
    );
    assert!(line.contains(&expected), "{line}\nwanted: {expected}");
    assert!(
        line.contains(&format!(
            " request_id={id} host={} peer=127.0.0.1:",
            gw.addr
        )),
        "{line}"
    );
}

/// A declared body over `listen.max_body_bytes` is refused by the lane before hyper sees it:
/// it has its line too (no request id: none was drawn for it).
#[tokio::test]
async fn a_body_the_lane_refuses_has_its_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = FakeNext::start(|o| {
        o.route("/p", Route::html(PAGE));
    })
    .await;
    let logged = gateway(&origin.url(), "max_body_bytes = 1000", "").await;
    let mut s = tokio::net::TcpStream::connect(logged.gw.addr)
        .await
        .expect("connect");
    s.write_all(b"PUT /upload?key=k HTTP/1.1\r\nHost: up.example\r\nContent-Length: 5000\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    let find = || logged.lines().into_iter().find(|l| l["status"] == 413);
    eventually!(10, find().is_some(), "no line: {}", logged.log.text());
    let mut line = find().expect("found");
    let m = line.as_object_mut().expect("object");
    for varies in ["timestamp", "elapsed_us", "peer"] {
        m.remove(varies).expect(varies);
    }
    assert_eq!(
        line,
        json!({
            "level": "INFO", "target": "isrgate::access", "method": "PUT",
            "path": "/upload?key=[redacted]", "status": 413, "cache": "-", "cache_status": "-",
            "replica": "-", "bytes": "Request body too large\n".len(), "request_id": "-",
            "host": "up.example",
        })
    );
}
