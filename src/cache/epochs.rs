//! Invalidation by epochs, not deletes (DESIGN.md "Invalidation"): which tags were invalidated
//! when, and whether an entry is still valid.
//!
//! An invalidation bumps one global counter (the epoch) and records `tag → (epoch, mode)`; an
//! entry carries the epoch read before its render started and its tags, and is invalid when
//! one of its tags was invalidated at a newer epoch. Applying one costs O(1) whatever the
//! number of entries; checking an entry costs one atomic load when nothing newer than it was
//! invalidated, and one map lookup per tag otherwise.
//!
//! This module holds this gateway's copy of the map (filled from Redis at start and after each
//! reconnect, updated from the bus, or applied directly with the in-process store): the records
//! of the last snapshot loaded, [`Frozen`] where they lie in its bytes, and a map of the others.
//! No sockets, no clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwapOption;

use super::frozen::Frozen;

/// How an invalidated entry is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Served stale while one (coalesced) refresh runs.
    Soft,
    /// A miss: the next request waits for a render.
    Hard,
}

impl Mode {
    /// `soft` or `hard`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Soft => "soft",
            Mode::Hard => "hard",
        }
    }

    /// Parses `soft` / `hard`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "soft" => Some(Mode::Soft),
            "hard" => Some(Mode::Hard),
            _ => None,
        }
    }
}

/// What the invalidations say about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Not invalidated since its render.
    Valid,
    /// Invalidated softly: stale.
    Stale,
    /// Invalidated hard: unusable.
    Invalid,
}

/// The tag → (epoch, mode) map of this gateway.
#[derive(Debug, Default)]
pub struct Epochs {
    /// The newest epoch known (of any invalidation, or the store's counter).
    current: AtomicU64,
    /// The newest epoch recorded in `tags` (0: none): entries rendered at or after it are
    /// valid without a lookup.
    newest_recorded: AtomicU64,
    /// Per tag: the newest soft and the newest hard epoch (0: none). Kept apart, so a soft
    /// purge after a hard one never brings back entries the hard one removed.
    tags: RwLock<HashMap<String, Newest>>,
    /// The records of the last snapshot loaded (a tag's newest epochs are the greater of these
    /// and `tags`'s).
    frozen: ArcSwapOption<Frozen>,
    /// Bumped each time the map may have missed invalidations (a shared store at start, every
    /// bus reconnect): see [`Epochs::unsynced`].
    sync_wanted: AtomicU64,
    /// The newest generation a complete load was made for: the map is complete when it is
    /// `sync_wanted`.
    sync_done: AtomicU64,
    /// Told when a load completes ([`Epochs::first_sync`]).
    loaded: tokio::sync::Notify,
}

/// The newest invalidation epochs of one tag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Newest {
    soft: u64,
    hard: u64,
}

impl Epochs {
    /// The epoch a render starting now records in its entry.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// Records an invalidation of `tags` at `epoch` (from the bus, the store or a local purge).
    /// An older record for a tag never replaces a newer one, so messages may arrive in any
    /// order and twice.
    pub fn record<'a>(&self, epoch: u64, mode: Mode, tags: impl IntoIterator<Item = &'a str>) {
        self.record_all(tags.into_iter().map(|tag| (tag, mode, epoch)));
        // Even for no tags: the epoch was taken.
        self.newest_recorded.fetch_max(epoch, Ordering::AcqRel);
        self.current.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Records many invalidations, each `(tag, mode, epoch)`, under one lock (a page of a
    /// load): as [`Epochs::record`], record by record.
    pub fn record_all<'a>(&self, records: impl IntoIterator<Item = (&'a str, Mode, u64)>) {
        let mut newest_recorded = 0;
        {
            let mut map = crate::sync::write(&self.tags);
            for (tag, mode, epoch) in records {
                let newest = match map.get_mut(tag) {
                    Some(n) => n,
                    None => map.entry(tag.to_owned()).or_default(),
                };
                let slot = match mode {
                    Mode::Soft => &mut newest.soft,
                    Mode::Hard => &mut newest.hard,
                };
                *slot = (*slot).max(epoch);
                newest_recorded = newest_recorded.max(epoch);
            }
        }
        self.newest_recorded
            .fetch_max(newest_recorded, Ordering::AcqRel);
        self.current.fetch_max(newest_recorded, Ordering::AcqRel);
    }

    /// Makes room for `tags` tags in all (a load that knows how many it brings), so the map
    /// is not grown, and rehashed under its lock, many times on the way.
    pub fn expect_tags(&self, tags: usize) {
        let mut map = crate::sync::write(&self.tags);
        let more = tags.saturating_sub(map.len());
        map.reserve(more);
    }

    /// Raises the current epoch (the store's counter, read at start).
    pub fn observe(&self, epoch: u64) {
        self.current.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Takes the records of a snapshot, in place of the previous snapshot's. A newer snapshot
    /// holds every record an older one did but pruned ones, unless Redis lost some (restored
    /// from an older copy): what the previous one knew and this one does not stays, in the map,
    /// as a load always kept what it knew (the pruned ones go at the next prune).
    pub fn freeze(&self, frozen: Frozen) {
        if let Some(old) = self.frozen.load_full() {
            self.record_all(old.iter().filter(|&(tag, mode, epoch)| {
                let (soft, hard) = frozen.get(tag);
                epoch > if mode == Mode::Hard { hard } else { soft }
            }));
        }
        let newest = frozen.newest();
        // Before the epochs: a check that sees them newer looks the snapshot up.
        self.frozen.store(Some(Arc::new(frozen)));
        self.newest_recorded.fetch_max(newest, Ordering::AcqRel);
        self.current.fetch_max(newest, Ordering::AcqRel);
    }

    /// Whether an entry rendered at `render_epoch` with `tags` is still valid.
    pub fn check<'a>(
        &self,
        render_epoch: u64,
        tags: impl IntoIterator<Item = &'a str>,
    ) -> Validity {
        if self.newest_recorded.load(Ordering::Acquire) <= render_epoch {
            return Validity::Valid;
        }
        let map = crate::sync::read(&self.tags);
        let frozen = self.frozen.load();
        let mut worst = Validity::Valid;
        for tag in tags {
            let mut n = map.get(tag).copied().unwrap_or_default();
            if let Some(f) = frozen.as_deref() {
                let (soft, hard) = f.get(tag);
                n.soft = n.soft.max(soft);
                n.hard = n.hard.max(hard);
            }
            if n.hard > render_epoch {
                return Validity::Invalid;
            }
            if n.soft > render_epoch {
                worst = Validity::Stale;
            }
        }
        worst
    }

    /// Number of tags recorded (dashboard): a tag both in the snapshot and recorded since
    /// counts twice, as does a tag with a soft and a hard record in the snapshot.
    pub fn len(&self) -> usize {
        let frozen = self.frozen.load().as_deref().map_or(0, Frozen::records);
        crate::sync::read(&self.tags).len() + frozen
    }

    /// Whether nothing was ever invalidated.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// From now on the map may miss invalidations recorded elsewhere (it starts empty in front
    /// of a shared store; the bus reconnected and messages may have been lost), until a load
    /// of every invalidation begun after this call completes: pass the returned generation to
    /// [`Epochs::synced`] then. Until then [`Epochs::is_synced`] is false, and an entry the
    /// map cannot judge must not be served (the caller reads no shared entry).
    pub fn unsynced(&self) -> u64 {
        self.sync_wanted.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A load begun after [`Epochs::unsynced`] returned `generation` completed. A load for an
    /// older generation completing late changes nothing.
    pub fn synced(&self, generation: u64) {
        self.sync_done.fetch_max(generation, Ordering::AcqRel);
        self.loaded.notify_waiters();
    }

    /// Resolves once a complete load was made ([`Epochs::was_ever_synced`]).
    pub async fn first_sync(&self) {
        loop {
            let loaded = self.loaded.notified();
            tokio::pin!(loaded);
            loaded.as_mut().enable();
            if self.was_ever_synced() {
                return;
            }
            loaded.await;
        }
    }

    /// Whether the map holds every invalidation there is (always, until [`Epochs::unsynced`]).
    pub fn is_synced(&self) -> bool {
        self.sync_done.load(Ordering::Acquire) >= self.sync_wanted.load(Ordering::Acquire)
    }

    /// Whether a complete load was made at least once.
    pub fn was_ever_synced(&self) -> bool {
        self.sync_done.load(Ordering::Acquire) > 0 || self.sync_wanted.load(Ordering::Acquire) == 0
    }

    /// Drops records older than `epoch` (entries rendered before it have expired): the
    /// snapshot's once all of them are.
    pub fn forget_before(&self, epoch: u64) {
        self.frozen.rcu(|f| match f {
            Some(f) if f.newest() < epoch => None,
            other => other.clone(),
        });
        let mut map = crate::sync::write(&self.tags);
        map.retain(|_, n| n.soft.max(n.hard) >= epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_invalid_only_for_newer_invalidations_of_its_tags() {
        let e = Epochs::default();
        assert_eq!(e.check(0, ["path:/a"]), Validity::Valid);
        e.record(5, Mode::Soft, ["path:/a"]);
        assert_eq!(e.current(), 5);
        assert_eq!(e.check(4, ["path:/a", "x"]), Validity::Stale);
        assert_eq!(e.check(5, ["path:/a"]), Validity::Valid, "rendered after");
        assert_eq!(e.check(4, ["path:/b"]), Validity::Valid, "other tag");
        e.record(6, Mode::Hard, ["*"]);
        assert_eq!(e.check(5, ["path:/a", "*"]), Validity::Invalid);
    }

    #[test]
    fn a_soft_purge_never_revives_what_a_hard_one_removed() {
        let e = Epochs::default();
        e.record(5, Mode::Hard, ["t"]);
        e.record(9, Mode::Soft, ["t"]);
        assert_eq!(
            e.check(4, ["t"]),
            Validity::Invalid,
            "rendered before the hard purge"
        );
        assert_eq!(e.check(6, ["t"]), Validity::Stale, "between the two");
        assert_eq!(e.check(9, ["t"]), Validity::Valid);
    }

    #[test]
    fn records_are_monotonic_per_tag_whatever_the_order() {
        let e = Epochs::default();
        e.record(9, Mode::Hard, ["t"]);
        e.record(3, Mode::Soft, ["t"]);
        assert_eq!(
            e.check(5, ["t"]),
            Validity::Invalid,
            "the older record lost"
        );
        e.observe(2);
        assert_eq!(e.current(), 9);
        e.forget_before(10);
        assert!(e.is_empty());
    }

    #[test]
    fn a_batch_is_recorded_as_its_records_one_by_one() {
        let (batch, single) = (Epochs::default(), Epochs::default());
        let records = [
            ("t", Mode::Hard, 9),
            ("t", Mode::Soft, 3),
            ("u", Mode::Soft, 4),
        ];
        batch.expect_tags(2);
        batch.record_all(records);
        for (tag, mode, epoch) in records {
            single.record(epoch, mode, [tag]);
        }
        for e in [&batch, &single] {
            assert_eq!(e.current(), 9);
            assert_eq!(e.check(5, ["t"]), Validity::Invalid);
            assert_eq!(e.check(3, ["u"]), Validity::Stale);
        }
    }

    #[test]
    fn a_snapshots_records_count_with_the_map_and_go_once_all_are_old() {
        use crate::invalidate::snapshot::{Builder, Snapshot};
        let mut b = Builder::new(10);
        b.push("a", Mode::Hard, 5);
        b.push("b", Mode::Soft, 8);
        let (_, bytes) = b.finish().expect("small");
        let snap = Snapshot::decode(&bytes).expect("decodes");
        let e = Epochs::default();
        e.freeze(snap.freeze(bytes.clone()).expect("fits"));
        assert_eq!(e.current(), 8);
        assert_eq!(e.check(4, ["x", "a"]), Validity::Invalid);
        assert_eq!(e.check(7, ["b"]), Validity::Stale);
        assert_eq!(e.check(5, ["a"]), Validity::Valid);

        e.record(9, Mode::Soft, ["a"]);
        assert_eq!(
            e.check(4, ["a"]),
            Validity::Invalid,
            "the snapshot's hard record still counts"
        );
        assert_eq!(e.check(6, ["a"]), Validity::Stale);
        assert_eq!(e.len(), 3);
        // A newer snapshot without `a`'s hard record (Redis restored from an older copy).
        let mut b = Builder::new(12);
        b.push("b", Mode::Soft, 8);
        let (_, newer) = b.finish().expect("small");
        let snap = Snapshot::decode(&newer).expect("decodes");
        e.freeze(snap.freeze(newer.clone()).expect("fits"));
        assert_eq!(
            e.check(4, ["a"]),
            Validity::Invalid,
            "what the older one knew stays"
        );
        assert_eq!(e.len(), 2, "a in the map, b in the snapshot");
        e.forget_before(8);
        assert_eq!(
            e.check(7, ["b"]),
            Validity::Stale,
            "one of its records is recent"
        );
        e.forget_before(9);
        assert_eq!(e.check(7, ["b"]), Validity::Valid, "all are old: gone");
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn only_the_load_for_the_latest_gap_makes_the_map_complete_again() {
        let e = Epochs::default();
        assert!(e.is_synced() && e.was_ever_synced(), "nothing to miss yet");
        let start = e.unsynced();
        assert!(!e.is_synced() && !e.was_ever_synced());
        let reconnect = e.unsynced();
        e.synced(start);
        assert!(
            !e.is_synced(),
            "a load begun before the second gap is not enough"
        );
        assert!(e.was_ever_synced());
        e.synced(reconnect);
        assert!(e.is_synced());
        e.synced(start);
        assert!(e.is_synced(), "a late, older load changes nothing");
    }
}
