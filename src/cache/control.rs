//! `Cache-Control` parsing (RFC 9111 §5.2), the first thing step 9 (**admit**) does with an
//! upstream response.
//!
//! Receives the raw bytes of every `Cache-Control` field line of a response; hands on a
//! [`CacheControl`]: the directives a shared cache acts on, already resolved to one value each.
//! [`super::policy`] decides from it whether and how long the response may be stored.
//!
//! Tolerant of every form Next.js 13.4-16 emits (NEXTJS.md §1.1-1.2), including the bare
//! `stale-while-revalidate` of 13.4/14 and the trailing empty directive (`s-maxage=60, `) of
//! 15.0. Whatever it cannot read it reads conservatively: an unreadable freshness lifetime makes
//! the response stale, an unreadable stale window grants none, a flag is set whatever its
//! argument.
//!
//! It must not decide cacheability, must not allocate, and must never panic or fail: the input
//! is upstream bytes, not necessarily UTF-8.

use http::header::{self, HeaderMap, HeaderValue};

/// RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31.
pub const DELTA_SECONDS_MAX: u32 = 1 << 31;

/// The `stale-while-revalidate` window (RFC 5861 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swr {
    /// `stale-while-revalidate=<n>`: serve stale for at most `n` seconds after expiry.
    Seconds(u32),
    /// Bare `stale-while-revalidate`, as Next.js 13.4 and 14 send it: no bound given, so the
    /// caller applies its own cap (NEXTJS.md §9 rule 13).
    Unbounded,
}

/// The response directives of one or more `Cache-Control` field lines (RFC 9111 §5.2.2).
///
/// Delta-seconds values are in seconds and saturate at [`DELTA_SECONDS_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheControl {
    /// `max-age` (§5.2.2.1).
    pub max_age: Option<u32>,
    /// `s-maxage` (§5.2.2.10): the lifetime for shared caches, over `max-age`.
    pub s_maxage: Option<u32>,
    /// `stale-while-revalidate` (RFC 5861 §3).
    pub stale_while_revalidate: Option<Swr>,
    /// `stale-if-error` in seconds (RFC 5861 §4).
    pub stale_if_error: Option<u32>,
    /// `no-store` (§5.2.2.5).
    pub no_store: bool,
    /// `no-cache` (§5.2.2.4), with or without field names.
    pub no_cache: bool,
    /// `private` (§5.2.2.7), with or without field names.
    pub private: bool,
    /// `public` (§5.2.2.9).
    pub public: bool,
    /// `must-revalidate` (§5.2.2.2).
    pub must_revalidate: bool,
    /// `proxy-revalidate` (§5.2.2.8).
    pub proxy_revalidate: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
}

impl CacheControl {
    /// Parses and combines field lines. RFC 9110 §5.3: several lines of a list-based field mean
    /// the same as one line joined with commas, so each line is read on its own into the same
    /// result (a quoted string never spans two lines).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> CacheControl {
        let mut cc = CacheControl::default();
        for line in values {
            for directive in (Directives { rest: line }) {
                cc.apply(&directive);
            }
        }
        cc
    }

    /// The response's `Cache-Control`, or `None` when it has no such header (which is not the
    /// same as an empty one: see NEXTJS.md §9 rule 10).
    pub fn from_headers(headers: &HeaderMap) -> Option<CacheControl> {
        let mut lines = headers.get_all(header::CACHE_CONTROL).iter().peekable();
        lines.peek()?;
        Some(Self::parse(lines.map(HeaderValue::as_bytes)))
    }

    /// The freshness lifetime for a shared cache: `s-maxage` over `max-age` (RFC 9111 §4.2.1).
    pub fn shared_max_age(&self) -> Option<u32> {
        self.s_maxage.or(self.max_age)
    }

    fn apply(&mut self, d: &Directive<'_>) {
        let is = |name: &str| d.name.eq_ignore_ascii_case(name.as_bytes());
        if is("max-age") {
            self.max_age = Some(lifetime(self.max_age, d.value));
        } else if is("s-maxage") {
            self.s_maxage = Some(lifetime(self.s_maxage, d.value));
        } else if is("stale-while-revalidate") {
            // First valid occurrence wins (RFC 9111 §4.2.1 "the first occurrence should be
            // used"); a bare directive is valid and unbounded, an unreadable argument is skipped.
            if self.stale_while_revalidate.is_none() {
                self.stale_while_revalidate = match d.value {
                    None => Some(Swr::Unbounded),
                    Some(v) => delta_seconds(v).map(Swr::Seconds),
                };
            }
        } else if is("stale-if-error") {
            if self.stale_if_error.is_none() {
                self.stale_if_error = d.value.and_then(delta_seconds);
            }
        } else if is("no-store") {
            self.no_store = true;
        } else if is("no-cache") {
            // §5.2.2.4: the qualified form only forbids reusing the named fields; a shared cache
            // that does not strip them treats it like the unqualified form.
            self.no_cache = true;
        } else if is("private") {
            // §5.2.2.7: same reasoning as for `no-cache="…"`.
            self.private = true;
        } else if is("public") {
            self.public = true;
        } else if is("must-revalidate") {
            self.must_revalidate = true;
        } else if is("proxy-revalidate") {
            self.proxy_revalidate = true;
        } else if is("immutable") {
            self.immutable = true;
        }
        // §5.2.3: unknown extension directives are ignored.
    }
}

/// A freshness lifetime merged with an earlier occurrence. RFC 9111 §4.2.1: a duplicate
/// directive may make the response stale and the most restrictive should be honored, so the
/// minimum wins; invalid freshness information (no argument, not digits) means stale (0).
fn lifetime(earlier: Option<u32>, value: Option<Value<'_>>) -> u32 {
    let this = value.and_then(delta_seconds).unwrap_or(0);
    earlier.map_or(this, |e| e.min(this))
}

/// RFC 9111 §1.2.2 `delta-seconds = 1*DIGIT`, saturating at 2^31. `None` for anything else:
/// empty, signed, fractional, spaced, or a quoted string with a backslash or trailing garbage.
fn delta_seconds(value: Value<'_>) -> Option<u32> {
    if !value.clean || value.bytes.is_empty() {
        return None;
    }
    let cap = u64::from(DELTA_SECONDS_MAX);
    let mut n: u64 = 0;
    for &b in value.bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        // n ≤ 2^31 before the step, so this cannot overflow u64.
        n = (n * 10 + u64::from(b - b'0')).min(cap);
    }
    Some(u32::try_from(n).unwrap_or(DELTA_SECONDS_MAX))
}

/// One directive of a field line: its name (case not folded) and its argument, if it has `=`.
#[derive(Debug, Clone, Copy)]
struct Directive<'a> {
    name: &'a [u8],
    value: Option<Value<'a>>,
}

/// A directive argument: the token, or the inside of a quoted string (quoted-pairs not undone).
#[derive(Debug, Clone, Copy)]
struct Value<'a> {
    bytes: &'a [u8],
    /// False when the quoted string was unterminated, contained a quoted-pair, or was followed
    /// by anything but whitespace before the next comma. Only numeric arguments care.
    clean: bool,
}

/// The directives of one field line (RFC 9111 §5.2:
/// `#( token [ "=" ( token / quoted-string ) ] )`), skipping empty list elements as RFC 9110
/// §5.6.1 requires of recipients (`a, , b`, a trailing `, `).
struct Directives<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Directives<'a> {
    type Item = Directive<'a>;

    fn next(&mut self) -> Option<Directive<'a>> {
        while !self.rest.is_empty() {
            let rest = self.rest;
            let end = rest
                .iter()
                .position(|&b| b == b'=' || b == b',')
                .unwrap_or(rest.len());
            let name = trim(&rest[..end]);
            let value = match rest.get(end) {
                Some(b'=') => {
                    let (value, after) = read_value(&rest[end + 1..]);
                    self.rest = after;
                    Some(value)
                }
                // A comma, or the end of the line.
                _ => {
                    self.rest = rest.get(end + 1..).unwrap_or_default();
                    None
                }
            };
            if !name.is_empty() {
                return Some(Directive { name, value });
            }
        }
        None
    }
}

/// Reads an argument (whitespace around `=` tolerated) and returns it with what follows the
/// comma that ends it.
fn read_value(input: &[u8]) -> (Value<'_>, &[u8]) {
    let input = trim_start(input);
    if input.first() != Some(&b'"') {
        let end = input.iter().position(|&b| b == b',').unwrap_or(input.len());
        let value = Value {
            bytes: trim(&input[..end]),
            clean: true,
        };
        return (value, input.get(end + 1..).unwrap_or_default());
    }
    // RFC 9110 §5.6.4: quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE, where a
    // quoted-pair is a backslash and any one octet; a comma inside does not end the directive.
    let mut escaped = false;
    let mut i = 1;
    while i < input.len() {
        match input[i] {
            b'\\' => {
                escaped = true;
                i += 2;
            }
            b'"' => break,
            _ => i += 1,
        }
    }
    let Some(inner) = input.get(1..i) else {
        // Unterminated, ending on a quoted-pair: the rest of the line is this argument.
        let value = Value {
            bytes: input.get(1..).unwrap_or_default(),
            clean: false,
        };
        return (value, &[]);
    };
    let Some(after) = input.get(i + 1..) else {
        // Unterminated: the rest of the line is this argument.
        return (
            Value {
                bytes: inner,
                clean: false,
            },
            &[],
        );
    };
    let end = after.iter().position(|&b| b == b',').unwrap_or(after.len());
    let value = Value {
        bytes: inner,
        clean: !escaped && trim(&after[..end]).is_empty(),
    };
    (value, after.get(end + 1..).unwrap_or_default())
}

/// RFC 9110 §5.6.3 optional whitespace.
fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_ows(b))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn trim(bytes: &[u8]) -> &[u8] {
    let bytes = trim_start(bytes);
    let end = bytes.iter().rposition(|&b| !is_ows(b)).map_or(0, |i| i + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(line: &str) -> CacheControl {
        CacheControl::parse([line.as_bytes()])
    }

    fn isr(s_maxage: u32, swr: Option<Swr>) -> CacheControl {
        CacheControl {
            s_maxage: Some(s_maxage),
            stale_while_revalidate: swr,
            ..CacheControl::default()
        }
    }

    fn private_string() -> CacheControl {
        CacheControl {
            max_age: Some(0),
            private: true,
            no_cache: true,
            no_store: true,
            must_revalidate: true,
            ..CacheControl::default()
        }
    }

    // Every form of NEXTJS.md §1.1-1.2 (and nextjs-observed.md), one test each.

    #[test]
    fn next_13_14_static_page_is_one_year_with_unbounded_swr() {
        let got = cc("s-maxage=31536000, stale-while-revalidate");
        assert_eq!(got, isr(31_536_000, Some(Swr::Unbounded)));
        assert_eq!(got.shared_max_age(), Some(31_536_000));
    }

    #[test]
    fn next_15_0_trailing_empty_directive_is_ignored() {
        assert_eq!(cc("s-maxage=31536000, "), isr(31_536_000, None));
        assert_eq!(cc("s-maxage=60, "), isr(60, None));
    }

    #[test]
    fn next_16_static_page_is_bare_s_maxage() {
        assert_eq!(cc("s-maxage=31536000"), isr(31_536_000, None));
    }

    #[test]
    fn next_13_14_isr_page_has_unbounded_swr() {
        assert_eq!(
            cc("s-maxage=60, stale-while-revalidate"),
            isr(60, Some(Swr::Unbounded))
        );
        assert_eq!(
            cc("s-maxage=10, stale-while-revalidate"),
            isr(10, Some(Swr::Unbounded))
        );
    }

    #[test]
    fn next_15_16_isr_page_has_expire_minus_revalidate() {
        for (line, n, swr) in [
            (
                "s-maxage=60, stale-while-revalidate=31535940",
                60,
                31_535_940,
            ),
            (
                "s-maxage=30, stale-while-revalidate=31535970",
                30,
                31_535_970,
            ),
            (
                "s-maxage=10, stale-while-revalidate=31535990",
                10,
                31_535_990,
            ),
            (
                "s-maxage=3600, stale-while-revalidate=31532400",
                3600,
                31_532_400,
            ),
        ] {
            assert_eq!(cc(line), isr(n, Some(Swr::Seconds(swr))), "{line}");
        }
    }

    #[test]
    fn next_private_string_sets_every_flag_and_zero_max_age() {
        let got = cc("private, no-cache, no-store, max-age=0, must-revalidate");
        assert_eq!(got, private_string());
        assert_eq!(got.shared_max_age(), Some(0));
    }

    #[test]
    fn next_13_4_unmatched_404_and_server_action_string() {
        let got = cc("no-cache, no-store, max-age=0, must-revalidate");
        assert_eq!(
            got,
            CacheControl {
                private: false,
                ..private_string()
            }
        );
    }

    #[test]
    fn next_dev_no_store() {
        let got = cc("no-store");
        assert!(got.no_store);
        assert_eq!(got.shared_max_age(), None);
    }

    #[test]
    fn next_cve_2024_46982_forced_ssg_form() {
        assert_eq!(
            cc("s-maxage=1, stale-while-revalidate"),
            isr(1, Some(Swr::Unbounded))
        );
    }

    #[test]
    fn next_static_assets_are_public_immutable_max_age() {
        let got = cc("public, max-age=31536000, immutable");
        assert!(got.public && got.immutable);
        assert_eq!(got.max_age, Some(31_536_000));
        assert_eq!(got.shared_max_age(), Some(31_536_000));
        let media = cc("public, max-age=315360000, immutable");
        assert_eq!(media.max_age, Some(315_360_000));
    }

    #[test]
    fn next_public_files_and_metadata_have_zero_max_age() {
        let public = cc("public, max-age=0");
        assert!(public.public && !public.must_revalidate);
        assert_eq!(public.shared_max_age(), Some(0));
        let metadata = cc("public, max-age=0, must-revalidate");
        assert!(metadata.public && metadata.must_revalidate);
        assert_eq!(metadata.shared_max_age(), Some(0));
    }

    #[test]
    fn next_image_optimizer_is_public_max_age_must_revalidate() {
        for (line, n) in [
            ("public, max-age=60, must-revalidate", 60),
            ("public, max-age=14400, must-revalidate", 14_400),
        ] {
            let got = cc(line);
            assert!(got.public && got.must_revalidate, "{line}");
            assert_eq!(got.shared_max_age(), Some(n), "{line}");
        }
    }

    // Syntax.

    #[test]
    fn names_are_case_insensitive() {
        let got = cc("S-MaxAge=60, Stale-While-Revalidate=5, PRIVATE, No-Store, No-Cache");
        assert_eq!(got.s_maxage, Some(60));
        assert_eq!(got.stale_while_revalidate, Some(Swr::Seconds(5)));
        assert!(got.private && got.no_store && got.no_cache);
    }

    #[test]
    fn quoted_values_are_accepted() {
        let got = cc("max-age=\"60\", s-maxage = \"30\" , stale-if-error=\"5\"");
        assert_eq!(got.max_age, Some(60));
        assert_eq!(got.s_maxage, Some(30));
        assert_eq!(got.stale_if_error, Some(5));
    }

    #[test]
    fn whitespace_around_equals_and_commas_is_tolerated() {
        let got = cc(" \ts-maxage \t= \t60\t ,\tstale-while-revalidate =  7 ,public ");
        assert_eq!(got.s_maxage, Some(60));
        assert_eq!(got.stale_while_revalidate, Some(Swr::Seconds(7)));
        assert!(got.public);
    }

    #[test]
    fn empty_directives_are_ignored() {
        assert_eq!(cc(",,s-maxage=60,, ,\t,"), isr(60, None));
        assert_eq!(cc(""), CacheControl::default());
        assert_eq!(cc(" , "), CacheControl::default());
        assert_eq!(cc("=5, =, s-maxage=1"), isr(1, None));
    }

    #[test]
    fn multiple_lines_are_combined() {
        let got =
            CacheControl::parse([&b"s-maxage=60"[..], b"stale-while-revalidate=5", b"public"]);
        assert_eq!(got.s_maxage, Some(60));
        assert_eq!(got.stale_while_revalidate, Some(Swr::Seconds(5)));
        assert!(got.public);
    }

    #[test]
    fn unknown_directives_are_ignored() {
        let got = cc("foo, bar=\"baz, qux\", s-maxage=60, x-y=1");
        assert_eq!(got, isr(60, None));
    }

    #[test]
    fn flags_with_field_names_still_set() {
        let got = cc("no-cache=\"set-cookie\", private=\"x, y\", s-maxage=60");
        assert!(got.no_cache && got.private);
        // The comma inside the quoted string did not end the directive.
        assert_eq!(got.s_maxage, Some(60));
    }

    #[test]
    fn huge_delta_seconds_saturate_at_2_pow_31() {
        assert_eq!(cc("max-age=2147483648").max_age, Some(DELTA_SECONDS_MAX));
        assert_eq!(cc("max-age=4294967296").max_age, Some(DELTA_SECONDS_MAX));
        let long = format!("s-maxage={}", "9".repeat(500));
        assert_eq!(cc(&long).s_maxage, Some(DELTA_SECONDS_MAX));
        assert_eq!(cc("max-age=2147483647").max_age, Some(2_147_483_647));
        assert_eq!(cc("max-age=007").max_age, Some(7));
    }

    #[test]
    fn invalid_lifetimes_mean_stale() {
        for line in [
            "max-age=-1",
            "max-age=abc",
            "max-age=",
            "max-age",
            "max-age=1.5",
            "max-age=+5",
            "max-age=6 0",
            "max-age=\"\"",
            "max-age=\"6\\0\"",
            "max-age=\"60\"x",
            "max-age=\"60",
        ] {
            assert_eq!(cc(line).max_age, Some(0), "{line}");
        }
        assert_eq!(cc("s-maxage=ten").s_maxage, Some(0));
        assert_eq!(cc("s-maxage=ten").shared_max_age(), Some(0));
    }

    #[test]
    fn invalid_stale_windows_grant_nothing() {
        for line in [
            "stale-while-revalidate=-1, stale-if-error=-1",
            "stale-while-revalidate=x, stale-if-error",
            "stale-while-revalidate=, stale-if-error=",
            "stale-while-revalidate=\"1\\2\", stale-if-error=1e3",
        ] {
            let got = cc(line);
            assert_eq!(got.stale_while_revalidate, None, "{line}");
            assert_eq!(got.stale_if_error, None, "{line}");
        }
    }

    #[test]
    fn duplicate_lifetimes_take_the_minimum() {
        assert_eq!(cc("max-age=60, max-age=30").max_age, Some(30));
        assert_eq!(cc("s-maxage=30, s-maxage=60").s_maxage, Some(30));
        assert_eq!(cc("s-maxage=30, s-maxage=bad").s_maxage, Some(0));
        let lines = CacheControl::parse([&b"s-maxage=60"[..], b"s-maxage=10"]);
        assert_eq!(lines.s_maxage, Some(10));
    }

    #[test]
    fn duplicate_stale_windows_take_the_first_valid() {
        let got =
            cc("stale-while-revalidate=bad, stale-while-revalidate=5, stale-while-revalidate=9");
        assert_eq!(got.stale_while_revalidate, Some(Swr::Seconds(5)));
        let got = cc("stale-while-revalidate, stale-while-revalidate=5");
        assert_eq!(got.stale_while_revalidate, Some(Swr::Unbounded));
        assert_eq!(
            cc("stale-if-error=x, stale-if-error=3, stale-if-error=1").stale_if_error,
            Some(3)
        );
    }

    #[test]
    fn s_maxage_wins_over_max_age() {
        assert_eq!(cc("max-age=10, s-maxage=60").shared_max_age(), Some(60));
        assert_eq!(cc("max-age=60, s-maxage=0").shared_max_age(), Some(0));
        assert_eq!(cc("max-age=60").shared_max_age(), Some(60));
        assert_eq!(cc("public").shared_max_age(), None);
    }

    #[test]
    fn non_utf8_bytes_do_not_panic() {
        let got = CacheControl::parse([&b"\xff\xfe=\x80, s-maxage=\xc3\x28, \"\\"[..], b"\\"]);
        assert_eq!(got.s_maxage, Some(0));
    }

    #[test]
    fn from_headers_distinguishes_absent_from_empty() {
        let mut headers = HeaderMap::new();
        assert_eq!(CacheControl::from_headers(&headers), None);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(""));
        assert_eq!(
            CacheControl::from_headers(&headers),
            Some(CacheControl::default())
        );
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("s-maxage=60"),
        );
        headers.append(
            header::CACHE_CONTROL,
            HeaderValue::from_static("stale-while-revalidate"),
        );
        assert_eq!(
            CacheControl::from_headers(&headers),
            Some(isr(60, Some(Swr::Unbounded)))
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const NAMES: &[&str] = &[
        "max-age",
        "s-maxage",
        "stale-while-revalidate",
        "stale-if-error",
        "no-store",
        "no-cache",
        "private",
        "public",
        "must-revalidate",
        "proxy-revalidate",
        "immutable",
        "x-unknown",
    ];

    /// A directive to render: a name, an optional argument (digits, possibly huge, possibly
    /// quoted, or a token), and the case mask and whitespace used for its noisy rendering.
    #[derive(Debug, Clone)]
    struct Case {
        name: usize,
        value: Option<String>,
        upper: Vec<bool>,
        before: String,
        after: String,
    }

    fn directive() -> impl Strategy<Value = Case> {
        (
            0..NAMES.len(),
            proptest::option::of(prop_oneof![
                "[0-9]{1,12}",
                "\"[0-9]{1,12}\"",
                "[a-z-]{0,5}",
                "\"[a-z, =-]{0,8}\"",
            ]),
            proptest::collection::vec(any::<bool>(), 24),
            "[ \t]{0,3}",
            "[ \t]{0,3}",
        )
            .prop_map(|(name, value, upper, before, after)| Case {
                name,
                value,
                upper,
                before,
                after,
            })
    }

    fn render(cases: &[Case], noisy: bool) -> String {
        let mut out = Vec::new();
        for case in cases {
            let plain = NAMES[case.name];
            let name = if noisy {
                let mixed: String = plain
                    .chars()
                    .zip(case.upper.iter().cycle())
                    .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
                    .collect();
                format!("{}{mixed}{}", case.before, case.after)
            } else {
                plain.to_owned()
            };
            out.push(match &case.value {
                Some(v) => format!("{name}={v}"),
                None => name,
            });
        }
        out.join(",")
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..4)
        ) {
            let got = CacheControl::parse(lines.iter().map(Vec::as_slice));
            for v in [got.max_age, got.s_maxage, got.stale_if_error].into_iter().flatten() {
                prop_assert!(v <= DELTA_SECONDS_MAX);
            }
        }

        #[test]
        fn parse_ignores_case_and_whitespace_of_names(
            directives in proptest::collection::vec(directive(), 0..8)
        ) {
            let plain = CacheControl::parse([render(&directives, false).as_bytes()]);
            let noisy = CacheControl::parse([render(&directives, true).as_bytes()]);
            prop_assert_eq!(plain, noisy);
        }

        #[test]
        fn lines_parse_like_one_joined_line(
            directives in proptest::collection::vec(directive(), 0..8),
            split in 0usize..8
        ) {
            let split = split.min(directives.len());
            let joined = CacheControl::parse([render(&directives, true).as_bytes()]);
            let first = render(&directives[..split], true);
            let second = render(&directives[split..], true);
            let lines = CacheControl::parse([first.as_bytes(), second.as_bytes()]);
            prop_assert_eq!(joined, lines);
        }
    }
}
