//! What a reader of the metrics gets: [`Family`] values (name, help, type, series), built at
//! read time from the counters by the table ([`super::table`]), and the [`metrics!`] macro that
//! turns the table into the `Metrics` struct and its `families()`.
//!
//! Nothing here runs on the request path: the hot path adds to atomics, and a scrape or a
//! stats request reads them into these values (allocating then is fine).

use std::borrow::Cow;

use super::{Counter, Histogram};

/// A family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; its name ends `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, sum and count; its name ends with its unit (`_seconds`).
    Histogram,
    /// A constant 1 whose labels are the information; its name ends `_info`.
    Info,
}

/// One metric family as read now.
#[derive(Debug, Clone)]
pub struct Family {
    /// The full name as queried (`isrgate_requests_total`).
    pub name: &'static str,
    /// The HELP text: one line.
    pub help: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its series, in table order.
    pub series: Vec<Series>,
}

/// One series of a family.
#[derive(Debug, Clone)]
pub struct Series {
    /// Label names and values.
    pub labels: Vec<(&'static str, Cow<'static, str>)>,
    /// Its value now.
    pub value: Value,
    /// Where `/api/stats` puts it (`requests.hit`: the `hit` key of the `requests` object);
    /// series with the same place add up. `None`: not in the stats document.
    pub json: Option<Cow<'static, str>>,
}

/// A series' value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter's count.
    Count(u64),
    /// A gauge's reading.
    Gauge(f64),
    /// A histogram in seconds: `(upper bound, cumulative count)` pairs ending with
    /// `(f64::INFINITY, count)`, and the sum.
    Histogram {
        /// Cumulative buckets, the last one `+Inf`.
        buckets: Vec<(f64, u64)>,
        /// Sum of the observed values, seconds.
        sum: f64,
    },
}

/// How a table row labels its series.
#[derive(Debug, Clone, Copy)]
pub enum Labels {
    /// No label.
    None,
    /// One fixed label (`outcome = "hit"`).
    Fixed(&'static str, &'static str),
    /// One label over an array of counters indexed by an outcome enum: its name, and the
    /// label value of index `i`.
    Each(&'static str, fn(usize) -> Option<&'static str>),
}

/// An outcome enum that labels an array of counters (`counters[value as usize]`).
pub trait Label: Sized + Copy + 'static {
    /// Every value, in index order.
    const ALL: &'static [Self];
    /// The label value (`as_str()`).
    fn label(self) -> &'static str;
}

/// The label value of index `i` of `L`'s counters.
pub fn label_at<L: Label>(i: usize) -> Option<&'static str> {
    L::ALL.get(i).map(|l| l.label())
}

/// Something the table can expose: a counter, an array of counters, a histogram.
pub trait Expose {
    /// The family type it belongs in.
    const KIND: Kind;
    /// Appends its series, labelled by `labels`, placed in the stats document at `json`.
    fn expose(&self, labels: Labels, json: Option<&'static str>, out: &mut Vec<Series>);
}

fn fixed(labels: Labels) -> Vec<(&'static str, Cow<'static, str>)> {
    match labels {
        Labels::Fixed(k, v) => vec![(k, Cow::Borrowed(v))],
        Labels::None | Labels::Each(..) => Vec::new(),
    }
}

impl Expose for Counter {
    const KIND: Kind = Kind::Counter;
    fn expose(&self, labels: Labels, json: Option<&'static str>, out: &mut Vec<Series>) {
        out.push(Series {
            labels: fixed(labels),
            value: Value::Count(self.get()),
            json: json.map(Cow::Borrowed),
        });
    }
}

impl<const N: usize> Expose for [Counter; N] {
    const KIND: Kind = Kind::Counter;
    fn expose(&self, labels: Labels, json: Option<&'static str>, out: &mut Vec<Series>) {
        let Labels::Each(name, value_at) = labels else {
            let total = self.iter().map(Counter::get).sum();
            out.push(Series {
                labels: fixed(labels),
                value: Value::Count(total),
                json: json.map(Cow::Borrowed),
            });
            return;
        };
        for (i, c) in self.iter().enumerate() {
            let Some(value) = value_at(i) else { continue };
            out.push(Series {
                labels: vec![(name, Cow::Borrowed(value))],
                value: Value::Count(c.get()),
                json: json.map(|j| Cow::Owned(format!("{j}.{value}"))),
            });
        }
    }
}

impl Expose for Histogram {
    const KIND: Kind = Kind::Histogram;
    fn expose(&self, labels: Labels, json: Option<&'static str>, out: &mut Vec<Series>) {
        out.push(Series {
            labels: fixed(labels),
            value: self.value(),
            json: json.map(Cow::Borrowed),
        });
    }
}

/// Declares every metric once: the `Metrics` struct (one field per row, documented by its
/// family's HELP and the row's own doc) and `Metrics::families()`, which both `/metrics` and
/// `/api/stats` are generated from. A family is its full name, its HELP text and its rows; a row
/// is a field, its type (anything [`Expose`]), optional labels in brackets (`[outcome = "hit"]`,
/// or `[reason: Enum]` for an array indexed by a [`Label`] enum), an optional place in the
/// stats document (`=> "requests.hit"`) and an optional initializer (`= Histogram::new(…)`).
/// Fields listed after `unexposed` are state kept with the counters but not a metric.
macro_rules! metrics {
    (
        $(
            $name:literal $help:literal {
                $(
                    $(#[doc = $doc:literal])*
                    $field:ident : $ty:ty $([$($label:tt)*])? $(=> $json:literal)? $(= $init:expr)? ;
                )+
            }
        )+
        unexposed {
            $( $(#[doc = $udoc:literal])* $ufield:ident : $uty:ty, )*
        }
    ) => {
        /// Every counter and histogram of the gateway, declared once in [`crate::metrics::table`].
        #[derive(Debug)]
        pub struct Metrics {
            $($(
                #[doc = concat!("`", $name, "`: ", $help)]
                $(#[doc = $doc])*
                pub $field: $ty,
            )+)+
            $( $(#[doc = $udoc])* pub $ufield: $uty, )*
        }

        impl Default for Metrics {
            fn default() -> Metrics {
                Metrics {
                    $($( $field: metrics!(@init $($init)?), )+)+
                    $( $ufield: Default::default(), )*
                }
            }
        }

        impl Metrics {
            /// Every family with its series as they stand now, in table order.
            pub fn families(&self) -> Vec<$crate::metrics::Family> {
                use $crate::metrics::family::Expose as _;
                vec![$(
                    {
                        let mut series = Vec::new();
                        $(
                            self.$field.expose(
                                metrics!(@labels $($($label)*)?),
                                metrics!(@json $($json)?),
                                &mut series,
                            );
                        )+
                        $crate::metrics::Family {
                            name: $name,
                            help: $help,
                            kind: [$(<$ty as $crate::metrics::family::Expose>::KIND),+][0],
                            series,
                        }
                    },
                )+]
            }
        }
    };
    (@init) => { Default::default() };
    (@init $e:expr) => { $e };
    (@labels) => { $crate::metrics::family::Labels::None };
    (@labels $k:ident = $v:literal) => { $crate::metrics::family::Labels::Fixed(stringify!($k), $v) };
    (@labels $k:ident : $l:ty) => {
        $crate::metrics::family::Labels::Each(stringify!($k), $crate::metrics::family::label_at::<$l>)
    };
    (@json) => { None };
    (@json $j:literal) => { Some($j) };
}

pub(crate) use metrics;
