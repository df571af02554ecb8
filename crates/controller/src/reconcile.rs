//! The level-triggered reconcile loop: failed instances replaced, `min` kept (manual mode) or
//! the pure policy's plan carried out (switching mode), each agent call in a bounded task of its
//! own so that one hung machine never holds the loop; a machine is down only when a direct probe
//! fails too. Also the demand history and the season the policy's forecast reads, and the
//! retention loop.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use vmatrix_core::api::MachineInfo;
use vmatrix_core::api::MachineState;
use vmatrix_core::api::Purpose;
use vmatrix_core::{InstanceId, InstanceState, ServiceSpec, Transition};

use crate::actions::Start;
use crate::control::{now_ms, ControlError, Controller, Probe, Result, DOWN_AFTER_MS};
use vmatrix_core::api::{LEASE_MARGIN_MS, LEASE_MS};

impl Controller {
    /// One reconcile pass: replace failed instances, keep every service's `min` running, and
    /// remove instances of services no longer declared. Level-triggered: it only compares the
    /// desired and the observed state, whatever happened before.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let services = self.services()?;
        let rows = self.db(|d| d.instances())?;
        let machines = self.machines()?;
        // After a start, every machine gets a whole lease to be heard from (its heartbeats went
        // nowhere while no controller ran).
        let grace = self.started.elapsed()
            > Duration::from_millis((DOWN_AFTER_MS * 2).max(LEASE_MS + LEASE_MARGIN_MS));
        // Standbys on their way that are no longer booting or running (failed, discarded). One
        // made after `rows` were read is not in them yet: kept.
        self.prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id| match rows.iter().find(|r| r.info.id == *id) {
                Some(r) => matches!(
                    r.info.state,
                    InstanceState::Activating | InstanceState::Running
                ),
                None => true,
            });
        let down = self.confirmed_down(&machines);
        // Replaced only once their lease has lapsed, by a margin: their VMs are stopped by then
        // (fencing), so two copies of an instance never run.
        let lapsed: HashSet<String> = self
            .db(|d| d.machines(now_ms(), LEASE_MS + LEASE_MARGIN_MS))?
            .into_iter()
            .filter(|m| m.state == MachineState::Down)
            .map(|m| m.name)
            .collect();
        if grace {
            self.settle_orphans(&rows, &machines)?;
        }
        for row in &rows {
            if self.is_busy(&row.info.id) {
                continue;
            }
            let on_down_machine = row.info.state.is_placed()
                && grace
                && down.contains(&row.info.machine)
                && lapsed.contains(&row.info.machine);
            if on_down_machine {
                let mut r = row.clone();
                let why = if r.info.state == InstanceState::Activating && r.saved.is_some() {
                    // A resume that never ran there: its saved state is still in the
                    // repository, so it stays suspended.
                    r.info.state = r.info.state.next(Transition::ResumeFailed)?;
                    r.info.machine = String::new();
                    r.info.endpoint = String::new();
                    format!("machine {} is down before its resume ran", row.info.machine)
                } else {
                    r.info.state = r.info.state.next(Transition::Fail)?;
                    format!("machine {} is down", r.info.machine)
                };
                self.db(|d| d.put_instance(&r))?;
                self.event(
                    "controller",
                    &format!("{} {}", r.info.id, r.info.state.as_str()),
                    &why,
                    "lost",
                );
                continue;
            }
            let declared = services.iter().any(|s| s.name == row.info.service);
            if row.info.state == InstanceState::Failed || !declared {
                let why = match (declared, row.info.purpose) {
                    (false, _) => "its service was removed",
                    (true, Purpose::Live) => "replace a failed instance",
                    (true, Purpose::Maintenance) => "a failed maintenance instance (not replaced)",
                };
                let (me, id) = (self.clone(), row.info.id.clone());
                self.spawn_work(async move { me.discard(&id, why).await.map(drop) });
            }
        }
        self.expire_maintenance(&rows);
        if self.policy.load(std::sync::atomic::Ordering::Relaxed) {
            return self.run_policy(&services);
        }
        let rows = self.db(|d| d.instances())?;
        for spec in &services {
            let live = rows
                .iter()
                .filter(|r| {
                    r.info.service == spec.name
                        && r.info.purpose == Purpose::Live
                        && matches!(
                            r.info.state,
                            InstanceState::Activating
                                | InstanceState::Running
                                | InstanceState::Migrating
                        )
                })
                .count() as u32;
            // A rolling service's instances are the rollout's to start and end.
            let name = spec.name.to_string();
            // Activations under way that may not have their row yet count too.
            let under_way = self
                .keeping_min
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name)
                .copied()
                .unwrap_or(0);
            if live.max(under_way) < spec.min
                && !self.backing_off(spec.name.as_str())
                && !self.is_rolling(spec.name.as_str())
            {
                // One more per pass: the next pass sees it and starts the next.
                *self
                    .keeping_min
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(name.clone())
                    .or_insert(0) += 1;
                // Counted down when the work ends, fails, panics or never starts.
                let keeping = KeepingMin(self.clone(), name);
                let (me, service, min) = (self.clone(), spec.name.clone(), spec.min);
                self.spawn_work(async move {
                    let _keeping = keeping;
                    me.activate(&service, None, &format!("keep min {min} of {service}"))
                        .await
                        .map(drop)
                });
            }
        }
        Ok(())
    }

    /// Runs agent work from the reconcile loop as a task of its own, so that one slow or hung
    /// machine never holds the loop; at most 16 at once (false: none free, try next tick).
    pub(crate) fn spawn_work(
        self: &Arc<Self>,
        work: impl std::future::Future<Output = Result<()>> + Send + 'static,
    ) -> bool {
        let Ok(permit) = self.work.clone().try_acquire_owned() else {
            return false;
        };
        tokio::spawn(async move {
            if let Err(e) = work.await {
                // Level-triggered: the next tick sees the new state and tries again.
                tracing::warn!("reconcile: {e}");
            }
            drop(permit);
        });
        true
    }

    /// Machines without heartbeats whose agent did not answer a direct probe either: only
    /// those are down for the instances on them. A probe runs in the background; until it
    /// failed, the machine gets the benefit of the doubt.
    pub(crate) fn confirmed_down(self: &Arc<Self>, machines: &[MachineInfo]) -> HashSet<String> {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.retain(|name, _| {
            machines
                .iter()
                .any(|m| &m.name == name && m.state == MachineState::Down)
        });
        let mut down = HashSet::new();
        for m in machines.iter().filter(|m| m.state == MachineState::Down) {
            match probes.get(&m.name) {
                Some(Probe::Failed) => {
                    down.insert(m.name.clone());
                }
                Some(Probe::Running) => {}
                None => {
                    probes.insert(m.name.clone(), Probe::Running);
                    let (me, machine) = (self.clone(), m.clone());
                    tokio::spawn(async move { me.probe(machine).await });
                }
            }
        }
        down
    }

    pub(crate) async fn probe(&self, machine: MachineInfo) {
        let Ok((url, http)) = self.agent_url(&machine, "http", "/agent/v1/status") else {
            return;
        };
        let answered = http
            .get(url)
            .bearer_auth(self.agent_bearer(&machine.name))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if answered {
            // Alive, its heartbeats are late: it counts as heard now.
            let _ = self.db(|d| {
                d.upsert_machine(
                    &MachineInfo {
                        state: MachineState::Up,
                        ..machine.clone()
                    },
                    now_ms(),
                )
            });
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&machine.name);
        } else {
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(machine.name.clone(), Probe::Failed);
            self.event(
                "controller",
                &format!("machine {} down", machine.name),
                "no heartbeat, and no answer to a direct probe",
                "ok",
            );
        }
    }

    /// Turns the load-driven policy on (server switching, drop, consolidation) or off (keep `min`).
    pub fn set_policy(&self, on: bool) {
        self.policy.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// One policy pass: build the snapshot, call the pure `decide`, carry out the plan.
    pub(crate) fn run_policy(self: &Arc<Self>, services: &[ServiceSpec]) -> Result<()> {
        use vmatrix_policy as p;
        let demand = self.sample_demand(services);
        let rows = self.db(|d| d.instances())?;
        let crate::inputs::Inputs { snapshot, .. } = self.inputs(services, &rows, Some(&demand))?;
        let config = self.settings().config(crate::inputs::TICK_S);
        let instance = |k: usize| -> Result<InstanceId> {
            let i = snapshot
                .instances
                .get(k)
                .ok_or_else(|| ControlError::Conflict(format!("policy named instance #{k}")))?;
            InstanceId::new(&i.id).map_err(|e| ControlError::Conflict(e.to_string()))
        };
        let machine = |k: usize| -> Result<&str> {
            snapshot
                .machines
                .get(k)
                .map(|m| m.name.as_str())
                .ok_or_else(|| ControlError::Conflict(format!("policy named machine #{k}")))
        };
        let service = |k: usize| -> Result<&ServiceSpec> {
            services
                .get(k)
                .ok_or_else(|| ControlError::Conflict(format!("policy named service #{k}")))
        };
        for action in p::decide(&snapshot, &config) {
            // A service rolling out is the rollout's until it ends.
            if action
                .service(&snapshot)
                .and_then(|k| snapshot.services.get(k))
                .is_some_and(|svc| self.is_rolling(&svc.name))
            {
                continue;
            }
            // Names are resolved now; the agent work runs as its own task (`spawn_work`).
            let me = self.clone();
            let result = match &action {
                // A standby is booted like any instance and paused as soon as it runs.
                p::Action::Activate {
                    service: s,
                    machine: m,
                    reason,
                }
                | p::Action::Prepare {
                    service: s,
                    machine: m,
                    reason,
                } => service(*s).and_then(|s| {
                    if self.backing_off(s.name.as_str()) {
                        tracing::debug!("{} backs off: not activating it now", s.name);
                        return Ok(());
                    }
                    let (name, m, reason) =
                        (s.name.clone(), machine(*m)?.to_owned(), reason.clone());
                    let standby = matches!(action, p::Action::Prepare { .. });
                    self.spawn_work(async move {
                        let kind = if standby { Start::Standby } else { Start::Live };
                        me.activate_as(&name, Some(&m), &reason, kind)
                            .await
                            .map(drop)
                    });
                    Ok(())
                }),
                p::Action::Resume {
                    instance: i,
                    machine: m,
                    reason,
                } => instance(*i).and_then(|i| {
                    let (m, reason) = (machine(*m)?.to_owned(), reason.clone());
                    self.spawn_work(
                        async move { me.resume(&i, Some(&m), &reason).await.map(drop) },
                    );
                    Ok(())
                }),
                p::Action::Suspend {
                    instance: i,
                    reason,
                } => instance(*i).map(|i| {
                    let reason = reason.clone();
                    self.spawn_work(async move { me.suspend(&i, &reason).await.map(drop) });
                }),
                p::Action::Migrate {
                    instance: i,
                    to,
                    reason,
                } => instance(*i).and_then(|i| {
                    let (m, reason) = (machine(*to)?.to_owned(), reason.clone());
                    self.spawn_work(async move { me.migrate(&i, &m, &reason).await.map(drop) });
                    Ok(())
                }),
                p::Action::Discard {
                    instance: i,
                    reason,
                } => instance(*i).map(|i| {
                    let reason = reason.clone();
                    self.spawn_work(async move { me.discard(&i, &reason).await.map(drop) });
                }),
                p::Action::Pause {
                    instance: i,
                    reason,
                }
                | p::Action::Unpause {
                    instance: i,
                    reason,
                } => instance(*i).map(|i| {
                    let (reason, pause) =
                        (reason.clone(), matches!(action, p::Action::Pause { .. }));
                    self.spawn_work(async move { me.pause(&i, pause, &reason).await.map(drop) });
                }),
                p::Action::Drop { service: s, reason } => service(*s)
                    .and_then(|s| self.set_dropped(&s.name, true, "policy", reason).map(drop)),
                p::Action::Undrop { service: s, reason } => service(*s)
                    .and_then(|s| self.set_dropped(&s.name, false, "policy", reason).map(drop)),
            };
            if let Err(e) = result {
                // Level-triggered: the next tick sees the new state and tries again.
                tracing::warn!("policy action {action:?}: {e}");
            }
        }
        Ok(())
    }

    /// Runs [`Controller::reconcile`] every `period` until the process ends.
    pub async fn run_loop(self: Arc<Self>, period: Duration) {
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile: {e}");
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Applies the retention every hour: settled operations and discarded instances older
    /// than a day are forgotten, and the event log keeps its newest 100,000 entries.
    pub async fn prune_loop(self: Arc<Self>) {
        loop {
            let day_ago = now_ms().saturating_sub(24 * 3600 * 1000);
            if let Err(e) = self.db(|d| d.prune(day_ago, 100_000)) {
                tracing::warn!("retention: {e}");
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

/// One activation counted in [`Controller::keeping_min`], counted down when dropped.
struct KeepingMin(Arc<Controller>, String);

impl Drop for KeepingMin {
    fn drop(&mut self) {
        let mut m = self.0.keeping_min.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}
