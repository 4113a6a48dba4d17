//! The builds the replicas run, as `@isrgate/next` reports them (README "Revalidating from
//! inside your app"): every replica with the package writes its build into the Redis hash
//! `isr:builds` (field: the build's identity, the deployment id when set, else the
//! `BUILD_ID`, the same name its responses carry in `x-isrgate-build`; value: JSON with the
//! `BUILD_ID`, the deployment id, the Next.js version, the build's `previewModeId`, when it was
//! built and when it was last seen) and again every 30 s.
//!
//! Owns what the gateway knows of them: each build's other names (a client's `/_next/data/<BUILD_ID>/`
//! or `?dpl=` names it by those) and its `previewModeId`, which background refreshes and
//! re-warms of that build's pages send as `x-prerender-revalidate` when
//! `webhook.preview_mode_id` is not configured. The id is a secret: it is kept as a sensitive
//! header value, never logged and never in `/api/stats`.

use std::sync::{Arc, RwLock};

use fred::prelude::*;
use http::HeaderValue;
use serde::Deserialize;

use crate::cache::keys::BUILDS_KEY;
use crate::cache::store::{RedisStore, StoreError};

/// A build not reported for this long is gone (its replicas write every 30 s).
const GONE_AFTER_MS: u64 = 5 * 60 * 1000;

/// Longest build or deployment id accepted, bytes.
const MAX_ID_BYTES: usize = 256;

/// One build, as its replicas report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    /// Its identity: the deployment id when set, else the `BUILD_ID`.
    pub id: String,
    /// `BUILD_ID` of `.next` (older packages: the identity).
    pub build_id: String,
    /// When `next build` wrote it (UNIX ms), when reported.
    pub built_ms: Option<u64>,
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
    build_id: Option<String>,
    built_ms: Option<u64>,
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
        Arc::clone(&crate::sync::read(&self.known))
    }

    /// The report of the build named `id`.
    pub fn get(&self, id: &str) -> Option<Build> {
        self.all().iter().find(|b| b.id == id).cloned()
    }

    /// The identity of the build a client names by `name`: its identity, its `BUILD_ID` or
    /// its deployment id.
    pub fn identity_of(&self, name: &str) -> Option<String> {
        self.all()
            .iter()
            .find(|b| {
                b.id == name || b.build_id == name || b.deployment_id.as_deref() == Some(name)
            })
            .map(|b| b.id.clone())
    }

    /// The `previewModeId` of the build named `id`; without one, of the build reported most
    /// recently (replicas of packages older than `x-isrgate-build` report no identity their
    /// responses name).
    pub fn preview_mode_id(&self, id: Option<&str>) -> Option<HeaderValue> {
        let all = self.all();
        let build = match id {
            Some(id) => all.iter().find(|b| b.id == id),
            None => all.first(),
        };
        build.and_then(|b| b.preview_mode_id.clone())
    }

    /// Reads the hash once; builds not seen within five minutes of the newest are left out.
    /// Logs builds it did not know.
    pub async fn read(&self, redis: &RedisStore) -> Result<usize, StoreError> {
        let all: std::collections::HashMap<String, String> =
            redis.bounded(redis.pool().hgetall(BUILDS_KEY)).await?;
        let builds = parse(all);
        let before = self.all();
        for new in builds
            .iter()
            .filter(|b| !before.iter().any(|o| o.id == b.id))
        {
            tracing::info!(
                build = %new.id,
                build_id = %new.build_id,
                deployment_id = new.deployment_id.as_deref().unwrap_or("-"),
                next = new.next.as_deref().unwrap_or("-"),
                preview_mode_id = if new.preview_mode_id.is_some() { "reported" } else { "none" },
                "replicas report a build"
            );
        }
        let n = builds.len();
        *crate::sync::write(&self.known) = Arc::new(builds);
        Ok(n)
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
                build_id: r
                    .build_id
                    .filter(|b| !b.is_empty() && b.len() <= MAX_ID_BYTES)
                    .unwrap_or_else(|| id.clone()),
                built_ms: r.built_ms,
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
