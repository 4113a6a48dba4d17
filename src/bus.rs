//! The Redis pub/sub bus between gateways (channel `isr:bus`,
//! [`crate::cache::keys::BUS_CHANNEL`]; DESIGN.md "Redis layout").
//!
//! Messages ([`Message`]), one line each. About one key, `<kind> <key-hex> <gateway-id>`:
//! - `filled`: a gateway stored a new entry. Every other gateway drops its L1 copy of that key
//!   (an L1 copy never lives past its freshness anyway; this closes the window in which two
//!   versions are fresh at once) and wakes a request of its own waiting for that render.
//! - `pass`: the render's answer may not be stored (hit-for-miss): waiters stop waiting.
//! - `released`: a fill lock was released without an entry (the render failed): waiters try to
//!   take the lock over.
//!
//!
//! About the fleet: `inv` (tags invalidated at an epoch, published by the Redis function that
//! recorded them), `ack` (a gateway applied an epoch), `hb` (a gateway is alive), `st` (a
//! gateway's stats snapshot for the fleet view, `admin::fleet`), `tail` (an `isrgate tail`
//! session's filter, `logging::tail`).
//!
//! When the subscription (re)connects, messages may have been missed, so the whole L1 is
//! flushed and the invalidations are loaded again (waiters also re-read Redis on an
//! interval).
//!
//! One subscription per gateway, never one per key: messages for keys are handed to the
//! listener given to [`Bus::start`]. Publishing is best effort: a lost message costs at most
//! the freshness lifetime of one L1 copy, or one poll interval of a waiter.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;

use crate::cache::keys::BUS_CHANNEL as CHANNEL;
use crate::cache::l1::L1;
use crate::cache::store::StoreError;

/// One gateway's end of the bus.
#[derive(Clone)]
pub struct Bus {
    subscriber: SubscriberClient,
    gateway_id: String,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("gateway_id", &self.gateway_id)
            .finish()
    }
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new entry is stored.
    Filled,
    /// The render's answer may not be stored.
    Pass,
    /// A fill lock was released without an entry.
    Released,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Filled => "filled",
            Kind::Pass => "pass",
            Kind::Released => "released",
        }
    }
}

/// A message on the bus. Wire form: words separated by one space, the kind first, the
/// publishing gateway's id third (so a gateway can skip its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `<kind> <key-hex> <gateway>`: something happened to one key.
    Key {
        /// What happened.
        kind: Kind,
        /// The key hash, 32 hex digits.
        key: String,
        /// The publishing gateway.
        gateway: String,
    },
    /// `inv <epoch> <gateway> <mode> <tag>…`: tags invalidated at `epoch` (published by the
    /// Redis script that recorded them, so no gateway sees one without the other).
    Invalidated {
        /// The invalidation's epoch.
        epoch: u64,
        /// Who applied it.
        gateway: String,
        /// Soft or hard.
        mode: crate::cache::epochs::Mode,
        /// The tags.
        tags: Vec<String>,
    },
    /// `ack <epoch> <gateway>`: `gateway` has applied the invalidation of `epoch`.
    Ack {
        /// The acknowledged epoch.
        epoch: u64,
        /// Who acknowledges.
        gateway: String,
    },
    /// `hb - <gateway>`: `gateway` is alive (every [`HEARTBEAT`]).
    Heartbeat {
        /// Who.
        gateway: String,
    },
    /// `st - <gateway> <json>`: `gateway`'s stats snapshot (`admin::fleet`, every
    /// `admin::fleet::EVERY`), compact JSON to the end of the message.
    Stats {
        /// Who.
        gateway: String,
        /// The snapshot.
        json: String,
    },
    /// `tail <session> <tailer> <filter>`: an `isrgate tail` (`tailer`) follows the requests
    /// its filter passes (`logging::tail::Filter` query form, `-` for none) on
    /// `isr:tail:<session>`; renewed every second while it runs.
    Tail {
        /// The session (the channel's suffix).
        session: String,
        /// The `isrgate tail` process's id.
        gateway: String,
        /// The filter, query form (no spaces).
        filter: String,
    },
}

/// How often a gateway announces itself.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

impl Message {
    /// The publishing gateway.
    pub fn gateway(&self) -> &str {
        match self {
            Message::Key { gateway, .. }
            | Message::Invalidated { gateway, .. }
            | Message::Ack { gateway, .. }
            | Message::Heartbeat { gateway }
            | Message::Stats { gateway, .. }
            | Message::Tail { gateway, .. } => gateway,
        }
    }

    /// Wire form.
    pub fn encode(&self) -> String {
        match self {
            Message::Key { kind, key, gateway } => format!("{} {key} {gateway}", kind.as_str()),
            Message::Invalidated {
                epoch,
                gateway,
                mode,
                tags,
            } => format!("inv {epoch} {gateway} {} {}", mode.as_str(), tags.join(" ")),
            Message::Ack { epoch, gateway } => format!("ack {epoch} {gateway}"),
            Message::Heartbeat { gateway } => format!("hb - {gateway}"),
            Message::Stats { gateway, json } => format!("st - {gateway} {json}"),
            Message::Tail {
                session,
                gateway,
                filter,
            } => {
                let filter = if filter.is_empty() { "-" } else { filter };
                format!("tail {session} {gateway} {filter}")
            }
        }
    }

    /// Parses the wire form; anything else is `None` (ignored: newer gateways may speak more).
    pub fn decode(text: &str) -> Option<Message> {
        if let Some(rest) = text.strip_prefix("st - ") {
            // The JSON may hold spaces (in its strings): everything after the gateway.
            let (gateway, json) = rest.split_once(' ')?;
            return (!gateway.is_empty() && json.starts_with('{')).then(|| Message::Stats {
                gateway: gateway.to_owned(),
                json: json.to_owned(),
            });
        }
        let mut parts = text.split(' ');
        let (kind, subject, gateway) = (parts.next()?, parts.next()?, parts.next()?);
        if gateway.is_empty() {
            return None;
        }
        let gateway = gateway.to_owned();
        let key_kind = match kind {
            "filled" => Some(Kind::Filled),
            "pass" => Some(Kind::Pass),
            "released" => Some(Kind::Released),
            _ => None,
        };
        let m = match (kind, key_kind) {
            (_, Some(kind)) if subject.len() == 32 => Message::Key {
                kind,
                key: subject.to_owned(),
                gateway,
            },
            ("inv", None) => {
                let mode = crate::cache::epochs::Mode::parse(parts.next()?)?;
                let tags: Vec<String> = parts
                    .by_ref()
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect();
                if tags.is_empty() {
                    return None;
                }
                return Some(Message::Invalidated {
                    epoch: subject.parse().ok()?,
                    gateway,
                    mode,
                    tags,
                });
            }
            ("ack", None) => Message::Ack {
                epoch: subject.parse().ok()?,
                gateway,
            },
            ("hb", None) if subject == "-" => Message::Heartbeat { gateway },
            ("tail", None) if !subject.is_empty() => Message::Tail {
                session: subject.to_owned(),
                gateway,
                filter: match parts.next()? {
                    "-" => String::new(),
                    f => f.to_owned(),
                },
            },
            _ => return None,
        };
        parts.next().is_none().then_some(m)
    }
}

/// What the bus hands to the rest of the gateway.
#[derive(Debug)]
pub enum Event<'a> {
    /// Another gateway said something.
    Message(&'a Message),
    /// The subscription (re)connected: messages may have been missed.
    Reconnected,
}

/// Receives the bus's events (coalescer waiters, invalidations, fleet membership).
pub type Listener = std::sync::Arc<dyn Fn(Event<'_>) + Send + Sync>;

impl Bus {
    /// Builds the subscriber (no connection yet; see [`Bus::start`]).
    pub fn new(
        settings: &crate::cache::store::RedisSettings,
        gateway_id: String,
    ) -> Result<Bus, StoreError> {
        let subscriber = Builder::from_config(settings.fred_config()?)
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|c| c.broadcast_channel_capacity = 4096)
            .set_policy(crate::cache::store::reconnect_policy())
            .build_subscriber_client()?;
        Ok(Bus {
            subscriber,
            gateway_id,
        })
    }

    /// Whether the subscription is live (connected and subscribed to [`CHANNEL`]).
    pub fn is_subscribed(&self) -> bool {
        self.subscriber.is_connected()
            && self
                .subscriber
                .tracked_channels()
                .iter()
                .any(|c| &**c == CHANNEL)
    }

    /// This gateway's id on the bus.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Connects, subscribes (again after every reconnect) and applies messages to `l1` and
    /// `listener`, on the current runtime, for the life of the process.
    pub fn start(&self, l1: L1, listener: Listener) {
        drop(self.subscriber.connect());
        drop(self.subscriber.manage_subscriptions());
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        let (subscriber, me) = (self.subscriber.clone(), self.gateway_id.clone());
        tokio::spawn(async move {
            loop {
                match subscriber.subscribe(CHANNEL).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "bus subscribe failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = messages.recv() => match m {
                        Ok(m) => {
                            let text: Option<String> = m.value.convert().ok();
                            let m = text.as_deref().and_then(Message::decode);
                            if let Some(m) = m.filter(|m| m.gateway() != me) {
                                if let Message::Key { kind: Kind::Filled, key, .. } = &m {
                                    if let Ok(hash) = u128::from_str_radix(key, 16) {
                                        l1.remove(hash);
                                    }
                                }
                                listener(Event::Message(&m));
                            }
                        }
                        // Lagged: messages were dropped locally; the L1 may be behind.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            l1.clear();
                            listener(Event::Reconnected);
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    r = reconnects.recv() => match r {
                        Ok(server) => {
                            tracing::info!(%server, "bus connected; L1 flushed (messages may have been missed)");
                            l1.clear();
                            listener(Event::Reconnected);
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            l1.clear();
                            listener(Event::Reconnected);
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
    }
}

/// Publishes `message` through `pool` within `timeout`; errors are the caller's to count.
pub async fn publish(pool: &Pool, message: &Message, timeout: Duration) -> Result<(), StoreError> {
    let client = pool.next();
    match tokio::time::timeout(
        timeout,
        client.publish::<(), _, _>(CHANNEL, message.encode()),
    )
    .await
    {
        Ok(r) => r.map_err(StoreError::from),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::epochs::Mode;

    #[test]
    fn messages_round_trip_and_unknown_ones_are_ignored() {
        let key = "0123456789abcdef0123456789abcdef".to_owned();
        let mut all: Vec<Message> = [Kind::Filled, Kind::Pass, Kind::Released]
            .into_iter()
            .map(|kind| Message::Key {
                kind,
                key: key.clone(),
                gateway: "g1".into(),
            })
            .collect();
        all.push(Message::Invalidated {
            epoch: 42,
            gateway: "g1".into(),
            mode: Mode::Hard,
            tags: vec!["path:/a".into(), "*".into()],
        });
        all.push(Message::Ack {
            epoch: 42,
            gateway: "g2".into(),
        });
        all.push(Message::Heartbeat {
            gateway: "g3".into(),
        });
        all.push(Message::Tail {
            session: "s1".into(),
            gateway: "t1".into(),
            filter: "status=5xx&path=%2Fblog%2F%2A".into(),
        });
        all.push(Message::Tail {
            session: "s1".into(),
            gateway: "t1".into(),
            filter: String::new(),
        });
        all.push(Message::Stats {
            gateway: "g4".into(),
            json: r#"{"host":"pod a","ready":true}"#.into(),
        });
        for m in all {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        for other in [
            "",
            "filled",
            "filled abc g1",
            "purged 0123456789abcdef0123456789abcdef g1",
            "filled 0123456789abcdef0123456789abcdef g1 extra",
            "inv 1 g1 soft",
            "inv x g1 soft t",
            "inv 1 g1 medium t",
            "ack 1",
            "hb x g1",
            "tail s1 t1",
            "tail s1 t1 a b",
            "st - g1",
            "st - g1 not-json",
        ] {
            assert_eq!(Message::decode(other), None, "{other}");
        }
    }
}
