//! The gateway's two clocks, and which one is for what.
//!
//! - [`monotonic_ms`]: milliseconds since this process first asked, from `Instant`. For
//!   deadlines that never leave the process: replica ejections, connection bounds
//!   (`server::conn`), the Redis circuit breaker, the admin's "open now?". It never jumps
//!   when the system clock is set, and it means nothing to another process.
//! - [`Clock`]: the wall clock in UNIX milliseconds, plus a test offset. For deadlines shared
//!   through the store: entry deadlines (`fresh_until`, `stale_until`, …) are read by every
//!   gateway, so they are absolute UNIX milliseconds, not monotonic instants. `cache/` never
//!   reads a clock (time is a parameter there); the request path asks this one for `now` and
//!   passes it down. One clock per gateway ([`crate::app::CacheState::clock`]), shared by its
//!   workers.
//!
//! [`system_ms`], [`unix_secs`] and [`since_epoch`] are the system clock without the offset:
//! for what is stamped once and only shown (log records, the fleet view's start time, the
//! `Date` header) or compared across gateways by whole days (the rollout, retention).
//!
//! [`Clock::advance`] moves this gateway's idea of `now` forward without waiting: the tests
//! cross freshness, stale-while-revalidate and stale-if-error deadlines with it instead of
//! sleeping through them (STYLE.md rule 10, "time is a parameter"). Nothing in the gateway
//! itself calls it, so in production the offset is zero and `now_ms` is the system clock plus
//! one relaxed load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the first call in this process: a cheap monotonic clock, kept in atomics
/// (an `Instant` does not fit one). For local timeouts, ejections and breakers only.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Wall-clock milliseconds since the UNIX epoch, plus an offset that only moves forward.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicU64,
}

impl Clock {
    /// Now, in UNIX milliseconds.
    pub fn now_ms(&self) -> u64 {
        system_ms().saturating_add(self.offset_ms.load(Relaxed))
    }

    /// Moves this clock `by` forward (never back: deadlines already handed out stay ordered).
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Relaxed);
    }
}

/// The system clock in UNIX milliseconds (0 before 1970, saturated far in the future).
pub fn system_ms() -> u64 {
    u64::try_from(since_epoch(SystemTime::now()).as_millis()).unwrap_or(u64::MAX)
}

/// `at` in whole UNIX seconds (0 before 1970).
#[inline]
pub fn unix_secs(at: SystemTime) -> u64 {
    since_epoch(at).as_secs()
}

/// How long after the UNIX epoch `at` is (zero before 1970): for a caller that wants the
/// seconds and their fraction of one reading.
#[inline]
pub fn since_epoch(at: SystemTime) -> Duration {
    at.duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_moves_now_forward_by_exactly_that_much() {
        let clock = Clock::default();
        let before = clock.now_ms();
        clock.advance(Duration::from_secs(3_600));
        let after = clock.now_ms();
        // The system clock moved a little too; the offset is exactly one hour.
        assert!(after >= before + 3_600_000, "{before} → {after}");
        assert!(after < before + 3_600_000 + 60_000, "{before} → {after}");
        assert!(clock.now_ms().abs_diff(system_ms() + 3_600_000) < 1_000);
    }

    #[test]
    fn times_before_1970_read_as_the_epoch() {
        let early = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(unix_secs(early), 0);
        assert_eq!(since_epoch(early), Duration::ZERO);
        assert_eq!(unix_secs(UNIX_EPOCH + Duration::from_millis(2_500)), 2);
    }

    #[test]
    fn the_monotonic_clock_never_goes_back() {
        let a = monotonic_ms();
        let b = monotonic_ms();
        assert!(b >= a);
    }
}
