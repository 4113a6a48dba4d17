//! One client connection: hyper (HTTP/1.1 or h2c, detected from the first bytes) over a socket
//! wrapper that notes activity, plus a watchdog that enforces the connection-level bounds
//! hyper cannot express separately:
//!
//! - **header read**: a request head must arrive within `header_read_timeout` of its first byte
//!   (slowloris), and a new connection's first byte within `header_read_timeout` of the accept
//!   (a silent socket); the connection is dropped otherwise;
//! - **idle**: a connection with nothing in flight and no bytes for `idle_timeout` is closed
//!   gracefully (h1: close; h2: GOAWAY);
//! - **send**: a client that accepts none of a pending response for `send_timeout` (its socket
//!   stays unwritable) is dropped, as nginx's `send_timeout`: a slow reader must not pin the
//!   replica connection and its in-flight slot.
//!
//! hyper's own h1 `header_read_timeout` starts whenever it waits for a head, so on keep-alive
//! connections it also cuts idle time to that bound, which would close connections a load
//! balancer keeps pooled (ALB: 60 s idle) long before `idle_timeout`. So it is off and the
//! watchdog does both. "In flight" counts from the request head until its response body ends.
//! The header-read bound is for HTTP/1.1 only: on h2, frames arrive between requests (PING
//! acks, WINDOW_UPDATE) that are not request heads; the protocol is told by the first bytes
//! (the h2c preface starts with `PRI`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock::monotonic_ms;

/// What one connection has been doing, shared by its socket wrapper, its service and its
/// watchdog.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicU32,
    touched: AtomicBool,
    head_started_ms: AtomicU64,
    write_blocked_ms: AtomicU64,
    sniffed: AtomicBool,
    http2: AtomicBool,
    draining: AtomicBool,
}

impl Activity {
    fn on_read(&self, bytes: &[u8]) {
        self.touched.store(true, Relaxed);
        if !self.sniffed.load(Relaxed) {
            self.sniffed.store(true, Relaxed);
            self.http2.store(bytes.starts_with(b"PRI"), Relaxed);
        }
        if !self.http2.load(Relaxed)
            && self.in_flight.load(Relaxed) == 0
            && self.head_started_ms.load(Relaxed) == 0
        {
            self.head_started_ms.store(monotonic_ms().max(1), Relaxed);
        }
    }

    fn on_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.touched.store(true, Relaxed);
                if self.write_blocked_ms.load(Relaxed) != 0 {
                    self.write_blocked_ms.store(0, Relaxed);
                }
            }
            Poll::Pending if self.write_blocked_ms.load(Relaxed) == 0 => {
                self.write_blocked_ms.store(monotonic_ms().max(1), Relaxed);
            }
            _ => {}
        }
    }

    /// The gateway drains: finish what is in flight, then close (read by the hit lane before
    /// each request; a relaxed load where a cancellation token would take a lock).
    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether [`Activity::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// The client has sent something since it connected.
    pub fn has_spoken(&self) -> bool {
        self.sniffed.load(Relaxed)
    }

    /// Nothing in flight and no part of a request head read: closing now cuts nothing.
    pub fn is_idle(&self) -> bool {
        self.in_flight.load(Relaxed) == 0 && self.head_started_ms.load(Relaxed) == 0
    }

    /// A request head was parsed: it is in flight until the guard drops.
    pub fn enter(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_started_ms.store(0, Relaxed);
        RequestGuard(Arc::clone(self))
    }
}

/// Keeps a request counted as in flight on its connection.
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
        self.0.touched.store(true, Relaxed);
    }
}

pin_project! {
    /// A socket that records reads and writes in its [`Activity`].
    pub struct Watched<IO> {
        #[pin]
        io: IO,
        activity: Arc<Activity>,
    }
}

impl<IO> Watched<IO> {
    /// Wraps `io`.
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }
}

#[cfg(target_os = "linux")]
impl Watched<tokio::net::TcpStream> {
    /// Runs `op`, a non-blocking write made on the socket's descriptor directly (`sendfile`,
    /// `sendmsg` with flags), once the socket takes it, and records it as a `poll_write`.
    pub async fn write_with(
        &self,
        mut op: impl FnMut(std::os::fd::BorrowedFd<'_>) -> io::Result<usize>,
    ) -> io::Result<usize> {
        use std::os::fd::AsFd;
        loop {
            match self
                .io
                .try_io(tokio::io::Interest::WRITABLE, || op(self.io.as_fd()))
            {
                Ok(n) => {
                    self.activity.on_write(&Poll::Ready(Ok(n)));
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.activity.on_write(&Poll::Pending);
                    self.io.writable().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl<IO: AsyncRead> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<IO: AsyncWrite> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write(cx, data);
        this.activity.on_write(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.io.poll_write_vectored(cx, bufs);
        this.activity.on_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A request head took longer than the header-read timeout.
    HeaderTimeout,
    /// Nothing happened for the idle timeout.
    Idle,
    /// The client read nothing of a pending response for the send timeout.
    SendTimeout,
}

impl Expiry {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Expiry::HeaderTimeout => "header_timeout",
            Expiry::Idle => "idle",
            Expiry::SendTimeout => "send_timeout",
        }
    }
}

/// The bounds the watchdog enforces.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Whole request head, from its first byte (HTTP/1.1).
    pub header_read: Duration,
    /// Nothing in flight, no bytes.
    pub idle: Duration,
    /// Response pending, socket unwritable.
    pub send: Duration,
}

/// Resolves when the connection breaks one of the bounds; runs forever otherwise.
pub async fn watchdog(activity: Arc<Activity>, bounds: Bounds) -> Expiry {
    let shortest = bounds.header_read.min(bounds.idle).min(bounds.send);
    let tick = (shortest / 4).clamp(Duration::from_millis(25), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ms = |d: Duration| d.as_millis() as u64;
    let (header_ms, idle_ms, send_ms) = (ms(bounds.header_read), ms(bounds.idle), ms(bounds.send));
    let mut quiet_since = monotonic_ms();
    let accepted = quiet_since;
    loop {
        interval.tick().await;
        let now = monotonic_ms();
        // A connection that never sent a byte is a head that has not started: it gets the
        // header bound, not the idle one (thousands of silent sockets would otherwise hold
        // descriptors for `idle_timeout`).
        if !activity.sniffed.load(Relaxed) && now.saturating_sub(accepted) > header_ms {
            return Expiry::HeaderTimeout;
        }
        let blocked = activity.write_blocked_ms.load(Relaxed);
        if blocked != 0 && now.saturating_sub(blocked) > send_ms {
            return Expiry::SendTimeout;
        }
        if activity.in_flight.load(Relaxed) > 0 {
            activity.touched.store(false, Relaxed);
            quiet_since = now;
            continue;
        }
        let started = activity.head_started_ms.load(Relaxed);
        if started != 0 && now.saturating_sub(started) > header_ms {
            return Expiry::HeaderTimeout;
        }
        if activity.touched.swap(false, Relaxed) {
            quiet_since = now;
        } else if now.saturating_sub(quiet_since) >= idle_ms {
            return Expiry::Idle;
        }
    }
}

pin_project! {
    /// A socket whose first reads return bytes already read from it (by the hit lane) before
    /// the socket's own: how hyper takes over a connection mid-stream ([`Rewind::new`]), or is
    /// lent one exchange of it ([`Rewind::bounded`]: at most that many more bytes from the
    /// socket, then end-of-file).
    pub struct Rewind<IO> {
        prefix: bytes::Bytes,
        #[pin]
        io: IO,
        budget: Option<u64>,
    }
}

impl<IO> Rewind<IO> {
    /// `io`, read from `prefix` first.
    pub fn new(prefix: bytes::Bytes, io: IO) -> Self {
        Self {
            prefix,
            io,
            budget: None,
        }
    }

    /// `io`, read from `prefix` first, then at most `budget` bytes of its own, then EOF.
    pub fn bounded(prefix: bytes::Bytes, io: IO, budget: u64) -> Self {
        Self {
            prefix,
            io,
            budget: Some(budget),
        }
    }

    /// Whether a bounded view has yielded every byte it was given.
    pub fn is_spent(&self) -> bool {
        self.prefix.is_empty() && self.budget == Some(0)
    }
}

impl<IO: AsyncRead> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            bytes::Buf::advance(this.prefix, n);
            return Poll::Ready(Ok(()));
        }
        let Some(budget) = this.budget else {
            return this.io.poll_read(cx, buf);
        };
        if *budget == 0 {
            return Poll::Ready(Ok(()));
        }
        let room = usize::try_from(*budget)
            .unwrap_or(usize::MAX)
            .min(buf.remaining());
        // Read into at most `room` bytes of `buf`'s unfilled part (initialized first, so this
        // stays safe code), then count what arrived as filled.
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        let polled = this.io.poll_read(cx, &mut limited);
        let n = limited.filled().len();
        if let Poll::Ready(Ok(())) = polled {
            buf.advance(n);
            *budget -= n as u64;
        }
        polled
    }
}

impl<IO: AsyncWrite> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
