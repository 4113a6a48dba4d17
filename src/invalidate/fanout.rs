//! Fan-out to the Next.js replicas (DESIGN.md "Webhook fan-out"): each replica keeps its own
//! cache (its tags manifest and file cache are per process), so every replica known right now
//! (static list and DNS discovery) is told, in parallel, through the app's own revalidate
//! route: `webhook.replica_path`, with `webhook.replica_body` filled with the paths and tags
//! and the secret `ISRGATE_REPLICA_SECRET` in `webhook.replica_secret_header`.
//!
//! A replica that cannot be reached or answers 5xx is retried with exponential backoff
//! (`webhook.replica_retries`); each call is bounded by `webhook.replica_timeout`. The result
//! is reported per replica; a failure never fails the webhook (the shared cache is already
//! invalidated).

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::BodyExt;

use crate::app::AppState;
use crate::config::Fanout;
use crate::http::body;

/// What one replica said.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaResult {
    /// `host:port`.
    pub replica: String,
    /// A 2xx answer.
    pub ok: bool,
    /// The last status, if any answer came.
    pub status: Option<u16>,
    /// Calls made (1 + retries).
    pub attempts: u32,
    /// The last error, if not ok (in the report: its message).
    pub error: Option<CallError>,
    /// Time until the final answer, ms.
    pub elapsed_ms: u64,
}

/// Why a replica was not told. In the report, the message (`Display`): what the dashboard and
/// `isrgate purge` print; read back, a message this build does not recognise is `Unreachable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// It answered with a status other than 2xx (a 5xx is retried, a 4xx is not).
    #[error("answered {0}")]
    Status(u16),
    /// No answer within `webhook.replica_timeout`.
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The call could not be made or did not complete (refused, reset, a bad request URL).
    #[error("{0}")]
    Unreachable(String),
}

impl serde::Serialize for CallError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CallError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let status = text
            .strip_prefix("answered ")
            .and_then(|s| s.get(..3)?.parse().ok());
        let timeout = text
            .strip_prefix("no answer within ")
            .and_then(|t| humantime::parse_duration(t).ok());
        Ok(match (status, timeout) {
            (Some(code), _) => CallError::Status(code),
            (_, Some(t)) => CallError::Timeout(t),
            _ => CallError::Unreachable(text),
        })
    }
}

/// First retry delay; doubled for each further retry.
const BACKOFF: Duration = Duration::from_millis(200);

/// The body sent to replicas: the template with `{paths}` and `{tags}` as JSON arrays.
pub fn body(template: &str, paths: &[String], tags: &[String]) -> String {
    let list = |v: &[String]| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    template
        .replace("{paths}", &list(paths))
        .replace("{tags}", &list(tags))
}

/// Tells every known replica; `None` when fan-out is not configured.
pub async fn fanout(
    app: &AppState,
    cfg: &Fanout,
    paths: &[String],
    tags: &[String],
) -> Option<Vec<ReplicaResult>> {
    let path = cfg.path.as_ref()?;
    let payload = Bytes::from(body(&cfg.body, paths, tags));
    let replicas = app.upstream.replicas().authorities();
    let mut calls = tokio::task::JoinSet::new();
    for (i, authority) in replicas.into_iter().enumerate() {
        let (pool, cfg, path, payload) = (
            std::sync::Arc::clone(app.upstream.pool()),
            cfg.clone(),
            path.clone(),
            payload.clone(),
        );
        calls.spawn(async move {
            let started = Instant::now();
            let mut result = ReplicaResult {
                replica: authority.to_string(),
                ok: false,
                status: None,
                attempts: 0,
                error: None,
                elapsed_ms: 0,
            };
            for attempt in 0..=cfg.retries {
                if attempt > 0 {
                    tokio::time::sleep(BACKOFF * 2u32.saturating_pow(attempt - 1)).await;
                }
                result.attempts += 1;
                let req = request(&cfg, &path, &authority, payload.clone());
                let call = async {
                    let (resp, lease) = pool
                        .send(&authority, req?)
                        .await
                        .map_err(|e| CallError::Unreachable(e.to_string()))?;
                    let status = resp.status();
                    // Read the (small) answer so the connection can be reused.
                    let _ = crate::upstream::pool::Leased::new(resp.into_body(), lease)
                        .collect()
                        .await;
                    Ok::<_, CallError>(status)
                };
                match tokio::time::timeout(cfg.timeout, call).await {
                    Ok(Ok(status)) => {
                        result.status = Some(status.as_u16());
                        if status.is_success() {
                            result.ok = true;
                            result.error = None;
                            break;
                        }
                        result.error = Some(CallError::Status(status.as_u16()));
                        if !status.is_server_error() {
                            break; // 4xx: retrying will not help
                        }
                    }
                    Ok(Err(e)) => result.error = Some(e),
                    Err(_) => result.error = Some(CallError::Timeout(cfg.timeout)),
                }
            }
            result.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            (i, result)
        });
    }
    let mut results: Vec<(usize, ReplicaResult)> = calls.join_all().await;
    results.sort_by_key(|(i, _)| *i);
    for (_, r) in &results {
        if r.ok {
            app.metrics.fanout_ok.inc();
        } else {
            app.metrics.fanout_failed.inc();
        }
    }
    Some(results.into_iter().map(|(_, r)| r).collect())
}

fn request(
    cfg: &Fanout,
    path: &str,
    authority: &http::uri::Authority,
    payload: Bytes,
) -> Result<Request<body::Body>, CallError> {
    let mut req = Request::new(body::full(payload));
    *req.method_mut() = cfg.method.clone();
    *req.uri_mut() = path
        .parse()
        .map_err(|e| CallError::Unreachable(format!("webhook.replica_path: {e}")))?;
    let h = req.headers_mut();
    let host = HeaderValue::from_str(authority.as_str())
        .map_err(|e| CallError::Unreachable(e.to_string()))?;
    h.insert(header::HOST, host);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secret) = &cfg.secret {
        h.insert(cfg.secret_header.clone(), secret.clone());
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_template_gets_json_arrays() {
        let b = body(
            r#"{"paths":{paths},"tags":{tags}}"#,
            &["/a \"b\"".into()],
            &[],
        );
        assert_eq!(b, r#"{"paths":["/a \"b\""],"tags":[]}"#);
    }

    #[test]
    fn a_call_error_is_its_message_in_the_report_and_reads_back() {
        for (e, text) in [
            (CallError::Status(503), "answered 503"),
            (
                CallError::Timeout(Duration::from_secs(2)),
                "no answer within 2s",
            ),
            (
                CallError::Unreachable("connection refused".into()),
                "connection refused",
            ),
        ] {
            let json = serde_json::to_string(&e).expect("serializes");
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(serde_json::from_str::<CallError>(&json).expect("reads"), e);
        }
    }
}
