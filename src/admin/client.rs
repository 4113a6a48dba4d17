//! The command line's side of the admin API (`isrgate purge`, `isrgate inspect`): one request
//! to a running gateway's admin listener, with the token, and errors an operator can act on
//! (which address was refused, which token was wrong), never a bare "request timed out".

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest answer read (the inspection of a URL, a purge report with its re-warms).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Why a call to the admin API did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Not an `http://host:port` address.
    #[error("{0:?} is not an admin address; write http://HOST:PORT (admin.listen of the gateway)")]
    Address(String),
    /// Nothing listens there, or the network said no.
    #[error(
        "cannot reach the gateway's admin API at {at} ({reason}); is the gateway running, and is this its admin.listen? (--gateway)"
    )]
    Unreachable {
        /// The address.
        at: String,
        /// What the connection said.
        reason: String,
    },
    /// No answer in time.
    #[error("the gateway at {at} did not answer within {after:?}")]
    Timeout {
        /// The address.
        at: String,
        /// The limit.
        after: Duration,
    },
    /// 401: the token.
    #[error(
        "the gateway refused the admin token; pass the gateway's ISRGATE_ADMIN_TOKEN (environment, or --token)"
    )]
    Token,
    /// Any other refusal, with the gateway's own words.
    #[error("the gateway answered {status}: {message}")]
    Refused {
        /// The status.
        status: StatusCode,
        /// Its body (an `error` field when JSON).
        message: String,
    },
}

/// A running gateway's admin API.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// The admin API at `base` (`http://host:port`), each call bounded by `timeout`.
    pub fn new(
        base: &str,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<AdminClient, CallError> {
        let base = base.trim_end_matches('/').to_owned();
        let uri: Uri = base.parse().map_err(|_| CallError::Address(base.clone()))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(CallError::Address(base));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Ok(AdminClient {
            base,
            token: token.filter(|t| !t.is_empty()),
            timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// `GET path_and_query`, the answer's JSON.
    pub async fn get(&self, path_and_query: &str) -> Result<serde_json::Value, CallError> {
        self.call(Method::GET, path_and_query, Bytes::new()).await
    }

    /// `GET path_and_query` of a streamed answer (`/api/tail`): each line (newline included)
    /// handed to `each` as it comes, until the gateway ends the answer. The connection is
    /// bounded by the timeout, the stream is not.
    pub async fn lines(
        &self,
        path_and_query: &str,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), CallError> {
        let mut req = Request::get(format!("{}{path_and_query}", self.base));
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|_| CallError::Address(self.base.clone()))?;
        let unreachable = |reason: String| CallError::Unreachable {
            at: self.base.clone(),
            reason,
        };
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| CallError::Timeout {
                at: self.base.clone(),
                after: self.timeout,
            })?
            .map_err(|e| unreachable(root_cause(&e)))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED => return Err(CallError::Token),
            status => {
                let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
                let message = json
                    .as_ref()
                    .and_then(|j| j["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
                return Err(CallError::Refused { status, message });
            }
        }
        let mut body = resp.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreachable(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                each(&pending[..=end]);
                pending.drain(..=end);
            }
        }
        Ok(())
    }

    /// `POST path` with a JSON body, the answer's JSON.
    pub async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&'static str, String)],
    ) -> Result<serde_json::Value, CallError> {
        let body = Bytes::from(body.to_string());
        self.call_with(Method::POST, path, body, headers).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<serde_json::Value, CallError> {
        self.call_with(method, path, body, &[]).await
    }

    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        headers: &[(&'static str, String)],
    ) -> Result<serde_json::Value, CallError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        for (n, v) in headers {
            req = req.header(*n, v.as_str());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|_| CallError::Address(self.base.clone()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| CallError::Unreachable {
                    at: self.base.clone(),
                    reason: root_cause(&e),
                })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| CallError::Unreachable {
                    at: self.base.clone(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CallError::Timeout {
                at: self.base.clone(),
                after: self.timeout,
            })??;
        let json: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        match status {
            s if s.is_success() => json.ok_or_else(|| CallError::Refused {
                status,
                message: "an answer that is not JSON".into(),
            }),
            StatusCode::UNAUTHORIZED => Err(CallError::Token),
            _ => Err(CallError::Refused {
                status,
                message: json
                    .as_ref()
                    .and_then(|j| j["error"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned()),
            }),
        }
    }
}

/// The innermost cause: "Connection refused (os error 111)", not "client error (Connect)".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &dyn std::error::Error = error;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}
