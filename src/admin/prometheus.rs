//! `GET /metrics`: every family of the metrics table ([`crate::metrics::table`]), the gauges
//! read from the gateway's state now ([`GAUGES`]: replicas, L1, Redis, fleet) and
//! `isrgate_build_info`, written in the format the scraper asks for in `Accept`
//! ([`negotiate`]): OpenMetrics 1.0 when it asks for `application/openmetrics-text` at least as
//! much as for text, else the classic text format 0.0.4 (what `promtool check metrics`, curl
//! and older scrapers read). A scrape reads atomics; the request path pays nothing for it.
//!
//! The two formats differ in three places, all here: a counter's family is named without
//! `_total` in OpenMetrics (`# TYPE isrgate_requests counter`, sample `isrgate_requests_total`),
//! an info family without `_info` (and typed `info`, a gauge in text), and OpenMetrics ends
//! with `# EOF`.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;

use http::HeaderValue;

use crate::app::AppState;
use crate::metrics::{Family, Kind, Series, Value};
use crate::shared::Shared;

/// The classic text format's content type.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    /// Its `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

/// The format an `Accept` header asks for: OpenMetrics when `application/openmetrics-text` is
/// accepted with a quality at least that of any text type (`text/plain`, `text/*`, `*/*`);
/// the text format otherwise, and without `Accept`.
pub fn negotiate(accept: Option<&HeaderValue>) -> Format {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return Format::Text;
    };
    let (mut open, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => open = open.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if open > 0.0 && open >= text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// The exposition of `app` in `format`.
pub fn render(app: &Arc<AppState>, format: Format) -> String {
    let mut families = app.metrics.families();
    families.extend(gauges(app));
    families.push(build_info());
    encode(&families, format)
}

/// `families` in `format`.
pub fn encode(families: &[Family], format: Format) -> String {
    let mut out = String::with_capacity(32 * 1024);
    for family in families {
        write_family(&mut out, family, format);
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

fn write_family(out: &mut String, f: &Family, format: Format) {
    let open = format == Format::OpenMetrics;
    let (declared, kind) = match (f.kind, open) {
        (Kind::Counter, true) => (f.name.strip_suffix("_total").unwrap_or(f.name), "counter"),
        (Kind::Counter, false) => (f.name, "counter"),
        (Kind::Gauge, _) => (f.name, "gauge"),
        (Kind::Histogram, _) => (f.name, "histogram"),
        (Kind::Info, true) => (f.name.strip_suffix("_info").unwrap_or(f.name), "info"),
        (Kind::Info, false) => (f.name, "gauge"),
    };
    let _ = writeln!(out, "# HELP {declared} {}", escape_help(f.help, open));
    let _ = writeln!(out, "# TYPE {declared} {kind}");
    for s in &f.series {
        write_series(out, f.name, s);
    }
}

fn write_series(out: &mut String, name: &str, s: &Series) {
    match &s.value {
        Value::Count(n) => sample(out, name, "", &s.labels, None, &n.to_string()),
        Value::Gauge(v) => sample(out, name, "", &s.labels, None, &number(*v)),
        Value::Histogram { buckets, sum } => {
            for (bound, n) in buckets {
                let le = number(*bound);
                sample(out, name, "_bucket", &s.labels, Some(&le), &n.to_string());
            }
            let count = buckets.last().map_or(0, |(_, n)| *n);
            sample(out, name, "_sum", &s.labels, None, &number(*sum));
            sample(out, name, "_count", &s.labels, None, &count.to_string());
        }
    }
}

fn sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&'static str, Cow<'static, str>)],
    le: Option<&str>,
    value: &str,
) {
    out.push_str(name);
    out.push_str(suffix);
    let le = le.map(|le| ("le", Cow::Borrowed(le)));
    let mut all = labels
        .iter()
        .map(|(k, v)| (*k, v.as_ref()))
        .chain(le.as_ref().map(|(k, v)| (*k, v.as_ref())));
    if let Some((k, v)) = all.next() {
        let _ = write!(out, "{{{k}=\"{}\"", escape_label(v));
        for (k, v) in all {
            let _ = write!(out, ",{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// A float as both formats write it: `+Inf`, `-Inf`, `NaN`, else Rust's shortest form.
fn number(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        v.to_string()
    }
}

fn escape_help(help: &str, open: bool) -> Cow<'_, str> {
    if !help.contains(['\\', '\n', '"']) {
        return Cow::Borrowed(help);
    }
    let mut s = help.replace('\\', "\\\\").replace('\n', "\\n");
    if open {
        s = s.replace('"', "\\\"");
    }
    Cow::Owned(s)
}

fn escape_label(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '\n', '"']) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('"', "\\\""),
    )
}

/// `isrgate_build_info`: which build this gateway runs.
fn build_info() -> Family {
    let revision = option_env!("ISRGATE_REVISION").unwrap_or("unknown");
    Family {
        name: "isrgate_build_info",
        help: "The running build: version (Cargo), revision (ISRGATE_REVISION at build time), target; always 1.",
        kind: Kind::Info,
        series: vec![Series {
            labels: vec![
                ("version", Cow::Borrowed(env!("CARGO_PKG_VERSION"))),
                ("revision", Cow::Borrowed(revision)),
                ("target", Cow::Borrowed(std::env::consts::ARCH)),
            ],
            value: Value::Gauge(1.0),
            json: None,
        }],
    }
}

/// A gauge read from the gateway's state at scrape time; `None` when it does not apply (the
/// cache off, no Redis).
struct Gauge {
    name: &'static str,
    help: &'static str,
    read: fn(&AppState) -> Option<f64>,
}

/// The gauges, in exposition order.
const GAUGES: &[Gauge] = &[
    Gauge {
        name: "isrgate_ready",
        help: "1 while /readyz answers 200 (started, not draining, invalidations loaded, and with the cache off a healthy replica).",
        read: |app| Some(f64::from(u8::from(super::unready(app).is_none()))),
    },
    Gauge {
        name: "isrgate_replicas",
        help: "Replicas known.",
        read: |app| Some(app.upstream.replicas().with(|l| l.len()) as f64),
    },
    Gauge {
        name: "isrgate_replicas_healthy",
        help: "Replicas eligible for traffic.",
        read: |app| {
            let healthy = app
                .upstream
                .replicas()
                .with(|l| l.iter().filter(|r| r.is_healthy()).count());
            Some(healthy as f64)
        },
    },
    Gauge {
        name: "isrgate_l1_entries",
        help: "Entries in the in-process L1.",
        read: |app| app.cache.as_ref().map(|c| c.l1.size().0 as f64),
    },
    Gauge {
        name: "isrgate_l1_bytes",
        help: "Bytes held by the in-process L1.",
        read: |app| app.cache.as_ref().map(|c| c.l1.size().1 as f64),
    },
    Gauge {
        name: "isrgate_l1_scale",
        help: "How many times its footprint each new L1 entry weighs: above 1 while the process's growth (RSS + sealed bodies) presses on cache.l1_max_bytes.",
        read: |app| app.cache.as_ref().map(|c| c.l1.scale()),
    },
    Gauge {
        name: "isrgate_sealed_bodies",
        help: "Identity bodies in sealed memory files, which the hit lane sendfile()s (one open descriptor each; at most a quarter of the descriptor limit).",
        read: |app| {
            app.cache
                .as_ref()
                .map(|_| crate::cache::sealed::Sealed::live() as f64)
        },
    },
    Gauge {
        name: "isrgate_sealed_bytes",
        help: "Memory the sealed bodies hold (shared memory: not in the process's RSS).",
        read: |app| {
            app.cache
                .as_ref()
                .map(|_| crate::cache::sealed::Sealed::live_bytes() as f64)
        },
    },
    Gauge {
        name: "isrgate_fleet_gateways",
        help: "Gateways alive on the bus, this one included.",
        read: |app| {
            app.cache
                .as_ref()
                .map(|c| (c.fleet.live().len() + 1) as f64)
        },
    },
    Gauge {
        name: "isrgate_invalidated_tags",
        help: "Tags with a recorded invalidation.",
        read: |app| app.cache.as_ref().map(|c| c.epochs.len() as f64),
    },
    Gauge {
        name: "isrgate_redis_connected",
        help: "1 while every pooled Redis connection is up (absent without Redis).",
        read: |app| shared(app).map(|s| f64::from(u8::from(s.is_connected()))),
    },
    Gauge {
        name: "isrgate_redis_circuit_open",
        help: "1 while the Redis circuit breaker skips Redis (absent without Redis).",
        read: |app| shared(app).map(|s| f64::from(u8::from(s.breaker_open()))),
    },
];

/// The shared Redis, when the cache has one.
fn shared(app: &AppState) -> Option<&Shared> {
    app.cache.as_ref()?.shared()
}

/// The state gauges and the histograms kept outside the metrics table (per replica, Redis).
fn gauges(app: &AppState) -> Vec<Family> {
    let mut families: Vec<Family> = GAUGES
        .iter()
        .filter_map(|g| {
            let v = (g.read)(app)?;
            Some(Family {
                name: g.name,
                help: g.help,
                kind: Kind::Gauge,
                series: vec![Series {
                    labels: Vec::new(),
                    value: Value::Gauge(v),
                    json: None,
                }],
            })
        })
        .collect();
    let replicas = app.upstream.replicas().snapshot();
    families.push(Family {
        name: "isrgate_upstream_response_seconds",
        help: "Time from sending a request to a replica to its response head, per replica.",
        kind: Kind::Histogram,
        series: replicas
            .iter()
            .map(|r| Series {
                labels: vec![("replica", Cow::Owned(r.authority.to_string()))],
                value: r.latency_ms.value(),
                json: None,
            })
            .collect(),
    });
    if let Some(r) = shared(app).map(Shared::redis) {
        families.push(Family {
            name: "isrgate_redis_command_seconds",
            help: "Time per Redis command.",
            kind: Kind::Histogram,
            series: vec![Series {
                labels: Vec::new(),
                value: r.latency_ms().value(),
                json: None,
            }],
        });
    }
    families
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> Format {
        negotiate(Some(&HeaderValue::from_str(v).expect("test")))
    }

    #[test]
    fn accept_chooses_the_format() {
        assert_eq!(negotiate(None), Format::Text);
        assert_eq!(accept("*/*"), Format::Text);
        assert_eq!(accept("text/plain; version=0.0.4"), Format::Text);
        assert_eq!(accept("application/openmetrics-text"), Format::OpenMetrics);
        // Prometheus 2.x and 3.x, as they send it.
        assert_eq!(
            accept(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            ),
            Format::OpenMetrics
        );
        assert_eq!(
            accept(
                "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"
            ),
            Format::Text
        );
        assert_eq!(accept("application/openmetrics-text;q=0"), Format::Text);
    }

    fn family(kind: Kind, name: &'static str, value: Value) -> Family {
        Family {
            name,
            help: "Help with \\ and \"quotes\".",
            kind,
            series: vec![Series {
                labels: vec![("replica", Cow::Borrowed("a\"b"))],
                value,
                json: None,
            }],
        }
    }

    #[test]
    fn counters_and_infos_are_named_per_format() {
        let families = [
            family(Kind::Counter, "isrgate_x_total", Value::Count(3)),
            family(Kind::Info, "isrgate_build_info", Value::Gauge(1.0)),
            family(
                Kind::Histogram,
                "isrgate_d_seconds",
                Value::Histogram {
                    buckets: vec![(0.00005, 1), (f64::INFINITY, 2)],
                    sum: 1.5,
                },
            ),
        ];
        let text = encode(&families, Format::Text);
        assert!(text.contains("# HELP isrgate_x_total Help with \\\\ and \"quotes\".\n# TYPE isrgate_x_total counter\nisrgate_x_total{replica=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("# TYPE isrgate_build_info gauge\n"), "{text}");
        assert!(
            text.contains("isrgate_d_seconds_bucket{replica=\"a\\\"b\",le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("isrgate_d_seconds_bucket{replica=\"a\\\"b\",le=\"+Inf\"} 2\nisrgate_d_seconds_sum{replica=\"a\\\"b\"} 1.5\nisrgate_d_seconds_count{replica=\"a\\\"b\"} 2\n"), "{text}");
        assert!(!text.contains("# EOF"));
        let open = encode(&families, Format::OpenMetrics);
        assert!(
            open.contains("# TYPE isrgate_x counter\nisrgate_x_total{"),
            "{open}"
        );
        assert!(
            open.contains("# HELP isrgate_x Help with \\\\ and \\\"quotes\\\".\n"),
            "{open}"
        );
        assert!(
            open.contains("# TYPE isrgate_build info\nisrgate_build_info{"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"));
    }
}
