//! Structured field values (RFC 8941), the writing half, for the dictionaries the gateway
//! writes itself (the debug header, `proxy::debug`).
//!
//! A [`Dict`] takes members in order: a key (lower case, RFC 8941 §3.2) with a token, a
//! string, an integer, a boolean, or an inner list of strings. Values come from anywhere (a
//! tag a replica chose, a client's path), so strings are escaped as §3.3.3 requires: `"` and
//! `\` get a backslash, and what an sf-string cannot hold (control characters, CR, LF, DEL,
//! anything outside ASCII) is written `%XX`, one per UTF-8 byte. No value can close its string,
//! add a member or end the header; the result is printable ASCII, always a valid header value.

use http::HeaderValue;

/// Largest magnitude of an sf-integer (§3.3.1: at most 15 digits).
const MAX_INTEGER: i64 = 999_999_999_999_999;

/// A dictionary being written.
#[derive(Debug, Default)]
pub struct Dict {
    text: String,
}

impl Dict {
    /// An empty dictionary with room for `bytes`.
    pub fn with_capacity(bytes: usize) -> Dict {
        Dict {
            text: String::with_capacity(bytes),
        }
    }

    /// `key=token` when `value` is a token (§3.3.4: a letter or `*`, then token characters,
    /// `:` or `/`), `key="value"` otherwise.
    pub fn token(&mut self, key: &str, value: &str) -> &mut Dict {
        if !is_token(value) {
            return self.string(key, value);
        }
        self.key(key);
        self.text.push('=');
        self.text.push_str(value);
        self
    }

    /// `key="value"`, escaped.
    pub fn string(&mut self, key: &str, value: &str) -> &mut Dict {
        self.key(key);
        self.text.push('=');
        push_string(&mut self.text, value);
        self
    }

    /// `key=value`, clamped to what an sf-integer holds.
    pub fn integer(&mut self, key: &str, value: i64) -> &mut Dict {
        self.key(key);
        self.text.push('=');
        let clamped = value.clamp(-MAX_INTEGER, MAX_INTEGER);
        self.text.push_str(itoa::Buffer::new().format(clamped));
        self
    }

    /// `key` (true, §3.2: a bare key is `?1`) or `key=?0`.
    pub fn boolean(&mut self, key: &str, value: bool) -> &mut Dict {
        self.key(key);
        if !value {
            self.text.push_str("=?0");
        }
        self
    }

    /// `key=("a" "b")`: an inner list of strings.
    pub fn strings<'a>(
        &mut self,
        key: &str,
        values: impl IntoIterator<Item = &'a str>,
    ) -> &mut Dict {
        self.key(key);
        self.text.push_str("=(");
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push(' ');
            }
            push_string(&mut self.text, value);
        }
        self.text.push(')');
        self
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Nothing written yet.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The dictionary as a header value.
    pub fn into_header(self) -> HeaderValue {
        HeaderValue::from_maybe_shared(bytes::Bytes::from(self.text))
            .expect("invariant: a dictionary is printable ASCII (strings are escaped)")
    }

    fn key(&mut self, key: &str) {
        debug_assert!(is_key(key), "{key:?} is not an sf key");
        if !self.text.is_empty() {
            self.text.push_str(", ");
        }
        self.text.push_str(key);
    }
}

/// Writes `value` as an sf-string.
fn push_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {
                let mut utf8 = [0; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    out.push('%');
                    out.push(char::from(HEX[usize::from(b >> 4)]));
                    out.push(char::from(HEX[usize::from(b & 0xf)]));
                }
            }
        }
    }
    out.push('"');
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// §3.2: `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`.
fn is_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'*')
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*')
        })
}

/// §3.3.4: `( ALPHA / "*" ) *( tchar / ":" / "/" )`.
fn is_token(value: &str) -> bool {
    let mut bytes = value.bytes();
    let tchar = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
                    | b':'
                    | b'/'
            )
    };
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'*')
        && bytes.all(tchar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_written_in_order_as_rfc_8941_says() {
        let mut d = Dict::default();
        d.token("state", "hit")
            .string("key", "default site.test/p html")
            .integer("age", 12)
            .integer("ttl", -3)
            .boolean("stored", true)
            .boolean("l1", false)
            .strings("tags", ["*", "path:/p"]);
        assert_eq!(
            d.into_header(),
            r#"state=hit, key="default site.test/p html", age=12, ttl=-3, stored, l1=?0, tags=("*" "path:/p")"#
        );
    }

    #[test]
    fn no_value_can_leave_its_string_or_the_header() {
        let mut d = Dict::default();
        let evil = "a\", injected=1; b\\\r\nset-cookie: x=y\u{7f}é";
        d.string("key", evil).strings("tags", [evil]);
        let v = d.into_header();
        let text = v.to_str().expect("printable ASCII");
        assert_eq!(
            text,
            r#"key="a\", injected=1; b\\%0D%0Aset-cookie: x=y%7F%C3%A9", tags=("a\", injected=1; b\\%0D%0Aset-cookie: x=y%7F%C3%A9")"#
        );
        assert!(text.bytes().all(|b| (b' '..=b'~').contains(&b)));
    }

    #[test]
    fn a_value_that_is_no_token_is_written_as_a_string() {
        let mut d = Dict::default();
        d.token("a", "rsc-prefetch:1")
            .token("b", "rsc-segment:/x y")
            .token("c", "")
            .token("d", "1st");
        assert_eq!(
            d.into_header(),
            r#"a=rsc-prefetch:1, b="rsc-segment:/x y", c="", d="1st""#
        );
    }

    #[test]
    fn integers_are_clamped_to_fifteen_digits() {
        let mut d = Dict::default();
        d.integer("a", i64::MAX).integer("b", i64::MIN);
        assert_eq!(d.into_header(), "a=999999999999999, b=-999999999999999");
    }

    /// The string as an RFC 8941 parser reads it back (§4.2.5).
    fn parse_string(text: &str) -> String {
        let inner = text.strip_prefix('"').and_then(|t| t.strip_suffix('"'));
        let mut out = String::new();
        let mut chars = inner.expect("quoted").chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.push(chars.next().expect("escaped character")),
                '"' => panic!("unescaped quote in {text}"),
                c => out.push(c),
            }
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn any_string_makes_a_valid_header(value in ".*") {
            let mut d = Dict::default();
            d.string("k", &value).strings("l", [value.as_str()]);
            let header = d.into_header();
            let text = header.to_str().expect("printable ASCII");
            proptest::prop_assert!(text.bytes().all(|b| (b' '..=b'~').contains(&b)));
        }

        #[test]
        fn printable_strings_read_back_as_written(value in "[ -~]*") {
            let mut d = Dict::default();
            d.string("k", &value);
            let header = d.into_header();
            let text = header.to_str().expect("printable ASCII");
            let read = parse_string(text.strip_prefix("k=").expect("key"));
            proptest::prop_assert_eq!(read, value);
        }
    }
}
