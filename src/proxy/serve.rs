//! Step 11 of the request flow for cached answers: an [`Entry`] → the client's response.
//!
//! Receives a stored entry and the request's conditional and encoding headers; hands on a
//! response: the stored status and headers, our own `Age`, RFC 9211 `Cache-Status`, `x-cache`
//! (for humans), a strong `ETag` with `304 Not Modified` on a matching `If-None-Match`, and the
//! body as the stored gzip bytes to clients that accept gzip (no CPU on the hit path) or
//! inflated for the rest. HEAD gets the headers of the GET entry and no body.
//!
//! It must not change what is stored, and never serves a body it could not inflate (the caller
//! then treats the entry as corrupt and goes upstream).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::cache::entry::Entry;
use crate::http::body::{self, Body};

/// `x-cache`.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How a response relates to the cache; feeds `x-cache`, `Cache-Status`, logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Fresh from the cache.
    Hit,
    /// Went upstream; `stored` says whether the answer was kept.
    Miss {
        /// Stored for later requests.
        stored: bool,
    },
    /// Stale, served while a refresh runs (stale-while-revalidate).
    Stale,
    /// Stale, served because the replicas failed (stale-if-error).
    StaleIfError,
    /// Not a cache candidate.
    Bypass,
    /// Missed, and waited for another request's render (here or on another gateway) instead
    /// of rendering (RFC 9211 `collapsed`).
    Collapsed,
}

impl Outcome {
    /// The `x-cache` value.
    pub fn x_cache(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss { .. } | Outcome::Collapsed => "MISS",
            Outcome::Stale | Outcome::StaleIfError => "STALE",
            Outcome::Bypass => "BYPASS",
        }
    }

    /// The `Cache-Status` member (RFC 9211 §2).
    pub fn cache_status(self) -> &'static str {
        match self {
            Outcome::Hit => "isrgate; hit",
            Outcome::Miss { stored: true } => "isrgate; fwd=miss; stored",
            Outcome::Miss { stored: false } => "isrgate; fwd=miss",
            Outcome::Stale => "isrgate; hit; fwd=stale; detail=stale-while-revalidate",
            Outcome::StaleIfError => "isrgate; hit; detail=stale-if-error",
            Outcome::Bypass => "isrgate; fwd=bypass",
            Outcome::Collapsed => "isrgate; fwd=miss; collapsed",
        }
    }
}

/// Sets `x-cache` and `Cache-Status`.
pub fn mark(headers: &mut HeaderMap, outcome: Outcome) {
    headers.insert(X_CACHE.clone(), HeaderValue::from_static(outcome.x_cache()));
    headers.insert(
        CACHE_STATUS.clone(),
        HeaderValue::from_static(outcome.cache_status()),
    );
}

/// What of the request matters for answering from an entry.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The request's headers (Accept-Encoding, If-None-Match).
    pub headers: &'a HeaderMap,
    /// HEAD: no body.
    pub head: bool,
}

/// The response for `entry`, or `None` when the client needs the identity body and the stored
/// gzip does not inflate (a corrupt entry).
pub fn response(
    entry: &Entry,
    ask: Ask<'_>,
    outcome: Outcome,
    now_ms: u64,
) -> Option<Response<Body>> {
    let meta = &entry.meta;
    let status = StatusCode::from_u16(meta.status).ok()?;
    let mut headers = HeaderMap::with_capacity(meta.headers.len() + 8);
    for (name, value) in &meta.headers {
        headers.append(name.clone(), value.clone());
    }
    let gzip = accepts_gzip(ask.headers) && !entry.gzip.is_empty();
    // Two encodings of one entry are two representations: each gets its own strong ETag
    // (RFC 9110 §8.8.3).
    let etag = if gzip {
        gzip_etag(&meta.etag)
    } else {
        meta.etag.clone()
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    let age = now_ms.saturating_sub(meta.stored_at_ms) / 1000;
    headers.insert(header::AGE, HeaderValue::from(age));
    mark(&mut headers, outcome);
    add_vary_accept_encoding(&mut headers);

    if status == StatusCode::OK && if_none_match(ask.headers, &etag) {
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        headers.remove(header::CONTENT_TYPE);
        *resp.headers_mut() = headers;
        return Some(resp);
    }
    let bytes: Bytes = if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        entry.gzip.clone()
    } else if entry.gzip.is_empty() {
        Bytes::new()
    } else {
        entry.identity().ok()?
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    let mut resp = Response::new(if ask.head {
        body::empty()
    } else {
        body::full(bytes)
    });
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Some(resp)
}

/// The strong ETag of the gzip encoding: the identity ETag with `-gz` inside the quotes.
pub fn gzip_etag(identity: &str) -> String {
    match identity.strip_suffix('"') {
        Some(open) if !open.is_empty() => format!("{open}-gz\""),
        _ => format!("{identity}-gz"),
    }
}

/// The same entry is served gzip-encoded or not depending on `Accept-Encoding`: browsers'
/// caches must know.
pub fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding") || t.trim() == "*");
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// `If-None-Match` against an ETag (weak comparison, RFC 9110 §13.1.2; `*` matches).
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

/// Whether `Accept-Encoding` allows gzip: `gzip`, `x-gzip` or `*` with a q-value above 0.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut star = None;
    for item in headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .filter_map(|q| q.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            return q > 0.0;
        }
        if coding == "*" {
            star = Some(q > 0.0);
        }
    }
    star.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::Meta;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    fn entry() -> Entry {
        let meta = Meta {
            status: 200,
            headers: vec![
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                ),
                (
                    header::VARY,
                    HeaderValue::from_static("RSC, Next-Router-State-Tree"),
                ),
            ],
            render_epoch: 0,
            stored_at_ms: 10_000,
            fresh_until_ms: 70_000,
            stale_until_ms: 100_000,
            stale_if_error_until_ms: 100_000,
            tags: Vec::new(),
            etag: String::new(),
            identity_len: 0,
        };
        Entry::from_identity(meta, b"<html>hello</html>")
    }

    async fn bytes(r: Response<Body>) -> Bytes {
        http_body_util::BodyExt::collect(r.into_body())
            .await
            .expect("body")
            .to_bytes()
    }

    #[tokio::test]
    async fn gzip_clients_get_the_stored_bytes_others_the_identity_body() {
        let e = entry();
        let ask = |hs| Ask {
            headers: hs,
            head: false,
        };
        let gz = h(&[("accept-encoding", "gzip, deflate, br")]);
        let r = response(&e, ask(&gz), Outcome::Hit, 12_500).expect("served");
        assert_eq!(r.headers()["content-encoding"], "gzip");
        assert_eq!(r.headers()["age"], "2");
        assert_eq!(r.headers()["x-cache"], "HIT");
        assert_eq!(r.headers()["cache-status"], "isrgate; hit");
        assert_eq!(r.headers()["etag"], gzip_etag(&e.meta.etag).as_str());
        assert_ne!(
            r.headers()["etag"],
            e.meta.etag.as_str(),
            "one validator per encoding"
        );
        assert_eq!(bytes(r).await, e.gzip, "byte for byte what is stored");
        let plain = h(&[("accept-encoding", "gzip;q=0, identity")]);
        let r = response(&e, ask(&plain), Outcome::Hit, 12_500).expect("served");
        assert!(r.headers().get("content-encoding").is_none());
        assert_eq!(r.headers()["content-length"], "18");
        let vary: Vec<_> = r.headers().get_all("vary").iter().collect();
        assert_eq!(vary, ["RSC, Next-Router-State-Tree", "Accept-Encoding"]);
        assert_eq!(bytes(r).await, "<html>hello</html>");
    }

    #[tokio::test]
    async fn if_none_match_gets_304_and_head_gets_no_body() {
        let e = entry();
        let inm = h(&[("if-none-match", &format!("W/{}", e.meta.etag))]);
        let r = response(
            &e,
            Ask {
                headers: &inm,
                head: false,
            },
            Outcome::Hit,
            0,
        )
        .expect("served");
        assert_eq!(r.status(), 304);
        assert_eq!(r.headers()["etag"], e.meta.etag.as_str());
        assert!(bytes(r).await.is_empty());
        let none = h(&[]);
        let r = response(
            &e,
            Ask {
                headers: &none,
                head: true,
            },
            Outcome::Hit,
            0,
        )
        .expect("served");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], "18");
        assert!(bytes(r).await.is_empty());
    }

    #[test]
    fn accept_encoding_forms() {
        for (v, want) in [
            ("gzip", true),
            ("GZIP;q=0.5", true),
            ("x-gzip", true),
            ("*", true),
            ("br, *;q=0", false),
            ("gzip;q=0", false),
            ("identity", false),
            ("br, gzip;q=0, *", false),
        ] {
            assert_eq!(accepts_gzip(&h(&[("accept-encoding", v)])), want, "{v}");
        }
        assert!(!accepts_gzip(&h(&[])));
    }

    #[test]
    fn corrupt_gzip_is_not_served_to_identity_clients() {
        let mut e = entry();
        e.gzip = Bytes::from_static(b"\x1f\x8bnot really");
        assert!(
            response(
                &e,
                Ask {
                    headers: &h(&[]),
                    head: false
                },
                Outcome::Hit,
                0
            )
            .is_none()
        );
    }
}
