//! `vmatrix volume`: the persistent volumes in the repository — one image per service slot and
//! volume (`vol-SERVICE-SLOT-NAME`), whose `latest` tag is what the slot's next instance
//! attaches — and their snapshots (other tags of the same image).

use anyhow::{bail, Result};
use clap::Subcommand;
use vmatrix_core::ImageRef;
use vmatrix_store::Repository;

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// List the volumes: each slot's latest version, its size and its snapshots.
    Ls {
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Keep the volume's latest version under LABEL (a tag of its image), whatever the slot's
    /// instances write later.
    Snapshot {
        /// The volume, as `vmatrix volume ls` names it (vol-SERVICE-SLOT-NAME).
        volume: String,
        /// The snapshot's name (letters, digits, `.`, `_`, `-`; not `latest`).
        label: String,
    },
    /// Make a snapshot the volume's current contents, for the next instance of its slot.
    /// Refused by the controller while an instance holds the slot (scale in or discard it).
    Restore {
        /// The volume (vol-SERVICE-SLOT-NAME).
        volume: String,
        /// The snapshot.
        label: String,
    },
    /// Remove a volume and its snapshots (the data goes at the next `vmatrix image gc`).
    /// Refused by the controller while an instance holds the slot.
    Rm {
        /// The volume (vol-SERVICE-SLOT-NAME).
        volume: String,
    },
}

impl VolumeCommand {
    /// The controller's operation for the commands that change what a slot attaches (checked
    /// there against the instances), or `None` for the ones done on the repository here.
    pub fn operation(&self) -> Result<Option<vmatrix_core::api::Operation>> {
        use vmatrix_core::api::Operation;
        let name = |v: &str| {
            vmatrix_core::ImageName::new(v).map_err(|e| {
                anyhow::anyhow!(
                    "{e}; `vmatrix volume ls` lists the volumes (vol-SERVICE-SLOT-NAME)"
                )
            })
        };
        Ok(match self {
            Self::Restore { volume, label } => Some(Operation::RestoreVolume {
                volume: name(volume)?,
                snapshot: label.clone(),
            }),
            Self::Rm { volume } => Some(Operation::RemoveVolume {
                volume: name(volume)?,
            }),
            Self::Ls { .. } | Self::Snapshot { .. } => None,
        })
    }
}

/// One volume in the repository.
#[derive(Debug, serde::Serialize)]
struct VolumeRow {
    volume: String,
    version: String,
    size: u64,
    created: u64,
    snapshots: Vec<String>,
}

fn volume_ref(volume: &str, tag: &str) -> Result<ImageRef> {
    if !volume.starts_with("vol-") {
        bail!("{volume:?} is not a volume: `vmatrix volume ls` lists them (vol-SERVICE-SLOT-NAME)");
    }
    ImageRef::parse(&format!("{volume}:{tag}")).map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn run(cmd: VolumeCommand, url: &str) -> Result<()> {
    match cmd {
        VolumeCommand::Ls { json } => {
            let repo = Repository::open(url)?;
            let entries = repo.list()?;
            let mut rows: Vec<VolumeRow> = Vec::new();
            for e in entries.iter().filter(|e| e.image.starts_with("vol-")) {
                let Some((name, tag)) = e.image.rsplit_once(':') else {
                    continue;
                };
                if tag != vmatrix_core::volume::LATEST {
                    continue;
                }
                rows.push(VolumeRow {
                    volume: name.to_owned(),
                    version: e.version.clone(),
                    size: e.virtual_size,
                    created: e.created,
                    snapshots: entries
                        .iter()
                        .filter_map(|s| {
                            let (n, t) = s.image.rsplit_once(':')?;
                            (n == name && t != vmatrix_core::volume::LATEST)
                                .then(|| format!("{t} ({})", &s.version[..12.min(s.version.len())]))
                        })
                        .collect(),
                });
            }
            rows.sort_by(|a, b| a.volume.cmp(&b.volume));
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if rows.is_empty() {
                println!("no volumes stored yet (a slot's volumes are stored when its instance is first suspended or discarded)");
                return Ok(());
            }
            println!(
                "{:<32} {:<14} {:>8}  {:<20} SNAPSHOTS",
                "VOLUME", "LATEST", "SIZE", "STORED"
            );
            for r in rows {
                println!(
                    "{:<32} {:<14} {:>8}  {:<20} {}",
                    r.volume,
                    &r.version[..12.min(r.version.len())],
                    format!("{}M", r.size >> 20),
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.created)
                    )
                    .to_string(),
                    r.snapshots.join(", ")
                );
            }
        }
        VolumeCommand::Restore { .. } | VolumeCommand::Rm { .. } => {
            bail!("restore and rm go through the controller (`VolumeCommand::operation`)")
        }
        VolumeCommand::Snapshot { volume, label } => {
            if label == vmatrix_core::volume::LATEST {
                bail!("`latest` is the volume's current contents; name the snapshot otherwise");
            }
            let (from, to) = (
                volume_ref(&volume, vmatrix_core::volume::LATEST)?,
                volume_ref(&volume, &label)?,
            );
            let id = Repository::open(url)?.tag(&from, &to)?;
            println!(
                "{to} -> {} (the volume as its slot's instance last stored it: at its last \
                 suspend or discard)",
                &id[..16]
            );
        }
    }
    Ok(())
}
