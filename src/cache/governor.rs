//! The memory governor: `cache.l1_max_bytes` as a bound on what the process holds, not only on
//! what its entries are charged (issue 15).
//!
//! The L1 charges each entry its footprint, but a gateway under misses holds more: the bodies
//! of renders in flight and their copies for the store, connection buffers, and what the
//! allocator keeps after they are freed (mimalloc returns freed memory after a delay, and only
//! whole pages). None of that can be counted per entry, so it is measured. Every [`EVERY`], and
//! each time the L1 has taken in another 32nd of its bound ([`L1::took_in`]: a burst of
//! 300 KB fills takes in the whole bound within one tick), the governor reads the process's
//! resident memory (`/proc/self/statm`, a few microseconds) and the memory of the live sealed
//! bodies (shared memory, not in the RSS: [`Sealed::live_bytes`]); what the gateway uses is
//! their growth over the least RSS seen since start. Over the bound, the L1 gives way: each
//! entry inserted from then on weighs `scale` times its footprint ([`L1::set_scale`]), so the
//! L1 settles at `max_bytes / scale`, and what it holds beyond that is shed at once
//! ([`L1::shed_to`]: entries turn over too slowly under a scan to wait for them). Well under
//! the bound, the scale relaxes back toward 1. [`next_scale`] is the rule.
//!
//! Bounded: the scale never passes [`MAX_SCALE`], so whatever else the process holds the L1
//! keeps an eighth of its bound (memory past that is the operator's to size, README), and
//! after a raise the next waits [`RAISE_EVERY`] unless the process still grows (the allocator
//! returns what a shed freed only after its purge delay; raising on every tick would shed
//! again for memory already on its way back).
//!
//! Receives the L1 and the bound; hands on nothing but the scale, which the L1's weigher reads
//! and the metrics export. Linux only (elsewhere nothing is measured and the L1 bounds its
//! entries' own bytes); off with `cache.l1_governor = false`, for a process that holds more
//! than one gateway or other work of its own. Stopped by the cache's token.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::l1::L1;
use super::sealed::Sealed;

/// How often the process's memory is read.
pub const EVERY: Duration = Duration::from_millis(250);

/// The most an entry is weighed above its footprint: the L1 keeps at least `1 / MAX_SCALE` of
/// its bound.
pub const MAX_SCALE: f64 = 8.0;

/// How long a raise waits for the last one to show: what a shed frees shows in the RSS only
/// once the allocator has returned it (mimalloc's purge delay is 1 s), a tick later. Unless
/// the process grew past what it used at the last raise by a [`STILL_GROWING`]th of the
/// bound: then that raise was not enough (a burst of misses is still filling the L1 and its
/// requests' buffers).
pub const RAISE_EVERY: Duration = Duration::from_secs(2);

/// See [`RAISE_EVERY`].
const STILL_GROWING: u64 = 16;

/// Over the bound, the scale is raised so that the process would use this share of it: a
/// margin for the next tick's growth.
const AIM: f64 = 0.9;

/// Below this share of the bound the scale relaxes ...
const RELAX_UNDER: f64 = 0.8;

/// ... by this factor per tick (from [`MAX_SCALE`] back to 1 in about 10 s): slowly, since a
/// relaxed L1 grows back only as misses fill it, and a raise that follows sheds at random.
const RELAX_STEP: f64 = 0.95;

/// The scale for the next tick, from the bytes the gateway `used` (growth of RSS plus sealed
/// bodies), the `bound` and the current `scale`. Over the bound, proportional: the L1's share
/// shrinks by `used / (AIM * bound)`, which frees at most the entries' part of the excess (so
/// it never overshoots by itself, and repeated raises settle between [`RELAX_UNDER`] and the
/// bound); in that band it holds; below, it relaxes one step.
pub fn next_scale(used: u64, bound: u64, scale: f64) -> f64 {
    if bound == 0 {
        return 1.0;
    }
    let load = used as f64 / bound as f64;
    let next = if load > 1.0 {
        scale * load / AIM
    } else if load < RELAX_UNDER {
        scale * RELAX_STEP
    } else {
        scale
    };
    next.clamp(1.0, MAX_SCALE)
}

/// Governs `l1` so that the process's growth stays within `bound` bytes, every [`EVERY`] until
/// `stop`. Does nothing when the L1 is off, the bound is 0 or the RSS cannot be read (off
/// Linux).
pub fn start(l1: &L1, bound: u64, stop: &CancellationToken) {
    if !l1.enabled() || bound == 0 {
        return;
    }
    let Some(mut meter) = Meter::start() else {
        tracing::info!("memory governor off: the process's RSS cannot be read here");
        return;
    };
    let (l1, stop) = (l1.clone(), stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_raise = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = l1.took_in() => {}
            }
            let Some(used) = meter.used() else { continue };
            if let Some(keep) = govern(&l1, used, bound, Instant::now(), &mut last_raise) {
                // Two walks over the L1: off this runtime, which also serves the admin
                // listener and the health checks.
                let l1 = l1.clone();
                let shed = tokio::task::spawn_blocking(move || l1.shed_to(keep)).await;
                tracing::debug!(
                    used,
                    bound,
                    keep,
                    shed = shed.unwrap_or(0),
                    "L1 made to hold less"
                );
            }
        }
    });
}

/// The last raise of the scale: when, and what the process used then.
#[derive(Debug, Clone, Copy)]
struct Raise {
    at: Instant,
    used: u64,
}

/// One tick: sets the scale [`next_scale`] gives (a raise waits for the last one to show, see
/// [`RAISE_EVERY`]). After a raise, the bytes the L1 is to keep (what it holds past them is to
/// be shed).
fn govern(
    l1: &L1,
    used: u64,
    bound: u64,
    now: Instant,
    last_raise: &mut Option<Raise>,
) -> Option<u64> {
    let scale = l1.scale();
    let next = next_scale(used, bound, scale);
    if next < scale {
        l1.set_scale(next);
    }
    let settling = last_raise.is_some_and(|r| {
        now < r.at + RAISE_EVERY && used <= r.used.saturating_add(bound / STILL_GROWING)
    });
    if next <= scale || settling {
        return None;
    }
    *last_raise = Some(Raise { at: now, used });
    l1.set_scale(next);
    if next >= MAX_SCALE && scale < MAX_SCALE {
        tracing::warn!(
            used,
            bound,
            "memory over cache.l1_max_bytes with the L1 at its least (an eighth): what else the process holds needs the room"
        );
    }
    Some((l1.max_bytes() as f64 / next) as u64)
}

/// The gateway's memory use: growth of the RSS over the least seen, plus sealed bodies.
struct Meter {
    least_rss: u64,
}

impl Meter {
    fn start() -> Option<Meter> {
        Some(Meter { least_rss: rss()? })
    }

    fn used(&mut self) -> Option<u64> {
        let rss = rss()?;
        self.least_rss = self.least_rss.min(rss);
        Some(rss - self.least_rss + Sealed::live_bytes() as u64)
    }
}

/// The process's resident memory, bytes.
#[cfg(target_os = "linux")]
fn rss() -> Option<u64> {
    use std::io::Read as _;
    let mut buf = [0u8; 128];
    let n = std::fs::File::open("/proc/self/statm")
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    let pages = resident_pages(std::str::from_utf8(&buf[..n]).ok()?)?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// Not measured off Linux.
#[cfg(not(target_os = "linux"))]
fn rss() -> Option<u64> {
    None
}

/// The second field of `/proc/PID/statm`: resident pages.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn over_the_bound_the_scale_rises_in_proportion() {
        // 90 MiB used for 64: the L1 is to hold 90 / (0.9 * 64) times less.
        let next = next_scale(90 * MIB, 64 * MIB, 1.0);
        assert!((next - 90.0 / (0.9 * 64.0)).abs() < 1e-9, "{next}");
        // From a raised scale, the same load raises it further.
        assert!((next_scale(72 * MIB, 64 * MIB, 2.0) - 2.5).abs() < 1e-9);
    }

    #[test]
    fn the_scale_is_capped_and_never_under_one() {
        assert_eq!(next_scale(10_000 * MIB, 64 * MIB, 1.0), MAX_SCALE);
        assert_eq!(next_scale(100 * MIB, 64 * MIB, MAX_SCALE), MAX_SCALE);
        assert_eq!(next_scale(0, 64 * MIB, 1.0), 1.0);
        assert_eq!(next_scale(0, 64 * MIB, 1.05), 1.0);
    }

    #[test]
    fn between_relax_and_the_bound_it_holds_and_well_under_it_relaxes_a_step() {
        assert_eq!(next_scale(60 * MIB, 64 * MIB, 3.0), 3.0);
        assert_eq!(next_scale(64 * MIB, 64 * MIB, 3.0), 3.0);
        let relaxed = next_scale(32 * MIB, 64 * MIB, 4.0);
        assert!((relaxed - 3.8).abs() < 1e-9, "{relaxed}");
    }

    #[test]
    fn from_the_cap_back_to_one_within_about_ten_seconds_idle() {
        let mut scale = MAX_SCALE;
        let mut ticks = 0;
        while scale > 1.0 {
            scale = next_scale(0, 64 * MIB, scale);
            ticks += 1;
        }
        let took = ticks as f64 * EVERY.as_secs_f64();
        assert!((8.0..=11.0).contains(&took), "{ticks} ticks");
    }

    /// A model of the process: entries fill the L1 (its bound over the scale) and `other`
    /// bytes are held besides. Repeated raises settle between RELAX_UNDER and the bound.
    #[test]
    fn repeated_raises_settle_under_the_bound() {
        let bound = 64 * MIB;
        for other in [0, 8 * MIB, 24 * MIB, 40 * MIB] {
            let used = |scale: f64| (bound as f64 / scale) as u64 + other;
            let mut scale = 1.0;
            for _ in 0..20 {
                scale = next_scale(used(scale), bound, scale);
            }
            let load = used(scale) as f64 / bound as f64;
            assert!(
                (RELAX_UNDER..=1.0).contains(&load),
                "{other}: {load:.2} at {scale:.2}"
            );
        }
    }

    #[test]
    fn no_bound_no_scale() {
        assert_eq!(next_scale(100 * MIB, 0, 4.0), 1.0);
    }

    #[test]
    fn a_raise_waits_for_the_last_one_to_show_unless_still_growing_and_names_the_share_kept() {
        let l1 = L1::new(8 * MIB);
        let meta = |fresh_until_ms| crate::cache::entry::Meta {
            status: 200,
            headers: Vec::new(),
            render_epoch: 0,
            stored_at_ms: 0,
            fresh_until_ms,
            stale_until_ms: fresh_until_ms,
            stale_if_error_until_ms: fresh_until_ms,
            tags: Vec::new(),
            etag: String::new(),
            identity_len: 0,
            filled_by: String::new(),
        };
        for key in 0..200u128 {
            let body: Vec<u8> = (0..64 * 1024)
                .map(|i| (i * 31 + key as usize) as u8)
                .collect();
            let entry = crate::cache::entry::Entry::from_identity(meta(u64::MAX / 2), &body);
            l1.insert(key, std::sync::Arc::new(entry), 0);
        }
        let held = |l1: &L1| l1.size().1;
        assert!(held(&l1) > 6 * MIB, "{}", held(&l1));
        let (t0, mut last) = (Instant::now(), None);
        let keep = govern(&l1, 80 * MIB, 8 * MIB, t0, &mut last);
        assert_eq!(keep, Some(MIB), "an eighth");
        assert!(l1.scale() >= MAX_SCALE, "{}", l1.scale());
        assert!(l1.shed_to(MIB) > 5 * MIB);
        assert!(held(&l1) <= MIB, "shed to an eighth: {}", held(&l1));
        l1.set_scale(2.0);
        let keep = govern(&l1, 16 * MIB, 8 * MIB, t0 + RAISE_EVERY / 2, &mut last);
        assert_eq!(keep, None);
        assert_eq!(l1.scale(), 2.0, "no raise within RAISE_EVERY of the last");
        assert_eq!(
            govern(&l1, 0, 8 * MIB, t0 + RAISE_EVERY / 2, &mut last),
            None
        );
        assert!(l1.scale() < 2.0, "relaxing needs no wait");
        assert!(
            govern(&l1, 81 * MIB, 8 * MIB, t0 + RAISE_EVERY / 2, &mut last).is_some(),
            "still growing past the last raise's use: raised at once"
        );
        l1.set_scale(2.0);
        assert!(govern(&l1, 16 * MIB, 8 * MIB, t0 + RAISE_EVERY * 2, &mut last).is_some());
    }

    #[test]
    fn statm_gives_resident_pages() {
        assert_eq!(resident_pages("12345 678 90 1 0 2345 0\n"), Some(678));
        assert_eq!(resident_pages("12345"), None);
        assert_eq!(resident_pages(""), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_rss_is_read() {
        assert!(rss().is_some_and(|b| b > 0));
    }
}
