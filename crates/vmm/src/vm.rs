//! One server VM = one QEMU process, with its own directory:
//!
//! ```text
//! DIR/disk.qcow2   the instance's overlay; its backing (the base image) is never written
//! DIR/qmp.sock     the QMP socket
//! DIR/console.sock the guest's serial console (QEMU serves it; see [`crate::console`])
//! DIR/serial.log   everything the guest printed on it
//! DIR/qemu.log     QEMU's own output
//! ```
//!
//! Suspend writes the complete device and memory state to a file through QEMU's migration
//! stream (into a descriptor of the file passed over QMP: `fd:`) and exits; resume starts a new QEMU with `-incoming defer -S`,
//! feeds it the file and continues. Together with the overlay, the two files are the whole
//! instance, so it can resume in another directory, as another machine would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use vmatrix_core::hardware::Firmware;
use vmatrix_core::{Hardware, InstanceId};

use crate::accel::Accelerator;
use crate::args::{qemu_args, qmp_arg};
use crate::console::Console;
use crate::error::{io_err, Result, VmmError};
use crate::http;
use crate::process::{tail, Lifetime, QemuProcess};
use crate::qmp::commands::*;
use crate::qmp::Qmp;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The guest's disk as QEMU knows it (node name), also the NBD export name in migrations.
pub(crate) const DISK_NODE: &str = "disk0";
/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The format of a base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Raw bytes.
    Raw,
    /// qcow2.
    Qcow2,
}

impl ImageFormat {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// The read-only disk an instance's overlay sits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseImage {
    /// A local file.
    File {
        /// The image file.
        path: PathBuf,
        /// Its format.
        format: ImageFormat,
    },
    /// A raw export served over NBD, e.g. the repository's lazy export
    /// (`nbd+unix:///NAME?socket=PATH`).
    Nbd {
        /// The NBD URL.
        url: String,
    },
}

impl From<PathBuf> for BaseImage {
    fn from(path: PathBuf) -> Self {
        Self::File {
            path,
            format: ImageFormat::Raw,
        }
    }
}

impl From<&PathBuf> for BaseImage {
    fn from(path: &PathBuf) -> Self {
        path.clone().into()
    }
}

impl From<&Path> for BaseImage {
    fn from(path: &Path) -> Self {
        path.to_owned().into()
    }
}

/// Everything that defines a VM's hardware and its place on a machine.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The instance id, passed to the guest as SMBIOS serial.
    pub instance: InstanceId,
    /// The base disk image; never written.
    pub base: BaseImage,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Where this host reaches the guest's service: with user networking the host address
    /// and port forwarded to it, with a TAP the instance's own address and service port.
    pub forward: SocketAddr,
    /// Bridged networking: the guest's NIC is a TAP on this host's service bridge and the
    /// guest has an address of its own (`None`: QEMU's user-mode NAT with one forwarded port).
    pub tap: Option<TapSpec>,
    /// The guest's service port.
    pub guest_port: u16,
    /// The accelerator.
    pub accel: Accelerator,
    /// Whether QEMU dies with this process or lives until killed (an agent's VMs).
    pub lifetime: Lifetime,
    /// The virtual hardware (machine, firmware, disk bus, NIC, CPU model).
    pub hardware: Hardware,
    /// A read-only raw disk attached after the system disk: the instance's cloud-init seed
    /// (made by its owner, with the same bytes at both ends of a move).
    pub seed: Option<PathBuf>,
    /// Persistent volumes, attached after the seed.
    pub volumes: Vec<crate::volume::VolumeDisk>,
    /// The unprivileged user QEMU becomes once it has opened its files (`-runas`; see
    /// [`crate::confine`]); `None`: it stays this process's user.
    pub run_as: Option<String>,
    /// The control group QEMU runs in is `vmatrix/GROUP/<the VM directory's name>`, limited to
    /// the spec's vCPUs and memory ([`crate::cgroup`]); `None`: the caller's group.
    pub cgroup: Option<String>,
    /// The machine's certificate, for the live-migration data path (see
    /// [`crate::migration::MigrationTls`]); `None`: migrations travel in the clear.
    pub tls: Option<crate::migration::MigrationTls>,
}

impl VmSpec {
    /// A spec with the reference guest's defaults: 256 MiB, 1 vCPU, guest port 80.
    pub fn new(
        instance: InstanceId,
        base: impl Into<BaseImage>,
        forward: SocketAddr,
        accel: Accelerator,
    ) -> Self {
        Self {
            instance,
            base: base.into(),
            memory_mib: 256,
            vcpus: 1,
            forward,
            guest_port: 80,
            tap: None,
            accel,
            lifetime: Lifetime::Owner,
            hardware: Hardware::default(),
            seed: None,
            volumes: Vec::new(),
            run_as: None,
            cgroup: None,
            tls: None,
        }
    }

    /// The same VM on another host address and port (a migration or resume destination).
    pub fn with_forward(&self, forward: SocketAddr) -> Self {
        Self {
            forward,
            ..self.clone()
        }
    }
}

/// A guest NIC on a TAP device attached to this host's service bridge.
///
/// The TAP (named `ifname`) is created before QEMU starts and attached to the bridge by running
/// `script` with its name; QEMU inherits its descriptor (it may not run programs itself: see
/// [`crate::confine`]). The TAP disappears with the QEMU process, so nothing is left behind
/// however QEMU ends. The guest learns its address from SMBIOS OEM strings (type 11):
/// `vmatrix.net.address=A/PREFIX` and `vmatrix.net.gateway=G`. Only the device (virtio-net,
/// its MAC) is guest-visible hardware: both ends of a move may use different TAP names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    /// The TAP device's name on this host (at most 15 bytes).
    pub ifname: String,
    /// The executable run with the TAP's name to attach it (`ip link set … master`).
    pub script: PathBuf,
    /// The instance's address on the service network.
    pub address: std::net::Ipv4Addr,
    /// The service network's prefix length.
    pub prefix: u8,
    /// Its gateway (the same address on every host).
    pub gateway: std::net::Ipv4Addr,
}

/// The files of one VM directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The name of its QEMU's control group: the directory's own name.
    pub fn cgroup_name(&self) -> String {
        self.root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".into())
    }
    /// The instance's qcow2 overlay.
    pub fn disk(&self) -> PathBuf {
        self.root.join("disk.qcow2")
    }
    /// The QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.root.join("qmp.sock")
    }
    /// The serial console's socket.
    pub fn console(&self) -> PathBuf {
        self.root.join("console.sock")
    }
    /// The guest console log.
    pub fn serial(&self) -> PathBuf {
        self.root.join("serial.log")
    }
    /// QEMU's own output.
    pub fn qemu_log(&self) -> PathBuf {
        self.root.join("qemu.log")
    }
    /// The guest agent's socket (qemu-guest-agent's channel).
    pub fn guest_agent(&self) -> PathBuf {
        self.root.join("qga.sock")
    }
    /// The UEFI variable store (a copy of OVMF's empty one; UEFI VMs only).
    pub fn efivars(&self) -> PathBuf {
        self.root.join("efivars.fd")
    }
}

/// How QEMU should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartMode {
    /// Boot the guest.
    Boot,
    /// Wait paused for an incoming migration stream.
    Incoming,
}

/// A running (or paused) VM.
#[derive(Debug)]
pub struct Vm {
    pub(crate) spec: VmSpec,
    pub(crate) dir: VmDir,
    pub(crate) process: QemuProcess,
    pub(crate) qmp: Qmp,
    pub(crate) console: Console,
}

/// The files a suspended instance consists of.
#[derive(Debug, Clone)]
pub struct SuspendedVm {
    /// The saved device and memory state.
    pub state_file: PathBuf,
    /// The instance's disk overlay.
    pub disk: PathBuf,
    /// Size of the state file.
    pub state_bytes: u64,
    /// Time from the suspend request until QEMU exited.
    pub elapsed: Duration,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest shut down after the power button.
    Graceful,
    /// The guest ignored it and QEMU was made to quit.
    Forced,
}

impl Vm {
    /// Creates the overlay over the base image and boots the VM. Returns once QEMU answers on
    /// QMP; use [`Vm::wait_ready`] to wait for the guest's service.
    pub async fn boot(spec: VmSpec, dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = VmDir::new(dir);
        prepare_dir(&dir)?;
        create_overlay(&spec, &dir.disk()).await?;
        crate::volume::create_volumes(&spec, &dir).await?;
        Self::start(spec, dir, StartMode::Boot, 0).await
    }

    /// Starts QEMU in `dir` at nice value `nice` (0 but for a migration's destination).
    pub(crate) async fn start(
        spec: VmSpec,
        dir: VmDir,
        mode: StartMode,
        nice: i32,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(dir.qmp());
        let _ = std::fs::remove_file(dir.console());
        let _ = std::fs::remove_file(dir.guest_agent());
        if spec.hardware.firmware == Firmware::Uefi && !dir.efivars().exists() {
            // A fresh variable store; an incoming guest brings its variables in the stream.
            let from = std::path::Path::new(crate::args::OVMF_VARS);
            std::fs::copy(from, dir.efivars()).map_err(|e| {
                VmmError::Invalid(format!(
                    "firmware = \"uefi\" needs OVMF's variable store {}: {e}; install Debian's \
                     ovmf (scripts/install-deps.sh)",
                    from.display()
                ))
            })?;
        }
        // The TAP, created and on the bridge before QEMU starts; our descriptor closes when this
        // returns, QEMU's copy keeps it.
        let tap = match &spec.tap {
            Some(t) => Some(crate::confine::open_tap(&t.ifname, &t.script).await?),
            None => None,
        };
        let tap_fd = tap.as_ref().map(crate::confine::fd_number);
        let args = qemu_args(&spec, &dir, mode, tap_fd)?;
        let cgroup = match &spec.cgroup {
            Some(group) => Some(crate::cgroup::Cgroup::create(
                group,
                &dir.cgroup_name(),
                crate::cgroup::Limits::for_vm(spec.vcpus, spec.memory_mib, nice),
            )?),
            None => None,
        };
        tracing::debug!(instance = %spec.instance, ?args, "starting QEMU");
        let process = QemuProcess::spawn_niced(
            QEMU,
            &args,
            &dir.qemu_log(),
            spec.lifetime,
            nice,
            tap_fd.as_slice(),
            cgroup,
        )?;
        drop(tap);
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = match Qmp::connect(&dir.qmp(), deadline).await {
            Ok(q) => q,
            Err(e) => {
                let mut process = process;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let exited = process.exit_status();
                // Whatever its lifetime, a QEMU that failed to start never stays behind.
                process.kill().await;
                if let Some(status) = exited {
                    return Err(VmmError::Exited {
                        instance: spec.instance.clone(),
                        status,
                        serial_tail: tail(&dir.serial(), 20),
                        qemu_tail: tail(&dir.qemu_log(), 20),
                    });
                }
                return Err(e);
            }
        };
        let console = Console::open(&dir.console(), &dir.serial());
        Ok(Self {
            spec,
            dir,
            process,
            qmp,
            console,
        })
    }

    /// Takes over the QEMU with process id `pid` that an earlier owner started in `dir` with
    /// `spec` (its [`Lifetime::Machine`]): checks that the process is that VM's and connects
    /// to its QMP socket again.
    pub async fn adopt(spec: VmSpec, dir: impl Into<PathBuf>, pid: u32) -> Result<Self> {
        let dir = VmDir::new(dir);
        let marker = qmp_arg(&dir);
        let mut process = QemuProcess::adopt(pid, &marker, &dir.qemu_log()).ok_or_else(|| {
            VmmError::Invalid(format!(
                "process {pid} is not the QEMU of {} (gone, or another process)",
                dir.root().display()
            ))
        })?;
        process.set_cgroup(
            spec.cgroup
                .as_deref()
                .and_then(|g| crate::cgroup::Cgroup::existing(g, &dir.cgroup_name())),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let qmp = Qmp::connect(&dir.qmp(), deadline).await?;
        let console = Console::open(&dir.console(), &dir.serial());
        Ok(Self {
            spec,
            dir,
            process,
            qmp,
            console,
        })
    }

    /// The VM's shared serial console.
    pub fn console(&self) -> Console {
        self.console.clone()
    }

    /// The VM's spec.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }
    /// The VM's directory layout.
    pub fn dir(&self) -> &VmDir {
        &self.dir
    }
    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
    /// Gives every thread of QEMU, and its control group, a serving guest's priority (a
    /// migration's destination ran at [`crate::process::MIGRATING_NICE`] until its guest ran).
    pub(crate) fn serve_at_full_priority(&self) {
        crate::process::set_nice(self.pid(), 0, crate::process::Threads::All);
        if let Some(g) = self.process.cgroup() {
            if let Err(e) = g.set_priority(self.spec.vcpus, 0) {
                tracing::warn!(instance = %self.spec.instance, "{e}");
            }
        }
    }
    /// Where the guest's service answers on the host.
    pub fn url(&self) -> String {
        format!("http://{}/", self.spec.forward)
    }

    /// `Some(status)` once the QEMU process has exited.
    pub fn exit_status(&mut self) -> Option<String> {
        self.process.exit_status()
    }

    /// Direct access to QMP, for operations this driver does not wrap yet.
    pub fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// An error describing the QEMU process's exit, if it has exited.
    pub(crate) fn exited(&mut self) -> Option<VmmError> {
        let status = self.process.exit_status()?;
        Some(VmmError::Exited {
            instance: self.spec.instance.clone(),
            status,
            serial_tail: tail(&self.dir.serial(), 20),
            qemu_tail: tail(&self.dir.qemu_log(), 20),
        })
    }

    pub(crate) fn timeout(&self, what: &'static str, waited: Duration) -> VmmError {
        VmmError::Timeout {
            instance: self.spec.instance.clone(),
            what,
            seconds: waited.as_secs_f64(),
            serial_tail: tail(&self.dir.serial(), 20),
        }
    }

    /// Polls the guest's `/health` until it answers 200 or `timeout` passes. Returns the
    /// time waited.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            if let Some(e) = self.exited() {
                return Err(e);
            }
            let probe = http::request(
                self.spec.forward,
                "GET",
                "/health",
                &[],
                Duration::from_secs(2),
            )
            .await;
            if matches!(probe, Ok(ref r) if r.status == 200) {
                return Ok(started.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("the guest answering GET /health", timeout));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The run state as QEMU reports it.
    pub async fn status(&mut self) -> Result<StatusInfo> {
        self.qmp.execute(&QueryStatus {}).await
    }

    /// Pauses the vCPUs.
    pub async fn pause(&mut self) -> Result<()> {
        self.qmp.execute(&Stop {}).await.map(drop)
    }

    /// Continues paused vCPUs.
    pub async fn cont(&mut self) -> Result<()> {
        self.qmp.execute(&Cont {}).await.map(drop)
    }

    /// Stops the VM: asks its guest agent, or presses the power button, and waits up to `grace`
    /// for the guest to shut down, then makes QEMU quit (and kills it if even that hangs).
    pub async fn stop(mut self, grace: Duration) -> Result<StopOutcome> {
        // The guest agent where there is one (it needs no ACPI support), else the button.
        let asked = matches!(self.agent_shutdown().await, Ok(true))
            || self.qmp.execute(&SystemPowerdown {}).await.is_ok();
        if asked && self.process.wait_exit(Instant::now() + grace).await {
            return Ok(StopOutcome::Graceful);
        }
        self.quit().await;
        Ok(StopOutcome::Forced)
    }

    /// Discards the VM at once: QEMU is killed, the overlay is left for the caller to delete.
    pub async fn kill(mut self) {
        self.process.kill().await;
    }

    /// Asks QEMU to quit, then kills it if it has not exited within two seconds.
    pub(crate) async fn quit(&mut self) {
        let _ = self.qmp.execute(&Quit {}).await;
        if !self
            .process
            .wait_exit(Instant::now() + Duration::from_secs(2))
            .await
        {
            self.process.kill().await;
        }
    }

    /// Saves the complete memory and device state to `state_file` and stops QEMU. The result
    /// names the files from which [`Vm::resume`] brings the instance back.
    pub async fn suspend(mut self, state_file: &Path, limit: Duration) -> Result<SuspendedVm> {
        let saved = self.save_state(state_file, limit).await;
        if saved.is_ok() {
            self.quit().await;
        }
        saved
    }

    /// Saves the complete memory and device state to `state_file` and leaves the VM paused
    /// with its files complete, so the caller can make them durable before it ends QEMU
    /// ([`Vm::end`]) — or, if that fails, let the guest run on ([`Vm::cont`]). If the save
    /// itself fails or takes longer than `limit`, the guest runs again as it was before the
    /// call and the error is returned.
    pub async fn save_state(&mut self, state_file: &Path, limit: Duration) -> Result<SuspendedVm> {
        let started = Instant::now();
        let result = self.save_steps(state_file, limit).await;
        if result.is_err() {
            let _ = self.qmp.execute(&MigrateCancel {}).await;
            let _ = self
                .wait_migration_status("cancel", Duration::from_secs(10), &["cancelled", "failed"])
                .await;
            if let Ok(s) = self.status().await {
                if !s.running {
                    let _ = self.cont().await;
                }
            }
            let _ = std::fs::remove_file(state_file);
        }
        result?;
        let state_bytes = std::fs::metadata(state_file)
            .map_err(io_err("read the size of", state_file))?
            .len();
        Ok(SuspendedVm {
            state_file: state_file.to_owned(),
            disk: self.dir.disk(),
            state_bytes,
            elapsed: started.elapsed(),
        })
    }

    async fn save_steps(&mut self, state_file: &Path, limit: Duration) -> Result<()> {
        if let Some(parent) = state_file.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        self.pause().await?;
        // A saved state has no switch-over to pause before (a live move may have asked for it).
        self.no_pause_before_switchover().await;
        self.qmp
            .execute(&MigrateSetParameters {
                max_bandwidth: Some(UNTHROTTLED),
                // A file needs no TLS (a live move may have set it).
                tls_creds: Some(String::new()),
                ..Default::default()
            })
            .await?;
        // QEMU writes the stream into a file we open and hand it (it can neither run a helper
        // nor, once it is its own user, open our files).
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(state_file)
                .map_err(io_err("create", state_file))?
        };
        self.qmp
            .pass_fd(STATE_FD, std::os::fd::AsFd::as_fd(&file))
            .await?;
        let started = self
            .qmp
            .execute(&Migrate {
                uri: format!("fd:{STATE_FD}"),
            })
            .await;
        if let Err(e) = started {
            let _ = self
                .qmp
                .execute(&CloseFd {
                    fdname: STATE_FD.into(),
                })
                .await;
            return Err(e);
        }
        self.wait_migration("suspend", limit).await.map(drop)
    }

    /// Makes sure the guest runs: an adopted VM whose suspend was interrupted (its owner died
    /// mid-save) is paused; the save is cancelled and the guest continues. Refuses a VM that
    /// still waits for an incoming migration.
    pub async fn ensure_running(&mut self) -> Result<()> {
        let status = self.status().await?;
        if status.status == "inmigrate" {
            return Err(VmmError::Invalid(format!(
                "instance {} still waits for an incoming migration",
                self.spec.instance
            )));
        }
        // Whether or not the guest still runs, an outgoing migration whose driver died leaves
        // its jobs and settings behind.
        self.clear_outgoing_migration().await;
        if self.status().await?.running {
            return Ok(());
        }
        self.cont().await
    }

    /// Ends QEMU (after its state was saved and made durable elsewhere).
    pub async fn end(mut self) {
        self.quit().await;
    }

    /// Ends a VM that is thrown away: shut down cleanly by its guest agent where it has one
    /// (its file systems unmounted, its volumes consistent) within `grace`, else — no agent, or
    /// no end in time — killed at once, as a guest without an agent always is. True when it
    /// shut down cleanly.
    pub async fn discard(mut self, grace: Duration) -> bool {
        // A stopped QEMU (fenced) answers nothing: it is killed at once.
        if !crate::process::stopped(self.process.pid())
            && matches!(self.agent_shutdown().await, Ok(true))
            && self.process.wait_exit(Instant::now() + grace).await
        {
            return true;
        }
        self.process.kill().await;
        false
    }

    /// Polls `query-migrate` until it completes; errors if it fails or takes longer than
    /// `limit`.
    pub(crate) async fn wait_migration(
        &mut self,
        operation: &'static str,
        limit: Duration,
    ) -> Result<MigrationInfo> {
        self.wait_migration_status(operation, limit, &["completed"])
            .await
    }

    pub(crate) async fn wait_migration_status(
        &mut self,
        operation: &'static str,
        limit: Duration,
        wanted: &[&str],
    ) -> Result<MigrationInfo> {
        let deadline = Instant::now() + limit;
        loop {
            let info = self.qmp.execute(&QueryMigrate {}).await?;
            match info.status.as_deref() {
                Some(s) if wanted.contains(&s) => return Ok(info),
                Some("failed") | Some("cancelled") => {
                    return Err(VmmError::Migration {
                        instance: self.spec.instance.clone(),
                        operation,
                        detail: info.error_desc.unwrap_or_else(|| {
                            let log = tail(&self.dir.qemu_log(), 5);
                            if log.trim().is_empty() {
                                "no reason given".to_owned()
                            } else {
                                format!("no reason given; QEMU's log ends: {}", log.trim())
                            }
                        }),
                    })
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(operation, limit));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a new QEMU in `dir` from a suspended instance: its disk overlay is copied into
    /// `dir` (unless it is already there) and its state loaded; the VM runs when this returns.
    pub async fn resume(
        spec: VmSpec,
        dir: impl Into<PathBuf>,
        suspended: &SuspendedVm,
    ) -> Result<(Self, Duration)> {
        let started = Instant::now();
        let dir = VmDir::new(dir);
        prepare_dir(&dir)?;
        if suspended.disk != dir.disk() {
            std::fs::copy(&suspended.disk, dir.disk()).map_err(io_err("copy", &suspended.disk))?;
        }
        // The volumes as they were stored when it was suspended.
        crate::volume::create_volumes(&spec, &dir).await?;
        let mut vm = Self::start(spec, dir, StartMode::Incoming, 0).await?;
        let loaded = async {
            let file = std::fs::File::open(&suspended.state_file)
                .map_err(io_err("open", &suspended.state_file))?;
            vm.qmp
                .pass_fd(STATE_FD, std::os::fd::AsFd::as_fd(&file))
                .await?;
            vm.qmp
                .execute(&MigrateIncoming {
                    uri: format!("fd:{STATE_FD}"),
                })
                .await?;
            vm.wait_incoming(Duration::from_secs(120)).await?;
            vm.cont().await
        }
        .await;
        match loaded {
            Ok(()) => Ok((vm, started.elapsed())),
            Err(e) => {
                // A QEMU that did not resume never stays behind (whatever its lifetime).
                vm.kill().await;
                Err(e)
            }
        }
    }

    /// Waits until an incoming migration stream has been loaded (the VM is then paused).
    pub(crate) async fn wait_incoming(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(e) = self.exited() {
                return Err(e);
            }
            // QEMU exits if the incoming stream is bad; a closed socket means it is going.
            match self.qmp.execute(&QueryStatus {}).await {
                Ok(s) if s.status != "inmigrate" => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return Err(self.exited().unwrap_or(e));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout("loading the incoming state", limit));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The name under which a state file's descriptor is passed to QEMU.
const STATE_FD: &str = "vmx-state";

/// Migration bandwidth when we do not want QEMU's default throttle (bytes/s).
pub(crate) const UNTHROTTLED: u64 = 100 * 1024 * 1024 * 1024;

pub(crate) fn prepare_dir(dir: &VmDir) -> Result<()> {
    std::fs::create_dir_all(dir.root()).map_err(io_err("create directory", dir.root()))?;
    let sock = dir.qmp();
    if sock.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmmError::Invalid(format!(
            "VM directory {} is too deep: its QMP socket path would exceed {MAX_SOCKET_PATH} bytes; use a shorter data directory",
            dir.root().display()
        )));
    }
    Ok(())
}

/// Creates `overlay` as a fresh qcow2 over the spec's base image.
pub(crate) async fn create_overlay(spec: &VmSpec, overlay: &Path) -> Result<()> {
    let (format, backing) = match &spec.base {
        BaseImage::File { path, format } => (
            format.as_str(),
            std::fs::canonicalize(path)
                .map_err(io_err("open", path))?
                .display()
                .to_string(),
        ),
        BaseImage::Nbd { url } => ("raw", url.clone()),
    };
    let _ = std::fs::remove_file(overlay);
    let args = vec![
        "create".to_owned(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        format.into(),
        "-b".into(),
        backing,
        overlay.display().to_string(),
    ];
    run_tool("qemu-img", &args).await
}

/// Runs a tool (`qemu-img`, …) to its end; its stderr is the error if it fails.
pub async fn run_tool(program: &str, args: &[String]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|source| VmmError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmmError::Tool {
            program: program.to_owned(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// A stable MAC per instance, so the guest sees the same NIC after every move.
pub fn mac_for(instance: &InstanceId) -> String {
    let h = instance
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_and_local() {
        let id = InstanceId::new("web-1").unwrap();
        assert_eq!(mac_for(&id), mac_for(&id));
        assert!(mac_for(&id).starts_with("52:54:00:"));
        assert_ne!(mac_for(&id), mac_for(&InstanceId::new("web-2").unwrap()));
    }
}
