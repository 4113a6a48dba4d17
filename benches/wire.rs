//! Criterion micro-benchmarks of the hit lane's wire work (`isrgate::http::wire`): parsing a
//! browser's request head into `http` parts, and the per-hit `Date` line. (The response head
//! is encoded once per entry, so its cost is not per request.) Run: `cargo bench --bench wire`.
//! Machine and baseline: 2 vCPU VM, numbers in the issue notes.

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use isrgate::http::wire::{Parsed, parse_request, put_date};

/// What a browser sends behind a load balancer for a page navigation (Chrome's headers).
const BROWSER: &[u8] = b"GET /products/123?ref=home HTTP/1.1\r\n\
Host: shop.example\r\n\
Connection: keep-alive\r\n\
sec-ch-ua: \"Chromium\";v=\"156\", \"Not)A;Brand\";v=\"99\"\r\n\
sec-ch-ua-mobile: ?0\r\n\
sec-ch-ua-platform: \"Linux\"\r\n\
Upgrade-Insecure-Requests: 1\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n\
Sec-Fetch-Site: same-origin\r\n\
Sec-Fetch-Mode: navigate\r\n\
Sec-Fetch-Dest: document\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
X-Forwarded-For: 203.0.113.7\r\n\
X-Forwarded-Proto: https\r\n\r\n";

/// What wrk sends in the load benchmark.
const WRK: &[u8] =
    b"GET /page/42 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: gzip\r\n\r\n";

fn bench(c: &mut Criterion) {
    for (name, raw) in [("parse_browser_head", BROWSER), ("parse_wrk_head", WRK)] {
        assert!(matches!(parse_request(raw), Parsed::Head(_)), "{name}");
        c.bench_function(name, |b| b.iter(|| parse_request(black_box(raw))));
    }
    let mut out = BytesMut::with_capacity(64);
    c.bench_function("date_line", |b| {
        b.iter(|| {
            out.clear();
            put_date(&mut out);
            black_box(out.len())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
