//! `GET /api/inspect?url=…`: what the cache holds for a URL, variant by variant, as the request
//! path would find it (`isrgate inspect` prints it).
//!
//! For each variant asked (`variant=html|rsc|prefetch`, repeatable; all three by default) the
//! request a browser would send is built, sanitized, classified, routed to a build and keyed
//! exactly as a real one (`proxy::cached::key`), then looked for in this gateway's L1 and in the
//! store, without filling or refreshing anything. The answer says the key, whether and where it
//! is held, its state and times, tags, build, size at rest, the gateway that filled it, and
//! whether an invalidation covers it (and which tag).

use http::request::Parts;
use http::{HeaderValue, Request};
use serde_json::{Value, json};

use crate::app::{AppState, CacheState};
use crate::cache::describe::Description;
use crate::cache::entry::Meta;
use crate::cache::key::CacheKey;
use crate::proxy::forwarded::Peer;

/// The variants `isrgate inspect` knows, and the request headers a browser sends for each.
const VARIANTS: [(&str, &[(&str, &str)]); 3] = [
    ("html", &[]),
    ("rsc", &[("rsc", "1")]),
    ("prefetch", &[("rsc", "1"), ("next-router-prefetch", "1")]),
];

/// What was asked: a path (or a whole URL, whose host is taken unless `host` is given), the
/// `Host` the site is served under, and the variants.
#[derive(Debug)]
pub struct Ask {
    path_and_query: String,
    host: String,
    variants: Vec<&'static str>,
}

impl Ask {
    /// Reads `url`, `host` and `variant` from a query string; the error says what is wrong.
    pub fn from_query(query: &str) -> Result<Ask, String> {
        let mut url = None;
        let mut host = None;
        let mut variants = Vec::new();
        for (name, value) in crate::http::query_pairs(query) {
            match name.as_str() {
                "url" => url = Some(value),
                "host" => host = Some(value),
                "variant" => {
                    let known = VARIANTS.iter().find(|(v, _)| *v == value).ok_or_else(|| {
                        format!("variant {value:?} is not one of html, rsc, prefetch")
                    })?;
                    variants.push(known.0);
                }
                other => return Err(format!("unknown parameter {other:?} (url, host, variant)")),
            }
        }
        let url = url.ok_or("url is missing: /api/inspect?url=/blog/a (or a whole URL)")?;
        let (from_url, path_and_query) = match url.split_once("://") {
            Some((_, rest)) => match rest.find('/') {
                Some(i) => (Some(rest[..i].to_owned()), rest[i..].to_owned()),
                None => (Some(rest.to_owned()), "/".to_owned()),
            },
            None if url.starts_with('/') => (None, url),
            None => return Err(format!("{url:?} is neither a path (/…) nor a URL")),
        };
        let host = host
            .or(from_url)
            .ok_or("host is missing: give a whole URL or host=")?;
        if variants.is_empty() {
            variants = VARIANTS.iter().map(|(v, _)| *v).collect();
        }
        Ok(Ask {
            path_and_query,
            host,
            variants,
        })
    }
}

/// The answer for `ask`: one object per variant.
pub async fn inspect(app: &AppState, cache: &CacheState, ask: &Ask) -> Result<Value, String> {
    let now = cache.clock.now_ms();
    let mut variants = serde_json::Map::new();
    for name in &ask.variants {
        let headers = VARIANTS
            .iter()
            .find(|(v, _)| v == name)
            .map_or(&[][..], |(_, h)| *h);
        let head = request(app, ask, headers)?;
        variants.insert((*name).to_owned(), one(app, cache, &head, now).await);
    }
    Ok(json!({
        "url": ask.path_and_query,
        "host": ask.host,
        "gateway": cache.gateway_id(),
        "variants": variants,
    }))
}

/// The head a browser's request for `ask` with `headers` becomes before the lookup.
fn request(app: &AppState, ask: &Ask, headers: &[(&str, &str)]) -> Result<Parts, String> {
    let mut b = Request::get(ask.path_and_query.as_str()).header(http::header::HOST, &ask.host);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    let (mut head, ()) = b
        .body(())
        .map_err(|e| format!("not a request this gateway can build: {e}"))?
        .into_parts();
    head.headers
        .insert("accept", HeaderValue::from_static("text/html,*/*"));
    let peer = Peer::new(([127, 0, 0, 1], 0).into(), &app.policy.forwarded);
    crate::proxy::sanitize::request(&app.policy, &peer, &mut head)
        .map_err(|r| format!("the gateway refuses this request ({})", r.as_str()))?;
    app.deploy.pin(&mut head);
    Ok(head)
}

/// One variant: keyed, classified, looked for.
async fn one(app: &AppState, cache: &CacheState, head: &Parts, now: u64) -> Value {
    let config = app.config();
    let Some(cfg) = config.cache.as_ref() else {
        return json!({ "cached": false, "why": "the cache is disabled" });
    };
    let variant = match crate::proxy::classify::request(cfg, head, false) {
        Ok(v) => v,
        Err(bypass) => {
            return json!({ "cached": false, "bypass": bypass.as_str() });
        }
    };
    let key = crate::proxy::cached::key(cache, head, &variant);
    let build = head
        .extensions
        .get::<std::sync::Arc<crate::deploy::Pin>>()
        .map(|p| p.build.clone());
    let mut out = held(cache, &key, now).await;
    if let Value::Object(m) = &mut out {
        m.insert("key".into(), json!(key.text));
        m.insert("hash".into(), json!(key.hex()));
        m.insert("build".into(), json!(build));
    }
    out
}

/// Where `key` is held and what its entry says.
async fn held(cache: &CacheState, key: &CacheKey, now: u64) -> Value {
    let in_l1 = cache.l1.get(key.hash, now).is_some();
    let stored = match cache.store.get(&key.hex()).await {
        Ok(s) => s,
        Err(e) => {
            return json!({ "cached": in_l1, "l1": in_l1, "store": format!("unavailable: {e}") });
        }
    };
    let Some(stored) = stored else {
        return json!({ "cached": in_l1, "l1": in_l1, "store": false });
    };
    let meta = match Meta::decode(&stored.meta) {
        Ok(m) => m,
        Err(e) => return json!({ "cached": false, "store": format!("undecodable: {e}") }),
    };
    let d = Description::of(&meta, now, &cache.epochs);
    json!({
        "cached": true,
        "l1": in_l1,
        "store": true,
        "status": meta.status,
        "state": d.state.as_str(),
        "age_s": d.age_s,
        "stored_at_ms": meta.stored_at_ms,
        "fresh_until_ms": meta.fresh_until_ms,
        "stale_until_ms": meta.stale_until_ms,
        "stale_if_error_until_ms": meta.stale_if_error_until_ms,
        "tags": meta.tags,
        "bytes_at_rest": stored.meta.len() + stored.body.len(),
        "bytes": meta.identity_len,
        "filled_by": d.filled_by(),
        "invalidation": d.invalidation.as_str(),
        "invalidated_by": d.invalidation.by,
        "vary": d.vary().collect::<Vec<_>>(),
    })
}

/// `GET /api/inspect`.
pub async fn answer(app: &AppState, query: Option<&str>) -> Result<Value, super::ApiError> {
    use super::ApiError;
    let cache = (app.cache.as_ref()).ok_or(ApiError::NotFound("the cache is disabled"))?;
    let ask =
        Ask::from_query(query.unwrap_or("")).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    inspect(app, cache, &ask)
        .await
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}
