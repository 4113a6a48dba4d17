//! The build's `previewModeId`, read from the Next.js build itself (`upstream.prerender_manifest`)
//! when `ISRGATE_PREVIEW_MODE_ID` is not set. [`load`](super::load) calls it once, after
//! validation; it hands back the id as a sensitive header value for
//! [`Webhook::preview_mode_id`](super::Webhook::preview_mode_id).
//!
//! Two shapes are accepted: `.next/prerender-manifest.json` (Next 13–16:
//! `{"version":4,"routes":{…},"preview":{"previewModeId":"<32 hex>",…}}`) and, on Next 16,
//! `.next/server/preview-props.json` (`{"previewModeId":"…",…}`). The id is a secret (it
//! unlocks on-demand revalidation and draft mode): no message here ever contains it.

use std::path::Path;

use http::HeaderValue;
use serde_json::Value;

/// Longest accepted id, in characters (Next writes 32 hex characters).
pub const MAX_PREVIEW_MODE_ID_CHARS: usize = 256;

/// Why a manifest gave no usable `previewModeId`. The messages name the problem, never the id.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot be read ({0})")]
    Read(#[source] std::io::Error),
    /// The file is not JSON.
    #[error("is not JSON ({0})")]
    NotJson(#[source] serde_json::Error),
    /// Neither a top-level `previewModeId` string nor `preview.previewModeId`.
    #[error("has no previewModeId string (neither top-level nor under \"preview\")")]
    NoId,
    /// The id is there but cannot be sent as a header.
    #[error("has a previewModeId that {0}")]
    Invalid(&'static str),
}

/// Reads `path` (a prerender manifest or `preview-props.json`) and returns its
/// `previewModeId`, marked sensitive.
pub fn read_preview_mode_id(path: &Path) -> Result<HeaderValue, ManifestError> {
    let bytes = std::fs::read(path).map_err(ManifestError::Read)?;
    parse_preview_mode_id(&bytes)
}

/// The id in a manifest's bytes: a top-level `previewModeId` string wins over
/// `preview.previewModeId`.
fn parse_preview_mode_id(bytes: &[u8]) -> Result<HeaderValue, ManifestError> {
    // A syntax error reports a line and column, never the text around it.
    let json: Value = serde_json::from_slice(bytes).map_err(ManifestError::NotJson)?;
    let id = json
        .get("previewModeId")
        .and_then(Value::as_str)
        .or_else(|| {
            json.pointer("/preview/previewModeId")
                .and_then(Value::as_str)
        })
        .ok_or(ManifestError::NoId)?;
    preview_mode_id_value(id)
}

/// `id` as the header value sent upstream, marked sensitive (so it is never printed), or why
/// it cannot be one. Also for the ids `@isrgate/next` reports (`crate::builds`).
pub fn preview_mode_id_value(id: &str) -> Result<HeaderValue, ManifestError> {
    if id.trim().is_empty() {
        return Err(ManifestError::Invalid("is empty"));
    }
    if id.chars().count() > MAX_PREVIEW_MODE_ID_CHARS {
        return Err(ManifestError::Invalid("is longer than 256 characters"));
    }
    let mut value = HeaderValue::from_str(id)
        .map_err(|_| ManifestError::Invalid("is not a valid header value (printable ASCII)"))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::{ConfigError, MapEnv, load};

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn manifest(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".json")
            .tempfile()
            .expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    fn config_pointing_at(path: &Path) -> tempfile::NamedTempFile {
        let text = format!(
            "[upstream]\nprerender_manifest = {}\n",
            toml::Value::String(path.display().to_string())
        );
        manifest(&text)
    }

    fn env(vars: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn reads_the_prerender_manifest_shape() {
        let f = manifest(&format!(
            r#"{{"version":4,"routes":{{"/":{{"initialRevalidateSeconds":60}}}},"dynamicRoutes":{{}},
               "notFoundRoutes":[],"preview":{{"previewModeId":"{ID}",
               "previewModeSigningKey":"k","previewModeEncryptionKey":"e"}}}}"#
        ));
        let id = read_preview_mode_id(f.path()).expect("id");
        assert_eq!(id, ID);
        assert!(id.is_sensitive());
        assert!(!format!("{id:?}").contains(ID), "{id:?}");
    }

    #[test]
    fn reads_the_preview_props_shape_and_prefers_top_level() {
        let f = manifest(&format!(
            r#"{{"previewModeId":"{ID}","previewModeSigningKey":"k"}}"#
        ));
        assert_eq!(read_preview_mode_id(f.path()).expect("id"), ID);
        let both = format!(r#"{{"previewModeId":"{ID}","preview":{{"previewModeId":"other"}}}}"#);
        assert_eq!(parse_preview_mode_id(both.as_bytes()).expect("id"), ID);
        // A top-level key that is not a string falls back to the manifest shape.
        let odd = format!(r#"{{"previewModeId":7,"preview":{{"previewModeId":"{ID}"}}}}"#);
        assert_eq!(parse_preview_mode_id(odd.as_bytes()).expect("id"), ID);
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let dir = tempfile::tempdir().expect("dir");
        let err =
            read_preview_mode_id(&dir.path().join("prerender-manifest.json")).expect_err("missing");
        assert!(matches!(err, ManifestError::Read(_)), "{err:?}");
    }

    #[test]
    fn bad_json_is_not_json_and_does_not_echo_the_text() {
        let err = parse_preview_mode_id(format!(r#"{{"previewModeId":"{ID}""#).as_bytes())
            .expect_err("truncated");
        assert!(matches!(err, ManifestError::NotJson(_)), "{err:?}");
        assert!(!err.to_string().contains(ID), "{err}");
    }

    #[test]
    fn missing_or_unusable_id_is_refused_without_echoing_it() {
        for text in [
            r#"{"version":4,"routes":{}}"#,
            r#"{"preview":{"previewModeSigningKey":"k"}}"#,
            r#"{"preview":{"previewModeId":null}}"#,
            "[]",
        ] {
            let err = parse_preview_mode_id(text.as_bytes()).expect_err(text);
            assert!(matches!(err, ManifestError::NoId), "{text}: {err:?}");
        }
        let long = "a".repeat(MAX_PREVIEW_MODE_ID_CHARS + 1);
        for id in ["", "  ", "line\nbreak", long.as_str()] {
            let text = serde_json::json!({ "previewModeId": id }).to_string();
            let err = parse_preview_mode_id(text.as_bytes()).expect_err(id);
            assert!(matches!(err, ManifestError::Invalid(_)), "{err:?}");
            assert!(
                id.trim().is_empty() || !err.to_string().contains(id),
                "{err}"
            );
        }
        let longest = "a".repeat(MAX_PREVIEW_MODE_ID_CHARS);
        let text = serde_json::json!({ "previewModeId": longest }).to_string();
        assert!(parse_preview_mode_id(text.as_bytes()).is_ok());
    }

    #[test]
    fn load_takes_the_id_from_the_manifest_and_hides_it() {
        let m = manifest(&format!(r#"{{"preview":{{"previewModeId":"{ID}"}}}}"#));
        let file = config_pointing_at(m.path());
        let (config, _) = load(Some(file.path()), &env(&[]), &[]).expect("valid");
        let id = config.webhook.preview_mode_id.as_ref().expect("id");
        assert_eq!(id, ID);
        assert!(id.is_sensitive());
        assert!(!format!("{config:?}").contains(ID));
    }

    #[test]
    fn the_environment_wins_over_the_manifest() {
        // The manifest is not even read: a missing one is no error.
        let file = config_pointing_at(Path::new("/nonexistent/.next/prerender-manifest.json"));
        let vars = env(&[("ISRGATE_PREVIEW_MODE_ID", "from-env")]);
        let (config, _) = load(Some(file.path()), &vars, &[]).expect("valid");
        assert_eq!(config.webhook.preview_mode_id.expect("id"), "from-env");
    }

    #[test]
    fn a_bad_manifest_is_a_problem_of_the_key_with_its_source_and_fix() {
        let missing = PathBuf::from("/nonexistent/.next/prerender-manifest.json");
        let file = config_pointing_at(&missing);
        let Err(ConfigError::Invalid(p)) = load(Some(file.path()), &env(&[]), &[]) else {
            panic!("expected problems")
        };
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].key, "upstream.prerender_manifest");
        let text = p[0].to_string();
        assert!(
            text.starts_with(&format!("{}:2:1: ", file.path().display())),
            "{text}"
        );
        assert!(
            text.contains("/nonexistent/.next/prerender-manifest.json"),
            "{text}"
        );
        assert!(
            text.contains(
                "point upstream.prerender_manifest at <build>/.next/prerender-manifest.json"
            ),
            "{text}"
        );

        let m = manifest(r#"{"version":4}"#);
        let var = "ISRGATE__UPSTREAM__PRERENDER_MANIFEST";
        let vars = env(&[(var, &m.path().display().to_string())]);
        let Err(ConfigError::Invalid(p)) = load(Some(Path::new("/dev/null")), &vars, &[]) else {
            panic!("expected problems")
        };
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].to_string()
                .starts_with(&format!("env {var}: upstream.prerender_manifest: ")),
            "{}",
            p[0]
        );
    }
}
