//! Slots and their volumes: a service with `[[service.volume]]` gives each live instance a
//! slot (1, 2, …), and the instance runs with that slot's volumes. A slot belongs to one
//! instance at a time — it is never attached twice — and outlives it: the next instance to
//! take the slot gets the volumes back as the last one left them.

use std::time::{Duration, Instant};

use vmatrix_core::api::{AgentCommand, AgentReply, InstanceInfo, MachineState};
use vmatrix_core::{ImageName, InstanceState, ServiceName, ServiceSpec, VolumePlan};

use crate::control::{ControlError, Controller, Result};
use crate::db::InstanceRow;

/// How long a new instance waits for a failed one's slot (its discard stores the volumes).
const FAILED_SLOT_WAIT: Duration = Duration::from_secs(120);

/// The slot a new instance of a service takes among `rows` (its instances that are not
/// discarded): the lowest that none holds and that is not in `busy`.
pub(crate) fn lowest_free_slot(rows: &[InstanceRow], service: &ServiceName, busy: &[u32]) -> u32 {
    let held: Vec<u32> = rows
        .iter()
        .filter(|r| r.info.service == *service && r.info.slot > 0)
        .map(|r| r.info.slot)
        .chain(busy.iter().copied())
        .collect();
    (1..).find(|n| !held.contains(n)).unwrap_or(1)
}

/// A failed instance whose slot is below the lowest free one: the slot a replacement should
/// have, once that instance is discarded.
fn failed_below(rows: &[InstanceRow], service: &ServiceName) -> Option<InstanceInfo> {
    let free = lowest_free_slot(rows, service, &[]);
    rows.iter()
        .filter(|r| r.info.service == *service && r.info.slot > 0 && r.info.slot < free)
        .find(|r| r.info.state == InstanceState::Failed)
        .map(|r| r.info.clone())
}

impl Controller {
    /// Before a new live instance of `spec` (with volumes) takes a slot: while a failed
    /// instance still holds a lower one, waits until it is discarded — its machine stores what
    /// its guest wrote — so that a replacement gets the volumes of the instance it replaces.
    pub(crate) async fn wait_for_failed_slots(&self, spec: &ServiceSpec) -> Result<()> {
        if spec.volumes.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + FAILED_SLOT_WAIT;
        loop {
            let rows = self.db(|d| d.instances())?;
            let Some(failed) = failed_below(&rows, &spec.name) else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(ControlError::Conflict(format!(
                    "slot {} of {} (its volumes) is still held by {}, failed and not discarded \
                     after {}s; discard it (`vmatrix discard {}`) and try again",
                    failed.slot,
                    spec.name,
                    failed.id,
                    FAILED_SLOT_WAIT.as_secs(),
                    failed.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The service slot whose volume image is `volume` (`vol-SERVICE-SLOT-NAME`), among the
    /// services declared now (none: no instance can hold it).
    fn slot_of(&self, volume: &str) -> Result<Option<(ServiceName, u32)>> {
        for spec in self.services()? {
            let Some(rest) = volume.strip_prefix(&format!("vol-{}-", spec.name)) else {
                continue;
            };
            for v in &spec.volumes {
                let slot = rest
                    .strip_suffix(&format!("-{}", v.name))
                    .and_then(|n| n.parse::<u32>().ok())
                    .filter(|n| *n > 0);
                if let Some(slot) = slot {
                    return Ok(Some((spec.name.clone(), slot)));
                }
            }
        }
        Ok(None)
    }

    /// `restore-volume` (`snapshot` given) and `remove-volume`: refused while an instance —
    /// running, paused, suspended or failed — holds the volume's slot (its guest has the old
    /// contents in memory, and its next store would overwrite the change); no new instance
    /// takes the slot while it runs. Done by a machine that is up (the repository is shared).
    pub(crate) async fn set_volume(
        &self,
        volume: &ImageName,
        snapshot: Option<&str>,
        why: &str,
    ) -> Result<String> {
        if !volume.as_str().starts_with("vol-") {
            return Err(ControlError::BadRequest(format!(
                "{volume} is not a volume: volumes are named vol-SERVICE-SLOT-NAME (`vmatrix \
                 volume ls` lists them)"
            )));
        }
        if let Some(s) = snapshot {
            if s == vmatrix_core::volume::LATEST || vmatrix_core::Tag::new(s).is_err() {
                return Err(ControlError::BadRequest(format!(
                    "{s:?} is not a snapshot of {volume}: name one that `vmatrix volume ls` \
                     shows (not `latest`)"
                )));
            }
        }
        let slot = self.slot_of(volume.as_str())?;
        // The check and the mark are one step under the database lock, where activations
        // choose their slot.
        if let Some((service, n)) = &slot {
            let db = self.lock_db()?;
            if let Some(h) = db
                .instances()?
                .into_iter()
                .find(|r| r.info.service == *service && r.info.slot == *n)
            {
                return Err(ControlError::Conflict(format!(
                    "volume {volume} belongs to slot {n} of {service}, which {} holds ({}); \
                     discard it or scale {service} in first, then try again",
                    h.info.id,
                    h.info.state.as_str()
                )));
            }
            let mut busy = self.volume_busy.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert((service.to_string(), *n)) {
                return Err(ControlError::Conflict(format!(
                    "volume {volume} is being changed by another operation; try again"
                )));
            }
        }
        let done = async {
            let up = self
                .machines()?
                .into_iter()
                .find(|m| m.state == MachineState::Up)
                .ok_or_else(|| ControlError::Conflict("no machine is up to do it".into()))?;
            let cmd = AgentCommand::SetVolume {
                volume: volume.clone(),
                snapshot: snapshot.map(str::to_owned),
            };
            match self.send(&up, &cmd, 0).await? {
                AgentReply::VolumeSet { changed } => Ok(changed.join("; ")),
                other => Err(crate::agents::unexpected(&up, "volume-set", &other)),
            }
        }
        .await;
        if let Some((service, n)) = &slot {
            self.volume_busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(service.to_string(), *n));
        }
        let what = match snapshot {
            Some(s) => format!("restore {volume} to {s}"),
            None => format!("remove {volume}"),
        };
        match &done {
            Ok(changed) => self.event("controller", &what, why, &format!("ok: {changed}")),
            Err(e) => self.event("controller", &what, why, &format!("failed: {e}")),
        }
        done
    }

    /// The volumes an instance in `slot` of `spec` runs with (none for slot 0).
    pub(crate) fn volume_plans(spec: &ServiceSpec, slot: u32) -> Result<Vec<VolumePlan>> {
        if slot == 0 {
            return Ok(Vec::new());
        }
        spec.volumes
            .iter()
            .map(|v| {
                Ok(VolumePlan {
                    name: v.name.clone(),
                    image: vmatrix_core::volume::volume_image(spec.name.as_str(), slot, &v.name)
                        .map_err(ControlError::Conflict)?,
                    size: v.size,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmatrix_core::InstanceId;

    fn row(id: &str, slot: u32, state: InstanceState) -> InstanceRow {
        InstanceRow {
            info: InstanceInfo {
                id: InstanceId::new(id).unwrap(),
                service: ServiceName::new("web").unwrap(),
                image: String::new(),
                version: String::new(),
                machine: "rm1".into(),
                state,
                endpoint: String::new(),
                generation: 1,
                pinned_until_ms: 0,
                purpose: Default::default(),
                address: None,
                slot,
            },
            saved: None,
            seq: 1,
        }
    }

    #[test]
    fn a_new_instance_takes_the_lowest_free_slot_and_waits_for_a_failed_one_below() {
        let web = ServiceName::new("web").unwrap();
        assert_eq!(lowest_free_slot(&[], &web, &[]), 1);
        assert_eq!(lowest_free_slot(&[], &web, &[1]), 2);
        let rows = vec![
            row("web-1", 1, InstanceState::Running),
            row("web-3", 3, InstanceState::Suspended),
        ];
        assert_eq!(lowest_free_slot(&rows, &web, &[]), 2);
        assert!(failed_below(&rows, &web).is_none());
        // web-1 failed: its replacement should get slot 1 once web-1 is discarded.
        let rows = vec![
            row("web-1", 1, InstanceState::Failed),
            row("web-2", 2, InstanceState::Running),
        ];
        assert_eq!(lowest_free_slot(&rows, &web, &[]), 3);
        assert_eq!(failed_below(&rows, &web).unwrap().slot, 1);
        // Instances without volumes hold no slot.
        assert_eq!(
            lowest_free_slot(&[row("web-4", 0, InstanceState::Running)], &web, &[]),
            1
        );
    }
}
