//! The reference guests: whole x86 machines on one disk that boots under BIOS or UEFI, built
//! from Debian packages only. Both serve the same HTTP endpoints on port 80 (`/`, `/health`,
//! `/work`, `/kv`, `/disk`, `/www`, `/stream`) and TCP echo on port 7, and keep values both in
//! RAM and on disk, so tests can prove that suspend, resume and migration move memory *and*
//! disk. Two operating systems:
//! - **busybox** ([`busybox`]): Debian's kernel, busybox-static and an init script in an
//!   initramfs; about 7 s to HTTP under TCG. The guest of the fast tests.
//! - **debian** ([`debian`]): Debian 12 with systemd, openssh-server, cloud-init and
//!   qemu-guest-agent, built by mmdebstrap; about 40 s to HTTP under TCG.
//!
//! Disk layout (MBR, [`disk`]): partition 1 is a FAT boot partition (syslinux for BIOS and UEFI,
//! kernel, initramfs), partition 2 an ext2 data partition (busybox) or the ext4 root (debian).
//!
//! This crate must never touch the host beyond its output path and a scratch directory beside
//! it, and never rebuild when nothing changed (the build is keyed by a hash of every input).
#![forbid(unsafe_code)]

pub mod busybox;
mod cpio;
pub mod debian;
mod disk;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use disk::which;

/// Bumped whenever the builder's output would change for the same inputs.
const BUILDER_VERSION: &str = "vmatrix-guest-8";
const MIB: u64 = 1024 * 1024;
/// The smallest busybox disk: boot partition plus a small data partition.
pub const DEFAULT_SIZE: u64 = 64 * MIB;

/// The HTTP handler both guests run per connection.
const HTTP_HANDLER: &str = include_str!("../files/vmx-http");
/// Mounts an instance's first volume at `/volume` (both guests).
const VOLUME_SCRIPT: &str = include_str!("../files/vmx-volume");
const INDEX_HTML: &str = "<p>vMatrix reference guest: the page as built</p>\n";
/// Tools the build runs, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("mkfs.fat", "dosfstools"),
    ("syslinux", "syslinux"),
    ("mcopy", "mtools"),
    ("mmd", "mtools"),
    ("mke2fs", "e2fsprogs"),
    ("gzip", "gzip"),
];

/// What went wrong while building the guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A tool or file from a Debian package is not installed.
    #[error("{what} is missing (Debian package {package}); run scripts/install-deps.sh as root")]
    Missing { what: String, package: &'static str },
    /// No Debian kernel was found.
    #[error("no kernel found under /boot (vmlinuz-*) with modules in /lib/modules; install linux-image-amd64 (scripts/install-deps.sh)")]
    NoKernel,
    /// The requested size cannot hold the guest.
    #[error("--size {requested} bytes is too small: the guest needs at least {minimum} bytes")]
    SizeTooSmall { requested: u64, minimum: u64 },
    /// A package name `--packages` cannot hold.
    #[error("package name {0:?} is not a Debian package name (lowercase letters, digits, '+', '-', '.')")]
    BadPackage(String),
    /// A file operation failed.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },
}

type Result<T> = std::result::Result<T, GuestError>;

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> GuestError + 'a {
    move |source| GuestError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The disk image to write (raw format).
    pub out: PathBuf,
    /// Total disk size in bytes; anything above [`DEFAULT_SIZE`] is filled with padding data
    /// (half incompressible, half text) so large-image benchmarks see realistic content.
    pub size: u64,
    /// The service name baked into the image (answered by `GET /`).
    pub service: String,
    /// The version baked into the image.
    pub version: String,
    /// Which operating system.
    pub os: Os,
    /// Debian packages added to the Debian guest's (ignored for busybox).
    pub packages: Vec<String>,
    /// The Debian mirror to build from (`None`: deb.debian.org, with security updates).
    pub mirror: Option<String>,
}

/// The reference guest's operating system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Os {
    /// busybox in an initramfs: seconds to boot; the fast tests' guest.
    #[default]
    Busybox,
    /// Debian 12 with systemd, cloud-init, openssh-server and qemu-guest-agent.
    Debian,
}

impl Os {
    /// The disk size when none is asked for.
    pub fn default_size(self) -> u64 {
        match self {
            Os::Busybox => DEFAULT_SIZE,
            Os::Debian => debian::DEFAULT_SIZE,
        }
    }
}

impl std::str::FromStr for Os {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "busybox" => Ok(Os::Busybox),
            "debian" => Ok(Os::Debian),
            other => Err(format!(
                "unknown guest OS {other:?}: choose busybox or debian"
            )),
        }
    }
}

impl BuildOptions {
    /// The default reference guest at `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            size: DEFAULT_SIZE,
            service: "reference".into(),
            version: "1".into(),
            os: Os::Busybox,
            packages: Vec::new(),
            mirror: None,
        }
    }
}

/// A built guest: the disk plus copies of its kernel and initramfs, which the accelerator probe
/// boots directly.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The bootable raw disk.
    pub disk: PathBuf,
    /// The kernel inside the disk.
    pub kernel: PathBuf,
    /// The initramfs inside the disk.
    pub initrd: PathBuf,
    /// False when the image was already up to date.
    pub built: bool,
    /// Time spent (hashing only, when cached).
    pub elapsed: Duration,
}

/// Builds the guest described by `opts`, or returns the existing image when every input is
/// unchanged.
pub fn build(opts: &BuildOptions) -> Result<GuestImage> {
    let started = Instant::now();
    if opts.size < DEFAULT_SIZE {
        return Err(GuestError::SizeTooSmall {
            requested: opts.size,
            minimum: DEFAULT_SIZE,
        });
    }
    check_tools(opts.os)?;
    let inputs = match opts.os {
        Os::Busybox => Built::Busybox(busybox::Inputs::gather(opts)?),
        Os::Debian => Built::Debian(debian::Inputs::gather(opts)?),
    };
    let key = match &inputs {
        Built::Busybox(i) => i.key.clone(),
        Built::Debian(i) => i.key.clone(),
    };
    let parts = parts_dir(&opts.out);
    let image = GuestImage {
        disk: opts.out.clone(),
        kernel: parts.join("vmlinuz"),
        initrd: parts.join("initrd.gz"),
        built: false,
        elapsed: Duration::ZERO,
    };
    let stamp = parts.join("build-key");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str())
        && image.disk.is_file()
        && image.kernel.is_file()
        && image.initrd.is_file()
    {
        tracing::debug!(disk = %image.disk.display(), "guest image up to date");
        return Ok(GuestImage {
            elapsed: started.elapsed(),
            ..image
        });
    }

    let out_dir = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).map_err(io_err("create directory", &out_dir))?;
    // Scratch beside the output so the final renames stay on one file system.
    let scratch = out_dir.join(format!(
        ".{}.build-{}",
        file_name(&opts.out),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).map_err(io_err("create directory", &scratch))?;
    let result = match &inputs {
        Built::Busybox(i) => busybox::build_in(opts, i, &scratch),
        Built::Debian(i) => debian::build_in(opts, i, &scratch),
    };
    let outcome = result.and_then(|()| {
        let _ = fs::remove_dir_all(&parts);
        fs::create_dir_all(&parts).map_err(io_err("create directory", &parts))?;
        rename(&scratch.join("vmlinuz"), &image.kernel)?;
        rename(&scratch.join("initrd.gz"), &image.initrd)?;
        rename(&scratch.join("disk.img"), &image.disk)?;
        fs::write(&stamp, &key).map_err(io_err("write", &stamp))
    });
    let _ = fs::remove_dir_all(&scratch);
    outcome?;
    Ok(GuestImage {
        built: true,
        elapsed: started.elapsed(),
        ..image
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "guest.img".into())
}

fn parts_dir(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".parts");
    PathBuf::from(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(io_err("rename into place", to))
}

/// What one OS's build is made of.
enum Built {
    Busybox(busybox::Inputs),
    Debian(debian::Inputs),
}

fn check_tools(os: Os) -> Result<()> {
    for (tool, package) in TOOLS {
        if which(tool).is_none() {
            return Err(GuestError::Missing {
                what: format!("tool {tool}"),
                package,
            });
        }
    }
    let busybox = [(busybox::BUSYBOX, "busybox-static")];
    let os_files: &[(&str, &str)] = match os {
        Os::Busybox => &busybox,
        Os::Debian => &[],
    };
    for (file, package) in disk::LAYOUT_FILES.iter().chain(os_files) {
        if !Path::new(file).is_file() {
            return Err(GuestError::Missing {
                what: format!("file {file}"),
                package,
            });
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(io_err("read", path))
}

/// Deterministic filler for large images: alternating 4 MiB files of incompressible bytes
/// (BLAKE3's output stream) and of log-like text, like the binaries and logs of a real disk.
pub(crate) fn write_padding(dir: &Path, bytes: u64) -> Result<()> {
    const FILE: u64 = 4 * MIB;
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    for i in 0..bytes / FILE {
        let path = dir.join(format!("{i:05}.bin"));
        let mut data = vec![0u8; FILE as usize];
        if i.is_multiple_of(2) {
            let mut xof = blake3::Hasher::new()
                .update(&i.to_le_bytes())
                .finalize_xof();
            xof.fill(&mut data);
        } else {
            let mut text = Vec::with_capacity(FILE as usize);
            let mut n = i * 100_000;
            while text.len() < FILE as usize {
                n += 1;
                let _ = writeln!(
                    text,
                    "2026-11-25T12:{:02}:{:02}Z vmatrix-guest request={} status=200 bytes={} path=/item/{}",
                    (n / 60) % 60,
                    n % 60,
                    n,
                    (n * 7919) % 65536,
                    n % 977
                );
            }
            text.truncate(FILE as usize);
            data = text;
        }
        fs::write(&path, &data).map_err(io_err("write", &path))?;
    }
    Ok(())
}
