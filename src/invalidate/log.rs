//! The revalidation log: every webhook call that was applied (epoch, source, paths, tags, mode,
//! acknowledgements, per-replica fan-out, re-warm results, timings), newest first, for the
//! dashboard and `GET /api/log` on the admin listener.
//!
//! With Redis it is the capped stream `isr:log` (about [`KEPT`] records, shared by the fleet);
//! with the in-process store, a ring in this gateway's memory. Writing is best effort: a log
//! that cannot be written never fails the webhook.

use std::collections::VecDeque;
use std::sync::Mutex;

use fred::prelude::*;

use crate::cache::keys::LOG_KEY;
use crate::cache::store::{RedisStore, StoreError};

/// Records kept (approximately, with Redis: `MAXLEN ~`).
pub const KEPT: usize = 1_000;

/// The log of one gateway process.
#[derive(Debug, Default)]
pub struct Log {
    memory: Mutex<VecDeque<String>>,
}

impl Log {
    /// Appends one record (a JSON object): to the stream in the shared `redis`, or to this
    /// gateway's ring without one.
    pub async fn record(
        &self,
        redis: Option<&RedisStore>,
        record: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let text = record.to_string();
        match redis {
            Some(redis) => {
                let cap = ("MAXLEN", "~", KEPT as i64);
                let _: String = redis
                    .bounded(
                        redis
                            .pool()
                            .next()
                            .xadd(LOG_KEY, false, cap, "*", ("r", text)),
                    )
                    .await?;
            }
            None => {
                let mut ring = crate::sync::lock(&self.memory);
                if ring.len() == KEPT {
                    ring.pop_back();
                }
                ring.push_front(text);
            }
        }
        Ok(())
    }

    /// The newest `n` records, newest first (from `redis` when the fleet shares one).
    pub async fn recent(
        &self,
        redis: Option<&RedisStore>,
        n: usize,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let texts: Vec<String> = match redis {
            Some(redis) => {
                let rows: Vec<(String, std::collections::HashMap<String, String>)> = redis
                    .bounded(
                        redis
                            .pool()
                            .next()
                            .xrevrange(LOG_KEY, "+", "-", Some(n as u64)),
                    )
                    .await?;
                rows.into_iter()
                    .filter_map(|(_, mut f)| f.remove("r"))
                    .collect()
            }
            None => {
                let ring = crate::sync::lock(&self.memory);
                ring.iter().take(n).cloned().collect()
            }
        };
        Ok(texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }
}
