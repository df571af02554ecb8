//! Each instance's cloud-init seed: a small FAT disk labelled `CIDATA` (cloud-init's NoCloud
//! data source, which every cloud image reads) with `meta-data` (its instance id and hostname),
//! `network-config` (its address, matched by MAC) and `user-data` (the service's SSH keys and
//! user-data). The disk is attached read-only after the system disk.
//!
//! The seed is a pure function of the plan: the same bytes on every machine, so both ends of a
//! live migration attach identical disks. It is written in-process (the `fatfs` crate, with a
//! fixed clock and volume id) rather than with mkfs.fat and mcopy, so it needs no tool and the
//! fast tests run it too.

use std::io::{Cursor, Write};
use std::path::Path;

use fatfs::{Date, DateTime, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};
use vmatrix_core::api::InstancePlan;

use crate::machine::{AgentError, Result};

/// The seed disk's size: FAT12's smallest comfortable volume; user-data is at most 64 KiB.
const SEED_BYTES: usize = 1024 * 1024;
/// QEMU's user-mode network: the guest's address and gateway when it has no bridged address.
const USER_MODE_ADDRESS: &str = "10.0.2.15/24";
const USER_MODE_GATEWAY: &str = "10.0.2.2";
/// The boundary of the multipart user-data that carries both vMatrix's part and the service's.
const BOUNDARY: &str = "==vmatrix-user-data==";

/// The three files of the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeedFiles {
    pub(crate) meta_data: String,
    pub(crate) network_config: String,
    pub(crate) user_data: String,
}

/// What `plan`'s instance finds in its seed.
pub(crate) fn files(plan: &InstancePlan) -> SeedFiles {
    let id = plan.id.as_str();
    let meta_data = format!("instance-id: {id}\nlocal-hostname: {id}\n");
    let (address, gateway) = match plan.net {
        Some(n) => (format!("{}/{}", n.address, n.prefix), n.gateway.to_string()),
        None => (USER_MODE_ADDRESS.to_owned(), USER_MODE_GATEWAY.to_owned()),
    };
    let network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{}\"\n    set-name: eth0\n    \
         addresses: [\"{address}\"]\n    gateway4: \"{gateway}\"\n",
        vmatrix_vmm::vm::mac_for(&plan.id)
    );
    let mut ours = format!("#cloud-config\nhostname: \"{id}\"\n");
    if !plan.cloud_init.ssh_authorized_keys.is_empty() {
        ours.push_str("ssh_authorized_keys:\n");
        for key in &plan.cloud_init.ssh_authorized_keys {
            // A JSON string is a YAML scalar: quotes and backslashes escaped.
            let quoted = serde_json::to_string(key).unwrap_or_default();
            ours.push_str(&format!("  - {quoted}\n"));
        }
    }
    let user_data = match &plan.cloud_init.user_data {
        None => ours,
        Some(theirs) => multipart(&ours, theirs),
    };
    SeedFiles {
        meta_data,
        network_config,
        user_data,
    }
}

/// vMatrix's cloud-config and the service's user-data as one MIME multipart document, which
/// cloud-init splits and applies in order (the service's part last, so it may override).
fn multipart(ours: &str, theirs: &str) -> String {
    let part = |content_type: &str, body: &str| {
        format!("--{BOUNDARY}\nContent-Type: {content_type}; charset=\"utf-8\"\nMIME-Version: 1.0\n\n{body}\n")
    };
    let mut doc =
        format!("Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\nMIME-Version: 1.0\n\n");
    doc.push_str(&part("text/cloud-config", ours));
    if theirs.starts_with("Content-Type:") || theirs.starts_with("MIME-Version:") {
        // Already MIME: a nested part, its own headers first.
        doc.push_str(&format!("--{BOUNDARY}\n{theirs}\n"));
    } else {
        let kind = [
            ("#cloud-config", "text/cloud-config"),
            ("#!", "text/x-shellscript"),
            ("#include", "text/x-include-url"),
            ("#cloud-boothook", "text/cloud-boothook"),
            ("#part-handler", "text/part-handler"),
        ]
        .iter()
        .find(|(start, _)| theirs.starts_with(start))
        .map_or("text/plain", |(_, kind)| kind);
        doc.push_str(&part(kind, theirs));
    }
    doc.push_str(&format!("--{BOUNDARY}--\n"));
    doc
}

/// A clock that always says 2026-01-01: the same seed bytes on every machine, every time.
#[derive(Debug)]
struct FixedClock;

const DAY: Date = Date {
    year: 2026,
    month: 1,
    day: 1,
};

impl TimeProvider for FixedClock {
    fn get_current_date(&self) -> Date {
        DAY
    }
    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: DAY,
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static CLOCK: FixedClock = FixedClock;

/// The seed disk's bytes for `plan`.
pub(crate) fn image(plan: &InstancePlan) -> Result<Vec<u8>> {
    let f = files(plan);
    let fail = |what: &str, e: std::io::Error| {
        AgentError::Other(format!(
            "writing the cloud-init seed of {}: {what}: {e}",
            plan.id
        ))
    };
    let mut disk = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(
        &mut disk,
        FormatVolumeOptions::new()
            .volume_label(*b"CIDATA     ")
            .volume_id(0x564d_5853),
    )
    .map_err(|e| fail("format", e))?;
    disk.set_position(0);
    {
        let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(&CLOCK))
            .map_err(|e| fail("open", e))?;
        for (name, body) in [
            ("meta-data", &f.meta_data),
            ("network-config", &f.network_config),
            ("user-data", &f.user_data),
        ] {
            let mut file = fs.root_dir().create_file(name).map_err(|e| fail(name, e))?;
            file.truncate().map_err(|e| fail(name, e))?;
            file.write_all(body.as_bytes()).map_err(|e| fail(name, e))?;
        }
        fs.unmount().map_err(|e| fail("close", e))?;
    }
    Ok(disk.into_inner())
}

/// Writes `plan`'s seed disk at `path` (through a temporary file and a rename).
pub(crate) fn write(path: &Path, plan: &InstancePlan) -> Result<()> {
    let bytes = image(plan)?;
    let tmp = path.with_extension("img.tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            AgentError::Other(format!(
                "writing the cloud-init seed {}: {e}",
                path.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmatrix_core::api::{CloudInit, NetAttach};
    use vmatrix_core::{HealthCheck, ImageRef, InstanceId, ServiceName};

    fn plan() -> InstancePlan {
        InstancePlan {
            id: InstanceId::new("web-3").unwrap(),
            generation: 4,
            service: ServiceName::new("web").unwrap(),
            image: ImageRef::parse("debian:12").unwrap(),
            version: None,
            vcpus: 1,
            memory_mib: 1024,
            port: 80,
            health: HealthCheck::default(),
            net: Some(NetAttach {
                address: "10.77.0.9".parse().unwrap(),
                prefix: 16,
                gateway: "10.77.0.1".parse().unwrap(),
            }),
            hardware: Default::default(),
            cloud_init: CloudInit {
                ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nza \"quoted\" admin@x".into()],
                user_data: None,
            },
            volumes: Vec::new(),
        }
    }

    fn read(disk: Vec<u8>, name: &str) -> String {
        let mut disk = Cursor::new(disk);
        let fs = FileSystem::new(&mut disk, FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        let mut s = String::new();
        fs.root_dir()
            .open_file(name)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s
    }

    #[test]
    fn the_seed_carries_id_network_and_keys_and_is_the_same_bytes_every_time() {
        let a = image(&plan()).unwrap();
        assert_eq!(
            a,
            image(&plan()).unwrap(),
            "both ends of a move attach the same disk"
        );
        assert_eq!(
            read(a.clone(), "meta-data"),
            "instance-id: web-3\nlocal-hostname: web-3\n"
        );
        let net = read(a.clone(), "network-config");
        assert!(net.contains("addresses: [\"10.77.0.9/16\"]"), "{net}");
        assert!(net.contains("gateway4: \"10.77.0.1\""), "{net}");
        assert!(net.contains(&vmatrix_vmm::vm::mac_for(&plan().id)), "{net}");
        let user = read(a, "user-data");
        assert!(user.starts_with("#cloud-config\n"), "{user}");
        assert!(
            user.contains(r#"  - "ssh-ed25519 AAAAC3Nza \"quoted\" admin@x""#),
            "{user}"
        );
    }

    #[test]
    fn the_services_user_data_rides_in_a_multipart_after_ours() {
        let mut p = plan();
        p.net = None;
        p.cloud_init.user_data = Some("#!/bin/sh\necho hello > /run/hello\n".into());
        let f = files(&p);
        assert!(f.network_config.contains("10.0.2.15/24"));
        let u = f.user_data;
        assert!(u.starts_with("Content-Type: multipart/mixed;"), "{u}");
        let ours = u.find("text/cloud-config").unwrap();
        let theirs = u.find("text/x-shellscript").unwrap();
        assert!(ours < theirs, "{u}");
        assert!(u.contains("echo hello > /run/hello"));
        assert!(u.trim_end().ends_with(&format!("--{BOUNDARY}--")));
    }
}
