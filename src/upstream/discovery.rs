//! DNS discovery: re-resolve a name (a Kubernetes headless service) on an interval and make the
//! addresses it returns the discovered part of the [`ReplicaSet`].
//!
//! Resolution goes through the [`Resolve`] seam; production uses [`SystemResolver`]
//! (`getaddrinfo` via `tokio::net::lookup_host`, so `/etc/hosts`, search domains and the
//! cluster DNS all apply). A failed or empty lookup keeps the previous set: a DNS blip must not
//! empty the pool, and health checks eject replicas that are really gone.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use tokio_util::sync::CancellationToken;

use super::pool::Pool;
use super::replicas::{Replica, ReplicaSet};
use crate::config::DnsName;

/// Resolves a name to socket addresses.
pub trait Resolve: Send + Sync + 'static {
    /// All addresses of `name` (with its port).
    fn resolve<'a>(
        &'a self,
        name: &'a DnsName,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        name: &'a DnsName,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((name.host.as_str(), name.port))
                .await?
                .collect())
        })
    }
}

/// Resolves once and applies the result; returns the replicas it added.
pub async fn refresh(
    set: &ReplicaSet,
    resolver: &dyn Resolve,
    name: &DnsName,
) -> io::Result<Vec<Authority>> {
    let mut addrs = resolver.resolve(name).await?;
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
    }
    addrs.sort();
    addrs.dedup();
    let found: Vec<Authority> = addrs
        .iter()
        .filter_map(|a| a.to_string().parse().ok())
        .collect();
    let (added, removed) = set.set_discovered(&found);
    if !added.is_empty() || !removed.is_empty() {
        tracing::info!(name = %name.host, ?added, ?removed, "replica set changed");
    }
    Ok(added)
}

/// Runs [`refresh`] every `every` until `stop`, and looks at each replica it adds for its
/// build ([`super::health::learn_builds`]) before a pinned request can pass it by.
pub async fn run(
    set: Arc<ReplicaSet>,
    resolver: Arc<dyn Resolve>,
    name: DnsName,
    every: Duration,
    looks: (Arc<Pool>, super::Shared),
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match refresh(&set, resolver.as_ref(), &name).await {
            Ok(added) if !added.is_empty() => {
                let new: Vec<Arc<Replica>> = set.with(|list| {
                    list.iter()
                        .filter(|r| added.contains(&r.authority))
                        .cloned()
                        .collect()
                });
                let (pool, settings) = &looks;
                let health = Arc::clone(&settings.load().health);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = super::health::learn_builds(pool, &health, &new) => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(name = %name.host, error = %e, "DNS discovery failed; keeping the previous replica set");
            }
        }
    }
}
