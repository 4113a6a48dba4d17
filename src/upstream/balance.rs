//! Choosing a replica: power of two choices over least outstanding requests.
//!
//! Two random healthy replicas are drawn and the one with fewer requests in flight wins, which
//! spreads load nearly as well as a global least-loaded choice without a shared queue (Mitzenmacher,
//! "The Power of Two Choices"). Written here rather than with `tower::balance::p2c` because the
//! choice must skip unhealthy replicas and the one a retry just failed on, which tower's balancer
//! (a `Discover` stream of ready services) does not express; the logic is a few lines.
//!
//! When no replica is healthy, every replica is eligible again (fail open, as Envoy's panic
//! threshold): an attempt that may fail beats refusing all traffic on a bad health signal.

use std::sync::Arc;

use super::replicas::Replica;

/// Picks a replica, avoiding `avoid` when there is any other. With a `build`
/// (`crate::deploy::Pin`), a healthy replica of that build when there is one; a replica of
/// another build only when none is (the fill does not store what it answers).
pub fn pick(
    list: &[Arc<Replica>],
    avoid: Option<&Replica>,
    build: Option<&str>,
) -> Option<Arc<Replica>> {
    let not_avoided = |r: &Arc<Replica>| avoid.is_none_or(|a| !std::ptr::eq(a, r.as_ref()));
    let healthy = |r: &Arc<Replica>| not_avoided(r) && r.is_healthy();
    if let Some(build) = build {
        if let Some(r) = p2c(list, |r| healthy(r) && r.runs(build)) {
            return Some(r);
        }
    }
    if let Some(r) = p2c(list, healthy) {
        return Some(r);
    }
    // Fail open: none healthy. The build's own replicas first, so a page still goes to the
    // build it is keyed under when one of them is back before the health check says so.
    build
        .and_then(|b| p2c(list, |r| not_avoided(r) && r.runs(b)))
        .or_else(|| p2c(list, not_avoided))
        .or_else(|| p2c(list, |_| true))
}

/// A healthy replica that does not run `build` and is not in `tried` (a build asset another
/// build may have).
pub fn pick_other(list: &[Arc<Replica>], build: &str, tried: &[String]) -> Option<Arc<Replica>> {
    p2c(list, |r| {
        r.is_healthy()
            && r.build()
                .is_some_and(|b| *b != build && !tried.contains(&b))
    })
}

fn p2c(list: &[Arc<Replica>], eligible: impl Fn(&Arc<Replica>) -> bool) -> Option<Arc<Replica>> {
    let n = list.iter().filter(|r| eligible(r)).count();
    let nth = |i: usize| list.iter().filter(|r| eligible(r)).nth(i);
    match n {
        0 => None,
        1 => nth(0).cloned(),
        _ => {
            let i = fastrand::usize(..n);
            let j = (i + 1 + fastrand::usize(..n - 1)) % n;
            let (a, b) = (nth(i)?, nth(j)?);
            Some(Arc::clone(if b.in_flight() < a.in_flight() {
                b
            } else {
                a
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Authority;
    use std::time::Duration;

    fn replicas(n: usize) -> Vec<Arc<Replica>> {
        (0..n)
            .map(|i| {
                let a: Authority = format!("r{i}:1").parse().expect("authority");
                Arc::new(Replica::new(a))
            })
            .collect()
    }

    #[test]
    fn prefers_less_loaded() {
        let list = replicas(2);
        let _busy: Vec<_> = (0..5).map(|_| list[0].begin()).collect();
        for _ in 0..50 {
            let r = pick(&list, None, None).expect("some");
            assert!(Arc::ptr_eq(&r, &list[1]));
        }
    }

    #[test]
    fn skips_unhealthy_and_avoided_but_fails_open() {
        let list = replicas(3);
        list[0].record_failure(Some(1), Duration::from_secs(60));
        for _ in 0..50 {
            let r = pick(&list, Some(&list[1]), None).expect("some");
            assert!(Arc::ptr_eq(&r, &list[2]));
        }
        list[2].record_failure(Some(1), Duration::from_secs(60));
        list[1].record_failure(Some(1), Duration::from_secs(60));
        assert!(
            pick(&list, None, None).is_some(),
            "all unhealthy still picks one"
        );
        assert!(pick(&[], None, None).is_none());
    }

    #[test]
    fn a_build_gets_its_own_replicas_and_others_only_when_it_has_none() {
        let list = replicas(3);
        let mark = |r: &Replica, b: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("x-isrgate-build", b.parse().expect("value"));
            r.note_build(&h);
        };
        mark(&list[0], "A");
        mark(&list[1], "B");
        mark(&list[2], "B");
        for _ in 0..50 {
            let r = pick(&list, None, Some("A")).expect("some");
            assert!(Arc::ptr_eq(&r, &list[0]));
            let other = pick_other(&list, "A", &[]).expect("a B");
            assert!(other.runs("B"));
        }
        assert!(pick_other(&list, "A", &["B".into()]).is_none());
        list[0].record_failure(Some(1), Duration::from_secs(60));
        assert!(pick(&list, None, Some("A")).expect("fails over").runs("B"));
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let list = replicas(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            let r = pick(&list, None, None).expect("some");
            let i = list
                .iter()
                .position(|x| Arc::ptr_eq(x, &r))
                .expect("member");
            counts[i] += 1;
        }
        for c in counts {
            assert!((800..=1200).contains(&c), "{counts:?}");
        }
    }
}
