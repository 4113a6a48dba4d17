//! The Redis pub/sub bus between gateways (channel `isr:bus`, DESIGN.md "Redis layout").
//!
//! Now it carries one message: `filled <key-hex> <gateway-id>`, published after a gateway
//! stores an entry, so every other gateway drops its L1 copy of that key and reads the new
//! entry from Redis on its next request (an L1 copy never lives past its freshness anyway;
//! this closes the window in which two versions are fresh at once). When the subscription
//! (re)connects, messages may have been missed, so the whole L1 is flushed. Invalidations,
//! heartbeats and acknowledgements join this bus with revalidation.
//!
//! One subscription per gateway, never one per key. Publishing is best effort: a lost message
//! costs at most the freshness lifetime of one L1 copy.

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

/// A message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `gateway` stored a new entry for `key` (32 hex digits).
    Filled {
        /// The key hash, hex.
        key: String,
        /// The publishing gateway.
        gateway: String,
    },
}

impl Message {
    /// Wire form.
    pub fn encode(&self) -> String {
        match self {
            Message::Filled { key, gateway } => format!("filled {key} {gateway}"),
        }
    }

    /// Parses the wire form; anything else is `None` (ignored: newer gateways may speak more).
    pub fn decode(text: &str) -> Option<Message> {
        let mut parts = text.split(' ');
        match (parts.next()?, parts.next()?, parts.next()?, parts.next()) {
            ("filled", key, gateway, None) if key.len() == 32 => Some(Message::Filled {
                key: key.to_owned(),
                gateway: gateway.to_owned(),
            }),
            _ => None,
        }
    }
}

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

    /// Connects, subscribes (again after every reconnect) and applies messages to `l1`, on the
    /// current runtime, for the life of the process.
    pub fn start(&self, l1: L1) {
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
                            if let Some(Message::Filled { key, gateway }) = text.as_deref().and_then(Message::decode) {
                                if gateway != me {
                                    if let Ok(hash) = u128::from_str_radix(&key, 16) {
                                        l1.remove(hash);
                                    }
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
        let m = Message::Filled {
            key: "0123456789abcdef0123456789abcdef".into(),
            gateway: "g1".into(),
        };
        assert_eq!(Message::decode(&m.encode()), Some(m));
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
