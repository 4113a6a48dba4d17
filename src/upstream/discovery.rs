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

use super::replicas::ReplicaSet;
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

/// Resolves once and applies the result; returns how many replicas were found.
pub async fn refresh(
    set: &ReplicaSet,
    resolver: &dyn Resolve,
    name: &DnsName,
) -> io::Result<usize> {
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
    Ok(found.len())
}

/// Runs [`refresh`] every `every` until `stop`.
pub async fn run(
    set: Arc<ReplicaSet>,
    resolver: Arc<dyn Resolve>,
    name: DnsName,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = refresh(&set, resolver.as_ref(), &name).await {
            tracing::warn!(name = %name.host, error = %e, "DNS discovery failed; keeping the previous replica set");
        }
    }
}
