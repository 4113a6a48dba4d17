//! [`AppState`]: everything a request needs. One per worker thread: the connection pool to the
//! replicas is the worker's own (its connection tasks live on the worker's runtime, so a request
//! never hops threads), everything else (config, metrics, replica set, request ids, lifecycle
//! tokens) is shared by all workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use http::HeaderValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::sanitize;
use crate::upstream::Upstream;

/// State of one worker (see the module doc for what is shared).
#[derive(Debug)]
pub struct AppState {
    /// The validated configuration.
    pub config: Config,
    /// Sanitizing policy derived from `config.listen`.
    pub policy: sanitize::Policy,
    /// Replicas (shared) and this worker's client to reach them.
    pub upstream: Upstream,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Request id source.
    pub request_ids: Arc<RequestIds>,
    /// Permits for requests in progress, one pool for the whole process
    /// (`listen.max_concurrent_requests`).
    pub concurrency: Arc<tokio::sync::Semaphore>,
    /// Background work tied to requests (tunnels); waited for at shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when shutdown starts: listeners close, connections finish, `/readyz` says no.
    pub draining: CancellationToken,
    /// Cancelled when the shutdown grace period is over: whatever still runs is cut.
    pub hard_stop: CancellationToken,
}

impl AppState {
    /// The state for another worker: the same shared parts, a pool of its own.
    pub fn for_worker(&self) -> AppState {
        AppState {
            config: self.config.clone(),
            policy: self.policy.clone(),
            upstream: self.upstream.with_own_pool(),
            metrics: Arc::clone(&self.metrics),
            request_ids: Arc::clone(&self.request_ids),
            concurrency: Arc::clone(&self.concurrency),
            tasks: self.tasks.clone(),
            draining: self.draining.clone(),
            hard_stop: self.hard_stop.clone(),
        }
    }
}

/// Request ids: a random per-process prefix and a counter, so ids are unique across a fleet
/// without coordination and cost one atomic add.
#[derive(Debug)]
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            prefix: fastrand::u32(..),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// The next id, e.g. `5f1c2a9e-000000000000002a`: hex digits written into a stack buffer
    /// (a `format!` here was 2k instructions of the request path).
    pub fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Relaxed);
        let mut buf = [0u8; 25];
        for (i, slot) in buf[..8].iter_mut().enumerate() {
            *slot = HEX[(self.prefix >> (28 - 4 * i)) as usize & 0xf];
        }
        buf[8] = b'-';
        for (i, slot) in buf[9..].iter_mut().enumerate() {
            *slot = HEX[(n >> (60 - 4 * i)) as usize & 0xf];
        }
        HeaderValue::from_bytes(&buf).expect("invariant: hex digits and '-' are valid header bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefix_dash_counter_in_hex() {
        let ids = RequestIds {
            prefix: 0x5f1c_2a9e,
            next: AtomicU64::new(0x2a),
        };
        assert_eq!(ids.next(), "5f1c2a9e-000000000000002a");
        assert_eq!(ids.next(), "5f1c2a9e-000000000000002b");
    }
}
