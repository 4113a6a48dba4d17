//! The debug header (`x-isrgate-debug: 1`, `proxy::debug`): refused to anonymous clients (as if
//! never asked, and never forwarded), complete for a trusted one — a loopback client asking for
//! itself, or the debug token — on a miss, a hit the lane would answer, a stale answer, a
//! collapsed miss and a bypass; values from tags and paths escaped.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use isrgate::cache::epochs::Mode;
use isrgate::cache::key::{CacheKey, Variant};

use crate::eventually;
use crate::support::origin::{FakeNext, Gate, Route};
use crate::support::{Client, Gateway, Got, config};

const ISR: &str = "s-maxage=60, stale-while-revalidate=300";
const ASK: (&str, &str) = ("x-isrgate-debug", "1");

/// The debug header of `got` as a dictionary: strings unescaped, other values as written.
fn debug(got: &Got) -> BTreeMap<String, String> {
    let text = got.header("x-isrgate-debug");
    assert!(!text.is_empty(), "no debug header: {got:?}");
    dict(text)
}

/// An RFC 8941 dictionary, enough of it for these tests: `key=token|integer|"string"|(…)`
/// and bare keys (`?1`).
fn dict(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| !matches!(c, '=' | ','))).collect();
        let value = if chars.next_if_eq(&'=').is_some() {
            match chars.peek() {
                Some('"') => string(&mut chars),
                Some('(') => inner_list(&mut chars),
                _ => std::iter::from_fn(|| chars.next_if(|&c| c != ',')).collect(),
            }
        } else {
            "?1".to_owned()
        };
        assert!(out.insert(key.trim().to_owned(), value).is_none(), "{text}");
        if chars.next().is_none() {
            return out;
        }
    }
}

/// An sf-string at the start of `chars`, unescaped.
fn string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    assert_eq!(chars.next(), Some('"'));
    let mut s = String::new();
    loop {
        match chars.next().expect("closed string") {
            '\\' => s.push(chars.next().expect("escaped")),
            '"' => return s,
            c => s.push(c),
        }
    }
}

/// An inner list at the start of `chars`, as written (up to its unquoted `)`).
fn inner_list(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> String {
    let (mut raw, mut quoted, mut escaped) = (String::new(), false, false);
    for c in chars.by_ref() {
        raw.push(c);
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ')' if !quoted => return raw,
            _ => {}
        }
    }
    panic!("unclosed inner list {raw}")
}

/// The strings of an inner list `("a" "b")`.
fn list(text: &str) -> Vec<String> {
    let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
    let mut chars = inner.expect("inner list").chars().peekable();
    let mut items = Vec::new();
    while chars.peek().is_some() {
        items.push(string(&mut chars));
        chars.next_if_eq(&' ');
    }
    items
}

fn int(d: &BTreeMap<String, String>, key: &str) -> i64 {
    d.get(key)
        .unwrap_or_else(|| panic!("no {key} in {d:?}"))
        .parse()
        .expect("integer")
}

fn page(body: &str, tags: &str) -> Route {
    Route::html(body)
        .header("cache-control", ISR)
        .header("x-next-cache-tags", tags)
}

fn advance(gw: &Gateway, secs: u64) {
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache.clock.advance(Duration::from_secs(secs));
}

fn gateway_id(gw: &Gateway) -> String {
    gw.state
        .cache
        .as_ref()
        .expect("cache on")
        .gateway_id()
        .to_owned()
}

#[tokio::test]
async fn debug_header_refused_to_an_anonymous_client() {
    let origin = FakeNext::start(|o| {
        o.route("/p", page("p", "t"));
    })
    .await;
    // Nobody by address: the test client is a loopback one.
    let mut cfg = config(&[origin.url()], "debug_from = []", "");
    cfg.admin.as_mut().expect("admin").token = Some("s3cret".into());
    let gw = Gateway::start(cfg).await;
    let c = Client::default();
    let admin_token = [ASK, ("x-isrgate-debug-token", "s3cret")];
    let wrong = [ASK, ("x-isrgate-debug-token", "0123")];
    for (i, headers) in [&[ASK][..], &admin_token, &wrong].into_iter().enumerate() {
        let got = c.get(&gw.url("/p"), headers).await;
        let expected = if i == 0 { "MISS" } else { "HIT" };
        assert_eq!(
            (got.status.as_u16(), got.header("x-cache")),
            (200, expected)
        );
        assert!(
            got.headers.get("x-isrgate-debug").is_none(),
            "{headers:?}: {got:?}"
        );
        assert_eq!(
            got.header("cache-control"),
            ISR,
            "the response as anyone gets it"
        );
    }
    let seen = origin.last("/p").expect("the miss reached the replica");
    for name in ["x-isrgate-debug", "x-isrgate-debug-token"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} reached the replica"
        );
    }
    // The debug token, not the admin token itself, opens it from any address.
    let token = isrgate::admin::debug_token("s3cret");
    let got = c
        .get(&gw.url("/p"), &[ASK, ("x-isrgate-debug-token", &token)])
        .await;
    assert_eq!(debug(&got)["state"], "hit");
}

#[tokio::test]
async fn a_relayed_request_is_not_its_peer_asking() {
    let origin = FakeNext::start(|o| {
        o.route("/p", page("p", "t"));
    })
    .await;
    // Loopback is trusted by default, but not for what a proxy relays.
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    for relayed in [
        ("x-forwarded-for", "198.51.100.7"),
        ("forwarded", "for=198.51.100.7"),
    ] {
        let got = c.get(&gw.url("/p"), &[ASK, relayed]).await;
        assert!(got.headers.get("x-isrgate-debug").is_none(), "{relayed:?}");
    }
    let got = c.get(&gw.url("/p"), &[ASK]).await;
    assert_eq!(debug(&got)["state"], "hit", "the same request, unrelayed");
}

#[tokio::test]
async fn debug_header_complete_for_a_trusted_client() {
    let origin = FakeNext::start(|o| {
        o.route("/p", page("p", "blog,post-1"));
        o.route("/s", page("s", "s-tag"));
        o.route("/b", Route::html("b"));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    let gateway = gateway_id(&gw);

    // A miss: rendered for this request, streamed while stored.
    let miss = c.get(&gw.url("/p"), &[ASK]).await;
    let d = debug(&miss);
    assert_eq!((&*d["state"], &*d["reason"]), ("miss", "absent"), "{d:?}");
    assert!(d["key"].ends_with("/p html"), "{d:?}");
    assert_eq!(d["variant"], "html");
    assert_eq!(d["gateway"], gateway);
    assert_eq!(int(&d, "waiters"), 0);
    assert_eq!(d["cache-status"], "isrgate; fwd=miss; stored");
    assert_eq!(d["cache-control"], ISR, "the response's own, moved here");
    assert_eq!(miss.header("cache-control"), "private, no-store");
    assert!(
        origin
            .last("/p")
            .expect("seen")
            .headers
            .get("x-isrgate-debug")
            .is_none()
    );

    // A hit the lane would answer (the L1, HTTP/1.1): lent to the driver, which says so.
    let plain = c.get(&gw.url("/p"), &[]).await;
    assert_eq!(plain.header("x-cache"), "HIT");
    assert!(plain.headers.get("x-isrgate-debug").is_none(), "not asked");
    let hit = c.get(&gw.url("/p"), &[ASK]).await;
    assert_eq!((hit.header("x-cache"), &hit.body[..]), ("HIT", &b"p"[..]));
    let d = debug(&hit);
    assert_eq!((&*d["state"], &*d["reason"]), ("hit", "fresh"), "{d:?}");
    assert_eq!(d["key"], debug(&miss)["key"]);
    // Age and time left split the 60 s of freshness (each rounded down), however long the
    // machine took between the two requests.
    assert!((0..=60).contains(&int(&d, "ttl")), "{d:?}");
    assert!(
        (59..=60).contains(&(int(&d, "age") + int(&d, "ttl"))),
        "{d:?}"
    );
    let fresh_until = int(&d, "fresh-until");
    assert_eq!(int(&d, "filled-at") + 60, fresh_until);
    assert_eq!(int(&d, "swr-until"), fresh_until + 300);
    assert!(int(&d, "sie-until") >= int(&d, "swr-until"));
    assert_eq!(d["filled-by"], gateway);
    let tags = list(&d["tags"]);
    for tag in ["*", "path:/p", "_N_T_/p", "blog", "post-1"] {
        assert!(tags.iter().any(|t| t == tag), "{tag} in {tags:?}");
    }
    assert_eq!(d["cache-status"], "isrgate; hit");
    assert_eq!(origin.count("/p"), 1);

    // Stale by a soft invalidation of one of its tags.
    c.get(&gw.url("/s"), &[]).await;
    let cache = gw.state.cache.as_ref().expect("cache on");
    cache
        .epochs
        .record(cache.epochs.current() + 1, Mode::Soft, ["s-tag"]);
    let d = debug(&c.get(&gw.url("/s"), &[ASK]).await);
    assert_eq!(
        (&*d["state"], &*d["reason"]),
        ("stale", "invalidated"),
        "{d:?}"
    );
    assert_eq!(
        (&*d["invalidated"], &*d["invalidated-by"]),
        ("soft", "s-tag")
    );

    // Stale by age: past s-maxage, inside stale-while-revalidate.
    advance(&gw, 61);
    let stale = c.get(&gw.url("/p"), &[ASK]).await;
    assert_eq!(stale.header("x-cache"), "STALE");
    let d = debug(&stale);
    assert_eq!((&*d["state"], &*d["reason"]), ("stale", "expired"), "{d:?}");
    assert!(int(&d, "ttl") < 0 && int(&d, "age") >= 61, "{d:?}");
    assert!(
        (59..=60).contains(&(int(&d, "age") + int(&d, "ttl"))),
        "{d:?}"
    );
    assert!(!d.contains_key("invalidated"), "{d:?}");
    assert_eq!(
        d["cache-status"],
        "isrgate; hit; fwd=stale; detail=stale-while-revalidate"
    );

    // A bypass: not a cache candidate, and why.
    let bypass = c
        .get(&gw.url("/b"), &[ASK, ("authorization", "Bearer user")])
        .await;
    let d = debug(&bypass);
    assert_eq!(
        (&*d["state"], &*d["reason"]),
        ("bypass", "authorization"),
        "{d:?}"
    );
    assert!(!d.contains_key("key"), "{d:?}");
    let seen = origin.last("/b").expect("seen");
    assert!(seen.headers.get("x-isrgate-debug").is_none());
    assert_eq!(
        seen.headers["authorization"], "Bearer user",
        "the app's header, untouched"
    );
}

/// The head of the answer on `s`, read as soon as it arrives (its body may still be held at
/// the origin).
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("head in time")
            .expect("read");
        assert!(n > 0, "closed before the head");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn a_render_says_how_many_requests_wait_for_it() {
    let gate = Gate::new();
    let rest = Arc::new(tokio::sync::Notify::new());
    let origin = FakeNext::start(|o| {
        let held = Route::gated_stream(2, 64, 1, Arc::clone(&rest))
            .content_type("text/html")
            .header("cache-control", ISR)
            .gated(&gate);
        o.route("/w", held);
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let cache = gw.state.cache.as_ref().expect("cache on");
    let key = CacheKey::new(
        &cache.cfg().namespace,
        "site.test",
        "/w",
        None,
        &Variant::Html,
    );
    let ask = "GET /w HTTP/1.1\r\nHost: site.test\r\nx-isrgate-debug: 1\r\n\r\n";
    let leader = tokio::spawn({
        let gw_addr = gw.addr;
        async move {
            let mut s = TcpStream::connect(gw_addr).await.expect("connect");
            s.write_all(ask.as_bytes()).await.expect("write");
            s
        }
    });
    eventually!(
        10,
        origin.count("/w") == 1,
        "the leader reached the replica"
    );
    let follower = tokio::spawn({
        let c = Client::default();
        let url = format!("http://{}/w", gw.addr);
        async move { c.get(&url, &[("host", "site.test"), ASK]).await }
    });
    eventually!(
        10,
        cache.flights.followers(key.hash) == 1,
        "the follower waits"
    );
    gate.open();
    // The leader's head leaves while its body is held: the follower still waits.
    let mut s = leader.await.expect("leader");
    let head = read_head(&mut s).await;
    let line = head
        .lines()
        .find_map(|l| l.strip_prefix("x-isrgate-debug: "))
        .unwrap_or_else(|| panic!("no debug header: {head}"));
    let d = dict(line);
    assert_eq!((&*d["state"], int(&d, "waiters")), ("miss", 1), "{d:?}");
    rest.notify_one();
    let followed = follower.await.expect("follower");
    let d = debug(&followed);
    assert_eq!(
        (&*d["state"], &*d["reason"]),
        ("collapsed", "absent"),
        "{d:?}"
    );
    assert_eq!(d["filled-by"], gateway_id(&gw));
    assert_eq!(origin.count("/w"), 1, "one render for both");
}

#[tokio::test]
async fn tags_and_paths_cannot_break_out_of_the_debug_header() {
    let evil_tag = r#"evil"tag;x=1\"#;
    let origin = FakeNext::start(|o| {
        o.route("*", page("e", evil_tag));
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let c = Client::default();
    let path = "/inj\";y=1,z=%0D%0Aset-cookie:a";
    c.get(&gw.url(path), &[]).await;
    let got = c.get(&gw.url(path), &[ASK]).await;
    let raw = got.header("x-isrgate-debug");
    assert!(raw.bytes().all(|b| (b' '..=b'~').contains(&b)), "{raw}");
    let d = debug(&got);
    assert_eq!(d["state"], "hit", "{d:?}");
    assert!(d["key"].contains(path), "{d:?}");
    assert!(list(&d["tags"]).iter().any(|t| t == evil_tag), "{d:?}");
    for injected in ["x", "y", "z", "set-cookie"] {
        assert!(!d.contains_key(injected), "{injected} in {d:?}");
    }
    assert!(got.headers.get("set-cookie").is_none());
}
