//! Configuration: one TOML file (`config/isrgate.toml`), `ISRGATE__SECTION__KEY` environment
//! overrides, then CLI flags, validated once at start into the typed [`Config`] below.
//!
//! Layers, later wins: built-in defaults → file → environment → flags. Unknown sections and keys,
//! type errors and bad values are all collected and reported together, each naming the key, where
//! it was set (file line:column, variable or flag) and how to fix it ([`ConfigError`]). The rest
//! of the crate only ever sees a valid [`Config`].

mod env;
mod load;
mod preview;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;

pub use env::{Environment, MapEnv, PREFIX as ENV_PREFIX, ProcessEnv};
pub use load::{ConfigError, DEFAULT_CONFIG_PATH, Override, Problem, Source, from_toml, load};
pub use preview::{
    MAX_PREVIEW_MODE_ID_CHARS, ManifestError, preview_mode_id_value, read_preview_mode_id,
};
pub use raw::Raw;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The public listener.
    pub listen: Listen,
    /// The Next.js replicas.
    pub upstream: Upstream,
    /// Health checking of replicas.
    pub health: Health,
    /// Caching; `None` when disabled.
    pub cache: Option<Cache>,
    /// The shared store; `None` = in-process store.
    pub redis: Option<Redis>,
    /// The admin listener; `None` when disabled.
    pub admin: Option<Admin>,
    /// Logging.
    pub log: Log,
    /// The revalidation webhook.
    pub webhook: Webhook,
    /// Rollouts.
    pub deploy: Deploy,
    /// The settings as read, before validation (every layer merged): a reload compares them
    /// key by key with the running ones (`crate::reload`).
    pub raw: std::sync::Arc<Raw>,
}

/// `[deploy]`: how a new build takes over (`crate::deploy`).
#[derive(Debug, Clone, PartialEq)]
pub struct Deploy {
    /// Share of the healthy replicas, in percent, the newest build needs to become current.
    pub switch_percent: u32,
    /// Hot paths pre-rendered on a new build before the switch; 0 = none.
    pub prewarm_paths: usize,
    /// Pre-warm renders at once.
    pub prewarm_concurrency: usize,
    /// Pre-warm renders started per second; `None` = no limit.
    pub prewarm_rate: Option<u32>,
    /// Longest a switch waits for its pre-warm.
    pub prewarm_timeout: Duration,
}

/// `[webhook]`, plus its secrets from the environment.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// `None` (no `ISRGATE_WEBHOOK_SECRET`): the webhook answers 404.
    pub secrets: Option<crate::invalidate::webhook::Secrets>,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// How far a signature's timestamp may be from now.
    pub signature_window: Duration,
    /// How long the webhook waits for every live gateway to acknowledge.
    pub ack_timeout: Duration,
    /// The call to every Next.js replica.
    pub fanout: Fanout,
    /// Re-warm concurrency; 0 = off.
    pub rewarm_concurrency: usize,
    /// The shape of bodies (`Auto`: recognised per call).
    pub format: crate::invalidate::cms::Format,
    /// Accept `?secret=` (and `GET`).
    pub allow_query_secret: bool,
    /// `[[webhook.rules]]`, compiled.
    pub rules: Vec<crate::invalidate::rules::Rule>,
    /// The build's `previewModeId`: `ISRGATE_PREVIEW_MODE_ID`, else read from
    /// `upstream.prerender_manifest`. Sent as `x-prerender-revalidate` on background refreshes
    /// and re-warms; marked sensitive, so `Debug` prints `Sensitive`, never the id.
    pub preview_mode_id: Option<http::HeaderValue>,
}

/// The fan-out call to Next.js replicas (`[webhook] replica_*`).
#[derive(Debug, Clone)]
pub struct Fanout {
    /// The route; `None` = no fan-out.
    pub path: Option<String>,
    /// Method.
    pub method: http::Method,
    /// Body template.
    pub body: String,
    /// The header carrying the secret.
    pub secret_header: http::HeaderName,
    /// The secret (from `ISRGATE_REPLICA_SECRET`), marked sensitive.
    pub secret: Option<http::HeaderValue>,
    /// Retries.
    pub retries: u32,
    /// Bound per call.
    pub timeout: Duration,
}

/// `[listen]`
#[derive(Debug, Clone)]
pub struct Listen {
    /// Address to bind.
    pub addr: SocketAddr,
    /// Worker threads (resolved: never 0).
    pub workers: usize,
    /// Scheme clients use to reach us.
    pub public_scheme: Scheme,
    /// Time allowed for a whole request head from its first byte.
    pub header_read_timeout: Duration,
    /// Longest a request body may send nothing (between two reads) before it is cut.
    pub body_read_timeout: Duration,
    /// Idle connections (nothing in flight, no bytes) are closed after this.
    pub idle_timeout: Duration,
    /// Largest accepted request head in bytes.
    pub max_header_bytes: usize,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: u64,
    /// Requests handled at once before shedding with 503.
    pub max_concurrent_requests: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long the listeners keep accepting after a shutdown signal, `/readyz` saying no.
    pub accept_grace: Duration,
    /// Share the port with other processes (`SO_REUSEPORT`); else a port in use is an error.
    pub reuse_port: bool,
    /// A client that reads nothing of a pending response for this long is cut.
    pub send_timeout: Duration,
    /// Peers whose `X-Forwarded-For/Proto` are trusted.
    pub trusted_proxies: Vec<IpNet>,
    /// Peers whose `x-isrgate-debug` is answered (`proxy::debug`).
    pub debug_from: Vec<IpNet>,
    /// Also trust their `X-Forwarded-Host`.
    pub trust_forwarded_host: bool,
    /// Keep header-name case as sent, both ways.
    pub preserve_header_case: bool,
    /// Fresh cache hits on HTTP/1.1 answered from the socket (`server::lane`).
    pub hit_lane: bool,
    /// Answer 404 for Next.js-internal path suffixes.
    pub reject_internal_paths: bool,
}

/// `[upstream]`
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Static replicas.
    pub replicas: Vec<Authority>,
    /// DNS name (and port) re-resolved for more replicas.
    pub dns_name: Option<DnsName>,
    /// Re-resolution interval of `dns_name`.
    pub dns_refresh: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Time to the response head.
    pub response_header_timeout: Duration,
    /// Time for the whole exchange.
    pub total_timeout: Duration,
    /// Idle pooled connections close after this.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per replica.
    pub pool_max_idle_per_replica: usize,
    /// The build's prerender manifest, read by [`load`] for the `previewModeId` when
    /// `ISRGATE_PREVIEW_MODE_ID` is not set.
    pub prerender_manifest: Option<std::path::PathBuf>,
}

/// A DNS name with the port the replicas listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    /// Host name to resolve.
    pub host: String,
    /// Port of every resolved address.
    pub port: u16,
}

/// `[health]`
#[derive(Debug, Clone)]
pub struct Health {
    /// Path of active checks.
    pub path: http::uri::PathAndQuery,
    /// Interval of active checks; `None` disables them.
    pub interval: Option<Duration>,
    /// Timeout of one check.
    pub timeout: Duration,
    /// Passing checks that re-admit.
    pub healthy_threshold: u32,
    /// Failing checks that mark unhealthy.
    pub unhealthy_threshold: u32,
    /// Consecutive live-traffic failures that eject; `None` disables.
    pub passive_failures: Option<u32>,
    /// How long an ejected replica stays out.
    pub ejection: Duration,
    /// A request with no response head after this probes the replica (`None`: never).
    pub stall_after: Option<Duration>,
}

/// `[cache]`
#[derive(Debug, Clone)]
pub struct Cache {
    /// Key namespace (deployment identity).
    pub namespace: String,
    /// L1 bytes per gateway; 0 = no L1.
    pub l1_max_bytes: u64,
    /// `l1_max_bytes` bounds the process's measured growth (`cache::governor`), not only the
    /// entries.
    pub l1_governor: bool,
    /// Strict mode: bytes of decoded entries reused on identical reads; 0 = none.
    pub decoded_max_bytes: u64,
    /// In-process store bytes (no Redis).
    pub memory_max_bytes: u64,
    /// Largest stored body (identity bytes).
    pub max_entry_bytes: usize,
    /// Default stale-if-error window.
    pub default_stale_if_error: Duration,
    /// Longest wait for a replica before an entry within stale-if-error answers (0: no bound).
    pub stale_if_error_wait: Duration,
    /// Cap on stale-while-revalidate.
    pub max_stale_while_revalidate: Duration,
    /// Cap on an entry's store TTL.
    pub max_ttl: Duration,
    /// Background refreshes at once.
    pub max_background_refreshes: usize,
    /// `Vary` slots kept per URL and variant.
    pub max_variants: usize,
    /// Path prefixes never cached.
    pub bypass_paths: Vec<String>,
    /// Cookie names that bypass the cache.
    pub bypass_cookies: Vec<String>,
    /// AVIF negotiated for images.
    pub avif: bool,
    /// `[coalesce]`.
    pub coalesce: Coalesce,
    /// Response headers whose values are invalidation tags (lower case).
    pub tag_headers: Vec<String>,
    /// `[tag_rules]`, compiled.
    pub tag_rules: Vec<crate::cache::tags::Rule>,
    /// `[[routes]]`, compiled, in file order (the first match wins).
    pub routes: Vec<crate::cache::routes::Route>,
}

/// `[coalesce]`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesce {
    /// Coalescing on.
    pub enabled: bool,
    /// A follower's bound on waiting for a leader.
    pub wait_timeout: Duration,
    /// Fleet lock TTL.
    pub lock_ttl: Duration,
    /// Fallback re-read interval of a remote follower.
    pub poll_interval: Duration,
    /// Hit-for-miss lifetime; zero = off.
    pub hit_for_miss: Duration,
}

/// `[redis]`
#[derive(Debug, Clone)]
pub struct Redis {
    /// Connection URL (may hold a password: never logged).
    pub url: String,
    /// Pool size.
    pub pool_size: usize,
    /// Per-command bound.
    pub command_timeout: Duration,
    /// Connect bound.
    pub connect_timeout: Duration,
    /// PEM files for `rediss://`.
    pub tls: crate::cache::tls::RedisTls,
    /// `redis.publish_stats`: this gateway's snapshot goes to the fleet view.
    pub publish_stats: bool,
}

/// `[admin]`
#[derive(Clone)]
pub struct Admin {
    /// Address to bind.
    pub listen: SocketAddr,
    /// `ISRGATE_ADMIN_TOKEN`: guards the dashboard, `/metrics` and `/api`; `None` = those are
    /// off (403).
    pub token: Option<String>,
    /// `admin.metrics_auth`: who may read `/metrics` without the token.
    pub metrics_auth: MetricsAuth,
}

/// Who may read `/metrics` without the admin token (`admin.metrics_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAuth {
    /// Nobody: the token, like every other admin path (the default).
    Token,
    /// Clients on a loopback address (a scraper or agent on the same host, or in the pod).
    Loopback,
    /// Anyone who reaches the admin listener (keep that listener on a private network).
    None,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("metrics_auth", &self.metrics_auth)
            .finish()
    }
}

/// `[log]`
#[derive(Debug, Clone)]
pub struct Log {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directives.
    pub level: String,
    /// The access log: one line per request (`crate::logging::access`).
    pub access: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The built-in defaults, valid as they are (`isrgate serve` with nothing else).
    pub fn defaults() -> Config {
        validate::validate(&Raw::default(), &Default::default())
            .expect("invariant: built-in defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.listen.addr, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.upstream.replicas.len(), 1);
        assert!(c.admin.is_some());
        let loopback: Vec<IpNet> = ["127.0.0.0/8", "::1/128"]
            .iter()
            .map(|n| n.parse().expect("cidr"))
            .collect();
        assert_eq!(c.listen.debug_from, loopback);
    }
}

/// How the request path treats a client's request head, fixed per listener (from
/// `[listen]`): used by `proxy::sanitize`, defined here so the shared state (`app`) holds it
/// without depending on the request path.
#[derive(Debug, Clone)]
pub struct SanitizePolicy {
    /// Whom forwarding headers are believed from, and our public scheme.
    pub forwarded: ForwardPolicy,
    /// Refuse Next.js-internal path suffixes (`proxy::sanitize`).
    pub reject_internal_paths: bool,
    /// Who may ask for the debug header (`proxy::debug`).
    pub debug: DebugPolicy,
}

/// Who may ask for the debug header (`proxy::debug`), fixed per listener: `listen.debug_from`,
/// and the debug token derived from the admin token (`admin::debug_token`).
#[derive(Clone, Default)]
pub struct DebugPolicy {
    /// Peers whose own requests may ask.
    pub from: Vec<IpNet>,
    /// The debug token, when an admin token is configured.
    pub token: Option<String>,
}

impl std::fmt::Debug for DebugPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugPolicy")
            .field("from", &self.from)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Whom forwarding headers are believed from (`proxy::forwarded`), from `[listen]`.
#[derive(Debug, Clone)]
pub struct ForwardPolicy {
    /// Scheme clients use to reach us.
    pub public_scheme: Scheme,
    /// Peers whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Keep `X-Forwarded-Host` from trusted proxies.
    pub trust_forwarded_host: bool,
}
