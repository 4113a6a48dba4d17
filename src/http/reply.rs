//! Small answers the gateway writes itself (admin endpoints, the webhook): never cached by
//! anyone (`Cache-Control: no-store`), with their content type.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, Body};

/// A plain-text answer.
pub fn text(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    with_type(status, text.into(), "text/plain; charset=utf-8")
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    with_type(status, Bytes::from(value.to_string()), "application/json")
}

/// `{"error": message}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn with_type(status: StatusCode, bytes: Bytes, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(body::full(bytes));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
