//! What a revalidation did, step by step, as one type: the webhook's answer (both listeners),
//! the dashboard's purge form and `isrgate purge` (which print it), the record in the
//! revalidation log (the dashboard's list), and what the tests read back. Serialized with
//! serde; the field names are the JSON's, a contract with scripts that read the answer.

use serde::{Deserialize, Serialize};

use super::cms::Origin;
use super::fanout::ReplicaResult;
use super::rewarm::Rewarmed;
use crate::cache::epochs::Mode;

/// One revalidation, applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The invalidation's epoch (every entry rendered before it, under its tags, is stale).
    pub epoch: u64,
    /// When it was applied (UNIX seconds).
    pub at_unix: u64,
    /// Who asked: the caller's address, `cli`, `dashboard`, `admin-api`, or `-`.
    pub source: String,
    /// Soft (served stale while one refresh runs) or hard (a miss).
    pub mode: Mode,
    /// The paths named.
    pub paths: Vec<String>,
    /// The tags recorded (each path's `path:` tag first).
    pub tags: Vec<String>,
    /// The CMS entry it was mapped from.
    pub entry: Option<Origin>,
    /// The gateways that took it.
    pub gateways: Gateways,
    /// What each Next.js replica said; `None` when fan-out is not configured.
    pub replicas: Option<Vec<ReplicaResult>>,
    /// The epoch of the second apply, after the replicas were told.
    pub epoch_after_fanout: Option<u64>,
    /// Why that second apply failed.
    pub reapply_error: Option<String>,
    /// The pages rendered again.
    pub rewarm: Vec<Rewarmed>,
    /// Time taken, ms.
    pub elapsed_ms: f64,
}

/// The gateways that took an invalidation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gateways {
    /// The gateway that applied it (answered the call).
    pub applied_by: String,
    /// Live gateways that acknowledged it.
    pub acknowledged: Vec<String>,
    /// Live gateways that did not within `webhook.ack_timeout`.
    pub missing: Vec<String>,
    /// Time until the last acknowledgement, ms.
    pub elapsed_ms: f64,
}

impl Report {
    /// The record as JSON (the revalidation log keeps it so).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
