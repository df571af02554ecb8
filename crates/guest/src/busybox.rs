//! The busybox reference guest: everything runs from an initramfs made here (Debian's kernel
//! and the virtio, SATA, IDE and e1000 modules it needs, busybox-static, the init script and
//! the HTTP handler); the disk's second partition is an ext2 file system mounted at `/data`.
//! Boots to HTTP in about 7 s under TCG: the guest of the fast tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cpio::CpioWriter;
use crate::disk::{self, run, which};
use crate::{
    io_err, read, write_padding, BuildOptions, GuestError, Result, BUILDER_VERSION, DEFAULT_SIZE,
    HTTP_HANDLER, INDEX_HTML, MIB, VOLUME_SCRIPT,
};

const INIT: &str = include_str!("../files/init");
const POWEROFF_ACTION: &str = include_str!("../files/poweroff-action");
/// The kernel command line.
const APPEND: &str = "console=ttyS0 quiet";

/// Kernel modules the guest loads, by group and name; their dependencies are added from
/// `modules.dep`. `base` always; the others only when the init finds their hardware (probing a
/// bus with nothing on it costs seconds under TCG): SATA (ahci) or IDE (ata_piix) when the system
/// disk is not on virtio, e1000 when there is one.
const MODULE_GROUPS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "virtio_pci",
            "virtio_blk",
            "virtio_net",
            "crc32c_generic",
            "ext4",
            "button",
            "evdev",
        ],
    ),
    ("ahci", &["ahci", "sd_mod"]),
    ("ide", &["ata_piix", "sd_mod"]),
    ("e1000", &["e1000"]),
];
/// busybox-static's binary.
pub(crate) const BUSYBOX: &str = "/bin/busybox";

/// Everything the image is made of, read once, with the hash that keys the cache.
pub(crate) struct Inputs {
    kernel: Vec<u8>,
    /// Every module file (relative to the modules dir), with its bytes.
    modules: Vec<(String, Vec<u8>)>,
    /// Each group's module files in load order.
    groups: Vec<(&'static str, Vec<String>)>,
    busybox: Vec<u8>,
    applets: Vec<String>,
    mbr: Vec<u8>,
    pub(crate) key: String,
}

impl Inputs {
    pub(crate) fn gather(opts: &BuildOptions) -> Result<Self> {
        if opts.size < DEFAULT_SIZE {
            return Err(GuestError::SizeTooSmall {
                requested: opts.size,
                minimum: DEFAULT_SIZE,
            });
        }
        let (kernel_path, modules_dir) = find_kernel()?;
        let kernel = read(&kernel_path)?;
        let groups = MODULE_GROUPS
            .iter()
            .map(|(group, names)| Ok((*group, module_load_order(&modules_dir, names)?)))
            .collect::<Result<Vec<_>>>()?;
        let files: BTreeSet<&String> = groups.iter().flat_map(|(_, g)| g).collect();
        let modules = files
            .into_iter()
            .map(|rel| read(&modules_dir.join(rel)).map(|bytes| (rel.clone(), bytes)))
            .collect::<Result<Vec<_>>>()?;
        let busybox = read(Path::new(BUSYBOX))?;
        let applets = run(Command::new(BUSYBOX).arg("--list"))?
            .lines()
            .map(str::to_owned)
            .filter(|a| !a.is_empty() && a != "busybox")
            .collect();
        let mbr = read(Path::new(disk::SYSLINUX_MBR))?;
        let syslinux = which("syslinux").map(|p| read(&p)).transpose()?;
        let efi = disk::efi_loader_bytes()?;

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
            VOLUME_SCRIPT.as_bytes(),
            POWEROFF_ACTION.as_bytes(),
            APPEND.as_bytes(),
            &efi,
        ] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        for (name, bytes) in &modules {
            h.update(name.as_bytes());
            h.update(bytes);
        }
        for (group, files) in &groups {
            h.update(group.as_bytes());
            h.update(files.join(",").as_bytes());
        }
        Ok(Self {
            kernel,
            modules,
            groups,
            busybox,
            applets,
            mbr,
            key: h.finalize().to_hex().to_string(),
        })
    }
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
fn module_load_order(modules_dir: &Path, names: &[&str]) -> Result<Vec<String>> {
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
    for name in names {
        // A module built into this kernel has no file: nothing to load.
        if let Some(path) = by_name.get(*name) {
            visit(path, &deps, &mut seen, &mut order);
        }
    }
    Ok(order)
}

pub(crate) fn build_in(opts: &BuildOptions, inputs: &Inputs, scratch: &Path) -> Result<()> {
    let kernel = scratch.join("vmlinuz");
    fs::write(&kernel, &inputs.kernel).map_err(io_err("write", &kernel))?;
    let initrd = scratch.join("initrd.gz");
    write_initrd(opts, inputs, &initrd)?;
    let boot = scratch.join("boot.fat");
    let boot_size = disk::boot_partition(&boot, &kernel, &initrd, APPEND, scratch)?;

    // Data partition: the rest of the disk, ext2 (no journal, no checksum modules needed).
    let data_offset = MIB + boot_size;
    let data_size = (opts.size.saturating_sub(data_offset)) / MIB * MIB;
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
    disk::ext_partition(&data, &data_root, "ext2", "vmxdata", data_size)?;
    let _ = fs::remove_dir_all(&data_root);
    disk::assemble(
        &scratch.join("disk.img"),
        (&boot, boot_size),
        (&data, data_size),
        &inputs.mbr,
    )
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
    w.file("bin/vmx-volume", 0o755, VOLUME_SCRIPT.as_bytes());
    w.file("etc/acpi/PWRF/00000080", 0o755, POWEROFF_ACTION.as_bytes());
    w.file("etc/vmatrix/service", 0o644, opts.service.as_bytes());
    w.file("etc/vmatrix/version", 0o644, opts.version.as_bytes());
    for (rel, bytes) in &inputs.modules {
        w.file(
            &format!("lib/modules/{}", rel.replace('/', "_")),
            0o644,
            bytes,
        );
    }
    for (group, files) in &inputs.groups {
        let list: String = files
            .iter()
            .map(|rel| format!("{}\n", rel.replace('/', "_")))
            .collect();
        w.file(&format!("etc/modules-{group}"), 0o644, list.as_bytes());
    }

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
        let order = module_load_order(dir.path(), &["virtio_pci", "virtio_blk"]).unwrap();
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
