//! The wall clock that cache deadlines are read against.
//!
//! Entry deadlines (`fresh_until`, `stale_until`, …) are shared by every gateway through the
//! store, so they are absolute UNIX milliseconds, not monotonic instants. `cache/` never reads a
//! clock (time is a parameter there); the request path asks this one for `now` and passes it
//! down. One clock per gateway ([`crate::app::CacheState::clock`]), shared by its workers.
//!
//! [`Clock::advance`] moves this gateway's idea of `now` forward without waiting: the tests
//! cross freshness, stale-while-revalidate and stale-if-error deadlines with it instead of
//! sleeping through them (STYLE.md rule 10, "time is a parameter"). Nothing in the gateway
//! itself calls it, so in production the offset is zero and `now_ms` is the system clock plus
//! one relaxed load.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
}
