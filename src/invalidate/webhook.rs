//! The webhook's front door: who may call it, and what it asks for. Pure functions over the
//! request's head and raw body; nothing here changes state.
//!
//! - **Auth**: `Authorization: Bearer <secret>`, or an HMAC-SHA256 of `"<timestamp>.<raw
//!   body>"` in `x-isrgate-signature: sha256=<hex>` with the UNIX seconds in
//!   `x-isrgate-timestamp`, accepted within a replay window. Secrets come from the environment
//!   (`ISRGATE_WEBHOOK_SECRET`; `ISRGATE_WEBHOOK_HMAC_SECRET` for the signature key, the same
//!   secret when unset) and are compared in constant time.
//! - **Body**: JSON `{"paths": [...], "tags": [...], "mode": "soft"|"hard", "rewarm": bool}`
//!   (unknown fields are errors), or, with an empty body, the query form
//!   `?path=/a&tag=t&mode=hard&rewarm=false` that simple CMS webhooks send. Every problem is a
//!   [`Rejected`] naming the field.

use std::time::Duration;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::cache::epochs::Mode;
use crate::cache::tags;

/// Signature header (`sha256=<hex>`).
pub const SIGNATURE: &str = "x-isrgate-signature";
/// Timestamp header (UNIX seconds) covered by the signature.
pub const TIMESTAMP: &str = "x-isrgate-timestamp";
/// Most paths plus tags in one call.
pub const MAX_ITEMS: usize = 1_000;
/// Longest path accepted, bytes.
pub const MAX_PATH_LEN: usize = 2_048;

/// The webhook's secrets (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// The bearer secret.
    pub bearer: String,
    /// The HMAC key.
    pub hmac: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

/// Why a call was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// 401: no or wrong credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 400: the body or query is malformed; says which field.
    #[error("{0}")]
    BadRequest(String),
    /// 422: well-formed but names nothing to invalidate.
    #[error("nothing to revalidate: give at least one path or tag")]
    NothingToDo,
}

impl Rejected {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Rejected::Unauthorized(_) => 401,
            Rejected::BadRequest(_) => 400,
            Rejected::NothingToDo => 422,
        }
    }
}

/// What a webhook asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revalidation {
    /// Pathnames (every variant of each).
    pub paths: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Soft (serve stale while refreshing) or hard (miss).
    pub mode: Mode,
    /// Render the paths again before a user asks.
    pub rewarm: bool,
}

impl Revalidation {
    /// The tags to record: each path's `path:` tag, then the tags, in the form entries carry
    /// (paths canonical, as in keys: `tags::canonical_tag`).
    pub fn all_tags(&self) -> Vec<String> {
        let mut all: Vec<String> = self.paths.iter().map(|p| tags::path_tag(p)).collect();
        for t in &self.tags {
            let t = tags::canonical_tag(t);
            if !all.iter().any(|a| *a == *t) {
                all.push(t.into_owned());
            }
        }
        all
    }
}

/// Checks the caller's credentials against `secrets` at `now_unix` seconds.
pub fn authenticate(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &Secrets,
    window: Duration,
    now_unix: u64,
) -> Result<(), Rejected> {
    if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
        let given = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Rejected::Unauthorized(
                "Authorization must be \"Bearer <secret>\"",
            ))?;
        // Digests first: equal lengths, so the comparison time says nothing about the secret.
        let (a, b) = (
            Sha256::digest(given.trim()),
            Sha256::digest(&secrets.bearer),
        );
        return if bool::from(a.ct_eq(&b)) {
            Ok(())
        } else {
            Err(Rejected::Unauthorized("wrong secret"))
        };
    }
    let Some(signature) = headers.get(SIGNATURE) else {
        return Err(Rejected::Unauthorized(
            "missing credentials: send Authorization: Bearer <secret>, or x-isrgate-signature and x-isrgate-timestamp",
        ));
    };
    let timestamp = headers
        .get(TIMESTAMP)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(Rejected::Unauthorized(
            "x-isrgate-timestamp must be UNIX seconds",
        ))?;
    if now_unix.abs_diff(timestamp) > window.as_secs() {
        return Err(Rejected::Unauthorized(
            "timestamp outside the replay window",
        ));
    }
    let expected = signature
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("sha256="))
        .and_then(unhex)
        .ok_or(Rejected::Unauthorized(
            "x-isrgate-signature must be sha256=<hex>",
        ))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secrets.hmac.as_bytes())
        .map_err(|_| Rejected::Unauthorized("bad signature"))?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| Rejected::Unauthorized("bad signature"))
}

/// The signature header value for `body` at `timestamp` (for clients and tests).
pub fn sign(key: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    rewarm: Option<bool>,
}

/// Parses the JSON body, or the query when the body is empty.
pub fn parse(body: &[u8], query: Option<&str>) -> Result<Revalidation, Rejected> {
    let raw = if body.iter().all(u8::is_ascii_whitespace) {
        from_query(query.unwrap_or(""))?
    } else {
        serde_json::from_slice::<Body>(body).map_err(|e| {
            Rejected::BadRequest(format!("body is not valid JSON for this endpoint: {e}"))
        })?
    };
    let mode = match raw.mode.as_deref() {
        None => Mode::Soft,
        Some(m) => Mode::parse(m).ok_or_else(|| {
            Rejected::BadRequest(format!("mode: {m:?} is not \"soft\" or \"hard\""))
        })?,
    };
    Revalidation::new(raw.paths, raw.tags, mode, raw.rewarm.unwrap_or(true))
}

impl Revalidation {
    /// Checks every path and tag (the webhook's and `isrgate purge`'s one set of rules).
    pub fn new(
        paths: Vec<String>,
        tags: Vec<String>,
        mode: Mode,
        rewarm: bool,
    ) -> Result<Revalidation, Rejected> {
        if paths.len() + tags.len() > MAX_ITEMS {
            return Err(Rejected::BadRequest(format!(
                "paths and tags: at most {MAX_ITEMS} in one call"
            )));
        }
        for (i, p) in paths.iter().enumerate() {
            let ok = p.starts_with('/')
                && p.len() <= MAX_PATH_LEN
                && !p.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(Rejected::BadRequest(format!(
                    "paths[{i}]: {p:?} is not a pathname (starts with /, no spaces, at most {MAX_PATH_LEN} bytes)"
                )));
            }
        }
        for (i, t) in tags.iter().enumerate() {
            if !tags::is_valid(t) {
                return Err(Rejected::BadRequest(format!(
                    "tags[{i}]: {t:?} is not a tag (one word, at most {} bytes)",
                    tags::MAX_TAG_LEN
                )));
            }
        }
        if paths.is_empty() && tags.is_empty() {
            return Err(Rejected::NothingToDo);
        }
        Ok(Revalidation {
            paths,
            tags,
            mode,
            rewarm,
        })
    }
}

fn from_query(query: &str) -> Result<Body, Rejected> {
    let mut b = Body {
        paths: Vec::new(),
        tags: Vec::new(),
        mode: None,
        rewarm: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
            .decode_utf8()
            .map_err(|_| Rejected::BadRequest(format!("query {k}: not UTF-8")))?
            .into_owned();
        match k {
            "path" => b.paths.push(v),
            "tag" => b.tags.push(v),
            "mode" => b.mode = Some(v),
            "rewarm" => {
                b.rewarm = Some(match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(Rejected::BadRequest(format!(
                            "query rewarm: {v:?} is not true or false"
                        )));
                    }
                });
            }
            other => {
                return Err(Rejected::BadRequest(format!(
                    "query: unknown parameter {other:?} (path, tag, mode, rewarm)"
                )));
            }
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secrets() -> Secrets {
        Secrets {
            bearer: "s3cret".into(),
            hmac: "k3y".into(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("test value"),
                v.parse().expect("test value"),
            );
        }
        h
    }

    const WINDOW: Duration = Duration::from_secs(300);

    #[test]
    fn bearer_and_signature_are_checked() {
        let ok = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(authenticate(&ok, b"", &secrets(), WINDOW, 0), Ok(()));
        let wrong = headers(&[("authorization", "Bearer nope")]);
        assert_eq!(
            authenticate(&wrong, b"", &secrets(), WINDOW, 0),
            Err(Rejected::Unauthorized("wrong secret"))
        );
        assert!(authenticate(&HeaderMap::new(), b"", &secrets(), WINDOW, 0).is_err());

        let body = br#"{"paths":["/a"]}"#;
        let sig = sign("k3y", 1_000, body);
        let signed = headers(&[(SIGNATURE, &sig), (TIMESTAMP, "1000")]);
        assert_eq!(
            authenticate(&signed, body, &secrets(), WINDOW, 1_100),
            Ok(())
        );
        assert!(
            authenticate(&signed, b"{}", &secrets(), WINDOW, 1_100).is_err(),
            "another body"
        );
        assert_eq!(
            authenticate(&signed, body, &secrets(), WINDOW, 1_000 + 301),
            Err(Rejected::Unauthorized(
                "timestamp outside the replay window"
            ))
        );
        let other_key = headers(&[
            (SIGNATURE, &sign("s3cret", 1_000, body)),
            (TIMESTAMP, "1000"),
        ]);
        assert!(authenticate(&other_key, body, &secrets(), WINDOW, 1_000).is_err());
    }

    #[test]
    fn bodies_and_queries_parse_with_defaults() {
        let r = parse(br#"{"paths":["/a"],"tags":["t"]}"#, None).expect("test value");
        assert_eq!((r.mode, r.rewarm), (Mode::Soft, true));
        assert_eq!(r.all_tags(), ["path:/a", "t"]);
        let q = parse(b"", Some("path=%2Fb&tag=x&mode=hard&rewarm=false")).expect("test value");
        assert_eq!(q.paths, ["/b"]);
        assert_eq!((q.mode, q.rewarm), (Mode::Hard, false));
    }

    #[test]
    fn every_problem_names_its_field() {
        let cases: &[(&[u8], Option<&str>, &str)] = &[
            (b"{", None, "JSON"),
            (
                br#"{"paths":["/a"],"purge":true}"#,
                None,
                "unknown field `purge`",
            ),
            (br#"{"paths":["a"]}"#, None, "paths[0]"),
            (br#"{"tags":["a b"]}"#, None, "tags[0]"),
            (br#"{"paths":["/a"],"mode":"medium"}"#, None, "mode"),
            (br#"{"paths":"/a"}"#, None, "invalid type"),
            (b"", Some("path=/a&x=1"), "unknown parameter"),
        ];
        for (body, query, needle) in cases {
            match parse(body, *query) {
                Err(Rejected::BadRequest(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        assert_eq!(parse(b"{}", None), Err(Rejected::NothingToDo));
        assert_eq!(parse(b"", None), Err(Rejected::NothingToDo));
    }

    proptest! {
        #[test]
        fn parse_never_panics(body in prop::collection::vec(any::<u8>(), 0..512), q in ".{0,64}") {
            let _ = parse(&body, Some(&q));
        }
    }
}
