//! The current build, and the switch to a new one (issue 17, "a defined rollout").
//!
//! The current build is what new sessions get. It lives in Redis (hash `isr:deploy`, field
//! `current`), so every gateway behind a load balancer serves the same build: a page's HTML
//! and its assets never come from two builds. Every second, each gateway looks at its own
//! replicas. The *candidate* is the newest build (by when the fleet first saw it, hash
//! `isr:deploy:seen`) that has at least `deploy.switch_percent` of the healthy replicas. When
//! the candidate is not current:
//! - the current build has no healthy replica here: switch now (nothing else can serve it);
//! - an operator chose the current build (`isrgate deploy switch`, `POST /api/deploy`): stay
//!   until they hand it back (`isrgate deploy auto`);
//! - else the candidate's hot set is pre-rendered on its replicas first (one gateway does it,
//!   under a lock; `deploy.prewarm_*`; `isr:deploy` field `prewarmed` says it is done), then
//!   the switch.
//!
//! The switch is a compare-and-set of `current` in Redis: two gateways deciding at once
//! switch once, and a gateway that lost adopts the winner's choice on its next read. Without
//! Redis the same rule runs on this gateway alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Deploy;
use crate::cache::keys::{DEPLOY_KEY, DEPLOY_LOCK_KEY, DEPLOY_SEEN_KEY};
use crate::cache::store::{RedisStore, StoreError};

/// Most builds `isr:deploy:seen` remembers.
const MAX_SEEN: usize = 64;

/// Longest the look at start may take.
const FIRST_LOOK: Duration = Duration::from_secs(2);

/// How often a gateway looks.
const TICK: Duration = Duration::from_secs(1);

/// Sets `current` to ARGV[2] if it is ARGV[1] ("" = unset) and no operator holds it (unless
/// ARGV[4] = "1": the operator's own call, which also sets `pinned` to ARGV[5]); returns the
/// current build after the call.
const SWITCH: &str = r"
local cur = redis.call('HGET', KEYS[1], 'current') or ''
if ARGV[4] ~= '1' then
  if cur ~= ARGV[1] or redis.call('HGET', KEYS[1], 'pinned') == '1' then return cur end
end
redis.call('HSET', KEYS[1], 'current', ARGV[2], 'switched_ms', ARGV[3])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'pinned', ARGV[5]) end
return ARGV[2]
";

/// What the fleet agreed, as read from `isr:deploy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agreed {
    /// The current build.
    pub current: Option<String>,
    /// An operator chose it.
    pub pinned: bool,
    /// The build whose hot set is pre-rendered.
    pub prewarmed: Option<String>,
    /// When `current` last changed (UNIX ms).
    pub switched_ms: u64,
}

/// What a gateway decides on a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Stay,
    /// Make this build current.
    Switch(String, SwitchReason),
    /// Pre-render this build's hot set, then switch.
    Prewarm(String),
}

/// The rule of the module doc. `view`: each build with its healthy replicas here and when
/// the fleet first saw it; `healthy`: healthy replicas in all; `warm_expired`: the
/// candidate's pre-warm has run past `deploy.prewarm_timeout`.
pub fn decide(
    view: &[(String, usize, u64)],
    healthy: usize,
    agreed: &Agreed,
    switch_percent: u32,
    prewarm: bool,
    warm_expired: bool,
) -> Step {
    let enough = |n: usize| n > 0 && n * 100 >= healthy * switch_percent as usize;
    let candidate = view
        .iter()
        .filter(|(_, n, _)| enough(*n))
        .max_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
    let Some((candidate, _, _)) = candidate else {
        return Step::Stay;
    };
    let Some(current) = &agreed.current else {
        return Step::Switch(candidate.clone(), SwitchReason::NoneCurrent);
    };
    if current == candidate {
        return Step::Stay;
    }
    let serving = view.iter().any(|(b, n, _)| b == current && *n > 0);
    if !serving {
        return Step::Switch(candidate.clone(), SwitchReason::CurrentDown);
    }
    if agreed.pinned {
        return Step::Stay;
    }
    if prewarm && agreed.prewarmed.as_ref() != Some(candidate) && !warm_expired {
        return Step::Prewarm(candidate.clone());
    }
    Step::Switch(candidate.clone(), SwitchReason::NewerReady)
}

/// Why a build becomes current (the switch's log line says it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// No build was current yet.
    NoneCurrent,
    /// The current build has no healthy replica left.
    CurrentDown,
    /// A newer build has enough healthy replicas (`deploy.switch_percent`).
    NewerReady,
}

impl SwitchReason {
    /// The reason in words, for the log.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::NoneCurrent => "no build was current",
            SwitchReason::CurrentDown => "the current build has no healthy replica",
            SwitchReason::NewerReady => "a newer build has enough healthy replicas",
        }
    }
}

/// The rollout as the dashboard shows it.
#[derive(Debug, Default)]
pub struct Status {
    inner: Mutex<Snapshot>,
}

/// One look at the rollout.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// The current build.
    pub current: Option<String>,
    /// An operator chose it.
    pub pinned: bool,
    /// When it became current (UNIX ms).
    pub switched_ms: u64,
    /// The build a switch waits for, and why.
    pub pending: Option<String>,
    /// The last pre-warm this gateway ran.
    pub prewarm: Option<Prewarm>,
}

/// A pre-warm's progress.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Prewarm {
    /// The build warmed.
    pub build: String,
    /// Paths × variants to render.
    pub total: u64,
    /// Done so far.
    pub done: u64,
    /// Rendered now.
    pub rendered: u64,
    /// Already fresh.
    pub fresh: u64,
    /// Failed.
    pub failed: u64,
    /// Finished.
    pub finished: bool,
}

impl Status {
    /// The rollout now.
    pub fn snapshot(&self) -> Snapshot {
        crate::sync::lock(&self.inner).clone()
    }

    /// Records a pre-warm's progress.
    pub fn set_prewarm(&self, prewarm: Prewarm) {
        self.update(|s| s.prewarm = Some(prewarm));
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut crate::sync::lock(&self.inner));
    }
}

/// Reads and writes the rollout's state: Redis, or this gateway's memory.
#[derive(Clone)]
pub enum Ledger {
    /// Shared by every gateway.
    Redis(RedisStore),
    /// This gateway alone.
    Local(Arc<Mutex<(Agreed, HashMap<String, u64>)>>),
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ledger::Redis(_) => "Ledger(Redis)",
            Ledger::Local(_) => "Ledger(local)",
        })
    }
}

impl Ledger {
    /// The fleet's ledger in the shared Redis, or this gateway's own without one (no Redis,
    /// or no cache).
    pub fn of(redis: Option<&RedisStore>) -> Ledger {
        match redis {
            Some(r) => Ledger::Redis(r.clone()),
            None => Ledger::Local(Arc::default()),
        }
    }

    /// What the fleet agreed.
    pub async fn agreed(&self) -> Result<Agreed, StoreError> {
        let redis = match self {
            Ledger::Local(l) => return Ok(crate::sync::lock(l).0.clone()),
            Ledger::Redis(r) => r,
        };
        let all: HashMap<String, String> = redis.bounded(redis.pool().hgetall(DEPLOY_KEY)).await?;
        let text = |k: &str| all.get(k).filter(|v| !v.is_empty()).cloned();
        Ok(Agreed {
            current: text("current"),
            pinned: all.get("pinned").is_some_and(|v| v == "1"),
            prewarmed: text("prewarmed"),
            switched_ms: all
                .get("switched_ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
    }

    /// Records that `builds` were seen now (first sightings only) and returns every build's
    /// first sighting.
    pub async fn seen(
        &self,
        builds: &[String],
        now_ms: u64,
    ) -> Result<HashMap<String, u64>, StoreError> {
        let redis = match self {
            Ledger::Local(l) => {
                let mut l = crate::sync::lock(l);
                for b in builds {
                    l.1.entry(b.clone()).or_insert(now_ms);
                }
                return Ok(l.1.clone());
            }
            Ledger::Redis(r) => r,
        };
        for b in builds {
            let _: bool = redis
                .bounded(redis.pool().hsetnx(DEPLOY_SEEN_KEY, b.as_str(), now_ms))
                .await?;
        }
        let all: HashMap<String, String> =
            redis.bounded(redis.pool().hgetall(DEPLOY_SEEN_KEY)).await?;
        let mut seen: Vec<(String, u64)> = all
            .into_iter()
            .filter_map(|(b, ms)| Some((b, ms.parse().ok()?)))
            .collect();
        if seen.len() > MAX_SEEN {
            // Bounded: the oldest sightings go (a build seen that long ago is not coming back
            // as "newest"; if it does, it is seen again).
            seen.sort_by_key(|s| std::cmp::Reverse(s.1));
            for (b, _) in seen.drain(MAX_SEEN..) {
                let _: i64 = redis.bounded(redis.pool().hdel(DEPLOY_SEEN_KEY, b)).await?;
            }
        }
        Ok(seen.into_iter().collect())
    }

    /// Sets `current` from `from` to `to` unless an operator holds it; `operator`: the
    /// operator's own call (always applies; `Some(pinned)`). Returns the current build after.
    pub async fn switch(
        &self,
        from: Option<&str>,
        to: &str,
        now_ms: u64,
        operator: Option<bool>,
    ) -> Result<String, StoreError> {
        let redis = match self {
            Ledger::Local(l) => {
                let mut l = crate::sync::lock(l);
                let a = &mut l.0;
                if operator.is_none() && (a.current.as_deref() != from || a.pinned) {
                    return Ok(a.current.clone().unwrap_or_default());
                }
                a.current = Some(to.to_owned());
                a.switched_ms = now_ms;
                if let Some(pinned) = operator {
                    a.pinned = pinned;
                }
                return Ok(to.to_owned());
            }
            Ledger::Redis(r) => r,
        };
        let args: Vec<String> = vec![
            from.unwrap_or_default().to_owned(),
            to.to_owned(),
            now_ms.to_string(),
            if operator.is_some() { "1" } else { "0" }.to_owned(),
            if operator == Some(true) { "1" } else { "0" }.to_owned(),
        ];
        redis
            .bounded(redis.pool().next().eval(SWITCH, DEPLOY_KEY, args))
            .await
    }

    /// Hands the choice of the current build back to the rule.
    pub async fn unpin(&self) -> Result<(), StoreError> {
        match self {
            Ledger::Local(l) => {
                crate::sync::lock(l).0.pinned = false;
                Ok(())
            }
            Ledger::Redis(r) => r.bounded(r.pool().hset(DEPLOY_KEY, ("pinned", "0"))).await,
        }
    }

    /// Records that `build`'s hot set is pre-rendered.
    pub async fn prewarmed(&self, build: &str) -> Result<(), StoreError> {
        match self {
            Ledger::Local(l) => {
                crate::sync::lock(l).0.prewarmed = Some(build.to_owned());
                Ok(())
            }
            Ledger::Redis(r) => {
                r.bounded(r.pool().hset(DEPLOY_KEY, ("prewarmed", build)))
                    .await
            }
        }
    }

    /// Takes (or keeps, when `me` holds it) the pre-warm lock for `ttl`; `true` when held.
    pub async fn lock(&self, me: &str, ttl: Duration) -> Result<bool, StoreError> {
        let Ledger::Redis(redis) = self else {
            return Ok(true);
        };
        let px = Expiration::PX(ttl.as_millis() as i64);
        let taken: Option<String> = redis
            .bounded(redis.pool().set(
                DEPLOY_LOCK_KEY,
                me,
                Some(px.clone()),
                Some(SetOptions::NX),
                false,
            ))
            .await?;
        if taken.is_some() {
            return Ok(true);
        }
        let holder: Option<String> = redis.bounded(redis.pool().get(DEPLOY_LOCK_KEY)).await?;
        if holder.as_deref() == Some(me) {
            let _: Option<String> = redis
                .bounded(redis.pool().set(
                    DEPLOY_LOCK_KEY,
                    me,
                    Some(px),
                    Some(SetOptions::XX),
                    false,
                ))
                .await?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Looks once now (bounded by [`FIRST_LOOK`]), then runs the rollout for `deploy` every
/// second until `stop`; `prewarm` pre-renders a build's hot set (none: switches do not wait
/// for one). Control work, like health checks: it and its pre-warms stop with `stop`,
/// nothing waits for them.
pub async fn start(
    deploy: Arc<Deploy>,
    prewarm: Option<Arc<dyn super::Prewarmer>>,
    stop: CancellationToken,
) {
    let mut rollout = Rollout {
        ledger: deploy.ledger.clone(),
        deploy,
        prewarm,
        seen: HashMap::new(),
        ticks: 0,
        warming: None,
        stop: stop.clone(),
        me: format!("{:016x}", fastrand::u64(..)),
    };
    match tokio::time::timeout(FIRST_LOOK, rollout.tick()).await {
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "rollout: could not read the fleet's builds at start")
        }
        Err(_) => tracing::warn!(
            "rollout: the fleet's builds were not read within {FIRST_LOOK:?} at start"
        ),
        Ok(Ok(())) => {}
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        // The first tick of an interval is at once: the look above was it.
        tick.tick().await;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let replicas = Arc::clone(&rollout.deploy.replicas);
        loop {
            // A replica naming a build for the first time is pinned at once, not a tick later:
            // until it is, requests for that build are keyed outside its namespace.
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
                () = replicas.build_named() => {}
            }
            if let Err(e) = rollout.tick().await {
                tracing::debug!(error = %e, "rollout: could not read or write the fleet's state");
            }
        }
    });
}

/// The rollout task's state.
struct Rollout {
    deploy: Arc<Deploy>,
    ledger: Ledger,
    prewarm: Option<Arc<dyn super::Prewarmer>>,
    /// Build → first sighting by the fleet.
    seen: HashMap<String, u64>,
    ticks: u64,
    /// The pre-warm running here: its build, when it started, and its task.
    warming: Option<(String, tokio::time::Instant, tokio::task::JoinHandle<()>)>,
    stop: CancellationToken,
    /// This gateway, as the pre-warm lock's holder.
    me: String,
}

impl Rollout {
    async fn tick(&mut self) -> Result<(), StoreError> {
        let now = crate::clock::system_ms();
        // A store that does not answer (Redis still connecting at start, or down) must not
        // leave requests without their build's namespace: the replicas' own marks still pin
        // them, in the order this gateway saw them; only decisions wait for the store.
        let mut failed: Option<StoreError> = None;
        if self.ticks % 10 == 0 {
            if let Some(redis) = ledger_store(&self.ledger) {
                if let Err(e) = self.deploy.builds.read(redis).await {
                    failed = Some(e);
                }
            }
            if let Ledger::Redis(redis) = &self.ledger {
                if let Err(e) = self.deploy.hot.flush(redis, now).await {
                    failed = Some(e);
                }
            }
        }
        self.ticks += 1;
        let new = self.deploy.unpinned();
        if !new.is_empty() || self.ticks % 10 == 1 {
            match self.ledger.seen(&new, now).await {
                Ok(seen) => self.seen = seen,
                Err(e) => {
                    for b in &new {
                        self.seen.entry(b.clone()).or_insert(now);
                    }
                    failed = Some(e);
                }
            }
        }
        let agreed = match self.ledger.agreed().await {
            Ok(agreed) => agreed,
            Err(e) => {
                failed = Some(e);
                Agreed {
                    current: self.deploy.current().map(|p| p.build.clone()),
                    ..Agreed::default()
                }
            }
        };
        let named = self.named();
        let mut order: Vec<(String, u64)> = self
            .seen
            .iter()
            .filter(|(b, _)| named.contains(b) || agreed.current.as_ref() == Some(*b))
            .map(|(b, ms)| (b.clone(), *ms))
            .collect();
        order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let names: Vec<String> = order.iter().map(|(b, _)| b.clone()).collect();
        self.deploy.set(&names, agreed.current.as_deref());
        if let Some(e) = failed {
            return Err(e);
        }
        let (tally, healthy) = self.deploy.tally();
        let view: Vec<(String, usize, u64)> = tally
            .iter()
            .map(|(p, n)| {
                (
                    p.build.clone(),
                    *n,
                    self.seen.get(&p.build).copied().unwrap_or(0),
                )
            })
            .collect();
        let expired = self
            .warming
            .as_ref()
            .is_some_and(|(_, started, _)| started.elapsed() >= self.deploy.cfg.prewarm_timeout);
        let prewarm = self.deploy.cfg.prewarm_paths > 0 && self.prewarm.is_some();
        let step = decide(
            &view,
            healthy,
            &agreed,
            self.deploy.cfg.switch_percent,
            prewarm,
            expired,
        );
        self.deploy.status.update(|s| {
            s.current = agreed.current.clone();
            s.pinned = agreed.pinned;
            s.switched_ms = agreed.switched_ms;
            s.pending = match &step {
                Step::Prewarm(b) => Some(b.clone()),
                _ => None,
            };
        });
        match step {
            Step::Stay => Ok(()),
            Step::Switch(to, why) => {
                self.switch(&names, agreed.current.as_deref(), &to, why, now)
                    .await
            }
            Step::Prewarm(build) => self.start_prewarm(build).await,
        }
    }

    /// Builds a replica of this gateway names now.
    fn named(&self) -> Vec<String> {
        let mut named: Vec<String> = Vec::new();
        for r in self.deploy.replicas.snapshot().iter() {
            if let Some(b) = r.build() {
                if !named.contains(&b) {
                    named.push(b.as_ref().clone());
                }
            }
        }
        named
    }

    async fn switch(
        &mut self,
        names: &[String],
        from: Option<&str>,
        to: &str,
        why: SwitchReason,
        now: u64,
    ) -> Result<(), StoreError> {
        let after = self.ledger.switch(from, to, now, None).await?;
        if after == to {
            tracing::info!(
                build = to,
                previous = from.unwrap_or("-"),
                reason = why.as_str(),
                "build is now current"
            );
            self.deploy.status.update(|s| {
                s.current = Some(to.to_owned());
                s.switched_ms = now;
                s.pending = None;
            });
        }
        self.deploy
            .set(names, Some(after.as_str()).filter(|a| !a.is_empty()));
        Ok(())
    }

    /// Starts pre-warming `build` here unless it runs already, here or (under the lock) on
    /// another gateway.
    async fn start_prewarm(&mut self, build: String) -> Result<(), StoreError> {
        let Some(prewarm) = self.prewarm.clone() else {
            return Ok(());
        };
        if let Some((b, _, task)) = &self.warming {
            if *b == build && !task.is_finished() {
                // Still ours: keep the lock.
                self.ledger.lock(&self.lock_owner(&build), LOCK_TTL).await?;
                return Ok(());
            }
            if *b == build {
                return Ok(());
            }
        }
        if !self.ledger.lock(&self.lock_owner(&build), LOCK_TTL).await? {
            return Ok(());
        }
        tracing::info!(build = %build, paths = self.deploy.cfg.prewarm_paths, "pre-warming the new build's hot set before it becomes current");
        let (deploy, ledger, prewarm, stop) = (
            Arc::clone(&self.deploy),
            self.ledger.clone(),
            prewarm,
            self.stop.clone(),
        );
        let b = build.clone();
        let task = tokio::spawn(async move {
            let now = crate::clock::system_ms();
            if let Some(redis) = ledger_store(&ledger) {
                // This gateway's latest counts join the fleet's before the set is read.
                if let Err(e) = deploy.hot.flush(redis, now).await {
                    tracing::warn!(error = %e, "could not add this gateway's counts to the hot set");
                }
            }
            let paths = deploy
                .hot
                .top(ledger_store(&ledger), deploy.cfg.prewarm_paths, now)
                .await;
            let done = prewarm.prewarm(&deploy, &b, paths, stop).await;
            if done {
                if let Err(e) = ledger.prewarmed(&b).await {
                    tracing::warn!(build = %b, error = %e, "pre-warm done but not recorded; the switch waits for deploy.prewarm_timeout");
                }
            }
        });
        self.warming = Some((build, tokio::time::Instant::now(), task));
        Ok(())
    }

    fn lock_owner(&self, build: &str) -> String {
        format!("{}:{build}", self.me)
    }
}

/// How long a pre-warm lock outlives a gateway that stopped renewing it.
const LOCK_TTL: Duration = Duration::from_secs(15);

fn ledger_store(ledger: &Ledger) -> Option<&RedisStore> {
    match ledger {
        Ledger::Redis(r) => Some(r),
        Ledger::Local(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(current: &str) -> Agreed {
        Agreed {
            current: Some(current.into()),
            ..Agreed::default()
        }
    }

    fn v(b: &str, n: usize, seen: u64) -> (String, usize, u64) {
        (b.into(), n, seen)
    }

    #[test]
    fn the_newest_build_with_its_share_takes_over_after_its_prewarm() {
        let a = agreed("A");
        // One B of four: not yet.
        assert_eq!(
            decide(&[v("A", 3, 1), v("B", 1, 2)], 4, &a, 50, true, false),
            Step::Stay
        );
        // Two of four: pre-warm, then switch.
        let half = [v("A", 2, 1), v("B", 2, 2)];
        assert_eq!(
            decide(&half, 4, &a, 50, true, false),
            Step::Prewarm("B".into())
        );
        let warmed = Agreed {
            prewarmed: Some("B".into()),
            ..a.clone()
        };
        assert!(
            matches!(decide(&half, 4, &warmed, 50, true, false), Step::Switch(b, _) if b == "B")
        );
        assert!(matches!(decide(&half, 4, &a, 50, false, false), Step::Switch(b, _) if b == "B"));
        assert!(
            matches!(decide(&half, 4, &a, 50, true, true), Step::Switch(b, _) if b == "B"),
            "timed out"
        );
    }

    #[test]
    fn no_replica_of_the_current_build_switches_at_once_even_when_pinned() {
        let pinned = Agreed {
            pinned: true,
            ..agreed("A")
        };
        assert!(
            matches!(decide(&[v("A", 0, 1), v("B", 1, 2)], 1, &pinned, 50, true, false), Step::Switch(b, _) if b == "B")
        );
        assert_eq!(
            decide(&[v("A", 1, 1), v("B", 3, 2)], 4, &pinned, 50, true, false),
            Step::Stay
        );
    }

    #[test]
    fn a_rollback_and_a_first_start() {
        // B's replicas are gone; A came back: A is the only build with a share.
        assert!(
            matches!(decide(&[v("B", 0, 2), v("A", 2, 1)], 2, &agreed("B"), 50, true, false), Step::Switch(b, _) if b == "A")
        );
        assert!(
            matches!(decide(&[v("A", 2, 1)], 2, &Agreed::default(), 50, true, false), Step::Switch(b, _) if b == "A")
        );
        assert_eq!(
            decide(&[], 2, &Agreed::default(), 50, true, false),
            Step::Stay,
            "no build named"
        );
    }
}
