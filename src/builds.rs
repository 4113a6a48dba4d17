//! The builds the replicas run, as `@isrgate/next` reports them (README "Revalidating from
//! inside your app"): every replica with the package writes its build into the Redis hash
//! `isr:builds` (field: the build id; value: JSON with the deployment id, the Next.js version,
//! the build's `previewModeId` and when it was last seen) and again every 30 s.
//!
//! Owns what the gateway knows of them: [`Builds::current`] (the build seen most recently) and
//! its `previewModeId`, which background refreshes and re-warms send as
//! `x-prerender-revalidate` when `webhook.preview_mode_id` is not configured. The id is a
//! secret: it is kept as a sensitive header value, never logged and never in `/api/stats`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use fred::prelude::*;
use http::HeaderValue;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::cache::store::{Store, StoreError};

/// The Redis hash the replicas write.
pub const BUILDS_KEY: &str = "isr:builds";

/// A build not reported for this long is gone (its replicas write every 30 s).
const GONE_AFTER_MS: u64 = 5 * 60 * 1000;

/// How often the hash is read.
const READ_EVERY: Duration = Duration::from_secs(10);

/// Longest build or deployment id accepted, bytes.
const MAX_ID_BYTES: usize = 256;

/// One build, as its replicas report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    /// `BUILD_ID` of `.next`.
    pub id: String,
    /// `deploymentId` of next.config, when set.
    pub deployment_id: Option<String>,
    /// The Next.js version.
    pub next: Option<String>,
    /// When a replica last reported it (UNIX ms, the replica's clock).
    pub seen_ms: u64,
    /// The build's `previewModeId` (sensitive).
    preview_mode_id: Option<HeaderValue>,
}

/// The JSON a replica writes.
#[derive(Deserialize)]
struct Reported {
    deployment_id: Option<String>,
    next: Option<String>,
    preview_mode_id: Option<String>,
    seen_ms: u64,
}

/// What this gateway knows of the builds, refreshed from the store.
#[derive(Debug, Default)]
pub struct Builds {
    known: RwLock<Arc<Vec<Build>>>,
}

impl Builds {
    /// Every build reported recently, newest first.
    pub fn all(&self) -> Arc<Vec<Build>> {
        Arc::clone(&self.known.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The build seen most recently.
    pub fn current(&self) -> Option<Build> {
        self.all().first().cloned()
    }

    /// The `previewModeId` of the current build.
    pub fn preview_mode_id(&self) -> Option<HeaderValue> {
        self.current().and_then(|b| b.preview_mode_id)
    }

    /// Reads the hash once; builds not seen within five minutes of the newest are left out.
    pub async fn read(&self, store: &Store) -> Result<usize, StoreError> {
        let Store::Redis(redis) = store else {
            return Ok(0);
        };
        let all: std::collections::HashMap<String, String> =
            redis.bounded(redis.pool().hgetall(BUILDS_KEY)).await?;
        let builds = parse(all);
        let n = builds.len();
        let before = self.current().map(|b| b.id);
        if let Some(now) = builds.first().filter(|b| before.as_ref() != Some(&b.id)) {
            tracing::info!(
                build = %now.id,
                deployment_id = now.deployment_id.as_deref().unwrap_or("-"),
                next = now.next.as_deref().unwrap_or("-"),
                preview_mode_id = if now.preview_mode_id.is_some() { "reported" } else { "none" },
                "replicas report a new current build"
            );
        }
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(builds);
        Ok(n)
    }

    /// Reads the hash now and every 10 s until `stop`.
    pub fn follow(self: &Arc<Self>, store: Store, stop: &CancellationToken) {
        if !matches!(store, Store::Redis(_)) {
            return;
        }
        let (builds, stop) = (Arc::clone(self), stop.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = builds.read(&store).await {
                    tracing::debug!(error = %e, "could not read the replicas' builds");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(READ_EVERY) => {}
                }
            }
        });
    }
}

/// The builds in the hash's fields, newest first; fields that do not parse are skipped (a
/// replica of another version may write more, never less).
fn parse(fields: std::collections::HashMap<String, String>) -> Vec<Build> {
    let mut builds: Vec<Build> = fields
        .into_iter()
        .filter(|(id, _)| !id.is_empty() && id.len() <= MAX_ID_BYTES)
        .filter_map(|(id, json)| {
            let r: Reported = serde_json::from_str(&json).ok()?;
            Some(Build {
                id,
                deployment_id: r.deployment_id.filter(|d| d.len() <= MAX_ID_BYTES),
                next: r.next.filter(|n| n.len() <= MAX_ID_BYTES),
                seen_ms: r.seen_ms,
                preview_mode_id: r
                    .preview_mode_id
                    .and_then(|p| crate::config::preview_mode_id_value(&p).ok()),
            })
        })
        .collect();
    builds.sort_by(|a, b| b.seen_ms.cmp(&a.seen_ms).then_with(|| a.id.cmp(&b.id)));
    if let Some(newest) = builds.first().map(|b| b.seen_ms) {
        builds.retain(|b| b.seen_ms + GONE_AFTER_MS >= newest);
    }
    builds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(all: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        all.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn newest_first_gone_and_broken_ones_left_out() {
        let builds = parse(fields(&[
            (
                "b2",
                r#"{"deployment_id":"d2","next":"16.4.6","preview_mode_id":"0123abcd","seen_ms":1000000}"#,
            ),
            ("b1", r#"{"seen_ms":999000}"#),
            ("old", r#"{"seen_ms":1}"#),
            ("broken", "{"),
            ("", r#"{"seen_ms":1000000}"#),
        ]));
        let ids: Vec<_> = builds.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["b2", "b1"]);
        assert_eq!(builds[0].deployment_id.as_deref(), Some("d2"));
        let id = builds[0].preview_mode_id.as_ref().expect("id");
        assert!(id.is_sensitive());
        assert_eq!(id, "0123abcd");
        assert_eq!(builds[1].preview_mode_id, None);
    }

    #[test]
    fn an_id_that_cannot_be_a_header_is_not_used() {
        let builds = parse(fields(&[(
            "b",
            r#"{"preview_mode_id":"bad\nid","seen_ms":5}"#,
        )]));
        assert_eq!(builds[0].preview_mode_id, None);
    }
}
