//! Invalidation records kept as a snapshot brought them (`invalidate::snapshot`), looked up
//! where they lie in its bytes: a table of their offsets by the tag's hash, open addressing, so
//! a start on a million records allocates nothing per record and copies nothing. (Owned tags in
//! a map cost 4-10 times the time, page faults of a 2-million-bucket table and a String per
//! tag. Measured at 1,000,000 records, `benches/inv_start.sh`: 97 MiB of RSS at readiness this
//! way, 196 MiB after a scan into the map, 38 MiB with no records.)
//!
//! Read-only: the records applied after it (the index since the snapshot, the bus) go to the map
//! of `super::epochs`, which consults both. The format is the snapshot's: it hands over the
//! function that reads the record at an offset. No sockets, no clock.

use bytes::Bytes;

use super::epochs::Mode;

/// Reads the record at the start of the bytes given: `(tag, mode, epoch)`.
pub type ReadRecord = for<'a> fn(&'a [u8]) -> Option<(&'a str, Mode, u64)>;

const EMPTY: u32 = u32::MAX;

/// A snapshot's records, by tag.
pub struct Frozen {
    bytes: Bytes,
    /// Offsets of records in `bytes` (`EMPTY`: none); a power of two, at most half full.
    slots: Box<[u32]>,
    read: ReadRecord,
    /// Per process, so no one can choose tags that collide.
    seed: u64,
    records: usize,
    newest: u64,
}

impl Frozen {
    /// Indexes the `count` records of `bytes`, each `(offset, tag)`, read back with `read`;
    /// `newest` is their newest epoch. `None` when an offset does not fit the table's `u32` or
    /// there are more records than `count`.
    pub fn new<'a>(
        bytes: Bytes,
        read: ReadRecord,
        records: impl Iterator<Item = (usize, &'a str)>,
        count: usize,
        newest: u64,
    ) -> Option<Frozen> {
        let size = count.max(1).checked_mul(2)?.checked_next_power_of_two()?;
        let mut slots = vec![EMPTY; size].into_boxed_slice();
        let (mask, seed) = (size - 1, fastrand::u64(..));
        let mut n = 0;
        for (offset, tag) in records {
            n += 1;
            let offset = u32::try_from(offset).ok().filter(|o| *o != EMPTY)?;
            if n > count {
                return None;
            }
            let mut i = slot(seed, tag, mask);
            while slots[i] != EMPTY {
                i = (i + 1) & mask;
            }
            slots[i] = offset;
        }
        Some(Frozen {
            bytes,
            slots,
            read,
            seed,
            records: n,
            newest,
        })
    }

    /// The newest soft and hard epochs recorded for `tag` (0: none).
    pub fn get(&self, tag: &str) -> (u64, u64) {
        let mask = self.slots.len() - 1;
        let mut i = slot(self.seed, tag, mask);
        let (mut soft, mut hard) = (0, 0);
        // At most half full: an empty slot ends every run.
        while let Some(&offset) = self.slots.get(i).filter(|o| **o != EMPTY) {
            let record = self.bytes.get(offset as usize..).and_then(self.read);
            if let Some((_, mode, epoch)) = record.filter(|(t, ..)| *t == tag) {
                match mode {
                    Mode::Soft => soft = soft.max(epoch),
                    Mode::Hard => hard = hard.max(epoch),
                }
            }
            i = (i + 1) & mask;
        }
        (soft, hard)
    }

    /// Every record, in no order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Mode, u64)> {
        let bytes = &self.bytes;
        let read = self.read;
        self.slots
            .iter()
            .filter(|o| **o != EMPTY)
            .filter_map(move |&o| bytes.get(o as usize..).and_then(read))
    }

    /// How many records.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The newest epoch of a record.
    pub fn newest(&self) -> u64 {
        self.newest
    }
}

fn slot(seed: u64, tag: &str, mask: usize) -> usize {
    (xxhash_rust::xxh3::xxh3_64_with_seed(tag.as_bytes(), seed) as usize) & mask
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frozen")
            .field("records", &self.records)
            .field("bytes", &self.bytes.len())
            .field("newest", &self.newest)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as `mode`, tag length, tag, epoch (u8), back to back: a stand-in format.
    fn read(b: &[u8]) -> Option<(&str, Mode, u64)> {
        let (&mode, rest) = b.split_first()?;
        let (&len, rest) = rest.split_first()?;
        let tag = std::str::from_utf8(rest.get(..usize::from(len))?).ok()?;
        let epoch = *rest.get(usize::from(len))?;
        let mode = if mode == b'h' { Mode::Hard } else { Mode::Soft };
        Some((tag, mode, u64::from(epoch)))
    }

    fn frozen(records: &[(&str, Mode, u8)]) -> Frozen {
        let mut bytes = Vec::new();
        let mut at = Vec::new();
        for (tag, mode, epoch) in records {
            at.push((bytes.len(), *tag));
            bytes.push(if *mode == Mode::Hard { b'h' } else { b's' });
            bytes.push(u8::try_from(tag.len()).expect("short"));
            bytes.extend_from_slice(tag.as_bytes());
            bytes.push(*epoch);
        }
        Frozen::new(Bytes::from(bytes), read, at.into_iter(), records.len(), 9).expect("fits")
    }

    #[test]
    fn every_record_of_a_tag_is_found_and_the_newest_per_mode_wins() {
        let f = frozen(&[
            ("a", Mode::Hard, 3),
            ("b", Mode::Soft, 4),
            ("a", Mode::Soft, 7),
            ("a", Mode::Hard, 5),
        ]);
        assert_eq!(f.get("a"), (7, 5));
        assert_eq!(f.get("b"), (4, 0));
        assert_eq!(f.get("c"), (0, 0));
        assert_eq!((f.records(), f.newest()), (4, 9));
        let mut all: Vec<_> = f.iter().map(|(t, m, e)| (t, m.as_str(), e)).collect();
        all.sort();
        assert_eq!(
            all,
            [
                ("a", "hard", 3),
                ("a", "hard", 5),
                ("a", "soft", 7),
                ("b", "soft", 4)
            ]
        );
    }

    #[test]
    fn many_tags_each_find_their_own() {
        let tags: Vec<String> = (0..5_000).map(|i| format!("t{i}")).collect();
        let records: Vec<_> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), Mode::Hard, (i % 200) as u8))
            .collect();
        let f = frozen(&records);
        for (i, t) in tags.iter().enumerate() {
            assert_eq!(f.get(t), (0, (i % 200) as u64), "{t}");
        }
        assert_eq!(f.get("t5000"), (0, 0));
    }

    #[test]
    fn more_records_than_counted_are_refused() {
        let at = [(0, "a"), (3, "b")];
        assert!(
            Frozen::new(
                Bytes::from_static(b"h\x01a\x01"),
                read,
                at.into_iter(),
                1,
                1
            )
            .is_none()
        );
        let empty = Frozen::new(Bytes::new(), read, std::iter::empty(), 0, 0).expect("empty");
        assert_eq!(empty.get("a"), (0, 0));
    }
}
