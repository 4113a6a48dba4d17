//! Deploys: two builds side by side, without skew and without a cold start (issue 17).
//!
//! Owns which build each replica runs, which build is *current*, which build each request goes
//! to, and each build's cache namespace. A replica's build is learned from its responses
//! (`x-isrgate-build`, which `@isrgate/next` adds to every response, or Next's own
//! `x-nextjs-deployment-id`: `upstream::replicas::build_of`), so nothing is configured per
//! deploy. The stages:
//! - [`route`]: the build a request names (`x-deployment-id`, `?dpl=`, `/_next/data/<id>/`);
//! - [`rollout`]: the current build, agreed by every gateway through Redis, and the switch to
//!   a new one once it has enough healthy replicas and its hot set is pre-rendered;
//! - [`hot`]: the most requested paths, counted by every gateway, which a switch pre-renders;
//! - [`builds`]: what the replicas report of their builds in Redis (names, `previewModeId`).
//!
//! Design notes:
//! - **A pin per request.** [`Deploy::route`] picks the build once, before the cache key: the
//!   build the request names when one of its replicas is healthy, else the current build. The
//!   choice rides along as a request extension ([`Pin`]): the key's namespace and the replica
//!   pick (`upstream::balance`) both read it, so an entry is looked up in, filled into and
//!   rendered by one build. A fill whose replica answers for another build (restarted in
//!   place) is passed, never stored (`proxy::fill::exchange`).
//! - **Namespaces.** A build's entries live under `cache.namespace` + `@` + its name; nobody
//!   reads them once no replica of the build is healthy, and they expire with their TTL.
//!   Purges are tag and path epochs, which name no namespace: one purge reaches every build.
//! - **Assets** (`/_next/static/…`) are content-hashed: keyed without a build, and a 404 from
//!   one build is asked of the others before the client sees it (`upstream::Upstream::send`).
//! - **No build known** (no replica names one: no package, or an older Next): no pin, the
//!   namespace is `cache.namespace`, any replica serves: the gateway as before builds.

pub mod builds;
pub mod hot;
pub mod operator;
pub mod rollout;
pub mod route;

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::request::Parts;

use crate::upstream::replicas::{Replica, ReplicaSet};

pub use crate::upstream::pin::Pin;

/// Most builds remembered at once (a rollout has two; a fleet that never settles, a few).
const MAX_BUILDS: usize = 16;

/// What the gateway knows of the fleet's builds; shared by every worker.
#[derive(Debug)]
pub struct Deploy {
    /// `[deploy]`.
    pub cfg: crate::config::Deploy,
    /// `cache.namespace`.
    prefix: String,
    replicas: Arc<ReplicaSet>,
    /// What the replicas report in Redis.
    pub builds: builds::Builds,
    /// The most requested paths.
    pub hot: hot::Hot,
    state: ArcSwap<State>,
    /// The rollout's progress, for the dashboard.
    pub status: rollout::Status,
    /// Where the fleet's choice of the current build is kept.
    pub ledger: rollout::Ledger,
}

/// Why an operator's choice of the current build was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    /// No replica of this gateway runs it.
    #[error("no healthy replica runs build {build:?} (builds with healthy replicas: {live})")]
    NotLive {
        /// The build asked for.
        build: String,
        /// The builds that could be chosen.
        live: String,
    },
    /// The store failed: nothing changed.
    #[error("the fleet's state is unavailable ({0}); nothing changed")]
    Store(#[from] crate::cache::store::StoreError),
}

/// Replaced whole by the rollout task; read lock-free by every request.
#[derive(Debug, Default)]
struct State {
    /// The current build.
    current: Option<Arc<Pin>>,
    /// Every build a replica named, newest first.
    pins: Vec<Arc<Pin>>,
}

impl Deploy {
    /// No build known yet.
    pub fn new(
        cfg: crate::config::Deploy,
        prefix: &str,
        replicas: Arc<ReplicaSet>,
        ledger: rollout::Ledger,
    ) -> Deploy {
        Deploy {
            ledger,
            cfg,
            prefix: prefix.to_owned(),
            replicas,
            builds: builds::Builds::default(),
            hot: hot::Hot::default(),
            state: ArcSwap::default(),
            status: rollout::Status::default(),
        }
    }

    /// Routes `head` ([`Deploy::route`]) and records the choice in its extensions.
    pub fn pin(&self, head: &mut Parts) {
        if let Some(pin) = self.route(head) {
            head.extensions.insert(pin);
        }
    }

    /// The build `head` goes to: the one it names, when a replica of it is healthy; else the
    /// current build, when one is; else the newest build with a healthy replica; else (no
    /// replica healthy: all restarting, or all down) the current build still, so its entries
    /// keep serving, stale if need be, instead of a bare namespace nobody filled. `None` while
    /// no replica has named a build.
    pub fn route(&self, head: &Parts) -> Option<Arc<Pin>> {
        let state = self.state.load();
        if state.pins.is_empty() {
            return None;
        }
        self.replicas.with(|list| {
            let live = |pin: &&Arc<Pin>| serves(list, &pin.build);
            for name in route::names(head) {
                let named = state.pins.iter().find(|p| p.build == name).or_else(|| {
                    let id = self.builds.identity_of(name)?;
                    state.pins.iter().find(|p| p.build == id)
                });
                if let Some(pin) = named.filter(live) {
                    return Some(Arc::clone(pin));
                }
            }
            state
                .current
                .as_ref()
                .filter(live)
                .or_else(|| state.pins.iter().find(live))
                .or(state.current.as_ref())
                .or(state.pins.first())
                .cloned()
        })
    }

    /// An operator makes `build` current on every gateway and keeps it so (`pin`) until
    /// they hand the choice back ([`Deploy::release`]). Refused unless a replica of this
    /// gateway runs it, healthy.
    pub async fn choose(&self, build: &str, pin: bool) -> Result<(), ChoiceError> {
        let (tally, _) = self.tally();
        if !tally.iter().any(|(p, n)| p.build == build && *n > 0) {
            let live: Vec<&str> = tally
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(p, _)| p.build.as_str())
                .collect();
            return Err(ChoiceError::NotLive {
                build: build.to_owned(),
                live: if live.is_empty() {
                    "none".into()
                } else {
                    live.join(", ")
                },
            });
        }
        let current = self.current();
        let now = crate::clock::system_ms();
        self.ledger
            .switch(
                current.as_ref().map(|p| p.build.as_str()),
                build,
                now,
                Some(pin),
            )
            .await?;
        tracing::info!(build, pinned = pin, "an operator made the build current");
        self.status.update(|s| {
            s.current = Some(build.to_owned());
            s.pinned = pin;
            s.switched_ms = now;
        });
        let names: Vec<String> = tally.iter().map(|(p, _)| p.build.clone()).collect();
        self.set(&names, Some(build));
        Ok(())
    }

    /// Hands the choice of the current build back to the rollout rule.
    pub async fn release(&self) -> Result<(), ChoiceError> {
        self.ledger.unpin().await?;
        tracing::info!("the rollout chooses the current build again");
        Ok(())
    }

    /// The current build.
    pub fn current(&self) -> Option<Arc<Pin>> {
        self.state.load().current.clone()
    }

    /// The pin of the build named `build`, if a replica named it.
    pub fn pin_of(&self, build: &str) -> Option<Arc<Pin>> {
        self.state
            .load()
            .pins
            .iter()
            .find(|p| p.build == build)
            .cloned()
    }

    /// The `previewModeId` for regenerations of a page of `pin`'s build: the configured one,
    /// else the one that build's replicas report.
    pub fn preview_mode_id(
        &self,
        pin: Option<&Pin>,
        configured: Option<&http::HeaderValue>,
    ) -> Option<http::HeaderValue> {
        configured
            .cloned()
            .or_else(|| self.builds.preview_mode_id(pin.map(|p| p.build.as_str())))
    }

    /// Healthy replicas per build, in the order builds were first seen by the fleet (newest
    /// first), and the healthy replicas in all.
    pub fn tally(&self) -> (Vec<(Arc<Pin>, usize)>, usize) {
        let state = self.state.load();
        self.replicas.with(|list| {
            let healthy = list.iter().filter(|r| r.is_healthy()).count();
            let per = state
                .pins
                .iter()
                .map(|p| {
                    let n = list
                        .iter()
                        .filter(|r| r.is_healthy() && r.runs(&p.build))
                        .count();
                    (Arc::clone(p), n)
                })
                .collect();
            (per, healthy)
        })
    }

    /// When the oldest build a healthy replica runs was made (UNIX ms), as its replicas
    /// report it; `None` when no such build reported it.
    pub fn oldest_live_build_ms(&self) -> Option<u64> {
        let (tally, _) = self.tally();
        tally
            .iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(p, _)| self.builds.get(&p.build)?.built_ms)
            .min()
    }

    /// Builds the replicas name now that no pin exists for yet.
    fn unpinned(&self) -> Vec<String> {
        let state = self.state.load();
        let mut new: Vec<String> = Vec::new();
        for r in self.replicas.snapshot().iter() {
            if let Some(b) = r.build() {
                if !state.pins.iter().any(|p| p.build == *b) && !new.contains(&b) {
                    new.push(b.as_ref().clone());
                }
            }
        }
        new
    }

    /// Replaces the known builds (`order`: newest first) and the current one.
    fn set(&self, order: &[String], current: Option<&str>) {
        let old = self.state.load();
        let pins: Vec<Arc<Pin>> = order
            .iter()
            .take(MAX_BUILDS)
            .map(|b| {
                old.pins
                    .iter()
                    .find(|p| p.build == *b)
                    .cloned()
                    .unwrap_or_else(|| self.new_pin(b))
            })
            .collect();
        let current = current.and_then(|c| pins.iter().find(|p| p.build == c).cloned());
        self.state.store(Arc::new(State { current, pins }));
    }

    fn new_pin(&self, build: &str) -> Arc<Pin> {
        Arc::new(Pin {
            build: build.to_owned(),
            namespace: format!("{}@{build}", self.prefix),
        })
    }
}

/// Pre-renders a build's hot set before it becomes current (`rollout`): the gateway's own
/// warm engine (`crate::warm`) in the server, anything in tests.
pub trait Prewarmer: Send + Sync + 'static {
    /// Renders `paths` (HTML and RSC) on `build`'s replicas into its namespace, reporting
    /// progress in `deploy.status`; `true` when it ran to the end (failed pages included).
    fn prewarm<'a>(
        &'a self,
        deploy: &'a Deploy,
        build: &'a str,
        paths: Vec<hot::HotPath>,
        stop: tokio_util::sync::CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;
}

/// Whether a healthy replica of `list` runs `build`.
fn serves(list: &[Arc<Replica>], build: &str) -> bool {
    list.iter().any(|r| r.is_healthy() && r.runs(build))
}
