//! The hit lane's question to the request path (`server::lane`): can this request be answered
//! from the cache as it stands, with nothing else to do?
//!
//! Receives a parsed HTTP/1.1 head; hands on an [`Verdict`]: a [`Hit`] (the prepared head on
//! the wire, the body, `Age`, the request id), or "lend it" with the lookup already made. It
//! runs the driver's own steps in the driver's order ([`super::sanitize::request`],
//! [`super::classify`], the key, [`super::lookup`]) and answers only a plain hit, fresh or
//! stale within stale-while-revalidate (then it starts the refresh, as the driver would): a
//! cache candidate, no `If-None-Match` (a 304 is the driver's), no debug header asked by a
//! client that may have it ([`super::debug`]), no image negotiation, no `Location` to rewrite
//! for this client. Everything else is lent to hyper and the driver, which decides it again,
//! except the lookup: the lane's result rides along as a request extension ([`Looked`]), so a
//! request still reads the store once, whoever answers it.
//!
//! It must not go upstream itself or change the cache beyond what a lookup does (a stale hit
//! hands its refresh to `refresh`, in the background, as the driver does); it counts only the
//! requests it answers. An L1 hit takes no permit of `listen.max_concurrent_requests` (it
//! waits on nothing, so it cannot pile up); a lookup that reads the store does, and without
//! one the request is lent (the driver sheds it).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;

use super::forwarded::Peer;
use super::lookup::{self, Found, Lookup};
use super::{cached, classify, fill, refresh, respond, sanitize};
use crate::app::{AppState, CacheState};
use crate::cache::flight::FillPermit;
use crate::cache::key::{CacheKey, Variant};
use crate::cache::sealed::Held;
use crate::metrics::routes::RouteEvent;
use crate::upstream::pin::Pin;

/// A request the cache answers in the lane.
#[derive(Debug)]
pub struct Hit {
    /// The representation's prepared head on the wire, without `Age`, `x-request-id`, `Date`
    /// and the final empty line ([`respond::wire`]).
    pub wire: Bytes,
    /// Its body: the stored gzip bytes for a client that accepts gzip, the identity body
    /// otherwise (sealed when large: the lane `sendfile`s it); empty for HEAD.
    pub body: Held,
    /// `Age`, in seconds.
    pub age: u64,
    /// The `x-request-id` to send.
    pub request_id: HeaderValue,
    /// The stored status.
    pub status: u16,
    /// Fresh (`Hit`) or stale while a refresh runs (`Stale`).
    pub outcome: respond::Outcome,
    /// The request (sanitized), for the access log.
    pub request: Parts,
}

/// The lookup the lane made for a request it lends, for the driver to use instead of looking
/// again (a request extension; `hash` is the key it was made for).
#[derive(Debug, Clone)]
pub struct Looked {
    /// The variant the lane classified the request as.
    pub variant: Variant,
    /// The build the lane routed it to (its key's namespace); `None`: no build pinned.
    pub pin: Option<Arc<Pin>>,
    /// The key it looked up.
    pub key: CacheKey,
    /// What the cache held.
    pub found: Found,
    /// The `Vary` slot the answer belongs to, when not the key itself.
    pub slot: Option<CacheKey>,
    /// The key's flight, when the lookup of a miss took the lead ([`lookup::lookup_to_fill`]).
    pub permit: Lent,
}

impl Looked {
    /// The key and the lookup as the driver continues with them (the permit taken out).
    pub fn into_lookup(self) -> (CacheKey, Lookup) {
        let lookup = Lookup {
            found: self.found,
            slot: self.slot,
            permit: self.permit.take(),
        };
        (self.key, lookup)
    }
}

/// A fill permit handed from the lane to the driver (an extension must be `Clone`; the permit
/// has one holder, so the driver takes it out). Dropped untaken, it lets the key go.
#[derive(Debug, Clone, Default)]
pub struct Lent(Arc<std::sync::Mutex<Option<FillPermit>>>);

impl Lent {
    fn new(permit: Option<FillPermit>) -> Lent {
        Lent(Arc::new(std::sync::Mutex::new(permit)))
    }

    /// The permit, once.
    pub fn take(&self) -> Option<FillPermit> {
        crate::sync::lock(&self.0).take()
    }
}

/// Counts a hit the lane answers, as the driver counts its own.
fn count(
    app: &AppState,
    cache: &CacheState,
    (head, variant): (&Parts, &Variant),
    stale: bool,
    from_l1: bool,
    body: &Held,
) {
    app.metrics.requests.inc();
    cached::count_hot(app, head, variant);
    let event = if stale {
        RouteEvent::Stale
    } else {
        app.metrics.cache_hits.inc();
        RouteEvent::Hit
    };
    cached::count_route(app, cache, head, event);
    if from_l1 {
        app.metrics.cache_l1_hits.inc();
    }
    if matches!(body, Held::Sealed(_)) {
        app.metrics.cache_sendfile_hits.inc();
    }
}

/// What the lane does with a request.
#[derive(Debug)]
// Returned by value once per request and taken apart at once: a `Box` would be one more
// allocation on every hit (the hit carries its request, for the access line).
#[allow(clippy::large_enum_variant)]
pub enum Verdict {
    /// Write this hit.
    Hit(Hit),
    /// Lend the request to hyper and the driver, with the lookup made here, if any.
    Lend(Option<Looked>),
}

/// What the lane decided about a request before its lookup: the driver's steps, in its order.
struct Decided<'a> {
    cache: &'a Arc<CacheState>,
    trusted_id: Option<HeaderValue>,
    variant: Variant,
    pin: Option<Arc<Pin>>,
}

/// Sanitizes `head` and decides whether the lane may look it up: `None` lends it as it is.
fn decide<'a>(app: &'a Arc<AppState>, peer: &Peer, head: &mut Parts) -> Option<Decided<'a>> {
    let cache = app.cache.as_ref()?;
    // The debug header is written in one place, the driver's (one header lookup here).
    if super::debug::asked(&app.policy, peer, &head.headers) {
        return None;
    }
    // Read before sanitizing, as the driver does; a new id is drawn only for an answer.
    let trusted_id = super::trusted_request_id(peer, head);
    let sanitized = sanitize::request(&app.policy, peer, head).ok()?;
    if sanitized.upgrade || head.uri.path() == crate::invalidate::PATH {
        return None;
    }
    let variant = match classify::request(&cache.cfg(), head, false) {
        Ok(Variant::Image(_)) | Err(_) => return None,
        Ok(variant) => variant,
    };
    let pin = app.deploy.route(head);
    Some(Decided {
        cache,
        trusted_id,
        variant,
        pin,
    })
}

/// The cache's answer to `head`: a plain fresh hit, or lend it (see the module docs).
pub async fn answer(app: &Arc<AppState>, peer: &Peer, mut head: Parts) -> Verdict {
    let Some(Decided {
        cache,
        trusted_id,
        variant,
        pin,
    }) = decide(app, peer, &mut head)
    else {
        return Verdict::Lend(None);
    };
    let now = cache.clock.now_ms();
    let key = cached::key_pinned(cache, &head, &variant, pin.as_ref());
    let Lookup {
        found,
        slot,
        permit,
    } = match lookup::l1_fresh(cache, &key, &head.headers, now) {
        Some((entry, slot)) => {
            fill::write_back(app, cache, slot.as_ref().unwrap_or(&key), &entry);
            let found = Found::Fresh {
                entry,
                from_l1: true,
            };
            Lookup {
                found,
                slot,
                permit: None,
            }
        }
        None => {
            let Ok(_permit) = app.concurrency.try_acquire() else {
                return Verdict::Lend(None);
            };
            if head.method == http::Method::GET {
                lookup::lookup_to_fill(app, cache, &key, &head.headers, now).await
            } else {
                lookup::lookup(app, cache, &key, &head.headers, now).await
            }
        }
    };
    let permit = Lent::new(permit);
    let lend = |found| {
        Verdict::Lend(Some(Looked {
            variant: variant.clone(),
            pin: pin.clone(),
            key: key.clone(),
            found,
            slot: slot.clone(),
            permit: permit.clone(),
        }))
    };
    let (entry, from_l1, stale) = match &found {
        Found::Fresh { entry, from_l1 } => (entry, *from_l1, false),
        Found::Stale(entry) => (entry, false, true),
        Found::StaleIfError(_) | Found::Miss(_) => return lend(found),
    };
    if head.headers.contains_key(header::IF_NONE_MATCH) {
        return lend(found);
    }
    let gzip = !entry.gzip.is_empty() && respond::accepts_gzip(&head.headers);
    let written = if stale {
        respond::stale_wire(entry, gzip, cache.seal_bodies)
    } else {
        respond::wire(entry, gzip, cache.seal_bodies)
    };
    let Some((wire, mut body)) = written else {
        return lend(found);
    };
    if stale {
        // Served stale while one refresh runs, as the driver does (`cached::drive`).
        let mut up = fill::upstream_head(&head, &variant);
        if let Some(pin) = pin {
            up.extensions.insert(pin);
        }
        sanitize::forward(&app.policy, peer, &mut up);
        let key = slot.clone().unwrap_or_else(|| key.clone());
        // Why it is stale: what the key's last refresh met (`cached::drive`).
        app.metrics
            .served_stale(cache.flights.stale_reason(key.hash));
        refresh::spawn(app, cache, key, up, variant.clone(), entry);
    }
    if head.method == http::Method::HEAD {
        body = Held::Heap(Bytes::new());
    }
    let request_id = trusted_id.unwrap_or_else(|| app.request_ids.next());
    count(app, cache, (&head, &variant), stale, from_l1, &body);
    Verdict::Hit(Hit {
        wire,
        body,
        age: now.saturating_sub(entry.meta.stored_at_ms) / 1000,
        request_id,
        status: entry.meta.status,
        outcome: if stale {
            respond::Outcome::Stale
        } else {
            respond::Outcome::Hit
        },
        request: head,
    })
}
