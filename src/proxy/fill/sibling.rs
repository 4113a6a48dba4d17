//! The page's other variant from the same render: after a refresh or re-warm regenerated an
//! App Router page's HTML (or the other way round), its RSC payload is read from the replica
//! that rendered it — an answer from the render just made — and kept with that render's time,
//! under a permit of its own, so a refresh of that variant elsewhere does not render again.

use std::sync::Arc;

use http::request::Parts;
use tokio::time::Instant;

use crate::app::{AppState, CacheState};
use crate::cache::entry::Entry;
use crate::cache::flight::{Done, FillPermit, Joined, LockAttempt};
use crate::cache::key::{CacheKey, Variant};

use super::{Admission, Copied, Pass, Pending, copy, request};

/// How filling a [`Sibling`] ended.
#[derive(Debug)]
pub enum SiblingFilled {
    /// Stored, with the render's time.
    Stored(Arc<Entry>),
    /// Not stored.
    Passed {
        /// The replica's status.
        status: http::StatusCode,
        /// Why.
        why: Pass,
    },
    /// Being filled on this gateway already, or the replica could not be asked.
    Skipped,
}

/// The other variant of a page, filled from the render a [`super::Job`] just made.
#[derive(Debug)]
pub struct Sibling<'a> {
    /// Its key.
    pub key: &'a CacheKey,
    /// Its variant.
    pub variant: &'a Variant,
    /// Its upstream head.
    pub head: Parts,
}

/// A page's other variant, read from the replica that just rendered the page.
pub(super) enum SiblingRead<'a> {
    /// Read whole, with the render's time; kept together with the page's entry, then its
    /// permit is released.
    Read {
        key: &'a CacheKey,
        entry: Arc<Entry>,
        ttl: std::time::Duration,
        permit: FillPermit,
    },
    /// Nothing to keep.
    Done(SiblingFilled),
}

impl SiblingRead<'_> {
    /// Wakes and releases the sibling's permit once it is kept.
    pub(super) async fn finish(self, app: &AppState) -> SiblingFilled {
        match self {
            SiblingRead::Read { entry, permit, .. } => {
                app.metrics.fills_siblings.inc();
                permit.wake(Done::Filled(Arc::clone(&entry)));
                permit.release().await;
                SiblingFilled::Stored(entry)
            }
            SiblingRead::Done(filled) => filled,
        }
    }
}

/// Reads the page's other variant from the replica that just rendered it (it answers from the
/// render it just made), with that render's time, under a permit of its own (local and fleet):
/// a refresh of that variant elsewhere waits for this one instead of rendering again. Skipped
/// when the store already holds a render of the sibling at least as new, or when a fill of it
/// in flight outlasts `coalesce.wait_timeout`; anything but a storable answer leaves its entry
/// as it is (it refreshes on its own).
pub(super) async fn read_sibling<'a>(
    app: &AppState,
    cache: &CacheState,
    sibling: Sibling<'a>,
    of: &Pending,
) -> SiblingRead<'a> {
    let skipped = SiblingRead::Done(SiblingFilled::Skipped);
    let Some(permit) =
        permit_after_fills_in_flight(app, cache, sibling.key, of.rendered_at()).await
    else {
        return skipped;
    };
    let to = Some(of.replica());
    let answer = request(
        app,
        cache,
        sibling.key,
        sibling.head,
        sibling.variant,
        false,
        to,
    );
    let (mut pending, body) = match answer.await {
        Ok(Admission::Storable(p, b)) => (p, b),
        Ok(Admission::Pass { response, why }) => {
            let status = response.status();
            return SiblingRead::Done(SiblingFilled::Passed { status, why });
        }
        Err(_) => return skipped,
    };
    pending.same_render_as(of);
    match copy(body, None, cache.cfg().max_entry_bytes, || {}).await {
        Ok(Copied::Whole(identity)) => SiblingRead::Read {
            key: sibling.key,
            entry: pending.entry(identity, &cache.cfg(), cache.seal_fills()),
            ttl: pending.ttl(),
            permit,
        },
        Ok(Copied::TooLarge) => SiblingRead::Done(SiblingFilled::Passed {
            status: pending.status(),
            why: Pass::Uncacheable,
        }),
        Err(_) => skipped,
    }
}

/// The sibling's permit (local and fleet), taken once the fills of it in flight, here or on
/// another gateway, have ended. Such a fill (a miss asked before this render) brings an older
/// render: skipping the sibling for it would leave the page's HTML and RSC payload from two
/// renders until the next expiry. `None` when a render at least as new as `rendered_at` is
/// stored meanwhile, or the wait passes `coalesce.wait_timeout`. Locks are taken HTML first,
/// then RSC, by every fill with a sibling, so two such waits never wait on each other.
async fn permit_after_fills_in_flight(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    rendered_at: u64,
) -> Option<FillPermit> {
    let cfg = cache.flights.cfg();
    let deadline = Instant::now() + cfg.wait_timeout;
    let mut permit = loop {
        match cache.flights.join(key.hash) {
            Joined::Lead(permit) => break permit,
            Joined::Follow(fill) => match tokio::time::timeout_at(deadline, fill.done()).await {
                Ok(Done::Filled(entry)) if entry.meta.stored_at_ms >= rendered_at => return None,
                Ok(_) => continue,
                Err(_) => return None,
            },
        }
    };
    let Some(shared) = cache.shared() else {
        return Some(permit);
    };
    let hex = key.hex();
    // Registered before the first attempt, so the holder's release is not missed.
    let released = permit.listen();
    let mut contended = false;
    loop {
        match permit
            .lock_fleet(shared.redis(), &hex, Some(rendered_at))
            .await
        {
            Ok(LockAttempt::Contended) if !contended => {
                contended = true;
                app.metrics.lock_contended.inc();
            }
            Ok(LockAttempt::Contended) => {}
            Ok(LockAttempt::Held) => return Some(permit),
            Ok(LockAttempt::Newer) => return None,
            // Redis did not answer: this gateway's single-flight only, as every fill does.
            Err(_) => return Some(permit),
        }
        let poll = cfg
            .poll_interval
            .min(deadline.saturating_duration_since(Instant::now()));
        if poll.is_zero() {
            return None;
        }
        let _ = tokio::time::timeout(poll, released.notified()).await;
    }
}
