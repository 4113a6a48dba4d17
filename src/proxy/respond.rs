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

use crate::cache::entry::{Entry, Head};
use crate::cache::sealed::Held;
use crate::http::body::{self, Body};
use crate::http::{X_REQUEST_ID, wire};

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

    /// The `outcome` label of the request metrics (as `x-cache` says it).
    pub fn metric(self) -> crate::metrics::CacheOutcome {
        use crate::metrics::CacheOutcome as M;
        match self {
            Outcome::Hit => M::Hit,
            Outcome::Miss { .. } | Outcome::Collapsed => M::Miss,
            Outcome::Stale | Outcome::StaleIfError => M::Stale,
            Outcome::Bypass => M::Bypass,
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
    /// An identity body inflated now is sealed for the hit lane ([`crate::cache::sealed`]).
    pub seal: bool,
}

/// The response for `entry`, or `None` when the client needs the identity body and the stored
/// gzip does not inflate (a corrupt entry). An identity body sealed for the hit lane is read
/// back from its file here (a copy: hits this path answers are the lane's exceptions, stale
/// ones among them).
///
/// The head of each representation is built once per entry ([`prepare`]) and cloned here: a
/// response sets `Age`, `x-cache` and `Cache-Status` in slots the prepared map already has,
/// so it neither hashes the stored headers again nor grows the map (a hit sets only `Age`:
/// the prepared head is already marked as one).
pub fn response(
    entry: &Entry,
    ask: Ask<'_>,
    outcome: Outcome,
    now_ms: u64,
) -> Option<Response<Body>> {
    let gzip = !entry.gzip.is_empty() && accepts_gzip(ask.headers);
    let (head, held) = representation(entry, gzip, ask.seal)?;
    let mut headers = head.headers.clone();
    let age = now_ms.saturating_sub(entry.meta.stored_at_ms) / 1000;
    headers.insert(header::AGE, HeaderValue::from(age));
    if outcome != Outcome::Hit {
        mark(&mut headers, outcome);
    }
    if head.status == StatusCode::OK && if_none_match(ask.headers, &head.etag) {
        // RFC 9110 §15.4.5: the validators and caching headers of the 200, no content headers.
        for name in [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
        ] {
            headers.remove(name);
        }
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        *resp.headers_mut() = headers;
        return Some(resp);
    }
    let mut resp = Response::new(if ask.head {
        body::empty()
    } else {
        body::full(bytes(entry, &held)?)
    });
    *resp.status_mut() = head.status;
    *resp.headers_mut() = headers;
    Some(resp)
}

/// The bytes of `held`, a body of `entry`. A sealed body that cannot be read back (the kernel
/// out of memory) is inflated again from the stored gzip: the entry is not at fault.
fn bytes(entry: &Entry, held: &Held) -> Option<Bytes> {
    match held.bytes() {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(error = %e, "sealed body not read back; inflating it again");
            entry.inflate().ok()
        }
    }
}

/// The gzip (`gzip == true`) or identity representation of `entry`: its prepared head and its
/// body (the identity body inflated and sealed if `seal`, when this is its first use). `None`
/// when the identity body does not inflate or the status is not one.
fn representation(entry: &Entry, gzip: bool, seal: bool) -> Option<(&Head, Held)> {
    if gzip {
        let head = entry.head(true, || prepare(entry, true, entry.gzip.len()))?;
        return Some((head, Held::Heap(entry.gzip.clone())));
    }
    let held = if entry.gzip.is_empty() {
        Held::Heap(Bytes::new())
    } else {
        entry.identity(seal).ok()?.clone()
    };
    let head = entry.head(false, || prepare(entry, false, held.len()))?;
    Some((head, held))
}

/// A plain hit on the wire, for the hit lane: the representation's prepared head as HTTP/1.1
/// bytes (no `Age`, `x-request-id`, `Date` or final empty line; the lane writes those) and its
/// body. `None` where [`response`] must answer instead: the head has a `Location` (rewritten
/// per client by the driver), or the identity body does not inflate. An identity body
/// inflated here is sealed if `seal` (the lane `sendfile`s sealed bodies).
pub fn wire(entry: &Entry, gzip: bool, seal: bool) -> Option<(Bytes, Held)> {
    let (head, body) = representation(entry, gzip, seal)?;
    Some((head.wire.clone()?, body))
}

/// A stale hit on the wire, for the hit lane: as [`wire`], with the prepared head re-marked
/// `STALE` (encoded per response: stale hits last one refresh, the prepared heads are the
/// fresh ones).
pub fn stale_wire(entry: &Entry, gzip: bool, seal: bool) -> Option<(Bytes, Held)> {
    let (head, body) = representation(entry, gzip, seal)?;
    head.wire.as_ref()?;
    let mut headers = head.headers.clone();
    mark(&mut headers, Outcome::Stale);
    let wire = wire::encode_head(head.status, &headers, &[&header::AGE, &X_REQUEST_ID]);
    Some((wire, body))
}

/// The head of one representation of `entry` whose body is `len` bytes: the stored status and
/// headers, the representation's strong ETag (two encodings of one entry are two
/// representations, RFC 9110 §8.8.3), `Vary: Accept-Encoding`, `Content-Length`, `gzip`'s
/// `Content-Encoding`, and slots for what every response sets: `Age`, `x-cache` and
/// `Cache-Status` (already marked as a hit, the common case) here, `x-request-id` in the
/// driver. `None` for a status that is not one.
pub fn prepare(entry: &Entry, gzip: bool, len: usize) -> Option<Head> {
    let meta = &entry.meta;
    let status = StatusCode::from_u16(meta.status).ok()?;
    let etag = if gzip {
        gzip_etag(&meta.etag)
    } else {
        meta.etag.clone()
    };
    let mut headers = HeaderMap::with_capacity(meta.headers.len() + 10);
    for (name, value) in &meta.headers {
        headers.append(name.clone(), value.clone());
    }
    // What the driver would strip from every response, stripped once.
    super::sanitize::strip_hop_by_hop(&mut headers, false);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    add_vary_accept_encoding(&mut headers);
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    mark(&mut headers, Outcome::Hit);
    for slot in [header::AGE, X_REQUEST_ID.clone()] {
        headers.insert(slot, HeaderValue::from_static(""));
    }
    // A `Location` is rewritten per client (`finish`): such a head is never sent as prepared.
    let wire = (!headers.contains_key(header::LOCATION))
        .then(|| wire::encode_head(status, &headers, &[&header::AGE, &X_REQUEST_ID]));
    Some(Head {
        status,
        headers,
        etag,
        wire,
    })
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
pub use crate::http::gzip::add_vary_accept_encoding;

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
/// Read as bytes (every hit asks): the q-value is parsed only where a `;` says there is one.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut star = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let (coding, params) = match item.iter().position(|&b| b == b';') {
                Some(i) => (&item[..i], Some(&item[i + 1..])),
                None => (item, None),
            };
            let coding = coding.trim_ascii();
            let allowed = || params.is_none_or(|p| q_value(p) > 0.0);
            if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
                return allowed();
            }
            if coding == b"*" {
                star = Some(allowed());
            }
        }
    }
    star.unwrap_or(false)
}

/// The `q` parameter among `;`-separated parameters; 1 when absent or unreadable.
fn q_value(params: &[u8]) -> f32 {
    params
        .split(|&b| b == b';')
        .filter_map(|p| p.trim_ascii().strip_prefix(b"q="))
        .filter_map(|q| std::str::from_utf8(q).ok()?.trim().parse::<f32>().ok())
        .next()
        .unwrap_or(1.0)
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
            filled_by: String::new(),
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
            seal: false,
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
                seal: false,
            },
            Outcome::Hit,
            0,
        )
        .expect("served");
        assert_eq!(r.status(), 304);
        assert_eq!(r.headers()["etag"], e.meta.etag.as_str());
        for gone in ["content-type", "content-length", "content-encoding"] {
            assert!(r.headers().get(gone).is_none(), "{gone}");
        }
        assert!(bytes(r).await.is_empty());
        let none = h(&[]);
        let r = response(
            &e,
            Ask {
                headers: &none,
                head: true,
                seal: false,
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
    fn heads_are_prepared_once_with_slots_for_the_per_response_headers() {
        let e = entry();
        let gz = h(&[("accept-encoding", "gzip")]);
        let ask = Ask {
            headers: &gz,
            head: false,
            seal: false,
        };
        let a = response(&e, ask, Outcome::Hit, 12_500).expect("served");
        let b = response(&e, ask, Outcome::Stale, 15_500).expect("served");
        let prepared = e.head(true, || None).expect("kept by the first response");
        assert_eq!(prepared.etag, gzip_etag(&e.meta.etag));
        for slot in ["age", "x-cache", "cache-status", "x-request-id"] {
            assert!(prepared.headers.contains_key(slot), "{slot}");
        }
        assert!(
            e.head(false, || None).is_none(),
            "no identity client yet: no identity head"
        );
        assert_eq!(
            (&a.headers()["age"], &b.headers()["age"]),
            (&"2".parse().expect("v"), &"5".parse().expect("v"))
        );
        assert_eq!(b.headers()["x-cache"], "STALE");
        let names = |r: &Response<Body>| r.headers().keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b), "the same head, filled in");
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
                    head: false,
                    seal: false,
                },
                Outcome::Hit,
                0
            )
            .is_none()
        );
    }
}
