//! Step 2 of the request flow: make a client request safe to forward.
//!
//! Receives the request head as the client sent it; hands on a head that (a) carries no
//! hop-by-hop headers (RFC 9110 §7.6.1), (b) carries none of the Next.js-internal headers and
//! query keys a client must never control (NEXTJS.md §7.2 and §9 rules 6-8: middleware bypass,
//! route-matches and data-request confusion, forced re-renders), and (c) has `X-Forwarded-*` set
//! by us, trusting client values only from configured proxies. It also rewrites the `Location`
//! of responses that point at a replica, so redirects never leak an internal address.
//!
//! It must not touch anything else: every other header and query parameter goes through as sent.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use ipnet::IpNet;
use percent_encoding::percent_decode_str;

use crate::http::{
    KEEP_ALIVE, NEXT_ROUTER_PREFETCH, PROXY_CONNECTION, RSC, X_FORWARDED_FOR, X_FORWARDED_HOST,
    X_FORWARDED_PROTO, X_NEXTJS_DATA, X_REAL_IP,
};

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
];

/// Request headers stripped by prefix (rule 6: whole internal families).
const INTERNAL_PREFIXES: &[&str] = &["x-invoke-", "x-middleware-request-", "x-vercel-"];

/// Path suffixes `next start` clients never request, but which reach pages past middleware
/// matchers (CVE-2026-44575; NEXTJS.md §9 rule 8).
const INTERNAL_PATH_SUFFIXES: &[&str] = &[".rsc", ".action"];

/// Where the gateway is reached, and whom it trusts; fixed per listener.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Scheme clients use to reach us.
    pub public_scheme: Scheme,
    /// Peers whose `X-Forwarded-*` we keep.
    pub trusted_proxies: Vec<IpNet>,
    /// Refuse `INTERNAL_PATH_SUFFIXES`.
    pub reject_internal_paths: bool,
}

/// Why a request is refused before it reaches a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The path ends in a Next.js-internal suffix.
    InternalPath,
}

/// What sanitizing found out about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sanitized {
    /// The client asked for a protocol upgrade (WebSocket) on HTTP/1.1.
    pub upgrade: bool,
    /// The host clients used (for `Location` rewriting).
    pub public_host: Option<HeaderValue>,
}

/// Sanitizes `head` in place. `peer` is the TCP peer's address.
pub fn request(policy: &Policy, peer: IpAddr, head: &mut Parts) -> Result<Sanitized, Rejection> {
    if policy.reject_internal_paths && has_internal_suffix(head.uri.path()) {
        return Err(Rejection::InternalPath);
    }
    let wants_trailers = head.headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    let upgrade = strip_hop_by_hop(&mut head.headers, head.version == http::Version::HTTP_11);
    // `TE` is hop-by-hop, but its `trailers` token is the client's consent to receive trailers,
    // which the replica only sends when asked; it is the one value worth carrying over.
    if wants_trailers {
        head.headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    strip_internal(&mut head.headers, head.uri.path());
    if let Some(q) = head.uri.query() {
        if let Some(cleaned) = strip_internal_query(q) {
            head.uri = with_query(&head.uri, &cleaned);
        }
    }
    // HTTP/2 requests carry the host in `:authority`; replicas speak HTTP/1.1 and need `Host`.
    if !head.headers.contains_key(header::HOST) {
        if let Some(a) = head.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                head.headers.insert(header::HOST, v);
            }
        }
    }
    let public_host = set_forwarded(policy, peer, &mut head.headers);
    Ok(Sanitized {
        upgrade,
        public_host,
    })
}

/// Removes hop-by-hop headers: the fixed set and every header the `Connection` header names.
/// `Trailer` is not hop-by-hop (RFC 9110 §6.6.2) and hyper only sends trailers a response
/// declares in it, so it stays.
/// Returns whether this is an upgrade request, in which case `Connection: upgrade` and `Upgrade`
/// are kept for the tunnel.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, may_upgrade: bool) -> bool {
    let mut upgrade = false;
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if name == header::UPGRADE {
                upgrade = may_upgrade && headers.contains_key(header::UPGRADE);
            } else {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
        &header::TE,
        &header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    upgrade
}

fn strip_internal(headers: &mut HeaderMap, path: &str) {
    // Collect first: a HeaderMap cannot be mutated while iterated. Most requests have none, so
    // the Vec is empty and never allocates.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let n = name.as_str();
            INTERNAL_HEADERS.contains(&n) || INTERNAL_PREFIXES.iter().any(|p| n.starts_with(p))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
    if headers.get(&RSC).is_some_and(|v| v.as_bytes() != b"1") {
        headers.remove(&RSC);
    }
    if headers
        .get(&NEXT_ROUTER_PREFETCH)
        .is_some_and(|v| !matches!(v.as_bytes(), b"1" | b"2" | b"3"))
    {
        headers.remove(&NEXT_ROUTER_PREFETCH);
    }
    if !path.starts_with("/_next/data/") {
        headers.remove(&X_NEXTJS_DATA);
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
    if !query
        .split('&')
        .any(|pair| is_internal_query_key(pair.split('=').next().unwrap_or("")))
    {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !is_internal_query_key(pair.split('=').next().unwrap_or("")))
        .collect();
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

fn has_internal_suffix(path: &str) -> bool {
    let decoded = percent_decode_str(path).decode_utf8_lossy();
    let lower = decoded.trim_end_matches('/').to_ascii_lowercase();
    INTERNAL_PATH_SUFFIXES.iter().any(|s| lower.ends_with(s))
}

/// Sets `X-Forwarded-For/Proto/Host` and `X-Real-IP`. From a trusted proxy its values are kept
/// and the peer appended to `X-Forwarded-For`; from anyone else every client `X-Forwarded-*` and
/// `Forwarded` header is dropped first. Returns the public host.
fn set_forwarded(policy: &Policy, peer: IpAddr, headers: &mut HeaderMap) -> Option<HeaderValue> {
    let trusted = policy.trusted_proxies.iter().any(|net| net.contains(&peer));
    let peer_text = peer.to_string();
    if trusted {
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {peer_text}"),
            _ => peer_text.clone(),
        };
        if !headers.contains_key(&X_REAL_IP) {
            insert_text(headers, &X_REAL_IP, &peer_text);
        }
        insert_text(headers, &X_FORWARDED_FOR, &xff);
    } else {
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().starts_with("x-forwarded-"))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
        headers.remove(header::FORWARDED);
        insert_text(headers, &X_FORWARDED_FOR, &peer_text);
        insert_text(headers, &X_REAL_IP, &peer_text);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if policy.public_scheme == Scheme::HTTPS {
                "https"
            } else {
                "http"
            }),
        );
    }
    let host = headers.get(header::HOST).cloned();
    if !headers.contains_key(&X_FORWARDED_HOST) {
        if let Some(h) = &host {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
    }
    headers.get(&X_FORWARDED_HOST).cloned().or(host)
}

fn insert_text(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name.clone(), v);
    }
}

/// Rewrites an absolute `Location` that points at a replica (any of `replicas`, or a loopback or
/// unspecified address on a replica's port: what `next start` puts in redirects when it does not
/// know its public name) to `scheme://public_host` + the same path and query.
pub fn rewrite_location(
    headers: &mut HeaderMap,
    replicas: &[Authority],
    public_scheme: &Scheme,
    public_host: Option<&HeaderValue>,
) {
    let Some(host) = public_host.and_then(|h| h.to_str().ok()) else {
        return;
    };
    let Some(loc) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Ok(uri) = loc.parse::<Uri>() else { return };
    let Some(authority) = uri.authority() else {
        return;
    };
    let internal = replicas.iter().any(|r| {
        r == authority
            || (r.port_u16() == authority.port_u16()
                && matches!(
                    authority.host(),
                    "localhost" | "127.0.0.1" | "0.0.0.0" | "[::1]" | "[::]"
                ))
    });
    if !internal {
        return;
    }
    let pq = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let rewritten = format!("{}://{host}{pq}", public_scheme.as_str());
    if let Ok(v) = HeaderValue::from_str(&rewritten) {
        headers.insert(header::LOCATION, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn policy() -> Policy {
        Policy {
            public_scheme: Scheme::HTTP,
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("cidr")],
            reject_internal_paths: true,
        }
    }

    fn head(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::get(uri).header("host", "shop.example");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn untrusted() -> IpAddr {
        "192.0.2.1".parse().expect("ip")
    }

    #[test]
    fn strips_every_internal_header() {
        for name in INTERNAL_HEADERS.iter().copied().chain([
            "x-invoke-status",
            "x-middleware-request-x",
            "x-vercel-id",
        ]) {
            let mut h = head("/p", &[(name, "1")]);
            request(&policy(), untrusted(), &mut h).expect("ok");
            assert!(!h.headers.contains_key(name), "{name} survived");
        }
    }

    #[test]
    fn rsc_and_prefetch_kept_only_with_exact_values() {
        let mut h = head("/p", &[("rsc", "1"), ("next-router-prefetch", "2")]);
        request(&policy(), untrusted(), &mut h).expect("ok");
        assert_eq!(h.headers["rsc"], "1");
        assert_eq!(h.headers["next-router-prefetch"], "2");
        let mut h = head("/p", &[("rsc", "0"), ("next-router-prefetch", "yes")]);
        request(&policy(), untrusted(), &mut h).expect("ok");
        assert!(!h.headers.contains_key("rsc"));
        assert!(!h.headers.contains_key("next-router-prefetch"));
    }

    #[test]
    fn nextjs_data_only_under_data_routes() {
        let mut h = head("/p", &[("x-nextjs-data", "1")]);
        request(&policy(), untrusted(), &mut h).expect("ok");
        assert!(!h.headers.contains_key("x-nextjs-data"));
        let mut h = head("/_next/data/b/p.json", &[("x-nextjs-data", "1")]);
        request(&policy(), untrusted(), &mut h).expect("ok");
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
        request(&policy(), untrusted(), &mut h).expect("ok");
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
        ] {
            let mut h = head(p, &[]);
            assert_eq!(
                request(&policy(), untrusted(), &mut h),
                Err(Rejection::InternalPath),
                "{p}"
            );
        }
        let mut h = head("/a.rsc.html", &[]);
        assert!(request(&policy(), untrusted(), &mut h).is_ok());
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
        let s = request(&policy(), untrusted(), &mut h).expect("ok");
        assert!(!s.upgrade);
        for n in ["connection", "x-secret", "keep-alive", "te", "upgrade"] {
            assert!(!h.headers.contains_key(n), "{n}");
        }
        assert_eq!(h.headers["x-kept"], "yes");
    }

    #[test]
    fn te_trailers_is_carried_over_alone() {
        let mut h = head("/p", &[("te", "gzip, trailers")]);
        request(&policy(), untrusted(), &mut h).expect("ok");
        assert_eq!(h.headers["te"], "trailers");
    }

    #[test]
    fn upgrade_keeps_its_headers() {
        let mut h = head(
            "/ws",
            &[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket"),
            ],
        );
        assert!(request(&policy(), untrusted(), &mut h).expect("ok").upgrade);
        assert_eq!(h.headers["connection"], "upgrade");
        assert_eq!(h.headers["upgrade"], "websocket");
    }

    #[test]
    fn forwarded_headers_from_untrusted_peer_replaced() {
        let mut h = head(
            "/p",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-port", "1"),
                ("forwarded", "for=6.6.6.6"),
            ],
        );
        let s = request(&policy(), untrusted(), &mut h).expect("ok");
        assert_eq!(h.headers["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h.headers["x-forwarded-host"], "shop.example");
        assert_eq!(h.headers["x-forwarded-proto"], "http");
        assert!(!h.headers.contains_key("x-forwarded-port"));
        assert!(!h.headers.contains_key("forwarded"));
        assert_eq!(
            s.public_host.as_ref().map(|v| v.as_bytes()),
            Some(&b"shop.example"[..])
        );
    }

    #[test]
    fn forwarded_headers_from_trusted_proxy_kept_and_appended() {
        let mut h = head(
            "/p",
            &[
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-host", "www.example"),
                ("x-forwarded-proto", "https"),
            ],
        );
        request(&policy(), "10.1.2.3".parse().expect("ip"), &mut h).expect("ok");
        assert_eq!(h.headers["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
        assert_eq!(h.headers["x-forwarded-host"], "www.example");
        assert_eq!(h.headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn location_pointing_at_replica_rewritten() {
        let replicas: Vec<Authority> = vec!["10.0.0.5:3000".parse().expect("a")];
        let host = HeaderValue::from_static("shop.example");
        for (loc, want) in [
            (
                "http://10.0.0.5:3000/login?x=1",
                "https://shop.example/login?x=1",
            ),
            ("http://localhost:3000/a", "https://shop.example/a"),
            ("http://other.example/a", "http://other.example/a"),
            ("/relative", "/relative"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::LOCATION, HeaderValue::from_static(loc));
            rewrite_location(&mut h, &replicas, &Scheme::HTTPS, Some(&host));
            assert_eq!(h[header::LOCATION], want, "{loc}");
        }
    }
}
