//! The one list of the gateway's counters and histograms. Each family is written here once —
//! its Prometheus name, its HELP text, the fields that count it, their labels and their place
//! in `/api/stats` — and `/metrics` (both text formats) and the stats document are generated
//! from it ([`Metrics::families`]). A new counter is one row here and its `inc()` where the
//! event happens.
//!
//! Names follow Prometheus conventions: `isrgate_` prefix, counters end `_total`, histograms
//! end with their base unit (`_seconds`), outcomes and reasons are labels. Gauges read from the
//! gateway's state at scrape time (replicas, L1, Redis) are listed with the exposition
//! (`admin::prometheus`).

use super::errors::{RecentErrors, ServerError, ServerStatus};
use super::family::{Label, metrics};
use super::requests::RequestDurations;
use super::routes::{RouteEvent, RouteStats};
use super::{Counter, Histogram, TopPaths, Unit, WAIT_BOUNDS_MS};
use crate::cache::policy::Skip;
use crate::proxy::classify::Bypass;
use crate::proxy::refresh::Refreshed;

impl Label for Bypass {
    const ALL: &'static [Bypass] = &Bypass::ALL;
    fn label(self) -> &'static str {
        self.as_str()
    }
}

impl Label for Skip {
    const ALL: &'static [Skip] = &Skip::ALL;
    fn label(self) -> &'static str {
        self.as_str()
    }
}

impl Label for ServerStatus {
    const ALL: &'static [ServerStatus] = &ServerStatus::ALL;
    fn label(self) -> &'static str {
        self.as_str()
    }
}

impl Label for Refreshed {
    const ALL: &'static [Refreshed] = &Refreshed::ALL;
    fn label(self) -> &'static str {
        self.as_str()
    }
}

metrics! {
    "isrgate_requests_total" "Requests answered on the public listener (any status), refused ones included." {
        requests: Counter => "requests.total";
    }
    "isrgate_request_duration_seconds" "Client requests from the head read to the last body byte handed to the connection, by status class and cache outcome (hit, stale, miss, bypass, none)." {
        request_duration: RequestDurations;
    }
    "isrgate_server_errors_total" "Answers of 500 and above by status (500, 502, 503, 504, other), whoever made them: a replica, or the gateway (no replica reachable, a timeout, shed)." {
        /// Indexed by `metrics::errors::ServerStatus as usize`; the newest are kept in
        /// `recent_errors`.
        server_errors: [Counter; ServerStatus::ALL.len()] [status: ServerStatus] => "errors.by_status";
    }
    "isrgate_response_body_bytes_total" "Response body bytes sent to clients (as the access log's bytes)." {
        response_body_bytes: Counter;
    }
    "isrgate_request_body_bytes_total" "Request body bytes read from clients and sent on to replicas (WebSocket tunnels and the webhook not included)." {
        request_body_bytes: Counter;
    }
    "isrgate_cache_requests_total" "Cache decisions, one per request: hit (fresh), stale (served stale, any reason), miss (went to a replica, or waited for another request's render), bypass (not a cache candidate)." {
        /// Counted where the answer is known: `cached::drive`, and the hit lane.
        cache_hits: Counter [outcome = "hit"] => "requests.hit";
        /// Every stale answer; `isrgate_stale_served_total` says why.
        cache_stale: Counter [outcome = "stale"];
        /// Stale-if-error answers after a failed render are stale, not misses.
        cache_misses: Counter [outcome = "miss"] => "requests.miss";
        /// The same, per reason: `isrgate_cache_bypass_total`.
        cache_bypass: Counter [outcome = "bypass"] => "requests.bypass";
    }
    "isrgate_stale_served_total" "Stale answers by what happened: swr (served while a refresh runs), origin_error (the replica failed, or the last refresh of the entry did), origin_timeout (the replica did not answer in time, or the last refresh timed out)." {
        /// Served while a refresh runs, the entry's last refresh (if any) not failed.
        stale_swr: Counter [reason = "swr"] => "requests.stale";
        /// Served because the replica failed (5xx, connection refused or reset, no replica).
        stale_origin_error: Counter [reason = "origin_error"] => "requests.stale_if_error";
        /// Served because the replica did not answer in time.
        stale_origin_timeout: Counter [reason = "origin_timeout"] => "requests.stale_if_error";
    }
    "isrgate_cache_bypass_total" "Requests that bypassed the cache, by reason." {
        /// Indexed by `proxy::classify::Bypass as usize`.
        cache_bypass_by: [Counter; Bypass::ALL.len()] [reason: Bypass];
    }
    "isrgate_cache_not_stored_total" "Replica answers to cache candidates that the cache policy refused to store, by reason." {
        /// Indexed by `cache::policy::Skip as usize`.
        cache_not_stored_by: [Counter; Skip::ALL.len()] [reason: Skip];
    }
    "isrgate_fills_not_stored_total" "Replica answers to cache candidates not stored for any reason: the policy's reasons, over cache.max_entry_bytes, another build, the replica's own cached copy, no lifetime." {
        cache_not_stored: Counter;
    }
    "isrgate_renders_total" "Requests for cache candidates that a replica answered: a miss's render, a background refresh, a re-warm (the renders the cache and coalescing did not save)." {
        renders: Counter => "requests.renders";
    }
    "isrgate_cache_stores_total" "Entries stored." {
        cache_stores: Counter;
    }
    "isrgate_cache_l1_hits_total" "Hits answered from the in-process L1 without a store read." {
        cache_l1_hits: Counter;
    }
    "isrgate_cache_sendfile_hits_total" "Hits whose body the hit lane sent with sendfile() from a sealed memory file." {
        cache_sendfile_hits: Counter;
    }
    "isrgate_cache_unsynced_misses_total" "Lookups that skipped the store while invalidations were being loaded (start, bus reconnect)." {
        cache_unsynced_misses: Counter;
    }
    "isrgate_cache_invalidated_total" "Lookups that found an entry invalidated since its render (served stale or missed)." {
        cache_invalidated: Counter;
    }
    "isrgate_cache_variants_dropped_total" "Vary slots dropped because their URL had cache.max_variants more recently filled ones." {
        cache_variants_dropped: Counter => "coalesce.cache_variants_dropped";
    }
    "isrgate_refreshes_total" "Background refreshes (stale-while-revalidate) by outcome: stored, uncacheable (the stale entry was dropped), not_stored, origin_error, origin_timeout, failed (not the replica's fault), elsewhere (another gateway holds the render), current (already refreshed), over_limit (cache.max_background_refreshes reached)." {
        /// Indexed by `proxy::refresh::Refreshed as usize`.
        refreshes: [Counter; Refreshed::ALL.len()] [outcome: Refreshed] => "coalesce.refreshes";
    }
    "isrgate_stale_if_error_waits_total" "Requests answered stale because the replica took longer than cache.stale_if_error_wait (the render goes on in the background)." {
        stale_if_error_waits: Counter => "coalesce.stale_if_error_waits";
    }
    "isrgate_coalesced_followers_total" "Misses served from another request's render instead of rendering: on this gateway (local) or another (remote)." {
        coalesced_local: Counter [where = "local"] => "coalesce.followers_local";
        coalesced_remote: Counter [where = "remote"] => "coalesce.followers_remote";
    }
    "isrgate_coalesce_wait_seconds" "How long followers waited for a render (local and remote)." {
        follower_wait_ms: Histogram = Histogram::new(WAIT_BOUNDS_MS, Unit::Millis);
    }
    "isrgate_lock_contended_total" "Fleet lock attempts that found the lock held by another gateway." {
        lock_contended: Counter => "coalesce.lock_contended";
    }
    "isrgate_leaders_abandoned_total" "Renders whose leader ended without an answer (dropped, failed mid-body): a follower took over." {
        leaders_abandoned: Counter => "coalesce.leaders_abandoned";
    }
    "isrgate_lock_fallbacks_total" "Fills that went ahead without the fleet lock because Redis did not answer." {
        lock_fallbacks: Counter => "coalesce.lock_fallbacks";
    }
    "isrgate_follower_timeouts_total" "Followers that stopped waiting at coalesce.wait_timeout and fetched themselves." {
        follower_timeouts: Counter;
    }
    "isrgate_hit_for_miss_total" "Misses fetched at once because the key was recently uncacheable (hit-for-miss)." {
        hit_for_miss: Counter;
    }
    "isrgate_fills_not_rendered_total" "Fills replacing an entry that got the replica's own cached copy instead of a render (not stored)." {
        fills_not_rendered: Counter => "coalesce.fills_not_rendered";
    }
    "isrgate_fills_older_total" "Fills not kept because a later render of the key was already stored (never back in time)." {
        fills_older: Counter => "coalesce.fills_older";
    }
    "isrgate_fills_siblings_total" "Other variants of a page (the RSC payload of an HTML refresh, and back) stored from the same render." {
        fills_siblings: Counter => "coalesce.fills_siblings";
    }
    "isrgate_fills_other_build_total" "Fills not stored: the replica answered for another build than the request was pinned to." {
        fills_other_build: Counter;
    }
    "isrgate_store_write_backs_total" "L1 entries written to Redis again, on a hit, after their first write failed." {
        store_write_backs: Counter => "coalesce.store_write_backs";
    }
    "isrgate_store_errors_total" "Store reads or writes that failed or timed out (the request went on without them)." {
        store_errors: Counter;
    }
    "isrgate_store_corrupt_total" "Stored bytes that did not decode (treated as a miss and overwritten)." {
        store_corrupt: Counter;
    }
    "isrgate_proxied_total" "Requests that were not answered from the cache path (bypass, cache off) and that a replica answered." {
        proxied: Counter;
    }
    "isrgate_tunnels_total" "WebSocket (Upgrade) tunnels opened." {
        tunnels: Counter;
    }
    "isrgate_upstream_errors_total" "Requests answered with an upstream error, by kind: unreachable (502, no replica could be reached), timeout (504), exchange (502, failed after connecting)." {
        upstream_unreachable: Counter [kind = "unreachable"];
        upstream_timeouts: Counter [kind = "timeout"];
        upstream_errors: Counter [kind = "exchange"];
    }
    "isrgate_upstream_retries_total" "Retries on another replica after a connect failure." {
        upstream_retries: Counter;
    }
    "isrgate_replica_ejections_total" "Replicas ejected after consecutive failures (passive health)." {
        replica_ejections: Counter;
    }
    "isrgate_asset_fallbacks_total" "Build assets (/_next/static) one build answered 404 for, served by another build's replica." {
        asset_fallbacks: Counter;
    }
    "isrgate_action_fallbacks_total" "Server actions (Next-Action) the pinned build did not know, answered by another build's replica." {
        action_fallbacks: Counter;
    }
    "isrgate_refused_total" "Requests or connections refused by the listener, by reason." {
        /// Refused by sanitizing (internal or ambiguous path, CONNECT).
        rejected: Counter [reason = "rejected"];
        /// Refused with 413.
        body_too_large: Counter [reason = "body_too_large"];
        /// Shed with 503 at listen.max_concurrent_requests.
        shed: Counter [reason = "shed"];
        /// Connections closed for a slow request head.
        header_timeouts: Counter [reason = "header_timeout"];
        /// Connections cut because the client did not read a response in time.
        send_timeouts: Counter [reason = "send_timeout"];
    }
    "isrgate_client_body_errors_total" "Requests whose body failed while streaming to a replica (the client went away or stalled)." {
        client_body_errors: Counter;
    }
    "isrgate_idle_closes_total" "Connections closed idle (listen.idle_timeout, or to free descriptors)." {
        idle_closes: Counter;
    }
    "isrgate_invalidations_total" "Revalidation webhook calls applied." {
        invalidations: Counter => "purges.applied";
    }
    "isrgate_webhook_refused_total" "Revalidation webhook calls refused (401, 400, 413, 422)." {
        webhook_refused: Counter => "purges.refused";
    }
    "isrgate_fanout_calls_total" "Revalidate calls to Next.js replicas, by result (failed: after their retries)." {
        fanout_ok: Counter [result = "ok"] => "purges.fanout_ok";
        fanout_failed: Counter [result = "failed"] => "purges.fanout_failed";
    }
    unexposed {
        /// Paths that missed most (the dashboard's "top missed").
        missed_paths: TopPaths,
        /// Paths a replica rendered most for the cache (the route table's top paths).
        rendered_paths: TopPaths,
        /// The newest server errors (the dashboard's "last errors").
        recent_errors: RecentErrors,
        /// Answers and renders per route (the dashboard's route table).
        routes: RouteStats,
    }
}

impl Metrics {
    /// Counts a stale answer, for `reason`.
    pub fn served_stale(&self, reason: crate::cache::policy::StaleReason) {
        use crate::cache::policy::StaleReason as R;
        self.cache_stale.inc();
        match reason {
            R::Swr => self.stale_swr.inc(),
            R::OriginError => self.stale_origin_error.inc(),
            R::OriginTimeout => self.stale_origin_timeout.inc(),
        }
    }

    /// Counts a background refresh that ended with `outcome`.
    pub fn refreshed(&self, outcome: Refreshed) {
        Counter::inc_at(&self.refreshes, outcome as usize);
    }

    /// Background refreshes that ended with `outcome`.
    pub fn refreshes_of(&self, outcome: Refreshed) -> u64 {
        self.refreshes.get(outcome as usize).map_or(0, Counter::get)
    }

    /// Background refreshes that asked a replica (ended after a render was asked for).
    pub fn refreshes_run(&self) -> u64 {
        use Refreshed as R;
        [
            R::Stored,
            R::Uncacheable,
            R::NotStored,
            R::OriginError,
            R::OriginTimeout,
            R::Failed,
        ]
        .into_iter()
        .map(|o| self.refreshes_of(o))
        .sum()
    }

    /// Counts a server error answered to a client, and keeps it among the newest.
    pub fn server_error(&self, error: ServerError) {
        Counter::inc_at(&self.server_errors, ServerStatus::of(error.status) as usize);
        self.recent_errors.record(error);
    }

    /// Counts a render a replica made for the cache of request path `path` (under `routes`),
    /// stored for `stored` (`None`: not stored).
    pub fn rendered(
        &self,
        routes: &[crate::cache::routes::Route],
        path: &str,
        stored: Option<std::time::Duration>,
    ) {
        self.renders.inc();
        self.routes
            .count(routes, path, RouteEvent::Rendered(stored));
        self.rendered_paths.record(path);
    }

    /// Records a request the listener answered: its duration by status class and cache
    /// outcome, and the body bytes sent (the access log's facts, whether or not it is on).
    pub fn answered(
        &self,
        status: u16,
        outcome: super::CacheOutcome,
        body_bytes: u64,
        elapsed: std::time::Duration,
    ) {
        self.request_duration.observe(status, outcome, elapsed);
        self.response_body_bytes.add(body_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Kind, Value};

    #[test]
    fn every_family_is_named_by_the_conventions_and_has_help() {
        let m = Metrics::default();
        let families = m.families();
        let mut names = std::collections::HashSet::new();
        for f in &families {
            assert!(names.insert(f.name), "{} twice", f.name);
            assert!(f.name.starts_with("isrgate_"), "{}", f.name);
            assert!(!f.help.is_empty() && !f.help.contains('\n'), "{}", f.name);
            match f.kind {
                Kind::Counter => assert!(f.name.ends_with("_total"), "{}", f.name),
                Kind::Histogram => assert!(f.name.ends_with("_seconds"), "{}", f.name),
                Kind::Gauge | Kind::Info => assert!(!f.name.ends_with("_total"), "{}", f.name),
            }
            for unit in ["_ms", "_milliseconds", "_us", "_micros"] {
                assert!(!f.name.contains(unit), "{}: base units only", f.name);
            }
        }
    }

    #[test]
    fn series_follow_their_fields_labels_and_stats_places() {
        let m = Metrics::default();
        m.cache_hits.add(3);
        m.served_stale(crate::cache::policy::StaleReason::OriginTimeout);
        m.refreshed(Refreshed::Stored);
        let families = m.families();
        let family = |name: &str| families.iter().find(|f| f.name == name).expect(name);
        let hit = &family("isrgate_cache_requests_total").series[0];
        assert_eq!(hit.labels, vec![("outcome", "hit".into())]);
        assert_eq!(
            (hit.value.clone(), hit.json.as_deref()),
            (Value::Count(3), Some("requests.hit"))
        );
        let stored = family("isrgate_refreshes_total")
            .series
            .iter()
            .find(|s| s.labels[0].1 == "stored")
            .expect("stored");
        assert_eq!(stored.value, Value::Count(1));
        assert_eq!(stored.json.as_deref(), Some("coalesce.refreshes.stored"));
        let stale = family("isrgate_cache_requests_total").series[1].clone();
        assert_eq!(stale.value, Value::Count(1));
    }
}
