//! Criterion micro-benchmarks of one access line (`isrgate::logging::access`), the whole of
//! what a hit pays for it: the switch and level check, the event, its formatting (text, or
//! flat JSON with the query redacted as it is written) and the copy into the non-blocking
//! writer's buffer (`logging::writer`; its thread writes to /dev/null here). And the same line
//! with the log switched off: what every hit pays when it is off. Run:
//! `cargo bench --bench access`. Baseline (2 vCPU VM shared with other work): JSON 0.63 µs,
//! text 0.48 µs, off 0.4 ns per line; the scoped subscriber (`with_default` per line) is a
//! few ns more than the global one the binary uses.
//!
//! `request_metrics`: what every request pays for its metrics whatever the log says
//! (`Metrics::answered`: the duration histogram by status class and outcome, and the bytes
//! counter). Baseline (same machine, loaded): 10.7 ns; a hit costs the gateway 10-16 µs of CPU, so
//! about 0.1 %.
//!
//! `route_count_*`: what a cache answer pays for the dashboard's route table
//! (`metrics::routes`). Baseline (same machine, loaded): 62 ns with twelve rows named by first
//! segment, 104 ns with five `[[routes]]` patterns (the pattern match is most of it); about
//! 0.4-0.8 % of a hit. The first version read the rows through an `ArcSwap` and mapped the page
//! twice: 107 ns and 225 ns.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use isrgate::config::{Log, LogFormat};
use isrgate::logging::access::{AccessLog, Line};
use isrgate::logging::{dispatch, writer::NonBlocking};

fn bench(c: &mut Criterion) {
    let uri: http::Uri = "/products/123?ref=home&token=abc".parse().expect("uri");
    let line = Line {
        method: "GET",
        uri: &uri,
        status: 200,
        cache: "HIT",
        cache_status: "isrgate; hit",
        replica: "-",
        bytes: 11_349,
        elapsed: Duration::from_micros(33),
        request_id: "0ceb823a-0000000000086027",
        host: "shop.example",
        peer: "10.0.3.7:42848".parse().expect("addr"),
    };
    for (name, format, on) in [
        ("access_line_json", LogFormat::Json, true),
        ("access_line_text", LogFormat::Pretty, true),
        ("access_line_off", LogFormat::Json, false),
    ] {
        let cfg = Log {
            format,
            level: "warn".into(),
            access: on,
        };
        let sink = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        let (writer, _flusher) = NonBlocking::new(sink).expect("writer thread");
        let log = AccessLog::new(on, Some(dispatch(&cfg, writer, false)));
        c.bench_function(name, |b| b.iter(|| log.write(black_box(&line))));
    }
}

fn request_metrics(c: &mut Criterion) {
    let m = isrgate::metrics::Metrics::default();
    let hit = isrgate::metrics::CacheOutcome::Hit;
    c.bench_function("request_metrics", |b| {
        b.iter(|| {
            m.answered(
                black_box(200),
                hit,
                black_box(11_349),
                black_box(Duration::from_micros(33)),
            )
        })
    });
}

/// `isrgate tail` (`logging::tail`), the access log off: what a hit pays with nobody
/// following (`tail_none`), with a follower whose filter drops it (`tail_filtered`: a
/// `--status 5xx` tail while hits are 200), and with one that takes it (`tail_followed`: the
/// JSON line made once and queued; a task drains the queue as the relay would). Measured
/// (2 vCPU, loaded): 2.5 ns, 13 ns, 0.93 µs (it was 4.5 µs through `serde_json::Value`); a hit
/// costs the gateway 10-16 µs of CPU: 0.02 %, 0.1 %, and while someone follows every hit
/// about 6-9 %, as an access line does.
fn tail(c: &mut Criterion) {
    use isrgate::logging::tail::Filter;
    let uri: http::Uri = "/products/123?ref=home&token=abc".parse().expect("uri");
    let line = Line {
        method: "GET",
        uri: &uri,
        status: 200,
        cache: "HIT",
        cache_status: "isrgate; hit",
        replica: "-",
        bytes: 11_349,
        elapsed: Duration::from_micros(33),
        request_id: "0ceb823a-0000000000086027",
        host: "shop.example",
        peer: "10.0.3.7:42848".parse().expect("addr"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let log = AccessLog::new(false, None);
    c.bench_function("tail_none", |b| b.iter(|| log.write(black_box(&line))));
    let filtered = log
        .tail()
        .follow(Filter::parse("status=5xx").expect("filter"));
    c.bench_function("tail_filtered", |b| b.iter(|| log.write(black_box(&line))));
    drop(filtered);
    let mut following = log.tail().follow(Filter::default());
    let drain = rt.spawn(async move { while following.next().await.is_some() {} });
    c.bench_function("tail_followed", |b| b.iter(|| log.write(black_box(&line))));
    drain.abort();
}

/// The route table's count on a hit (`metrics::routes`): the path mapped to its page, the
/// route found (`route_count_patterns`: among five `[[routes]]`, the fourth matching) or its
/// first segment (`route_count_segments`: twelve rows already made), one relaxed add.
fn route_count(c: &mut Criterion) {
    use isrgate::cache::routes::{Lifetimes, Route};
    use isrgate::metrics::routes::{RouteEvent, RouteStats};
    let stats = RouteStats::default();
    let stored = RouteEvent::Rendered(Some(Duration::from_secs(60)));
    for i in 0..12 {
        stats.count(&[], &format!("/section{i}/page"), stored);
    }
    c.bench_function("route_count_segments", |b| {
        b.iter(|| stats.count(&[], black_box("/section9/hello-world"), RouteEvent::Hit))
    });
    let ttl = Lifetimes {
        ttl: Some(Duration::from_secs(60)),
        ..Lifetimes::default()
    };
    let routes: Vec<Route> = [
        "/account/*",
        "/cart",
        "/p/{id}/reviews",
        "/blog/{slug}",
        "/*",
    ]
    .iter()
    .map(|p| Route::new(p, true, ttl).expect("pattern"))
    .collect();
    stats.count(&routes, "/blog/a", stored);
    c.bench_function("route_count_patterns", |b| {
        b.iter(|| stats.count(&routes, black_box("/blog/hello-world"), RouteEvent::Hit))
    });
}

criterion_group!(benches, bench, request_metrics, tail, route_count);
criterion_main!(benches);
