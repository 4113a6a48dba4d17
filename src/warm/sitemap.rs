//! The pages to warm, read from a source: a file or an `http://` URL holding a sitemap
//! (`<urlset>`, each `<url>`'s `<loc>`), a sitemap index (`<sitemapindex>`: each child
//! `<sitemap>`'s `<loc>` is read in turn, indexes nested at most [`MAX_DEPTH`] deep), or a
//! plain list (one path or URL a line; blank lines and `#` comments skipped). Gzip-compressed
//! sources (`sitemap.xml.gz`) are read too.
//!
//! Receives the source as the operator typed it; hands on [`Page`]s (host when the entry was
//! a URL, and path plus query), each once, in the source's order. Everything read is untrusted
//! and bounded by the sitemap protocol's own limits ([`MAX_SOURCE_BYTES`],
//! [`MAX_URLS_PER_SITEMAP`]); no DTD is accepted (no entity expansion). Every error names the
//! source, and the line when there is one.
//!
//! `https://` sources are refused: isrgate has no HTTPS client (it speaks plain HTTP to its
//! replicas and to the gateway it warms). Download such a sitemap first and pass the file; the
//! `https://` URLs inside a sitemap are fine (only their host and path are used).

use std::collections::HashSet;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::uri::PathAndQuery;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::AsyncReadExt as _;

use super::{Target, Variant};

/// Largest source read, compressed or not: the sitemap protocol's 50 MiB.
pub const MAX_SOURCE_BYTES: usize = 50 * 1024 * 1024;
/// Most `<url>` (or `<sitemap>`) entries in one sitemap, as the protocol allows.
pub const MAX_URLS_PER_SITEMAP: usize = 50_000;
/// Most sitemap indexes on the way from the source to a sitemap.
pub const MAX_DEPTH: usize = 3;
/// Most sources read for one warm (the source and every sitemap it leads to).
pub const MAX_SOURCES: usize = 1_000;
/// Most pages one warm reads.
pub const MAX_PAGES: usize = 1_000_000;

/// A page to warm.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Page {
    /// The host of the entry's URL (with its port, if any); `None` for a bare path.
    pub host: Option<String>,
    /// Path plus `?query`.
    pub path: String,
}

impl Page {
    /// A page by its path alone.
    pub fn path(path: &str) -> Page {
        Page {
            host: None,
            path: path.to_owned(),
        }
    }

    /// This page's `variant` as a target.
    pub fn target(&self, variant: Variant) -> Target {
        self.clone().into_target(variant)
    }

    /// This page's `variant` as a target, without a copy.
    pub fn into_target(self, variant: Variant) -> Target {
        Target {
            host: self.host,
            path: self.path,
            variant,
        }
    }
}

/// Why a source gives no pages. `name` is the source as given (or the `<loc>` it was found at).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file cannot be read.
    #[error("{name}: cannot read it: {error}")]
    Read {
        /// The source.
        name: String,
        /// Why.
        error: std::io::Error,
    },
    /// The URL cannot be fetched.
    #[error("{name}: cannot fetch it: {reason}")]
    Fetch {
        /// The source.
        name: String,
        /// Why.
        reason: String,
    },
    /// Larger than [`MAX_SOURCE_BYTES`] (after decompression, too).
    #[error("{name}: larger than {MAX_SOURCE_BYTES} bytes (the sitemap protocol's limit)")]
    TooLarge {
        /// The source.
        name: String,
    },
    /// Not UTF-8.
    #[error("{name}:{line}: not UTF-8 text")]
    NotUtf8 {
        /// The source.
        name: String,
        /// The line of the first bad byte.
        line: usize,
    },
    /// Not well-formed XML (or a DTD).
    #[error("{name}:{line}:{col}: not well-formed XML: {message}")]
    Xml {
        /// The source.
        name: String,
        /// Line, from 1.
        line: u32,
        /// Column, from 1.
        col: u32,
        /// The parser's words.
        message: String,
    },
    /// XML, but neither a sitemap nor a sitemap index.
    #[error(
        "{name}: the root element is <{root}>, expected <urlset> (a sitemap) or \
         <sitemapindex> (a sitemap index)"
    )]
    NotASitemap {
        /// The source.
        name: String,
        /// The root element's name.
        root: String,
    },
    /// A bad entry: a `<loc>` or a list line that is no path or URL, a `<url>` without
    /// `<loc>`, one entry too many.
    #[error("{name}:{line}: {reason}")]
    Entry {
        /// The source.
        name: String,
        /// The entry's line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Not a source that can be read (an `https://` URL, a bad URL), or one of this module's
    /// bounds reached.
    #[error("{name}: {reason}")]
    Unusable {
        /// The source.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Fetches `http://` sources (with a per-request timeout).
pub struct Fetcher {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Fetcher {
    /// A fetcher whose requests each take at most `timeout`.
    pub fn new(timeout: Duration) -> Fetcher {
        Fetcher {
            client: super::client(timeout),
            timeout,
        }
    }

    async fn get(&self, uri: &Uri, name: &str) -> Result<Bytes, SourceError> {
        let fail = |reason: String| SourceError::Fetch {
            name: name.to_owned(),
            reason,
        };
        let req = http::Request::get(uri.clone())
            .body(Empty::new())
            .map_err(|e| fail(e.to_string()))?;
        let answer = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| fail(super::describe(&e)))?;
            if !resp.status().is_success() {
                return Err(fail(format!("HTTP {}", resp.status().as_u16())));
            }
            match Limited::new(resp.into_body(), MAX_SOURCE_BYTES)
                .collect()
                .await
            {
                Ok(body) => Ok(body.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err(SourceError::TooLarge {
                        name: name.to_owned(),
                    })
                }
                Err(e) => Err(fail(e.to_string())),
            }
        };
        tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| fail(format!("timed out after {:?}", self.timeout)))?
    }
}

/// Where a source is.
#[derive(Debug, Clone)]
enum Location {
    File(PathBuf),
    Url(Uri),
}

/// Reads `source` and every sitemap it leads to, and returns its pages, each once.
pub async fn load(source: &str, fetcher: &Fetcher) -> Result<Vec<Page>, SourceError> {
    let mut pages = Vec::new();
    let mut seen = HashSet::new();
    // Depth-first, children pushed in reverse: pages come out in the sources' order.
    let first = locate(source, None).map_err(|reason| unusable(source, reason))?;
    let mut todo = vec![(first, source.to_owned(), 0)];
    let mut read = 0;
    while let Some((at, name, depth)) = todo.pop() {
        read += 1;
        if read > MAX_SOURCES {
            return Err(unusable(&name, format!("more than {MAX_SOURCES} sitemaps")));
        }
        let bytes = match &at {
            Location::File(path) => read_file(path, &name).await?,
            Location::Url(uri) => fetcher.get(uri, &name).await?,
        };
        match parse(&bytes, &name)? {
            Parsed::Pages(found) => {
                for page in found {
                    if !seen.contains(&page) {
                        seen.insert(page.clone());
                        pages.push(page);
                    }
                }
                if pages.len() > MAX_PAGES {
                    return Err(unusable(&name, format!("more than {MAX_PAGES} pages")));
                }
            }
            Parsed::Index(children) => {
                if depth >= MAX_DEPTH {
                    let reason = format!("sitemap indexes nested more than {MAX_DEPTH} deep");
                    return Err(unusable(&name, reason));
                }
                for (loc, line) in children.into_iter().rev() {
                    let child = locate(&loc, Some(&at)).map_err(|reason| SourceError::Entry {
                        name: name.clone(),
                        line,
                        reason: format!("{loc}: {reason}"),
                    })?;
                    todo.push((child, loc, depth + 1));
                }
            }
        }
    }
    Ok(pages)
}

fn unusable(name: &str, reason: String) -> SourceError {
    SourceError::Unusable {
        name: name.to_owned(),
        reason,
    }
}

/// Why an `https://` source is refused.
const NO_HTTPS: &str = "https is not supported (isrgate has no HTTPS client): download it \
                        first (curl -o sitemap.xml URL) and pass the file";

/// Where `text` points: an `http://` URL, or a file (relative to `parent`'s folder, or to
/// `parent`'s origin for a `/path` in a fetched index). `Err` says why it cannot be read.
fn locate(text: &str, parent: Option<&Location>) -> Result<Location, String> {
    let scheme = |s: &str| {
        text.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    };
    if scheme("https://") {
        return Err(NO_HTTPS.to_owned());
    }
    let url = |u: &str| {
        u.parse::<Uri>()
            .map(Location::Url)
            .map_err(|e| format!("bad URL {u:?}: {e}"))
    };
    if scheme("http://") {
        return url(text);
    }
    match parent {
        Some(Location::Url(base)) => {
            let origin = base.authority().map_or("", |a| a.as_str());
            let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
            match text.strip_prefix('/') {
                Some(rest) => url(&format!("http://{origin}/{rest}")),
                None => url(&format!("http://{origin}{dir}/{text}")),
            }
        }
        Some(Location::File(base)) => {
            let dir = base.parent().unwrap_or(Path::new(""));
            Ok(Location::File(dir.join(text)))
        }
        None => Ok(Location::File(PathBuf::from(text))),
    }
}

async fn read_file(path: &Path, name: &str) -> Result<Bytes, SourceError> {
    let read_error = |error| SourceError::Read {
        name: name.to_owned(),
        error,
    };
    let file = tokio::fs::File::open(path).await.map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_SOURCE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(read_error)?;
    if bytes.len() > MAX_SOURCE_BYTES {
        return Err(SourceError::TooLarge {
            name: name.to_owned(),
        });
    }
    Ok(Bytes::from(bytes))
}

/// What one source holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Pages (a sitemap or a list).
    Pages(Vec<Page>),
    /// The `<loc>` of each child sitemap, with its line (a sitemap index).
    Index(Vec<(String, usize)>),
}

/// Parses one source's bytes (gzip, then XML or a plain list). `name` is for errors.
pub fn parse(bytes: &[u8], name: &str) -> Result<Parsed, SourceError> {
    let inflated;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        inflated = gunzip(bytes, name)?;
        &inflated[..]
    } else {
        bytes
    };
    let text = std::str::from_utf8(bytes).map_err(|e| SourceError::NotUtf8 {
        name: name.to_owned(),
        line: line_of(bytes, e.valid_up_to()),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with('<') {
        parse_xml(text, name)
    } else {
        parse_list(text, name).map(Parsed::Pages)
    }
}

fn gunzip(bytes: &[u8], name: &str) -> Result<Vec<u8>, SourceError> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .take(MAX_SOURCE_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| SourceError::Fetch {
            name: name.to_owned(),
            reason: format!("bad gzip data: {e}"),
        })?;
    if out.len() > MAX_SOURCE_BYTES {
        return Err(SourceError::TooLarge {
            name: name.to_owned(),
        });
    }
    Ok(out)
}

fn line_of(bytes: &[u8], offset: usize) -> usize {
    bytes[..offset].iter().filter(|b| **b == b'\n').count() + 1
}

/// A sitemap or a sitemap index (sitemaps.org protocol 0.9; the namespace is not checked).
fn parse_xml(text: &str, name: &str) -> Result<Parsed, SourceError> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        // Sitemap entries are a few nodes each: room for the protocol's 50,000 and then some.
        nodes_limit: 4_000_000,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| {
        let pos = e.pos();
        let message = e.to_string();
        let message = message
            .strip_suffix(&format!(" at {pos}"))
            .unwrap_or(&message)
            .to_owned();
        SourceError::Xml {
            name: name.to_owned(),
            line: pos.row,
            col: pos.col,
            message,
        }
    })?;
    let root = doc.root_element();
    let entry = match root.tag_name().name() {
        "urlset" => "url",
        "sitemapindex" => "sitemap",
        other => {
            return Err(SourceError::NotASitemap {
                name: name.to_owned(),
                root: other.to_owned(),
            });
        }
    };
    let locs = locs(&doc, root, entry, name)?;
    if entry == "sitemap" {
        return Ok(Parsed::Index(
            locs.into_iter().map(|(l, n)| (l.to_owned(), n)).collect(),
        ));
    }
    let pages = locs.into_iter().map(|(loc, line)| page(loc, name, line));
    pages.collect::<Result<_, _>>().map(Parsed::Pages)
}

/// The trimmed `<loc>` of every `entry` child of `root`, with its line.
fn locs<'a>(
    doc: &roxmltree::Document<'a>,
    root: roxmltree::Node<'a, 'a>,
    entry: &str,
    name: &str,
) -> Result<Vec<(&'a str, usize)>, SourceError> {
    let mut out = Vec::new();
    let mut lines = Lines::new(doc.input_text());
    for node in root.children().filter(|n| n.tag_name().name() == entry) {
        let line = lines.at(node.range().start);
        let bad = |reason: String| SourceError::Entry {
            name: name.to_owned(),
            line,
            reason,
        };
        if out.len() == MAX_URLS_PER_SITEMAP {
            return Err(bad(format!(
                "more than {MAX_URLS_PER_SITEMAP} <{entry}> entries (the sitemap protocol's \
                 limit): split it with a sitemap index"
            )));
        }
        let loc = node
            .children()
            .find(|c| c.tag_name().name() == "loc")
            .and_then(|c| c.text())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .ok_or_else(|| bad(format!("<{entry}> without a <loc>")))?;
        out.push((loc, line));
    }
    Ok(out)
}

/// Line numbers of increasing offsets into a text, counted as it goes (roxmltree's own
/// `text_pos_at` counts from the start each time: quadratic over 50,000 entries).
struct Lines<'a> {
    text: &'a str,
    offset: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Lines<'a> {
        Lines {
            text,
            offset: 0,
            line: 1,
        }
    }

    /// The line of `offset`, which is not before the last one asked.
    fn at(&mut self, offset: usize) -> usize {
        let skipped = self
            .text
            .as_bytes()
            .get(self.offset..offset)
            .unwrap_or_default();
        self.line += skipped.iter().filter(|b| **b == b'\n').count();
        self.offset = offset.max(self.offset);
        self.line
    }
}

/// A plain list: one path (`/a?b=1`) or URL a line; blank lines and `#` comments skipped.
fn parse_list(text: &str, name: &str) -> Result<Vec<Page>, SourceError> {
    let mut pages = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let entry = line.trim();
        if entry.is_empty() || entry.starts_with('#') {
            continue;
        }
        if pages.len() == MAX_PAGES {
            return Err(unusable(name, format!("more than {MAX_PAGES} pages")));
        }
        pages.push(page(entry, name, i + 1)?);
    }
    Ok(pages)
}

/// One entry (`<loc>` or list line) as a page: a `/path?query`, or an `http(s)://` URL whose
/// host is kept (the `Host` the page is asked for with).
fn page(entry: &str, name: &str, line: usize) -> Result<Page, SourceError> {
    let bad = |reason: String| SourceError::Entry {
        name: name.to_owned(),
        line,
        reason,
    };
    if entry.starts_with('/') {
        let path = entry
            .parse::<PathAndQuery>()
            .map_err(|e| bad(format!("{entry:?} is not a valid path: {e}")))?;
        return Ok(Page::path(path.as_str()));
    }
    let uri = entry
        .parse::<Uri>()
        .ok()
        .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some());
    let Some(uri) = uri else {
        return Err(bad(format!(
            "{entry:?} is neither a path (starting with /) nor an http:// or https:// URL"
        )));
    };
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    Ok(Page {
        host: Some(host.to_owned()),
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(text: &str) -> Vec<Page> {
        match parse(text.as_bytes(), "s.xml") {
            Ok(Parsed::Pages(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    fn error(text: &[u8]) -> String {
        parse(text, "s.xml").expect_err("an error").to_string()
    }

    const URLSET: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
  <url><loc>https://shop.example/</loc><lastmod>2026-01-01</lastmod></url>
  <url>
    <loc>
      http://shop.example:8080/p/1?a=1&amp;b=2
    </loc>
  </url>
</urlset>"#;

    #[test]
    fn urlset_gives_host_and_path_of_each_loc() {
        let got = pages(URLSET);
        let host = |h: &str| Some(h.to_owned());
        assert_eq!(
            got[0],
            Page {
                host: host("shop.example"),
                path: "/".into()
            }
        );
        assert_eq!(
            got[1],
            Page {
                host: host("shop.example:8080"),
                path: "/p/1?a=1&b=2".into()
            }
        );
    }

    #[test]
    fn index_gives_child_locs_with_their_lines() {
        let text = "<sitemapindex>\n<sitemap><loc>http://a/s1.xml</loc></sitemap>\n\
                    <sitemap>\n<loc>s2.xml</loc></sitemap></sitemapindex>";
        let got = parse(text.as_bytes(), "i.xml").expect("test input");
        let want = vec![("http://a/s1.xml".to_owned(), 2), ("s2.xml".to_owned(), 3)];
        assert_eq!(got, Parsed::Index(want));
    }

    #[test]
    fn plain_list_skips_blanks_and_comments() {
        let got = pages("\u{feff}# pages\n/a\n\n  /b?x=1  \nhttp://h.example/c\n");
        let paths: Vec<(Option<&str>, &str)> = got
            .iter()
            .map(|p| (p.host.as_deref(), p.path.as_str()))
            .collect();
        assert_eq!(
            paths,
            [(None, "/a"), (None, "/b?x=1"), (Some("h.example"), "/c")]
        );
    }

    #[test]
    fn gzip_sources_are_read() {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(URLSET.as_bytes()).expect("test input");
        let bytes = gz.finish().expect("test input");
        assert!(matches!(parse(&bytes, "s.xml.gz"), Ok(Parsed::Pages(p)) if p.len() == 2));
    }

    #[test]
    fn bad_xml_is_reported_at_its_line_and_column() {
        let e = error(b"<urlset>\n  <url><loc>/a</loc></url>\n  <url><loc>/b</url>\n</urlset>");
        assert!(e.starts_with("s.xml:3:"), "{e}");
        assert!(e.contains("not well-formed XML"), "{e}");
        assert!(!e.ends_with(" at 3:17"), "position said twice: {e}");
    }

    #[test]
    fn dtd_is_refused() {
        let e =
            error(b"<?xml version=\"1.0\"?>\n<!DOCTYPE urlset [<!ENTITY a \"aaaa\">]>\n<urlset/>");
        assert!(e.starts_with("s.xml:") && e.contains("DTD"), "{e}");
    }

    #[test]
    fn other_xml_and_bad_entries_are_named() {
        let e = error(b"<rss><channel/></rss>");
        assert!(e.contains("root element is <rss>"), "{e}");
        let e = error(b"<urlset>\n<url><lastmod>x</lastmod></url></urlset>");
        assert_eq!(e, "s.xml:2: <url> without a <loc>");
        let e = error(b"/a\nftp://x/y\n");
        assert!(
            e.starts_with("s.xml:2: \"ftp://x/y\" is neither a path"),
            "{e}"
        );
        let e = error(b"/a\n/b c\n");
        assert!(
            e.starts_with("s.xml:2: \"/b c\" is not a valid path"),
            "{e}"
        );
        let e = error(b"/a\n\xff\n");
        assert_eq!(e, "s.xml:2: not UTF-8 text");
    }

    #[test]
    fn a_sitemap_holds_at_most_the_protocols_count() {
        let mut text = String::from("<urlset>\n");
        for i in 0..=MAX_URLS_PER_SITEMAP {
            text.push_str(&format!("<url><loc>/p/{i}</loc></url>\n"));
        }
        text.push_str("</urlset>");
        let e = error(text.as_bytes());
        let line = MAX_URLS_PER_SITEMAP + 2;
        assert!(
            e.starts_with(&format!("s.xml:{line}: more than 50000 <url>")),
            "{e}"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)
        ) {
            let _ = parse(&bytes, "p");
        }

        #[test]
        fn sitemap_shaped_text_parses_or_fails_without_panicking(
            text in "(<\\?xml version=\"1.0\"\\?>)?\n?<(urlset|sitemapindex)>\
                     (\n?<(url|sitemap)>(<loc>[ -~\n]{0,24}</loc>)?</(url|sitemap)>){0,4}\
                     (</(urlset|sitemapindex)>)?"
        ) {
            let _ = parse(text.as_bytes(), "p");
        }

        #[test]
        fn list_entries_parse_or_fail_without_panicking(text in "([ -~]{0,30}\n){0,6}") {
            let _ = parse(text.as_bytes(), "p");
        }
    }

    #[test]
    fn locations_resolve_against_their_index() {
        let file = Location::File(PathBuf::from("/srv/maps/index.xml"));
        let url = Location::Url("http://h:1/maps/index.xml".parse().expect("test input"));
        let show = |l: Result<Location, String>| match l {
            Ok(Location::File(p)) => p.display().to_string(),
            Ok(Location::Url(u)) => u.to_string(),
            Err(e) => e,
        };
        assert_eq!(show(locate("a.xml", Some(&file))), "/srv/maps/a.xml");
        assert_eq!(show(locate("a.xml", Some(&url))), "http://h:1/maps/a.xml");
        assert_eq!(show(locate("/a.xml", Some(&url))), "http://h:1/a.xml");
        assert_eq!(show(locate("HTTP://x/a.xml", None)), "http://x/a.xml");
        assert!(show(locate("https://x/a.xml", None)).starts_with("https is not supported"));
    }
}
