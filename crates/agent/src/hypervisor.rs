//! The hypervisor behind a trait: the agent drives VMs only through [`Hypervisor`], [`Guest`]
//! and [`Incoming`], so that its logic runs the same over real QEMU ([`Qemu`]) and over the
//! in-process fake of its component tests ([`crate::fake::FakeHypervisor`]).
//!
//! Every method that can fail leaves the VM as it was: a failed [`Guest::save_state`] or
//! [`Guest::migrate_out`] lets the guest run on.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use vmatrix_vmm::{IncomingVm, MigrationTarget, OverlayCopy, SuspendedVm, Vm, VmSpec, VmmError};

/// Starts, resumes and adopts VMs on this machine.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// Boots `spec` in `dir` (a fresh overlay over its base).
    async fn boot(&self, spec: VmSpec, dir: &Path) -> Result<Box<dyn Guest>, VmmError>;
    /// Starts `spec` in `dir` from a saved state and its overlay; it runs when this returns.
    async fn resume(
        &self,
        spec: VmSpec,
        dir: &Path,
        files: &SuspendedVm,
    ) -> Result<Box<dyn Guest>, VmmError>;
    /// Starts a paused destination for an incoming live migration, listening on `listen`;
    /// with the spec's TLS credentials, only for machine `peer` (see
    /// [`vmatrix_vmm::MigrationTls`]).
    async fn incoming(
        &self,
        spec: VmSpec,
        dir: &Path,
        listen: IpAddr,
        peer: Option<&str>,
    ) -> Result<Box<dyn Incoming>, VmmError>;
    /// Takes over the VM a previous agent process left running in `dir` as process `pid`,
    /// and makes sure its guest runs (an interrupted suspend leaves it paused).
    async fn adopt(&self, spec: VmSpec, dir: &Path, pid: u32) -> Result<Box<dyn Guest>, VmmError>;
    /// Takes over a migration destination a previous agent process left: `Some` if the whole
    /// incoming state has arrived (the source has ended: this is the instance now, waiting to
    /// be finished); `None` — and the destination is killed — if it never completed.
    async fn adopt_incoming(
        &self,
        spec: VmSpec,
        dir: &Path,
        pid: u32,
    ) -> Result<Option<Box<dyn Incoming>>, VmmError>;
    /// The user id VMs run as once started, where it is not this process's (a confined QEMU):
    /// the machine's exports let it in.
    fn vm_uid(&self) -> Option<u32> {
        None
    }
    /// Removes the control groups of VMs that ended without this process seeing it (older
    /// than `older_than`; all empty ones, and the machine's own, when it is zero). Returns how
    /// many are left.
    fn sweep_groups(&self, _older_than: Duration) -> usize {
        0
    }
    /// Whether process `pid` is alive.
    fn alive(&self, pid: u32) -> bool;
    /// CPU seconds process `pid` has used.
    fn cpu_seconds(&self, pid: u32) -> f64;
    /// Resident memory of process `pid`, bytes (0: unknown).
    fn memory_bytes(&self, _pid: u32) -> u64 {
        0
    }
}

/// A running VM.
#[async_trait]
pub trait Guest: Send {
    /// Its process id.
    fn pid(&self) -> u32;
    /// Its shared serial console, if it has one.
    fn console(&self) -> Option<vmatrix_vmm::Console>;
    /// Saves memory and device state to `file` and leaves the guest paused, or — on failure or
    /// after `limit` — running as before, with the error.
    async fn save_state(&mut self, file: &Path, limit: Duration) -> Result<SuspendedVm, VmmError>;
    /// Lets a paused guest run again.
    async fn cont(&mut self) -> Result<(), VmmError>;
    /// Stops its vCPUs (it keeps its memory).
    async fn pause(&mut self) -> Result<(), VmmError>;
    /// Writes its whole disk as the guest sees it at one instant to `to` and says in which
    /// format (`qcow2`: an overlay over its base, read through it; `raw`), with how long the
    /// guest was stopped for it. The guest runs on.
    async fn copy_disk(&mut self, to: &Path) -> Result<(&'static str, OverlayCopy), VmmError>;
    /// Ends the VM after its state was saved.
    async fn end(self: Box<Self>);
    /// Kills the VM at once.
    async fn kill(self: Box<Self>);
    /// Ends a VM that is thrown away while it runs well: a clean shutdown by its guest agent
    /// where it has one (within `grace`), else killed. True when it shut down cleanly.
    async fn discard(self: Box<Self>, grace: Duration) -> bool {
        let _ = grace;
        self.kill().await;
        false
    }
    /// Live-migrates to `target` and ends this VM; on failure the guest runs on here and
    /// comes back with the error.
    async fn migrate_out(
        self: Box<Self>,
        target: &MigrationTarget,
        limit: Duration,
    ) -> Result<(u64, u64), (Box<dyn Guest>, VmmError)>;
}

/// A destination waiting for an incoming migration.
#[async_trait]
pub trait Incoming: Send {
    /// Its process id.
    fn pid(&self) -> u32;
    /// Where the source sends the VM.
    fn target(&self) -> MigrationTarget;
    /// After the source reported success: lets the guest run here.
    async fn finish(self: Box<Self>, limit: Duration) -> Result<Box<dyn Guest>, VmmError>;
    /// Gives up: kills the destination.
    async fn abort(self: Box<Self>);
}

/// The real hypervisor: QEMU through the vmm crate, each VM under QEMU's sandbox and, where
/// the agent is root, as an unprivileged user (see `vmatrix_vmm::confine`).
#[derive(Debug, Default)]
pub struct Qemu {
    /// The user QEMU becomes once it has opened its files, with its uid.
    run_as: Option<(String, u32)>,
    /// The control group (`vmatrix/GROUP/VM`) each QEMU runs in, limited to its spec.
    cgroup: Option<String>,
}

impl Qemu {
    /// QEMU stays this process's user (an agent that is not root cannot change it anyway).
    pub fn unconfined() -> Self {
        Self::default()
    }

    /// Every QEMU becomes `user` once it has opened its files; the user must exist.
    pub fn confined(user: &str) -> Result<Self, VmmError> {
        let uid = vmatrix_vmm::confine::user_uid(user).ok_or_else(|| {
            VmmError::Invalid(format!(
                "user {user:?}, which QEMU runs as, does not exist: create it (scripts/install-deps.sh \
                 does: useradd --system --no-create-home --shell /usr/sbin/nologin {user}) or \
                 name another with --qemu-user"
            ))
        })?;
        if uid == 0 {
            return Err(VmmError::Invalid(format!(
                "user {user:?} is root: QEMU must run as an unprivileged user (--qemu-user)"
            )));
        }
        Ok(Self {
            run_as: Some((user.to_owned(), uid)),
            cgroup: None,
        })
    }

    /// Every QEMU also runs in a control group of its own under `vmatrix/GROUP`, limited to its
    /// vCPUs and memory (see `vmatrix_vmm::cgroup`); the host must mount the controllers.
    pub fn in_cgroups(self, group: &str) -> Result<Self, VmmError> {
        if !vmatrix_vmm::cgroup::available() {
            return Err(VmmError::Invalid(
                "QEMU's CPU and memory cannot be limited here: the agent is not root or the host \
                 mounts no cpu and memory control groups (pass --no-cgroups to run unlimited)"
                    .into(),
            ));
        }
        Ok(Self {
            cgroup: Some(group.to_owned()),
            ..self
        })
    }

    fn confine(&self, mut spec: VmSpec) -> VmSpec {
        spec.run_as = self.run_as.as_ref().map(|(user, _)| user.clone());
        spec.cgroup = self.cgroup.clone();
        spec
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn boot(&self, spec: VmSpec, dir: &Path) -> Result<Box<dyn Guest>, VmmError> {
        Ok(Box::new(Vm::boot(self.confine(spec), dir).await?))
    }

    async fn resume(
        &self,
        spec: VmSpec,
        dir: &Path,
        files: &SuspendedVm,
    ) -> Result<Box<dyn Guest>, VmmError> {
        // The overlay still names the old machine's export as its backing file: point it at
        // this machine's export of the same version (same bytes, so no data changes).
        if let vmatrix_vmm::BaseImage::Nbd { url } = &spec.base {
            let args: Vec<String> = ["rebase", "-u", "-F", "raw", "-b", url, "-f", "qcow2"]
                .iter()
                .map(|s| s.to_string())
                .chain([files.disk.display().to_string()])
                .collect();
            vmatrix_vmm::vm::run_tool("qemu-img", &args).await?;
        }
        Ok(Box::new(
            Vm::resume(self.confine(spec), dir, files).await?.0,
        ))
    }

    async fn incoming(
        &self,
        spec: VmSpec,
        dir: &Path,
        listen: IpAddr,
        peer: Option<&str>,
    ) -> Result<Box<dyn Incoming>, VmmError> {
        Ok(Box::new(
            IncomingVm::start(self.confine(spec), dir, listen, peer).await?,
        ))
    }

    async fn adopt(&self, spec: VmSpec, dir: &Path, pid: u32) -> Result<Box<dyn Guest>, VmmError> {
        if vmatrix_vmm::process::stopped(pid) {
            // Fenced while no agent ran: the controller replaces it (or has); it never runs again.
            return Err(VmmError::Invalid(format!(
                "QEMU {pid} of {} was stopped when the machine's lease lapsed (fenced)",
                spec.instance
            )));
        }
        let mut vm = Vm::adopt(self.confine(spec), dir, pid).await?;
        vm.ensure_running().await?;
        Ok(Box::new(vm))
    }

    async fn adopt_incoming(
        &self,
        spec: VmSpec,
        dir: &Path,
        pid: u32,
    ) -> Result<Option<Box<dyn Incoming>>, VmmError> {
        let vm = Vm::adopt(self.confine(spec), dir, pid).await?;
        Ok(IncomingVm::adopt(vm)
            .await
            .map(|i| Box::new(i) as Box<dyn Incoming>))
    }

    fn vm_uid(&self) -> Option<u32> {
        self.run_as.as_ref().map(|(_, uid)| *uid)
    }

    fn sweep_groups(&self, older_than: Duration) -> usize {
        let Some(group) = &self.cgroup else {
            return 0;
        };
        let swept = vmatrix_vmm::cgroup::sweep(group, older_than);
        if swept.removed > 0 {
            tracing::info!(
                "removed {} control group(s) of VMs that had ended",
                swept.removed
            );
        }
        swept.left
    }

    fn alive(&self, pid: u32) -> bool {
        vmatrix_vmm::process::alive(pid)
    }

    fn cpu_seconds(&self, pid: u32) -> f64 {
        cpu_seconds(pid)
    }

    fn memory_bytes(&self, pid: u32) -> u64 {
        memory_bytes(pid)
    }
}

#[async_trait]
impl Guest for Vm {
    fn pid(&self) -> u32 {
        Vm::pid(self)
    }
    fn console(&self) -> Option<vmatrix_vmm::Console> {
        Some(Vm::console(self))
    }
    async fn save_state(&mut self, file: &Path, limit: Duration) -> Result<SuspendedVm, VmmError> {
        Vm::save_state(self, file, limit).await
    }
    async fn cont(&mut self) -> Result<(), VmmError> {
        Vm::cont(self).await
    }
    async fn pause(&mut self) -> Result<(), VmmError> {
        Vm::pause(self).await
    }
    async fn copy_disk(&mut self, to: &Path) -> Result<(&'static str, OverlayCopy), VmmError> {
        Ok(("qcow2", Vm::copy_overlay(self, to).await?))
    }
    async fn end(self: Box<Self>) {
        Vm::end(*self).await
    }
    async fn kill(self: Box<Self>) {
        Vm::kill(*self).await
    }
    async fn discard(self: Box<Self>, grace: Duration) -> bool {
        Vm::discard(*self, grace).await
    }
    async fn migrate_out(
        self: Box<Self>,
        target: &MigrationTarget,
        limit: Duration,
    ) -> Result<(u64, u64), (Box<dyn Guest>, VmmError)> {
        match Vm::migrate_out_within(*self, target, limit).await {
            Ok(r) => Ok((r.total_ms, r.downtime_ms)),
            Err(f) => Err((f.source as Box<dyn Guest>, f.error)),
        }
    }
}

#[async_trait]
impl Incoming for IncomingVm {
    fn pid(&self) -> u32 {
        IncomingVm::pid(self)
    }
    fn target(&self) -> MigrationTarget {
        IncomingVm::target(self).clone()
    }
    async fn finish(self: Box<Self>, limit: Duration) -> Result<Box<dyn Guest>, VmmError> {
        Ok(Box::new(IncomingVm::finish(*self, limit).await?))
    }
    async fn abort(self: Box<Self>) {
        IncomingVm::abort(*self).await
    }
}

/// Resident memory of a process, bytes (`/proc/PID/statm`'s second field, in pages); 0 when
/// it cannot be read.
pub fn memory_bytes(pid: u32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}
