//! Criterion micro-benchmarks of cache-key construction (the first step of every cacheable
//! request): a plain page, an RSC navigation with `_rsc` and a long sorted query, and the
//! `Vary` secondary key. Run: `cargo bench --bench key`. Machine and baseline: 2 vCPU VM,
//! numbers in the issue notes.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use isrgate::cache::key::{CacheKey, Variant, variant, vary_hash};

fn bench(c: &mut Criterion) {
    c.bench_function("key_html_plain", |b| {
        b.iter(|| {
            CacheKey::new(
                black_box("build-1"),
                black_box("shop.example"),
                black_box("/products/123"),
                None,
                &Variant::Html,
            )
        })
    });
    c.bench_function("key_rsc_long_query", |b| {
        b.iter(|| {
            CacheKey::new(
                black_box("build-1"),
                black_box("Shop.Example"),
                black_box("/search/%7Eresults"),
                Some(black_box(
                    "q=red%20shoes&page=2&sort=price&_rsc=1x2y3&utm_source=mail&size=42",
                )),
                &Variant::Rsc,
            )
        })
    });
    let mut h = HeaderMap::new();
    h.insert("rsc", HeaderValue::from_static("1"));
    h.insert("next-router-prefetch", HeaderValue::from_static("1"));
    h.insert("next-url", HeaderValue::from_static("/feed"));
    c.bench_function("variant_and_vary", |b| {
        b.iter(|| {
            let v = variant(black_box("/photos/1"), black_box(&h), false);
            let vary = vary_hash(
                ["RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Url"],
                &h,
            );
            (v, vary)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
