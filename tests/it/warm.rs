//! `isrgate warm` and its engine on real sockets: a `FakeNext` plays the gateway (its answers
//! carry the `x-cache` a gateway would send, and it serves the sitemaps too), and one test warms
//! through a real gateway. Sources: a sitemap file, a sitemap index with a nested index over
//! HTTP, a plain list; bad XML names its line; concurrency and rate hold; failures are reported
//! and set the exit code.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use isrgate::warm::gateway::{GatewayRenderer, Settings};
use isrgate::warm::{self, Plan, Progress, Summary, Target, Variant};
use tokio_util::sync::CancellationToken;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::{Gateway, config, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_isrgate");

fn file(suffix: &str, text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(suffix)
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn path_of(f: &tempfile::NamedTempFile) -> &str {
    f.path().to_str().expect("utf-8 temp path")
}

/// `isrgate warm ARGS…`: (exit code, stdout, stderr).
async fn warm_cli(args: &[&str]) -> (i32, String, String) {
    let run = tokio::process::Command::new(BIN)
        .arg("warm")
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("isrgate warm ends")
        .expect("isrgate runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn urlset(locs: &[&str]) -> String {
    let urls: String = locs
        .iter()
        .map(|l| format!("  <url><loc>{l}</loc></url>\n"))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n{urls}</urlset>\n"
    )
}

fn index(locs: &[&str]) -> String {
    let maps: String = locs
        .iter()
        .map(|l| format!("  <sitemap><loc>{l}</loc></sitemap>\n"))
        .collect();
    format!("<?xml version=\"1.0\"?>\n<sitemapindex>\n{maps}</sitemapindex>\n")
}

fn xml(text: &str) -> Route {
    Route::html(text).content_type("application/xml")
}

/// A page the "gateway" renders now, whose RSC payload is already cached.
fn page_with_cached_rsc() -> Route {
    Route::html("<p>page</p>").with_rsc(Route::html("rsc").header("x-cache", "HIT"))
}

fn targets(n: usize) -> Vec<Target> {
    (0..n)
        .map(|i| Target {
            host: None,
            path: format!("/p/{i}"),
            variant: Variant::Html,
        })
        .collect()
}

/// The engine in process with the CLI's renderer against `gw`.
async fn run_engine(
    gw: &FakeNext,
    targets: Vec<Target>,
    concurrency: usize,
    rate: Option<f64>,
) -> Summary {
    let url = gw.url();
    let settings = Settings {
        gateway: &url,
        host: None,
        build: None,
        timeout: Duration::from_secs(30),
    };
    let renderer = Arc::new(GatewayRenderer::new(&settings).expect("renderer"));
    let plan = Plan {
        targets,
        concurrency,
        rate,
    };
    let progress = Arc::new(Progress::default());
    warm::run(plan, renderer, progress, CancellationToken::new()).await
}

#[tokio::test]
async fn warms_every_page_of_a_sitemap_file_as_html_then_rsc() {
    let gw = FakeNext::start(|o| {
        o.route("/", page_with_cached_rsc());
        o.route("/p/1", page_with_cached_rsc());
    })
    .await;
    let map = file(
        ".xml",
        &urlset(&[
            "https://shop.example/",
            "https://shop.example/p/1?x=1&amp;y=2",
        ]),
    );
    let (code, out, err) = warm_cli(&[
        path_of(&map),
        "--gateway",
        &gw.url(),
        "--build",
        "b-42",
        "--concurrency",
        "1",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("warmed 4 of 4 targets")
            && out.contains("2 rendered, 2 already fresh, 0 failed"),
        "{out}"
    );
    assert_eq!((gw.count("/"), gw.count("/p/1")), (2, 2));
    // One at a time, every HTML before any RSC: the last request of a page is its RSC.
    let last = gw.last("/p/1").expect("seen");
    assert_eq!(last.target, "/p/1?x=1&y=2");
    for (name, want) in [
        ("host", "shop.example"),
        ("rsc", "1"),
        ("x-deployment-id", "b-42"),
    ] {
        assert_eq!(
            last.headers.get(name).map(|v| v.as_bytes()),
            Some(want.as_bytes()),
            "{name}"
        );
    }
}

#[tokio::test]
async fn sitemap_index_over_http_leads_to_nested_sitemaps() {
    let gw = FakeNext::start(|o| {
        for p in ["/one", "/two", "/three"] {
            o.route(p, Route::html("<p>page</p>"));
        }
    })
    .await;
    let base = gw.url();
    let (one, two) = (
        format!("{base}/maps/one.xml"),
        format!("{base}/maps/two.xml"),
    );
    gw.route("/sitemap.xml", xml(&index(&[&one, "/maps/nested.xml"])));
    gw.route("/maps/one.xml", xml(&urlset(&["http://a.example/one"])));
    gw.route("/maps/nested.xml", xml(&index(&[&two])));
    gw.route(
        "/maps/two.xml",
        xml(&urlset(&["http://a.example/two", "/three"])),
    );
    let source = format!("{base}/sitemap.xml");
    let (code, out, err) = warm_cli(&[&source, "--gateway", &base, "--variants", "html"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("3 rendered, 0 already fresh, 0 failed"),
        "{out}"
    );
    for p in ["/one", "/two", "/three"] {
        assert_eq!(gw.count(p), 1, "{p}");
    }
    let host = |p: &str| gw.last(p).expect("seen").headers["host"].clone();
    assert_eq!(host("/one"), "a.example");
    // A bare path has no host of its own: the request goes with the gateway's address.
    assert_eq!(host("/three"), gw.addr.to_string().as_str());
}

#[tokio::test]
async fn plain_path_list_is_warmed_with_the_host_given() {
    let gw = FakeNext::start(|o| {
        o.route("*", Route::html("<p>page</p>"));
    })
    .await;
    let list = file(
        ".txt",
        "# pages to warm\n/a\n\n  /b?page=2\nhttp://other.example/c\n",
    );
    let args = [
        path_of(&list),
        "--gateway",
        &gw.url(),
        "--host",
        "shop.example",
        "--variants",
        "rsc",
    ];
    let (code, out, err) = warm_cli(&args).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 rendered"), "{out}");
    assert_eq!(gw.last("/b").expect("seen").target, "/b?page=2");
    let c = gw.last("/c").expect("seen");
    assert_eq!(
        (c.headers["host"].as_bytes(), c.headers["rsc"].as_bytes()),
        (&b"shop.example"[..], &b"1"[..])
    );
}

#[tokio::test]
async fn bad_xml_is_refused_naming_its_source_and_line() {
    let gw = FakeNext::start(|_| {}).await;
    let bad = "<?xml version=\"1.0\"?>\n<urlset>\n  <url><loc>/a</loc></url>\n  <url><loc>/b</url>\n</urlset>\n";
    let map = file(".xml", bad);
    let (code, _, err) = warm_cli(&[path_of(&map), "--gateway", &gw.url()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{}:4:", path_of(&map))) && err.contains("not well-formed XML"),
        "{err}"
    );
    // In a sitemap named by an index, the error names that sitemap.
    let child = format!("{}/maps/bad.xml", gw.url());
    gw.route("/maps/bad.xml", xml(bad));
    let top = file(".xml", &index(&[&child]));
    let (code, _, err) = warm_cli(&[path_of(&top), "--gateway", &gw.url()]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{child}:4:")), "{err}");
    assert_eq!(
        gw.total(),
        1,
        "only the sitemap was fetched, nothing warmed"
    );
}

#[tokio::test]
async fn renders_in_flight_never_exceed_the_concurrency() {
    let gw = FakeNext::start(|o| {
        o.route(
            "*",
            Route::html("<p>slow</p>").delay(Duration::from_millis(30)),
        );
    })
    .await;
    let summary = run_engine(&gw, targets(24), 3, None).await;
    assert_eq!(summary.counts.rendered, 24, "{summary:?}");
    let most = gw.max_in_flight();
    assert!((2..=3).contains(&most), "most in flight: {most}");
}

#[tokio::test]
async fn starts_are_paced_by_the_rate() {
    let gw = FakeNext::start(|o| {
        o.route("*", Route::html("<p>fast</p>"));
    })
    .await;
    // 6 starts at 20 a second: the last starts 5 × 50 ms after the first, at the earliest.
    let summary = run_engine(&gw, targets(6), 6, Some(20.0)).await;
    assert_eq!(summary.counts.rendered, 6, "{summary:?}");
    assert!(
        summary.elapsed >= Duration::from_millis(250),
        "{:?}",
        summary.elapsed
    );
}

#[tokio::test]
async fn a_failing_path_is_reported_and_sets_the_exit_code() {
    let gw = FakeNext::start(|o| {
        o.route("/ok", Route::html("<p>ok</p>"));
    })
    .await;
    let list = file(".txt", "/ok\n/gone\n");
    let base = [path_of(&list), "--gateway", &gw.url(), "--variants", "html"];
    let (code, out, err) = warm_cli(&base).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("1 rendered, 0 already fresh, 1 failed"),
        "{out}"
    );
    assert!(out.contains("  1 × HTTP 404: /gone\n"), "{out}");
    assert!(err.contains("more than --max-failed 0"), "{err}");
    for (allowed, want) in [("1", 0), ("50%", 0), ("49%", 1)] {
        let (code, out, err) = warm_cli(&[&base[..], &["--max-failed", allowed]].concat()).await;
        assert_eq!(code, want, "--max-failed {allowed}: {out}{err}");
    }
}

#[tokio::test]
async fn an_unreachable_gateway_fails_every_target_with_the_reason() {
    let list = file(".txt", "/a\n/b\n");
    let gateway = format!("http://127.0.0.1:{}", free_port());
    let (code, out, err) = warm_cli(&[path_of(&list), "--gateway", &gateway]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("4 × ") && out.contains("Connection refused"),
        "{out}"
    );
}

#[tokio::test]
async fn a_second_warm_through_a_real_gateway_finds_every_page_fresh() {
    let origin = FakeNext::start(|o| {
        o.route(
            "*",
            Route::html("<p>isr</p>").header("cache-control", "s-maxage=60"),
        );
    })
    .await;
    let gw = Gateway::start(config(&[origin.url()], "", "")).await;
    let list = file(".txt", "/a\n/b\n/c\n");
    let args = [
        path_of(&list),
        "--gateway",
        &gw.url(""),
        "--variants",
        "html",
    ];
    let (code, out, err) = warm_cli(&args).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 rendered, 0 already fresh"), "{out}");
    eventually!(
        10,
        gw.state.metrics.cache_stores.get() == 3,
        "three pages stored"
    );
    let (code, out, err) = warm_cli(&args).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("0 rendered, 3 already fresh"), "{out}");
    let renders = ["/a", "/b", "/c"].map(|p| origin.count(p));
    assert_eq!(renders, [1, 1, 1], "each page rendered once");
}
