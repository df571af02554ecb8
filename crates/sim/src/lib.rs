//! The simulator: discrete time over demand traces, driving the *same* `decide` the controller
//! runs, next to reference policies — `static` (every service owns machines for its own peak)
//! and `reactive` (target tracking as Kubernetes' HPA does it: the last 10 minutes' maximum ×
//! 1.5 headroom ÷ capacity, bin-packed, no priorities) — and the lower bound (at each step the
//! fewest machines that hold the instances the demand needs, with perfect foresight, no headroom
//! and free moves).
//!
//! Pure: traces come in as numbers, results go out as data. No I/O, no clock. Instances started
//! in a step serve from the next step (a cold boot takes seconds; steps are a minute).

pub mod plot;
pub mod scale;

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use vmatrix_policy::{apply, remove_indices, InstanceState, Machine, Service};
pub use vmatrix_policy::{decide, Action, Config, Sharing, Snapshot};

/// A service in the simulation.
#[derive(Debug, Clone, Default)]
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
    /// Demand before the simulated span, requests/s, one value per step: the policies see it as
    /// history (a controller that ran before), it is not counted.
    pub history: Vec<f64>,
    /// Demand, requests/s, one value per step.
    pub demand: Vec<f64>,
}

/// How long the moves take. The defaults are what `vmatrix bench vmm` measured on the reference
/// guest (TCG, 256 MiB; docs/benchmarks.md); `vmatrix sim` can override each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latencies {
    /// Cold boot to serving HTTP.
    pub boot_s: f64,
    /// Resume from the repository to serving HTTP.
    pub resume_s: f64,
    /// Suspend into the repository: the machine counts as in use in the step it suspends in
    /// (when above 0).
    pub suspend_s: f64,
    /// Live-migration downtime (the instance serves nothing meanwhile).
    pub migrate_downtime_s: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            boot_s: 6.4,
            resume_s: 0.31,
            suspend_s: 0.12,
            migrate_downtime_s: 0.08,
        }
    }
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
    /// How long moves take.
    pub latencies: Latencies,
    /// Keep per-step, per-service capacity for plots (off for huge runs).
    pub record: bool,
}

impl Pool {
    /// `machines` of `vcpus` and `memory_mib`, 1-minute steps, the measured move times, no
    /// per-step recording.
    pub fn new(machines: usize, vcpus: u32, memory_mib: u32) -> Self {
        Self {
            machines,
            vcpus,
            memory_mib,
            step_s: 60.0,
            latencies: Latencies::default(),
            record: false,
        }
    }
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
    /// Busy slots (served demand ÷ per-instance capacity) ÷ instance slots of the machines in
    /// use, averaged over steps.
    pub mean_utilisation: f64,
    /// Instances started (cold boots and resumes).
    pub activations: u64,
    /// Live migrations.
    pub migrations: u64,
    /// Minutes in which some service could not serve all its demand.
    pub slo_violation_minutes: f64,
    /// Per service.
    pub services: BTreeMap<String, Served>,
    /// Per service, by index, while the run counts (moved into `services` at the end).
    #[serde(skip)]
    per_service: Vec<Served>,
    /// Machines in use at each step.
    #[serde(skip)]
    pub machines_per_step: Vec<usize>,
    /// Instances placed at each step (vMatrix's policy only).
    #[serde(skip)]
    pub instances_per_step: Vec<usize>,
    /// Capacity each service had at each step, requests/s (when the pool records).
    #[serde(skip)]
    pub capacity_per_step: Vec<Vec<f64>>,
}

fn slots_per_machine(pool: &Pool, s: &SimService) -> usize {
    (pool.vcpus / s.vcpus.max(1))
        .min(pool.memory_mib / s.memory_mib.max(1))
        .max(1) as usize
}

/// Counts one step: `instances` is each service's serving capacity in instances (fractions for
/// instances that start or pause within the step).
fn account(
    sum: &mut Summary,
    pool: &Pool,
    services: &[SimService],
    step: usize,
    instances: &[f64],
    machines: usize,
) {
    let mut violated = false;
    let mut used_slots = 0.0;
    if pool.record && sum.capacity_per_step.len() < services.len() {
        sum.capacity_per_step = vec![Vec::new(); services.len()];
    }
    if sum.per_service.len() < services.len() {
        sum.per_service = vec![Served::default(); services.len()];
    }
    for (k, (s, &n)) in services.iter().zip(instances).enumerate() {
        let d = s.demand.get(step).copied().unwrap_or(0.0) * pool.step_s;
        let cap = n * s.capacity_rps * pool.step_s;
        let served = d.min(cap);
        let e = &mut sum.per_service[k];
        e.demand += d;
        e.served += served;
        e.dropped += d - served;
        if d - served > 1e-6 {
            violated = true;
        }
        // Busy slots: the served demand in instance-equivalents.
        used_slots += served / pool.step_s / s.capacity_rps / slots_per_machine(pool, s) as f64;
        if pool.record {
            sum.capacity_per_step[k].push(n * s.capacity_rps);
        }
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

fn peak(values: &[f64]) -> f64 {
    values.iter().fold(0.0f64, |a, b| a.max(*b))
}

/// The lower bound: each step, the instances the demand needs (no headroom, no min), packed
/// perfectly; machine-hours summed, peak the maximum.
pub fn lower_bound(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    for t in 0..steps(services) {
        let need: Vec<f64> = services
            .iter()
            .map(|s| (s.demand.get(t).copied().unwrap_or(0.0) / s.capacity_rps).ceil())
            .collect();
        let machines = services
            .iter()
            .zip(&need)
            .map(|(s, &n)| n / slots_per_machine(pool, s) as f64)
            .sum::<f64>()
            .ceil() as usize;
        account(&mut sum, pool, services, t, &need, machines);
    }
    finish(sum, services)
}

fn finish(mut sum: Summary, services: &[SimService]) -> Summary {
    let n = steps(services).max(1) as f64;
    sum.mean_utilisation /= n;
    sum.services = services
        .iter()
        .zip(std::mem::take(&mut sum.per_service))
        .map(|(s, x)| (s.name.clone(), x))
        .collect();
    sum
}

/// First-fit-decreasing count of machines for whole instances. Identical instances are placed
/// in bulk (a bin takes as many as fit), which is what first-fit does with them one by one.
fn pack(services: &[SimService], instances: &[usize], pool: &Pool) -> usize {
    let mut shapes: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for (s, &n) in services.iter().zip(instances) {
        *shapes.entry((s.memory_mib, s.vcpus)).or_default() += n;
    }
    let mut bins: Vec<(u32, u32)> = Vec::new();
    for (&(mem, cpu), &count) in shapes.iter().rev() {
        let fit = |b: &(u32, u32)| (b.0 / cpu.max(1)).min(b.1 / mem.max(1)) as usize;
        let mut left = count;
        for b in bins.iter_mut() {
            if left == 0 {
                break;
            }
            let k = fit(b).min(left);
            b.0 -= k as u32 * cpu;
            b.1 -= k as u32 * mem;
            left -= k;
        }
        let per = fit(&(pool.vcpus, pool.memory_mib)).max(1);
        while left > 0 {
            let k = per.min(left);
            bins.push((
                pool.vcpus.saturating_sub(k as u32 * cpu),
                pool.memory_mib.saturating_sub(k as u32 * mem),
            ));
            left -= k;
        }
    }
    bins.len()
}

/// The share of a step an instance that becomes ready at `ready_at_s` serves.
fn serving_share(ready_at_s: f64, step_start_s: f64, step_s: f64) -> f64 {
    ((step_start_s + step_s - ready_at_s) / step_s).clamp(0.0, 1.0)
}

/// Runs one policy over the traces with vMatrix's `decide`.
pub fn run(kind: PolicyKind, services: &[SimService], pool: &Pool, config: &Config) -> Summary {
    run_with(kind, services, pool, config, &mut vmatrix_policy::decide)
}

/// [`run`] with the decision function passed in (the scale benchmark times each call).
pub fn run_with(
    kind: PolicyKind,
    services: &[SimService],
    pool: &Pool,
    config: &Config,
    decide: &mut dyn FnMut(&Snapshot, &Config) -> Vec<Action>,
) -> Summary {
    match kind {
        PolicyKind::Static => run_static(services, pool),
        PolicyKind::Reactive => run_reactive(services, pool),
        PolicyKind::Switching | PolicyKind::SwitchingDrop => {
            run_switching(kind, services, pool, config, decide)
        }
    }
}

fn run_static(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    let instances: Vec<usize> = services
        .iter()
        .map(|s| ((peak(&s.demand) / s.capacity_rps).ceil() as usize).max(s.min as usize))
        .collect();
    // Each service owns its machines.
    let machines: usize = services
        .iter()
        .zip(&instances)
        .map(|(s, &n)| n.div_ceil(slots_per_machine(pool, s)))
        .sum();
    sum.activations = instances.iter().sum::<usize>() as u64;
    let serving: Vec<f64> = instances.iter().map(|&n| n as f64).collect();
    for t in 0..steps(services) {
        account(&mut sum, pool, services, t, &serving, machines);
    }
    finish(sum, services)
}

fn run_reactive(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    let window = (600.0 / pool.step_s).ceil().max(1.0) as usize;
    // Booting instances per service: (ready at, how many).
    let mut booting: Vec<VecDeque<(f64, usize)>> = vec![VecDeque::new(); services.len()];
    let mut prev: Vec<usize> = vec![0; services.len()];
    for t in 0..steps(services) {
        let now = t as f64 * pool.step_s;
        // It sizes from what it has seen (up to the previous step, history included).
        let target: Vec<usize> = services
            .iter()
            .map(|s| {
                let seen = s
                    .history
                    .iter()
                    .chain(&s.demand[..t.min(s.demand.len())])
                    .rev()
                    .take(window)
                    .fold(0.0f64, |a, b| a.max(*b));
                ((seen * 1.5 / s.capacity_rps).ceil() as u32).clamp(s.min.max(1), s.max.max(1))
                    as usize
            })
            .collect();
        let mut serving = Vec::with_capacity(services.len());
        for k in 0..services.len() {
            let (n, p) = (target[k], prev[k]);
            if n > p {
                // The first step counts as already running (a cluster that was up before).
                let ready = if t == 0 {
                    now
                } else {
                    now + pool.latencies.boot_s
                };
                booting[k].push_back((ready, n - p));
                sum.activations += (n - p) as u64;
            } else {
                // Scale-in stops the youngest first.
                let mut extra = p - n;
                while extra > 0 {
                    let Some(last) = booting[k].back_mut() else {
                        break;
                    };
                    let cut = extra.min(last.1);
                    last.1 -= cut;
                    extra -= cut;
                    if last.1 == 0 {
                        booting[k].pop_back();
                    }
                }
            }
            let pending: usize = booting[k].iter().map(|b| b.1).sum();
            let partial: f64 = booting[k]
                .iter()
                .map(|&(r, c)| c as f64 * serving_share(r, now, pool.step_s))
                .sum();
            serving.push((n - pending) as f64 + partial);
            booting[k].retain(|&(r, _)| r > now + pool.step_s);
        }
        let machines = pack(services, &target, pool);
        account(&mut sum, pool, services, t, &serving, machines);
        prev = target;
    }
    finish(sum, services)
}

/// The configuration the simulator runs vMatrix's policy with, for steps of `step_s`: 10%
/// headroom over the last 2 minutes' maximum, scale-in only when the last 7 minutes agree (and
/// it sheds more than 10%), and the weekly pattern: the demand one week ago, from now to 5
/// minutes ahead, is provisioned before it comes back. Chosen on the development traces
/// (docs/benchmarks.md shows the sweep).
pub fn switching_config(step_s: f64) -> Config {
    let ticks = |s: f64| (s / step_s).ceil().max(1.0) as usize;
    Config {
        headroom: 1.1,
        scale_out_window: ticks(120.0),
        scale_in_window: ticks(420.0),
        max_moves: 8,
        consolidate_below: 0.95,
        seasonal_periods: vec![ticks(86400.0), ticks(7.0 * 86400.0)],
        seasonal_lookahead: ticks(300.0),
        ..Config::default()
    }
}

fn run_switching(
    kind: PolicyKind,
    services: &[SimService],
    pool: &Pool,
    config: &Config,
    decide: &mut dyn FnMut(&Snapshot, &Config) -> Vec<Action>,
) -> Summary {
    let mut sum = Summary::default();
    let machines = if kind == PolicyKind::SwitchingDrop {
        pool.machines
    } else {
        // As many as static peak provisioning with headroom would own: more is never useful.
        services
            .iter()
            .map(|s| {
                ((peak(&s.demand).max(peak(&s.history)) * config.headroom.max(1.5) / s.capacity_rps)
                    .ceil() as usize
                    + s.min as usize
                    + 1)
                .div_ceil(slots_per_machine(pool, s))
            })
            .sum::<usize>()
            .max(1)
    };
    let keep = config
        .seasonal_periods
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .max(config.scale_in_window)
        .max(config.scale_out_window)
        + config.seasonal_lookahead
        + 1;
    let trim = |d: &mut Vec<f64>| {
        // Amortised: cut only when twice as long as needed.
        if d.len() > 2 * keep {
            d.drain(..d.len() - keep);
        }
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
                cpu_load: 0.0,
            })
            .collect(),
        services: services
            .iter()
            .map(|s| {
                let mut demand = s.history.clone();
                if demand.len() > keep {
                    demand.drain(..demand.len() - keep);
                }
                Service {
                    name: s.name.clone(),
                    priority: s.priority,
                    capacity_rps: s.capacity_rps,
                    min: s.min,
                    max: s.max,
                    vcpus: s.vcpus,
                    memory_mib: s.memory_mib,
                    demand,
                    forecast_rps: 0.0,
                    dropped: false,
                }
            })
            .collect(),
        instances: Vec::new(),
    };
    // When each instance serves (kept beside `snap.instances`, index for index).
    let mut ready_at: Vec<f64> = Vec::new();
    let mut serial = 0u64;
    let mut serving = vec![0.0f64; services.len()];
    let mut busy = vec![false; machines];
    let mut downtime = vec![0.0f64; services.len()];
    let mut gone: Vec<usize> = Vec::new();
    for t in 0..steps(services) {
        let now = t as f64 * pool.step_s;
        // The policy sees demand up to the previous step, like the controller does.
        if t > 0 {
            for (ss, s) in snap.services.iter_mut().zip(services) {
                ss.demand.push(s.demand.get(t - 1).copied().unwrap_or(0.0));
                trim(&mut ss.demand);
            }
        }
        snap.now_s = now;
        let plan = decide(&snap, config);
        downtime.iter_mut().for_each(|x| *x = 0.0);
        busy.iter_mut().for_each(|b| *b = false);
        gone.clear();
        for a in &plan {
            match *a {
                // Its machine is busy while it saves its state.
                Action::Suspend { instance, .. } if pool.latencies.suspend_s > 0.0 => {
                    if let Some(m) = snap.instances.get(instance).and_then(|i| i.machine) {
                        busy[m] = true;
                    }
                }
                Action::Resume { instance, .. } => {
                    sum.activations += 1;
                    if let Some(r) = ready_at.get_mut(instance) {
                        *r = now + pool.latencies.resume_s;
                    }
                }
                Action::Activate { .. } => sum.activations += 1,
                Action::Migrate { instance, .. } => {
                    sum.migrations += 1;
                    if let Some(i) = snap.instances.get(instance) {
                        downtime[i.service] += pool.latencies.migrate_downtime_s / pool.step_s;
                    }
                }
                Action::Discard { instance, .. } => gone.push(instance),
                _ => {}
            }
        }
        let boot = if t == 0 {
            now
        } else {
            now + pool.latencies.boot_s
        };
        apply(&mut snap, &plan, |name| {
            serial += 1;
            ready_at.push(boot);
            format!("{name}-{serial}")
        });
        // The same removal `apply` made.
        remove_indices(&mut ready_at, &mut gone);
        serving.iter_mut().for_each(|x| *x = 0.0);
        let mut placed = 0;
        for (i, &r) in snap.instances.iter_mut().zip(&ready_at) {
            let Some(m) = i.machine else {
                continue;
            };
            match i.state {
                InstanceState::Running => serving[i.service] += 1.0,
                InstanceState::Starting => {
                    serving[i.service] += serving_share(r, now, pool.step_s);
                    if r <= now + pool.step_s {
                        i.state = InstanceState::Running;
                    }
                }
                _ => continue,
            }
            busy[m] = true;
            placed += 1;
        }
        sum.instances_per_step.push(placed);
        for (s, d) in serving.iter_mut().zip(&downtime) {
            *s = (*s - d).max(0.0);
        }
        let in_use = busy.iter().filter(|b| **b).count();
        account(&mut sum, pool, services, t, &serving, in_use);
    }
    finish(sum, services)
}

/// A trace cut to the simulated window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trace {
    /// The steps before the window (the policies' history).
    pub history: Vec<f64>,
    /// The steps of the window.
    pub demand: Vec<f64>,
}

/// Parses a `t_seconds,value` CSV (header allowed) into values at `step_s` (the mean of the
/// samples in each step), the window `[start_s, end_s)` (all of it when none) as the demand and
/// what comes before it as history, rescaled so that the window's peak is `peak` (if given).
pub fn parse_trace(
    text: &str,
    step_s: f64,
    window: Option<(f64, f64)>,
    peak_rps: Option<f64>,
) -> Result<Trace, String> {
    if step_s.is_nan() || step_s <= 0.0 {
        return Err(format!("a step of {step_s} s: use a positive step"));
    }
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
            (Ok(t), Ok(v)) if t.is_finite() && v.is_finite() && v >= 0.0 => points.push((t, v)),
            (Ok(_), Ok(_)) => {
                return Err(format!(
                    "line {}: {line:?}: values must be finite and not negative",
                    n + 1
                ))
            }
            _ if n == 0 => continue,
            _ => return Err(format!("line {}: {line:?} is not two numbers", n + 1)),
        }
    }
    if points.is_empty() {
        return Err("no samples".into());
    }
    let t0 = points.iter().fold(f64::INFINITY, |a, p| a.min(p.0));
    let last = points.iter().fold(t0, |a, p| a.max(p.0));
    let n = ((last - t0) / step_s).floor() as usize + 1;
    let mut sums = vec![0.0; n];
    let mut counts = vec![0u32; n];
    for (t, v) in points {
        let i = (((t - t0).max(0.0) / step_s).floor() as usize).min(n - 1);
        sums[i] += v;
        counts[i] += 1;
    }
    let mut values: Vec<f64> = sums
        .iter()
        .zip(&counts)
        .map(|(s, c)| if *c == 0 { 0.0 } else { s / f64::from(*c) })
        .collect();
    let (from, to) = match window {
        None => (0, n),
        Some((s, e)) => {
            let at = |x: f64| (((x - t0) / step_s).ceil().max(0.0) as usize).min(n);
            (at(s), at(e))
        }
    };
    if from >= to {
        let span = (last - t0) / 86400.0;
        return Err(format!(
            "the window holds no samples: the trace spans {span:.1} days from t={t0} s"
        ));
    }
    if let Some(p) = peak_rps {
        let max = peak(&values[from..to]);
        if max > 0.0 {
            for v in &mut values {
                *v *= p / max;
            }
        }
    }
    let demand = values[from..to].to_vec();
    values.truncate(from);
    Ok(Trace {
        history: values,
        demand,
    })
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
            history: Vec::new(),
            demand,
        }
    }

    fn pool(machines: usize) -> Pool {
        Pool::new(machines, 8, 2048)
    }

    fn run(kind: PolicyKind, services: &[SimService], pool: &Pool) -> Summary {
        super::run(kind, services, pool, &switching_config(pool.step_s))
    }

    #[test]
    fn traces_parse_window_and_rescale() {
        let text = "t_seconds,value\n0,10\n60,20\n120,40\n180,0\n";
        assert_eq!(
            parse_trace(text, 60.0, None, None).unwrap().demand,
            vec![10.0, 20.0, 40.0, 0.0]
        );
        let cut = parse_trace(text, 60.0, Some((60.0, 180.0)), Some(100.0)).unwrap();
        assert_eq!(cut.demand, vec![50.0, 100.0]);
        assert_eq!(cut.history, vec![25.0], "scaled like the window");
        assert!(parse_trace("t,v\n1,x\n", 60.0, None, None).is_err());
        assert!(parse_trace(text, 60.0, Some((600.0, 900.0)), None)
            .unwrap_err()
            .contains("no samples"));
        assert!(parse_trace("0,-1\n", 60.0, None, None).is_err());
    }

    #[test]
    fn a_spike_is_served_one_tick_and_one_boot_after_it_is_seen() {
        let mut demand = vec![40.0; 600];
        for d in &mut demand[300..] {
            *d = 1500.0;
        }
        let services = vec![svc("sports", 5, demand)];
        let mut p = pool(100);
        p.record = true;
        let r = run(PolicyKind::Switching, &services, &p);
        let cap = &r.capacity_per_step[0];
        assert!(cap[299] < 200.0, "sized for 40 req/s before: {}", cap[299]);
        assert!(cap[300] < 1500.0, "the spike's own step is not foreseen");
        // Step 301: the controller has seen it and cold-booted; new instances serve after 6.4 s.
        let booted = 1.0 - p.latencies.boot_s / p.step_s;
        assert!(
            cap[301] >= 1500.0 * booted * 0.99,
            "step 301 has {} req/s of capacity",
            cap[301]
        );
        assert!(cap[302] >= 1500.0, "fully scaled out: {}", cap[302]);
    }

    #[test]
    fn reactive_follows_the_hpa_rule() {
        // 10 minutes' maximum × 1.5 ÷ 50 req/s: 1000 req/s → 30 instances, kept for 10 minutes.
        let mut demand = vec![0.0; 40];
        demand[10] = 1000.0;
        let services = vec![svc("web", 1, demand)];
        let mut p = pool(100);
        p.record = true;
        let r = run(PolicyKind::Reactive, &services, &p);
        let cap = &r.capacity_per_step[0];
        assert_eq!(cap[10], 50.0, "min 1 until it has seen the spike");
        let booted = 30.0 - 29.0 * p.latencies.boot_s / p.step_s;
        assert!((cap[11] - booted * 50.0).abs() < 1e-6, "{}", cap[11]);
        assert_eq!(cap[20], 1500.0);
        assert_eq!(cap[21], 50.0, "the spike left the 10-minute window");
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
        // 16 slots; each needs 12 (600 req/s ÷ 50) and wants 14 (10% headroom): finance takes
        // 14, sports serves with the 2 left.
        let small = run(PolicyKind::SwitchingDrop, &services, &pool(2));
        let large = run(PolicyKind::SwitchingDrop, &services, &pool(10));
        let f = |s: &Summary, n: &str| s.services[n].served / s.services[n].demand;
        assert!(
            (f(&small, "finance") - f(&large, "finance")).abs() < 0.02,
            "finance {} vs {}",
            f(&small, "finance"),
            f(&large, "finance")
        );
        assert!(
            (f(&small, "sports") - 2.0 / 12.0).abs() < 0.02,
            "sports keeps only the leftovers: {}",
            f(&small, "sports")
        );
    }
}
