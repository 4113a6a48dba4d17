//! The one mapping from an error to what the client sees.
//!
//! Each error knows its side (who is at fault) and its status; the body is a short fixed text
//! with no internal detail (no replica address, no upstream message). The detail goes to the log,
//! once, where the request is finished (`proxy::handle`).

use http::{Response, StatusCode, header};

use crate::http::body::{self, Body};
use crate::proxy::sanitize::Rejection;
use crate::upstream::UpstreamError;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something we refuse.
    Client,
    /// A replica failed or is unreachable.
    Upstream,
    /// The gateway itself (overload).
    Gateway,
}

/// Why a request got an error response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Refused by sanitizing (internal path, ambiguous path, CONNECT).
    #[error("refused: {}", .0.as_str())]
    Rejected(Rejection),
    /// Request body over `listen.max_body_bytes`.
    #[error("request body over the limit")]
    BodyTooLarge,
    /// At the concurrency limit.
    #[error("overloaded: concurrency limit reached")]
    Overloaded,
    /// A protocol upgrade the gateway cannot carry (e.g. over HTTP/2).
    #[error("upgrade not supported here")]
    UpgradeUnsupported,
    /// Upstream failure.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A cache entry whose body did not inflate. The cache driver answers it as a miss
    /// (`proxy::cached`); it reaches no client unless a bug lets it through, and then it is
    /// the gateway's fault.
    #[error("a cache entry did not inflate")]
    CorruptEntry,
}

impl ProxyError {
    /// Who is at fault.
    pub fn side(&self) -> Side {
        match self {
            ProxyError::Rejected(_)
            | ProxyError::BodyTooLarge
            | ProxyError::UpgradeUnsupported
            | ProxyError::Upstream(
                UpstreamError::BodyTooLarge
                | UpstreamError::ClientBody(_)
                | UpstreamError::ClientBodyStalled,
            ) => Side::Client,
            ProxyError::Overloaded | ProxyError::CorruptEntry => Side::Gateway,
            ProxyError::Upstream(_) => Side::Upstream,
        }
    }

    /// The status and the short text the client gets.
    fn status_and_text(&self) -> (StatusCode, &'static str) {
        use UpstreamError as U;
        match self {
            ProxyError::Rejected(Rejection::InternalPath) => (StatusCode::NOT_FOUND, "Not Found\n"),
            ProxyError::Rejected(Rejection::AmbiguousPath) => {
                (StatusCode::BAD_REQUEST, "Bad Request: ambiguous path\n")
            }
            ProxyError::Rejected(Rejection::BadHost) => (
                StatusCode::BAD_REQUEST,
                "Bad Request: one Host header, host[:port], is required\n",
            ),
            ProxyError::Rejected(Rejection::Trace) => {
                (StatusCode::METHOD_NOT_ALLOWED, "TRACE is not supported\n")
            }
            ProxyError::Rejected(Rejection::UnknownMethod) => {
                (StatusCode::NOT_IMPLEMENTED, "Method not implemented\n")
            }
            ProxyError::Rejected(Rejection::AsteriskForm) => (
                StatusCode::BAD_REQUEST,
                "Bad Request: OPTIONS * is not forwarded\n",
            ),
            ProxyError::Rejected(Rejection::Connect) => {
                (StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n")
            }
            ProxyError::BodyTooLarge | ProxyError::Upstream(U::BodyTooLarge) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "Request body too large\n")
            }
            ProxyError::Upstream(U::ClientBodyStalled) => (
                StatusCode::REQUEST_TIMEOUT,
                "Request Timeout: the request body stalled\n",
            ),
            ProxyError::Upstream(U::ClientBody(_)) => {
                (StatusCode::BAD_REQUEST, "Bad Request: request body\n")
            }
            ProxyError::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Service overloaded, retry shortly\n",
            ),
            ProxyError::UpgradeUnsupported => (
                StatusCode::NOT_IMPLEMENTED,
                "Upgrade not supported on this connection\n",
            ),
            ProxyError::Upstream(U::Timeout { .. } | U::Stalled { .. }) => {
                (StatusCode::GATEWAY_TIMEOUT, "Upstream timed out\n")
            }
            ProxyError::Upstream(_) => (StatusCode::BAD_GATEWAY, "Upstream unavailable\n"),
            ProxyError::CorruptEntry => {
                (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error\n")
            }
        }
    }

    /// The response: status, a short plain-text body, no detail.
    pub fn to_response(&self) -> Response<Body> {
        let (status, text) = self.status_and_text();
        let mut resp = Response::new(body::full(text));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}
