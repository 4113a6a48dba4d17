//! The debug header: how the cache answered one request, for the operator who asks (Fastly's
//! `Fastly-Debug: 1`, Varnish's `X-Varnish` and `Age`, in one header).
//!
//! **Who may ask.** A request asks with `x-isrgate-debug: 1`, and is answered when
//! - its TCP peer is in `listen.debug_from` (default: loopback, so `curl` on the host, or
//!   through `kubectl port-forward`, works) and the request is its own: the peer is not a
//!   trusted proxy and it carries no `X-Forwarded-For`, `Forwarded` or `X-Real-IP` (a relayed
//!   request's peer says nothing of who asks: a proxy on the same host would otherwise make
//!   every client a loopback one); or
//! - it carries the debug token in `x-isrgate-debug-token` (`admin::debug_token`, printed by
//!   `isrgate debug-token`), compared in constant time. It is derived from the admin token, never
//!   the admin token itself: requests to the public listener cross CDNs and load balancers that
//!   may log headers, and the admin token purges, reloads and deploys, while the debug token
//!   only reads, and rotating the admin token revokes it. Never `Authorization: Bearer`: that
//!   header is the application's (it would reach the replica) and makes a request a bypass.
//!
//! Anyone else's ask is ignored as if absent: no hint that the header exists. Both request
//! headers are stripped by `sanitize` before anything reaches a replica, whoever sent them.
//!
//! **What.** One response header, `x-isrgate-debug`, an RFC 8941 dictionary (values from tags
//! and paths escaped by [`crate::http::sf`]): `state` and `reason`, then, for a cache candidate,
//! `key`, `variant`, `build`, and from the entry it was made from (`cache::describe`) its age,
//! freshness window, invalidation, tags, and the gateway that filled it and when; `gateway`
//! (who answered), `waiters` (requests on this gateway waiting for the key's render as the
//! answer left: other gateways' waiters wait on the Redis lock and are not counted) and the
//! `cache-status`. The README lists every member.
//!
//! **Never to anyone else.** The header is set on this response only, never stored. The
//! response also gets `Cache-Control: private, no-store` (its own `Cache-Control`, if any, is
//! in the header as `cache-control`): a CDN in front must not keep the debug answer and hand it
//! to anonymous clients.
//!
//! **Cost.** A request without the header pays one header lookup here (and one in the hit
//! lane, which lends a request whose debug ask is answered to the driver, so the header is
//! written in one place: here).

use std::borrow::Cow;
use std::sync::Arc;

use http::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use subtle::ConstantTimeEq;

use super::cached::Served;
use super::classify::Bypass;
use super::forwarded::Peer;
use super::respond::Outcome;
use crate::app::CacheState;
use crate::cache::describe::Description;
use crate::cache::epochs::Validity;
use crate::cache::key::Variant;
use crate::cache::policy::StaleReason;
use crate::config::SanitizePolicy;
use crate::http::body::Body;
use crate::http::sf::Dict;
use crate::http::{X_FORWARDED_FOR, X_ISRGATE_DEBUG, X_ISRGATE_DEBUG_TOKEN, X_REAL_IP};
use crate::upstream::pin::Pin;

/// Tag text shown at most in one header (bytes); the rest are counted in `tags-omitted`
/// (`isrgate inspect` lists them all). Proxies in front bound response heads (nginx: 4-8 KiB).
const MAX_TAG_BYTES: usize = 2048;

/// Whether `headers` ask for the debug header and the asker may have it (see the module
/// docs). One header lookup when they do not ask.
pub fn asked(policy: &SanitizePolicy, peer: &Peer, headers: &HeaderMap) -> bool {
    match headers.get(&X_ISRGATE_DEBUG) {
        Some(v) if v.as_bytes() == b"1" => trusted(policy, peer, headers),
        _ => false,
    }
}

/// Whether the asker is a `listen.debug_from` peer asking for itself, or holds the token.
fn trusted(policy: &SanitizePolicy, peer: &Peer, headers: &HeaderMap) -> bool {
    let debug = &policy.debug;
    let ip = peer.addr.ip().to_canonical();
    let relayed = peer.trusted
        || headers.contains_key(&X_FORWARDED_FOR)
        || headers.contains_key(header::FORWARDED)
        || headers.contains_key(&X_REAL_IP);
    if !relayed && debug.from.iter().any(|net| net.contains(&ip)) {
        return true;
    }
    match (&debug.token, headers.get(&X_ISRGATE_DEBUG_TOKEN)) {
        (Some(want), Some(given)) => bool::from(given.as_bytes().ct_eq(want.as_bytes())),
        _ => false,
    }
}

/// What the debug header needs of the request before the driver consumes it.
#[derive(Debug)]
pub struct Asked {
    variant: Cow<'static, str>,
    pin: Option<Arc<Pin>>,
}

impl Asked {
    /// The request's variant and build.
    pub fn of(head: &Parts, variant: &Variant) -> Asked {
        Asked {
            variant: variant.as_str(),
            pin: head.extensions.get::<Arc<Pin>>().cloned(),
        }
    }
}

/// Sets the debug header of a cache candidate's answer.
pub fn candidate(cache: &CacheState, asked: &Asked, served: &mut Served) {
    let now = cache.clock.now_ms();
    let described = served
        .entry
        .as_deref()
        .map(|e| Description::of(&e.meta, now, &cache.epochs));
    let mut d = Dict::with_capacity(512);
    d.token("state", state(served.outcome))
        .token("reason", reason(served, described.as_ref()))
        .string("key", &served.key.text)
        .token("variant", &asked.variant);
    if let Some(pin) = &asked.pin {
        d.string("build", &pin.build);
    }
    if let Some(why) = served.not_stored {
        d.token("not-stored", why.as_str());
    }
    if let Some(described) = &described {
        entry(&mut d, described, now);
    }
    d.string("gateway", cache.gateway_id());
    let waiters = cache.flights.followers(served.key.hash);
    d.integer("waiters", i64::try_from(waiters).unwrap_or(i64::MAX));
    finish(&mut served.response, d);
}

/// Sets the debug header of an answer that did not involve the cache: `why` it was bypassed,
/// `None` when the cache is off.
pub fn bypassed(resp: &mut Response<Body>, why: Option<Bypass>, cache: Option<&CacheState>) {
    let mut d = Dict::with_capacity(128);
    d.token("state", state(Outcome::Bypass))
        .token("reason", why.map_or("cache_off", Bypass::as_str));
    if let Some(cache) = cache {
        d.string("gateway", cache.gateway_id());
    }
    finish(resp, d);
}

/// The members an entry contributes: age, freshness window, invalidation, tags, filler.
fn entry(d: &mut Dict, described: &Description<'_>, now_ms: u64) {
    let meta = described.meta;
    let secs = |ms: u64| i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let ttl_ms = i128::from(meta.fresh_until_ms) - i128::from(now_ms);
    d.integer("age", i64::try_from(described.age_s).unwrap_or(i64::MAX))
        .integer(
            "ttl",
            i64::try_from(ttl_ms.div_euclid(1000)).unwrap_or(i64::MIN),
        )
        .integer("fresh-until", secs(meta.fresh_until_ms))
        .integer("swr-until", secs(meta.stale_until_ms))
        .integer("sie-until", secs(meta.stale_if_error_until_ms));
    if let Some(by) = described.invalidation.by {
        d.token("invalidated", described.invalidation.as_str())
            .string("invalidated-by", by);
    }
    let mut bytes = 0;
    let shown = meta
        .tags
        .iter()
        .take_while(|t| {
            bytes += t.len();
            bytes <= MAX_TAG_BYTES
        })
        .count();
    d.strings("tags", meta.tags[..shown].iter().map(String::as_str));
    if shown < meta.tags.len() {
        d.integer(
            "tags-omitted",
            i64::try_from(meta.tags.len() - shown).unwrap_or(i64::MAX),
        );
    }
    if let Some(gateway) = described.filled_by() {
        d.string("filled-by", gateway);
    }
    d.integer("filled-at", secs(meta.stored_at_ms));
}

/// The `state` member: what `x-cache` says, with collapsed misses and stale-if-error told
/// apart.
fn state(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Hit => "hit",
        Outcome::Stale => "stale",
        Outcome::StaleIfError => "stale-if-error",
        Outcome::Miss { .. } => "miss",
        Outcome::Collapsed => "collapsed",
        Outcome::Bypass => "bypass",
    }
}

/// The `reason` member of a cache candidate: why it was a hit, stale, or a miss.
fn reason(served: &Served, described: Option<&Description<'_>>) -> &'static str {
    match served.outcome {
        Outcome::Hit => "fresh",
        Outcome::Stale => match described.map(|d| d.invalidation.validity) {
            Some(Validity::Stale) => "invalidated",
            _ => "expired",
        },
        // A replica answered 5xx (origin_error), failed or did not answer within
        // stale_if_error_wait (origin_timeout).
        Outcome::StaleIfError => served.stale.map_or("origin_error", StaleReason::as_str),
        Outcome::Miss { .. } | Outcome::Collapsed | Outcome::Bypass => {
            served.missed.map_or("absent", |m| m.as_str())
        }
    }
}

/// Sets the header on `resp`, and keeps shared caches in front from storing the answer.
fn finish(resp: &mut Response<Body>, mut d: Dict) {
    let headers = resp.headers_mut();
    let mut own = headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    if own.peek().is_some() {
        let joined = own.collect::<Vec<_>>().join(", ");
        d.string("cache-control", &joined);
    }
    if let Some(status) = headers.get(&super::respond::CACHE_STATUS) {
        d.string("cache-status", status.to_str().unwrap_or(""));
    }
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    headers.insert(X_ISRGATE_DEBUG.clone(), d.into_header());
}
