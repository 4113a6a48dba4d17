//! Who may call the webhook: the first step of the webhook path, before anything is parsed.
//! Pure functions over the request's head, query and raw body; nothing here changes state.
//!
//! A call carries one of (checked in this order):
//! - `?secret=<secret>` in the URL, for senders that can only call a URL: refused (403) unless
//!   `webhook.allow_query_secret` is on;
//! - `Authorization: Bearer <secret>`;
//! - `x-isrgate-signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>">` with the UNIX
//!   seconds in `x-isrgate-timestamp`;
//! - `sanity-webhook-signature: t=<UNIX ms>,v1=<base64url HMAC-SHA256 of "<t>.<raw body>">`,
//!   what Sanity sends when the webhook has a secret (`@sanity/webhook`'s format).
//!
//! Signatures use the HMAC key and are accepted within the replay window. Secrets come from the
//! environment (`ISRGATE_WEBHOOK_SECRET`; `ISRGATE_WEBHOOK_HMAC_SECRET` for the HMAC key, the
//! same secret when unset) and are compared in constant time; they are never logged.

use std::time::Duration;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::webhook::Rejected;

/// Signature header (`sha256=<hex>`).
pub const SIGNATURE: &str = "x-isrgate-signature";
/// Timestamp header (UNIX seconds) covered by the signature.
pub const TIMESTAMP: &str = "x-isrgate-timestamp";
/// Sanity's signature header (`t=<UNIX ms>,v1=<base64url>`).
pub const SANITY_SIGNATURE: &str = "sanity-webhook-signature";

/// The webhook's secrets (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// The bearer secret.
    pub bearer: String,
    /// The HMAC key.
    pub hmac: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

/// How a call may authenticate.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The secrets.
    pub secrets: &'a Secrets,
    /// How far a signature's timestamp may be from now.
    pub window: Duration,
    /// `webhook.allow_query_secret`.
    pub allow_query_secret: bool,
}

/// Checks the caller's credentials at `now_unix` seconds; `query` is the raw query string.
pub fn authenticate(
    headers: &HeaderMap,
    query: Option<&str>,
    body: &[u8],
    policy: &Policy<'_>,
    now_unix: u64,
) -> Result<(), Rejected> {
    if let Some(given) = query_secret(query) {
        if !policy.allow_query_secret {
            return Err(Rejected::Forbidden(
                "a secret in the URL is refused: webhook.allow_query_secret is off; send Authorization: Bearer <secret> instead, or turn it on for senders that can only call a URL",
            ));
        }
        return check_secret(&given, &policy.secrets.bearer)
            .map_err(|()| Rejected::Forbidden("wrong secret"));
    }
    if let Some(auth) = headers.get(http::header::AUTHORIZATION) {
        let given = auth
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Rejected::Unauthorized(
                "Authorization must be \"Bearer <secret>\"",
            ))?;
        return check_secret(given.trim(), &policy.secrets.bearer)
            .map_err(|()| Rejected::Unauthorized("wrong secret"));
    }
    if let Some(signature) = headers.get(SIGNATURE) {
        return isrgate_signature(headers, signature, body, policy, now_unix);
    }
    if let Some(signature) = headers.get(SANITY_SIGNATURE) {
        return sanity_signature(signature, body, policy, now_unix);
    }
    Err(Rejected::Unauthorized(if policy.allow_query_secret {
        "missing credentials: send Authorization: Bearer <secret>, x-isrgate-signature and x-isrgate-timestamp, or ?secret=<secret>"
    } else {
        "missing credentials: send Authorization: Bearer <secret>, or x-isrgate-signature and x-isrgate-timestamp"
    }))
}

/// Digests first: equal lengths, so the comparison's time says nothing about the secret.
fn check_secret(given: &str, expected: &str) -> Result<(), ()> {
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    if bool::from(a.ct_eq(&b)) {
        Ok(())
    } else {
        Err(())
    }
}

/// The `secret` of a query string, decoded (the first one).
pub fn query_secret(query: Option<&str>) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let value = pair.strip_prefix("secret=")?;
        let value = value.replace('+', " ");
        Some(
            percent_encoding::percent_decode_str(&value)
                .decode_utf8_lossy()
                .into_owned(),
        )
    })
}

fn isrgate_signature(
    headers: &HeaderMap,
    signature: &http::HeaderValue,
    body: &[u8],
    policy: &Policy<'_>,
    now_unix: u64,
) -> Result<(), Rejected> {
    let timestamp = headers
        .get(TIMESTAMP)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or(Rejected::Unauthorized(
            "x-isrgate-timestamp must be UNIX seconds",
        ))?;
    in_window(timestamp, policy, now_unix)?;
    let expected = signature
        .to_str()
        .ok()
        .and_then(|v| v.trim().strip_prefix("sha256="))
        .and_then(unhex)
        .ok_or(Rejected::Unauthorized(
            "x-isrgate-signature must be sha256=<hex>",
        ))?;
    mac(&policy.secrets.hmac, timestamp, body)
        .verify_slice(&expected)
        .map_err(|_| Rejected::Unauthorized("bad signature"))
}

fn sanity_signature(
    signature: &http::HeaderValue,
    body: &[u8],
    policy: &Policy<'_>,
    now_unix: u64,
) -> Result<(), Rejected> {
    const FORMAT: Rejected =
        Rejected::Unauthorized("sanity-webhook-signature must be t=<ms>,v1=<signature>");
    let text = signature.to_str().map_err(|_| FORMAT)?.trim();
    let (t, v1) = text
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once([',', ' ']))
        .ok_or(FORMAT)?;
    let millis: u64 = t.parse().map_err(|_| FORMAT)?;
    let given = v1
        .trim_start_matches([',', ' '])
        .strip_prefix("v1=")
        .ok_or(FORMAT)?;
    in_window(millis / 1000, policy, now_unix)?;
    let digest = mac(&policy.secrets.hmac, millis, body)
        .finalize()
        .into_bytes();
    let expected = base64url(&digest);
    if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        Ok(())
    } else {
        Err(Rejected::Unauthorized("bad signature"))
    }
}

fn in_window(timestamp: u64, policy: &Policy<'_>, now_unix: u64) -> Result<(), Rejected> {
    if now_unix.abs_diff(timestamp) > policy.window.as_secs() {
        return Err(Rejected::Unauthorized(
            "timestamp outside the replay window",
        ));
    }
    Ok(())
}

/// HMAC-SHA256 of `"<timestamp>.<body>"` (the isrgate and Sanity signatures alike).
fn mac(key: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signature header value for `body` at `timestamp` (for clients and tests).
pub fn sign(key: &str, timestamp: u64, body: &[u8]) -> String {
    let digest = mac(key, timestamp, body).finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Sanity's `sanity-webhook-signature` value for `body` at `millis` (for tests).
pub fn sign_sanity(key: &str, millis: u64, body: &[u8]) -> String {
    let digest = mac(key, millis, body).finalize().into_bytes();
    format!("t={millis},v1={}", base64url(&digest))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// RFC 4648 §5 base64url without padding.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidate::cms::tests::headers;

    fn secrets() -> Secrets {
        Secrets {
            bearer: "s3cret".into(),
            hmac: "k3y".into(),
        }
    }

    fn policy(s: &Secrets, allow_query_secret: bool) -> Policy<'_> {
        Policy {
            secrets: s,
            window: Duration::from_secs(300),
            allow_query_secret,
        }
    }

    #[test]
    fn bearer_and_signature_are_checked() {
        let s = secrets();
        let p = policy(&s, false);
        let ok = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(authenticate(&ok, None, b"", &p, 0), Ok(()));
        let wrong = headers(&[("authorization", "Bearer nope")]);
        assert_eq!(
            authenticate(&wrong, None, b"", &p, 0),
            Err(Rejected::Unauthorized("wrong secret"))
        );
        assert!(authenticate(&HeaderMap::new(), None, b"", &p, 0).is_err());

        let body = br#"{"paths":["/a"]}"#;
        let sig = sign("k3y", 1_000, body);
        let signed = headers(&[(SIGNATURE, &sig), (TIMESTAMP, "1000")]);
        assert_eq!(authenticate(&signed, None, body, &p, 1_100), Ok(()));
        assert!(
            authenticate(&signed, None, b"{}", &p, 1_100).is_err(),
            "another body"
        );
        assert_eq!(
            authenticate(&signed, None, body, &p, 1_000 + 301),
            Err(Rejected::Unauthorized(
                "timestamp outside the replay window"
            ))
        );
        let other_key = headers(&[
            (SIGNATURE, &sign("s3cret", 1_000, body)),
            (TIMESTAMP, "1000"),
        ]);
        assert!(authenticate(&other_key, None, body, &p, 1_000).is_err());
    }

    #[test]
    fn the_query_secret_only_when_allowed_and_right() {
        let s = secrets();
        let none = HeaderMap::new();
        let q = Some("path=/a&secret=s3cret");
        assert!(matches!(
            authenticate(&none, q, b"", &policy(&s, false), 0),
            Err(Rejected::Forbidden(m)) if m.contains("allow_query_secret")
        ));
        assert_eq!(authenticate(&none, q, b"", &policy(&s, true), 0), Ok(()));
        assert_eq!(
            authenticate(&none, Some("secret=s3cre"), b"", &policy(&s, true), 0),
            Err(Rejected::Forbidden("wrong secret"))
        );
        assert_eq!(
            query_secret(Some("a=1&secret=x%20y+z")).as_deref(),
            Some("x y z")
        );
    }

    /// The known answer from `@sanity/webhook`'s own tests (secret `test`).
    #[test]
    fn sanity_signatures_match_sanitys_own_vector() {
        let s = Secrets {
            bearer: "b".into(),
            hmac: "test".into(),
        };
        let body = br#"{"_id":"resume"}"#;
        let vector = "t=1633519811129,v1=tLa470fx7qkLLEcMOcEUFuBbRSkGujyskxrNXcoh0N0";
        assert_eq!(sign_sanity("test", 1_633_519_811_129, body), vector);
        let h = headers(&[(SANITY_SIGNATURE, vector)]);
        let p = policy(&s, false);
        assert_eq!(authenticate(&h, None, body, &p, 1_633_519_811), Ok(()));
        assert!(authenticate(&h, None, br#"{"_id":"other"}"#, &p, 1_633_519_811).is_err());
        assert_eq!(
            authenticate(&h, None, body, &p, 1_633_519_811 + 3_600),
            Err(Rejected::Unauthorized(
                "timestamp outside the replay window"
            ))
        );
    }

    #[test]
    fn base64url_pads_nothing() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
