//! The stored entry: versioned binary metadata and a gzip-1 body (DESIGN.md "Entries").
//!
//! Its place in the flow: **store** (step 10) receives an admitted response — status, the
//! headers worth replaying, the identity body — with the render epoch, times and tags the caller
//! and `policy` worked out, and hands on an [`Entry`]: [`Meta::encode`] bytes for the hash field
//! `m` and the gzip member for `b`. **Lookup** (step 5) hands the bytes it read back to
//! [`Meta::decode`]. **Respond** (step 11) serves [`Entry::gzip`] as it is to clients that accept
//! gzip (no CPU on the hit path), [`inflate`]s it for the rest, and answers `If-None-Match` with
//! [`Meta::etag`].
//!
//! It must not decide anything: which headers are stored, freshness and tags come from the
//! caller; time is never read here; it never touches Redis or sockets. The bytes it decodes are
//! untrusted (another build's format, a corrupted or hostile value in Redis): decoding any bytes
//! is `Ok` or `Err`, never a panic, and allocates no more than the input justifies — a length or
//! count larger than the rest of the input is [`DecodeError::Truncated`] before anything is
//! reserved — and [`inflate`] stops at a caller-given limit (a gzip bomb in Redis).
//!
//! # Metadata layout, format 1
//!
//! Integers are little-endian and fixed-width; a byte string is a `u32` length, then the bytes.
//!
//! ```text
//! offset  size  field
//!      0     1  format version              FORMAT_V1 = 1
//!      1     2  status                      u16, 100..=999
//!      3     8  render_epoch                u64
//!     11     8  stored_at_ms                u64, UNIX ms
//!     19     8  fresh_until_ms              u64, UNIX ms
//!     27     8  stale_until_ms              u64, UNIX ms
//!     35     8  stale_if_error_until_ms     u64, UNIX ms
//!     43     8  identity_len                u64, bytes
//!     51   4+n  etag                        UTF-8, quotes included
//!      …     4  header count                u32, then per header, in order:
//!          4+n    name                      a valid http::HeaderName (lower case)
//!          4+n    value                     a valid http::HeaderValue
//!      …     4  tag count                   u32, then per tag:
//!          4+n    tag                       UTF-8
//!      …   4+n  filled_by                   UTF-8, the gateway that rendered it (appended;
//!                                           absent in older entries: "")
//!      …        fields appended later       ignored by this code
//! ```
//!
//! # Versioning
//!
//! As in pingora-cache's `meta.rs`, fields are only ever appended, never reordered, retyped or
//! removed, and gateways of two builds share Redis during a rolling deploy:
//!
//! - **Appending a field keeps the version byte at 1.** Code that knows only format 1 reads the
//!   fields above and ignores any bytes after them, so it keeps reading entries written by a
//!   newer build. Code that knows the new field must accept entries that end before it (written
//!   by an older build) and take a default: an appended field is present iff bytes remain.
//! - **The version byte changes only for a layout older code cannot read** (a field removed,
//!   retyped or moved). Older code then answers [`DecodeError::UnknownVersion`], which a lookup
//!   treats as a miss: the page is rendered again, never misread. The newer decoder keeps
//!   reading every older version, as pingora's V2 reads V0 and V1.

use std::io::{self, Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::Compression;
use flate2::bufread::GzDecoder;
use flate2::write::GzEncoder;
use http::{HeaderName, HeaderValue, StatusCode};
use xxhash_rust::xxh3::xxh3_128;

use super::sealed::Held;

/// Version byte of the metadata layout in the module doc.
pub const FORMAT_V1: u8 = 1;

/// gzip level of stored bodies: level 1 costs the least CPU on the store path and still shrinks
/// rendered HTML several times over; the bytes are served to clients as they are.
const GZIP_LEVEL: u32 = 1;

/// gzip level of immutable bodies (build assets): compressed once for the whole fleet and
/// served for as long as the build lives, so the bytes count more than the CPU. Level 6 is
/// zlib's default, what `next start` itself sends a gzip client.
pub const IMMUTABLE_GZIP_LEVEL: u32 = 6;

/// Bytes every header takes at least in format 1: two `u32` lengths.
const MIN_HEADER_BYTES: usize = 8;

/// Bytes every tag takes at least in format 1: its `u32` length.
const MIN_TAG_BYTES: usize = 4;

/// The most DEFLATE expands its input (about 1032:1). Bounds the capacity reserved from a gzip
/// trailer's size field, which a hostile value could set to anything.
const MAX_DEFLATE_RATIO: usize = 1032;

/// Metadata of a stored response. Fields are only ever appended in later versions, never
/// reordered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Response status.
    pub status: u16,
    /// Response headers to replay, in order; a name may repeat (`link`, `vary`). Which headers
    /// are worth storing is the caller's choice, not this module's.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Invalidation epoch read before the upstream request started: a tag invalidated at a
    /// newer epoch makes the entry stale.
    pub render_epoch: u64,
    /// When the response was stored, UNIX ms (the base of `Age`).
    pub stored_at_ms: u64,
    /// Fresh until this time, UNIX ms.
    pub fresh_until_ms: u64,
    /// Servable stale while one refresh runs until this time, UNIX ms.
    pub stale_until_ms: u64,
    /// Servable stale when every replica fails until this time, UNIX ms.
    pub stale_if_error_until_ms: u64,
    /// Invalidation tags (implicit, from a response header, from config rules).
    pub tags: Vec<String>,
    /// Strong ETag we serve, with its quotes (see [`etag`]).
    pub etag: String,
    /// Length of the uncompressed body, bytes (`Content-Length` when serving it inflated).
    pub identity_len: u64,
    /// The gateway that filled it (`CacheState::gateway_id`; `""` when not recorded).
    pub filled_by: String,
}

/// A stored response: its metadata and the gzip member of its identity body (level 1).
///
/// Equal entries have equal metadata and stored bytes; what is derived from those (the inflated
/// body, the prepared heads) does not count.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Status, headers, times, tags, ETag.
    pub meta: Meta,
    /// The body as stored and as served to gzip-capable clients.
    pub gzip: Bytes,
    /// The identity body, once inflated (or known from the fill): an entry shared through the
    /// L1 is inflated at most once, not once per identity client. Sealed for the hit lane when
    /// the caller asks ([`super::sealed`]).
    identity: std::sync::OnceLock<Held>,
    /// The response heads of the two representations (`[gzip, identity]`), built on first use
    /// by the serve stage and cloned by every later hit of an entry held in the L1.
    heads: [std::sync::OnceLock<Head>; 2],
}

/// A response head prepared once for one representation of an entry (built by
/// `proxy::respond`; the entry only keeps it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Response status.
    pub status: StatusCode,
    /// Every header of the representation, with slots for the per-response ones.
    pub headers: http::HeaderMap,
    /// The representation's strong ETag (for `If-None-Match`).
    pub etag: String,
    /// `status` and `headers` as HTTP/1.1 bytes without the per-response slots, for the hit
    /// lane; `None` when the head must be finished per client (a `Location`).
    pub wire: Option<bytes::Bytes>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.meta == other.meta && self.gzip == other.gzip
    }
}

impl Eq for Entry {}

impl Entry {
    /// An entry read from the store.
    pub fn new(meta: Meta, gzip: Bytes) -> Entry {
        Entry {
            meta,
            gzip,
            identity: std::sync::OnceLock::new(),
            heads: Default::default(),
        }
    }

    /// What holding this entry costs in memory, bytes, as the L1 charges it: the stored gzip
    /// body, the identity body (inflated for identity clients, or kept from the fill), the
    /// metadata as it lives on the heap, and the two response heads prepared from it on first
    /// use (a header map and its wire bytes each). An estimate from sizes, not a measurement:
    /// per-allocation overhead is folded into the per-item constants.
    pub fn footprint(&self) -> usize {
        // Arc + Entry + the cache's node and bookkeeping.
        const FIXED: usize = 640;
        // A header line on the heap: its `(HeaderName, HeaderValue)` slot and allocations.
        const PER_HEADER: usize = 96;
        // A tag: a `String` slot and its allocation.
        const PER_TAG: usize = 48;
        let header_bytes: usize = self
            .meta
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + PER_HEADER)
            .sum();
        let tag_bytes: usize = self.meta.tags.iter().map(|t| t.len() + PER_TAG).sum();
        // Each prepared head: a header map (the headers again, plus a few we add) and the
        // same headers as wire bytes.
        let heads = 2 * (2 * header_bytes + 512);
        let identity = usize::try_from(self.meta.identity_len).unwrap_or(usize::MAX);
        FIXED
            .saturating_add(self.gzip.len())
            .saturating_add(identity)
            .saturating_add(header_bytes)
            .saturating_add(tag_bytes)
            .saturating_add(self.meta.etag.len())
            .saturating_add(heads)
    }

    /// The prepared head of the gzip (`gzip == true`) or identity representation, built by
    /// `build` on first use; `None` when `build` refuses (nothing is remembered then).
    pub fn head(&self, gzip: bool, build: impl FnOnce() -> Option<Head>) -> Option<&Head> {
        let slot = &self.heads[usize::from(!gzip)];
        if let Some(h) = slot.get() {
            return Some(h);
        }
        let head = build()?;
        Some(slot.get_or_init(|| head))
    }

    /// The identity body: inflated on first use (bounded by `identity_len`), then remembered,
    /// sealed if `seal` (see [`Held::new`]; whoever inflates first decides).
    pub fn identity(&self, seal: bool) -> Result<&Held, InflateError> {
        if let Some(b) = self.identity.get() {
            return Ok(b);
        }
        let body = self.inflate()?;
        Ok(self.identity.get_or_init(|| Held::new(body, seal)))
    }

    /// The identity body inflated from the stored gzip (bounded by `identity_len`), not
    /// remembered.
    pub fn inflate(&self) -> Result<Bytes, InflateError> {
        let limit = usize::try_from(self.meta.identity_len).unwrap_or(usize::MAX);
        inflate(&self.gzip, limit)
    }

    /// Records the identity body when it is already at hand (after a fill), sealed if `seal`.
    pub fn remember_identity(&self, identity: Bytes, seal: bool) {
        self.identity.get_or_init(|| Held::new(identity, seal));
    }
}

/// Why stored metadata could not be read. Any of them means "treat as a miss".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("entry metadata is empty")]
    Empty,
    /// A version byte this build does not know (0, or a newer incompatible layout).
    #[error("entry metadata has unknown format version {0}")]
    UnknownVersion(u8),
    /// The input ends inside `field`, or a length or count claims more than the input holds.
    #[error("entry metadata ends inside `{field}`")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// `field` is present but not valid: a status outside 100..=999, a header name or value
    /// `http` refuses, an ETag or tag that is not UTF-8.
    #[error("entry metadata has an invalid `{field}`")]
    Invalid {
        /// The field being read.
        field: &'static str,
    },
}

impl DecodeError {
    /// Label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::UnknownVersion(_) => "unknown_version",
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::Invalid { .. } => "invalid",
        }
    }
}

/// Why a stored body could not be inflated.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    /// Not exactly one valid gzip member (bad header, bad DEFLATE data, CRC or length mismatch,
    /// cut short, or bytes after the member).
    #[error("stored gzip body is corrupt: {0}")]
    Corrupt(#[source] io::Error),
    /// The identity body is longer than the caller's limit.
    #[error("stored gzip body inflates to more than {limit} bytes")]
    TooLarge {
        /// The limit, bytes.
        limit: usize,
    },
}

impl InflateError {
    /// Label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            InflateError::Corrupt(_) => "corrupt",
            InflateError::TooLarge { .. } => "too_large",
        }
    }
}

impl Meta {
    /// Its deadlines as the policy reads them.
    pub fn times(&self) -> super::policy::Times {
        super::policy::Times {
            stored_at: self.stored_at_ms,
            fresh_until: self.fresh_until_ms,
            stale_until: self.stale_until_ms,
            stale_if_error_until: self.stale_if_error_until_ms,
        }
    }

    /// Metadata of a response with `status` and `headers`: no times, tags or ETag yet (the
    /// fill sets the times; [`Entry::from_identity`] sets the ETag and length).
    pub fn new(status: u16, headers: Vec<(HeaderName, HeaderValue)>) -> Meta {
        Meta {
            status,
            headers,
            render_epoch: 0,
            stored_at_ms: 0,
            fresh_until_ms: 0,
            stale_until_ms: 0,
            stale_if_error_until_ms: 0,
            tags: Vec::new(),
            etag: String::new(),
            identity_len: 0,
            filled_by: String::new(),
        }
    }

    /// The format-1 bytes of this metadata (layout in the module doc), in one allocation of the
    /// exact size.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        out.put_u8(FORMAT_V1);
        out.put_u16_le(self.status);
        out.put_u64_le(self.render_epoch);
        out.put_u64_le(self.stored_at_ms);
        out.put_u64_le(self.fresh_until_ms);
        out.put_u64_le(self.stale_until_ms);
        out.put_u64_le(self.stale_if_error_until_ms);
        out.put_u64_le(self.identity_len);
        put_bytes(&mut out, self.etag.as_bytes());
        let headers = put_count(&mut out, self.headers.len());
        for (name, value) in self.headers.iter().take(headers) {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        let tags = put_count(&mut out, self.tags.len());
        for tag in self.tags.iter().take(tags) {
            put_bytes(&mut out, tag.as_bytes());
        }
        put_bytes(&mut out, self.filled_by.as_bytes());
        out.freeze()
    }

    /// Reads metadata written by [`Meta::encode`] of this or a newer build (bytes after the
    /// format-1 fields are ignored, see the module doc). Any input gives `Ok` or `Err`.
    pub fn decode(bytes: &[u8]) -> Result<Meta, DecodeError> {
        let (&version, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != FORMAT_V1 {
            return Err(DecodeError::UnknownVersion(version));
        }
        let mut r = Reader { rest };
        let status = r.u16("status")?;
        if StatusCode::from_u16(status).is_err() {
            return Err(DecodeError::Invalid { field: "status" });
        }
        let render_epoch = r.u64("render_epoch")?;
        let stored_at_ms = r.u64("stored_at_ms")?;
        let fresh_until_ms = r.u64("fresh_until_ms")?;
        let stale_until_ms = r.u64("stale_until_ms")?;
        let stale_if_error_until_ms = r.u64("stale_if_error_until_ms")?;
        let identity_len = r.u64("identity_len")?;
        let etag = r.utf8("etag")?;
        let headers = r.headers()?;
        let tags = r.tags()?;
        // Appended: entries of older builds end before it.
        let filled_by = if r.rest.is_empty() {
            String::new()
        } else {
            r.utf8("filled_by")?
        };
        // Whatever remains belongs to fields appended later: not ours to read.
        Ok(Meta {
            status,
            headers,
            render_epoch,
            stored_at_ms,
            fresh_until_ms,
            stale_until_ms,
            stale_if_error_until_ms,
            tags,
            etag,
            identity_len,
            filled_by,
        })
    }

    fn encoded_len(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| MIN_HEADER_BYTES + n.as_str().len() + v.len())
            .sum();
        let tags: usize = self.tags.iter().map(|t| MIN_TAG_BYTES + t.len()).sum();
        51 + 4 + self.etag.len() + 4 + headers + 4 + tags + 4 + self.filled_by.len()
    }
}

/// Writes a `u32` length and the bytes. A field over `u32::MAX` bytes cannot reach us (hyper
/// caps a response head far below that, entries are capped at a few MiB); were one to, it is cut
/// there, so the framing stays consistent and the store path never panics.
fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.put_u32_le(len);
    // `len as usize <= bytes.len()` by construction.
    out.put_slice(&bytes[..len as usize]);
}

/// Writes a `u32` count and returns how many items to write (all of them, short of 4 billion).
fn put_count(out: &mut BytesMut, count: usize) -> usize {
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    out.put_u32_le(count);
    count as usize
}

/// A cursor over untrusted metadata: every read checks what is left first.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated { field })?;
        self.rest = rest;
        Ok(*head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A `u32` length or count; one that does not fit in `usize` cannot fit in the input either.
    fn len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.array(field).map(u32::from_le_bytes)?;
        usize::try_from(n).map_err(|_| DecodeError::Truncated { field })
    }

    fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.len(field)?;
        let (bytes, rest) = self
            .rest
            .split_at_checked(len)
            .ok_or(DecodeError::Truncated { field })?;
        self.rest = rest;
        Ok(bytes)
    }

    fn utf8(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(field)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid { field })?;
        Ok(s.to_owned())
    }

    /// A count of items taking at least `min_item_bytes` each: one the rest of the input cannot
    /// hold is refused before anything is reserved for it.
    fn count(&mut self, field: &'static str, min_item_bytes: usize) -> Result<usize, DecodeError> {
        let count = self.len(field)?;
        if count > self.rest.len() / min_item_bytes {
            return Err(DecodeError::Truncated { field });
        }
        Ok(count)
    }

    fn headers(&mut self) -> Result<Vec<(HeaderName, HeaderValue)>, DecodeError> {
        let count = self.count("header_count", MIN_HEADER_BYTES)?;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let name = HeaderName::from_bytes(self.bytes("header_name")?).map_err(|_| {
                DecodeError::Invalid {
                    field: "header_name",
                }
            })?;
            let value = HeaderValue::from_bytes(self.bytes("header_value")?).map_err(|_| {
                DecodeError::Invalid {
                    field: "header_value",
                }
            })?;
            headers.push((name, value));
        }
        Ok(headers)
    }

    fn tags(&mut self) -> Result<Vec<String>, DecodeError> {
        let count = self.count("tag_count", MIN_TAG_BYTES)?;
        let mut tags = Vec::with_capacity(count);
        for _ in 0..count {
            tags.push(self.utf8("tag")?);
        }
        Ok(tags)
    }
}

/// gzip (RFC 1952) at level 1 of `identity`, as stored and as served to gzip-capable clients.
/// One member, no file name, modification time 0: the same input always gives the same bytes.
pub fn compress(identity: &[u8]) -> Bytes {
    compress_at(identity, GZIP_LEVEL)
}

/// [`compress`] at gzip `level` (0-9).
pub fn compress_at(identity: &[u8], level: u32) -> Bytes {
    // Rendered HTML shrinks to well under a quarter; anything larger grows the Vec once or twice.
    let out = Vec::with_capacity(identity.len() / 4 + 64);
    let mut encoder = GzEncoder::new(out, Compression::new(level.min(9)));
    encoder
        .write_all(identity)
        .expect("invariant: writing to a Vec cannot fail");
    let gzip = encoder
        .finish()
        .expect("invariant: writing to a Vec cannot fail");
    // The L1 weighs entries by their length: do not keep much more memory than that. A copy,
    // not `shrink_to_fit`: allocators (mimalloc among them) keep a block in place when it
    // shrinks by less than half, so the spare capacity would stay allocated.
    if gzip.capacity() - gzip.len() > gzip.len() / 8 {
        return Bytes::copy_from_slice(&gzip);
    }
    Bytes::from(gzip)
}

/// The identity body back, refusing output larger than `limit` (a gzip bomb in Redis must not
/// exhaust memory). `gzip` must be exactly one member, as [`compress`] writes: bytes after it
/// are [`InflateError::Corrupt`], since gzip clients would get them and inflated clients not.
pub fn inflate(gzip: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    let mut out = Vec::with_capacity(inflated_size_hint(gzip, limit));
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    let mut decoder = GzDecoder::new(gzip).take(cap);
    decoder
        .read_to_end(&mut out)
        .map_err(InflateError::Corrupt)?;
    if out.len() > limit {
        return Err(InflateError::TooLarge { limit });
    }
    if !decoder.into_inner().into_inner().is_empty() {
        return Err(InflateError::Corrupt(io::Error::new(
            io::ErrorKind::InvalidData,
            "bytes after the gzip member",
        )));
    }
    Ok(Bytes::from(out))
}

/// Capacity to reserve for the inflated body: ISIZE, the member's last four bytes (RFC 1952
/// §2.3.1, the length modulo 2^32). Only a hint, and a hostile one could claim anything, so it
/// is bounded by `limit` and by what DEFLATE can make of this many bytes.
fn inflated_size_hint(gzip: &[u8], limit: usize) -> usize {
    let claimed = gzip
        .last_chunk::<4>()
        .map_or(0, |b| usize::try_from(u32::from_le_bytes(*b)).unwrap_or(0));
    claimed
        .min(limit)
        .min(gzip.len().saturating_mul(MAX_DEFLATE_RATIO))
}

/// Strong ETag of an identity body: `"` + 32 lower-hex digits of xxh3-128 + `"`. Stable across
/// processes and builds (xxh3 is seeded with 0), so every gateway serves the same ETag.
pub fn etag(identity: &[u8]) -> String {
    format!("\"{:032x}\"", xxh3_128(identity))
}

impl Entry {
    /// Builds an entry from an identity body: compresses, computes etag and identity_len into
    /// `meta` (overwriting those two fields).
    pub fn from_identity(meta: Meta, identity: &[u8]) -> Entry {
        Entry::from_identity_at(meta, identity, GZIP_LEVEL)
    }

    /// [`Entry::from_identity`], compressed at gzip `level`.
    pub fn from_identity_at(mut meta: Meta, identity: &[u8], level: u32) -> Entry {
        meta.etag = etag(identity);
        meta.identity_len = identity.len() as u64;
        Entry::new(meta, compress_at(identity, level))
    }
}

/// A deterministic ~`target`-byte page shaped like a rendered Next.js product list: repeated
/// markup with varying numbers, and the RSC payload scripts that repeat it as JSON. For the
/// tests and benches that measure compression on something page-like (not part of the API).
#[doc(hidden)]
pub fn sample_page(target: usize) -> Vec<u8> {
    use std::fmt::Write as _;
    let mut page = String::from(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charSet=\"utf-8\"/>\
         <link rel=\"stylesheet\" href=\"/_next/static/css/app/layout.css\"/>\
         <title>Products</title></head><body><main class=\"grid\">",
    );
    let mut i = 0u32;
    while page.len() < target {
        let _ = write!(
            page,
            "<div class=\"card card-{}\"><a href=\"/products/{i}\"><img alt=\"Product {i}\" \
             src=\"/_next/image?url=%2Fimg%2F{}.jpg&amp;w=640&amp;q=75\" loading=\"lazy\"/>\
             <h2>Product {i}</h2><p class=\"price\">${}.{:02}</p></a></div>",
            i % 7,
            (i * 37) % 1000,
            (i * 13) % 500,
            (i * 7) % 100,
        );
        if i % 8 == 7 {
            let _ = write!(
                page,
                "<script>self.__next_f.push([1,\"{i:x}:[\\\"$\\\",\\\"div\\\",null,\
                 {{\\\"className\\\":\\\"card\\\",\\\"children\\\":\\\"Product {i}\\\"}}]\\n\"])\
                 </script>"
            );
        }
        i += 1;
    }
    page.push_str("</main></body></html>");
    page.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &'static str, value: &'static str) -> (HeaderName, HeaderValue) {
        (
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        )
    }

    /// The metadata of an App Router page prerendered with `revalidate = 60`.
    fn nextjs_html_meta() -> Meta {
        Meta {
            status: 200,
            headers: vec![
                h("content-type", "text/html; charset=utf-8"),
                h(
                    "vary",
                    "RSC, Next-Router-State-Tree, Next-Router-Prefetch, \
                     Next-Router-Segment-Prefetch, Accept-Encoding",
                ),
                h("x-nextjs-cache", "HIT"),
                h("x-nextjs-prerender", "1"),
                h("x-nextjs-stale-time", "300"),
                h("x-powered-by", "Next.js"),
                h(
                    "link",
                    "</_next/static/media/e4af272ccee01ff0-s.p.woff2>; rel=preload; as=\"font\"; \
                     crossorigin=\"\"; type=\"font/woff2\"",
                ),
                h("server-timing", "render;dur=41.2"),
                h(
                    "link",
                    "</_next/static/css/app/layout.css?v=1718000000000>; rel=preload; as=\"style\"",
                ),
                h("server-timing", "db;dur=12.7;desc=\"products\""),
                h("x-request-id", "7f3a9c2e-5b1d-4e8a-9c0f-2d6b8a4e1f73"),
            ],
            render_epoch: 41_977,
            stored_at_ms: 1_718_000_000_123,
            fresh_until_ms: 1_718_000_060_123,
            stale_until_ms: 1_749_536_000_123,
            stale_if_error_until_ms: 1_718_086_400_123,
            tags: vec![
                "*".into(),
                "path:/products/42".into(),
                "_N_T_/layout".into(),
                "_N_T_/products/layout".into(),
                "_N_T_/products/42".into(),
                "product-42".into(),
            ],
            etag: "\"0123456789abcdef0123456789abcdef\"".into(),
            identity_len: 51_234,
            filled_by: "5f3a9c2e".into(),
        }
    }

    fn empty_meta() -> Meta {
        Meta::new(204, Vec::new())
    }

    /// `bytes` with the first occurrence of `from` overwritten by `to` (same length).
    fn patched(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        let mut out = bytes.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    }

    fn with_u32_at(bytes: &[u8], at: usize, value: u32) -> Vec<u8> {
        let mut out = bytes.to_vec();
        out[at..at + 4].copy_from_slice(&value.to_le_bytes());
        out
    }

    #[test]
    fn nextjs_html_meta_round_trips_with_header_order_and_repeats() {
        let meta = nextjs_html_meta();
        let bytes = meta.encode();
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(bytes.len(), meta.encoded_len(), "capacity is exact");
        assert_eq!(Meta::decode(&bytes), Ok(meta));
    }

    #[test]
    fn empty_meta_round_trips() {
        let meta = empty_meta();
        let bytes = meta.encode();
        assert_eq!(bytes.len(), 51 + 4 + 4 + 4 + 4);
        assert_eq!(Meta::decode(&bytes), Ok(meta));
    }

    #[test]
    fn an_entry_of_an_older_build_without_filled_by_reads_as_not_recorded() {
        let meta = nextjs_html_meta();
        let bytes = meta.encode();
        let older = &bytes[..bytes.len() - 4 - meta.filled_by.len()];
        let read = Meta::decode(older).expect("the format-1 fields alone");
        assert_eq!(read.filled_by, "");
        assert_eq!(
            Meta {
                filled_by: meta.filled_by.clone(),
                ..read
            },
            meta
        );
    }

    #[test]
    fn layout_matches_the_module_doc() {
        let bytes = nextjs_html_meta().encode();
        assert_eq!(&bytes[1..3], &200u16.to_le_bytes());
        assert_eq!(&bytes[3..11], &41_977u64.to_le_bytes());
        assert_eq!(&bytes[43..51], &51_234u64.to_le_bytes());
        assert_eq!(&bytes[51..55], &34u32.to_le_bytes());
        assert_eq!(&bytes[55..89], b"\"0123456789abcdef0123456789abcdef\"");
        assert_eq!(&bytes[89..93], &11u32.to_le_bytes(), "header count");
        assert_eq!(&bytes[93..97], &12u32.to_le_bytes());
        assert_eq!(&bytes[97..109], b"content-type");
    }

    #[test]
    fn empty_input_is_empty() {
        assert_eq!(Meta::decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn every_truncation_point_is_an_error() {
        for meta in [nextjs_html_meta(), empty_meta()] {
            let bytes = meta.encode();
            // Where the appended `filled_by` begins, the bytes are a whole entry of an older
            // build: the one cut that decodes.
            let older = bytes.len() - 4 - meta.filled_by.len();
            for cut in (1..bytes.len()).filter(|c| *c != older) {
                match Meta::decode(&bytes[..cut]) {
                    Err(DecodeError::Truncated { .. }) => {}
                    other => panic!("prefix of {cut}/{} bytes gave {other:?}", bytes.len()),
                }
            }
        }
    }

    #[test]
    fn unknown_versions_are_refused() {
        let bytes = nextjs_html_meta().encode();
        for version in [0u8, 2, 255] {
            let mut other = bytes.to_vec();
            other[0] = version;
            assert_eq!(
                Meta::decode(&other),
                Err(DecodeError::UnknownVersion(version))
            );
        }
        assert_eq!(Meta::decode(&[7]), Err(DecodeError::UnknownVersion(7)));
    }

    #[test]
    fn invalid_header_bytes_tags_etag_and_status_are_refused() {
        let mut meta = empty_meta();
        meta.headers = vec![h("x-aa", "v-1")];
        meta.tags = vec!["tag-1".into()];
        meta.etag = "\"etag\"".into();
        let bytes = meta.encode();
        let cases: [(&[u8], &[u8], &str); 5] = [
            (b"x-aa", b"x a:", "header_name"),
            (b"x-aa", b"\0-aa", "header_name"),
            (b"v-1", b"v\n1", "header_value"),
            (b"tag-1", b"tag\xff1", "tag"),
            (b"etag", b"e\xc3\x28g", "etag"),
        ];
        for (from, to, field) in cases {
            assert_eq!(
                Meta::decode(&patched(&bytes, from, to)),
                Err(DecodeError::Invalid { field }),
                "{field}"
            );
        }
        for status in [0u16, 99, 1000, u16::MAX] {
            let mut bad = bytes.to_vec();
            bad[1..3].copy_from_slice(&status.to_le_bytes());
            assert_eq!(
                Meta::decode(&bad),
                Err(DecodeError::Invalid { field: "status" })
            );
        }
    }

    #[test]
    fn huge_length_prefixes_are_truncated_not_allocated() {
        let meta = nextjs_html_meta();
        let bytes = meta.encode();
        let headers_at = 55 + meta.etag.len();
        let first_name_at = headers_at + 4;
        let cases = [
            (51, "etag"),
            (headers_at, "header_count"),
            (first_name_at, "header_name"),
        ];
        for (at, field) in cases {
            for len in [u32::MAX, u32::MAX / 2, bytes.len() as u32] {
                assert_eq!(
                    Meta::decode(&with_u32_at(&bytes, at, len)),
                    Err(DecodeError::Truncated { field }),
                    "{field} = {len}"
                );
            }
        }
        let empty = empty_meta().encode();
        let tag_count_at = empty.len() - 8;
        assert_eq!(
            Meta::decode(&with_u32_at(&empty, tag_count_at, u32::MAX)),
            Err(DecodeError::Truncated { field: "tag_count" })
        );
        assert_eq!(
            Meta::decode(&with_u32_at(&empty, empty.len() - 4, u32::MAX)),
            Err(DecodeError::Truncated { field: "filled_by" })
        );
    }

    #[test]
    fn trailing_bytes_of_later_fields_are_ignored() {
        let meta = nextjs_html_meta();
        let mut bytes = meta.encode().to_vec();
        bytes.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 9, b'v', b'2']);
        assert_eq!(Meta::decode(&bytes), Ok(meta));
    }

    #[test]
    fn compress_and_inflate_round_trip_as_one_gzip_member() {
        let identity = sample_page(10_000);
        let gzip = compress(&identity);
        assert_eq!(&gzip[..3], &[0x1f, 0x8b, 0x08], "gzip magic, DEFLATE");
        assert_eq!(inflate(&gzip, identity.len()).expect("inflate"), identity);
        let mut other = Vec::new();
        flate2::read::GzDecoder::new(&gzip[..])
            .read_to_end(&mut other)
            .expect("flate2 reads it");
        assert_eq!(other, identity);
        assert_eq!(compress(&identity), gzip, "deterministic");
        let empty = compress(b"");
        assert_eq!(inflate(&empty, 0).expect("empty body"), Bytes::new());
    }

    #[test]
    fn inflate_refuses_garbage_and_damaged_members() {
        let gzip = compress(&sample_page(4_000)).to_vec();
        let mut flipped = gzip.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x55;
        let mut bad_crc = gzip.clone();
        let crc_at = bad_crc.len() - 8;
        bad_crc[crc_at] ^= 1;
        let mut lying_size = gzip.clone();
        let size_at = lying_size.len() - 4;
        lying_size[size_at..].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut two_members = gzip.clone();
        two_members.extend_from_slice(&compress(b"more"));
        let mut trailing = gzip.clone();
        trailing.push(0);
        let cases: [(&str, &[u8]); 8] = [
            ("empty", b""),
            ("garbage", b"<html>not gzip</html>"),
            ("cut", &gzip[..gzip.len() - 5]),
            ("flipped", &flipped),
            ("bad crc", &bad_crc),
            ("lying size", &lying_size),
            ("two members", &two_members),
            ("trailing byte", &trailing),
        ];
        for (name, input) in cases {
            match inflate(input, 1 << 20) {
                Err(InflateError::Corrupt(_)) => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn inflate_stops_at_the_limit() {
        let identity = sample_page(20_000);
        let gzip = compress(&identity);
        assert!(inflate(&gzip, identity.len()).is_ok(), "exactly the limit");
        match inflate(&gzip, identity.len() - 1) {
            Err(InflateError::TooLarge { limit }) => assert_eq!(limit, identity.len() - 1),
            other => panic!("{other:?}"),
        }
        // A bomb: 2 MiB of zeros in about 10 KiB (level 1 does not chase the best ratio).
        let bomb = compress(&vec![0u8; 2 << 20]);
        assert!(bomb.len() < 16 << 10, "bomb of {} B", bomb.len());
        assert!(matches!(
            inflate(&bomb, 64 << 10),
            Err(InflateError::TooLarge { limit: 65_536 })
        ));
    }

    #[test]
    fn nextjs_html_shrinks_by_three_quarters_at_level_1() {
        let identity = sample_page(50_000);
        let gzip = compress(&identity);
        let saved = 1.0 - gzip.len() as f64 / identity.len() as f64;
        println!(
            "{} B HTML → {} B gzip-1: {:.1}% smaller",
            identity.len(),
            gzip.len(),
            saved * 100.0
        );
        assert!(gzip.len() * 4 <= identity.len(), "only {saved:.3} saved");
    }

    #[test]
    fn etag_is_quoted_lower_hex_xxh3_and_pinned() {
        let tag = etag(b"<html><body>Hello, isrgate</body></html>");
        assert_eq!(tag, "\"e715b99a0e40f220952ffc2a237ab0c5\"");
        assert_eq!(etag(b""), "\"99aa06d3014798d86001c324468d497f\"");
        assert_eq!(tag.len(), 34);
        assert!(tag.starts_with('"') && tag.ends_with('"'));
        assert!(
            tag[1..33]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert!(HeaderValue::from_str(&tag).is_ok());
    }

    #[test]
    fn from_identity_overwrites_etag_and_length() {
        let identity = sample_page(5_000);
        let entry = Entry::from_identity(nextjs_html_meta(), &identity);
        assert_eq!(entry.meta.etag, etag(&identity));
        assert_eq!(entry.meta.identity_len, identity.len() as u64);
        assert_eq!(entry.meta.headers, nextjs_html_meta().headers);
        assert_eq!(entry.gzip, compress(&identity));
        assert_eq!(
            inflate(&entry.gzip, entry.meta.identity_len as usize).expect("inflate"),
            identity
        );
    }

    #[test]
    fn error_labels() {
        assert_eq!(DecodeError::UnknownVersion(3).as_str(), "unknown_version");
        assert_eq!(
            DecodeError::Truncated { field: "etag" }.as_str(),
            "truncated"
        );
        assert_eq!(InflateError::TooLarge { limit: 1 }.as_str(), "too_large");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn header_name() -> impl Strategy<Value = HeaderName> {
        prop_oneof![
            "[a-z][a-z0-9-]{0,20}",
            Just("content-type".to_owned()),
            Just("vary".to_owned()),
            Just("link".to_owned()),
        ]
        .prop_map(|n| HeaderName::from_bytes(n.as_bytes()).expect("safe alphabet"))
    }

    /// Every byte `HeaderValue` accepts: tab, visible ASCII and space, obs-text.
    fn header_value() -> impl Strategy<Value = HeaderValue> {
        prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..40)
            .prop_map(|b| HeaderValue::from_bytes(&b).expect("valid value bytes"))
    }

    fn meta() -> impl Strategy<Value = Meta> {
        (
            100u16..1000,
            prop::collection::vec((header_name(), header_value()), 0..12),
            any::<[u64; 6]>(),
            prop::collection::vec(any::<String>(), 0..6),
            any::<String>(),
            any::<String>(),
        )
            .prop_map(|(status, headers, t, tags, etag, filled_by)| Meta {
                status,
                headers,
                render_epoch: t[0],
                stored_at_ms: t[1],
                fresh_until_ms: t[2],
                stale_until_ms: t[3],
                stale_if_error_until_ms: t[4],
                tags,
                etag,
                identity_len: t[5],
                filled_by,
            })
    }

    /// `bytes` with a few bytes overwritten and maybe cut: near-valid input reaches deeper
    /// than random bytes.
    fn damage(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
        if !bytes.is_empty() {
            let len = bytes.len();
            for &(at, b) in edits {
                bytes[at % len] = b;
            }
            bytes.truncate(cut % (len + 1));
        }
        bytes
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(meta in meta()) {
            let bytes = meta.encode();
            prop_assert_eq!(bytes.len(), meta.encoded_len());
            prop_assert_eq!(Meta::decode(&bytes), Ok(meta));
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = Meta::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_damaged_encodings(
            meta in meta(),
            edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let _ = Meta::decode(&damage(meta.encode().to_vec(), &edits, cut));
        }

        #[test]
        fn inflate_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = inflate(&bytes, 1 << 16);
        }

        #[test]
        fn inflate_never_panics_on_damaged_members(
            body in prop::collection::vec(any::<u8>(), 0..512),
            edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let gzip = compress(&body);
            prop_assert_eq!(inflate(&gzip, body.len()).expect("own output"), body);
            let _ = inflate(&damage(gzip.to_vec(), &edits, cut), 1 << 16);
        }
    }
}
