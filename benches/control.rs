//! Criterion micro-benchmarks of `Cache-Control` parsing and admission, run on every upstream
//! answer to a cacheable request: the ISR form Next 15/16 sends, the bare-SWR form of 13.4/14,
//! a private answer, and `admit` on a realistic Next.js HTML response head.
//! Run: `cargo bench --bench control`. Machine and baseline: 2 vCPU VM, numbers in the issue
//! notes.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use isrgate::cache::control::CacheControl;
use isrgate::cache::policy::{Expect, Limits, admit};

fn bench(c: &mut Criterion) {
    for (name, value) in [
        (
            "parse_isr_16",
            &b"s-maxage=60, stale-while-revalidate=31535940"[..],
        ),
        (
            "parse_isr_14_bare_swr",
            &b"s-maxage=31536000, stale-while-revalidate"[..],
        ),
        (
            "parse_private",
            &b"private, no-cache, no-store, max-age=0, must-revalidate"[..],
        ),
    ] {
        c.bench_function(name, |b| b.iter(|| CacheControl::parse([black_box(value)])));
    }
    let mut h = HeaderMap::new();
    for (k, v) in [
        (
            "cache-control",
            "s-maxage=60, stale-while-revalidate=31535940",
        ),
        ("content-type", "text/html; charset=utf-8"),
        (
            "vary",
            "RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Router-Segment-Prefetch, Accept-Encoding",
        ),
        ("x-nextjs-cache", "HIT"),
        ("x-nextjs-prerender", "1"),
        ("x-nextjs-stale-time", "300"),
        ("etag", "\"abc\""),
        ("x-powered-by", "Next.js"),
        ("date", "Sun, 22 Nov 2026 05:00:00 GMT"),
        ("connection", "keep-alive"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    let limits = Limits {
        default_stale_if_error: Duration::from_secs(86_400),
        max_stale_while_revalidate: Duration::from_secs(86_400),
        max_ttl: Duration::from_secs(7 * 86_400),
    };
    c.bench_function("admit_next_html", |b| {
        b.iter(|| {
            admit(
                &Method::GET,
                StatusCode::OK,
                black_box(&h),
                Expect::Html,
                &limits,
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
