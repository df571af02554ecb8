//! The Debian reference guest: a whole Debian 12 system built by `mmdebstrap` from Debian's
//! packages only — systemd, Debian's kernel and initramfs, openssh-server, cloud-init,
//! qemu-guest-agent — with the reference service as systemd units (the same handler and
//! endpoints as the busybox guest). The root file system is ext4 (label `vmxroot`) on the
//! second partition; the first is the shared FAT boot partition with Debian's kernel and
//! initramfs, so the disk boots under BIOS and UEFI alike. About 40 s to HTTP under TCG.
//!
//! Building needs root (mmdebstrap writes a root file system with its owners and device nodes)
//! and Debian's package mirror; nothing else is downloaded.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::disk::{self, which};
use crate::{
    io_err, read, BuildOptions, GuestError, Result, BUILDER_VERSION, HTTP_HANDLER, INDEX_HTML, MIB,
    VOLUME_SCRIPT,
};

/// The smallest Debian disk: the root file system takes about 800 MiB.
pub const MIN_SIZE: u64 = 1536 * MIB;
/// The default Debian disk size.
pub const DEFAULT_SIZE: u64 = 2048 * MIB;
/// Debian's own mirror (the CDN in front of every official mirror).
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";
const SUITE: &str = "bookworm";
/// The packages every Debian guest has; `--packages` adds to them.
pub const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "openssh-server",
    "cloud-init",
    "qemu-guest-agent",
    "ifupdown",
    "iproute2",
    "e2fsprogs",
    "busybox-static",
    "procps",
    "sudo",
];
/// The kernel command line: the root by label, whatever the disk bus; `eth0` whatever the NIC.
const APPEND: &str = "root=LABEL=vmxroot ro console=ttyS0 net.ifnames=0 quiet";

const HTTP_UNIT: &str = include_str!("../files/debian/vmx-http.service");
const ECHO_UNIT: &str = include_str!("../files/debian/vmx-echo.service");
const VOLUME_UNIT: &str = include_str!("../files/debian/vmx-volume.service");
const CLOUD_CFG: &str = include_str!("../files/debian/cloud.cfg");
const AUTOLOGIN: &str = include_str!("../files/debian/autologin.conf");
const FSTAB: &str = include_str!("../files/debian/fstab");

/// Units enabled in the image, with the target that wants them.
const ENABLED: &[(&str, &str)] = &[
    ("vmx-http.service", "multi-user.target"),
    ("vmx-echo.service", "multi-user.target"),
    ("vmx-volume.service", "multi-user.target"),
];
/// Timers and services a server VM that is thrown away and re-activated fresh has no use for;
/// they would only spend the guest's first minutes (masked).
const MASKED: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
];

/// What keys a Debian build.
pub(crate) struct Inputs {
    pub(crate) key: String,
    packages: Vec<String>,
    sources: Vec<String>,
    mbr: Vec<u8>,
}

impl Inputs {
    pub(crate) fn gather(opts: &BuildOptions) -> Result<Self> {
        if opts.size < MIN_SIZE {
            return Err(GuestError::SizeTooSmall {
                requested: opts.size,
                minimum: MIN_SIZE,
            });
        }
        if which("mmdebstrap").is_none() {
            return Err(GuestError::Missing {
                what: "tool mmdebstrap".into(),
                package: "mmdebstrap",
            });
        }
        let mut packages: Vec<String> = PACKAGES.iter().map(|p| (*p).to_owned()).collect();
        for p in &opts.packages {
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
            {
                return Err(GuestError::BadPackage(p.clone()));
            }
            if !packages.contains(p) {
                packages.push(p.clone());
            }
        }
        let mirror = opts.mirror.as_deref().unwrap_or(DEFAULT_MIRROR);
        let mut sources = vec![
            format!("deb {mirror} {SUITE} main"),
            format!("deb {mirror} {SUITE}-updates main"),
        ];
        if opts.mirror.is_none() {
            sources.push(format!("deb {SECURITY_MIRROR} {SUITE}-security main"));
        }
        let mbr = read(Path::new(disk::SYSLINUX_MBR))?;
        let efi = disk::efi_loader_bytes()?;

        let mut h = blake3::Hasher::new();
        for part in [
            BUILDER_VERSION.as_bytes(),
            b"debian",
            opts.service.as_bytes(),
            opts.version.as_bytes(),
            &opts.size.to_le_bytes(),
            packages.join(",").as_bytes(),
            sources.join("\n").as_bytes(),
            &mbr,
            &efi,
            APPEND.as_bytes(),
            HTTP_HANDLER.as_bytes(),
            VOLUME_SCRIPT.as_bytes(),
            HTTP_UNIT.as_bytes(),
            ECHO_UNIT.as_bytes(),
            VOLUME_UNIT.as_bytes(),
            CLOUD_CFG.as_bytes(),
            AUTOLOGIN.as_bytes(),
            FSTAB.as_bytes(),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        Ok(Self {
            key: h.finalize().to_hex().to_string(),
            packages,
            sources,
            mbr,
        })
    }
}

pub(crate) fn build_in(opts: &BuildOptions, inputs: &Inputs, scratch: &Path) -> Result<()> {
    let root = scratch.join("root");
    tracing::info!(
        packages = %inputs.packages.join(","),
        "building a Debian 12 root file system with mmdebstrap (about 2 minutes)"
    );
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", inputs.packages.join(",")))
        // No recommended packages: a server image holds what it lists.
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg(SUITE)
        .arg(&root)
        .args(&inputs.sources);
    // mmdebstrap reports its progress on standard error: the user sees it.
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .map_err(io_err("run", Path::new("mmdebstrap")))?;
    if !status.success() {
        return Err(GuestError::Tool {
            tool: "mmdebstrap".into(),
            status: status.to_string(),
            stderr: "see its messages above (it needs root and Debian's package mirror)".into(),
        });
    }
    customize(opts, &root)?;

    let (kernel, initrd) = kernel_of(&root)?;
    let boot = scratch.join("boot.fat");
    let boot_size = disk::boot_partition(&boot, &kernel, &initrd, APPEND, scratch)?;
    let root_size = opts.size.saturating_sub(MIB + boot_size) / MIB * MIB;
    let root_fs = scratch.join("root.ext4");
    disk::ext_partition(&root_fs, &root, "ext4", "vmxroot", root_size)?;
    fs::copy(&kernel, scratch.join("vmlinuz")).map_err(io_err("copy", &kernel))?;
    fs::copy(&initrd, scratch.join("initrd.gz")).map_err(io_err("copy", &initrd))?;
    let _ = fs::remove_dir_all(&root);
    disk::assemble(
        &scratch.join("disk.img"),
        (&boot, boot_size),
        (&root_fs, root_size),
        &inputs.mbr,
    )
}

/// Writes the reference service, its units and vMatrix's settings into the root file system.
fn customize(opts: &BuildOptions, root: &Path) -> Result<()> {
    let write = |rel: &str, mode: u32, content: &[u8]| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = root.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        fs::write(&path, content).map_err(io_err("write", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(io_err("set permissions of", &path))
    };
    write("usr/local/bin/vmx-http", 0o755, HTTP_HANDLER.as_bytes())?;
    write("usr/local/sbin/vmx-volume", 0o755, VOLUME_SCRIPT.as_bytes())?;
    write("etc/vmatrix/service", 0o644, opts.service.as_bytes())?;
    write("etc/vmatrix/version", 0o644, opts.version.as_bytes())?;
    write("data/www/index.html", 0o644, INDEX_HTML.as_bytes())?;
    fs::create_dir_all(root.join("data/kv")).map_err(io_err("create directory", root))?;
    write(
        "etc/systemd/system/vmx-http.service",
        0o644,
        HTTP_UNIT.as_bytes(),
    )?;
    write(
        "etc/systemd/system/vmx-echo.service",
        0o644,
        ECHO_UNIT.as_bytes(),
    )?;
    write(
        "etc/systemd/system/vmx-volume.service",
        0o644,
        VOLUME_UNIT.as_bytes(),
    )?;
    write(
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        0o644,
        AUTOLOGIN.as_bytes(),
    )?;
    write(
        "etc/cloud/cloud.cfg.d/90-vmatrix.cfg",
        0o644,
        CLOUD_CFG.as_bytes(),
    )?;
    write("etc/fstab", 0o644, FSTAB.as_bytes())?;
    write(
        "etc/hostname",
        0o644,
        format!("{}\n", opts.service).as_bytes(),
    )?;
    for (unit, target) in ENABLED {
        symlink(
            &PathBuf::from(format!("/etc/systemd/system/{unit}")),
            &root.join(format!("etc/systemd/system/{target}.wants/{unit}")),
        )?;
    }
    for unit in MASKED {
        symlink(
            Path::new("/dev/null"),
            &root.join(format!("etc/systemd/system/{unit}")),
        )?;
    }
    Ok(())
}

fn symlink(target: &Path, link: &Path) -> Result<()> {
    if let Some(dir) = link.parent() {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    }
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).map_err(io_err("link", link))
}

/// The newest kernel under the root's `/boot` and its initramfs.
fn kernel_of(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = root.join("boot");
    let mut releases: Vec<String> = fs::read_dir(&boot)
        .map_err(io_err("read", &boot))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .filter(|r| boot.join(format!("initrd.img-{r}")).is_file())
        .collect();
    releases.sort();
    let release = releases.pop().ok_or(GuestError::NoKernel)?;
    Ok((
        boot.join(format!("vmlinuz-{release}")),
        boot.join(format!("initrd.img-{release}")),
    ))
}
