//! CMS payloads, as each CMS sends them: which CMS sent a webhook body, and the one entry it
//! is about. Part of the webhook's parse step ([`super::webhook`]); [`super::rules`] then maps
//! the entry to paths and tags. Pure functions over the head and the parsed body.
//!
//! Each CMS's documented shape (samples in `tests/it/fixtures/cms/`):
//! - **Contentful**: the entity itself, `{"sys": {...}, "fields": {"slug": {"en-US": "..."}}}`,
//!   with `X-Contentful-Topic: ContentManagement.Entry.publish`. Unpublish and delete send a
//!   tombstone (`DeletedEntry`: `sys` only, no fields). Type: `sys.contentType.sys.id`
//!   (`asset` for assets); id: `sys.id`; a field's locales become its values.
//! - **Sanity** (GROQ-powered webhooks, empty projection): the document, `{"_id", "_type",
//!   ...}`, with `sanity-operation` and `sanity-webhook-signature`. Type: `_type`; id: `_id`
//!   without its `drafts.` prefix.
//! - **Strapi** (v4 and v5): `{"event": "entry.publish", "model": "article", "entry": {...}}`
//!   (`media` instead of `entry` for media events), with `X-Strapi-Event`. Type: `model`
//!   (`media`); id: `entry.documentId` (v5), else `entry.id`.
//! - **WordPress** through the "WP Webhooks" plugin's post triggers (`post_create`,
//!   `post_update`, `post_delete`, `post_trash`): `{"post_id", "post": {WP_Post},
//!   "post_permalink", "post_meta", "taxonomies", ...}`, with `X-WP-Webhook-Name`. Type:
//!   `post.post_type`; id: `post_id`; fields: the post's, the other top-level keys, and
//!   `permalink_path` (the path of `post_permalink`).
//!
//! Every problem is a [`Rejected::BadRequest`] naming the field; nothing is changed.

use http::HeaderMap;
use serde_json::{Map, Value};

use super::webhook::Rejected;

/// The shape of a webhook body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Detected from the headers and the body's shape.
    Auto,
    /// The gateway's own `{"paths", "tags", "mode", "rewarm"}`.
    Isrgate,
    /// Contentful's entity payload.
    Contentful,
    /// Sanity's document payload.
    Sanity,
    /// Strapi's event payload.
    Strapi,
    /// WordPress through the WP Webhooks plugin.
    Wordpress,
}

impl Format {
    /// Every spelling accepted, for messages.
    pub const NAMES: &'static str = "auto, isrgate, contentful, sanity, strapi, wordpress";

    /// Parses a configured or query name.
    pub fn parse(name: &str) -> Option<Format> {
        Some(match name {
            "auto" => Format::Auto,
            "isrgate" => Format::Isrgate,
            "contentful" => Format::Contentful,
            "sanity" => Format::Sanity,
            "strapi" => Format::Strapi,
            "wordpress" => Format::Wordpress,
            _ => return None,
        })
    }

    /// The name, as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Isrgate => "isrgate",
            Format::Contentful => "contentful",
            Format::Sanity => "sanity",
            Format::Strapi => "strapi",
            Format::Wordpress => "wordpress",
        }
    }

    /// The CMS's name in messages.
    fn label(self) -> &'static str {
        match self {
            Format::Contentful => "Contentful",
            Format::Sanity => "Sanity",
            Format::Strapi => "Strapi",
            Format::Wordpress => "WordPress",
            Format::Auto | Format::Isrgate => "isrgate",
        }
    }
}

/// Which CMS sent this: its own headers first (each sends one), then the body's shape;
/// [`Format::Isrgate`] when nothing matches.
pub fn detect(headers: &HeaderMap, body: &Value) -> Format {
    let has = |name: &str| headers.contains_key(name);
    if has("x-contentful-topic") {
        return Format::Contentful;
    }
    if has("sanity-webhook-signature") || has("sanity-operation") || has("sanity-project-id") {
        return Format::Sanity;
    }
    if has("x-strapi-event") {
        return Format::Strapi;
    }
    if has("x-wp-webhook-name") || has("x-wp-webhook-source") {
        return Format::Wordpress;
    }
    let Some(o) = body.as_object() else {
        return Format::Isrgate;
    };
    if o.get("sys").is_some_and(Value::is_object) {
        Format::Contentful
    } else if o.contains_key("_type") || o.contains_key("_id") {
        Format::Sanity
    } else if o.get("event").is_some_and(Value::is_string)
        && ["model", "entry", "media"]
            .iter()
            .any(|k| o.contains_key(*k))
    {
        Format::Strapi
    } else if o.contains_key("post_id") || o.get("post").is_some_and(Value::is_object) {
        Format::Wordpress
    } else {
        Format::Isrgate
    }
}

/// The entry a CMS webhook is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Which CMS sent it.
    pub cms: Format,
    /// The event, when the CMS names it (`publish`, `entry.update`, `update`, `post_update`).
    pub event: Option<String>,
    /// Content type, model or post type.
    pub kind: String,
    /// The entry's id.
    pub id: String,
    /// The entry's fields, as rule templates read them.
    pub fields: Map<String, Value>,
}

impl Entry {
    /// What the answer and the revalidation log say about the entry.
    pub fn origin(&self) -> Origin {
        Origin {
            cms: self.cms,
            event: self.event.clone(),
            kind: self.kind.clone(),
            id: self.id.clone(),
        }
    }
}

/// The CMS entry a revalidation came from, as reported.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// `contentful`, `sanity`, `strapi` or `wordpress`.
    pub cms: Format,
    /// The event, when named.
    pub event: Option<String>,
    /// The content type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The entry's id.
    pub id: String,
}

/// The entry in `body`, sent by `cms` (not `Auto` or `Isrgate`).
pub fn entry(cms: Format, headers: &HeaderMap, body: Value) -> Result<Entry, Rejected> {
    let Value::Object(body) = body else {
        return Err(bad(format!(
            "body: a {} webhook sends a JSON object",
            cms.label()
        )));
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match cms {
        Format::Contentful => contentful(body, header("x-contentful-topic")),
        Format::Sanity => sanity(body, header("sanity-operation")),
        Format::Strapi => strapi(body),
        Format::Wordpress => wordpress(body, header("x-wp-webhook-name")),
        Format::Auto | Format::Isrgate => Err(bad(format!(
            "webhook.format {:?} has no CMS entry",
            cms.as_str()
        ))),
    }
}

fn bad(message: String) -> Rejected {
    Rejected::BadRequest(message)
}

/// A required string (or number) at `path` in `o`, or a 400 naming `name`.
fn required(
    o: &Map<String, Value>,
    path: &[&str],
    name: &str,
    hint: &str,
) -> Result<String, Rejected> {
    let mut at = o.get(path[0]);
    for key in &path[1..] {
        at = at.and_then(|v| v.get(key));
    }
    match at {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(bad(format!("{name}: missing or not a string; {hint}"))),
    }
}

fn contentful(mut o: Map<String, Value>, topic: Option<String>) -> Result<Entry, Rejected> {
    const HINT: &str =
        "a Contentful webhook sends the entity with its sys (keep the default payload)";
    let sys_type = required(&o, &["sys", "type"], "sys.type", HINT)?;
    let kind = match sys_type.as_str() {
        "Entry" | "DeletedEntry" => required(
            &o,
            &["sys", "contentType", "sys", "id"],
            "sys.contentType.sys.id",
            HINT,
        )?,
        "Asset" | "DeletedAsset" => "asset".to_owned(),
        other => {
            return Err(bad(format!(
                "sys.type: {other:?} is not an entry or an asset; subscribe the webhook to Entry and Asset events only"
            )));
        }
    };
    let id = required(&o, &["sys", "id"], "sys.id", HINT)?;
    // The Management API wraps every field value in its locales: `{"en-US": "hello"}`.
    let mut fields = Map::new();
    if let Some(Value::Object(raw)) = o.remove("fields") {
        for (name, value) in raw {
            let value = match value {
                Value::Object(locales) if locales.len() == 1 => {
                    locales.into_iter().next().map_or(Value::Null, |(_, v)| v)
                }
                Value::Object(locales) => {
                    Value::Array(locales.into_iter().map(|(_, v)| v).collect())
                }
                other => other,
            };
            fields.insert(name, value);
        }
    }
    Ok(Entry {
        cms: Format::Contentful,
        event: topic.map(|t| t.rsplit('.').next().unwrap_or_default().to_owned()),
        kind,
        id,
        fields,
    })
}

fn sanity(o: Map<String, Value>, operation: Option<String>) -> Result<Entry, Rejected> {
    const HINT: &str = "a Sanity webhook sends the document: leave the projection empty, or keep _id and _type in it";
    let kind = required(&o, &["_type"], "_type", HINT)?;
    let id = required(&o, &["_id"], "_id", HINT)?;
    // A draft's id is the published document's with a prefix; pages show the published one.
    let id = match id.strip_prefix("drafts.") {
        Some(published) => published.to_owned(),
        None => id,
    };
    Ok(Entry {
        cms: Format::Sanity,
        event: operation,
        kind,
        id,
        fields: o,
    })
}

fn strapi(mut o: Map<String, Value>) -> Result<Entry, Rejected> {
    let event = required(&o, &["event"], "event", "a Strapi webhook names its event")?;
    let (kind, fields) = if let Some(Value::Object(entry)) = o.remove("entry") {
        let model = required(&o, &["model"], "model", "Strapi names the entry's model")?;
        (model, entry)
    } else if let Some(Value::Object(media)) = o.remove("media") {
        ("media".to_owned(), media)
    } else {
        return Err(bad(format!(
            "entry: event {event:?} has no entry or media to map; subscribe the webhook to entry.* and media.* events"
        )));
    };
    let id = match required(&fields, &["documentId"], "entry.documentId", "") {
        Ok(id) => id,
        Err(_) => required(
            &fields,
            &["id"],
            "entry.id",
            "Strapi sends the entry with its id",
        )?,
    };
    Ok(Entry {
        cms: Format::Strapi,
        event: Some(event),
        kind,
        id,
        fields,
    })
}

fn wordpress(mut o: Map<String, Value>, trigger: Option<String>) -> Result<Entry, Rejected> {
    const HINT: &str = "use a WP Webhooks post trigger (post_create, post_update, post_delete, post_trash) sending JSON";
    let id = required(&o, &["post_id"], "post_id", HINT)?;
    let kind = required(&o, &["post", "post_type"], "post.post_type", HINT)?;
    let mut fields = match o.remove("post") {
        Some(Value::Object(post)) => post,
        _ => Map::new(),
    };
    o.remove("post_before");
    let permalink_path = o
        .get("post_permalink")
        .and_then(Value::as_str)
        .and_then(url_path);
    for (k, v) in o {
        fields.entry(k).or_insert(v);
    }
    if let Some(path) = permalink_path {
        fields.insert("permalink_path".into(), Value::String(path));
    }
    Ok(Entry {
        cms: Format::Wordpress,
        event: trigger,
        kind,
        id,
        fields,
    })
}

/// The path of an absolute URL (`https://site/blog/hello/?x` → `/blog/hello/`).
fn url_path(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let path = rest.find('/').map_or("/", |i| &rest[i..]);
    let end = path.find(['?', '#']).unwrap_or(path.len());
    Some(path[..end].to_owned())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A header map from pairs (the invalidate modules' tests share it).
    pub(in crate::invalidate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("test value"),
                v.parse().expect("test value"),
            );
        }
        h
    }

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("test JSON")
    }

    #[test]
    fn each_cms_is_told_by_its_header_or_its_shape() {
        let none = HeaderMap::new();
        let cases = [
            (r#"{"sys":{"id":"x"}}"#, Format::Contentful),
            (r#"{"_id":"a","_type":"post"}"#, Format::Sanity),
            (
                r#"{"event":"entry.update","model":"a","entry":{}}"#,
                Format::Strapi,
            ),
            (r#"{"post_id":1,"post":{}}"#, Format::Wordpress),
            (r#"{"paths":["/a"]}"#, Format::Isrgate),
            ("[1]", Format::Isrgate),
        ];
        for (body, format) in cases {
            assert_eq!(detect(&none, &json(body)), format, "{body}");
        }
        let h = headers(&[("x-contentful-topic", "ContentManagement.Entry.publish")]);
        assert_eq!(detect(&h, &json("{}")), Format::Contentful);
        let h = headers(&[("x-strapi-event", "entry.create")]);
        assert_eq!(detect(&h, &json("{}")), Format::Strapi);
    }

    #[test]
    fn contentful_locales_become_values_and_tombstones_have_no_fields() {
        let published = json(
            r#"{"sys":{"type":"Entry","id":"e1","contentType":{"sys":{"id":"blogPost"}}},
                "fields":{"slug":{"en-US":"hello"},"title":{"en-US":"Hi","de":"Hallo"}}}"#,
        );
        let h = headers(&[("x-contentful-topic", "ContentManagement.Entry.publish")]);
        let e = entry(Format::Contentful, &h, published).expect("entry");
        assert_eq!((e.kind.as_str(), e.id.as_str()), ("blogPost", "e1"));
        assert_eq!(e.event.as_deref(), Some("publish"));
        assert_eq!(e.fields["slug"], "hello");
        assert_eq!(
            e.fields["title"],
            json(r#"["Hallo","Hi"]"#),
            "in locale-code order"
        );
        let tomb = json(
            r#"{"sys":{"type":"DeletedEntry","id":"e1","contentType":{"sys":{"id":"blogPost"}}}}"#,
        );
        let e = entry(Format::Contentful, &HeaderMap::new(), tomb).expect("entry");
        assert!(e.fields.is_empty());
        let ct = json(r#"{"sys":{"type":"ContentType","id":"blogPost"}}"#);
        match entry(Format::Contentful, &HeaderMap::new(), ct) {
            Err(Rejected::BadRequest(m)) => assert!(m.starts_with("sys.type"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_types_and_missing_fields() {
        let none = HeaderMap::new();
        let s = entry(
            Format::Sanity,
            &none,
            json(r#"{"_id":"drafts.p1","_type":"post"}"#),
        );
        assert_eq!(s.expect("sanity").id, "p1");
        let v5 = json(
            r#"{"event":"entry.publish","model":"article","entry":{"id":3,"documentId":"d3"}}"#,
        );
        assert_eq!(entry(Format::Strapi, &none, v5).expect("strapi").id, "d3");
        let v4 = json(r#"{"event":"entry.publish","model":"article","entry":{"id":3}}"#);
        assert_eq!(entry(Format::Strapi, &none, v4).expect("strapi").id, "3");
        let media = json(r#"{"event":"media.create","media":{"id":1}}"#);
        assert_eq!(
            entry(Format::Strapi, &none, media).expect("media").kind,
            "media"
        );
        let wp = json(
            r#"{"post_id":7,"post":{"post_type":"page","post_name":"about"},
                "post_permalink":"https://wp.example/about/?preview=1"}"#,
        );
        let e = entry(Format::Wordpress, &none, wp).expect("wordpress");
        assert_eq!((e.kind.as_str(), e.id.as_str()), ("page", "7"));
        assert_eq!(e.fields["permalink_path"], "/about/");
        assert_eq!(e.fields["post_name"], "about");
        let cases: &[(Format, &str, &str)] = &[
            (Format::Sanity, r#"{"_id":"a"}"#, "_type"),
            (
                Format::Contentful,
                r#"{"sys":{"type":"Entry","id":"x"}}"#,
                "sys.contentType.sys.id",
            ),
            (Format::Strapi, r#"{"event":"trigger-test"}"#, "entry"),
            (
                Format::Strapi,
                r#"{"event":"entry.create","entry":{"id":1}}"#,
                "model",
            ),
            (
                Format::Wordpress,
                r#"{"post_id":1,"post":{}}"#,
                "post.post_type",
            ),
            (Format::Sanity, "[]", "body"),
        ];
        for (cms, body, field) in cases {
            match entry(*cms, &none, json(body)) {
                Err(Rejected::BadRequest(m)) => assert!(m.starts_with(field), "{body}: {m}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
