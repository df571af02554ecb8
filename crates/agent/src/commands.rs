//! What the agent does for each command: activate (boot or resume), suspend, prepare an
//! incoming migration, migrate out, finish an incoming migration, discard. Each takes the VM out
//! of its slot, works on it without holding any lock, and puts it back — or cleans up after an
//! instance that was discarded meanwhile. A failure leaves the VM as it was.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vmatrix_core::api::{AgentReply, InstancePlan, MigrationTargetBody, SavedState};
use vmatrix_core::{ImageRef, InstanceId, InstanceState, Transition};
use vmatrix_store::ExportFormat;
use vmatrix_vmm::{MigrationTarget, SuspendedVm, VmSpec};

use crate::hypervisor::Guest;
use crate::machine::{lock, parse_addr, work_limit, Agent, AgentError, Held, Result, Slot};
use crate::record::Phase;

/// How long a discarded guest with an agent may take to shut down cleanly before it is killed.
const DISCARD_GRACE: Duration = Duration::from_secs(20);

impl Agent {
    /// Inserts a new slot for `plan` unless one exists: then answers what is there (the same
    /// activation again), or refuses.
    pub(crate) fn claim_slot(&self, plan: &InstancePlan, slot: Slot) -> Result<Option<AgentReply>> {
        let mut slots = lock(&self.slots);
        if let Some(existing) = slots.get(&plan.id) {
            if existing.plan.generation == plan.generation
                && existing.state != InstanceState::Suspended
            {
                return Ok(Some(AgentReply::Activated {
                    endpoint: existing.endpoint.to_string(),
                    version: existing.version.clone(),
                }));
            }
            if existing.state != InstanceState::Suspended {
                return Err(AgentError::Busy {
                    id: plan.id.clone(),
                    state: existing.state,
                    what: "a new activation",
                });
            }
        }
        // A suspended record of an older generation is superseded by this activation: its
        // directory goes (a next agent process must not restore it).
        if let Some(old) = slots.insert(plan.id.clone(), slot) {
            let _ = std::fs::remove_dir_all(old.dir);
        }
        Ok(None)
    }

    pub(crate) async fn activate(
        self: Arc<Self>,
        mut plan: InstancePlan,
        state: Option<SavedState>,
    ) -> Result<AgentReply> {
        let slot = self.new_slot(&mut plan, InstanceState::Activating).await?;
        let (version, endpoint, dir) = (slot.version.clone(), slot.endpoint, slot.dir.clone());
        if let Some(reply) = self.claim_slot(&plan, slot)? {
            return Ok(reply);
        }
        let started = async {
            self.clone().rules_for_new_tap().await?;
            let spec = self.vm_setup(&plan, &version, endpoint, &dir).await?;
            match &state {
                None => Ok(self.hv.boot(spec, &dir).await?),
                Some(saved) => self.resume_from(saved, spec, &dir).await,
            }
        }
        .await;
        let guest = match started {
            Ok(g) => g,
            Err(e) => {
                self.abandon(&plan, &dir);
                return Err(e);
            }
        };
        self.install(&plan, &dir, Held::Guest(guest), Phase::Running)?;
        if let Some(saved) = state {
            // The instance runs again from it: the saved state is superseded.
            let repo = self.repo.clone();
            tokio::task::spawn_blocking(move || {
                for image in [&saved.state, &saved.overlay] {
                    if let Err(e) = repo.remove(image) {
                        tracing::warn!("removing the superseded saved state {image}: {e}");
                    }
                }
            });
        }
        tokio::spawn(crate::health::watch(
            self.clone(),
            plan.id.clone(),
            plan.generation,
        ));
        Ok(AgentReply::Activated {
            endpoint: endpoint.to_string(),
            version,
        })
    }

    /// The first steps of a new VM here: fenced, its version pinned in `plan`, a port and a
    /// directory chosen, and the slot that says it is being started (`state`).
    pub(crate) async fn new_slot(
        &self,
        plan: &mut InstancePlan,
        state: InstanceState,
    ) -> Result<Slot> {
        self.fence(&plan.id, plan.generation)?;
        let version = self.version_of(plan).await?;
        plan.version = Some(version.clone());
        Ok(Slot {
            plan: plan.clone(),
            version,
            state,
            endpoint: self.endpoint_for(plan)?,
            pid: 0,
            error: None,
            saved: None,
            held: Held::Taken,
            dir: self.vm_dir(&plan.id, plan.generation),
            console: None,
            volume_versions: Vec::new(),
        })
    }

    /// The rules with the new slot's TAP in them, before its QEMU starts (bridged only).
    async fn rules_for_new_tap(self: Arc<Self>) -> Result<()> {
        if self.net.is_none() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || self.apply_rules())
            .await
            .map_err(|e| AgentError::Other(format!("the rules' task ended: {e}")))?
    }

    /// The new VM's directory, and its spec over this machine's export of its version.
    pub(crate) async fn vm_setup(
        &self,
        plan: &InstancePlan,
        version: &str,
        endpoint: SocketAddr,
        dir: &Path,
    ) -> Result<VmSpec> {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", dir.display())))?;
        let url = self
            .acquire_export(version, (plan.id.clone(), plan.generation))
            .await?;
        let mut spec = self.vm_spec(plan, url, endpoint);
        let (volumes, versions) = self
            .attach_volumes(plan, (plan.id.clone(), plan.generation), None)
            .await?;
        spec.volumes = volumes;
        self.note_volume_versions(plan, versions);
        if let Some(seed) = spec.seed.clone() {
            let plan = plan.clone();
            tokio::task::spawn_blocking(move || crate::seed::write(&seed, &plan))
                .await
                .map_err(|e| AgentError::Other(format!("the seed's task ended: {e}")))??;
        }
        Ok(spec)
    }

    /// Puts a VM that just started into its slot and records it beside the VM; if the
    /// instance was discarded meanwhile, the VM is killed and everything it left removed.
    fn install(&self, plan: &InstancePlan, dir: &Path, held: Held, phase: Phase) -> Result<()> {
        let pid = match &held {
            Held::Guest(g) => g.pid(),
            Held::Incoming(i) => i.pid(),
            Held::Taken | Held::Nothing => 0,
        };
        if !self.put_back(&plan.id, plan.generation, held, |s| {
            s.pid = pid;
            Ok(())
        }) {
            self.discarded_meanwhile(dir, &plan.id, plan.generation, None);
            return Err(AgentError::Other(format!(
                "instance {} was discarded while it started",
                plan.id
            )));
        }
        self.persist(&plan.id, phase);
        Ok(())
    }

    /// Undoes a start that failed: its slot, its use of the export and its directory.
    pub(crate) fn abandon(&self, plan: &InstancePlan, dir: &Path) {
        self.forget(&plan.id, plan.generation);
        self.release_exports(&(plan.id.clone(), plan.generation));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Takes the VM of `id` out of its slot for an operation, checking its generation.
    pub(crate) fn take(
        &self,
        id: &InstanceId,
        generation: u64,
        what: &'static str,
        t: Transition,
    ) -> Result<Held> {
        self.take_with(id, generation, what, Some(t))
    }

    /// [`Agent::take`], with its state changed by `t` if given.
    pub(crate) fn take_with(
        &self,
        id: &InstanceId,
        generation: u64,
        what: &'static str,
        t: Option<Transition>,
    ) -> Result<Held> {
        let mut slots = lock(&self.slots);
        let s = slots
            .get_mut(id)
            .ok_or_else(|| AgentError::Unknown(id.clone()))?;
        if generation < s.plan.generation {
            return Err(AgentError::Stale {
                id: id.clone(),
                got: generation,
                seen: s.plan.generation,
            });
        }
        if matches!(s.held, Held::Taken | Held::Nothing) || s.state == InstanceState::Failed {
            return Err(AgentError::Busy {
                id: id.clone(),
                state: s.state,
                what,
            });
        }
        if let Some(t) = t {
            s.step(t)?;
        }
        Ok(std::mem::replace(&mut s.held, Held::Taken))
    }

    /// Returns a VM to its slot after an operation and applies `change`; false (and the VM is
    /// killed) if the slot was discarded meanwhile.
    pub(crate) fn put_back(
        &self,
        id: &InstanceId,
        generation: u64,
        held: Held,
        change: impl FnOnce(&mut Slot) -> Result<()>,
    ) -> bool {
        let mut slots = lock(&self.slots);
        match slots.get_mut(id) {
            Some(s) if s.plan.generation == generation => {
                if let Held::Guest(g) = &held {
                    s.console = g.console();
                }
                s.held = held;
                if let Err(e) = change(s) {
                    s.error = Some(e.to_string());
                }
                true
            }
            _ => {
                drop(slots);
                tokio::spawn(async move {
                    match held {
                        Held::Guest(g) => g.kill().await,
                        Held::Incoming(i) => i.abort().await,
                        Held::Taken | Held::Nothing => {}
                    }
                });
                false
            }
        }
    }

    pub(crate) fn forget(&self, id: &InstanceId, generation: u64) -> Option<Slot> {
        let mut slots = lock(&self.slots);
        if slots
            .get(id)
            .is_some_and(|s| s.plan.generation == generation)
        {
            return slots.remove(id);
        }
        None
    }

    /// Writes the slot's record beside its VM (what a restarted agent adopts).
    pub(crate) fn persist(&self, id: &InstanceId, phase: Phase) {
        let record = lock(&self.slots)
            .get(id)
            .map(|s| (s.dir.clone(), s.record(phase)));
        if let Some((dir, record)) = record {
            if let Err(e) = record.write(&dir) {
                tracing::warn!(instance = %id, "writing its record in {}: {e}", dir.display());
            }
        }
    }

    pub(crate) async fn suspend(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
    ) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let Held::Guest(mut guest) =
            self.take(&id, generation, "suspend", Transition::SuspendStarted)?
        else {
            return Err(AgentError::Other(format!(
                "instance {id} has no running VM"
            )));
        };
        let (dir, plan, version, volume_versions) = {
            let slots = lock(&self.slots);
            let s = slots
                .get(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            (
                s.dir.clone(),
                s.plan.clone(),
                s.version.clone(),
                s.volume_versions.clone(),
            )
        };
        let saved = SavedState {
            state: ImageRef::parse(&format!("{id}:state-g{generation}"))
                .map_err(|e| AgentError::Other(e.to_string()))?,
            overlay: ImageRef::parse(&format!("{id}:overlay-g{generation}"))
                .map_err(|e| AgentError::Other(e.to_string()))?,
        };
        let state_file = dir.join("state.bin");
        let durable = async {
            let files = guest
                .save_state(&state_file, work_limit(plan.memory_mib))
                .await?;
            // The guest is stopped: its volumes as it left them go first (a resume anywhere
            // attaches them from there).
            self.store_volumes(&plan, &dir, &volume_versions).await?;
            let repo = self.repo.clone();
            let (st, ov, base) = (saved.state.clone(), saved.overlay.clone(), version.clone());
            tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
                // The overlay names its base version: GC keeps that version while the
                // suspended instance lives, whatever happens to the image's tag.
                let stored = repo
                    .import_state(&files.state_file, &st, &|_| {})
                    .and_then(|_| repo.import_state_over(&files.disk, &ov, Some(&base), &|_| {}));
                if stored.is_err() {
                    let _ = repo.remove(&st);
                    let _ = repo.remove(&ov);
                }
                stored.map(drop)
            })
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
            Ok::<(), AgentError>(())
        }
        .await;
        if let Err(e) = durable {
            // Leave the VM as it was: running here.
            let _ = std::fs::remove_file(&state_file);
            let resumed = guest.cont().await;
            let kept = self.put_back(&id, generation, Held::Guest(guest), |s| {
                s.step(Transition::Cancelled)?;
                if let Err(c) = resumed {
                    s.step(Transition::Fail)?;
                    s.error = Some(format!(
                        "it could not run again after a failed suspend: {c}"
                    ));
                }
                Ok(())
            });
            if !kept {
                self.discarded_meanwhile(&dir, &id, generation, None);
            }
            return Err(e);
        }
        // The state is durable in the repository. It is recorded beside the VM before QEMU
        // ends, so that a crash from here on leaves a suspended record (a next agent process
        // restores it, and stops a QEMU that was still there); only then does QEMU end.
        if let Some(s) = lock(&self.slots)
            .get_mut(&id)
            .filter(|s| s.plan.generation == generation)
        {
            s.saved = Some(saved.clone());
        }
        self.persist(&id, Phase::Suspended);
        guest.end().await;
        let kept = self.put_back(&id, generation, Held::Nothing, |s| {
            s.step(Transition::Suspended)?;
            s.pid = 0;
            s.saved = Some(saved.clone());
            Ok(())
        });
        if !kept {
            // Discarded while it was saved: nothing of it may stay behind.
            self.discarded_meanwhile(&dir, &id, generation, Some(&saved));
            return Err(AgentError::Other(format!(
                "instance {id} was discarded while it was suspended"
            )));
        }
        self.persist(&id, Phase::Suspended);
        for f in ["state.bin", "disk.qcow2", "qmp.sock"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        self.release_exports(&(id.clone(), generation));
        Ok(AgentReply::Suspended { saved })
    }

    /// Cleans up after an operation whose instance was discarded while it ran: its directory,
    /// its use of the export and the saved state it may have stored.
    pub(crate) fn discarded_meanwhile(
        &self,
        dir: &Path,
        id: &InstanceId,
        generation: u64,
        saved: Option<&SavedState>,
    ) {
        let _ = std::fs::remove_dir_all(dir);
        self.release_exports(&(id.clone(), generation));
        if let Some(saved) = saved.cloned() {
            let repo = self.repo.clone();
            tokio::task::spawn_blocking(move || {
                let _ = repo.remove(&saved.state);
                let _ = repo.remove(&saved.overlay);
            });
        }
    }

    pub(crate) async fn prepare_incoming(
        self: Arc<Self>,
        mut plan: InstancePlan,
        from: Option<String>,
    ) -> Result<AgentReply> {
        let slot = self.new_slot(&mut plan, InstanceState::Migrating).await?;
        let (version, endpoint, dir) = (slot.version.clone(), slot.endpoint, slot.dir.clone());
        {
            let mut slots = lock(&self.slots);
            if let Some(existing) = slots.get(&plan.id) {
                if existing.plan.generation == plan.generation {
                    return Err(AgentError::Busy {
                        id: plan.id.clone(),
                        state: existing.state,
                        what: "preparing it again (already prepared)",
                    });
                }
                if existing.state != InstanceState::Suspended {
                    return Err(AgentError::Busy {
                        id: plan.id.clone(),
                        state: existing.state,
                        what: "an incoming migration",
                    });
                }
            }
            if let Some(old) = slots.insert(plan.id.clone(), slot) {
                // A superseded suspended record (see `claim_slot`).
                let _ = std::fs::remove_dir_all(old.dir);
            }
        }
        let started = async {
            self.clone().rules_for_new_tap().await?;
            let spec = self.vm_setup(&plan, &version, endpoint, &dir).await?;
            Ok::<_, AgentError>(
                self.hv
                    .incoming(spec, &dir, self.config.listen.ip(), from.as_deref())
                    .await?,
            )
        }
        .await;
        let incoming = match started {
            Ok(i) => i,
            Err(e) => {
                self.abandon(&plan, &dir);
                return Err(e);
            }
        };
        let t = incoming.target();
        self.install(&plan, &dir, Held::Incoming(incoming), Phase::Incoming)?;
        Ok(AgentReply::Prepared {
            target: MigrationTargetBody {
                nbd: t.nbd.to_string(),
                export: t.export,
                migration: t.migration.to_string(),
                tls_name: t.tls_name,
                endpoint: endpoint.to_string(),
            },
            version,
        })
    }

    pub(crate) async fn migrate_out(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
        target: MigrationTargetBody,
    ) -> Result<AgentReply> {
        // The source keeps the generation it runs under; the destination has the new one.
        let t = MigrationTarget {
            nbd: parse_addr(&target.nbd)?,
            export: target.export.clone(),
            migration: parse_addr(&target.migration)?,
            tls_name: target.tls_name.clone(),
        };
        let Held::Guest(guest) =
            self.take(&id, generation, "migrate", Transition::MigrateStarted)?
        else {
            return Err(AgentError::Other(format!(
                "instance {id} has no running VM"
            )));
        };
        let (dir, memory, gen) = {
            let slots = lock(&self.slots);
            let s = slots
                .get(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            (s.dir.clone(), s.plan.memory_mib, s.plan.generation)
        };
        match guest.migrate_out(&t, work_limit(memory)).await {
            Ok((total, down)) => {
                self.forget(&id, gen);
                let _ = std::fs::remove_dir_all(&dir);
                self.release_exports(&(id.clone(), gen));
                Ok(AgentReply::MigratedOut {
                    total_ms: total,
                    downtime_ms: down,
                })
            }
            Err((guest, e)) => {
                self.put_back(&id, gen, Held::Guest(guest), |s| {
                    s.step(Transition::Cancelled)
                });
                Err(e.into())
            }
        }
    }

    pub(crate) async fn finish_incoming(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
    ) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let held = {
            let mut slots = lock(&self.slots);
            let s = slots
                .get_mut(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            if s.plan.generation != generation || !matches!(s.held, Held::Incoming(_)) {
                if s.plan.generation == generation && s.state == InstanceState::Running {
                    // Finished already (the same command again).
                    return Ok(AgentReply::Finished {
                        endpoint: s.endpoint.to_string(),
                        answered_ms: None,
                    });
                }
                return Err(AgentError::Busy {
                    id: id.clone(),
                    state: s.state,
                    what: "finish a migration",
                });
            }
            std::mem::replace(&mut s.held, Held::Taken)
        };
        let Held::Incoming(incoming) = held else {
            return Err(AgentError::Other("the incoming VM vanished".into()));
        };
        let memory = lock(&self.slots).get(&id).map_or(0, |s| s.plan.memory_mib);
        match incoming.finish(work_limit(memory)).await {
            Ok(guest) => {
                let pid = guest.pid();
                let mut endpoint = String::new();
                let kept = self.put_back(&id, generation, Held::Guest(guest), |s| {
                    s.pid = pid;
                    endpoint = s.endpoint.to_string();
                    s.step(Transition::Moved)
                });
                if !kept {
                    return Err(AgentError::Other(format!(
                        "instance {id} was discarded while its migration finished"
                    )));
                }
                self.persist(&id, Phase::Running);
                let answered = crate::health::first_answer(
                    &self,
                    &id,
                    generation,
                    crate::health::FIRST_ANSWER_WITHIN,
                )
                .await;
                let answered_ms = match answered {
                    Ok(t) => Some(t.as_millis() as u64),
                    Err(why) => {
                        tracing::warn!(instance = %id, "after its migration: {why}");
                        None
                    }
                };
                tokio::spawn(crate::health::watch(self.clone(), id, generation));
                Ok(AgentReply::Finished {
                    endpoint,
                    answered_ms,
                })
            }
            Err(e) => {
                self.put_back(&id, generation, Held::Nothing, |s| {
                    s.error = Some(format!("finishing the migration: {e}"));
                    s.step(Transition::Fail)
                });
                Err(e.into())
            }
        }
    }

    /// Pauses a running instance's vCPUs in memory (`pause`), or lets a paused one run again:
    /// milliseconds, the VM stays where it is. A failure leaves it as it was.
    pub(crate) async fn pause(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
        pause: bool,
    ) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let (what, t, back) = if pause {
            ("pause", Transition::Pause, Transition::Unpause)
        } else {
            ("unpause", Transition::Unpause, Transition::Pause)
        };
        let Held::Guest(mut guest) = self.take(&id, generation, what, t)? else {
            return Err(AgentError::Other(format!("instance {id} has no VM here")));
        };
        let done = if pause {
            guest.pause().await
        } else {
            guest.cont().await
        };
        let failed = done.is_err();
        let kept = self.put_back(&id, generation, Held::Guest(guest), |s| {
            if failed {
                s.step(back)?;
            }
            Ok(())
        });
        if !kept {
            return Err(AgentError::Unknown(id));
        }
        done?;
        self.persist(&id, if pause { Phase::Paused } else { Phase::Running });
        Ok(if pause {
            AgentReply::Paused
        } else {
            AgentReply::Unpaused
        })
    }

    pub(crate) async fn discard(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
    ) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let slot = {
            let mut slots = lock(&self.slots);
            match slots.get(&id) {
                Some(s) if s.plan.generation <= generation => slots.remove(&id),
                _ => None,
            }
        };
        if let Some(s) = slot {
            // A VM that ran here (running, paused or failed) leaves its volumes as its guest
            // wrote them: they are stored before its files go. A destination that never took
            // over holds only a partial copy; a suspended instance's are stored already.
            let ran_here = matches!(s.held, Held::Guest(_))
                || (matches!(s.held, Held::Nothing) && s.state == InstanceState::Failed);
            match s.held {
                // One that runs well shuts down cleanly where its guest agent can do it.
                Held::Guest(g)
                    if matches!(s.state, InstanceState::Running | InstanceState::Paused) =>
                {
                    if g.discard(DISCARD_GRACE).await {
                        tracing::info!(instance = %id, "shut down cleanly by its guest agent");
                    }
                }
                Held::Guest(g) => g.kill().await,
                Held::Incoming(i) => i.abort().await,
                // An operation holds it: it finds the slot gone and kills the VM itself.
                Held::Taken | Held::Nothing => {}
            }
            if ran_here && !s.plan.volumes.is_empty() {
                if let Err(e) = self
                    .store_volumes(&s.plan, &s.dir, &s.volume_versions)
                    .await
                {
                    // Its files stay for an operator to recover (the error says where).
                    tracing::error!(instance = %id, "{e}; its volume files are left in {}", s.dir.display());
                    self.release_exports(&(id.clone(), s.plan.generation));
                    return Err(e);
                }
            }
            let _ = std::fs::remove_dir_all(&s.dir);
            self.release_exports(&(id.clone(), s.plan.generation));
        }
        Ok(AgentReply::Discarded)
    }

    /// Removes a discarded suspended instance's saved state from the repository (untagged:
    /// the next `gc` frees its chunks). Refused for an instance that runs here.
    pub(crate) async fn remove_saved(
        self: Arc<Self>,
        id: InstanceId,
        saved: SavedState,
    ) -> Result<AgentReply> {
        if lock(&self.slots)
            .get(&id)
            .is_some_and(|s| s.state != InstanceState::Suspended)
        {
            return Err(AgentError::Busy {
                id,
                state: InstanceState::Running,
                what: "removing its saved state",
            });
        }
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
            for image in [&saved.state, &saved.overlay] {
                match repo.remove(image) {
                    Ok(_) | Err(vmatrix_store::StoreError::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Other(e.to_string()))??;
        Ok(AgentReply::Discarded)
    }

    pub(crate) async fn resume_from(
        &self,
        saved: &SavedState,
        spec: VmSpec,
        dir: &Path,
    ) -> Result<Box<dyn Guest>> {
        let incoming = dir.with_extension("in");
        std::fs::create_dir_all(&incoming)
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", incoming.display())))?;
        let repo = self.repo.clone();
        let (st, ov, inc) = (saved.state.clone(), saved.overlay.clone(), incoming.clone());
        let fetched = tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
            repo.export(&st, &inc.join("state.bin"), ExportFormat::Raw, &|_| {})?;
            repo.export(&ov, &inc.join("disk.qcow2"), ExportFormat::Raw, &|_| {})?;
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Other(e.to_string()));
        let resumed = async {
            fetched??;
            let files = SuspendedVm {
                state_file: incoming.join("state.bin"),
                disk: incoming.join("disk.qcow2"),
                state_bytes: 0,
                elapsed: Duration::ZERO,
            };
            Ok::<_, AgentError>(self.hv.resume(spec, dir, &files).await?)
        }
        .await;
        let _ = std::fs::remove_dir_all(&incoming);
        resumed
    }
}
