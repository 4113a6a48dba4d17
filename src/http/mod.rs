//! HTTP vocabulary shared by every stage: header-name constants (built once, `from_static`),
//! the body types the gateway moves around ([`body`]), gzip on the way out for what is not
//! stored ([`gzip`]), the small answers it writes itself ([`reply`]), HTTP/1.1 on the wire
//! for the hit lane ([`wire`]), and structured field values (RFC 8941) it writes ([`sf`]).

pub mod body;
pub mod gzip;
pub mod reply;
pub mod sf;
pub mod wire;

use http::HeaderName;

/// The `name=value` pairs of a query string, decoded (`+` is a space), in order; a pair
/// without `=` has an empty value.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    query.split('&').filter(|p| !p.is_empty()).map(move |pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(name), decode(value))
    })
}

/// Our request id, set on every response and forwarded upstream.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Real-IP`: set like `X-Forwarded-For` (apps read it for the client address).
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// `RSC` (App Router flight request marker).
pub static RSC: HeaderName = HeaderName::from_static("rsc");
/// `Next-Router-Prefetch`.
pub static NEXT_ROUTER_PREFETCH: HeaderName = HeaderName::from_static("next-router-prefetch");
/// `Next-Action` (a Server Action call).
pub static NEXT_ACTION: HeaderName = HeaderName::from_static("next-action");
/// `x-middleware-prefetch` (a Pages Router prefetch of a middleware-handled route).
pub static X_MIDDLEWARE_PREFETCH: HeaderName = HeaderName::from_static("x-middleware-prefetch");
/// `x-isrgate-debug`: asked by a trusted client (`1`), answered with how the cache served the
/// request (`proxy::debug`); never forwarded to a replica.
pub static X_ISRGATE_DEBUG: HeaderName = HeaderName::from_static("x-isrgate-debug");
/// `x-isrgate-debug-token`: the debug token, for a client the address rules do not trust;
/// never forwarded to a replica.
pub static X_ISRGATE_DEBUG_TOKEN: HeaderName = HeaderName::from_static("x-isrgate-debug-token");
