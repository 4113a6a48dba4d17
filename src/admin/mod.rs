//! The admin listener: a separate address (loopback by default) for operators and
//! orchestrators. Now: `/healthz` (the process is up), `/readyz` (at least one replica is
//! eligible for traffic and the gateway is not draining), the revalidation webhook
//! (`POST /_isrgate/revalidate`, as on the public listener) and its log (`GET /api/log`). The
//! dashboard, stats API and Prometheus metrics join it later.
//!
//! It must never share the public listener's limits or fate: a flood of client traffic must not
//! make the orchestrator believe the gateway is dead.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::http::body::{self, Body};

/// Serves the admin endpoints until `drain`.
pub(crate) async fn serve(app: Arc<AppState>, listener: TcpListener, drain: CancellationToken) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let stream = tokio::select! {
            _ = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (app, builder) = (Arc::clone(&app), Arc::clone(&builder));
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = Arc::clone(&app);
                async move {
                    if req.uri().path() == crate::invalidate::PATH {
                        let (head, body) = req.into_parts();
                        return Ok::<_, Infallible>(
                            crate::invalidate::handle(&app, head, body).await,
                        );
                    }
                    if req.uri().path() == "/api/log" && req.method() == Method::GET {
                        return Ok(revalidation_log(&app).await);
                    }
                    Ok(route(&app, &req))
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn route(app: &AppState, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (healthy, total) = app
                .upstream
                .replicas()
                .with(|list| (list.iter().filter(|r| r.is_healthy()).count(), list.len()));
            let draining = app.draining.is_cancelled();
            let ready = healthy > 0 && !draining;
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = format!(
                "{{\"ready\":{ready},\"draining\":{draining},\"replicas_healthy\":{healthy},\"replicas\":{total}}}\n"
            );
            let mut r = text(status, body);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /api/log`: the newest revalidations, newest first (JSON array).
async fn revalidation_log(app: &AppState) -> Response<Body> {
    let Some(cache) = &app.cache else {
        return text(StatusCode::NOT_FOUND, "the cache is disabled\n");
    };
    let mut r = match cache.log.recent(&cache.store, 100).await {
        Ok(records) => text(StatusCode::OK, serde_json::Value::from(records).to_string()),
        Err(e) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": format!("log unavailable: {e}") }).to_string(),
        ),
    };
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}
