//! Criterion micro-benchmarks of the stored entry (`isrgate::cache::entry`): encoding and
//! decoding the metadata of a prerendered Next.js page (12 headers, 5 tags; decode runs on every
//! Redis hit), and gzip-1 compression (the store path) and inflation (hits for clients without
//! gzip) of a ~50 KB rendered page. Run: `cargo bench --bench entry` (`-- --quick` for a short
//! run). Machine and baseline: 2 vCPU VM; numbers in the issue notes.

use std::hint::black_box;

use criterion::{Criterion, criterion_main};
use http::{HeaderName, HeaderValue};
use isrgate::cache::entry::{Meta, compress, etag, inflate, sample_page};

fn h(name: &'static str, value: &'static str) -> (HeaderName, HeaderValue) {
    (
        HeaderName::from_static(name),
        HeaderValue::from_static(value),
    )
}

/// The metadata of an App Router page prerendered with `revalidate = 60`.
fn nextjs_meta(identity: &[u8]) -> Meta {
    Meta {
        status: 200,
        headers: vec![
            h("content-type", "text/html; charset=utf-8"),
            h(
                "cache-control",
                "s-maxage=60, stale-while-revalidate=31535940",
            ),
            h(
                "vary",
                "RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Router-Segment-Prefetch, \
                 Accept-Encoding",
            ),
            h("x-nextjs-cache", "HIT"),
            h("x-nextjs-prerender", "1"),
            h("x-nextjs-stale-time", "300"),
            h("x-powered-by", "Next.js"),
            h(
                "link",
                "</_next/static/media/e4af272ccee01ff0-s.p.woff2>; rel=preload; as=\"font\"; \
                 crossorigin=\"\"; type=\"font/woff2\"",
            ),
            h(
                "link",
                "</_next/static/css/app/layout.css?v=1718000000000>; rel=preload; as=\"style\"",
            ),
            h("server-timing", "render;dur=41.2"),
            h("x-request-id", "7f3a9c2e-5b1d-4e8a-9c0f-2d6b8a4e1f73"),
            h("content-language", "en"),
        ],
        render_epoch: 41_977,
        stored_at_ms: 1_718_000_000_123,
        fresh_until_ms: 1_718_000_060_123,
        stale_until_ms: 1_749_536_000_123,
        stale_if_error_until_ms: 1_718_086_400_123,
        tags: vec![
            "path:/products/42".into(),
            "_N_T_/layout".into(),
            "_N_T_/products/layout".into(),
            "_N_T_/products/42".into(),
            "product-42".into(),
        ],
        etag: etag(identity),
        identity_len: identity.len() as u64,
        filled_by: "a1b2c3d4".into(),
    }
}

fn bench(c: &mut Criterion) {
    let identity = sample_page(50_000);
    let gzip = compress(&identity);
    let meta = nextjs_meta(&identity);
    let encoded = meta.encode();

    c.bench_function("meta_encode", |b| b.iter(|| black_box(&meta).encode()));
    c.bench_function("meta_decode", |b| {
        b.iter(|| Meta::decode(black_box(&encoded)))
    });

    c.bench_function("compress_50k", |b| {
        b.iter(|| compress(black_box(&identity)))
    });
    c.bench_function("inflate_50k", |b| {
        b.iter(|| inflate(black_box(&gzip), 4 << 20))
    });
}

/// The group `criterion_group!` would generate, written out so it carries a doc (`missing_docs`).
fn benches() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
}

criterion_main!(benches);
