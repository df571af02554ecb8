//! The simulator: discrete time over demand traces, driving the *same* `decide` the controller
//! runs, next to reference policies — `static` (every service owns machines for its own peak)
//! and `reactive` (target tracking as Kubernetes' HPA does it: the last 10 minutes' maximum ×
//! 1.5 headroom ÷ capacity, bin-packed, no priorities) — and the lower bound (at each step the
//! fewest machines that hold the instances the demand needs, with perfect foresight, no headroom
//! and free moves).
//!
//! Pure: traces come in as numbers, results go out as data. No I/O, no clock. Instances started
//! in a step serve from the next step (a cold boot takes seconds; steps are a minute).

use std::collections::BTreeMap;

use serde::Serialize;
use vmatrix_policy::{apply, decide, Config, InstanceState, Machine, Service, Snapshot};

/// A service in the simulation.
#[derive(Debug, Clone)]
pub struct SimService {
    /// Name.
    pub name: String,
    /// Priority.
    pub priority: i32,
    /// Requests/s one instance serves.
    pub capacity_rps: f64,
    /// Min instances.
    pub min: u32,
    /// Max instances.
    pub max: u32,
    /// vCPUs per instance.
    pub vcpus: u32,
    /// Memory per instance, MiB.
    pub memory_mib: u32,
    /// Demand, requests/s, one value per step.
    pub demand: Vec<f64>,
}

/// The machines.
#[derive(Debug, Clone, Copy)]
pub struct Pool {
    /// Machines available (for `switching-drop`; the others take what they need).
    pub machines: usize,
    /// vCPUs per machine.
    pub vcpus: u32,
    /// Memory per machine, MiB.
    pub memory_mib: u32,
    /// Seconds per step.
    pub step_s: f64,
}

/// Which policy to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Each service owns machines for its own peak.
    Static,
    /// Target tracking, no priorities, unlimited machines.
    Reactive,
    /// vMatrix's policy with as many machines as it wants.
    Switching,
    /// vMatrix's policy on the fixed pool, dropping low priorities when short.
    SwitchingDrop,
}

impl PolicyKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Reactive => "reactive",
            Self::Switching => "switching",
            Self::SwitchingDrop => "switching-drop",
        }
    }
}

/// Demand, served and dropped requests of one service.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Served {
    /// Requests offered.
    pub demand: f64,
    /// Requests served.
    pub served: f64,
    /// Requests not served.
    pub dropped: f64,
}

/// One policy's results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Machine-hours used.
    pub machine_hours: f64,
    /// Most machines in use at once.
    pub peak_machines: usize,
    /// Instance slots used ÷ slots of the machines in use, averaged over steps.
    pub mean_utilisation: f64,
    /// Instances started (cold boots and resumes).
    pub activations: u64,
    /// Live migrations.
    pub migrations: u64,
    /// Minutes in which some service could not serve all its demand.
    pub slo_violation_minutes: f64,
    /// Per service.
    pub services: BTreeMap<String, Served>,
    /// Machines in use at each step.
    #[serde(skip)]
    pub machines_per_step: Vec<usize>,
}

fn slots_per_machine(pool: &Pool, s: &SimService) -> usize {
    (pool.vcpus / s.vcpus.max(1))
        .min(pool.memory_mib / s.memory_mib.max(1))
        .max(1) as usize
}

fn account(
    sum: &mut Summary,
    pool: &Pool,
    services: &[SimService],
    step: usize,
    instances: &[usize],
    machines: usize,
) {
    let mut violated = false;
    let mut used_slots = 0.0;
    for (s, &n) in services.iter().zip(instances) {
        let d = s.demand.get(step).copied().unwrap_or(0.0) * pool.step_s;
        let cap = n as f64 * s.capacity_rps * pool.step_s;
        let served = d.min(cap);
        let e = sum.services.entry(s.name.clone()).or_default();
        e.demand += d;
        e.served += served;
        e.dropped += d - served;
        if d - served > 1e-6 {
            violated = true;
        }
        used_slots += n as f64 / slots_per_machine(pool, s) as f64;
    }
    if violated {
        sum.slo_violation_minutes += pool.step_s / 60.0;
    }
    sum.machine_hours += machines as f64 * pool.step_s / 3600.0;
    sum.peak_machines = sum.peak_machines.max(machines);
    if machines > 0 {
        sum.mean_utilisation += used_slots / machines as f64;
    }
    sum.machines_per_step.push(machines);
}

fn steps(services: &[SimService]) -> usize {
    services.iter().map(|s| s.demand.len()).max().unwrap_or(0)
}

/// The lower bound: each step, the instances the demand needs (no headroom, no min), packed
/// perfectly; machine-hours summed, peak the maximum.
pub fn lower_bound(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    for t in 0..steps(services) {
        let need: Vec<usize> = services
            .iter()
            .map(|s| (s.demand.get(t).copied().unwrap_or(0.0) / s.capacity_rps).ceil() as usize)
            .collect();
        let machines = services
            .iter()
            .zip(&need)
            .map(|(s, &n)| n as f64 / slots_per_machine(pool, s) as f64)
            .sum::<f64>()
            .ceil() as usize;
        account(&mut sum, pool, services, t, &need, machines);
    }
    finish(sum, services)
}

fn finish(mut sum: Summary, services: &[SimService]) -> Summary {
    let n = steps(services).max(1) as f64;
    sum.mean_utilisation /= n;
    sum
}

/// First-fit-decreasing count of machines for whole instances.
fn pack(services: &[SimService], instances: &[usize], pool: &Pool) -> usize {
    let mut items: Vec<(u32, u32)> = Vec::new();
    for (s, &n) in services.iter().zip(instances) {
        items.extend(std::iter::repeat_n((s.vcpus, s.memory_mib), n));
    }
    items.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut bins: Vec<(u32, u32)> = Vec::new();
    for (c, m) in items {
        match bins.iter_mut().find(|b| b.0 >= c && b.1 >= m) {
            Some(b) => {
                b.0 -= c;
                b.1 -= m;
            }
            None => bins.push((
                pool.vcpus.saturating_sub(c),
                pool.memory_mib.saturating_sub(m),
            )),
        }
    }
    bins.len()
}

/// Runs one policy over the traces.
pub fn run(kind: PolicyKind, services: &[SimService], pool: &Pool) -> Summary {
    match kind {
        PolicyKind::Static => run_static(services, pool),
        PolicyKind::Reactive => run_reactive(services, pool),
        PolicyKind::Switching | PolicyKind::SwitchingDrop => run_switching(kind, services, pool),
    }
}

fn run_static(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    let instances: Vec<usize> = services
        .iter()
        .map(|s| {
            ((s.demand.iter().fold(0.0f64, |a, b| a.max(*b)) / s.capacity_rps).ceil() as usize)
                .max(s.min as usize)
        })
        .collect();
    // Each service owns its machines.
    let machines: usize = services
        .iter()
        .zip(&instances)
        .map(|(s, &n)| n.div_ceil(slots_per_machine(pool, s)))
        .sum();
    sum.activations = instances.iter().sum::<usize>() as u64;
    for t in 0..steps(services) {
        account(&mut sum, pool, services, t, &instances, machines);
    }
    finish(sum, services)
}

fn run_reactive(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    let window = (600.0 / pool.step_s).ceil().max(1.0) as usize;
    let mut prev: Vec<usize> = vec![0; services.len()];
    for t in 0..steps(services) {
        // It sizes from what it has seen (up to the previous step) and serves this step with it.
        let target: Vec<usize> = services
            .iter()
            .map(|s| {
                let seen = &s.demand[t.saturating_sub(window)..t.min(s.demand.len())];
                let peak = seen.iter().fold(0.0f64, |a, b| a.max(*b));
                ((peak * 1.5 / s.capacity_rps).ceil() as u32).clamp(s.min.max(1), s.max.max(1))
                    as usize
            })
            .collect();
        for (p, &n) in prev.iter().zip(&target) {
            if n > *p {
                sum.activations += (n - p) as u64;
            }
        }
        let machines = pack(services, &target, pool);
        account(&mut sum, pool, services, t, &target, machines);
        prev = target;
    }
    finish(sum, services)
}

fn run_switching(kind: PolicyKind, services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    let machines = if kind == PolicyKind::SwitchingDrop {
        pool.machines
    } else {
        // As many as static peak provisioning would own: more is never useful.
        services
            .iter()
            .map(|s| {
                let peak = s.demand.iter().fold(0.0f64, |a, b| a.max(*b));
                ((peak * 1.5 / s.capacity_rps).ceil() as usize + 1)
                    .div_ceil(slots_per_machine(pool, s))
            })
            .sum::<usize>()
            .max(1)
    };
    let mut snap = Snapshot {
        now_s: 0.0,
        machines: (0..machines)
            .map(|i| Machine {
                name: format!("m{i}"),
                dedicated: true,
                vcpus: pool.vcpus,
                memory_mib: pool.memory_mib,
                healthy: true,
            })
            .collect(),
        services: services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                priority: s.priority,
                capacity_rps: s.capacity_rps,
                min: s.min,
                max: s.max,
                vcpus: s.vcpus,
                memory_mib: s.memory_mib,
                demand: Vec::new(),
                dropped: false,
            })
            .collect(),
        instances: Vec::new(),
    };
    let config = Config {
        headroom: 1.2,
        scale_out_window: 2,
        scale_in_window: (900.0 / pool.step_s).ceil() as usize,
        max_moves: 8,
        consolidate_below: 0.95,
        seasonal_periods: vec![
            (86400.0 / pool.step_s) as usize,
            (7.0 * 86400.0 / pool.step_s) as usize,
        ],
        seasonal_lookahead: (900.0 / pool.step_s).ceil() as usize,
    };
    let keep = config
        .seasonal_periods
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .max(config.scale_in_window)
        + 1;
    for t in 0..steps(services) {
        // The policy sees demand up to the previous step, like the controller does.
        for (ss, s) in snap.services.iter_mut().zip(services) {
            if t > 0 {
                ss.demand.push(s.demand.get(t - 1).copied().unwrap_or(0.0));
            }
            if ss.demand.len() > keep {
                let cut = ss.demand.len() - keep;
                ss.demand.drain(..cut);
            }
        }
        snap.now_s = t as f64 * pool.step_s;
        let plan = decide(&snap, &config);
        for a in &plan {
            match a {
                vmatrix_policy::Action::Activate { .. } | vmatrix_policy::Action::Resume { .. } => {
                    sum.activations += 1
                }
                vmatrix_policy::Action::Migrate { .. } => sum.migrations += 1,
                _ => {}
            }
        }
        snap = apply(&snap, &plan);
        // Serving this step: instances that were running before it (new ones boot meanwhile).
        let serving: Vec<usize> = services
            .iter()
            .map(|s| {
                snap.instances
                    .iter()
                    .filter(|i| i.service == s.name && i.state == InstanceState::Running)
                    .count()
            })
            .collect();
        let in_use = snap
            .instances
            .iter()
            .filter_map(|i| match i.state {
                InstanceState::Running | InstanceState::Starting => i.machine.clone(),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        account(&mut sum, pool, services, t, &serving, in_use);
        for i in &mut snap.instances {
            if i.state == InstanceState::Starting {
                i.state = InstanceState::Running;
            }
        }
    }
    finish(sum, services)
}

/// Parses a `t_seconds,value` CSV (header allowed) into values at `step_s`, optionally only the
/// window `[start_s, end_s)`, rescaled so that the peak is `peak` (if given).
pub fn parse_trace(
    text: &str,
    step_s: f64,
    window: Option<(f64, f64)>,
    peak: Option<f64>,
) -> Result<Vec<f64>, String> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut f = line.split(',');
        let (Some(a), Some(b)) = (f.next(), f.next()) else {
            return Err(format!("line {}: expected t_seconds,value", n + 1));
        };
        match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
            (Ok(t), Ok(v)) => points.push((t, v)),
            _ if n == 0 => continue,
            _ => return Err(format!("line {}: {line:?} is not two numbers", n + 1)),
        }
    }
    if let Some((s, e)) = window {
        points.retain(|(t, _)| *t >= s && *t < e);
    }
    let Some(&(t0, _)) = points.first() else {
        return Err("no samples (in the window)".into());
    };
    let last = points.last().map_or(t0, |p| p.0);
    let n = ((last - t0) / step_s).floor() as usize + 1;
    let mut sums = vec![0.0; n];
    let mut counts = vec![0u32; n];
    for (t, v) in points {
        let i = (((t - t0) / step_s).floor() as usize).min(n - 1);
        sums[i] += v;
        counts[i] += 1;
    }
    let mut values: Vec<f64> = sums
        .iter()
        .zip(&counts)
        .map(|(s, c)| if *c == 0 { 0.0 } else { s / f64::from(*c) })
        .collect();
    if let Some(p) = peak {
        let max = values.iter().fold(0.0f64, |a, b| a.max(*b));
        if max > 0.0 {
            for v in &mut values {
                *v *= p / max;
            }
        }
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, priority: i32, demand: Vec<f64>) -> SimService {
        SimService {
            name: name.into(),
            priority,
            capacity_rps: 50.0,
            min: 1,
            max: 100,
            vcpus: 1,
            memory_mib: 256,
            demand,
        }
    }

    fn pool(machines: usize) -> Pool {
        Pool {
            machines,
            vcpus: 8,
            memory_mib: 2048,
            step_s: 60.0,
        }
    }

    #[test]
    fn traces_parse_window_and_rescale() {
        let text = "t_seconds,value\n0,10\n60,20\n120,40\n180,0\n";
        assert_eq!(
            parse_trace(text, 60.0, None, None).unwrap(),
            vec![10.0, 20.0, 40.0, 0.0]
        );
        assert_eq!(
            parse_trace(text, 60.0, Some((60.0, 180.0)), Some(100.0)).unwrap(),
            vec![50.0, 100.0]
        );
        assert!(parse_trace("t,v\n1,x\n", 60.0, None, None).is_err());
    }

    #[test]
    fn switching_needs_less_than_static_with_offset_peaks() {
        // Two services peaking at different times: static owns both peaks, switching shares.
        let n = 600;
        let a: Vec<f64> = (0..n)
            .map(|t| if (t / 100) % 2 == 0 { 1500.0 } else { 50.0 })
            .collect();
        let b: Vec<f64> = (0..n)
            .map(|t| if (t / 100) % 2 == 1 { 1500.0 } else { 50.0 })
            .collect();
        let services = vec![svc("finance", 10, a), svc("sports", 5, b)];
        let p = pool(100);
        let lb = lower_bound(&services, &p);
        let st = run(PolicyKind::Static, &services, &p);
        let sw = run(PolicyKind::Switching, &services, &p);
        assert!(
            sw.machine_hours < st.machine_hours * 0.75,
            "switching {} vs static {}",
            sw.machine_hours,
            st.machine_hours
        );
        assert!(
            sw.machine_hours >= lb.machine_hours * 0.99,
            "nothing beats the lower bound"
        );
        let served = sw.services["finance"].served / sw.services["finance"].demand;
        assert!(served > 0.97, "finance served {served}");
    }

    #[test]
    fn a_short_pool_only_costs_the_lower_priority() {
        let n = 200;
        let services = vec![
            svc("finance", 10, vec![600.0; n]),
            svc("sports", 5, vec![600.0; n]),
        ];
        let small = run(PolicyKind::SwitchingDrop, &services, &pool(2)); // 16 slots; each wants 15
        let large = run(PolicyKind::SwitchingDrop, &services, &pool(10));
        let f = |s: &Summary, n: &str| s.services[n].served / s.services[n].demand;
        assert!(
            (f(&small, "finance") - f(&large, "finance")).abs() < 0.02,
            "finance {} vs {}",
            f(&small, "finance"),
            f(&large, "finance")
        );
        assert!(
            f(&small, "sports") < 0.2,
            "sports keeps only the leftovers: {}",
            f(&small, "sports")
        );
    }
}
