//! A gateway's pre-warm of a new build (`crate::deploy::rollout`): the fleet's hot set, HTML
//! then RSC, through the warm engine ([`super::run`]), rendered in process.
//!
//! Each target goes down the request path of a cache candidate (`proxy::cached::drive`) as a
//! request pinned to the new build: its key is in that build's namespace, a replica of that
//! build renders it, and it coalesces with anything else filling the same key (another
//! gateway's pre-warm, or early visitors of the new build). No socket, no listener permit;
//! `deploy.prewarm_concurrency` and `deploy.prewarm_rate` bound what it asks of the replicas.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, header};
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

use super::sitemap::Page;
use super::{Plan, Progress, Rendered, Renderer, Target, Variant};
use crate::app::{AppState, CacheState};
use crate::deploy::hot::HotPath;
use crate::deploy::rollout;
use crate::deploy::{Deploy, Pin, Prewarmer};
use crate::proxy::forwarded::Peer;
use crate::proxy::refresh::as_variant;
use crate::proxy::respond::Outcome;
use crate::proxy::{cached, classify};

/// How often the dashboard's view of a running pre-warm is brought up to date.
const REPORT_EVERY: Duration = Duration::from_millis(500);

/// The pre-warmer of a running gateway.
pub struct InProcess {
    app: Arc<AppState>,
}

impl InProcess {
    /// Pre-warms through `app`'s request path.
    pub fn new(app: Arc<AppState>) -> InProcess {
        InProcess { app }
    }
}

impl Prewarmer for InProcess {
    fn prewarm<'a>(
        &'a self,
        deploy: &'a Deploy,
        build: &'a str,
        paths: Vec<HotPath>,
        stop: CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            let (Some(cache), Some(pin)) = (self.app.cache.clone(), deploy.pin_of(build)) else {
                return false;
            };
            let renderer = Arc::new(Pinned {
                app: Arc::clone(&self.app),
                cache,
                pin,
                peer: Peer::new(([127, 0, 0, 1], 0).into(), &self.app.policy.forwarded),
            });
            let pages = paths
                .into_iter()
                .map(|p| Page {
                    host: Some(p.host),
                    path: p.path,
                })
                .collect();
            let cfg = &deploy.cfg;
            let plan = Plan {
                targets: super::targets(pages, &[Variant::Html, Variant::Rsc]),
                concurrency: cfg.prewarm_concurrency,
                rate: cfg.prewarm_rate.map(f64::from),
            };
            let progress = Arc::new(Progress::default());
            let run = super::run(plan, renderer, Arc::clone(&progress), stop.clone());
            tokio::pin!(run);
            let mut tick = tokio::time::interval(REPORT_EVERY);
            let summary = loop {
                tokio::select! {
                    summary = &mut run => break summary,
                    _ = tick.tick() => report(deploy, build, &progress, false),
                }
            };
            report(deploy, build, &progress, true);
            tracing::info!(
                build,
                rendered = summary.counts.rendered,
                fresh = summary.counts.fresh,
                failed = summary.counts.failed,
                elapsed = ?summary.elapsed,
                "pre-warm done"
            );
            !summary.stopped_early()
        })
    }
}

fn report(deploy: &Deploy, build: &str, progress: &Progress, finished: bool) {
    let c = progress.counts();
    deploy.status.set_prewarm(rollout::Prewarm {
        build: build.to_owned(),
        total: c.total as u64,
        done: c.done as u64,
        rendered: c.rendered as u64,
        fresh: c.fresh as u64,
        failed: c.failed as u64,
        finished,
    });
}

/// Renders targets on one build, in process.
struct Pinned {
    app: Arc<AppState>,
    cache: Arc<CacheState>,
    pin: Arc<Pin>,
    peer: Peer,
}

impl Renderer for Pinned {
    async fn render(&self, target: &Target) -> Rendered {
        let Some(head) = self.head(target) else {
            return Rendered::Failed("not a valid path".into());
        };
        let Ok(variant) = classify::request(&self.cache.cfg(), &head, false) else {
            return Rendered::Failed("not a cache candidate".into());
        };
        match cached::drive(&self.app, &self.cache, &self.peer, head, variant).await {
            Ok(cached::Served {
                response: resp,
                outcome,
                ..
            }) => {
                let status = resp.status();
                // The render and the store end with the body.
                if resp.into_body().collect().await.is_err() {
                    return Rendered::Failed("the body failed".into());
                }
                match outcome {
                    _ if status.as_u16() >= 400 => {
                        Rendered::Failed(format!("HTTP {}", status.as_u16()))
                    }
                    Outcome::Hit | Outcome::Stale => Rendered::Fresh,
                    Outcome::Miss { stored: false } => {
                        Rendered::Failed("not stored (not cacheable)".into())
                    }
                    _ => Rendered::Rendered,
                }
            }
            Err(e) => Rendered::Failed(e.to_string()),
        }
    }
}

impl Pinned {
    /// `GET path` for the target's host, pinned to the build; its RSC as a background refresh
    /// asks for it (`RSC: 1` and an empty `_rsc`, without which Next 16.3+ answers 307).
    fn head(&self, target: &Target) -> Option<http::request::Parts> {
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(target.path.as_str())
            .body(())
            .ok()?;
        let host = HeaderValue::from_str(target.host.as_deref()?).ok()?;
        req.headers_mut().insert(header::HOST, host);
        req.extensions_mut().insert(Arc::clone(&self.pin));
        let html = req.into_parts().0;
        Some(match target.variant {
            Variant::Html => html,
            Variant::Rsc => as_variant(&html, &crate::cache::key::Variant::Rsc),
        })
    }
}
