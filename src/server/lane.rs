//! The HTTP/1.1 hit lane: cache hits (fresh, or stale while one refresh runs) answered straight
//! from the socket, everything else lent to hyper one exchange at a time.
//!
//! A cache hit is a lookup and two writes, but through hyper's server it also pays for a
//! dispatcher, a service future, a `Response`, a body and the encoding of a header map: more
//! than the lookup itself, and the reason hits stayed below the throughput of a bare hyper
//! server answering fixed bytes. So, as in nginx, Varnish and pingora, the cache's own hot path
//! owns the connection: the lane reads request heads with `httparse` (the parser hyper uses)
//! into the `Parts` hyper would build, asks [`crate::proxy::fast_path`] whether the cache answers it
//! (the driver's own steps: sanitize, classify, key, lookup: the L1, else the store), and
//! writes the entry's head encoded once per entry, `Age`, `x-request-id`, `Date` and the body
//! with one `writev`; or, for a body sealed in a memory file ([`crate::cache::sealed`]), the
//! head with `MSG_MORE` and the body with `sendfile`, which copies nothing on this side.
//!
//! Whatever is not such a hit is **lent**: a hyper HTTP/1.1 connection is made over a view of
//! the socket that yields exactly that request's bytes (its head, then its `Content-Length`
//! body) and then end-of-file, with `half_close` so that end is not a client gone. hyper runs
//! the exchange through the usual service and driver (handed the lane's lookup, so the store
//! is read once) and, once the response is written, sees the end, stops without shutting the
//! socket down, and hands it back; the lane goes on with the next request. The client sees one
//! keep-alive connection throughout.
//!
//! What the lane does not parse or frame (HTTP/2, HTTP/1.0, `Connection: close` or upgrade,
//! chunked request bodies, a head over `listen.max_header_bytes`, bytes that are not HTTP) is
//! **handed off**: hyper gets the connection for good, from the bytes already read, and
//! answers exactly as it does without the lane. The connection's watchdog (header read, idle,
//! send) watches the lane's reads and writes as it watches hyper's.
//!
//! The lane runs whenever the cache is on and `listen.hit_lane` is (the default). A lent
//! exchange costs a second parse of its head and a hyper connection set-up: a few
//! microseconds on a request that goes upstream or streams anyway. A client that closes while
//! its request is lent is noticed when the answer is written, not before (hyper does not read
//! a lent socket).

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::request::Parts;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::conn::{Activity, Rewind, Watched};
use crate::app::AppState;
use crate::cache::sealed::Held;
#[cfg(target_os = "linux")]
use crate::cache::sealed::Sealed;
use crate::http::wire::{self, Framing, Parsed};
use crate::logging::access;
use crate::metrics::CacheOutcome;
use crate::proxy::fast_path::{self, Hit, Looked, Verdict};
use crate::proxy::forwarded::Peer;
use crate::proxy::respond::Outcome;

/// How the lane left a connection.
pub(super) enum End {
    /// Closed: the client went away, the gateway drains, or an exchange failed.
    Closed,
    /// hyper takes the connection from these bytes on.
    Handoff(Bytes),
}

/// The answer to a declared request body over `listen.max_body_bytes` (the driver's text); the
/// connection closes after it, its body unread.
const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 23\r\nconnection: close\r\n\r\nRequest body too large\n";

/// The body of [`TOO_LARGE`], bytes.
const TOO_LARGE_BODY: usize = "Request body too large\n".len();

/// What the lane sent, for the access line.
struct Sent<'a> {
    status: u16,
    outcome: Option<Outcome>,
    bytes: usize,
    request_id: &'a str,
}

/// Whether connections go through the lane: `listen.hit_lane`, with the cache on.
pub(super) fn enabled(app: &AppState) -> bool {
    app.config().listen.hit_lane && app.cache.is_some()
}

/// The hyper HTTP/1.1 builder for lent exchanges: the listener's HTTP/1.1 settings, and
/// `half_close`, so the end of a lent request is not taken for a client gone.
pub(super) fn lender(app: &AppState) -> http1::Builder {
    let config = app.config();
    let cfg = &config.listen;
    let mut b = http1::Builder::new();
    http1_settings!(b, cfg).half_close(true);
    b
}

/// One connection's lane.
pub(super) struct Lane<'a> {
    pub(super) app: &'a Arc<AppState>,
    pub(super) peer: &'a Arc<Peer>,
    pub(super) activity: &'a Arc<Activity>,
    pub(super) lender: &'a http1::Builder,
    pub(super) drain: &'a CancellationToken,
}

impl Lane<'_> {
    /// Serves `io` until it closes or hyper must take it.
    pub(super) async fn run(&self, io: &mut Watched<TcpStream>) -> End {
        let max_head = self.app.config().listen.max_header_bytes;
        let mut buf = BytesMut::with_capacity(4096);
        let mut tail = BytesMut::with_capacity(128);
        let mut served = false;
        loop {
            let head = match wire::parse_request(&buf) {
                Parsed::Head(head) => head,
                // An HTTP/2 preface is a connection's first bytes or nothing (hyper alone
                // would refuse it here too; its watchdog also took this for HTTP/1.1).
                Parsed::Other if served && buf.starts_with(b"PRI ") => return End::Closed,
                Parsed::HugeBody => return self.too_large(io, None).await,
                Parsed::Other => return End::Handoff(buf.freeze()),
                Parsed::Partial if buf.len() >= max_head => return End::Handoff(buf.freeze()),
                Parsed::Partial => {
                    if buf.is_empty() && self.activity.is_draining() {
                        return End::Closed;
                    }
                    if !read(io, &mut buf).await {
                        return End::Closed;
                    }
                    continue;
                }
            };
            served = true;
            let (len, framing) = (head.len, head.framing);
            let body = match framing {
                Framing::None => 0,
                Framing::Length(n) => n,
            };
            // A declared body over the limit is refused here, before anything is read of it,
            // as the driver would (hyper would refuse a `Content-Length` near 2^64 with 431).
            if body > self.app.config().listen.max_body_bytes {
                return self.too_large(io, Some(&head.parts)).await;
            }
            let Some(exchange) = (len as u64).checked_add(body) else {
                return End::Handoff(buf.freeze());
            };
            // `Content-Length: 0` is no body, as hyper reads it.
            let mut looked = None;
            if matches!(framing, Framing::None | Framing::Length(0)) {
                let guard = self.activity.enter();
                let started = Instant::now();
                match fast_path::answer(self.app, self.peer, head.parts).await {
                    Verdict::Hit(hit) => {
                        buf.advance(len);
                        // While draining, each answer is the connection's last.
                        let last = self.activity.is_draining();
                        let written = self.write_hit(io, &mut tail, &hit, last, started).await;
                        drop(guard);
                        if written.is_err() || last {
                            return End::Closed;
                        }
                        continue;
                    }
                    Verdict::Lend(l) => looked = l,
                }
            }
            let Some(rest) = self.lend(io, &mut buf, exchange, looked).await else {
                return End::Closed;
            };
            buf = rest;
        }
    }

    /// Writes a hit ([`write_hit`]) and its access line.
    async fn write_hit(
        &self,
        io: &mut Watched<TcpStream>,
        tail: &mut BytesMut,
        hit: &Hit,
        last: bool,
        started: Instant,
    ) -> io::Result<()> {
        let written = write_hit(io, tail, hit, last).await;
        let sent = Sent {
            status: hit.status,
            outcome: Some(hit.outcome),
            // No body byte counts when the write failed: the client went away.
            bytes: if written.is_ok() { hit.body.len() } else { 0 },
            request_id: hit.request_id.to_str().unwrap_or("-"),
        };
        self.log(&hit.request, &sent, started);
        written
    }

    /// The metrics of an answer the lane wrote (always), and its access line (when on).
    fn log(&self, request: &Parts, sent: &Sent<'_>, started: Instant) {
        let elapsed = started.elapsed();
        let outcome = sent.outcome.map_or(CacheOutcome::None, Outcome::metric);
        self.app
            .metrics
            .answered(sent.status, outcome, sent.bytes as u64, elapsed);
        if !self.app.access.enabled() {
            return;
        }
        self.app.access.write(&access::Line {
            method: request.method.as_str(),
            uri: &request.uri,
            status: sent.status,
            cache: sent.outcome.map_or("-", Outcome::x_cache),
            cache_status: sent.outcome.map_or("-", Outcome::cache_status),
            replica: "-",
            bytes: sent.bytes as u64,
            elapsed,
            request_id: sent.request_id,
            host: access::host(request.headers.get(http::header::HOST), &request.uri),
            peer: self.peer.addr,
        });
    }

    /// Refuses a request whose declared body is over `listen.max_body_bytes` (413), its body
    /// unread, and ends the connection; with its access line when its head is known.
    async fn too_large(&self, io: &mut Watched<TcpStream>, request: Option<&Parts>) -> End {
        let started = Instant::now();
        self.app.metrics.body_too_large.inc();
        let _ = io.write_all(TOO_LARGE).await;
        if let Some(request) = request {
            let sent = Sent {
                status: 413,
                outcome: None,
                bytes: TOO_LARGE_BODY,
                request_id: "-",
            };
            self.log(request, &sent, started);
        }
        End::Closed
    }

    /// Runs one exchange of `len` bytes (head and body, `buf` holding their start) through
    /// hyper and the driver. Returns what was read past it, or `None` when the connection
    /// must close.
    async fn lend(
        &self,
        io: &mut Watched<TcpStream>,
        buf: &mut BytesMut,
        len: u64,
        looked: Option<Looked>,
    ) -> Option<BytesMut> {
        let held = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
        let prefix = buf.split_to(held).freeze();
        let rest = std::mem::take(buf);
        // hyper sees exactly this exchange: its bytes, then end-of-file.
        let lent = Rewind::bounded(prefix, &mut *io, len - held as u64);
        let (app, peer, activity) = (self.app, self.peer, self.activity);
        // The exchange is one request: it gets the lane's lookup. Boxed: the connection is
        // polled by hand (`poll_without_shutdown`), which wants its service futures `Unpin`.
        let looked = std::cell::Cell::new(looked);
        let svc = hyper::service::service_fn(move |mut req| {
            if let Some(l) = looked.take() {
                req.extensions_mut().insert(l);
            }
            Box::pin(super::call(app, peer, activity, req))
        });
        let mut conn = self.lender.serve_connection(TokioIo::new(lent), svc);
        let mut closing = false;
        let ended = loop {
            tokio::select! {
                // The connection first: its first poll reads the whole head from the prefix
                // and starts the request, so a drain seen afterwards finishes the answer
                // instead of closing a connection hyper still thinks idle.
                biased;
                r = poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
                // The response then says `Connection: close`, and the lane closes after it.
                () = self.drain.cancelled(), if !closing => {
                    closing = true;
                    std::pin::Pin::new(&mut conn).graceful_shutdown();
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(peer = %self.peer.addr, error = %e, "lent exchange ended with error");
            return None;
        }
        let parts = conn.into_parts();
        // The connection goes on only when hyper read exactly this exchange and nothing is
        // left of it anywhere: not on the socket (hyper refused the request before reading
        // its body), not in hyper's buffer (it only ever saw this exchange's bytes, so
        // anything there would be this request's, never the next one's), and the answer did
        // not say `Connection: close` (draining).
        if closing || !parts.io.inner().is_spent() || !parts.read_buf.is_empty() {
            return None;
        }
        Some(rest)
    }
}

/// Reads more of the next head into `buf`; `false` when the client closed or the socket
/// failed. (Draining while idle is the connection's select: it drops the lane.)
async fn read(io: &mut Watched<TcpStream>, buf: &mut BytesMut) -> bool {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    matches!(io.read_buf(buf).await, Ok(n) if n > 0)
}

/// Writes a hit: its prepared head, the per-response lines (and `Connection: close` when it
/// is the `last` on the connection), the body; one `writev` when the socket takes it all, or
/// the head then `sendfile` for a sealed body.
async fn write_hit(
    io: &mut Watched<TcpStream>,
    tail: &mut BytesMut,
    hit: &Hit,
    last: bool,
) -> io::Result<()> {
    tail.clear();
    if last {
        tail.put_slice(b"connection: close\r\n");
    }
    tail.put_slice(b"age: ");
    tail.put_slice(itoa::Buffer::new().format(hit.age).as_bytes());
    tail.put_slice(b"\r\nx-request-id: ");
    tail.put_slice(hit.request_id.as_bytes());
    tail.put_slice(b"\r\ndate: ");
    wire::put_date(tail);
    tail.put_slice(b"\r\n\r\n");
    let body = match &hit.body {
        Held::Heap(body) => body,
        #[cfg(target_os = "linux")]
        Held::Sealed(body) => return write_sealed(io, [&hit.wire, tail], body).await,
        #[cfg(not(target_os = "linux"))]
        Held::Sealed(body) => body.never(),
    };
    let mut slices = [
        IoSlice::new(&hit.wire),
        IoSlice::new(tail),
        IoSlice::new(body),
    ];
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = io.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Writes a head and a sealed body: the head with `MSG_MORE`, so that it leaves in the body's
/// first segment as with `writev`, then the body by `sendfile` (the socket references the
/// file's pages; see [`crate::cache::sealed`]).
#[cfg(target_os = "linux")]
async fn write_sealed(io: &Watched<TcpStream>, head: [&[u8]; 2], body: &Sealed) -> io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    let mut slices = head.map(IoSlice::new);
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = io
            .write_with(|fd| {
                let flags = SendFlags::MORE | SendFlags::NOSIGNAL;
                Ok(rustix::net::sendmsg(
                    fd,
                    bufs,
                    &mut SendAncillaryBuffer::default(),
                    flags,
                )?)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    let len = body.len() as u64;
    let mut offset = 0u64;
    while offset < len {
        let left = usize::try_from(len - offset).unwrap_or(usize::MAX);
        let n = io
            .write_with(|fd| {
                Ok(rustix::fs::sendfile(
                    fd,
                    body.fd(),
                    Some(&mut offset),
                    left,
                )?)
            })
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}
