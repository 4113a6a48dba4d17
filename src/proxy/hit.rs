//! The hit lane's question to the request path (`server::lane`): can this request be answered
//! from the L1 as it stands, with nothing else to do?
//!
//! Receives a parsed HTTP/1.1 head; hands on a [`Hit`] (the entry, which representation, the
//! `Age` and the request id) or `None`. It runs the same steps as the driver, in the same
//! order and with the same functions ([`super::sanitize::request`], [`super::classify`], the
//! key, [`super::lookup::l1_fresh`]), and says yes only where the driver would answer a plain
//! `HIT` from the L1: a cache candidate, fresh and valid, no `If-None-Match` (a 304 is the
//! driver's), no image negotiation, no `Location` to rewrite for this client. Everything else
//! is `None`, and the lane lends the request to hyper and the driver, which decide it all
//! again: saying no costs a second look, never a different answer.
//!
//! It must not go upstream, touch the store, or change the cache; it counts only the requests
//! it answers.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;

use super::forwarded::Peer;
use super::{cached, classify, lookup, sanitize, serve};
use crate::app::AppState;
use crate::cache::key::Variant;

/// A request the L1 answers.
#[derive(Debug)]
pub struct Hit {
    /// The representation's prepared head on the wire, without `Age`, `x-request-id`, `Date`
    /// and the final empty line ([`serve::wire`]).
    pub wire: Bytes,
    /// Its body: the stored gzip bytes for a client that accepts gzip, the identity body
    /// otherwise; empty for HEAD.
    pub body: Bytes,
    /// `Age`, in seconds.
    pub age: u64,
    /// The `x-request-id` to send.
    pub request_id: HeaderValue,
}

/// The L1's answer to `head`, if it is a plain hit (see the module docs).
pub fn hit(app: &AppState, peer: &Peer, mut head: Parts) -> Option<Hit> {
    let cache = app.cache.as_ref()?;
    // Read before sanitizing, as the driver does; a new id is drawn only for an answer.
    let trusted_id = super::trusted_request_id(peer, &head);
    let sanitized = sanitize::request(&app.policy, peer, &mut head).ok()?;
    if sanitized.upgrade || head.uri.path() == crate::invalidate::PATH {
        return None;
    }
    let variant = classify::request(&cache.cfg, &head, false).ok()?;
    if matches!(variant, Variant::Image(_)) || head.headers.contains_key(header::IF_NONE_MATCH) {
        return None;
    }
    let now = cache.clock.now_ms();
    let key = cached::key(cache, &head, &variant);
    let entry = lookup::l1_fresh(cache, &key, &head.headers, now)?;
    let gzip = !entry.gzip.is_empty() && serve::accepts_gzip(&head.headers);
    let (wire, mut body) = serve::wire(&entry, gzip)?;
    if head.method == http::Method::HEAD {
        body = Bytes::new();
    }
    let request_id = trusted_id.unwrap_or_else(|| app.request_ids.next());
    app.metrics.requests.inc();
    app.metrics.cache_hits.inc();
    app.metrics.cache_l1_hits.inc();
    tracing::debug!(
        request_id = ?request_id, peer = %peer.addr, method = %head.method, uri = %head.uri,
        status = entry.meta.status, lane = true, "request"
    );
    Some(Hit {
        wire,
        body,
        age: now.saturating_sub(entry.meta.stored_at_ms) / 1000,
        request_id,
    })
}
