//! Step 9 of the request flow, **admit**, and the freshness of stored entries at a given time
//! (used by step 5, **lookup**).
//!
//! [`admit`] receives the method, status and headers of an upstream answer to a cacheable
//! request and the kind of body the request's key variant expects; it hands on either the
//! [`Freshness`] to store the response with, or the [`Skip`] reason it must not be stored. Rules:
//! RFC 9111 §3 for shared caches, plus NEXTJS.md §7.3 and §9 rules 9-12 (no heuristic
//! freshness, no `Set-Cookie`, no Next.js-internal markers, content type matching the variant)
//! and rule 15 (an origin `STALE` copy is stored as already stale).
//!
//! [`Times`] turns a [`Freshness`] into absolute deadlines at store time; [`state`] says what an
//! entry is good for at `now`.
//!
//! It must not read a clock (time is always a parameter), look at the request or the body, or
//! panic on any header value.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

use super::control::{CacheControl, Swr};
use super::routes::Lifetimes;

static X_NEXTJS_CACHE: HeaderName = HeaderName::from_static("x-nextjs-cache");
static X_NEXTJS_POSTPONED: HeaderName = HeaderName::from_static("x-nextjs-postponed");
static X_MIDDLEWARE_REWRITE: HeaderName = HeaderName::from_static("x-middleware-rewrite");
static X_MIDDLEWARE_SKIP: HeaderName = HeaderName::from_static("x-middleware-skip");
static X_NEXTJS_REDIRECT: HeaderName = HeaderName::from_static("x-nextjs-redirect");
static X_NEXTJS_REWRITE: HeaderName = HeaderName::from_static("x-nextjs-rewrite");
static X_NEXTJS_ACTION_NOT_FOUND: HeaderName = HeaderName::from_static("x-nextjs-action-not-found");
/// Server Action response headers (`x-action-redirect`, `x-action-revalidated`, …).
const X_ACTION_PREFIX: &str = "x-action-";

/// What kind of body the request's variant expects (the caller maps its key variant to this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A document: `text/html`.
    Html,
    /// An RSC payload, prefetch or segment: `text/x-component`.
    Rsc,
    /// Pages Router data (`/_next/data/…`): `application/json`.
    Json,
    /// An optimized image: `image/*`.
    Image,
    /// Anything (static files and other paths without a Next.js variant).
    Any,
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The request was not a GET (HEAD answers are never stored; the caller fetches GET).
    Method,
    /// A status a shared cache may not or should not store (204, 206, 5xx, …).
    Status,
    /// A 3xx without a `Location` (Next.js 14.2 `redirect()` in ISR).
    RedirectWithoutLocation,
    /// No `Cache-Control`: no heuristic freshness (NEXTJS.md §9 rule 10).
    NoCacheControl,
    /// `private`.
    Private,
    /// `no-store`.
    NoStore,
    /// `no-cache`.
    NoCache,
    /// A 404 without an explicit positive `s-maxage` (unmatched routes; rule 12).
    NotFoundWithoutSMaxAge,
    /// Neither `s-maxage` nor `max-age` is positive.
    NoPositiveMaxAge,
    /// `Set-Cookie` (rule 11).
    SetCookie,
    /// `Vary: *`: no request can match it (RFC 9111 §4.1).
    VaryStar,
    /// `x-nextjs-postponed` other than `2`: the body carries a per-request dynamic stream.
    Postponed,
    /// `x-middleware-rewrite`: middleware may have branched on things not in the key.
    MiddlewareRewrite,
    /// `x-middleware-skip`: the empty `{}` prefetch answer.
    MiddlewareSkip,
    /// `x-nextjs-redirect`.
    NextjsRedirect,
    /// `x-nextjs-rewrite`.
    NextjsRewrite,
    /// A Server Action answer (`x-action-*`, `x-nextjs-action-not-found`).
    Action,
    /// The content type does not match the variant (cache poisoning guard, rule 11).
    ContentTypeMismatch,
}

impl Skip {
    /// Every reason, for registering metrics.
    pub const ALL: [Skip; 18] = [
        Skip::Method,
        Skip::Status,
        Skip::RedirectWithoutLocation,
        Skip::NoCacheControl,
        Skip::Private,
        Skip::NoStore,
        Skip::NoCache,
        Skip::NotFoundWithoutSMaxAge,
        Skip::NoPositiveMaxAge,
        Skip::SetCookie,
        Skip::VaryStar,
        Skip::Postponed,
        Skip::MiddlewareRewrite,
        Skip::MiddlewareSkip,
        Skip::NextjsRedirect,
        Skip::NextjsRewrite,
        Skip::Action,
        Skip::ContentTypeMismatch,
    ];

    /// Label for logs, metrics and `Cache-Status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Method => "method",
            Skip::Status => "status",
            Skip::RedirectWithoutLocation => "redirect_without_location",
            Skip::NoCacheControl => "no_cache_control",
            Skip::Private => "private",
            Skip::NoStore => "no_store",
            Skip::NoCache => "no_cache",
            Skip::NotFoundWithoutSMaxAge => "not_found_without_s_maxage",
            Skip::NoPositiveMaxAge => "no_positive_max_age",
            Skip::SetCookie => "set_cookie",
            Skip::VaryStar => "vary_star",
            Skip::Postponed => "postponed",
            Skip::MiddlewareRewrite => "middleware_rewrite",
            Skip::MiddlewareSkip => "middleware_skip",
            Skip::NextjsRedirect => "nextjs_redirect",
            Skip::NextjsRewrite => "nextjs_rewrite",
            Skip::Action => "action",
            Skip::ContentTypeMismatch => "content_type_mismatch",
        }
    }
}

/// Bounds the gateway puts on what origins ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `stale-if-error` window when the response names none.
    pub default_stale_if_error: Duration,
    /// Cap for `stale-while-revalidate`: the window of a bare (unbounded) directive, and the most
    /// any value can grant (Next.js 15+ sends nearly a year).
    pub max_stale_while_revalidate: Duration,
    /// Cap on an entry's whole life: fresh plus the longer stale window.
    pub max_ttl: Duration,
}

/// How long an admitted response stays fresh and usable stale, from its store time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Freshness lifetime (`s-maxage` over `max-age`, capped by [`Limits::max_ttl`]).
    pub fresh: Duration,
    /// After `fresh`: served stale while one background refresh runs.
    pub stale_while_revalidate: Duration,
    /// After `fresh`: served only when the upstream fails.
    pub stale_if_error: Duration,
    /// The origin answered with its own stale copy (`x-nextjs-cache: STALE`): the entry starts
    /// stale, `fresh` is not granted (NEXTJS.md §9 rule 15).
    pub already_stale: bool,
    /// `Cache-Control: immutable` (RFC 8246): a content-addressed file, never changing.
    pub immutable: bool,
}

impl Freshness {
    /// The entry's whole life from store time: fresh (none when already stale) plus the longer
    /// of the two stale windows. Within [`Limits::max_ttl`] for anything [`admit`] returned.
    pub fn ttl(&self) -> Duration {
        self.fresh_part()
            .saturating_add(self.stale_while_revalidate.max(self.stale_if_error))
    }

    fn fresh_part(&self) -> Duration {
        if self.already_stale {
            Duration::ZERO
        } else {
            self.fresh
        }
    }
}

/// Decides whether an upstream response may be stored, and for how long.
pub fn admit(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    expect: Expect,
    limits: &Limits,
) -> Result<Freshness, Skip> {
    admit_for(method, status, headers, expect, limits, None)
}

/// [`admit`], with the lifetimes a `[[routes]]` entry sets (`cache::routes`) over the
/// response's own: a route's `ttl` also makes a response without a positive `s-maxage` /
/// `max-age` (or without `Cache-Control`) storable, but nothing else that is refused.
pub fn admit_for(
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    expect: Expect,
    limits: &Limits,
    route: Option<&Lifetimes>,
) -> Result<Freshness, Skip> {
    // RFC 9111 §3: only methods defined as cacheable; we store GET only, HEAD is served from it.
    if method != Method::GET {
        return Err(Skip::Method);
    }
    check_status(status, headers)?;
    let ttl = route.and_then(|r| r.ttl);
    let cc = match (CacheControl::from_headers(headers), ttl) {
        (Some(cc), _) => cc,
        (None, Some(_)) => CacheControl::default(),
        (None, None) => return Err(Skip::NoCacheControl),
    };
    let lifetime = match (check_directives(&cc, status), ttl) {
        (Ok(_) | Err(Skip::NoPositiveMaxAge | Skip::NotFoundWithoutSMaxAge), Some(t)) => {
            u32::try_from(t.as_secs()).unwrap_or(u32::MAX).max(1)
        }
        (result, _) => result?,
    };
    check_headers(headers)?;
    // A redirect's body is an HTML stub at most; what matters is `Location`.
    // An immutable response is a content-addressed file (RFC 8246): whatever its type, it is
    // the one representation of its URL.
    if !is_redirect(status) && !cc.immutable && !content_type_matches(headers, expect) {
        return Err(Skip::ContentTypeMismatch);
    }
    let already_stale = headers
        .get_all(&X_NEXTJS_CACHE)
        .iter()
        .any(|v| trim(v.as_bytes()).eq_ignore_ascii_case(b"STALE"));
    let mut f = freshness(&cc, lifetime, already_stale, limits);
    if let Some(r) = route {
        f.stale_while_revalidate = r.stale_while_revalidate.unwrap_or(f.stale_while_revalidate);
        f.stale_if_error = r.stale_if_error.unwrap_or(f.stale_if_error);
        let room = limits.max_ttl.saturating_sub(f.fresh_part());
        f.stale_while_revalidate = f.stale_while_revalidate.min(room);
        f.stale_if_error = f.stale_if_error.min(room);
    }
    Ok(f)
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 307 | 308)
}

/// RFC 9111 §3 lets a cache store any final status it understands; we keep to the ones Next.js
/// sends cacheable (NEXTJS.md §1.2) and that are safe to replay: never 204 (CVE-2025-49826),
/// 206 (we store whole bodies only) or 5xx (§7.3).
fn check_status(status: StatusCode, headers: &HeaderMap) -> Result<(), Skip> {
    match status.as_u16() {
        200 | 203 | 404 | 410 => Ok(()),
        301 | 302 | 307 | 308 => {
            let has_location = headers
                .get_all(header::LOCATION)
                .iter()
                .any(|v| !trim(v.as_bytes()).is_empty());
            if has_location {
                Ok(())
            } else {
                Err(Skip::RedirectWithoutLocation)
            }
        }
        _ => Err(Skip::Status),
    }
}

/// RFC 9111 §3 and §5.2.2: the directives that forbid a shared cache to store, then the
/// freshness lifetime in seconds (§4.2.1, no heuristics: NEXTJS.md §9 rule 10).
fn check_directives(cc: &CacheControl, status: StatusCode) -> Result<u32, Skip> {
    if cc.private {
        return Err(Skip::Private);
    }
    if cc.no_store {
        return Err(Skip::NoStore);
    }
    // §5.2.2.4: storable, but never reusable without validation; we do not validate.
    if cc.no_cache {
        return Err(Skip::NoCache);
    }
    // NEXTJS.md §9 rule 12: only ISR `notFound` 404s say `s-maxage`; `max-age` alone is not
    // enough.
    if status == StatusCode::NOT_FOUND && cc.s_maxage.is_none_or(|s| s == 0) {
        return Err(Skip::NotFoundWithoutSMaxAge);
    }
    match cc.shared_max_age() {
        Some(seconds) if seconds > 0 => Ok(seconds),
        _ => Err(Skip::NoPositiveMaxAge),
    }
}

/// Header conditions that make an answer per-request or internal (NEXTJS.md §7.3, §9 rule 11).
/// Checked in a fixed order so the reported reason does not depend on header order.
fn check_headers(headers: &HeaderMap) -> Result<(), Skip> {
    if headers.contains_key(header::SET_COOKIE) {
        return Err(Skip::SetCookie);
    }
    if list_elements(headers, &header::VARY).any(|e| e == b"*") {
        return Err(Skip::VaryStar);
    }
    if is_postponed(headers) {
        return Err(Skip::Postponed);
    }
    let markers: [(&HeaderName, Skip); 5] = [
        (&X_MIDDLEWARE_REWRITE, Skip::MiddlewareRewrite),
        (&X_MIDDLEWARE_SKIP, Skip::MiddlewareSkip),
        (&X_NEXTJS_REDIRECT, Skip::NextjsRedirect),
        (&X_NEXTJS_REWRITE, Skip::NextjsRewrite),
        (&X_NEXTJS_ACTION_NOT_FOUND, Skip::Action),
    ];
    if let Some((_, skip)) = markers.iter().find(|(name, _)| headers.contains_key(*name)) {
        return Err(*skip);
    }
    if headers
        .keys()
        .any(|name| name.as_str().starts_with(X_ACTION_PREFIX))
    {
        return Err(Skip::Action);
    }
    Ok(())
}

/// `x-nextjs-postponed` (NEXTJS.md §1.6): `1` means the PPR shell postponed and the body carries
/// a per-request dynamic tail; `2` marks a segment prefetch of a PPR route, which is static. Any
/// other value (or an empty one) is unknown, so it counts as postponed.
fn is_postponed(headers: &HeaderMap) -> bool {
    if !headers.contains_key(&X_NEXTJS_POSTPONED) {
        return false;
    }
    let mut values = list_elements(headers, &X_NEXTJS_POSTPONED).peekable();
    values.peek().is_none() || values.any(|e| e != b"2")
}

/// Whether every `Content-Type` line names the media type the variant expects (RFC 9110 §8.3.1:
/// type and subtype are case-insensitive; parameters after `;` do not matter here). A missing
/// content type matches only [`Expect::Any`].
fn content_type_matches(headers: &HeaderMap, expect: Expect) -> bool {
    if expect == Expect::Any {
        return true;
    }
    let mut lines = headers.get_all(header::CONTENT_TYPE).iter().peekable();
    if lines.peek().is_none() {
        return false;
    }
    lines.all(|v| {
        let bytes = v.as_bytes();
        let end = bytes.iter().position(|&b| b == b';').unwrap_or(bytes.len());
        let media = trim(&bytes[..end]);
        match expect {
            Expect::Html => media.eq_ignore_ascii_case(b"text/html"),
            Expect::Rsc => media.eq_ignore_ascii_case(b"text/x-component"),
            Expect::Json => media.eq_ignore_ascii_case(b"application/json"),
            Expect::Image => {
                media.len() > b"image/".len()
                    && media[..b"image/".len()].eq_ignore_ascii_case(b"image/")
            }
            Expect::Any => true,
        }
    })
}

/// The stale windows an admitted response gets (RFC 5861 via RFC 9111 §4.2.4), capped.
fn freshness(cc: &CacheControl, lifetime: u32, already_stale: bool, limits: &Limits) -> Freshness {
    let fresh = secs(lifetime).min(limits.max_ttl);
    // RFC 9111 §5.2.2.2 and §5.2.2.8: once stale, the response must not be reused without
    // validation, not even on error (the cache answers 504 instead), so there are no windows.
    let (swr, sie) = if cc.must_revalidate || cc.proxy_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let swr = match cc.stale_while_revalidate {
            Some(Swr::Seconds(n)) => secs(n).min(limits.max_stale_while_revalidate),
            Some(Swr::Unbounded) => limits.max_stale_while_revalidate,
            None => Duration::ZERO,
        };
        let sie = cc
            .stale_if_error
            .map_or(limits.default_stale_if_error, secs);
        (swr, sie)
    };
    let mut f = Freshness {
        fresh,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        already_stale,
        immutable: cc.immutable,
    };
    let room = limits.max_ttl.saturating_sub(f.fresh_part());
    f.stale_while_revalidate = f.stale_while_revalidate.min(room);
    f.stale_if_error = f.stale_if_error.min(room);
    f
}

fn secs(seconds: u32) -> Duration {
    Duration::from_secs(u64::from(seconds))
}

/// Times of a stored entry, all in milliseconds since the UNIX epoch (the caller passes `now`
/// the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    /// When the response was stored.
    pub stored_at: u64,
    /// Fresh before this.
    pub fresh_until: u64,
    /// Usable stale (with a background refresh) before this.
    pub stale_until: u64,
    /// Usable when the upstream fails before this; the entry's end of life.
    pub stale_if_error_until: u64,
}

impl Times {
    /// Deadlines of an entry stored at `stored_at_ms`. An already-stale response gets no fresh
    /// time; the stale windows start at `fresh_until`. Saturates instead of overflowing.
    pub fn new(stored_at_ms: u64, f: &Freshness) -> Times {
        let fresh_until = stored_at_ms.saturating_add(millis(f.fresh_part()));
        let swr = millis(f.stale_while_revalidate);
        let sie = millis(f.stale_if_error);
        Times {
            stored_at: stored_at_ms,
            fresh_until,
            stale_until: fresh_until.saturating_add(swr),
            stale_if_error_until: fresh_until.saturating_add(swr.max(sie)),
        }
    }

    /// Whole seconds since the entry was stored (for `Age`, RFC 9111 §5.1); 0 if `now_ms` is
    /// before the store time (clock skew between gateways).
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at) / 1000
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a stored entry is good for at a given time. Ordered: as time passes an entry only moves
/// forward through these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// Serve it.
    Fresh,
    /// Within stale-while-revalidate: serve and refresh in background.
    Stale,
    /// Only usable when the upstream fails.
    StaleIfError,
    /// Of no use.
    Expired,
}

impl State {
    /// Label for logs, metrics and `Cache-Status`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Fresh => "fresh",
            State::Stale => "stale",
            State::StaleIfError => "stale_if_error",
            State::Expired => "expired",
        }
    }
}

/// Why a stale entry was served, by what happened rather than by which directive allowed it
/// (Next.js sends `stale-while-revalidate` of a year, so a window says little): the `reason` of
/// `isrgate_stale_served_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleReason {
    /// Served while a refresh runs (stale-while-revalidate), nothing known to have failed.
    Swr,
    /// The replica failed: a 5xx, a refused or reset connection, no replica; or the last
    /// refresh of this entry did.
    OriginError,
    /// The replica did not answer in time (`cache.stale_if_error_wait`, the response header
    /// timeout, a stalled replica); or the last refresh of this entry timed out.
    OriginTimeout,
}

impl StaleReason {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::Swr => "swr",
            StaleReason::OriginError => "origin_error",
            StaleReason::OriginTimeout => "origin_timeout",
        }
    }
}

/// The state of an entry at `now_ms` (RFC 9111 §4.2: fresh while the age is below the lifetime).
/// Monotonic in `now_ms` for any `times`, even inconsistent ones read back from storage.
pub fn state(times: &Times, now_ms: u64) -> State {
    if now_ms < times.fresh_until {
        State::Fresh
    } else if now_ms < times.stale_until {
        State::Stale
    } else if now_ms < times.stale_if_error_until {
        State::StaleIfError
    } else {
        State::Expired
    }
}

/// The elements of a comma-separated list header across all its lines, trimmed, empty ones
/// skipped (RFC 9110 §5.6.1).
fn list_elements<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(trim)
        .filter(|e| !e.is_empty())
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const ISR_16: &str = "s-maxage=60, stale-while-revalidate=31535940";
    const HTML: (&str, &str) = ("content-type", "text/html; charset=utf-8");
    const RSC: (&str, &str) = ("content-type", "text/x-component");
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn limits() -> Limits {
        Limits {
            default_stale_if_error: Duration::from_secs(300),
            max_stale_while_revalidate: DAY,
            max_ttl: 7 * DAY,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn run(status: u16, pairs: &[(&str, &str)], expect: Expect) -> Result<Freshness, Skip> {
        let status = StatusCode::from_u16(status).expect("status");
        admit(&Method::GET, status, &headers(pairs), expect, &limits())
    }

    /// A 200 HTML answer with `cache_control` and `extra` headers, expecting HTML.
    fn html(cache_control: &str, extra: &[(&str, &str)]) -> Result<Freshness, Skip> {
        let mut pairs = vec![HTML, ("cache-control", cache_control)];
        pairs.extend_from_slice(extra);
        run(200, &pairs, Expect::Html)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    // Next.js forms (NEXTJS.md §1.2).

    #[test]
    fn next_15_16_isr_page_is_fresh_for_s_maxage_with_capped_swr() {
        let f = html(ISR_16, &[]).expect("admitted");
        assert_eq!(
            f,
            Freshness {
                fresh: secs(60),
                stale_while_revalidate: DAY,
                stale_if_error: secs(300),
                already_stale: false,
                immutable: false,
            }
        );
        assert_eq!(f.ttl(), secs(60) + DAY);
    }

    #[test]
    fn next_13_14_bare_swr_gets_the_configured_cap() {
        let f = html("s-maxage=60, stale-while-revalidate", &[]).expect("admitted");
        assert_eq!(f.fresh, secs(60));
        assert_eq!(f.stale_while_revalidate, DAY);
        let f = html("s-maxage=1, stale-while-revalidate", &[]).expect("admitted");
        assert_eq!(f.fresh, secs(1));
    }

    #[test]
    fn next_static_pages_of_every_version_are_admitted_within_max_ttl() {
        for cc in [
            "s-maxage=31536000, stale-while-revalidate",
            "s-maxage=31536000, ",
            "s-maxage=31536000",
        ] {
            let f = html(cc, &[]).expect(cc);
            assert_eq!(f.fresh, 7 * DAY, "{cc}");
            assert_eq!(f.ttl(), 7 * DAY, "{cc}");
        }
    }

    #[test]
    fn next_15_0_trailing_comma_isr_page_is_admitted() {
        let f = html("s-maxage=60, ", &[]).expect("admitted");
        assert_eq!(f.fresh, secs(60));
        assert_eq!(f.stale_while_revalidate, Duration::ZERO);
        assert_eq!(f.stale_if_error, secs(300));
    }

    #[test]
    fn next_private_string_is_never_stored() {
        let cc = "private, no-cache, no-store, max-age=0, must-revalidate";
        assert_eq!(html(cc, &[]), Err(Skip::Private));
        let cc = "no-cache, no-store, max-age=0, must-revalidate";
        assert_eq!(html(cc, &[]), Err(Skip::NoStore));
    }

    #[test]
    fn next_static_asset_is_admitted_on_max_age() {
        let pairs = [
            ("content-type", "application/javascript; charset=UTF-8"),
            ("cache-control", "public, max-age=31536000, immutable"),
        ];
        let f = run(200, &pairs, Expect::Any).expect("admitted");
        assert_eq!(f.fresh, 7 * DAY);
        let f = run(200, &pairs, Expect::Html).expect("immutable: any type is its URL's one");
        assert_eq!(f.fresh, 7 * DAY);
        let mutable = [
            ("content-type", "application/javascript"),
            ("cache-control", "public, max-age=60"),
        ];
        assert_eq!(
            run(200, &mutable, Expect::Html),
            Err(Skip::ContentTypeMismatch)
        );
    }

    #[test]
    fn next_public_files_and_metadata_have_no_positive_max_age() {
        for cc in ["public, max-age=0", "public, max-age=0, must-revalidate"] {
            let pairs = [("content-type", "image/png"), ("cache-control", cc)];
            assert_eq!(
                run(200, &pairs, Expect::Any),
                Err(Skip::NoPositiveMaxAge),
                "{cc}"
            );
        }
    }

    #[test]
    fn next_image_must_revalidate_gets_no_stale_windows() {
        let pairs = [
            ("content-type", "image/webp"),
            ("cache-control", "public, max-age=60, must-revalidate"),
            ("vary", "Accept"),
        ];
        let f = run(200, &pairs, Expect::Image).expect("admitted");
        assert_eq!(f.fresh, secs(60));
        assert_eq!(f.stale_while_revalidate, Duration::ZERO);
        assert_eq!(f.stale_if_error, Duration::ZERO);
        let f = html(
            "s-maxage=60, stale-while-revalidate=30, proxy-revalidate",
            &[],
        );
        assert_eq!(f.expect("admitted").ttl(), secs(60));
    }

    #[test]
    fn next_stale_copy_is_stored_already_stale() {
        let f = html(ISR_16, &[("x-nextjs-cache", "STALE")]).expect("admitted");
        assert!(f.already_stale);
        assert_eq!(f.fresh, secs(60));
        assert_eq!(f.ttl(), DAY);
        for value in ["HIT", "MISS", "REVALIDATED"] {
            let f = html(ISR_16, &[("x-nextjs-cache", value)]).expect("admitted");
            assert!(!f.already_stale, "{value}");
        }
        let f = html(ISR_16, &[("x-nextjs-cache", " stale ")]).expect("admitted");
        assert!(f.already_stale);
    }

    // Admission rules, one test each.

    #[test]
    fn only_get_is_stored() {
        let h = headers(&[HTML, ("cache-control", ISR_16)]);
        for method in [Method::HEAD, Method::POST, Method::PUT, Method::OPTIONS] {
            let got = admit(&method, StatusCode::OK, &h, Expect::Html, &limits());
            assert_eq!(got, Err(Skip::Method), "{method}");
        }
    }

    #[test]
    fn only_listed_statuses_are_stored() {
        for status in [
            100, 201, 204, 206, 304, 400, 401, 403, 405, 500, 502, 503, 504, 599,
        ] {
            let pairs = [HTML, ("cache-control", ISR_16), ("location", "/x")];
            assert_eq!(
                run(status, &pairs, Expect::Html),
                Err(Skip::Status),
                "{status}"
            );
        }
        for status in [200, 203, 404, 410, 301, 302, 307, 308] {
            let pairs = [HTML, ("cache-control", ISR_16), ("location", "/x")];
            assert!(run(status, &pairs, Expect::Html).is_ok(), "{status}");
        }
    }

    #[test]
    fn redirect_without_location_is_not_stored() {
        // Next.js 14.2 `redirect()` in an ISR page: 307, HTML body, no Location.
        let pairs = [
            HTML,
            ("cache-control", "s-maxage=60, stale-while-revalidate"),
        ];
        assert_eq!(
            run(307, &pairs, Expect::Html),
            Err(Skip::RedirectWithoutLocation)
        );
        let pairs = [HTML, ("cache-control", ISR_16), ("location", " ")];
        assert_eq!(
            run(308, &pairs, Expect::Html),
            Err(Skip::RedirectWithoutLocation)
        );
    }

    #[test]
    fn redirect_is_exempt_from_the_content_type_check() {
        let pairs = [HTML, ("cache-control", ISR_16), ("location", "/isr")];
        assert!(run(307, &pairs, Expect::Rsc).is_ok());
        let pairs = [("cache-control", ISR_16), ("location", "/isr")];
        assert!(run(308, &pairs, Expect::Json).is_ok());
    }

    #[test]
    fn not_found_needs_an_explicit_positive_s_maxage() {
        let ok = [
            HTML,
            (
                "cache-control",
                "s-maxage=10, stale-while-revalidate=31535990",
            ),
        ];
        assert_eq!(
            run(404, &ok, Expect::Html).expect("isr notFound").fresh,
            secs(10)
        );
        for cc in ["public, max-age=60", "s-maxage=0, max-age=60", "s-maxage=x"] {
            let pairs = [HTML, ("cache-control", cc)];
            assert_eq!(
                run(404, &pairs, Expect::Html),
                Err(Skip::NotFoundWithoutSMaxAge),
                "{cc}"
            );
        }
        // The unmatched-route 404 reports the more telling reason.
        let pairs = [
            HTML,
            (
                "cache-control",
                "private, no-cache, no-store, max-age=0, must-revalidate",
            ),
        ];
        assert_eq!(run(404, &pairs, Expect::Html), Err(Skip::Private));
        // 410 is not held to the 404 rule.
        let pairs = [HTML, ("cache-control", "max-age=60")];
        assert!(run(410, &pairs, Expect::Html).is_ok());
    }

    #[test]
    fn missing_cache_control_is_not_stored() {
        assert_eq!(run(200, &[HTML], Expect::Html), Err(Skip::NoCacheControl));
        // A middleware 307: Location, no Cache-Control.
        let pairs = [("location", "http://localhost:3000/")];
        assert_eq!(run(307, &pairs, Expect::Html), Err(Skip::NoCacheControl));
    }

    #[test]
    fn private_is_not_stored() {
        assert_eq!(html("private, s-maxage=60", &[]), Err(Skip::Private));
        assert_eq!(
            html("private=\"x-user\", s-maxage=60", &[]),
            Err(Skip::Private)
        );
    }

    #[test]
    fn no_store_is_not_stored() {
        assert_eq!(html("no-store, s-maxage=60", &[]), Err(Skip::NoStore));
        assert_eq!(html("no-store", &[]), Err(Skip::NoStore));
    }

    #[test]
    fn no_cache_is_not_stored() {
        assert_eq!(html("no-cache, s-maxage=60", &[]), Err(Skip::NoCache));
        assert_eq!(
            html("no-cache=\"set-cookie\", s-maxage=60", &[]),
            Err(Skip::NoCache)
        );
    }

    #[test]
    fn freshness_needs_a_positive_shared_max_age() {
        for cc in [
            "",
            "public",
            "s-maxage=0",
            "s-maxage=0, max-age=60",
            "max-age=-5",
            "stale-while-revalidate=60",
        ] {
            assert_eq!(html(cc, &[]), Err(Skip::NoPositiveMaxAge), "{cc:?}");
        }
        assert_eq!(
            html("max-age=5, s-maxage=60", &[]).expect("ok").fresh,
            secs(60)
        );
        assert_eq!(html("public, max-age=60", &[]).expect("ok").fresh, secs(60));
    }

    #[test]
    fn set_cookie_is_not_stored_whatever_cache_control_says() {
        // Observed: invalid draft cookie cleared on a cacheable ISR page.
        let got = html(ISR_16, &[("set-cookie", "__prerender_bypass=; Max-Age=0")]);
        assert_eq!(got, Err(Skip::SetCookie));
    }

    #[test]
    fn vary_star_is_not_stored() {
        assert_eq!(
            html(ISR_16, &[("vary", "Accept-Encoding, *")]),
            Err(Skip::VaryStar)
        );
        assert_eq!(
            html(ISR_16, &[("vary", "rsc"), ("vary", " * ")]),
            Err(Skip::VaryStar)
        );
        let vary = "rsc, next-router-state-tree, next-router-prefetch, next-router-segment-prefetch, Accept-Encoding";
        assert!(html(ISR_16, &[("vary", vary)]).is_ok());
    }

    #[test]
    fn postponed_shell_is_not_stored_but_ppr_segment_prefetch_is() {
        for value in ["1", "1, 1", "", "3", "2, 1"] {
            let got = html(ISR_16, &[("x-nextjs-postponed", value)]);
            assert_eq!(got, Err(Skip::Postponed), "{value:?}");
        }
        let pairs = [RSC, ("cache-control", ISR_16), ("x-nextjs-postponed", "2")];
        assert!(run(200, &pairs, Expect::Rsc).is_ok());
    }

    #[test]
    fn middleware_rewrite_is_not_stored() {
        let got = html(
            ISR_16,
            &[("x-middleware-rewrite", "http://localhost:3000/isr")],
        );
        assert_eq!(got, Err(Skip::MiddlewareRewrite));
    }

    #[test]
    fn middleware_skip_is_not_stored() {
        let pairs = [
            ("content-type", "application/json"),
            ("cache-control", ISR_16),
            ("x-middleware-skip", "1"),
        ];
        assert_eq!(run(200, &pairs, Expect::Json), Err(Skip::MiddlewareSkip));
    }

    #[test]
    fn nextjs_redirect_is_not_stored() {
        assert_eq!(
            html(ISR_16, &[("x-nextjs-redirect", "/a")]),
            Err(Skip::NextjsRedirect)
        );
    }

    #[test]
    fn nextjs_rewrite_is_not_stored() {
        assert_eq!(
            html(ISR_16, &[("x-nextjs-rewrite", "/a")]),
            Err(Skip::NextjsRewrite)
        );
    }

    #[test]
    fn server_action_answers_are_not_stored() {
        for name in [
            "x-action-revalidated",
            "x-action-redirect",
            "x-nextjs-action-not-found",
        ] {
            assert_eq!(html(ISR_16, &[(name, "1")]), Err(Skip::Action), "{name}");
        }
        // Only the prefix counts.
        assert!(html(ISR_16, &[("x-actions", "1")]).is_ok());
    }

    #[test]
    fn content_type_must_match_the_variant() {
        let cases: [(&str, Expect, bool); 14] = [
            ("text/html; charset=utf-8", Expect::Html, true),
            ("Text/HTML;charset=utf-8", Expect::Html, true),
            (" text/html ", Expect::Html, true),
            ("text/x-component", Expect::Html, false),
            ("application/json", Expect::Html, false),
            ("text/x-component", Expect::Rsc, true),
            ("text/html; charset=utf-8", Expect::Rsc, false),
            ("application/json", Expect::Json, true),
            ("text/html; charset=utf-8", Expect::Json, false),
            ("image/webp", Expect::Image, true),
            ("IMAGE/AVIF", Expect::Image, true),
            ("image/", Expect::Image, false),
            ("text/html", Expect::Image, false),
            ("text/plain", Expect::Any, true),
        ];
        for (content_type, expect, ok) in cases {
            let pairs = [("content-type", content_type), ("cache-control", ISR_16)];
            let got = run(200, &pairs, expect);
            if ok {
                assert!(got.is_ok(), "{content_type} {expect:?}");
            } else {
                assert_eq!(
                    got,
                    Err(Skip::ContentTypeMismatch),
                    "{content_type} {expect:?}"
                );
            }
        }
    }

    #[test]
    fn missing_or_conflicting_content_type_matches_only_any() {
        let pairs = [("cache-control", ISR_16)];
        assert_eq!(
            run(200, &pairs, Expect::Html),
            Err(Skip::ContentTypeMismatch)
        );
        assert!(run(200, &pairs, Expect::Any).is_ok());
        let pairs = [HTML, RSC, ("cache-control", ISR_16)];
        assert_eq!(
            run(200, &pairs, Expect::Html),
            Err(Skip::ContentTypeMismatch)
        );
    }

    // Windows and caps.

    #[test]
    fn stale_if_error_directive_overrides_the_default() {
        let f = html("s-maxage=60, stale-if-error=30", &[]).expect("ok");
        assert_eq!(f.stale_if_error, secs(30));
        let f = html("s-maxage=60, stale-if-error=bad", &[]).expect("ok");
        assert_eq!(f.stale_if_error, secs(300));
    }

    #[test]
    fn stale_while_revalidate_is_capped() {
        let f = html("s-maxage=60, stale-while-revalidate=30", &[]).expect("ok");
        assert_eq!(f.stale_while_revalidate, secs(30));
        let f = html("s-maxage=60, stale-while-revalidate=2147483648", &[]).expect("ok");
        assert_eq!(f.stale_while_revalidate, DAY);
    }

    #[test]
    fn ttl_is_fresh_plus_the_longer_window_within_max_ttl() {
        let f = html(
            "s-maxage=60, stale-while-revalidate=30, stale-if-error=90",
            &[],
        )
        .expect("ok");
        assert_eq!(f.ttl(), secs(150));
        // Six days fresh leaves one day for the windows.
        let f = html("s-maxage=518400, stale-if-error=2147483648", &[]).expect("ok");
        assert_eq!(f.fresh, 6 * DAY);
        assert_eq!(f.stale_if_error, DAY);
        assert_eq!(f.ttl(), 7 * DAY);
    }

    // Times and state.

    fn freshness(fresh: u64, swr: u64, sie: u64, already_stale: bool) -> Freshness {
        Freshness {
            fresh: secs(fresh),
            stale_while_revalidate: secs(swr),
            stale_if_error: secs(sie),
            already_stale,
            immutable: false,
        }
    }

    #[test]
    fn state_walks_fresh_stale_stale_if_error_expired() {
        let t = Times::new(1_000_000, &freshness(60, 30, 300, false));
        assert_eq!(t.fresh_until, 1_060_000);
        assert_eq!(t.stale_until, 1_090_000);
        assert_eq!(t.stale_if_error_until, 1_360_000);
        assert_eq!(state(&t, 1_000_000), State::Fresh);
        assert_eq!(state(&t, 1_059_999), State::Fresh);
        assert_eq!(state(&t, 1_060_000), State::Stale);
        assert_eq!(state(&t, 1_089_999), State::Stale);
        assert_eq!(state(&t, 1_090_000), State::StaleIfError);
        assert_eq!(state(&t, 1_359_999), State::StaleIfError);
        assert_eq!(state(&t, 1_360_000), State::Expired);
    }

    #[test]
    fn stale_if_error_never_ends_before_stale_while_revalidate() {
        let t = Times::new(0, &freshness(10, 100, 5, false));
        assert_eq!(t.stale_if_error_until, t.stale_until);
        assert_eq!(state(&t, 10_000), State::Stale);
        assert_eq!(state(&t, 110_000), State::Expired);
    }

    #[test]
    fn already_stale_entry_starts_stale() {
        let t = Times::new(5_000, &freshness(60, 30, 0, true));
        assert_eq!(t.fresh_until, 5_000);
        assert_eq!(state(&t, 5_000), State::Stale);
        assert_eq!(state(&t, 35_000), State::Expired);
    }

    #[test]
    fn times_saturate_instead_of_overflowing() {
        let f = freshness(u64::MAX, u64::MAX, u64::MAX, false);
        let t = Times::new(u64::MAX - 1, &f);
        assert_eq!(t.stale_if_error_until, u64::MAX);
        assert_eq!(state(&t, u64::MAX - 1), State::Fresh);
        assert_eq!(state(&t, u64::MAX), State::Expired);
        assert_eq!(f.ttl(), Duration::MAX);
    }

    #[test]
    fn age_is_whole_seconds_and_never_negative() {
        let t = Times::new(10_000, &freshness(60, 0, 0, false));
        assert_eq!(t.age_secs(10_999), 0);
        assert_eq!(t.age_secs(12_500), 2);
        assert_eq!(t.age_secs(0), 0);
    }

    #[test]
    fn labels_are_distinct_snake_case() {
        let labels: std::collections::HashSet<&str> =
            Skip::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(labels.len(), Skip::ALL.len());
        assert!(
            labels
                .iter()
                .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
        let states = [
            State::Fresh,
            State::Stale,
            State::StaleIfError,
            State::Expired,
        ];
        let labels: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        assert_eq!(labels, ["fresh", "stale", "stale_if_error", "expired"]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    const NAMES: &[&str] = &[
        "cache-control",
        "content-type",
        "location",
        "set-cookie",
        "vary",
        "x-nextjs-cache",
        "x-nextjs-postponed",
        "x-middleware-rewrite",
        "x-action-redirect",
        "x-nextjs-redirect",
    ];

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            "(s-maxage|max-age|stale-while-revalidate|stale-if-error)=[0-9]{0,12}(, [a-z-]{0,12})?"
                .prop_map(String::into_bytes),
            "(text/html|text/x-component|application/json|image/png|STALE|2|\\*)"
                .prop_map(String::into_bytes),
        ]
    }

    fn expect() -> impl Strategy<Value = Expect> {
        prop_oneof![
            Just(Expect::Html),
            Just(Expect::Rsc),
            Just(Expect::Json),
            Just(Expect::Image),
            Just(Expect::Any),
        ]
    }

    fn times() -> impl Strategy<Value = Times> {
        let t = prop_oneof![any::<u64>(), 0u64..1000, (u64::MAX - 1000)..=u64::MAX];
        (t.clone(), t.clone(), t.clone(), t).prop_map(|(a, b, c, d)| Times {
            stored_at: a,
            fresh_until: b,
            stale_until: c,
            stale_if_error_until: d,
        })
    }

    proptest! {
        #[test]
        fn admit_never_panics_and_respects_max_ttl(
            pairs in proptest::collection::vec((0..NAMES.len(), value()), 0..8),
            status in 100u16..1000,
            get in any::<bool>(),
            expect in expect(),
            max_ttl in 0u64..1_000_000,
        ) {
            let mut headers = HeaderMap::new();
            for (i, bytes) in pairs {
                if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                    headers.append(NAMES[i], v);
                }
            }
            let status = StatusCode::from_u16(status).expect("100..1000 is valid");
            let method = if get { Method::GET } else { Method::HEAD };
            let limits = Limits {
                default_stale_if_error: Duration::from_secs(300),
                max_stale_while_revalidate: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(max_ttl),
            };
            if let Ok(f) = admit(&method, status, &headers, expect, &limits) {
                prop_assert!(f.ttl() <= limits.max_ttl);
                prop_assert!(!f.fresh.is_zero() || limits.max_ttl.is_zero());
                let t = Times::new(1_000, &f);
                prop_assert_eq!(u128::from(t.stale_if_error_until - t.stored_at), f.ttl().as_millis());
            }
        }

        #[test]
        fn state_is_monotonic_in_now(times in times(), a in any::<u64>(), b in any::<u64>()) {
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(state(&times, early) <= state(&times, late));
        }

        #[test]
        fn state_of_new_times_moves_forward(
            fresh in 0u64..100_000, swr in 0u64..100_000, sie in 0u64..100_000,
            already_stale in any::<bool>(), stored_at in any::<u64>(),
            a in 0u64..400_000_000, b in 0u64..400_000_000,
        ) {
            let f = Freshness {
                fresh: Duration::from_secs(fresh),
                stale_while_revalidate: Duration::from_secs(swr),
                stale_if_error: Duration::from_secs(sie),
                already_stale,
                immutable: false,
            };
            let t = Times::new(stored_at, &f);
            let (early, late) = if a <= b { (a, b) } else { (b, a) };
            let early = stored_at.saturating_add(early);
            let late = stored_at.saturating_add(late);
            prop_assert!(state(&t, early) <= state(&t, late));
        }
    }
}
