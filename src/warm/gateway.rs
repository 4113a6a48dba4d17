//! The renderer of `isrgate warm`: asks a gateway for each target over HTTP, as a visitor
//! would, so a miss is rendered by a replica and stored in the fleet's cache on the way.
//!
//! Receives a [`Target`]; sends `GET path` to `--gateway` with `Host` (the `--host` given,
//! else the target's host from its sitemap URL, else the gateway's address), `RSC: 1` for the
//! RSC variant (Next's client-side navigation asks so), `x-deployment-id` for `--build` (the
//! gateway routes it to that build's replicas). Reads the whole body (the render and the store
//! end with it) and hands on how it went, from the gateway's `x-cache`: `HIT` or `STALE` →
//! [`Rendered::Fresh`], any other 2xx or 3xx → [`Rendered::Rendered`], 4xx or 5xx, a
//! connection error or the timeout → [`Rendered::Failed`].

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::{Rendered, Renderer, Target, Variant};
use crate::proxy::respond::X_CACHE;

/// The build a request is for; the gateway routes it to that build's replicas.
pub static X_DEPLOYMENT_ID: HeaderName = HeaderName::from_static("x-deployment-id");

/// The settings of a [`GatewayRenderer`], as the command line gives them.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    /// `http://HOST:PORT` of the gateway.
    pub gateway: &'a str,
    /// The `Host` to ask every page with, instead of the sitemap's.
    pub host: Option<&'a str>,
    /// The build id to send as `x-deployment-id`.
    pub build: Option<&'a str>,
    /// Most time one render may take, body included.
    pub timeout: Duration,
}

/// A setting the renderer cannot use; says which flag.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {value:?}: {reason}")]
pub struct SettingsError {
    /// The flag.
    pub flag: &'static str,
    /// The value given.
    pub value: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Renders by asking a gateway over HTTP/1.1 (pooled keep-alive connections).
pub struct GatewayRenderer {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `http://authority`, no trailing slash.
    base: String,
    host: Option<HeaderValue>,
    build: Option<HeaderValue>,
    timeout: Duration,
}

impl GatewayRenderer {
    /// Checks the settings and builds the client.
    pub fn new(s: &Settings<'_>) -> Result<GatewayRenderer, SettingsError> {
        let bad = |flag, value: &str, reason| SettingsError {
            flag,
            value: value.to_owned(),
            reason,
        };
        let uri: Uri = s.gateway.parse().map_err(|_| {
            bad(
                "--gateway",
                s.gateway,
                "not a URL (expected http://HOST:PORT)",
            )
        })?;
        let authority = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(a)) if matches!(uri.path(), "" | "/") => a,
            (Some("https"), _) => {
                return Err(bad(
                    "--gateway",
                    s.gateway,
                    "https is not supported: use the gateway's plain http listener",
                ));
            }
            _ => return Err(bad("--gateway", s.gateway, "expected http://HOST:PORT")),
        };
        let header = |flag, v: Option<&str>| {
            v.map(|v| {
                HeaderValue::from_str(v).map_err(|_| bad(flag, v, "not a valid header value"))
            })
            .transpose()
        };
        Ok(GatewayRenderer {
            client: super::client(s.timeout),
            base: format!("http://{authority}"),
            host: header("--host", s.host)?,
            build: header("--build", s.build)?,
            timeout: s.timeout,
        })
    }

    /// The request for `target`, or why there is none.
    fn request(&self, target: &Target) -> Result<Request<Empty<Bytes>>, String> {
        let mut req = Request::get(format!("{}{}", self.base, target.path))
            .header(
                header::USER_AGENT,
                concat!("isrgate-warm/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let headers = req.headers_mut();
        let host = match (&self.host, &target.host) {
            (Some(h), _) => Some(h.clone()),
            (None, Some(h)) => Some(HeaderValue::from_str(h).map_err(|_| "bad host".to_owned())?),
            (None, None) => None,
        };
        if let Some(host) = host {
            headers.insert(header::HOST, host);
        }
        if target.variant == Variant::Rsc {
            headers.insert(crate::http::RSC.clone(), HeaderValue::from_static("1"));
        }
        if let Some(build) = &self.build {
            headers.insert(X_DEPLOYMENT_ID.clone(), build.clone());
        }
        Ok(req)
    }

    /// Sends `req` and reads the whole answer.
    async fn exchange(&self, req: Request<Empty<Bytes>>) -> Result<Rendered, String> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| super::describe(&e))?;
        let rendered = classify(resp.status(), resp.headers().get(&X_CACHE));
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(|e| format!("body cut: {}", super::describe(&e)))?;
        }
        Ok(rendered)
    }
}

impl Renderer for GatewayRenderer {
    async fn render(&self, target: &Target) -> Rendered {
        let req = match self.request(target) {
            Ok(req) => req,
            Err(reason) => return Rendered::Failed(reason),
        };
        match tokio::time::timeout(self.timeout, self.exchange(req)).await {
            Ok(Ok(rendered)) => rendered,
            Ok(Err(reason)) => Rendered::Failed(reason),
            Err(_) => Rendered::Failed(format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            )),
        }
    }
}

/// How an answer of the gateway counts: its status first, then its `x-cache`.
pub fn classify(status: StatusCode, x_cache: Option<&HeaderValue>) -> Rendered {
    if status.is_client_error() || status.is_server_error() {
        return Rendered::Failed(format!("HTTP {}", status.as_u16()));
    }
    let hit = x_cache.is_some_and(|v| {
        let v = v.as_bytes();
        v.eq_ignore_ascii_case(b"HIT") || v.eq_ignore_ascii_case(b"STALE")
    });
    if hit {
        Rendered::Fresh
    } else {
        Rendered::Rendered
    }
}
