//! Keep-alive connections to the replicas, one pool per worker thread, on hyper's low-level
//! HTTP/1.1 client (`hyper::client::conn::http1`).
//!
//! Checkout takes the most recently used idle connection to the replica (LIFO: warm sockets,
//! and the oldest ones age out), skipping closed or expired ones; with none, it connects
//! (bounded by `connect_timeout`) and spawns the connection task on the worker's runtime.
//! A connection returns to the pool only when its response body has been read to the end
//! ([`Lease`]); one whose body was abandoned is dirty and hyper closes it.
//!
//! Why not hyper-util's pooled client: measured with callgrind on the pass-through path, its
//! shared pool (keyed hashing, checkout/connect racing futures, a lock shared by every worker)
//! cost about 6k instructions per request on top of the exchange itself. Per worker, the pool
//! is a short `Vec` behind an uncontended mutex that is never held across an `.await`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::uri::Authority;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;

use crate::http::body::{Body, BoxError};

/// Why a pooled exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be established (refused, unreachable, timed out, handshake failed).
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    /// The exchange failed on an established connection.
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
}

/// Pool settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// TCP connect (and handshake) bound.
    pub connect_timeout: Duration,
    /// Idle connections older than this are not reused.
    pub idle_timeout: Duration,
    /// Idle connections kept per replica.
    pub max_idle_per_replica: usize,
    /// Keep header-name case (hyper's case map) on requests and responses.
    pub preserve_header_case: bool,
}

struct Idle {
    authority: Authority,
    sender: SendRequest<Body>,
    since: Instant,
}

/// One worker's connections to the replicas.
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// Shared by every worker's pool; a reload replaces them ([`Pool::set_settings`]).
    settings: Arc<ArcSwap<Settings>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |v| v.len());
        f.debug_struct("Pool")
            .field("idle", &idle)
            .field("settings", &self.settings)
            .finish()
    }
}

impl Pool {
    /// An empty pool.
    pub fn new(settings: Settings) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            settings: Arc::new(ArcSwap::from_pointee(settings)),
        }
    }

    /// An empty pool with the same settings, kept the same through reloads (another
    /// worker's).
    pub fn sibling(&self) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            settings: Arc::clone(&self.settings),
        }
    }

    /// Whether header-name case is kept (`listen.preserve_header_case`, fixed at start).
    pub fn preserve_header_case(&self) -> bool {
        self.settings.load().preserve_header_case
    }

    /// Replaces the settings of this pool and its siblings: new connections use them, idle
    /// ones are judged by them.
    pub fn set_settings(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// Sends `req` to `authority` on a pooled or new connection. The response body must be
    /// wrapped with the returned [`Lease`] ([`Leased`]) for the connection to be reused.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        let mut sender = match self.checkout(authority).await {
            Some(s) => s,
            None => self.connect(authority).await?,
        };
        let response = sender.send_request(req).await?;
        let lease = Lease {
            pool: Arc::clone(self),
            authority: authority.clone(),
            sender: Some(sender),
        };
        Ok((response, lease))
    }

    async fn checkout(&self, authority: &Authority) -> Option<SendRequest<Body>> {
        loop {
            let candidate = {
                let mut idle = crate::sync::lock(&self.idle);
                let i = idle.iter().rposition(|c| &c.authority == authority)?;
                idle.swap_remove(i)
            };
            if candidate.sender.is_closed()
                || candidate.since.elapsed() >= self.settings.load().idle_timeout
            {
                continue;
            }
            let mut sender = candidate.sender;
            // Ready at once unless the connection task has not yet seen the last body end.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Body>, PoolError> {
        let settings = **self.settings.load();
        let connect = async {
            let stream = TcpStream::connect(authority.as_str()).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = Builder::new()
                .preserve_header_case(settings.preserve_header_case)
                .handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                // Upgrades: a 101 hands the socket to the tunnel instead of closing it.
                if let Err(e) = conn.with_upgrades().await {
                    tracing::trace!(error = %e, "replica connection ended");
                }
            });
            Ok::<_, std::io::Error>(sender)
        };
        match tokio::time::timeout(settings.connect_timeout, connect).await {
            Ok(Ok(sender)) => Ok(sender),
            Ok(Err(e)) => Err(PoolError::Connect(e.into())),
            Err(_) => Err(PoolError::Connect(
                format!("timed out after {:?}", settings.connect_timeout).into(),
            )),
        }
    }

    fn checkin(&self, authority: Authority, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = crate::sync::lock(&self.idle);
        let settings = **self.settings.load();
        let max_age = settings.idle_timeout;
        idle.retain(|c| now.duration_since(c.since) < max_age && !c.sender.is_closed());
        let same = idle.iter().filter(|c| c.authority == authority).count();
        if same < settings.max_idle_per_replica {
            idle.push(Idle {
                authority,
                sender,
                since: now,
            });
        }
    }
}

/// A connection in use. It goes back to the pool only through [`Leased`] seeing its body end;
/// dropped any other way (an abandoned body, an error) the connection is not reused and hyper
/// closes it once its last sender is gone.
pub struct Lease {
    pool: Arc<Pool>,
    authority: Authority,
    sender: Option<SendRequest<Body>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Gives the connection up (an upgrade takes the socket; it never returns to the pool).
    pub fn forget(mut self) {
        self.sender = None;
    }

    fn release(&mut self, reusable: bool) {
        if let Some(sender) = self.sender.take() {
            if reusable {
                self.pool.checkin(self.authority.clone(), sender);
            }
        }
    }
}

pin_project! {
    /// A response body that returns its connection to the pool once read to the end.
    pub struct Leased<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B: HttpBody> Leased<B> {
    /// Wraps a response body with its lease. An empty body (HEAD, 304, `Content-Length: 0`)
    /// is already at its end and is never polled, so its connection goes back at once.
    pub fn new(inner: B, mut lease: Lease) -> Self {
        let lease = if inner.is_end_stream() {
            lease.release(true);
            None
        } else {
            Some(lease)
        };
        Self { inner, lease }
    }
}

impl<B: HttpBody> HttpBody for Leased<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        // Read to the end (the last frame, or the end after it): the connection is clean and
        // goes back to the pool at once, before the client has even received the bytes.
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if done {
            if let Some(mut lease) = this.lease.take() {
                lease.release(true);
            }
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
