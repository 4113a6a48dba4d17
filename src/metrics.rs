//! Counters for every outcome, kept in one place. Plain relaxed atomics: the hot path pays one
//! uncontended add per event. The Prometheus exposition reads these (admin listener).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Every counter of the gateway.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered (any status), including refused ones.
    pub requests: Counter,
    /// Requests proxied to a replica that answered.
    pub proxied: Counter,
    /// WebSocket (Upgrade) tunnels opened.
    pub tunnels: Counter,
    /// Requests refused by sanitizing (internal or ambiguous path, CONNECT).
    pub rejected: Counter,
    /// Requests whose body failed while streaming (client went away).
    pub client_body_errors: Counter,
    /// Connections cut because the client did not read a response in time.
    pub send_timeouts: Counter,
    /// Requests refused with 413.
    pub body_too_large: Counter,
    /// Requests shed with 503 at the concurrency limit.
    pub shed: Counter,
    /// Answered 502: no replica could be reached.
    pub upstream_unreachable: Counter,
    /// Answered 504: a replica did not answer in time.
    pub upstream_timeouts: Counter,
    /// Answered 502: the exchange failed after connecting.
    pub upstream_errors: Counter,
    /// Retries on another replica after a connect failure.
    pub upstream_retries: Counter,
    /// Passive ejections of replicas.
    pub replica_ejections: Counter,
    /// Connections closed for a slow request head.
    pub header_timeouts: Counter,
    /// Connections closed idle.
    pub idle_closes: Counter,
}
