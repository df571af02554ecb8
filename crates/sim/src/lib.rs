//! The simulator: discrete time over demand traces, driving the *same* `decide` the controller
//! runs, next to reference policies — `static` (every service owns machines for its own peak)
//! and `reactive` (target tracking as Kubernetes' HPA does it: the last 10 minutes' maximum ×
//! 1.5 headroom ÷ capacity, bin-packed, no priorities; it reacts within a step after the same
//! detection delay, paying a cold boot) — and the lower bound (at each step the
//! fewest machines that hold the instances the demand needs, with perfect foresight, no headroom
//! and free moves).
//!
//! Pure: traces come in as numbers, results go out as data. No I/O, no clock.
//!
//! Honest time: the policy's tick at the start of a step sees demand only up to the previous
//! step; what it starts serves after the measured latency (boot, resume from the repository).
//! Within the step, the fast path ([`vmatrix_policy::react`]) sees the step's demand after the
//! detection delay and unpauses warm standbys (pausing lower priorities for CPU), which serve
//! from then on. Requests beyond capacity are held by the switch and served later in the same
//! step when capacity is left (a step's served volume is the smaller of its demand and its
//! capacity). CPU and memory are separate: paused standbys hold memory, not CPU; a machine
//! holding anything is in use.

pub mod plot;
pub mod scale;
pub mod suite;
mod switching;

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
pub use vmatrix_policy::{decide, Action, Config, Settings, Sharing, Snapshot};

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
    /// Demand before the simulated span, requests/s, one value per step: the policies see it as
    /// history (a controller that ran before), it is not counted.
    pub history: Vec<f64>,
    /// Demand, requests/s, one value per step.
    pub demand: Vec<f64>,
    /// Most warm standbys.
    pub standby_max: u32,
    /// Instances on different machines where the pool allows.
    pub spread: bool,
}

impl Default for SimService {
    fn default() -> Self {
        Self {
            name: String::new(),
            priority: 0,
            capacity_rps: 50.0,
            min: 1,
            max: 1,
            vcpus: 1,
            memory_mib: 256,
            history: Vec::new(),
            demand: Vec::new(),
            standby_max: 0,
            spread: true,
        }
    }
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
    /// From a change of demand to the fast path seeing it: the switch reports load every
    /// second.
    pub detect_s: f64,
    /// Unpausing a paused instance to serving (QMP `cont`).
    pub unpause_s: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            boot_s: 6.4,
            resume_s: 0.31,
            suspend_s: 0.12,
            migrate_downtime_s: 0.08,
            detect_s: 1.0,
            unpause_s: 0.01,
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
    /// Requests that arrived while the capacity serving them was short and waited (held by the
    /// switch) for capacity that came later in the step: served, but late.
    pub held: f64,
}

/// One service's capacity over one step: instances serving from its start, and changes within
/// it (an instance that becomes ready, or is paused, part-way).
#[derive(Debug, Clone, Default)]
pub(crate) struct StepCapacity {
    /// Instances serving from the step's start.
    pub(crate) base: f64,
    /// (seconds into the step, change in instances).
    pub(crate) changes: Vec<(f64, f64)>,
}

impl StepCapacity {
    pub(crate) fn clear(&mut self) {
        self.base = 0.0;
        self.changes.clear();
    }

    /// An instance serving from `from` to `to` seconds into a step of `step_s`.
    #[inline]
    pub(crate) fn add(&mut self, from: f64, to: f64, step_s: f64) {
        let (from, to) = (from.clamp(0.0, step_s), to.clamp(0.0, step_s));
        if to <= from {
            return;
        }
        if from <= 0.0 {
            self.base += 1.0;
        } else {
            self.changes.push((from, 1.0));
        }
        if to < step_s {
            self.changes.push((to, -1.0));
        }
    }

    /// Instance-steps served (∫ instances dt ÷ step).
    pub(crate) fn instances(&self, step_s: f64) -> f64 {
        self.base
            + self
                .changes
                .iter()
                .map(|(at, d)| d * (step_s - at) / step_s)
                .sum::<f64>()
    }

    /// Requests arriving at `rps` while `C(t) × capacity_rps` is below it: ∫ (rps − C·cap)⁺ dt.
    pub(crate) fn held(&mut self, rps: f64, capacity_rps: f64, step_s: f64) -> f64 {
        self.changes
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        let (mut c, mut t, mut held) = (self.base, 0.0, 0.0);
        for &(at, d) in &self.changes {
            held += (rps - c * capacity_rps).max(0.0) * (at - t);
            c += d;
            t = at;
        }
        held + (rps - c * capacity_rps).max(0.0) * (step_s - t)
    }
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
    /// Instances started (cold boots and resumes from the repository).
    pub activations: u64,
    /// Of those, resumes from the repository.
    pub resumes: u64,
    /// Warm standbys unpaused (by the tick or the fast path).
    pub unpauses: u64,
    /// Instances paused (standbys made from running instances, or server drop).
    pub pauses: u64,
    /// Minutes instances held a machine (running, starting or paused), summed.
    pub instance_minutes: f64,
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

pub(crate) fn slots_per_machine(pool: &Pool, s: &SimService) -> usize {
    (pool.vcpus / s.vcpus.max(1))
        .min(pool.memory_mib / s.memory_mib.max(1))
        .max(1) as usize
}

/// Counts one step: `capacity` is each service's capacity over the step.
pub(crate) fn account(
    sum: &mut Summary,
    pool: &Pool,
    services: &[SimService],
    step: usize,
    capacity: &mut [StepCapacity],
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
    for (k, (s, c)) in services.iter().zip(capacity).enumerate() {
        let rps = s.demand.get(step).copied().unwrap_or(0.0);
        let d = rps * pool.step_s;
        let n = c.instances(pool.step_s);
        let cap = n * s.capacity_rps * pool.step_s;
        let served = d.min(cap);
        let e = &mut sum.per_service[k];
        e.demand += d;
        e.served += served;
        e.dropped += d - served;
        // What waited and was then served (the rest of the shortfall is dropped).
        e.held += (c.held(rps, s.capacity_rps, pool.step_s) - (d - served)).max(0.0);
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

pub(crate) fn steps(services: &[SimService]) -> usize {
    services.iter().map(|s| s.demand.len()).max().unwrap_or(0)
}

pub(crate) fn peak(values: &[f64]) -> f64 {
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
        let mut cap: Vec<StepCapacity> = need
            .iter()
            .map(|&base| StepCapacity {
                base,
                changes: Vec::new(),
            })
            .collect();
        account(&mut sum, pool, services, t, &mut cap, machines);
    }
    finish(sum, services)
}

pub(crate) fn finish(mut sum: Summary, services: &[SimService]) -> Summary {
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

/// Runs one policy over the traces with vMatrix's `decide`, configured by `settings` (the
/// same [`Settings`] the controller runs).
pub fn run(kind: PolicyKind, services: &[SimService], pool: &Pool, settings: &Settings) -> Summary {
    run_with(kind, services, pool, settings, &mut vmatrix_policy::decide)
}

/// [`run`] with the decision function passed in (the scale benchmark times each call).
pub fn run_with(
    kind: PolicyKind,
    services: &[SimService],
    pool: &Pool,
    settings: &Settings,
    decide: &mut dyn FnMut(&Snapshot, &Config) -> Vec<Action>,
) -> Summary {
    match kind {
        PolicyKind::Static => run_static(services, pool),
        PolicyKind::Reactive => run_reactive(services, pool),
        PolicyKind::Switching | PolicyKind::SwitchingDrop => {
            switching::run(kind, services, pool, settings, decide)
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
    let mut serving: Vec<StepCapacity> = instances
        .iter()
        .map(|&n| StepCapacity {
            base: n as f64,
            changes: Vec::new(),
        })
        .collect();
    for t in 0..steps(services) {
        account(&mut sum, pool, services, t, &mut serving, machines);
    }
    finish(sum, services)
}

fn run_reactive(services: &[SimService], pool: &Pool) -> Summary {
    let mut sum = Summary::default();
    let window = (600.0 / pool.step_s).ceil().max(1.0) as usize;
    // Booting instances per service: (ready at, how many).
    let mut booting: Vec<VecDeque<(f64, usize)>> = vec![VecDeque::new(); services.len()];
    let mut prev: Vec<usize> = vec![0; services.len()];
    let rule = |s: &SimService, upto: usize| {
        let seen = s
            .history
            .iter()
            .chain(&s.demand[..upto.min(s.demand.len())])
            .rev()
            .take(window)
            .fold(0.0f64, |a, b| a.max(*b));
        ((seen * 1.5 / s.capacity_rps).ceil() as u32).clamp(s.min.max(1), s.max.max(1)) as usize
    };
    for t in 0..steps(services) {
        let now = t as f64 * pool.step_s;
        let mut targets = Vec::with_capacity(services.len());
        let mut serving = Vec::with_capacity(services.len());
        for (k, s) in services.iter().enumerate() {
            // At the step's start it sizes from what it has seen (up to the previous step,
            // history included); `detect_s` into the step it sees the step's demand and scales
            // out again if that asks for more — the same reaction vMatrix's policy gets.
            let (mut n, p) = (rule(s, t), prev[k]);
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
            let seen = rule(s, t + 1);
            if t > 0 && seen > n {
                let ready = now + pool.latencies.detect_s + pool.latencies.boot_s;
                booting[k].push_back((ready, seen - n));
                sum.activations += (seen - n) as u64;
                n = seen;
            }
            let pending: usize = booting[k].iter().map(|b| b.1).sum();
            let mut cap = StepCapacity {
                base: (n - pending) as f64,
                changes: Vec::new(),
            };
            for &(r, c) in &booting[k] {
                for _ in 0..c {
                    cap.add(r - now, pool.step_s, pool.step_s);
                }
            }
            serving.push(cap);
            booting[k].retain(|&(r, _)| r > now + pool.step_s);
            targets.push(n);
        }
        let machines = pack(services, &targets, pool);
        account(&mut sum, pool, services, t, &mut serving, machines);
        prev = targets;
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
            ..SimService::default()
        }
    }

    fn pool(machines: usize) -> Pool {
        Pool::new(machines, 8, 2048)
    }

    fn run(kind: PolicyKind, services: &[SimService], pool: &Pool) -> Summary {
        super::run(kind, services, pool, &Settings::default())
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
    fn a_spike_is_served_one_detection_and_one_boot_into_its_step() {
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
        // The tick at step 300's start did not foresee it; 1 s in, the reaction cold-boots what
        // 1500 req/s needs, serving 6.4 s later.
        let late = (p.latencies.detect_s + p.latencies.boot_s) / p.step_s;
        assert!(
            cap[300] >= 1500.0 * (1.0 - late) * 0.99 && cap[300] < 1500.0 * 1.1,
            "step 300 has {} req/s of capacity",
            cap[300]
        );
        assert!(cap[301] >= 1500.0, "fully scaled out: {}", cap[301]);
        let x = &r.services["sports"];
        // Headroom makes up for most of the late start within the step.
        assert!(
            x.dropped < 0.01 * 1500.0 * p.step_s,
            "dropped {}",
            x.dropped
        );
        // What came in the first 7.4 s beyond one instance waited for the boots.
        let waited = (1500.0 - 50.0) * (p.latencies.detect_s + p.latencies.boot_s);
        assert!(
            (x.held - waited).abs() < waited * 0.1,
            "held {} vs {waited}",
            x.held
        );
    }

    #[test]
    fn warm_standbys_serve_a_spike_sooner_than_boots() {
        // A first spike teaches the spike history (both runs hold the same there); the second
        // finds paused standbys (on the
        // machine the service runs on: 7 vCPUs free there).
        let mut demand = vec![40.0; 400];
        for t in (100..110).chain(300..310) {
            demand[t] = 350.0;
        }
        let mut with = svc("sports", 5, demand.clone());
        with.standby_max = 30;
        let p = pool(100);
        let cold = run(PolicyKind::Switching, &[svc("sports", 5, demand)], &p);
        let warm = run(PolicyKind::Switching, &[with], &p);
        let (c, w) = (&cold.services["sports"], &warm.services["sports"]);
        assert!(warm.unpauses > 0, "standbys were unpaused");
        assert!(
            w.held < c.held * 0.7,
            "held with standbys {} vs without {}",
            w.held,
            c.held
        );
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
        assert_eq!(cap[9], 50.0, "min 1 before the spike");
        // It sees the spike 1 s into its step and boots 29 more, serving 6.4 s later.
        let late = (p.latencies.detect_s + p.latencies.boot_s) / p.step_s;
        let booted = 30.0 - 29.0 * late;
        assert!((cap[10] - booted * 50.0).abs() < 1e-6, "{}", cap[10]);
        assert_eq!(cap[11], 1500.0);
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
