//! HTTP vocabulary shared by every stage: header-name constants (built once, `from_static`) and
//! the body types the gateway moves around ([`body`]).

pub mod body;

use http::HeaderName;

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
/// `Keep-Alive` (hop-by-hop, RFC 9110 §7.6.1).
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection` (non-standard hop-by-hop sent by old clients).
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `RSC` (App Router flight request marker).
pub static RSC: HeaderName = HeaderName::from_static("rsc");
/// `Next-Router-Prefetch`.
pub static NEXT_ROUTER_PREFETCH: HeaderName = HeaderName::from_static("next-router-prefetch");
/// `x-nextjs-data` (Pages Router data request marker; only meaningful under `/_next/data/`).
pub static X_NEXTJS_DATA: HeaderName = HeaderName::from_static("x-nextjs-data");
