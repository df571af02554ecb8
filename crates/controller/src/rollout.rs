//! Rollouts and rollbacks by server switching: a service's live instances are replaced by a
//! new version batch by batch — new instances start beside the old ones (where placement finds
//! room), each must pass its health check, traffic moves to them (the switch routes running
//! instances), then the old ones leave the routes, get a grace for requests in flight, and are
//! discarded. A new instance that fails its health check stops the rollout, and the replaced
//! batches are put back the same way (reverted). The policy leaves a service alone while it
//! rolls out. Every step is recorded (`rollouts` table): a restarted controller resumes it.
//!
//! This module must never leave a service with fewer running instances than it had: a new
//! instance runs before an old one leaves (unless the pool has no room at all, when one old
//! instance leaves first — said in the status).

use std::sync::Arc;
use std::time::Duration;

use vmatrix_core::api::{Purpose, RolloutState, RolloutStatus};
use vmatrix_core::{ImageRef, InstanceId, InstanceState, ServiceName};

use crate::actions::Start;
use crate::control::{now_ms, ControlError, Controller, Result};
use crate::db::ServiceVersion;

/// How long a retired instance stays out of the routes before it is discarded: requests in
/// flight on it finish (the switch retries an idempotent one that does not).
const RETIRE_GRACE: Duration = Duration::from_secs(2);

/// A rollout's knobs.
#[derive(Debug, Clone)]
pub struct RolloutOptions {
    /// Who asks.
    pub by: String,
    /// Instances replaced at once.
    pub batch: u32,
    /// Between batches.
    pub pause: Duration,
    /// How long a new instance may take to pass its health check.
    pub health_timeout: Duration,
}

impl RolloutOptions {
    /// From the API's optional fields, checked.
    pub fn from_request(
        batch: Option<u32>,
        pause_s: Option<f64>,
        health_timeout_s: Option<f64>,
        by: Option<String>,
    ) -> Result<Self> {
        let by = by.unwrap_or_else(|| "api".into());
        crate::maintenance::check_author(&by)?;
        let batch = batch.unwrap_or(1);
        if !(1..=100).contains(&batch) {
            return Err(ControlError::BadRequest(format!(
                "batch {batch}: use 1 to 100 instances at once"
            )));
        }
        let secs = |what: &str, v: f64, lo: f64, hi: f64| -> Result<Duration> {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(ControlError::BadRequest(format!(
                    "{what} {v}: use {lo} to {hi} seconds"
                )));
            }
            Ok(Duration::from_secs_f64(v))
        };
        Ok(Self {
            by,
            batch,
            pause: secs("pause", pause_s.unwrap_or(0.0), 0.0, 3600.0)?,
            health_timeout: secs(
                "health timeout",
                health_timeout_s.unwrap_or(180.0),
                5.0,
                3600.0,
            )?,
        })
    }
}

impl Controller {
    /// The rollouts recorded (the last one of each service).
    pub fn rollouts(&self) -> Result<Vec<RolloutStatus>> {
        self.db(|d| d.rollouts())
    }

    /// Whether `service` is rolling out now (the policy leaves it alone).
    pub(crate) fn is_rolling(&self, service: &str) -> bool {
        self.rolling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(service)
    }

    /// Applies the desired services; a service whose image changed and that runs instances is
    /// rolled out to the new image (one at a time) by a task of its own. Returns those.
    pub fn apply_and_roll(
        self: &Arc<Self>,
        services: Vec<vmatrix_core::ServiceSpec>,
    ) -> Result<Vec<ServiceName>> {
        let before = self.services()?;
        let rows = self.db(|d| d.instances())?;
        let changed: Vec<(ServiceName, ImageRef, ImageRef)> = services
            .iter()
            .filter_map(|s| {
                let old = before.iter().find(|o| o.name == s.name)?;
                (old.image != s.image).then(|| (s.name.clone(), old.image.clone(), s.image.clone()))
            })
            .filter(|(name, _, _)| {
                rows.iter().any(|r| {
                    r.info.service == *name
                        && r.info.purpose == Purpose::Live
                        && r.info.state.is_placed()
                })
            })
            .collect();
        let names: Vec<ServiceName> = changed.iter().map(|(n, _, _)| n.clone()).collect();
        // Claimed before anything is applied, all at once: a rollout under way refuses this
        // apply (nothing applied), and none can start in between.
        let claims = self.claim_rolling(&names).map_err(|e| {
            ControlError::Conflict(format!(
                "{e}; apply a new image once it ends; nothing was applied"
            ))
        })?;
        let opts = RolloutOptions::from_request(None, None, None, Some("apply".into()))?;
        self.apply(services)?;
        for ((name, from, to), claim) in changed.iter().zip(claims) {
            let (me, name, from, to, opts) = (
                self.clone(),
                name.clone(),
                from.clone(),
                to.clone(),
                opts.clone(),
            );
            tokio::spawn(async move {
                let claim = [claim];
                if let Err(e) = me
                    .rollout_claimed(&claim, &name, Some(&from), &to, None, opts, "rollout")
                    .await
                {
                    tracing::warn!("rollout of {name} after apply: {e}");
                }
            });
        }
        Ok(changed.into_iter().map(|(n, _, _)| n).collect())
    }

    /// Replaces the live instances of `service` by `to` (a tag, and a version id if known),
    /// batch by batch; returns when it is done, or fails with why it stopped (reverted).
    pub async fn rollout(
        &self,
        service: &ServiceName,
        to: &ImageRef,
        to_version: Option<&str>,
        opts: RolloutOptions,
        kind: &str,
    ) -> Result<String> {
        let claim = self.claim_rolling(std::slice::from_ref(service))?;
        self.rollout_claimed(&claim, service, None, to, to_version, opts, kind)
            .await
    }

    /// Marks `services` as rolling (the policy leaves them alone) in one step, or refuses if
    /// any of them is rolling or has a rollout under way; each is released when its guard
    /// drops.
    fn claim_rolling(&self, services: &[ServiceName]) -> Result<Vec<Rolling>> {
        let active = self.rollouts()?;
        let mut rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        for service in services {
            if let Some(r) = active
                .iter()
                .find(|r| r.service == *service && r.state.is_active())
            {
                return Err(ControlError::Conflict(format!(
                    "a {} of {service} to {} is under way ({} of {} replaced); \
                     `vmatrix rollout --status {service}` follows it",
                    r.kind,
                    r.to_image,
                    r.replaced.len(),
                    r.total
                )));
            }
            if rolling.contains(service.as_str()) {
                return Err(ControlError::Conflict(format!(
                    "a rollout of {service} is starting"
                )));
            }
        }
        Ok(services
            .iter()
            .map(|s| {
                rolling.insert(s.to_string());
                Rolling {
                    set: self.rolling.clone(),
                    service: s.to_string(),
                }
            })
            .collect())
    }

    /// A rollout whose service is claimed. An error that stops it midway (not a revert) leaves
    /// it `failed` with why, never "under way" for good.
    #[allow(clippy::too_many_arguments)]
    async fn rollout_claimed(
        &self,
        _claim: &[Rolling],
        service: &ServiceName,
        from: Option<&ImageRef>,
        to: &ImageRef,
        to_version: Option<&str>,
        opts: RolloutOptions,
        kind: &str,
    ) -> Result<String> {
        let spec = self.spec_of(service)?;
        let from = from.cloned().unwrap_or_else(|| spec.image.clone());
        let st = self.start_rollout(service, &from, to, to_version, opts, kind)?;
        let result = self.run_rollout(st).await;
        if let Err(e) = &result {
            self.mark_failed(service, e);
        }
        result
    }

    /// Records a rollout still marked under way as failed, with why.
    fn mark_failed(&self, service: &ServiceName, e: &ControlError) {
        let Ok(list) = self.rollouts() else { return };
        if let Some(mut st) = list
            .into_iter()
            .find(|r| r.service == *service && r.state.is_active())
        {
            st.state = RolloutState::Failed;
            let _ = self.save(&mut st, format!("stopped: {e}"));
        }
    }

    fn start_rollout(
        &self,
        service: &ServiceName,
        from: &ImageRef,
        to: &ImageRef,
        to_version: Option<&str>,
        opts: RolloutOptions,
        kind: &str,
    ) -> Result<RolloutStatus> {
        let rows = self.db(|d| d.instances())?;
        let live: Vec<_> = rows
            .iter()
            .filter(|r| {
                r.info.service == *service
                    && r.info.purpose == Purpose::Live
                    && matches!(
                        r.info.state,
                        InstanceState::Running
                            | InstanceState::Paused
                            | InstanceState::Activating
                            | InstanceState::Migrating
                    )
            })
            .collect();
        let from_version = live
            .iter()
            .map(|r| r.info.version.clone())
            .find(|v| !v.is_empty())
            .unwrap_or_default();
        let already = |r: &&&crate::db::InstanceRow| {
            to_version.is_some_and(|v| v == r.info.version) && r.info.image == to.to_string()
        };
        let old: Vec<InstanceId> = live
            .iter()
            .filter(|r| !already(r))
            .map(|r| r.info.id.clone())
            .collect();
        let kept: Vec<InstanceId> = live
            .iter()
            .filter(|r| already(r))
            .map(|r| r.info.id.clone())
            .collect();
        let now = now_ms();
        let st = RolloutStatus {
            service: service.clone(),
            kind: kind.to_owned(),
            state: RolloutState::Running,
            from_image: from.to_string(),
            from_version,
            to_image: to.to_string(),
            to_version: to_version.unwrap_or_default().to_owned(),
            batch: opts.batch,
            pause_s: opts.pause.as_secs_f64(),
            health_timeout_s: opts.health_timeout.as_secs_f64(),
            total: old.len() as u32,
            old,
            replaced: Vec::new(),
            starting: Vec::new(),
            kept,
            started_ms: now,
            updated_ms: now,
            message: "started".into(),
            requested_by: opts.by.clone(),
        };
        self.db(|d| d.put_rollout(&st))?;
        // New instances from now on — the policy's too, once it is back — run the new version.
        self.set_image(service, to)?;
        self.event(
            &opts.by,
            &format!("{kind} {service} to {to}"),
            "operator request",
            &format!(
                "started: {} instance(s) of {} to replace, {} at a time",
                st.total, st.from_image, st.batch
            ),
        );
        Ok(st)
    }

    /// Points the stored spec of `service` at `image`.
    fn set_image(&self, service: &ServiceName, image: &ImageRef) -> Result<()> {
        let mut all = self.services()?;
        for s in all.iter_mut().filter(|s| s.name == *service) {
            s.image = image.clone();
        }
        self.db(|d| d.set_services(&all))
    }

    fn save(&self, st: &mut RolloutStatus, message: String) -> Result<()> {
        st.updated_ms = now_ms();
        st.message = message;
        self.db(|d| d.put_rollout(st))
    }

    /// Runs a recorded rollout from where it is to its end.
    pub(crate) async fn run_rollout(&self, mut st: RolloutStatus) -> Result<String> {
        if st.state == RolloutState::Reverting {
            return self
                .revert(st, "resumed after a controller restart".into())
                .await;
        }
        let to = ImageRef::parse(&st.to_image)
            .map_err(|e| ControlError::Conflict(format!("rollout target: {e}")))?;
        let timeout = Duration::from_secs_f64(st.health_timeout_s);
        let batches = st.total.div_ceil(st.batch.max(1)).max(1);
        // Old instances replaced before a restart that did not leave yet: they leave now.
        let rows = self.db(|d| d.instances())?;
        for (old, new) in st.replaced.clone() {
            if rows
                .iter()
                .any(|r| r.info.id == old && r.info.state.is_placed())
            {
                self.retire(&old, &format!("{} to {to}: replaced by {new}", st.kind))
                    .await;
            }
        }
        while !st.old.is_empty() {
            // Instances that left meanwhile (failed, discarded) need no replacing.
            let rows = self.db(|d| d.instances())?;
            st.old.retain(|id| {
                rows.iter()
                    .any(|r| r.info.id == *id && r.info.state.is_placed())
            });
            let batch: Vec<InstanceId> = st.old.iter().take(st.batch as usize).cloned().collect();
            if batch.is_empty() {
                break;
            }
            // New instances a stopped controller had started for this batch are taken over:
            // live instances of the new version that replace nothing yet.
            let claimed = |id: &InstanceId| {
                st.kept.contains(id)
                    || st.old.contains(id)
                    || st.replaced.iter().any(|(_, n)| n == id)
            };
            let mut started: Vec<InstanceId> = rows
                .iter()
                .filter(|r| {
                    r.info.service == st.service
                        && r.info.purpose == Purpose::Live
                        && r.info.image == st.to_image
                        && r.info.state.is_placed()
                        && !claimed(&r.info.id)
                })
                .map(|r| r.info.id.clone())
                .take(batch.len())
                .collect();
            let mut failure = None;
            for old in batch.iter().skip(started.len()) {
                match self.start_replacement(&st, &to, old).await {
                    Ok(id) => {
                        started.push(id);
                        st.starting = started.clone();
                        self.save(&mut st, format!("starting {}", join(&started)))?;
                    }
                    Err(e) => {
                        // An old one that left to make room comes back with the revert.
                        if self.db(|d| d.instance(old))?.is_none() {
                            st.old.retain(|o| o != old);
                            st.replaced.push((old.clone(), old.clone()));
                        }
                        failure = Some(format!("a new instance of {to} did not start: {e}"));
                        break;
                    }
                }
            }
            if failure.is_none() {
                failure = self
                    .wait_running(&started, timeout)
                    .await
                    .err()
                    .map(|e| e.to_string());
            }
            if let Some(why) = failure {
                for id in &started {
                    let _ = self
                        .discard(id, &format!("rollout to {to} stopped: {why}"))
                        .await;
                }
                st.starting.clear();
                return self.revert(st, why).await;
            }
            if st.to_version.is_empty() {
                st.to_version = self
                    .row(&started[0])
                    .map(|r| r.info.version)
                    .unwrap_or_default();
            }
            // Recorded before the old ones leave: a restart in between retires them again
            // instead of taking their replacements for new ones.
            for (old, new) in batch.iter().zip(&started) {
                st.old.retain(|o| o != old);
                st.replaced.push((old.clone(), new.clone()));
            }
            st.starting.clear();
            self.save(&mut st, format!("retiring {}", join(&batch)))?;
            for (old, new) in batch.iter().zip(&started) {
                self.retire(old, &format!("{} to {to}: replaced by {new}", st.kind))
                    .await;
            }
            let done = st.replaced.len() as u32;
            let message = format!(
                "batch {} of {batches}: {} replaced by {}",
                done.div_ceil(st.batch.max(1)),
                join(&batch),
                join(&started)
            );
            self.save(&mut st, message.clone())?;
            self.event(
                "controller",
                &format!("{} {} to {to}", st.kind, st.service),
                &message,
                &format!("{done} of {} done", st.total),
            );
            if !st.old.is_empty() && st.pause_s > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(st.pause_s)).await;
            }
        }
        // Dormant copies of the old version would bring it back when resumed: they go.
        let rows = self.db(|d| d.instances())?;
        let mut dormant = 0;
        for r in rows.iter().filter(|r| {
            r.info.service == st.service
                && r.info.purpose == Purpose::Live
                && r.info.state == InstanceState::Suspended
                && r.info.version != st.to_version
        }) {
            let why = format!("{} to {to}: a suspended copy of the old version", st.kind);
            if self.discard(&r.info.id, &why).await.is_ok() {
                dormant += 1;
            }
        }
        st.state = RolloutState::Done;
        let message = format!(
            "done: {} instance(s) of {} now run {} ({}){}",
            st.replaced.len(),
            st.service,
            st.to_image,
            crate::control::short_version(&st.to_version),
            if dormant > 0 {
                format!("; {dormant} suspended instance(s) of the old version discarded")
            } else {
                String::new()
            }
        );
        self.save(&mut st, message.clone())?;
        self.db(|d| {
            d.set_service_version(
                &st.service,
                &ServiceVersion {
                    image: st.to_image.clone(),
                    version: st.to_version.clone(),
                    previous_image: st.from_image.clone(),
                    previous_version: st.from_version.clone(),
                },
            )
        })?;
        self.event(
            "controller",
            &format!("{} {} to {to}", st.kind, st.service),
            "every batch passed its health check",
            &message,
        );
        Ok(message)
    }

    /// A new instance of the target version beside `old`; where the pool has no room for it,
    /// `old` leaves first.
    async fn start_replacement(
        &self,
        st: &RolloutStatus,
        to: &ImageRef,
        old: &InstanceId,
    ) -> Result<InstanceId> {
        let kind = || Start::Version {
            image: to.clone(),
            version: (!st.to_version.is_empty()).then(|| st.to_version.clone()),
        };
        let why = format!("{} to {to}: replaces {old}", st.kind);
        // On the old one's machine when it has room for both (checked when placing): the
        // service keeps its layout (placement elsewhere would count the old one, about to
        // leave, and bunch them up).
        let beside = self.machine_of(old)?;
        match self
            .activate_as(&st.service, beside.as_deref(), &why, kind())
            .await
        {
            Ok(i) => Ok(i.id),
            Err(ControlError::Conflict(no_room)) => {
                // No room beside it: one instance's capacity is missing for a moment.
                self.event(
                    "controller",
                    &format!("{} {} to {to}", st.kind, st.service),
                    &format!("no room for a new instance beside {old} ({no_room})"),
                    &format!("{old} leaves first"),
                );
                self.retire(old, &format!("{} to {to}: makes room", st.kind))
                    .await;
                self.activate_as(&st.service, None, &why, kind())
                    .await
                    .map(|i| i.id)
            }
            Err(e) => Err(e),
        }
    }

    /// The machine of `old`, if it still has one.
    fn machine_of(&self, old: &InstanceId) -> Result<Option<String>> {
        Ok(self
            .db(|d| d.instance(old))?
            .map(|r| r.info.machine)
            .filter(|m| !m.is_empty()))
    }

    /// Machine `name` if it is up, dedicated and has the CPU and memory for one more instance
    /// of `spec` beside everything placed there (called under the placement lock).
    pub(crate) fn room_on(
        &self,
        spec: &vmatrix_core::ServiceSpec,
        name: &str,
    ) -> Result<Option<vmatrix_core::api::MachineInfo>> {
        let Some(m) = self.machines()?.into_iter().find(|m| m.name == name) else {
            return Ok(None);
        };
        if m.state != vmatrix_core::api::MachineState::Up
            || m.role != vmatrix_core::api::MachineRole::Dedicated
        {
            return Ok(None);
        }
        let (cpu, mem) = self.placed_use()?.remove(name).unwrap_or_default();
        let (cpu, mem) = (
            cpu + u64::from(spec.vcpus),
            mem + u64::from(spec.memory_mib),
        );
        Ok((cpu <= u64::from(m.vcpus) && mem <= u64::from(m.memory_mib)).then_some(m))
    }

    /// Waits until every instance in `ids` runs (its health check passed).
    async fn wait_running(&self, ids: &[InstanceId], timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        for id in ids {
            loop {
                match self.db(|d| d.instance(id))? {
                    Some(r) if r.info.state == InstanceState::Running => break,
                    Some(r) if r.info.state == InstanceState::Activating => {}
                    Some(r) => {
                        return Err(ControlError::Conflict(format!(
                            "new instance {id} is {} instead of running",
                            r.info.state.as_str()
                        )))
                    }
                    None => {
                        return Err(ControlError::Conflict(format!(
                            "new instance {id} was discarded before it ran"
                        )))
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(ControlError::Conflict(format!(
                        "new instance {id} did not pass its health check within {} s",
                        timeout.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Takes `id` out of the switch's routes, lets its requests in flight finish, discards it.
    /// A discard refused for now (another operation holds the instance, say) is tried again
    /// for up to 10 minutes; meanwhile, and if it never succeeds, it stays out of the routes.
    async fn retire(&self, id: &InstanceId, why: &str) {
        self.retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
        tokio::time::sleep(RETIRE_GRACE).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            match self.discard(id, why).await {
                Ok(_) | Err(ControlError::NotFound(_)) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!("retiring {id}: {e}; trying again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    self.event(
                        "controller",
                        &format!("discard {id}"),
                        why,
                        &format!("failed for 10 minutes ({e}): it stays out of the routes"),
                    );
                    return;
                }
            }
        }
        self.retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Puts the old version back in place of every replaced instance, newest first.
    async fn revert(&self, mut st: RolloutStatus, why: String) -> Result<String> {
        let from = ImageRef::parse(&st.from_image)
            .map_err(|e| ControlError::Conflict(format!("rollout source: {e}")))?;
        st.state = RolloutState::Reverting;
        self.save(&mut st, format!("stopped: {why}; reverting"))?;
        self.set_image(&st.service, &from)?;
        self.event(
            "controller",
            &format!("{} {} to {}", st.kind, st.service, st.to_image),
            &why,
            &format!(
                "stopped; reverting {} replaced instance(s)",
                st.replaced.len()
            ),
        );
        let back = RolloutStatus {
            to_image: st.from_image.clone(),
            to_version: st.from_version.clone(),
            kind: "revert".into(),
            ..st.clone()
        };
        let timeout = Duration::from_secs_f64(st.health_timeout_s);
        while let Some((old, new)) = st.replaced.last().cloned() {
            let put_back = async {
                let id = self.start_replacement(&back, &from, &new).await?;
                self.wait_running(std::slice::from_ref(&id), timeout)
                    .await?;
                Ok::<_, ControlError>(id)
            }
            .await;
            match put_back {
                Ok(id) => {
                    self.retire(&new, &format!("revert to {from}: replaced by {id}"))
                        .await;
                    st.replaced.pop();
                    st.old.push(old);
                    self.save(&mut st, format!("stopped: {why}; reverting"))?;
                }
                Err(e) => {
                    st.state = RolloutState::Failed;
                    let message = format!(
                        "stopped: {why}; the revert failed too ({e}): {} instance(s) still run {}",
                        st.replaced.len(),
                        st.to_image
                    );
                    self.save(&mut st, message.clone())?;
                    self.event(
                        "controller",
                        &format!("{} {} to {}", st.kind, st.service, st.to_image),
                        &why,
                        &message,
                    );
                    return Err(ControlError::Conflict(message));
                }
            }
        }
        st.state = RolloutState::Reverted;
        let message = format!(
            "{} of {} to {} stopped and reverted: {why}; it runs {} again",
            st.kind, st.service, st.to_image, st.from_image
        );
        self.save(&mut st, message.clone())?;
        self.event(
            "controller",
            &format!("{} {} to {}", st.kind, st.service, st.to_image),
            &why,
            "reverted",
        );
        Err(ControlError::Conflict(message))
    }

    /// Returns `service` to the version it ran before its last rollout.
    pub async fn rollback(&self, service: &ServiceName, opts: RolloutOptions) -> Result<String> {
        let v = self.db(|d| d.service_version(service))?.ok_or_else(|| {
            ControlError::Conflict(format!(
                "{service} has no earlier version to return to: no rollout of it has finished"
            ))
        })?;
        let image = ImageRef::parse(&v.previous_image)
            .map_err(|e| ControlError::Conflict(format!("the previous image: {e}")))?;
        let version = (!v.previous_version.is_empty()).then_some(v.previous_version.as_str());
        self.rollout(service, &image, version, opts, "rollback")
            .await
    }

    /// Resumes the rollouts a stopped controller left under way (once the machines have
    /// reported what runs).
    pub(crate) async fn resume_rollouts(self: Arc<Self>) {
        // The policy must leave these services alone from the first tick, not once resumed.
        let Ok(list) = self.rollouts() else { return };
        let list: Vec<RolloutStatus> = list.into_iter().filter(|r| r.state.is_active()).collect();
        {
            let mut rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
            for st in &list {
                rolling.insert(st.service.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(crate::control::DOWN_AFTER_MS * 2)).await;
        for st in list {
            let service = st.service.to_string();
            self.event(
                "controller",
                &format!("{} {} to {}", st.kind, st.service, st.to_image),
                "the controller restarted while it ran",
                &format!("resumed: {} of {} replaced", st.replaced.len(), st.total),
            );
            let me = self.clone();
            tokio::spawn(async move {
                let _claim = Rolling {
                    set: me.rolling.clone(),
                    service: service.clone(),
                };
                let name = st.service.clone();
                if let Err(e) = me.run_rollout(st).await {
                    tracing::warn!("resumed rollout of {service}: {e}");
                    me.mark_failed(&name, &e);
                }
            });
        }
    }
}

/// A service claimed as rolling; released on drop (whatever ends the rollout, a panic too).
pub(crate) struct Rolling {
    set: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    service: String,
}

impl Drop for Rolling {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.service);
    }
}

fn join(ids: &[InstanceId]) -> String {
    ids.iter()
        .map(|i| i.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
