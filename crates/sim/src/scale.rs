//! A synthetic fleet for the scale benchmark, built from real demand shapes: every service takes
//! one of the shapes, from its own starting day and hour (services live in different time
//! zones and phases), at its own size. Deterministic: the same seed gives the same fleet.

use crate::SimService;

/// What to build.
#[derive(Debug, Clone, Copy)]
pub struct Fleet {
    /// Services.
    pub services: usize,
    /// The fleet's mean demand, in instances' worth (headroom and forecasts place more).
    pub instances: usize,
    /// Steps simulated.
    pub steps: usize,
    /// Steps of history before them.
    pub history: usize,
    /// Requests/s one instance serves.
    pub capacity_rps: f64,
    /// Seed.
    pub seed: u64,
}

/// splitmix64: small, fast, good enough to spread phases and sizes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The fleet's services from `shapes` (per-step demand in any unit; each must be longer than
/// `history + steps`). A quarter of the services are twice as big per instance (2 vCPU,
/// 512 MiB); priorities run from 1 to 10.
pub fn fleet(shapes: &[Vec<f64>], f: &Fleet) -> Result<Vec<SimService>, String> {
    let span = f.history + f.steps;
    let usable: Vec<&Vec<f64>> = shapes.iter().filter(|s| s.len() > span).collect();
    if usable.is_empty() {
        return Err(format!(
            "no demand shape is longer than {span} steps: give longer traces"
        ));
    }
    let mut rng = Rng(f.seed);
    let mut services = Vec::with_capacity(f.services);
    let mut total_mean = 0.0;
    for k in 0..f.services {
        let shape = usable[k % usable.len()];
        // Whole days, so that a day-long shape keeps its time of day, plus a time zone.
        let days = (shape.len() - span) / 1440;
        let start = rng.below(days as u64 + 1) as usize * 1440;
        let zone = rng.below(24) as usize * 60;
        let start = (start + zone).min(shape.len() - span);
        let cut = &shape[start..start + span];
        // Normalised by its own peak (a service is sized for it), sizes spread 0.2×–1.8×.
        let busy = cut[f.history..].iter().fold(0.0f64, |a, b| a.max(*b));
        let size = 0.2 + 1.6 * rng.unit();
        let scale = if busy > 0.0 { size / busy } else { 0.0 };
        let big = k % 4 == 3;
        let demand: Vec<f64> = cut.iter().map(|v| v * scale).collect();
        total_mean += demand[f.history..].iter().sum::<f64>() / f.steps.max(1) as f64;
        services.push(SimService {
            name: format!("svc{k:04}"),
            priority: 1 + rng.below(10) as i32,
            capacity_rps: f.capacity_rps,
            min: 1,
            max: 10_000,
            vcpus: if big { 2 } else { 1 },
            memory_mib: if big { 512 } else { 256 },
            history: demand[..f.history].to_vec(),
            demand: demand[f.history..].to_vec(),
            ..SimService::default()
        });
    }
    // Scale everyone so the fleet's mean demand is `instances` instances' worth.
    let factor = f.instances as f64 * f.capacity_rps / total_mean.max(1e-9);
    for s in &mut services {
        s.history.iter_mut().for_each(|v| *v *= factor);
        s.demand.iter_mut().for_each(|v| *v *= factor);
    }
    Ok(services)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_asks_for_the_instances_it_was_sized_for() {
        let day: Vec<f64> = (0..1440 * 4)
            .map(|m| 1.0 + ((m % 1440) as f64 / 1440.0 * std::f64::consts::TAU).sin())
            .collect();
        let f = Fleet {
            services: 40,
            instances: 4000,
            steps: 1440,
            history: 1440,
            capacity_rps: 50.0,
            seed: 7,
        };
        let fleet = fleet(std::slice::from_ref(&day), &f).unwrap();
        assert_eq!(fleet.len(), 40);
        let mean: f64 = fleet
            .iter()
            .map(|s| s.demand.iter().sum::<f64>() / s.demand.len() as f64 / s.capacity_rps)
            .sum();
        assert!((mean - 4000.0).abs() < 1.0, "{mean}");
        assert!(fleet.iter().all(|s| s.history.len() == 1440));
        assert_eq!(fleet.iter().filter(|s| s.vcpus == 2).count(), 10);
        let again = super::fleet(&[day], &f).unwrap();
        assert_eq!(fleet[5].demand, again[5].demand, "deterministic");
        assert!(super::fleet(&[vec![1.0; 10]], &f).is_err());
    }
}
