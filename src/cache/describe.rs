//! An entry as an operator reads it: its state at `now` by its own deadlines, its age, and
//! whether an invalidation known to this gateway covers it (and by which tag). The one
//! describer behind the two places that show an entry: `GET /api/inspect` (`isrgate inspect`,
//! JSON) and the debug header (`proxy::debug`, a structured field).
//!
//! Receives an entry's metadata, `now` and this gateway's invalidations; hands on a
//! [`Description`] that borrows the rest (tags, deadlines, the gateway that filled it) from the
//! metadata. It reads no store and changes nothing, not even a counter.

use super::entry::Meta;
use super::epochs::{Epochs, Validity};
use super::policy::{self, State};

/// An entry described at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Description<'a> {
    /// The entry's metadata: deadlines, tags, status, who filled it.
    pub meta: &'a Meta,
    /// Its state by its own deadlines (an invalidation is [`Description::invalidation`]).
    pub state: State,
    /// Whole seconds since it was rendered (its `Age`).
    pub age_s: u64,
    /// Whether an invalidation covers it.
    pub invalidation: Invalidation<'a>,
}

/// What the invalidations known to this gateway say of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidation<'a> {
    /// Valid, invalidated softly (served stale at most) or hard (not served).
    pub validity: Validity,
    /// The first of its tags that says so (`None` when valid).
    pub by: Option<&'a str>,
}

impl Invalidation<'_> {
    /// `none`, `soft` or `hard`.
    pub fn as_str(&self) -> &'static str {
        match self.validity {
            Validity::Valid => "none",
            Validity::Stale => "soft",
            Validity::Invalid => "hard",
        }
    }
}

impl<'a> Description<'a> {
    /// `meta` at `now_ms`, against `epochs`.
    pub fn of(meta: &'a Meta, now_ms: u64, epochs: &Epochs) -> Description<'a> {
        let times = meta.times();
        Description {
            meta,
            state: policy::state(&times, now_ms),
            age_s: times.age_secs(now_ms),
            invalidation: invalidation(meta, epochs),
        }
    }

    /// The gateway that filled it, when recorded.
    pub fn filled_by(&self) -> Option<&'a str> {
        Some(self.meta.filled_by.as_str()).filter(|g| !g.is_empty())
    }

    /// The values of its stored `Vary`.
    pub fn vary(&self) -> impl Iterator<Item = &'a str> {
        self.meta
            .headers
            .iter()
            .filter(|(n, _)| n == http::header::VARY)
            .filter_map(|(_, v)| v.to_str().ok())
    }
}

/// Whether an invalidation covers `meta`, and by which of its tags (the first that does, in
/// the entry's order).
fn invalidation<'a>(meta: &'a Meta, epochs: &Epochs) -> Invalidation<'a> {
    let validity = epochs.check(meta.render_epoch, meta.tags.iter().map(String::as_str));
    let by = (validity != Validity::Valid)
        .then(|| {
            meta.tags
                .iter()
                .find(|t| epochs.check(meta.render_epoch, [t.as_str()]) == validity)
        })
        .flatten()
        .map(String::as_str);
    Invalidation { validity, by }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            status: 200,
            headers: vec![(http::header::VARY, http::HeaderValue::from_static("RSC"))],
            render_epoch: 0,
            stored_at_ms: 10_000,
            fresh_until_ms: 70_000,
            stale_until_ms: 100_000,
            stale_if_error_until_ms: 200_000,
            tags: vec!["*".into(), "a".into()],
            etag: String::new(),
            identity_len: 5,
            filled_by: "gw-1".into(),
        }
    }

    #[test]
    fn state_and_age_follow_the_deadlines() {
        let (m, epochs) = (meta(), Epochs::default());
        let at = |now| Description::of(&m, now, &epochs);
        assert_eq!((at(12_999).state, at(12_999).age_s), (State::Fresh, 2));
        assert_eq!(at(70_000).state, State::Stale);
        assert_eq!(at(100_000).state, State::StaleIfError);
        assert_eq!(at(200_000).state, State::Expired);
        assert_eq!(at(0).age_s, 0, "a clock behind the render is age 0");
        assert_eq!(at(0).filled_by(), Some("gw-1"));
        assert_eq!(at(0).vary().collect::<Vec<_>>(), ["RSC"]);
        assert_eq!(at(0).invalidation.as_str(), "none");
        assert_eq!(at(0).invalidation.by, None);
        let anonymous = Meta {
            filled_by: String::new(),
            ..meta()
        };
        assert_eq!(Description::of(&anonymous, 0, &epochs).filled_by(), None);
    }

    #[test]
    fn an_invalidation_names_the_tag_that_covers_the_entry() {
        use crate::cache::epochs::Mode;
        let (m, epochs) = (meta(), Epochs::default());
        epochs.record(1, Mode::Soft, ["a"]);
        let soft = Description::of(&m, 0, &epochs).invalidation;
        assert_eq!((soft.as_str(), soft.by), ("soft", Some("a")));
        epochs.record(2, Mode::Hard, ["*"]);
        let hard = Description::of(&m, 0, &epochs).invalidation;
        assert_eq!((hard.as_str(), hard.by), ("hard", Some("*")));
    }
}
