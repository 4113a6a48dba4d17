//! Protocol upgrades (WebSocket, e.g. `next dev` HMR or an app's own sockets): forward the
//! upgrade request, and when the replica answers `101 Switching Protocols`, splice the two
//! upgraded connections together byte for byte until either side closes or the gateway stops.
//!
//! Upgrades exist on HTTP/1.1 only; `sanitize` reports `upgrade` only there. Any other answer
//! from the replica is passed back as an ordinary response.

use http::request::Parts;
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{finish, sanitize};
use crate::app::AppState;
use crate::error::ProxyError;
use crate::http::body::{self, Body};

pub(super) async fn open(
    app: &AppState,
    mut head: Parts,
    body: Body,
    sanitized: &sanitize::Sanitized,
) -> Result<Response<Body>, ProxyError> {
    let client_side = head
        .extensions
        .remove::<OnUpgrade>()
        .ok_or(ProxyError::UpgradeUnsupported)?;
    let reply = app.upstream.send(head, body).await?;
    if reply.response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let mut resp = reply.into_response();
        finish(app, &mut resp, sanitized, true);
        return Ok(resp);
    }
    let (mut upstream_resp, in_flight) = reply.into_upgrade();
    let upstream_side = hyper::upgrade::on(&mut upstream_resp);
    let stop = app.hard_stop.clone();
    app.metrics.tunnels.inc();
    app.tasks.spawn(async move {
        // Counted as in flight on the replica for as long as the tunnel lives.
        let _in_flight = in_flight;
        let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "tunnel closed with error");
                }
            }
            _ = stop.cancelled() => {}
        }
    });
    // The 101 goes back with the replica's headers (Upgrade, Connection, Sec-WebSocket-*).
    Ok(upstream_resp.map(|_| body::empty()))
}
