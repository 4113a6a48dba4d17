//! Following requests live, as `varnishlog -q` does: `isrgate tail` (every gateway of the
//! fleet, through Redis) and `GET /api/tail` (this gateway, through its admin listener).
//!
//! Owns the followers of this gateway ([`Tail`]): each one a [`Filter`] and a bounded queue
//! of lines (JSON, one object a line: the access line's fields plus the gateway and the time).
//! The access log offers every request's line ([`Tail::offer`]); a line goes to each follower
//! whose filter it passes. A follower that does not keep up loses lines (counted, and said in
//! its stream), never slows a request. With no follower the cost on the request path is one
//! atomic load.
//!
//! Through Redis ([`relay`]): `isrgate tail` publishes `tail <session> <its id> <filter>` on
//! the bus every second; each gateway follows for that session while the calls keep coming
//! (3 s after the last one it stops) and publishes its lines, batched, on `isr:tail:<session>`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::access::{Line, Path};
use crate::cache::keys::tail_channel;

/// Lines a follower may have waiting before newer ones are dropped.
const QUEUE: usize = 4_096;

/// Bytes of waiting lines `/api/tail` writes at once.
const BATCH_BYTES: usize = 64 * 1024;

/// A relayed session ends this long after the last call of its `isrgate tail`.
pub const SESSION_TTL: Duration = Duration::from_secs(3);

/// How often `isrgate tail` renews its session.
pub const RENEW: Duration = Duration::from_secs(1);

/// This gateway's followers.
#[derive(Debug, Default)]
pub struct Tail {
    followers: ArcSwap<Vec<Arc<Follower>>>,
    /// Serializes writers of `followers`; the request path never takes it.
    update: Mutex<()>,
    /// `followers.len()`, for the request path's one look.
    count: AtomicUsize,
    /// This gateway's id in the lines (set when the cache knows it).
    gateway: OnceLock<String>,
}

#[derive(Debug)]
struct Follower {
    id: u64,
    filter: Filter,
    lines: mpsc::Sender<Bytes>,
    dropped: AtomicU64,
}

/// A follower's end: its lines, until dropped (which stops the following).
#[derive(Debug)]
pub struct Following {
    lines: mpsc::Receiver<Bytes>,
    tail: Arc<Tail>,
    follower: Arc<Follower>,
}

impl Following {
    /// The next line, or `None` once the tail is gone.
    pub async fn next(&mut self) -> Option<Bytes> {
        self.lines.recv().await
    }

    /// Lines lost since the last call (the follower did not keep up).
    pub fn take_dropped(&self) -> u64 {
        self.follower.dropped.swap(0, Relaxed)
    }
}

impl Following {
    /// A response body of the lines (NDJSON), ending at `stop` (the listener's drain).
    pub fn into_body(self, stop: tokio_util::sync::CancellationToken) -> crate::http::body::Body {
        crate::http::body::boxed(Lines {
            following: self,
            stop: Box::pin(stop.cancelled_owned()),
        })
    }
}

/// The lines of a [`Following`] as a body.
struct Lines {
    following: Following,
    stop: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl http_body::Body for Lines {
    type Data = Bytes;
    type Error = crate::http::body::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if self.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let first = match self.following.lines.poll_recv(cx) {
            Poll::Ready(Some(line)) => line,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        // The lines already waiting go out with it, as one write: under load a follower costs
        // a write per batch, not per request.
        let Ok(second) = self.following.lines.try_recv() else {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        };
        let mut batch = bytes::BytesMut::with_capacity(BATCH_BYTES);
        batch.extend_from_slice(&first);
        batch.extend_from_slice(&second);
        while batch.len() < BATCH_BYTES {
            let Ok(line) = self.following.lines.try_recv() else {
                break;
            };
            batch.extend_from_slice(&line);
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(batch.freeze()))))
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.tail.remove(self.follower.id);
    }
}

impl Tail {
    /// Names this gateway in the lines.
    pub fn set_gateway(&self, id: &str) {
        let _ = self.gateway.set(id.to_owned());
    }

    /// Whether anyone follows (the request path's only question when nobody does).
    pub fn active(&self) -> bool {
        self.count.load(Relaxed) > 0
    }

    /// Starts following the lines `filter` lets through.
    pub fn follow(self: &Arc<Self>, filter: Filter) -> Following {
        static IDS: AtomicU64 = AtomicU64::new(1);
        let (tx, rx) = mpsc::channel(QUEUE);
        let follower = Arc::new(Follower {
            id: IDS.fetch_add(1, Relaxed),
            filter,
            lines: tx,
            dropped: AtomicU64::new(0),
        });
        let _writer = crate::sync::lock(&self.update);
        let mut next = Vec::clone(&self.followers.load());
        next.push(Arc::clone(&follower));
        self.count.store(next.len(), Relaxed);
        self.followers.store(Arc::new(next));
        Following {
            lines: rx,
            tail: Arc::clone(self),
            follower,
        }
    }

    fn remove(&self, id: u64) {
        let _writer = crate::sync::lock(&self.update);
        let mut next = Vec::clone(&self.followers.load());
        next.retain(|f| f.id != id);
        self.count.store(next.len(), Relaxed);
        self.followers.store(Arc::new(next));
    }

    /// Hands `line` to every follower whose filter it passes; the JSON is made once, and only
    /// when one does.
    pub fn offer(&self, line: &Line<'_>) {
        let followers = self.followers.load();
        let gateway = self.gateway.get().map_or("-", String::as_str);
        let mut json: Option<Bytes> = None;
        for f in followers.iter().filter(|f| f.filter.passes(line, gateway)) {
            let bytes = json.get_or_insert_with(|| to_json(line, gateway)).clone();
            if f.lines.try_send(bytes).is_err() {
                f.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The line a follower gets: the access line's fields, the gateway and the time (RFC 3339).
fn to_json(line: &Line<'_>, gateway: &str) -> Bytes {
    /// The line's fields, borrowed; the `Display` ones written straight into the output.
    #[derive(serde::Serialize)]
    struct Json<'a> {
        #[serde(serialize_with = "display")]
        time: humantime::Rfc3339Timestamp,
        gateway: &'a str,
        method: &'a str,
        host: &'a str,
        #[serde(serialize_with = "display")]
        path: Path<'a>,
        status: u16,
        cache: &'a str,
        cache_status: &'a str,
        replica: &'a str,
        bytes: u64,
        elapsed_us: u64,
        request_id: &'a str,
        #[serde(serialize_with = "display")]
        peer: std::net::SocketAddr,
    }
    fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    let json = Json {
        time: humantime::format_rfc3339_millis(std::time::SystemTime::now()),
        gateway,
        method: line.method,
        host: line.host,
        path: Path(line.uri),
        status: line.status,
        cache: line.cache,
        cache_status: line.cache_status,
        replica: line.replica,
        bytes: line.bytes,
        elapsed_us: u64::try_from(line.elapsed.as_micros()).unwrap_or(u64::MAX),
        request_id: line.request_id,
        peer: line.peer,
    };
    let mut out = Vec::with_capacity(384);
    if serde_json::to_writer(&mut out, &json).is_err() {
        return Bytes::new();
    }
    out.push(b'\n');
    Bytes::from(out)
}

/// Which lines a follower wants: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Status codes or classes: `5xx`, `404`; any of them.
    pub status: Vec<StatusMatch>,
    /// Path pattern, `*` for any run of characters (`/blog/*`, `*.rsc`); the query is not
    /// part of it.
    pub path: Option<String>,
    /// Cache outcomes (`hit`, `miss`, `stale`, `bypass`, …, as `x-cache` says them); any.
    pub outcome: Vec<String>,
    /// A gateway id, or the start of one.
    pub gateway: Option<String>,
}

/// One `status` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    /// `404`.
    Code(u16),
    /// `5xx`: the hundreds digit.
    Class(u16),
}

/// A filter that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {message}")]
pub struct FilterError {
    /// The condition.
    pub key: String,
    /// What is wrong and how to write it.
    pub message: String,
}

impl Filter {
    /// Reads `status=5xx,404&path=/blog/*&outcome=miss&gateway=ab12` (the query of
    /// `/api/tail`, and the filter word of the bus message); percent-decoded.
    pub fn parse(query: &str) -> Result<Filter, FilterError> {
        let mut f = Filter::default();
        for (key, value) in crate::http::query_pairs(query) {
            let fail = |message: String| FilterError {
                key: key.clone(),
                message,
            };
            match key.as_str() {
                "status" => {
                    for s in value.split(',').filter(|s| !s.is_empty()) {
                        f.status.push(StatusMatch::parse(s).ok_or_else(|| {
                            fail(format!("{s:?} is not a status; write 404 or 5xx"))
                        })?);
                    }
                }
                "path" if value.starts_with('/') || value.starts_with('*') => f.path = Some(value),
                "path" => return Err(fail(format!("{value:?} does not start with / or *"))),
                "outcome" => f.outcome.extend(
                    value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_ascii_uppercase),
                ),
                "gateway" if !value.is_empty() => f.gateway = Some(value),
                "gateway" => {}
                _ => {
                    return Err(fail(
                        "unknown; filter by status, path, outcome or gateway".into(),
                    ));
                }
            }
        }
        Ok(f)
    }

    /// The query form [`Filter::parse`] reads (no spaces: it travels as one word on the bus).
    pub fn to_query(&self) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let mut parts = Vec::new();
        if !self.status.is_empty() {
            let list: Vec<String> = self.status.iter().map(StatusMatch::to_string).collect();
            parts.push(format!("status={}", list.join(",")));
        }
        if let Some(p) = &self.path {
            parts.push(format!("path={}", enc(p)));
        }
        if !self.outcome.is_empty() {
            parts.push(format!("outcome={}", enc(&self.outcome.join(","))));
        }
        if let Some(g) = &self.gateway {
            parts.push(format!("gateway={}", enc(g)));
        }
        parts.join("&")
    }

    fn passes(&self, line: &Line<'_>, gateway: &str) -> bool {
        (self.status.is_empty() || self.status.iter().any(|s| s.matches(line.status)))
            && (self.outcome.is_empty() || self.outcome.iter().any(|o| o == line.cache))
            && self
                .gateway
                .as_deref()
                .is_none_or(|g| gateway.starts_with(g))
            && self
                .path
                .as_deref()
                .is_none_or(|p| glob(p.as_bytes(), line.uri.path().as_bytes()))
    }
}

impl StatusMatch {
    fn parse(s: &str) -> Option<StatusMatch> {
        let s = s.to_ascii_lowercase();
        match s.strip_suffix("xx") {
            Some(d) => match d.parse::<u16>() {
                Ok(c @ 1..=5) if d.len() == 1 => Some(StatusMatch::Class(c)),
                _ => None,
            },
            None => match s.parse::<u16>() {
                Ok(c @ 100..=599) if s.len() == 3 => Some(StatusMatch::Code(c)),
                _ => None,
            },
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Code(c) => status == c,
            StatusMatch::Class(c) => status / 100 == c,
        }
    }
}

impl std::fmt::Display for StatusMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusMatch::Code(c) => write!(f, "{c}"),
            StatusMatch::Class(c) => write!(f, "{c}xx"),
        }
    }
}

/// `*` matches any run of bytes (none included); everything else itself.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            back = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((bp, bt)) = back {
            p = bp + 1;
            t = bt + 1;
            back = Some((bp, bt + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Follows for a session of `isrgate tail` and publishes its lines on [`channel`] until the
/// session is not renewed for [`SESSION_TTL`] (`renewed` says when it is) or `stop`. Lines are
/// sent in batches (one `PUBLISH` of up to 64 lines, joined by newlines), so a busy gateway
/// makes a few publishes a second, not one per request; lost lines are said in the stream as
/// `{"dropped":N}`.
pub async fn relay(
    tail: Arc<Tail>,
    session: String,
    filter: Filter,
    pool: fred::clients::Pool,
    mut renewed: tokio::sync::watch::Receiver<()>,
    stop: tokio_util::sync::CancellationToken,
) {
    use fred::interfaces::PubsubInterface as _;
    let channel = tail_channel(&session);
    let mut following = tail.follow(filter);
    let mut batch = Vec::with_capacity(64 * 256);
    loop {
        let expiry = tokio::time::sleep(SESSION_TTL);
        let line = tokio::select! {
            () = stop.cancelled() => return,
            () = expiry => return,
            r = renewed.changed() => {
                if r.is_err() { return; }
                continue;
            }
            line = following.next() => match line {
                Some(line) => line,
                None => return,
            },
        };
        // Lines end with a newline: a batch is their concatenation.
        batch.clear();
        batch.extend_from_slice(&line);
        for _ in 1..64 {
            let Ok(more) = following.lines.try_recv() else {
                break;
            };
            batch.extend_from_slice(&more);
        }
        let dropped = following.take_dropped();
        if dropped > 0 {
            let _ = writeln!(VecWriter(&mut batch), "{{\"dropped\":{dropped}}}");
        }
        let message = Bytes::copy_from_slice(&batch);
        let publish = pool.next().publish::<(), _, _>(&channel, message);
        if tokio::time::timeout(Duration::from_secs(1), publish)
            .await
            .is_err()
        {
            tracing::debug!(%session, "tail: a publish timed out; lines lost");
        }
    }
}

/// The sessions of `isrgate tail` this gateway relays, each renewed by its bus messages.
#[derive(Debug, Default)]
pub struct Relays(Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<()>>>);

impl Relays {
    /// A `tail` message: renews its session, or starts relaying it (on `tasks`, until `stop`).
    pub fn renew(
        &self,
        tail: &Arc<Tail>,
        (session, filter): (&str, &str),
        pool: &fred::clients::Pool,
        tasks: &tokio_util::task::TaskTracker,
        stop: &tokio_util::sync::CancellationToken,
    ) {
        let mut map = crate::sync::lock(&self.0);
        if map.get(session).is_some_and(|tx| tx.send(()).is_ok()) {
            return;
        }
        // Ended relays (their receiver gone) are forgotten here.
        map.retain(|_, tx| !tx.is_closed());
        let filter = match Filter::parse(filter) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(%session, error = %e, "tail: a session with an unreadable filter; ignored");
                return;
            }
        };
        let (tx, rx) = tokio::sync::watch::channel(());
        map.insert(session.to_owned(), tx);
        tracing::info!(%session, filter = %filter.to_query(), "tail: relaying requests to an isrgate tail");
        tasks.spawn(relay(
            Arc::clone(tail),
            session.to_owned(),
            filter,
            pool.clone(),
            rx,
            stop.clone(),
        ));
    }
}

/// `isrgate tail` through Redis: follows the requests `filter` passes on every gateway of the
/// fleet, handing each line (JSON, newline included) to `each`, until `stop`. Renews its
/// session on the bus every [`RENEW`]; gateways that start meanwhile join within a second.
pub async fn follow_fleet(
    settings: &crate::cache::store::RedisSettings,
    filter: &Filter,
    mut each: impl FnMut(&[u8]),
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), crate::cache::store::StoreError> {
    use fred::interfaces::{ClientLike as _, EventInterface as _, PubsubInterface as _};
    let me = format!("tail-{:08x}", fastrand::u32(..));
    let session = format!("{:016x}", fastrand::u64(..));
    let subscriber = fred::types::Builder::from_config(settings.fred_config()?)
        .with_connection_config(|c| c.connection_timeout = settings.connect_timeout)
        .build_subscriber_client()?;
    drop(subscriber.connect());
    subscriber.wait_for_connect().await?;
    let mut messages = subscriber.message_rx();
    subscriber.subscribe(tail_channel(&session)).await?;
    let store = crate::cache::store::RedisStore::connect(settings)?;
    let ask = crate::bus::Message::Tail {
        session,
        gateway: me,
        filter: filter.to_query(),
    };
    let mut renew = tokio::time::interval(RENEW);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = renew.tick() => {
                if let Err(e) = crate::bus::publish(store.pool(), &ask, RENEW).await {
                    tracing::warn!(error = %e, "tail: cannot reach Redis; retrying");
                }
            }
            m = messages.recv() => match m {
                Ok(m) => {
                    if let Some(bytes) = m.value.as_bytes() {
                        each(bytes);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    each(format!("{{\"dropped\":{n}}}\n").as_bytes());
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    let _ = subscriber.quit().await;
    Ok(())
}

/// A line for a person (varnishncsa's spirit): time, gateway, status, outcome, method,
/// host and path, bytes, time taken, replica.
pub fn human(line: &serde_json::Value) -> String {
    if let Some(n) = line.get("dropped") {
        return format!("-- {n} lines lost (the follower did not keep up)");
    }
    let s = |k: &str| line[k].as_str().unwrap_or("-").to_owned();
    let time = s("time");
    let clock = time.get(11..23).unwrap_or(&time);
    let gateway = s("gateway");
    let us = line["elapsed_us"].as_u64().unwrap_or(0);
    format!(
        "{clock} {:<8} {} {:<6} {} {}{} {}B {:.2}ms {}",
        gateway.get(..8).unwrap_or(&gateway),
        line["status"],
        s("cache"),
        s("method"),
        s("host"),
        s("path"),
        line["bytes"],
        us as f64 / 1000.0,
        s("replica"),
    )
}

/// `write!` into a byte vector.
struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(uri: &'a http::Uri, status: u16, cache: &'a str) -> Line<'a> {
        Line {
            method: "GET",
            uri,
            status,
            cache,
            cache_status: "-",
            replica: "-",
            bytes: 10,
            elapsed: Duration::from_micros(150),
            request_id: "r1",
            host: "shop.example",
            peer: "127.0.0.1:5000".parse().expect("addr"),
        }
    }

    #[test]
    fn filters_read_their_query_and_write_it_back() {
        let f =
            Filter::parse("status=5xx,404&path=/blog/*&outcome=miss,stale&gateway=ab").expect("ok");
        assert_eq!(f.status, [StatusMatch::Class(5), StatusMatch::Code(404)]);
        assert_eq!(f.path.as_deref(), Some("/blog/*"));
        assert_eq!(f.outcome, ["MISS", "STALE"]);
        assert_eq!(Filter::parse(&f.to_query()), Ok(f));
        assert_eq!(Filter::parse(""), Ok(Filter::default()));
        for bad in [
            "status=6xx",
            "status=50",
            "status=5xxx",
            "path=blog",
            "colour=red",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_line_passes_when_every_condition_holds() {
        let uri: http::Uri = "/blog/a?x=1".parse().expect("uri");
        let f = Filter::parse("status=5xx&path=/blog/*&outcome=miss&gateway=ab").expect("ok");
        assert!(f.passes(&line(&uri, 502, "MISS"), "ab12"));
        assert!(!f.passes(&line(&uri, 200, "MISS"), "ab12"));
        assert!(!f.passes(&line(&uri, 502, "HIT"), "ab12"));
        assert!(!f.passes(&line(&uri, 502, "MISS"), "cd34"));
        let other: http::Uri = "/about".parse().expect("uri");
        assert!(!f.passes(&line(&other, 502, "MISS"), "ab12"));
    }

    #[test]
    fn globs_match_any_run() {
        for (p, t, yes) in [
            ("/blog/*", "/blog/a/b", true),
            ("/blog/*", "/blog", false),
            ("*.rsc", "/a/b.rsc", true),
            ("/a*c*e", "/abcde", true),
            ("/a*c*e", "/abcdf", false),
            ("/exact", "/exact", true),
            ("*", "/", true),
        ] {
            assert_eq!(glob(p.as_bytes(), t.as_bytes()), yes, "{p} {t}");
        }
    }

    #[tokio::test]
    async fn followers_get_the_lines_their_filter_passes_and_stop_when_dropped() {
        let tail = Arc::new(Tail::default());
        tail.set_gateway("gw1");
        assert!(!tail.active());
        let mut errors = tail.follow(Filter::parse("status=5xx").expect("ok"));
        let mut all = tail.follow(Filter::default());
        assert!(tail.active());
        let uri: http::Uri = "/p?token=s3cret".parse().expect("uri");
        tail.offer(&line(&uri, 200, "HIT"));
        tail.offer(&line(&uri, 503, "MISS"));
        let first: serde_json::Value =
            serde_json::from_slice(&all.next().await.expect("line")).expect("json");
        assert_eq!(first["status"], 200);
        assert_eq!(first["gateway"], "gw1");
        assert_eq!(first["path"], "/p?token=[redacted]");
        let err: serde_json::Value =
            serde_json::from_slice(&errors.next().await.expect("line")).expect("json");
        assert_eq!(err["status"], 503);
        drop(errors);
        drop(all);
        assert!(!tail.active());
    }
}
