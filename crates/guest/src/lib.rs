//! The reference guest: a small, whole x86 machine on one BIOS-bootable disk, built from Debian
//! packages only (Debian's kernel, busybox-static, syslinux). It boots through its own boot
//! loader, serves HTTP on port 80 and keeps values both in RAM and on its disk, so tests can
//! prove that suspend, resume and migration move memory *and* disk.
//!
//! Disk layout (MBR): partition 1 is a FAT boot partition (syslinux, kernel, initramfs),
//! partition 2 an ext2 data partition mounted at `/data`. Nothing here needs root or mounts:
//! each partition is made as a file and copied in at its offset.
//!
//! This crate must never touch the host beyond its output path and a scratch directory beside
//! it, and never rebuild when nothing changed (the build is keyed by a hash of every input).
#![forbid(unsafe_code)]

mod cpio;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpio::CpioWriter;

/// Bumped whenever the builder's output would change for the same inputs.
const BUILDER_VERSION: &str = "vmatrix-guest-7";
const MIB: u64 = 1024 * 1024;
/// The smallest disk we build: boot partition plus a small data partition.
pub const DEFAULT_SIZE: u64 = 64 * MIB;

const INIT: &str = include_str!("../files/init");
const HTTP_HANDLER: &str = include_str!("../files/vmx-http");
const POWEROFF_ACTION: &str = include_str!("../files/poweroff-action");
const SYSLINUX_CFG: &str = include_str!("../files/syslinux.cfg");
const INDEX_HTML: &str = "<p>vMatrix reference guest: the page as built</p>\n";

/// Kernel modules the guest needs, by name; their dependencies are added from `modules.dep`.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
];
/// Debian package paths used by the build.
const BUSYBOX: &str = "/bin/busybox";
const SYSLINUX_MBR: &str = "/usr/lib/syslinux/mbr/mbr.bin";
/// Tools the build runs, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("sfdisk", "fdisk"),
    ("mkfs.fat", "dosfstools"),
    ("syslinux", "syslinux"),
    ("mcopy", "mtools"),
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
}

impl BuildOptions {
    /// The default reference guest at `out`.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            size: DEFAULT_SIZE,
            service: "reference".into(),
            version: "1".into(),
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
    check_tools()?;
    let inputs = Inputs::gather(opts)?;
    let parts = parts_dir(&opts.out);
    let image = GuestImage {
        disk: opts.out.clone(),
        kernel: parts.join("vmlinuz"),
        initrd: parts.join("initrd.gz"),
        built: false,
        elapsed: Duration::ZERO,
    };
    let stamp = parts.join("build-key");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(inputs.key.as_str())
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
    let result = build_in(opts, &inputs, &scratch);
    let outcome = result.and_then(|()| {
        let _ = fs::remove_dir_all(&parts);
        fs::create_dir_all(&parts).map_err(io_err("create directory", &parts))?;
        rename(&scratch.join("vmlinuz"), &image.kernel)?;
        rename(&scratch.join("initrd.gz"), &image.initrd)?;
        rename(&scratch.join("disk.img"), &image.disk)?;
        fs::write(&stamp, &inputs.key).map_err(io_err("write", &stamp))
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

fn check_tools() -> Result<()> {
    for (tool, package) in TOOLS {
        if which(tool).is_none() {
            return Err(GuestError::Missing {
                what: format!("tool {tool}"),
                package,
            });
        }
    }
    for (file, package) in [
        (BUSYBOX, "busybox-static"),
        (SYSLINUX_MBR, "syslinux-common"),
    ] {
        if !Path::new(file).is_file() {
            return Err(GuestError::Missing {
                what: format!("file {file}"),
                package,
            });
        }
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Everything the image is made of, read once, with the hash that keys the cache.
struct Inputs {
    kernel: Vec<u8>,
    /// Module files (relative to the modules dir) in load order, with their bytes.
    modules: Vec<(String, Vec<u8>)>,
    busybox: Vec<u8>,
    applets: Vec<String>,
    mbr: Vec<u8>,
    key: String,
}

impl Inputs {
    fn gather(opts: &BuildOptions) -> Result<Self> {
        if opts.size < DEFAULT_SIZE {
            return Err(GuestError::SizeTooSmall {
                requested: opts.size,
                minimum: DEFAULT_SIZE,
            });
        }
        let (kernel_path, modules_dir) = find_kernel()?;
        let kernel = read(&kernel_path)?;
        let modules = module_load_order(&modules_dir)?
            .into_iter()
            .map(|rel| read(&modules_dir.join(&rel)).map(|bytes| (rel, bytes)))
            .collect::<Result<Vec<_>>>()?;
        let busybox = read(Path::new(BUSYBOX))?;
        let applets = run(Command::new(BUSYBOX).arg("--list"))?
            .lines()
            .map(str::to_owned)
            .filter(|a| !a.is_empty() && a != "busybox")
            .collect();
        let mbr = read(Path::new(SYSLINUX_MBR))?;
        let syslinux = which("syslinux").map(|p| read(&p)).transpose()?;

        let mut h = blake3::Hasher::new();
        for part in [
            BUILDER_VERSION.as_bytes(),
            opts.service.as_bytes(),
            opts.version.as_bytes(),
            &opts.size.to_le_bytes(),
            &kernel,
            &busybox,
            &mbr,
            syslinux.as_deref().unwrap_or_default(),
            INIT.as_bytes(),
            HTTP_HANDLER.as_bytes(),
            POWEROFF_ACTION.as_bytes(),
            SYSLINUX_CFG.as_bytes(),
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for (name, bytes) in &modules {
            h.update(name.as_bytes());
            h.update(bytes);
        }
        Ok(Self {
            kernel,
            modules,
            busybox,
            applets,
            mbr,
            key: h.finalize().to_hex().to_string(),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(io_err("read", path))
}

/// The newest `/boot/vmlinuz-*` that has a modules directory.
fn find_kernel() -> Result<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = fs::read_dir("/boot")
        .map_err(|_| GuestError::NoKernel)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_owned();
            let modules = Path::new("/lib/modules").join(&release);
            modules
                .join("modules.dep")
                .is_file()
                .then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop().ok_or(GuestError::NoKernel)
}

/// The module files to load, dependencies first, from the kernel's `modules.dep`.
fn module_load_order(modules_dir: &Path) -> Result<Vec<String>> {
    let dep_file = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&dep_file).map_err(io_err("read", &dep_file))?;
    let deps: BTreeMap<String, Vec<String>> = text
        .lines()
        .filter_map(|l| {
            let (module, rest) = l.split_once(':')?;
            Some((
                module.to_owned(),
                rest.split_whitespace().map(str::to_owned).collect(),
            ))
        })
        .collect();
    let by_name: BTreeMap<String, String> = deps
        .keys()
        .map(|path| {
            let base = path.rsplit('/').next().unwrap_or(path);
            let name = base.split('.').next().unwrap_or(base).replace('-', "_");
            (name, path.clone())
        })
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(m.to_owned()) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, seen, order);
        }
        order.push(m.to_owned());
    }
    for name in MODULES {
        // A module built into this kernel has no file: nothing to load.
        if let Some(path) = by_name.get(*name) {
            visit(path, &deps, &mut seen, &mut order);
        }
    }
    Ok(order)
}

fn run(cmd: &mut Command) -> Result<String> {
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

fn build_in(opts: &BuildOptions, inputs: &Inputs, scratch: &Path) -> Result<()> {
    let kernel = scratch.join("vmlinuz");
    fs::write(&kernel, &inputs.kernel).map_err(io_err("write", &kernel))?;
    let initrd = scratch.join("initrd.gz");
    write_initrd(opts, inputs, &initrd)?;

    // Boot partition: kernel + initramfs + boot loader, with room to spare for a bigger kernel.
    let payload = inputs.kernel.len() as u64 + fs::metadata(&initrd).map_or(0, |m| m.len());
    let boot_size = (payload + 4 * MIB).div_ceil(MIB).max(16) * MIB;
    let boot = scratch.join("boot.fat");
    let cfg = scratch.join("syslinux.cfg");
    fs::write(&cfg, SYSLINUX_CFG).map_err(io_err("write", &cfg))?;
    run(Command::new("mkfs.fat")
        .args(["--invariant", "-n", "VMXBOOT", "-i", "564d5842", "-C"])
        .arg(&boot)
        .arg((boot_size / 1024).to_string()))?;
    run(Command::new("syslinux").arg("--install").arg(&boot))?;
    for (file, name) in [
        (&kernel, "vmlinuz"),
        (&initrd, "initrd.gz"),
        (&cfg, "syslinux.cfg"),
    ] {
        run(Command::new("mcopy")
            .arg("-o")
            .arg("-i")
            .arg(&boot)
            .arg(file)
            .arg(format!("::{name}")))?;
    }

    // Data partition: the rest of the disk, ext2 (no journal, no checksum modules needed).
    let data_offset = MIB + boot_size;
    let data_size = (opts.size - data_offset) / MIB * MIB;
    if data_size < 8 * MIB {
        return Err(GuestError::SizeTooSmall {
            requested: opts.size,
            minimum: data_offset + 8 * MIB,
        });
    }
    let data_root = scratch.join("data-root");
    fs::create_dir_all(data_root.join("kv")).map_err(io_err("create directory", &data_root))?;
    // The served page (`/www/index.html`), on the system disk: what maintenance patches.
    let www = data_root.join("www");
    fs::create_dir_all(&www).map_err(io_err("create directory", &www))?;
    let page = www.join("index.html");
    fs::write(&page, INDEX_HTML).map_err(io_err("write", &page))?;
    if opts.size > DEFAULT_SIZE {
        write_padding(&data_root.join("pad"), data_size * 3 / 4)?;
    }
    let data = scratch.join("data.ext2");
    run(Command::new("mke2fs")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args(["-q", "-F", "-t", "ext2", "-L", "vmxdata", "-m", "0"])
        .args(["-U", "6d617472-6978-4775-8573-742d64617461"])
        .args([
            "-E",
            "root_owner=0:0,hash_seed=6d617472-6978-4775-8573-742d68617368",
        ])
        .arg("-d")
        .arg(&data_root)
        .arg(&data)
        .arg(format!("{}k", data_size / 1024)))?;
    let _ = fs::remove_dir_all(&data_root);

    let disk = scratch.join("disk.img");
    let total = data_offset + data_size;
    let file = fs::File::create(&disk).map_err(io_err("create", &disk))?;
    file.set_len(total).map_err(io_err("size", &disk))?;
    drop(file);
    let table = format!(
        "label: dos\nlabel-id: 0x564d5842\nstart=2048, size={}, type=c, bootable\nstart={}, size={}, type=83\n",
        boot_size / 512,
        data_offset / 512,
        data_size / 512
    );
    sfdisk(&disk, &table)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .map_err(io_err("open", &disk))?;
    // syslinux's MBR code goes in the first 440 bytes, before the partition table.
    let mbr = &inputs.mbr[..inputs.mbr.len().min(440)];
    f.write_all(mbr).map_err(io_err("write MBR to", &disk))?;
    copy_at(&boot, &mut f, MIB, &disk)?;
    copy_at(&data, &mut f, data_offset, &disk)?;
    f.sync_all().map_err(io_err("sync", &disk))?;
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

fn write_initrd(opts: &BuildOptions, inputs: &Inputs, path: &Path) -> Result<()> {
    let mut w = CpioWriter::new();
    for d in [
        "bin",
        "dev",
        "etc",
        "etc/vmatrix",
        "etc/acpi",
        "etc/acpi/PWRF",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "run",
        "tmp",
        "data",
    ] {
        w.dir(d);
    }
    w.char_device("dev/console", 0o600, 5, 1);
    w.char_device("dev/null", 0o666, 1, 3);
    w.file("init", 0o755, INIT.as_bytes());
    w.file("bin/busybox", 0o755, &inputs.busybox);
    for applet in &inputs.applets {
        w.symlink(&format!("bin/{applet}"), "busybox");
    }
    w.file("bin/vmx-http", 0o755, HTTP_HANDLER.as_bytes());
    w.file("etc/acpi/PWRF/00000080", 0o755, POWEROFF_ACTION.as_bytes());
    w.file("etc/vmatrix/service", 0o644, opts.service.as_bytes());
    w.file("etc/vmatrix/version", 0o644, opts.version.as_bytes());
    let mut load_list = String::new();
    for (rel, _) in &inputs.modules {
        let flat = rel.replace('/', "_");
        load_list.push_str(&flat);
        load_list.push('\n');
    }
    for (rel, bytes) in &inputs.modules {
        w.file(
            &format!("lib/modules/{}", rel.replace('/', "_")),
            0o644,
            bytes,
        );
    }
    w.file("etc/modules-load", 0o644, load_list.as_bytes());

    let mut gzip = Command::new("gzip")
        .args(["-n", "-6"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io_err("run gzip for", path))?;
    let stdin = gzip.stdin.take();
    let writer = std::thread::spawn(move || match stdin {
        Some(s) => w.finish(s),
        None => Ok(()),
    });
    let mut compressed = Vec::new();
    if let Some(mut out) = gzip.stdout.take() {
        out.read_to_end(&mut compressed)
            .map_err(io_err("compress", path))?;
    }
    let status = gzip.wait().map_err(io_err("compress", path))?;
    writer
        .join()
        .map_err(|_| GuestError::Tool {
            tool: "gzip".into(),
            status: "writer thread panicked".into(),
            stderr: String::new(),
        })?
        .map_err(io_err("compress", path))?;
    if !status.success() {
        return Err(GuestError::Tool {
            tool: "gzip".into(),
            status: status.to_string(),
            stderr: String::new(),
        });
    }
    fs::write(path, compressed).map_err(io_err("write", path))
}

/// Deterministic filler for large images: alternating 4 MiB files of incompressible bytes
/// (BLAKE3's output stream) and of log-like text, like the binaries and logs of a real disk.
fn write_padding(dir: &Path, bytes: u64) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_order_puts_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/a/virtio_pci.ko: kernel/a/virtio.ko kernel/a/virtio_ring.ko\n\
             kernel/a/virtio.ko:\nkernel/a/virtio_ring.ko:\n\
             kernel/b/virtio_blk.ko: kernel/a/virtio.ko kernel/a/virtio_ring.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path()).unwrap();
        let pos = |m: &str| order.iter().position(|x| x.ends_with(m)).unwrap();
        assert!(pos("/virtio.ko") < pos("virtio_pci.ko"));
        assert!(pos("virtio_ring.ko") < pos("virtio_pci.ko"));
        assert!(pos("virtio_ring.ko") < pos("virtio_blk.ko"));
        assert_eq!(order.len(), 4, "each module once: {order:?}");
    }

    #[test]
    fn too_small_size_is_refused_before_any_work() {
        let opts = BuildOptions {
            size: MIB,
            ..BuildOptions::new("/nonexistent/x.img")
        };
        match Inputs::gather(&opts) {
            Err(GuestError::SizeTooSmall { minimum, .. }) => assert_eq!(minimum, DEFAULT_SIZE),
            other => panic!("expected SizeTooSmall, got {:?}", other.err()),
        }
    }
}
