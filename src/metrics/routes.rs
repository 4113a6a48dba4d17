//! Per-route counters, for the dashboard's route table: for each `[[routes]]` pattern, or for a
//! path no route covers its first segment (`/blog/*`; `/_next/static/*` and `/_next/image` on
//! their own), the cache's answers (hits, stale, misses), the renders a replica made for it
//! and the freshness lifetimes those renders were stored with (the table's median TTL).
//!
//! Cheap on the hit path: the rows live in a fixed array of [`MAX_ROWS`] slots, each set once,
//! and a count of the slots set; a request reads that count and the slots with plain acquire
//! loads (no lock, no reference count), compares the route's name with theirs and makes one
//! relaxed add to a sharded counter. Nothing is allocated (the path is mapped to its page as
//! the cache keys do, which borrows unless the path needs normalizing). Rows are made only by
//! what proves a page exists — a render the cache stored, a hit — under a lock, once per name;
//! a miss or an unstored render of a name without a row counts in the `other` row, as does
//! everything past [`MAX_ROWS`] names, so a client asking for random paths cannot grow the
//! table. `cargo bench --bench access` (`route_count_*`) measures it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::Counter;
use crate::cache::routes::{self, Route};

/// Rows kept at most besides `other` (the `[[routes]]` of a configuration count too).
pub const MAX_ROWS: usize = 64;

/// Upper bounds of the TTL buckets, seconds (then `+Inf`).
pub const TTL_BOUNDS_S: [u64; 14] = [
    1,
    5,
    10,
    30,
    60,
    300,
    900,
    3_600,
    6 * 3_600,
    86_400,
    7 * 86_400,
    30 * 86_400,
    365 * 86_400,
    10 * 365 * 86_400,
];

/// The name of the row of everything else.
pub const OTHER: &str = "other";

/// What happened to a request or a render of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteEvent {
    /// Answered fresh from the cache.
    Hit,
    /// Answered stale from the cache (any reason).
    Stale,
    /// Went to a replica, or waited for another request's render.
    Miss,
    /// A replica rendered it for the cache; stored for this lifetime (`None`: not stored).
    Rendered(Option<Duration>),
}

/// One row's counters.
#[derive(Debug)]
pub struct RouteRow {
    /// The pattern, the segment (`/blog/*`) or [`OTHER`].
    pub name: Box<str>,
    hits: Counter,
    stale: Counter,
    misses: AtomicU64,
    renders: AtomicU64,
    ttl: [AtomicU64; TTL_BOUNDS_S.len() + 1],
}

impl RouteRow {
    fn new(name: &str) -> RouteRow {
        RouteRow {
            name: name.into(),
            hits: Counter::default(),
            stale: Counter::default(),
            misses: AtomicU64::new(0),
            renders: AtomicU64::new(0),
            ttl: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn count(&self, event: RouteEvent) {
        match event {
            RouteEvent::Hit => self.hits.inc(),
            RouteEvent::Stale => self.stale.inc(),
            RouteEvent::Miss => {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
            RouteEvent::Rendered(stored) => {
                self.renders.fetch_add(1, Ordering::Relaxed);
                if let Some(ttl) = stored {
                    let secs = ttl.as_secs();
                    let i = TTL_BOUNDS_S.partition_point(|b| *b < secs);
                    if let Some(bucket) = self.ttl.get(i) {
                        bucket.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Its counts now.
    pub fn read(&self) -> RouteCounts {
        let stored: Vec<u64> = self.ttl.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = stored.iter().sum();
        // The bucket holding the median: its upper bound (an over-estimate by at most one
        // bucket, as every quantile here), `u64::MAX` past the last.
        let median_ttl_s = (total > 0).then(|| {
            let rank = total.div_ceil(2);
            let mut seen = 0;
            stored
                .iter()
                .position(|n| {
                    seen += n;
                    seen >= rank
                })
                .and_then(|i| TTL_BOUNDS_S.get(i).copied())
                .unwrap_or(u64::MAX)
        });
        RouteCounts {
            name: self.name.to_string(),
            hits: self.hits.get(),
            stale: self.stale.get(),
            misses: self.misses.load(Ordering::Relaxed),
            renders: self.renders.load(Ordering::Relaxed),
            stored: total,
            median_ttl_s,
        }
    }
}

/// A row's counts as read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteCounts {
    /// The pattern, the segment (`/blog/*`) or `other`.
    pub name: String,
    /// Fresh answers from the cache.
    pub hits: u64,
    /// Stale answers from the cache.
    pub stale: u64,
    /// Misses.
    pub misses: u64,
    /// Renders a replica made for the cache (stored or not).
    pub renders: u64,
    /// Of those, stored.
    pub stored: u64,
    /// The median freshness lifetime of what was stored, seconds (a bucket's upper bound;
    /// `u64::MAX` past ten years); `None` before the first store.
    pub median_ttl_s: Option<u64>,
}

/// Every row.
#[derive(Debug)]
pub struct RouteStats {
    /// Slots `0..made` are set, in the order they were made.
    rows: Box<[OnceLock<RouteRow>]>,
    made: AtomicUsize,
    other: RouteRow,
    adding: Mutex<()>,
}

impl Default for RouteStats {
    fn default() -> Self {
        RouteStats {
            rows: (0..MAX_ROWS).map(|_| OnceLock::new()).collect(),
            made: AtomicUsize::new(0),
            other: RouteRow::new(OTHER),
            adding: Mutex::new(()),
        }
    }
}

impl RouteStats {
    /// Counts `event` for the route of request path `path` under `routes`.
    pub fn count(&self, routes: &[Route], path: &str, event: RouteEvent) {
        let page = crate::cache::tags::page_path(path);
        let name = name_of(routes, &page);
        if let Some(row) = self.find(name) {
            row.count(event);
            return;
        }
        let proves_a_page = matches!(
            event,
            RouteEvent::Hit | RouteEvent::Stale | RouteEvent::Rendered(Some(_))
        );
        let row = if proves_a_page { self.add(name) } else { None };
        row.unwrap_or(&self.other).count(event);
    }

    /// The rows made so far.
    fn made(&self) -> impl Iterator<Item = &RouteRow> {
        let made = self.made.load(Ordering::Acquire).min(MAX_ROWS);
        self.rows[..made].iter().filter_map(OnceLock::get)
    }

    fn find(&self, name: Named<'_>) -> Option<&RouteRow> {
        self.made().find(|r| name.is(&r.name))
    }

    /// The row named `name`, made now if another request did not make it meanwhile; `None`
    /// when the table is full.
    fn add(&self, name: Named<'_>) -> Option<&RouteRow> {
        let _adding = crate::sync::lock(&self.adding);
        if let Some(row) = self.find(name) {
            return Some(row);
        }
        let made = self.made.load(Ordering::Acquire);
        let slot = self.rows.get(made)?;
        let row = slot.get_or_init(|| RouteRow::new(&name.to_name()));
        self.made.store(made + 1, Ordering::Release);
        Some(row)
    }

    /// Every row's counts, in the order they were made, `other` last.
    pub fn read(&self) -> Vec<RouteCounts> {
        let mut all: Vec<RouteCounts> = self.made().map(RouteRow::read).collect();
        all.push(self.other.read());
        all
    }
}

/// The name of the row request path `path` counts in under `routes` (made or not).
pub fn name(routes: &[Route], path: &str) -> String {
    let page = crate::cache::tags::page_path(path);
    name_of(routes, &page).to_name()
}

/// A route's name, borrowed from the configuration or the path.
#[derive(Debug, Clone, Copy)]
enum Named<'a> {
    /// A `[[routes]]` pattern, `/`, or `/_next/static/*` and such: as it is.
    Whole(&'a str),
    /// A first segment, named with `/*` after it (`/blog` is `/blog/*`).
    Segment(&'a str),
}

impl Named<'_> {
    /// Whether a row's `name` is this one (compared without building the name).
    fn is(self, name: &str) -> bool {
        match self {
            Named::Whole(whole) => name == whole,
            Named::Segment(segment) => name.strip_prefix(segment).is_some_and(|rest| rest == "/*"),
        }
    }

    fn to_name(self) -> String {
        match self {
            Named::Whole(whole) => whole.to_owned(),
            Named::Segment(segment) => format!("{segment}/*"),
        }
    }
}

/// The name of the route of the page `page` (a request path as the cache keys map it).
fn name_of<'a>(routes: &'a [Route], page: &'a str) -> Named<'a> {
    if let Some(route) = routes::find_page(routes, page) {
        return Named::Whole(&route.pattern);
    }
    if page.starts_with("/_next/static/") {
        return Named::Whole("/_next/static/*");
    }
    if page.starts_with("/_next/image") {
        return Named::Whole("/_next/image");
    }
    let rest = page.strip_prefix('/').unwrap_or(page);
    match rest.split('/').next() {
        Some(segment) if !segment.is_empty() => Named::Segment(&page[..=segment.len()]),
        _ => Named::Whole("/"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::routes::Lifetimes;

    fn route(pattern: &str) -> Route {
        Route::new(pattern, true, Lifetimes::default()).expect("pattern")
    }

    fn row<'a>(all: &'a [RouteCounts], name: &str) -> &'a RouteCounts {
        all.iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no row {name}: {all:?}"))
    }

    #[test]
    fn paths_count_under_their_route_or_first_segment() {
        let routes = [route("/blog/{slug}")];
        let stats = RouteStats::default();
        let stored = RouteEvent::Rendered(Some(Duration::from_secs(60)));
        for path in ["/blog/a", "/products/1", "/", "/_next/static/chunks/a.js"] {
            stats.count(&routes, path, stored);
        }
        stats.count(&routes, "/blog/b", RouteEvent::Hit);
        stats.count(&routes, "/_next/data/b1/blog/c.json", RouteEvent::Hit);
        stats.count(&routes, "/products/2?x=1", RouteEvent::Stale);
        stats.count(&routes, "/products", RouteEvent::Miss);
        let all = stats.read();
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["/blog/{slug}", "/products/*", "/", "/_next/static/*", OTHER]
        );
        let blog = row(&all, "/blog/{slug}");
        assert_eq!((blog.hits, blog.renders, blog.stored), (2, 1, 1));
        assert_eq!(blog.median_ttl_s, Some(60));
        let products = row(&all, "/products/*");
        assert_eq!((products.stale, products.misses), (1, 1));
    }

    #[test]
    fn only_what_proves_a_page_makes_a_row_and_the_table_is_bounded() {
        let stats = RouteStats::default();
        stats.count(&[], "/nothing/here", RouteEvent::Miss);
        stats.count(&[], "/nothing/here", RouteEvent::Rendered(None));
        for i in 0..MAX_ROWS + 10 {
            stats.count(&[], &format!("/s{i}/p"), RouteEvent::Hit);
        }
        let all = stats.read();
        assert_eq!(all.len(), MAX_ROWS + 1);
        let other = row(&all, OTHER);
        assert_eq!((other.misses, other.renders, other.hits), (1, 1, 10));
    }

    #[test]
    fn the_median_ttl_is_the_bucket_holding_half_the_stores() {
        let stats = RouteStats::default();
        for secs in [30, 60, 60, 86_400] {
            let ttl = RouteEvent::Rendered(Some(Duration::from_secs(secs)));
            stats.count(&[], "/p", ttl);
        }
        assert_eq!(row(&stats.read(), "/p/*").median_ttl_s, Some(60));
    }
}
