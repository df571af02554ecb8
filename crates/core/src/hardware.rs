//! The virtual hardware a service's instances get: machine type, firmware, disk bus, NIC model
//! and CPU model. The defaults are what every instance had before these were choices (a `pc`
//! machine with BIOS, virtio disk and NIC); the others let a guest without virtio drivers, or
//! one that boots only with UEFI, run unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The chipset QEMU emulates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// i440FX with PIIX: the widest guest support, IDE built in.
    #[default]
    Pc,
    /// Q35 with ICH9: PCI Express, AHCI built in, no IDE.
    Q35,
}

/// What boots the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS: boots the disk's MBR.
    #[default]
    Bios,
    /// OVMF (Debian's `ovmf`): boots `EFI/BOOT/BOOTX64.EFI` or the entries the guest keeps in
    /// its own variable store.
    Uefi,
}

/// How the disks are attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// virtio-blk: the fastest; needs the guest's virtio drivers.
    #[default]
    Virtio,
    /// An AHCI (SATA) controller: every modern OS has its driver.
    Sata,
    /// The PIIX IDE controller (`machine = "pc"` only): for old guests.
    Ide,
}

/// The network card.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Nic {
    /// virtio-net: the fastest; needs the guest's virtio drivers.
    #[default]
    Virtio,
    /// Intel e1000: every OS has its driver.
    E1000,
}

/// The CPU model under KVM (under TCG the guest always sees QEMU's emulated CPU).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModel {
    /// A migratable baseline, x86-64-v2 with AES (as Proxmox's `x86-64-v2-AES`): an instance
    /// can move between machines of different CPU generations.
    #[default]
    Baseline,
    /// The host's own CPU, every feature passed through: faster for some workloads, but an
    /// instance may then only move between machines with the same CPU.
    Host,
}

/// A service's virtual hardware, the same on every machine its instances run or move to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// The chipset.
    #[serde(default)]
    pub machine: Machine,
    /// The firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// The disk bus.
    #[serde(default)]
    pub disk_bus: DiskBus,
    /// The network card.
    #[serde(default)]
    pub nic: Nic,
    /// The CPU model under KVM.
    #[serde(default)]
    pub cpu: CpuModel,
}

impl Hardware {
    /// What makes this combination impossible, if anything.
    pub fn problem(&self) -> Option<String> {
        (self.disk_bus == DiskBus::Ide && self.machine == Machine::Q35).then(|| {
            "disk_bus = \"ide\" needs machine = \"pc\" (q35 has no IDE controller); use \
             disk_bus = \"sata\" with q35"
                .to_owned()
        })
    }

    /// True when nothing differs from the defaults.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

macro_rules! named {
    ($t:ty { $($v:ident => $n:literal),* }) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(<$t>::$v => $n),* })
            }
        }
    };
}
named!(Machine { Pc => "pc", Q35 => "q35" });
named!(Firmware { Bios => "bios", Uefi => "uefi" });
named!(DiskBus { Virtio => "virtio", Sata => "sata", Ide => "ide" });
named!(Nic { Virtio => "virtio", E1000 => "e1000" });
named!(CpuModel { Baseline => "baseline", Host => "host" });

impl fmt::Display for Hardware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "machine {}, firmware {}, disk {}, nic {}, cpu {}",
            self.machine, self.firmware, self.disk_bus, self.nic, self.cpu
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_todays_hardware_and_names_are_lowercase() {
        let h: Hardware = serde_json::from_str("{}").unwrap();
        assert!(h.is_default());
        assert_eq!(
            h.to_string(),
            "machine pc, firmware bios, disk virtio, nic virtio, cpu baseline"
        );
        let h: Hardware = serde_json::from_str(
            r#"{"machine":"q35","firmware":"uefi","disk_bus":"sata","nic":"e1000","cpu":"host"}"#,
        )
        .unwrap();
        assert_eq!(h.machine, Machine::Q35);
        assert_eq!(h.nic, Nic::E1000);
        assert!(h.problem().is_none());
    }

    #[test]
    fn ide_on_q35_is_refused_with_the_way_out() {
        let h = Hardware {
            machine: Machine::Q35,
            disk_bus: DiskBus::Ide,
            ..Hardware::default()
        };
        assert!(h.problem().unwrap().contains("disk_bus = \"sata\""));
        assert!(serde_json::from_str::<Hardware>(r#"{"nic":"rtl8139"}"#).is_err());
    }
}
