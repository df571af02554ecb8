//! Each machine's CPU load, from its heartbeats (the policy relieves hot machines).

use std::collections::HashMap;
use std::time::Instant;

use vmatrix_core::InstanceId;

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
    use std::time::Duration;

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
