//! QEMU's command line for one VM: the only place that builds it, because both ends of a
//! migration must describe identical guest hardware. What is host-side only (the forwarded
//! port, the TAP's name, file paths) may differ between the ends; everything the guest sees is a
//! function of the [`VmSpec`] alone.

use vmatrix_core::hardware::{CpuModel, DiskBus, Firmware, Machine, Nic};

use crate::accel::Accelerator;
use crate::error::{Result, VmmError};
use crate::vm::{mac_for, StartMode, VmDir, VmSpec, DISK_NODE};

/// OVMF's code, read-only and shared (Debian's `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's empty variable store, copied into each UEFI VM's directory.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The CPU model under KVM by default: x86-64-v2 plus AES on QEMU's qemu64 (what Proxmox
/// calls `x86-64-v2-AES`), which every x86 server of the last decade provides, so an instance
/// can move between machines of different CPU generations.
pub const BASELINE_CPU: &str = "qemu64,+cx16,+lahf_lm,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3,+aes";

/// The `-qmp` argument: unique per VM directory, so it also identifies the process.
pub(crate) fn qmp_arg(dir: &VmDir) -> String {
    format!("unix:{},server=on,wait=off", dir.qmp().display())
}

/// QEMU's command line. Both ends of a migration must describe identical hardware, so this is
/// the only place that builds it. `tap_fd` is the descriptor of the VM's TAP (see
/// [`crate::confine`]), which QEMU inherits; it must be given when the spec has a TAP.
pub(crate) fn qemu_args(
    spec: &VmSpec,
    dir: &VmDir,
    mode: StartMode,
    tap_fd: Option<i32>,
) -> Result<Vec<String>> {
    let mut paths = vec![
        dir.qmp(),
        dir.serial(),
        dir.console(),
        dir.guest_agent(),
        dir.efivars(),
    ];
    paths.extend(spec.seed.clone());
    for p in paths {
        if p.to_string_lossy().contains(',') {
            return Err(VmmError::Invalid(format!(
                "path {} contains ',', which QEMU's option syntax cannot take; use another directory",
                p.display()
            )));
        }
    }
    if let Some(tap) = &spec.tap {
        if tap.ifname.is_empty()
            || tap.ifname.len() > 15
            || !tap
                .ifname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(VmmError::Invalid(format!(
                "TAP {:?}: a TAP name is 1–15 letters, digits or '-'",
                tap.ifname
            )));
        }
    }
    let tap_fd = match (&spec.tap, tap_fd) {
        (Some(_), None) => {
            return Err(VmmError::Invalid(
                "a VM with a TAP needs the TAP's descriptor".into(),
            ))
        }
        (_, fd) => fd,
    };
    let hw = spec.hardware;
    if let Some(problem) = hw.problem() {
        return Err(VmmError::Invalid(problem));
    }
    let file_node = serde_json::json!({
        "driver": "file", "filename": dir.disk(), "node-name": "disk0-file",
    });
    let disk_node = serde_json::json!({
        "driver": "qcow2", "file": "disk0-file", "node-name": DISK_NODE,
    });
    let machine = match hw.machine {
        Machine::Pc => "pc",
        Machine::Q35 => "q35",
    };
    // UEFI's flash as block nodes (not `-drive if=pflash`): a legacy drive is opened again by
    // its path when a migration destination takes over, which QEMU can no longer do once it
    // has dropped to its own user; a node keeps the descriptor it was opened with.
    let flash = if hw.firmware == Firmware::Uefi {
        ",pflash0=ovmf-code,pflash1=ovmf-vars"
    } else {
        ""
    };
    let mut args: Vec<String> = vec![
        "-name".into(),
        // Thread names ("CPU 0/TCG", "live_migration") make a busy host readable in `top -H`.
        format!("vmatrix-{},debug-threads=on", spec.instance),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        format!("{machine}{flash}"),
        "-accel".into(),
        accel_arg(spec.accel),
        "-sandbox".into(),
        crate::confine::sandbox_arg(spec.run_as.is_some()),
    ];
    if let Some(user) = &spec.run_as {
        args.extend(["-runas".into(), user.clone()]);
    }
    if let Some(tls) = &spec.tls {
        // Loaded when QEMU starts, as the caller (before `-runas`): the key stays unreadable
        // to the guest's user. One object for each end of a move.
        let dir = tls.dir.display().to_string().replace(',', ",,");
        args.extend([
            "-object".into(),
            format!(
                "tls-creds-x509,id={},endpoint=server,verify-peer=on,dir={dir}",
                crate::migration::TLS_SERVER
            ),
            "-object".into(),
            format!(
                "tls-creds-x509,id={},endpoint=client,verify-peer=on,dir={dir}",
                crate::migration::TLS_CLIENT
            ),
        ]);
    }
    if spec.accel == Accelerator::Kvm {
        let cpu = match hw.cpu {
            CpuModel::Baseline => BASELINE_CPU,
            CpuModel::Host => "host",
        };
        args.extend(["-cpu".into(), cpu.into()]);
    }
    if hw.firmware == Firmware::Uefi {
        args.extend([
            "-blockdev".into(),
            serde_json::json!({
                "driver": "raw", "node-name": "ovmf-code", "read-only": true,
                "file": {"driver": "file", "filename": OVMF_CODE, "read-only": true},
            })
            .to_string(),
            "-blockdev".into(),
            serde_json::json!({
                "driver": "raw", "node-name": "ovmf-vars",
                "file": {"driver": "file", "filename": dir.efivars()},
            })
            .to_string(),
        ]);
    }
    args.extend([
        "-m".into(),
        memory_arg(spec),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-smbios".into(),
        format!("type=1,serial={}", spec.instance),
        "-blockdev".into(),
        file_node.to_string(),
        "-blockdev".into(),
        disk_node.to_string(),
    ]);
    if hw.disk_bus == DiskBus::Sata {
        args.extend(["-device".into(), "ahci,id=sata0".into()]);
    }
    args.extend([
        "-device".into(),
        disk_device(hw.disk_bus, DISK_NODE, "vdisk0", 0, Some(1)),
    ]);
    if let Some(seed) = &spec.seed {
        // The instance's cloud-init seed, the same bytes at both ends of a move: read-only on
        // virtio; an IDE or SATA hard disk cannot be read-only in QEMU, so there the guest
        // could write to it (cloud-init never does; its own copy is rebuilt at each start).
        let read_only = hw.disk_bus == DiskBus::Virtio;
        args.extend([
            "-blockdev".into(),
            serde_json::json!({
                "driver": "raw", "node-name": "seed0", "read-only": read_only,
                "file": {"driver": "file", "filename": seed, "read-only": read_only},
            })
            .to_string(),
            "-device".into(),
            disk_device(hw.disk_bus, "seed0", "seed0-dev", 1, None),
        ]);
    }
    args.extend(crate::volume::volume_args(spec, dir)?);
    let nic = match hw.nic {
        // guest_announce=off: after a migration QEMU itself announces the MAC (RARP); with
        // the guest's help (the default), the guest acknowledged each announcement on the
        // control queue, busy-waiting for QEMU's answer with the network stack locked, and about
        // one migration in ten under TCG left the guest spinning there, deaf and mute.
        Nic::Virtio => format!(
            "virtio-net-pci,netdev=net0,id=nic0,mac={},guest_announce=off",
            mac_for(&spec.instance)
        ),
        Nic::E1000 => format!("e1000,netdev=net0,id=nic0,mac={}", mac_for(&spec.instance)),
    };
    args.extend([
        "-netdev".into(),
        match tap_fd {
            None => format!(
                "user,id=net0,restrict=on,hostfwd=tcp:{}:{}-:{}",
                spec.forward.ip(),
                spec.forward.port(),
                spec.guest_port
            ),
            // The TAP exists already, on the bridge: QEMU may not run a script (spawn=deny).
            Some(fd) => format!("tap,id=net0,fd={fd},vhost=off"),
        },
        "-device".into(),
        nic,
        "-qmp".into(),
        qmp_arg(dir),
        // The console is a socket QEMU serves; the VM's console pump is its one client.
        "-chardev".into(),
        format!(
            "socket,id=console0,path={},server=on,wait=off",
            dir.console().display()
        ),
        "-serial".into(),
        "chardev:console0".into(),
        // The guest agent's channel (qemu-guest-agent, where the guest runs it).
        "-chardev".into(),
        format!(
            "socket,id=qga0,path={},server=on,wait=off",
            dir.guest_agent().display()
        ),
        "-device".into(),
        "virtio-serial-pci,id=vserial0".into(),
        "-device".into(),
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
    ]);
    if let Some(tap) = &spec.tap {
        // The guest's own address, read by its init (or any guest) from the SMBIOS tables.
        args.extend([
            "-smbios".into(),
            format!(
                "type=11,value=vmatrix.net.address={}/{},value=vmatrix.net.gateway={}",
                tap.address, tap.prefix, tap.gateway
            ),
        ]);
    }
    if mode == StartMode::Incoming {
        args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    }
    Ok(args)
}

/// The `-accel` value. Under TCG the translation cache is capped at [`TCG_CACHE_MIB`]: QEMU
/// 7.2 sizes it at an eighth of the host's RAM up to 1 GiB, filled as the guest runs new code,
/// and it counts against the VM's memory limit ([`crate::cgroup`]), which leaves 384 MiB for
/// QEMU itself. Measured: a 1 GiB Debian guest's QEMU grew to 1,577 MiB of its 1,664 MiB in its
/// first two minutes with the default cache.
fn accel_arg(accel: Accelerator) -> String {
    match accel {
        Accelerator::Tcg => format!("tcg,tb-size={TCG_CACHE_MIB}"),
        Accelerator::Kvm => "kvm".into(),
    }
}

/// The TCG translation cache, in MiB (QEMU's default before 5.0 was 32 MiB).
pub const TCG_CACHE_MIB: u32 = 256;

/// The guest's RAM for `-m`. Under TCG it is 8 KiB short of the size asked for, on purpose:
/// QEMU before 9.0 (Debian 12 ships 7.2) syncs the migration dirty bitmap of a RAM block
/// whose size is a multiple of 256 KiB through a fast path that does not re-arm TCG's dirty
/// tracking (fixed upstream by "physmem: Fix migration dirty bitmap coherency with TCG memory
/// access", 03bfc2188f), so writes after the first pass can be missed and the guest wakes up
/// on the destination with stale pages: measured here, its kernel crashed after two of three
/// live migrations of a busy guest on a loaded host. Any other size takes the per-page path,
/// which re-arms it. KVM tracks dirty pages itself and gets the size as asked.
fn memory_arg(spec: &VmSpec) -> String {
    match spec.accel {
        Accelerator::Tcg => format!(
            "{}k",
            u64::from(spec.memory_mib) * 1024 - TCG_RAM_SHORTFALL_KIB
        ),
        _ => spec.memory_mib.to_string(),
    }
}

/// See [`memory_arg`]: a multiple of QEMU's 8 KiB RAM alignment that is not one of 256 KiB.
const TCG_RAM_SHORTFALL_KIB: u64 = 8;

/// The `-device` for a disk on `bus`: `unit` is its place on the controller (0: the system
/// disk), `bootindex` set for the one to boot.
fn disk_device(bus: DiskBus, drive: &str, id: &str, unit: u8, bootindex: Option<u8>) -> String {
    let boot = bootindex.map_or(String::new(), |b| format!(",bootindex={b}"));
    match bus {
        DiskBus::Virtio => format!("virtio-blk-pci,drive={drive},id={id}{boot}"),
        DiskBus::Sata => format!("ide-hd,drive={drive},id={id},bus=sata0.{unit}{boot}"),
        DiskBus::Ide => format!("ide-hd,drive={drive},id={id},bus=ide.0,unit={unit}{boot}"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vmatrix_core::{Hardware, InstanceId};

    use super::*;
    use crate::vm::TapSpec;

    fn spec() -> VmSpec {
        VmSpec::new(
            InstanceId::new("web-1").unwrap(),
            Path::new("/img/base.img"),
            "127.0.0.2:20001".parse().unwrap(),
            Accelerator::Tcg,
        )
    }

    #[test]
    fn command_line_is_safe_and_complete() {
        let args = qemu_args(&spec(), &VmDir::new("/d/web-1"), StartMode::Boot, None).unwrap();
        let joined = args.join(" ");
        assert!(
            joined.contains("restrict=on"),
            "user networking must be restricted"
        );
        assert!(joined.contains("hostfwd=tcp:127.0.0.2:20001-:80"));
        assert!(joined.contains("type=1,serial=web-1"));
        assert!(joined.contains("-accel tcg,tb-size=256"), "{joined}");
        // 256 MiB less 8 KiB: off QEMU 7.2's broken fast path of TCG dirty tracking.
        assert!(joined.contains("-m 262136k"), "{joined}");
        assert!(!joined.contains("-incoming"));
        assert!(!joined.contains("-cpu host"));
        let incoming = qemu_args(&spec(), &VmDir::new("/d/x"), StartMode::Incoming, None).unwrap();
        assert!(incoming.join(" ").ends_with("-S -incoming defer"));
    }

    #[test]
    fn both_ends_of_a_move_have_the_same_hardware() {
        let a = qemu_args(&spec(), &VmDir::new("/a"), StartMode::Boot, None).unwrap();
        let moved = spec().with_forward("127.0.0.3:20002".parse().unwrap());
        let b = qemu_args(&moved, &VmDir::new("/a"), StartMode::Incoming, None).unwrap();
        let hw = |v: &[String]| {
            v.iter()
                .filter(|a| {
                    !a.contains("hostfwd")
                        && !a.starts_with("-S")
                        && !a.contains("incoming")
                        && *a != "defer"
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(hw(&a), hw(&b));
    }

    #[test]
    fn a_tap_nic_carries_the_address_and_keeps_the_hardware() {
        let mut s = spec();
        s.tap = Some(TapSpec {
            ifname: "vmx-web-1-g1".into(),
            script: "/d/tap-up".into(),
            address: "10.77.0.5".parse().unwrap(),
            prefix: 16,
            gateway: "10.77.0.1".parse().unwrap(),
        });
        assert!(qemu_args(&s, &VmDir::new("/a"), StartMode::Boot, None).is_err());
        let a = qemu_args(&s, &VmDir::new("/a"), StartMode::Boot, Some(7)).unwrap();
        let joined = a.join(" ");
        assert!(joined.contains("tap,id=net0,fd=7,vhost=off"));
        assert!(!joined.contains("hostfwd"));
        assert!(joined.contains(
            "type=11,value=vmatrix.net.address=10.77.0.5/16,value=vmatrix.net.gateway=10.77.0.1"
        ));
        // The destination of a move has another TAP name: the same guest hardware.
        let mut moved = s.clone();
        if let Some(t) = moved.tap.as_mut() {
            t.ifname = "vmx-web-1-g2".into();
        }
        let b = qemu_args(&moved, &VmDir::new("/a"), StartMode::Incoming, Some(9)).unwrap();
        let hw = |v: &[String]| {
            v.iter()
                .filter(|a| {
                    !a.starts_with("tap,") && *a != "-S" && !a.contains("incoming") && *a != "defer"
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(hw(&a), hw(&b));
        s.tap.as_mut().unwrap().ifname = "a,b".into();
        assert!(qemu_args(&s, &VmDir::new("/a"), StartMode::Boot, Some(7)).is_err());
    }

    #[test]
    fn qemu_is_sandboxed_and_drops_to_its_user() {
        let mut s = spec();
        let plain = qemu_args(&s, &VmDir::new("/a"), StartMode::Boot, None).unwrap();
        let joined = plain.join(" ");
        assert!(joined.contains("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"));
        assert!(!joined.contains("-runas"));
        s.run_as = Some("vmatrix-qemu".into());
        let joined = qemu_args(&s, &VmDir::new("/a"), StartMode::Boot, None)
            .unwrap()
            .join(" ");
        assert!(joined.contains("-runas vmatrix-qemu"));
        assert!(joined.contains("elevateprivileges=allow,spawn=deny"));
    }

    #[test]
    fn commas_in_paths_are_refused() {
        let err = qemu_args(&spec(), &VmDir::new("/d/a,b"), StartMode::Boot, None).unwrap_err();
        assert!(err.to_string().contains("','"), "{err}");
    }

    #[test]
    fn hardware_choices_reach_the_command_line() {
        let mut s = spec();
        s.seed = Some("/d/seed.img".into());
        let joined = qemu_args(&s, &VmDir::new("/d"), StartMode::Boot, None)
            .unwrap()
            .join(" ");
        assert!(
            joined.contains("-machine pc -accel tcg,tb-size=256"),
            "{joined}"
        );
        assert!(joined.contains("virtio-blk-pci,drive=disk0,id=vdisk0,bootindex=1"));
        assert!(joined.contains("virtio-blk-pci,drive=seed0,id=seed0-dev"));
        assert!(joined.contains("\"read-only\":true"));
        assert!(joined.contains("virtio-net-pci"));
        assert!(joined.contains("name=org.qemu.guest_agent.0"));
        assert!(!joined.contains("pflash"));

        s.hardware = Hardware {
            machine: Machine::Q35,
            firmware: Firmware::Uefi,
            disk_bus: DiskBus::Sata,
            nic: Nic::E1000,
            cpu: CpuModel::Baseline,
        };
        s.accel = Accelerator::Kvm;
        let joined = qemu_args(&s, &VmDir::new("/d"), StartMode::Boot, None)
            .unwrap()
            .join(" ");
        assert!(
            joined.contains("-machine q35,pflash0=ovmf-code,pflash1=ovmf-vars -accel kvm"),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("-m {} ", s.memory_mib)),
            "{joined}"
        );
        assert!(joined.contains(&format!("-cpu {BASELINE_CPU}")), "{joined}");
        assert!(joined.contains("ahci,id=sata0"));
        assert!(joined.contains("ide-hd,drive=disk0,id=vdisk0,bus=sata0.0,bootindex=1"));
        assert!(joined.contains("ide-hd,drive=seed0,id=seed0-dev,bus=sata0.1"));
        assert!(joined.contains("e1000,netdev=net0"));
        assert!(joined.contains(&format!("\"filename\":\"{OVMF_CODE}\",\"read-only\":true")));
        assert!(
            joined.contains("\"filename\":\"/d/efivars.fd\""),
            "{joined}"
        );

        s.hardware.cpu = CpuModel::Host;
        let joined = qemu_args(&s, &VmDir::new("/d"), StartMode::Boot, None)
            .unwrap()
            .join(" ");
        assert!(joined.contains("-cpu host"));

        s.hardware.disk_bus = DiskBus::Ide;
        let err = qemu_args(&s, &VmDir::new("/d"), StartMode::Boot, None).unwrap_err();
        assert!(err.to_string().contains("q35 has no IDE"), "{err}");
        s.hardware.machine = Machine::Pc;
        let joined = qemu_args(&s, &VmDir::new("/d"), StartMode::Boot, None)
            .unwrap()
            .join(" ");
        assert!(joined.contains("ide-hd,drive=disk0,id=vdisk0,bus=ide.0,unit=0,bootindex=1"));
    }
}
