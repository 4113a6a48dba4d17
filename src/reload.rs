//! Reload: the configuration read again and applied to the running gateway, as nginx's
//! `reload` — SIGHUP, `isrgate reload`, `POST /api/reload`: one path for the three.
//!
//! Owns the [`Plan`] (which keys changed, which of them can change live, the configuration the
//! gateway runs from now on) and its application to the running parts. A reload is read and
//! checked whole before anything changes: an invalid file is refused with the same problems
//! `check-config` prints, and the running configuration stays.
//!
//! What changes live: `[upstream]` (replicas, timeouts, pool), `[health]`, the cache policy
//! (`[cache]` lifetimes, caps, bypasses, tag headers; `[coalesce]`; `[tag_rules]`;
//! `[[routes]]`), `[webhook]`, `log.level` and `log.access`, and the `previewModeId` of
//! `upstream.prerender_manifest` (a new build). Requests in flight finish under the settings
//! they started with; nothing is dropped. What needs a restart ([`RESTART`]: listeners, workers,
//! Redis, the admin listener, the log format, `[deploy]`, the cache's sizes and namespace, DNS
//! discovery) is reported and kept as it runs.
//!
//! Reloads run one at a time, on the control runtime ([`run`]); the secrets come from the
//! environment, which a running process cannot see change: a rotated secret needs a restart.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::app::AppState;
use crate::config::{Config, ConfigError, Raw};

/// Reads the configuration again from where the gateway read it at start: the config and a
/// description of its source (the file, or "built-in defaults").
pub type Loader = Arc<dyn Fn() -> Result<(Config, String), ConfigError> + Send + Sync>;

/// Keys (`section.key`, or a whole `section.`) a running gateway cannot change: the reload
/// reports them and keeps what runs.
pub const RESTART: &[&str] = &[
    "listen.",
    "redis.",
    "admin.",
    "log.format",
    "deploy.",
    "upstream.dns_name",
    "upstream.dns_refresh",
    "cache.enabled",
    "cache.namespace",
    "cache.l1_max_bytes",
    "cache.l1_governor",
    "cache.decoded_max_bytes",
    "cache.memory_max_bytes",
    "cache.max_background_refreshes",
    "coalesce.hit_for_miss",
];

/// Whether `key` needs a restart.
pub fn needs_restart(key: &str) -> bool {
    RESTART.iter().any(|r| match r.strip_suffix('.') {
        Some(section) => key.split('.').next() == Some(section),
        None => key == *r,
    })
}

/// What a reload did: the answer of `POST /api/reload` and `isrgate reload`, and the log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Where the configuration was read from.
    pub source: String,
    /// Keys changed live, in file order.
    pub applied: Vec<String>,
    /// Keys that differ from what runs and need a restart (kept as they run).
    pub restart: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The configuration is invalid (or unreadable): every problem, as `check-config` says.
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    /// The gateway was started without a source to read again (an embedder's).
    #[error("this gateway has no configuration source to read again")]
    NoSource,
    /// The gateway is stopping, or not started yet.
    #[error("the gateway is not running (starting or stopping)")]
    NotRunning,
}

/// A reload asked of the control runtime, and where its answer goes.
type Ask = oneshot::Sender<Result<Report, ReloadError>>;

/// Asks for reloads (cheap to clone; every worker's state holds one).
#[derive(Debug, Clone)]
pub struct Reloads(mpsc::Sender<Ask>);

/// The receiving end, taken by [`run`].
#[derive(Debug)]
pub struct Requests(mpsc::Receiver<Ask>);

/// A channel for reloads.
pub fn channel() -> (Reloads, Requests) {
    let (tx, rx) = mpsc::channel(4);
    (Reloads(tx), Requests(rx))
}

impl Reloads {
    /// Reloads and waits for the result.
    pub async fn reload(&self) -> Result<Report, ReloadError> {
        let (tx, rx) = oneshot::channel();
        self.0.send(tx).await.map_err(|_| ReloadError::NotRunning)?;
        rx.await.unwrap_or(Err(ReloadError::NotRunning))
    }
}

/// Serves reloads one at a time until `stop`: read, plan, apply, log.
pub async fn run(
    app: Arc<AppState>,
    loader: Option<Loader>,
    mut requests: Requests,
    stop: CancellationToken,
) {
    // What the process started with: keys that need a restart are compared with it.
    let started = Arc::clone(&app.config().raw);
    loop {
        let ask = tokio::select! {
            () = stop.cancelled() => return,
            ask = requests.0.recv() => match ask {
                Some(ask) => ask,
                None => return,
            },
        };
        let result = match &loader {
            None => Err(ReloadError::NoSource),
            Some(load) => reload_once(&app, load, &started).await,
        };
        match &result {
            Ok(r) => tracing::info!(
                config = %r.source, applied = ?r.applied, needs_restart = ?r.restart,
                "configuration reloaded{}", if r.restart.is_empty() { "" } else {
                    "; some changes need a restart and were not applied"
                }
            ),
            // One line: the problems after one another.
            Err(e) => tracing::error!(
                "configuration not reloaded; the running one stays: {}",
                e.to_string()
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }
        let _ = ask.send(result);
    }
}

async fn reload_once(app: &AppState, load: &Loader, started: &Raw) -> Result<Report, ReloadError> {
    // Reading a file (and a prerender manifest) off the runtime's thread.
    let load = Arc::clone(load);
    let (next, source) = tokio::task::spawn_blocking(move || load())
        .await
        .map_err(|_| ReloadError::NotRunning)??;
    let running = app.config.load_full();
    let plan = Plan::new(&running, started, next, source);
    apply(app, &running, &plan.config).await;
    Ok(plan.report)
}

/// A configuration read again, against the one that runs.
#[derive(Debug)]
pub struct Plan {
    /// What the gateway runs from now on: the new settings that can change live, the running
    /// ones for the rest.
    pub config: Config,
    /// What changed, what waits for a restart.
    pub report: Report,
}

impl Plan {
    /// Compares `next` with `running` (keys that change live) and with `started` (keys that
    /// need a restart: they differ from what the process runs until it restarts, however many
    /// reloads ago they changed).
    pub fn new(running: &Config, started: &Raw, mut next: Config, source: String) -> Plan {
        let mut applied: Vec<String> = running
            .raw
            .changed(&next.raw)
            .into_iter()
            .filter(|k| !needs_restart(k))
            .collect();
        if running.webhook.preview_mode_id != next.webhook.preview_mode_id
            && !applied.iter().any(|k| k == "upstream.prerender_manifest")
        {
            applied.push("previewModeId (upstream.prerender_manifest)".into());
        }
        let restart = started
            .changed(&next.raw)
            .into_iter()
            .filter(|k| needs_restart(k))
            .collect();
        keep_fixed(running, &mut next);
        Plan {
            config: next,
            report: Report {
                source,
                applied,
                restart,
            },
        }
    }
}

/// Puts back into `next` what a running gateway cannot change ([`RESTART`]).
fn keep_fixed(running: &Config, next: &mut Config) {
    next.listen = running.listen.clone();
    next.redis = running.redis.clone();
    next.admin = running.admin.clone();
    next.log.format = running.log.format;
    next.deploy = running.deploy.clone();
    next.upstream.dns_name = running.upstream.dns_name.clone();
    next.upstream.dns_refresh = running.upstream.dns_refresh;
    match (&running.cache, &mut next.cache) {
        (Some(old), Some(new)) => {
            new.namespace = old.namespace.clone();
            new.l1_max_bytes = old.l1_max_bytes;
            new.l1_governor = old.l1_governor;
            new.decoded_max_bytes = old.decoded_max_bytes;
            new.memory_max_bytes = old.memory_max_bytes;
            new.max_background_refreshes = old.max_background_refreshes;
            new.coalesce.hit_for_miss = old.coalesce.hit_for_miss;
        }
        // Turning the cache on or off is a restart.
        _ => next.cache = running.cache.clone(),
    }
}

/// Makes `next` the running configuration: every part that keeps a copy of its settings gets
/// the new ones, then the configuration itself is swapped. Replicas added to the static list
/// are looked at for their build before this returns (as at start), so no request to them is
/// keyed outside their build's namespace.
async fn apply(app: &AppState, running: &Config, next: &Config) {
    let upstream = &app.upstream;
    upstream.set_settings(next.upstream.clone(), next.health.clone());
    let (added, removed) = upstream.replicas().set_fixed(&next.upstream.replicas);
    if !added.is_empty() || !removed.is_empty() {
        tracing::info!(?added, ?removed, "replica set changed (reload)");
    }
    if let (Some(cache), Some(cfg)) = (&app.cache, &next.cache) {
        cache.set_cfg(cfg.clone());
    }
    app.access.set_enabled(next.log.access);
    if next.log.level != running.log.level {
        if let Err(e) = crate::logging::set_level(&next.log) {
            tracing::warn!(error = %e, "log.level not changed");
        }
    }
    app.config.store(Arc::new(next.clone()));
    if !added.is_empty() {
        let new: Vec<_> = upstream.replicas().with(|list| {
            list.iter()
                .filter(|r| added.contains(&r.authority))
                .cloned()
                .collect()
        });
        let health = Arc::clone(&upstream.settings().load().health);
        let look = crate::upstream::health::learn_builds(upstream.pool(), &health, &new);
        let _ = tokio::time::timeout(health.timeout, look).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::from_toml(text).expect("valid")
    }

    #[test]
    fn restart_keys_are_matched_by_section_or_whole_key() {
        assert!(needs_restart("listen.addr"));
        assert!(needs_restart("redis.url"));
        assert!(needs_restart("cache.namespace"));
        assert!(!needs_restart("cache.max_ttl"));
        assert!(!needs_restart("upstream.replicas"));
        assert!(!needs_restart("log.level"));
        assert!(!needs_restart("routes"));
        assert!(
            !needs_restart("listener.x"),
            "a prefix of a section name is not the section"
        );
    }

    #[test]
    fn live_keys_are_applied_and_the_others_kept_and_reported() {
        let running = config("[listen]\naddr = \"127.0.0.1:8080\"\n[cache]\nmax_ttl = \"1h\"");
        let next = config(
            "[listen]\naddr = \"127.0.0.1:9090\"\n[cache]\nmax_ttl = \"2h\"\nnamespace = \"x\"\n\
             [upstream]\nreplicas = [\"http://10.0.0.9:3000\"]",
        );
        let plan = Plan::new(&running, &running.raw, next, "f.toml".into());
        assert_eq!(plan.report.applied, ["upstream.replicas", "cache.max_ttl"]);
        assert_eq!(plan.report.restart, ["listen.addr", "cache.namespace"]);
        let c = &plan.config;
        assert_eq!(c.listen.addr, running.listen.addr, "kept");
        let cache = c.cache.as_ref().expect("cache");
        assert_eq!(cache.namespace, "default", "kept");
        assert_eq!(
            cache.max_ttl,
            std::time::Duration::from_secs(7200),
            "applied"
        );
        assert_eq!(c.upstream.replicas[0].as_str(), "10.0.0.9:3000");
    }

    #[test]
    fn a_restart_key_stays_reported_until_the_restart() {
        let started = config("");
        let changed = config("[listen]\nworkers = 3");
        // The first reload kept `listen.workers`; the running config says what runs, the
        // second reload of the same file still reports it.
        let first = Plan::new(
            &started,
            &started.raw,
            config("[listen]\nworkers = 3"),
            "f".into(),
        );
        let second = Plan::new(&first.config, &started.raw, changed, "f".into());
        assert_eq!(second.report.restart, ["listen.workers"]);
        assert!(
            second.report.applied.is_empty(),
            "{:?}",
            second.report.applied
        );
    }

    #[test]
    fn turning_the_cache_off_is_a_restart() {
        let running = config("");
        let plan = Plan::new(
            &running,
            &running.raw,
            config("[cache]\nenabled = false"),
            "f".into(),
        );
        assert_eq!(plan.report.restart, ["cache.enabled"]);
        assert!(plan.config.cache.is_some());
    }
}
