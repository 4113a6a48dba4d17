//! [`Raw`] → [`Config`]: parse every value into its real type and check ranges and combinations,
//! collecting every problem (with the key, where it was set, and the fix) instead of stopping at
//! the first. A failed key yields a placeholder so checking goes on; the placeholder never
//! escapes because any problem makes the result `Err`.

use std::net::SocketAddr;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use ipnet::IpNet;

use super::load::{Problem, Source, Sources};
use super::raw::Raw;
use super::{Admin, Config, DnsName, Health, Listen, Log, LogFormat, MetricsAuth, Upstream};

/// hyper refuses read buffers below this (it asserts), so it is the floor of `max_header_bytes`.
const MIN_HEADER_BYTES: u64 = 8192;
/// Longest accepted duration for any key.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// A ceiling that keeps one slow client from pinning a lot of memory.
const MAX_HEADER_BYTES: u64 = 1024 * 1024;

struct Checker<'a> {
    sources: &'a Sources,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, key: &str, message: impl Into<String>) {
        let source = self.sources.get(key).cloned().unwrap_or(Source::Default);
        self.problems.push(Problem {
            key: key.to_owned(),
            source,
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, text: &str, allow_zero: bool) -> Duration {
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.fail(key, "must be greater than zero");
                Duration::ZERO
            }
            // Deadlines are `Instant + duration`: absurd values would overflow, and no timeout
            // here needs more than a day.
            Ok(d) if d > MAX_DURATION => {
                self.fail(key, format!("{text:?} is longer than the maximum of 1 day"));
                Duration::ZERO
            }
            Ok(d) => d,
            Err(e) => {
                self.fail(
                    key,
                    format!("{text:?} is not a duration ({e}); write a number with a unit: 500ms, 10s, 5m"),
                );
                Duration::ZERO
            }
        }
    }

    /// A duration that may be long (cache lifetimes): zero allowed, at most a year.
    fn long_duration(&mut self, key: &str, text: &str) -> Duration {
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d <= Duration::from_secs(366 * 86_400) => d,
            Ok(_) => {
                self.fail(
                    key,
                    format!("{text:?} is longer than the maximum of 1 year"),
                );
                // A placeholder that adds no second problem (the result is an error anyway).
                Duration::from_secs(366 * 86_400)
            }
            Err(e) => {
                self.fail(
                    key,
                    format!("{text:?} is not a duration ({e}); write e.g. 1h, 1d, 7d"),
                );
                Duration::ZERO
            }
        }
    }

    /// `HOST:PORT` with an IP, or a name resolved once now (`localhost:8080`, as nginx's
    /// `listen` does): its first IPv4 address, else its first address.
    fn socket_addr(&mut self, key: &str, text: &str) -> SocketAddr {
        let text = text.trim();
        if let Ok(addr) = text.parse() {
            return addr;
        }
        let resolved = match std::net::ToSocketAddrs::to_socket_addrs(text) {
            Ok(addrs) => {
                let all: Vec<SocketAddr> = addrs.collect();
                all.iter().find(|a| a.is_ipv4()).or(all.first()).copied()
            }
            Err(_) => None,
        };
        resolved.unwrap_or_else(|| {
            self.fail(
                key,
                format!("{text:?} is not a socket address; write HOST:PORT, HOST an IP or a name that resolves, such as 0.0.0.0:8080, [::]:8080 or localhost:8080"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    /// A count where 0 means "off": `None` for 0, else the value checked against `hi`.
    fn optional_count(&mut self, key: &str, value: u64, hi: u64) -> Option<u32> {
        match self.in_range(key, value, 0, hi) {
            0 => None,
            n => Some(n as u32),
        }
    }

    /// A list of IP addresses and CIDRs (an address is its own /32 or /128).
    fn networks(&mut self, key: &str, list: &[String]) -> Vec<IpNet> {
        list.iter()
            .filter_map(|t| {
                let t = t.trim();
                t.parse::<IpNet>()
                    .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        self.fail(
                            key,
                            format!(
                                "{t:?} is not an IP address or CIDR; write 10.0.0.0/8 or 192.0.2.7"
                            ),
                        )
                    })
                    .ok()
            })
            .collect()
    }

    fn in_range(&mut self, key: &str, value: u64, lo: u64, hi: u64) -> u64 {
        if (lo..=hi).contains(&value) {
            value
        } else {
            self.fail(key, format!("{value} is out of range; use {lo} to {hi}"));
            lo
        }
    }

    fn replica(&mut self, key: &str, text: &str) -> Option<Authority> {
        let uri: Uri = match text.trim().parse() {
            Ok(u) => u,
            Err(e) => {
                self.fail(
                    key,
                    format!("{text:?} is not a URL ({e}); write http://HOST:PORT"),
                );
                return None;
            }
        };
        match (uri.scheme(), uri.authority(), uri.path_and_query()) {
            (Some(s), Some(a), pq) if *s == Scheme::HTTP => {
                if pq.is_some_and(|pq| pq.as_str() != "/") {
                    self.fail(key, format!("{text:?} has a path; replicas are HOST:PORT only, paths are forwarded as requested"));
                }
                if a.as_str().contains('@') {
                    self.fail(key, format!("{text:?} has user info; remove it"));
                }
                Some(a.clone())
            }
            (Some(s), _, _) if *s == Scheme::HTTPS => {
                self.fail(key, format!("{text:?}: https to replicas is not supported; Next.js replicas are reached over plain http inside the cluster"));
                None
            }
            _ => {
                self.fail(
                    key,
                    format!("{text:?} is not an http URL; write http://HOST:PORT"),
                );
                None
            }
        }
    }
}

/// Checks everything; `Err` lists every problem found.
pub(super) fn validate(raw: &Raw, sources: &Sources) -> Result<Config, Vec<Problem>> {
    let mut c = Checker {
        sources,
        problems: Vec::new(),
    };
    let listen = listen(&mut c, raw);
    let upstream = upstream(&mut c, raw);
    let health = health(&mut c, raw);
    let admin = match raw.admin.listen.trim() {
        "" => None,
        text => Some(Admin {
            listen: c.socket_addr("admin.listen", text),
            token: None,
            metrics_auth: metrics_auth(&mut c, &raw.admin.metrics_auth),
        }),
    };
    if admin
        .as_ref()
        .is_some_and(|a| a.listen == listen.addr && a.listen.port() != 0)
    {
        c.fail(
            "admin.listen",
            "is the same address as listen.addr; give the admin listener its own port",
        );
    }
    let log = log(&mut c, raw);
    let cache = cache(&mut c, raw);
    let redis = redis(&mut c, raw);
    let webhook = webhook(&mut c, &raw.webhook);
    let deploy = deploy(&mut c, &raw.deploy);
    if c.problems.is_empty() {
        Ok(Config {
            listen,
            upstream,
            health,
            cache,
            redis,
            admin,
            log,
            webhook,
            deploy,
            raw: std::sync::Arc::new(raw.clone()),
        })
    } else {
        Err(c.problems)
    }
}

fn listen(c: &mut Checker<'_>, raw: &Raw) -> Listen {
    let r = &raw.listen;
    let public_scheme = match r.public_scheme.as_str() {
        "http" => Scheme::HTTP,
        "https" => Scheme::HTTPS,
        other => {
            c.fail(
                "listen.public_scheme",
                format!("{other:?} is not a scheme; use \"http\" or \"https\""),
            );
            Scheme::HTTP
        }
    };
    let trusted_proxies = c.networks("listen.trusted_proxies", &r.trusted_proxies.0);
    let debug_from = c.networks("listen.debug_from", &r.debug_from.0);
    Listen {
        addr: c.socket_addr("listen.addr", &r.addr),
        workers: match c.in_range("listen.workers", r.workers, 0, 1024) {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n as usize,
        },
        public_scheme,
        header_read_timeout: c.duration(
            "listen.header_read_timeout",
            &r.header_read_timeout,
            false,
        ),
        body_read_timeout: c.duration("listen.body_read_timeout", &r.body_read_timeout, false),
        idle_timeout: c.duration("listen.idle_timeout", &r.idle_timeout, false),
        max_header_bytes: c.in_range(
            "listen.max_header_bytes",
            r.max_header_bytes,
            MIN_HEADER_BYTES,
            MAX_HEADER_BYTES,
        ) as usize,
        max_body_bytes: r.max_body_bytes,
        max_concurrent_requests: c.in_range(
            "listen.max_concurrent_requests",
            r.max_concurrent_requests,
            1,
            1 << 20,
        ) as usize,
        shutdown_grace: c.duration("listen.shutdown_grace", &r.shutdown_grace, true),
        accept_grace: c.duration("listen.accept_grace", &r.accept_grace, true),
        reuse_port: r.reuse_port,
        send_timeout: c.duration("listen.send_timeout", &r.send_timeout, false),
        trusted_proxies,
        debug_from,
        trust_forwarded_host: r.trust_forwarded_host,
        reject_internal_paths: r.reject_internal_paths,
        preserve_header_case: r.preserve_header_case,
        hit_lane: r.hit_lane,
    }
}

fn upstream(c: &mut Checker<'_>, raw: &Raw) -> Upstream {
    let r = &raw.upstream;
    // The built-in replica (a local `next start`) is a default for the simplest setup only: as
    // soon as discovery is configured, replicas are what DNS says plus what was set explicitly.
    let replicas_explicit = c.sources.contains_key("upstream.replicas");
    let discovery = !r.dns_name.trim().is_empty();
    let replicas: Vec<Authority> = if discovery && !replicas_explicit {
        Vec::new()
    } else {
        r.replicas
            .0
            .iter()
            .filter_map(|t| c.replica("upstream.replicas", t))
            .collect()
    };
    let dns_name = match r.dns_name.trim() {
        "" => None,
        text => match text.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
            Some((host, Ok(port))) if !host.is_empty() && port != 0 => Some(DnsName {
                host: host.to_owned(),
                port,
            }),
            _ => {
                c.fail(
                    "upstream.dns_name",
                    format!("{text:?} is not NAME:PORT; write e.g. nextjs-headless.default.svc.cluster.local:3000"),
                );
                None
            }
        },
    };
    if r.replicas.0.is_empty() && dns_name.is_none() && r.dns_name.trim().is_empty() {
        c.fail(
            "upstream.replicas",
            "no replicas: set upstream.replicas (or --upstream) and/or upstream.dns_name",
        );
    }
    Upstream {
        replicas,
        dns_name,
        dns_refresh: c.duration("upstream.dns_refresh", &r.dns_refresh, false),
        connect_timeout: c.duration("upstream.connect_timeout", &r.connect_timeout, false),
        response_header_timeout: c.duration(
            "upstream.response_header_timeout",
            &r.response_header_timeout,
            false,
        ),
        total_timeout: c.duration("upstream.total_timeout", &r.total_timeout, false),
        pool_idle_timeout: c.duration("upstream.pool_idle_timeout", &r.pool_idle_timeout, false),
        pool_max_idle_per_replica: c.in_range(
            "upstream.pool_max_idle_per_replica",
            r.pool_max_idle_per_replica,
            0,
            1 << 16,
        ) as usize,
        prerender_manifest: match r.prerender_manifest.trim() {
            "" => None,
            path => Some(std::path::PathBuf::from(path)),
        },
    }
}

fn health(c: &mut Checker<'_>, raw: &Raw) -> Health {
    let r = &raw.health;
    let path = match r.path.parse::<PathAndQuery>() {
        Ok(p) if p.as_str().starts_with('/') => p,
        _ => {
            c.fail(
                "health.path",
                format!("{:?} is not a path; write one starting with /", r.path),
            );
            PathAndQuery::from_static("/")
        }
    };
    let interval = c.duration("health.interval", &r.interval, true);
    Health {
        path,
        interval: (!interval.is_zero()).then_some(interval),
        timeout: c.duration("health.timeout", &r.timeout, false),
        healthy_threshold: c.in_range("health.healthy_threshold", r.healthy_threshold, 1, 100)
            as u32,
        unhealthy_threshold: c.in_range("health.unhealthy_threshold", r.unhealthy_threshold, 1, 100)
            as u32,
        passive_failures: c.optional_count("health.passive_failures", r.passive_failures, 1000),
        ejection: c.duration("health.ejection", &r.ejection, false),
        stall_after: {
            let d = c.duration("health.stall_after", &r.stall_after, true);
            (!d.is_zero()).then_some(d)
        },
    }
}

fn cache(c: &mut Checker<'_>, raw: &Raw) -> Option<super::Cache> {
    let r = &raw.cache;
    if r.namespace.trim().is_empty() || r.namespace.chars().any(char::is_whitespace) {
        c.fail(
            "cache.namespace",
            "must be a non-empty word (the deployment id or build id)",
        );
    }
    let long = |c: &mut Checker<'_>, key: &str, text: &str| c.long_duration(key, text);
    let cache = super::Cache {
        namespace: r.namespace.trim().to_owned(),
        l1_max_bytes: r.l1_max_bytes,
        l1_governor: r.l1_governor,
        decoded_max_bytes: r.decoded_max_bytes,
        memory_max_bytes: c.in_range(
            "cache.memory_max_bytes",
            r.memory_max_bytes,
            1 << 20,
            u64::MAX,
        ),
        max_entry_bytes: c.in_range("cache.max_entry_bytes", r.max_entry_bytes, 1, 1 << 30)
            as usize,
        default_stale_if_error: long(c, "cache.default_stale_if_error", &r.default_stale_if_error),
        stale_if_error_wait: c.duration("cache.stale_if_error_wait", &r.stale_if_error_wait, true),
        max_stale_while_revalidate: long(
            c,
            "cache.max_stale_while_revalidate",
            &r.max_stale_while_revalidate,
        ),
        max_ttl: long(c, "cache.max_ttl", &r.max_ttl),
        max_background_refreshes: c.in_range(
            "cache.max_background_refreshes",
            r.max_background_refreshes,
            1,
            100_000,
        ) as usize,
        max_variants: c.in_range("cache.max_variants", r.max_variants, 1, 1_000) as usize,
        bypass_paths: r
            .bypass_paths
            .0
            .iter()
            .map(|p| p.trim().to_owned())
            .collect(),
        bypass_cookies: r
            .bypass_cookies
            .0
            .iter()
            .map(|p| p.trim().to_owned())
            .collect(),
        avif: r.avif,
        coalesce: coalesce(c, raw),
        tag_headers: r
            .tag_headers
            .0
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect(),
        tag_rules: raw
            .tag_rules
            .iter()
            .filter_map(|(pattern, tags)| {
                crate::cache::tags::Rule::new(pattern, tags)
                    .map_err(|e| c.fail(&format!("tag_rules.{pattern}"), e))
                    .ok()
            })
            .collect(),
        routes: Vec::new(),
    };
    let cache = super::Cache {
        routes: routes(c, raw, &cache),
        ..cache
    };
    for h in &cache.tag_headers {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            c.fail("cache.tag_headers", format!("{h:?} is not a header name"));
        }
    }
    for p in &cache.bypass_paths {
        if !p.starts_with('/') {
            c.fail(
                "cache.bypass_paths",
                format!("{p:?} is not a path prefix; write one starting with /"),
            );
        }
    }
    // Only when the value parsed: a bad value is already one problem, not two.
    if cache.max_ttl.is_zero() && humantime::parse_duration(r.max_ttl.trim()).is_ok() {
        c.fail("cache.max_ttl", "must be greater than zero");
    }
    r.enabled.then_some(cache)
}

fn deploy(c: &mut Checker<'_>, r: &super::raw::DeployRaw) -> super::Deploy {
    super::Deploy {
        switch_percent: c.in_range("deploy.switch_percent", r.switch_percent, 1, 100) as u32,
        prewarm_paths: c.in_range("deploy.prewarm_paths", r.prewarm_paths, 0, 100_000) as usize,
        prewarm_concurrency: c.in_range("deploy.prewarm_concurrency", r.prewarm_concurrency, 1, 256)
            as usize,
        prewarm_rate: c.optional_count("deploy.prewarm_rate", r.prewarm_rate, 100_000),
        prewarm_timeout: c.duration("deploy.prewarm_timeout", &r.prewarm_timeout, true),
    }
}

fn webhook(c: &mut Checker<'_>, w: &super::raw::WebhookRaw) -> super::Webhook {
    use crate::invalidate::cms::Format;
    let format = Format::parse(w.format.trim()).unwrap_or_else(|| {
        c.fail(
            "webhook.format",
            format!(
                "{:?} is not a format; use one of {}",
                w.format,
                Format::NAMES
            ),
        );
        Format::Auto
    });
    super::Webhook {
        secrets: None,
        max_body_bytes: c.in_range("webhook.max_body_bytes", w.max_body_bytes, 1, 16 << 20)
            as usize,
        signature_window: c.duration("webhook.signature_window", &w.signature_window, false),
        ack_timeout: c.duration("webhook.ack_timeout", &w.ack_timeout, true),
        fanout: fanout(c, w),
        preview_mode_id: None,
        rewarm_concurrency: c.in_range("webhook.rewarm_concurrency", w.rewarm_concurrency, 0, 1_000)
            as usize,
        format,
        allow_query_secret: w.allow_query_secret,
        rules: webhook_rules(c, &w.rules),
    }
}

/// `[[webhook.rules]]`: each problem keyed `webhook.rules[i].<key>`, at the rules' source.
fn webhook_rules(
    c: &mut Checker<'_>,
    raw: &[super::raw::WebhookRuleRaw],
) -> Vec<crate::invalidate::rules::Rule> {
    use crate::invalidate::rules::{Rule, RuleSpec};
    let mut rules = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let spec = RuleSpec {
            types: &r.types.0,
            cms: r.cms.as_deref(),
            paths: &r.paths,
            tags: &r.tags,
        };
        match Rule::new(spec) {
            Ok(rule) => rules.push(rule),
            Err(problems) => {
                let source = c
                    .sources
                    .get("webhook.rules")
                    .cloned()
                    .unwrap_or(Source::Default);
                for (key, message) in problems {
                    c.problems.push(Problem {
                        key: format!("webhook.rules[{i}].{key}"),
                        source: source.clone(),
                        message,
                    });
                }
            }
        }
    }
    rules
}

fn fanout(c: &mut Checker<'_>, w: &super::raw::WebhookRaw) -> super::Fanout {
    let path = w.replica_path.trim();
    if !path.is_empty()
        && (!path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err())
    {
        c.fail(
            "webhook.replica_path",
            format!("{path:?} is not a path; write one like /api/revalidate"),
        );
    }
    let method = match w.replica_method.trim().to_ascii_uppercase().as_str() {
        "POST" => http::Method::POST,
        "PUT" => http::Method::PUT,
        "GET" => http::Method::GET,
        other => {
            c.fail(
                "webhook.replica_method",
                format!("{other:?} is not POST, PUT or GET"),
            );
            http::Method::POST
        }
    };
    let header = w.replica_secret_header.trim().to_ascii_lowercase();
    let secret_header = http::HeaderName::from_bytes(header.as_bytes()).unwrap_or_else(|_| {
        c.fail(
            "webhook.replica_secret_header",
            format!("{header:?} is not a header name"),
        );
        http::HeaderName::from_static("x-revalidate-secret")
    });
    super::Fanout {
        path: (!path.is_empty()).then(|| path.to_owned()),
        method,
        body: w.replica_body.clone(),
        secret_header,
        secret: None,
        retries: c.in_range("webhook.replica_retries", w.replica_retries, 0, 10) as u32,
        timeout: c.duration("webhook.replica_timeout", &w.replica_timeout, false),
    }
}

/// `[[routes]]`, compiled in file order; each problem named `routes[i].key`.
fn routes(c: &mut Checker, raw: &Raw, cache: &super::Cache) -> Vec<crate::cache::routes::Route> {
    let mut out = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let name = |key: &str| format!("routes[{i}].{key}");
        let mut window = |key: &str, text: &Option<String>| {
            let text = text.as_deref()?;
            let d = c.long_duration(&name(key), text);
            if d > cache.max_ttl {
                c.fail(
                    &name(key),
                    format!(
                        "{text:?} is longer than cache.max_ttl ({}), which caps every entry",
                        humantime::format_duration(cache.max_ttl)
                    ),
                );
            }
            Some(d)
        };
        let lifetimes = crate::cache::routes::Lifetimes {
            ttl: window("ttl", &r.ttl),
            stale_while_revalidate: window("stale_while_revalidate", &r.stale_while_revalidate),
            stale_if_error: window("stale_if_error", &r.stale_if_error),
        };
        let cache_it = r.cache.unwrap_or(true);
        if lifetimes.ttl.is_some_and(|t| t.is_zero()) {
            c.fail(
                &name("ttl"),
                "must be greater than zero; write cache = false to never cache",
            );
        }
        if !cache_it && lifetimes != crate::cache::routes::Lifetimes::default() {
            c.fail(
                &name("cache"),
                "cache = false caches nothing: drop its ttl and stale windows",
            );
        }
        if cache_it && lifetimes == crate::cache::routes::Lifetimes::default() {
            c.fail(
                &name("path"),
                format!("{:?} sets nothing: give it ttl, stale_while_revalidate, stale_if_error or cache = false", r.path),
            );
        }
        match crate::cache::routes::Route::new(r.path.trim(), cache_it, lifetimes) {
            Ok(route) => out.push(route),
            Err(e) => c.fail(&name("path"), e),
        }
    }
    out
}

fn coalesce(c: &mut Checker<'_>, raw: &Raw) -> super::Coalesce {
    let r = &raw.coalesce;
    super::Coalesce {
        enabled: r.enabled,
        wait_timeout: c.duration("coalesce.wait_timeout", &r.wait_timeout, false),
        lock_ttl: c.duration("coalesce.lock_ttl", &r.lock_ttl, false),
        poll_interval: c.duration("coalesce.poll_interval", &r.poll_interval, false),
        hit_for_miss: c.duration("coalesce.hit_for_miss", &r.hit_for_miss, true),
    }
}

fn redis(c: &mut Checker<'_>, raw: &Raw) -> Option<super::Redis> {
    let r = &raw.redis;
    let url = r.url.trim();
    if url.is_empty() {
        return None;
    }
    let path = |s: &str| (!s.trim().is_empty()).then(|| std::path::PathBuf::from(s.trim()));
    let tls = crate::cache::tls::RedisTls {
        ca_file: path(&r.tls_ca_file),
        cert_file: path(&r.tls_cert_file),
        key_file: path(&r.tls_key_file),
    };
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "redis-cluster" | "redis-sentinel" => {
            if let Some(key) = [
                ("redis.tls_ca_file", &tls.ca_file),
                ("redis.tls_cert_file", &tls.cert_file),
                ("redis.tls_key_file", &tls.key_file),
            ]
            .iter()
            .find_map(|(k, v)| v.is_some().then_some(*k))
            {
                c.fail(
                    key,
                    "applies to TLS only; write the URL as rediss:// (or remove this key)",
                );
            }
        }
        "rediss" | "rediss-cluster" | "rediss-sentinel" => {
            if let Err(e) = tls.fred_config() {
                c.fail(e.key, e.reason);
            }
        }
        // The URL may carry a password: never echo it.
        _ => c.fail(
            "redis.url",
            "is not a Redis URL; write redis://[user:password@]host:port[/db] (rediss:// for TLS; or redis-cluster://, redis-sentinel://)",
        ),
    }
    // What the client will make of it, now rather than at run time (a Sentinel URL written
    // `redis-sentinel://host:26379/mymaster` passed here and failed on start). The client's
    // reason names no part of the URL.
    if scheme.starts_with("redis") {
        if let Err(e) = fred::types::config::Config::from_url(url) {
            let hint = if scheme.ends_with("sentinel") {
                "; a Sentinel URL is redis-sentinel://host:26379?sentinelServiceName=mymaster (more sentinels: &node=host2:26379; a database: /0 before the ?)"
            } else {
                ""
            };
            c.fail(
                "redis.url",
                format!("cannot be used: {}{hint}", e.details()),
            );
        }
    }
    Some(super::Redis {
        url: url.to_owned(),
        pool_size: c.in_range("redis.pool_size", r.pool_size, 1, 256) as usize,
        command_timeout: c.duration("redis.command_timeout", &r.command_timeout, false),
        connect_timeout: c.duration("redis.connect_timeout", &r.connect_timeout, false),
        tls,
        publish_stats: r.publish_stats,
    })
}

fn metrics_auth(c: &mut Checker<'_>, text: &str) -> MetricsAuth {
    match text {
        "token" => MetricsAuth::Token,
        "loopback" => MetricsAuth::Loopback,
        "none" => MetricsAuth::None,
        other => {
            c.fail(
                "admin.metrics_auth",
                format!("{other:?} is not a choice; use \"token\" (the default: /metrics needs ISRGATE_ADMIN_TOKEN), \"loopback\" (no token from 127.0.0.1 or ::1) or \"none\" (no token: keep admin.listen private)"),
            );
            MetricsAuth::Token
        }
    }
}

fn log(c: &mut Checker<'_>, raw: &Raw) -> Log {
    let format = match raw.log.format.as_str() {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            c.fail(
                "log.format",
                format!("{other:?} is not a log format; use \"pretty\" or \"json\""),
            );
            LogFormat::Pretty
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&raw.log.level) {
        c.fail(
            "log.level",
            format!("{:?} is not a log filter ({e}); use a level such as info, or directives such as isrgate=debug,hyper=warn", raw.log.level),
        );
    } else if let Some(word) = not_a_level(&raw.log.level) {
        c.fail(
            "log.level",
            format!("{word:?} is not a level; use off, error, warn, info, debug or trace, or target=level directives such as isrgate=debug,hyper=warn"),
        );
    }
    Log {
        format,
        level: raw.log.level.clone(),
        access: raw.log.access,
    }
}

/// A bare word of a log filter that is not a level (`verbose`): tracing takes it for a target
/// name, every event of that target on, so a mistyped level would quietly log nothing else.
/// (A target alone is still written `target=trace`.)
fn not_a_level(level: &str) -> Option<&str> {
    level.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '['])
            && d.parse::<tracing::level_filters::LevelFilter>().is_err()
    })
}

#[cfg(test)]
mod tests {
    use crate::config::load::{ConfigError, from_toml};

    fn messages(text: &str) -> Vec<String> {
        match from_toml(text) {
            Err(ConfigError::Invalid(p)) => p.iter().map(ToString::to_string).collect(),
            Ok(_) => panic!("expected problems for {text}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            (
                "[listen]\nheader_read_timeout = \"soon\"",
                "listen.header_read_timeout",
            ),
            ("[listen]\nidle_timeout = \"0s\"", "listen.idle_timeout"),
            (
                "[listen]\nsend_timeout = \"400000000years\"",
                "listen.send_timeout",
            ),
            (
                "[listen]\nmax_header_bytes = 100",
                "listen.max_header_bytes",
            ),
            (
                "[listen]\nmax_concurrent_requests = 0",
                "listen.max_concurrent_requests",
            ),
            ("[listen]\npublic_scheme = \"ftp\"", "listen.public_scheme"),
            (
                "[listen]\ntrusted_proxies = [\"10.0.0.0/33\"]",
                "listen.trusted_proxies",
            ),
            (
                "[listen]\ndebug_from = [\"localhost\"]",
                "listen.debug_from",
            ),
            (
                "[upstream]\nreplicas = [\"https://a:1\"]",
                "upstream.replicas",
            ),
            (
                "[upstream]\nreplicas = [\"http://a:1/x\"]",
                "upstream.replicas",
            ),
            ("[upstream]\nreplicas = []", "upstream.replicas"),
            ("[upstream]\ndns_name = \"svc\"", "upstream.dns_name"),
            ("[health]\npath = \"x\"", "health.path"),
            (
                "[health]\nhealthy_threshold = 0",
                "health.healthy_threshold",
            ),
            ("[admin]\nlisten = \"localhost\"", "admin.listen"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[redis]\nurl = \"http://x\"", "redis.url"),
            (
                "[redis]\nurl = \"rediss://x:6380\"\ntls_ca_file = \"/nonexistent.pem\"",
                "redis.tls_ca_file",
            ),
            (
                "[redis]\nurl = \"redis://x:6379\"\ntls_ca_file = \"/etc/hosts\"",
                "redis.tls_ca_file",
            ),
            (
                "[redis]\nurl = \"rediss://x:6380\"\ntls_cert_file = \"/etc/hosts\"",
                "redis.tls_cert_file",
            ),
            ("[cache]\nnamespace = \"a b\"", "cache.namespace"),
            ("[cache]\nmax_ttl = \"2years\"", "cache.max_ttl"),
            ("[cache]\nbypass_paths = [\"api\"]", "cache.bypass_paths"),
            ("[log]\nlevel = \"isrgate=loud\"", "log.level"),
            ("[log]\nlevel = \"verbose\"", "log.level"),
            ("[log]\nlevel = \"warn,isrgate\"", "log.level"),
            ("[log]\naccess = \"no\"", "log.access"),
            ("[tag_rules]\n\"products\" = [\"x\"]", "tag_rules.products"),
            ("[webhook]\nreplica_path = \"api\"", "webhook.replica_path"),
            (
                "[redis]\nurl = \"redis-sentinel://h:26379/mymaster\"",
                "redis.url",
            ),
            ("[listen]\naddr = \"nowhere.invalid:8080\"", "listen.addr"),
            ("[webhook]\nformat = \"drupal\"", "webhook.format"),
        ];
        for (text, key) in cases {
            let m = messages(text);
            assert_eq!(m.len(), 1, "{text}: {m:#?}");
            assert!(m[0].contains(&format!(": {key}: ")), "{text}: {}", m[0]);
            // The key's own line: the last one of each case.
            let line = format!("<inline>:{}:1", text.lines().count());
            assert!(m[0].starts_with(&line), "{text}: {}", m[0]);
        }
    }

    #[test]
    fn webhook_rules_compile_and_report_each_problem() {
        let c = from_toml(
            "[webhook]\nformat = \"sanity\"\n[[webhook.rules]]\ntype = [\"post\", \"page\"]\npaths = [\"/blog/{slug.current}\"]\ntags = [\"post-{id}\"]\n",
        )
        .expect("valid");
        assert_eq!(c.webhook.rules.len(), 1);
        assert_eq!(c.webhook.format, crate::invalidate::cms::Format::Sanity);
        let m = messages(
            "[[webhook.rules]]\ntype = \"\"\ncms = \"drupal\"\ntags = [\"t\"]\n[[webhook.rules]]\ntype = \"a\"\ntags = [\"a {b}\"]\n",
        );
        assert_eq!(m.len(), 3, "{m:#?}");
        assert!(m[0].contains("webhook.rules[0].type"), "{}", m[0]);
        assert!(m[1].contains("webhook.rules[0].cms"), "{}", m[1]);
        assert!(m[2].contains("webhook.rules[1].tags[0]"), "{}", m[2]);
        let m = messages("[[webhook.rules]]\ntype = \"a\"\npath = [\"/x\"]\n");
        assert!(m[0].contains("unknown field `path`"), "{}", m[0]);
    }

    #[test]
    fn dns_name_alone_replaces_the_default_replica() {
        let c = from_toml("[upstream]\ndns_name = \"svc:3000\"").expect("valid");
        assert!(c.upstream.replicas.is_empty());
        let c = from_toml("[upstream]\ndns_name = \"svc:3000\"\nreplicas = [\"http://a:1\"]")
            .expect("valid");
        assert_eq!(c.upstream.replicas.len(), 1);
    }

    #[test]
    fn zero_interval_disables_active_checks() {
        let c = from_toml("[health]\ninterval = \"0s\"\npassive_failures = 0").expect("valid");
        assert!(c.health.interval.is_none());
        assert!(c.health.passive_failures.is_none());
    }

    #[test]
    fn a_listen_address_may_name_a_host_as_help_says() {
        let c = from_toml("[listen]\naddr = \"localhost:8080\"").expect("valid");
        assert!(c.listen.addr.ip().is_loopback());
        assert_eq!(c.listen.addr.port(), 8080);
        let c =
            from_toml("[redis]\nurl = \"redis-sentinel://h:26379?sentinelServiceName=mymaster\"")
                .expect("a Sentinel URL as the client reads it");
        assert!(c.redis.is_some());
    }

    #[test]
    fn log_levels_and_directives_pass_and_the_access_log_is_on_by_default() {
        for level in [
            "info",
            "WARN",
            "off",
            "isrgate=debug,hyper=warn",
            "warn,isrgate::access=off",
        ] {
            let c = from_toml(&format!("[log]\nlevel = {level:?}")).expect(level);
            assert_eq!(c.log.level, level);
            assert!(c.log.access);
        }
        let c = from_toml("[log]\naccess = false").expect("valid");
        assert!(!c.log.access);
    }

    #[test]
    fn metrics_auth_is_the_token_unless_said_and_a_wrong_word_is_refused() {
        use crate::config::MetricsAuth;
        let admin = |toml: &str| from_toml(toml).expect("valid").admin.expect("admin");
        assert_eq!(admin("").metrics_auth, MetricsAuth::Token);
        let loopback = admin("[admin]\nmetrics_auth = \"loopback\"");
        assert_eq!(loopback.metrics_auth, MetricsAuth::Loopback);
        let none = admin("[admin]\nmetrics_auth = \"none\"");
        assert_eq!(none.metrics_auth, MetricsAuth::None);
        let e = from_toml("[admin]\nmetrics_auth = \"public\"").expect_err("refused");
        assert!(e.to_string().contains("admin.metrics_auth"), "{e}");
    }

    #[test]
    fn empty_admin_listen_disables_admin() {
        let c = from_toml("[admin]\nlisten = \"\"").expect("valid");
        assert!(c.admin.is_none());
    }
}
