//! The server errors the gateway answered: counts by status (`isrgate_server_errors_total`)
//! and the newest [`KEPT`] of them with their time, path and replica (the dashboard's "last
//! errors"). Recorded where the access line is written (`logging::access`), whether or not the
//! log is on: a request answered below 500 costs that one comparison there, and nothing here
//! runs for it. An error takes a short lock and a few small allocations (its path and ids as
//! text): errors are rare, and an error storm stays bounded by [`KEPT`].

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Server errors kept.
pub const KEPT: usize = 20;

/// A 5xx status as the `status` label of `isrgate_server_errors_total` says it: the four an
/// operator tells apart (500 the app failed, 502 no replica or a broken answer, 503 shed or
/// unavailable, 504 a replica too slow) and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStatus {
    /// 500.
    InternalError,
    /// 502.
    BadGateway,
    /// 503.
    Unavailable,
    /// 504.
    GatewayTimeout,
    /// Any other status of 500 and above.
    Other,
}

impl ServerStatus {
    /// Every status, in index order.
    pub const ALL: [ServerStatus; 5] = [
        ServerStatus::InternalError,
        ServerStatus::BadGateway,
        ServerStatus::Unavailable,
        ServerStatus::GatewayTimeout,
        ServerStatus::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerStatus::InternalError => "500",
            ServerStatus::BadGateway => "502",
            ServerStatus::Unavailable => "503",
            ServerStatus::GatewayTimeout => "504",
            ServerStatus::Other => "other",
        }
    }

    /// The label of a status of 500 and above.
    pub fn of(status: u16) -> ServerStatus {
        match status {
            500 => ServerStatus::InternalError,
            502 => ServerStatus::BadGateway,
            503 => ServerStatus::Unavailable,
            504 => ServerStatus::GatewayTimeout,
            _ => ServerStatus::Other,
        }
    }
}

/// One server error answered to a client.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerError {
    /// When it was answered, UNIX milliseconds.
    pub at_ms: u64,
    /// The status.
    pub status: u16,
    /// The request's method.
    pub method: String,
    /// Its path and query, credentials redacted as the access log writes them.
    pub path: String,
    /// The `x-cache` the client got (`MISS`, `BYPASS`; `-` when the cache did not answer).
    pub cache: String,
    /// The replica that answered or failed, `-` when none did.
    pub replica: String,
    /// The `x-request-id` the client got (find the access line and the replica's log by it).
    pub request_id: String,
    /// From the request head to the response's end, milliseconds.
    pub elapsed_ms: f64,
}

/// The newest server errors, oldest first in the ring.
#[derive(Debug, Default)]
pub struct RecentErrors {
    ring: Mutex<VecDeque<ServerError>>,
}

impl RecentErrors {
    /// Keeps `error`, forgetting the oldest past [`KEPT`].
    pub fn record(&self, error: ServerError) {
        let mut ring = crate::sync::lock(&self.ring);
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(error);
    }

    /// The errors kept, newest first.
    pub fn newest_first(&self) -> Vec<ServerError> {
        let ring = crate::sync::lock(&self.ring);
        ring.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(status: u16, at_ms: u64) -> ServerError {
        ServerError {
            at_ms,
            status,
            method: "GET".into(),
            path: "/p".into(),
            cache: "MISS".into(),
            replica: "-".into(),
            request_id: "r".into(),
            elapsed_ms: 1.0,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_first_and_is_bounded() {
        let recent = RecentErrors::default();
        for i in 0..(KEPT as u64 + 5) {
            recent.record(error(502, i));
        }
        let kept = recent.newest_first();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0].at_ms, KEPT as u64 + 4);
        assert_eq!(kept[KEPT - 1].at_ms, 5);
    }

    #[test]
    fn statuses_get_their_label() {
        assert_eq!(ServerStatus::of(502).as_str(), "502");
        assert_eq!(ServerStatus::of(504).as_str(), "504");
        assert_eq!(ServerStatus::of(507).as_str(), "other");
        for (i, s) in ServerStatus::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }
}
