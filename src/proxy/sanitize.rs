//! Step 2 of the request flow: make a client request safe to forward.
//!
//! Receives the request head as the client sent it; hands on a head that (a) carries no
//! hop-by-hop headers (RFC 9110 §7.6.1), (b) carries none of the Next.js-internal headers and
//! query keys a client must never control (NEXTJS.md §7.2 and §9 rules 6-8: middleware bypass,
//! route-matches and data-request confusion, forced re-renders), and (c) has `X-Forwarded-*` set
//! by us ([`forward`], through `proxy::forwarded`), trusting client values only from
//! configured proxies. (Rewriting a response's `Location` that points at a replica is
//! `forwarded::rewrite_location`'s.)
//!
//! It must not touch anything else: every other header and query parameter goes through as sent.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::{Method, Version};
use percent_encoding::percent_decode_str;

use super::forwarded::{self, Peer};
use smallvec::SmallVec;

use crate::http::{NEXT_ROUTER_PREFETCH, RSC};

/// Request headers stripped by exact name: Next.js internals (NEXTJS.md §9 rule 6) and
/// `Next-HMR-Refresh` (rule 7).
const INTERNAL_HEADERS: &[&str] = &[
    "x-middleware-subrequest",
    "x-middleware-subrequest-id",
    "x-middleware-invoke",
    "x-middleware-rewrite",
    "x-middleware-redirect",
    "x-middleware-set-cookie",
    "x-middleware-skip",
    "x-middleware-next",
    "x-middleware-override-headers",
    "x-now-route-matches",
    "x-matched-path",
    "x-invocation-id",
    "next-resume",
    "x-next-resume-state-length",
    "x-prerender-revalidate",
    "x-prerender-revalidate-if-generated",
    "x-next-revalidated-tags",
    "x-next-revalidate-tag-token",
    "x-next-cache-tags",
    "x-next-cache-soft-tags",
    "x-nextjs-rewrite",
    "x-nextjs-redirect",
    "x-nextjs-matched-path",
    "x-nextjs-cache",
    "x-nextjs-prerender",
    "x-nextjs-postponed",
    "x-nextjs-stale-time",
    "x-nextjs-deployment-id",
    "next-hmr-refresh",
    // @isrgate/next: the tags it reports and the mark of the gateway's own refreshes.
    "x-isrgate-tags",
    "x-isrgate-refresh",
    // The debug header's ask and its token (`proxy::debug`): the gateway's, whoever sent them.
    "x-isrgate-debug",
    "x-isrgate-debug-token",
];

/// Request headers stripped by prefix (rule 6: whole internal families).
const INTERNAL_PREFIXES: &[&str] = &["x-invoke-", "x-middleware-request-", "x-vercel-"];

/// Path suffixes `next start` clients never request, but which reach pages past middleware
/// matchers (CVE-2026-44575; NEXTJS.md §9 rule 8).
const INTERNAL_PATH_SUFFIXES: &[&str] = &[".rsc", ".action"];

/// Headers a `Connection` token may never remove: the gateway sets or relies on them, and a
/// client naming them (`Connection: host, x-forwarded-for`) would otherwise strip them after we
/// set them, or strip a trusted load balancer's.
const PROTECTED_FROM_CONNECTION: &[&str] = &[
    "host",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "x-real-ip",
    "x-request-id",
];

/// Sanitizing policy, fixed per listener (defined with the configuration it derives from).
pub use crate::config::SanitizePolicy as Policy;

/// Why a request is refused before it reaches a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The path ends in a Next.js-internal suffix (404).
    InternalPath,
    /// The path has dot segments or backslashes, which Next.js's WHATWG URL parsing resolves
    /// differently from the raw path our checks see (400).
    AmbiguousPath,
    /// `CONNECT`: the gateway is not a forward proxy (405).
    Connect,
    /// `TRACE` or `TRACK`: a replica would echo the request, cookies and all, back (405).
    Trace,
    /// A method HTTP does not define, or not in upper case (methods are case-sensitive): no
    /// replica serves it, and one that lower-cases methods would take `get` for GET (501).
    UnknownMethod,
    /// `OPTIONS *` (asterisk-form): a question about the gateway, not a page (400).
    AsteriskForm,
    /// No `Host` on HTTP/1.1, more than one, or one that is not `host[:port]` (400, RFC 9112
    /// §3.2): the host is part of the cache key and of what the replica renders, so a request
    /// whose host two parsers could read differently is never forwarded.
    BadHost,
}

impl Rejection {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::InternalPath => "internal_path",
            Rejection::AmbiguousPath => "ambiguous_path",
            Rejection::Connect => "connect",
            Rejection::Trace => "trace",
            Rejection::UnknownMethod => "unknown_method",
            Rejection::AsteriskForm => "asterisk_form",
            Rejection::BadHost => "bad_host",
        }
    }
}

/// What sanitizing found out about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sanitized {
    /// A WebSocket upgrade on HTTP/1.1.
    pub upgrade: bool,
    /// The host clients used (for `Location` rewriting).
    pub public_host: Option<HeaderValue>,
}

/// Sets the forwarding headers (`X-Forwarded-*`, `X-Real-IP`) on a sanitized request that is
/// about to leave for a replica (or the webhook, which logs its caller). A cache hit never
/// calls it: four header inserts, and usually a grown map, were a tenth of the hit path.
pub fn forward(policy: &Policy, peer: &Peer, head: &mut Parts) {
    let host = forwarded::set(&policy.forwarded, peer, &mut head.headers);
    debug_assert_eq!(
        host,
        forwarded::public_host(&policy.forwarded, peer, &head.headers),
        "public_host agrees with what set() forwards"
    );
}

/// Sanitizes `head` in place (the forwarding headers are [`forward`]'s).
pub fn request(policy: &Policy, peer: &Peer, head: &mut Parts) -> Result<Sanitized, Rejection> {
    check_method(&head.method)?;
    if head.uri.path() == "*" {
        return Err(Rejection::AsteriskForm);
    }
    check_path(policy, head.uri.path())?;
    let found = scan(&head.headers, Some((head.uri.path(), !peer.trusted)));
    // `TE` is hop-by-hop, but its `trailers` token is the client's consent to receive trailers,
    // which the replica only sends when asked; it is the one value worth carrying over.
    let wants_trailers = found.te && has_token(&head.headers, &header::TE, "trailers");
    let upgrade = apply_hop_by_hop(&mut head.headers, &found, head.version == Version::HTTP_11);
    if wants_trailers {
        head.headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if found.rsc {
        keep_if_single(&mut head.headers, &RSC, |v| v == b"1");
    }
    if found.prefetch {
        keep_if_single(&mut head.headers, &NEXT_ROUTER_PREFETCH, |v| {
            matches!(v, b"1" | b"2" | b"3")
        });
    }
    if let Some(cleaned) = head.uri.query().and_then(strip_internal_query) {
        head.uri = with_query(&head.uri, &cleaned);
    }
    // The authority of the request target wins over `Host` (RFC 9112 §3.2.2, RFC 9113 §8.3.1):
    // HTTP/2's `:authority`, or an HTTP/1.1 absolute-form target. Replicas speak HTTP/1.1 and
    // read `Host`.
    if let Some(v) = head
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        head.headers.insert(header::HOST, v);
    }
    check_host(&head.headers, head.version)?;
    if head.version == Version::HTTP_2 {
        join_cookies(&mut head.headers);
    }
    // The forwarding headers are set later, only on what goes upstream ([`forward`]).
    let public_host = forwarded::public_host(&policy.forwarded, peer, &head.headers);
    Ok(Sanitized {
        upgrade,
        public_host,
    })
}

/// The methods replicas are asked: what Next.js serves (RFC 9110's, without CONNECT and TRACE).
fn check_method(method: &Method) -> Result<(), Rejection> {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => Ok(()),
        Method::CONNECT => Err(Rejection::Connect),
        Method::TRACE => Err(Rejection::Trace),
        _ if method.as_str() == "TRACK" => Err(Rejection::Trace),
        _ => Err(Rejection::UnknownMethod),
    }
}

/// RFC 9112 §3.2: exactly one `Host` (none is allowed only before HTTP/1.1), whose value is
/// `uri-host [ ":" port ]` (RFC 3986 §3.2.2: a reg-name, an IPv4 address or an IP literal) —
/// no user info, path, spaces or second host.
fn check_host(headers: &HeaderMap, version: Version) -> Result<(), Rejection> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version < Version::HTTP_11 => Ok(()),
        (Some(host), None) if valid_host(host.as_bytes()) => Ok(()),
        _ => Err(Rejection::BadHost),
    }
}

/// Whether `v` is `uri-host [ ":" port ]`.
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = match v.iter().rposition(|&b| b == b':') {
        // The colon of an IPv6 literal is not a port separator.
        Some(i) if !v[i..].contains(&b']') => (&v[..i], Some(&v[i + 1..])),
        _ => (v, None),
    };
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    let host_ok = match host {
        [] => false,
        [b'[', literal @ .., b']'] => {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        }
        reg_name => reg_name.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        }),
    };
    host_ok && port_ok
}

/// What one pass over the header names found: what to remove, and which headers need a closer
/// look. One pass instead of a lookup per rule: a typical request then costs a handful of
/// header-map hashes, not dozens.
#[derive(Default)]
struct Scan {
    doomed: SmallVec<[HeaderName; 8]>,
    connection: bool,
    te: bool,
    upgrade: bool,
    rsc: bool,
    prefetch: bool,
}

/// Classifies every header name once. `request` is `Some((path, drop_forwarding))` for a
/// client request (internal headers, data-route marker, forwarding headers of an untrusted
/// peer); `None` for a response (hop-by-hop only).
fn scan(headers: &HeaderMap, request: Option<(&str, bool)>) -> Scan {
    let mut found = Scan::default();
    for name in headers.keys() {
        let n = name.as_str();
        let doom = match n {
            "connection" => {
                found.connection = true;
                true
            }
            "te" => {
                found.te = true;
                true
            }
            "upgrade" => {
                found.upgrade = true;
                false
            }
            "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "transfer-encoding" => true,
            _ => match request {
                None => false,
                Some((path, drop_forwarding)) => match n {
                    "rsc" => {
                        found.rsc = true;
                        false
                    }
                    "next-router-prefetch" => {
                        found.prefetch = true;
                        false
                    }
                    "x-nextjs-data" => !path.starts_with("/_next/data/"),
                    _ if forwarded::is_forwarding_header(n) => drop_forwarding,
                    _ => is_internal_header(n),
                },
            },
        };
        if doom {
            found.doomed.push(name.clone());
        }
    }
    found
}

/// Removes hop-by-hop headers from a response (requests get the same inside [`request`]):
/// the fixed set and every header the `Connection` header names. Returns whether this is a
/// WebSocket upgrade (kept for the tunnel).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, may_upgrade: bool) -> bool {
    let found = scan(headers, None);
    apply_hop_by_hop(headers, &found, may_upgrade)
}

/// Applies a scan: the `Connection` header's tokens (every line; never a header in
/// [`PROTECTED_FROM_CONNECTION`]), the doomed names, and the upgrade decision: only a single
/// `Upgrade: websocket` announced by `Connection: upgrade` on HTTP/1.1 is carried, as
/// `Connection: upgrade` + `Upgrade: websocket`. `Trailer` is not hop-by-hop (RFC 9110 §6.6.2)
/// and hyper only sends trailers a response declares in it, so it stays.
fn apply_hop_by_hop(headers: &mut HeaderMap, found: &Scan, may_upgrade: bool) -> bool {
    let mut named: SmallVec<[HeaderName; 4]> = SmallVec::new();
    let mut upgrade = false;
    if found.connection {
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("keep-alive") || token.eq_ignore_ascii_case("close") {
                    continue;
                }
                if token.eq_ignore_ascii_case("upgrade") {
                    upgrade = may_upgrade;
                } else if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    if !PROTECTED_FROM_CONNECTION.contains(&name.as_str()) {
                        named.push(name);
                    }
                }
            }
        }
    }
    for name in found.doomed.iter().chain(&named) {
        headers.remove(name);
    }
    let upgrade = upgrade && found.upgrade && is_websocket(headers);
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    } else if found.upgrade {
        headers.remove(header::UPGRADE);
    }
    upgrade
}

fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn is_websocket(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::UPGRADE).iter();
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"websocket")
    )
}

fn is_internal_header(name: &str) -> bool {
    // Every internal name starts with "x-" or "next-": one byte test spares the rest the scan.
    matches!(name.as_bytes().first(), Some(b'x' | b'n'))
        && (INTERNAL_HEADERS.contains(&name)
            || INTERNAL_PREFIXES.iter().any(|p| name.starts_with(p)))
}

/// Keeps `name` only when it appears once with a valid value: Node joins repeated headers
/// (`RSC: 1` + `RSC: 0` → `"1, 0"`), which Next.js versions read inconsistently
/// (CVE-2026-44576).
fn keep_if_single(headers: &mut HeaderMap, name: &HeaderName, valid: fn(&[u8]) -> bool) {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => {}
        (Some(v), None) if valid(v.as_bytes()) => {}
        _ => {
            headers.remove(name);
        }
    }
}

/// HTTP/2 clients may split `Cookie` into several fields (RFC 9113 §8.2.3); an HTTP/1.1 replica
/// expects one, joined with `"; "`.
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// Whether a query key is internal to Next.js: `__nextDataReq` (CVE-2024-46982) and the
/// `nxtP*`/`nxtI*` route-param prefixes (CVE-2026-44574). Keys are compared percent-decoded,
/// as Next.js decodes them.
pub fn is_internal_query_key(raw_key: &str) -> bool {
    let key = percent_decode_str(raw_key).decode_utf8_lossy();
    key == "__nextDataReq" || key.starts_with("nxtP") || key.starts_with("nxtI")
}

/// The query without internal keys, or `None` when nothing had to go (the common case: no
/// allocation). Pairs that stay are kept byte for byte and in order.
pub fn strip_internal_query(query: &str) -> Option<String> {
    let internal = |pair: &&str| is_internal_query_key(pair.split('=').next().unwrap_or(""));
    if !query.split('&').any(|pair| internal(&pair)) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !internal(p)).collect();
    Some(kept.join("&"))
}

fn with_query(uri: &Uri, query: &str) -> Uri {
    let pq = if query.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{query}", uri.path())
    };
    let mut parts = uri.clone().into_parts();
    // The path came from a valid URI and the query is a subset of its pairs, so this parses.
    parts.path_and_query = PathAndQuery::try_from(pq).ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Path checks on the percent-decoded path (decoding allocates only when there is a `%`).
fn check_path(policy: &Policy, path: &str) -> Result<(), Rejection> {
    let decoded = percent_decode_str(path).decode_utf8_lossy();
    if decoded.contains('\\') || decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(Rejection::AmbiguousPath);
    }
    if policy.reject_internal_paths {
        let tail = decoded.trim_end_matches('/').as_bytes();
        let internal = INTERNAL_PATH_SUFFIXES.iter().any(|s| {
            tail.len() >= s.len() && tail[tail.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
        });
        if internal {
            return Err(Rejection::InternalPath);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use std::net::SocketAddr;

    fn policy() -> Policy {
        Policy {
            forwarded: forwarded::Policy {
                public_scheme: http::uri::Scheme::HTTP,
                trusted_proxies: vec!["10.0.0.0/8".parse().expect("cidr")],
                trust_forwarded_host: false,
            },
            reject_internal_paths: true,
            debug: Default::default(),
        }
    }

    #[test]
    fn hosts_are_host_and_port_and_nothing_else() {
        for ok in [
            "site.test",
            "site.test:8080",
            "site.test:",
            "127.0.0.1:3000",
            "[::1]",
            "[::1]:443",
            "xn--bcher-kva.example",
            "a%2Db.test",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "site.test evil",
            "site.test/evil",
            "site.test@evil.test",
            "site.test:80:80",
            "site.test:123456",
            "site.test:8o",
            "[::1",
            "[]",
            "[::1]x",
            "site.test\\evil",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn one_host_is_required_on_http_1_1() {
        let p = policy();
        let peer = Peer::new(SocketAddr::from(([1, 2, 3, 4], 5)), &p.forwarded);
        let mut two = head("/", &[("host", "evil.test")]);
        assert_eq!(request(&p, &peer, &mut two), Err(Rejection::BadHost));
        let mut none = Request::get("/").body(()).expect("request").into_parts().0;
        assert_eq!(request(&p, &peer, &mut none), Err(Rejection::BadHost));
        none.version = Version::HTTP_10;
        assert!(
            request(&p, &peer, &mut none).is_ok(),
            "HTTP/1.0 may omit it"
        );
        let mut bad = Request::get("/")
            .header("host", "site.test@evil.test")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        assert_eq!(request(&p, &peer, &mut bad), Err(Rejection::BadHost));
        // An absolute-form target's authority replaces every Host line (RFC 9112 §3.2.2).
        let mut absolute = head("http://site.test/p", &[("host", "evil.test")]);
        assert!(request(&p, &peer, &mut absolute).is_ok());
        assert_eq!(absolute.headers.get_all(header::HOST).iter().count(), 1);
        assert_eq!(absolute.headers[header::HOST], "site.test");
    }

    fn head(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::get(uri).header("host", "shop.example");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn run(h: &mut Parts) -> Result<Sanitized, Rejection> {
        let peer = Peer::new(SocketAddr::from(([192, 0, 2, 1], 9)), &policy().forwarded);
        let sanitized = request(&policy(), &peer, h)?;
        forward(&policy(), &peer, h);
        Ok(sanitized)
    }

    #[test]
    fn strips_every_internal_header() {
        for name in INTERNAL_HEADERS.iter().copied().chain([
            "x-invoke-status",
            "x-middleware-request-x",
            "x-vercel-id",
        ]) {
            let mut h = head("/p", &[(name, "1")]);
            run(&mut h).expect("ok");
            assert!(!h.headers.contains_key(name), "{name} survived");
        }
    }

    #[test]
    fn rsc_and_prefetch_kept_only_once_with_exact_values() {
        let mut h = head("/p", &[("rsc", "1"), ("next-router-prefetch", "2")]);
        run(&mut h).expect("ok");
        assert_eq!(h.headers["rsc"], "1");
        assert_eq!(h.headers["next-router-prefetch"], "2");
        let mut h = head("/p", &[("rsc", "0"), ("next-router-prefetch", "yes")]);
        run(&mut h).expect("ok");
        assert!(!h.headers.contains_key("rsc"));
        assert!(!h.headers.contains_key("next-router-prefetch"));
        let mut h = head(
            "/p",
            &[
                ("rsc", "1"),
                ("rsc", "0"),
                ("next-router-prefetch", "1"),
                ("next-router-prefetch", "1"),
            ],
        );
        run(&mut h).expect("ok");
        assert!(!h.headers.contains_key("rsc"), "a repeated RSC is dropped");
        assert!(!h.headers.contains_key("next-router-prefetch"));
    }

    #[test]
    fn nextjs_data_only_under_data_routes() {
        let mut h = head("/p", &[("x-nextjs-data", "1")]);
        run(&mut h).expect("ok");
        assert!(!h.headers.contains_key("x-nextjs-data"));
        let mut h = head("/_next/data/b/p.json", &[("x-nextjs-data", "1")]);
        run(&mut h).expect("ok");
        assert_eq!(h.headers["x-nextjs-data"], "1");
    }

    #[test]
    fn internal_query_keys_removed_others_kept_verbatim() {
        assert_eq!(strip_internal_query("a=1&b=%20x"), None);
        assert_eq!(
            strip_internal_query("a=1&__nextDataReq=1&nxtPid=9&b=2&nxtIx&%6ExtPy=1").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(strip_internal_query("nxtPa=1").as_deref(), Some(""));
        let mut h = head("/p?nxtPslug=x", &[]);
        run(&mut h).expect("ok");
        assert_eq!(h.uri.to_string(), "/p");
    }

    #[test]
    fn internal_suffixes_rejected_even_encoded() {
        for p in [
            "/a.rsc",
            "/a.prefetch.rsc",
            "/a.segment.rsc",
            "/x.action",
            "/a%2ERSC",
            "/a.rsc/",
        ] {
            let mut h = head(p, &[]);
            assert_eq!(run(&mut h), Err(Rejection::InternalPath), "{p}");
        }
        let mut h = head("/a.rsc.html", &[]);
        assert!(run(&mut h).is_ok());
    }

    #[test]
    fn dot_segments_and_backslashes_rejected() {
        for p in [
            "/p.rsc/.",
            "/x/../p",
            "/x/%2e%2e/p",
            "/_next/data/%2E%2E/admin",
            "/a%5Cb",
            "/./a",
        ] {
            let mut h = head(p, &[]);
            assert_eq!(run(&mut h), Err(Rejection::AmbiguousPath), "{p}");
        }
        for p in ["/a..b", "/.well-known/x", "/a/.b"] {
            let mut h = head(p, &[]);
            assert!(run(&mut h).is_ok(), "{p}");
        }
    }

    #[test]
    fn connect_is_refused() {
        let mut h = Request::connect("shop.example:443")
            .body(())
            .expect("req")
            .into_parts()
            .0;
        assert_eq!(run(&mut h), Err(Rejection::Connect));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_removed() {
        let mut h = head(
            "/p",
            &[
                ("connection", "close, x-secret"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "gzip"),
                ("upgrade", "websocket"),
                ("x-kept", "yes"),
            ],
        );
        let s = run(&mut h).expect("ok");
        assert!(!s.upgrade);
        for n in ["connection", "x-secret", "keep-alive", "te", "upgrade"] {
            assert!(!h.headers.contains_key(n), "{n}");
        }
        assert_eq!(h.headers["x-kept"], "yes");
    }

    #[test]
    fn connection_cannot_remove_headers_we_rely_on() {
        let mut h = head(
            "/p",
            &[
                (
                    "connection",
                    "host, x-forwarded-for, content-length, x-real-ip",
                ),
                ("connection", "x-other"),
                ("x-other", "1"),
            ],
        );
        run(&mut h).expect("ok");
        assert_eq!(h.headers["host"], "shop.example");
        assert_eq!(h.headers["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h.headers["x-real-ip"], "192.0.2.1");
        assert!(
            !h.headers.contains_key("x-other"),
            "every Connection line counts"
        );
    }

    #[test]
    fn te_trailers_is_carried_over_alone() {
        let mut h = head("/p", &[("te", "gzip, trailers")]);
        run(&mut h).expect("ok");
        assert_eq!(h.headers["te"], "trailers");
    }

    #[test]
    fn only_websocket_upgrades_are_carried() {
        let mut h = head(
            "/ws",
            &[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "WebSocket"),
            ],
        );
        assert!(run(&mut h).expect("ok").upgrade);
        assert_eq!(h.headers["connection"], "upgrade");
        assert_eq!(h.headers["upgrade"], "websocket");
        for other in ["h2c", "websocket, h2c", "TLS/1.2"] {
            let mut h = head("/ws", &[("connection", "upgrade"), ("upgrade", other)]);
            assert!(!run(&mut h).expect("ok").upgrade, "{other}");
            assert!(!h.headers.contains_key("upgrade"), "{other}");
            assert!(!h.headers.contains_key("connection"), "{other}");
        }
    }

    #[test]
    fn authority_wins_over_host_and_h2_cookies_are_joined() {
        let mut h = Request::get("http://real.example/p")
            .header("host", "other.example")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .version(Version::HTTP_2)
            .body(())
            .expect("req")
            .into_parts()
            .0;
        run(&mut h).expect("ok");
        assert_eq!(h.headers["host"], "real.example");
        assert_eq!(h.headers["x-forwarded-host"], "real.example");
        assert_eq!(h.headers.get_all("cookie").iter().count(), 1);
        assert_eq!(h.headers["cookie"], "a=1; b=2");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_]{1,8}=[a-z0-9%]{0,6}",
            "(nxtP|nxtI|__nextDataReq|%6ExtP)[a-z]{0,4}(=[a-z0-9]{0,4})?",
            "[a-zA-Z0-9%=+._-]{0,10}",
        ]
    }

    proptest! {
        #[test]
        fn query_stripping_is_idempotent_and_keeps_other_pairs_in_order(
            pairs in proptest::collection::vec(pair(), 0..8)
        ) {
            let query = pairs.join("&");
            let once = strip_internal_query(&query).unwrap_or_else(|| query.clone());
            // Nothing internal is left, so a second pass changes nothing.
            prop_assert_eq!(strip_internal_query(&once), None);
            let kept: Vec<&str> = pairs
                .iter()
                .map(String::as_str)
                .filter(|p| !is_internal_query_key(p.split('=').next().unwrap_or("")))
                .collect();
            prop_assert_eq!(once, kept.join("&"));
        }

        #[test]
        fn path_checks_never_panic_and_reject_every_dot_segment(path in "(/[a-zA-Z0-9.%\\\\]{0,6}){0,5}") {
            let policy = Policy {
                forwarded: forwarded::Policy {
                    public_scheme: http::uri::Scheme::HTTP,
                    trusted_proxies: Vec::new(),
                    trust_forwarded_host: false,
                },
                reject_internal_paths: true,
            debug: Default::default(),
            };
            let result = check_path(&policy, &path);
            let decoded = percent_decode_str(&path).decode_utf8_lossy().into_owned();
            if decoded.split('/').any(|s| s == "." || s == "..") || decoded.contains('\\') {
                prop_assert_eq!(result, Err(Rejection::AmbiguousPath));
            }
        }
    }
}
