//! A VM's QEMU in a control group of its own, limited to the CPU and memory its spec gives.
//!
//! A guest escape, a runaway QEMU or a guest that exhausts its memory then takes no more of the
//! host than the VM was given: CPU up to its vCPUs plus one for QEMU's own threads (I/O, a
//! migration's stream), memory up to its RAM plus a quarter and 384 MiB for QEMU itself (its
//! code, TCG's translation cache, device buffers). Beyond its memory the kernel's OOM killer
//! ends that QEMU alone, never another process of the host.
//!
//! A group also has a CPU weight, and the scheduler shares the CPU between groups by weight
//! before any thread's nice value counts: a VM's weight is what its vCPU threads would weigh at
//! its QEMU's nice value (the kernel's table), so a migration's destination, started at
//! [`crate::process::MIGRATING_NICE`] until its guest runs, still yields to the guests that
//! serve (as one group of default weight it took half the CPU from the guest it was receiving:
//! requests during a move waited 434–839 ms where they waited 42–49 ms without groups). For the
//! same reason every VM of a host is a sibling in one `vmatrix` group (`vmatrix/GROUP.VM`, not a
//! level per machine: several machines share one host under `vmatrix up`), and `vmatrix`
//! weighs as much as one busy thread per host CPU against the host's other processes.
//!
//! Both hierarchies are handled: cgroup v2 (one tree at `/sys/fs/cgroup`, controllers enabled
//! down the path) and v1 (a tree per controller, as on hosts that mount `cpu` and `memory`
//! separately). Groups live under `vmatrix`: in v2 below the root, in v1 below the caller's own
//! group of each controller. The process is placed before it runs QEMU's first instruction: the
//! files it joins through are opened here and written in the child between fork and exec. A
//! group is removed once its process has exited; [`sweep`] removes any left empty (an agent
//! killed before it could).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Result, VmmError};

/// CPU and memory for one VM's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per period, in microseconds, of a 100 ms period.
    pub cpu_quota_us: u64,
    /// Weight against the host's other VMs, in cgroup v1's `cpu.shares` units (1024: one
    /// thread at nice 0).
    pub cpu_shares: u64,
    /// Bytes of memory.
    pub memory_bytes: u64,
}

/// The CFS period the quota is a share of.
const PERIOD_US: u64 = 100_000;

impl Limits {
    /// What a VM of `vcpus` and `memory_mib` of RAM may use (see the module docs).
    /// `nice` is its QEMU's nice value (0 but for a migration's destination).
    pub fn for_vm(vcpus: u32, memory_mib: u32, nice: i32) -> Self {
        let ram = u64::from(memory_mib) << 20;
        Self {
            cpu_quota_us: (u64::from(vcpus) + 1) * PERIOD_US,
            cpu_shares: shares(vcpus, nice),
            memory_bytes: ram + ram / 4 + (384 << 20),
        }
    }
}

/// What `vcpus` busy threads at nice value `nice` weigh: the kernel's `sched_prio_to_weight`
/// for nice 0 to 19 (a step of nice is ~10% of CPU against a thread one step away).
fn shares(vcpus: u32, nice: i32) -> u64 {
    const WEIGHT: [u64; 20] = [
        1024, 820, 655, 526, 423, 335, 272, 215, 172, 137, 110, 87, 70, 56, 45, 36, 29, 23, 18, 15,
    ];
    let at = usize::try_from(nice.clamp(0, 19)).unwrap_or(0);
    WEIGHT[at] * u64::from(vcpus.max(1))
}

/// `shares` as cgroup v2's `cpu.weight` (100 for 1024; 1 to 10000).
fn weight_v2(shares: u64) -> u64 {
    (shares * 100 / 1024).clamp(1, 10_000)
}

/// What the `vmatrix` group weighs against the host's other processes: one busy thread per
/// host CPU, in `cpu.shares` units.
fn top_shares() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    1024 * cpus
}

/// Which hierarchy this host mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// One unified tree.
    V2(PathBuf),
    /// A tree per controller: the `cpu` and the `memory` one, each at our own group in it.
    V1 { cpu: PathBuf, memory: PathBuf },
}

const ROOT: &str = "/sys/fs/cgroup";

fn layout() -> Option<Layout> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        let have = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        let words: Vec<&str> = have.split_whitespace().collect();
        return (words.contains(&"cpu") && words.contains(&"memory"))
            .then(|| Layout::V2(root.to_owned()));
    }
    // v1: our own group of each controller, from /proc/self/cgroup ("4:memory:/a/b").
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let at = |controller: &str| -> Option<PathBuf> {
        let mount = root.join(controller);
        if !mount.join("cgroup.procs").exists() {
            return None;
        }
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names
                .split(',')
                .any(|n| n == controller)
                .then(|| path.trim_start_matches('/').to_owned())
        })?;
        Some(mount.join(path))
    };
    Some(Layout::V1 {
        cpu: at("cpu")?,
        memory: at("memory")?,
    })
}

/// Whether VMs can get groups here: root, on a host that mounts the CPU and memory
/// controllers.
pub fn available() -> bool {
    nix::unistd::geteuid().is_root() && layout().is_some()
}

/// One VM's group (a directory per hierarchy), with the files a process joins it through.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> VmmError {
    VmmError::Invalid(format!(
        "{what} {}: {e} (QEMU's control group; run the agent as root on a host that mounts the \
         cpu and memory controllers, or without --qemu-user)",
        path.display()
    ))
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|e| io("could not write", path, e))
}

impl Cgroup {
    /// Creates (or takes again) the group `vmatrix/GROUP.NAME` with `limits`.
    pub fn create(group: &str, name: &str, limits: Limits) -> Result<Self> {
        for part in [group, name] {
            if part.is_empty() || part.contains(['/', '.']) {
                return Err(VmmError::Invalid(format!(
                    "{part:?} cannot name a control group"
                )));
            }
        }
        let layout = layout().ok_or_else(|| {
            VmmError::Invalid(
                "this host mounts no cpu and memory control groups: QEMU cannot be limited".into(),
            )
        })?;
        let top = top_shares();
        let g = Self {
            dirs: vm_dirs(&layout, group, name),
        };
        match layout {
            Layout::V2(root) => {
                // Controllers are enabled from the root down to the VM's parent.
                let vmatrix = root.join("vmatrix");
                write(&root.join("cgroup.subtree_control"), "+cpu +memory")?;
                mkdir(&vmatrix)?;
                write(&vmatrix.join("cgroup.subtree_control"), "+cpu +memory")?;
                write(&vmatrix.join("cpu.weight"), &weight_v2(top).to_string())?;
                let dir = &g.dirs[0];
                mkdir(dir)?;
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {PERIOD_US}", limits.cpu_quota_us),
                )?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            }
            Layout::V1 { cpu, .. } => {
                mkdir(&cpu.join("vmatrix"))?;
                write(&cpu.join("vmatrix/cpu.shares"), &top.to_string())?;
                let (cpu, memory) = (&g.dirs[0], &g.dirs[1]);
                mkdir(cpu)?;
                mkdir(memory)?;
                write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &limits.cpu_quota_us.to_string(),
                )?;
                write(
                    &memory.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
            }
        }
        g.set_shares(limits.cpu_shares)?;
        Ok(g)
    }

    /// Gives the group the weight of `vcpus` threads at nice value `nice` (a migration's
    /// destination once its guest runs there: 0).
    pub fn set_priority(&self, vcpus: u32, nice: i32) -> Result<()> {
        self.set_shares(shares(vcpus, nice))
    }

    fn set_shares(&self, shares: u64) -> Result<()> {
        for d in &self.dirs {
            if d.join("cpu.shares").exists() {
                write(&d.join("cpu.shares"), &shares.to_string())?;
            } else if d.join("cpu.weight").exists() {
                write(&d.join("cpu.weight"), &weight_v2(shares).to_string())?;
            }
        }
        Ok(())
    }

    /// The group `vmatrix/GROUP.NAME` as it is (for a process adopted in it), if it exists.
    pub fn existing(group: &str, name: &str) -> Option<Self> {
        let dirs = vm_dirs(&layout()?, group, name);
        dirs.iter().all(|d| d.is_dir()).then_some(Self { dirs })
    }

    /// The group's directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The files a process joins the group through, opened for a child to write `0` (itself)
    /// between fork and exec.
    pub(crate) fn join_files(&self) -> Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map(OwnedFd::from)
                    .map_err(|e| io("could not open", &p, e))
            })
            .collect()
    }

    /// Removes the group once no process is left in it (the kernel refuses it before).
    pub fn remove(&self) {
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!("control group {} stays: {e}", d.display());
                }
            }
        }
    }
}

/// Joins the groups whose `cgroup.procs` files are `fds` (the calling process). Only
/// async-signal-safe calls: for the child between fork and exec.
pub(crate) fn join_self(fds: &[i32]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: write(2) on an open descriptor with a 1-byte buffer that outlives the call.
        if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptor numbers of `fds`.
pub(crate) fn raw(fds: &[OwnedFd]) -> Vec<i32> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}

fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) => Err(io("could not create", dir, e)),
    }
}

/// What a [`sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Groups removed.
    pub removed: usize,
    /// Groups left (a process still in them, or younger than asked).
    pub left: usize,
}

/// The `vmatrix` directories (one per hierarchy).
fn tops(layout: &Layout) -> Vec<PathBuf> {
    match layout {
        Layout::V2(root) => vec![root.join("vmatrix")],
        Layout::V1 { cpu, memory } => vec![cpu.join("vmatrix"), memory.join("vmatrix")],
    }
}

/// The directories of the group `vmatrix/GROUP.NAME`.
fn vm_dirs(layout: &Layout, group: &str, name: &str) -> Vec<PathBuf> {
    tops(layout)
        .into_iter()
        .map(|t| t.join(format!("{group}.{name}")))
        .collect()
}

/// Removes the empty groups of `GROUP` older than `older_than` (a VM's group left behind by an
/// agent killed before its QEMU ended), and `vmatrix` itself once empty when `older_than` is
/// zero (the agent ending). Groups with a process in them stay: the kernel refuses to remove
/// them.
pub fn sweep(group: &str, older_than: Duration) -> Swept {
    let mut out = Swept::default();
    let Some(layout) = layout() else {
        return out;
    };
    let prefix = format!("{group}.");
    for top in tops(&layout) {
        let Ok(entries) = std::fs::read_dir(&top) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_name().to_string_lossy().starts_with(&prefix) || !e.path().is_dir() {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= older_than);
            if old && std::fs::remove_dir(e.path()).is_ok() {
                out.removed += 1;
            } else {
                out.left += 1;
            }
        }
    }
    if older_than.is_zero() {
        remove_root();
    }
    out
}

/// Removes `vmatrix` itself where no machine's group is left under it (`vmatrix up` once its
/// agents have stopped; several agents stopping at once each leave it to the last).
pub fn remove_root() {
    for top in layout().as_ref().map(tops).unwrap_or_default() {
        let _ = std::fs::remove_dir(top);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_the_vcpus_plus_one_and_the_ram_plus_room_for_qemu() {
        let l = Limits::for_vm(2, 1024, 0);
        assert_eq!(l.cpu_quota_us, 300_000);
        assert_eq!(l.memory_bytes, (1024 + 256 + 384) << 20);
    }

    #[test]
    fn a_group_weighs_what_its_vcpu_threads_would_at_its_nice_value() {
        assert_eq!(Limits::for_vm(1, 256, 0).cpu_shares, 1024);
        assert_eq!(Limits::for_vm(2, 256, 0).cpu_shares, 2048);
        // A migration's destination: a tenth of a serving guest's weight.
        assert_eq!(
            Limits::for_vm(1, 256, crate::process::MIGRATING_NICE).cpu_shares,
            110
        );
        assert_eq!(Limits::for_vm(1, 256, 40).cpu_shares, 15);
        assert_eq!(weight_v2(1024), 100);
        assert_eq!(weight_v2(15), 1);
    }

    /// A process spawned into a group is in it from its start, under the limits; the group is
    /// gone once the process is killed, and the machine's with a sweep.
    #[tokio::test]
    #[ignore = "needs root and the cpu and memory control groups (real tier)"]
    async fn a_process_runs_in_its_group_and_the_group_goes_with_it() {
        assert!(
            available(),
            "not root, or no cpu and memory control groups here"
        );
        let group = format!("test-{}", std::process::id());
        let limits = Limits::for_vm(1, 64, crate::process::MIGRATING_NICE);
        let g = Cgroup::create(&group, "vm", limits).unwrap();
        let shares = |g: &Cgroup| -> String {
            g.dirs()
                .iter()
                .find_map(|d| {
                    std::fs::read_to_string(d.join("cpu.shares"))
                        .or_else(|_| std::fs::read_to_string(d.join("cpu.weight")))
                        .ok()
                })
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let (low, normal) = match layout() {
            Some(Layout::V2(_)) => ("1", "100"),
            _ => ("110", "1024"),
        };
        assert_eq!(shares(&g), low, "a destination's weight");
        g.set_priority(1, 0).unwrap();
        assert_eq!(
            shares(&g),
            normal,
            "its guest runs: a serving guest's weight"
        );
        let dirs = g.dirs().to_vec();
        let log = std::env::temp_dir().join(format!("{group}.log"));
        let mut p = crate::process::QemuProcess::spawn_niced(
            "sleep",
            &["30".into()],
            &log,
            crate::process::Lifetime::Owner,
            0,
            &[],
            Some(g),
        )
        .unwrap();
        let _ = std::fs::remove_file(&log);
        let mine = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).unwrap();
        let want = format!("vmatrix/{group}.vm");
        assert!(mine.contains(&want), "{mine}");
        for d in &dirs {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert_eq!(procs.trim(), p.pid().to_string(), "{d:?}");
        }
        // Not removable while the process is in it.
        assert_eq!(sweep(&group, Duration::ZERO).left, dirs.len());
        p.kill().await;
        for d in &dirs {
            assert!(!d.exists(), "{d:?} outlived its process");
        }
        // A group its process left behind (an agent killed first) goes with a sweep.
        let left = Cgroup::create(&group, "left", limits).unwrap();
        assert_eq!(
            sweep(&group, Duration::ZERO),
            Swept {
                removed: left.dirs().len(),
                left: 0
            }
        );
        for d in left.dirs() {
            assert!(!d.exists(), "{d:?} stayed");
        }
    }

    #[test]
    fn a_name_with_a_slash_or_a_dot_is_refused() {
        for (g, n) in [
            ("a/b", "vm"),
            ("g", "../x"),
            ("g", ""),
            (".", "vm"),
            ("g", "a.b"),
        ] {
            assert!(
                Cgroup::create(g, n, Limits::for_vm(1, 256, 0)).is_err(),
                "{g} {n}"
            );
        }
    }
}
