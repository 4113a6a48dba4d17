//! Body types. Every body the gateway hands to hyper is a [`Body`]: a boxed stream of `Bytes`
//! frames, so upstream bodies stream through without being buffered and small bodies we make
//! ourselves (errors, health) are one `Full` frame.
//!
//! Two wrappers add lifetime-bound behaviour to a streaming body without copying it:
//! [`Guarded`] keeps a guard alive until the body is finished or dropped (in-flight counters),
//! [`Deadline`] fails the body when an absolute deadline passes (the total upstream timeout) or
//! when a client's upload sends nothing for too long.
//! [`Channel`] is a body fed frame by frame by another task (the streaming fill leader).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Boxed error of a body or service.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response and upstream request.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A body of fixed bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

pin_project! {
    /// A body that holds `guard` until it is dropped.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> Guarded<B, G> {
    /// Wraps `inner`; `guard` is dropped with the body.
    pub fn new(inner: B, guard: G) -> Self {
        Self { inner, guard }
    }
}

impl<B: HttpBody, G> HttpBody for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's request body failed while being forwarded (it disconnected or sent bad
/// framing): the client's fault, not the replica's.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(pub BoxError);

/// The client's request body sent nothing for this long (`listen.body_read_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("client request body sent nothing for {0:?}")]
pub struct BodyStalled(pub std::time::Duration);

/// The body did not finish before its deadline.
#[derive(Debug, thiserror::Error)]
#[error("body not finished before the total timeout")]
pub struct DeadlineExceeded;

pin_project! {
    /// A body that fails once its time bound passes: an absolute deadline ([`Deadline::new`]:
    /// [`DeadlineExceeded`], the total upstream timeout), or a gap between two frames
    /// ([`Deadline::idle`]: [`BodyStalled`], a client's upload that stopped; nginx's
    /// `client_body_timeout`). The timer is armed only when the body first has to wait: a
    /// response that is already buffered (most pages) never touches the timer wheel.
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        bound: Bound,
        sleep: Option<Pin<Box<Sleep>>>,
        // Waiting since the last frame (an idle bound counts from the first wait after one).
        waiting: bool,
    }
}

/// What a [`Deadline`] bounds.
#[derive(Debug, Clone, Copy)]
enum Bound {
    At(Instant),
    Idle(std::time::Duration),
}

impl<B> Deadline<B> {
    /// Wraps `inner` with an absolute deadline.
    pub fn new(inner: B, deadline: Instant) -> Self {
        Self::bounded(inner, Bound::At(deadline))
    }

    /// Wraps `inner`: at most `idle` without a frame.
    pub fn idle(inner: B, idle: std::time::Duration) -> Self {
        Self::bounded(inner, Bound::Idle(idle))
    }

    fn bounded(inner: B, bound: Bound) -> Self {
        Self {
            inner,
            bound,
            sleep: None,
            waiting: false,
        }
    }
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let until = match *this.bound {
            Bound::At(at) => at,
            Bound::Idle(idle) => Instant::now() + idle,
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if !*this.waiting {
            *this.waiting = true;
            if matches!(this.bound, Bound::Idle(_)) {
                sleep.as_mut().reset(until);
            }
        }
        match (sleep.as_mut().poll(cx), *this.bound) {
            (Poll::Ready(()), Bound::At(_)) => Poll::Ready(Some(Err(DeadlineExceeded.into()))),
            (Poll::Ready(()), Bound::Idle(idle)) => {
                Poll::Ready(Some(Err(BodyStalled(idle).into())))
            }
            (Poll::Pending, _) => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The sending half of a [`Channel`] body.
pub type Sender = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A body fed by another task (the streaming fill leader: one task reads the replica, keeps a
/// copy for the store and forwards each frame here). `len` is the exact length when known, so
/// hyper frames it with Content-Length.
#[derive(Debug)]
pub struct Channel {
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    len: Option<u64>,
}

impl Channel {
    /// A body and the sender that feeds it (`capacity` frames in flight, then the sender
    /// waits: a slow client slows the copy down, bounded by the listener's send timeout).
    pub fn new(capacity: usize, len: Option<u64>) -> (Sender, Channel) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (tx, Channel { rx, len })
    }
}

impl HttpBody for Channel {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
