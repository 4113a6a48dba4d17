//! gzip on the way out, for responses the cache does not store.
//!
//! The gateway asks replicas for `Accept-Encoding: identity` (stored entries are compressed by
//! the cache itself, once). A response that is relayed without being stored would otherwise
//! reach a gzip-capable client uncompressed. The caller — which knows the request (the client
//! accepts gzip, the method is not `HEAD`) — asks [`compressible`] about the response head and,
//! if so, hands the response to [`encode`], which compresses the body frame by frame as it
//! streams ([`LEVEL`], a sync flush per upstream frame, so streamed HTML and RSC payloads keep
//! flowing) and rewrites the headers that describe the bytes.
//!
//! This module does not decide from the request, does not buffer a body, and depends on nothing
//! above `http/` (the proxy calls it, never the other way round).

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::body::{self, Body, BoxError};

/// gzip level on the way: zlib's default, what `next start` itself sends a gzip client (level
/// 1 left a 173 KB JS chunk 18 % larger than the replica's own gzip). The body is compressed
/// once per response here, not once per hit, so the bytes are worth the CPU.
pub const LEVEL: u32 = 6;

/// Smallest declared body worth compressing, bytes: below it the gzip header and trailer
/// (18 bytes) and the flush markers eat most of the gain, and the body fits one packet anyway.
pub const MIN_COMPRESS_BYTES: u64 = 256;

/// The encoder failed. Writing into memory does not fail in practice; the type exists so that a
/// failure is a body error with a name rather than a panic.
#[derive(Debug, thiserror::Error)]
#[error("gzip encoding: {0}")]
pub struct GzipError(#[from] io::Error);

/// Whether a response should be gzip-compressed for a client that accepts gzip: it has a body
/// of a compressible type that is not already encoded or ranged, its sender did not forbid
/// transformation, and it is not declared tiny.
pub fn compressible(status: StatusCode, headers: &HeaderMap) -> bool {
    status_has_body(status)
        && identity_encoded(headers)
        && !headers.contains_key(header::CONTENT_RANGE)
        && !no_transform(headers)
        && compressible_type(headers)
        && large_enough(headers)
}

/// Returns `response` with its body gzip-compressed as it streams and its headers describing
/// the new bytes: no `Content-Length`, `Content-Encoding: gzip`, `Accept-Encoding` in `Vary`,
/// a weak `ETag` (RFC 9110 §8.8.1: the bytes differ from the replica's), and no
/// `Accept-Ranges` (ranges of the compressed bytes are not served).
///
/// Call it only when [`compressible`] said so and the client accepts gzip.
pub fn encode(response: Response<Body>) -> Response<Body> {
    let (mut parts, inner) = response.into_parts();
    let headers = &mut parts.headers;
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    add_vary_accept_encoding(headers);
    weaken_etag(headers);
    Response::from_parts(parts, body::boxed(GzipBody::new(inner)))
}

/// Adds `Accept-Encoding` to `Vary` unless it is listed already or `Vary: *`: the same URL is
/// sent compressed or not depending on the request's `Accept-Encoding`, and browsers' caches
/// must know.
pub fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.eq_ignore_ascii_case("accept-encoding"));
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// `"x"` becomes `W/"x"`; a weak tag stays; a tag that is not a quoted string cannot be made
/// weak, so it is dropped rather than left claiming the compressed bytes are the replica's
/// (nginx's gzip filter does the same).
fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(header::ETAG) else {
        return;
    };
    let tag = etag.as_bytes();
    if tag.starts_with(b"W/") {
        return;
    }
    let weak = tag
        .starts_with(b"\"")
        .then(|| HeaderValue::from_bytes(&[b"W/", tag].concat()).ok())
        .flatten();
    match weak {
        Some(weak) => headers.insert(header::ETAG, weak),
        None => headers.remove(header::ETAG),
    };
}

/// 1xx, 204 and 304 have no body; a 206 is a slice of the identity bytes.
fn status_has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT)
}

/// No `Content-Encoding`, or only `identity`.
fn identity_encoded(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity"))
        })
    })
}

/// `Cache-Control: no-transform` (RFC 9111 §5.2.2.6): intermediaries must not change the
/// content coding. An unreadable value counts as forbidding it.
fn no_transform(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',').any(|directive| {
                let name = directive.split_once('=').map_or(directive, |(n, _)| n);
                name.trim().eq_ignore_ascii_case("no-transform")
            })
        })
    })
}

/// One `Content-Type` whose media type (RFC 9110 §8.3.1: case-insensitive, parameters
/// ignored) is text-like: `text/*`, JavaScript, JSON and XML (with their `+json` / `+xml`
/// suffixes: web manifests, SVG), WebAssembly.
fn compressible_type(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().is_ok_and(compressible_media_type),
        _ => false,
    }
}

fn compressible_media_type(value: &str) -> bool {
    let essence = value.split_once(';').map_or(value, |(essence, _)| essence);
    let Some((kind, sub)) = essence.trim().split_once('/') else {
        return false;
    };
    let is = |name: &str| sub.eq_ignore_ascii_case(name);
    if sub.is_empty() {
        return false;
    }
    if kind.eq_ignore_ascii_case("text") {
        true
    } else if kind.eq_ignore_ascii_case("application") {
        is("javascript")
            || is("json")
            || is("xml")
            || is("wasm")
            || has_suffix(sub, "+json")
            || has_suffix(sub, "+xml")
    } else {
        kind.eq_ignore_ascii_case("image") && is("svg+xml")
    }
}

/// `sub` ends with `suffix` (ASCII case-insensitive) after at least one character.
fn has_suffix(sub: &str, suffix: &str) -> bool {
    sub.len() > suffix.len()
        && sub
            .as_bytes()
            .get(sub.len() - suffix.len()..)
            .is_some_and(|end| end.eq_ignore_ascii_case(suffix.as_bytes()))
}

/// No `Content-Length` (streamed), or every value at least [`MIN_COMPRESS_BYTES`]. A value that
/// does not parse is not worth the risk.
fn large_enough(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_LENGTH).iter().all(|v| {
        v.to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|len| len >= MIN_COMPRESS_BYTES)
    })
}

pin_project! {
    /// The body of [`encode`]: each upstream data frame is compressed and flushed (a sync
    /// flush) into one output frame; the gzip trailer follows the last data frame, before the
    /// upstream trailers if any. An upstream error is passed on and ends the body without a
    /// gzip trailer, so a client cannot take a truncated body for a complete one.
    struct GzipBody<B> {
        #[pin]
        inner: B,
        // `None` once the gzip stream is finished or the body failed.
        encoder: Option<GzEncoder<Vec<u8>>>,
        // Upstream trailers, sent after the gzip trailer.
        trailers: Option<HeaderMap>,
    }
}

impl<B> GzipBody<B> {
    fn new(inner: B) -> Self {
        Self {
            inner,
            encoder: Some(GzEncoder::new(Vec::new(), Compression::new(LEVEL))),
            trailers: None,
        }
    }
}

impl<B> HttpBody for GzipBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    *this.encoder = None;
                    return Poll::Ready(Some(Err(error.into())));
                }
                None => return Poll::Ready(Some(finish(this.encoder))),
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => continue,
                Ok(data) => {
                    let out = compress(encoder, &data);
                    if out.is_err() {
                        *this.encoder = None;
                    }
                    return Poll::Ready(Some(out));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let tail = finish(this.encoder);
                        *this.trailers = tail.is_ok().then_some(trailers);
                        return Poll::Ready(Some(tail));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Compresses one upstream frame and takes what the encoder produced (the encoder's output
/// buffer starts empty again: memory stays bounded by one frame).
fn compress(encoder: &mut GzEncoder<Vec<u8>>, data: &[u8]) -> Result<Frame<Bytes>, BoxError> {
    let flushed = encoder.write_all(data).and_then(|()| encoder.flush());
    flushed.map_err(|e| Box::new(GzipError(e)) as BoxError)?;
    Ok(Frame::data(Bytes::from(std::mem::take(encoder.get_mut()))))
}

/// Ends the gzip stream: what the encoder still holds and the gzip trailer (CRC, length).
fn finish(encoder: &mut Option<GzEncoder<Vec<u8>>>) -> Result<Frame<Bytes>, BoxError> {
    let Some(encoder) = encoder.take() else {
        return Ok(Frame::data(Bytes::new()));
    };
    match encoder.finish() {
        Ok(tail) => Ok(Frame::data(Bytes::from(tail))),
        Err(e) => Err(GzipError(e).into()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use futures_util::FutureExt;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("a valid gzip stream");
        out
    }

    fn frames(chunks: Vec<Result<Frame<Bytes>, BoxError>>) -> Body {
        body::boxed(StreamBody::new(futures_util::stream::iter(chunks)))
    }

    fn response(body: Body, headers: &[(&'static str, &'static str)]) -> Response<Body> {
        let mut response = Response::new(body);
        for (name, value) in headers {
            response
                .headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        response
    }

    fn head(headers: &[(&'static str, &'static str)]) -> HeaderMap {
        response(body::empty(), headers).headers().clone()
    }

    async fn compressed(body: Body) -> Vec<u8> {
        let head = encode(response(body, &[]));
        let bytes = head.into_body().collect().await.expect("no body error");
        bytes.to_bytes().to_vec()
    }

    #[tokio::test]
    async fn multi_frame_body_round_trips() {
        let chunks = [
            "<!DOCTYPE html><html>",
            "<body>hello ",
            "",
            "world</body></html>",
        ];
        let body = frames(
            chunks
                .iter()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
                .collect(),
        );
        assert_eq!(gunzip(&compressed(body).await), chunks.concat().as_bytes());
    }

    #[tokio::test]
    async fn empty_body_is_a_valid_empty_gzip_stream() {
        let gzip = compressed(body::empty()).await;
        assert_eq!(&gzip[..2], [0x1f, 0x8b], "gzip magic");
        assert!(gunzip(&gzip).is_empty());
    }

    #[tokio::test]
    async fn first_frame_flows_before_the_body_ends() {
        let (tx, channel) = body::Channel::new(4, None);
        let mut gzip = encode(response(body::boxed(channel), &[])).into_body();
        let first = b"<html><head><title>streamed</title></head><body>";
        tx.send(Ok(Frame::data(Bytes::from_static(first))))
            .await
            .expect("body alive");

        let frame = gzip.frame().now_or_never();
        let frame = frame.expect("a frame without waiting for the end");
        let out = frame.expect("not ended").expect("no error").into_data();
        let out = out.expect("a data frame");
        // The sync flush makes everything written so far decodable.
        let mut inflate = flate2::write::GzDecoder::new(Vec::new());
        inflate.write_all(&out).expect("valid gzip so far");
        inflate.flush().expect("flushes");
        assert_eq!(inflate.get_ref().as_slice(), first);
        assert!(gzip.frame().now_or_never().is_none(), "waits for upstream");
        assert!(!gzip.is_end_stream());

        tx.send(Ok(Frame::data(Bytes::from_static(b"</body></html>"))))
            .await
            .expect("body alive");
        drop(tx);
        let rest = gzip.collect().await.expect("no error").to_bytes();
        let all = [out.as_ref(), rest.as_ref()].concat();
        assert_eq!(gunzip(&all), [&first[..], b"</body></html>"].concat());
    }

    #[tokio::test]
    async fn trailers_follow_the_gzip_trailer() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"payload"))),
            Ok(Frame::trailers(trailers.clone())),
        ]);
        let collected = encode(response(body, &[]))
            .into_body()
            .collect()
            .await
            .expect("no body error");
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(gunzip(&collected.to_bytes()), b"payload");
    }

    #[tokio::test]
    async fn upstream_error_becomes_a_body_error_without_gzip_trailer() {
        let body = frames(vec![
            Ok(Frame::data(Bytes::from_static(b"partial"))),
            Err("replica reset".into()),
            Ok(Frame::data(Bytes::from_static(b"never"))),
        ]);
        let mut gzip = encode(response(body, &[])).into_body();
        let first = gzip.frame().await.expect("a frame").expect("no error yet");
        assert!(first.is_data());
        let error = gzip.frame().await.expect("a frame").expect_err("the error");
        assert_eq!(error.to_string(), "replica reset");
        assert!(gzip.is_end_stream());
        assert!(gzip.frame().await.is_none(), "nothing after the error");
    }

    #[test]
    fn headers_describe_the_compressed_bytes() {
        let headers = [
            ("content-length", "5000"),
            ("content-type", "text/html"),
            ("etag", "\"abc\""),
            ("accept-ranges", "bytes"),
            ("vary", "RSC, Next-Router-State-Tree"),
        ];
        let out = encode(response(body::empty(), &headers));
        let h = out.headers();
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        assert!(!h.contains_key(header::ACCEPT_RANGES));
        assert_eq!(h[header::CONTENT_ENCODING], "gzip");
        assert_eq!(h[header::CONTENT_TYPE], "text/html");
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        let vary: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["RSC, Next-Router-State-Tree", "Accept-Encoding"]);
    }

    #[test]
    fn etag_is_weakened_once_or_dropped() {
        let cases = [
            ("\"x\"", Some("W/\"x\"")),
            ("W/\"x\"", Some("W/\"x\"")),
            ("\"\"", Some("W/\"\"")),
            ("unquoted", None),
        ];
        for (etag, expected) in cases {
            let out = encode(response(body::empty(), &[("etag", etag)]));
            let got = out.headers().get(header::ETAG).map(|v| v.to_str().ok());
            assert_eq!(got, expected.map(Some), "{etag}");
        }
    }

    #[test]
    fn vary_is_kept_when_it_already_covers_accept_encoding() {
        for vary in ["accept-encoding", "Origin, Accept-Encoding", "*", " * "] {
            let mut h = head(&[("vary", vary)]);
            add_vary_accept_encoding(&mut h);
            let got: Vec<_> = h.get_all(header::VARY).iter().collect();
            assert_eq!(got, [vary], "{vary}");
        }
        let mut h = head(&[]);
        add_vary_accept_encoding(&mut h);
        assert_eq!(h[header::VARY], "Accept-Encoding");
    }

    fn is_compressible(status: u16, headers: &[(&'static str, &'static str)]) -> bool {
        let status = StatusCode::from_u16(status).expect("valid status");
        compressible(status, &head(headers))
    }

    const HTML: (&str, &str) = ("content-type", "text/html; charset=utf-8");

    #[test]
    fn compressible_statuses_have_a_whole_body() {
        let cases = [
            (200, true),
            (404, true),
            (500, true),
            (103, false),
            (204, false),
        ];
        let cases = cases.into_iter().chain([(206, false), (304, false)]);
        for (status, expected) in cases {
            assert_eq!(is_compressible(status, &[HTML]), expected, "{status}");
        }
    }

    #[test]
    fn compressible_headers_allow_a_new_coding() {
        let cases = [
            ("content-encoding", "br", false),
            ("content-encoding", "gzip", false),
            ("content-encoding", "Identity", true),
            ("content-range", "bytes 0-9/10", false),
            ("cache-control", "public, No-Transform", false),
            ("cache-control", "s-maxage=60, stale-while-revalidate", true),
            ("content-length", "255", false),
            ("content-length", "256", true),
            ("content-length", "x", false),
            ("vary", "RSC", true),
        ];
        for (name, value, expected) in cases {
            assert_eq!(
                is_compressible(200, &[HTML, (name, value)]),
                expected,
                "{name}: {value}"
            );
        }
    }

    #[test]
    fn compressible_types_are_text_like() {
        let cases = [
            ("text/html", true),
            ("TEXT/CSS", true),
            ("text/x-component", true),
            ("application/javascript; charset=utf-8", true),
            ("application/json", true),
            ("application/ld+JSON", true),
            ("application/manifest+json", true),
            ("application/xml", true),
            ("application/rss+xml", true),
            ("image/svg+xml", true),
            ("application/wasm", true),
            ("image/png", false),
            ("image/svg", false),
            ("application/octet-stream", false),
            ("application/+json", false),
            ("text", false),
            ("text/", false),
            ("", false),
        ];
        for (content_type, expected) in cases {
            let got = is_compressible(200, &[("content-type", content_type)]);
            assert_eq!(got, expected, "{content_type}");
        }
        assert!(!is_compressible(200, &[]), "no content type");
        let two = [("content-type", "text/html"), ("content-type", "image/png")];
        assert!(!is_compressible(200, &two), "two content types");
    }

    /// Minified-bundle-like JavaScript: webpack modules with mangled names, module ids,
    /// identifiers and camelCase properties from a vocabulary, Tailwind class strings and
    /// numbers, picked by a seeded xorshift (the same text on every run).
    fn javascript_like(len: usize) -> String {
        const WORDS: &str = "use state effect callback memo ref create element jsx fragment \
            children class name on click props default forward display object define property \
            prototype length push apply call promise resolve then catch error router path \
            search params fetch headers method json stringify window document add remove \
            event listener current value target key index item list map filter reduce render";
        const CLASSES: &str = "flex items-center justify-between px-4 py-2 text-sm font-medium \
            rounded-md bg-white text-gray-900 hover:bg-gray-50 grid gap-6 md:grid-cols-3 \
            border shadow-sm sr-only mt-8 w-full h-5 space-y-4 truncate opacity-75 z-10";
        let words: Vec<&str> = WORDS.split_whitespace().collect();
        let classes: Vec<&str> = CLASSES.split_whitespace().collect();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).expect("fits")
        };
        const MANGLED: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$";
        let name = |next: &mut dyn FnMut(usize) -> usize| {
            let one = char::from(MANGLED[next(MANGLED.len())]);
            match next(3) {
                0 => one.to_string(),
                _ => format!("{one}{}", char::from(MANGLED[next(MANGLED.len())])),
            }
        };
        let mut js = String::from("(self.webpackChunk_N_E=self.webpackChunk_N_E||[]).push([[");
        js += "931],{";
        while js.len() < len {
            let (a, b) = (name(&mut next), name(&mut next));
            let prop = format!("{}{}", words[next(words.len())], words[next(words.len())]);
            js += &format!("{}:function(e,t,{a}){{\"use strict\";", 1000 + next(90000));
            js += &format!("{a}.d(t,{{default:function(){{return {b}}}}});");
            for _ in 0..2 + next(6) {
                let (c, d) = (name(&mut next), name(&mut next));
                let (w, v) = (words[next(words.len())], words[next(words.len())]);
                let class: Vec<_> = (0..1 + next(4))
                    .map(|_| classes[next(classes.len())])
                    .collect();
                js += &format!(
                    "var {c}={a}({}),{d}=(0,{c}.{w})(function({b},{a}){{",
                    next(99999)
                );
                js += &format!("let{{{prop}:n,{v}:r={}}}={b};", next(1000));
                js += &format!(
                    "return(0,{c}.jsx)(\"div\",{{className:\"{}\",",
                    class.join(" ")
                );
                js += &format!("\"data-{w}\":n,children:r>{}?{d}:null}})}});", next(100));
            }
            js += "},";
        }
        js += "}]);";
        js
    }

    #[tokio::test]
    async fn javascript_compresses_well_at_level_one() {
        let js = javascript_like(170 * 1024);
        // Frames of 16 KiB, as a replica's socket reads deliver them.
        let chunks = Bytes::from(js.clone().into_bytes());
        let body = frames(
            (0..chunks.len())
                .step_by(16 * 1024)
                .map(|at| {
                    Ok(Frame::data(
                        chunks.slice(at..(at + 16 * 1024).min(chunks.len())),
                    ))
                })
                .collect(),
        );
        let gzip = compressed(body).await;
        let ratio = gzip.len() as f64 / js.len() as f64;
        eprintln!(
            "javascript-like {} -> {} bytes: {ratio:.3}",
            js.len(),
            gzip.len()
        );
        assert_eq!(gunzip(&gzip), js.as_bytes());
        assert!(ratio < 0.5, "ratio {ratio:.3}");
    }
}
