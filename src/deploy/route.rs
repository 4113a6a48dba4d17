//! Which build a request names, if any (issue 17, "requests go to the build they belong to").
//!
//! A client of an older build says so in one of these ways (NEXTJS.md §5), read in this order:
//! - `x-deployment-id`: Next's client sends it on RSC fetches and server actions when the app
//!   sets `deploymentId`;
//! - `?dpl=<deployment id>`: on asset URLs, same condition;
//! - `/_next/data/<BUILD_ID>/…`: Pages Router data routes carry the build in the path;
//! - `/_next/static/<BUILD_ID>/…`: the build and SSG manifests.
//!
//! These are names, not decisions: [`super::Deploy::route`] keeps one only when it names a
//! build that has a healthy replica (a client of a build that is gone gets the current one,
//! and Next's client reloads on the mismatch). A request names no build otherwise: new
//! sessions go to the current build.

use http::request::Parts;

/// Next's client header naming its deployment.
static DEPLOYMENT_ID: http::HeaderName = http::HeaderName::from_static("x-deployment-id");

/// The names of a build `head` carries, most specific first (at most three).
pub fn names(head: &Parts) -> impl Iterator<Item = &str> {
    let header = head
        .headers
        .get(&DEPLOYMENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let query = head.uri.query().and_then(dpl);
    let path = build_in_path(head.uri.path());
    [header, query, path]
        .into_iter()
        .flatten()
        .filter(|n| !n.is_empty())
}

/// The `dpl` parameter of a query.
fn dpl(query: &str) -> Option<&str> {
    query.split('&').find_map(|pair| pair.strip_prefix("dpl="))
}

/// The `<BUILD_ID>` of `/_next/data/<id>/…` and `/_next/static/<id>/…` (for static files,
/// whatever segment follows `static/`: `chunks` or `css` name no build, and are not found
/// among the builds).
fn build_in_path(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/_next/data/")
        .or_else(|| path.strip_prefix("/_next/static/"))?;
    let (id, tail) = rest.split_once('/')?;
    (!tail.is_empty()).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, deployment: Option<&str>) -> Parts {
        let mut b = http::Request::get(uri);
        if let Some(d) = deployment {
            b = b.header("x-deployment-id", d);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn all(h: &Parts) -> Vec<&str> {
        names(h).collect()
    }

    #[test]
    fn every_signal_in_order() {
        assert_eq!(
            all(&head("/_next/data/B1/index.json?dpl=d2", Some("d3"))),
            ["d3", "d2", "B1"]
        );
        assert_eq!(
            all(&head("/_next/static/B1/_buildManifest.js", None)),
            ["B1"]
        );
        assert_eq!(
            all(&head("/_next/static/chunks/app.js?a=1&dpl=dep", None)),
            ["dep", "chunks"]
        );
        assert!(all(&head("/products/1?x=dpl", Some(" "))).is_empty());
        assert!(all(&head("/_next/data/B1", None)).is_empty(), "no file");
    }
}
