//! Entries as last decoded from the store, for strict mode (no L1).
//!
//! Without an L1 every hit reads its entry from the store, which is the point of strict mode:
//! what is served is what the store holds now. Moving and decoding the whole entry again on
//! every hit (its body, metadata and tags, the prepared response heads, and for identity
//! clients inflating the body: about 50 µs for a 50 KB page) is not. So strict mode reads the
//! metadata first, and when it is exactly the metadata decoded last time for the key, the entry
//! decoded then is the answer. Equal metadata means the same write: metadata and body are
//! written together (one `MULTI`), and the metadata names its body (ETag of the identity body,
//! its length, when it was stored). Anything else reads and decodes the whole entry again.
//! Freshness and invalidations are still decided on every read, by the caller.
//!
//! Bounded by bytes (metadata, gzip body and the inflated body it may carry); a key not read
//! for [`IDLE`] is let go. With the L1 on this is unused: the L1 already keeps decoded entries.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::entry::Entry;

/// How long a decoded entry is kept without being read.
pub const IDLE: Duration = Duration::from_secs(600);

/// Bytes charged per entry on top of its bodies.
const OVERHEAD_BYTES: u64 = 512;

/// What is held per key: the metadata bytes it was decoded from, and the entry.
#[derive(Clone)]
struct Held {
    meta: Bytes,
    entry: Arc<Entry>,
}

/// The memo; `None` inside when disabled.
#[derive(Clone)]
pub struct Decoded {
    cache: Option<moka::sync::Cache<u128, Held>>,
}

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cache {
            Some(c) => f
                .debug_struct("Decoded")
                .field("entries", &c.entry_count())
                .finish(),
            None => f.write_str("Decoded(disabled)"),
        }
    }
}

impl Decoded {
    /// A memo of at most `max_bytes`; `0` disables it.
    pub fn new(max_bytes: u64) -> Decoded {
        if max_bytes == 0 {
            return Decoded { cache: None };
        }
        let cache = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &u128, h: &Held| {
                let bytes = h.meta.len() as u64
                    + h.entry.gzip.len() as u64
                    + h.entry.meta.identity_len
                    + OVERHEAD_BYTES;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .time_to_idle(IDLE)
            .build();
        Decoded { cache: Some(cache) }
    }

    /// Whether the memo is in use (strict mode).
    pub fn enabled(&self) -> bool {
        self.cache.is_some()
    }

    /// The entry decoded before from exactly this metadata, if it is still held.
    pub fn get(&self, key: u128, meta: &[u8]) -> Option<Arc<Entry>> {
        let held = self.cache.as_ref()?.get(&key)?;
        (held.meta == meta).then_some(held.entry)
    }

    /// Remembers `entry` as the decoding of `meta` (and of the body written with it).
    pub fn insert(&self, key: u128, meta: Bytes, entry: &Arc<Entry>) {
        if let Some(c) = &self.cache {
            c.insert(
                key,
                Held {
                    meta,
                    entry: Arc::clone(entry),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::Meta;

    fn entry(body: &[u8]) -> (Bytes, Arc<Entry>) {
        let e = Entry::from_identity(Meta::new(200, Vec::new()), body);
        (e.meta.encode(), Arc::new(e))
    }

    #[test]
    fn only_the_exact_metadata_gets_the_decoded_entry_back() {
        let memo = Decoded::new(1 << 20);
        let (meta, e) = entry(b"<html>one</html>");
        assert!(memo.get(1, &meta).is_none());
        memo.insert(1, meta.clone(), &e);
        let again = memo.get(1, &meta).expect("same bytes");
        assert!(Arc::ptr_eq(&again, &e));
        assert!(memo.get(2, &meta).is_none(), "another key");
        let (other, _) = entry(b"<html>two</html>");
        assert!(memo.get(1, &other).is_none(), "another write under the key");
        assert!(memo.get(1, &meta[..meta.len() - 1]).is_none(), "a prefix");
    }

    #[test]
    fn disabled_holds_nothing() {
        let memo = Decoded::new(0);
        assert!(!memo.enabled());
        let (meta, e) = entry(b"x");
        memo.insert(1, meta.clone(), &e);
        assert!(memo.get(1, &meta).is_none());
    }
}
