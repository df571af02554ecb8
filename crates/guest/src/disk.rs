//! The disk layout both guests share, made without root or mounts: an MBR disk whose first
//! partition is a FAT boot partition (syslinux for BIOS, syslinux.efi as the removable-media
//! loader `EFI/BOOT/BOOTX64.EFI` for UEFI, the kernel and its initramfs) and whose second is an
//! ext2/ext4 file system made from a directory by `mke2fs -d`. Each partition is made as a file
//! and copied in at its offset.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{io_err, GuestError, Result, MIB};

/// syslinux's BIOS master boot record (syslinux-common).
pub(crate) const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// syslinux as a UEFI application (syslinux-efi).
pub(crate) const SYSLINUX_EFI: &str = "/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi";
/// Its core module, loaded from the application's directory (syslinux-common).
pub(crate) const LDLINUX_E64: &str = "/usr/lib/syslinux/modules/efi64/ldlinux.e64";

/// Files from Debian packages the layout needs, with their package.
pub(crate) const LAYOUT_FILES: &[(&str, &str)] = &[
    (SYSLINUX_MBR, "syslinux-common"),
    (SYSLINUX_EFI, "syslinux-efi"),
    (LDLINUX_E64, "syslinux-common"),
];

/// The UEFI loader's files, for a build's key (the boot partition copies them).
pub(crate) fn efi_loader_bytes() -> Result<Vec<u8>> {
    let mut bytes = crate::read(Path::new(SYSLINUX_EFI))?;
    bytes.extend(crate::read(Path::new(LDLINUX_E64))?);
    Ok(bytes)
}

/// The boot loader's configuration: `kernel` and `initrd` are file names in the boot
/// partition's root, `append` the kernel command line.
pub(crate) fn syslinux_cfg(append: &str) -> String {
    format!(
        "DEFAULT vmatrix\nPROMPT 0\nTIMEOUT 0\nLABEL vmatrix\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND {append}\n"
    )
}

/// Makes the FAT boot partition at `out`: boot loaders for BIOS and UEFI, `kernel` and
/// `initrd` (as `/vmlinuz` and `/initrd.gz`) and the configuration booting them with `append`.
pub(crate) fn boot_partition(
    out: &Path,
    kernel: &Path,
    initrd: &Path,
    append: &str,
    scratch: &Path,
) -> Result<u64> {
    let payload = [kernel, initrd]
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).map_err(io_err("read", p)))
        .sum::<Result<u64>>()?;
    let size = (payload + 4 * MIB).div_ceil(MIB).max(16) * MIB;
    let cfg = scratch.join("syslinux.cfg");
    fs::write(&cfg, syslinux_cfg(append)).map_err(io_err("write", &cfg))?;
    run(Command::new("mkfs.fat")
        .args(["--invariant", "-n", "VMXBOOT", "-i", "564d5842", "-C"])
        .arg(out)
        .arg((size / 1024).to_string()))?;
    run(Command::new("syslinux").arg("--install").arg(out))?;
    run(Command::new("mmd")
        .arg("-i")
        .arg(out)
        .args(["::EFI", "::EFI/BOOT"]))?;
    for (file, name) in [
        (kernel, "vmlinuz"),
        (initrd, "initrd.gz"),
        (cfg.as_path(), "syslinux.cfg"),
        (Path::new(SYSLINUX_EFI), "EFI/BOOT/BOOTX64.EFI"),
        (Path::new(LDLINUX_E64), "EFI/BOOT/ldlinux.e64"),
        // syslinux.efi reads its configuration from its own directory.
        (cfg.as_path(), "EFI/BOOT/syslinux.cfg"),
    ] {
        run(Command::new("mcopy")
            .arg("-o")
            .arg("-i")
            .arg(out)
            .arg(file)
            .arg(format!("::{name}")))?;
    }
    Ok(size)
}

/// Makes an ext2/ext4 file system of `size` bytes at `out` holding `root`'s tree, with fixed
/// UUIDs and time so that the same tree gives the same bytes.
pub(crate) fn ext_partition(
    out: &Path,
    root: &Path,
    fs_type: &str,
    label: &str,
    size: u64,
) -> Result<()> {
    run(Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args(["-q", "-F", "-t", fs_type, "-L", label, "-m", "0"])
        .args(["-U", "6d617472-6978-4775-8573-742d64617461"])
        .args([
            "-E",
            "root_owner=0:0,hash_seed=6d617472-6978-4775-8573-742d68617368",
        ])
        .arg("-d")
        .arg(root)
        .arg(out)
        .arg(format!("{}k", size / 1024)))?;
    Ok(())
}

/// Writes the disk at `disk`: syslinux's MBR, a partition table, `boot` (FAT, bootable) at
/// 1 MiB and `second` (Linux) right after it.
pub(crate) fn assemble(
    disk: &Path,
    boot: (&Path, u64),
    second: (&Path, u64),
    mbr: &[u8],
) -> Result<()> {
    let (boot, boot_size) = boot;
    let (second, second_size) = second;
    let second_offset = MIB + boot_size;
    let file = fs::File::create(disk).map_err(io_err("create", disk))?;
    file.set_len(second_offset + second_size)
        .map_err(io_err("size", disk))?;
    drop(file);
    let table = format!(
        "label: dos\nlabel-id: 0x564d5842\nstart=2048, size={}, type=c, bootable\nstart={}, size={}, type=83\n",
        boot_size / 512,
        second_offset / 512,
        second_size / 512
    );
    sfdisk(disk, &table)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(io_err("open", disk))?;
    // syslinux's MBR code goes in the first 440 bytes, before the partition table.
    let mbr = &mbr[..mbr.len().min(440)];
    f.write_all(mbr).map_err(io_err("write MBR to", disk))?;
    copy_at(boot, &mut f, MIB, disk)?;
    copy_at(second, &mut f, second_offset, disk)?;
    f.sync_all().map_err(io_err("sync", disk))?;
    Ok(())
}

fn sfdisk(disk: &Path, table: &str) -> Result<()> {
    let mut child = Command::new("sfdisk")
        .args(["--no-reread", "--no-tell-kernel", "-q"])
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("run sfdisk on", disk))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(table.as_bytes())
            .map_err(io_err("write partition table for", disk))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err("run sfdisk on", disk))?;
    if !out.status.success() {
        return Err(GuestError::Tool {
            tool: "sfdisk".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn copy_at(src: &Path, dst: &mut fs::File, offset: u64, dst_path: &Path) -> Result<()> {
    let mut from = fs::File::open(src).map_err(io_err("open", src))?;
    dst.seek(SeekFrom::Start(offset))
        .map_err(io_err("seek in", dst_path))?;
    std::io::copy(&mut from, dst).map_err(io_err("copy into", dst_path))?;
    Ok(())
}

/// Runs `cmd` to completion; its standard output, or its standard error in the error.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| GuestError::Io {
            action: "run",
            path: PathBuf::from(&tool),
            source,
        })?;
    if !out.status.success() {
        return Err(GuestError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `tool` is on `PATH` (or in the sbin directories a non-root `PATH` lacks).
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
