//! Reading the layers (file, environment, flags) into a [`Raw`], remembering where every key was
//! set, and reporting all problems together.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, ValueDeserializer};

use super::env::{self, Environment};
use super::raw::{Raw, SetError};
use super::{Config, preview, validate};

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/isrgate.toml";

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Built-in default.
    Default,
    /// A line and column (1-based) of a file.
    File {
        /// The file.
        path: PathBuf,
        /// Line, 1-based.
        line: usize,
        /// Column, 1-based.
        column: usize,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("built-in default"),
            Source::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Source::Env(var) => write!(f, "env {var}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `section.key` (or `section` / the variable name when no key applies).
    pub key: String,
    /// Where it was set.
    pub source: Source,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.source, self.key, self.message)
    }
}

/// The configuration could not be loaded; every problem found is listed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// One or more keys are wrong.
    #[error("{}", format_problems(.0))]
    Invalid(Vec<Problem>),
}

fn format_problems(problems: &[Problem]) -> String {
    let mut out = format!(
        "invalid configuration ({} problem{}):",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

/// A value set by a command-line flag.
#[derive(Debug, Clone)]
pub struct Override {
    /// `section.key`.
    pub key: &'static str,
    /// The flag's name, for messages.
    pub flag: &'static str,
    /// The value.
    pub value: toml::Value,
}

/// The webhook's bearer secret (and HMAC key unless the next one is set).
pub const WEBHOOK_SECRET: &str = "ISRGATE_WEBHOOK_SECRET";
/// The webhook's HMAC key, when it differs from the bearer secret.
pub const WEBHOOK_HMAC_SECRET: &str = "ISRGATE_WEBHOOK_HMAC_SECRET";

/// The admin listener's token (dashboard, `/metrics`, `/api`).
pub const ADMIN_TOKEN: &str = "ISRGATE_ADMIN_TOKEN";

/// The build's `previewModeId`, for on-demand revalidation on background refreshes and re-warms;
/// wins over `upstream.prerender_manifest`.
pub const PREVIEW_MODE_ID: &str = "ISRGATE_PREVIEW_MODE_ID";

/// The key naming the build's prerender manifest, the other source of the `previewModeId`.
const PRERENDER_MANIFEST: &str = "upstream.prerender_manifest";

/// The secret sent to Next.js replicas with the fan-out call.
pub const REPLICA_SECRET: &str = "ISRGATE_REPLICA_SECRET";

/// Where each `section.key` was set, for messages.
pub(super) type Sources = BTreeMap<String, Source>;

/// Loads defaults, then `path` (or [`DEFAULT_CONFIG_PATH`] when it exists), then environment
/// overrides, then `flags`, and validates. Returns the config and the file actually read.
pub fn load(
    path: Option<&Path>,
    env: &dyn Environment,
    flags: &[Override],
) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let file = match path {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.is_file()),
    };
    let mut layers = Layers::default();
    if let Some(file) = &file {
        let text = std::fs::read_to_string(file).map_err(|error| ConfigError::Read {
            path: file.clone(),
            error,
        })?;
        layers.file(file, &text);
    }
    layers.env(env);
    layers.flags(flags);
    let manifest_source = layers
        .sources
        .get(PRERENDER_MANIFEST)
        .cloned()
        .unwrap_or(Source::Default);
    let mut config = layers.finish()?;
    let problems = secrets(&mut config, env, manifest_source);
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }
    Ok((config, file))
}

/// Puts the secrets from their own variables into `config` (the preview mode id from the
/// prerender manifest when its variable is unset); returns what is wrong with them.
fn secrets(config: &mut Config, env: &dyn Environment, manifest_source: Source) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(bearer) = env.secret(WEBHOOK_SECRET) {
        let hmac = env
            .secret(WEBHOOK_HMAC_SECRET)
            .unwrap_or_else(|| bearer.clone());
        config.webhook.secrets = Some(crate::invalidate::webhook::Secrets { bearer, hmac });
    }
    if let (Some(admin), Some(token)) = (config.admin.as_mut(), env.secret(ADMIN_TOKEN)) {
        admin.token = Some(token);
    }
    let manifest = config.upstream.prerender_manifest.as_deref();
    match preview_mode_id(env, manifest, manifest_source) {
        Ok(id) => config.webhook.preview_mode_id = id,
        Err(problem) => problems.push(problem),
    }
    match sensitive_header(env, REPLICA_SECRET) {
        Ok(secret) => config.webhook.fanout.secret = secret,
        Err(problem) => problems.push(problem),
    }
    problems
}

/// `ISRGATE_PREVIEW_MODE_ID`, else the id in the build's prerender manifest, else none.
fn preview_mode_id(
    env: &dyn Environment,
    manifest: Option<&Path>,
    manifest_source: Source,
) -> Result<Option<http::HeaderValue>, Problem> {
    match (sensitive_header(env, PREVIEW_MODE_ID)?, manifest) {
        (Some(id), _) => Ok(Some(id)),
        (None, None) => Ok(None),
        (None, Some(path)) => match preview::read_preview_mode_id(path) {
            Ok(id) => Ok(Some(id)),
            Err(e) => Err(Problem {
                key: PRERENDER_MANIFEST.into(),
                source: manifest_source,
                message: format!(
                    "{:?} {e}; point {PRERENDER_MANIFEST} at <build>/.next/prerender-manifest.json",
                    path.display().to_string()
                ),
            }),
        },
    }
}

/// A secret variable as a header value, marked sensitive so `Debug` never prints it.
fn sensitive_header(
    env: &dyn Environment,
    name: &str,
) -> Result<Option<http::HeaderValue>, Problem> {
    let Some(text) = env.secret(name) else {
        return Ok(None);
    };
    let mut value = http::HeaderValue::from_str(&text).map_err(|_| Problem {
        source: Source::Env(name.into()),
        key: name.into(),
        message: "is not a valid header value (printable ASCII)".into(),
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// Parses configuration text alone (no environment, no flags): for tests and `check-config`
/// of snippets.
pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
    let mut layers = Layers::default();
    layers.file(Path::new("<inline>"), text);
    layers.finish()
}

#[derive(Default)]
struct Layers {
    raw: Raw,
    sources: Sources,
    problems: Vec<Problem>,
}

impl Layers {
    /// Validates what was read; problems of reading and of validation are reported together
    /// (a key that failed to read keeps its default, so it adds no second problem).
    fn finish(mut self) -> Result<Config, ConfigError> {
        match validate::validate(&self.raw, &self.sources) {
            Ok(config) if self.problems.is_empty() => Ok(config),
            Ok(_) => Err(ConfigError::Invalid(self.problems)),
            Err(more) => {
                self.problems.extend(more);
                Err(ConfigError::Invalid(self.problems))
            }
        }
    }

    fn file(&mut self, path: &Path, text: &str) {
        let at = |offset: usize| {
            let (line, column) = line_column(text, offset);
            Source::File {
                path: path.to_path_buf(),
                line,
                column,
            }
        };
        let (root, errors) = DeTable::parse_recoverable(text);
        for e in &errors {
            let offset = e.span().map_or(0, |s| s.start);
            self.problems.push(Problem {
                key: "(syntax)".into(),
                source: at(offset),
                message: e.message().trim().to_owned(),
            });
        }
        if !errors.is_empty() {
            return;
        }
        for (section, value) in root.into_inner() {
            let section_at = at(section.span().start);
            let section = section.into_inner();
            if !Raw::SECTIONS.contains(&section.as_ref()) {
                self.record(&section, "", section_at, Err(SetError::UnknownSection));
                continue;
            }
            if section == "routes" {
                // `[[routes]]`: an array of tables, kept in file order; each one's problems
                // under its own name (`routes[2]`).
                let toml::de::DeValue::Array(items) = value.into_inner() else {
                    self.problems.push(Problem {
                        key: "routes".into(),
                        source: section_at,
                        message: "write each route as a [[routes]] table".into(),
                    });
                    continue;
                };
                for (i, item) in items.into_iter().enumerate() {
                    let start = item.span().start;
                    let result = <crate::config::raw::RouteRaw as serde::Deserialize>::deserialize(
                        ValueDeserializer::from(item),
                    )
                    .map(|r| self.raw.routes.push(r))
                    .map_err(SetError::Invalid);
                    let source = match &result {
                        Err(SetError::Invalid(e)) => at(e.span().map_or(start, |s| s.start)),
                        _ => at(start),
                    };
                    if result.is_ok() {
                        // Where the validation's problems with this route point.
                        for key in crate::config::raw::RouteRaw::KEYS {
                            self.sources
                                .insert(format!("routes[{i}].{key}"), source.clone());
                        }
                    }
                    self.record(&format!("routes[{i}]"), "", source, result);
                }
                continue;
            }
            let span = value.span();
            let toml::de::DeValue::Table(table) = value.into_inner() else {
                self.problems.push(Problem {
                    key: section.to_string(),
                    source: at(span.start),
                    message: format!(
                        "top-level keys must be sections; put it under one of [{}]",
                        Raw::SECTIONS.join("], [")
                    ),
                });
                continue;
            };
            for (key, value) in table {
                let key_at = at(key.span().start);
                let value_start = value.span().start;
                let result = self
                    .raw
                    .set(&section, key.get_ref(), ValueDeserializer::from(value));
                let source = match &result {
                    Err(SetError::Invalid(e)) => at(e.span().map_or(value_start, |s| s.start)),
                    Err(SetError::UnknownSection) => section_at.clone(),
                    _ => key_at,
                };
                self.record(&section, key.get_ref(), source, result);
            }
        }
        // The parsed table is ordered by key name; report in the order of the file.
        self.problems.sort_by_key(|p| match &p.source {
            Source::File { line, column, .. } => (*line, *column),
            _ => (0, 0),
        });
    }

    fn env(&mut self, env: &dyn Environment) {
        for (name, value) in env.overrides() {
            let Some((section, key)) = env::split_name(&name) else {
                self.problems.push(Problem {
                    key: name.clone(),
                    source: Source::Env(name),
                    message: "not a configuration variable; the form is ISRGATE__SECTION__KEY \
                              (two underscores around the section)"
                        .into(),
                });
                continue;
            };
            // A value that is valid TOML (a number, a bool, a quoted string, an array) is taken
            // as such; if that does not fit the key, the raw text is taken as a string.
            let result = match ValueDeserializer::parse(&value) {
                Ok(parsed) => match self.raw.set(&section, &key, parsed) {
                    Err(SetError::Invalid(first)) => {
                        let quoted = toml::Value::String(value.clone()).to_string();
                        match ValueDeserializer::parse(&quoted) {
                            Ok(as_string) => self
                                .raw
                                .set(&section, &key, as_string)
                                .map_err(|_| SetError::Invalid(first)),
                            Err(_) => Err(SetError::Invalid(first)),
                        }
                    }
                    other => other,
                },
                Err(_) => {
                    let quoted = toml::Value::String(value.clone()).to_string();
                    match ValueDeserializer::parse(&quoted) {
                        Ok(v) => self.raw.set(&section, &key, v),
                        Err(e) => Err(SetError::Invalid(e)),
                    }
                }
            };
            self.record(&section, &key, Source::Env(name), result);
        }
    }

    fn flags(&mut self, flags: &[Override]) {
        for o in flags {
            let (section, key) = o.key.split_once('.').unwrap_or((o.key, ""));
            let text = o.value.to_string();
            let result = match ValueDeserializer::parse(&text) {
                Ok(v) => self.raw.set(section, key, v),
                Err(e) => Err(SetError::Invalid(e)),
            };
            self.record(section, key, Source::Flag(o.flag), result);
        }
    }

    fn record(&mut self, section: &str, key: &str, source: Source, result: Result<(), SetError>) {
        let full = if key.is_empty() {
            section.to_owned()
        } else {
            format!("{section}.{key}")
        };
        let message = match result {
            Ok(()) => {
                self.sources.insert(full, source);
                return;
            }
            Err(SetError::UnknownSection) => {
                self.problems.push(Problem {
                    key: section.to_owned(),
                    source,
                    message: format!(
                        "unknown section{}; sections are [{}]",
                        did_you_mean(section, Raw::SECTIONS),
                        Raw::SECTIONS.join("], [")
                    ),
                });
                return;
            }
            Err(SetError::UnknownKey) => format!(
                "unknown key{}; keys of [{section}] are {}",
                did_you_mean(key, Raw::keys(section)),
                Raw::keys(section).join(", ")
            ),
            Err(SetError::Invalid(e)) => e.message().trim().to_owned(),
        };
        self.problems.push(Problem {
            key: full,
            source,
            message,
        });
    }
}

fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 3.max(c.len() / 3))
        .min()
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MapEnv;

    fn problems(text: &str) -> Vec<Problem> {
        match from_toml(text) {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn reports_every_problem_with_position() {
        let p = problems(
            "[listen]\naddr = \"nope\"\nmax_body_bytes = \"ten\"\nadr = 1\n[upstrem]\nx = 1\n",
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "listen.max_body_bytes",
                "listen.adr",
                "upstrem",
                "listen.addr"
            ],
            "{p:#?}"
        );
        assert!(p[1].message.contains("did you mean `addr`"), "{}", p[1]);
        assert!(p[2].message.contains("did you mean `upstream`"), "{}", p[2]);
        assert_eq!(p[0].source.to_string(), "<inline>:3:18");
        assert_eq!(p[1].source.to_string(), "<inline>:4:1");
        assert_eq!(p[3].source.to_string(), "<inline>:2:1");
        assert!(p[3].message.contains("HOST:PORT"), "{}", p[3]);
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let p = problems("[listen]\naddr = \n");
        assert_eq!(p[0].key, "(syntax)");
        assert!(
            p[0].source.to_string().starts_with("<inline>:2:"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let env = MapEnv(
            [
                (
                    "ISRGATE__LISTEN__ADDR".to_string(),
                    "127.0.0.1:1".to_string(),
                ),
                (
                    "ISRGATE__UPSTREAM__REPLICAS".to_string(),
                    "http://a:1, http://b:2".to_string(),
                ),
                ("ISRGATE__LOG__LEVEL".to_string(), "debug".to_string()),
                (
                    "ISRGATE__LISTEN__MAX_BODY_BYTES".to_string(),
                    "5".to_string(),
                ),
            ]
            .into(),
        );
        let flags = [Override {
            key: "listen.addr",
            flag: "--listen",
            value: toml::Value::String("127.0.0.1:2".into()),
        }];
        let (c, _) = load(Some(Path::new("/dev/null")), &env, &flags).expect("valid");
        assert_eq!(c.listen.addr.port(), 2);
        assert_eq!(c.listen.max_body_bytes, 5);
        assert_eq!(c.upstream.replicas.len(), 2);
        assert_eq!(c.log.level, "debug");
    }

    #[test]
    fn bad_env_names_the_variable() {
        let env = MapEnv(
            [
                ("ISRGATE__LISTEN__NOPE".to_string(), "1".to_string()),
                ("ISRGATE__HEALTH__INTERVAL".to_string(), "soon".to_string()),
            ]
            .into(),
        );
        let Err(ConfigError::Invalid(p)) = load(Some(Path::new("/dev/null")), &env, &[]) else {
            panic!("expected problems")
        };
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(p.len(), 2, "{text:#?}");
        assert!(text[0].starts_with("env ISRGATE__LISTEN__NOPE: listen.nope: unknown key"));
        assert!(
            text[1].starts_with("env ISRGATE__HEALTH__INTERVAL: health.interval:"),
            "{}",
            text[1]
        );
    }

    #[test]
    fn line_column_counts_chars() {
        assert_eq!(line_column("ab\ncé d", 7), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
