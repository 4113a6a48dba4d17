//! Who the client is and where it reached us: the `X-Forwarded-*` headers the replica gets, and
//! `Location` headers pointing back at us instead of at a replica.
//!
//! A client's own `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are never believed unless the TCP
//! peer is a configured trusted proxy (NEXTJS.md §7.2: Server Actions compare `Origin` with
//! `x-forwarded-host`, and `x-forwarded-proto` feeds URL construction). From a trusted proxy the
//! `X-Forwarded-For` chain is extended and the client address is the right-most untrusted entry
//! (nginx `real_ip_recursive`); `X-Forwarded-Proto` is kept; `X-Forwarded-Host` is kept only
//! when `listen.trust_forwarded_host` says the proxy sets it itself (ALB does not, so behind
//! ALB a client could otherwise choose it).

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};

use crate::http::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REAL_IP};

/// Forwarding policy, fixed per listener (defined with the configuration it derives from).
pub use crate::config::ForwardPolicy as Policy;

impl Policy {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }
}

/// The TCP peer of a connection, worked out once per connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its address.
    pub addr: SocketAddr,
    /// Whether it is a trusted proxy.
    pub trusted: bool,
    ip: HeaderValue,
}

impl Peer {
    /// Classifies `addr` under `policy`.
    pub fn new(addr: SocketAddr, policy: &Policy) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .expect("invariant: an IP address is valid header text");
        Peer {
            addr,
            trusted: policy.trusts(addr.ip()),
            ip,
        }
    }
}

/// Whether a request header carries forwarding information a client could forge:
/// `X-Forwarded-*`, `Forwarded`, `X-Real-IP`. Sanitize drops these from untrusted peers in its
/// single pass over the headers, before [`set`].
pub fn is_forwarding_header(name: &str) -> bool {
    name.starts_with("x-forwarded-") || name == "forwarded" || name == "x-real-ip"
}

/// Sets `X-Forwarded-For/Proto/Host` and `X-Real-IP` for the replica and returns the public host
/// (what `Location` rewriting uses). From an untrusted peer the client's forwarding headers must
/// already be gone (sanitize's scan removes every [`is_forwarding_header`]).
pub fn set(policy: &Policy, peer: &Peer, headers: &mut HeaderMap) -> Option<HeaderValue> {
    if peer.trusted {
        from_trusted(policy, peer, headers);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), proto(policy));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(h) = headers.get(header::HOST).cloned() {
                headers.insert(X_FORWARDED_HOST.clone(), h);
            }
        }
        return headers.get(&X_FORWARDED_HOST).cloned();
    }
    headers.insert(X_FORWARDED_FOR.clone(), peer.ip.clone());
    headers.insert(X_REAL_IP.clone(), peer.ip.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), proto(policy));
    let host = headers.get(header::HOST).cloned();
    if let Some(h) = &host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    host
}

/// The host clients used, as [`set`] would return it, without touching the headers: the cache
/// hit path needs it (for `Location`) but never forwards anything, so it does not pay for
/// the forwarding headers.
pub fn public_host(policy: &Policy, peer: &Peer, headers: &HeaderMap) -> Option<HeaderValue> {
    if peer.trusted && policy.trust_forwarded_host {
        if let Some(h) = headers.get(&X_FORWARDED_HOST) {
            return Some(h.clone());
        }
    }
    headers.get(header::HOST).cloned()
}

fn proto(policy: &Policy) -> HeaderValue {
    HeaderValue::from_static(if policy.public_scheme == Scheme::HTTPS {
        "https"
    } else {
        "http"
    })
}

fn from_trusted(policy: &Policy, peer: &Peer, headers: &mut HeaderMap) {
    // Every X-Forwarded-For line counts (HAProxy adds a line, nginx extends one).
    let mut chain: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let peer_text = peer.ip.to_str().unwrap_or_default();
    chain.push(peer_text);
    let client = chain
        .iter()
        .rev()
        .find(|hop| hop.parse::<IpAddr>().map_or(true, |ip| !policy.trusts(ip)))
        .or(chain.first())
        .copied()
        .unwrap_or(peer_text);
    let xff = HeaderValue::from_str(&chain.join(", ")).ok();
    let real = HeaderValue::from_str(client).ok();
    if !matches!(
        headers.get(&X_FORWARDED_PROTO).map(HeaderValue::as_bytes),
        Some(b"http" | b"https")
    ) {
        headers.remove(&X_FORWARDED_PROTO);
    }
    if !policy.trust_forwarded_host {
        headers.remove(&X_FORWARDED_HOST);
    }
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if let Some(v) = real {
        headers.insert(X_REAL_IP.clone(), v);
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
    use http::header::HeaderName;

    fn policy(trust_host: bool) -> Policy {
        Policy {
            public_scheme: Scheme::HTTP,
            trusted_proxies: vec!["10.0.0.0/8".parse().expect("cidr")],
            trust_forwarded_host: trust_host,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("shop.example"));
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn peer(ip: &str, p: &Policy) -> Peer {
        Peer::new(SocketAddr::new(ip.parse().expect("ip"), 1), p)
    }

    #[test]
    fn untrusted_peer_values_replace_client_ones() {
        let p = policy(false);
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "1"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let forged: Vec<HeaderName> = h
            .keys()
            .filter(|n| is_forwarding_header(n.as_str()))
            .cloned()
            .collect();
        assert_eq!(forged.len(), 6);
        for n in forged {
            h.remove(n);
        }
        let public = set(&p, &peer("192.0.2.1", &p), &mut h);
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-real-ip"], "192.0.2.1");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-port"));
        assert!(!h.contains_key("forwarded"));
        assert_eq!(public.expect("host"), "shop.example");
    }

    #[test]
    fn trusted_chain_is_joined_and_client_is_rightmost_untrusted() {
        let p = policy(false);
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "chosen-by-client.example"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        set(&p, &peer("10.1.2.3", &p), &mut h);
        assert_eq!(
            h["x-forwarded-for"],
            "6.6.6.6, 203.0.113.9, 10.0.0.2, 10.1.2.3"
        );
        assert_eq!(h["x-real-ip"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(
            h["x-forwarded-host"], "shop.example",
            "not trusted unless configured"
        );
    }

    #[test]
    fn trusted_forwarded_host_when_configured_and_bad_proto_dropped() {
        let p = policy(true);
        let mut h = headers(&[
            ("x-forwarded-host", "www.example"),
            ("x-forwarded-proto", "gopher"),
        ]);
        let public = set(&p, &peer("10.1.2.3", &p), &mut h);
        assert_eq!(public.expect("host"), "www.example");
        assert_eq!(h["x-forwarded-proto"], "http");
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
