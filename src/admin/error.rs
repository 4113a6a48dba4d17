//! The admin listener's one error → response mapping: every refusal of the admin API (and of
//! `/login`) is an [`ApiError`], answered by [`ApiError::to_response`] as `{"error": …}` with
//! its status (JSON, so `isrgate` commands and scripts read one shape). The webhook on this
//! listener answers `crate::invalidate::Error`'s, as on the public one.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::http::body::Body;

/// Why the admin API refused a call, or could not do it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 403: no token configured, so everything but health is off.
    #[error(
        "the admin API is off: set ISRGATE_ADMIN_TOKEN to enable the dashboard, /metrics and /api"
    )]
    Off,
    /// 401 (with `WWW-Authenticate: Bearer`): no or a wrong token.
    #[error("send Authorization: Bearer <ISRGATE_ADMIN_TOKEN>")]
    Unauthorized,
    /// 404: no such path, or nothing there (the cache is off).
    #[error("{0}")]
    NotFound(&'static str),
    /// 405.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 413: the body is over the endpoint's bound.
    #[error("{0}")]
    TooLarge(String),
    /// 400: the body or query cannot be used; says why.
    #[error("{0}")]
    BadRequest(String),
    /// 409: the call does not fit the state (a build with no live replica, no file to reload).
    #[error("{0}")]
    Conflict(String),
    /// 422: well-formed but invalid, with every problem (a configuration that does not load).
    #[error("{error}")]
    Invalid {
        /// The whole message.
        error: String,
        /// One line per problem.
        problems: Vec<String>,
    },
    /// 503: what it needs is unavailable (Redis, the reload loop).
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Off => StatusCode::FORBIDDEN,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `{"error": message}` (and `problems` for [`ApiError::Invalid`]) with the status.
    pub fn to_response(&self) -> Response<Body> {
        let body = match self {
            ApiError::Invalid { error, problems } => {
                serde_json::json!({ "error": error, "problems": problems })
            }
            other => serde_json::json!({ "error": other.to_string() }),
        };
        let mut r = crate::http::reply::json(self.status(), &body);
        if *self == ApiError::Unauthorized {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_json_with_its_status() {
        let r = ApiError::Unauthorized.to_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = ApiError::Invalid {
            error: "nothing changed".into(),
            problems: vec!["listen.addr: bad".into()],
        }
        .to_response();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(ApiError::Off.status(), StatusCode::FORBIDDEN);
    }
}
