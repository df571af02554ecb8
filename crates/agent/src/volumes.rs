//! The volumes of the VMs on this machine: attached when a VM starts — over this machine's
//! export of the slot's stored version, or blank for a volume never stored — and stored back
//! into the repository as a new version (only the chunks the guest changed are new) when the
//! instance is suspended or discarded, before its files go.

use std::path::Path;

use vmatrix_core::api::{AgentReply, InstancePlan};
use vmatrix_core::{ImageName, ImageRef, InstanceId};
use vmatrix_store::{CommitInfo, StoreError};
use vmatrix_vmm::{BaseImage, VmDir, VolumeDisk};

use crate::machine::{lock, Agent, AgentError, Result};

impl Agent {
    /// The volumes of `plan` for a VM of `user`: each over the stored version its image's
    /// `latest` tag names (exported here for the VM's life), or blank when it was never
    /// stored. `known` pins the versions (an adopted VM's); returns the disks and their
    /// versions ("" for a blank one).
    pub(crate) async fn attach_volumes(
        &self,
        plan: &InstancePlan,
        user: (InstanceId, u64),
        known: Option<&[String]>,
    ) -> Result<(Vec<VolumeDisk>, Vec<String>)> {
        let mut disks = Vec::new();
        let mut versions = Vec::new();
        for (i, v) in plan.volumes.iter().enumerate() {
            let version = match known.and_then(|k| k.get(i)) {
                Some(k) => k.clone(),
                None => {
                    let repo = self.repo.clone();
                    let image = v.image.clone();
                    match tokio::task::spawn_blocking(move || repo.resolve(&image))
                        .await
                        .map_err(|e| AgentError::Other(e.to_string()))?
                    {
                        Ok((id, _)) => id,
                        Err(StoreError::NotFound { .. }) => String::new(),
                        Err(e) => {
                            return Err(AgentError::Other(format!(
                                "volume {} of {} ({}): {e}",
                                v.name, plan.id, v.image
                            )))
                        }
                    }
                }
            };
            let base = if version.is_empty() {
                None
            } else {
                Some(BaseImage::Nbd {
                    url: self.acquire_export(&version, user.clone()).await?,
                })
            };
            disks.push(VolumeDisk {
                name: v.name.clone(),
                base,
                size: v.size,
            });
            versions.push(version);
        }
        Ok((disks, versions))
    }

    /// Stores the volumes of the VM of `plan` from its directory `dir` — the VM stopped or
    /// gone, so that their files hold what the guest wrote — as new versions of their images
    /// (`latest` moves to them), each derived from the version it started from. Returns the
    /// new versions.
    pub(crate) async fn store_volumes(
        &self,
        plan: &InstancePlan,
        dir: &Path,
        started_from: &[String],
    ) -> Result<Vec<String>> {
        let mut stored = Vec::new();
        let scratch = self.scratch_dir()?;
        for (i, v) in plan.volumes.iter().enumerate() {
            let file = VmDir::new(dir).volume(&v.name);
            if !file.exists() {
                continue;
            }
            let repo = self.repo.clone();
            let (image, scratch) = (v.image.clone(), scratch.clone());
            let parent = started_from.get(i).cloned().unwrap_or_default();
            let author = format!("agent {}", self.config.name);
            let message = format!("what {} wrote to its volume {}", plan.id, v.name);
            let report = tokio::task::spawn_blocking(move || {
                repo.commit(
                    &file,
                    "qcow2",
                    &image,
                    CommitInfo {
                        parent: (!parent.is_empty()).then_some(parent.as_str()),
                        author: &author,
                        message: Some(&message),
                    },
                    &scratch,
                    &|_| {},
                )
            })
            .await
            .map_err(|e| AgentError::Other(e.to_string()))?
            .map_err(|e| {
                AgentError::Other(format!(
                    "storing volume {} of {} into {}: {e}",
                    v.name, plan.id, v.image
                ))
            })?;
            tracing::info!(
                instance = %plan.id,
                volume = %v.name,
                version = %report.version,
                new_chunks = report.new_chunks,
                "volume stored"
            );
            stored.push(report.version);
        }
        Ok(stored)
    }

    /// The agent's scratch directory (commits convert disks there), made if missing.
    pub(crate) fn scratch_dir(&self) -> Result<std::path::PathBuf> {
        let scratch = self.config.data.join("tmp");
        std::fs::create_dir_all(&scratch)
            .map_err(|e| AgentError::Other(format!("{}: {e}", scratch.display())))?;
        Ok(scratch)
    }

    /// Records in the slot of `plan` the versions its volumes started from.
    pub(crate) fn note_volume_versions(&self, plan: &InstancePlan, versions: Vec<String>) {
        if let Some(s) = lock(&self.slots)
            .get_mut(&plan.id)
            .filter(|s| s.plan.generation == plan.generation)
        {
            s.volume_versions = versions;
        }
    }

    /// `set-volume`: restores snapshot `snapshot` of `volume` as its `latest`, or removes
    /// every tag of the volume.
    pub(crate) async fn set_volume(
        &self,
        volume: ImageName,
        snapshot: Option<String>,
    ) -> Result<AgentReply> {
        let repo = self.repo.clone();
        let tag = |t: &str| {
            ImageRef::parse(&format!("{volume}:{t}"))
                .map_err(|e| AgentError::Other(format!("volume {volume}: {e}")))
        };
        let latest = tag(vmatrix_core::volume::LATEST)?;
        let changed = match snapshot {
            Some(s) => {
                let from = tag(&s)?;
                tokio::task::spawn_blocking(move || {
                    repo.tag(&from, &latest)
                        .map(|v| vec![format!("{latest} -> {v} ({from})")])
                })
                .await
                .map_err(|e| AgentError::Other(e.to_string()))?
            }
            None => {
                let name = volume.to_string();
                tokio::task::spawn_blocking(move || {
                    let mut removed = Vec::new();
                    for e in repo.list()? {
                        let Ok(image) = ImageRef::parse(&e.image) else {
                            continue;
                        };
                        if image.name.as_str() == name {
                            repo.remove(&image)?;
                            removed.push(format!("{image} removed"));
                        }
                    }
                    if removed.is_empty() {
                        return Err(StoreError::NotFound {
                            what: format!("volume {name} (`vmatrix volume ls` lists them)"),
                        });
                    }
                    Ok(removed)
                })
                .await
                .map_err(|e| AgentError::Other(e.to_string()))?
            }
        }
        .map_err(|e| AgentError::Other(format!("volume {volume}: {e}")))?;
        Ok(AgentReply::VolumeSet { changed })
    }
}
