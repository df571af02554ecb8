//! What the policy is given: the settings (one configuration, shared with the simulator), the
//! demand sampled each tick from the switch's reports (unknown when a report is missing — never
//! zero), each service's [`vmatrix_policy::Memory`] (the forecast and the spike history), and
//! the snapshot built from the state. Also the one placement: where a machine is not named, the
//! policy's [`vmatrix_policy::place`] picks it.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use vmatrix_core::api::{MachineInfo, MachineRole, MachineState};
use vmatrix_core::{InstanceState, ServiceSpec};
use vmatrix_policy as p;

use crate::control::{now_ms, ControlError, Controller, Result};
use crate::db::InstanceRow;

/// A load report older than this is missing: the demand is unknown (the switch reports every
/// second).
pub(crate) const LOAD_STALE: Duration = Duration::from_secs(3);

/// The reconcile loop's tick, seconds: the policy's windows are counted in these.
pub(crate) const TICK_S: f64 = 1.0;

/// The snapshot and the rows it was made from, index for index.
pub(crate) struct Inputs {
    pub(crate) snapshot: p::Snapshot,
    pub(crate) machines: Vec<MachineInfo>,
}

impl Controller {
    /// Replaces the policy's settings and forgets what the demand memory learnt under the old
    /// ones.
    pub fn set_settings(&self, settings: p::Settings) {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
        self.memory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The policy's settings.
    pub fn settings(&self) -> p::Settings {
        self.settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ticks on which the demand was unknown (the switch's report missing or stale).
    pub fn load_missing(&self) -> u64 {
        self.load_missing.load(Ordering::Relaxed)
    }

    /// Appends this tick's demand sample per service from the switch's latest report — `NaN`
    /// (unknown) when the report is missing or stale, which is logged and counted — and feeds
    /// each service's memory.
    pub(crate) fn sample_demand(&self, services: &[ServiceSpec]) -> HashMap<String, Vec<f64>> {
        let settings = self.settings();
        let load = self.fresh_load(LOAD_STALE);
        if load.is_none() && !services.is_empty() {
            let n = self.load_missing.fetch_add(1, Ordering::Relaxed) + 1;
            if n == 1 || n.is_power_of_two() {
                tracing::warn!(
                    "no load report from the switch in the last {}s ({n} tick(s) so far): demand is unknown, \
                     the policy holds every service's size (is `vmatrix switch` running?)",
                    LOAD_STALE.as_secs()
                );
            }
        }
        let at = self.started.elapsed().as_secs_f64();
        let keep = settings.history_ticks(TICK_S);
        let mut d = self.demand.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|name, _| services.iter().any(|s| s.name.as_str() == name));
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        memory.retain(|name, _| services.iter().any(|s| s.name.as_str() == name));
        for s in services {
            // The last second too: a step of load shows at once, as the fast path sees it (a
            // tick that lagged it would pause again what the fast path just unpaused).
            let rps = load.as_ref().map(|l| {
                l.services
                    .get(s.name.as_str())
                    .map_or(0.0, |x| x.rps.max(x.rps_now))
            });
            memory
                .entry(s.name.to_string())
                .or_insert_with(|| p::Memory::new(&settings))
                .record(at, rps);
            let h = d.entry(s.name.to_string()).or_default();
            h.push_back(rps.unwrap_or(f64::NAN));
            while h.len() > keep {
                h.pop_front();
            }
        }
        d.iter()
            .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
            .collect()
    }

    /// The policy's snapshot of `services` and the state, with `demand` (none: no demand,
    /// for placement only).
    pub(crate) fn inputs(
        &self,
        services: &[ServiceSpec],
        rows: &[InstanceRow],
        demand: Option<&HashMap<String, Vec<f64>>>,
    ) -> Result<Inputs> {
        let dropped = self.db(|d| d.dropped())?;
        let machines = self.machines()?;
        let machine_index: HashMap<&str, usize> = machines
            .iter()
            .enumerate()
            .map(|(k, m)| (m.name.as_str(), k))
            .collect();
        let service_index: HashMap<&str, usize> = services
            .iter()
            .enumerate()
            .map(|(k, s)| (s.name.as_str(), k))
            .collect();
        let at = self.started.elapsed().as_secs_f64();
        let prepared = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let now = now_ms();
        let snapshot = p::Snapshot {
            now_s: at,
            machines: machines
                .iter()
                .map(|m| p::Machine {
                    name: m.name.clone(),
                    dedicated: m.role == MachineRole::Dedicated
                        && m.state != MachineState::Draining,
                    vcpus: m.vcpus,
                    memory_mib: m.memory_mib,
                    healthy: m.state != MachineState::Down,
                    cpu_load: self.cpu_load(&m.name),
                })
                .collect(),
            services: services
                .iter()
                .map(|s| {
                    let mem = memory.get(s.name.as_str());
                    p::Service {
                        name: s.name.to_string(),
                        priority: s.priority,
                        capacity_rps: s.capacity_rps,
                        min: s.min,
                        max: s.max,
                        vcpus: s.vcpus,
                        memory_mib: s.memory_mib,
                        demand: demand
                            .and_then(|d| d.get(s.name.as_str()).cloned())
                            .unwrap_or_default(),
                        forecast_rps: mem.map_or(0.0, |m| m.forecast(at)),
                        // The policy manages its own drops only.
                        dropped: dropped.iter().any(|(d, by)| *by && d == s.name.as_str()),
                        standby_max: s.standby_max,
                        spike_rps: mem.map_or(0.0, |m| m.spike()),
                        spread: s.spread,
                    }
                })
                .collect(),
            // Instances of undeclared services are left out (the loop discards them).
            instances: rows
                .iter()
                // Maintenance instances are the admins': the policy never sees them.
                .filter(|r| r.info.purpose == vmatrix_core::api::Purpose::Live)
                .filter_map(|r| {
                    Some(p::Instance {
                        id: r.info.id.to_string(),
                        service: *service_index.get(r.info.service.as_str())?,
                        // A machine the controller no longer knows is a dead one.
                        machine: (!r.info.machine.is_empty()).then(|| {
                            machine_index
                                .get(r.info.machine.as_str())
                                .copied()
                                .unwrap_or(usize::MAX)
                        }),
                        state: match r.info.state {
                            // A standby on its way (booting, or up and about to be paused)
                            // is a standby, as the simulator has it: not capacity, or the
                            // next tick would prepare more.
                            InstanceState::Activating | InstanceState::Running
                                if prepared.contains(&r.info.id) =>
                            {
                                p::InstanceState::Paused
                            }
                            InstanceState::Running => p::InstanceState::Running,
                            InstanceState::Paused => p::InstanceState::Paused,
                            InstanceState::Suspended => p::InstanceState::Suspended,
                            InstanceState::Failed => p::InstanceState::Failed,
                            InstanceState::Activating
                            | InstanceState::Migrating
                            | InstanceState::Suspending
                            | InstanceState::Discarded => p::InstanceState::Starting,
                        },
                        pinned: r.info.pinned_until_ms > now,
                    })
                })
                .collect(),
        };
        Ok(Inputs { snapshot, machines })
    }

    /// Picks a machine for one more instance of `spec` with the policy's one placement (never
    /// `exclude`), or says why none can take it.
    pub(crate) fn place(&self, spec: &ServiceSpec, exclude: Option<&str>) -> Result<MachineInfo> {
        let services = self.services()?;
        let rows = self.db(|d| d.instances())?;
        let Inputs { snapshot, machines } = self.inputs(&services, &rows, None)?;
        let service = services
            .iter()
            .position(|s| s.name == spec.name)
            .ok_or_else(|| ControlError::NotFound(format!("service {}", spec.name)))?;
        let avoid = exclude.and_then(|x| machines.iter().position(|m| m.name == x));
        if let Some(m) = p::place(&snapshot, service, avoid) {
            return Ok(machines[m].clone());
        }
        // Why not, machine by machine.
        let mut reasons = Vec::new();
        for (k, m) in machines.iter().enumerate() {
            if m.state != MachineState::Up || m.role != MachineRole::Dedicated || Some(k) == avoid {
                reasons.push(format!("{}: {} {:?}", m.name, m.state, m.role));
                continue;
            }
            let (mut cpu, mut mem) = (0u64, 0u64);
            for i in snapshot.instances.iter().filter(|i| i.machine == Some(k)) {
                let s = &snapshot.services[i.service];
                if matches!(
                    i.state,
                    p::InstanceState::Running | p::InstanceState::Starting
                ) {
                    cpu += u64::from(s.vcpus);
                }
                if i.state != p::InstanceState::Suspended && i.state != p::InstanceState::Failed {
                    mem += u64::from(s.memory_mib);
                }
            }
            reasons.push(format!(
                "{}: full ({cpu}/{} vCPU, {mem}/{} MiB)",
                m.name, m.vcpus, m.memory_mib
            ));
        }
        Err(ControlError::Conflict(format!(
            "no machine can take an instance of {} ({} vCPU, {} MiB): {}",
            spec.name,
            spec.vcpus,
            spec.memory_mib,
            if reasons.is_empty() {
                "no machines registered".into()
            } else {
                reasons.join("; ")
            }
        )))
    }
}

impl Controller {
    /// The fast path: on every load report (not on the tick), the policy's
    /// [`vmatrix_policy::react`] on the demand of now — warm standbys of a service whose demand
    /// exceeds its running instances are unpaused, lower priorities paused for their CPU.
    pub async fn fast_loop(self: std::sync::Arc<Self>) {
        loop {
            self.load_came.notified().await;
            if !self.policy.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = self.react() {
                tracing::warn!("fast path: {e}");
            }
        }
    }

    fn react(self: &std::sync::Arc<Self>) -> Result<()> {
        let Some(load) = self.fresh_load(LOAD_STALE) else {
            return Ok(());
        };
        let rows = self.db(|d| d.instances())?;
        if !rows.iter().any(|r| r.info.state == InstanceState::Paused) {
            return Ok(());
        }
        let services = self.services()?;
        let now: HashMap<String, Vec<f64>> = services
            .iter()
            .map(|s| {
                // The last second: a step shows at once (the tick's window is 5 s).
                let rps = load
                    .services
                    .get(s.name.as_str())
                    .map_or(0.0, |l| l.rps.max(l.rps_now));
                (s.name.to_string(), vec![rps])
            })
            .collect();
        let Inputs { mut snapshot, .. } = self.inputs(&services, &rows, Some(&now))?;
        // A standby still booting serves in seconds, not milliseconds: not the fast path's to
        // unpause (the tick may still take it).
        let booting = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        snapshot.instances.retain(|i| {
            !vmatrix_core::InstanceId::new(&i.id).is_ok_and(|id| booting.contains(&id))
        });
        for action in p::react(&snapshot) {
            if action
                .service(&snapshot)
                .and_then(|k| snapshot.services.get(k))
                .is_some_and(|svc| self.is_rolling(&svc.name))
            {
                continue;
            }
            let (i, pause, reason) = match &action {
                p::Action::Pause { instance, reason } => (*instance, true, reason.clone()),
                p::Action::Unpause { instance, reason } => (*instance, false, reason.clone()),
                _ => continue,
            };
            let Some(id) = snapshot
                .instances
                .get(i)
                .and_then(|x| vmatrix_core::InstanceId::new(&x.id).ok())
            else {
                continue;
            };
            let me = self.clone();
            self.spawn_work(async move { me.pause(&id, pause, &reason).await.map(drop) });
        }
        Ok(())
    }
}
