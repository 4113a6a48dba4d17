//! The admin listener: a separate address (loopback by default) for operators, orchestrators
//! and Prometheus. It must never share the public listener's limits or fate: a flood of client
//! traffic must not make the orchestrator believe the gateway is dead.
//!
//! | path | auth | what |
//! |---|---|---|
//! | `GET /healthz` | none | the process is up (liveness: it stays 200 while draining) |
//! | `GET /readyz` | none | ready for traffic: started, not stopping, invalidations loaded once (with Redis up), and with the cache off a healthy replica; replicas all down with the cache on is still ready (the cache serves stale); `degraded` when Redis is down (still ready) |
//! | `POST /_isrgate/revalidate` | webhook secret | the revalidation webhook, as on the public listener |
//! | `GET /` | token | the dashboard ([`DASHBOARD`], embedded) |
//! | `GET /metrics` | token (`admin.metrics_auth`: or none from loopback, or none) | Prometheus, text 0.0.4 or OpenMetrics by `Accept` ([`prometheus`]) |
//! | `GET /api/stats` | token | the dashboard's data ([`stats`]) |
//! | `GET /api/log` | token | the revalidation log |
//! | `GET /api/inspect?url=…` | token | what the cache holds for a URL, per variant ([`inspect`]) |
//! | `POST /api/purge` | token | the dashboard's purge form: the webhook's path, authenticated by the token |
//! | `POST /api/deploy` | token | `{"current":"<build>"}` makes a build current on every gateway and keeps it so; `{"auto":true}` hands the choice back to the rollout |
//! | `POST /login` | form | exchanges the token for a session cookie (browsers) |
//!
//! The token is `ISRGATE_ADMIN_TOKEN`: `Authorization: Bearer <token>` or the `isrgate_admin`
//! cookie set by `/login` (a value derived from the token, HttpOnly, SameSite=Strict, one day). Without it configured, the token-guarded
//! paths answer 403 and say how to enable them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

pub use error::ApiError;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod client;
pub mod commands;
mod error;
pub mod fleet;
pub mod history;
pub mod inspect;
pub mod prometheus;
pub mod stats;

use crate::app::AppState;
use crate::config::MetricsAuth;
use crate::http::body::Body;

/// The dashboard page: HTML, CSS and JS in one file, no external assets.
pub const DASHBOARD: &str = include_str!("dashboard.html");

/// The session cookie's name.
const COOKIE: &str = "isrgate_admin";
/// Connections the admin listener serves at once.
const ADMIN_MAX_CONNECTIONS: usize = 256;
/// Bound on reading a request head (and on an idle keep-alive connection) on the admin port.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin endpoints until `drain`.
pub(crate) async fn serve(app: Arc<AppState>, listener: TcpListener, drain: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Bounds of their own: a slow or idle client on this port must not pile up connections
    // (the process's file descriptors are shared with the public listener).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(ADMIN_HEADER_TIMEOUT);
    let builder = Arc::new(builder);
    let connections = Arc::new(tokio::sync::Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let history = Arc::new(stats::History::default());
    history.start(Arc::clone(&app.metrics));
    loop {
        let stream = tokio::select! {
            _ = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (stream, peer) = stream;
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            drop(stream); // over the cap: refuse rather than queue
            continue;
        };
        let (app, builder, history) =
            (Arc::clone(&app), Arc::clone(&builder), Arc::clone(&history));
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let (app, history) = (Arc::clone(&app), Arc::clone(&history));
                async move { Ok::<_, Infallible>(route(&app, &history, peer, req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn route(
    app: &Arc<AppState>,
    history: &stats::History,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    match (&method, path.as_str()) {
        (_, crate::invalidate::PATH) => {
            let (head, body) = req.into_parts();
            // The peer itself: nothing on this listener vouches for forwarding headers.
            let source = peer.ip().to_string();
            return crate::invalidate::handle(app, head, body, &source).await;
        }
        (&Method::GET | &Method::HEAD, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => return readyz(app),
        (&Method::POST, "/login") => return login(app, req).await,
        (&Method::GET, "/metrics") if metrics_open(app, peer) => {
            return metrics(app, req.headers());
        }
        _ => {}
    }
    let config = app.config.load_full();
    let Some(token) = config.admin.as_ref().and_then(|a| a.token.as_deref()) else {
        return ApiError::Off.to_response();
    };
    if !authorized(req.headers(), token) {
        if path == "/" && method == Method::GET {
            return html(StatusCode::UNAUTHORIZED, LOGIN);
        }
        return ApiError::Unauthorized.to_response();
    }
    match (&method, path.as_str()) {
        (&Method::GET, "/") => html(StatusCode::OK, DASHBOARD),
        (&Method::GET, "/metrics") => metrics(app, req.headers()),
        (&Method::GET, "/api/stats") => json(StatusCode::OK, &stats::stats(app, history).await),
        (&Method::GET, "/api/log") => revalidation_log(app).await,
        (&Method::GET, "/api/inspect") => match inspect::answer(app, req.uri().query()).await {
            Ok(body) => json(StatusCode::OK, &body),
            Err(e) => e.to_response(),
        },
        (&Method::POST, "/api/purge") => purge(app, req).await,
        (&Method::POST, "/api/deploy") => choose_build(app, req).await,
        (&Method::POST, "/api/reload") => reload(app).await,
        (&Method::GET, "/api/tail") => tail(app, req.uri().query()),
        (&Method::GET, "/api/fleet") => json(StatusCode::OK, &fleet::answer(app)),
        (
            _,
            "/" | "/metrics" | "/api/stats" | "/api/log" | "/api/purge" | "/api/deploy"
            | "/api/inspect" | "/api/reload" | "/api/tail" | "/api/fleet",
        ) => ApiError::MethodNotAllowed.to_response(),
        _ => ApiError::NotFound("not found").to_response(),
    }
}

/// Whether `peer` may read `/metrics` without the token (`admin.metrics_auth`).
fn metrics_open(app: &AppState, peer: SocketAddr) -> bool {
    open_to(app.config().admin.as_ref().map(|a| a.metrics_auth), peer)
}

/// [`metrics_open`] for a setting: loopback is 127.0.0.0/8, `::1`, and IPv4 loopback mapped
/// into IPv6 (a dual-stack listener's view of 127.0.0.1).
fn open_to(auth: Option<MetricsAuth>, peer: SocketAddr) -> bool {
    match auth {
        Some(MetricsAuth::None) => true,
        Some(MetricsAuth::Loopback) => peer.ip().to_canonical().is_loopback(),
        Some(MetricsAuth::Token) | None => false,
    }
}

/// `GET /metrics`, in the format `Accept` asks for ([`prometheus::negotiate`]).
fn metrics(app: &Arc<AppState>, headers: &HeaderMap) -> Response<Body> {
    let format = prometheus::negotiate(headers.get(header::ACCEPT));
    let mut r = text(StatusCode::OK, prometheus::render(app, format));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r
}

/// Whether the request carries the token (bearer or session cookie), compared in constant time.
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(COOKIE)
                .and_then(|c| c.strip_prefix('='))
        });
    let want = Sha256::digest(token.as_bytes());
    let bearer_ok = bearer
        .is_some_and(|given| bool::from(Sha256::digest(given.trim().as_bytes()).ct_eq(&want)));
    let session = session_value(token);
    let cookie_ok =
        cookie.is_some_and(|given| bool::from(given.trim().as_bytes().ct_eq(session.as_bytes())));
    bearer_ok || cookie_ok
}

/// The session cookie's value: derived from the token ([`derive`]), so the browser never holds
/// the token itself; rotating the token ends every session.
fn session_value(token: &str) -> String {
    derive(token, "isrgate admin session v1")
}

/// The debug token (`x-isrgate-debug-token`, `proxy::debug`; `isrgate debug-token` prints it):
/// derived from the admin token ([`derive`]), so the admin token never travels on the public
/// listener, the debug token grants nothing but the debug header, and rotating the admin token
/// revokes it.
pub fn debug_token(admin_token: &str) -> String {
    derive(admin_token, "isrgate debug v1")
}

/// A credential derived from the admin token for one use: HMAC-SHA256 of `label` keyed by the
/// token, in lower-case hex.
fn derive(token: &str, label: &str) -> String {
    use hmac::{Hmac, Mac};
    use std::fmt::Write as _;
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(label.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .fold(String::with_capacity(64), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}

/// Why `/readyz` says no (the first that holds, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unready {
    /// The start-up look (replicas' builds, the fleet's current build) is not done.
    Starting,
    /// A shutdown was asked: accepting for `listen.accept_grace` still, or draining.
    Draining,
    /// Redis is up but the fleet's invalidations were never loaded: no shared entry is served
    /// yet, every request would be a render.
    LoadingInvalidations,
    /// The cache is off and no replica is healthy: nothing could be served.
    NoReplica,
}

impl Unready {
    /// The reason's word (`/readyz`'s `reason`).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Unready::Starting => "starting",
            Unready::Draining => "draining",
            Unready::LoadingInvalidations => "loading_invalidations",
            Unready::NoReplica => "no_healthy_replica",
        }
    }
}

/// `/readyz`: whether this gateway can usefully take new traffic. Replicas do not decide it
/// while the cache is on: with every replica down the cache still answers (stale-if-error),
/// and a probe that failed then would take every gateway out of the Service at once, exactly
/// when the cache could hide the outage (readiness must not follow a dependency all gateways
/// share). Redis down is `degraded`, still ready: the L1 and the replicas serve. Only the
/// first invalidation load gates readiness; later reloads (a bus reconnect) do not, so a Redis
/// blip never empties the fleet's endpoints.
fn readyz(app: &AppState) -> Response<Body> {
    let r = readiness(app);
    let status = match r.unready {
        None => StatusCode::OK,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    json(
        status,
        &serde_json::json!({
            "ready": r.unready.is_none(),
            "reason": r.unready.map(Unready::as_str),
            "started": r.started,
            "draining": r.stopping,
            "accepting": r.started && !app.draining.is_cancelled(),
            "replicas_healthy": r.healthy,
            "replicas": r.total,
            "cache": if app.cache.is_some() { "on" } else { "off" },
            "redis": r.redis.as_str(),
            "invalidations": if r.loading { "loading" } else { "loaded" },
        }),
    )
}

/// What `/readyz` says, and what it is made of (the fleet view shows it too).
pub(crate) struct Readiness {
    /// Why not ready; `None`: ready.
    pub unready: Option<Unready>,
    /// Healthy replicas.
    pub healthy: usize,
    /// Replicas known.
    pub total: usize,
    /// Redis as `/readyz` reports it.
    pub redis: RedisState,
    /// The first invalidation load is still to come.
    pub loading: bool,
    /// The start-up look is done.
    pub started: bool,
    /// A shutdown was asked.
    pub stopping: bool,
}

/// This gateway's readiness now (see [`readyz`]).
pub(crate) fn readiness(app: &AppState) -> Readiness {
    let (healthy, total) = app
        .upstream
        .replicas()
        .with(|list| (list.iter().filter(|r| r.is_healthy()).count(), list.len()));
    let (redis, loading) = redis_state(app);
    let started = *app.started.borrow();
    let stopping = app.stopping.is_cancelled();
    let unready = unready(app);
    Readiness {
        unready,
        healthy,
        total,
        redis,
        loading,
        started,
        stopping,
    }
}

/// Why this gateway is not ready for traffic, if it is not (the first reason that holds):
/// what `/readyz` answers, and `isrgate_ready`.
pub(crate) fn unready(app: &AppState) -> Option<Unready> {
    let (_, loading) = redis_state(app);
    if !*app.started.borrow() {
        Some(Unready::Starting)
    } else if app.stopping.is_cancelled() {
        Some(Unready::Draining)
    } else if loading {
        Some(Unready::LoadingInvalidations)
    } else if app.cache.is_none()
        && !app
            .upstream
            .replicas()
            .with(|l| l.iter().any(|r| r.is_healthy()))
    {
        Some(Unready::NoReplica)
    } else {
        None
    }
}

/// Redis as `/readyz` and the dashboard report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisState {
    /// Connected, breaker closed.
    Ok,
    /// Down, or its circuit breaker is open: the L1 and the replicas serve.
    Degraded,
    /// Not configured (the in-process store, or the cache is off).
    None,
}

impl RedisState {
    /// `ok`, `degraded`, `none`.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisState::Ok => "ok",
            RedisState::Degraded => "degraded",
            RedisState::None => "none",
        }
    }
}

/// Redis now, and whether the first invalidation load is still to come (Redis up, never
/// loaded: just started).
fn redis_state(app: &AppState) -> (RedisState, bool) {
    let Some(cache) = app.cache.as_ref() else {
        return (RedisState::None, false);
    };
    match cache.shared() {
        Some(shared) => {
            let down = shared.breaker_open() || !shared.is_connected();
            let loading = !down && !cache.epochs.was_ever_synced();
            let state = if down {
                RedisState::Degraded
            } else {
                RedisState::Ok
            };
            (state, loading)
        }
        None => (RedisState::None, false),
    }
}

/// `POST /login` with a form `token=…`: sets the session cookie and goes to the dashboard.
async fn login(app: &AppState, req: Request<Incoming>) -> Response<Body> {
    let config = app.config.load_full();
    let Some(token) = config.admin.as_ref().and_then(|a| a.token.as_deref()) else {
        return ApiError::Off.to_response();
    };
    let Ok(form) = Limited::new(req.into_body(), 4_096).collect().await else {
        return ApiError::TooLarge("form over 4 KiB".into()).to_response();
    };
    let form = form.to_bytes();
    let given = form_value(&form, "token").unwrap_or_default();
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {given}")).unwrap_or(HeaderValue::from_static("")),
    );
    if !authorized(&h, token) {
        return html(StatusCode::UNAUTHORIZED, LOGIN);
    }
    let mut r = text(StatusCode::SEE_OTHER, "");
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/"));
    let session = session_value(token);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age=86400"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn form_value(form: &[u8], name: &str) -> Option<String> {
    std::str::from_utf8(form).ok()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// `POST /api/purge` (the dashboard's form): JSON like the webhook's, checked by the same
/// rules and applied by the same code.
/// `POST /api/deploy`: an operator's choice of the current build (`crate::deploy`).
async fn choose_build(app: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    match chosen(app, req).await {
        Ok(()) => json(
            StatusCode::OK,
            &serde_json::to_value(app.deploy.status.snapshot()).unwrap_or_default(),
        ),
        Err(e) => e.to_response(),
    }
}

async fn chosen(app: &Arc<AppState>, req: Request<Incoming>) -> Result<(), ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Choice {
        current: Option<String>,
        #[serde(default)]
        auto: bool,
    }
    let raw = Limited::new(req.into_body(), 4096)
        .collect()
        .await
        .map_err(|_| ApiError::TooLarge("body over 4 KiB".into()))?
        .to_bytes();
    let choice: Choice = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::BadRequest(format!(
            "expected {{\"current\":\"<build>\"}} or {{\"auto\":true}}: {e}"
        ))
    })?;
    let done = match (choice.current, choice.auto) {
        (Some(build), false) => app.deploy.choose(&build, true).await,
        (None, true) => app.deploy.release().await,
        _ => {
            let both = "send exactly one of \"current\" and \"auto\": true";
            return Err(ApiError::BadRequest(both.into()));
        }
    };
    done.map_err(|e| match e {
        crate::deploy::ChoiceError::NotLive { .. } => ApiError::Conflict(e.to_string()),
        e => ApiError::Unavailable(e.to_string()),
    })
}

/// `POST /api/purge`: the webhook's body, run as the webhook runs it (same report, same
/// errors), with the token instead of the webhook's secret.
async fn purge(app: &Arc<AppState>, req: Request<Incoming>) -> Response<Body> {
    match purged(app, req).await {
        Ok(report) => json(StatusCode::OK, &report.to_value()),
        Err(e) => e.to_response(),
    }
}

async fn purged(
    app: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<crate::invalidate::Report, crate::invalidate::Error> {
    use crate::invalidate::Error;
    let cache = app.cache.as_ref().ok_or(Error::CacheDisabled)?;
    let (head, body) = req.into_parts();
    let max = app.config().webhook.max_body_bytes;
    let raw: Bytes = match Limited::new(body, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(Error::TooLarge(max)),
        Err(e) => return Err(Error::Body(e.to_string())),
    };
    let revalidation =
        crate::invalidate::webhook::parse(&raw, None).map_err(|rejected| Error::Refused {
            rejected,
            allow_get: false,
        })?;
    // The admin listener's own Host is not the site's: re-warm needs the public host, which
    // the form sends; without it nothing is re-warmed.
    let host = head
        .headers
        .get("x-isrgate-public-host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut revalidation = revalidation;
    revalidation.rewarm &= !host.is_empty();
    // The log says where it came from: `isrgate purge`, the dashboard's form, or a script.
    let source = match head
        .headers
        .get("x-isrgate-client")
        .map(HeaderValue::as_bytes)
    {
        Some(b"cli") => "cli",
        Some(b"dashboard") => "dashboard",
        _ => "admin-api",
    };
    crate::invalidate::run(app, cache, &revalidation, &host, source).await
}

/// `POST /api/reload`: the configuration read again and applied (`crate::reload`): 200 with
/// what changed and what needs a restart, 422 with every problem when it is invalid (nothing
/// changed).
async fn reload(app: &AppState) -> Response<Body> {
    use crate::reload::ReloadError;
    let e = match app.reloads.reload().await {
        Ok(report) => {
            return json(
                StatusCode::OK,
                &serde_json::to_value(report).unwrap_or_default(),
            );
        }
        Err(ReloadError::Invalid(e)) => {
            let problems = e.to_string();
            ApiError::Invalid {
                error: format!("nothing changed, the running configuration stays: {problems}"),
                problems: problems
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect(),
            }
        }
        Err(e @ ReloadError::NoSource) => ApiError::Conflict(e.to_string()),
        Err(e @ ReloadError::NotRunning) => ApiError::Unavailable(e.to_string()),
    };
    e.to_response()
}

/// `GET /api/tail?status=5xx&path=/blog/*&outcome=miss`: this gateway's requests as they
/// are answered, one JSON object a line, until the client goes away (`logging::tail`).
fn tail(app: &AppState, query: Option<&str>) -> Response<Body> {
    let filter = match crate::logging::tail::Filter::parse(query.unwrap_or("")) {
        Ok(f) => f,
        Err(e) => return ApiError::BadRequest(e.to_string()).to_response(),
    };
    let following = app.access.tail().follow(filter);
    let mut r = Response::new(following.into_body(app.stopping.clone()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /api/log`: the newest revalidations, newest first (JSON array).
async fn revalidation_log(app: &AppState) -> Response<Body> {
    let Some(cache) = &app.cache else {
        return ApiError::NotFound("the cache is disabled").to_response();
    };
    match cache.log.recent(cache.redis(), 100).await {
        Ok(records) => json(StatusCode::OK, &serde_json::Value::from(records)),
        Err(e) => ApiError::Unavailable(format!("log unavailable: {e}")).to_response(),
    }
}

const LOGIN: &str = r#"<!doctype html><html lang="en"><meta charset="utf-8"><title>isrgate — sign in</title>
<style>body{font:15px system-ui,sans-serif;background:#0f172a;color:#e2e8f0;display:grid;place-items:center;height:100vh;margin:0}
form{background:#1e293b;padding:2rem;border-radius:10px;display:grid;gap:.8rem;min-width:320px}
input,button{font:inherit;padding:.5rem;border-radius:6px;border:1px solid #475569;background:#0f172a;color:inherit}
button{background:#2563eb;border:0;cursor:pointer}</style>
<form method="post" action="/login"><h2>isrgate admin</h2><label>Admin token (ISRGATE_ADMIN_TOKEN)<br>
<input type="password" name="token" autofocus required></label><button type="submit">Sign in</button></form></html>"#;

fn html(status: StatusCode, page: &'static str) -> Response<Body> {
    let mut r = text(status, page);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static("default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    r
}

use crate::http::reply::{json, text};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_open_only_as_configured() {
        let peer = |a: &str| a.parse::<SocketAddr>().expect("test");
        let (local, mapped, v6) = (
            peer("127.0.0.9:1"),
            peer("[::ffff:127.0.0.1]:1"),
            peer("[::1]:1"),
        );
        let remote = peer("10.1.2.3:1");
        for p in [local, mapped, v6, remote] {
            assert!(!open_to(Some(MetricsAuth::Token), p), "{p}");
            assert!(!open_to(None, p), "{p}");
            assert!(open_to(Some(MetricsAuth::None), p), "{p}");
        }
        for p in [local, mapped, v6] {
            assert!(open_to(Some(MetricsAuth::Loopback), p), "{p}");
        }
        assert!(!open_to(Some(MetricsAuth::Loopback), remote));
        assert!(!open_to(
            Some(MetricsAuth::Loopback),
            peer("[::ffff:10.1.2.3]:1")
        ));
    }

    #[test]
    fn the_debug_token_opens_nothing_on_the_admin_listener() {
        let debug = debug_token("t0ken");
        assert_eq!(debug.len(), 64, "{debug}");
        assert_ne!(debug, session_value("t0ken"));
        for (name, value) in [
            (header::AUTHORIZATION, format!("Bearer {debug}")),
            (header::COOKIE, format!("{COOKIE}={debug}")),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_str(&value).expect("value"));
            assert!(!authorized(&headers, "t0ken"), "{value}");
        }
    }
}
