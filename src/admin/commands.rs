//! `isrgate purge`, `isrgate inspect` and `isrgate reload` through a running gateway's admin API: a purge from
//! the shell is the same operation as the webhook's and the dashboard's (acknowledged by every
//! gateway, fanned out, re-warmed, in the revalidation log), and an inspection sees what that
//! gateway sees. The answers are printed for a person; `--json` prints them as they came.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::client::{AdminClient, CallError};

/// What `isrgate purge` asks for.
#[derive(Debug, Clone)]
pub struct Purge {
    /// Pathnames.
    pub paths: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Hard rather than soft.
    pub hard: bool,
    /// The site's public host, for the re-warm (none: no re-warm).
    pub host: Option<String>,
}

/// Purges through `client` (`POST /api/purge`); the report as text, or as JSON with `json`.
pub async fn purge(client: &AdminClient, ask: &Purge, as_json: bool) -> Result<String, CallError> {
    let body = json!({
        "paths": ask.paths,
        "tags": ask.tags,
        "mode": if ask.hard { "hard" } else { "soft" },
        "rewarm": ask.host.is_some(),
    });
    let mut headers: Vec<(&'static str, String)> = vec![("x-isrgate-client", "cli".into())];
    headers.extend(
        ask.host
            .iter()
            .map(|h| ("x-isrgate-public-host", h.clone())),
    );
    let report = client.post("/api/purge", &body, &headers).await?;
    if as_json {
        return Ok(format!("{report:#}\n"));
    }
    // A gateway of another version may answer another shape: then it is printed as it came.
    match serde_json::from_value::<crate::invalidate::Report>(report.clone()) {
        Ok(r) => Ok(describe_purge(&r)),
        Err(_) => Ok(format!("{report:#}\n")),
    }
}

/// A purge report, one line per step.
fn describe_purge(r: &crate::invalidate::Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "invalidated ({}) at epoch {}: {}",
        r.mode.as_str(),
        r.epoch,
        r.tags.join(" "),
    );
    let g = &r.gateways;
    let missing = if g.missing.is_empty() {
        String::new()
    } else {
        format!("; MISSING {}", g.missing.join(" "))
    };
    let _ = writeln!(
        out,
        "applied by gateway {}, acknowledged by {} other gateway(s){missing}",
        g.applied_by,
        g.acknowledged.len(),
    );
    for f in r.replicas.iter().flatten() {
        let outcome = match (&f.error, f.status) {
            (None, status) if f.ok => format!("revalidated (HTTP {})", status.unwrap_or(0)),
            (Some(e), _) => format!("FAILED: {e}"),
            (None, _) => "FAILED".to_owned(),
        };
        let _ = writeln!(out, "replica {}: {outcome}", f.replica);
    }
    for p in &r.rewarm {
        let (variant, outcome) = (p.variant.as_str(), p.outcome.as_str());
        let _ = writeln!(out, "re-warm {} {variant}: {outcome}", p.path);
    }
    out
}

/// Reloads the gateway's configuration (`POST /api/reload`): what changed live and what
/// needs a restart, as text, or as JSON with `json`. An invalid file is a `Refused` error
/// carrying every problem.
pub async fn reload(client: &AdminClient, as_json: bool) -> Result<String, CallError> {
    let report = client
        .post(
            "/api/reload",
            &json!({}),
            &[("x-isrgate-client", "cli".into())],
        )
        .await?;
    if as_json {
        return Ok(format!("{report:#}\n"));
    }
    let mut out = String::new();
    let _ = writeln!(out, "reloaded {}", report["source"].as_str().unwrap_or("?"));
    match report["applied"].as_array().filter(|a| !a.is_empty()) {
        Some(_) => {
            let _ = writeln!(out, "applied: {}", list(&report["applied"]));
        }
        None => out.push_str("applied: nothing (no setting that can change live differs)\n"),
    }
    if report["restart"].as_array().is_some_and(|a| !a.is_empty()) {
        let _ = writeln!(
            out,
            "needs a restart (kept as running): {}",
            list(&report["restart"])
        );
    }
    Ok(out)
}

/// Inspects `url` through `client` (`GET /api/inspect`).
pub async fn inspect(
    client: &AdminClient,
    url: &str,
    host: Option<&str>,
    variants: &[String],
    as_json: bool,
) -> Result<String, CallError> {
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, QUERY).to_string();
    let mut query = format!("/api/inspect?url={}", enc(url));
    if let Some(h) = host {
        let _ = write!(query, "&host={}", enc(h));
    }
    for v in variants {
        let _ = write!(query, "&variant={}", enc(v));
    }
    let answer = client.get(&query).await?;
    if as_json {
        return Ok(format!("{answer:#}\n"));
    }
    Ok(describe_inspection(&answer))
}

/// Query values: everything but unreserved characters encoded.
const QUERY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// An inspection, a block per variant.
fn describe_inspection(a: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}{} (as gateway {} sees it)",
        a["host"].as_str().unwrap_or(""),
        a["url"].as_str().unwrap_or(""),
        a["gateway"].as_str().unwrap_or("?")
    );
    let Some(variants) = a["variants"].as_object() else {
        return out;
    };
    for (name, v) in variants {
        let _ = writeln!(out, "\n{name}:");
        if let Some(reason) = v["bypass"].as_str() {
            let _ = writeln!(out, "  not cached: bypasses the cache ({reason})");
            continue;
        }
        let _ = writeln!(out, "  key      {}", v["key"].as_str().unwrap_or("-"));
        let _ = writeln!(out, "  build    {}", v["build"].as_str().unwrap_or("-"));
        if v["cached"] != true {
            let _ = writeln!(out, "  cached   no (store: {})", v["store"]);
            continue;
        }
        let _ = writeln!(
            out,
            "  cached   {}, status {}, age {} s, {} (L1: {})",
            v["state"].as_str().unwrap_or("?"),
            v["status"],
            v["age_s"],
            if v["store"] == true {
                "in the store"
            } else {
                "not in the store"
            },
            if v["l1"] == true { "yes" } else { "no" },
        );
        let _ = writeln!(
            out,
            "  size     {} bytes, {} at rest (gzip-1 and metadata)",
            v["bytes"], v["bytes_at_rest"]
        );
        let _ = writeln!(
            out,
            "  filled   by gateway {}",
            v["filled_by"].as_str().unwrap_or("(not recorded)")
        );
        let _ = writeln!(out, "  tags     {}", list(&v["tags"]));
        let _ = writeln!(
            out,
            "  purged   {}",
            match (v["invalidation"].as_str(), v["invalidated_by"].as_str()) {
                (Some("none") | None, _) => "no".to_owned(),
                (Some(mode), Some(tag)) => format!("yes, {mode}, by tag {tag}"),
                (Some(mode), None) => format!("yes, {mode}"),
            }
        );
    }
    out
}

fn list(v: &Value) -> String {
    v.as_array().map_or_else(String::new, |a| {
        a.iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" ")
    })
}
