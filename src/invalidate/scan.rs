//! The whole of `isr:inv`, a page at a time: the load that cannot trust the snapshot and the
//! index (`super::load`) and the pruner's pass (`super::retention`), each making a snapshot of
//! what it read (`super::snapshot`). The page helpers serve the index and the snapshot's pieces
//! too: what does not come back within `redis.command_timeout` is asked again, smaller.

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::snapshot;
use crate::cache::epochs::{Epochs, Mode};
use crate::cache::keys::INV_KEY;
use crate::cache::store::{RedisStore, StoreError};

/// Fields (or index members) asked for per page: each page is one command bounded by
/// `redis.command_timeout`, so a hash of any size loads (a single `HGETALL` of 400,000 fields
/// took 600 ms, past the timeout, and was retried forever).
pub(crate) const PAGE: u32 = 10_000;

/// The counter field of `isr:inv`.
const EPOCH_FIELD: &str = "_epoch";

/// Scans the whole hash into `epochs`: how many records, and a snapshot of them for the next
/// start (unless the one there is newer).
pub(crate) async fn load_all(
    redis: &RedisStore,
    epochs: &Epochs,
) -> Result<(usize, Option<(u64, Bytes)>), StoreError> {
    let mut snap = snapshot::begin(redis).await?;
    // Room for them all at once: a map grown record by record rehashes under its lock.
    let fields: usize = redis.bounded(redis.pool().next().hlen(INV_KEY)).await?;
    epochs.expect_tags(fields);
    let mut n = 0;
    let mut cursor = String::from("0");
    loop {
        let (next, fields) = scan_page(redis, &cursor, PAGE).await?;
        let records = fields.chunks_exact(2).filter_map(|pair| {
            if pair[0] == EPOCH_FIELD {
                if let Ok(e) = pair[1].parse() {
                    epochs.observe(e);
                }
            }
            parse_record(&pair[0], &pair[1])
        });
        let mut page = 0;
        epochs.record_all(records.inspect(|&(tag, mode, epoch)| {
            page += 1;
            if let Some(b) = &mut snap {
                b.push(tag, mode, epoch);
            }
        }));
        n += page;
        if next == "0" {
            return Ok((n, snap.and_then(snapshot::Builder::finish)));
        }
        cursor = next;
    }
}

/// Asks `page(count)` until it answers, for half as much after each failure (never less than
/// `floor`), five times at most: a slow or loaded Redis, or a slow gateway, gets pages it can
/// answer within the command timeout. The caller asks from where it is: what was read stays
/// read. Gives back how much the answer was asked for.
pub(crate) async fn shrinking<T, Fut>(
    count: usize,
    floor: usize,
    mut page: impl FnMut(usize) -> Fut,
) -> Result<(usize, T), StoreError>
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    let (mut count, mut tries) = (count, 1);
    loop {
        match page(count).await {
            Err(e) if tries < 5 && !matches!(e, StoreError::CircuitOpen) => {
                tracing::debug!(error = %e, count, "a page of the invalidation records failed; asking for less");
                count = (count / 2).max(floor);
                tries += 1;
            }
            result => return result.map(|t| (count, t)),
        }
    }
}

/// One `HSCAN` page of `isr:inv` from `cursor` ([`shrinking`]): the next cursor (`"0"` at the
/// end) and the fields and values, flat.
pub(crate) async fn scan_page(
    redis: &RedisStore,
    cursor: &str,
    count: u32,
) -> Result<(String, Vec<String>), StoreError> {
    let page = |n: usize| scan_page_once(redis, cursor, n);
    Ok(shrinking(count as usize, 100, page).await?.1)
}

async fn scan_page_once(
    redis: &RedisStore,
    cursor: &str,
    count: usize,
) -> Result<(String, Vec<String>), StoreError> {
    let hscan = CustomCommand::new_static("HSCAN", ClusterHash::FirstKey, false);
    let args = vec![
        INV_KEY.to_owned(),
        cursor.to_owned(),
        "COUNT".to_owned(),
        count.to_string(),
    ];
    redis.bounded(redis.pool().next().custom(hscan, args)).await
}

/// A field `s:<tag>` / `h:<tag>` and its epoch; anything else is skipped.
pub(crate) fn parse_record<'a>(field: &'a str, value: &str) -> Option<(&'a str, Mode, u64)> {
    let (tag, mode) = parse_field(field)?;
    Some((tag, mode, value.parse().ok()?))
}

pub(crate) fn parse_field(field: &str) -> Option<(&str, Mode)> {
    match field.split_once(':')? {
        ("s", tag) => Some((tag, Mode::Soft)),
        ("h", tag) => Some((tag, Mode::Hard)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_or_are_skipped() {
        assert_eq!(parse_record("h:t", "12"), Some(("t", Mode::Hard, 12)));
        assert_eq!(
            parse_record("s:_epoch", "3"),
            Some(("_epoch", Mode::Soft, 3))
        );
        for (field, value) in [("t", "12"), ("x:t", "1"), ("s:t", "x"), ("_epoch", "4")] {
            assert_eq!(parse_record(field, value), None, "{field}");
        }
    }
}
