//! The hot set: the pages requested most, counted by every gateway, which a new build
//! pre-renders before it becomes current (`rollout`).
//!
//! A request counts with probability 1/16 (no lock on the other fifteen): documents by path
//! and query, RSC fetches by path (their `_rsc` query is a cache-buster). Counts gather in a
//! bounded map and are added every ten seconds to a sorted set per UTC day in Redis
//! (`isr:hot:<day>`, kept two days, trimmed to the top 5,000), so the set follows the traffic
//! of the last day or two without any decay arithmetic. Without Redis, the map is the set.

use std::collections::HashMap;
use std::sync::Mutex;

use fred::prelude::*;

use crate::cache::store::{RedisStore, StoreError};

/// One request in this many is counted.
const SAMPLE: u32 = 16;
/// Most distinct pages counted between two flushes.
const MAX_COUNTED: usize = 4096;
/// Pages kept per day in Redis.
const KEEP: i64 = 5000;

/// A page of the hot set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotPath {
    /// Its `Host`.
    pub host: String,
    /// Path and query.
    pub path: String,
}

/// This gateway's counts since the last flush.
#[derive(Debug, Default)]
pub struct Hot {
    counts: Mutex<HashMap<String, u64>>,
}

impl Hot {
    /// Counts a request for `host` + `path` (+ `query` for a document), one time in 16.
    pub fn count(&self, host: &str, path: &str, query: Option<&str>) {
        if fastrand::u32(..SAMPLE) != 0 || host.is_empty() || host.contains(' ') {
            return;
        }
        let mut member =
            String::with_capacity(host.len() + path.len() + 1 + query.map_or(0, |q| q.len() + 1));
        member.push_str(host);
        member.push(' ');
        member.push_str(path);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            member.push('?');
            member.push_str(q);
        }
        let mut counts = crate::sync::lock(&self.counts);
        let full = counts.len() >= MAX_COUNTED;
        match counts.get_mut(&member) {
            Some(n) => *n += u64::from(SAMPLE),
            None if !full => {
                counts.insert(member, u64::from(SAMPLE));
            }
            None => {}
        }
    }

    /// Adds the counts to today's set in Redis and starts counting afresh.
    pub async fn flush(&self, redis: &RedisStore, now_ms: u64) -> Result<(), StoreError> {
        let counts = std::mem::take(&mut *crate::sync::lock(&self.counts));
        if counts.is_empty() {
            return Ok(());
        }
        let key = day_key(now_ms);
        let pool = redis.pool();
        for (member, n) in counts {
            let _: f64 = redis.bounded(pool.zincrby(&key, n as f64, member)).await?;
        }
        let _: i64 = redis
            .bounded(pool.zremrangebyrank(&key, 0, -(KEEP + 1)))
            .await?;
        let _: bool = redis.bounded(pool.expire(&key, 2 * 86_400, None)).await?;
        Ok(())
    }

    /// The `n` pages requested most: today's and yesterday's counts in Redis, or this
    /// gateway's own without it.
    pub async fn top(&self, redis: Option<&RedisStore>, n: usize, now_ms: u64) -> Vec<HotPath> {
        let mut scores: HashMap<String, f64> = HashMap::new();
        match redis {
            None => {
                let counts = crate::sync::lock(&self.counts);
                scores.extend(counts.iter().map(|(m, c)| (m.clone(), *c as f64)));
            }
            Some(redis) => {
                for day in [now_ms, now_ms.saturating_sub(86_400_000)] {
                    let read: Result<Vec<(String, f64)>, _> = redis
                        .bounded(redis.pool().zrevrange(day_key(day), 0, n as i64 - 1, true))
                        .await;
                    match read {
                        Ok(read) => {
                            for (m, s) in read {
                                *scores.entry(m).or_default() += s;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not read the hot set"),
                    }
                }
            }
        }
        let mut ranked: Vec<(String, f64)> = scores.into_iter().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked
            .into_iter()
            .take(n)
            .filter_map(|(m, _)| {
                let (host, path) = m.split_once(' ')?;
                Some(HotPath {
                    host: host.to_owned(),
                    path: path.to_owned(),
                })
            })
            .collect()
    }
}

/// The hot set's key for the UTC day of `now_ms`.
fn day_key(now_ms: u64) -> String {
    crate::cache::keys::hot_key(now_ms / 86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_documents_with_their_query_and_ranks_them() {
        let hot = Hot::default();
        for _ in 0..16 * 200 {
            hot.count("site.test", "/a", Some("x=1"));
        }
        for _ in 0..16 * 50 {
            hot.count("site.test", "/b", None);
        }
        let top = hot.top(None, 10, 0).await;
        let paths: Vec<&str> = top.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["/a?x=1", "/b"]);
        assert_eq!(top[0].host, "site.test");
        assert_eq!(hot.top(None, 1, 0).await.len(), 1);
    }
}
