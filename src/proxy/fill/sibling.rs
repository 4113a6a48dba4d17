//! The page's other variant from the same render: after a refresh or re-warm regenerated an
//! App Router page's HTML (or the other way round), its RSC payload is read from the replica
//! that rendered it — an answer from the render just made — and kept with that render's time,
//! under a permit of its own, so a refresh of that variant elsewhere does not render again.

use std::sync::Arc;

use http::request::Parts;

use crate::app::{AppState, CacheState};
use crate::cache::entry::Entry;
use crate::cache::flight::{Done, FillPermit, LockAttempt};
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
/// when the sibling is being filled already; anything but a storable answer leaves its entry
/// as it is (it refreshes on its own).
pub(super) async fn read_sibling<'a>(
    app: &AppState,
    cache: &CacheState,
    sibling: Sibling<'a>,
    of: &Pending,
) -> SiblingRead<'a> {
    let skipped = SiblingRead::Done(SiblingFilled::Skipped);
    let Some(mut permit) = cache.flights.try_lead(sibling.key.hash) else {
        return skipped;
    };
    if let Some(shared) = cache.shared() {
        let hex = sibling.key.hex();
        if let Ok(LockAttempt::Contended) = permit.lock_fleet(shared.redis(), &hex, None).await {
            return skipped;
        }
    }
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
