//! Cache semantics, and where entries live.
//!
//! The semantics hold no sockets and read no clock (time is a parameter, `now`): what a
//! request's key is ([`key`]), what a response's Cache-Control says ([`control`]), whether a
//! response may be stored and how long it stays fresh ([`policy`]), how an entry is laid out
//! in bytes ([`entry`]), which invalidations cover it ([`epochs`], [`tags`]).
//!
//! Where entries live is the rest: the store ([`store`]: the Redis client, or moka in-process;
//! its circuit breaker reads the monotonic clock), fill locks ([`lock`]), flights ([`flight`]),
//! the L1 ([`l1`]) and its memory governor. The request path (`proxy/`) calls into all of it;
//! nothing here imports `proxy/`, `server/` or hyper server types (the pingora-cache
//! discipline).
//!
//! - [`key`] — request → cache key (namespace, host, normalized path and query, variant) and its
//!   stable 128-bit hash.
//! - [`control`] — `Cache-Control` parsing (RFC 9111 §5.2), tolerant of every form Next.js emits.
//! - [`policy`] — admission (RFC 9111 shared-cache rules plus the Next.js rules of NEXTJS.md §9)
//!   and freshness at a given time.
//! - [`entry`] — the stored entry: versioned binary metadata and a gzip-1 body.
//! - [`describe`] — an entry as an operator reads it (state, age, invalidation): for
//!   `isrgate inspect` and the debug header.
//! - [`epochs`] — invalidations by epoch: which tags were invalidated when, and whether an
//!   entry is still valid.
//! - [`frozen`] — the invalidation records of a snapshot, looked up in place in its bytes.
//! - [`tags`] — the invalidation tags of an entry (implicit, Next.js, from response headers).
//! - [`keys`] — every Redis key and channel name, spelled once, with the table of who writes
//!   what and the Cluster hash-tag reasoning.
//! - [`store`] — where entries live: Redis (shared) or in-process (embedded default).
//! - [`tls`] — TLS to Redis: PEM files → the rustls client configuration.
//! - [`lock`] — fleet fill locks in Redis (one render per key across gateways).
//! - [`flight`] — who fills a key: one flight per key, the RAII [`flight::FillPermit`] covering
//!   the local single-flight and the fleet lock.
//! - [`l1`] — the in-process L1 of decoded entries in front of the store.
//! - [`governor`] — the process's measured memory (RSS + sealed bodies) held within
//!   `l1_max_bytes` by making the L1 hold less.
//! - [`sealed`] — identity bodies in sealed memory files, which the hit lane `sendfile`s.
//! - [`decoded`] — strict mode (no L1): entries as last decoded, reused on identical reads.

pub mod control;
pub mod decoded;
pub mod describe;
pub mod entry;
pub mod epochs;
pub mod flight;
pub mod frozen;
pub mod governor;
pub mod key;
pub mod keys;
pub mod l1;
pub mod lock;
pub mod policy;
pub mod routes;
pub mod sealed;
pub mod store;
pub mod tags;
pub mod tls;
