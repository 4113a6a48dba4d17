//! Step 1 of the request flow: accept connections and run each one through the service stack,
//! and the gateway's lifecycle: bind, serve, drain on shutdown.
//!
//! With the cache on, an HTTP/1.1 connection starts in the hit lane (`lane.rs`): fresh hits are
//! written straight from the socket, every other exchange is lent to hyper one at a time, and
//! what the lane does not frame (HTTP/2, upgrades, chunked request bodies, HTTP/1.0) is handed
//! to hyper for the rest of the connection. With the cache off or `listen.hit_lane = false`,
//! hyper serves every connection from its first byte.
//!
//! Shutdown: when the token passed to [`Server::run`] is cancelled, `/readyz` says no at once
//! and the listener keeps accepting for `listen.accept_grace` (the load balancer stops sending
//! meanwhile); then it closes (new connections are refused by the kernel, so whatever still
//! sends fails over), every connection is told to finish (h1: close after the current
//! response; h2: GOAWAY), and the process waits up to `listen.shutdown_grace` for in-flight
//! requests and tunnels. Whatever is still running then is cut.
//!
//! Binding: one socket per worker on the same port; another process shares the port only with
//! `listen.reuse_port` (`bind_listeners`).

/// The listener's HTTP/1.1 settings (`[listen]`), applied to either of hyper's builders: the
/// auto one of the listener, and the lane's HTTP/1.1 one for lent exchanges (two types with
/// the same methods).
macro_rules! http1_settings {
    ($builder:expr, $listen:expr) => {
        $builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size($listen.max_header_bytes)
            .preserve_header_case($listen.preserve_header_case)
            .keep_alive(true)
    };
}

mod conn;
mod lane;
mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::http::body::Guarded;
use crate::proxy::forwarded::Peer;
pub use conn::Expiry;

/// Builds the hyper connection builder from the listener config.
fn builder(app: &AppState) -> auto::Builder<TokioExecutor> {
    let config = app.config();
    let cfg = &config.listen;
    let mut b = auto::Builder::new(TokioExecutor::new());
    http1_settings!(b.http1(), cfg);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
    b
}

/// Binds `count` listening sockets on `addr`, one per worker, so each worker has its own
/// accept queue on the same port (`SO_REUSEPORT`: the kernel spreads connections). With port 0
/// the port is picked once and every socket takes it. `which` is the config key, named in errors.
///
/// Unless `share` (`listen.reuse_port`), no other process gets the port: one socket is bound
/// without `SO_REUSEPORT`; several are preceded by a guard bound without it, which fails when
/// anything listens there (as a second `isrgate serve` would otherwise join the group and
/// silently take half the connections) and is held until the workers' sockets listen, so no
/// other process can slip in between. With `share`, every socket sets `SO_REUSEPORT` and
/// another process that does too joins the group.
pub(crate) fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    which: &'static str,
    share: bool,
) -> Result<Vec<std::net::TcpListener>, crate::StartError> {
    let err = |error| crate::StartError::Bind { which, addr, error };
    let count = count.max(1);
    if count == 1 && !share {
        return Ok(vec![
            listening(bound(addr, false).map_err(err)?).map_err(err)?,
        ]);
    }
    let guard = if share {
        None
    } else {
        Some(bound(addr, false).map_err(err)?)
    };
    let mut all = Vec::with_capacity(count);
    let mut at = match &guard {
        Some(g) => local_addr(g).map_err(err)?,
        None => addr,
    };
    for _ in 0..count {
        let socket = bound(at, true).map_err(err)?;
        at = local_addr(&socket).map_err(err)?;
        all.push(listening(socket).map_err(err)?);
    }
    drop(guard);
    Ok(all)
}

/// A TCP socket bound to `addr` (not listening yet), with `SO_REUSEADDR` (a restart is not
/// refused by the previous process's TIME_WAIT connections) and, when `reuse_port`,
/// `SO_REUSEPORT`.
fn bound(addr: SocketAddr, reuse_port: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn local_addr(socket: &socket2::Socket) -> std::io::Result<SocketAddr> {
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("bound to a non-IP address"))
}

fn listening(socket: socket2::Socket) -> std::io::Result<std::net::TcpListener> {
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A bound std listener as a tokio listener of the current runtime.
pub(crate) fn into_tokio(l: std::net::TcpListener) -> std::io::Result<TcpListener> {
    TcpListener::from_std(l)
}

/// One worker: accepts on `listener` until the gateway drains, then waits until every
/// connection has finished (or the grace period is cut).
pub(crate) async fn serve_worker(app: Arc<AppState>, listener: std::net::TcpListener) {
    let listener = match into_tokio(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot use its listener");
            return;
        }
    };
    if let Some(own) = &app.own_redis {
        // Its connections are tasks of this runtime, so reads never leave this thread.
        own.redis().start();
    }
    accept_loop(Arc::clone(&app), listener, app.draining.clone()).await;
    tokio::select! {
        _ = app.tasks.wait() => {}
        _ = app.hard_stop.cancelled() => {
            // Connections watch the same token and end; give them a moment to do so.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Descriptor pressure at accept (EMFILE, ENFILE): a client left in the kernel's queue hangs
/// until it gives up, and the accept loop would spin on the same error. First, idle
/// connections (keep-alive between requests, or silent since they connected) are told to close
/// ([`Pressure::shed`]: again as long as the last time closed some, else at most once per
/// [`Pressure::SHED_EVERY`]), as nginx reuses its idle keep-alive connections when it runs
/// out: the waiting client is then accepted and served.
/// When that freed nothing, a descriptor kept in reserve (libuv's trick) is given up, the
/// waiting connection accepted and closed at once (the client sees the connection end, not a
/// hang), and the reserve taken again. The warning is logged once per
/// [`Pressure::WARN_EVERY`], with the count refused.
struct Pressure {
    spare: Option<std::fs::File>,
    refused: u64,
    warned_at: Option<std::time::Instant>,
    /// Bumped to make every idle connection close (`serve` watches it).
    shed: tokio::sync::watch::Sender<u64>,
    /// When idle connections were last told to close, and `idle_closes` then.
    shed_at: Option<(std::time::Instant, u64)>,
}

impl Pressure {
    const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    const SHED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

    fn new() -> Pressure {
        Pressure {
            spare: std::fs::File::open("/dev/null").ok(),
            refused: 0,
            warned_at: None,
            shed: tokio::sync::watch::Sender::new(0),
            shed_at: None,
        }
    }

    /// What each connection watches to learn that idle connections must close.
    fn shedding(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shed.subscribe()
    }

    /// Tells idle connections to close, unless the last time closed none and was within
    /// [`Pressure::SHED_EVERY`]; `true` when it was done now (the caller lets them close, then
    /// accepts again). `closed` is the count of idle connections closed so far.
    fn shed(&mut self, closed: u64) -> bool {
        let freed_some = self
            .shed_at
            .is_none_or(|(at, before)| closed > before || at.elapsed() >= Self::SHED_EVERY);
        if !freed_some {
            return false;
        }
        if self
            .shed_at
            .is_none_or(|(at, _)| at.elapsed() >= Self::WARN_EVERY)
        {
            tracing::warn!(
                "out of descriptors: idle client connections closed to serve new ones (logged at most every 10 s)"
            );
        }
        self.shed_at = Some((std::time::Instant::now(), closed));
        self.shed.send_modify(|n| *n += 1);
        true
    }

    async fn refuse_one(&mut self, listener: &TcpListener, e: &std::io::Error, closed: u64) {
        // EMFILE (this process) and ENFILE (the system), as Linux numbers them.
        let out_of_descriptors = matches!(e.raw_os_error(), Some(24 | 23));
        if out_of_descriptors && self.shed(closed) {
            // A moment for the idle connections' tasks to close their sockets.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            return;
        }
        if out_of_descriptors && self.spare.take().is_some() {
            if let Ok(Ok((stream, _))) =
                tokio::time::timeout(std::time::Duration::from_millis(1), listener.accept()).await
            {
                drop(stream);
                self.refused += 1;
            }
            self.spare = std::fs::File::open("/dev/null").ok();
        } else {
            // Anything else (or no reserve to give up): back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if self
            .warned_at
            .is_none_or(|t| t.elapsed() >= Self::WARN_EVERY)
        {
            self.warned_at = Some(std::time::Instant::now());
            tracing::warn!(
                error = %e, refused = self.refused,
                "accept failed; connections refused at once while descriptors run out (logged at most every 10 s)"
            );
        }
    }
}

/// Accepts on `listener` until `drain` is cancelled.
async fn accept_loop(app: Arc<AppState>, listener: TcpListener, drain: CancellationToken) {
    let builder = Arc::new(builder(&app));
    let lender = Arc::new(lane::lender(&app));
    let mut pressure = Pressure::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = drain.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    pressure.refuse_one(&listener, &e, app.metrics.idle_closes.get()).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let task = serve(
            Arc::clone(&app),
            Arc::clone(&builder),
            Arc::clone(&lender),
            stream,
            peer,
            drain.clone(),
            pressure.shedding(),
        );
        app.tasks.spawn(task);
    }
}

/// One connection: through the hit lane when it runs (HTTP/1.1 hits answered there, other
/// exchanges lent to hyper), then, for what the lane hands off (or without the lane), hyper's
/// HTTP/1.1 or h2c server; one watchdog bounds both.
async fn serve(
    app: Arc<AppState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    lender: Arc<hyper::server::conn::http1::Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    drain: CancellationToken,
    shedding: tokio::sync::watch::Receiver<u64>,
) {
    let activity = Arc::new(conn::Activity::default());
    // Idle connections close when the accept loop runs out of descriptors (`Pressure`). One
    // future for the connection's life (re-armed only after it fires): a `changed()` made
    // afresh on every wake would register and drop a waiter each time.
    let mut shed = shed_signal(shedding);
    let connected = std::time::Instant::now();
    // Closed to make room (counted): idle, and either kept alive after a request or silent for
    // a while (a client that just connected has its request on the way, likely unread yet).
    let close_for_room = |a: &conn::Activity| {
        let close = a.is_idle() && (a.has_spoken() || connected.elapsed() >= SILENT_GRACE);
        if close {
            app.metrics.idle_closes.inc();
        }
        close
    };
    let peer_info = Arc::new(Peer::new(peer, &app.policy.forwarded));
    let config = app.config();
    let listen = &config.listen;
    let bounds = conn::Bounds {
        header_read: listen.header_read_timeout,
        idle: listen.idle_timeout,
        send: listen.send_timeout,
    };
    let watchdog = conn::watchdog(Arc::clone(&activity), bounds);
    tokio::pin!(watchdog);
    let mut io = conn::Watched::new(stream, Arc::clone(&activity));
    let mut read = bytes::Bytes::new();
    if lane::enabled(&app) {
        let lane = lane::Lane {
            app: &app,
            peer: &peer_info,
            activity: &activity,
            lender: &lender,
            drain: &drain,
        };
        let run = lane.run(&mut io);
        tokio::pin!(run);
        // One `cancelled()` for the connection's life, and the hard stop only once draining
        // (it never comes first): each is a lock taken on every wake of this task.
        let drained = drain.cancelled();
        tokio::pin!(drained);
        let mut draining = false;

        let ended = loop {
            tokio::select! {
                ended = &mut run => break ended,
                () = &mut drained, if !draining => {
                    draining = true;
                    activity.start_draining();
                    if activity.is_idle() {
                        return;
                    }
                }
                rx = &mut shed => {
                    if close_for_room(&activity) {
                        return;
                    }
                    shed = shed_signal(rx);
                }
                expiry = &mut watchdog => {
                    expired(&app, peer, expiry);
                    return;
                }
                () = app.hard_stop.cancelled(), if draining => return,
            }
        };
        match ended {
            lane::End::Closed => return,
            lane::End::Handoff(bytes) => read = bytes,
        }
    }
    let svc = {
        let (app, activity) = (Arc::clone(&app), Arc::clone(&activity));
        service_fn(move |req| call(&app, &peer_info, &activity, req))
    };
    let io = TokioIo::new(conn::Rewind::new(read, io));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with error");
                }
                return;
            }
            _ = drain.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            rx = &mut shed, if !closing => {
                if close_for_room(&activity) {
                    return;
                }
                shed = shed_signal(rx);
            }
            expiry = &mut watchdog, if !closing => {
                if expiry == Expiry::Idle {
                    app.metrics.idle_closes.inc();
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                } else {
                    expired(&app, peer, expiry);
                    return;
                }
            }
            _ = app.hard_stop.cancelled() => return,
        }
    }
}

/// How long a connection that has sent nothing yet is spared when idle ones are shed.
const SILENT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves at the next [`Pressure::shed`], handing the receiver back for the one after;
/// never, once the accept loop has ended.
fn shed_signal(
    mut rx: tokio::sync::watch::Receiver<u64>,
) -> std::pin::Pin<Box<dyn Future<Output = tokio::sync::watch::Receiver<u64>> + Send>> {
    Box::pin(async move {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        rx
    })
}

/// Counts and logs a connection the watchdog ends (the caller closes it).
fn expired(app: &AppState, peer: SocketAddr, expiry: Expiry) {
    match expiry {
        Expiry::HeaderTimeout => {
            app.metrics.header_timeouts.inc();
            tracing::debug!(%peer, "request head not received in time; closing");
        }
        Expiry::SendTimeout => {
            app.metrics.send_timeouts.inc();
            tracing::debug!(%peer, "client did not read the response in time; closing");
        }
        Expiry::Idle => {
            app.metrics.idle_closes.inc();
            tracing::debug!(%peer, "idle; closing");
        }
    }
}

/// What the service answers: the driver's response, counted in flight until its body ends.
type Answer = hyper::Response<Guarded<crate::http::body::Body, conn::RequestGuard>>;

/// Runs one request of a connection: counted in flight (until its response body ends), then
/// through the listener's concerns and the driver. Every connection's service calls this.
fn call(
    app: &Arc<AppState>,
    peer: &Arc<Peer>,
    activity: &Arc<conn::Activity>,
    req: hyper::Request<Incoming>,
) -> impl Future<Output = Result<Answer, Infallible>> + Send + use<> {
    let guard = activity.enter();
    let call = request::call(Arc::clone(app), Arc::clone(peer), req);
    async move { Ok(call.await.map(|b| Guarded::new(b, guard))) }
}
