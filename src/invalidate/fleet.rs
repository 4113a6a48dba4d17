//! Who is in the fleet and who has applied an invalidation: gateways heartbeat on the bus
//! every `bus::HEARTBEAT` and acknowledge every invalidation they apply, and the webhook waits
//! (bounded) for the acknowledgements of every live gateway before it answers.
//!
//! Fed by the bus (`on_message`); read by the webhook (`wait_acks`) and the dashboard (`live`).
//!
//! [`start`] connects this gateway to the fleet: the bus listener (fill messages wake the
//! key's flight, invalidations are recorded and acknowledged, a reconnect reloads every
//! invalidation) and the heartbeat.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::CacheState;
use crate::bus::{Event, HEARTBEAT, Kind, Message};
use crate::cache::epochs::Epochs;
use crate::cache::flight::Flights;
use crate::shared::Shared;
use crate::sync::lock;

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
    /// The last stats snapshot of each gateway (`admin::fleet`), kept [`GONE_KEPT`] after it
    /// fell silent so the dashboard shows it as gone.
    stats: Mutex<HashMap<String, Heard>>,
}

/// A gateway's last snapshot and when it came.
#[derive(Debug, Clone)]
pub struct Heard {
    /// When it came.
    pub at: Instant,
    /// The snapshot (compact JSON).
    pub json: Arc<str>,
}

/// How long a gateway that fell silent stays in [`Fleet::stats`] (shown as gone).
pub const GONE_KEPT: Duration = Duration::from_secs(300);

/// Whether a gateway last heard `ago` is live (it missed fewer than three heartbeats).
pub fn is_live(ago: Duration) -> bool {
    ago <= HEARTBEAT * MISSED_HEARTBEATS
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
            Message::Stats { gateway, json } => {
                self.saw(gateway);
                let heard = Heard {
                    at: Instant::now(),
                    json: Arc::from(json.as_str()),
                };
                let mut stats = lock(&self.stats);
                stats.retain(|_, h| h.at.elapsed() <= GONE_KEPT);
                stats.insert(gateway.clone(), heard);
            }
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

    /// The other gateways' last snapshots (live or gone within [`GONE_KEPT`]), by id.
    pub fn stats(&self) -> Vec<(String, Heard)> {
        let mut stats = lock(&self.stats);
        stats.retain(|_, h| h.at.elapsed() <= GONE_KEPT);
        let mut all: Vec<(String, Heard)> =
            stats.iter().map(|(g, h)| (g.clone(), h.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The other gateways heard from recently, sorted.
    pub fn live(&self) -> Vec<String> {
        let mut seen = lock(&self.seen);
        seen.retain(|_, at| is_live(at.elapsed()));
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

/// Starts the store's connections (Redis), the bus and the heartbeat on the current runtime;
/// the heartbeat stops with `stop`. Nothing to start for the in-process store.
pub fn start(cache: &CacheState, stop: &CancellationToken) {
    let Some(shared) = cache.shared() else {
        return;
    };
    shared.redis().start();
    let listener = BusListener {
        tail: Arc::clone(&cache.tail),
        relays: Arc::default(),
        stop: stop.clone(),
        flights: Arc::clone(&cache.flights),
        epochs: Arc::clone(&cache.epochs),
        fleet: Arc::clone(&cache.fleet),
        shared: shared.clone(),
        me: cache.gateway_id().to_owned(),
        tasks: cache.tasks.clone(),
    };
    shared
        .bus()
        .start(cache.l1.clone(), Arc::new(move |event| listener.on(event)));
    let (shared, me, stop) = (shared.clone(), cache.gateway_id().to_owned(), stop.clone());
    tokio::spawn(async move {
        let beat = Message::Heartbeat { gateway: me };
        let mut every = tokio::time::interval(crate::bus::HEARTBEAT);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let _ = shared.publish(&beat, crate::bus::HEARTBEAT).await;
        }
    });
}

/// What the bus's events do to this gateway.
struct BusListener {
    tail: Arc<crate::logging::tail::Tail>,
    relays: Arc<crate::logging::tail::Relays>,
    stop: CancellationToken,
    flights: Arc<Flights>,
    epochs: Arc<Epochs>,
    fleet: Arc<Fleet>,
    shared: Shared,
    me: String,
    tasks: TaskTracker,
}

impl BusListener {
    fn on(&self, event: Event<'_>) {
        match event {
            Event::Message(Message::Key { kind, key, .. }) => {
                if let Ok(hash) = u128::from_str_radix(key, 16) {
                    match kind {
                        // Cacheable again: no hit-for-miss for it here either.
                        Kind::Filled => self.flights.stored(hash),
                        Kind::Pass => self.flights.remember_pass(hash),
                        Kind::Released => {}
                    }
                    self.flights.notify(hash);
                }
            }
            Event::Message(Message::Invalidated {
                epoch, mode, tags, ..
            }) => {
                self.epochs
                    .record(*epoch, *mode, tags.iter().map(String::as_str));
                self.acknowledge(*epoch);
            }
            Event::Message(Message::Tail {
                session, filter, ..
            }) => {
                let ask = (session.as_str(), filter.as_str());
                let pool = self.shared.redis().pool();
                self.relays
                    .renew(&self.tail, ask, pool, &self.tasks, &self.stop);
            }
            Event::Message(m) => self.fleet.on_message(m),
            // Invalidations may have been missed while disconnected: read them all again, and
            // serve no shared entry until then (`lookup`).
            Event::Reconnected => self.reload(),
        }
    }

    /// Reads every invalidation again, until it succeeds: a missed one would keep old pages
    /// valid. Then leaves a snapshot for the next start, if the load had to make one.
    fn reload(&self) {
        let (redis, epochs) = (self.shared.redis().clone(), Arc::clone(&self.epochs));
        let generation = epochs.unsynced();
        self.tasks.spawn(async move {
            let mut wait = Duration::from_millis(100);
            let started = Instant::now();
            loop {
                match crate::invalidate::load::load(&redis, &epochs).await {
                    Ok(loaded) => {
                        epochs.synced(generation);
                        tracing::info!(records = loaded.records, via = loaded.via.as_str(), took_ms = started.elapsed().as_millis(), "invalidations loaded");
                        loaded.leave_snapshot(&redis).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?wait, "could not load invalidations; retrying")
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }

    fn acknowledge(&self, epoch: u64) {
        let (shared, ack) = (
            self.shared.clone(),
            Message::Ack {
                epoch,
                gateway: self.me.clone(),
            },
        );
        self.tasks.spawn(async move {
            let _ = shared.publish(&ack, Duration::from_secs(1)).await;
        });
    }
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
