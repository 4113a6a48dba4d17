//! `log.format = "json"`: every event as one flat JSON object on one line, whoever emitted it
//! (isrgate, hyper, or a `log`-crate library such as fred, bridged by `tracing-log`):
//!
//! ```text
//! {"timestamp":"2025-06-01T10:00:00.123456Z","level":"WARN","target":"fred::router","message":"…"}
//! ```
//!
//! `timestamp`, `level` and `target` first, then the event's fields at the top level, with
//! their JSON types (numbers, booleans, strings), `message` among them. tracing-subscriber's
//! own JSON formatter, even with `flatten_event(true)`, writes a field recorded with `?` (every
//! list: `tags = ?tags`) as the string of its `Debug` text; here a `Debug` text that is a JSON
//! array (`["a", "b"]`, `[1, 2]`) is written as that array, so every existing `?list` field is
//! an array without changing its call site (`valuable` would need `--cfg tracing_unstable`).
//! A log record's own metadata (`log.target`, `log.file`…) becomes the line's `target`, not
//! fields of its own; spans are not written (isrgate opens none). A field named like one of
//! the three leading keys gets a `field.` prefix, so no key is ever written twice.
//!
//! It must not allocate per line beyond the subscriber's reused buffer (a `Debug` value is
//! formatted into a reused per-thread scratch string).

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The flat JSON event format (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
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
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        w.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut w)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_str("\",\"target\":")?;
        string(&mut w, meta.target())?;
        let mut fields = Fields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// Writes `,"name":` and then the value, unless the field is a log record's metadata.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        self.result = (|| {
            self.w.write_str(",\"")?;
            if matches!(name, "timestamp" | "level" | "target") {
                self.w.write_str("field.")?;
            }
            self.w.write_str(name)?;
            self.w.write_str("\":")?;
            value(self.w)
        })();
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |w| string(w, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.field(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: those are written as strings.
        self.field(field, |w| {
            if value.is_finite() {
                write!(w, "{value}")
            } else {
                write!(w, "\"{value}\"")
            }
        });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, |w| {
            w.write_char('"')?;
            write!(Escape(w), "{value}")?;
            w.write_char('"')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| debug(w, value));
    }
}

thread_local! {
    /// Where a `Debug` value is formatted before it is written (kept per thread, so a line
    /// allocates nothing once the thread has logged its longest value).
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A `Debug` value: its text as a JSON array when it is one, else as a string.
fn debug(w: &mut Writer<'_>, value: &dyn fmt::Debug) -> fmt::Result {
    SCRATCH.with(|scratch| {
        // A value whose `Debug` logs (re-entry) gets a scratch of its own.
        let mut own = String::new();
        let mut borrowed = scratch.try_borrow_mut();
        let text = match &mut borrowed {
            Ok(s) => &mut **s,
            Err(_) => &mut own,
        };
        text.clear();
        write!(text, "{value:?}")?;
        if !text.starts_with('[') {
            return string(w, text);
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            return w.write_str(text);
        }
        match bare_list(text) {
            Some(items) => {
                w.write_char('[')?;
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        w.write_char(',')?;
                    }
                    string(w, item)?;
                }
                w.write_char(']')
            }
            None => string(w, text),
        }
    })
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

/// Writes `s` as a JSON string.
fn string(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escape(&mut *w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string (RFC 8259 §7).
struct Escape<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escape<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') {
            self.0.write_str(&rest[..i])?;
            let c = rest.as_bytes()[i];
            match c {
                b'"' => self.0.write_str("\\\"")?,
                b'\\' => self.0.write_str("\\\\")?,
                b'\n' => self.0.write_str("\\n")?,
                b'\r' => self.0.write_str("\\r")?,
                b'\t' => self.0.write_str("\\t")?,
                _ => write!(self.0, "\\u{c:04x}")?,
            }
            rest = &rest[i + 1..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::{Buffer, dispatch};
    use crate::config::{Log, LogFormat};

    fn lines(buffer: &Buffer) -> Vec<Value> {
        let text = buffer.text();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    fn json_log() -> (tracing::Dispatch, Buffer) {
        super::super::register_bystander();
        let buffer = Buffer::default();
        let cfg = Log {
            format: LogFormat::Json,
            level: "trace".into(),
            access: true,
        };
        (dispatch(&cfg, buffer.clone(), false), buffer)
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
        assert_eq!(line["target"], "isrgate::logging::json::tests");
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
        tracing::dispatcher::with_default(&d, || {
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
        });
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
}
