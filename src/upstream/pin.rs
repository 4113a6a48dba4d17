//! The build a request is pinned to: a request extension (`Arc<Pin>`) that `crate::deploy`
//! sets and two stages read. Here, replica choice: a replica of that build answers
//! (`balance::pick`), and a build asset one build does not have is asked of the others
//! ([`is_build_asset`]). In the cache: the key's namespace (`proxy::cached::key`). It lives with
//! the upstream, the lower of the stages, so neither depends on `deploy`.

/// The build a request goes to, and its cache namespace.
#[derive(Debug, PartialEq, Eq)]
pub struct Pin {
    /// The build's name (what its replicas' responses carry in `x-isrgate-build`).
    pub build: String,
    /// `cache.namespace@build`.
    pub namespace: String,
}

/// Whether `path` is one of Next's build assets (`/_next/static/…`): content-hashed, the same
/// bytes under the same name in every build that has it; a 404 from one build is asked of
/// the others, and the cache keys them without a build.
pub fn is_build_asset(path: &str) -> bool {
    path.starts_with("/_next/static/")
}
