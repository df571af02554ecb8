//! `vmatrix load`: an open-loop load generator. Requests start on schedule whether or not
//! earlier ones have finished (so a slow server shows up as latency, not as a lower offered
//! rate), at a constant rate or following a trace (`t_seconds,value` CSV) at a time compression.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Full URL, e.g. `http://127.0.0.1:8080/s/web/`.
    pub target: String,
    /// Requests per second over time: `(seconds from start, rate)` steps.
    pub schedule: Vec<(f64, f64)>,
    /// How long to run.
    pub duration: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl LoadOptions {
    /// A constant rate.
    pub fn constant(target: impl Into<String>, rate: f64, duration: Duration) -> Self {
        Self {
            target: target.into(),
            schedule: vec![(0.0, rate)],
            duration,
            timeout: Duration::from_secs(10),
        }
    }

    /// A trace file compressed by `speed` (10 = ten trace seconds per real second), each value
    /// times `scale` requests per second.
    pub fn from_trace(
        target: impl Into<String>,
        file: &Path,
        speed: f64,
        scale: f64,
    ) -> Result<Self, String> {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut schedule = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut f = line.split(',');
            let (Some(t), Some(v)) = (f.next(), f.next()) else {
                return Err(format!(
                    "{}:{}: expected t_seconds,value",
                    file.display(),
                    n + 1
                ));
            };
            let (Ok(t), Ok(v)) = (t.trim().parse::<f64>(), v.trim().parse::<f64>()) else {
                if n == 0 {
                    continue; // a header line
                }
                return Err(format!(
                    "{}:{}: {line:?} is not two numbers",
                    file.display(),
                    n + 1
                ));
            };
            schedule.push((t / speed, (v * scale).max(0.0)));
        }
        let Some(&(last, _)) = schedule.last() else {
            return Err(format!("{}: no samples", file.display()));
        };
        let start = schedule[0].0;
        for s in &mut schedule {
            s.0 -= start;
        }
        Ok(Self {
            target: target.into(),
            schedule,
            duration: Duration::from_secs_f64((last - start).max(1.0)),
            timeout: Duration::from_secs(10),
        })
    }

    fn rate_at(&self, t: f64) -> f64 {
        self.schedule
            .iter()
            .take_while(|(start, _)| *start <= t)
            .last()
            .map_or(0.0, |(_, r)| *r)
    }
}

/// What happened.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadResult {
    /// Requests sent.
    pub sent: u64,
    /// 2xx/3xx/4xx answers.
    pub ok: u64,
    /// Failures by kind (`503`, `timeout`, `connect`, …).
    pub errors: BTreeMap<String, u64>,
    /// Answered requests per second over the run.
    pub achieved_rps: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// Wall seconds.
    pub seconds: f64,
    /// The slowest requests: (seconds from start when sent, latency ms), slowest first, at most 10.
    pub slowest: Vec<(f64, f64)>,
}

impl LoadResult {
    /// Failed requests of any kind.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Runs the load and returns the figures.
pub async fn run_load(opts: &LoadOptions) -> LoadResult {
    let client = reqwest::Client::builder()
        .timeout(opts.timeout)
        .pool_max_idle_per_host(256)
        .build()
        .expect("HTTP client");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(f64, Result<f64, String>)>();
    let start = Instant::now();
    let mut next = 0.0f64;
    let mut sent = 0u64;
    while next < opts.duration.as_secs_f64() {
        let rate = opts.rate_at(next);
        if rate <= 0.0 {
            next += 0.1;
            continue;
        }
        let at = start + Duration::from_secs_f64(next);
        tokio::time::sleep_until(at.into()).await;
        let (client, url, tx) = (client.clone(), opts.target.clone(), tx.clone());
        let sent_at = next;
        tokio::spawn(async move {
            let t = Instant::now();
            let r = match client.get(&url).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let _ = resp.bytes().await;
                    if status.is_server_error() {
                        Err(status.as_u16().to_string())
                    } else {
                        Ok(t.elapsed().as_secs_f64() * 1000.0)
                    }
                }
                Err(e) if e.is_timeout() => Err("timeout".into()),
                Err(e) if e.is_connect() => Err("connect".into()),
                Err(_) => Err("other".into()),
            };
            let _ = tx.send((sent_at, r));
        });
        sent += 1;
        next += 1.0 / rate;
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut result = LoadResult {
        sent,
        ..Default::default()
    };
    let mut timed = Vec::new();
    while let Some((at, r)) = rx.recv().await {
        match r {
            Ok(ms) => {
                lat.push(ms);
                timed.push((at, ms));
            }
            Err(kind) => *result.errors.entry(kind).or_default() += 1,
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    timed.sort_by(|a, b| b.1.total_cmp(&a.1));
    timed.truncate(10);
    result.slowest = timed;
    result.ok = lat.len() as u64;
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        lat.get(
            ((lat.len() as f64 * q).ceil() as usize)
                .saturating_sub(1)
                .min(lat.len().saturating_sub(1)),
        )
        .copied()
        .unwrap_or(0.0)
    };
    result.p50_ms = pct(0.5);
    result.p90_ms = pct(0.9);
    result.p99_ms = pct(0.99);
    result.max_ms = lat.last().copied().unwrap_or(0.0);
    result.achieved_rps = result.ok as f64 / opts.duration.as_secs_f64().max(1e-9);
    result
}
