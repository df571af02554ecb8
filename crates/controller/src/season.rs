//! What the controller remembers of demand and machine load between ticks: a season of demand
//! for the policy's forecast, and each machine's CPU load from its heartbeats.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vmatrix_core::InstanceId;

/// Demand remembered over one season (a week by default) in coarse buckets (the maximum of each),
/// for the policy's forecast: what came one season ago, from now to a little ahead. In memory:
/// a restarted controller starts learning again.
#[derive(Debug)]
pub struct Season {
    period: Duration,
    bucket: Duration,
    ahead: u64,
    /// Per service: (bucket index, maximum rps), oldest first.
    history: HashMap<String, std::collections::VecDeque<(u64, f64)>>,
}

impl Season {
    /// Buckets per season.
    const BUCKETS: u32 = 2016;

    /// A season of `period` (zero: no forecast), looking `ahead` past now.
    pub fn new(period: Duration, ahead: Duration) -> Self {
        let bucket = (period / Self::BUCKETS).max(Duration::from_millis(1));
        Self {
            period,
            bucket,
            ahead: (ahead.as_secs_f64() / bucket.as_secs_f64()).ceil() as u64,
            history: HashMap::new(),
        }
    }

    fn index(&self, at: Duration) -> u64 {
        (at.as_secs_f64() / self.bucket.as_secs_f64()) as u64
    }

    /// Records a demand sample taken `at` since the controller started.
    pub fn record(&mut self, service: &str, at: Duration, rps: f64) {
        if self.period.is_zero() {
            return;
        }
        let i = self.index(at);
        let keep = u64::from(Self::BUCKETS) + self.ahead + 1;
        let h = self.history.entry(service.to_owned()).or_default();
        match h.back_mut() {
            Some((last, max)) if *last == i => *max = max.max(rps),
            _ => h.push_back((i, rps)),
        }
        while h.front().is_some_and(|(first, _)| first + keep < i) {
            h.pop_front();
        }
    }

    /// The most demand seen one season before `at`, from then to `ahead` later (0 when the
    /// history does not reach back that far).
    pub fn forecast(&self, service: &str, at: Duration) -> f64 {
        let season = u64::from(Self::BUCKETS);
        let (Some(h), Some(from)) = (
            self.history.get(service),
            self.index(at).checked_sub(season),
        ) else {
            return 0.0;
        };
        h.iter()
            .filter(|(i, _)| *i >= from && *i <= from + self.ahead)
            .fold(0.0f64, |a, (_, v)| a.max(*v))
    }

    /// Forgets services that are no longer declared.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.history.retain(|name, _| keep(name));
    }
}

/// A machine's CPU load: the CPU seconds its instances' QEMUs used between two heartbeats,
/// over the time between them and its vCPUs, smoothed.
#[derive(Debug, Default)]
pub(crate) struct CpuMeter {
    last: Option<Instant>,
    seconds: HashMap<InstanceId, f64>,
    /// Busy fraction of its vCPUs (0..=1 and above when over-committed), smoothed.
    pub(crate) load: f64,
}

impl CpuMeter {
    /// Takes one heartbeat's CPU seconds of the instances that are running (a booting guest
    /// burns a core for seconds and would make every machine that starts something look hot).
    pub(crate) fn observe(&mut self, now: Instant, vcpus: u32, instances: &[(InstanceId, f64)]) {
        let mut used = 0.0;
        for (id, secs) in instances {
            if let Some(before) = self.seconds.get(id) {
                used += (secs - before).max(0.0);
            }
        }
        if let Some(last) = self.last {
            let dt = now.duration_since(last).as_secs_f64();
            if dt > 0.0 && vcpus > 0 {
                let sample = used / dt / f64::from(vcpus);
                self.load = 0.7 * self.load + 0.3 * sample;
            }
        }
        self.last = Some(now);
        self.seconds = instances.iter().cloned().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_season_forecasts_what_came_one_period_ago_a_little_ahead() {
        // A season of 2016 s: one-second buckets; look 3 s ahead.
        let mut s = Season::new(Duration::from_secs(2016), Duration::from_secs(3));
        let at = |secs: u64| Duration::from_secs(secs);
        let mut seen = HashMap::new();
        for t in 0..2200 {
            let rps = if (100..110).contains(&t) { 500.0 } else { 10.0 };
            s.record("web", at(t), rps);
            // Asked, as the controller does, right after each sample.
            seen.insert(t, s.forecast("web", at(t)));
        }
        assert_eq!(seen[&1000], 0.0, "not a whole season known yet");
        assert_eq!(seen[&(2016 + 50)], 10.0, "a quiet time last season");
        assert_eq!(seen[&(2016 + 96)], 10.0);
        assert_eq!(seen[&(2016 + 97)], 500.0, "3 s before last season's spike");
        assert_eq!(seen[&(2016 + 109)], 500.0);
        assert_eq!(seen[&(2016 + 110)], 10.0, "after it");
        assert_eq!(s.forecast("nope", at(2100)), 0.0);
        // Kept bounded: about one season of buckets.
        assert!(s.history["web"].len() <= 2016 + 3 + 2);
        let mut off = Season::new(Duration::ZERO, Duration::ZERO);
        off.record("web", at(5), 100.0);
        assert!(off.history.is_empty());
    }

    #[test]
    fn machine_load_is_cpu_seconds_over_time_and_vcpus() {
        let mut m = CpuMeter::default();
        let t0 = Instant::now();
        let a = InstanceId::new("web-1").expect("id");
        let b = InstanceId::new("web-2").expect("id");
        m.observe(t0, 2, &[(a.clone(), 10.0)]);
        assert_eq!(m.load, 0.0, "one heartbeat tells nothing");
        // 1 s later: web-1 used 1.6 CPU-s, web-2 is new (no rate yet) → 1.6 / 1 s / 2 vCPUs.
        m.observe(
            t0 + Duration::from_secs(1),
            2,
            &[(a.clone(), 11.6), (b.clone(), 3.0)],
        );
        assert!((m.load - 0.3 * 0.8).abs() < 1e-9, "{}", m.load);
        // Steady 0.8 for a while converges to 0.8; a restarted QEMU (counter back to 0) adds 0.
        let mut t = t0 + Duration::from_secs(1);
        let (mut ca, mut cb) = (11.6, 3.0);
        for _ in 0..40 {
            t += Duration::from_secs(1);
            ca += 0.8;
            cb += 0.8;
            m.observe(t, 2, &[(a.clone(), ca), (b.clone(), cb)]);
        }
        assert!((m.load - 0.8).abs() < 0.01, "{}", m.load);
        m.observe(t + Duration::from_secs(1), 2, &[(a, 0.0), (b, cb + 0.8)]);
        assert!(m.load < 0.8, "{}", m.load);
    }
}
