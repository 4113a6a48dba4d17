//! isrgate: a front-door cache for self-hosted Next.js.
//!
//! A request goes through these stages, one module each, in this order (`docs/ARCHITECTURE.md`
//! maps them to DESIGN.md's steps):
//!
//! ```text
//! accept (server) → sanitize (proxy::sanitize) → classify (proxy::classify) → key (cache::key)
//!   → lookup (proxy::lookup) → proxy::cached::drive: hit → respond (proxy::respond)
//!                                                   stale → respond + refresh (proxy::refresh)
//!                                                   miss → coalesce (proxy::coalesce)
//!                                                          → fill (proxy::fill: exchange with
//!                                                            upstream, admit, keep in cache::store)
//!                                                          → respond
//!   bypass → upstream → respond
//! HTTP/1.1 hits: server::lane asks proxy::fast_path, which runs the same steps and writes a plain
//!   hit itself, or lends the request (and its lookup) to hyper and the driver
//! webhook: invalidate (auth, webhook) → apply (epochs) → acks (fleet) → fanout → rewarm → log
//! ```
//!
//! Module map:
//! - [`config`]: TOML + env + flags → validated [`Config`]; all problems reported at once.
//!   [`reload`]: the configuration read again and applied live (SIGHUP, `isrgate reload`).
//! - [`server`]: workers and listeners, the HTTP/1.1 hit lane (cache hits written from the socket,
//!   other exchanges lent to hyper), per-connection bounds, load shedding, graceful drain.
//! - [`proxy`]: the request driver and its steps (sanitize, classify, lookup, coalesce, fill,
//!   respond, refresh, tunnel, debug), and the hit lane's question (`fast_path`).
//! - [`upstream`]: replica set, discovery, balancing, health, the pooled client.
//! - [`cache`]: cache semantics (key, Cache-Control, admission, entry bytes, epochs, tags) and
//!   where entries live (every Redis name in `cache::keys`, the store, fill locks, flights, L1).
//!   [`shared`]: what exists only with Redis, as one value. [`bus`]: the pub/sub bus between
//!   gateways. [`clock`]: the wall clock of shared deadlines and the monotonic one.
//! - [`invalidate`]: the revalidation webhook, `isrgate purge`, the invalidation records.
//! - [`deploy`]: builds, rollouts from one build to the next, pre-warming.
//! - [`admin`]: the operator listener (health, readiness, dashboard, metrics, stats and fleet
//!   APIs) and the CLI's client of it.
//! - [`logging`]: the subscriber (text or flat JSON, non-blocking output), the access log and
//!   `isrgate tail`.
//! - [`error`]: the public listener's one error → HTTP mapping. [`metrics`]: counters and
//!   histograms declared once, the newest server errors, per-route counts. [`http`]: header
//!   names, bodies, gzip, the wire format. [`sync`]: the lock helper.
//! - [`app`]: the shared state built once at start.
//! - [`warm`]: render a list of pages ahead of users (`isrgate warm`, from a sitemap or a list
//!   of paths, through a gateway; the engine is generic over who renders).

pub mod admin;
pub mod app;
pub mod bus;
pub mod cache;
pub mod clock;
pub mod config;
pub mod deploy;
pub mod error;
pub mod http;
pub mod invalidate;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod shared;
pub mod sync;
pub mod upstream;
pub mod warm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use app::AppState;
pub use config::Config;
use upstream::discovery::{self, Resolve, SystemResolver};
use upstream::replicas::ReplicaSet;

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(
        "cannot listen on {addr} ({which}): {error}{}",
        bind_hint(which, error)
    )]
    Bind {
        /// Which listener, by its config key (`listen.addr`, `admin.listen`).
        which: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why: part of the message, not a `source` (printed with its chain, `{:#}`, the OS's
        /// words would come twice).
        error: std::io::Error,
    },
    /// The Redis URL or settings were refused by the client.
    #[error("cannot set up the Redis store: {0}")]
    Store(#[from] cache::store::StoreError),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start worker threads: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What to do about a listener that could not be bound, when there is something to say.
fn bind_hint(which: &str, error: &std::io::Error) -> &'static str {
    if error.kind() != std::io::ErrorKind::AddrInUse {
        return "";
    }
    if which == "listen.addr" {
        "; another process listens there (another isrgate?): stop it, choose another \
         listen.addr, or set listen.reuse_port = true in every process that should share the \
         port (the kernel then splits connections between them)"
    } else {
        "; another process listens there (another isrgate?): stop it or choose another \
         admin.listen (\"\" turns the admin listener off)"
    }
}

/// Things a test or an embedder may replace.
pub struct Options {
    /// Resolver for `upstream.dns_name`.
    pub resolver: Arc<dyn Resolve>,
    /// Where this gateway's access lines go (`logging::dispatch`); `None`: the process's
    /// global subscriber.
    pub access_log: Option<tracing::Dispatch>,
    /// Reads the configuration again for a reload (SIGHUP, `POST /api/reload`); `None`: a
    /// reload is refused.
    pub reload: Option<reload::Loader>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
            access_log: None,
            reload: None,
        }
    }
}

/// A bound gateway: listeners open (one socket per worker, sharing the port), state built,
/// nothing served until [`run`](Server::run) or [`run_workers`](Server::run_workers).
pub struct Server {
    app: Arc<AppState>,
    listeners: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    control: Control,
}

/// What the control runtime's tasks are started with.
struct Control {
    resolver: Arc<dyn Resolve>,
    reload: (Option<reload::Loader>, reload::Requests),
}

impl Server {
    /// Binds `listen.workers` sockets on `listen.addr` (one port for all, picked by the kernel
    /// when it is 0; shared with other processes only with `listen.reuse_port`) and the admin
    /// listener, and builds the shared state.
    pub fn bind(config: Config, options: Options) -> Result<Server, StartError> {
        let listen = &config.listen;
        let listeners = server::bind_listeners(
            listen.addr,
            listen.workers,
            "listen.addr",
            listen.reuse_port,
        )?;
        let admin = match &config.admin {
            // Never shared: probes must reach this process, not a neighbour on the same port.
            Some(a) => Some(
                server::bind_listeners(a.listen, 1, "admin.listen", false)
                    .map(|mut v| v.remove(0))?,
            ),
            None => None,
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let replicas = Arc::new(ReplicaSet::new(config.upstream.replicas.clone()));
        let access = Arc::new(logging::access::AccessLog::new(
            config.log.access,
            options.access_log,
        ));
        let cache = match &config.cache {
            Some(c) => Some(Arc::new(app::CacheState::new(
                c.clone(),
                config.redis.as_ref(),
                config.listen.hit_lane,
                Arc::clone(&metrics),
                Arc::clone(access.tail()),
            )?)),
            None => None,
        };
        let deploy = Arc::new(deploy::Deploy::new(
            config.deploy.clone(),
            config
                .cache
                .as_ref()
                .map_or("default", |c| c.namespace.as_str()),
            Arc::clone(&replicas),
            deploy::rollout::Ledger::of(cache.as_ref().and_then(|c| c.redis())),
        ));
        let upstream = upstream::Upstream::new(&config, replicas, Arc::clone(&metrics));
        let policy = proxy::sanitize::Policy {
            forwarded: proxy::forwarded::Policy {
                public_scheme: config.listen.public_scheme.clone(),
                trusted_proxies: config.listen.trusted_proxies.clone(),
                trust_forwarded_host: config.listen.trust_forwarded_host,
            },
            reject_internal_paths: config.listen.reject_internal_paths,
            debug: config::DebugPolicy {
                from: config.listen.debug_from.clone(),
                token: config
                    .admin
                    .as_ref()
                    .and_then(|a| a.token.as_deref())
                    .map(admin::debug_token),
            },
        };
        let concurrency = Arc::new(tokio::sync::Semaphore::new(
            config.listen.max_concurrent_requests,
        ));
        let (reloads, requests) = reload::channel();
        let app = Arc::new(AppState {
            access,
            cache,
            own_redis: None,
            concurrency,
            config: Arc::new(arc_swap::ArcSwap::from_pointee(config)),
            policy,
            upstream,
            deploy,
            metrics,
            request_ids: Default::default(),
            reloads,
            tasks: TaskTracker::new(),
            started_at: std::time::SystemTime::now(),
            started: Arc::new(tokio::sync::watch::Sender::new(false)),
            stopping: CancellationToken::new(),
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        });
        Ok(Server {
            app,
            listeners,
            admin,
            control: Control {
                resolver: options.resolver,
                reload: (options.reload, requests),
            },
        })
    }

    /// The public listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0]
            .local_addr()
            .expect("invariant: a bound TCP listener has an address")
    }

    /// The admin listener's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The shared state (metrics, replicas), for embedders and tests.
    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.app)
    }

    /// Serves every listener on the current tokio runtime until `shutdown`, then drains. For
    /// tests and embedders; the binary uses [`run_workers`](Server::run_workers).
    pub async fn run(self, shutdown: CancellationToken) {
        let Server {
            app,
            listeners,
            admin,
            control,
        } = self;
        let background = CancellationToken::new();
        start_control(&app, admin, control, &background).await;
        for listener in listeners {
            let worker = Arc::new(app.for_worker());
            tokio::spawn(server::serve_worker(worker, listener));
        }
        app.started.send_replace(true);
        lifecycle(&app, shutdown).await;
        background.cancel();
    }

    /// Serves with one thread per listener, each on its own single-threaded runtime (no
    /// request ever changes thread, as in nginx's worker processes), plus this thread for the
    /// control work (admin listener, health checks, DNS discovery). Blocks until drained.
    pub fn run_workers(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let Server {
            app,
            listeners,
            admin,
            control: tasks,
        } = self;
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(StartError::Runtime)
        };
        let control = runtime()?;
        // The start-up look before any worker serves (the control runtime's tasks wait between
        // the two `block_on`s, for as long as spawning the workers takes).
        let background = CancellationToken::new();
        control.block_on(start_control(&app, admin, tasks, &background));
        let mut threads = Vec::with_capacity(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            let (rt, worker) = (runtime()?, Arc::new(app.for_worker()));
            let thread = std::thread::Builder::new()
                .name(format!("isrgate-worker-{i}"))
                .spawn(move || rt.block_on(server::serve_worker(worker, listener)))
                .map_err(StartError::Runtime)?;
            threads.push(thread);
        }
        app.started.send_replace(true);
        control.block_on(async {
            lifecycle(&app, shutdown).await;
            background.cancel();
        });
        for t in threads {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Admin listener, health checks and DNS discovery, on the current runtime.
async fn start_control(
    app: &Arc<AppState>,
    admin: Option<std::net::TcpListener>,
    control: Control,
    stop: &CancellationToken,
) {
    let Control {
        resolver,
        reload: (loader, requests),
    } = control;
    let cfg = app.config.load_full();
    if let Some(cache) = &app.cache {
        cache.start(stop);
        invalidate::retention::start(cache, Arc::clone(&app.deploy), stop);
        // The fleet's invalidations before the first request, so this gateway is ready with
        // them, not "ready" on a Redis that has not answered yet. Bounded: a Redis that does not
        // answer is served around (degraded), and the load goes on in the background.
        if let Some(redis) = &cfg.redis {
            let limit = (redis.connect_timeout * 2).max(Duration::from_secs(5));
            if tokio::time::timeout(limit, cache.epochs.first_sync())
                .await
                .is_err()
            {
                tracing::warn!(waited = ?limit, "the fleet's invalidations are not loaded yet (Redis slow or down); serving, and loading them in the background");
            }
        }
        tracing::info!(store = cache.store.kind(), l1 = cache.l1.enabled(), namespace = %cache.cfg().namespace, "cache enabled");
    }
    // First: probes get an answer during the start-up look below (`/healthz` alive, `/readyz`
    // not yet), rather than a connection left waiting in the backlog.
    if let Some(admin) = admin.and_then(|l| server::into_tokio(l).ok()) {
        tokio::spawn(admin::serve(Arc::clone(app), admin, stop.clone()));
    }
    if let Some(name) = cfg.upstream.dns_name.clone() {
        let set = Arc::clone(app.upstream.replicas());
        // Bounded: a hung resolver must not hold up start-up (or a SIGTERM right after it).
        let limit = cfg.upstream.dns_refresh.max(Duration::from_secs(2));
        match tokio::time::timeout(limit, discovery::refresh(&set, resolver.as_ref(), &name)).await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(name = %name.host, error = %e, "initial DNS discovery failed; retrying every {:?}", cfg.upstream.dns_refresh)
            }
            Err(_) => {
                tracing::warn!(name = %name.host, "initial DNS discovery timed out; retrying every {:?}", cfg.upstream.dns_refresh)
            }
        }
        let every = cfg.upstream.dns_refresh;
        let looks = (
            Arc::clone(app.upstream.pool()),
            Arc::clone(app.upstream.settings()),
        );
        tokio::spawn(discovery::run(
            set,
            resolver,
            name,
            every,
            looks,
            stop.clone(),
        ));
    }
    // One look at the replicas and the fleet's builds before the first request: keys are in
    // a build's namespace from the start, never in the bare one until a response names the
    // build (an entry filled there is orphaned: a second render). A health round when active
    // checks are on, else a look that judges nothing. Bounded by the checks' own timeout (a
    // replica that does not answer is no reason to wait).
    let health = Arc::new(cfg.health.clone());
    let (pool, replicas) = (app.upstream.pool(), app.upstream.replicas());
    let first = async {
        if cfg.health.interval.is_some() {
            upstream::health::round(pool, replicas, &health).await;
        } else {
            upstream::health::learn_builds(pool, &health, &replicas.snapshot()).await;
        }
    };
    if tokio::time::timeout(cfg.health.timeout, first)
        .await
        .is_err()
    {
        tracing::debug!("a replica did not answer the first look in time");
    }
    let prewarm: Arc<dyn deploy::Prewarmer> =
        Arc::new(warm::prewarm::InProcess::new(Arc::clone(app)));
    deploy::rollout::start(Arc::clone(&app.deploy), Some(prewarm), stop.clone()).await;
    tokio::spawn(upstream::health::run(
        Arc::clone(app.upstream.pool()),
        Arc::clone(app.upstream.replicas()),
        Arc::clone(app.upstream.settings()),
        stop.clone(),
    ));
    tokio::spawn(admin::fleet::publish(Arc::clone(app), stop.clone()));
    tokio::spawn(reload::run(Arc::clone(app), loader, requests, stop.clone()));
    tracing::info!(
        listen = %cfg.listen.addr, workers = cfg.listen.workers,
        replicas = ?app.upstream.replicas().authorities(), "isrgate serving"
    );
}

/// Waits for `shutdown`, then stops in two steps. First `stopping`: `/readyz` says no while
/// the listeners keep accepting and serving for `listen.accept_grace` (Kubernetes removes the
/// pod from its endpoints and the load balancers follow meanwhile: a connection they still
/// send here is served, not refused). Then the drain: listeners close (workers see `draining`),
/// in-flight work gets `listen.shutdown_grace`, then whatever remains is cut.
async fn lifecycle(app: &AppState, shutdown: CancellationToken) {
    shutdown.cancelled().await;
    app.stopping.cancel();
    let accept = app.config().listen.accept_grace;
    if !accept.is_zero() {
        tracing::info!(
            ?accept,
            "shutting down: not ready; still accepting for listen.accept_grace"
        );
        tokio::select! {
            () = tokio::time::sleep(accept) => {}
            // An embedder (or a test) that cuts everything does not wait for the grace.
            () = app.hard_stop.cancelled() => {}
        }
    }
    app.draining.cancel();
    let grace = app.config().listen.shutdown_grace;
    tracing::info!(
        connections = app.tasks.len(),
        ?grace,
        "shutting down: draining"
    );
    let deadline = tokio::time::Instant::now() + grace;
    app.tasks.close();
    if tokio::time::timeout_at(deadline, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = app.tasks.len(),
            "shutdown grace over; cutting remaining connections"
        );
        app.hard_stop.cancel();
        app.tasks.wait().await;
    }
    // Fills still storing, refreshes, lock releases: what is left of the grace period. A fill
    // cut here stores nothing; its fill lock expires by itself.
    if let Some(cache) = &app.cache {
        cache.tasks.close();
        if tokio::time::timeout_at(deadline, cache.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = cache.tasks.len(),
                "shutdown grace over; background fills cut"
            );
        }
    }
}

/// Binds and serves `config` with worker threads until `shutdown` is cancelled (blocking).
pub fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Server::bind(config, Options::default())?.run_workers(shutdown)
}
