//! What a VM directory says about its VM, so that a restarted agent takes its VMs over instead
//! of killing them (libvirt's rule: a daemon restart is not a VM restart).
//!
//! Each VM directory holds `vm.json`: the instance's plan, pinned version, endpoint, QEMU's pid
//! and its phase. It is written (temp file, fsync, rename) after every change of phase. On
//! start the agent reads every record: a running VM whose process is still that VM's QEMU is
//! adopted; a suspended record is kept for the controller; an incoming migration that lost its
//! agent is ended (its source still has the guest); anything else is removed. The controller
//! then stops what it no longer assigns to this machine, through the usual discard.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmatrix_core::api::{InstancePlan, SavedState};

use crate::machine::{Agent, Held};

/// The phase a VM directory is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// QEMU runs the guest.
    Running,
    /// QEMU holds the guest paused (a warm standby).
    Paused,
    /// QEMU waits, paused, for an incoming migration.
    Incoming,
    /// The state is in the repository; no process.
    Suspended,
}

/// The contents of `vm.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    /// The instance's plan (its version pinned).
    pub plan: InstancePlan,
    /// The version id it runs.
    pub version: String,
    /// Where it serves.
    pub endpoint: std::net::SocketAddr,
    /// QEMU's pid (0 when none).
    pub pid: u32,
    /// Its phase.
    pub phase: Phase,
    /// Where its state went, when suspended.
    pub saved: Option<SavedState>,
    /// The versions its volumes started from ("" for a blank one).
    #[serde(default)]
    pub volume_versions: Vec<String>,
}

const FILE: &str = "vm.json";

impl VmRecord {
    /// Writes the record into `dir` crash-safely.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = dir.join(".vm.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        std::fs::File::open(dir)?.sync_all()
    }

    /// Reads the record in `dir`: `Ok(None)` when there is none (a start that never got that
    /// far), an error when there is one that cannot be read (it is then left alone).
    pub fn read(dir: &Path) -> Result<Option<Self>, String> {
        let bytes = match std::fs::read(dir.join(FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

/// Takes over the VMs a previous agent process left in its data directory; commands wait
/// until it is done. Returns how many VMs were adopted.
pub async fn adopt_left(agent: &Arc<Agent>) -> usize {
    let dirs: Vec<PathBuf> = std::fs::read_dir(agent.vms_dir())
        .map(|it| it.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let mut records = Vec::new();
    let mut spared = Vec::new();
    for dir in dirs {
        match VmRecord::read(&dir) {
            Ok(Some(r)) => records.push((r, dir)),
            Ok(None) => {
                tracing::info!(
                    "removing {}: no record of a VM (an unfinished start)",
                    dir.display()
                );
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => {
                // Never destroy what cannot be read (a newer format, a disk error): an operator
                // decides. Its QEMU, if any, is spared too.
                tracing::error!(
                    "cannot read the record in {}: {e}; leaving it and its VM alone",
                    dir.display()
                );
                spared.push(dir);
            }
        }
    }
    // The newest generation of an instance wins; older directories are superseded.
    records.sort_by(|(a, _), (b, _)| {
        (a.plan.id.as_str(), std::cmp::Reverse(a.plan.generation))
            .cmp(&(b.plan.id.as_str(), std::cmp::Reverse(b.plan.generation)))
    });
    let mut seen = std::collections::HashSet::new();
    let mut adopted = 0;
    let mut keep = Vec::new();
    for (record, dir) in records {
        let id = record.plan.id.clone();
        if !seen.insert(id.clone()) {
            tracing::info!(instance = %id, "removing {}: superseded by a newer generation", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        }
        let user = (id.clone(), record.plan.generation);
        if record.phase == Phase::Suspended {
            // Its state is durable; a QEMU that an interrupted suspend left is swept below.
            agent.restore(record, dir, Held::Nothing);
            continue;
        }
        let taken = async {
            let url = agent.acquire_export(&record.version, user.clone()).await?;
            let mut spec = agent.vm_spec(&record.plan, url, record.endpoint);
            spec.volumes = agent
                .attach_volumes(&record.plan, user.clone(), Some(&record.volume_versions))
                .await?
                .0;
            let held = match record.phase {
                Phase::Running | Phase::Paused => {
                    Some(Held::Guest(agent.hv().adopt(spec, &dir, record.pid).await?))
                }
                Phase::Incoming => agent
                    .hv()
                    .adopt_incoming(spec, &dir, record.pid)
                    .await?
                    .map(Held::Incoming),
                Phase::Suspended => None,
            };
            Ok::<_, crate::AgentError>(held)
        }
        .await;
        match taken {
            Ok(Some(held)) => {
                tracing::info!(instance = %id, pid = record.pid, phase = ?record.phase, "adopted a VM");
                keep.push(record.pid);
                let (generation, running) = (
                    record.plan.generation,
                    matches!(record.phase, Phase::Running | Phase::Paused),
                );
                agent.restore(record, dir, held);
                if running {
                    tokio::spawn(crate::health::watch(agent.clone(), id, generation));
                }
                adopted += 1;
            }
            Ok(None) => {
                tracing::info!(instance = %id, "ending an incoming migration that never completed (its source has the guest)");
                agent.release_exports(&user);
                let _ = std::fs::remove_dir_all(&dir);
            }
            Err(e) => {
                tracing::warn!(instance = %id, "cannot adopt its VM: {e}; removing it");
                agent.release_exports(&user);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    sweep_sparing(&agent.vms_dir(), &keep, &spared);
    agent.hv.sweep_groups(std::time::Duration::from_secs(30));
    agent.set_ready();
    adopted
}

/// Kills every QEMU whose command line names a directory under `vms` except `keep`: what a
/// crashed agent or test left and nobody adopted.
pub fn sweep(vms: &Path, keep: &[u32]) -> usize {
    sweep_sparing(vms, keep, &[])
}

/// [`sweep`], also sparing the QEMUs of the directories in `spared`.
fn sweep_sparing(vms: &Path, keep: &[u32], spared: &[PathBuf]) -> usize {
    let mut killed = 0;
    for (pid, cmdline) in qemus_under(vms) {
        let spare = spared
            .iter()
            .any(|d| cmdline.contains(&format!("{}/", d.display())));
        if keep.contains(&pid) || spare {
            continue;
        }
        // SAFETY: plain kill(2) of a process group led by a QEMU we started (its command line
        // names our directory).
        unsafe {
            libc::killpg(pid as libc::pid_t, libc::SIGKILL);
        }
        killed += 1;
    }
    killed
}

/// The QEMU processes whose command line names a directory under `vms` (their VM directory
/// holds their QMP socket): (pid, command line).
pub(crate) fn qemus_under(vms: &Path) -> Vec<(u32, String)> {
    let needle = format!("{}/", vms.display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
            (cmdline.starts_with("qemu-system") && cmdline.contains(&needle))
                .then_some((pid, cmdline))
        })
        .collect()
}
