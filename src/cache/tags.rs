//! The invalidation tags of an entry (DESIGN.md "Invalidation"): what a webhook can name to
//! reach it.
//!
//! - `*`: every entry (purge-all).
//! - `path:<pathname>`: every variant of a path (HTML, RSC, prefetch, segments, data JSON): a
//!   webhook's `paths` become these.
//! - Next.js's implicit tags (`getImplicitTags`, NEXTJS.md §1.7 and §4.3), derived from the
//!   concrete pathname: `_N_T_/layout`, `_N_T_<prefix>/layout` for every ancestor and the path
//!   itself, `_N_T_<pathname>/page`, `_N_T_<pathname>` (and `_N_T_/index` for `/`), so
//!   `revalidatePath('/blog', 'layout')` (tag `_N_T_/blog/layout`) reaches everything under
//!   `/blog`. For a dynamic route Next names the route pattern (`/blog/[slug]/layout`), which
//!   a proxy cannot know: name the concrete paths or a tag instead.
//! - Tags from configured response headers (`Cache-Tag`, `Surrogate-Key`,
//!   `x-next-cache-tags`…), comma or whitespace separated.
//!
//! Bounded like Next's own (`NEXT_CACHE_TAG_MAX_ITEMS`, `NEXT_CACHE_TAG_MAX_LENGTH`): tags
//! past the count or over the length are dropped, never an error.

use std::borrow::Cow;

use http::HeaderMap;

use super::key::canonical_path;

/// Most tags kept from response headers.
pub const MAX_HEADER_TAGS: usize = 128;
/// Longest tag kept, bytes.
pub const MAX_TAG_LEN: usize = 256;
/// The tag every entry carries.
pub const ALL: &str = "*";

/// The tag of every variant of `pathname` (a webhook's `paths` entries).
pub fn path_tag(pathname: &str) -> String {
    format!("path:{}", page_path(pathname))
}

/// The page a request path belongs to, in the keys' canonical form ([`canonical_path`]):
/// trailing slash removed (but `/`), and a Pages Router data request
/// (`/_next/data/<build>/<page>.json`) mapped to its page.
pub fn page_path(path: &str) -> Cow<'_, str> {
    let path = data_page(path).unwrap_or(path);
    let path = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    canonical_path(path)
}

/// A tag named by a webhook or the CLI, in the form entries carry: the path inside `path:`
/// and Next.js's implicit `_N_T_` tags made canonical ([`canonical_path`]), any other tag
/// as it is.
pub fn canonical_tag(tag: &str) -> Cow<'_, str> {
    for prefix in ["path:", "_N_T_"] {
        if let Some(path) = tag.strip_prefix(prefix) {
            if let Cow::Owned(p) = canonical_path(path) {
                return Cow::Owned(format!("{prefix}{p}"));
            }
        }
    }
    Cow::Borrowed(tag)
}

fn data_page(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/_next/data/")?;
    let (_, page) = rest.split_once('/')?;
    let page = page.strip_suffix(".json")?;
    // `page` lost its leading slash with the build id; the slash before it is still in `path`.
    let start = path.len() - page.len() - ".json".len() - 1;
    let page = &path[start..path.len() - ".json".len()];
    Some(if page == "/index" { "/" } else { page })
}

/// A configured rule: a path pattern (`/products/{id}`: literal segments and `{name}`
/// captures, matched segment by segment) and the tags it gives (`product-{id}`, `products`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    segments: Vec<Segment>,
    tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

impl Rule {
    /// Compiles `pattern → tags`; the error says what is wrong.
    pub fn new(pattern: &str, tags: &[String]) -> Result<Rule, String> {
        if !pattern.starts_with('/') {
            return Err(format!("{pattern:?}: a pattern starts with /"));
        }
        let mut segments = Vec::new();
        for s in pattern.split('/').filter(|s| !s.is_empty()) {
            segments.push(
                match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) if !name.is_empty() && !name.contains(['{', '}']) => {
                        Segment::Capture(name.to_owned())
                    }
                    _ if s.contains(['{', '}']) => {
                        return Err(format!(
                            "{pattern:?}: a capture is a whole segment, {{name}}"
                        ));
                    }
                    _ => Segment::Literal(s.to_owned()),
                },
            );
        }
        for t in tags {
            let mut rest = t.as_str();
            while let Some(open) = rest.find('{') {
                let close = rest[open..]
                    .find('}')
                    .ok_or(format!("{t:?}: unclosed {{"))?;
                let name = &rest[open + 1..open + close];
                if !segments.contains(&Segment::Capture(name.to_owned())) {
                    return Err(format!("{t:?}: {{{name}}} is not captured by {pattern:?}"));
                }
                rest = &rest[open + close + 1..];
            }
            if !is_valid(t) {
                return Err(format!("{t:?} is not a tag (one word)"));
            }
        }
        Ok(Rule {
            segments,
            tags: tags.to_vec(),
        })
    }

    /// The rule's tags for `page`, when it matches.
    fn apply(&self, page: &str, out: &mut Vec<String>) {
        let parts: Vec<&str> = page.split('/').filter(|s| !s.is_empty()).collect();
        if parts.len() != self.segments.len() {
            return;
        }
        let mut captured: Vec<(&str, &str)> = Vec::new();
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return,
                Segment::Capture(name) => captured.push((name, part)),
            }
        }
        for t in &self.tags {
            let mut tag = t.clone();
            for (name, value) in &captured {
                tag = tag.replace(&format!("{{{name}}}"), value);
            }
            if is_valid(&tag) && !out.contains(&tag) {
                out.push(tag);
            }
        }
    }
}

/// Every tag of an entry for `path` whose response had `headers`; `tag_headers` are the
/// (lower-case) names of the response headers that carry tags, `rules` the configured rules.
pub fn entry_tags(
    path: &str,
    headers: &HeaderMap,
    tag_headers: &[String],
    rules: &[Rule],
) -> Vec<String> {
    let page = page_path(path);
    let mut tags = vec![ALL.to_owned(), format!("path:{page}")];
    implicit(&page, &mut tags);
    for rule in rules {
        rule.apply(&page, &mut tags);
    }
    let mut from_headers = 0;
    for name in tag_headers {
        for value in headers.get_all(name.as_str()) {
            let Ok(text) = value.to_str() else { continue };
            for tag in text.split([',', ' ', '\t']).filter(|t| !t.is_empty()) {
                if from_headers == MAX_HEADER_TAGS {
                    break;
                }
                if tag.len() <= MAX_TAG_LEN && !tags.iter().any(|t| t == tag) {
                    tags.push(tag.to_owned());
                    from_headers += 1;
                }
            }
        }
    }
    tags
}

/// Next.js's implicit tags for a concrete pathname.
fn implicit(page: &str, tags: &mut Vec<String>) {
    tags.push("_N_T_/layout".to_owned());
    if page == "/" {
        tags.push("_N_T_/index".to_owned());
        tags.push("_N_T_/page".to_owned());
        tags.push("_N_T_/".to_owned());
        return;
    }
    let mut prefix = String::with_capacity(page.len());
    for segment in page.split('/').filter(|s| !s.is_empty()) {
        prefix.push('/');
        prefix.push_str(segment);
        tags.push(format!("_N_T_{prefix}/layout"));
    }
    tags.push(format!("_N_T_{page}/page"));
    tags.push(format!("_N_T_{page}"));
}

/// Whether `tag` can be named by a webhook: non-empty, at most [`MAX_TAG_LEN`] bytes, no
/// whitespace or control characters (tags travel space-separated on the bus).
pub fn is_valid(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && !tag.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Paths recently stored per tag, so a purge by tag can re-warm what it reached. Bounded
/// (tags held, paths per tag, idle expiry) and per gateway; correctness never depends on it,
/// only how many pages are warm after a purge.
#[derive(Clone)]
pub struct RecentPaths {
    by_tag: moka::sync::Cache<String, std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

impl std::fmt::Debug for RecentPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecentPaths")
            .field("tags", &self.by_tag.entry_count())
            .finish()
    }
}

/// Tags indexed at most.
pub const RECENT_TAGS: u64 = 10_000;
/// Paths kept per tag (the most recent).
pub const RECENT_PATHS_PER_TAG: usize = 64;

impl Default for RecentPaths {
    fn default() -> Self {
        RecentPaths {
            by_tag: moka::sync::Cache::builder()
                .max_capacity(RECENT_TAGS)
                .time_to_idle(std::time::Duration::from_secs(3_600))
                .build(),
        }
    }
}

impl RecentPaths {
    /// Records that an entry of `page` with `tags` was stored. Tags every page has (`*`,
    /// `_N_T_/layout`) and the page's own tags are not indexed.
    pub fn record(&self, tags: &[String]) {
        let Some(page) = tags.iter().find_map(|t| t.strip_prefix("path:")) else {
            return;
        };
        for tag in tags {
            if tag == ALL
                || tag == "_N_T_/layout"
                || tag.starts_with("path:")
                || tag.starts_with("vary:")
            {
                continue;
            }
            let paths = self.by_tag.get_with(tag.clone(), Default::default);
            let mut paths = crate::sync::lock(&paths);
            if let Some(i) = paths.iter().position(|p| p == page) {
                paths.remove(i);
            } else if paths.len() == RECENT_PATHS_PER_TAG {
                paths.remove(0);
            }
            paths.push(page.to_owned());
        }
    }

    /// The paths recently stored under `tag`, most recent last.
    pub fn paths(&self, tag: &str) -> Vec<String> {
        self.by_tag
            .get(tag)
            .map(|p| crate::sync::lock(&p).clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_path_gives_the_tags_its_purge_names() {
        for spelling in ["/page/%78-ev1", "/page/x-ev1", "/page/%78-ev1/"] {
            assert_eq!(path_tag(spelling), "path:/page/x-ev1", "{spelling}");
        }
        for spelling in ["/caf%c3%a9", "/caf%C3%A9", "/café"] {
            let tags = entry_tags(spelling, &HeaderMap::new(), &[], &[]);
            assert!(
                tags.contains(&"path:/caf%C3%A9".to_owned()),
                "{spelling}: {tags:?}"
            );
            assert!(
                tags.contains(&"_N_T_/caf%C3%A9/page".to_owned()),
                "{spelling}: {tags:?}"
            );
            assert_eq!(path_tag(spelling), "path:/caf%C3%A9");
        }
        assert_eq!(
            canonical_tag("_N_T_/caf%c3%a9/page"),
            "_N_T_/caf%C3%A9/page"
        );
        assert_eq!(canonical_tag("_N_T_/café/layout"), "_N_T_/caf%C3%A9/layout");
        assert_eq!(canonical_tag("path:/%78"), "path:/x");
        assert_eq!(
            canonical_tag("product-%78"),
            "product-%78",
            "other tags are names"
        );
    }

    #[test]
    fn implicit_tags_follow_next_for_a_nested_page() {
        let tags = entry_tags("/blog/post/", &HeaderMap::new(), &[], &[]);
        assert_eq!(
            tags,
            [
                "*",
                "path:/blog/post",
                "_N_T_/layout",
                "_N_T_/blog/layout",
                "_N_T_/blog/post/layout",
                "_N_T_/blog/post/page",
                "_N_T_/blog/post",
            ]
        );
        let root = entry_tags("/", &HeaderMap::new(), &[], &[]);
        assert!(root.contains(&"_N_T_/index".to_owned()));
        assert!(root.contains(&"path:/".to_owned()));
    }

    #[test]
    fn data_requests_belong_to_their_page() {
        assert_eq!(page_path("/_next/data/build1/blog/post.json"), "/blog/post");
        assert_eq!(page_path("/_next/data/build1/index.json"), "/");
        assert_eq!(page_path("/_next/data/x"), "/_next/data/x");
        assert_eq!(path_tag("/a/"), "path:/a");
    }

    #[test]
    fn header_tags_are_split_bounded_and_deduplicated() {
        let mut h = HeaderMap::new();
        h.insert(
            "cache-tag",
            "product-1, products".parse().expect("test value"),
        );
        h.append(
            "surrogate-key",
            "products  home".parse().expect("test value"),
        );
        let long = "x".repeat(MAX_TAG_LEN + 1);
        h.append("cache-tag", long.parse().expect("test value"));
        let names = vec!["cache-tag".to_owned(), "surrogate-key".to_owned()];
        let tags = entry_tags("/p", &h, &names, &[]);
        let extra: Vec<_> = tags.iter().skip(6).cloned().collect();
        assert_eq!(extra, ["product-1", "products", "home"]);
        let mut many = HeaderMap::new();
        let value: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
        many.insert("cache-tag", value.join(",").parse().expect("test value"));
        assert_eq!(
            entry_tags("/p", &many, &names, &[]).len(),
            6 + MAX_HEADER_TAGS
        );
    }

    #[test]
    fn recent_paths_are_indexed_by_specific_tags_only() {
        let recent = RecentPaths::default();
        let mut h = HeaderMap::new();
        h.insert("cache-tag", "products".parse().expect("test value"));
        let names = vec!["cache-tag".to_owned()];
        for p in ["/p/1", "/p/2", "/p/1"] {
            recent.record(&entry_tags(p, &h, &names, &[]));
        }
        assert_eq!(recent.paths("products"), ["/p/2", "/p/1"]);
        assert_eq!(recent.paths("_N_T_/p/layout"), ["/p/2", "/p/1"]);
        assert!(recent.paths("*").is_empty());
        assert!(recent.paths("_N_T_/layout").is_empty());
        for i in 0..100 {
            recent.record(&entry_tags(&format!("/q/{i}"), &h, &names, &[]));
        }
        assert_eq!(recent.paths("products").len(), RECENT_PATHS_PER_TAG);
        assert_eq!(
            recent.paths("products").last().map(String::as_str),
            Some("/q/99")
        );
    }

    #[test]
    fn rules_capture_segments_into_tags() {
        let rule = Rule::new(
            "/products/{id}",
            &["product-{id}".to_owned(), "products".to_owned()],
        )
        .expect("valid rule");
        let tags = entry_tags(
            "/products/42",
            &HeaderMap::new(),
            &[],
            std::slice::from_ref(&rule),
        );
        assert!(
            tags.ends_with(&["product-42".to_owned(), "products".to_owned()]),
            "{tags:?}"
        );
        let other = entry_tags("/products/42/reviews", &HeaderMap::new(), &[], &[rule]);
        assert!(!other.contains(&"products".to_owned()));
        for (pattern, tag) in [
            ("products/{id}", "p"),
            ("/products/x{id}", "p"),
            ("/products/{id}", "p-{sku}"),
            ("/products/{id}", "a b"),
        ] {
            assert!(
                Rule::new(pattern, &[tag.to_owned()]).is_err(),
                "{pattern} {tag}"
            );
        }
    }

    #[test]
    fn webhook_tags_must_be_single_words() {
        assert!(is_valid("product-1"));
        assert!(is_valid("_N_T_/blog/layout"));
        for bad in ["", "a b", "a\nb", &"x".repeat(MAX_TAG_LEN + 1)] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
