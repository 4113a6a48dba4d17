//! Who is in the fleet and who has applied an invalidation: gateways heartbeat on the bus
//! every `bus::HEARTBEAT` and acknowledge every invalidation they apply, and the webhook waits
//! (bounded) for the acknowledgements of every live gateway before it answers.
//!
//! Fed by the bus (`on_message`); read by the webhook (`wait_acks`) and the dashboard (`live`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::bus::{HEARTBEAT, Message};

/// A gateway missing this many heartbeats is no longer counted as live.
const MISSED_HEARTBEATS: u32 = 3;

/// Acknowledgements kept for this many of the newest epochs.
const ACKS_KEPT: usize = 1_024;

/// The other gateways, as this one sees them.
#[derive(Debug, Default)]
pub struct Fleet {
    seen: Mutex<HashMap<String, Instant>>,
    acks: Mutex<HashMap<u64, HashSet<String>>>,
    changed: Notify,
}

/// The acknowledgements of one invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acks {
    /// Live gateways (other than this one) that acknowledged.
    pub received: Vec<String>,
    /// Live gateways that did not within the bound.
    pub missing: Vec<String>,
}

impl Fleet {
    /// Applies a bus message (heartbeats and acknowledgements; others are ignored).
    pub fn on_message(&self, m: &Message) {
        match m {
            Message::Heartbeat { gateway } => self.saw(gateway),
            Message::Ack { epoch, gateway } => {
                self.saw(gateway);
                let mut acks = lock(&self.acks);
                acks.entry(*epoch).or_default().insert(gateway.clone());
                if acks.len() > ACKS_KEPT {
                    if let Some(oldest) = acks.keys().min().copied() {
                        acks.remove(&oldest);
                    }
                }
                drop(acks);
                self.changed.notify_waiters();
            }
            _ => {}
        }
    }

    fn saw(&self, gateway: &str) {
        lock(&self.seen).insert(gateway.to_owned(), Instant::now());
    }

    /// The other gateways heard from recently, sorted.
    pub fn live(&self) -> Vec<String> {
        let horizon = HEARTBEAT * MISSED_HEARTBEATS;
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| at.elapsed() <= horizon);
        let mut live: Vec<String> = seen.keys().cloned().collect();
        live.sort();
        live
    }

    /// Waits until every gateway in `expected` acknowledged `epoch`, or `bound` passes.
    pub async fn wait_acks(&self, epoch: u64, expected: Vec<String>, bound: Duration) -> Acks {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            // Registered before the check, so an ack between the two is not missed.
            let changed = self.changed.notified();
            let received: Vec<String> = {
                let acks = lock(&self.acks);
                let got = acks.get(&epoch);
                expected
                    .iter()
                    .filter(|g| got.is_some_and(|s| s.contains(*g)))
                    .cloned()
                    .collect()
            };
            if received.len() == expected.len()
                || tokio::time::timeout_at(deadline, changed).await.is_err()
            {
                let missing = expected
                    .iter()
                    .filter(|g| !received.contains(g))
                    .cloned()
                    .collect();
                return Acks { received, missing };
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_every_live_gateway_then_reports_the_missing() {
        let f = Fleet::default();
        for g in ["a", "b"] {
            f.on_message(&Message::Heartbeat { gateway: g.into() });
        }
        assert_eq!(f.live(), ["a", "b"]);
        f.on_message(&Message::Ack {
            epoch: 7,
            gateway: "a".into(),
        });
        let acks = f.wait_acks(7, f.live(), Duration::from_millis(50)).await;
        assert_eq!(acks.received, ["a"]);
        assert_eq!(acks.missing, ["b"]);
        f.on_message(&Message::Ack {
            epoch: 7,
            gateway: "b".into(),
        });
        let acks = f.wait_acks(7, f.live(), Duration::from_secs(5)).await;
        assert!(acks.missing.is_empty());
    }
}
