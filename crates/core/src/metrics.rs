//! Metrics as every vMatrix process serves them at `/metrics`: the OpenMetrics text format,
//! written by the `prometheus-client` crate.
//!
//! Two kinds of family: those a process observes as things happen (operation durations:
//! `prometheus-client`'s own histograms, see [`Histograms`]) and those it reads at scrape time
//! from state it already keeps ([`Sampled`]: instance CPU and memory, machine use, request
//! counters). The second kind costs nothing between scrapes — the switch's request path stays
//! as it was — and cannot drift from the figures the API and the dashboard show, since both
//! read the same state.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `content-type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A series' labels, in the order they are printed.
pub type Labels = Vec<(&'static str, String)>;

/// Bucket bounds (seconds) for operations that take milliseconds to a minute: pauses,
/// resumes, migrations, activations.
pub const OPERATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0,
];

/// Bucket bounds (seconds) for a live migration's downtime (the guest paused).
pub const DOWNTIME_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One value of a sampled series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A count.
    Count(u64),
    /// A measure (seconds, bytes, a fraction).
    Real(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Count(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Self::Count(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Real(v)
    }
}

/// A histogram read at scrape time: cumulative counts per upper bound (the last `+Inf`).
#[derive(Debug, Clone, PartialEq)]
pub struct SampledHistogram {
    /// The sum of the observations.
    pub sum: f64,
    /// How many observations.
    pub count: u64,
    /// `(upper bound, observations at or below it)`, ascending, ending with infinity.
    pub buckets: Vec<(f64, u64)>,
}

#[derive(Debug, Clone)]
enum Rows {
    Counter(Vec<(Labels, Value)>),
    Gauge(Vec<(Labels, Value)>),
    Histogram(Vec<(Labels, SampledHistogram)>),
}

/// Families read at scrape time, in the order they were added. (The encoder ends each help
/// text with a full stop: a help given with one loses it.)
#[derive(Debug, Default, Clone)]
pub struct Sampled {
    families: Vec<(&'static str, &'static str, Rows)>,
}

impl Sampled {
    /// A counter family; `name` without its `_total` (the encoder adds it).
    pub fn counter<V: Into<Value>>(
        &mut self,
        name: &'static str,
        help: &'static str,
        rows: impl IntoIterator<Item = (Labels, V)>,
    ) -> &mut Self {
        let rows = rows.into_iter().map(|(l, v)| (l, v.into())).collect();
        self.families.push((name, help, Rows::Counter(rows)));
        self
    }

    /// A gauge family.
    pub fn gauge<V: Into<Value>>(
        &mut self,
        name: &'static str,
        help: &'static str,
        rows: impl IntoIterator<Item = (Labels, V)>,
    ) -> &mut Self {
        let rows = rows.into_iter().map(|(l, v)| (l, v.into())).collect();
        self.families.push((name, help, Rows::Gauge(rows)));
        self
    }

    /// A histogram family.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        rows: impl IntoIterator<Item = (Labels, SampledHistogram)>,
    ) -> &mut Self {
        let rows = rows.into_iter().collect();
        self.families.push((name, help, Rows::Histogram(rows)));
        self
    }
}

fn encode_value(
    kind: MetricType,
    v: Value,
    enc: prometheus_client::encoding::MetricEncoder<'_>,
) -> std::fmt::Result {
    match (kind, v) {
        (MetricType::Counter, Value::Count(n)) => ConstCounter::new(n).encode(enc),
        (MetricType::Counter, Value::Real(x)) => ConstCounter::new(x).encode(enc),
        (_, Value::Count(n)) => ConstGauge::new(n as i64).encode(enc),
        (_, Value::Real(x)) => ConstGauge::new(x).encode(enc),
    }
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        for (name, help, rows) in &self.families {
            match rows {
                Rows::Counter(rows) => {
                    encode_rows(&mut encoder, name, help, MetricType::Counter, rows)?
                }
                Rows::Gauge(rows) => {
                    encode_rows(&mut encoder, name, help, MetricType::Gauge, rows)?
                }
                Rows::Histogram(rows) => {
                    let mut m = encoder.encode_descriptor(
                        name,
                        help.trim_end_matches('.'),
                        None,
                        MetricType::Histogram,
                    )?;
                    for (labels, h) in rows {
                        m.encode_family(labels)?
                            .encode_histogram::<Labels>(h.sum, h.count, &h.buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn encode_rows(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(Labels, Value)],
) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(name, help.trim_end_matches('.'), None, kind)?;
    if let [(labels, v)] = rows {
        if labels.is_empty() {
            // A series without labels prints without braces.
            return encode_value(kind, *v, m);
        }
    }
    for (labels, v) in rows {
        encode_value(kind, *v, m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A family of histograms observed as things happen, one per label set.
pub type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// A histogram over [`OPERATION_BUCKETS`].
pub fn operation_histogram() -> Histogram {
    Histogram::new(OPERATION_BUCKETS)
}

/// A histogram over [`DOWNTIME_BUCKETS`].
pub fn downtime_histogram() -> Histogram {
    Histogram::new(DOWNTIME_BUCKETS)
}

/// Histograms over [`OPERATION_BUCKETS`], one per label set.
pub fn operation_histograms() -> Histograms {
    Family::new_with_constructor(operation_histogram as fn() -> Histogram)
}

/// A registry to fill with live families and one [`Sampled`], then [`render`].
pub fn registry() -> Registry {
    Registry::default()
}

/// The OpenMetrics text of `registry` (ends with `# EOF`).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error (a malformed family) leaves what was
    // written so far, which a scraper rejects as truncated rather than misreading.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The labels of one operation's observation.
pub fn op_labels(op: &str, outcome: &str) -> Labels {
    vec![
        ("operation", op.to_owned()),
        ("outcome", outcome.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_and_observed_families_print_as_openmetrics() {
        let ops = operation_histograms();
        ops.get_or_create(&op_labels("migrate", "ok")).observe(1.2);
        let mut s = Sampled::default();
        s.counter(
            "vmatrix_switch_requests",
            "Requests per service.",
            [(vec![("service", "web".to_owned())], 101u64)],
        )
        .gauge("vmatrix_machines_free", "Free machines.", [(vec![], 2u64)])
        .gauge(
            "vmatrix_instance_cpu",
            "CPU.",
            [(vec![("instance", "web-1".to_owned())], 0.25)],
        )
        .histogram(
            "vmatrix_switch_latency_seconds",
            "Latency.",
            [(
                vec![("service", "web".to_owned())],
                SampledHistogram {
                    sum: 0.5,
                    count: 2,
                    buckets: vec![(0.1, 1), (f64::INFINITY, 2)],
                },
            )],
        );
        let mut r = registry();
        r.register("vmatrix_operation_seconds", "Operations.", ops);
        r.register_collector(Box::new(s));
        let text = render(&r);
        for line in [
            "# TYPE vmatrix_switch_requests counter",
            "vmatrix_switch_requests_total{service=\"web\"} 101\n",
            "vmatrix_machines_free 2\n",
            "vmatrix_instance_cpu{instance=\"web-1\"} 0.25\n",
            "vmatrix_switch_latency_seconds_bucket{le=\"0.1\",service=\"web\"} 1\n",
            "vmatrix_operation_seconds_count{operation=\"migrate\",outcome=\"ok\"} 1\n",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line:?} missing in:\n{text}");
        }
    }
}
