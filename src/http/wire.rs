//! HTTP/1.1 on the wire, for the hit lane (`server::lane`): a request head parsed with
//! `httparse` (the parser hyper uses) into the same `http::request::Parts` hyper would build,
//! a response head encoded once per entry, and the `Date` value cached per second.
//!
//! Only what the lane serves itself goes through here. Anything this module is unsure of
//! (a parse error, an HTTP/1.0 or `Connection: close` exchange, a body framed by
//! `Transfer-Encoding`) is reported as such, and the lane hands the bytes to hyper, which
//! answers exactly as it does on every other connection.

use std::cell::RefCell;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};

/// Header lines the lane parses at most; a request with more goes to hyper (which allows 100).
pub const MAX_HEADERS: usize = 64;

/// How the body of a parsed request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length` bytes follow the head.
    Length(u64),
}

/// A request head that the lane may handle or lend: complete, HTTP/1.1, keep-alive, with no
/// body or one of a known length.
#[derive(Debug)]
pub struct Head {
    /// The head as hyper would hand it to the service.
    pub parts: Parts,
    /// Bytes of the head on the wire (request line to the empty line).
    pub len: usize,
    /// How its body is framed.
    pub framing: Framing,
}

/// What the buffered bytes hold.
#[derive(Debug)]
// Returned by value once per request and taken apart at once: a `Box` would be one more
// allocation on every hit.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    /// Not a whole head yet: read more.
    Partial,
    /// A head the lane can handle or lend one exchange at a time.
    Head(Head),
    /// Anything else (invalid, HTTP/1.0, `Connection: close` or `upgrade`, a chunked body,
    /// too many headers): hyper takes the connection from these bytes on.
    Other,
    /// A `Content-Length` hyper cannot represent (2^64 − 2 and up: it would answer 431, a
    /// header-size status, for what is a body too large).
    HugeBody,
}

/// Parses the request head at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Parsed {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut lines);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if req.version != Some(1) {
        return Parsed::Other;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::Other;
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut framing = Framing::None;
    // Handed to hyper, but only once the whole head is read: a body too large is ours to refuse.
    let mut other = false;
    for line in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(line.name.as_bytes()) else {
            return Parsed::Other;
        };
        let Ok(value) = HeaderValue::from_bytes(line.value) else {
            return Parsed::Other;
        };
        if name == header::TRANSFER_ENCODING {
            return Parsed::Other;
        }
        if name == header::CONNECTION && !value.as_bytes().eq_ignore_ascii_case(b"keep-alive") {
            other = true;
        }
        if name == header::CONTENT_LENGTH {
            // One value, digits only; anything else is hyper's to refuse.
            let length = std::str::from_utf8(line.value)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            match (framing, length) {
                (Framing::None, Some(n)) if n >= u64::MAX - 1 => return Parsed::HugeBody,
                (Framing::None, Some(n)) => framing = Framing::Length(n),
                _ => return Parsed::Other,
            }
        }
        headers.append(name, value);
    }
    if other {
        return Parsed::Other;
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    let (parts, ()) = request.into_parts();
    Parsed::Head(Head {
        parts,
        len,
        framing,
    })
}

/// Encodes a response head as hyper does (`HTTP/1.1`, lowercase names, one line per value)
/// without the final empty line and without the headers in `skip` (the per-response ones the
/// lane writes itself).
pub fn encode_head(status: StatusCode, headers: &HeaderMap, skip: &[&HeaderName]) -> Bytes {
    let mut out = BytesMut::with_capacity(256 + headers.len() * 48);
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in headers {
        if skip.contains(&name) {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

/// Length of an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub const DATE_LEN: usize = 29;

thread_local! {
    static DATE: RefCell<(u64, [u8; DATE_LEN])> = const { RefCell::new((u64::MAX, [0; DATE_LEN])) };
}

/// Appends the current `Date` value (RFC 9110 §6.6.1), formatted at most once per second per
/// thread, as hyper does for its own responses.
pub fn put_date(out: &mut BytesMut) {
    let now = SystemTime::now();
    let second = crate::clock::unix_secs(now);
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            if text.len() == DATE_LEN {
                cached.1.copy_from_slice(text.as_bytes());
                cached.0 = second;
            }
        }
        out.put_slice(&cached.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        match parse_request(raw.as_bytes()) {
            Parsed::Head(h) => h,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn a_get_parses_into_the_parts_hyper_builds() {
        let raw = "GET /page/1?b=2&a=1 HTTP/1.1\r\nHost: example.com\r\nAccept-Encoding: gzip\r\nX-Two: a\r\nx-two: b\r\n\r\nGET /next";
        let h = head(raw);
        assert_eq!(h.len, raw.find("GET /next").expect("second request"));
        assert_eq!(h.framing, Framing::None);
        assert_eq!(h.parts.method, Method::GET);
        assert_eq!(h.parts.uri, "/page/1?b=2&a=1");
        assert_eq!(h.parts.version, Version::HTTP_11);
        assert_eq!(h.parts.headers["host"], "example.com");
        assert_eq!(h.parts.headers["accept-encoding"], "gzip");
        let two: Vec<_> = h.parts.headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["a", "b"]);
    }

    #[test]
    fn partial_heads_ask_for_more() {
        for cut in [
            "",
            "GE",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
        ] {
            assert!(
                matches!(parse_request(cut.as_bytes()), Parsed::Partial),
                "{cut:?}"
            );
        }
    }

    #[test]
    fn a_known_body_length_is_framed() {
        let h = head("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(12));
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n");
        assert_eq!(h.framing, Framing::None);
    }

    #[test]
    fn whatever_the_lane_does_not_handle_goes_to_hyper() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost a\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "\x16\x03\x01\x00",
        ] {
            assert!(
                matches!(parse_request(raw.as_bytes()), Parsed::Other),
                "{raw:?}"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse_request(raw.as_bytes()), Parsed::Other));
    }

    #[test]
    fn heads_encode_as_hyper_writes_them() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        h.append(header::VARY, HeaderValue::from_static("RSC"));
        h.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
        h.insert(header::AGE, HeaderValue::from_static(""));
        let wire = encode_head(StatusCode::NOT_FOUND, &h, &[&header::AGE]);
        assert_eq!(
            &wire[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\nvary: RSC\r\nvary: Accept-Encoding\r\n"
        );
    }

    #[test]
    fn the_date_is_an_imf_fixdate_of_now() {
        let mut out = BytesMut::new();
        put_date(&mut out);
        let text = std::str::from_utf8(&out).expect("ascii");
        assert_eq!(text.len(), DATE_LEN);
        let parsed = httpdate::parse_http_date(text).expect("IMF-fixdate");
        let skew = SystemTime::now()
            .duration_since(parsed)
            .unwrap_or_default()
            .as_secs();
        assert!(skew <= 1, "{text}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A request head of a GET with `headers`, and the headers as the map should hold them.
    fn request(path: &str, headers: &[(String, String)]) -> String {
        let mut raw = format!("GET {path} HTTP/1.1\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        raw
    }

    fn header() -> impl Strategy<Value = (String, String)> {
        // Names that are not framing or connection headers; values of visible ASCII.
        ("x-[a-z0-9-]{1,12}", "[!-~]([ -~]{0,30}[!-~])?")
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn a_head_parses_whole_and_every_cut_of_it_asks_for_more(
            path in "/[a-z0-9/._-]{0,20}(\\?[a-z0-9=&]{0,12})?",
            headers in proptest::collection::vec(header(), 0..10),
            next in "[A-Z]{0,8}",
        ) {
            let raw = request(&path, &headers);
            for cut in 0..raw.len() {
                prop_assert!(
                    matches!(parse_request(&raw.as_bytes()[..cut]), Parsed::Partial),
                    "cut at {cut} of {raw:?}"
                );
            }
            // Bytes of a next request after the head are not part of it.
            let pipelined = format!("{raw}{next}");
            let Parsed::Head(head) = parse_request(pipelined.as_bytes()) else {
                return Err(TestCaseError::fail(format!("not a head: {raw:?}")));
            };
            prop_assert_eq!(head.len, raw.len());
            prop_assert_eq!(head.framing, Framing::None);
            prop_assert_eq!(head.parts.uri.to_string(), path);
            let got: Vec<(String, String)> = head
                .parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let mut want = headers.clone();
            // The map groups a name's values together, in the order they came.
            let mut got_sorted = got.clone();
            got_sorted.sort();
            want.sort();
            prop_assert_eq!(got_sorted, want);
        }
    }
}
