//! CMS recipes: the webhook fed what Contentful, Sanity, Strapi and WordPress really send
//! (`fixtures/cms/`, each citing where its shape comes from), mapped through
//! `[[webhook.rules]]` to paths and tags, and the URL-only form (`?secret=`). Each case checks
//! what was invalidated (the pages go stale, the log says why), and every refusal changes
//! nothing.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use isrgate::invalidate::auth::sign_sanity;
use isrgate::invalidate::webhook::Secrets;

use crate::eventually;
use crate::support::origin::{FakeNext, Route};
use crate::support::redis::RedisProcess;
use crate::support::{Client, Gateway, Got, bus_live, config};

const HOST: &str = "shop.example";
const ISR: &str = "s-maxage=600, stale-while-revalidate=600";
const SECRET: &str = "cms-webhook-secret";
const ADMIN_TOKEN: &str = "cms-admin-token";

/// The mapping the recipes in the README show, one rule per CMS (and none for Strapi media,
/// which gets the default tags).
const RULES: &str = r#"[webhook]
rules = [
  { type = "blogPost", cms = "contentful", paths = ["/blog/{slug?}", "/blog"], tags = ["post-{id}"] },
  { type = "post", cms = "sanity", paths = ["/posts/{slug.current}"], tags = ["category-{categories._ref}"] },
  { type = "article", cms = "strapi", paths = ["/articles/{slug}"], tags = ["{type}", "category-{category.slug}"] },
  { type = ["post", "page"], cms = "wordpress", paths = ["{permalink_path}"], tags = ["wp-{id}", "term-{taxonomies.category.*.slug}"] },
]
"#;

/// Pages of the fake site, and the tags their responses carry.
const PAGES: &[(&str, &str)] = &[
    ("/blog/hello-world", ""),
    ("/blog", ""),
    ("/posts/hello-sanity", ""),
    ("/news", "category-news, term-news"),
    ("/articles/hello-strapi", ""),
    ("/2025/03/hello-wordpress", ""),
    ("/gallery", "media"),
    ("/about", ""),
];

/// A recorded call: the CMS's headers and its exact body bytes.
struct Sample {
    headers: Vec<(String, String)>,
    body: Bytes,
}

/// Reads `fixtures/cms/<name>`: `#` comments, `Name: value` headers, a blank line, the body.
fn sample(name: &str) -> Sample {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it/fixtures/cms")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let (head, body) = text
        .split_once("\n\n")
        .expect("a blank line before the body");
    let headers = head
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(':').expect("Name: value");
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    Sample {
        headers,
        body: Bytes::from(body.trim().to_owned()),
    }
}

async fn site() -> FakeNext {
    FakeNext::start(|o| {
        for (path, tags) in PAGES {
            let mut route = Route::html(&format!("page {path}")).header("cache-control", ISR);
            if !tags.is_empty() {
                route = route.header("cache-tag", tags);
            }
            o.route(path, route);
        }
    })
    .await
}

/// A gateway (in-process store) with the webhook on, `extra` TOML added.
async fn gateway(origin: &FakeNext, extra: &str) -> Gateway {
    let mut cfg = config(&[origin.url()], "", extra);
    cfg.webhook.secrets = Some(Secrets {
        bearer: SECRET.into(),
        hmac: SECRET.into(),
    });
    if let Some(admin) = cfg.admin.as_mut() {
        admin.token = Some(ADMIN_TOKEN.into());
    }
    Gateway::start(cfg).await
}

async fn get(gw: &Gateway, path: &str) -> Got {
    Client::default()
        .get(&gw.url(path), &[("host", HOST)])
        .await
}

/// Every page of the site is a fresh hit.
async fn all_cached(gw: &Gateway) {
    for (path, _) in PAGES {
        eventually!(
            10,
            get(gw, path).await.header("x-cache") == "HIT",
            "{path} cached"
        );
    }
}

/// The pages that are no longer fresh hits, in `PAGES` order (each one read once: a purged
/// page is a miss, then rendered again).
async fn purged(gw: &Gateway) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (path, _) in PAGES {
        if get(gw, path).await.header("x-cache") != "HIT" {
            out.push(*path);
        }
    }
    out
}

async fn post(gw: &Gateway, query: &str, headers: &[(&str, &str)], body: Bytes) -> Got {
    let mut all = vec![("host", HOST)];
    all.extend_from_slice(headers);
    Client::default()
        .send(
            "POST",
            &gw.url(&format!("/_isrgate/revalidate{query}")),
            &all,
            body,
        )
        .await
}

/// Sends a sample as its CMS would, with the credentials its recipe uses.
async fn replay(gw: &Gateway, s: &Sample, query: &str) -> Got {
    let bearer = format!("Bearer {SECRET}");
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let signature = sign_sanity(SECRET, millis, &s.body);
    let mut headers: Vec<(&str, &str)> = s
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    if headers.iter().any(|(k, _)| k.starts_with("sanity-")) {
        headers.push(("sanity-webhook-signature", &signature));
    } else {
        headers.push(("authorization", &bearer));
    }
    post(gw, query, &headers, s.body.clone()).await
}

fn json(got: &Got) -> serde_json::Value {
    serde_json::from_slice(&got.body).unwrap_or_else(|_| panic!("JSON: {:?}", got.body))
}

async fn log(gw: &Gateway) -> serde_json::Value {
    let admin = gw.admin.expect("admin listener");
    let got = Client::default()
        .get(
            &format!("http://{admin}/api/log"),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    json(&got)
}

/// A fixture, the answer's paths, tags it must record, the pages it purges.
type Mapped<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);

#[tokio::test]
async fn each_cms_sample_purges_the_pages_and_tags_its_rules_name() {
    let origin = site().await;
    let gw = gateway(&origin, RULES).await;
    let cases: &[Mapped<'_>] = &[
        (
            "contentful-entry-publish.http",
            &["/blog/hello-world", "/blog"],
            &["post-3nQbhrGgYV0cDjwqzMdNaQ"],
            &["/blog/hello-world", "/blog"],
        ),
        // The tombstone has no fields: the optional {slug?} gives nothing, the rest applies.
        (
            "contentful-entry-unpublish.http",
            &["/blog"],
            &["post-3nQbhrGgYV0cDjwqzMdNaQ"],
            &["/blog"],
        ),
        (
            "sanity-document-update.http",
            &["/posts/hello-sanity"],
            &["category-category-news"],
            &["/posts/hello-sanity"],
        ),
        (
            "strapi-entry-publish.http",
            &["/articles/hello-strapi"],
            &["article", "category-news"],
            &["/news", "/articles/hello-strapi"],
        ),
        // No rule for Strapi media: the default tags, the type and <type>-<id>.
        (
            "strapi-media-create.http",
            &[],
            &["media", "media-5"],
            &["/gallery"],
        ),
        (
            "wordpress-post-update.http",
            &["/2025/03/hello-wordpress/"],
            &["wp-318", "term-news"],
            &["/news", "/2025/03/hello-wordpress"],
        ),
    ];
    for (i, (fixture, paths, tags, pages)) in cases.iter().enumerate() {
        all_cached(&gw).await;
        let got = replay(&gw, &sample(fixture), "?mode=hard&rewarm=false").await;
        assert_eq!(got.status, 200, "{fixture}: {:?}", got.body);
        let report = json(&got);
        assert_eq!(
            report["paths"],
            serde_json::json!(paths),
            "{fixture}: {report}"
        );
        for tag in *tags {
            assert!(
                report["tags"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|x| x == tag)),
                "{fixture}: {tag} in {report}"
            );
        }
        assert_eq!(purged(&gw).await, *pages, "{fixture}");
        // The revalidation log keeps it, with the entry it came from.
        let log = log(&gw).await;
        assert_eq!(log.as_array().map(Vec::len), Some(i + 1), "{log}");
        assert_eq!(log[0]["entry"], report["entry"]);
        assert_eq!(log[0]["mode"], "hard");
    }
    let log = log(&gw).await;
    let cms: Vec<&str> = log
        .as_array()
        .expect("log")
        .iter()
        .rev()
        .map(|r| r["entry"]["cms"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        cms,
        [
            "contentful",
            "contentful",
            "sanity",
            "strapi",
            "strapi",
            "wordpress"
        ]
    );
    assert_eq!(log[0]["entry"]["type"], "post");
    assert_eq!(log[0]["entry"]["event"], "post_update");
}

/// A query, headers, a body, what the 400 must name.
type Refused<'a> = (&'a str, Vec<(&'a str, &'a str)>, Bytes, &'a str);

/// A CMS call takes the webhook's one path: applied through Redis, acknowledged by the other
/// gateway, which no longer serves the old page.
#[tokio::test]
async fn a_cms_call_reaches_every_gateway() {
    let r = RedisProcess::start();
    let origin = site().await;
    // Redis commands get 5 s: on a loaded machine the serving 250 ms can pass, and the
    // webhook then answers 503 (retry), which is right but not what this test checks.
    let extra = format!(
        "{RULES}\n[redis]\nurl = \"{}\"\ncommand_timeout = \"5s\"\n",
        r.url()
    );
    let gws = [
        gateway(&origin, &extra).await,
        gateway(&origin, &extra).await,
    ];
    for gw in &gws {
        eventually!(10, bus_live(gw), "bus subscribed");
        let fleet = &gw.state.cache.as_ref().expect("cache").fleet;
        eventually!(10, fleet.live().len() == 1, "the other gateway is live");
    }
    all_cached(&gws[1]).await;
    let got = replay(
        &gws[0],
        &sample("strapi-entry-publish.http"),
        "?mode=hard&rewarm=false",
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let report = json(&got);
    assert_eq!(
        report["gateways"]["acknowledged"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(purged(&gws[1]).await, ["/news", "/articles/hello-strapi"]);
    assert_eq!(
        log(&gws[1]).await[0]["entry"]["cms"],
        "strapi",
        "the fleet's log"
    );
}

#[tokio::test]
async fn malformed_payloads_name_the_field_and_invalidate_nothing() {
    let origin = site().await;
    let gw = gateway(&origin, RULES).await;
    all_cached(&gw).await;
    let epochs = &gw.state.cache.as_ref().expect("cache").epochs;
    let before = epochs.current();
    let unpublish = sample("contentful-entry-unpublish.http");
    let sanity = sample("sanity-document-update.http");
    let cases: Vec<Refused<'_>> = vec![
        // A content model change is not content.
        (
            "",
            vec![(
                "x-contentful-topic",
                "ContentManagement.ContentType.publish",
            )],
            Bytes::from_static(br#"{"sys":{"type":"ContentType","id":"blogPost"}}"#),
            "sys.type",
        ),
        (
            "",
            vec![],
            Bytes::from_static(br#"{"sys":{"type":"Entry","id":"e1"}}"#),
            "sys.contentType.sys.id",
        ),
        // A Sanity projection without _type.
        (
            "",
            vec![("sanity-operation", "update")],
            Bytes::from_static(br#"{"_id":"p1","slug":"x"}"#),
            "_type",
        ),
        // Strapi's "Trigger" button sends a test event with no entry.
        (
            "",
            vec![("x-strapi-event", "trigger-test")],
            Bytes::from_static(
                br#"{"event":"trigger-test","createdAt":"2025-03-05T14:02:11.870Z"}"#,
            ),
            "entry",
        ),
        (
            "",
            vec![],
            Bytes::from_static(br#"{"post_id":318,"post":{"ID":318}}"#),
            "post.post_type",
        ),
        // A rule's required field: the Sanity rule needs slug.current.
        (
            "",
            vec![("sanity-operation", "delete")],
            Bytes::from_static(br#"{"_id":"p1","_type":"post"}"#),
            "slug.current: missing",
        ),
        // The format named in the URL wins over detection.
        (
            "?format=contentful",
            vec![],
            sanity.body.clone(),
            "sys.type",
        ),
        (
            "?format=drupal",
            vec![],
            unpublish.body.clone(),
            "query format",
        ),
        (
            "?path=/a&secret_key=1",
            vec![],
            unpublish.body.clone(),
            "unknown parameter",
        ),
        ("", vec![], Bytes::from_static(b"{\"sys\":"), "JSON"),
        (
            "",
            vec![],
            Bytes::from_static(br#"{"data":{"id":1}}"#),
            "webhook.format",
        ),
    ];
    let bearer = format!("Bearer {SECRET}");
    for (query, mut headers, body, needle) in cases {
        headers.push(("authorization", &bearer));
        let got = post(&gw, query, &headers, body.clone()).await;
        let text = String::from_utf8_lossy(&got.body).into_owned();
        assert_eq!(got.status, 400, "{needle}: {text}");
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert_eq!(epochs.current(), before, "no epoch was recorded");
    assert_eq!(log(&gw).await, serde_json::json!([]), "nothing was logged");
    assert!(purged(&gw).await.is_empty(), "every page is still a hit");
}

#[tokio::test]
async fn the_url_only_form_is_off_until_allowed() {
    let origin = site().await;
    let gw = gateway(&origin, "").await;
    all_cached(&gw).await;
    let c = Client::default();
    let url = gw.url(&format!("/_isrgate/revalidate?secret={SECRET}&path=/about"));
    let got = c.get(&url, &[("host", HOST)]).await;
    assert_eq!(got.status, 405);
    assert_eq!(got.header("allow"), "POST");
    assert!(String::from_utf8_lossy(&got.body).contains("webhook.allow_query_secret"));
    let got = c.send("POST", &url, &[("host", HOST)], Bytes::new()).await;
    assert_eq!(got.status, 403);
    let text = String::from_utf8_lossy(&got.body).into_owned();
    assert!(text.contains("allow_query_secret is off"), "{text}");
    assert!(!text.contains(SECRET), "the secret is never echoed");
    assert!(purged(&gw).await.is_empty(), "nothing was invalidated");
}

#[tokio::test]
async fn the_url_only_form_purges_by_get_and_post_when_allowed() {
    let origin = site().await;
    let gw = gateway(&origin, "[webhook]\nallow_query_secret = true\n").await;
    all_cached(&gw).await;
    let c = Client::default();
    let call = |method: &'static str, query: String| {
        let (c, url) = (c.clone(), gw.url(&format!("/_isrgate/revalidate?{query}")));
        async move { c.send(method, &url, &[("host", HOST)], Bytes::new()).await }
    };
    let wrong = call("GET", "secret=not-it&path=/about".into()).await;
    assert_eq!(wrong.status, 403);
    assert!(String::from_utf8_lossy(&wrong.body).contains("wrong secret"));
    let missing = call("GET", "path=/about".into()).await;
    assert_eq!(missing.status, 401);
    assert!(String::from_utf8_lossy(&missing.body).contains("?secret="));
    assert!(purged(&gw).await.is_empty(), "refusals invalidated nothing");

    // Repeated path and tag parameters, as a URL-only sender can only write them.
    let got = call(
        "GET",
        format!("secret={SECRET}&path=/about&path=/blog&tag=media&mode=hard&rewarm=false"),
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let report = json(&got);
    assert_eq!(report["paths"], serde_json::json!(["/about", "/blog"]));
    assert!(
        !report.to_string().contains(SECRET),
        "the secret is not in the report"
    );
    let epochs = &gw.state.cache.as_ref().expect("cache").epochs;
    assert_eq!(
        purged(&gw).await,
        ["/blog", "/gallery", "/about"],
        "report {report}; invalidations {}, epoch {}",
        gw.state.metrics.invalidations.get(),
        epochs.current()
    );

    all_cached(&gw).await;
    let got = call(
        "POST",
        format!("secret={SECRET}&path=%2Fposts%2Fhello-sanity&mode=hard&rewarm=false"),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(purged(&gw).await, ["/posts/hello-sanity"]);
    let put = call("PUT", format!("secret={SECRET}&path=/about")).await;
    assert_eq!(
        (put.status.as_u16(), put.header("allow")),
        (405, "GET, POST")
    );
}

/// The rules the README's "CMS recipes" shows are valid as written.
#[test]
fn the_readme_rules_are_valid_config() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("## CMS recipes")
        .nth(1)
        .expect("a CMS recipes section");
    let toml = section
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a TOML block");
    let cfg = isrgate::config::from_toml(toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(cfg.webhook.rules.len(), 4);
}

#[test]
fn check_config_names_the_rule_and_the_template() {
    use std::io::Write;
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(
        b"[webhook]\nformat = \"ghost\"\n\n[[webhook.rules]]\ntype = \"blogPost\"\npaths = [\"/blog/{slug}\"]\n\n[[webhook.rules]]\ntype = \"post\"\npaths = [\"posts/{slug}\"]\ntags = [\"post {id}\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_isrgate"))
        .args(["check-config", "--config"])
        .arg(f.path())
        .output()
        .expect("run isrgate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for needle in [
        "webhook.format: \"ghost\" is not a format",
        "webhook.rules[1].paths[0]: \"posts/{slug}\": a path starts with /",
        "webhook.rules[1].tags[0]",
        "invalid configuration (3 problems)",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}
