//! The operations on instances, each run to its end by a task the controller owns (see
//! `ops.rs`): activate, live-migrate, suspend into the repository, resume, discard, drain a
//! machine, wake a dormant service, drop and undrop. Each records its intermediate state before
//! it calls an agent and leaves the instance as it was when an agent answers that it failed;
//! when an agent does not answer, the row stays where it is and the machines' reports settle it
//! (`settle.rs`).
use std::time::Instant;

use vmatrix_core::api::{
    AgentCommand, AgentReply, InstanceInfo, MachineInfo, MachineRole, MachineState, Purpose,
    SavedState,
};
use vmatrix_core::{InstanceId, InstanceState, Transition};

use crate::agents::unexpected;
use crate::control::{ControlError, Controller, Result};
use crate::db::InstanceRow;

/// What a new instance is for.
#[derive(Debug, Clone)]
pub(crate) enum Start {
    /// Live traffic.
    Live,
    /// A warm standby: paused as soon as it runs; the policy sees it as a standby from the
    /// moment its row exists (not as capacity on its way, which made the next tick prepare more).
    Standby,
    /// An admin's maintenance copy on a shared machine, of `image` or the service's own.
    Maintenance {
        image: Option<vmatrix_core::ImageRef>,
    },
    /// Live traffic, on `image` (at `version` if known): a rollout's new instance.
    Version {
        image: vmatrix_core::ImageRef,
        version: Option<String>,
    },
}

impl Controller {
    /// Starts a new instance of `service` (on `on`, or where placement says).
    pub async fn activate(
        &self,
        service: &vmatrix_core::ServiceName,
        on: Option<&str>,
        why: &str,
    ) -> Result<InstanceInfo> {
        self.activate_as(service, on, why, Start::Live).await
    }

    /// Activates a new instance of `service` as `kind` says.
    pub(crate) async fn activate_as(
        &self,
        service: &vmatrix_core::ServiceName,
        on: Option<&str>,
        why: &str,
        kind: Start,
    ) -> Result<InstanceInfo> {
        let started = Instant::now();
        let r = self
            .timed("activate", self.activate_now(service, on, why, kind))
            .await;
        if let Ok(i) = &r {
            self.metrics.starting(&i.id, started, "activate");
        }
        r
    }

    async fn activate_now(
        &self,
        service: &vmatrix_core::ServiceName,
        on: Option<&str>,
        why: &str,
        kind: Start,
    ) -> Result<InstanceInfo> {
        let spec = self.spec_of(service)?;
        // The version a finished rollout pinned the service to, while the spec still names
        // that image: new instances run exactly it, wherever its tag has moved since.
        let pinned = self
            .db(|d| d.service_version(service))?
            .filter(|v| v.image == spec.image.to_string() && !v.version.is_empty())
            .map(|v| v.version);
        // A live instance of a service with volumes takes a slot; the slot of an instance
        // that failed is given back once its discard has stored its volumes.
        let slotted = !spec.volumes.is_empty() && !matches!(kind, Start::Maintenance { .. });
        if slotted {
            self.wait_for_failed_slots(&spec).await?;
        }
        // Placement and the row that takes the place are one step: activations and resumes
        // run in parallel, and two must never pick the same room.
        let placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
        let machine = match (&kind, on) {
            (Start::Maintenance { .. }, on) => self.place_shared(&spec, on)?,
            // A rollout's preference: there if it has room, else where placement says.
            (Start::Version { .. }, Some(name)) => match self.room_on(&spec, name)? {
                Some(m) => m,
                None => self.place(&spec, None)?,
            },
            (_, Some(name)) => self.machine_up(name)?,
            (_, None) => self.place(&spec, None)?,
        };
        // The id, the busy claim and the row are made in one step under the database lock, so
        // that two activations at once never take the same id and no heartbeat sees the row
        // before it is claimed.
        let (mut row, _busy) = {
            let mut db = self.lock_db()?;
            let seq = db.next_seq(service)?;
            let id = InstanceId::new(format!("{service}-{seq}"))
                .map_err(|e| ControlError::Conflict(e.to_string()))?;
            // Its own address on the service network, for its whole life (under the same
            // lock: two activations never take the same one).
            let address = match self.net_config() {
                None => None,
                Some(n) => {
                    let used = db.addresses_in_use()?;
                    let free = n.net.instance_addresses().find(|a| !used.contains(a));
                    Some(free.ok_or_else(|| {
                        ControlError::Conflict(format!(
                            "no free address left on the service network {}: {} instances hold \
                             them all; discard some or start the controller with a larger \
                             --service-net",
                            n.net,
                            used.len()
                        ))
                    })?)
                }
            };
            let slot = if slotted {
                let busy: Vec<u32> = self
                    .volume_busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|(s, _)| s == service.as_str())
                    .map(|(_, n)| *n)
                    .collect();
                crate::volumes::lowest_free_slot(&db.instances()?, service, &busy)
            } else {
                0
            };
            let busy = self.claim(&id)?;
            if matches!(kind, Start::Standby) {
                self.prepared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone());
            }
            let row = InstanceRow {
                info: InstanceInfo {
                    id: id.clone(),
                    service: service.clone(),
                    image: match &kind {
                        Start::Maintenance { image: Some(i) } | Start::Version { image: i, .. } => {
                            i.to_string()
                        }
                        _ => spec.image.to_string(),
                    },
                    version: match &kind {
                        Start::Version {
                            version: Some(v), ..
                        } => v.clone(),
                        Start::Live | Start::Standby => pinned.clone().unwrap_or_default(),
                        _ => String::new(),
                    },
                    machine: machine.name.clone(),
                    state: InstanceState::Activating,
                    endpoint: String::new(),
                    generation: 1,
                    pinned_until_ms: 0,
                    purpose: match kind {
                        Start::Maintenance { .. } => Purpose::Maintenance,
                        _ => Purpose::Live,
                    },
                    address,
                    slot,
                },
                saved: None,
                seq,
            };
            db.put_instance(&row)?;
            // On etcd before the agent hears of it.
            self.flush_db(&mut db)?;
            (row, busy)
        };
        drop(placing);
        let id = row.info.id.clone();
        let cmd = AgentCommand::Activate {
            plan: self.plan(&spec, &row, 1)?,
            state: None,
        };
        let started = self
            .send(&machine, &cmd, spec.memory_mib)
            .await
            .and_then(|r| match r {
                AgentReply::Activated { endpoint, version } => Ok((endpoint, version)),
                other => Err(unexpected(&machine, "activated", &other)),
            });
        match started {
            Ok((endpoint, version)) => {
                row.info.endpoint = endpoint;
                // Pinned from now on: every later plan of this instance names this version.
                row.info.version = version;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &format!("activate {id} on {}", machine.name),
                    why,
                    "started",
                );
                Ok(row.info)
            }
            Err(e) => {
                self.activation_failed(service.as_str());
                self.prepared
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                row.info.state = row.info.state.next(Transition::Fail)?;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &format!("activate {id} on {}", machine.name),
                    why,
                    &format!("failed: {e}"),
                );
                Err(e)
            }
        }
    }

    /// Live-migrates a running instance to machine `to`.
    pub async fn migrate(&self, id: &InstanceId, to: &str, why: &str) -> Result<String> {
        self.timed("migrate", self.migrate_now(id, to, why)).await
    }

    async fn migrate_now(&self, id: &InstanceId, to: &str, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        if row.info.state != InstanceState::Running {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a running instance migrates",
                row.info.state.as_str()
            )));
        }
        if row.info.machine == to {
            return Err(ControlError::Conflict(format!(
                "instance {id} already runs on {to}"
            )));
        }
        let spec = self.spec_of(&row.info.service)?;
        let source = self.machine(&row.info.machine)?;
        let dest = self.machine(to)?;
        if dest.state != MachineState::Up {
            return Err(ControlError::Conflict(format!(
                "machine {to} is {}",
                dest.state
            )));
        }
        if row.info.purpose == Purpose::Maintenance && dest.role != MachineRole::Shared {
            return Err(ControlError::Conflict(format!(
                "instance {id} is a maintenance instance: it moves only to a shared machine, \
                 and {to} is dedicated"
            )));
        }
        let started = Instant::now();
        let what = format!("migrate {id} {} → {to}", source.name);
        let next_gen = row.info.generation + 1;
        let plan = self.plan(&spec, &row, next_gen)?;
        row.info.state = row.info.state.next(Transition::MigrateStarted)?;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", &what, why, "started");
        let mem = spec.memory_mib;
        let discard_dest = || async {
            let _ = self
                .send(
                    &dest,
                    &AgentCommand::Discard {
                        id: id.clone(),
                        generation: next_gen,
                    },
                    mem,
                )
                .await;
        };
        let prep = self
            .send(
                &dest,
                &AgentCommand::PrepareIncoming {
                    plan,
                    from: Some(source.name.to_string()),
                },
                mem,
            )
            .await
            .and_then(|r| match r {
                AgentReply::Prepared { target, .. } => Ok(target),
                other => Err(unexpected(&dest, "prepared", &other)),
            });
        let target = match prep {
            Ok(t) => t,
            Err(e) => {
                // Nothing moved: the source runs on. A destination that did start is
                // stopped (now, or by the heartbeat that reports it unwanted).
                discard_dest().await;
                return self.migration_ended(row, &what, why, Transition::Cancelled, e);
            }
        };
        let out = self
            .send(
                &source,
                &AgentCommand::MigrateOut {
                    id: id.clone(),
                    generation: row.info.generation,
                    target: target.clone(),
                },
                mem,
            )
            .await;
        let out = match out {
            Ok(AgentReply::MigratedOut {
                total_ms,
                downtime_ms,
            }) => (total_ms, downtime_ms),
            Ok(other) => {
                // A reply that says nothing of the move: the reports settle it.
                let e = unexpected(&source, "migrated-out", &other);
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                return Err(e);
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The source answered: the move failed and the guest runs on there.
                discard_dest().await;
                return self.migration_ended(row, &what, why, Transition::Cancelled, e);
            }
            Err(e) => {
                // No answer: the move may have finished or not. The row stays `migrating`
                // until the two machines' reports settle it (see `settle`).
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                return Err(e);
            }
        };
        let finished = self
            .send(
                &dest,
                &AgentCommand::FinishIncoming {
                    id: id.clone(),
                    generation: next_gen,
                },
                mem,
            )
            .await;
        match finished {
            Ok(reply) => {
                let answered = match reply {
                    AgentReply::Finished {
                        answered_ms: Some(ms),
                        ..
                    } => format!(", serving {ms} ms after"),
                    _ => String::new(),
                };
                row.info.machine = dest.name.clone();
                row.info.generation = next_gen;
                row.info.endpoint = target.endpoint;
                row.info.state = row.info.state.next(Transition::Moved)?;
                self.db(|d| d.put_instance(&row))?;
                let (total, down) = out;
                self.metrics.migrated(total, down);
                let outcome = format!(
                    "ok in {:.2}s (QEMU total {total} ms, downtime {down} ms{answered})",
                    started.elapsed().as_secs_f64()
                );
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The source has ended and the destination could not run it.
                row.info.machine = dest.name.clone();
                row.info.generation = next_gen;
                self.migration_ended(row, &what, why, Transition::Fail, e)
            }
            Err(e) => {
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
        }
    }

    /// Machine `name`, if it is up: no work is sent to a machine that is down.
    fn machine_up(&self, name: &str) -> Result<MachineInfo> {
        let m = self.machine(name)?;
        if m.state == MachineState::Down {
            return Err(ControlError::Conflict(format!(
                "machine {name} is down (no heartbeat); `vmatrix machines` shows which are up"
            )));
        }
        Ok(m)
    }

    /// Records how a migration that did not succeed ended, and returns its error.
    pub(crate) fn migration_ended(
        &self,
        mut row: InstanceRow,
        what: &str,
        why: &str,
        t: Transition,
        e: ControlError,
    ) -> Result<String> {
        row.info.state = row.info.state.next(t)?;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", what, why, &format!("failed: {e}"));
        Err(e)
    }

    /// Suspends a running instance into the repository.
    pub async fn suspend(&self, id: &InstanceId, why: &str) -> Result<String> {
        self.timed("suspend", self.suspend_now(id, why)).await
    }

    async fn suspend_now(&self, id: &InstanceId, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        if row.info.purpose == Purpose::Maintenance {
            return Err(ControlError::Conflict(format!(
                "instance {id} is a maintenance instance: it is not suspended; commit its \
                 changes (`vmatrix commit {id} --tag NAME:TAG`) or discard it"
            )));
        }
        if !matches!(
            row.info.state,
            InstanceState::Running | InstanceState::Paused
        ) {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a running or paused instance suspends",
                row.info.state.as_str()
            )));
        }
        let machine = self.machine(&row.info.machine)?;
        let memory = self
            .spec_of(&row.info.service)
            .map_or(4096, |s| s.memory_mib);
        let what = format!("suspend {id} on {}", machine.name);
        row.info.state = row.info.state.next(Transition::SuspendStarted)?;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", &what, why, "started");
        let started = Instant::now();
        match self
            .send(
                &machine,
                &AgentCommand::Suspend {
                    id: id.clone(),
                    generation: row.info.generation,
                },
                memory,
            )
            .await
        {
            Ok(AgentReply::Suspended { saved }) => {
                self.settle_suspended(&mut row, Some(saved))?;
                let outcome = format!("ok in {:.2}s", started.elapsed().as_secs_f64());
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Ok(other) => {
                // A reply that says nothing of the suspend: the reports settle it.
                let e = unexpected(&machine, "suspended", &other);
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The agent gave up and let the guest run on: it is as it was.
                row.info.state = row.info.state.next(Transition::Cancelled)?;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &what,
                    why,
                    &format!("failed, still running: {e}"),
                );
                Err(e)
            }
            Err(e) => {
                // No answer: the suspend may go on there; the agent's reports settle it.
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
        }
    }

    /// Pauses a running instance in memory (`pause`: a warm standby, or server drop that frees
    /// its CPU at once) or lets a paused one serve again. Milliseconds: the VM stays where it
    /// is; the switch routes only to running instances. A failure leaves it as it was.
    pub async fn pause(&self, id: &InstanceId, pause: bool, why: &str) -> Result<String> {
        let name = if pause { "pause" } else { "unpause" };
        self.timed(name, self.pause_now(id, pause, why)).await
    }

    async fn pause_now(&self, id: &InstanceId, pause: bool, why: &str) -> Result<String> {
        if !pause {
            // A standby still on its way (booting, or up and not paused yet): it serves as soon
            // as it is up instead of being paused then.
            let row = self.row(id)?;
            let on_its_way = matches!(
                row.info.state,
                InstanceState::Activating | InstanceState::Running
            ) && self
                .prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            if on_its_way {
                let outcome = format!("ok: {} serves once it is up", row.info.state.as_str());
                let what = format!("unpause {id} on {}", row.info.machine);
                self.event("controller", &what, why, &outcome);
                return Ok(outcome);
            }
        }
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        let (from, t, verb) = if pause {
            (InstanceState::Running, Transition::Pause, "pause")
        } else {
            (InstanceState::Paused, Transition::Unpause, "unpause")
        };
        if row.info.state != from {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a {} instance can {verb}",
                row.info.state.as_str(),
                from.as_str()
            )));
        }
        let machine = self.machine(&row.info.machine)?;
        let what = format!("{verb} {id} on {}", machine.name);
        let generation = row.info.generation;
        let command = if pause {
            AgentCommand::Pause {
                id: id.clone(),
                generation,
            }
        } else {
            AgentCommand::Unpause {
                id: id.clone(),
                generation,
            }
        };
        let started = Instant::now();
        match self
            .send_within(&machine, &command, std::time::Duration::from_secs(5))
            .await
        {
            Ok(AgentReply::Paused | AgentReply::Unpaused) => {
                row.info.state = row.info.state.next(t)?;
                self.db(|d| d.put_instance(&row))?;
                let outcome = format!("ok in {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Ok(other) => {
                let e = unexpected(&machine, verb, &other);
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
            Err(e) => {
                // The agent refused (as it was) or did not answer (its reports settle it).
                self.event("controller", &what, why, &format!("failed: {e}"));
                Err(e)
            }
        }
    }

    /// Records that `row` is suspended into `saved`.
    pub(crate) fn settle_suspended(
        &self,
        row: &mut InstanceRow,
        saved: Option<SavedState>,
    ) -> Result<()> {
        if saved.is_none() {
            return Err(ControlError::Conflict(format!(
                "instance {}: the agent did not say where its state went",
                row.info.id
            )));
        }
        row.saved = saved;
        row.info.state = row.info.state.next(Transition::Suspended)?;
        row.info.machine = String::new();
        row.info.endpoint = String::new();
        self.db(|d| d.put_instance(row))?;
        Ok(())
    }

    /// Resumes a suspended instance (on `on`, or where placement says).
    pub async fn resume(&self, id: &InstanceId, on: Option<&str>, why: &str) -> Result<String> {
        let started = Instant::now();
        let r = self.timed("resume", self.resume_now(id, on, why)).await;
        if r.is_ok() {
            self.metrics.starting(id, started, "resume");
        }
        r
    }

    async fn resume_now(&self, id: &InstanceId, on: Option<&str>, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        let Some(saved) = row
            .saved
            .clone()
            .filter(|_| row.info.state == InstanceState::Suspended)
        else {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a suspended instance resumes",
                row.info.state.as_str()
            )));
        };
        if row.info.version.is_empty() {
            // Suspended before versions were pinned: its overlay's base is unknown, and the
            // tag may name other bytes now — resuming would corrupt its disk.
            return Err(ControlError::Conflict(format!(
                "instance {id} was suspended before image versions were pinned: the version its disk \
                 was based on is unknown, so it cannot be resumed safely; `vmatrix discard {id}` \
                 throws it away (a new instance starts from the image)"
            )));
        }
        let spec = self.spec_of(&row.info.service)?;
        let placing = self.placing.lock().unwrap_or_else(|p| p.into_inner());
        let machine = match on {
            Some(n) => self.machine_up(n)?,
            None => self.place(&spec, None)?,
        };
        let what = format!("resume {id} on {}", machine.name);
        row.info.generation += 1;
        row.info.machine = machine.name.clone();
        row.info.state = row.info.state.next(Transition::Resume)?;
        self.db(|d| d.put_instance(&row))?;
        drop(placing);
        let started = Instant::now();
        let cmd = AgentCommand::Activate {
            plan: self.plan(&spec, &row, row.info.generation)?,
            state: Some(saved),
        };
        let resumed = self
            .send(&machine, &cmd, spec.memory_mib)
            .await
            .and_then(|r| match r {
                AgentReply::Activated { endpoint, .. } => Ok(endpoint),
                other => Err(unexpected(&machine, "activated", &other)),
            });
        match resumed {
            Ok(endpoint) => {
                row.info.endpoint = endpoint;
                // It runs from the saved state now, which the agent removes: superseded.
                row.saved = None;
                self.db(|d| d.put_instance(&row))?;
                let outcome = format!("ok in {:.2}s", started.elapsed().as_secs_f64());
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The saved state is still in the repository: stay suspended.
                row.info.state = row.info.state.next(Transition::ResumeFailed)?;
                row.info.machine = String::new();
                self.db(|d| d.put_instance(&row))?;
                self.event("controller", &what, why, &format!("failed: {e}"));
                Err(e)
            }
            Err(e) => {
                // No answer: it may run there; its reports settle it (or, if it never shows
                // up, it goes back to suspended: its saved state is still there).
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
        }
    }

    /// Throws an instance away.
    pub async fn discard(&self, id: &InstanceId, why: &str) -> Result<String> {
        self.timed("discard", self.discard_now(id, why)).await
    }

    async fn discard_now(&self, id: &InstanceId, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        // Discard is legal from failed, suspended, activating and running; a row stuck in
        // migrating or suspending is first declared failed (its machines' reports decide
        // nothing any more: an operator chose to throw it away).
        if matches!(
            row.info.state,
            InstanceState::Migrating | InstanceState::Suspending
        ) {
            row.info.state = row.info.state.next(Transition::Fail)?;
        }
        let next = row.info.state.next(Transition::Discard)?;
        if !row.info.machine.is_empty() {
            match self.machine(&row.info.machine) {
                // A machine that is down is not called: its agent stops the VM when it is back
                // (the controller no longer wants it there).
                Ok(machine) if machine.state != MachineState::Down => {
                    if let Err(e) = self
                        .send(
                            &machine,
                            &AgentCommand::Discard {
                                id: id.clone(),
                                generation: row.info.generation,
                            },
                            0,
                        )
                        .await
                    {
                        tracing::warn!("discard {id}: {e}");
                    }
                }
                _ => {}
            }
        }
        let mut outcome = "ok".to_owned();
        if let (Some(saved), true) = (
            row.saved.clone(),
            row.info.state == InstanceState::Suspended,
        ) {
            // Its saved state is of no use any more: any machine that is up removes it from
            // the repository (the next gc frees its chunks).
            let up = self
                .machines()?
                .into_iter()
                .find(|m| m.state == MachineState::Up);
            let removed = match up {
                Some(m) => self
                    .send(
                        &m,
                        &AgentCommand::RemoveSaved {
                            id: id.clone(),
                            generation: row.info.generation,
                            saved: saved.clone(),
                        },
                        0,
                    )
                    .await
                    .map(drop),
                None => Err(ControlError::Conflict("no machine is up".into())),
            };
            if let Err(e) = removed {
                outcome = format!(
                    "ok; its saved state ({}, {}) stays in the repository: {e}",
                    saved.state, saved.overlay
                );
            }
            row.saved = None;
        }
        row.info.state = next;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", &format!("discard {id}"), why, &outcome);
        Ok("discarded".into())
    }

    /// Moves every instance off a machine and stops placing there.
    pub async fn drain(&self, machine: &str, why: &str) -> Result<String> {
        self.timed("drain", self.drain_now(machine, why)).await
    }

    async fn drain_now(&self, machine: &str, why: &str) -> Result<String> {
        if !self.db(|d| d.set_draining(machine, true))? {
            return Err(ControlError::NotFound(format!("no machine {machine}")));
        }
        let (mut moved, mut stay) = (0, Vec::new());
        for row in self.db(|d| d.instances())? {
            if row.info.machine == machine && row.info.state == InstanceState::Running {
                let spec = self.spec_of(&row.info.service)?;
                let dest = match row.info.purpose {
                    Purpose::Live => self.place(&spec, Some(machine))?,
                    // An admin's instance moves to another shared machine, if there is room.
                    Purpose::Maintenance => match self.place_shared_except(&spec, machine) {
                        Ok(m) => m,
                        Err(e) => {
                            stay.push(format!("{} ({e})", row.info.id));
                            continue;
                        }
                    },
                };
                self.migrate(&row.info.id, &dest.name, why).await?;
                moved += 1;
            }
        }
        let stays = if stay.is_empty() {
            String::new()
        } else {
            format!(
                "; maintenance instance(s) staying: {} (discard or commit them)",
                stay.join(", ")
            )
        };
        self.event(
            "controller",
            &format!("drain {machine}"),
            why,
            &format!("ok, {moved} moved{stays}"),
        );
        Ok(format!("{moved} instance(s) moved off {machine}{stays}"))
    }

    /// Brings a dormant service back: resumes a suspended instance, or starts one.
    pub async fn wake(&self, service: &vmatrix_core::ServiceName) -> Result<String> {
        self.spec_of(service)?;
        let rows = self.db(|d| d.instances())?;
        let mine: Vec<&InstanceRow> = rows
            .iter()
            .filter(|r| r.info.service == *service && r.info.purpose == Purpose::Live)
            .collect();
        if mine.iter().any(|r| {
            matches!(
                r.info.state,
                InstanceState::Activating | InstanceState::Running | InstanceState::Migrating
            )
        }) {
            return Ok(format!("{service} is already awake or waking"));
        }
        if mine.iter().any(|r| r.info.state == InstanceState::Paused) {
            // Paused for a higher priority's CPU, or a standby the fast path unpauses when its
            // demand shows: waking it here would take that CPU back.
            return Ok(format!(
                "{service} is paused: the policy unpauses it when its demand shows and room returns"
            ));
        }
        let why = "a request arrived for a dormant service";
        if let Some(r) = mine
            .iter()
            .find(|r| r.info.state == InstanceState::Suspended)
        {
            return self.resume(&r.info.id, None, why).await;
        }
        self.activate(service, None, why)
            .await
            .map(|i| format!("{} activating on {}", i.id, i.machine))
    }

    pub(crate) fn set_dropped(
        &self,
        service: &vmatrix_core::ServiceName,
        dropped: bool,
        who: &str,
        why: &str,
    ) -> Result<String> {
        self.spec_of(service)?;
        let changed = self.db(|d| d.set_dropped(service, dropped, who == "policy"))?;
        let what = if dropped { "drop" } else { "undrop" };
        if changed {
            if dropped {
                let priority = self.spec_of(service).map_or(0, |s| s.priority);
                let by = if who == "policy" {
                    "policy"
                } else {
                    "operator"
                };
                self.metrics.dropped(priority, by);
            }
            self.event(who, &format!("{what} {service}"), why, "ok");
        }
        Ok(format!(
            "{service} {}",
            if dropped {
                "dropped: the switch refuses its requests"
            } else {
                "no longer dropped"
            }
        ))
    }
}
