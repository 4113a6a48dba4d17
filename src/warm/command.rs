//! The `isrgate warm` command, once its flags are read: source → pages → plan → run through
//! the gateway with a progress display → summary on stdout → exit status.
//!
//! Receives the settings from `main` (which resolves the gateway's address from the
//! configuration); hands back an [`Exit`]. Errors go to stderr, each naming the source or the
//! flag; the summary goes to stdout.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::gateway::{GatewayRenderer, Settings};
use super::report::{self, MaxFailed};
use super::sitemap::{self, Fetcher};
use super::{Plan, Progress, Variant};

/// What `isrgate warm` was asked to do.
#[derive(Debug, Clone)]
pub struct Warm {
    /// A file or an `http://` URL: a sitemap, a sitemap index, or a list of paths.
    pub source: String,
    /// `http://HOST:PORT` of the gateway to render through.
    pub gateway: String,
    /// `Host` for every page instead of each URL's own.
    pub host: Option<String>,
    /// Build id, sent as `x-deployment-id`.
    pub build: Option<String>,
    /// Which answers of each page.
    pub variants: Vec<Variant>,
    /// Renders in flight at most.
    pub concurrency: usize,
    /// Renders started per second at most.
    pub rate: Option<f64>,
    /// Failures allowed.
    pub max_failed: MaxFailed,
    /// Most time one render (or one sitemap download) may take.
    pub timeout: Duration,
}

/// How the command ended; [`code`](Exit::code) is the process's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every target warmed, or at most `--max-failed` failed.
    Warmed,
    /// More failures than `--max-failed`.
    TooManyFailed,
    /// A flag or the source is unusable (nothing was warmed).
    Unusable,
    /// Stopped by a signal before the end.
    Stopped,
}

impl Exit {
    /// 0, 1, 2, or 130 (as a shell reports SIGINT).
    pub fn code(self) -> u8 {
        match self {
            Exit::Warmed => 0,
            Exit::TooManyFailed => 1,
            Exit::Unusable => 2,
            Exit::Stopped => 130,
        }
    }
}

/// Runs the command until done or `stop`.
pub async fn run(w: Warm, stop: CancellationToken) -> Exit {
    let settings = Settings {
        gateway: &w.gateway,
        host: w.host.as_deref(),
        build: w.build.as_deref(),
        timeout: w.timeout,
    };
    let renderer = match GatewayRenderer::new(&settings) {
        Ok(r) => Arc::new(r),
        Err(e) => return unusable(&e),
    };
    let pages = match sitemap::load(&w.source, &Fetcher::new(w.timeout)).await {
        Ok(pages) if pages.is_empty() => return unusable(&format!("{}: no pages", w.source)),
        Ok(pages) => pages,
        Err(e) => return unusable(&e),
    };
    let plan = Plan {
        targets: super::targets(pages, &w.variants),
        concurrency: w.concurrency,
        rate: w.rate,
    };
    let progress = Arc::new(Progress::default());
    let shown = CancellationToken::new();
    let display = tokio::spawn(report::show(Arc::clone(&progress), shown.clone()));
    let summary = super::run(plan, renderer, progress, stop).await;
    shown.cancel();
    let _ = display.await;
    print!("{}", report::summary(&summary));
    if summary.stopped_early() {
        Exit::Stopped
    } else if w.max_failed.exceeded(summary.counts) {
        eprintln!(
            "error: {} targets failed, more than --max-failed {} allows",
            summary.counts.failed, w.max_failed
        );
        Exit::TooManyFailed
    } else {
        Exit::Warmed
    }
}

fn unusable(e: &dyn std::fmt::Display) -> Exit {
    eprintln!("error: {e}");
    Exit::Unusable
}
