//! The webhook's parse step: what a call asks for, once [`super::auth`] has let it in. Pure
//! functions over the request's head, query and raw body; nothing here changes state.
//!
//! - **The gateway's own body**: JSON `{"paths": [...], "tags": [...], "mode": "soft"|"hard",
//!   "rewarm": bool}` (unknown fields are errors).
//! - **A CMS's own payload** (Contentful, Sanity, Strapi, WordPress), named by `webhook.format`
//!   or `?format=`, or recognised from its headers and shape ([`super::cms`]), then mapped to
//!   paths and tags by `[[webhook.rules]]` ([`super::rules`]).
//! - **The query**: `?path=/a&tag=t&mode=hard&rewarm=false` (repeatable), alone with an empty
//!   body (what URL-only senders send), or added to a body's paths and tags; `format` names the
//!   body's shape; `secret` is [`super::auth`]'s.
//!
//! Every problem is a [`Rejected`] naming the field.

use http::{HeaderMap, Method};
use serde::Deserialize;

use super::cms::{self, Format, Origin};
use super::rules::{self, Rule};
use crate::cache::epochs::Mode;
use crate::cache::tags;

pub use super::auth::{SIGNATURE, Secrets, TIMESTAMP, sign};

/// Most paths plus tags in one call.
pub const MAX_ITEMS: usize = 1_000;
/// Longest path accepted, bytes.
pub const MAX_PATH_LEN: usize = 2_048;

/// Why a call was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// 401: no or wrong credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: credentials in a form this gateway refuses, or a wrong secret in the URL.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 405: the method (the message says which are accepted).
    #[error("{0}")]
    MethodNotAllowed(&'static str),
    /// 400: the body or query is malformed; says which field.
    #[error("{0}")]
    BadRequest(String),
    /// 422: well-formed but names nothing to invalidate.
    #[error("nothing to revalidate: give at least one path or tag")]
    NothingToDo,
}

impl Rejected {
    /// The HTTP status.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Rejected::Unauthorized(_) => S::UNAUTHORIZED,
            Rejected::Forbidden(_) => S::FORBIDDEN,
            Rejected::MethodNotAllowed(_) => S::METHOD_NOT_ALLOWED,
            Rejected::BadRequest(_) => S::BAD_REQUEST,
            Rejected::NothingToDo => S::UNPROCESSABLE_ENTITY,
        }
    }
}

/// POST always; GET only with `webhook.allow_query_secret` (URL-only senders).
pub fn check_method(method: &Method, allow_get: bool) -> Result<(), Rejected> {
    match *method {
        Method::POST => Ok(()),
        Method::GET if allow_get => Ok(()),
        Method::GET => Err(Rejected::MethodNotAllowed(
            "use POST; GET (with ?secret=) is accepted only with webhook.allow_query_secret = true",
        )),
        _ => Err(Rejected::MethodNotAllowed(if allow_get {
            "use POST or GET"
        } else {
            "use POST"
        })),
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
    /// The CMS entry it was mapped from, for the answer and the log.
    pub entry: Option<Origin>,
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

#[derive(Deserialize, Default)]
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

/// What the query string asks for.
#[derive(Default)]
struct Query {
    paths: Vec<String>,
    tags: Vec<String>,
    mode: Option<String>,
    rewarm: Option<bool>,
    format: Option<Format>,
}

/// Reads a call: its body in the format `format` (`webhook.format`, unless the query names
/// one), its CMS entry mapped through `rules`, plus the query.
pub fn read(
    headers: &HeaderMap,
    body: &[u8],
    query: Option<&str>,
    format: Format,
    rules: &[Rule],
) -> Result<Revalidation, Rejected> {
    let q = Query::parse(query.unwrap_or(""))?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return q.finish(Body::default(), None);
    }
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Rejected::BadRequest(format!("body is not valid JSON: {e}")))?;
    let (format, detected) = match q.format.unwrap_or(format) {
        Format::Auto => (cms::detect(headers, &value), true),
        named => (named, false),
    };
    if format == Format::Isrgate {
        let own = Body::deserialize(value).map_err(|e| {
            let hint = if detected {
                " (nor is it a Contentful, Sanity, Strapi or WordPress payload; name its CMS with webhook.format or ?format=)"
            } else {
                ""
            };
            Rejected::BadRequest(format!("body is not valid JSON for this endpoint: {e}{hint}"))
        })?;
        return q.finish(own, None);
    }
    let entry = cms::entry(format, headers, value)?;
    let (paths, tags) = rules::map(&entry, rules)?;
    q.finish(
        Body {
            paths,
            tags,
            ..Body::default()
        },
        Some(entry.origin()),
    )
}

/// Parses the gateway's own JSON body, or the query when the body is empty (the dashboard's
/// purge form and tests: no CMS payloads).
pub fn parse(body: &[u8], query: Option<&str>) -> Result<Revalidation, Rejected> {
    read(&HeaderMap::new(), body, query, Format::Isrgate, &[])
}

impl Query {
    fn parse(query: &str) -> Result<Query, Rejected> {
        let mut q = Query::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8()
                .map_err(|_| Rejected::BadRequest(format!("query {k}: not UTF-8")))?
                .into_owned();
            match k {
                "path" => q.paths.push(v),
                "tag" => q.tags.push(v),
                "mode" => q.mode = Some(v),
                "rewarm" => q.rewarm = Some(bool_param("rewarm", &v)?),
                "format" => {
                    q.format = Some(Format::parse(&v).ok_or_else(|| {
                        Rejected::BadRequest(format!(
                            "query format: {v:?} is not one of {}",
                            Format::NAMES
                        ))
                    })?);
                }
                // Checked (and never echoed) by `auth`.
                "secret" => {}
                other => {
                    return Err(Rejected::BadRequest(format!(
                        "query: unknown parameter {other:?} (path, tag, mode, rewarm, format, secret)"
                    )));
                }
            }
        }
        Ok(q)
    }

    /// The body's paths and tags, then the query's; the body's mode and rewarm win.
    fn finish(self, mut body: Body, entry: Option<Origin>) -> Result<Revalidation, Rejected> {
        body.paths.extend(self.paths);
        body.tags.extend(self.tags);
        let mode = match body.mode.or(self.mode).as_deref() {
            None => Mode::Soft,
            Some(m) => Mode::parse(m).ok_or_else(|| {
                Rejected::BadRequest(format!("mode: {m:?} is not \"soft\" or \"hard\""))
            })?,
        };
        let rewarm = body.rewarm.or(self.rewarm).unwrap_or(true);
        let mut r = Revalidation::new(body.paths, body.tags, mode, rewarm)?;
        r.entry = entry;
        Ok(r)
    }
}

fn bool_param(name: &str, v: &str) -> Result<bool, Rejected> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(Rejected::BadRequest(format!(
            "query {name}: {v:?} is not true or false"
        ))),
    }
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
            entry: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidate::cms::tests::headers;
    use proptest::prelude::*;

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

    #[test]
    fn only_post_unless_urls_may_carry_the_secret() {
        assert_eq!(check_method(&Method::POST, false), Ok(()));
        assert_eq!(check_method(&Method::GET, true), Ok(()));
        for (method, allow) in [(Method::GET, false), (Method::PUT, true)] {
            let e = check_method(&method, allow).expect_err("refused");
            assert_eq!(e.status(), http::StatusCode::METHOD_NOT_ALLOWED, "{method}");
        }
    }

    #[test]
    fn a_cms_payload_is_mapped_and_the_query_adds_to_it() {
        let body = br#"{"_id":"p1","_type":"post","slug":{"current":"hi"}}"#;
        let rules = [Rule::new(rules::RuleSpec {
            types: &["post".into()],
            cms: None,
            paths: &["/blog/{slug.current}".into()],
            tags: &["post-{id}".into()],
        })
        .expect("rule")];
        let sanity = headers(&[("sanity-operation", "update")]);
        let r = read(
            &sanity,
            body,
            Some("tag=home&mode=hard"),
            Format::Auto,
            &rules,
        )
        .expect("read");
        assert_eq!(
            (r.paths.as_slice(), r.tags.as_slice()),
            (
                &["/blog/hi".to_owned()][..],
                &["post-p1".to_owned(), "home".to_owned()][..]
            )
        );
        assert_eq!(r.mode, Mode::Hard);
        let origin = r.entry.expect("entry");
        assert_eq!(
            (origin.cms, origin.event.as_deref()),
            (Format::Sanity, Some("update"))
        );
        // Named: the shape is not guessed.
        let named = read(
            &HeaderMap::new(),
            body,
            Some("format=strapi"),
            Format::Auto,
            &rules,
        );
        assert!(matches!(named, Err(Rejected::BadRequest(m)) if m.starts_with("event")));
        // The gateway's own body, named, refuses the CMS's fields.
        let own = read(&HeaderMap::new(), body, None, Format::Isrgate, &rules);
        assert!(matches!(own, Err(Rejected::BadRequest(m)) if m.contains("unknown field `_id`")));
        let unknown = read(
            &HeaderMap::new(),
            br#"{"data":1}"#,
            None,
            Format::Auto,
            &rules,
        );
        assert!(matches!(unknown, Err(Rejected::BadRequest(m)) if m.contains("webhook.format")));
    }

    proptest! {
        #[test]
        fn parse_never_panics(body in prop::collection::vec(any::<u8>(), 0..512), q in ".{0,64}") {
            let _ = parse(&body, Some(&q));
            let _ = read(&HeaderMap::new(), &body, Some(&q), Format::Auto, &[]);
        }

        /// CMS-shaped bodies with arbitrary values: an entry or a 400, never a panic.
        #[test]
        fn cms_shapes_never_panic(
            key in prop::sample::select(vec!["sys", "_id", "_type", "event", "entry", "model", "post", "post_id", "fields", "media"]),
            value in prop::sample::select(vec!["1", "\"x\"", "null", "{}", "[]", "{\"type\":\"Entry\",\"id\":1}", "{\"post_type\":\"page\"}"]),
            format in prop::sample::select(vec![Format::Auto, Format::Contentful, Format::Sanity, Format::Strapi, Format::Wordpress]),
        ) {
            let body = format!("{{\"{key}\":{value},\"event\":\"entry.update\",\"_type\":\"t\"}}");
            let _ = read(&HeaderMap::new(), body.as_bytes(), None, format, &[]);
        }
    }
}
