//! Mapping rules (`[[webhook.rules]]`): a CMS entry ([`super::cms::Entry`]) → the paths and
//! tags to invalidate. Part of the webhook's parse step; pure, compiled once from the config.
//!
//! A rule matches an entry by content type (`type`, `"*"` for any) and optionally by CMS
//! (`cms`), and gives templates: `paths = ["/blog/{slug}"]`, `tags = ["post-{id}", "posts"]`.
//! In a template, `{type}` and `{id}` are the entry's type and id; any other `{name}` is a
//! field of the entry, `{a.b}` a nested one (through arrays: one value per element, so a
//! Contentful field with two locales gives two paths; `*` is every value of an object, as in
//! WordPress's `{taxonomies.category.*.slug}`). `{name?}` is optional: a template whose
//! optional field is absent gives nothing, where a required one makes the call a 400 that
//! names the field, and nothing is invalidated. Every matching rule applies; with none, the
//! entry's type and `<type>-<id>` are the tags.

use serde_json::Value;

use super::cms::{Entry, Format};
use super::webhook::{MAX_ITEMS, Rejected};
use crate::cache::tags;

/// A compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    types: Vec<String>,
    cms: Option<Format>,
    paths: Vec<Template>,
    tags: Vec<Template>,
}

/// What a rule's config says, before it is checked.
#[derive(Debug, Clone, Copy)]
pub struct RuleSpec<'a> {
    /// Content types matched; `*` = any.
    pub types: &'a [String],
    /// Only this CMS's calls, when set.
    pub cms: Option<&'a str>,
    /// Path templates.
    pub paths: &'a [String],
    /// Tag templates.
    pub tags: &'a [String],
}

impl Rule {
    /// Compiles a rule; on error, every problem as (the rule's key it is about, message).
    pub fn new(spec: RuleSpec<'_>) -> Result<Rule, Vec<(String, String)>> {
        let mut problems = Vec::new();
        if spec.types.is_empty() || spec.types.iter().any(|t| t.trim().is_empty()) {
            problems.push((
                "type".into(),
                "name the content types this rule is for (Contentful content type id, Sanity _type, Strapi model, WordPress post type), or \"*\"".into(),
            ));
        }
        let cms = match spec.cms.map(|c| (c, Format::parse(c))) {
            None => None,
            Some((_, Some(f))) if !matches!(f, Format::Auto | Format::Isrgate) => Some(f),
            Some((c, _)) => {
                problems.push((
                    "cms".into(),
                    format!("{c:?} is not a CMS; use contentful, sanity, strapi or wordpress"),
                ));
                None
            }
        };
        if spec.paths.is_empty() && spec.tags.is_empty() {
            problems.push((
                "paths".into(),
                "give at least one path or tag template".into(),
            ));
        }
        let mut compile = |key: &str, list: &[String], path: bool| -> Vec<Template> {
            let mut out = Vec::new();
            for (i, text) in list.iter().enumerate() {
                match Template::parse(text, path) {
                    Ok(t) => out.push(t),
                    Err(e) => problems.push((format!("{key}[{i}]"), e)),
                }
            }
            out
        };
        let paths = compile("paths", spec.paths, true);
        let tags = compile("tags", spec.tags, false);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Rule {
            types: spec.types.iter().map(|t| t.trim().to_owned()).collect(),
            cms,
            paths,
            tags,
        })
    }

    fn matches(&self, entry: &Entry) -> bool {
        self.cms.is_none_or(|c| c == entry.cms)
            && self.types.iter().any(|t| t == "*" || *t == entry.kind)
    }
}

/// The paths and tags of `entry` under `rules`; a 400 naming the field a template lacks.
pub fn map(entry: &Entry, rules: &[Rule]) -> Result<(Vec<String>, Vec<String>), Rejected> {
    let (mut paths, mut tags) = (Vec::new(), Vec::new());
    let mut matched = false;
    for (i, rule) in rules.iter().enumerate().filter(|(_, r)| r.matches(entry)) {
        matched = true;
        for (list, out) in [(&rule.paths, &mut paths), (&rule.tags, &mut tags)] {
            for t in list {
                for value in t.render(entry).map_err(|e| e.rejected(i, t, entry))? {
                    push_unique(out, value);
                }
            }
        }
    }
    if !matched {
        for tag in [entry.kind.clone(), format!("{}-{}", entry.kind, entry.id)] {
            if !tags::is_valid(&tag) {
                return Err(Rejected::BadRequest(format!(
                    "{:?}: the {} entry's type and id do not make a tag (no spaces); add a [[webhook.rules]] for type {:?}",
                    tag,
                    entry.cms.as_str(),
                    entry.kind
                )));
            }
            push_unique(&mut tags, tag);
        }
    }
    Ok((paths, tags))
}

fn push_unique(out: &mut Vec<String>, value: String) {
    if !out.contains(&value) {
        out.push(value);
    }
}

/// A path or tag template: literal text and `{field}` / `{field?}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    text: String,
    path: bool,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field { name: String, optional: bool },
}

/// Why a template gave no value.
enum RenderError {
    Missing(String),
    Invalid(String),
    TooMany,
}

impl RenderError {
    fn rejected(self, rule: usize, t: &Template, e: &Entry) -> Rejected {
        let at = format!("webhook.rules[{rule}] {:?}", t.text);
        Rejected::BadRequest(match self {
            RenderError::Missing(name) => format!(
                "{name}: missing or empty in the {} entry (type {:?}, id {:?}), needed by {at}; nothing was invalidated (write {{{name}?}} to skip the template when the field is absent)",
                e.cms.as_str(),
                e.kind,
                e.id
            ),
            RenderError::Invalid(value) => format!(
                "{at} gave {value:?}, which is not a {}; nothing was invalidated",
                if t.path {
                    "path (starts with /)"
                } else {
                    "tag (no spaces)"
                }
            ),
            RenderError::TooMany => format!("{at} gives more than {MAX_ITEMS} values"),
        })
    }
}

impl Template {
    fn parse(text: &str, path: bool) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed {{"))?;
            let inner = &rest[open + 1..open + close];
            let (name, optional) = match inner.strip_suffix('?') {
                Some(n) => (n, true),
                None => (inner, false),
            };
            let ok = !name.is_empty()
                && !name.starts_with('.')
                && !name.ends_with('.')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$' | '*'));
            if !ok {
                return Err(format!(
                    "{text:?}: {{{inner}}} is not a field name (letters, digits, _ - $, dots between nested names; ? at the end for optional)"
                ));
            }
            parts.push(Part::Field {
                name: name.to_owned(),
                optional,
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: }} without {{"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let literal_ok = parts.iter().all(|p| match p {
            Part::Literal(l) => !l.chars().any(|c| c.is_whitespace() || c.is_control()),
            Part::Field { .. } => true,
        });
        if text.is_empty() || !literal_ok {
            return Err(format!("{text:?}: a template is one word (no spaces)"));
        }
        if path && matches!(parts.first(), Some(Part::Literal(l)) if !l.starts_with('/')) {
            return Err(format!(
                "{text:?}: a path starts with / (or with a field holding one)"
            ));
        }
        Ok(Template {
            text: text.to_owned(),
            path,
            parts,
        })
    }

    /// Every value of the template for `entry` (one per combination of multi-valued fields).
    fn render(&self, entry: &Entry) -> Result<Vec<String>, RenderError> {
        let mut out = vec![String::new()];
        for part in &self.parts {
            let values = match part {
                Part::Literal(l) => vec![l.clone()],
                Part::Field { name, optional } => {
                    let values = field(entry, name);
                    match (values.is_empty(), optional) {
                        (true, true) => return Ok(Vec::new()),
                        (true, false) => return Err(RenderError::Missing(name.clone())),
                        (false, _) if self.path => values.iter().map(|v| encode(v)).collect(),
                        (false, _) => values,
                    }
                }
            };
            if out.len() * values.len() > MAX_ITEMS {
                return Err(RenderError::TooMany);
            }
            out = out
                .iter()
                .flat_map(|prefix| values.iter().map(move |v| format!("{prefix}{v}")))
                .collect();
        }
        for v in &out {
            let ok = if self.path {
                v.starts_with('/')
            } else {
                tags::is_valid(v)
            };
            if !ok {
                return Err(RenderError::Invalid(v.clone()));
            }
        }
        Ok(out)
    }
}

/// The values of field `name` in `entry`: `type` and `id`, else the (nested) field's scalars.
fn field(entry: &Entry, name: &str) -> Vec<String> {
    match name {
        "type" => return vec![entry.kind.clone()],
        "id" => return vec![entry.id.clone()],
        _ => {}
    }
    let segments: Vec<&str> = name.split('.').collect();
    let mut out = Vec::new();
    if let Some(v) = entry.fields.get(segments[0]) {
        scalars(v, &segments[1..], &mut out);
    }
    out
}

fn scalars(v: &Value, segments: &[&str], out: &mut Vec<String>) {
    let value = match (v, segments.split_first()) {
        (Value::Array(items), _) => {
            for item in items {
                scalars(item, segments, out);
            }
            return;
        }
        (Value::Object(o), Some((&"*", rest))) => {
            for v in o.values() {
                scalars(v, rest, out);
            }
            return;
        }
        (Value::Object(o), Some((first, rest))) => {
            if let Some(v) = o.get(*first) {
                scalars(v, rest, out);
            }
            return;
        }
        (Value::String(s), None) if !s.is_empty() => s.clone(),
        (Value::Number(n), None) => n.to_string(),
        (Value::Bool(b), None) => b.to_string(),
        _ => return,
    };
    push_unique(out, value);
}

/// A field's value as it may stand in a path: bytes a URL cannot carry as they are, and `?` and
/// `#`, percent-encoded (slashes kept: a value may be a path, like WordPress's permalink).
fn encode(value: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_graphic() && b != b'?' && b != b'#' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cms: Format, kind: &str, fields: &str) -> Entry {
        Entry {
            cms,
            event: None,
            kind: kind.into(),
            id: "42".into(),
            fields: serde_json::from_str(fields).expect("test JSON"),
        }
    }

    fn rule(types: &[&str], cms: Option<&str>, paths: &[&str], tags: &[&str]) -> Rule {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        Rule::new(RuleSpec {
            types: &s(types),
            cms,
            paths: &s(paths),
            tags: &s(tags),
        })
        .expect("valid rule")
    }

    #[test]
    fn no_rule_gives_the_type_and_the_type_id_tags() {
        let e = entry(Format::Sanity, "post", "{}");
        assert_eq!(
            map(&e, &[]).expect("mapped"),
            (vec![], vec!["post".into(), "post-42".into()])
        );
        let other = rule(&["page"], None, &["/x"], &[]);
        assert_eq!(map(&e, &[other]).expect("mapped").1, ["post", "post-42"]);
    }

    #[test]
    fn templates_read_fields_nested_fields_and_every_value() {
        let e = entry(
            Format::Contentful,
            "blogPost",
            r#"{"slug":["hello","hallo welt"],"author":{"sys":{"id":"a1"}},"tags":[{"name":"rust"},{"name":"web"}],"terms":{"x":{"slug":"news"}}}"#,
        );
        let rules = [
            rule(
                &["blogPost"],
                Some("contentful"),
                &["/blog/{slug}", "/blog"],
                &["post-{id}"],
            ),
            rule(
                &["*"],
                None,
                &[],
                &[
                    "author-{author.sys.id}",
                    "topic-{tags.name}",
                    "{type}",
                    "t-{terms.*.slug}",
                ],
            ),
            rule(&["blogPost"], Some("sanity"), &["/never"], &[]),
        ];
        let (paths, tags) = map(&e, &rules).expect("mapped");
        assert_eq!(paths, ["/blog/hello", "/blog/hallo%20welt", "/blog"]);
        assert_eq!(
            tags,
            [
                "post-42",
                "author-a1",
                "topic-rust",
                "topic-web",
                "blogPost",
                "t-news"
            ]
        );
    }

    #[test]
    fn a_missing_field_names_itself_unless_optional() {
        let e = entry(
            Format::Strapi,
            "article",
            r#"{"title":"Hi there","slug":""}"#,
        );
        let required = rule(&["article"], None, &["/a/{slug}"], &[]);
        match map(&e, &[required]) {
            Err(Rejected::BadRequest(m)) => {
                assert!(m.starts_with("slug: missing"), "{m}");
                assert!(m.contains("webhook.rules[0]"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let optional = rule(&["article"], None, &["/a/{slug?}"], &["article-{id}"]);
        assert_eq!(
            map(&e, &[optional]).expect("mapped"),
            (vec![], vec!["article-42".into()])
        );
        let spaced = rule(&["article"], None, &[], &["t-{title}"]);
        match map(&e, &[spaced]) {
            Err(Rejected::BadRequest(m)) => assert!(m.contains("not a tag"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_rules_say_which_key() {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        /// Types, CMS, paths, tags, the key the first problem names.
        type Case<'a> = (
            &'a [&'a str],
            Option<&'a str>,
            &'a [&'a str],
            &'a [&'a str],
            &'a str,
        );
        let cases: &[Case<'_>] = &[
            (&[], None, &["/a"], &[], "type"),
            (&["a"], Some("drupal"), &["/a"], &[], "cms"),
            (&["a"], None, &[], &[], "paths"),
            (&["a"], None, &["blog/{slug}"], &[], "paths[0]"),
            (&["a"], None, &["/a/{slug"], &[], "paths[0]"),
            (&["a"], None, &[], &["x", "t-{a b}"], "tags[1]"),
            (&["a"], None, &[], &["t }"], "tags[0]"),
        ];
        for (types, cms, paths, tags, key) in cases {
            let spec = RuleSpec {
                types: &s(types),
                cms: *cms,
                paths: &s(paths),
                tags: &s(tags),
            };
            let problems = Rule::new(spec).expect_err("invalid");
            assert_eq!(problems[0].0, *key, "{problems:?}");
        }
    }
}
