//! isrgate: a front-door cache for self-hosted Next.js.
//!
//! A request goes through these stages, one module each, in this order:
//!
//! ```text
//! accept (server) → sanitize (proxy::sanitize) → [classify → key → lookup → serve | coalesce]
//!        → upstream (upstream: balance, retry, health) → [admit → store] → respond (proxy)
//! ```
//!
//! Stages in brackets arrive with the cache. Module map:
//! - [`config`]: TOML + env + flags → validated [`Config`]; all problems reported at once.
//! - [`server`]: listener, per-connection bounds, the tower stack, graceful shutdown.
//! - [`proxy`]: the request driver and its steps (sanitize, tunnel, respond).
//! - [`upstream`]: replica set, discovery, balancing, health, the pooled client.
//! - [`admin`]: the operator listener (health, readiness).
//! - [`error`]: the one error → HTTP mapping. [`metrics`]: counters. [`http`]: header names, bodies.
//! - [`app`]: the shared state built once at start.

pub mod admin;
pub mod app;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;
use upstream::discovery::{self, Resolve, SystemResolver};
use upstream::replicas::ReplicaSet;

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind {
        /// Which listener.
        which: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Things a test or an embedder may replace.
pub struct Options {
    /// Resolver for `upstream.dns_name`.
    pub resolver: Arc<dyn Resolve>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            resolver: Arc::new(SystemResolver),
        }
    }
}

/// A bound gateway, ready to [`run`](Server::run).
pub struct Server {
    app: Arc<AppState>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    resolver: Arc<dyn Resolve>,
}

pub use app::AppState;

impl Server {
    /// Binds the listeners and builds the state; nothing is served until [`run`](Server::run).
    pub async fn bind(config: Config, options: Options) -> Result<Server, StartError> {
        let bind = |which, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    which,
                    addr,
                    source,
                })
        };
        let listener = bind("listen.addr", config.listen.addr).await?;
        let admin = match &config.admin {
            Some(a) => Some(bind("admin.listen", a.listen).await?),
            None => None,
        };
        let metrics = Arc::new(metrics::Metrics::default());
        let replicas = Arc::new(ReplicaSet::new(config.upstream.replicas.clone()));
        let client = upstream::client(&config.upstream);
        let upstream = upstream::Upstream::new(&config, client, replicas, Arc::clone(&metrics));
        let policy = proxy::sanitize::Policy {
            forwarded: proxy::forwarded::Policy {
                public_scheme: config.listen.public_scheme.clone(),
                trusted_proxies: config.listen.trusted_proxies.clone(),
                trust_forwarded_host: config.listen.trust_forwarded_host,
            },
            reject_internal_paths: config.listen.reject_internal_paths,
        };
        let app = Arc::new(AppState {
            config,
            policy,
            upstream,
            metrics,
            request_ids: Default::default(),
            tasks: TaskTracker::new(),
            draining: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
        });
        Ok(Server {
            app,
            listener,
            admin,
            resolver: options.resolver,
        })
    }

    /// The public listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
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

    /// Serves until `shutdown` is cancelled, then drains (see [`server`]).
    pub async fn run(self, shutdown: CancellationToken) {
        let Server {
            app,
            listener,
            admin,
            resolver,
        } = self;
        let drain = app.draining.clone();
        tokio::spawn({
            let drain = drain.clone();
            async move {
                shutdown.cancelled().await;
                drain.cancel();
            }
        });
        let background = CancellationToken::new();
        let cfg = &app.config;
        if let Some(name) = cfg.upstream.dns_name.clone() {
            let set = Arc::clone(app.upstream.replicas());
            // Bounded: a hung resolver must not hold up start-up (or a SIGTERM right after it).
            let first = tokio::time::timeout(
                cfg.upstream
                    .dns_refresh
                    .max(std::time::Duration::from_secs(2)),
                discovery::refresh(&set, resolver.as_ref(), &name),
            );
            if let Err(e) = first.await.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "resolver timed out",
                ))
            }) {
                tracing::warn!(name = %name.host, error = %e, "initial DNS discovery failed; retrying every {:?}", cfg.upstream.dns_refresh);
            }
            tokio::spawn(discovery::run(
                set,
                resolver,
                name,
                cfg.upstream.dns_refresh,
                background.clone(),
            ));
        }
        tokio::spawn(upstream::health::run(
            app.upstream.client().clone(),
            Arc::clone(app.upstream.replicas()),
            cfg.health.clone(),
            background.clone(),
        ));
        if let Some(admin) = admin {
            tokio::spawn(admin::serve(Arc::clone(&app), admin, background.clone()));
        }
        tracing::info!(listen = %cfg.listen.addr, replicas = ?app.upstream.replicas().authorities(), "isrgate serving");
        server::accept_loop(Arc::clone(&app), listener, drain.clone()).await;

        let grace = cfg.listen.shutdown_grace;
        tracing::info!(
            in_flight_connections = app.tasks.len(),
            ?grace,
            "shutting down: draining"
        );
        app.tasks.close();
        if tokio::time::timeout(grace, app.tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = app.tasks.len(),
                "shutdown grace over; cutting remaining connections"
            );
            app.hard_stop.cancel();
            app.tasks.wait().await;
        }
        background.cancel();
        tracing::info!("stopped");
    }
}

/// Binds and serves `config` until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
    Server::bind(config, Options::default())
        .await?
        .run(shutdown)
        .await;
    Ok(())
}
