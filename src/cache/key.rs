//! Step 4 of the request flow: the cache key of a (sanitized) request.
//!
//! Receives the request's host, path, query and the headers that choose a representation;
//! hands on a [`CacheKey`]: a canonical text (for logs) and its stable 128-bit hash (xxh3-128,
//! the same in every process and on every machine, so every gateway finds the same Redis
//! entry). Rules, from NEXTJS.md §9 rules 1-5 and §2.5:
//!
//! - key = namespace (deployment) + host + normalized path + query ordered by name (repeated
//!   names in request order) without `_rsc`,
//!   `__nextDataReq`, `nxtP*`, `nxtI*` + [`Variant`];
//! - the variant is what Next.js would answer: HTML, an RSC payload (`RSC: 1`), an RSC prefetch
//!   (`Next-Router-Prefetch: 1|2|3`), an RSC segment (`Next-Router-Segment-Prefetch`), Pages
//!   data JSON (`/_next/data/…`), an optimized image (format negotiated from `Accept`);
//! - never `Next-Router-State-Tree`, cookies, `Authorization` or `_rsc` (a 32-bit hash that
//!   collides: CVE-2026-44582); HEAD uses the GET key (the caller passes no method);
//! - a secondary component ([`vary_hash`]) for any other header a stored response lists in
//!   `Vary` (e.g. `Next-Url` for interception routes).
//!
//! Normalization is conservative: percent-encoding is canonicalized (RFC 3986 §6.2.2:
//! unreserved characters decoded, hex digits upper case), nothing else. Trailing slashes are
//! not folded: with `trailingSlash: false` Next answers `/a/` with a 308 to `/a`, so merging the
//! two would serve the page at the wrong URL and break its relative links.
//!
//! It must not look at the method, the body or anything that is not part of the representation.

use std::borrow::Cow;
use std::fmt::Write as _;

use http::header::{HeaderMap, HeaderName};

use crate::http::{NEXT_ROUTER_PREFETCH, RSC};

/// Which representation of a URL a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The HTML document.
    Html,
    /// The RSC (Flight) payload of a navigation (`RSC: 1`).
    Rsc,
    /// An RSC prefetch (`Next-Router-Prefetch: 1|2|3`).
    RscPrefetch(u8),
    /// One segment of a segment prefetch (`Next-Router-Segment-Prefetch: <segment>`).
    RscSegment(String),
    /// Pages Router data JSON (`/_next/data/<build>/…json`).
    DataJson,
    /// An optimized image in the negotiated format.
    Image(ImageFormat),
    /// A build asset (`/_next/static/…`): content-hashed, the same bytes on every replica of
    /// a build and for every request header, whatever its type (NEXTJS.md §6).
    Asset,
}

/// The format `/_next/image` will answer with, from the request's `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// `image/avif` accepted (only chosen when the app enables avif; the caller decides).
    Avif,
    /// `image/webp` accepted (Next's default `images.formats`).
    Webp,
    /// The source format.
    Original,
}

impl Variant {
    /// Label for the key text, logs and metrics.
    pub fn as_str(&self) -> Cow<'static, str> {
        match self {
            Variant::Html => Cow::Borrowed("html"),
            Variant::Rsc => Cow::Borrowed("rsc"),
            Variant::RscPrefetch(n) => Cow::Owned(format!("rsc-prefetch:{n}")),
            Variant::RscSegment(s) => Cow::Owned(format!("rsc-segment:{s}")),
            Variant::DataJson => Cow::Borrowed("data-json"),
            Variant::Image(ImageFormat::Avif) => Cow::Borrowed("image:avif"),
            Variant::Image(ImageFormat::Webp) => Cow::Borrowed("image:webp"),
            Variant::Image(ImageFormat::Original) => Cow::Borrowed("image:original"),
            Variant::Asset => Cow::Borrowed("asset"),
        }
    }

    /// Whether this is one of the RSC variants (`text/x-component` bodies).
    pub fn is_rsc(&self) -> bool {
        matches!(
            self,
            Variant::Rsc | Variant::RscPrefetch(_) | Variant::RscSegment(_)
        )
    }
}

/// Whether `Vary` values name `RSC`: Next sets it on every App Router response (NEXTJS.md
/// §1.8), so such a page has an RSC payload beside its HTML, from the same render.
pub fn varies_on_rsc<'a>(vary: impl IntoIterator<Item = &'a http::HeaderValue>) -> bool {
    vary.into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("rsc"))
}

/// `Next-Router-Segment-Prefetch`.
static SEGMENT_PREFETCH: HeaderName = HeaderName::from_static("next-router-segment-prefetch");

/// Request headers that choose the representation and are already in the key (or deliberately
/// not part of it: encodings are ours): a stored `Vary` listing them adds nothing to the
/// secondary key. `Accept` is not among them: only images put it in the key (as a format),
/// and a route handler may answer HTML or JSON by `Accept`.
const KEYED_OR_IGNORED: &[&str] = &[
    "rsc",
    "next-router-state-tree",
    "next-router-prefetch",
    "next-router-segment-prefetch",
    "accept-encoding",
];

/// The variant a sanitized request asks for. `avif` says whether the app enables avif images
/// (`images.formats`); Next only negotiates it then.
pub fn variant(path: &str, headers: &HeaderMap, avif: bool) -> Variant {
    if path.starts_with("/_next/static/") {
        return Variant::Asset;
    }
    if path.starts_with("/_next/data/") && path.ends_with(".json") {
        return Variant::DataJson;
    }
    if path == "/_next/image" {
        let accept = headers
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let format = if avif && accept.contains("image/avif") {
            ImageFormat::Avif
        } else if accept.contains("image/webp") {
            ImageFormat::Webp
        } else {
            ImageFormat::Original
        };
        return Variant::Image(format);
    }
    // Sanitize has already dropped `RSC` unless it is exactly `1`, and `Next-Router-Prefetch`
    // unless it is 1, 2 or 3.
    if headers.get(&RSC).is_none_or(|v| v.as_bytes() != b"1") {
        return Variant::Html;
    }
    if let Some(segment) = headers.get(&SEGMENT_PREFETCH).and_then(|v| v.to_str().ok()) {
        return Variant::RscSegment(segment.to_owned());
    }
    match headers.get(&NEXT_ROUTER_PREFETCH).map(|v| v.as_bytes()) {
        Some(b"1") => Variant::RscPrefetch(1),
        Some(b"2") => Variant::RscPrefetch(2),
        Some(b"3") => Variant::RscPrefetch(3),
        _ => Variant::Rsc,
    }
}

/// A cache key: its canonical text and the stable hash every gateway derives from it.
///
/// A key is *primary* (what the request's URL and variant name) or a *`Vary` slot* of a
/// primary ([`CacheKey::with_vary`]): where the answer for one set of values of the headers a
/// response varies on lives. The primary slot always holds the latest render, whichever its
/// values (so a gateway learns the `Vary` names from it); each set of values has its own slot,
/// so variants do not evict each other (see `proxy::lookup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// `namespace host path?query variant`, then ` vary:<hash>` for a slot; for logs and the
    /// dashboard.
    pub text: String,
    /// xxh3-128 of the length-prefixed parts (and, for a slot, of the primary's hash and the
    /// values' hash).
    pub hash: u128,
    /// The primary key's hash (`hash` itself for a primary key).
    pub primary: u128,
    /// Length of the primary key's text, a prefix of `text`.
    primary_len: usize,
}

impl CacheKey {
    /// The key of a request for `variant` of `host` + `path` + `query` in `namespace`.
    pub fn new(
        namespace: &str,
        host: &str,
        path: &str,
        query: Option<&str>,
        variant: &Variant,
    ) -> CacheKey {
        let host: Cow<'_, str> = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(host.to_ascii_lowercase())
        } else {
            Cow::Borrowed(host)
        };
        let path = canonical_path(path);
        let query = query.map(normalize_query).unwrap_or_default();
        let variant = variant.as_str();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for part in [namespace, &host, &path, &query, &variant] {
            // Length prefixes make the encoding unambiguous whatever bytes the parts hold.
            hasher.update(&(part.len() as u32).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        let mut text = String::with_capacity(
            namespace.len() + host.len() + path.len() + query.len() + variant.len() + 4,
        );
        for (i, part) in [namespace, &host, &path].into_iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(part);
        }
        if !query.is_empty() {
            text.push('?');
            text.push_str(&query);
        }
        text.push(' ');
        text.push_str(&variant);
        let hash = hasher.digest128();
        CacheKey {
            primary_len: text.len(),
            text,
            hash,
            primary: hash,
        }
    }

    /// The slot of the primary key for the values hashed to `vary` ([`vary_hash`]).
    pub fn with_vary(&self, vary: u128) -> CacheKey {
        let base = &self.text[..self.primary_len];
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&self.primary.to_le_bytes());
        bytes[16..].copy_from_slice(&vary.to_le_bytes());
        CacheKey {
            text: format!("{base} vary:{vary:032x}"),
            hash: xxhash_rust::xxh3::xxh3_128(&bytes),
            primary: self.primary,
            primary_len: self.primary_len,
        }
    }

    /// Whether this is a `Vary` slot, not the primary key.
    pub fn is_slot(&self) -> bool {
        self.hash != self.primary
    }

    /// The primary key of this key (itself, for a primary key).
    pub fn primary_key(&self) -> CacheKey {
        CacheKey {
            text: self.text[..self.primary_len].to_owned(),
            hash: self.primary,
            primary: self.primary,
            primary_len: self.primary_len,
        }
    }

    /// The hash as 32 lower-case hex digits (the Redis hash tag).
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(32);
        let _ = write!(s, "{:032x}", self.hash);
        s
    }
}

/// Hash of the request's values for the headers in a stored response's `Vary` (names
/// compared case-insensitively; headers already in the key are skipped; an absent header and
/// an empty one differ). `None` when nothing is left to vary on.
pub fn vary_hash<'a>(vary: impl IntoIterator<Item = &'a str>, request: &HeaderMap) -> Option<u128> {
    let mut names: Vec<String> = vary
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && !KEYED_OR_IGNORED.contains(&n.as_str()))
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    names.dedup();
    let mut bytes = Vec::new();
    for name in &names {
        bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
        bytes.extend_from_slice(name.as_bytes());
        let values: Vec<&[u8]> = request
            .get_all(name.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        bytes.push(u8::from(!values.is_empty()));
        for v in values {
            bytes.extend_from_slice(&(v.len() as u32).to_le_bytes());
            bytes.extend_from_slice(v);
        }
    }
    Some(xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// Query keys that never reach the key: `_rsc` (a cache-buster Next adds to RSC requests; the
/// variant comes from headers), `dpl` (Next's deployment token on asset URLs: it picks the
/// build, which the key's namespace already names, and does not change the body: NEXTJS.md
/// §5), and the internal keys sanitize already strips from the forwarded request
/// (`__nextDataReq`, `nxtP*`, `nxtI*`), compared percent-decoded.
fn ignored_query_key(raw_key: &str) -> bool {
    let key = normalize_component(raw_key);
    key == "_rsc"
        || key == "dpl"
        || key == "__nextDataReq"
        || key.starts_with("nxtP")
        || key.starts_with("nxtI")
}

/// The query with ignored keys removed, every pair percent-normalized, ordered by key name:
/// two requests that differ only in the order of their keys or in percent-encoding case share
/// a key. Pairs with the same name keep the order they came in: `?a=1&a=2` and `?a=2&a=1` are
/// different pages (the replica gets the query as sent, and `searchParams.get('a')` answers
/// the first value), so sorting them together would let one request's render answer the
/// other (a cache-poisoning vector).
pub fn normalize_query(query: &str) -> String {
    let mut pairs: Vec<Cow<'_, str>> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| !ignored_query_key(p.split('=').next().unwrap_or("")))
        .map(normalize_component)
        .collect();
    // Stable: equal names stay in request order.
    pairs.sort_by(|a, b| query_name(a).cmp(query_name(b)));
    pairs.join("&")
}

/// The name of a query pair (all of it when it has no `=`).
fn query_name(pair: &str) -> &str {
    pair.split_once('=').map_or(pair, |(name, _)| name)
}

/// The one form of a URL path that keys, entry tags, webhook paths and CLI purges all use, so
/// a purge reaches a page whatever spelling filled it: bytes a URL cannot carry as they are
/// (non-ASCII, spaces, controls) percent-encoded as a browser or Next.js's URL parser would,
/// then [`normalize_component`]. `/caf%c3%a9`, `/caf%C3%A9` and `/café` are one path; so are
/// `/%78` and `/x`.
pub fn canonical_path(path: &str) -> Cow<'_, str> {
    if path.bytes().all(|b| b.is_ascii_graphic()) {
        return normalize_component(path);
    }
    let mut encoded = String::with_capacity(path.len() * 3);
    for b in path.bytes() {
        if b.is_ascii_graphic() {
            encoded.push(char::from(b));
        } else {
            let _ = write!(encoded, "%{b:02X}");
        }
    }
    Cow::Owned(normalize_component(&encoded).into_owned())
}

/// RFC 3986 §6.2.2 normalization of one path or query component: percent-encoded unreserved
/// characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other escapes get upper-case hex, anything
/// else is kept byte for byte. Allocates only when something changes.
pub fn normalize_component(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len() + 4);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            match (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    let b = h * 16 + l;
                    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                        out.push(char::from(b));
                    } else {
                        out.push('%');
                        out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                        out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                    }
                    i += 3;
                }
                // A stray `%` is encoded itself, so decoding what follows can never form a new
                // escape with it (`%%41` must not become the key of `%A`).
                _ => {
                    out.push_str("%25");
                    i += 1;
                }
            }
            continue;
        }
        // Any other character is copied whole (s is valid UTF-8).
        let len = utf8_len(bytes[i]).min(bytes.len() - i);
        out.push_str(&s[i..i + len]);
        i += len;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn key(path: &str, query: Option<&str>, v: &Variant) -> CacheKey {
        CacheKey::new("build-1", "Shop.Example", path, query, v)
    }

    #[test]
    fn variants_follow_the_headers_next_reads() {
        let v = |h: &[(&str, &str)], path: &str| variant(path, &headers(h), false);
        assert_eq!(v(&[], "/p"), Variant::Html);
        assert_eq!(v(&[("rsc", "1")], "/p"), Variant::Rsc);
        assert_eq!(
            v(&[("rsc", "1"), ("next-router-prefetch", "1")], "/p"),
            Variant::RscPrefetch(1)
        );
        assert_eq!(
            v(
                &[
                    ("rsc", "1"),
                    ("next-router-prefetch", "1"),
                    ("next-router-segment-prefetch", "/_tree")
                ],
                "/p"
            ),
            Variant::RscSegment("/_tree".into())
        );
        assert_eq!(
            v(&[("next-router-prefetch", "1")], "/p"),
            Variant::Html,
            "prefetch without RSC is HTML"
        );
        assert_eq!(v(&[], "/_next/data/b1/p.json"), Variant::DataJson);
        assert_eq!(
            v(&[("rsc", "1")], "/_next/static/chunks/app.js"),
            Variant::Asset,
            "a build asset is one representation whatever the request says"
        );
        assert_eq!(
            v(&[("accept", "image/avif,image/webp,*/*")], "/_next/image"),
            Variant::Image(ImageFormat::Webp)
        );
        assert_eq!(
            variant("/_next/image", &headers(&[("accept", "image/avif")]), true),
            Variant::Image(ImageFormat::Avif)
        );
        assert_eq!(
            v(&[("accept", "*/*")], "/_next/image"),
            Variant::Image(ImageFormat::Original)
        );
    }

    #[test]
    fn html_and_rsc_of_one_path_never_share_a_key() {
        let html = key("/p", None, &Variant::Html);
        let rsc = key("/p", None, &Variant::Rsc);
        let pre = key("/p", None, &Variant::RscPrefetch(1));
        let seg = key("/p", None, &Variant::RscSegment("/a".into()));
        let hashes = [html.hash, rsc.hash, pre.hash, seg.hash];
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn rsc_cache_buster_and_internal_keys_do_not_split_entries() {
        let base = key("/p", Some("a=1"), &Variant::Rsc);
        for q in [
            "a=1&_rsc=abc",
            "_rsc=zzz&a=1",
            "a=1&nxtPslug=x",
            "a=1&__nextDataReq=1",
            "%5Frsc=1&a=1",
        ] {
            assert_eq!(key("/p", Some(q), &Variant::Rsc).hash, base.hash, "{q}");
        }
        assert_ne!(key("/p", Some("a=2"), &Variant::Rsc).hash, base.hash);
    }

    #[test]
    fn query_order_and_escape_case_do_not_matter_trailing_slash_does() {
        assert_eq!(
            key("/p", Some("b=2&a=1"), &Variant::Html),
            key("/p", Some("a=1&b=2"), &Variant::Html)
        );
        assert_eq!(
            key("/p", Some("x=%2f"), &Variant::Html),
            key("/p", Some("x=%2F"), &Variant::Html)
        );
        assert_eq!(
            key("/%7Eme", None, &Variant::Html),
            key("/~me", None, &Variant::Html)
        );
        assert_ne!(
            key("/a/", None, &Variant::Html),
            key("/a", None, &Variant::Html)
        );
        assert_eq!(
            key("/p", Some(""), &Variant::Html),
            key("/p", None, &Variant::Html)
        );
    }

    #[test]
    fn host_is_case_insensitive_namespace_splits() {
        let a = CacheKey::new("b1", "SHOP.example", "/p", None, &Variant::Html);
        let b = CacheKey::new("b1", "shop.example", "/p", None, &Variant::Html);
        let c = CacheKey::new("b2", "shop.example", "/p", None, &Variant::Html);
        assert_eq!(a, b);
        assert_ne!(a.hash, c.hash);
    }

    #[test]
    fn hash_is_stable_across_processes() {
        // Pinned: every gateway, every build, must find the same Redis entry.
        let k = CacheKey::new(
            "build-1",
            "shop.example",
            "/products/1",
            Some("b=2&a=1"),
            &Variant::Html,
        );
        assert_eq!(k.text, "build-1 shop.example /products/1?a=1&b=2 html");
        assert_eq!(k.hex().len(), 32);
        assert_eq!(k.hex(), format!("{:032x}", k.hash));
        assert_eq!(
            k.hash,
            CacheKey::new(
                "build-1",
                "shop.example",
                "/products/1",
                Some("a=1&b=2"),
                &Variant::Html
            )
            .hash
        );
        assert_eq!(k.hex(), PINNED_HEX);
    }

    /// The hex of the key in `hash_is_stable_across_processes`, computed once and pinned.
    const PINNED_HEX: &str = "16a1c1eec45c7d29bdcc28b0653fd9b1";

    #[test]
    fn vary_on_next_url_splits_other_vary_names_do_not() {
        let vary = ["RSC, Next-Router-State-Tree, Next-Router-Prefetch, Next-Url, Accept-Encoding"];
        let a = vary_hash(vary, &headers(&[("next-url", "/feed")])).expect("varies");
        let b = vary_hash(vary, &headers(&[("next-url", "/photos")])).expect("varies");
        let absent = vary_hash(vary, &headers(&[])).expect("varies");
        assert_ne!(a, b);
        assert_ne!(a, absent);
        assert_eq!(
            vary_hash(
                vary,
                &headers(&[("next-url", "/feed"), ("next-router-state-tree", "x")])
            ),
            Some(a)
        );
        assert_eq!(
            vary_hash(
                ["RSC, Next-Router-State-Tree, Accept-Encoding"],
                &headers(&[])
            ),
            None
        );
        let base = key("/p", None, &Variant::Rsc);
        assert_ne!(base.with_vary(a).hash, base.with_vary(b).hash);
        let slot = base.with_vary(a);
        assert!(slot.is_slot() && !base.is_slot());
        assert_eq!(slot.primary_key(), base);
        assert_eq!(slot.primary, base.hash);
        assert_eq!(
            slot.primary_key().with_vary(a),
            slot,
            "a slot of a slot is its own"
        );
    }

    #[test]
    fn normalize_component_handles_broken_escapes() {
        assert_eq!(normalize_component("a%"), "a%25");
        assert_eq!(normalize_component("a%2"), "a%252");
        assert_eq!(normalize_component("%zz%41"), "%25zzA");
        assert_eq!(normalize_component("é%c3%a9"), "é%C3%A9");
        assert_ne!(normalize_component("%%414"), normalize_component("%A4"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z]{1,4}=[a-zA-Z0-9%]{0,5}",
            "_rsc=[a-z0-9]{1,5}",
            "[a-zA-Z0-9%=._~-]{0,8}"
        ]
    }

    proptest! {
        #[test]
        fn normalization_is_idempotent(s in "[a-zA-Z0-9%/._~!$&'()*+,;=:@é-]{0,24}") {
            let once = normalize_component(&s).into_owned();
            prop_assert_eq!(normalize_component(&once).into_owned(), once);
        }

        #[test]
        fn query_normalization_is_insensitive_to_the_order_of_names_and_idempotent(
            pairs in proptest::collection::vec(pair(), 0..6),
            seed in any::<u64>()
        ) {
            // One pair per name: reordering distinct names never changes the key.
            let mut seen = std::collections::HashSet::new();
            let mut pairs: Vec<String> = pairs
                .into_iter()
                .filter(|p| seen.insert(normalize_component(query_name(p)).into_owned()))
                .collect();
            let a = normalize_query(&pairs.join("&"));
            // A deterministic shuffle.
            let n = pairs.len().max(1);
            pairs.rotate_left((seed as usize) % n);
            pairs.reverse();
            let b = normalize_query(&pairs.join("&"));
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(normalize_query(&a), a);
        }

        #[test]
        fn repeated_names_in_another_order_never_share_a_key(
            name in "[a-z]{1,3}", x in "[a-z0-9]{1,4}", y in "[a-z0-9]{1,4}", other in "[a-z]{1,3}=[0-9]"
        ) {
            prop_assume!(x != y);
            let a = normalize_query(&format!("{name}={x}&{other}&{name}={y}"));
            let b = normalize_query(&format!("{name}={y}&{name}={x}&{other}"));
            prop_assert_ne!(a, b);
        }

        #[test]
        fn keys_never_panic(host in "\\PC{0,12}", path in "/\\PC{0,16}", query in "\\PC{0,16}") {
            let _ = CacheKey::new("ns", &host, &path, Some(&query), &Variant::Html);
        }
    }
}
