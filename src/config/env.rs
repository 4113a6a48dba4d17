//! Environment overrides: `ISRGATE__SECTION__KEY=value` sets `section.key`.
//!
//! The environment is read through the [`Environment`] trait so tests can hand in a map instead
//! of mutating the process environment (which is shared by every test thread).

use std::collections::BTreeMap;

/// Prefix of override variables; the section and key follow, separated by `__`.
pub const PREFIX: &str = "ISRGATE__";

/// Where override variables come from.
pub trait Environment {
    /// Every variable whose name starts with [`PREFIX`], as `(name, value)`.
    fn overrides(&self) -> Vec<(String, String)>;

    /// A secret given by its own variable (`ISRGATE_WEBHOOK_SECRET`…): secrets stay out of
    /// config files; an empty value counts as unset.
    fn secret(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn overrides(&self) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.into_string().ok()?;
                k.starts_with(PREFIX)
                    .then(|| (k, v.to_string_lossy().into_owned()))
            })
            .collect();
        vars.sort();
        vars
    }

    fn secret(&self, name: &str) -> Option<String> {
        // Trimmed: a secret mounted from a file often ends with a newline.
        std::env::var(name)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }
}

/// A fixed map, for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl Environment for MapEnv {
    fn overrides(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn secret(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }
}

/// Splits `ISRGATE__SECTION__KEY` into lower-case `(section, key)`; `None` when the name does not
/// have exactly that shape.
pub fn split_name(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (section, key) = rest.split_once("__")?;
    if section.is_empty() || key.is_empty() || key.contains("__") {
        return None;
    }
    Some((section.to_ascii_lowercase(), key.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_section_and_key() {
        assert_eq!(
            split_name("ISRGATE__LISTEN__MAX_BODY_BYTES"),
            Some(("listen".into(), "max_body_bytes".into()))
        );
        assert_eq!(split_name("ISRGATE__LISTEN"), None);
        assert_eq!(split_name("ISRGATE__A__B__C"), None);
        assert_eq!(split_name("ISRGATE_WEBHOOK_SECRET"), None);
    }
}
