//! `FakeNext`: an in-process HTTP/1.1 origin that behaves like a Next.js replica as far as the
//! gateway can tell. Routes are declared like a scenario:
//!
//! ```ignore
//! let origin = FakeNext::start(|o| {
//!     o.route("/p", Route::html("<p>hi</p>").header("cache-control", "s-maxage=60"));
//! }).await;
//! ```
//!
//! It counts requests per path and the most answered at once, keeps the last request head per
//! path (to assert what the gateway forwarded), and can be stopped and restarted on the same
//! port (a replica dying and coming back).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What a route answers.
#[derive(Clone)]
pub struct Route {
    status: StatusCode,
    headers: Vec<(String, String)>,
    body: RouteBody,
    delay: Duration,
    gate: Option<Gate>,
    /// What an RSC request (`RSC: 1`) of the same path gets instead, as an App Router page.
    rsc: Option<Arc<Route>>,
}

/// Holds a route's answers back until [`Gate::open`]: a render that lasts exactly as long as
/// the test wants, with no timing involved.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }

    /// Lets every held and later answer through.
    pub fn open(&self) {
        self.0.close();
    }

    async fn pass(&self) {
        // A closed semaphore is an open gate: `acquire` fails at once from then on.
        let _ = self.0.acquire().await;
    }
}

#[derive(Clone)]
enum RouteBody {
    Bytes(Bytes),
    /// `n` chunks of `size` bytes, generated as they are sent (never whole in memory).
    Stream {
        chunks: usize,
        size: usize,
    },
    /// Like `Stream`, but waits for `gate` before sending chunk `gate_after`.
    Gated {
        chunks: usize,
        size: usize,
        gate_after: usize,
        gate: Arc<tokio::sync::Notify>,
    },
    /// Body followed by trailers.
    WithTrailers(Bytes, Vec<(String, String)>),
    /// Echo the request body back.
    Echo,
    /// `<p>` + the request's value of this header (`-` when absent) + `</p>`.
    HeaderValue(String),
    /// WebSocket-style upgrade; after 101 the connection echoes bytes.
    UpgradeEcho,
}

impl Route {
    /// 200 with an HTML body.
    pub fn html(body: &str) -> Route {
        Route {
            status: StatusCode::OK,
            headers: vec![("content-type".into(), "text/html; charset=utf-8".into())],
            body: RouteBody::Bytes(Bytes::copy_from_slice(body.as_bytes())),
            delay: Duration::ZERO,
            gate: None,
            rsc: None,
        }
    }

    /// A status with an empty body.
    pub fn status(code: u16) -> Route {
        Route {
            status: StatusCode::from_u16(code).expect("status"),
            headers: Vec::new(),
            body: RouteBody::Bytes(Bytes::new()),
            delay: Duration::ZERO,
            gate: None,
            rsc: None,
        }
    }

    /// A streamed body of `chunks` × `size` bytes (byte i of the stream is `i % 251`).
    pub fn stream(chunks: usize, size: usize) -> Route {
        Route {
            body: RouteBody::Stream { chunks, size },
            ..Route::status(200)
        }
    }

    /// A streamed body that stops after `gate_after` chunks until `gate` is notified.
    pub fn gated_stream(
        chunks: usize,
        size: usize,
        gate_after: usize,
        gate: Arc<tokio::sync::Notify>,
    ) -> Route {
        Route {
            body: RouteBody::Gated {
                chunks,
                size,
                gate_after,
                gate,
            },
            ..Route::status(200)
        }
    }

    /// A body with trailers (chunked).
    pub fn trailers(body: &str, trailers: &[(&str, &str)]) -> Route {
        Route {
            body: RouteBody::WithTrailers(
                Bytes::copy_from_slice(body.as_bytes()),
                trailers
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            ..Route::status(200)
        }
    }

    /// Echoes the request body.
    pub fn echo() -> Route {
        Route {
            body: RouteBody::Echo,
            ..Route::status(200)
        }
    }

    /// An HTML page that says the request's value of `name`: a render for that value.
    pub fn says_header(name: &str) -> Route {
        Route {
            body: RouteBody::HeaderValue(name.to_owned()),
            ..Route::html("")
        }
    }

    /// Accepts a WebSocket upgrade and echoes every message.
    pub fn upgrade_echo() -> Route {
        Route {
            body: RouteBody::UpgradeEcho,
            ..Route::status(101)
        }
    }

    /// Sets the status.
    pub fn with_status(mut self, code: u16) -> Route {
        self.status = StatusCode::from_u16(code).expect("status");
        self
    }

    /// Replaces the content type.
    pub fn content_type(mut self, ct: &str) -> Route {
        self.headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
        self.headers.push(("content-type".into(), ct.into()));
        self
    }

    /// Adds a response header (repeat a name for a multi-valued header).
    pub fn header(mut self, name: &str, value: &str) -> Route {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Waits before answering (a slow render).
    pub fn delay(mut self, d: Duration) -> Route {
        self.delay = d;
        self
    }

    /// Answers RSC requests (`RSC: 1`) of the path with `rsc`, as an App Router page answers
    /// its flight payload.
    pub fn with_rsc(mut self, rsc: Route) -> Route {
        self.rsc = Some(Arc::new(rsc));
        self
    }

    /// Answers only once `gate` is open (counted as seen as soon as it arrives).
    pub fn gated(mut self, gate: &Gate) -> Route {
        self.gate = Some(gate.clone());
        self
    }
}

/// What the origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Request target as received (path and query).
    pub target: String,
    /// Headers as received.
    pub headers: HeaderMap,
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Route>>,
    counts: Mutex<HashMap<String, usize>>,
    last: Mutex<HashMap<String, Seen>>,
    total: AtomicUsize,
    connections: AtomicUsize,
    /// Sent as `x-isrgate-build` on every response, as `@isrgate/next` makes a replica do.
    build: Mutex<Option<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Notified to drop every open connection ([`FakeNext::cut`]).
    cut: tokio::sync::Notify,
}

/// Counts a request as being answered while it lives.
struct Answering(Arc<State>);

impl Answering {
    fn start(state: &Arc<State>) -> Answering {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Answering(Arc::clone(state))
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Route declarations, passed to the closure of [`FakeNext::start`].
pub struct Routes<'a>(&'a State);

impl Routes<'_> {
    /// Declares `path` (exact match on the path, query ignored; `*` answers every path not
    /// declared).
    pub fn route(&self, path: &str, route: Route) -> &Self {
        self.0
            .routes
            .lock()
            .expect("lock")
            .insert(path.into(), route);
        self
    }
}

/// The fake origin.
pub struct FakeNext {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl FakeNext {
    /// Starts on a free port with the routes declared by `setup`. Unknown paths get 404.
    pub async fn start(setup: impl FnOnce(&Routes<'_>)) -> FakeNext {
        let state = Arc::new(State::default());
        setup(&Routes(&state));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let task = Some(tokio::spawn(serve(listener, Arc::clone(&state))));
        FakeNext { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Marks every later response with `x-isrgate-build: build` (a replica of that build), or
    /// stops marking them.
    pub fn set_build(&self, build: Option<&str>) {
        *self.state.build.lock().expect("lock") = build.map(str::to_owned);
    }

    /// Changes or adds a route while running.
    pub fn route(&self, path: &str, route: Route) {
        Routes(&self.state).route(path, route);
    }

    /// Requests seen for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.state
            .counts
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Requests seen in total.
    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }

    /// The most requests it was answering at once (from the head received to the response
    /// head handed to hyper, delays and gates included).
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The last request seen for `path`.
    pub fn last(&self, path: &str) -> Option<Seen> {
        self.state.last.lock().expect("lock").get(path).cloned()
    }

    /// Drops every open connection (a response mid-body ends there) and goes on listening: a
    /// replica's connections cut, without the window in which a stopped one refuses connects.
    pub fn cut(&self) {
        self.state.cut.notify_waiters();
    }

    /// Stops listening and drops every connection: connects are refused from now on.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port, with the same routes and counts.
    pub async fn restart(&mut self) {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("rebind origin port");
        self.task = Some(tokio::spawn(serve(listener, Arc::clone(&self.state))));
    }
}

impl Drop for FakeNext {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Connections are tasks of a JoinSet owned by this task: aborting it closes them all.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.connections.fetch_add(1, Ordering::SeqCst);
        let cut_state = Arc::clone(&state);
        let state = Arc::clone(&state);
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move {
                    let mut resp = answer(Arc::clone(&state), req).await?;
                    if let Some(b) = state.build.lock().expect("lock").as_deref() {
                        resp.headers_mut()
                            .insert("x-isrgate-build", b.parse().expect("build name"));
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .preserve_header_case(true)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            // The cut first: a connection woken by the cut and by its body at once is dropped.
            tokio::select! {
                biased;
                () = cut_state.cut.notified() => {}
                _ = conn => {}
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

async fn answer(
    state: Arc<State>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let _answering = Answering::start(&state);
    let path = req.uri().path().to_owned();
    state.total.fetch_add(1, Ordering::SeqCst);
    *state
        .counts
        .lock()
        .expect("lock")
        .entry(path.clone())
        .or_default() += 1;
    let target = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |pq| pq.to_string());
    state.last.lock().expect("lock").insert(
        path.clone(),
        Seen {
            target,
            headers: req.headers().clone(),
        },
    );
    let route = {
        let routes = state.routes.lock().expect("lock");
        routes.get(&path).or_else(|| routes.get("*")).cloned()
    };
    let is_rsc = req.headers().get("rsc").is_some_and(|v| v == "1");
    let route = match route {
        Some(r) if is_rsc && r.rsc.is_some() => r.rsc.as_deref().cloned(),
        other => other,
    };
    let Some(route) = route else {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"no route"),
        ));
    };
    if let Some(gate) = &route.gate {
        gate.pass().await;
    }
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    let body: Body = match route.body {
        RouteBody::Bytes(b) => Full::new(b).boxed(),
        RouteBody::HeaderValue(name) => {
            let value = req
                .headers()
                .get(name.as_str())
                .map_or("-".to_owned(), |v| {
                    String::from_utf8_lossy(v.as_bytes()).into_owned()
                });
            Full::new(Bytes::from(format!("<p>{value}</p>"))).boxed()
        }
        RouteBody::Stream { chunks, size } => {
            let frames = futures_util::stream::iter((0..chunks).map(move |c| {
                let start = c * size;
                let chunk: Vec<u8> = (start..start + size).map(|i| (i % 251) as u8).collect();
                Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
            }));
            StreamBody::new(frames).boxed()
        }
        RouteBody::Gated {
            chunks,
            size,
            gate_after,
            gate,
        } => {
            let frames = futures_util::stream::unfold(0usize, move |c| {
                let gate = Arc::clone(&gate);
                async move {
                    if c == chunks {
                        return None;
                    }
                    if c == gate_after {
                        gate.notified().await;
                    }
                    let start = c * size;
                    let chunk: Vec<u8> = (start..start + size).map(|i| (i % 251) as u8).collect();
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))), c + 1))
                }
            });
            StreamBody::new(frames).boxed()
        }
        RouteBody::WithTrailers(b, trailers) => {
            let mut t = HeaderMap::new();
            for (k, v) in trailers {
                t.insert(
                    http::HeaderName::try_from(k).expect("name"),
                    v.parse().expect("value"),
                );
            }
            let frames = futures_util::stream::iter(vec![
                Ok::<_, Infallible>(Frame::data(b)),
                Ok(Frame::trailers(t)),
            ]);
            StreamBody::new(frames).boxed()
        }
        RouteBody::Echo => {
            let collected = req
                .body_mut()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Full::new(collected).boxed()
        }
        RouteBody::UpgradeEcho => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                use futures_util::{SinkExt, StreamExt};
                use tokio_tungstenite::tungstenite::protocol::Role;
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let mut resp = Response::new(http_body_util::Empty::new().boxed());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert("connection", "upgrade".parse().expect("v"));
            resp.headers_mut()
                .insert("upgrade", "websocket".parse().expect("v"));
            if let Some(key) = req.headers().get("sec-websocket-key") {
                let accept =
                    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
                resp.headers_mut()
                    .insert("sec-websocket-accept", accept.parse().expect("v"));
            }
            return Ok(resp);
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = route.status;
    for (k, v) in &route.headers {
        resp.headers_mut().append(
            http::HeaderName::try_from(k.as_str()).expect("header name"),
            v.parse().expect("header value"),
        );
    }
    Ok(resp)
}

fn plain(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = status;
    r
}
