//! The request path, in the order a request goes through it:
//! [`sanitize`] → body limit → tunnel (upgrades) | [`classify`] → cache candidates:
//! [`cached`] (key → [`lookup`] → [`serve`] | [`fill`] → serve; [`refresh`] in the background)
//! | everything else: upstream → respond.
//!
//! [`debug`] tells a trusted client how the cache answered it (`x-isrgate-debug`).
//!
//! [`fast_path`] asks the same steps, without going upstream, whether the cache answers a request as
//! it stands (for the HTTP/1.1 hit lane, `server::lane`), and lends the driver its lookup.
//!
//! [`handle`] is the driver: it reads like the flow in `lib.rs` and calls one named step per
//! stage. Errors become responses in one place (`crate::error`) and are logged once, here.

pub mod cached;
pub mod classify;
pub mod coalesce;
pub mod debug;
pub mod fast_path;
pub mod fill;
pub mod forwarded;
pub mod lookup;
pub mod refresh;
pub mod respond;
pub mod sanitize;
mod tunnel;

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::app::AppState;
use crate::error::{ProxyError, Side};
use crate::http::X_REQUEST_ID;
use crate::http::body::{self, Body};
use crate::logging::access::AnsweredBy;
use crate::logging::access::Path;
use crate::metrics::Counter;
use forwarded::Peer;

/// Handles one client request; never fails (errors are responses). Its access line is
/// written around it (`server::request`), from what the response carries.
pub async fn handle(app: Arc<AppState>, peer: Arc<Peer>, req: Request<Incoming>) -> Response<Body> {
    app.metrics.requests.inc();
    let (head, body) = req.into_parts();
    let id = request_id(&app, &peer, &head);
    // Logged as the access log writes it: never a credential in the query (the webhook's
    // `?secret=`), and no copy of the target made for it.
    let (method, uri) = (head.method.clone(), head.uri.clone());
    let mut resp = match route(&app, &peer, head, body, &id).await {
        Ok(resp) => resp,
        Err(e) => {
            count(&app, &e);
            match e.side() {
                Side::Upstream => {
                    tracing::warn!(request_id = ?id, %method, uri = %Path(&uri), error = %e, "upstream failure")
                }
                Side::Gateway if matches!(e, ProxyError::CorruptEntry) => {
                    tracing::error!(request_id = ?id, %method, uri = %Path(&uri), error = %e, "gateway error")
                }
                _ => {
                    tracing::debug!(request_id = ?id, %method, uri = %Path(&uri), error = %e, "refused")
                }
            }
            let mut resp = e.to_response();
            if let Some(replica) = failed_replica(&e) {
                resp.extensions_mut().insert(replica);
            }
            resp
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
    resp
}

/// The replica an upstream error names, for the access line.
fn failed_replica(e: &ProxyError) -> Option<AnsweredBy> {
    use crate::upstream::UpstreamError as U;
    match e {
        ProxyError::Upstream(
            U::Connect { replica, .. }
            | U::Stalled { replica }
            | U::Timeout { replica, .. }
            | U::Exchange { replica, .. },
        ) => Authority::try_from(replica.as_str()).ok().map(AnsweredBy),
        _ => None,
    }
}

async fn route(
    app: &Arc<AppState>,
    peer: &Peer,
    mut head: Parts,
    body: Incoming,
    id: &HeaderValue,
) -> Result<Response<Body>, ProxyError> {
    // Read before sanitizing, which strips the ask from every request.
    let debug = debug::asked(&app.policy, peer, &head.headers);
    let sanitized =
        sanitize::request(&app.policy, peer, &mut head).map_err(ProxyError::Rejected)?;
    if head.uri.path() == crate::invalidate::PATH {
        sanitize::forward(&app.policy, peer, &mut head);
        let source = crate::invalidate::source(&head);
        return Ok(Box::pin(crate::invalidate::handle(app, head, body, &source)).await);
    }
    // A request the lane lent comes with what the lane decided: its build, its variant, its key
    // and lookup (`fast_path::Looked`). The build is the lane's (its key's namespace), not
    // routed again.
    let lent = head.extensions.get::<fast_path::Looked>();
    let lent_variant = lent.map(|l| l.variant.clone());
    match lent.map(|l| l.pin.clone()) {
        Some(Some(pin)) => {
            head.extensions.insert(pin);
        }
        Some(None) => {}
        None => app.deploy.pin(&mut head),
    }
    let config = app.config();
    let listen = &config.listen;
    let limits = (listen.max_body_bytes, listen.body_read_timeout);
    let body = limit_body(&head, body, limits, &app.metrics)?;
    head.headers.insert(X_REQUEST_ID.clone(), id.clone());
    if sanitized.upgrade {
        sanitize::forward(&app.policy, peer, &mut head);
        return Box::pin(tunnel::open(app, head, body, &sanitized)).await;
    }
    let mut bypassed = None;
    if let Some(cache) = &app.cache {
        let has_body = !http_body::Body::is_end_stream(&body);
        let classified = match lent_variant {
            // The lane classified it without a body: the same answer, unless one came.
            Some(variant) if !has_body => Ok(variant),
            _ => classify::request(&cache.cfg(), &head, has_body),
        };
        match classified {
            Ok(variant) => {
                let asked = debug.then(|| debug::Asked::of(&head, &variant));
                let mut served = cached::drive(app, cache, peer, head, variant).await?;
                // A hit's head was prepared (hop-by-hop headers already gone) once per entry.
                let prepared = matches!(
                    served.outcome,
                    respond::Outcome::Hit | respond::Outcome::Stale
                );
                finish(app, &mut served.response, &sanitized, !prepared);
                if let Some(asked) = asked {
                    debug::candidate(cache, &asked, &mut served);
                }
                return Ok(served.response);
            }
            Err(reason) => {
                app.metrics.cache_bypass.inc();
                Counter::inc_at(&app.metrics.cache_bypass_by, reason as usize);
                tracing::trace!(reason = reason.as_str(), "cache bypass");
                bypassed = Some(reason);
            }
        }
    }
    sanitize::forward(&app.policy, peer, &mut head);
    let reply = if head.method == http::Method::POST && head.headers.contains_key("next-action") {
        Box::pin(app.upstream.send_action(head, body)).await?
    } else {
        Box::pin(app.upstream.send(head, body)).await?
    };
    app.metrics.proxied.inc();
    let mut resp = reply.into_response();
    // Next's cache headers and @isrgate/next's tags are for the gateway only, whatever path
    // the response took.
    fill::strip_internal_response_headers(resp.headers_mut());
    finish(app, &mut resp, &sanitized, true);
    if bypassed.is_some() {
        respond::mark(resp.headers_mut(), respond::Outcome::Bypass);
    }
    if debug {
        debug::bypassed(&mut resp, bypassed, app.cache.as_deref());
    }
    Ok(resp)
}

/// The request id: a trusted proxy's `x-request-id` is kept (one id across the whole path),
/// anyone else's is replaced by ours.
fn request_id(app: &AppState, peer: &Peer, head: &Parts) -> HeaderValue {
    trusted_request_id(peer, head).unwrap_or_else(|| app.request_ids.next())
}

/// The request id a trusted proxy sent, if any.
fn trusted_request_id(peer: &Peer, head: &Parts) -> Option<HeaderValue> {
    match head.headers.get(&X_REQUEST_ID) {
        Some(v) if peer.trusted && !v.is_empty() && v.len() <= 128 => Some(v.clone()),
        _ => None,
    }
}

/// Refuses a declared `Content-Length` over the limit at once; otherwise streams the body
/// through a counting limit that fails the exchange (413) if it goes over, and a stall bound
/// that fails it (408) when the client sends nothing for `stall`. The bytes read count in
/// `isrgate_request_body_bytes_total`.
fn limit_body(
    head: &Parts,
    body: Incoming,
    (max, stall): (u64, std::time::Duration),
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<Body, ProxyError> {
    let declared = head
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ProxyError::BodyTooLarge);
    }
    if declared == Some(0) || http_body::Body::is_end_stream(&body) {
        return Ok(body::empty());
    }
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    let metrics = Arc::clone(metrics);
    let counted = body.map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            metrics.request_body_bytes.add(data.len() as u64);
        }
        frame
    });
    // Over the limit stays a `LengthLimitError` (413), a stall a `BodyStalled` (408); any
    // other failure is the client's.
    Ok(Limited::new(body::Deadline::idle(counted, stall), max)
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() || e.is::<body::BodyStalled>() {
                e
            } else {
                Box::new(body::ClientBodyError(e)) as body::BoxError
            }
        })
        .boxed())
}

/// A response, ready for the client: our HTTP version, no hop-by-hop headers (`strip`: unless
/// they are known to be gone already), and a `Location` that points at us instead of a
/// replica.
fn finish(app: &AppState, resp: &mut Response<Body>, sanitized: &sanitize::Sanitized, strip: bool) {
    // The version is per hop: the client gets ours, whatever the replica spoke.
    *resp.version_mut() = Version::HTTP_11;
    if strip {
        sanitize::strip_hop_by_hop(resp.headers_mut(), false);
    }
    if resp.headers().contains_key(header::LOCATION) {
        forwarded::rewrite_location(
            resp.headers_mut(),
            &app.upstream.replicas().authorities(),
            &app.policy.forwarded.public_scheme,
            sanitized.public_host.as_ref(),
        );
    }
}

fn count(app: &AppState, e: &ProxyError) {
    use crate::upstream::UpstreamError as U;
    let m = &app.metrics;
    match e {
        ProxyError::Rejected(_) => m.rejected.inc(),
        ProxyError::Upstream(U::ClientBody(_) | U::ClientBodyStalled) => m.client_body_errors.inc(),
        ProxyError::BodyTooLarge | ProxyError::Upstream(U::BodyTooLarge) => m.body_too_large.inc(),
        ProxyError::Overloaded => m.shed.inc(),
        // Counted where it was found (`isrgate_store_corrupt_total`).
        ProxyError::UpgradeUnsupported | ProxyError::CorruptEntry => {}
        ProxyError::Upstream(U::Timeout { .. } | U::Stalled { .. }) => m.upstream_timeouts.inc(),
        ProxyError::Upstream(U::Connect { .. } | U::NoReplica) => m.upstream_unreachable.inc(),
        ProxyError::Upstream(U::Exchange { .. } | U::Body(_)) => m.upstream_errors.inc(),
    }
}
