//! Per-route policy (`[[routes]]`): what the operator says about a path pattern wins over what
//! the replica sent, as nginx's `proxy_cache_valid` or a VCL `beresp.ttl` would.
//!
//! A route names a pattern and any of: `ttl` (the freshness lifetime), `stale_while_revalidate`,
//! `stale_if_error`, or `cache = false` (never looked up or stored: the request bypasses the
//! cache). The first route whose pattern matches a request's page wins. Patterns are matched on
//! the page a request is for (`tags::page_path`: an RSC request, a `/_next/data/…` JSON and the
//! HTML of one page are one page), percent-decoded, segment by segment: a literal, `{name}` for
//! any one segment, and a last segment `*` for any number of further segments (none included).
//!
//! A route changes lifetimes only: what is never stored (`private`, `no-store`, `no-cache`,
//! `Set-Cookie`, Next.js-internal answers, a wrong content type, 5xx) stays never stored
//! (`policy::admit_for`). No clock, no I/O.

use std::time::Duration;

/// What a route says about lifetimes (`None`: what the replica sent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetimes {
    /// Freshness lifetime, instead of `s-maxage` / `max-age`; also makes a response without
    /// them cacheable.
    pub ttl: Option<Duration>,
    /// Instead of the response's `stale-while-revalidate`.
    pub stale_while_revalidate: Option<Duration>,
    /// Instead of the response's `stale-if-error` (or `cache.default_stale_if_error`).
    pub stale_if_error: Option<Duration>,
}

/// One `[[routes]]` entry, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// As written (logs, errors).
    pub pattern: String,
    segments: Vec<Segment>,
    /// `cache = false`: bypassed.
    pub cache: bool,
    /// Lifetimes it sets.
    pub lifetimes: Lifetimes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl Route {
    /// Compiles a route; the error says what is wrong with the pattern.
    pub fn new(pattern: &str, cache: bool, lifetimes: Lifetimes) -> Result<Route, String> {
        if !pattern.starts_with('/') {
            return Err(format!("{pattern:?}: a pattern starts with /"));
        }
        let parts: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, s) in parts.iter().enumerate() {
            segments.push(match *s {
                "*" if i + 1 == parts.len() => Segment::Rest,
                "*" => return Err(format!("{pattern:?}: * is only the last segment")),
                s if s.starts_with('{') && s.ends_with('}') && s.len() > 2 => Segment::One,
                s if s.contains(['{', '}', '*']) => {
                    return Err(format!(
                        "{pattern:?}: {{name}} and * are whole segments ({s:?})"
                    ));
                }
                s => Segment::Literal(s.to_owned()),
            });
        }
        Ok(Route {
            pattern: pattern.to_owned(),
            segments,
            cache,
            lifetimes,
        })
    }

    /// Whether the route covers `page` (a decoded page path).
    fn matches(&self, page: &str) -> bool {
        let mut parts = page.split('/').filter(|s| !s.is_empty());
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// The first of `routes` that covers the request path `path`; `None` without routes at no cost.
pub fn find<'a>(routes: &'a [Route], path: &str) -> Option<&'a Route> {
    if routes.is_empty() {
        return None;
    }
    find_page(routes, &super::tags::page_path(path))
}

/// [`find`] for a path already mapped to its page (`tags::page_path`).
pub fn find_page<'a>(routes: &'a [Route], page: &str) -> Option<&'a Route> {
    if routes.is_empty() {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(page).decode_utf8_lossy();
    routes.iter().find(|r| r.matches(&decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str) -> Route {
        Route::new(p, true, Lifetimes::default()).expect("pattern")
    }

    #[test]
    fn patterns_match_segment_by_segment() {
        let cases: &[(&str, &str, bool)] = &[
            ("/", "/", true),
            ("/", "/a", false),
            ("/blog/*", "/blog", true),
            ("/blog/*", "/blog/a/b", true),
            ("/blog/*", "/blogs", false),
            ("/blog/{slug}", "/blog/a", true),
            ("/blog/{slug}", "/blog/a/b", false),
            ("/blog/{slug}", "/blog", false),
            ("/p/{id}/reviews", "/p/7/reviews", true),
            ("/*", "/anything/at/all", true),
        ];
        for (pattern, path, want) in cases {
            let routes = [route(pattern)];
            assert_eq!(find(&routes, path).is_some(), *want, "{pattern} {path}");
        }
    }

    #[test]
    fn every_variant_of_a_page_and_its_encodings_meet_the_same_route() {
        let routes = [route("/account/*")];
        for path in [
            "/account/orders",
            "/%61ccount/orders",
            "/_next/data/build-1/account/orders.json",
        ] {
            assert!(find(&routes, path).is_some(), "{path}");
        }
    }

    #[test]
    fn the_first_match_wins_and_bad_patterns_say_why() {
        let routes = [route("/blog/special"), route("/blog/*")];
        assert_eq!(
            find(&routes, "/blog/special").map(|r| r.pattern.as_str()),
            Some("/blog/special")
        );
        for bad in ["blog", "/a/*/b", "/a/{x", "/a/x*"] {
            assert!(
                Route::new(bad, true, Lifetimes::default()).is_err(),
                "{bad}"
            );
        }
    }
}
