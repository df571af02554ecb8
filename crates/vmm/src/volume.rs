//! A VM's persistent volumes: data disks besides the system disk, each a qcow2 file in the
//! VM's directory — over a stored version of the volume (this machine's export of it) or, for
//! a volume never stored, blank. The guest finds each by its serial, `vmx-vol-NAME`. They are
//! moved by live migration like the system disk (mirrored over NBD); who stores them in the
//! repository, and when, is the agent's business.

use std::path::PathBuf;

use vmatrix_core::hardware::DiskBus;

use crate::error::{Result, VmmError};
use crate::vm::{run_tool, BaseImage, VmDir, VmSpec};

/// One volume of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeDisk {
    /// Its name (`[a-z][a-z0-9-]*`, at most 16 characters).
    pub name: String,
    /// The stored version it starts from (`None`: a blank disk of `size`).
    pub base: Option<BaseImage>,
    /// Its size in bytes (a blank disk's; an overlay takes its base's).
    pub size: u64,
}

impl VolumeDisk {
    /// Its QEMU block node (and NBD export name in a migration).
    pub fn node(&self) -> String {
        format!("vol-{}", self.name)
    }
    /// The serial the guest sees.
    pub fn serial(&self) -> String {
        format!("vmx-vol-{}", self.name)
    }
}

impl VmDir {
    /// The qcow2 file of volume `name`.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.root().join(format!("vol-{name}.qcow2"))
    }
}

/// Creates the files of `spec`'s volumes in `dir` (any left from before are replaced).
pub(crate) async fn create_volumes(spec: &VmSpec, dir: &VmDir) -> Result<()> {
    for v in &spec.volumes {
        let path = dir.volume(&v.name);
        let _ = std::fs::remove_file(&path);
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        match &v.base {
            Some(BaseImage::Nbd { url }) => {
                args.extend(["-F".into(), "raw".into(), "-b".into(), url.clone()]);
                args.push(path.display().to_string());
            }
            Some(BaseImage::File { path: base, format }) => {
                args.extend([
                    "-F".into(),
                    format.as_str().into(),
                    "-b".into(),
                    base.display().to_string(),
                ]);
                args.push(path.display().to_string());
            }
            None => {
                args.push(path.display().to_string());
                args.push(v.size.to_string());
            }
        }
        run_tool("qemu-img", &args).await?;
    }
    Ok(())
}

/// The most volumes each disk bus takes beside the system disk and the seed: virtio as many
/// as a service may declare; AHCI has six ports, IDE four units.
fn room(bus: DiskBus) -> usize {
    match bus {
        DiskBus::Virtio => vmatrix_core::volume::MAX_VOLUMES,
        DiskBus::Sata => 4,
        DiskBus::Ide => 2,
    }
}

/// QEMU's arguments for `spec`'s volumes in `dir`, after the system disk and the seed.
pub(crate) fn volume_args(spec: &VmSpec, dir: &VmDir) -> Result<Vec<String>> {
    let bus = spec.hardware.disk_bus;
    if spec.volumes.len() > room(bus) {
        return Err(VmmError::Invalid(format!(
            "{} volumes on disk_bus = \"{}\": that bus takes {} beside the system disk; use \
             disk_bus = \"virtio\" or fewer volumes",
            spec.volumes.len(),
            match bus {
                DiskBus::Virtio => "virtio",
                DiskBus::Sata => "sata",
                DiskBus::Ide => "ide",
            },
            room(bus)
        )));
    }
    let mut args = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let node = v.node();
        args.extend([
            "-blockdev".into(),
            serde_json::json!({
                "driver": "qcow2", "node-name": node,
                "file": {"driver": "file", "filename": dir.volume(&v.name)},
            })
            .to_string(),
            "-device".into(),
            match bus {
                DiskBus::Virtio => format!(
                    "virtio-blk-pci,drive={node},id={node}-dev,serial={}",
                    v.serial()
                ),
                DiskBus::Sata => format!(
                    "ide-hd,drive={node},id={node}-dev,bus=sata0.{},serial={}",
                    i + 2,
                    v.serial()
                ),
                DiskBus::Ide => format!(
                    "ide-hd,drive={node},id={node}-dev,bus=ide.1,unit={i},serial={}",
                    v.serial()
                ),
            },
        ]);
    }
    Ok(args)
}
