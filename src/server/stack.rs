//! The tower stack every request goes through, assembled in one place. Only cross-cutting
//! concerns are layers; the cache and proxy steps are plain async functions behind them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, service_fn};

use crate::app::AppState;
use crate::error::ProxyError;
use crate::http::X_REQUEST_ID;
use crate::http::body::{Body, BoxError};
use crate::proxy;
use crate::proxy::forwarded::Peer;

/// The per-connection service: request in, response out. The error type is hyper's usual
/// boxed error, but the rescue layer turns every error into a response, so it never occurs.
pub type ConnService = BoxCloneSyncService<Request<Incoming>, Response<Body>, BoxError>;

/// What every connection's service is built from.
#[derive(Clone)]
pub struct Stack {
    app: Arc<AppState>,
    limit: GlobalConcurrencyLimitLayer,
}

impl Stack {
    /// The shared parts: state and the process-wide concurrency semaphore.
    pub fn new(app: &Arc<AppState>) -> Self {
        Self {
            app: Arc::clone(app),
            limit: GlobalConcurrencyLimitLayer::with_semaphore(Arc::clone(&app.concurrency)),
        }
    }

    /// The service for one connection from `peer`.
    pub fn for_peer(&self, addr: SocketAddr) -> ConnService {
        let app = Arc::clone(&self.app);
        // Worked out once per connection, not per request.
        let peer = Arc::new(Peer::new(addr, &app.policy.forwarded));
        let svc = ServiceBuilder::new()
            // Load shedding: at the limit, refuse now (503 + Retry-After) instead of queueing;
            // a queue behind a slow replica only turns overload into timeouts for everyone.
            .load_shed()
            // Concurrency limit: one semaphore for the whole process (every connection of every
            // worker), so the bound is on requests in progress, not per connection or thread.
            .layer(self.limit.clone())
            .service(service_fn(move |req| {
                let (app, peer) = (Arc::clone(&app), Arc::clone(&peer));
                async move { Ok::<_, Infallible>(proxy::handle(app, peer, req).await) }
            }));
        BoxCloneSyncService::new(svc)
    }
}

/// Rescue, outermost: the only error the layers produce is a shed request; it becomes the one
/// 503 response defined in `error.rs`, so clients never see a reset for overload. Applied by the
/// hyper adapter (`server::serve`) rather than as a tower layer because tower's map layers need
/// an output error `From<BoxError>`, and hyper wants a concrete error type there.
pub fn rescue(result: Result<Response<Body>, BoxError>, app: &AppState) -> Response<Body> {
    result.unwrap_or_else(|_overloaded| {
        app.metrics.requests.inc();
        app.metrics.shed.inc();
        let mut resp = ProxyError::Overloaded.to_response();
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), app.request_ids.next());
        resp
    })
}
