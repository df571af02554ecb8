//! vMatrix's policy in the simulator, with honest time. Each step's demand is seen
//! `detect_s` into the step (the switch reports every second); until then, what the last tick
//! set up serves. Then, as the controller does on a load report and on its next one-second
//! tick, the fast path ([`vmatrix_policy::react`]: unpause standbys, pause lower priorities
//! for CPU) and `decide` run on the demand seen so far; what they start serves after its
//! measured latency (unpause, resume from the repository, cold boot) from then on.
//!
//! The controller runs the same two with the same [`Settings`]: the fast path on every load
//! report, `decide` every second. (A `decide` at the step's start would see nothing the last
//! one did not.)

use vmatrix_policy::{apply, react, remove_indices, InstanceState, Machine, Memory, Service};

use crate::{
    account, finish, peak, slots_per_machine, steps, Action, Config, PolicyKind, Pool, Settings,
    SimService, Snapshot, StepCapacity, Summary,
};

/// The state of one run.
struct Run<'a> {
    pool: &'a Pool,
    snap: Snapshot,
    /// When each instance serves (beside `snap.instances`, index for index).
    ready_at: Vec<f64>,
    /// Instances paused part-way into this step, and when they stopped serving (seconds in).
    stopped: Vec<(usize, f64)>,
    /// Machines busy this step though empty at its end (an instance left or saved its state).
    busy: Vec<bool>,
    /// Instance-steps lost to migration downtime, per service.
    downtime: Vec<f64>,
    serial: u64,
    /// Paused instances at the end of the last step (the fast path has nothing to do without).
    paused: usize,
    sum: Summary,
}

impl Run<'_> {
    /// Carries out `plan` (made from `self.snap`) at `at_s` into the step that starts at
    /// `step_s`: counts it, applies it, and sets when what it starts serves.
    fn carry_out(&mut self, plan: &[Action], at_s: f64, step_s: f64, first: bool) {
        let lat = self.pool.latencies;
        let mut gone = Vec::new();
        for a in plan {
            match *a {
                // Its machine is busy while it saves its state.
                Action::Suspend { instance, .. } if lat.suspend_s > 0.0 => {
                    if let Some(m) = self.snap.instances.get(instance).and_then(|i| i.machine) {
                        self.busy[m] = true;
                    }
                }
                Action::Resume { instance, .. } => {
                    self.sum.activations += 1;
                    self.sum.resumes += 1;
                    self.ready_at[instance] = at_s + lat.resume_s;
                }
                Action::Unpause { instance, .. } => {
                    self.sum.unpauses += 1;
                    self.ready_at[instance] = self.ready_at[instance].max(at_s + lat.unpause_s);
                }
                Action::Pause { instance, .. } => {
                    self.sum.pauses += 1;
                    if self.snap.instances[instance].state == InstanceState::Running {
                        // It served until now.
                        let until = (at_s - step_s).clamp(0.0, self.pool.step_s);
                        self.stopped.push((instance, until));
                    }
                }
                Action::Activate { .. } | Action::Prepare { .. } => self.sum.activations += 1,
                Action::Migrate { instance, .. } => {
                    self.sum.migrations += 1;
                    if let Some(i) = self.snap.instances.get(instance) {
                        self.downtime[i.service] += lat.migrate_downtime_s / self.pool.step_s;
                    }
                }
                Action::Discard { instance, .. } => gone.push(instance),
                _ => {}
            }
        }
        // The cluster that was up before the first step counts as booted.
        let boot = if first { at_s } else { at_s + lat.boot_s };
        let (ready_at, serial) = (&mut self.ready_at, &mut self.serial);
        apply(&mut self.snap, plan, |name| {
            *serial += 1;
            ready_at.push(boot);
            format!("{name}-{serial}")
        });
        // The same removal `apply` made (sorted by it), and the indices after it.
        remove_indices(&mut self.ready_at, &mut gone);
        if !gone.is_empty() {
            self.stopped
                .retain_mut(|(idx, _)| match gone.binary_search(idx) {
                    Ok(_) => false,
                    Err(before) => {
                        *idx -= before;
                        true
                    }
                });
        }
    }
}

/// Runs `switching` or `switching-drop` over the traces.
pub(crate) fn run(
    kind: PolicyKind,
    services: &[SimService],
    pool: &Pool,
    settings: &Settings,
    decide: &mut dyn FnMut(&Snapshot, &Config) -> Vec<Action>,
) -> Summary {
    let config = settings.config(pool.step_s);
    let lat = pool.latencies;
    let machines = if kind == PolicyKind::SwitchingDrop {
        pool.machines
    } else {
        // As many as static peak provisioning with headroom would own, standbys included: more
        // is never useful.
        services
            .iter()
            .map(|s| {
                ((peak(&s.demand).max(peak(&s.history)) * config.headroom.max(1.5) / s.capacity_rps)
                    .ceil() as usize
                    + (s.min + s.standby_max) as usize
                    + 1)
                .div_ceil(slots_per_machine(pool, s))
            })
            .sum::<usize>()
            .max(1)
    };
    let keep = settings.history_ticks(pool.step_s);
    let trim = |d: &mut Vec<f64>| {
        // Amortised: cut only when twice as long as needed.
        if d.len() > 2 * keep {
            d.drain(..d.len() - keep);
        }
    };
    // The one forecast and spike history, fed with the history before the window.
    let mut memory: Vec<Memory> = services
        .iter()
        .map(|s| {
            let mut m = Memory::new(settings);
            let n = s.history.len();
            for (k, v) in s.history.iter().enumerate() {
                m.record(-((n - k) as f64) * pool.step_s, Some(*v));
            }
            m
        })
        .collect();
    let snap = Snapshot {
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
                    standby_max: s.standby_max,
                    spike_rps: 0.0,
                    spread: s.spread,
                }
            })
            .collect(),
        instances: Vec::new(),
    };
    let mut r = Run {
        pool,
        snap,
        ready_at: Vec::new(),
        stopped: Vec::new(),
        busy: vec![false; machines],
        downtime: vec![0.0; services.len()],
        serial: 0,
        paused: 0,
        sum: Summary::default(),
    };
    let mut serving = vec![StepCapacity::default(); services.len()];
    let react_at = lat.detect_s.min(pool.step_s);
    for t in 0..steps(services) {
        let now = t as f64 * pool.step_s;
        // The step's demand is seen `detect_s` into it (at once in the first step: the
        // cluster that was up before was sized for it). Until then what the last tick set up
        // serves; the fast path and the tick react then, and what they start serves after its
        // latency from there.
        let at = if t == 0 { now } else { now + react_at };
        for ((ss, s), m) in r.snap.services.iter_mut().zip(services).zip(&mut memory) {
            let d = s.demand.get(t).copied().unwrap_or(0.0);
            ss.demand.push(d);
            trim(&mut ss.demand);
            m.record(now, Some(d));
            ss.forecast_rps = m.forecast(at);
            ss.spike_rps = m.spike();
        }
        r.snap.now_s = at;
        r.busy.iter_mut().for_each(|b| *b = false);
        r.downtime.iter_mut().for_each(|x| *x = 0.0);
        r.stopped.clear();
        if r.paused > 0 {
            let fast = react(&r.snap);
            r.carry_out(&fast, at, now, false);
        }
        let plan = decide(&r.snap, &config);
        r.carry_out(&plan, at, now, t == 0);
        // What served, and which machines held something.
        serving.iter_mut().for_each(StepCapacity::clear);
        let mut placed = 0;
        r.paused = 0;
        for (i, &ready) in r.snap.instances.iter_mut().zip(&r.ready_at) {
            let Some(m) = i.machine else {
                continue;
            };
            match i.state {
                // Most serve the whole step: counted without the general case's arithmetic.
                InstanceState::Running if ready <= now => serving[i.service].base += 1.0,
                InstanceState::Running | InstanceState::Starting => {
                    if ready <= now + pool.step_s {
                        i.state = InstanceState::Running;
                    }
                    serving[i.service].add(ready - now, pool.step_s, pool.step_s);
                }
                InstanceState::Paused => r.paused += 1,
                _ => continue,
            }
            r.busy[m] = true;
            placed += 1;
        }
        // What a pause part-way into the step let serve before it.
        for &(idx, until) in &r.stopped {
            let i = &r.snap.instances[idx];
            if i.state == InstanceState::Paused {
                serving[i.service].add(r.ready_at[idx] - now, until, pool.step_s);
            }
        }
        r.sum.instances_per_step.push(placed);
        r.sum.instance_minutes += placed as f64 * pool.step_s / 60.0;
        for (s, d) in serving.iter_mut().zip(&r.downtime) {
            s.base = (s.base - d).max(0.0);
        }
        let in_use = r.busy.iter().filter(|b| **b).count();
        account(&mut r.sum, pool, services, t, &mut serving, in_use);
    }
    finish(r.sum, services)
}
