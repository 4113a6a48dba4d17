//! The configuration as written: one struct per TOML section, every field a plain serde type
//! with its default. Nothing here is validated beyond its TOML type; `validate.rs` turns these
//! into the typed [`Config`](super::Config).
//!
//! Each section gets a per-key setter from the `section!` macro, so the loader can apply keys one
//! at a time and report *every* unknown key and type error at once, each with its own source
//! (file line:column, env variable, or CLI flag), instead of serde's first-error-wins.

use serde::{Deserialize, Deserializer};
use toml::de::ValueDeserializer;

/// Why one key could not be applied.
#[derive(Debug)]
pub enum SetError {
    /// No section of that name.
    UnknownSection,
    /// The section has no such key.
    UnknownKey,
    /// The value does not have the key's TOML type.
    Invalid(toml::de::Error),
}

macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl $name {
            /// Every key of this section, in declaration order.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Pushes `section.key` for each key whose value differs in `other` (a reload's
            /// report: `crate::reload`).
            pub fn changed(&self, section: &str, other: &Self, out: &mut Vec<String>) {
                $( if self.$field != other.$field {
                    out.push(format!("{section}.{}", stringify!($field)));
                } )*
            }

            /// Applies one key. The value is deserialized into the key's type right here, so a
            /// type error carries this key and its source.
            pub fn set(&mut self, key: &str, value: ValueDeserializer<'_>) -> Result<(), SetError> {
                match key {
                    $( stringify!($field) => {
                        self.$field = <$ty>::deserialize(value).map_err(SetError::Invalid)?;
                        Ok(())
                    } )*
                    _ => Err(SetError::UnknownKey),
                }
            }
        }
    };
}

/// A list of strings that also accepts one comma-separated string, so
/// `ISRGATE__UPSTREAM__REPLICAS=http://a:3000,http://b:3000` works from the environment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<String>),
            Csv(String),
        }
        Ok(match Form::deserialize(d)? {
            Form::List(v) => StringList(v),
            Form::Csv(s) => StringList(
                s.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(String::from)
                    .collect(),
            ),
        })
    }
}

fn strings(items: &[&str]) -> StringList {
    StringList(items.iter().map(|s| (*s).to_owned()).collect())
}

section! {
    /// `[listen]`: the public listener clients (the load balancer) connect to.
    pub struct ListenRaw {
        /// Address to bind, `HOST:PORT`.
        addr: String = "0.0.0.0:8080".into(),
        /// Worker threads, each with its own listener socket (`SO_REUSEPORT` among this
        /// process's own sockets) and connection pool, like nginx's worker processes; 0 = one
        /// per CPU.
        workers: u64 = 0,
        /// Scheme clients use to reach the gateway (`http` or `https` when TLS ends at the load
        /// balancer): sent as `X-Forwarded-Proto` and used when rewriting `Location`.
        public_scheme: String = "http".into(),
        /// Time allowed to receive a whole request head, counted from its first byte.
        header_read_timeout: String = "10s".into(),
        /// A request body that sends nothing for this long is cut (408).
        body_read_timeout: String = "30s".into(),
        /// A connection with no request in flight and no bytes for this long is closed.
        idle_timeout: String = "75s".into(),
        /// Largest request head accepted (bytes); larger gets 431.
        max_header_bytes: u64 = 64 * 1024,
        /// Largest request body accepted (bytes); larger gets 413.
        max_body_bytes: u64 = 10 * 1024 * 1024,
        /// Requests handled at once; more are shed with 503.
        max_concurrent_requests: u64 = 4096,
        /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
        shutdown_grace: String = "30s".into(),
        /// On SIGTERM/SIGINT, `/readyz` says no at once but the listener keeps accepting and
        /// serving for this long (load balancers and Kubernetes endpoints catch up), then the
        /// drain starts.
        accept_grace: String = "5s".into(),
        /// Share the port with another process that also sets `SO_REUSEPORT` (the kernel splits
        /// connections between them); `false` refuses to start when the address is in use.
        reuse_port: bool = false,
        /// A connection whose client stops reading a response for this long is cut (nginx
        /// `send_timeout`): a slow reader must not pin a replica connection forever.
        send_timeout: String = "60s".into(),
        /// Peers (IPs or CIDRs) whose `X-Forwarded-For` and `X-Forwarded-Proto` are trusted.
        trusted_proxies: StringList = StringList::default(),
        /// Peers (IPs or CIDRs) whose `x-isrgate-debug: 1` is answered with the debug header
        /// (`proxy::debug`), when they ask for themselves (not a trusted proxy, no
        /// `X-Forwarded-For`); `[]`: only the debug token.
        debug_from: StringList = strings(&["127.0.0.0/8", "::1/128"]),
        /// Also trust `X-Forwarded-Host` from those peers (only if they always set it themselves;
        /// AWS ALB does not, so a client could choose it).
        trust_forwarded_host: bool = false,
        /// Keep the letter case of header names as sent, both ways (HTTP/1.1 only; names are
        /// case-insensitive, so this is fidelity, not meaning). Costs CPU per request.
        preserve_header_case: bool = true,
        /// Answer fresh cache hits on HTTP/1.1 connections straight from the socket (the hit
        /// lane); `false` sends every request through hyper's server and the driver.
        hit_lane: bool = true,
        /// Answer 404 for paths ending `.rsc`, `.prefetch.rsc`, `.segment.rsc`, `.action`.
        reject_internal_paths: bool = true,
    }
}

section! {
    /// `[upstream]`: the Next.js replicas.
    pub struct UpstreamRaw {
        /// Static replica list, `http://HOST:PORT`.
        replicas: StringList = strings(&["http://127.0.0.1:3000"]),
        /// DNS name re-resolved for replicas, `NAME:PORT` (a Kubernetes headless service).
        dns_name: String = String::new(),
        /// How often `dns_name` is re-resolved.
        dns_refresh: String = "5s".into(),
        /// TCP connect timeout to a replica.
        connect_timeout: String = "2s".into(),
        /// Time from sending a request to receiving the response head.
        response_header_timeout: String = "60s".into(),
        /// Time for a whole exchange, response body included.
        total_timeout: String = "300s".into(),
        /// Idle pooled connections are closed after this long. Keep it below the replicas'
        /// keep-alive timeout (`next start`: 5 s) so a connection Node is closing is never reused.
        pool_idle_timeout: String = "4s".into(),
        /// Idle pooled connections kept per replica.
        pool_max_idle_per_replica: u64 = 256,
        /// The build's `.next/prerender-manifest.json` (or `.next/server/preview-props.json`),
        /// read at start for its `previewModeId` when `ISRGATE_PREVIEW_MODE_ID` is not set;
        /// empty = none.
        prerender_manifest: String = String::new(),
    }
}

section! {
    /// `[health]`: active checks and passive ejection of replicas.
    pub struct HealthRaw {
        /// Path requested by active checks; any status below 500 is healthy.
        path: String = "/".into(),
        /// Interval between active checks of each replica; `0s` disables them.
        interval: String = "5s".into(),
        /// Timeout of one active check.
        timeout: String = "2s".into(),
        /// Consecutive passing checks that re-admit a replica.
        healthy_threshold: u64 = 2,
        /// Consecutive failing checks that mark a replica unhealthy.
        unhealthy_threshold: u64 = 3,
        /// Consecutive connect failures or timeouts on live traffic that eject a replica; 0 disables.
        passive_failures: u64 = 3,
        /// How long a passively ejected replica stays out before it is tried again.
        ejection: String = "10s".into(),
        /// A request with no response head after this sends one probe of `path` (same wait);
        /// no answer to it either ejects the replica at once. `0s` disables.
        stall_after: String = "1s".into(),
    }
}

section! {
    /// `[cache]`: what is cached and for how long.
    pub struct CacheRaw {
        /// Cache cacheable responses; `false` makes the gateway a pure proxy.
        enabled: bool = true,
        /// Deployment identity every key starts with (`deploymentId` / BUILD_ID): entries of
        /// another build are never served.
        namespace: String = "default".into(),
        /// Bytes of decoded entries held in each gateway's memory in front of the store
        /// (the L1); 0 disables it (every hit reads the store).
        l1_max_bytes: u64 = 64 * 1024 * 1024,
        /// `l1_max_bytes` bounds what the process grows by after start (RSS plus sealed bodies,
        /// measured every 250 ms; plus `memory_max_bytes` without Redis): the L1 holds less
        /// while requests and the allocator take room. false: it bounds the entries' own bytes
        /// only (several gateways in one process, or an embedder's own work in it).
        l1_governor: bool = true,
        /// Strict mode only (no L1): bytes of entries kept as last decoded from the store,
        /// reused when a read returns exactly the same bytes; 0 decodes every read.
        decoded_max_bytes: u64 = 64 * 1024 * 1024,
        /// Bytes the in-process store holds when no Redis is configured.
        memory_max_bytes: u64 = 256 * 1024 * 1024,
        /// Responses larger than this (identity bytes) are served but not stored.
        max_entry_bytes: u64 = 4 * 1024 * 1024,
        /// How long past freshness an entry may be served when every replica fails, when the
        /// response does not say (`stale-if-error`).
        default_stale_if_error: String = "1h".into(),
        /// How long a request with an entry kept for stale-if-error waits for the replica
        /// before that entry answers it (the render goes on and is stored); 0 waits for the
        /// replica's own timeouts.
        stale_if_error_wait: String = "2s".into(),
        /// Cap on `stale-while-revalidate` (a bare directive from Next 13.4/14 means unbounded).
        max_stale_while_revalidate: String = "1d".into(),
        /// Cap on how long an entry is kept in the store (fresh + stale windows).
        max_ttl: String = "7d".into(),
        /// Background refreshes (stale-while-revalidate) running at once per gateway.
        max_background_refreshes: u64 = 64,
        /// Answers kept per URL for a response that varies on request headers beyond the
        /// key (`Vary: Accept-Language`, `Next-Url`): the most recently filled ones.
        max_variants: u64 = 16,
        /// Path prefixes never cached (always proxied).
        bypass_paths: StringList = StringList::default(),
        /// Cookie names whose presence bypasses the cache (draft mode's are built in).
        bypass_cookies: StringList = StringList::default(),
        /// The app enables AVIF images (`images.formats`), so `/_next/image` keys on it.
        avif: bool = false,
        /// Response headers whose values are invalidation tags, comma or space separated.
        tag_headers: StringList = StringList(vec![
            "cache-tag".into(),
            "surrogate-key".into(),
            "x-next-cache-tags".into(),
            "x-isrgate-tags".into(),
        ]),
    }
}

section! {
    /// `[webhook]`: `POST /_isrgate/revalidate` (secrets come from the environment).
    pub struct WebhookRaw {
        /// Largest request body accepted, bytes.
        max_body_bytes: u64 = 64 * 1024,
        /// How far `x-isrgate-timestamp` may be from now for a signed call.
        signature_window: String = "5m".into(),
        /// How long a call waits for every live gateway to acknowledge.
        ack_timeout: String = "2s".into(),
        /// The app's revalidate route on every Next.js replica (e.g. `/api/revalidate`);
        /// empty = no fan-out.
        replica_path: String = String::new(),
        /// Method of the fan-out call.
        replica_method: String = "POST".into(),
        /// Body of the fan-out call; `{paths}` and `{tags}` become JSON arrays.
        replica_body: String = r#"{"paths":{paths},"tags":{tags}}"#.into(),
        /// Header carrying `ISRGATE_REPLICA_SECRET`.
        replica_secret_header: String = "x-revalidate-secret".into(),
        /// Retries of a replica that is down or answers 5xx (backoff 200 ms, doubling).
        replica_retries: u64 = 3,
        /// Bound on one fan-out call.
        replica_timeout: String = "5s".into(),
        /// Render the purged paths again (HTML, then RSC) before a user asks, at most this
        /// many at once; 0 disables re-warming.
        rewarm_concurrency: u64 = 8,
        /// Shape of webhook bodies: `auto` (recognised from headers and shape), `isrgate`,
        /// `contentful`, `sanity`, `strapi` or `wordpress`; `?format=` wins per call.
        format: String = "auto".into(),
        /// Accept the secret in the URL (`?secret=`) and `GET`, for senders that can only call
        /// a URL. URLs end up in logs and browser histories: prefer a header.
        allow_query_secret: bool = false,
        /// `[[webhook.rules]]`: a CMS entry's content type → paths and tags.
        rules: Vec<WebhookRuleRaw> = Vec::new(),
    }
}

/// One `[[webhook.rules]]`: which CMS entries it matches and the templates of the paths and
/// tags they invalidate (`crate::invalidate::rules`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookRuleRaw {
    /// Content types (Contentful content type id, Sanity `_type`, Strapi model, WordPress
    /// post type); `"*"` = any.
    #[serde(rename = "type")]
    pub types: StringList,
    /// Only calls from this CMS.
    #[serde(default)]
    pub cms: Option<String>,
    /// Path templates (`/blog/{slug}`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Tag templates (`post-{id}`).
    #[serde(default)]
    pub tags: Vec<String>,
}

section! {
    /// `[deploy]`: builds side by side during a rollout (`crate::deploy`).
    pub struct DeployRaw {
        /// The newest build becomes current once it has at least this share of the healthy
        /// replicas, in percent (and its hot set is pre-warmed).
        switch_percent: u64 = 50,
        /// Most requested paths pre-rendered on a new build before it becomes current (HTML
        /// and RSC); 0 = no pre-warm.
        prewarm_paths: u64 = 200,
        /// Pre-warm renders at once.
        prewarm_concurrency: u64 = 4,
        /// Pre-warm renders started per second; 0 = no limit.
        prewarm_rate: u64 = 20,
        /// Longest a switch waits for its pre-warm; then it switches anyway.
        prewarm_timeout: String = "2m".into(),
    }
}

section! {
    /// `[coalesce]`: one upstream render per key across the fleet.
    pub struct CoalesceRaw {
        /// Coalesce concurrent misses and refreshes of a key (locally and, with Redis, across
        /// gateways); `false` sends every miss upstream.
        enabled: bool = true,
        /// How long a request waits for another request's render before fetching itself.
        wait_timeout: String = "10s".into(),
        /// Life of a fleet fill lock in Redis; the leader extends it while its render runs, so
        /// this bounds how long a dead leader's lock delays a take-over.
        lock_ttl: String = "5s".into(),
        /// How often a gateway waiting on another gateway's render re-reads Redis, in case the
        /// bus message that ends the wait was lost.
        poll_interval: String = "100ms".into(),
        /// How long a key whose answer was not cacheable skips coalescing (hit-for-miss);
        /// `0s` disables.
        hit_for_miss: String = "10s".into(),
    }
}

section! {
    /// `[redis]`: the shared store.
    pub struct RedisRaw {
        /// `redis://[user:password@]host:port[/db]`; empty = the in-process store.
        url: String = String::new(),
        /// Connections in the pool.
        pool_size: u64 = 4,
        /// Bound on every command; past it the request goes on without the store.
        command_timeout: String = "250ms".into(),
        /// Bound on establishing a connection.
        connect_timeout: String = "1s".into(),
        /// `rediss://` only: CA certificates (PEM) the server's certificate must chain to;
        /// empty = the system's roots.
        tls_ca_file: String = String::new(),
        /// `rediss://` only: client certificate chain (PEM), for `tls-auth-clients yes`.
        tls_cert_file: String = String::new(),
        /// `rediss://` only: the client certificate's private key (PEM).
        tls_key_file: String = String::new(),
        /// Publish this gateway's stats snapshot on the bus every 2 s for the fleet view
        /// (`/api/fleet`, the dashboard's fleet table); `false` hides it from the others.
        publish_stats: bool = true,
    }
}

section! {
    /// `[admin]`: the operator listener (health now; dashboard and metrics later).
    pub struct AdminRaw {
        /// Address to bind; empty disables the admin listener.
        listen: String = "127.0.0.1:9091".into(),
        /// Who may read `/metrics` without the token: `token` (nobody), `loopback`, `none`.
        metrics_auth: String = "token".into(),
    }
}

section! {
    /// `[log]`: logging.
    pub struct LogRaw {
        /// `pretty` (humans) or `json` (log pipelines).
        format: String = "pretty".into(),
        /// `tracing` filter: a level (`info`) or directives (`isrgate=debug,hyper=warn`).
        level: String = "info".into(),
        /// One line per request on the `isrgate::access` target, at `info` whatever `level`.
        access: bool = true,
    }
}

/// The whole file, section by section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Raw {
    /// `[listen]`
    pub listen: ListenRaw,
    /// `[upstream]`
    pub upstream: UpstreamRaw,
    /// `[health]`
    pub health: HealthRaw,
    /// `[cache]`
    pub cache: CacheRaw,
    /// `[coalesce]`
    pub coalesce: CoalesceRaw,
    /// `[webhook]`
    pub webhook: WebhookRaw,
    /// `[deploy]`
    pub deploy: DeployRaw,
    /// `[redis]`
    pub redis: RedisRaw,
    /// `[admin]`
    pub admin: AdminRaw,
    /// `[log]`
    pub log: LogRaw,
    /// `[tag_rules]`: path pattern → tags, e.g. `"/products/{id}" = ["product-{id}", "products"]`.
    pub tag_rules: std::collections::BTreeMap<String, Vec<String>>,
    /// `[[routes]]`: per-route policy, in file order.
    pub routes: Vec<RouteRaw>,
}

impl RouteRaw {
    /// Its keys, as written in the file.
    pub const KEYS: &'static [&'static str] = &[
        "path",
        "ttl",
        "stale_while_revalidate",
        "stale_if_error",
        "cache",
    ];
}

/// One `[[routes]]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRaw {
    /// Path pattern: `/blog/{slug}`, `/docs/*`.
    pub path: String,
    /// Freshness lifetime (duration).
    pub ttl: Option<String>,
    /// Stale-while-revalidate window (duration).
    pub stale_while_revalidate: Option<String>,
    /// Stale-if-error window (duration).
    pub stale_if_error: Option<String>,
    /// `false`: never cached.
    pub cache: Option<bool>,
}

impl Raw {
    /// Section names, as written in the file.
    pub const SECTIONS: &'static [&'static str] = &[
        "listen",
        "upstream",
        "health",
        "cache",
        "coalesce",
        "webhook",
        "deploy",
        "redis",
        "admin",
        "log",
        "tag_rules",
        "routes",
    ];

    /// Applies `section.key = value`.
    pub fn set(
        &mut self,
        section: &str,
        key: &str,
        value: ValueDeserializer<'_>,
    ) -> Result<(), SetError> {
        match section {
            "listen" => self.listen.set(key, value),
            "upstream" => self.upstream.set(key, value),
            "health" => self.health.set(key, value),
            "cache" => self.cache.set(key, value),
            "coalesce" => self.coalesce.set(key, value),
            // `[[routes]]` is an array of tables, which only the file sets (`load`).
            "routes" => Err(SetError::UnknownKey),
            // Any key: the keys are path patterns.
            "tag_rules" => {
                let tags = Vec::<String>::deserialize(value).map_err(SetError::Invalid)?;
                self.tag_rules.insert(key.to_owned(), tags);
                Ok(())
            }
            "webhook" => self.webhook.set(key, value),
            "deploy" => self.deploy.set(key, value),
            "redis" => self.redis.set(key, value),
            "admin" => self.admin.set(key, value),
            "log" => self.log.set(key, value),
            _ => Err(SetError::UnknownSection),
        }
    }

    /// Every `section.key` whose value differs in `other`, in section order (`[tag_rules]`
    /// and `[[routes]]` as a whole).
    pub fn changed(&self, other: &Raw) -> Vec<String> {
        let mut out = Vec::new();
        self.listen.changed("listen", &other.listen, &mut out);
        self.upstream.changed("upstream", &other.upstream, &mut out);
        self.health.changed("health", &other.health, &mut out);
        self.cache.changed("cache", &other.cache, &mut out);
        self.coalesce.changed("coalesce", &other.coalesce, &mut out);
        self.webhook.changed("webhook", &other.webhook, &mut out);
        self.deploy.changed("deploy", &other.deploy, &mut out);
        self.redis.changed("redis", &other.redis, &mut out);
        self.admin.changed("admin", &other.admin, &mut out);
        self.log.changed("log", &other.log, &mut out);
        if self.tag_rules != other.tag_rules {
            out.push("tag_rules".into());
        }
        if self.routes != other.routes {
            out.push("routes".into());
        }
        out
    }

    /// The keys of a section, for "did you mean" hints.
    pub fn keys(section: &str) -> &'static [&'static str] {
        match section {
            "listen" => ListenRaw::KEYS,
            "upstream" => UpstreamRaw::KEYS,
            "health" => HealthRaw::KEYS,
            "cache" => CacheRaw::KEYS,
            "coalesce" => CoalesceRaw::KEYS,
            "webhook" => WebhookRaw::KEYS,
            "deploy" => DeployRaw::KEYS,
            "redis" => RedisRaw::KEYS,
            "admin" => AdminRaw::KEYS,
            "log" => LogRaw::KEYS,
            _ => &[],
        }
    }
}
