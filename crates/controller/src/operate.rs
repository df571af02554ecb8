//! Operators' commands (`vmatrix migrate`, `suspend`, `rollout`, `commit`, …): each runs to its
//! end as an operation the controller owns, through the same actions the policy uses. A move an
//! operator asked for pins the instance (the policy leaves it alone for `pin_s`); a command on
//! an instance an automatic operation holds waits for that operation instead of failing.

use vmatrix_core::api::Operation;
use vmatrix_core::InstanceId;

use crate::control::{now_ms, Controller, Result};

/// How long an operator's command waits for an automatic operation on its instance.
const OPERATOR_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

impl Controller {
    /// Waits (up to [`OPERATOR_WAIT`]) until no operation holds `id`; what then still holds it
    /// is refused by the operation itself with a clear message.
    async fn wait_not_busy(&self, id: &InstanceId) {
        let deadline = std::time::Instant::now() + OPERATOR_WAIT;
        if self.is_busy(id) {
            tracing::info!(instance = %id, "an operator's command waits for the operation on it to finish");
        }
        while self.is_busy(id) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Runs a manual operation to completion.
    pub async fn operate(&self, op: Operation) -> Result<String> {
        let why = "operator request";
        // An explicit placement holds: the policy does not move the instance for `pin_s`.
        let until = now_ms() + (self.settings().pin_s * 1000.0) as u64;
        let pin = |id: &InstanceId| -> Result<()> { self.db(|d| d.pin(id, until)) };
        // A placement that did not happen pins nothing.
        let unless_failed = |id: &InstanceId, r: Result<String>| {
            if r.is_err() {
                let _ = self.db(|d| d.unpin(id));
            }
            r
        };
        // An operator's command on an instance that an automatic operation is moving waits for
        // it (as a queue would) instead of failing; for a move, the pin above is set first, so
        // the policy starts nothing new on it meanwhile.
        match &op {
            Operation::Migrate { instance, .. }
            | Operation::Resume {
                instance,
                on: Some(_),
            } => {
                pin(instance)?;
                self.wait_not_busy(instance).await;
            }
            Operation::Suspend { instance }
            | Operation::Resume { instance, on: None }
            | Operation::Discard { instance }
            | Operation::Commit { instance, .. } => self.wait_not_busy(instance).await,
            _ => {}
        }
        match op {
            Operation::Activate { service, on } => {
                let i = self.activate(&service, on.as_deref(), why).await?;
                if on.is_some() {
                    pin(&i.id)?;
                }
                Ok(format!("{} activating on {}", i.id, i.machine))
            }
            Operation::Suspend { instance } => self.suspend(&instance, why).await,
            Operation::Resume {
                instance,
                on: Some(on),
            } => {
                let r = self.resume(&instance, Some(&on), why).await;
                unless_failed(&instance, r)
            }
            Operation::Resume { instance, on: None } => self.resume(&instance, None, why).await,
            Operation::Migrate { instance, to } => {
                let r = self.migrate(&instance, &to, why).await;
                unless_failed(&instance, r)
            }
            Operation::Unpin { instance } => {
                self.row(&instance)?;
                Ok(if self.db(|d| d.unpin(&instance))? {
                    self.event("api", &format!("unpin {instance}"), why, "ok");
                    format!("{instance} unpinned: the policy may move it")
                } else {
                    format!("{instance} was not pinned")
                })
            }
            Operation::Discard { instance } => self.discard(&instance, why).await,
            Operation::Drain { machine } => self.drain(&machine, why).await,
            Operation::Undrain { machine } => self.undrain(&machine, why),
            Operation::Rollout {
                service,
                to,
                batch,
                pause_s,
                health_timeout_s,
                author,
            } => {
                let opts = crate::rollout::RolloutOptions::from_request(
                    batch,
                    pause_s,
                    health_timeout_s,
                    author,
                )?;
                self.rollout(&service, &to, None, opts, "rollout").await
            }
            Operation::Rollback {
                service,
                batch,
                pause_s,
                author,
            } => {
                let opts =
                    crate::rollout::RolloutOptions::from_request(batch, pause_s, None, author)?;
                self.rollback(&service, opts).await
            }
            Operation::Commit {
                instance,
                tag,
                message,
                author,
            } => {
                let author = author.unwrap_or_else(|| "api".into());
                self.commit(&instance, &tag, message.as_deref(), &author)
                    .await
            }
            Operation::Maintain {
                service,
                version,
                on,
            } => {
                let i = self
                    .maintain(&service, version.as_deref(), on.as_deref(), why)
                    .await?;
                Ok(format!(
                    "{} (maintenance, {}) activating on {}; it gets no live traffic",
                    i.id, i.image, i.machine
                ))
            }
            Operation::Wake { service } => self.wake(&service).await,
            Operation::Drop { service } => self.set_dropped(&service, true, "api", why),
            Operation::Undrop { service } => self.set_dropped(&service, false, "api", why),
            Operation::RestoreVolume { volume, snapshot } => {
                self.set_volume(&volume, Some(&snapshot), why).await
            }
            Operation::RemoveVolume { volume } => self.set_volume(&volume, None, why).await,
        }
    }
}
