//! Logging: the subscriber every line goes through, its formats, its output, and the access
//! log.
//!
//! - [`dispatch`]: `[log]` → a `tracing` subscriber: the `log.level` filter (plus the access
//!   log's target at `info`, whatever the level: like nginx's `access_log` and `error_log`, the
//!   two are set apart), and the format: one flat shape, in text or JSON ([`format::Flat`]).
//! - [`init`]: the process's logging (the binary): that subscriber as the global one, writing
//!   to stderr through [`writer::NonBlocking`], and `log`-crate records (fred, rustls) bridged
//!   into it (`tracing-log`), so they have the same shape as everything else.
//! - [`access`]: one line per request, on its own target (`isrgate::access`).
//!
//! Nothing here decides what a request does; a line that is not written costs a level check.

pub mod access;
pub mod format;
pub mod tail;
pub mod writer;

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use tracing::Dispatch;
use tracing_log::AsLog as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::reload;

use crate::config::{Log, LogFormat};

/// The filter of `cfg`: `log.level`, and the access log's target at `info` unless the level
/// names that target itself. The access log is switched by `log.access` ([`access::AccessLog`]),
/// not here, so a reload can switch it.
pub fn filter(cfg: &Log) -> EnvFilter {
    let mut directives = cfg.level.clone();
    if !directives.contains(access::TARGET) {
        if !directives.trim().is_empty() {
            directives.push(',');
        }
        directives.push_str(access::TARGET);
        directives.push_str("=info");
    }
    EnvFilter::builder()
        .parse(&directives)
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// A subscriber for `cfg`, writing to `writer` (`ansi`: colours, for a terminal, text only).
pub fn dispatch<W>(cfg: &Log, writer: W, ansi: bool) -> Dispatch
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    dispatch_with_level(cfg, writer, ansi).0
}

/// The handle that changes a subscriber's `log.level` while it runs ([`set_level`]).
type LevelHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The global subscriber's level handle, once [`init`] installed it.
static LEVEL: std::sync::OnceLock<LevelHandle> = std::sync::OnceLock::new();

/// [`dispatch`], and the handle that changes its level.
fn dispatch_with_level<W>(cfg: &Log, writer: W, ansi: bool) -> (Dispatch, LevelHandle)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let format = match cfg.format {
        LogFormat::Json => format::Flat::json(),
        LogFormat::Pretty => format::Flat::text(ansi),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .event_format(format);
    let (filter, level) = reload::Layer::new(filter(cfg));
    let subscriber = tracing_subscriber::registry().with(filter).with(layer);
    (Dispatch::new(subscriber), level)
}

/// Applies `cfg.level` to the process's logging (a reload): `Ok(false)` when [`init`] did
/// not install it (an embedder's or a test's own subscriber stays as it is).
pub fn set_level(cfg: &Log) -> Result<bool, String> {
    let Some(level) = LEVEL.get() else {
        return Ok(false);
    };
    level.reload(filter(cfg)).map_err(|e| e.to_string())?;
    // The `log` crate's records (fred, rustls) are filtered by its own maximum first.
    tracing_log::log::set_max_level(tracing::level_filters::LevelFilter::current().as_log());
    Ok(true)
}

/// Keeps `tracing`'s per-callsite cache right while a subscriber is in use only in scopes
/// (`dispatcher::with_default`: a gateway's own access log, tests), by registering one more,
/// silent, subscriber for the life of the process. With exactly one subscriber registered,
/// tracing-core asks "whoever is the current thread's default" whether a new callsite is of
/// interest, so a callsite first reached on a thread outside the scope is cached as never
/// enabled, for every thread (the scoped access log then wrote nothing, now and then). With
/// two or more, it asks each of them. Not for the global subscriber: alone, its answers are
/// cached as they should be.
pub fn register_bystander() {
    static BYSTANDER: std::sync::OnceLock<Dispatch> = std::sync::OnceLock::new();
    BYSTANDER.get_or_init(|| Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

/// Installs the process's logging (see the module docs). The returned [`writer::Flusher`]
/// writes what is still buffered when dropped: hold it until the process exits.
pub fn init(cfg: &Log) -> Option<writer::Flusher> {
    let ansi = io::IsTerminal::is_terminal(&io::stderr());
    let ((d, level), flusher) = match writer::NonBlocking::new(io::stderr()) {
        Ok((w, flusher)) => (dispatch_with_level(cfg, w, ansi), Some(flusher)),
        Err(e) => {
            eprintln!("cannot start the log writer thread ({e}); logging synchronously");
            (dispatch_with_level(cfg, io::stderr, ansi), None)
        }
    };
    if tracing::dispatcher::set_global_default(d).is_ok() {
        let _ = LEVEL.set(level);
        // After the global default: its filter's most verbose level is the `log` crate's.
        let max = tracing::level_filters::LevelFilter::current().as_log();
        if let Err(e) = tracing_log::LogTracer::builder().with_max_level(max).init() {
            tracing::warn!(error = %e, "log-crate records are not bridged into the log");
        }
    }
    flusher
}

/// A log kept in memory (a [`MakeWriter`]): for tests and embedders that read their lines.
#[derive(Debug, Clone, Default)]
pub struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Buffer {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        let bytes = crate::sync::lock(&self.0);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for &Buffer {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        crate::sync::lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = &'a Buffer;

    fn make_writer(&'a self) -> &'a Buffer {
        self
    }
}
