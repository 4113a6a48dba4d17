//! The access log: one line per request, at `info` on the `isrgate::access` target, however
//! the request was answered (the hit lane, hyper and the driver, load shedding).
//!
//! Receives what the request asked and what the response carries (status, `x-cache`,
//! `Cache-Status`, `x-request-id`, the replica that answered as an [`AnsweredBy`] extension) and
//! hands one event to `tracing`, whose subscriber formats it (text, or flat JSON:
//! [`super::format`]) and hands it to the non-blocking writer ([`super::writer`]).
//!
//! The line is written once the body is: at once for a body of known size (a hit, an error:
//! `bytes` is that size), when the last frame has gone (or the body is dropped: a client gone)
//! for a streamed one. The cost on the hit path is a flag, the level check and, when both say
//! yes, the line itself: nothing is formatted or allocated for a line that is not written
//! (fields are borrowed and formatted by the subscriber, the query redacted as it is written).
//!
//! The same facts feed the request metrics ([`crate::metrics::Metrics::answered`]: the duration
//! histogram by status class and cache outcome, body bytes sent) for every request, whether or
//! not a line is written: recording is an index, a bucket search and relaxed adds, no
//! allocation. An answer of 500 or more is also counted by status and kept among the newest
//! server errors with its path ([`crate::metrics::Metrics::server_error`]): the only work here
//! that allocates without a line, and only for an error.
//!
//! It must not log secrets: query parameters whose name looks like a credential (the
//! webhook's `?secret=`, `token`, `key`, `signature`…, see [`Path`]) are written as
//! `[redacted]`. It never changes the response.

use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Method, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing::Dispatch;

use crate::http::X_REQUEST_ID;
use crate::http::body::{self, Body};
use crate::metrics::errors::ServerError;
use crate::metrics::{CacheOutcome, Metrics};
use crate::proxy::respond::{CACHE_STATUS, X_CACHE};

/// The `tracing` target of access lines: route or filter them by it
/// (`log.level = "warn,isrgate::access=off"` is `log.access = false`).
pub const TARGET: &str = "isrgate::access";

/// A response extension: the replica that answered (or failed to), for the access log's
/// `replica` field.
#[derive(Debug, Clone)]
pub struct AnsweredBy(pub Authority);

/// Where access lines go, and whether they are written (`log.access`; a reload may switch it).
#[derive(Debug)]
pub struct AccessLog {
    on: AtomicBool,
    /// A subscriber of its own (tests, embedders); `None`: the process's global one.
    dispatch: Option<Dispatch>,
    /// Who follows the lines live (`isrgate tail`), whether they are written or not.
    tail: Arc<super::tail::Tail>,
}

impl AccessLog {
    /// Lines to the global subscriber when `on`; or to `dispatch`, when given.
    pub fn new(on: bool, dispatch: Option<Dispatch>) -> AccessLog {
        if dispatch.is_some() {
            super::register_bystander();
        }
        AccessLog {
            on: AtomicBool::new(on),
            dispatch,
            tail: Arc::default(),
        }
    }

    /// The live followers of the lines.
    pub fn tail(&self) -> &Arc<super::tail::Tail> {
        &self.tail
    }

    /// Turns the log on or off (`log.access`, live).
    pub fn set_enabled(&self, on: bool) {
        self.on.store(on, Relaxed);
    }

    /// Whether a line would be used now: someone follows it, or the switch and then the
    /// subscriber's filter say it is written.
    pub fn enabled(&self) -> bool {
        self.tail.active()
            || self.on.load(Relaxed)
                && self.with(|| tracing::enabled!(target: TARGET, tracing::Level::INFO))
    }

    /// Writes `line` (the level is checked again by the event itself: a line costs nothing
    /// more when the filter says no), and offers it to the followers.
    pub fn write(&self, line: &Line<'_>) {
        if self.tail.active() {
            self.tail.offer(line);
        }
        if !self.on.load(Relaxed) {
            return;
        }
        self.with(|| {
            tracing::info!(
                target: TARGET,
                method = line.method,
                path = %Path(line.uri),
                status = line.status,
                cache = line.cache,
                cache_status = line.cache_status,
                replica = line.replica,
                bytes = line.bytes,
                elapsed_us = u64::try_from(line.elapsed.as_micros()).unwrap_or(u64::MAX),
                request_id = line.request_id,
                host = line.host,
                peer = %Peer(line.peer),
            );
        });
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.dispatch {
            None => f(),
            Some(d) => tracing::dispatcher::with_default(d, f),
        }
    }
}

/// One access line, borrowed from the request and the response. Absent values are `-`.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// Request method.
    pub method: &'a str,
    /// Request target: its path and query (redacted when written).
    pub uri: &'a Uri,
    /// Response status.
    pub status: u16,
    /// The `x-cache` value: HIT, MISS, STALE, BYPASS.
    pub cache: &'a str,
    /// The `Cache-Status` value (RFC 9211): the outcome with its detail.
    pub cache_status: &'a str,
    /// The replica that answered, `host:port`.
    pub replica: &'a str,
    /// Body bytes sent (nginx's `$body_bytes_sent`).
    pub bytes: u64,
    /// From the request head read to the last body byte handed to the connection.
    pub elapsed: Duration,
    /// The `x-request-id` the response carries.
    pub request_id: &'a str,
    /// The `Host` the client asked for.
    pub host: &'a str,
    /// The client's address (the connection's peer).
    pub peer: SocketAddr,
}

/// What the access log keeps of a request while the driver answers it.
#[derive(Debug)]
pub struct Request {
    started: Instant,
    peer: SocketAddr,
    /// The method and target, shared with the request (not copied), kept for every request:
    /// the line needs them, and so does a server error (`metrics::errors`), which is known
    /// only once the response is.
    method: Method,
    uri: Uri,
    /// Whether a line will be written, and the `Host` it names (shared too).
    line: Option<Option<HeaderValue>>,
}

impl Request {
    /// A request that `started` then; its `Host` is kept when `logged`.
    pub fn of<B>(
        req: &http::Request<B>,
        peer: SocketAddr,
        started: Instant,
        logged: bool,
    ) -> Request {
        Request {
            started,
            peer,
            method: req.method().clone(),
            uri: req.uri().clone(),
            line: logged.then(|| req.headers().get(header::HOST).cloned()),
        }
    }
}

/// Records a response of hyper's side (the driver, or load shedding) in the metrics, and
/// writes its access line when the request is logged: now when the body's size is known,
/// else when the body ends (the body is wrapped to count).
pub fn respond(
    log: &Arc<AccessLog>,
    metrics: &Arc<Metrics>,
    request: Request,
    resp: Response<Body>,
) -> Response<Body> {
    if let Some(bytes) = resp.body().size_hint().exact() {
        finish(log, metrics, &request, Seen::of(&resp), bytes);
        return resp;
    }
    let seen = Seen::of(&resp);
    let done = Done {
        status: seen.status,
        cache: seen.cache.cloned(),
        cache_status: seen.cache_status.cloned(),
        replica: seen.replica.cloned(),
        request_id: seen.request_id.cloned(),
    };
    let finish = Finish {
        pending: Some(Box::new((
            Arc::clone(log),
            Arc::clone(metrics),
            request,
            done,
        ))),
        bytes: 0,
    };
    resp.map(|b| body::boxed(Logged { inner: b, finish }))
}

/// The end of a request: its metrics (a server error kept among the newest), then its line
/// when it is logged.
fn finish(log: &AccessLog, metrics: &Metrics, request: &Request, seen: Seen<'_>, bytes: u64) {
    let elapsed = request.started.elapsed();
    let outcome = seen.cache.map_or(CacheOutcome::None, |v| {
        CacheOutcome::of_x_cache(v.as_bytes())
    });
    metrics.answered(seen.status, outcome, bytes, elapsed);
    if seen.status >= 500 {
        metrics.server_error(seen.server_error(request, elapsed));
    }
    if let Some(host) = &request.line {
        log.write(&seen.line(request, host.as_ref(), bytes, elapsed));
    }
}

/// What the access line takes from a response head.
#[derive(Debug, Clone, Copy)]
struct Seen<'a> {
    status: u16,
    cache: Option<&'a HeaderValue>,
    cache_status: Option<&'a HeaderValue>,
    replica: Option<&'a Authority>,
    request_id: Option<&'a HeaderValue>,
}

impl<'a> Seen<'a> {
    fn of(resp: &'a Response<Body>) -> Seen<'a> {
        let h = resp.headers();
        Seen {
            status: resp.status().as_u16(),
            cache: h.get(&X_CACHE),
            cache_status: h.get(&CACHE_STATUS),
            replica: resp.extensions().get::<AnsweredBy>().map(|a| &a.0),
            request_id: h.get(&X_REQUEST_ID),
        }
    }

    fn line(
        self,
        r: &'a Request,
        host_header: Option<&'a HeaderValue>,
        bytes: u64,
        elapsed: Duration,
    ) -> Line<'a> {
        Line {
            method: r.method.as_str(),
            uri: &r.uri,
            status: self.status,
            cache: text(self.cache),
            cache_status: text(self.cache_status),
            replica: self.replica.map_or("-", Authority::as_str),
            bytes,
            elapsed,
            request_id: text(self.request_id),
            host: host(host_header, &r.uri),
            peer: r.peer,
        }
    }

    /// The server error this response is (its status 500 or more), as the dashboard lists it.
    fn server_error(self, r: &Request, elapsed: Duration) -> ServerError {
        ServerError {
            at_ms: crate::clock::system_ms(),
            status: self.status,
            method: r.method.as_str().to_owned(),
            path: Path(&r.uri).to_string(),
            cache: text(self.cache).to_owned(),
            replica: self.replica.map_or("-", Authority::as_str).to_owned(),
            request_id: text(self.request_id).to_owned(),
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
        }
    }
}

/// [`Seen`], kept until a streamed body ends.
#[derive(Debug)]
struct Done {
    status: u16,
    cache: Option<HeaderValue>,
    cache_status: Option<HeaderValue>,
    replica: Option<Authority>,
    request_id: Option<HeaderValue>,
}

impl Done {
    fn seen(&self) -> Seen<'_> {
        Seen {
            status: self.status,
            cache: self.cache.as_ref(),
            cache_status: self.cache_status.as_ref(),
            replica: self.replica.as_ref(),
            request_id: self.request_id.as_ref(),
        }
    }
}

/// A header value as text, `-` when absent or not text.
fn text(v: Option<&HeaderValue>) -> &str {
    v.and_then(|v| v.to_str().ok()).unwrap_or("-")
}

/// The host the client asked for: its `Host`, else the target's authority (HTTP/2), else `-`.
pub fn host<'a>(header: Option<&'a HeaderValue>, uri: &'a Uri) -> &'a str {
    match header.and_then(|v| v.to_str().ok()) {
        Some(h) => h,
        None => uri.authority().map_or("-", Authority::as_str),
    }
}

/// The end of a streamed body (metrics and line), recorded when it ends or is dropped.
struct Finish {
    pending: Option<Box<Pending>>,
    bytes: u64,
}

/// What a streamed body's end records, and where.
type Pending = (Arc<AccessLog>, Arc<Metrics>, Request, Done);

impl Finish {
    fn write(&mut self) {
        if let Some(p) = self.pending.take() {
            let (log, metrics, request, done) = &*p;
            finish(log, metrics, request, done.seen(), self.bytes);
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.write();
    }
}

pin_project! {
    /// A streamed response body that counts what it hands on and writes the access line at
    /// its end.
    struct Logged<B> {
        #[pin]
        inner: B,
        finish: Finish,
    }
}

impl<B: HttpBody<Data = Bytes>> HttpBody for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.finish.bytes += data.len() as u64;
                }
            }
            Poll::Ready(_) => this.finish.write(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Names of query parameters whose values are never logged: a name containing one of these
/// (ASCII case-insensitively, after percent-decoding) is a credential, or may be.
const SECRET_NAMES: &[&str] = &[
    "secret",
    "token",
    "key",
    "pass",
    "sig",
    "auth",
    "session",
    "credential",
    "code",
];

/// The value written in place of a secret's.
const REDACTED: &str = "[redacted]";

/// A request target as logged: its path, and its query with the values of credential-like
/// parameters (see [`SECRET_NAMES`]) replaced by `[redacted]`; written without allocating.
#[derive(Debug, Clone, Copy)]
pub struct Path<'a>(pub &'a Uri);

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.path())?;
        let Some(query) = self.0.query() else {
            return Ok(());
        };
        f.write_str("?")?;
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                f.write_str("&")?;
            }
            match pair.split_once('=') {
                Some((name, _)) if is_secret(name) => {
                    f.write_str(name)?;
                    f.write_str("=")?;
                    f.write_str(REDACTED)?;
                }
                _ => f.write_str(pair)?,
            }
        }
        Ok(())
    }
}

/// Whether a query parameter's name (as sent, maybe percent-encoded) names a credential.
fn is_secret(name: &str) -> bool {
    let contains = |name: &[u8]| {
        SECRET_NAMES.iter().any(|s| {
            name.windows(s.len())
                .any(|w| w.eq_ignore_ascii_case(s.as_bytes()))
        })
    };
    if name.contains('%') {
        contains(&percent_encoding::percent_decode_str(name).collect::<Vec<u8>>())
    } else {
        contains(name.as_bytes())
    }
}

/// A client address as logged: `ip:port`, an IPv4 one written digit by digit (the standard
/// `Display` goes through the formatting machinery once per octet; this is on every line).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        let mut buf = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(buf.format(octet))?;
        }
        f.write_str(":")?;
        f.write_str(buf.format(v4.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(target: &str) -> String {
        Path(&target.parse().expect("test")).to_string()
    }

    #[test]
    fn credentials_in_queries_are_redacted() {
        assert_eq!(logged("/p"), "/p");
        assert_eq!(logged("/p?a=1&b"), "/p?a=1&b");
        assert_eq!(
            logged("/_isrgate/revalidate?secret=hunter2&path=/x"),
            "/_isrgate/revalidate?secret=[redacted]&path=/x"
        );
        assert_eq!(
            logged("/cb?access_token=t&API_KEY=k&X-Amz-Signature=s&%73ecret=x&code=c"),
            "/cb?access_token=[redacted]&API_KEY=[redacted]&X-Amz-Signature=[redacted]&%73ecret=[redacted]&code=[redacted]"
        );
        // A secret-looking value under an ordinary name is a value like any other.
        assert_eq!(logged("/s?q=secret"), "/s?q=secret");
    }

    #[test]
    fn peers_are_written_as_the_standard_library_writes_them() {
        for addr in [
            "10.0.3.7:42848",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:8080",
        ] {
            let addr: SocketAddr = addr.parse().expect("test");
            assert_eq!(Peer(addr).to_string(), addr.to_string());
        }
    }

    #[test]
    fn the_host_is_the_header_else_the_authority() {
        let uri: Uri = "http://a.example/p".parse().expect("test");
        assert_eq!(
            host(Some(&HeaderValue::from_static("b.example")), &uri),
            "b.example"
        );
        assert_eq!(host(None, &uri), "a.example");
        assert_eq!(host(None, &"/p".parse().expect("test")), "-");
    }
}
