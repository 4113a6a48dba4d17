//! What every request goes through before the proxy driver, in one place: the cross-cutting
//! concerns of the listener.
//!
//! 1. **Concurrency limit with load shedding**: one semaphore for the whole process (every
//!    connection of every worker); at the limit a request is refused at once with 503 +
//!    `Retry-After` instead of queueing, since a queue behind a slow replica only turns overload
//!    into timeouts for everyone. The permit is held until the response head is ready.
//! 2. **The access log and the request metrics** around everything else, shed requests
//!    included: the request's method and target are kept (shared, not copied: two reference
//!    counts) for the line and for a server error's record, its host when a line will be
//!    written, and the duration, bytes, a 5xx and the line are recorded once the response's
//!    body is sent (`logging::access`). Hits the lane answers itself are recorded there.
//! 3. **The driver** (`proxy::handle`), which never fails: errors are responses.
//!
//! This was a tower stack (`LoadShed` + `GlobalConcurrencyLimit` + `BoxCloneSyncService`). In a
//! sampled profile of the pass-through path its futures (polls, drops, the per-request boxed
//! clone, moves of the large driver future through three layers) were about 4% of user CPU,
//! more than the semaphore they wrap; so the same semantics are a try-acquire here. When a
//! concern needs real composition (per-route timeouts, tower-http tracing), tower comes back.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;

use crate::app::AppState;
use crate::error::ProxyError;
use crate::http::X_REQUEST_ID;
use crate::http::body::Body;
use crate::logging::access;
use crate::proxy;
use crate::proxy::forwarded::Peer;

/// Runs one request through the listener's concerns and the driver.
pub async fn call(app: Arc<AppState>, peer: Arc<Peer>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let request = access::Request::of(&req, peer.addr, started, app.access.enabled());
    let resp = match app.concurrency.try_acquire() {
        Ok(_permit) => proxy::handle(Arc::clone(&app), peer, req).await,
        Err(_) => overloaded(&app),
    };
    access::respond(&app.access, &app.metrics, request, resp)
}

/// The shed response: the one 503 defined in `error.rs`, with a request id.
fn overloaded(app: &AppState) -> Response<Body> {
    app.metrics.requests.inc();
    app.metrics.shed.inc();
    let mut resp = ProxyError::Overloaded.to_response();
    resp.headers_mut()
        .insert(X_REQUEST_ID.clone(), app.request_ids.next());
    resp
}
