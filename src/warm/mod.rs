//! Warm: render a list of pages before users ask for them, so their first request is a hit.
//!
//! The engine ([`run`]) takes a [`Plan`] (the targets, how many renders at once, how many
//! started per second) and a [`Renderer`] that renders one target and says how it went. It
//! owns the pacing only: at most `concurrency` renders in flight, starts spaced by `1 / rate`,
//! an early stop on the token. Counts are kept in a shared [`Progress`] that a progress bar or
//! the dashboard reads while it runs; the [`Summary`] at the end adds the failures grouped by
//! reason.
//!
//! Who renders is the caller's choice: `isrgate warm` sends each target through a gateway over
//! HTTP ([`gateway`]), a gateway's own pre-warm renders in process. Where the targets come
//! from is [`sitemap`]'s job (a sitemap, a sitemap index, or a plain list of paths), and what
//! the command prints is [`report`]'s; [`command`] strings them together for `isrgate warm`.

pub mod command;
pub mod gateway;
pub mod prewarm;
pub mod report;
pub mod sitemap;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Which answer of a page to warm: a page has two cache entries, its HTML (a navigation) and
/// its RSC payload (an App Router client-side navigation, asked with `RSC: 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The HTML document.
    Html,
    /// The React Server Components payload.
    Rsc,
}

impl Variant {
    /// `html` or `rsc`, as in `--variants`.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Html => "html",
            Variant::Rsc => "rsc",
        }
    }

    /// Parses a comma-separated list (`html,rsc`): no repeats, at least one.
    pub fn parse_list(text: &str) -> Result<Vec<Variant>, String> {
        let mut out = Vec::with_capacity(2);
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let v = match word.to_ascii_lowercase().as_str() {
                "html" => Variant::Html,
                "rsc" => Variant::Rsc,
                _ => return Err(format!("unknown variant `{word}` (expected html or rsc)")),
            };
            if !out.contains(&v) {
                out.push(v);
            }
        }
        if out.is_empty() {
            return Err("no variant given (expected html, rsc or html,rsc)".to_owned());
        }
        Ok(out)
    }
}

/// One render to ask for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The public host the page belongs to (the `Host` to ask with), when known.
    pub host: Option<String>,
    /// Path plus `?query`, as requested.
    pub path: String,
    /// Which answer.
    pub variant: Variant,
}

/// How rendering one target went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// Rendered now (the cache did not hold it).
    Rendered,
    /// Already in the cache: nothing was rendered.
    Fresh,
    /// Not rendered, with the reason (`HTTP 404`, `timed out after 30s`, …). Equal reasons
    /// are grouped in the summary, so a reason should not carry per-target details.
    Failed(String),
}

/// Renders one target. Implemented by the HTTP client of `isrgate warm` and by the gateway's
/// pre-warm; the engine is generic over it.
pub trait Renderer: Send + Sync + 'static {
    /// Renders `target` and says how it went. Never panics on a bad answer: that is a
    /// [`Rendered::Failed`].
    fn render(&self, target: &Target) -> impl Future<Output = Rendered> + Send;
}

/// Counts of a run, updated as each render ends: share it by `Arc` and read it while the run
/// goes on (a progress bar, the dashboard). One per run: [`run`] sets the total, and adds to
/// the other counts.
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicUsize,
    done: AtomicUsize,
    rendered: AtomicUsize,
    fresh: AtomicUsize,
    failed: AtomicUsize,
}

/// The counts of a [`Progress`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Targets in the plan.
    pub total: usize,
    /// Targets finished (`rendered + fresh + failed`).
    pub done: usize,
    /// Rendered now.
    pub rendered: usize,
    /// Already cached.
    pub fresh: usize,
    /// Failed.
    pub failed: usize,
}

impl Progress {
    /// The counts now.
    pub fn counts(&self) -> Counts {
        Counts {
            total: self.total.load(Ordering::Relaxed),
            done: self.done.load(Ordering::Relaxed),
            rendered: self.rendered.load(Ordering::Relaxed),
            fresh: self.fresh.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    fn record(&self, outcome: &Rendered) {
        let slot = match outcome {
            Rendered::Rendered => &self.rendered,
            Rendered::Fresh => &self.fresh,
            Rendered::Failed(_) => &self.failed,
        };
        slot.fetch_add(1, Ordering::Relaxed);
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// What to warm and how fast.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The targets, started in this order.
    pub targets: Vec<Target>,
    /// Most renders in flight at once (0 counts as 1).
    pub concurrency: usize,
    /// Most targets started per second; `None` (or a rate that is not a positive number) for
    /// no limit.
    pub rate: Option<f64>,
}

/// Every variant of every page, variant by variant: all the pages' first variant, then all
/// their second. A page's RSC is then asked for after its HTML has been rendered, and the
/// gateway stores both from one App Router render, so the RSC pass is mostly hits.
pub fn targets(pages: Vec<sitemap::Page>, variants: &[Variant]) -> Vec<Target> {
    let mut targets = Vec::with_capacity(pages.len() * variants.len());
    let Some((last, firsts)) = variants.split_last() else {
        return targets;
    };
    for &variant in firsts {
        targets.extend(pages.iter().map(|p| p.target(variant)));
    }
    targets.extend(pages.into_iter().map(|p| p.into_target(*last)));
    targets
}

/// Most distinct failure reasons kept; later new reasons are counted under [`OTHER_REASONS`].
pub const MAX_REASONS: usize = 32;
/// Targets kept as examples of one reason.
pub const MAX_EXAMPLES: usize = 10;
/// The reason failures are grouped under once [`MAX_REASONS`] are kept.
pub const OTHER_REASONS: &str = "other reasons";

/// The failures of one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    /// Why.
    pub reason: String,
    /// How many targets failed so.
    pub count: usize,
    /// The first of them (at most [`MAX_EXAMPLES`]).
    pub examples: Vec<Target>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The counts at the end; `total - done` targets were not finished (stopped early).
    pub counts: Counts,
    /// From the first start to the last end.
    pub elapsed: Duration,
    /// Failures by reason, most frequent first.
    pub failures: Vec<FailureGroup>,
}

impl Summary {
    /// Whether the run was stopped before every target was finished.
    pub fn stopped_early(&self) -> bool {
        self.counts.done < self.counts.total
    }

    /// Targets finished per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.counts.done as f64 / secs
        } else {
            0.0
        }
    }

    fn add_failure(&mut self, target: Option<Target>, reason: &str) {
        let full = self.failures.len() >= MAX_REASONS;
        let reason = if full && !self.failures.iter().any(|g| g.reason == reason) {
            OTHER_REASONS
        } else {
            reason
        };
        let group = match self.failures.iter().position(|g| g.reason == reason) {
            Some(i) => &mut self.failures[i],
            None => {
                self.failures.push(FailureGroup {
                    reason: reason.to_owned(),
                    count: 0,
                    examples: Vec::new(),
                });
                self.failures.last_mut().expect("invariant: just pushed")
            }
        };
        group.count += 1;
        if let Some(t) = target.filter(|_| group.examples.len() < MAX_EXAMPLES) {
            group.examples.push(t);
        }
    }
}

/// Runs `plan` through `renderer`: at most `plan.concurrency` renders in flight, starts spaced
/// by `1 / plan.rate`, in the plan's order. On `stop` nothing more is started and the renders
/// in flight are dropped (their targets count as not finished).
pub async fn run<R: Renderer>(
    plan: Plan,
    renderer: Arc<R>,
    progress: Arc<Progress>,
    stop: CancellationToken,
) -> Summary {
    let started = Instant::now();
    progress.total.store(plan.targets.len(), Ordering::Relaxed);
    let permits = Arc::new(Semaphore::new(plan.concurrency.max(1)));
    let mut pace = pacer(plan.rate);
    let mut summary = Summary {
        counts: Counts::default(),
        elapsed: Duration::ZERO,
        failures: Vec::new(),
    };
    let mut jobs = JoinSet::new();
    for target in plan.targets {
        let Some(permit) = next_start(&permits, pace.as_mut(), &stop).await else {
            break;
        };
        while let Some(done) = jobs.try_join_next() {
            collect(&mut summary, &progress, done);
        }
        let (renderer, progress) = (Arc::clone(&renderer), Arc::clone(&progress));
        jobs.spawn(async move {
            let outcome = renderer.render(&target).await;
            drop(permit);
            progress.record(&outcome);
            (target, outcome)
        });
    }
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                jobs.shutdown().await;
                break;
            }
            done = jobs.join_next() => match done {
                Some(done) => collect(&mut summary, &progress, done),
                None => break,
            },
        }
    }
    summary.failures.sort_by_key(|g| std::cmp::Reverse(g.count));
    summary.counts = progress.counts();
    summary.elapsed = started.elapsed();
    summary
}

/// The start clock for `rate` targets a second: its first tick is at once, and a late tick
/// pushes the next ones back (never two starts closer than `1 / rate`).
fn pacer(rate: Option<f64>) -> Option<Interval> {
    let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let period = Duration::try_from_secs_f64(1.0 / rate).ok()?;
    if period.is_zero() {
        return None;
    }
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    Some(pace)
}

/// Waits for a free render slot, then for the start clock (in this order: a start that waited
/// for a slot still waits its turn on the clock). `None` once `stop` is cancelled.
async fn next_start(
    permits: &Arc<Semaphore>,
    pace: Option<&mut Interval>,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    let permit = tokio::select! {
        biased;
        _ = stop.cancelled() => return None,
        permit = Arc::clone(permits).acquire_owned() => permit.ok()?,
    };
    if let Some(pace) = pace {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            _ = pace.tick() => {}
        }
    }
    Some(permit)
}

/// The pooled HTTP/1.1 client `isrgate warm` fetches sitemaps and asks for renders with.
fn client(connect_timeout: Duration) -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// An error with its causes, `: `-joined (hyper's own words say only "client error").
fn describe(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cause = e.source();
    }
    out
}

/// Adds a finished render to the summary's failures (the counts are in `progress` already).
fn collect(
    summary: &mut Summary,
    progress: &Progress,
    done: Result<(Target, Rendered), JoinError>,
) {
    match done {
        Ok((target, Rendered::Failed(reason))) => summary.add_failure(Some(target), &reason),
        Ok(_) => {}
        Err(e) if e.is_panic() => {
            // The task died before counting its target: count it here.
            progress.record(&Rendered::Failed(String::new()));
            summary.add_failure(None, "the renderer panicked");
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant as TokioInstant;

    /// Records each start (paused clock) and the most renders in flight; fails paths that
    /// start with `/bad` with `HTTP 404`, and `/fresh…` is a hit.
    #[derive(Default)]
    struct Fake {
        starts: Mutex<Vec<TokioInstant>>,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        takes: Duration,
        /// When set, every render lasts until then instead.
        until: Option<TokioInstant>,
    }

    impl Renderer for Fake {
        async fn render(&self, target: &Target) -> Rendered {
            self.starts.lock().expect("lock").push(TokioInstant::now());
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            match self.until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => tokio::time::sleep(self.takes).await,
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if target.path.starts_with("/bad") {
                Rendered::Failed("HTTP 404".into())
            } else if target.path.starts_with("/fresh") {
                Rendered::Fresh
            } else {
                Rendered::Rendered
            }
        }
    }

    fn html(paths: &[&str]) -> Vec<Target> {
        paths
            .iter()
            .map(|p| Target {
                host: None,
                path: (*p).to_owned(),
                variant: Variant::Html,
            })
            .collect()
    }

    fn numbered(n: usize) -> Vec<Target> {
        let paths: Vec<String> = (0..n).map(|i| format!("/p/{i}")).collect();
        html(&paths.iter().map(String::as_str).collect::<Vec<_>>())
    }

    async fn go(
        fake: &Arc<Fake>,
        targets: Vec<Target>,
        concurrency: usize,
        rate: Option<f64>,
    ) -> Summary {
        let plan = Plan {
            targets,
            concurrency,
            rate,
        };
        let progress = Arc::new(Progress::default());
        run(plan, Arc::clone(fake), progress, CancellationToken::new()).await
    }

    #[tokio::test(start_paused = true)]
    async fn starts_are_spaced_by_one_over_the_rate() {
        let fake = Arc::new(Fake::default());
        let summary = go(&fake, numbered(6), 8, Some(10.0)).await;
        assert_eq!(summary.counts.rendered, 6);
        let starts = fake.starts.lock().expect("lock").clone();
        for pair in starts.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(100),
                "{starts:?}"
            );
        }
        assert_eq!(starts[5] - starts[0], Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_that_waited_for_a_slot_still_waits_its_turn_on_the_clock() {
        // Two slots, and the first two renders end together: the two starts they free at
        // that moment still come 10 ms apart.
        let fake = Arc::new(Fake {
            until: Some(TokioInstant::now() + Duration::from_secs(1)),
            ..Fake::default()
        });
        go(&fake, numbered(4), 2, Some(100.0)).await;
        let starts = fake.starts.lock().expect("lock").clone();
        for pair in starts.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(10), "{starts:?}");
        }
        assert_eq!(starts[3] - starts[2], Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn renders_in_flight_never_exceed_the_concurrency() {
        let fake = Arc::new(Fake {
            takes: Duration::from_millis(10),
            ..Fake::default()
        });
        let summary = go(&fake, numbered(40), 3, None).await;
        assert_eq!(summary.counts.done, 40);
        assert_eq!(fake.max_in_flight.load(Ordering::SeqCst), 3);
        // 40 renders of 10 ms, 3 at a time: 14 rounds.
        assert_eq!(summary.elapsed, Duration::from_millis(140));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_starts_nothing_more_and_drops_renders_in_flight() {
        let fake = Arc::new(Fake {
            takes: Duration::from_secs(3600),
            ..Fake::default()
        });
        let (stop, progress) = (CancellationToken::new(), Arc::new(Progress::default()));
        let plan = Plan {
            targets: numbered(10),
            concurrency: 2,
            rate: None,
        };
        let canceller = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            canceller.cancel();
        });
        let summary = run(plan, Arc::clone(&fake), progress, stop).await;
        assert_eq!(fake.starts.lock().expect("lock").len(), 2);
        assert_eq!(summary.counts.total, 10);
        assert_eq!(summary.counts.done, 0);
        assert!(summary.stopped_early());
        assert_eq!(summary.elapsed, Duration::from_secs(1));
    }

    #[tokio::test]
    async fn outcomes_are_counted_and_failures_grouped_by_reason() {
        let fake = Arc::new(Fake::default());
        let summary = go(
            &fake,
            html(&["/a", "/bad/1", "/fresh", "/bad/2", "/b"]),
            1,
            None,
        )
        .await;
        let c = summary.counts;
        assert_eq!(
            (c.total, c.done, c.rendered, c.fresh, c.failed),
            (5, 5, 2, 1, 2)
        );
        assert_eq!(summary.failures.len(), 1);
        let group = &summary.failures[0];
        assert_eq!((group.reason.as_str(), group.count), ("HTTP 404", 2));
        let paths: Vec<&str> = group.examples.iter().map(|t| t.path.as_str()).collect();
        assert_eq!(paths, ["/bad/1", "/bad/2"]);
    }

    #[test]
    fn reasons_and_examples_are_bounded() {
        let mut summary = Summary {
            counts: Counts::default(),
            elapsed: Duration::ZERO,
            failures: Vec::new(),
        };
        for i in 0..MAX_REASONS + 5 {
            summary.add_failure(numbered(1).pop(), &format!("reason {i}"));
        }
        for _ in 0..MAX_EXAMPLES + 5 {
            summary.add_failure(numbered(1).pop(), "reason 0");
        }
        assert_eq!(summary.failures.len(), MAX_REASONS + 1);
        assert_eq!(summary.failures[MAX_REASONS].reason, OTHER_REASONS);
        assert_eq!(summary.failures[MAX_REASONS].count, 5);
        assert_eq!(summary.failures[0].count, MAX_EXAMPLES + 6);
        assert_eq!(summary.failures[0].examples.len(), MAX_EXAMPLES);
    }

    #[test]
    fn variants_parse_from_the_flag() {
        assert_eq!(
            Variant::parse_list("html,rsc"),
            Ok(vec![Variant::Html, Variant::Rsc])
        );
        assert_eq!(Variant::parse_list(" RSC , rsc"), Ok(vec![Variant::Rsc]));
        assert!(
            Variant::parse_list("html,json")
                .expect_err("an error")
                .contains("`json`")
        );
        assert!(Variant::parse_list(",").is_err());
    }

    #[test]
    fn targets_ask_every_html_before_any_rsc() {
        let pages = vec![sitemap::Page::path("/a"), sitemap::Page::path("/b")];
        let t = targets(pages, &[Variant::Html, Variant::Rsc]);
        let got: Vec<(&str, Variant)> = t.iter().map(|t| (t.path.as_str(), t.variant)).collect();
        assert_eq!(
            got,
            [
                ("/a", Variant::Html),
                ("/b", Variant::Html),
                ("/a", Variant::Rsc),
                ("/b", Variant::Rsc)
            ]
        );
    }
}
