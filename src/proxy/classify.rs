//! Step 3 of the request flow: is this request a cache candidate, and for which variant?
//!
//! Receives the sanitized request head; hands on the key [`Variant`] of a candidate, or the
//! [`Bypass`] reason it goes straight to a replica (streamed both ways, never stored). The rules
//! are NEXTJS.md §9 rule 9 plus operator settings: only GET and HEAD without a body; never a
//! Server Action (`Next-Action`), draft/preview mode (`__prerender_bypass`,
//! `__next_preview_data` cookies), `Authorization`, a middleware prefetch
//! (`x-middleware-prefetch`), a configured bypass path or cookie, a `[[routes]]` entry with
//! `cache = false`.

use http::Method;
use http::header::{self, HeaderMap};
use http::request::Parts;

use crate::cache::key::{self, Variant};
use crate::config::Cache;
use crate::http::{NEXT_ACTION, X_MIDDLEWARE_PREFETCH};

/// Cookies of Next.js draft and preview mode: a request carrying one sees uncached content.
const DRAFT_COOKIES: &[&str] = &["__prerender_bypass", "__next_preview_data"];

/// Why a request is not served from or stored in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not GET or HEAD.
    Method,
    /// The request has a body.
    Body,
    /// A Server Action (`Next-Action`).
    NextAction,
    /// Draft or preview mode cookie.
    DraftMode,
    /// `Authorization` header: a per-user answer.
    Authorization,
    /// A middleware prefetch (`x-middleware-prefetch`, CVE-2023-46298).
    MiddlewarePrefetch,
    /// A configured bypass path.
    Path,
    /// A configured bypass cookie.
    Cookie,
    /// A `[[routes]]` entry with `cache = false`.
    Route,
}

impl Bypass {
    /// Every reason, in `as usize` order (metrics are indexed by it).
    pub const ALL: [Bypass; 9] = [
        Bypass::Method,
        Bypass::Body,
        Bypass::NextAction,
        Bypass::DraftMode,
        Bypass::Authorization,
        Bypass::MiddlewarePrefetch,
        Bypass::Path,
        Bypass::Cookie,
        Bypass::Route,
    ];

    /// Label for logs, metrics and `Cache-Status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bypass::Method => "method",
            Bypass::Body => "body",
            Bypass::NextAction => "next_action",
            Bypass::DraftMode => "draft_mode",
            Bypass::Authorization => "authorization",
            Bypass::MiddlewarePrefetch => "middleware_prefetch",
            Bypass::Path => "path",
            Bypass::Cookie => "cookie",
            Bypass::Route => "route",
        }
    }
}

/// Classifies a sanitized request. `has_body` is whether a body follows the head.
pub fn request(cfg: &Cache, head: &Parts, has_body: bool) -> Result<Variant, Bypass> {
    if head.method != Method::GET && head.method != Method::HEAD {
        return Err(Bypass::Method);
    }
    if has_body {
        return Err(Bypass::Body);
    }
    let h = &head.headers;
    // Static names: a `&str` key is parsed into a header name on every lookup.
    if h.contains_key(&NEXT_ACTION) {
        return Err(Bypass::NextAction);
    }
    if h.contains_key(header::AUTHORIZATION) {
        return Err(Bypass::Authorization);
    }
    if h.contains_key(&X_MIDDLEWARE_PREFETCH) {
        return Err(Bypass::MiddlewarePrefetch);
    }
    let path = head.uri.path();
    if !cfg.bypass_paths.is_empty() {
        // Compared decoded, as Next.js matches routes: `/%61ccount/` must not dodge
        // `/account/`.
        let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        if cfg
            .bypass_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()) || decoded.starts_with(p.as_str()))
        {
            return Err(Bypass::Path);
        }
    }
    if crate::cache::routes::find(&cfg.routes, path).is_some_and(|r| !r.cache) {
        return Err(Bypass::Route);
    }
    if h.contains_key(header::COOKIE) {
        if has_cookie(h, DRAFT_COOKIES) {
            return Err(Bypass::DraftMode);
        }
        if !cfg.bypass_cookies.is_empty() && has_cookie(h, &cfg.bypass_cookies) {
            return Err(Bypass::Cookie);
        }
    }
    Ok(key::variant(path, h, cfg.avif))
}

/// Whether any `Cookie` header carries a cookie named in `names`.
fn has_cookie<S: AsRef<str>>(headers: &HeaderMap, names: &[S]) -> bool {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.split('=').next())
        .any(|name| names.iter().any(|n| n.as_ref() == name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn cfg() -> Cache {
        crate::config::Config::defaults()
            .cache
            .map(|mut c| {
                c.bypass_paths = vec!["/api/".into()];
                c.bypass_cookies = vec!["session".into()];
                c
            })
            .expect("cache on by default")
    }

    fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("req").into_parts().0
    }

    #[test]
    fn candidates_and_every_bypass_reason() {
        let c = cfg();
        assert_eq!(
            request(&c, &head("GET", "/p", &[]), false),
            Ok(Variant::Html)
        );
        assert_eq!(
            request(&c, &head("HEAD", "/p", &[("rsc", "1")]), false),
            Ok(Variant::Rsc)
        );
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], bool, Bypass);
        let cases: &[Case<'_>] = &[
            ("POST", "/p", &[], false, Bypass::Method),
            ("GET", "/p", &[], true, Bypass::Body),
            (
                "GET",
                "/p",
                &[("next-action", "abc")],
                false,
                Bypass::NextAction,
            ),
            (
                "GET",
                "/p",
                &[("cookie", "a=1; __prerender_bypass=x")],
                false,
                Bypass::DraftMode,
            ),
            (
                "GET",
                "/p",
                &[("cookie", "__next_preview_data=x")],
                false,
                Bypass::DraftMode,
            ),
            (
                "GET",
                "/p",
                &[("authorization", "Bearer x")],
                false,
                Bypass::Authorization,
            ),
            (
                "GET",
                "/p",
                &[("x-middleware-prefetch", "1")],
                false,
                Bypass::MiddlewarePrefetch,
            ),
            ("GET", "/api/x", &[], false, Bypass::Path),
            ("GET", "/%61pi/x", &[], false, Bypass::Path),
            (
                "GET",
                "/p",
                &[("cookie", "theme=dark; session=abc")],
                false,
                Bypass::Cookie,
            ),
        ];
        for (i, b) in Bypass::ALL.iter().enumerate() {
            assert_eq!(*b as usize, i, "ALL is in declaration order");
        }
        for (m, p, h, body, want) in cases {
            assert_eq!(
                request(&c, &head(m, p, h), *body),
                Err(*want),
                "{m} {p} {h:?}"
            );
        }
        assert_eq!(
            request(
                &c,
                &head("GET", "/p", &[("cookie", "sessionx=1; theme=dark")]),
                false
            ),
            Ok(Variant::Html),
            "cookie names match exactly"
        );
    }
}
