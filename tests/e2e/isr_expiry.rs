//! One render per ISR expiry fleet-wide, never back in time, against real `next start`.
//!
//! `/isr3/a` (`revalidate = 3`, prerendered by `next build`) stamps every render with
//! `data-stamp="<ms>-<replica>"` (`<ms>-build` for the build's render): wall-clock ms, so a
//! later render has a larger stamp on this machine. The gateways refresh by on-demand
//! revalidation (`x-prerender-revalidate: <previewModeId>`, NEXTJS.md §4.1), which makes the
//! replica render afresh instead of answering from its own, possibly older, cache.
//!
//! What a client may see, whichever gateway it asks:
//! - a response requested after another was received never carries an older stamp (per
//!   gateway and across both), not even while two of the three replicas restart;
//! - the build's render never comes back once a replica's render was served;
//! - renders fleet-wide stay within one per 3 s window (plus the cold start);
//! - the HTML and the RSC payload fresh in one window come from one render;
//! - a gzip client gets `/_next/static` chunks gzipped about as small as Next sends them, and
//!   the second gateway serves them from the shared cache.
//!
//! Every rule is checked and all broken ones are reported together, each with the responses
//! that broke it; a regression is told apart as against its own variant (an entry replaced by
//! an older render), only against the other variant (HTML and RSC of different renders) or only
//! against the other gateway. `ISR_EXPIRY_SAMPLES=<file>` writes every response of the hammer.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::support::{Client, Gateway, Got};
use super::{
    Replica, Stack, get, get_with, rsc_get_with, stack_revalidating, total_renders, webhook,
};

const PAGE: &str = "/isr3/a";
/// The page's `revalidate`.
const REVALIDATE: Duration = Duration::from_secs(3);
const HAMMER: Duration = Duration::from_secs(20);
/// When two replicas are restarted, counted from the hammer's start.
const RESTART_AT: Duration = Duration::from_secs(10);
/// Client loops per (gateway, variant).
const CLIENTS_PER_STREAM: usize = 2;
/// Each client's pause between two requests, so a loaded 2-core machine keeps up.
const PAUSE: Duration = Duration::from_millis(20);
/// Bound of each client loop, whatever the clock does.
const MAX_REQUESTS_PER_CLIENT: usize = 2_000;
/// Bound of each polling phase (generous: a loaded machine, a 3 s window).
const POLL_DEADLINE: Duration = Duration::from_secs(30);
/// Set to a file path to get every response of the hammer written there, in receipt order.
const SAMPLES_FILE_VAR: &str = "ISR_EXPIRY_SAMPLES";
/// Bound of the gzip size against what the replica sends a gzip client.
const GZIP_SIZE_TOLERANCE: f64 = 0.10;
/// The request headers of a gzip client.
const GZIP: [(&str, &str); 1] = [("accept-encoding", "gzip")];

/// A render identity, parsed from `data-stamp`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    ms: u64,
    who: String,
}

impl Stamp {
    /// The first `data-stamp` in a body. HTML carries `data-stamp="<ms>-<who>"` (and the
    /// inlined flight data `\"data-stamp\":\"…\"`); the RSC payload `"data-stamp":"<ms>-<who>"`.
    fn find(body: &[u8]) -> Option<Stamp> {
        let text = String::from_utf8_lossy(body);
        let at = text.find("data-stamp")? + "data-stamp".len();
        let rest = text[at..].trim_start_matches(['=', '"', ':', '\\', ' ']);
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let who = rest[digits..].strip_prefix('-')?;
        let end = who
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(who.len());
        Some(Stamp {
            ms: rest[..digits].parse().ok()?,
            who: who[..end].to_owned(),
        })
    }

    fn is_build(&self) -> bool {
        self.who == "build"
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.who)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Html,
    Rsc,
}

impl Variant {
    fn as_str(self) -> &'static str {
        match self {
            Variant::Html => "html",
            Variant::Rsc => "rsc",
        }
    }
}

async fn fetch(client: &Client, gw: &Gateway, variant: Variant) -> Got {
    match variant {
        Variant::Html => get_with(client, gw, PAGE, &[]).await,
        Variant::Rsc => rsc_get_with(client, gw, PAGE, &[("rsc", "1")]).await,
    }
}

/// One response of the hammer; times since the hammer's start.
#[derive(Debug, Clone)]
struct Sample {
    sent: Duration,
    received: Duration,
    gateway: usize,
    variant: Variant,
    status: u16,
    x_cache: String,
    stamp: Option<Stamp>,
}

impl Sample {
    fn ms(&self) -> u64 {
        self.stamp.as_ref().map_or(0, |s| s.ms)
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stamp = self
            .stamp
            .as_ref()
            .map_or_else(|| "(no stamp)".to_owned(), Stamp::to_string);
        write!(
            f,
            "sent {:>7.3}s recv {:>7.3}s g{} {:<4} {} {:<6} {stamp}",
            self.sent.as_secs_f64(),
            self.received.as_secs_f64(),
            self.gateway + 1,
            self.variant.as_str(),
            self.status,
            self.x_cache,
        )
    }
}

/// One client: requests `variant` from `gw` until `until` (since `t0`), pausing between.
async fn client_loop(
    gw: &Gateway,
    gateway: usize,
    variant: Variant,
    t0: Instant,
    until: Duration,
) -> Vec<Sample> {
    let client = Client::default();
    let mut samples = Vec::new();
    for _ in 0..MAX_REQUESTS_PER_CLIENT {
        let sent = t0.elapsed();
        if sent >= until {
            break;
        }
        let got = fetch(&client, gw, variant).await;
        samples.push(Sample {
            sent,
            received: t0.elapsed(),
            gateway,
            variant,
            status: got.status.as_u16(),
            x_cache: got.header("x-cache").to_owned(),
            stamp: Stamp::find(&got.body).filter(|_| got.status == 200),
        });
        tokio::time::sleep(PAUSE).await;
    }
    samples
}

/// At `RESTART_AT`, stops replicas b and c together, then starts them again. Their render
/// counters restart at zero, so what they counted for the page is read first and returned.
async fn restart_two(replicas: &mut Vec<Replica>, t0: Instant) -> u64 {
    tokio::time::sleep_until((t0 + RESTART_AT).into()).await;
    let mut counted = 0;
    for r in &replicas[1..] {
        counted += r.renders().await["renders"][PAGE].as_u64().unwrap_or(0);
    }
    let restarted = replicas.split_off(1);
    let restarted = tokio::task::spawn_blocking(move || {
        let mut restarted = restarted;
        for r in &mut restarted {
            r.stop();
        }
        for r in &mut restarted {
            r.spawn();
        }
        restarted
    })
    .await
    .expect("replicas restarted");
    println!(
        "restarted replicas b and c at {:.3}s (they had rendered {PAGE} {counted} times)",
        t0.elapsed().as_secs_f64()
    );
    replicas.extend(restarted);
    counted
}

/// A response that went back in time: `later` was requested after `newer` was received, and
/// carries an older render.
struct Regression<'a> {
    newer: &'a Sample,
    later: &'a Sample,
}

/// Every response (with a stamp) whose request started after a newer render had been served.
fn regressions<'a>(samples: &[&'a Sample]) -> Vec<Regression<'a>> {
    let mut by_receipt: Vec<&Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.stamp.is_some())
        .collect();
    by_receipt.sort_by_key(|s| s.received);
    // newest[i]: the newest render among the first i + 1 responses received.
    let newest: Vec<&Sample> = by_receipt
        .iter()
        .scan(None::<&Sample>, |best, &s| {
            let keep = match *best {
                Some(b) if b.ms() >= s.ms() => b,
                _ => s,
            };
            *best = Some(keep);
            Some(keep)
        })
        .collect();
    let mut found = Vec::new();
    for &later in &by_receipt {
        let before = by_receipt.partition_point(|s| s.received < later.sent);
        if let Some(&newer) = before.checked_sub(1).map(|i| &newest[i])
            && newer.ms() > later.ms()
        {
            found.push(Regression { newer, later });
        }
    }
    found
}

/// The responses of `samples` received up to shortly after `later`, the last few in receipt
/// order, for a failure message.
fn context(samples: &[&Sample], later: &Sample) -> String {
    const LINES: usize = 24;
    let to = later.received + Duration::from_millis(50);
    let mut near: Vec<&Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.received <= to)
        .collect();
    near.sort_by_key(|s| s.received);
    near[near.len().saturating_sub(LINES)..]
        .iter()
        .map(|s| format!("      {s}\n"))
        .collect()
}

/// The regressions found when `samples` are split by `part` and each part is checked alone.
fn regressions_within<'a, K: Ord>(
    samples: &[&'a Sample],
    part: impl Fn(&Sample) -> K,
) -> Vec<Regression<'a>> {
    let mut parts: BTreeMap<K, Vec<&'a Sample>> = BTreeMap::new();
    for &s in samples {
        parts.entry(part(s)).or_default().push(s);
    }
    let mut found: Vec<Regression<'a>> = parts.values().flat_map(|p| regressions(p)).collect();
    found.sort_by_key(|r| r.later.received);
    found
}

/// How long the HTML and RSC of one render may disagree between two gateways: they are two
/// keys in Redis (two Cluster slots), written one after the other and announced on the bus
/// together, so a client asking the other gateway within this window may still get the other
/// variant's previous render. Within one gateway, and within one variant anywhere, no window
/// is allowed.
const ACROSS_GATEWAYS_AND_VARIANTS_GRACE: Duration = Duration::from_millis(20);

fn report_regressions(
    scope: &str,
    samples: &[&Sample],
    grace_across_variants: Duration,
    problems: &mut Vec<String>,
) {
    let within_variant = regressions_within(samples, |s| s.variant);
    let found: Vec<Regression> = regressions(samples)
        .into_iter()
        .filter(|r| {
            let same_variant = within_variant
                .iter()
                .any(|w| std::ptr::eq(w.later, r.later));
            same_variant || r.later.sent.saturating_sub(r.newer.received) >= grace_across_variants
        })
        .collect();
    if found.is_empty() {
        return;
    }
    // Compared with its own variant only, a regression means an entry was replaced by an older
    // render (or an old copy served after a new one); only against the other variant, HTML and
    // RSC of one window came from different renders; only against the other gateway, one
    // gateway lags the other.
    let within_gateway = regressions_within(samples, |s| s.gateway).len();
    let is_within = |r: &Regression| {
        within_variant
            .iter()
            .any(|w| std::ptr::eq(w.later, r.later))
    };
    let across_variants: Vec<&Regression> = found.iter().filter(|r| !is_within(r)).collect();
    let mut text = format!(
        "{scope}: {} responses went back in time (requested after a newer render was served, \
         got an older one): {} of them against their own variant, {} only against the other \
         variant (HTML and RSC of different renders), {} only against the other gateway.\n",
        found.len(),
        within_variant.len(),
        across_variants.len(),
        found.len().saturating_sub(within_gateway),
    );
    for r in within_variant.iter().take(4) {
        text += &format!(
            "    same variant: {}\n            then  {}\n",
            r.newer, r.later
        );
    }
    for r in across_variants.iter().take(4) {
        text += &format!(
            "    other variant: {}\n             then  {}\n",
            r.newer, r.later
        );
    }
    let first = within_variant.first().unwrap_or(&found[0]);
    text += &format!(
        "  the last responses up to the first one{}:\n{}",
        if within_variant.is_empty() {
            ""
        } else {
            " against its own variant"
        },
        context(samples, first.later)
    );
    problems.push(text);
}

/// The build's render served to a request that started after a replica's render was served.
fn report_build_after_render(samples: &[Sample], problems: &mut Vec<String>) {
    let Some(first_render) = samples
        .iter()
        .filter(|s| s.stamp.as_ref().is_some_and(|st| !st.is_build()))
        .min_by_key(|s| s.received)
    else {
        return;
    };
    let late: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.stamp.as_ref().is_some_and(Stamp::is_build))
        .filter(|s| s.sent > first_render.received)
        .collect();
    if !late.is_empty() {
        problems.push(format!(
            "the build's render came back after a replica's render was served ({first_render}); \
             {} times, first:\n{}",
            late.len(),
            late.iter()
                .take(8)
                .map(|s| format!("      {s}\n"))
                .collect::<String>()
        ));
    }
}

/// Per gateway and variant: runs of one stamp in receipt order, with their x-cache counts.
fn timeline(samples: &[Sample], gateway: usize, variant: Variant) -> String {
    const SHOWN_RUNS: usize = 40;
    let mut mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.gateway == gateway && s.variant == variant)
        .collect();
    mine.sort_by_key(|s| s.received);
    let mut runs: Vec<(Duration, Duration, String, BTreeMap<&str, usize>)> = Vec::new();
    for s in mine {
        let stamp = s
            .stamp
            .as_ref()
            .map_or_else(|| format!("status {}", s.status), Stamp::to_string);
        match runs.last_mut() {
            Some((_, end, last, counts)) if *last == stamp => {
                *end = s.received;
                *counts.entry(&s.x_cache).or_default() += 1;
            }
            _ => runs.push((
                s.received,
                s.received,
                stamp,
                BTreeMap::from([(s.x_cache.as_str(), 1)]),
            )),
        }
    }
    let mut text: String = runs
        .iter()
        .take(SHOWN_RUNS)
        .map(|(from, to, stamp, counts)| {
            let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
            format!(
                "  g{} {:<4} {:>7.3}s..{:>7.3}s {stamp:<22} {}\n",
                gateway + 1,
                variant.as_str(),
                from.as_secs_f64(),
                to.as_secs_f64(),
                counts.join(" ")
            )
        })
        .collect();
    if runs.len() > SHOWN_RUNS {
        text += &format!("  … {} more runs\n", runs.len() - SHOWN_RUNS);
    }
    text
}

/// Renders of the page per replica, now.
async fn renders_per_replica(replicas: &[Replica]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for r in replicas {
        let n = r.renders().await["renders"][PAGE].as_u64().unwrap_or(0);
        out.push((r.id.clone(), n));
    }
    out
}

/// Polls `gw` until one request for `variant` is answered `x-cache: STALE` (the entry
/// expired and this request started its refresh), or with a render newer than `newest` (a
/// gateway that refreshes ahead of expiry).
async fn until_stale(gw: &Gateway, variant: Variant, newest: u64) -> Result<Stamp, String> {
    let client = Client::default();
    let deadline = Instant::now() + POLL_DEADLINE;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let got = fetch(&client, gw, variant).await;
        let stamp = Stamp::find(&got.body);
        if let Some(stamp) = stamp.as_ref()
            && (got.header("x-cache") == "STALE" || stamp.ms > newest)
        {
            return Ok(stamp.clone());
        }
        if seen.len() < 20 {
            seen.push(format!(
                "{} {} {stamp:?}",
                got.status,
                got.header("x-cache")
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!(
        "no STALE {} in {POLL_DEADLINE:?}; first answers: {seen:?}",
        variant.as_str()
    ))
}

/// Polls `gws` (gateway number, gateway) until, in one round, every gateway answers both
/// variants `x-cache: HIT` (all fresh, so all from one freshness window); returns that
/// round's stamps.
async fn fresh_round(gws: &[(usize, &Gateway)]) -> Result<Vec<(String, Stamp)>, String> {
    let client = Client::default();
    let deadline = Instant::now() + POLL_DEADLINE;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        let mut round = Vec::new();
        last.clear();
        for &(i, gw) in gws {
            for variant in [Variant::Html, Variant::Rsc] {
                let got = fetch(&client, gw, variant).await;
                let stamp = Stamp::find(&got.body);
                last.push(format!(
                    "g{i} {} {} {} {stamp:?}",
                    variant.as_str(),
                    got.status,
                    got.header("x-cache")
                ));
                if got.header("x-cache") == "HIT"
                    && let Some(stamp) = stamp
                {
                    round.push((format!("g{i} {}", variant.as_str()), stamp));
                }
            }
        }
        if round.len() == gws.len() * 2 {
            return Ok(round);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!(
        "no round of HITs in {POLL_DEADLINE:?}; last round: {last:?}"
    ))
}

/// The renders served so far, as the checks after the hammer go on.
struct Served {
    /// Every fresh answer from now on must be at least this render.
    floor: u64,
    /// The newest render any answer carried.
    latest: u64,
}

/// One refresh brings HTML and RSC of one render: trigger the expiry through `variant` on
/// gateway 1, then each gateway's fresh HTML and RSC must carry one stamp, never older than
/// what was served before.
async fn check_one_render_per_refresh(
    s: &Stack,
    variant: Variant,
    served: &mut Served,
    problems: &mut Vec<String>,
) {
    let (g1, g2) = (&s.gateways[0], &s.gateways[1]);
    let what = format!("after a refresh started by a stale {}", variant.as_str());
    if let Err(e) = until_stale(g1, variant, served.latest).await {
        problems.push(format!("{what}: {e}"));
        return;
    }
    for (i, gw) in [(1, g1), (2, g2)] {
        match fresh_round(&[(i, gw)]).await {
            Ok(round) => {
                println!("{what}: g{i} fresh round {round:?}");
                let stamps: Vec<&Stamp> = round.iter().map(|(_, st)| st).collect();
                if stamps.windows(2).any(|w| w[0] != w[1]) {
                    problems.push(format!(
                        "{what}: g{i} served fresh HTML and RSC of different renders: {round:?}"
                    ));
                }
                if let Some(old) = stamps.iter().find(|st| st.ms < served.floor) {
                    problems.push(format!(
                        "{what}: g{i} served {old} as fresh after a render stamped {} was \
                         served (back in time): {round:?}",
                        served.floor
                    ));
                }
                // Both variants are at least this render (all one render when the round is
                // right; otherwise the mismatch is reported once, above).
                let low = stamps.iter().map(|st| st.ms).min().unwrap_or(0);
                let high = stamps.iter().map(|st| st.ms).max().unwrap_or(0);
                served.floor = served.floor.max(low);
                served.latest = served.latest.max(high);
            }
            Err(e) => problems.push(format!("{what}: g{i}: {e}")),
        }
    }
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// `/_next/static/chunks/….js` URLs in a page.
fn chunk_urls(html: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(html);
    let mut urls: Vec<String> = text
        .split('"')
        .filter(|s| s.starts_with("/_next/static/chunks/") && s.ends_with(".js"))
        .map(str::to_owned)
        .collect();
    urls.sort();
    urls.dedup();
    urls
}

/// Of `urls`, the chunk the replica sends largest to a gzip client (where the compression
/// level shows), with that gzip answer.
async fn largest_chunk(replica: &Replica, urls: &[String]) -> Option<(String, Got)> {
    let direct = Client::default();
    let mut chosen: Option<(String, Got)> = None;
    for url in urls {
        let got = direct.get(&format!("{}{url}", replica.url()), &GZIP).await;
        let larger = chosen
            .as_ref()
            .is_none_or(|(_, best)| got.body.len() > best.body.len());
        if got.status == 200 && larger {
            chosen = Some((url.clone(), got));
        }
    }
    chosen
}

/// Gateway 1 hands a gzip client a gzip chunk about as small as the replica's own; gateway 2
/// then serves it from the shared cache, with every replica stopped to prove it.
async fn check_gzip_static(s: &mut Stack, problems: &mut Vec<String>) {
    let page = get(&s.gateways[0], PAGE, &[]).await;
    let urls = chunk_urls(&page.body);
    let Some((url, from_replica)) = largest_chunk(&s.replicas[0], &urls).await else {
        problems.push(format!(
            "gzip static: no /_next/static/chunks/*.js in {PAGE} (found {urls:?})"
        ));
        return;
    };
    let identity = Client::default()
        .get(&format!("{}{url}", s.replicas[0].url()), &[])
        .await
        .body;
    let replica_size = from_replica.body.len();
    println!(
        "gzip static: {url}: replica sends {} ({replica_size} bytes gzip, {} identity)",
        from_replica.header("content-encoding"),
        identity.len()
    );
    let g1 = get(&s.gateways[0], &url, &GZIP).await;
    let (g1_size, encoding) = (g1.body.len(), g1.header("content-encoding"));
    println!(
        "gzip static: g1 {} x-cache {} content-encoding {encoding:?}, {g1_size} bytes",
        g1.status,
        g1.header("x-cache"),
    );
    let ratio = g1_size as f64 / replica_size.max(1) as f64;
    if g1.status != 200 || encoding != "gzip" {
        problems.push(format!(
            "gzip static: g1 answered a gzip client {url} with {} content-encoding {encoding:?} \
             ({g1_size} bytes; the replica sends {replica_size} bytes gzip)",
            g1.status
        ));
    } else if (ratio - 1.0).abs() > GZIP_SIZE_TOLERANCE {
        problems.push(format!(
            "gzip static: g1's gzip {url} is {g1_size} bytes, the replica's {replica_size} \
             ({:+.1} %, tolerance ±{:.0} %)",
            (ratio - 1.0) * 100.0,
            GZIP_SIZE_TOLERANCE * 100.0
        ));
    } else if gunzip(&g1.body).map_or(true, |b| b != identity) {
        problems.push(format!(
            "gzip static: g1's gzip {url} does not inflate to the chunk"
        ));
    }

    for r in &mut s.replicas {
        r.stop();
    }
    let g2 = get(&s.gateways[1], &url, &GZIP).await;
    let encoding = g2.header("content-encoding");
    let body_ok = if encoding == "gzip" {
        gunzip(&g2.body).is_ok_and(|b| b == identity)
    } else {
        g2.body == identity
    };
    let summary = format!(
        "{} x-cache {:?} content-encoding {encoding:?}, {} bytes, body is the chunk: {body_ok}",
        g2.status,
        g2.header("x-cache"),
        g2.body.len()
    );
    println!("gzip static: with every replica stopped, g2 {summary}");
    if g2.status != 200 || g2.header("x-cache") != "HIT" || !body_ok {
        problems.push(format!(
            "gzip static: g2 did not serve {url} from the shared cache (every replica stopped): \
             {summary}"
        ));
    }
}

/// What the hammer saw, and what it cost the replicas.
struct Hammer {
    samples: Vec<Sample>,
    /// Until the last response was received.
    elapsed: Duration,
    /// Renders of the page fleet-wide, those of the restarted replicas' first lives included.
    renders: u64,
    per_replica: Vec<(String, u64)>,
    counted_before_restart: u64,
}

impl Hammer {
    /// Revalidate windows the hammer spans.
    fn windows(&self) -> u64 {
        (self.elapsed.as_secs_f64() / REVALIDATE.as_secs_f64()).ceil() as u64
    }
}

/// Both variants through both gateways for `HAMMER`; two replicas restart halfway.
async fn hammer(s: &mut Stack) -> Hammer {
    let t0 = Instant::now();
    let Stack {
        replicas, gateways, ..
    } = s;
    let gateways = &*gateways;
    let clients = (0..4 * CLIENTS_PER_STREAM).map(|i| {
        let (gateway, variant) = (i % 2, [Variant::Html, Variant::Rsc][(i / 2) % 2]);
        client_loop(&gateways[gateway], gateway, variant, t0, HAMMER)
    });
    let (per_client, counted_before_restart) =
        tokio::join!(join_all(clients), restart_two(replicas, t0));
    let samples = per_client.concat();
    let per_replica = renders_per_replica(replicas).await;
    Hammer {
        elapsed: samples.iter().map(|s| s.received).max().unwrap_or(HAMMER),
        samples,
        renders: per_replica.iter().map(|(_, n)| n).sum::<u64>() + counted_before_restart,
        per_replica,
        counted_before_restart,
    }
}

/// The timelines and the slowest responses; every response into `ISR_EXPIRY_SAMPLES` if set.
fn print_hammer(h: &Hammer) {
    println!(
        "hammer: {} responses in {:.3}s; renders of {PAGE}: {} ({:?} now, {} by b and c before \
         their restart); {} windows",
        h.samples.len(),
        h.elapsed.as_secs_f64(),
        h.renders,
        h.per_replica,
        h.counted_before_restart,
        h.windows()
    );
    for gateway in 0..2 {
        for variant in [Variant::Html, Variant::Rsc] {
            print!("{}", timeline(&h.samples, gateway, variant));
        }
    }
    let mut by_receipt: Vec<&Sample> = h.samples.iter().collect();
    by_receipt.sort_by_key(|s| s.received);
    let mut slowest = by_receipt.clone();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.received - s.sent));
    println!("slowest responses:");
    for s in slowest.iter().take(3) {
        println!("      {s}");
    }
    if let Some(path) = std::env::var_os(SAMPLES_FILE_VAR) {
        let text: String = by_receipt.iter().map(|s| format!("{s}\n")).collect();
        std::fs::write(&path, text).expect("write the samples");
        println!("samples written to {}", path.to_string_lossy());
    }
}

/// Every response of every (gateway, variant) stream is the page, with its stamp.
fn check_every_response_is_the_page(samples: &[Sample], problems: &mut Vec<String>) {
    for gateway in 0..2 {
        for variant in [Variant::Html, Variant::Rsc] {
            let stream: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.gateway == gateway && s.variant == variant)
                .collect();
            let unstamped: Vec<&&Sample> = stream.iter().filter(|s| s.stamp.is_none()).collect();
            if stream.is_empty() || !unstamped.is_empty() {
                problems.push(format!(
                    "g{} {}: {} of {} responses were not a 200 page with a stamp, e.g.\n{}",
                    gateway + 1,
                    variant.as_str(),
                    unstamped.len(),
                    stream.len(),
                    unstamped
                        .iter()
                        .take(5)
                        .map(|s| format!("      {s}\n"))
                        .collect::<String>()
                ));
            }
        }
    }
}

/// One render per window fleet-wide, plus two for the cold start (a replica that answers
/// `STALE` renders in the background on its own).
fn check_renders(h: &Hammer, problems: &mut Vec<String>) {
    let bound = h.windows() + 2;
    if (2..=bound).contains(&h.renders) {
        return;
    }
    let distinct: std::collections::BTreeSet<String> = h
        .samples
        .iter()
        .filter_map(|s| s.stamp.as_ref().map(Stamp::to_string))
        .collect();
    problems.push(format!(
        "{} renders of {PAGE} fleet-wide in {:.1}s; expected 2..={bound} (one per {:?} window, \
         {} windows, + 2 for the cold start); per replica now {:?} + {} before the restart; {} \
         renders were served: {distinct:?}",
        h.renders,
        h.elapsed.as_secs_f64(),
        REVALIDATE,
        h.windows(),
        h.per_replica,
        h.counted_before_restart,
        distinct.len()
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node/npm and a Next.js build; .ci/run runs it when node is present"]
async fn isr_expiry_one_render_per_window_never_back_in_time() {
    let mut s = stack_revalidating().await;
    let mut problems = Vec::new();

    let h = hammer(&mut s).await;
    print_hammer(&h);
    check_every_response_is_the_page(&h.samples, &mut problems);
    for gateway in 0..2 {
        let mine: Vec<&Sample> = h.samples.iter().filter(|s| s.gateway == gateway).collect();
        report_regressions(
            &format!("g{}", gateway + 1),
            &mine,
            Duration::ZERO,
            &mut problems,
        );
    }
    let all: Vec<&Sample> = h.samples.iter().collect();
    report_regressions(
        "both gateways",
        &all,
        ACROSS_GATEWAYS_AND_VARIANTS_GRACE,
        &mut problems,
    );
    report_build_after_render(&h.samples, &mut problems);
    check_renders(&h, &mut problems);

    // After the hammer: one refresh = one render for HTML and RSC, whichever variant expires.
    let newest = h.samples.iter().map(Sample::ms).max().unwrap_or(0);
    let mut served = Served {
        floor: newest,
        latest: newest,
    };
    check_one_render_per_refresh(&s, Variant::Rsc, &mut served, &mut problems).await;
    check_one_render_per_refresh(&s, Variant::Html, &mut served, &mut problems).await;

    check_gzip_static(&mut s, &mut problems).await;

    let upstream: Vec<String> = s
        .gateways
        .iter()
        .map(|g| {
            let m = &g.state.metrics;
            format!(
                "ejections {}, retries {}, timeouts {}",
                m.replica_ejections.get(),
                m.upstream_retries.get(),
                m.upstream_timeouts.get()
            )
        })
        .collect();
    assert!(
        problems.is_empty(),
        "{} rule(s) broken:\n\n{}\n\nupstream per gateway: {upstream:?}",
        problems.len(),
        problems.join("\n")
    );
}

/// Renders of the page fleet-wide once no replica is still rendering it in the background
/// (a replica that answered `STALE` renders after answering): two equal reads in a row.
async fn settled_renders(s: &Stack) -> u64 {
    let deadline = Instant::now() + POLL_DEADLINE;
    let mut last = total_renders(s, PAGE).await;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = total_renders(s, PAGE).await;
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs node/npm and a Next.js build; .ci/run runs it when node is present"]
async fn webhook_rewarm_serves_html_and_rsc_of_one_render() {
    let s = stack_revalidating().await;
    let gws: Vec<(usize, &Gateway)> = s
        .gateways
        .iter()
        .enumerate()
        .map(|(i, g)| (i + 1, g))
        .collect();
    let before = fresh_round(&gws)
        .await
        .unwrap_or_else(|e| panic!("warm-up: {e}"));
    let old = before.iter().map(|(_, st)| st.ms).max().unwrap_or(0);
    let renders_before = settled_renders(&s).await;

    let started = Instant::now();
    let report = webhook(&s.gateways[0], r#"{"paths":["/isr3/a"]}"#).await;
    println!("webhook: {report}");
    let deadline = Instant::now() + POLL_DEADLINE;
    let round = loop {
        let round = fresh_round(&gws)
            .await
            .unwrap_or_else(|e| panic!("after the webhook: {e}"));
        if round.iter().all(|(_, st)| st.ms > old) {
            break round;
        }
        assert!(
            Instant::now() < deadline,
            "no new render served after the webhook in {POLL_DEADLINE:?}: before {before:?}, \
             now {round:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    let renders = total_renders(&s, PAGE).await - renders_before;
    println!("after the webhook ({took:?}): {round:?}; {renders} render(s)");
    let stamps: Vec<&Stamp> = round.iter().map(|(_, st)| st).collect();
    let mut problems = Vec::new();
    if stamps.windows(2).any(|w| w[0] != w[1]) {
        problems.push(format!(
            "fresh HTML and RSC through both gateways after a re-warm come from different \
             renders: {round:?} (before the webhook: {before:?})"
        ));
    }
    // Past one window the page may have expired and been refreshed once more.
    if took < REVALIDATE && renders != 1 {
        problems.push(format!(
            "{renders} renders fleet-wide for the re-warm of HTML and RSC, expected one (all \
             fresh again {took:?} after the webhook)"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The rule itself, on made-up responses: only a request that started after a newer render
/// was received may not get an older one.
#[test]
fn a_response_goes_back_in_time_only_after_a_newer_one_was_received() {
    let at = |sent: u64, received: u64, ms: u64| Sample {
        sent: Duration::from_millis(sent),
        received: Duration::from_millis(received),
        gateway: 0,
        variant: Variant::Html,
        status: 200,
        x_cache: "HIT".into(),
        stamp: Some(Stamp {
            ms,
            who: "a".into(),
        }),
    };
    let samples = [
        at(0, 10, 100),
        at(5, 30, 200),
        // Started before 200 was received: may still be the old render.
        at(20, 40, 100),
        // Started after: must not be.
        at(31, 35, 100),
        at(41, 50, 200),
    ];
    let all: Vec<&Sample> = samples.iter().collect();
    let found = regressions(&all);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].later.sent, Duration::from_millis(31));
    assert_eq!(found[0].newer.ms(), 200);
    assert_eq!(
        Stamp::find(
            br#"<p id="render" data-replica="b" data-count="3" data-stamp="1733250000123-b">"#
        ),
        Some(Stamp {
            ms: 1_733_250_000_123,
            who: "b".into()
        })
    );
    assert_eq!(
        Stamp::find(br#"{"id":"render","data-replica":"build","data-count":1,"data-stamp":"17-build","children":"#),
        Some(Stamp { ms: 17, who: "build".into() })
    );
}
