//! Per-service load measurement: counters, a one-second-bucket rate window and a latency
//! histogram, exported to the controller (the policy's input) and at `/metrics`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use vmatrix_core::api::{LoadReport, ServiceLoad};

/// Latency bucket upper bounds, ms.
const BUCKETS_MS: [f64; 16] = [
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    30000.0,
    60000.0,
    f64::INFINITY,
];
/// Seconds of history in the rate window.
const WINDOW: usize = 5;

#[derive(Debug, Clone)]
struct Service {
    priority: i32,
    requests: u64,
    errors: u64,
    held: u64,
    held_ms: f64,
    dropped: u64,
    concurrency: u64,
    buckets: [u64; 16],
    /// The sum of every request's latency, ms (the histogram's sum).
    latency_ms: f64,
    /// (second since start, count) ring.
    window: [(u64, u64); WINDOW + 1],
}

impl Default for Service {
    fn default() -> Self {
        Self {
            priority: 0,
            requests: 0,
            errors: 0,
            held: 0,
            held_ms: 0.0,
            dropped: 0,
            concurrency: 0,
            buckets: [0; 16],
            latency_ms: 0.0,
            window: [(u64::MAX, 0); WINDOW + 1],
        }
    }
}

/// Load statistics of every service seen.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    services: Mutex<BTreeMap<String, Service>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            services: Mutex::new(BTreeMap::new()),
        }
    }
}

fn percentile(buckets: &[u64; 16], q: f64) -> f64 {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let want = (total as f64 * q).ceil() as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= want {
            return BUCKETS_MS[i].min(BUCKETS_MS[14] * 2.0);
        }
    }
    BUCKETS_MS[14]
}

impl Stats {
    fn with<T>(&self, service: &str, f: impl FnOnce(&mut Service, u64) -> T) -> T {
        let second = self.started.elapsed().as_secs();
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        // Known services (every request but a service's first) allocate nothing.
        if let Some(s) = map.get_mut(service) {
            return f(s, second);
        }
        f(map.entry(service.to_owned()).or_default(), second)
    }

    /// Remembers a service's priority (for the dropped-per-priority counters).
    pub fn set_priority(&self, service: &str, priority: i32) {
        self.with(service, |s, _| s.priority = priority);
    }

    /// A request started.
    pub fn begin(&self, service: &str) {
        // The rate counts arrivals, not completions: an overloaded service must show its whole
        // demand, not what it manages to serve.
        self.with(service, |s, second| {
            s.concurrency += 1;
            let slot = (second as usize) % (WINDOW + 1);
            if s.window[slot].0 != second {
                s.window[slot] = (second, 0);
            }
            s.window[slot].1 += 1;
        });
    }

    /// A request ended after `ms` with success or not.
    pub fn end(&self, service: &str, ms: f64, ok: bool) {
        self.with(service, |s, _| {
            s.concurrency = s.concurrency.saturating_sub(1);
            s.requests += 1;
            if !ok {
                s.errors += 1;
            }
            let i = BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(15);
            s.buckets[i] += 1;
            s.latency_ms += ms;
        });
    }

    /// A request was held `ms` while the service woke.
    pub fn held(&self, service: &str, ms: f64) {
        self.with(service, |s, _| {
            s.held += 1;
            s.held_ms += ms;
        });
    }

    /// A request was refused (dropped service or full queue).
    pub fn dropped(&self, service: &str) {
        self.with(service, |s, second| {
            s.dropped += 1;
            s.requests += 1;
            let slot = (second as usize) % (WINDOW + 1);
            if s.window[slot].0 != second {
                s.window[slot] = (second, 0);
            }
            s.window[slot].1 += 1;
        });
    }

    /// The current load of every service. The rate counts the last [`WINDOW`] whole seconds.
    pub fn report(&self) -> LoadReport {
        let now = self.started.elapsed().as_secs();
        let map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = LoadReport::default();
        for (name, s) in map.iter() {
            let span = (now as usize).clamp(1, WINDOW);
            let counted: u64 = s
                .window
                .iter()
                .filter(|(sec, _)| *sec != u64::MAX && *sec < now && now - sec <= span as u64)
                .map(|(_, n)| n)
                .sum();
            // The last whole second alone: a step of load shows a second after it came.
            let last: u64 = s
                .window
                .iter()
                .filter(|(sec, _)| *sec != u64::MAX && *sec + 1 == now)
                .map(|(_, n)| n)
                .sum();
            out.services.insert(
                name.clone(),
                ServiceLoad {
                    rps: counted as f64 / span as f64,
                    rps_now: last as f64,
                    concurrency: s.concurrency,
                    p50_ms: percentile(&s.buckets, 0.5),
                    p99_ms: percentile(&s.buckets, 0.99),
                    requests: s.requests,
                    errors: s.errors,
                    held: s.held,
                    dropped: s.dropped,
                },
            );
        }
        out
    }

    /// Every service's counters and latency histogram, read now (the request path keeps only
    /// its plain counters: nothing is encoded between scrapes).
    pub fn sample(&self, out: &mut vmatrix_core::metrics::Sampled) {
        use vmatrix_core::metrics::{Labels, SampledHistogram};
        let map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let by = |f: fn(&Service) -> u64| -> Vec<(Labels, u64)> {
            map.iter()
                .map(|(svc, s)| (vec![("service", svc.clone())], f(s)))
                .collect()
        };
        out.counter(
            "vmatrix_switch_requests",
            "Requests per service.",
            by(|s| s.requests),
        )
        .counter(
            "vmatrix_switch_errors",
            "Failed requests per service.",
            by(|s| s.errors),
        )
        .counter(
            "vmatrix_switch_held",
            "Requests held while the service woke.",
            by(|s| s.held),
        )
        .counter(
            "vmatrix_switch_held_seconds",
            "Time requests spent held.",
            map.iter()
                .map(|(svc, s)| (vec![("service", svc.clone())], s.held_ms / 1000.0)),
        )
        .counter(
            "vmatrix_switch_dropped",
            "Requests refused (dropped service or full queue), by service and priority.",
            map.iter().map(|(svc, s)| {
                (
                    vec![
                        ("service", svc.clone()),
                        ("priority", s.priority.to_string()),
                    ],
                    s.dropped,
                )
            }),
        )
        .gauge(
            "vmatrix_switch_in_flight",
            "Requests in flight.",
            by(|s| s.concurrency),
        );
        // Requests dropped per priority, summed over its services (what the dashboard charts).
        let mut per_priority: BTreeMap<i32, u64> = BTreeMap::new();
        for s in map.values() {
            *per_priority.entry(s.priority).or_default() += s.dropped;
        }
        out.counter(
            "vmatrix_switch_dropped_by_priority",
            "Requests refused, summed per priority.",
            per_priority
                .into_iter()
                .map(|(p, n)| (vec![("priority", p.to_string())], n)),
        );
        out.histogram(
            "vmatrix_switch_latency_seconds",
            "Request latency.",
            map.iter().map(|(svc, s)| {
                let mut acc = 0;
                let buckets = BUCKETS_MS
                    .iter()
                    .zip(s.buckets)
                    .map(|(b, n)| {
                        acc += n;
                        (b / 1000.0, acc)
                    })
                    .collect();
                (
                    vec![("service", svc.clone())],
                    SampledHistogram {
                        sum: s.latency_ms / 1000.0,
                        count: acc,
                        buckets,
                    },
                )
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let s = Stats::default();
        s.begin("web");
        for _ in 0..98 {
            s.end("web", 3.0, true);
        }
        s.end("web", 900.0, false);
        s.end("web", 900.0, true);
        s.dropped("web");
        let r = s.report();
        let w = &r.services["web"];
        assert_eq!(w.requests, 101);
        assert_eq!(w.errors, 1);
        assert_eq!(w.dropped, 1);
        assert_eq!(w.p50_ms, 5.0);
        assert_eq!(w.p99_ms, 1000.0);
        let mut sampled = vmatrix_core::metrics::Sampled::default();
        s.sample(&mut sampled);
        let mut r = vmatrix_core::metrics::registry();
        r.register_collector(Box::new(sampled));
        let text = vmatrix_core::metrics::render(&r);
        assert!(
            text.contains("vmatrix_switch_requests_total{service=\"web\"} 101\n"),
            "{text}"
        );
        assert!(
            text.contains("vmatrix_switch_dropped_by_priority_total{priority=\"0\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("vmatrix_switch_latency_seconds_count{service=\"web\"} 100\n"),
            "{text}"
        );
    }
}
