//! What `isrgate warm` shows: a progress bar while it runs (on a terminal; plain lines every
//! [`PLAIN_EVERY`] otherwise, so a CI log stays readable), the summary at the end, and whether
//! the failures stay within `--max-failed`.
//!
//! Reads the engine's [`Progress`] and [`Summary`]; writes to stderr (the bar, the lines) or
//! returns text (the summary); never changes a count.

use std::fmt::{self, Write as _};
use std::io::IsTerminal as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::{Counts, Progress, Summary, Target, Variant};

/// How often the progress line is printed when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);
/// How often the bar is redrawn on a terminal.
const BAR_EVERY: Duration = Duration::from_millis(100);

/// How many failures a warm may have and still succeed: a count (`0`, `3`) or a share of the
/// targets (`5%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MaxFailed {
    /// At most this many.
    Count(usize),
    /// At most this percentage of the targets.
    Percent(f64),
}

impl FromStr for MaxFailed {
    type Err = String;

    fn from_str(s: &str) -> Result<MaxFailed, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(MaxFailed::Percent(p)),
                _ => Err(format!("{s:?}: expected a percentage from 0% to 100%")),
            };
        }
        s.parse()
            .map(MaxFailed::Count)
            .map_err(|_| format!("{s:?}: expected a count (0, 3) or a percentage (5%)"))
    }
}

impl fmt::Display for MaxFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaxFailed::Count(n) => write!(f, "{n}"),
            MaxFailed::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl MaxFailed {
    /// Whether `counts` has more failures than allowed.
    pub fn exceeded(self, counts: Counts) -> bool {
        match self {
            MaxFailed::Count(n) => counts.failed > n,
            MaxFailed::Percent(p) => counts.failed as f64 > p / 100.0 * counts.total as f64,
        }
    }
}

/// Shows `progress` on stderr until `done` is cancelled: a bar on a terminal, a plain line
/// every [`PLAIN_EVERY`] otherwise.
pub async fn show(progress: Arc<Progress>, done: CancellationToken) {
    if std::io::stderr().is_terminal() {
        bar(&progress, &done).await;
    } else {
        plain(&progress, &done).await;
    }
}

async fn bar(progress: &Progress, done: &CancellationToken) {
    // The bar takes what the terminal width leaves (a wrapped line would be redrawn badly).
    let style = ProgressStyle::with_template("[{wide_bar}] {pos}/{len} {msg}, {eta} left")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new(progress.counts().total as u64).with_style(style);
    let update = |c: Counts| {
        bar.set_length(c.total as u64);
        bar.set_position(c.done as u64);
        bar.set_message(format!(
            "({} rendered, {} fresh, {} failed)",
            c.rendered, c.fresh, c.failed
        ));
    };
    update(progress.counts());
    while done
        .run_until_cancelled(tokio::time::sleep(BAR_EVERY))
        .await
        .is_some()
    {
        update(progress.counts());
    }
    bar.finish_and_clear();
}

async fn plain(progress: &Progress, done: &CancellationToken) {
    while done
        .run_until_cancelled(tokio::time::sleep(PLAIN_EVERY))
        .await
        .is_some()
    {
        let c = progress.counts();
        eprintln!("warm: {}/{} · {}", c.done, c.total, counts_line(c));
    }
}

fn counts_line(c: Counts) -> String {
    format!(
        "{} rendered · {} already fresh · {} failed",
        c.rendered, c.fresh, c.failed
    )
}

/// The summary: the counts, the time and rate, and each failure reason with its count and
/// first targets.
pub fn summary(s: &Summary) -> String {
    let c = s.counts;
    let mut out = format!(
        "warmed {} of {} targets in {:.1}s ({:.1}/s): {}\n",
        c.done,
        c.total,
        s.elapsed.as_secs_f64(),
        s.per_second(),
        counts_line(c).replace(" · ", ", ")
    );
    if s.stopped_early() {
        let _ = writeln!(
            out,
            "stopped early: {} targets not warmed",
            c.total - c.done
        );
    }
    for group in &s.failures {
        let _ = write!(out, "  {} × {}", group.count, group.reason);
        for (i, target) in group.examples.iter().enumerate() {
            out.push_str(if i == 0 { ": " } else { ", " });
            push_target(&mut out, target);
        }
        if group.count > group.examples.len() && !group.examples.is_empty() {
            let _ = write!(out, " … and {} more", group.count - group.examples.len());
        }
        out.push('\n');
    }
    out
}

/// `host/path` (or `path`), then ` (rsc)` for an RSC target.
fn push_target(out: &mut String, t: &Target) {
    if let Some(host) = &t.host {
        out.push_str(host);
    }
    out.push_str(&t.path);
    if t.variant == Variant::Rsc {
        out.push_str(" (rsc)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::warm::FailureGroup;

    fn counts(total: usize, failed: usize) -> Counts {
        Counts {
            total,
            done: total,
            failed,
            ..Counts::default()
        }
    }

    #[test]
    fn max_failed_reads_a_count_or_a_percentage() {
        assert_eq!("0".parse(), Ok(MaxFailed::Count(0)));
        assert_eq!(" 5% ".parse(), Ok(MaxFailed::Percent(5.0)));
        assert!("101%".parse::<MaxFailed>().is_err());
        assert!("-1".parse::<MaxFailed>().is_err());
        assert!("few".parse::<MaxFailed>().is_err());
        assert!(!MaxFailed::Count(0).exceeded(counts(10, 0)));
        assert!(MaxFailed::Count(0).exceeded(counts(10, 1)));
        assert!(!MaxFailed::Percent(10.0).exceeded(counts(10, 1)));
        assert!(MaxFailed::Percent(10.0).exceeded(counts(10, 2)));
    }

    #[test]
    fn summary_groups_failures_with_their_first_targets() {
        let target = |p: &str, variant| Target {
            host: None,
            path: p.to_owned(),
            variant,
        };
        let s = Summary {
            counts: Counts {
                total: 20,
                done: 18,
                rendered: 10,
                fresh: 4,
                failed: 4,
            },
            elapsed: Duration::from_secs(2),
            failures: vec![FailureGroup {
                reason: "HTTP 404".into(),
                count: 4,
                examples: vec![target("/a", Variant::Html), target("/a", Variant::Rsc)],
            }],
        };
        let text = summary(&s);
        assert!(
            text.starts_with(
                "warmed 18 of 20 targets in 2.0s (9.0/s): 10 rendered, 4 already fresh, 4 failed\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("stopped early: 2 targets not warmed"),
            "{text}"
        );
        assert!(
            text.contains("  4 × HTTP 404: /a, /a (rsc) … and 2 more\n"),
            "{text}"
        );
    }
}
