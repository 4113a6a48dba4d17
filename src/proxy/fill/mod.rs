//! Steps 8-10 of the request flow for a cache candidate: the fill pipeline. Every fill — a
//! coalesced miss, a background refresh, a re-warm after a purge — is one call to [`fill`]:
//! fetch from a replica, decide whether the answer may be stored (`cache::policy::admit`),
//! read the body (streamed to the client if one waits, keeping a copy), make the entry, keep it
//! in the L1 and the store, then wake the requests that waited and release the key's
//! [`FillPermit`]. Which request fills is decided before, by `coalesce`.
//!
//! Receives a [`Job`]: the key, the variant, the request head prepared by [`upstream_head`]
//! (GET, identity encoding, no conditional headers: the store needs a whole body, and
//! conditionals are answered from the entry) and who waits. Hands on [`Filled`]. There is no
//! second copy of this sequence: `request`, [`copy`], [`Pending::entry`] and [`keep`] are its
//! steps, not alternatives to it.

use std::sync::Arc;

use http::Response;
use http::header::{self, HeaderValue};
use http::request::Parts;

use crate::app::{AppState, CacheState};
use crate::bus::Kind;
use crate::cache::entry::Entry;
use crate::cache::flight::{Done, FillPermit};
use crate::cache::key::{CacheKey, Variant};
use crate::error::ProxyError;
use crate::http::body::{self, Body};

use super::respond::{self, Outcome};

mod copy;
mod exchange;
mod keep;
mod sibling;

pub use copy::{Copied, copy};
use exchange::{Admission, request};
pub use exchange::{Pass, Pending, expect, strip_internal_response_headers, upstream_head};
use keep::keep_all;
pub use keep::{keep, write_back};
pub use sibling::{Sibling, SiblingFilled};
use sibling::{SiblingRead, read_sibling};

/// Who waits for a fill's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A client: it gets the replica's response as it streams; the copy is stored by a
    /// tracked task of its own (the client never waits for the store).
    Waiting,
    /// Nobody (a refresh, a re-warm): the fill ends once the entry is readable by every
    /// gateway, or the next request would find no entry and render again.
    Nobody,
}

/// What to fill.
#[derive(Debug)]
pub struct Job<'a> {
    /// The key.
    pub key: &'a CacheKey,
    /// Its variant (what the body must be).
    pub variant: &'a Variant,
    /// The head to send upstream ([`upstream_head`], with the forwarding headers).
    pub head: Parts,
    /// Who waits for the answer.
    pub client: Client,
    /// The fill replaces an entry past its freshness (a refresh, a re-warm, a miss over an
    /// entry kept for stale-if-error): the replica is asked to regenerate, and a copy from its
    /// own cache never replaces the entry ([`Pass::Copy`]).
    pub replaces: bool,
    /// The page's other variant, stored from the same render (HTML and RSC of an App Router
    /// page, told by its `Vary: RSC`): fetched from the replica that just rendered, before the
    /// permit is released.
    pub sibling: Option<Sibling<'a>>,
}

impl<'a> Job<'a> {
    /// A miss's fill: its client waits for the answer; `replaces` when the lookup found an
    /// entry it keeps for stale-if-error.
    pub fn waiting(
        key: &'a CacheKey,
        variant: &'a Variant,
        head: Parts,
        replaces: bool,
    ) -> Job<'a> {
        Job {
            key,
            variant,
            head,
            client: Client::Waiting,
            replaces,
            sibling: None,
        }
    }

    /// A fill nobody waits for that replaces an entry (a background refresh, a re-warm), with
    /// the page's other variant from the same render when `sibling` is given.
    pub fn replacing(
        key: &'a CacheKey,
        variant: &'a Variant,
        head: Parts,
        sibling: Option<Sibling<'a>>,
    ) -> Job<'a> {
        Job {
            key,
            variant,
            head,
            client: Client::Nobody,
            replaces: true,
            sibling,
        }
    }
}

/// What a fill produced.
#[derive(Debug)]
pub enum Filled {
    /// For a waiting client: the replica's response, streaming while a copy is stored.
    Streaming(Response<Body>),
    /// For nobody: stored, and readable by every gateway; with how the job's sibling was
    /// filled, when it had one and the replica rendered.
    Stored(Arc<Entry>, Option<SiblingFilled>),
    /// Not stored: the answer as it came (a fill for nobody drops its body unread).
    Passed {
        /// The response.
        response: Response<Body>,
        /// Why it was not stored.
        why: Pass,
    },
}

/// The fill pipeline, the one sequence every fill goes through — a miss, a background
/// refresh, a re-warm: request → admit → copy (to the client, if one waits) → entry → keep,
/// then the permit's followers are woken and its fleet lock released. `permit` is `None` for a
/// fill without coalescing.
pub async fn fill(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    job: Job<'_>,
    permit: Option<FillPermit>,
) -> Result<Filled, ProxyError> {
    let key = job.key;
    let answer = request(app, cache, key, job.head, job.variant, job.replaces, None).await;
    let (pending, body) = match answer {
        Ok(Admission::Storable(p, b)) => (p, b),
        Ok(Admission::Pass { response, why }) => {
            end(app, cache, key, permit, Ended::Passed(why)).await;
            return Ok(Filled::Passed { response, why });
        }
        Err(e) => {
            end(app, cache, key, permit, Ended::Failed).await;
            return Err(e);
        }
    };
    match job.client {
        Client::Waiting => Ok(Filled::Streaming(stream(
            app,
            cache,
            key.clone(),
            pending,
            body,
            permit,
        ))),
        Client::Nobody => {
            Ok(fill_for_nobody(app, cache, key, pending, body, permit, job.sibling).await?)
        }
    }
}

/// The rest of a fill nobody waits for: the body read whole, the page's other variant read
/// from the same render when there is one, both kept together, then the permit released.
async fn fill_for_nobody(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    pending: Box<Pending>,
    body: Body,
    permit: Option<FillPermit>,
    sibling: Option<Sibling<'_>>,
) -> Result<Filled, ProxyError> {
    let status = pending.status();
    let entry = match copy(body, None, cache.cfg().max_entry_bytes, || {}).await {
        Ok(Copied::Whole(identity)) => pending.entry(identity, &cache.cfg(), cache.seal_fills()),
        Ok(Copied::TooLarge) => {
            app.metrics.cache_not_stored.inc();
            end(app, cache, key, permit, Ended::Passed(Pass::Uncacheable)).await;
            // Larger than `cache.max_entry_bytes`: not kept, as if not storable.
            return Ok(Filled::Passed {
                response: empty_response(status),
                why: Pass::Uncacheable,
            });
        }
        Err(e) => {
            end(app, cache, key, permit, Ended::Failed).await;
            return Err(e);
        }
    };
    let mut read = None;
    if let (Some(sibling), true) = (sibling, pending.renders_a_page()) {
        read = Some(read_sibling(app, cache, sibling, &pending).await);
    }
    // The sibling is written first. One script call writes both at once; on Cluster (one
    // write per key) a gateway that reads the new HTML then still finds its RSC stored.
    let mut kept = Vec::with_capacity(2);
    if let Some(SiblingRead::Read {
        key, entry, ttl, ..
    }) = &read
    {
        kept.push((*key, entry, *ttl));
    }
    kept.push((key, &entry, pending.ttl()));
    keep_all(app, cache, &kept, pending.replaces()).await;
    if let Some(p) = &permit {
        p.wake(Done::Filled(Arc::clone(&entry)));
    }
    end(app, cache, key, permit, Ended::Stored).await;
    let sibling = match read {
        None => None,
        Some(read) => Some(read.finish(app).await),
    };
    Ok(Filled::Stored(entry, sibling))
}

fn empty_response(status: http::StatusCode) -> Response<Body> {
    let mut response = Response::new(body::empty());
    *response.status_mut() = status;
    response
}

/// Starts copying a storable answer to a waiting client (and the store) in a tracked task;
/// the client's response, whose body streams as the replica sends it.
fn stream(
    app: &Arc<AppState>,
    cache: &Arc<CacheState>,
    key: CacheKey,
    pending: Box<Pending>,
    upstream_body: Body,
    permit: Option<FillPermit>,
) -> Response<Body> {
    let (status, mut headers, len) = pending.client_head();
    let answered = crate::logging::access::AnsweredBy(pending.replica().authority.clone());
    headers.insert(header::AGE, HeaderValue::from_static("0"));
    respond::mark(&mut headers, Outcome::Miss { stored: true });
    respond::add_vary_accept_encoding(&mut headers);
    let (tx, client_body) = body::Channel::new(16, len);
    let (app, cache) = (Arc::clone(app), Arc::clone(cache));
    let tasks = cache.tasks.clone();
    tasks.spawn(async move {
        let max = cache.cfg().max_entry_bytes;
        let copied = copy(upstream_body, Some(tx), max, || {
            // Followers stop waiting now, not when the big body ends.
            cache.flights.remember_pass(key.hash);
            if let Some(p) = &permit {
                p.wake(Done::Pass);
            }
        })
        .await;
        if let Err(e) = settle(&app, &cache, &key, &pending, copied, permit).await {
            tracing::debug!(key = %key.text, error = %e, "render failed mid-body; a follower takes over");
        }
    });
    let mut response = Response::new(body::boxed(client_body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response.extensions_mut().insert(answered);
    response
}

/// Ends a fill once its body is read: the entry is made and kept (or the fill passes or
/// fails), then followers are woken and the permit released either way.
async fn settle(
    app: &AppState,
    cache: &Arc<CacheState>,
    key: &CacheKey,
    pending: &Pending,
    copied: Result<Copied, ProxyError>,
    permit: Option<FillPermit>,
) -> Result<Option<Arc<Entry>>, ProxyError> {
    let kept = made(app, cache, key, pending, copied, permit.as_ref()).await;
    end(app, cache, key, permit, ended(&kept)).await;
    kept
}

/// The entry of a body read whole, woken to the permit's followers and kept; `None` when it
/// was too large to keep.
async fn made(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    pending: &Pending,
    copied: Result<Copied, ProxyError>,
    permit: Option<&FillPermit>,
) -> Result<Option<Arc<Entry>>, ProxyError> {
    match copied? {
        Copied::Whole(identity) => {
            let entry = pending.entry(identity, &cache.cfg(), cache.seal_fills());
            if let Some(p) = permit {
                p.wake(Done::Filled(Arc::clone(&entry)));
            }
            keep(app, cache, key, &entry, pending.ttl(), pending.replaces()).await;
            Ok(Some(entry))
        }
        Copied::TooLarge => {
            app.metrics.cache_not_stored.inc();
            Ok(None)
        }
    }
}

fn ended(kept: &Result<Option<Arc<Entry>>, ProxyError>) -> Ended {
    match kept {
        Ok(Some(_)) => Ended::Stored,
        Ok(None) => Ended::Passed(Pass::Uncacheable),
        Err(_) => Ended::Failed,
    }
}

/// How a fill ended, for its permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Stored (and announced by the store write).
    Stored,
    /// Not stored, for this reason.
    Passed(Pass),
    /// Failed: one of the waiting requests fills instead.
    Failed,
}

/// Wakes the permit's followers, says on the bus what happened and releases the fleet lock.
/// An uncacheable answer is said before the release (every gateway's waiters fetch for
/// themselves rather than take the lock); anything else that stored nothing is said after
/// (waiters race for the lock). A copy from the replica's cache sends this gateway's waiters
/// to fetch for themselves: what they get is the replica's answer, whoever asks.
async fn end(
    app: &AppState,
    cache: &CacheState,
    key: &CacheKey,
    permit: Option<FillPermit>,
    ended: Ended,
) {
    if ended == Ended::Passed(Pass::Uncacheable) {
        cache.flights.remember_pass(key.hash);
    }
    let Some(permit) = permit else { return };
    let fleet = permit.holds_fleet_lock();
    match ended {
        Ended::Stored => permit.release().await,
        Ended::Passed(Pass::Uncacheable) => {
            permit.wake(Done::Pass);
            if fleet {
                cache.announce(Kind::Pass, key.hex(), &app.metrics).await;
            }
            permit.release().await;
        }
        Ended::Passed(Pass::Copy | Pass::OtherBuild) => {
            permit.wake(Done::Pass);
            permit.release().await;
            if fleet {
                cache
                    .announce(Kind::Released, key.hex(), &app.metrics)
                    .await;
            }
        }
        Ended::Passed(Pass::Failed) | Ended::Failed => {
            if ended == Ended::Failed {
                // The render went away without an answer (the replica failed mid-way).
                app.metrics.leaders_abandoned.inc();
            }
            permit.wake(Done::Abandoned);
            permit.release().await;
            if fleet {
                cache
                    .announce(Kind::Released, key.hex(), &app.metrics)
                    .await;
            }
        }
    }
}
