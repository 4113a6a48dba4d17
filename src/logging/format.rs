//! How an event becomes a line: one flat shape for every line, whoever emitted it (isrgate,
//! hyper, or a `log`-crate library such as fred, bridged by `tracing-log`), in JSON or text.
//!
//! JSON (`log.format = "json"`), one object per line:
//!
//! ```text
//! {"timestamp":"2025-06-01T10:00:00.123456Z","level":"WARN","target":"fred::router","message":"…"}
//! ```
//!
//! `timestamp`, `level` and `target` first, then the event's fields at the top level with
//! their JSON types (numbers, booleans, strings), `message` among them. tracing-subscriber's
//! own JSON formatter, even with `flatten_event(true)`, writes a field recorded with `?` (every
//! list: `tags = ?tags`) as the string of its `Debug` text; here a `Debug` text that is a JSON
//! array (`["a", "b"]`, `[1, 2]`), or a list of bare words (`[10.0.0.1:3000]`), is written as
//! an array, so every `?list` field is an array without changing its call site (`valuable`
//! would need `--cfg tracing_unstable`). A field named like one of the three leading keys gets
//! a `field.` prefix, so no key is written twice.
//!
//! Text (`log.format = "pretty"`), tracing's layout with logfmt values:
//!
//! ```text
//! 2025-06-01T10:00:00.123456Z  WARN fred::router: reconnecting in 250 ms delay_ms=250 error="io: refused"
//! ```
//!
//! the message first, then `key=value`, a text value quoted (JSON escapes) when it is empty or
//! holds a space, a quote, `=` or a control character, `Debug` and `Display` values as they
//! are. The level is coloured on a terminal.
//!
//! In both, a log record's own metadata (`log.target`, `log.file`…) becomes the line's
//! `target`, not fields of its own; spans are not written (isrgate opens none).
//!
//! Cost (an access line is written per request, `benches/access.rs`): a line is built in a
//! per-thread string (no allocation once warm) and handed on with one write; numbers through
//! `itoa`; the date and time of the current second are formatted once per second and thread.

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The flat event format (see the module docs), JSON or text.
#[derive(Debug, Clone, Copy)]
pub struct Flat {
    json: bool,
    ansi: bool,
}

impl Flat {
    /// One JSON object per line.
    pub fn json() -> Flat {
        Flat {
            json: true,
            ansi: false,
        }
    }

    /// Text lines; `ansi`: the level coloured (a terminal).
    pub fn text(ansi: bool) -> Flat {
        Flat { json: false, ansi }
    }
}

thread_local! {
    /// The line being built (kept per thread: no allocation once the thread has written its
    /// longest line).
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    /// Where a `Debug` or error value is formatted before it is escaped.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
    /// The current second, and its date and time as written (`YYYY-MM-DDTHH:MM:SS`).
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

impl<S, N> FormatEvent<S, N> for Flat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        with_string(&LINE, |s| {
            self.build(s, event);
            w.write_str(s)
        })
    }
}

impl Flat {
    fn build(self, s: &mut String, event: &Event<'_>) {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let level = *meta.level();
        if self.json {
            s.push_str("{\"timestamp\":\"");
            timestamp(s);
            s.push_str("\",\"level\":\"");
            s.push_str(level.as_str());
            s.push_str("\",\"target\":");
            json_string(s, meta.target());
        } else {
            timestamp(s);
            s.push(' ');
            self.text_level(s, level);
            s.push(' ');
            s.push_str(meta.target());
            s.push(':');
        }
        event.record(&mut Fields { s, json: self.json });
        if self.json {
            s.push('}');
        }
        s.push('\n');
    }

    /// tracing's text levels: right-aligned in five columns, coloured on a terminal.
    fn text_level(self, s: &mut String, level: Level) {
        let (text, colour) = match level {
            Level::ERROR => ("ERROR", "31"),
            Level::WARN => (" WARN", "33"),
            Level::INFO => (" INFO", "32"),
            Level::DEBUG => ("DEBUG", "34"),
            Level::TRACE => ("TRACE", "35"),
        };
        if self.ansi {
            s.push_str("\x1b[");
            s.push_str(colour);
            s.push('m');
            s.push_str(text);
            s.push_str("\x1b[0m");
        } else {
            s.push_str(text);
        }
    }
}

/// Runs `f` on a per-thread string, cleared; a fresh one when it is in use (a value whose
/// `Debug` logs).
fn with_string<T>(
    key: &'static std::thread::LocalKey<RefCell<String>>,
    f: impl FnOnce(&mut String) -> T,
) -> T {
    key.with(|cell| {
        let mut own = String::new();
        let mut borrowed = cell.try_borrow_mut();
        let s = match &mut borrowed {
            Ok(s) => &mut **s,
            Err(_) => &mut own,
        };
        s.clear();
        f(s)
    })
}

/// Appends each field: `,"name":value` (JSON) or ` name=value` (text; the message bare).
struct Fields<'a> {
    s: &'a mut String,
    json: bool,
}

impl Fields<'_> {
    /// Writes the field's key; `false` when the field is not written (a log record's metadata)
    /// or is the text message (its value follows bare).
    fn key(&mut self, field: &Field) -> Option<Key> {
        let name = field.name();
        if name.starts_with("log.") {
            return None;
        }
        if self.json {
            self.s.push_str(",\"");
            if matches!(name, "timestamp" | "level" | "target") {
                self.s.push_str("field.");
            }
            self.s.push_str(name);
            self.s.push_str("\":");
            Some(Key::Json)
        } else if name == "message" {
            self.s.push(' ');
            Some(Key::Message)
        } else {
            self.s.push(' ');
            self.s.push_str(name);
            self.s.push('=');
            Some(Key::Text)
        }
    }

    /// A text value: a JSON string, or as it is in a message, quoted when needed in text.
    fn text(&mut self, field: &Field, value: &str) {
        match self.key(field) {
            None => {}
            Some(Key::Json) => json_string(self.s, value),
            Some(Key::Message) => self.s.push_str(value),
            Some(Key::Text) => logfmt_value(self.s, value),
        }
    }

    fn number(&mut self, field: &Field, value: impl itoa::Integer) {
        if self.key(field).is_some() {
            self.s.push_str(itoa::Buffer::new().format(value));
        }
    }
}

/// How a field's value is written after its key.
#[derive(Clone, Copy)]
enum Key {
    Json,
    Message,
    Text,
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field).is_some() {
            self.s.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let key = self.key(field);
        // JSON has no NaN or infinity: those are written as strings.
        match key {
            None => {}
            Some(Key::Json) if !value.is_finite() => {
                let _ = write!(self.s, "\"{value}\"");
            }
            Some(_) => {
                let _ = write!(self.s, "{value}");
            }
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        with_string(&SCRATCH, |text| {
            let _ = write!(text, "{value}");
            self.text(field, text);
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match self.key(field) {
            None => {}
            Some(Key::Json) => with_string(&SCRATCH, |text| {
                let _ = write!(text, "{value:?}");
                json_debug(self.s, text);
            }),
            // tracing's text: `Debug` and `Display` values as they are.
            Some(Key::Message | Key::Text) => {
                let _ = write!(self.s, "{value:?}");
            }
        }
    }
}

/// A `Debug` text in JSON: as the array it is (a JSON array, or a list of bare words), else
/// as a string.
fn json_debug(s: &mut String, text: &str) {
    if !text.starts_with('[') {
        return json_string(s, text);
    }
    if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
        return s.push_str(text);
    }
    match bare_list(text) {
        Some(items) => {
            s.push('[');
            for (i, item) in items.enumerate() {
                if i > 0 {
                    s.push(',');
                }
                json_string(s, item);
            }
            s.push(']');
        }
        None => json_string(s, text),
    }
}

/// The items of a `Debug` list of bare words (`[10.0.0.1:3000, 10.0.0.2:3000]`: a list of
/// values whose `Debug` is unquoted, such as authorities), or `None` when the text holds
/// anything nested or quoted.
fn bare_list(text: &str) -> Option<impl Iterator<Item = &str>> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    if inner.contains(['[', ']', '{', '}', '(', ')', '"', '\\']) {
        return None;
    }
    Some(inner.split(", "))
}

/// Whether a byte must be escaped in a JSON string (RFC 8259 §7).
fn escaped(b: u8) -> bool {
    b == b'"' || b == b'\\' || b < 0x20
}

/// Appends `v` as a JSON string.
fn json_string(s: &mut String, v: &str) {
    s.push('"');
    let mut rest = v;
    while let Some(i) = rest.bytes().position(escaped) {
        s.push_str(&rest[..i]);
        match rest.as_bytes()[i] {
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            b'\t' => s.push_str("\\t"),
            c => {
                let _ = write!(s, "\\u{c:04x}");
            }
        }
        // The byte was ASCII: `i + 1` is a character boundary.
        rest = &rest[i + 1..];
    }
    s.push_str(rest);
    s.push('"');
}

/// Appends a text value for logfmt: as it is, or quoted when it must be.
fn logfmt_value(s: &mut String, v: &str) {
    let plain = !v.is_empty() && !v.bytes().any(|b| escaped(b) || b == b' ' || b == b'=');
    if plain {
        s.push_str(v);
    } else {
        json_string(s, v);
    }
}

/// Appends the current UTC time, RFC 3339 with microseconds (`2025-06-01T10:00:00.123456Z`).
fn timestamp(s: &mut String) {
    let now = crate::clock::since_epoch(SystemTime::now());
    let secs = now.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = date_time(secs);
        SECOND.set((secs, text));
    }
    // Digits, dashes, colons and a `T`: ASCII.
    s.push_str(std::str::from_utf8(&text).unwrap_or("0000-00-00T00:00:00"));
    s.push('.');
    let micros = now.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut n = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    s.push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
    s.push('Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the UNIX epoch, UTC (Howard Hinnant's
/// `civil_from_days`; years 1970 to 9999).
fn date_time(secs: u64) -> [u8; 19] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (yoe + era * 400 + i64::from(month <= 2)).clamp(0, 9999);
    let mut out = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, rem / 3_600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::{Buffer, dispatch};
    use super::date_time;
    use crate::config::{Log, LogFormat};

    fn lines(buffer: &Buffer) -> Vec<Value> {
        let text = buffer.text();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn log(format: LogFormat) -> (tracing::Dispatch, Buffer) {
        super::super::register_bystander();
        let buffer = Buffer::default();
        let cfg = Log {
            format,
            level: "trace".into(),
            access: true,
        };
        (dispatch(&cfg, buffer.clone(), false), buffer)
    }

    fn json_log() -> (tracing::Dispatch, Buffer) {
        log(LogFormat::Json)
    }

    /// A warning from fred, as the `log` crate hands it to `tracing-log`.
    fn fred_warning() {
        tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("reconnecting in {} ms", 250))
                .level(log::Level::Warn)
                .target("fred::router::commands")
                .module_path_static(Some("fred::router::commands"))
                .file_static(Some("src/router/commands.rs"))
                .line(Some(42))
                .build(),
        )
        .expect("test");
    }

    #[test]
    fn every_line_is_one_flat_object_with_arrays_as_arrays() {
        let (d, buffer) = json_log();
        tracing::dispatcher::with_default(&d, || {
            let tags = vec!["a".to_owned(), "b \"quoted\"".to_owned()];
            let ports = [1u16, 2];
            let replicas: Vec<http::uri::Authority> = vec!["10.0.0.1:3000".parse().expect("test")];
            let error = std::io::Error::other("no\nway");
            tracing::warn!(
                tags = ?tags, ports = ?ports, replicas = ?replicas, none = ?Vec::<u8>::new(), n = 3u64, ok = true, ratio = 0.5, grace = ?std::time::Duration::from_secs(1),
                addr = %"127.0.0.1:80", error = &error as &dyn std::error::Error, target = "shadow",
                "hello {}", "world"
            );
        });
        let got = lines(&buffer);
        assert_eq!(got.len(), 1);
        let line = got[0].as_object().expect("test");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], "isrgate::logging::format::tests");
        assert_eq!(line["field.target"], "shadow");
        assert_eq!(line["message"], "hello world");
        assert_eq!(line["tags"], json!(["a", "b \"quoted\""]));
        assert_eq!(line["ports"], json!([1, 2]));
        assert_eq!(line["replicas"], json!(["10.0.0.1:3000"]));
        assert_eq!(line["none"], json!([]));
        assert_eq!(line["n"], 3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["grace"], "1s");
        assert_eq!(line["addr"], "127.0.0.1:80");
        assert_eq!(line["error"], "no\nway");
        assert!(line["timestamp"].as_str().expect("test").ends_with('Z'));
        assert!(line.values().all(|v| !v.is_object()), "nested: {line:?}");
    }

    #[test]
    fn log_crate_records_have_the_same_shape() {
        let (d, buffer) = json_log();
        tracing::dispatcher::with_default(&d, fred_warning);
        let got = lines(&buffer);
        assert_eq!(
            got,
            [json!({
                "timestamp": got[0]["timestamp"],
                "level": "WARN",
                "target": "fred::router::commands",
                "message": "reconnecting in 250 ms",
            })]
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        let (d, buffer) = json_log();
        tracing::dispatcher::with_default(&d, || {
            tracing::info!(path = "/a\u{1}b\\", "tab\there");
        });
        let line = &lines(&buffer)[0];
        assert_eq!(line["path"], "/a\u{1}b\\");
        assert_eq!(line["message"], "tab\there");
    }

    #[test]
    fn text_lines_have_the_message_first_then_logfmt_values() {
        let (d, buffer) = log(LogFormat::Pretty);
        tracing::dispatcher::with_default(&d, || {
            tracing::info!(
                method = "GET", status = 200u64, cache_status = "isrgate; hit", empty = "",
                tags = ?["a"], peer = %"10.0.0.1:80", "served {}", 1
            );
            fred_warning();
        });
        let text = buffer.text();
        let lines: Vec<&str> = text.lines().collect();
        let (stamp, rest) = lines[0].split_at(27);
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
        assert_eq!(
            rest,
            "  INFO isrgate::logging::format::tests: served 1 method=GET status=200 cache_status=\"isrgate; hit\" empty=\"\" tags=[\"a\"] peer=10.0.0.1:80"
        );
        assert_eq!(
            &lines[1][27..],
            "  WARN fred::router::commands: reconnecting in 250 ms"
        );
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        let text = |secs| String::from_utf8(date_time(secs).to_vec()).expect("ascii");
        assert_eq!(text(0), "1970-01-01T00:00:00");
        assert_eq!(text(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(text(1_735_689_599), "2024-12-31T23:59:59");
        assert_eq!(text(4_102_444_800), "2100-01-01T00:00:00");
        // Against the formatter tracing-subscriber ships, for the clock's current second.
        let now = std::time::SystemTime::now();
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let mut theirs = String::new();
        let mut w = tracing_subscriber::fmt::format::Writer::new(&mut theirs);
        tracing_subscriber::fmt::time::FormatTime::format_time(
            &tracing_subscriber::fmt::time::SystemTime,
            &mut w,
        )
        .expect("format");
        let ours = text(secs);
        // The same second, or the next one if the clock ticked between the two reads.
        assert!(
            theirs.starts_with(&ours) || theirs.starts_with(&text(secs + 1)),
            "{theirs} vs {ours}"
        );
    }
}
