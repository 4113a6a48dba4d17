//! The set of Next.js replicas and each one's live state.
//!
//! The set is read on every request and changed rarely (DNS refresh), so it sits behind an
//! `ArcSwap`: readers never lock. A replica's state is atomics only, written by the request path
//! (in-flight, passive failures) and by the health task (active verdict); nothing here is held
//! across an `.await`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::uri::Authority;
use tokio::sync::{Notify, watch};

use crate::clock::monotonic_ms;

/// One replica and its state.
#[derive(Debug)]
pub struct Replica {
    /// `host:port` it listens on.
    pub authority: Authority,
    in_flight: AtomicU32,
    sent: AtomicU64,
    failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    active_ok: AtomicBool,
    check_passes: AtomicU32,
    check_failures: AtomicU32,
    /// Time to the response head of live traffic, ms.
    pub latency_ms: crate::metrics::Histogram,
    /// The last error of live traffic and when it happened (UNIX ms).
    last_error: std::sync::Mutex<Option<(String, u64)>>,
    /// Counts ejections for not answering at all: requests waiting on the replica watch it.
    stalls: watch::Sender<u64>,
    /// A stall probe is in flight (one at a time per replica).
    probing: AtomicBool,
    /// The build it runs, as its last response said (`crate::deploy`); `None` until one did.
    build: ArcSwapOption<String>,
    /// Told when `build` changes: the set's, so the rollout pins the build at once.
    builds_named: Arc<Notify>,
}

impl Replica {
    /// A replica, healthy until proven otherwise (Kubernetes only lists ready pods).
    pub fn new(authority: Authority) -> Self {
        Self::in_set(authority, Arc::default())
    }

    /// A replica of a set whose `builds_named` hears of its build.
    fn in_set(authority: Authority, builds_named: Arc<Notify>) -> Self {
        Self {
            authority,
            in_flight: AtomicU32::new(0),
            sent: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            active_ok: AtomicBool::new(true),
            check_passes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            latency_ms: crate::metrics::Histogram::default(),
            last_error: std::sync::Mutex::new(None),
            stalls: watch::Sender::new(0),
            probing: AtomicBool::new(false),
            build: ArcSwapOption::empty(),
            builds_named,
        }
    }

    /// The build it runs, as its last response said.
    pub fn build(&self) -> Option<Arc<String>> {
        self.build.load_full()
    }

    /// Whether its last response said it runs `build` (no refcount traffic: the balancer asks
    /// this of every candidate).
    pub fn runs(&self, build: &str) -> bool {
        self.build.load().as_deref().is_some_and(|b| b == build)
    }

    /// Records `build` as what the replica runs, when its responses carry no build header
    /// (found in a page's body by [`sniff_build`]).
    pub fn note_sniffed_build(&self, build: &str) {
        if !self.runs(build) {
            self.build.store(Some(Arc::new(build.to_owned())));
            self.builds_named.notify_one();
            tracing::info!(replica = %self.authority, build, "replica runs build (from its page)");
        }
    }

    /// Records the build a response of this replica names, if any ([`build_of`]); a change
    /// (a first answer, or a replica restarted on another build behind the same address) is
    /// logged.
    pub fn note_build(&self, headers: &http::HeaderMap) {
        let Some(build) = build_of(headers) else {
            return;
        };
        if self.runs(build) {
            return;
        }
        self.build.store(Some(Arc::new(build.to_owned())));
        self.builds_named.notify_one();
        tracing::info!(replica = %self.authority, build, "replica runs build");
    }

    /// Tells when the replica is next ejected for not answering (`changed()` resolves).
    pub fn stalls(&self) -> watch::Receiver<u64> {
        self.stalls.subscribe()
    }

    /// The right to probe this replica for a stall, unless another request holds it.
    pub fn claim_probe(&self) -> Option<ProbeClaim<'_>> {
        // Built only when won: a claim dropped unwon would release the winner's.
        if self
            .probing
            .compare_exchange(false, true, Relaxed, Relaxed)
            .is_ok()
        {
            Some(ProbeClaim(self))
        } else {
            None
        }
    }

    /// Ejects the replica for `ejection`: it accepted a request and then answered neither it
    /// nor a probe. Requests waiting on it hear of it through [`Replica::stalls`].
    pub fn eject_stalled(&self, ejection: Duration) {
        self.check_passes.store(0, Relaxed);
        self.ejected_until_ms
            .store(monotonic_ms() + ejection.as_millis() as u64, Relaxed);
        self.stalls.send_modify(|n| *n += 1);
    }

    /// Eligible for traffic: active checks pass and not passively ejected.
    pub fn is_healthy(&self) -> bool {
        self.active_ok.load(Relaxed) && self.ejected_until_ms.load(Relaxed) <= monotonic_ms()
    }

    /// The last error of live traffic to this replica and when it happened, UNIX ms (for the
    /// dashboard).
    pub fn last_error(&self) -> Option<(String, u64)> {
        crate::sync::lock(&self.last_error).clone()
    }

    /// Records an error of live traffic.
    pub fn set_last_error(&self, error: String) {
        let at = crate::clock::system_ms();
        *crate::sync::lock(&self.last_error) = Some((error, at));
    }

    /// Requests currently outstanding (head sent, body not finished).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Requests ever sent to this replica.
    pub fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    /// Counts a request as outstanding until the guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.sent.fetch_add(1, Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Live traffic reached the replica: the consecutive-failure count restarts.
    pub fn record_success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    /// Live traffic could not reach the replica (connect failure or timeout). Returns `true`
    /// when this failure ejected it.
    pub fn record_failure(&self, threshold: Option<u32>, ejection: Duration) -> bool {
        let Some(threshold) = threshold else {
            return false;
        };
        if self.failures.fetch_add(1, Relaxed) + 1 >= threshold {
            self.failures.store(0, Relaxed);
            // Re-admission by active checks needs a fresh streak of passes after the ejection.
            self.check_passes.store(0, Relaxed);
            self.ejected_until_ms
                .store(monotonic_ms() + ejection.as_millis() as u64, Relaxed);
            return true;
        }
        false
    }

    /// Feeds one active check result; returns the new verdict when it changed.
    pub fn record_check(
        &self,
        passed: bool,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<bool> {
        if passed {
            self.check_failures.store(0, Relaxed);
            let passes = self.check_passes.fetch_add(1, Relaxed) + 1;
            let ejected = self.ejected_until_ms.load(Relaxed) > monotonic_ms();
            if (!self.active_ok.load(Relaxed) || ejected) && passes >= healthy_after {
                self.ejected_until_ms.store(0, Relaxed);
                self.active_ok.store(true, Relaxed);
                return Some(true);
            }
        } else {
            self.check_passes.store(0, Relaxed);
            let fails = self.check_failures.fetch_add(1, Relaxed) + 1;
            if self.active_ok.load(Relaxed) && fails >= unhealthy_after {
                self.active_ok.store(false, Relaxed);
                return Some(false);
            }
        }
        None
    }
}

/// The response header `@isrgate/next` adds to every response of a replica: its build
/// (the deployment id when set, else the `BUILD_ID`).
pub static BUILD_HEADER: http::HeaderName = http::HeaderName::from_static("x-isrgate-build");

/// Next.js's own: the deployment id, on RSC and data responses of 16.x with `deploymentId` set
/// (NEXTJS.md §5).
static DEPLOYMENT_ID_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-nextjs-deployment-id");

/// Longest build name taken from a response; anything longer is not a build name.
const MAX_BUILD_LEN: usize = 128;

/// The build a replica's response names: `x-isrgate-build`, else `x-nextjs-deployment-id`;
/// printable ASCII without spaces, at most 128 bytes.
pub fn build_of(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers
        .get(&BUILD_HEADER)
        .or_else(|| headers.get(&DEPLOYMENT_ID_HEADER))?;
    let b = v.as_bytes();
    let ok = !b.is_empty() && b.len() <= MAX_BUILD_LEN && b.iter().all(|c| c.is_ascii_graphic());
    ok.then(|| v.to_str().ok()).flatten()
}

/// The build id Next writes into a page (NEXTJS.md §5), for replicas without `@isrgate/next`
/// whose responses name no build: `"buildId":"…"` (Pages Router, `__NEXT_DATA__`), the `b` of
/// the first Flight row (App Router: `0:{"b":"…"` in an RSC payload, escaped in the HTML's
/// inline script; 14.x: `0:["…"`), or `data-dpl-id="…"` (16.x with a deployment id).
pub fn sniff_build(body: &[u8]) -> Option<&str> {
    let after = |needle: &[u8], end: &[u8]| -> Option<&[u8]> {
        let at = find(body, needle)? + needle.len();
        let rest = &body[at..];
        let len = find(rest, end)?;
        Some(&rest[..len])
    };
    let row0 = |flight: &[u8], quote: &[u8]| -> Option<&[u8]> {
        let at = find(body, flight)? + flight.len();
        // Row 0's `b` comes within its first few keys.
        let window = &body[at..body.len().min(at + 64)];
        let key = [quote, b"b", quote, b":", quote].concat();
        let from = find(window, &key)? + key.len();
        let rest = &body[at + from..];
        Some(&rest[..find(rest, quote)?])
    };
    let found = after(b"\"buildId\":\"", b"\"")
        .or_else(|| after(b"data-dpl-id=\"", b"\""))
        .or_else(|| row0(b"0:{", b"\\\""))
        .or_else(|| row0(b"0:{", b"\""))?;
    let ok = !found.is_empty()
        && found.len() <= MAX_BUILD_LEN
        && found
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c));
    ok.then(|| std::str::from_utf8(found).ok()).flatten()
}

/// Where `needle` first occurs in `hay` (a health check's page, every few seconds: a plain
/// scan is enough).
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The one stall probe of a replica in flight; released on drop.
#[derive(Debug)]
pub struct ProbeClaim<'a>(&'a Replica);

impl Drop for ProbeClaim<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Relaxed);
    }
}

/// An outstanding request on a replica; decrements the count on drop.
#[derive(Debug)]
pub struct InFlight(Arc<Replica>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The sources of a [`ReplicaSet`].
#[derive(Debug)]
struct Members {
    /// `upstream.replicas`.
    fixed: Vec<Authority>,
    /// What DNS discovery found last.
    discovered: Vec<Authority>,
}

/// The current replicas: the static list plus what DNS discovery found.
#[derive(Debug)]
pub struct ReplicaSet {
    current: ArcSwap<Vec<Arc<Replica>>>,
    /// Who is in the set, by source; writers (discovery, a reload) hold it, readers never.
    members: Mutex<Members>,
    /// Told when a replica names a build it was not known to run.
    builds_named: Arc<Notify>,
}

impl ReplicaSet {
    /// A set of the static replicas.
    pub fn new(fixed: Vec<Authority>) -> Self {
        let builds_named = Arc::new(Notify::new());
        let mut list: Vec<Arc<Replica>> = Vec::with_capacity(fixed.len());
        for a in &fixed {
            if !list.iter().any(|r| &r.authority == a) {
                list.push(Arc::new(Replica::in_set(
                    a.clone(),
                    Arc::clone(&builds_named),
                )));
            }
        }
        Self {
            current: ArcSwap::from_pointee(list),
            members: Mutex::new(Members {
                fixed,
                discovered: Vec::new(),
            }),
            builds_named,
        }
    }

    /// The replicas now; lock-free.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Replica>>> {
        self.current.load_full()
    }

    /// Borrow of the current list for one quick look (the hot path: no refcount traffic).
    pub fn with<R>(&self, f: impl FnOnce(&[Arc<Replica>]) -> R) -> R {
        f(&self.current.load())
    }

    /// Replaces the discovered part of the set. Replicas that stay keep their state; returns
    /// `(added, removed)` authorities.
    pub fn set_discovered(&self, found: &[Authority]) -> (Vec<Authority>, Vec<Authority>) {
        let mut members = crate::sync::lock(&self.members);
        members.discovered = found.to_vec();
        self.publish(&members)
    }

    /// Replaces the static part of the set (`upstream.replicas`, a reload). Replicas that stay
    /// keep their state (health, build, connections); a removed one finishes what it is
    /// sending and gets nothing new. Returns `(added, removed)` authorities.
    pub fn set_fixed(&self, fixed: &[Authority]) -> (Vec<Authority>, Vec<Authority>) {
        let mut members = crate::sync::lock(&self.members);
        members.fixed = fixed.to_vec();
        self.publish(&members)
    }

    /// Makes `members` the current set (their writer's lock held).
    fn publish(&self, members: &Members) -> (Vec<Authority>, Vec<Authority>) {
        let old = self.current.load_full();
        let (fixed, found) = (&members.fixed, &members.discovered);
        let mut next: Vec<Arc<Replica>> = Vec::with_capacity(fixed.len() + found.len());
        for a in fixed.iter().chain(found) {
            if next.iter().any(|r| &r.authority == a) {
                continue;
            }
            let kept = old.iter().find(|r| &r.authority == a).cloned();
            next.push(kept.unwrap_or_else(|| {
                Arc::new(Replica::in_set(a.clone(), Arc::clone(&self.builds_named)))
            }));
        }
        let added = next
            .iter()
            .filter(|n| !old.iter().any(|o| o.authority == n.authority))
            .map(|r| r.authority.clone())
            .collect();
        let removed = old
            .iter()
            .filter(|o| !next.iter().any(|n| n.authority == o.authority))
            .map(|r| r.authority.clone())
            .collect();
        self.current.store(Arc::new(next));
        (added, removed)
    }

    /// Resolves when a replica has named a build it was not known to run since the last
    /// time this resolved (one waiter: the rollout).
    pub async fn build_named(&self) {
        self.builds_named.notified().await;
    }

    /// Authorities of the current replicas.
    pub fn authorities(&self) -> Vec<Authority> {
        self.with(|list| list.iter().map(|r| r.authority.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &'static str) -> Authority {
        Authority::from_static(s)
    }

    #[test]
    fn discovery_keeps_state_of_replicas_that_stay() {
        let set = ReplicaSet::new(vec![a("s:1")]);
        set.set_discovered(&[a("d:1"), a("d:2")]);
        let d1 = Arc::clone(&set.snapshot()[1]);
        let _g = d1.begin();
        let (added, removed) = set.set_discovered(&[a("d:1"), a("d:3")]);
        assert_eq!(added, vec![a("d:3")]);
        assert_eq!(removed, vec![a("d:2")]);
        let now = set.snapshot();
        assert_eq!(now.len(), 3);
        assert!(Arc::ptr_eq(&now[1], &d1));
        assert_eq!(now[1].in_flight(), 1);
    }

    #[test]
    fn passive_ejection_after_threshold_and_readmission_by_checks() {
        let r = Replica::new(a("x:1"));
        let ej = Duration::from_secs(60);
        assert!(!r.record_failure(Some(3), ej));
        assert!(!r.record_failure(Some(3), ej));
        assert!(r.record_failure(Some(3), ej));
        assert!(!r.is_healthy());
        assert_eq!(r.record_check(true, 2, 3), None);
        assert_eq!(r.record_check(true, 2, 3), Some(true));
        assert!(r.is_healthy());
    }

    #[test]
    fn passes_before_an_ejection_do_not_readmit() {
        let r = Replica::new(a("x:1"));
        for _ in 0..5 {
            r.record_check(true, 2, 3);
        }
        assert!(r.record_failure(Some(1), Duration::from_secs(60)));
        assert_eq!(
            r.record_check(true, 2, 3),
            None,
            "one pass is not a streak of two"
        );
        assert!(!r.is_healthy());
        assert_eq!(r.record_check(true, 2, 3), Some(true));
    }

    #[test]
    fn the_build_a_page_names() {
        let pages: [(&[u8], Option<&str>); 6] = [
            (br#"<script id="__NEXT_DATA__">{"props":{},"page":"/","buildId":"B-1_x","isFallback":false}</script>"#, Some("B-1_x")),
            (br#"0:{"P":null,"b":"isrgate-example","p":"","c":["",""]}"#, Some("isrgate-example")),
            (br#"self.__next_f.push([1,"0:{"P":null,"b":"Abc123","p":""}"])"#, Some("Abc123")),
            (br#"<html lang="en" data-dpl-id="dep-7">"#, Some("dep-7")),
            (br#"{"data":{"b":"not a build"}}"#, None),
            (br#"<p>"buildId":"</p>"#, None),
        ];
        for (page, want) in pages {
            assert_eq!(sniff_build(page), want, "{}", String::from_utf8_lossy(page));
        }
    }

    #[test]
    fn active_checks_need_consecutive_results() {
        let r = Replica::new(a("x:1"));
        assert_eq!(r.record_check(false, 2, 2), None);
        assert_eq!(r.record_check(true, 2, 2), None);
        assert_eq!(r.record_check(false, 2, 2), None);
        assert_eq!(r.record_check(false, 2, 2), Some(false));
        assert!(!r.is_healthy());
    }
}
