//! Loading every invalidation record into this gateway's map, at start and after every bus
//! reconnect (`super::fleet`). The bus is subscribed first, so what is written meanwhile
//! arrives as messages: a load has to bring what was written before it began.
//!
//! The fast way costs O(snapshot) + O(records since): one read of the snapshot
//! (`super::snapshot`), then the index `isr:{isr:inv}:z` from the snapshot's epoch on. It is
//! taken only when the marks say it is complete ([`Marks::complete`]): the index is written by
//! today's library (both function names), but an older library, loaded again by an older
//! gateway during a rolling upgrade, writes records without it. Then, and when the snapshot is
//! damaged, the load scans the whole hash a page at a time as it always did (`super::scan`),
//! and leaves a snapshot for the next start ([`Loaded::leave_snapshot`]). Correctness never
//! depends on the index; only the time a start takes does.
//!
//! The marks, fields of `isr:inv` next to the counter `_epoch` (a tag's fields start with `s:`
//! or `h:`, so none collides): `_indexed`, the epoch of the newest write that went into the
//! index; `_unindexed`, the newest epoch seen written without it (`invalidate.lua`);
//! `_snapped`, the snapshot's epoch, up to which the index was trimmed. The index is a key of
//! its own, which an `allkeys-lru` Redis may evict: a write that finds it gone when it should
//! hold something raises `_unindexed`, and a load that finds it without the newest indexed
//! write scans.

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::apply::load_library;
use super::scan::{self, PAGE, parse_field, shrinking};
use super::snapshot::{self, Snapshot};
use crate::cache::epochs::Epochs;
use crate::cache::keys::{INDEX_KEY, INV_KEY};
use crate::cache::store::{RedisStore, StoreError};

/// Tries of the fast way when a new snapshot replaced the one being read.
const FAST_TRIES: usize = 3;

const MARK_FIELDS: [&str; 4] = ["_epoch", "_indexed", "_unindexed", "_snapped"];

/// How a load found the records (logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The snapshot and the index after it.
    Snapshot,
    /// The whole hash: records were written without the index since the snapshot (an older
    /// library), or there is no snapshot yet in front of records from before the index.
    ScanUnindexed,
    /// The whole hash: the snapshot or a mark does not parse.
    ScanDamaged,
    /// The whole hash: newer snapshots kept replacing the one being read.
    ScanRaced,
    /// The whole hash: the index lacks its newest records (evicted or deleted).
    ScanIndexLost,
    /// The whole hash: reading the snapshot or the index failed.
    ScanFailed,
}

impl Via {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Snapshot => "snapshot",
            Via::ScanUnindexed => "scan_unindexed",
            Via::ScanDamaged => "scan_damaged",
            Via::ScanRaced => "scan_raced",
            Via::ScanIndexLost => "scan_index_lost",
            Via::ScanFailed => "scan_failed",
        }
    }
}

/// What a load did.
#[derive(Debug)]
pub struct Loaded {
    /// Records applied.
    pub records: usize,
    /// How.
    pub via: Via,
    /// A snapshot the scan made, with its epoch, for the next start.
    snapshot: Option<(u64, Bytes)>,
}

impl Loaded {
    /// Writes the snapshot the scan made (after the map is marked complete: nothing waits for
    /// it). A failure only costs the next start a scan.
    pub async fn leave_snapshot(self, redis: &RedisStore) {
        let Some((epoch, bytes)) = self.snapshot else {
            return;
        };
        match snapshot::write(redis, &bytes, epoch).await {
            Ok(swapped) => {
                tracing::debug!(
                    epoch,
                    bytes = bytes.len(),
                    swapped,
                    "invalidation snapshot written"
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write the invalidation snapshot; the next start scans isr:inv")
            }
        }
    }
}

/// Loads the library (so replicas can call it) and every recorded invalidation from the shared
/// `redis` into `epochs` (without Redis there is nothing to load: this gateway's map is all
/// there is). Invalidations applied meanwhile reach `epochs` from the bus too, and a record
/// only ever moves a tag's epoch forward, so the order does not matter.
pub async fn load(redis: &RedisStore, epochs: &Epochs) -> Result<Loaded, StoreError> {
    load_library(redis).await?;
    let mut why = Via::ScanRaced;
    for _ in 0..FAST_TRIES {
        match from_snapshot(redis, epochs).await {
            Ok(records) => {
                return Ok(Loaded {
                    records,
                    via: Via::Snapshot,
                    snapshot: None,
                });
            }
            Err(Via::ScanRaced) => {}
            Err(other) => {
                why = other;
                break;
            }
        }
    }
    let (records, snapshot) = scan::load_all(redis, epochs).await?;
    Ok(Loaded {
        records,
        via: why,
        snapshot,
    })
}

/// The fast way; `Err` says why the hash must be scanned instead.
async fn from_snapshot(redis: &RedisStore, epochs: &Epochs) -> Result<usize, Via> {
    let failed = |e: StoreError| {
        tracing::debug!(error = %e, "reading the invalidation snapshot failed; scanning isr:inv");
        Via::ScanFailed
    };
    let marks = read_marks(redis).await.map_err(failed)?.ok_or_else(|| {
        tracing::warn!("a mark of isr:inv (_epoch, _indexed, _unindexed, _snapped) is not a number; scanning isr:inv");
        Via::ScanDamaged
    })?;
    if !marks.complete() {
        return Err(Via::ScanUnindexed);
    }
    epochs.observe(marks.counter);
    let mut records = 0;
    if marks.snapped > 0 {
        let bytes = snapshot::read(redis).await.map_err(failed)?;
        let snap = match bytes.as_deref().map(Snapshot::decode) {
            Some(Ok(snap)) if snap.epoch == marks.snapped => snap,
            Some(Ok(_)) => return Err(Via::ScanRaced),
            // Damaged, or pieces of two snapshots: a new `_snapped` tells them apart.
            other => {
                if snapped(redis).await.map_err(failed)? != marks.snapped {
                    return Err(Via::ScanRaced);
                }
                let why = other
                    .and_then(Result::err)
                    .map_or("missing", |e| e.as_str());
                tracing::warn!(
                    why,
                    "the invalidation snapshot is unusable; scanning isr:inv (and writing a new one)"
                );
                return Err(Via::ScanDamaged);
            }
        };
        if snap.newest > marks.counter {
            tracing::warn!(
                newest = snap.newest,
                counter = marks.counter,
                "the invalidation snapshot holds epochs past the counter; scanning isr:inv"
            );
            return Err(Via::ScanDamaged);
        }
        let frozen = bytes.clone().and_then(|b| snap.freeze(b));
        epochs.freeze(frozen.ok_or(Via::ScanDamaged)?);
        records = snap.records;
    }
    let (since, newest) = read_index(redis, epochs, marks.snapped)
        .await
        .map_err(failed)?;
    // A snapshot swapped in meanwhile trimmed the index: what was past ours may be gone.
    if snapped(redis).await.map_err(failed)? != marks.snapped {
        return Err(Via::ScanRaced);
    }
    // The newest indexed write's records are still there (only a newer write of the same tag
    // moves one, further up), unless the index was evicted or deleted since.
    if marks.indexed > marks.snapped && newest < marks.indexed {
        tracing::warn!(
            indexed = marks.indexed,
            newest,
            "the invalidation index lacks its newest records (evicted or deleted?); scanning isr:inv"
        );
        return Err(Via::ScanIndexLost);
    }
    Ok(records + since)
}

/// Applies the index's records after epoch `after`, a page at a time; how many, and the
/// newest epoch read (0: none).
async fn read_index(
    redis: &RedisStore,
    epochs: &Epochs,
    after: u64,
) -> Result<(usize, u64), StoreError> {
    let (mut count, mut n, mut newest) = (PAGE as usize, 0, 0);
    let mut min = format!("({after}");
    // Members of the last page's last score, read again at the start of the next page; the
    // page size that ended on the same score as the page before (one invalidation's tags).
    let (mut again, mut stalled) = (0, None);
    loop {
        let (asked, page) = shrinking(count, 100, |c| index_page(redis, &min, c)).await?;
        epochs.record_all(page.iter().filter_map(|(field, score)| {
            let epoch = score_epoch(*score)?;
            let (tag, mode) = parse_field(field)?;
            Some((tag, mode, epoch))
        }));
        n += page.len().saturating_sub(again);
        let Some(&(_, last)) = page.last() else {
            return Ok((n, newest));
        };
        again = page.iter().rev().take_while(|(_, s)| *s == last).count();
        newest = newest.max(score_epoch(last).unwrap_or(0));
        if page.len() < asked {
            return Ok((n, newest));
        }
        // The next page from this score on, again (a member of it may not have been read);
        // a page of one score only: one invalidation of more tags than a page, a larger page.
        let next = last.to_string();
        if next == min {
            // Not even a larger page came back in time: give up (the caller scans).
            if stalled.is_some_and(|s| asked <= s) {
                return Err(StoreError::Unexpected(
                    "an index page of one epoch too large",
                ));
            }
            (stalled, count) = (Some(asked), asked * 2);
        } else {
            (stalled, count) = (None, PAGE as usize);
        }
        min = next;
    }
}

/// Up to `count` members of the index from score `min` (`(` for after), with their scores.
async fn index_page(
    redis: &RedisStore,
    min: &str,
    count: usize,
) -> Result<Vec<(String, f64)>, StoreError> {
    let zrange = CustomCommand::new_static("ZRANGEBYSCORE", ClusterHash::FirstKey, false);
    let args = vec![
        INDEX_KEY.to_owned(),
        min.to_owned(),
        "+inf".to_owned(),
        "WITHSCORES".to_owned(),
        "LIMIT".to_owned(),
        "0".to_owned(),
        count.to_string(),
    ];
    redis
        .bounded(redis.pool().next().custom(zrange, args))
        .await
}

/// An index score as an epoch: a whole number of ms (Redis keeps them exactly below 2^53).
fn score_epoch(score: f64) -> Option<u64> {
    ((0.0..9.0e15).contains(&score) && score.fract() == 0.0).then_some(score as u64)
}

/// The marks of `isr:inv` (the module's doc), each 0 when missing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marks {
    /// `_epoch`: the newest epoch given.
    pub counter: u64,
    /// `_indexed`.
    pub indexed: u64,
    /// `_unindexed`.
    pub unindexed: u64,
    /// `_snapped`.
    pub snapped: u64,
}

impl Marks {
    /// `None` when one is there but not a number.
    fn parse(values: &[Option<String>]) -> Option<Marks> {
        let num = |i: usize| match values.get(i) {
            Some(Some(v)) => v.parse().ok(),
            _ => Some(0),
        };
        Some(Marks {
            counter: num(0)?,
            indexed: num(1)?,
            unindexed: num(2)?,
            snapped: num(3)?,
        })
    }

    /// The newest epoch of a record that may be missing from the index (0: none). A write
    /// without the index moves the counter past `_indexed`; the next indexed write moves
    /// `_unindexed` up to it.
    pub fn unindexed(&self) -> u64 {
        if self.counter > self.indexed {
            self.counter.max(self.unindexed)
        } else {
            self.unindexed
        }
    }

    /// Whether the snapshot and the index after it hold every record.
    pub fn complete(&self) -> bool {
        self.unindexed() <= self.snapped
    }
}

/// The marks, `None` when one does not parse.
pub(crate) async fn read_marks(redis: &RedisStore) -> Result<Option<Marks>, StoreError> {
    let values: Vec<Option<String>> = redis
        .bounded(redis.pool().next().hmget(INV_KEY, MARK_FIELDS.to_vec()))
        .await?;
    Ok(Marks::parse(&values))
}

/// `_snapped` as it is now (0 when missing or not a number: never equal to a snapshot's).
async fn snapped(redis: &RedisStore) -> Result<u64, StoreError> {
    let v: Option<String> = redis
        .bounded(redis.pool().next().hget(INV_KEY, MARK_FIELDS[3]))
        .await?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(counter: u64, indexed: u64, unindexed: u64, snapped: u64) -> Marks {
        Marks {
            counter,
            indexed,
            unindexed,
            snapped,
        }
    }

    #[test]
    fn the_index_is_trusted_only_when_no_write_since_the_snapshot_missed_it() {
        assert!(marks(0, 0, 0, 0).complete(), "an empty store");
        assert!(
            marks(9, 9, 0, 0).complete(),
            "every write indexed, no snapshot yet"
        );
        assert!(
            !marks(9, 0, 0, 0).complete(),
            "records from before the index"
        );
        assert!(marks(9, 0, 0, 9).complete(), "... all in the snapshot");
        assert!(
            !marks(12, 10, 0, 10).complete(),
            "the newest write missed the index"
        );
        assert!(
            !marks(12, 12, 11, 10).complete(),
            "an older one did (seen by the next)"
        );
        assert!(
            marks(12, 12, 11, 11).complete(),
            "... and it is in the snapshot"
        );
    }

    #[test]
    fn a_mark_that_is_not_a_number_is_refused() {
        let v = |s: &[Option<&str>]| s.iter().map(|x| x.map(str::to_owned)).collect::<Vec<_>>();
        assert_eq!(
            Marks::parse(&v(&[Some("5"), None, None, Some("4")])),
            Some(marks(5, 0, 0, 4))
        );
        assert_eq!(Marks::parse(&v(&[Some("5"), Some("x"), None, None])), None);
    }

    #[test]
    fn scores_become_epochs_only_when_whole() {
        assert_eq!(score_epoch(1_700_000_000_000.0), Some(1_700_000_000_000));
        for s in [f64::NAN, f64::INFINITY, -1.0, 1.5, 1e20] {
            assert_eq!(score_epoch(s), None, "{s}");
        }
    }
}
