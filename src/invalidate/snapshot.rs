//! The compact snapshot of the invalidation records, `isr:{isr:inv}:snap`: what a starting gateway
//! reads instead of scanning the whole hash `isr:inv` (`super::load`). It holds every record
//! whose epoch is at or before its own epoch (and maybe some newer ones: a record only ever
//! moves a tag forward, so one too many is harmless). The records after it are in the index
//! `isr:{isr:inv}:z`, written by the function with the record.
//!
//! Built from a scan of the whole hash begun after reading the counter `_epoch` (every record
//! at or before it exists when the scan starts, and a scan returns every field present from its
//! start to its end): by the pruner, once per period, and by a load that had to scan. Written in
//! pieces under a key of its own, then swapped in by one script that also records its epoch in
//! `_snapped` and drops from the index what it now holds: never older than the one it replaces.
//! Read in pieces too, so no command carries more than [`PIECE`] bytes.
//!
//! The format (version 1), little-endian, fields only ever appended in a new version:
//! `isrsnap` and the version byte, the epoch (u64), the number of records (u64), the records
//! — mode (`s` or `h`), the tag's length (LEB128), the tag (UTF-8), the epoch (LEB128) — and the
//! xxh3-64 of every byte before it. Decoding any bytes is `Ok` or `Err`, never a panic, and a
//! snapshot is applied only once all of it is checked.

use bytes::{Bytes, BytesMut};
use fred::prelude::*;
use fred::types::Expiration;

use crate::cache::epochs::Mode;
use crate::cache::frozen::Frozen;
use crate::cache::keys::{INDEX_KEY, INV_KEY, SNAPSHOT_KEY, unfinished_snapshot_key};
use crate::cache::store::{RedisStore, StoreError};

const MAGIC: &[u8; 7] = b"isrsnap";
const VERSION: u8 = 1;
const HEADER: usize = 8 + 8 + 8;
const TRAILER: usize = 8;

/// Bytes per read or written piece: one command each, well within `redis.command_timeout`
/// (250 ms carries 1 MiB at 4 MB/s).
pub const PIECE: usize = 1 << 20;

/// The smallest piece a slow link is asked for.
const MIN_PIECE: usize = 64 << 10;

/// Larger snapshots are not written (Redis takes strings up to 512 MB; about 9 million
/// records): the starts scan the hash.
pub const MAX_BYTES: usize = 256 << 20;

/// A piece written but not swapped in (a writer that died) goes after this long.
const UNFINISHED_TTL_MS: i64 = 600_000;

/// Why bytes are not a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// Shorter than a header and a trailer.
    #[error("too short")]
    Short,
    /// Not `isrsnap`.
    #[error("not a snapshot")]
    Magic,
    /// A version this gateway does not know (a newer writer).
    #[error("unknown version {0}")]
    Version(u8),
    /// The checksum does not match (truncated, or pieces of two snapshots).
    #[error("checksum mismatch")]
    Checksum,
    /// A record does not parse, or the count is not the header's.
    #[error("malformed record")]
    Record,
}

impl Corrupt {
    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Corrupt::Short => "short",
            Corrupt::Magic => "magic",
            Corrupt::Version(_) => "version",
            Corrupt::Checksum => "checksum",
            Corrupt::Record => "record",
        }
    }
}

/// Writes a snapshot record by record; past [`MAX_BYTES`] it stops (and makes none).
#[derive(Debug)]
pub struct Builder {
    buf: Vec<u8>,
    records: u64,
    too_large: bool,
}

impl Builder {
    /// A snapshot of every record at or before `epoch`.
    pub fn new(epoch: u64) -> Builder {
        let mut buf = Vec::with_capacity(1 << 16);
        buf.extend_from_slice(MAGIC);
        buf.push(VERSION);
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&0u64.to_le_bytes());
        Builder {
            buf,
            records: 0,
            too_large: false,
        }
    }

    /// Adds the record `tag` (`mode`) at `epoch`.
    pub fn push(&mut self, tag: &str, mode: Mode, epoch: u64) {
        if self.buf.len() > MAX_BYTES {
            self.too_large = true;
            self.buf = Vec::new();
        }
        if self.too_large {
            return;
        }
        self.buf.push(match mode {
            Mode::Soft => b's',
            Mode::Hard => b'h',
        });
        put_varint(&mut self.buf, tag.len() as u64);
        self.buf.extend_from_slice(tag.as_bytes());
        put_varint(&mut self.buf, epoch);
        self.records += 1;
    }

    /// The finished snapshot and its epoch; `None` past [`MAX_BYTES`] (said once, here).
    pub fn finish(mut self) -> Option<(u64, Bytes)> {
        if self.too_large {
            tracing::warn!(
                records = self.records,
                "too many invalidation records for a snapshot ({MAX_BYTES} bytes); every start scans isr:inv"
            );
            return None;
        }
        self.buf[16..24].copy_from_slice(&self.records.to_le_bytes());
        let sum = xxhash_rust::xxh3::xxh3_64(&self.buf);
        self.buf.extend_from_slice(&sum.to_le_bytes());
        Some((le_u64(&self.buf[8..16]), Bytes::from(self.buf)))
    }
}

/// A checked snapshot.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// Every record at or before this epoch is here.
    pub epoch: u64,
    /// How many records.
    pub records: usize,
    /// The newest epoch of a record.
    pub newest: u64,
    body: &'a [u8],
}

impl<'a> Snapshot<'a> {
    /// Checks all of `bytes`: header, checksum, every record.
    pub fn decode(bytes: &'a [u8]) -> Result<Snapshot<'a>, Corrupt> {
        if bytes.len() < HEADER + TRAILER {
            return Err(Corrupt::Short);
        }
        let (data, sum) = bytes.split_at(bytes.len() - TRAILER);
        if &data[..7] != MAGIC {
            return Err(Corrupt::Magic);
        }
        if data[7] != VERSION {
            return Err(Corrupt::Version(data[7]));
        }
        if xxhash_rust::xxh3::xxh3_64(data).to_le_bytes() != sum {
            return Err(Corrupt::Checksum);
        }
        let mut snap = Snapshot {
            epoch: le_u64(&data[8..16]),
            records: 0,
            newest: 0,
            body: &data[HEADER..],
        };
        let mut rest = snap.body;
        while !rest.is_empty() {
            let (_, _, epoch) = next_record(&mut rest).ok_or(Corrupt::Record)?;
            snap.newest = snap.newest.max(epoch);
            snap.records += 1;
        }
        if snap.records as u64 != le_u64(&data[16..24]) {
            return Err(Corrupt::Record);
        }
        Ok(snap)
    }

    /// Every record: `(tag, mode, epoch)`.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, Mode, u64)> + use<'a> {
        let mut rest = self.body;
        // Checked by `decode`: the first failure is the end.
        std::iter::from_fn(move || next_record(&mut rest))
    }

    /// Every record's offset in the bytes decoded (for [`record_at`]) and tag.
    pub fn offsets(&self) -> impl Iterator<Item = (usize, &'a str)> + use<'a> {
        let (body, mut rest) = (self.body, self.body);
        std::iter::from_fn(move || {
            let at = HEADER + body.len() - rest.len();
            next_record(&mut rest).map(|(tag, ..)| (at, tag))
        })
    }

    /// The records, to be looked up where they are in `bytes` (the bytes decoded).
    pub fn freeze(&self, bytes: Bytes) -> Option<Frozen> {
        Frozen::new(bytes, record_at, self.offsets(), self.records, self.newest)
    }
}

/// The record at the start of `bytes` (from an offset of [`Snapshot::offsets`]).
pub fn record_at(bytes: &[u8]) -> Option<(&str, Mode, u64)> {
    let mut rest = bytes;
    next_record(&mut rest)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn varint(rest: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, tail) = rest.split_first()?;
        *rest = tail;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn next_record<'a>(rest: &mut &'a [u8]) -> Option<(&'a str, Mode, u64)> {
    let (&mode, tail) = rest.split_first()?;
    let mode = match mode {
        b's' => Mode::Soft,
        b'h' => Mode::Hard,
        _ => return None,
    };
    *rest = tail;
    let len = usize::try_from(varint(rest)?).ok()?;
    if len > rest.len() {
        return None;
    }
    let (tag, tail) = rest.split_at(len);
    *rest = tail;
    let tag = std::str::from_utf8(tag).ok()?;
    Some((tag, mode, varint(rest)?))
}

/// Reads the snapshot a piece at a time (smaller pieces where they do not come in time);
/// `None` when there is none.
pub async fn read(redis: &RedisStore) -> Result<Option<Bytes>, StoreError> {
    let len: usize = redis
        .bounded(redis.pool().next().strlen(SNAPSHOT_KEY))
        .await?;
    if len > MAX_BYTES + PIECE {
        // Not one this gateway wrote: not worth reading.
        return Ok(None);
    }
    let mut whole = BytesMut::with_capacity(len);
    while whole.len() < len {
        let start = whole.len();
        let piece = |n: usize| async move {
            let client = redis.pool().next();
            let range = client.getrange::<Bytes, _>(SNAPSHOT_KEY, start, start + n - 1);
            redis.bounded(range).await
        };
        let (_, piece) = super::scan::shrinking(PIECE, MIN_PIECE, piece).await?;
        if piece.is_empty() {
            // Replaced by a shorter one meanwhile: the checksum says so.
            break;
        }
        whole.extend_from_slice(&piece);
    }
    Ok((!whole.is_empty()).then(|| whole.freeze()))
}

/// Swaps KEYS[4] (the new snapshot) in as KEYS[3] unless the snapshot there is newer than
/// ARGV[1]; records its epoch in `_snapped` of KEYS[1] and drops from the index KEYS[2] what it
/// holds. 1 when swapped in, 0 when not.
const SWAP_SCRIPT: &str = r"
local epoch = tonumber(ARGV[1])
if epoch < tonumber(redis.call('HGET', KEYS[1], '_snapped') or '0')
   or redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('DEL', KEYS[4])
  return 0
end
redis.call('RENAME', KEYS[4], KEYS[3])
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[1], '_snapped', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return 1
";

/// A builder for a snapshot of the records a scan begun now will see, unless the one there is
/// newer (or there are no records yet, or a mark is damaged).
pub(crate) async fn begin(redis: &RedisStore) -> Result<Option<Builder>, StoreError> {
    // The counter before the scan: every record at or before it exists when the scan starts.
    Ok(super::load::read_marks(redis)
        .await?
        .filter(|m| m.counter > 0 && m.counter >= m.snapped)
        .map(|m| Builder::new(m.counter)))
}

/// Writes `snapshot` (of every record at or before `epoch`) a piece at a time under a key of
/// its own, then swaps it in; `false` when a newer one was there already.
pub async fn write(redis: &RedisStore, snapshot: &Bytes, epoch: u64) -> Result<bool, StoreError> {
    let unfinished = unfinished_snapshot_key(fastrand::u64(..));
    for (i, start) in (0..snapshot.len()).step_by(PIECE).enumerate() {
        let piece = snapshot.slice(start..snapshot.len().min(start + PIECE));
        let client = redis.pool().next();
        if i == 0 {
            let ttl = Some(Expiration::PX(UNFINISHED_TTL_MS));
            let _: () = redis
                .bounded(client.set(&unfinished, piece, ttl, None, false))
                .await?;
        } else {
            let _: u64 = redis.bounded(client.append(&unfinished, piece)).await?;
        }
    }
    let keys = vec![INV_KEY, INDEX_KEY, SNAPSHOT_KEY, unfinished.as_str()];
    let swapped: u64 = redis
        .bounded(
            redis
                .pool()
                .next()
                .eval(SWAP_SCRIPT, keys, vec![epoch.to_string()]),
        )
        .await?;
    Ok(swapped == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_snapshot_round_trips() {
        let mut b = Builder::new(1_700_000_000_000);
        b.push("path:/a", Mode::Hard, 1_699_999_999_999);
        b.push("", Mode::Soft, 0);
        b.push("é", Mode::Soft, u64::MAX);
        let (epoch, bytes) = b.finish().expect("small");
        assert_eq!(epoch, 1_700_000_000_000);
        let snap = Snapshot::decode(&bytes).expect("decodes");
        assert_eq!(
            (snap.epoch, snap.records, snap.newest),
            (1_700_000_000_000, 3, u64::MAX)
        );
        let all: Vec<_> = snap.iter().collect();
        let at: Vec<_> = snap
            .offsets()
            .map(|(at, _)| record_at(&bytes[at..]))
            .collect();
        assert_eq!(at, all.iter().copied().map(Some).collect::<Vec<_>>());
        let frozen = snap.freeze(bytes.clone()).expect("fits");
        assert_eq!(frozen.get("path:/a"), (0, 1_699_999_999_999));
        assert_eq!(frozen.get("é"), (u64::MAX, 0));
        assert_eq!(
            all,
            [
                ("path:/a", Mode::Hard, 1_699_999_999_999),
                ("", Mode::Soft, 0),
                ("é", Mode::Soft, u64::MAX)
            ]
        );
        let (_, empty) = Builder::new(7).finish().expect("small");
        assert!(Snapshot::decode(&empty).is_ok(), "empty");
    }

    #[test]
    fn a_damaged_snapshot_is_refused() {
        let mut b = Builder::new(9);
        b.push("t", Mode::Hard, 5);
        let bytes = b.finish().expect("small").1.to_vec();
        assert_eq!(Snapshot::decode(&bytes[..10]).err(), Some(Corrupt::Short));
        assert_eq!(
            Snapshot::decode(&bytes[..bytes.len() - 1]).err(),
            Some(Corrupt::Checksum)
        );
        let mut flipped = bytes.clone();
        flipped[HEADER + 1] ^= 1;
        assert_eq!(Snapshot::decode(&flipped).err(), Some(Corrupt::Checksum));
        let mut other = bytes.clone();
        other[7] = 2;
        assert_eq!(Snapshot::decode(&other).err(), Some(Corrupt::Version(2)));
        assert_eq!(
            Snapshot::decode(b"not a snapshot, no: 32 bytes long").err(),
            Some(Corrupt::Magic)
        );
    }

    /// Bytes with a valid checksum around a bad record: refused, not half applied.
    #[test]
    fn a_checksummed_but_malformed_body_is_refused() {
        for body in [
            &b"x\x01t\x05"[..],
            b"h\x05t\x05",
            b"h\x01\xff\x05",
            b"h\x01t\xff",
        ] {
            let mut buf = Builder::new(1).buf;
            buf[16..24].copy_from_slice(&1u64.to_le_bytes());
            buf.extend_from_slice(body);
            let sum = xxhash_rust::xxh3::xxh3_64(&buf);
            buf.extend_from_slice(&sum.to_le_bytes());
            assert_eq!(
                Snapshot::decode(&buf).err(),
                Some(Corrupt::Record),
                "{body:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Snapshot::decode(&bytes);
        }

        #[test]
        fn any_records_round_trip(
            records in proptest::collection::vec((".{0,40}", any::<bool>(), any::<u64>()), 0..50)
        ) {
            let mut b = Builder::new(3);
            for (tag, hard, epoch) in &records {
                b.push(tag, if *hard { Mode::Hard } else { Mode::Soft }, *epoch);
            }
            let (_, bytes) = b.finish().expect("small");
            let snap = Snapshot::decode(&bytes).expect("decodes");
            let back: Vec<_> = snap.iter().map(|(t, m, e)| (t.to_owned(), m == Mode::Hard, e)).collect();
            prop_assert_eq!(back, records);
        }
    }
}
