//! Heartbeats and settlement: each machine's report is compared with the rows, and every
//! difference is settled — instances that came up, failed, finished or gave up an operation
//! while nobody watched (a controller restarted mid-operation, or an agent call without an
//! answer); copies the controller does not want are stopped; instances a machine lost fail.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use vmatrix_core::api::{
    AgentCommand, AgentReply, AgentReport, HeartbeatReply, MachineInfo, MachineState, NetworkView,
};
use vmatrix_core::{InstanceId, InstanceState, Transition};

use crate::agents::unexpected;
use crate::control::{now_ms, Controller, Result};
use crate::db::InstanceRow;

impl Controller {
    /// Takes in an agent's heartbeat: the machine's capacity and what really runs there.
    pub async fn heartbeat(self: &Arc<Self>, report: AgentReport) -> Result<HeartbeatReply> {
        let info = MachineInfo {
            name: report.name.clone(),
            address: report.address.clone(),
            role: report.role,
            vcpus: report.vcpus,
            memory_mib: report.memory_mib,
            state: MachineState::Up,
        };
        let first = self
            .heard
            .lock()
            .map(|mut h| {
                let new = !h.contains_key(&report.name);
                h.entry(report.name.clone()).or_insert(0);
                new
            })
            .unwrap_or(false);
        self.db(|d| d.upsert_machine(&info, now_ms()))?;
        if let Ok(mut cpu) = self.cpu.lock() {
            let seconds: Vec<(InstanceId, f64)> = report
                .instances
                .iter()
                .filter(|i| i.state == InstanceState::Running)
                .map(|i| (i.id.clone(), i.cpu_seconds))
                .collect();
            cpu.entry(report.name.clone()).or_default().observe(
                Instant::now(),
                report.vcpus,
                &seconds,
            );
        }
        if first {
            self.event(
                &report.name,
                "register",
                &format!("agent at {}", report.address),
                "ok",
            );
        }
        if let Ok(mut reports) = self.reports.lock() {
            reports.insert(report.name.clone(), report.clone());
        }
        self.settle(&report, &info)?;
        // Counted once taken in: a heartbeat that failed to settle does not count.
        if let Ok(mut heard) = self.heard.lock() {
            *heard.entry(report.name.clone()).or_default() += 1;
        }
        let placed = self
            .db(|d| d.instances())?
            .into_iter()
            .filter(|r| r.info.machine == report.name && r.info.state.is_placed())
            .map(|r| r.info.id)
            .collect();
        Ok(HeartbeatReply {
            network: self.network_view(),
            placed,
        })
    }

    /// Heartbeats taken in per machine since this process started, by machine name.
    pub fn heartbeats(&self) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .heard
            .lock()
            .map(|h| h.iter().map(|(m, n)| (m.clone(), *n)).collect())
            .unwrap_or_default();
        all.sort();
        all
    }

    /// The service network as the machines must see it: every host that carries it (the
    /// machines that reported a tunnel endpoint and are up, and the fronts).
    pub(crate) fn network_view(&self) -> Option<NetworkView> {
        let n = self.net_config()?;
        let up: std::collections::HashSet<String> = self
            .machines()
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.state == MachineState::Up)
            .map(|m| m.name)
            .collect();
        let mut vteps: Vec<std::net::Ipv4Addr> = self
            .reports
            .lock()
            .map(|r| {
                r.values()
                    .filter(|rep| up.contains(&rep.name))
                    .filter_map(|rep| rep.vtep)
                    .collect()
            })
            .unwrap_or_default();
        vteps.extend(n.fronts.iter().copied());
        vteps.sort();
        vteps.dedup();
        // Every host address, whatever the machine's state: a machine that is down now is
        // still no place an instance may reach.
        let mut hosts: Vec<std::net::Ipv4Addr> = n.hosts.clone();
        if let Ok(r) = self.reports.lock() {
            for rep in r.values() {
                hosts.extend(rep.vtep);
                if let Ok(a) = rep.address.parse::<std::net::SocketAddr>() {
                    if let std::net::IpAddr::V4(ip) = a.ip() {
                        hosts.push(ip);
                    }
                }
            }
        }
        hosts.extend(n.fronts.iter().copied());
        hosts.sort();
        hosts.dedup();
        let rows = self.db(|d| d.instances()).unwrap_or_default();
        let services = self
            .services()
            .unwrap_or_default()
            .into_iter()
            .map(|s| vmatrix_core::api::ServiceAccess {
                members: rows
                    .iter()
                    .filter(|r| r.info.service == s.name)
                    .filter_map(|r| r.info.address)
                    .collect(),
                name: s.name,
                allow_from: s.allow_from,
                egress: s.egress,
            })
            .collect();
        Some(NetworkView {
            service_net: n.net.to_string(),
            vni: n.vni,
            vteps,
            hosts,
            services,
        })
    }

    /// Pauses a standby that has just booted (its row says running). Tried three times, a
    /// second apart, while it is still a standby on its way (an unpause may have made it serve
    /// meanwhile); after that it counts as a running instance, which the policy scales in.
    fn spawn_pause_standby(self: &Arc<Self>, id: InstanceId) {
        let me = self.clone();
        tokio::spawn(async move {
            let still = || {
                me.prepared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&id)
            };
            for attempt in 1..=3 {
                if !still() {
                    return;
                }
                match me
                    .pause(&id, true, "warm standby: booted, now paused")
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!("pausing the standby {id} (attempt {attempt} of 3): {e}");
                        // In the event log too: a standby left unpaused is otherwise invisible
                        // there (a refusal returns before `pause` records anything).
                        me.event(
                            "controller",
                            &format!("pause {id}"),
                            "warm standby: booted, now paused",
                            &format!("refused (attempt {attempt} of 3): {e}"),
                        );
                        if attempt < 3 {
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                    }
                }
            }
            me.prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
    }

    /// Whether `machine`'s latest report (since this process started) lists `id`; `None` if
    /// no report came from it yet.
    pub(crate) fn machine_has(&self, machine: &str, id: &InstanceId) -> Option<bool> {
        let reports = self.reports.lock().ok()?;
        let r = reports.get(machine)?;
        Some(r.instances.iter().any(|i| i.id == *id))
    }

    /// Compares one machine's report with the rows and settles every difference: instances
    /// that came up, failed, finished or gave up an operation while nobody watched (this
    /// process started after the operation, or its call to the agent got no answer); copies
    /// the controller does not want there are stopped; instances the machine lost fail.
    pub(crate) fn settle(self: &Arc<Self>, report: &AgentReport, info: &MachineInfo) -> Result<()> {
        use InstanceState as S;
        let rows: HashMap<InstanceId, InstanceRow> = self
            .db(|d| d.instances())?
            .into_iter()
            .map(|r| (r.info.id.clone(), r))
            .collect();
        let mut reported = HashSet::new();
        for inst in &report.instances {
            reported.insert(inst.id.clone());
            if self.is_busy(&inst.id) || self.report_predates(report, &inst.id) {
                continue;
            }
            let unsettled = self.is_unsettled(&inst.id);
            match rows.get(&inst.id) {
                Some(row)
                    if row.info.machine == report.name
                        && row.info.generation == inst.generation =>
                {
                    let mut row = row.clone();
                    if row.info.version.is_empty() && !inst.version.is_empty() {
                        // A row from before versions were pinned learns its version here.
                        row.info.version = inst.version.clone();
                        self.db(|d| d.put_instance(&row))?;
                    }
                    let step = match (row.info.state, inst.state) {
                        (S::Activating, S::Running) => Some(Transition::Ready),
                        // A pause or unpause whose answer was lost.
                        (S::Running, S::Paused) => Some(Transition::Pause),
                        (S::Paused, S::Running) => Some(Transition::Unpause),
                        (S::Suspending, S::Suspended) => Some(Transition::Suspended),
                        // A suspend or a move that gave up: the guest runs on here.
                        (S::Suspending | S::Migrating, S::Running) if !unsettled => {
                            Some(Transition::Cancelled)
                        }
                        (s, S::Failed) if s != S::Failed => Some(Transition::Fail),
                        _ => None,
                    };
                    let Some(step) = step else { continue };
                    let mut pause_standby = false;
                    match (row.info.state, step) {
                        (S::Activating, Transition::Ready) => {
                            self.activation_succeeded(row.info.service.as_str());
                            self.metrics.started(&row.info.id, true);
                            // It runs: a saved state it was resumed from is superseded (the
                            // agent removes it).
                            row.saved = None;
                            // A standby is paused once its row says running (below):
                            // paused earlier, it would be refused as still activating.
                            pause_standby = self
                                .prepared
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .contains(&row.info.id);
                        }
                        (S::Activating, Transition::Fail) => {
                            self.metrics.started(&row.info.id, false);
                            self.activation_failed(row.info.service.as_str())
                        }
                        _ => {}
                    }
                    if step == Transition::Suspended {
                        self.settle_suspended(&mut row, inst.saved.clone())?;
                    } else {
                        row.info.state = row.info.state.next(step)?;
                        row.info.endpoint = inst.endpoint.clone();
                        self.db(|d| d.put_instance(&row))?;
                    }
                    if pause_standby {
                        self.spawn_pause_standby(row.info.id.clone());
                    }
                    let outcome = inst
                        .error
                        .clone()
                        .map_or("ok".into(), |e| format!("failed: {e}"));
                    self.event(
                        &report.name,
                        &format!("{} {}", inst.id, row.info.state.as_str()),
                        "agent report",
                        &outcome,
                    );
                }
                Some(row)
                    if row.info.state == S::Migrating
                        && inst.generation == row.info.generation + 1 =>
                {
                    match inst.state {
                        S::Running => {
                            // A migration finished while no controller watched: adopt it
                            // where it runs.
                            let mut row = row.clone();
                            row.info.machine = report.name.clone();
                            row.info.generation = inst.generation;
                            row.info.endpoint = inst.endpoint.clone();
                            row.info.state = row.info.state.next(Transition::Moved)?;
                            self.db(|d| d.put_instance(&row))?;
                            self.event(
                                "controller",
                                &format!("adopt {} on {}", inst.id, report.name),
                                "its migration finished while no controller watched",
                                "ok",
                            );
                        }
                        S::Migrating
                            if self.machine_has(&row.info.machine, &inst.id) == Some(false) =>
                        {
                            // The source has sent it and ended: only the destination's
                            // continue is missing.
                            self.spawn_finish(row.clone(), info.clone(), inst.generation);
                        }
                        _ => {}
                    }
                }
                _ if unsettled => {}
                _ => {
                    // Not wanted here (unknown, discarded, moved away, an older generation, or
                    // the record of a suspend the controller has already settled).
                    let machine = info.clone();
                    let cmd = AgentCommand::Discard {
                        id: inst.id.clone(),
                        generation: inst.generation,
                    };
                    let me = self.clone();
                    let id = inst.id.clone();
                    tokio::spawn(async move {
                        let outcome = match me.send(&machine, &cmd, 0).await {
                            Ok(_) => "ok".to_string(),
                            Err(e) => format!("failed: {e}"),
                        };
                        me.event(
                            "controller",
                            &format!("stop unwanted {id} on {}", machine.name),
                            "the controller does not want it there",
                            &outcome,
                        );
                    });
                }
            }
        }
        // Instances the controller placed here that the agent no longer has are lost.
        for row in rows.values() {
            if row.info.machine != report.name
                || reported.contains(&row.info.id)
                || self.is_unsettled(&row.info.id)
                || self.report_predates(report, &row.info.id)
            {
                continue;
            }
            let mut row = row.clone();
            let why = match row.info.state {
                // A resume that never started: its saved state is still in the repository.
                S::Activating if row.saved.is_some() => {
                    row.info.state = row.info.state.next(Transition::ResumeFailed)?;
                    row.info.machine = String::new();
                    "its resume never started there; it stays suspended"
                }
                S::Running | S::Paused | S::Activating | S::Suspending => {
                    row.info.state = row.info.state.next(Transition::Fail)?;
                    "its machine no longer runs it"
                }
                // A migrating row's source may have handed it over: the destination's report
                // settles it (or `settle_orphans`).
                S::Migrating | S::Suspended | S::Failed | S::Discarded => continue,
            };
            self.db(|d| d.put_instance(&row))?;
            self.event(
                &report.name,
                &format!("{} {}", row.info.id, row.info.state.as_str()),
                why,
                "lost",
            );
        }
        Ok(())
    }

    /// Whether `report` was taken before the machine answered its last command about `id`
    /// (then it says nothing about the instance now). A report that is fresh enough ends the
    /// wait for that instance.
    fn report_predates(&self, report: &AgentReport, id: &InstanceId) -> bool {
        let mut fresh = self.fresh_after.lock().unwrap_or_else(|p| p.into_inner());
        let key = (report.name.clone(), id.clone());
        match fresh.get(&key) {
            Some(after) if report.seq < *after => true,
            Some(_) => {
                fresh.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Sends the missing `FinishIncoming` of a migration whose controller died between the
    /// source's end and the destination's continue.
    pub(crate) fn spawn_finish(
        self: &Arc<Self>,
        row: InstanceRow,
        dest: MachineInfo,
        generation: u64,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(_busy) = me.claim(&row.info.id) else {
                return;
            };
            let memory = me.spec_of(&row.info.service).map_or(4096, |s| s.memory_mib);
            let cmd = AgentCommand::FinishIncoming {
                id: row.info.id.clone(),
                generation,
            };
            let what = format!("finish the migration of {} on {}", row.info.id, dest.name);
            match me.send(&dest, &cmd, memory).await {
                Ok(AgentReply::Finished { endpoint, .. }) => {
                    let mut row = row;
                    row.info.machine = dest.name.clone();
                    row.info.generation = generation;
                    row.info.endpoint = endpoint;
                    let moved = row.info.state.next(Transition::Moved);
                    if let Ok(state) = moved {
                        row.info.state = state;
                        let _ = me.db(|d| d.put_instance(&row));
                    }
                    me.event(
                        "controller",
                        &what,
                        "its controller stopped mid-migration",
                        "ok",
                    );
                }
                Ok(other) => me.event(
                    "controller",
                    &what,
                    "its controller stopped mid-migration",
                    &format!("failed: {}", unexpected(&dest, "finished", &other)),
                ),
                Err(e) => me.event(
                    "controller",
                    &what,
                    "its controller stopped mid-migration",
                    &format!("failed: {e}"),
                ),
            }
        });
    }

    /// Rows left `migrating` or `suspending` by an earlier process that no machine reports
    /// any more (every machine has reported since this process started): failed, so that the
    /// service gets a replacement.
    pub(crate) fn settle_orphans(
        &self,
        rows: &[InstanceRow],
        machines: &[MachineInfo],
    ) -> Result<()> {
        let reports = match self.reports.lock() {
            Ok(r) => r.clone(),
            Err(_) => return Ok(()),
        };
        let all_heard = machines
            .iter()
            .filter(|m| m.state != MachineState::Down)
            .all(|m| reports.contains_key(&m.name));
        if !all_heard {
            return Ok(());
        }
        for row in rows {
            if !matches!(
                row.info.state,
                InstanceState::Migrating | InstanceState::Suspending
            ) || self.is_unsettled(&row.info.id)
            {
                continue;
            }
            let anywhere = reports
                .values()
                .any(|r| r.instances.iter().any(|i| i.id == row.info.id));
            if !anywhere {
                let mut row = row.clone();
                row.info.state = row.info.state.next(Transition::Fail)?;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &format!("{} failed", row.info.id),
                    "no machine has it after an interrupted operation",
                    "lost",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use vmatrix_core::api::{InstanceInfo, MachineRole};

    fn report(seq: u64) -> AgentReport {
        AgentReport {
            name: "rm1".into(),
            address: "127.0.0.2:1".into(),
            role: MachineRole::Dedicated,
            vcpus: 4,
            memory_mib: 4096,
            instances: Vec::new(),
            vtep: None,
            seq,
        }
    }

    #[tokio::test]
    async fn a_report_taken_before_a_command_ended_never_fails_its_instance() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = Controller::new(
            Db::open(&dir.path().join("state.db")).expect("db"),
            "t".into(),
        );
        let id = InstanceId::new("web-1").expect("id");
        let row = InstanceRow {
            info: InstanceInfo {
                id: id.clone(),
                service: vmatrix_core::ServiceName::new("web").expect("name"),
                image: "guest:v1".into(),
                version: "v".repeat(64),
                machine: "rm1".into(),
                state: InstanceState::Running,
                endpoint: "127.0.0.2:2".into(),
                generation: 2,
                pinned_until_ms: 0,
                purpose: Default::default(),
                address: None,
                slot: 0,
            },
            saved: None,
            seq: 1,
        };
        c.db(|d| d.put_instance(&row)).expect("row");
        // rm1 answered a command about web-1 (say, the end of its migration there) at
        // sequence 100; a report snapshotted before that (seq 50) arrives late, without it.
        c.fresh_after
            .lock()
            .expect("lock")
            .insert(("rm1".into(), id.clone()), 100);
        c.heartbeat(report(50)).await.expect("heartbeat");
        let state = |c: &Arc<Controller>| {
            c.db(|d| d.instance(&id))
                .expect("db")
                .expect("row")
                .info
                .state
        };
        assert_eq!(
            state(&c),
            InstanceState::Running,
            "a stale report is not used"
        );
        // A report from after the command that still lacks it: now it is lost.
        c.heartbeat(report(150)).await.expect("heartbeat");
        assert_eq!(state(&c), InstanceState::Failed);
    }
}
