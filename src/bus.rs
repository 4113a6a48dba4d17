//! The Redis pub/sub bus between gateways (channel `isr:bus`, DESIGN.md "Redis layout").
//!
//! Messages are `<kind> <key-hex> <gateway-id>`:
//! - `filled`: a gateway stored a new entry. Every other gateway drops its L1 copy of that key
//!   (an L1 copy never lives past its freshness anyway; this closes the window in which two
//!   versions are fresh at once) and wakes a request of its own waiting for that render.
//! - `pass`: the render's answer may not be stored (hit-for-miss): waiters stop waiting.
//! - `released`: a fill lock was released without an entry (the render failed): waiters try to
//!   take the lock over.
//!
//! When the subscription (re)connects, messages may have been missed, so the whole L1 is
//! flushed (waiters also re-read Redis on an interval). Invalidations, heartbeats and
//! acknowledgements join this bus with revalidation.
//!
//! One subscription per gateway, never one per key: messages for keys are handed to the
//! listener given to [`Bus::start`]. Publishing is best effort: a lost message costs at most
//! the freshness lifetime of one L1 copy, or one poll interval of a waiter.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;

use crate::cache::l1::L1;
use crate::cache::store::StoreError;

/// The channel every gateway subscribes to.
pub const CHANNEL: &str = "isr:bus";

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

/// A message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// What happened.
    pub kind: Kind,
    /// The key hash, 32 hex digits.
    pub key: String,
    /// The publishing gateway.
    pub gateway: String,
}

impl Message {
    /// Wire form.
    pub fn encode(&self) -> String {
        format!("{} {} {}", self.kind.as_str(), self.key, self.gateway)
    }

    /// Parses the wire form; anything else is `None` (ignored: newer gateways may speak more).
    pub fn decode(text: &str) -> Option<Message> {
        let mut parts = text.split(' ');
        let (kind, key, gateway) = match (parts.next()?, parts.next()?, parts.next()?, parts.next())
        {
            (kind, key, gateway, None) if key.len() == 32 => (kind, key, gateway),
            _ => return None,
        };
        let kind = match kind {
            "filled" => Kind::Filled,
            "pass" => Kind::Pass,
            "released" => Kind::Released,
            _ => return None,
        };
        Some(Message {
            kind,
            key: key.to_owned(),
            gateway: gateway.to_owned(),
        })
    }
}

/// Receives what other gateways say about keys (the coalescer: wakes its waiters).
pub type Listener = std::sync::Arc<dyn Fn(Kind, u128) + Send + Sync>;

impl Bus {
    /// Builds the subscriber (no connection yet; see [`Bus::start`]).
    pub fn new(
        settings: &crate::cache::store::RedisSettings,
        gateway_id: String,
    ) -> Result<Bus, StoreError> {
        let subscriber = Builder::from_config(settings.fred_config()?)
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|c| c.broadcast_channel_capacity = 4096)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
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
                            if let Some(m) = m.filter(|m| m.gateway != me) {
                                if let Ok(hash) = u128::from_str_radix(&m.key, 16) {
                                    if m.kind == Kind::Filled {
                                        l1.remove(hash);
                                    }
                                    listener(m.kind, hash);
                                }
                            }
                        }
                        // Lagged: messages were dropped locally; the L1 may be behind.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => l1.clear(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    r = reconnects.recv() => match r {
                        Ok(server) => {
                            tracing::info!(%server, "bus connected; L1 flushed (messages may have been missed)");
                            l1.clear();
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => l1.clear(),
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

    #[test]
    fn messages_round_trip_and_unknown_ones_are_ignored() {
        for kind in [Kind::Filled, Kind::Pass, Kind::Released] {
            let m = Message {
                kind,
                key: "0123456789abcdef0123456789abcdef".into(),
                gateway: "g1".into(),
            };
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        for other in [
            "",
            "filled",
            "filled abc g1",
            "purged 0123456789abcdef0123456789abcdef g1",
            "filled 0123456789abcdef0123456789abcdef g1 extra",
        ] {
            assert_eq!(Message::decode(other), None, "{other}");
        }
    }
}
