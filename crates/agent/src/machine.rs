//! The agent's state — its instance table (slots), the tasks of the commands it runs, and its
//! errors — and the snapshot its heartbeats send. The commands themselves are in `commands.rs`,
//! the exports in `exports.rs`.
//!
//! Concurrency rules (why the agent never stalls):
//! - the instance table (`slots`) is a plain mutex held only for quick reads and writes, never
//!   across an await; an operation *takes* the VM out of its slot (the slot says it is busy),
//!   works on it without any lock, and puts it back;
//! - every command runs as a task keyed by (instance, generation, command) that outlives the
//!   HTTP request carrying it: a controller that hangs up changes nothing, and the same command
//!   sent again joins the task or gets its result;
//! - heartbeats read a snapshot of the table, so they keep their period whatever is in flight.
//!
//! ```text
//! controller            agent (source)                 agent (destination)
//!     │ PrepareIncoming ───────────────────────────────▶ paused QEMU, NBD + listener
//!     │ MigrateOut ──────▶ mirror disk, send RAM ──────▶ (state arrives)
//!     │                    QEMU ends; on failure the guest runs on here
//!     │ FinishIncoming ────────────────────────────────▶ continue: Running
//! ```

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use vmatrix_core::api::{
    AgentCommand, AgentInstance, AgentReply, AgentReport, InstancePlan, MachineRole, SavedState,
};
use vmatrix_core::{InstanceId, InstanceState, Transition};
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::NbdServer;
use vmatrix_store::Repository;
use vmatrix_vmm::{Accelerator, BaseImage, Lifetime, VmSpec};

/// The cloud-init seed disk in a VM directory.
pub(crate) const SEED_FILE: &str = "seed.img";

use crate::hypervisor::{Guest, Hypervisor, Incoming};
use crate::record::{Phase, VmRecord};

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Machine name (`rm1`).
    pub name: String,
    /// Where the agent's API listens; its IP is also where guests are forwarded.
    pub listen: SocketAddr,
    /// Dedicated or shared.
    pub role: MachineRole,
    /// vCPUs offered.
    pub vcpus: u32,
    /// Memory offered, MiB.
    pub memory_mib: u32,
    /// This machine's data directory (VM directories, chunk cache, NBD sockets).
    pub data: PathBuf,
    /// The repository URL.
    pub repo: String,
    /// The accelerator for every VM.
    pub accel: Accelerator,
    /// Chunk cache bound, bytes.
    pub cache_bytes: u64,
    /// Bridged networking: this host's attachment to the service network (`None`: every VM
    /// gets QEMU's user-mode NAT with one forwarded port).
    pub net: Option<vmatrix_net::HostNetConfig>,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The command's generation is older than one already seen.
    #[error("instance {id}: generation {got} is stale (this machine has seen {seen}); refusing")]
    Stale { id: InstanceId, got: u64, seen: u64 },
    /// The instance is not here.
    #[error("instance {0} is not on this machine")]
    Unknown(InstanceId),
    /// The instance is not in a state that allows the command.
    #[error("instance {id} is {state:?}: {what} is not possible now")]
    Busy {
        id: InstanceId,
        state: InstanceState,
        what: &'static str,
    },
    /// The repository failed.
    #[error(transparent)]
    Store(#[from] vmatrix_store::StoreError),
    /// QEMU failed.
    #[error(transparent)]
    Vmm(#[from] vmatrix_vmm::VmmError),
    /// An illegal state change was attempted (a bug: logged and refused).
    #[error(transparent)]
    Transition(#[from] vmatrix_core::IllegalTransition),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// What kind of failure a command's task ended with (the HTTP status it maps to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Fenced: the generation is stale.
    Stale,
    /// The instance is not here.
    Unknown,
    /// Not possible in the instance's state now.
    Busy,
    /// The work itself failed.
    Failed,
}

/// A command's failure as its callers see it (cloneable: several callers may wait on one task).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CommandFailure {
    /// Which kind.
    pub kind: FailureKind,
    /// What failed and what to do.
    pub message: String,
}

impl From<AgentError> for CommandFailure {
    fn from(e: AgentError) -> Self {
        let kind = match e {
            AgentError::Stale { .. } => FailureKind::Stale,
            AgentError::Unknown(_) => FailureKind::Unknown,
            AgentError::Busy { .. } => FailureKind::Busy,
            _ => FailureKind::Failed,
        };
        Self {
            kind,
            message: e.to_string(),
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, AgentError>;
pub(crate) type TaskResult = std::result::Result<AgentReply, CommandFailure>;
pub(crate) type TaskKey = (InstanceId, u64, &'static str);

/// Who holds an instance's VM.
pub(crate) enum Held {
    /// The slot: nothing is being done to it.
    Guest(Box<dyn Guest>),
    /// The slot: a paused migration destination.
    Incoming(Box<dyn Incoming>),
    /// An operation took it (the slot is busy).
    Taken,
    /// No process (a suspended instance's record).
    Nothing,
}

pub(crate) struct Slot {
    pub(crate) plan: InstancePlan,
    pub(crate) version: String,
    pub(crate) state: InstanceState,
    pub(crate) endpoint: SocketAddr,
    pub(crate) pid: u32,
    pub(crate) error: Option<String>,
    pub(crate) saved: Option<SavedState>,
    pub(crate) held: Held,
    pub(crate) dir: PathBuf,
    /// Its VM's console (kept while an operation holds the VM).
    pub(crate) console: Option<vmatrix_vmm::Console>,
    /// The versions its volumes started from ("" for a blank one), as its plan lists them.
    pub(crate) volume_versions: Vec<String>,
}

impl Slot {
    pub(crate) fn record(&self, phase: Phase) -> VmRecord {
        VmRecord {
            plan: self.plan.clone(),
            version: self.version.clone(),
            endpoint: self.endpoint,
            pid: self.pid,
            phase,
            saved: self.saved.clone(),
            volume_versions: self.volume_versions.clone(),
        }
    }

    pub(crate) fn step(&mut self, t: Transition) -> Result<()> {
        self.state = self.state.next(t).inspect_err(|e| {
            tracing::error!(instance = %self.plan.id, "refused: {e}");
        })?;
        Ok(())
    }
}

pub(crate) struct ExportEntry {
    pub(crate) _server: NbdServer,
    pub(crate) url: String,
    pub(crate) users: HashSet<(InstanceId, u64)>,
}

pub(crate) struct TaskEntry {
    pub(crate) started: Instant,
    pub(crate) result: Shared<BoxFuture<'static, TaskResult>>,
}

/// The agent's state: one per machine.
pub struct Agent {
    /// Its configuration.
    pub config: AgentConfig,
    pub(crate) hv: Arc<dyn Hypervisor>,
    pub(crate) repo: Arc<Repository>,
    pub(crate) cache: Arc<ChunkCache>,
    pub(crate) exports: Mutex<HashMap<String, ExportEntry>>,
    pub(crate) slots: Mutex<HashMap<InstanceId, Slot>>,
    /// Newest generation seen per instance, kept after the instance leaves (fencing).
    pub(crate) generations: Mutex<HashMap<InstanceId, u64>>,
    pub(crate) tasks: Mutex<HashMap<TaskKey, TaskEntry>>,
    /// Pins: the sequence number of the newest set asked for, and of the newest written.
    pub(crate) pin_seq: std::sync::atomic::AtomicU64,
    pub(crate) pin_written: Arc<Mutex<u64>>,
    /// False while the VMs a previous agent process left are being adopted: commands wait.
    pub(crate) ready: tokio::sync::watch::Sender<bool>,
    /// Report sequence numbers: this process's start in microseconds (so they keep growing
    /// across restarts) plus a counter.
    report_base: u64,
    report_count: std::sync::atomic::AtomicU64,
    /// The service network on this host, and the script QEMU runs to attach a TAP to it.
    pub(crate) net: Option<(vmatrix_net::HostNet, PathBuf)>,
    /// The controller's last view of the service network (who may reach whom).
    view: Mutex<Option<vmatrix_core::api::NetworkView>>,
    /// Held while rules are built and applied, so an older snapshot never lands last.
    rules_lock: Mutex<()>,
    /// The fencing watchdog's end (see [`crate::lease`]); `None`: no fencing (in-process tests).
    pub(crate) lease: Mutex<Option<Arc<crate::lease::LeaseHolder>>>,
    /// How long its commands take ([`crate::metrics`]).
    pub(crate) metrics: crate::metrics::AgentMetrics,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.config.name)
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these quick locks leaves consistent data (every critical
    // section is a few assignments), so the poison flag is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn free_port(ip: IpAddr) -> Result<u16> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| AgentError::Other(format!("no free port on {ip}: {e}")))
}

pub use vmatrix_core::api::work_limit;

pub(crate) fn parse_addr(a: &str) -> Result<SocketAddr> {
    a.parse()
        .map_err(|e| AgentError::Other(format!("bad address {a:?}: {e}")))
}

impl Agent {
    /// Opens the repository and the chunk cache; use [`Agent::adopt_left`] next to take over
    /// the VMs a previous agent process left running.
    pub fn new(config: AgentConfig, hv: Arc<dyn Hypervisor>) -> Result<Arc<Self>> {
        let repo = Arc::new(Repository::open(&config.repo)?);
        let cache = Arc::new(ChunkCache::new(
            repo.clone(),
            &config.data.join("cache"),
            config.cache_bytes,
        )?);
        std::fs::create_dir_all(config.data.join("vms"))
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", config.data.display())))?;
        // Disk copies of commits a previous process did not finish.
        if let Ok(entries) = std::fs::read_dir(config.data.join("tmp")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("commit-") || name.starts_with(".vmatrix-commit-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let net = match &config.net {
            None => None,
            Some(c) => {
                let host = vmatrix_net::HostNet::setup(c.clone()).map_err(|e| {
                    AgentError::Other(format!(
                        "setting up the service network (bridge {}): {e}",
                        c.bridge
                    ))
                })?;
                let script = host
                    .tap_script(&config.data)
                    .map_err(|e| AgentError::Other(e.to_string()))?;
                tracing::info!(
                    "service network {} on bridge {} (gateway {}, VXLAN endpoint {})",
                    c.net,
                    c.bridge,
                    c.address,
                    c.vtep.map_or("none".into(), |v| v.to_string())
                );
                Some((host, script))
            }
        };
        let agent = Arc::new(Self {
            net,
            view: Mutex::new(None),
            rules_lock: Mutex::new(()),
            lease: Mutex::new(None),
            metrics: Default::default(),
            config,
            hv,
            repo,
            cache,
            exports: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            generations: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            pin_seq: std::sync::atomic::AtomicU64::new(0),
            pin_written: Arc::new(Mutex::new(0)),
            ready: tokio::sync::watch::Sender::new(false),
            report_base: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            report_count: std::sync::atomic::AtomicU64::new(0),
        });
        // Closed until the controller's view arrives: no instance reaches anything yet.
        agent.apply_rules()?;
        Ok(agent)
    }

    pub(crate) fn vms_dir(&self) -> PathBuf {
        self.config.data.join("vms")
    }

    pub(crate) fn fence(&self, id: &InstanceId, generation: u64) -> Result<()> {
        let mut g = lock(&self.generations);
        let seen = g.get(id).copied().unwrap_or(0);
        if generation < seen {
            return Err(AgentError::Stale {
                id: id.clone(),
                got: generation,
                seen,
            });
        }
        g.insert(id.clone(), generation);
        Ok(())
    }

    /// The VM directory of `id` at `generation`.
    pub(crate) fn vm_dir(&self, id: &InstanceId, generation: u64) -> PathBuf {
        self.vms_dir().join(format!("{id}-g{generation}"))
    }

    pub(crate) fn vm_spec(&self, plan: &InstancePlan, url: String, forward: SocketAddr) -> VmSpec {
        let mut spec = VmSpec::new(
            plan.id.clone(),
            BaseImage::Nbd { url },
            forward,
            self.config.accel,
        );
        spec.memory_mib = plan.memory_mib;
        spec.vcpus = plan.vcpus;
        spec.guest_port = plan.port;
        spec.lifetime = Lifetime::Machine;
        spec.hardware = plan.hardware;
        spec.seed = Some(self.vm_dir(&plan.id, plan.generation).join(SEED_FILE));
        spec.tls = crate::certificate::kept(&self.config.data, self.config.name.as_str());
        if let (Some(attach), Some((_, script))) = (plan.net, &self.net) {
            spec.tap = Some(vmatrix_vmm::TapSpec {
                ifname: vmatrix_net::tap_name(plan.id.as_str(), plan.generation),
                script: script.clone(),
                address: attach.address,
                prefix: attach.prefix,
                gateway: attach.gateway,
            });
        }
        spec
    }

    /// Where this machine reaches the service of a new VM for `plan`: its own address on the
    /// service network (bridged), or a free port on the agent's address forwarded to it.
    pub(crate) fn endpoint_for(&self, plan: &InstancePlan) -> Result<SocketAddr> {
        match (plan.net, &self.net) {
            (Some(attach), Some(_)) => Ok(SocketAddr::new(attach.address.into(), plan.port)),
            (Some(attach), None) => Err(AgentError::Other(format!(
                "instance {} has the service-network address {} but machine {} has no service \
                 network; start its agent with --service-net (as `vmatrix up` does as root)",
                plan.id, attach.address, self.config.name
            ))),
            (None, _) => {
                let ip = self.config.listen.ip();
                Ok(SocketAddr::new(ip, free_port(ip)?))
            }
        }
    }

    /// Applies what the controller said of the service network (its hosts, who may reach
    /// whom) in answer to a heartbeat.
    pub fn apply_network(&self, view: &vmatrix_core::api::NetworkView) {
        if let Some((host, _)) = &self.net {
            if let Err(e) = host.set_peers(&view.vteps) {
                tracing::warn!("updating the service network's peers: {e}");
            }
            *lock(&self.view) = Some(view.clone());
            if let Err(e) = self.apply_rules() {
                tracing::warn!("{e}");
            }
        }
    }

    /// Applies this host's isolation and egress rules from the last view and the TAPs of the
    /// VMs here (before a new VM starts, so that its TAP may send at once). Only a change
    /// reaches nftables.
    pub(crate) fn apply_rules(&self) -> Result<()> {
        let Some((host, _)) = &self.net else {
            return Ok(());
        };
        let _one = lock(&self.rules_lock);
        let view = lock(&self.view).clone();
        let taps: Vec<vmatrix_net::firewall::Tap> = lock(&self.slots)
            .values()
            .filter_map(|s| {
                let a = s.plan.net?;
                Some(vmatrix_net::firewall::Tap {
                    name: vmatrix_net::tap_name(s.plan.id.as_str(), s.plan.generation),
                    mac: vmatrix_vmm::mac_for(&s.plan.id),
                    address: a.address,
                })
            })
            .collect();
        let net = host.config.net;
        let rules = vmatrix_net::firewall::Rules {
            net,
            host_addresses: net.host_addresses(),
            hosts: view
                .as_ref()
                .map(|v| v.vteps.iter().chain(&v.hosts).copied().collect())
                .unwrap_or_default(),
            services: view
                .map(|v| v.services)
                .unwrap_or_default()
                .into_iter()
                .map(|s| vmatrix_net::firewall::ServiceRules {
                    name: s.name.to_string(),
                    members: s.members,
                    allow_from: s.allow_from.iter().map(|a| a.to_string()).collect(),
                    egress: s.egress,
                })
                .collect(),
            taps,
        };
        host.apply_rules(&rules)
            .map_err(|e| AgentError::Other(format!("applying the service network's rules: {e}")))
    }

    /// Removes this host's service network (bridge and VXLAN device): the machine goes away.
    pub fn remove_network(&self) {
        if let Some((host, _)) = &self.net {
            if let Err(e) = host.remove() {
                tracing::warn!("removing the service network: {e}");
            }
        }
    }

    /// Carries out one command from the controller as a task of its own, keyed by (instance,
    /// generation, command): the same command again waits for the same task (or gets its
    /// result), and the task runs to its end whether or not anyone still waits for it.
    pub async fn handle(self: &Arc<Self>, command: AgentCommand) -> TaskResult {
        // Not before the VMs a previous agent process left are adopted (a few seconds).
        let _ = self.ready.subscribe().wait_for(|r| *r).await;
        let key = key_of(&command);
        let result = {
            let mut tasks = lock(&self.tasks);
            tasks.retain(|_, t| {
                let done = t.result.peek().is_some();
                !(done && t.started.elapsed() > Duration::from_secs(600))
            });
            match tasks.get(&key) {
                Some(t) => t.result.clone(),
                None => {
                    let me = self.clone();
                    let name = crate::metrics::command_name(&command);
                    let task = tokio::spawn(async move {
                        let started = Instant::now();
                        let r = me.clone().run(command).await;
                        me.metrics.command_ended(name, started.elapsed(), &r);
                        r
                    });
                    let result = async move {
                        match task.await {
                            Ok(r) => r.map_err(CommandFailure::from),
                            Err(e) => Err(CommandFailure {
                                kind: FailureKind::Failed,
                                message: format!("the command's task ended: {e}"),
                            }),
                        }
                    }
                    .boxed()
                    .shared();
                    tasks.insert(
                        key.clone(),
                        TaskEntry {
                            started: Instant::now(),
                            result: result.clone(),
                        },
                    );
                    result
                }
            }
        };
        let out = result.await;
        // A failure is not remembered: the same command again tries again. Nor is a pause or
        // an unpause: they alternate, and each is quick and idempotent (a pause after an
        // unpause must pause again, not answer with the first pause's result). Nor a commit:
        // the next one, later, stores the disk as it is then.
        if out.is_err() || matches!(key.2, "pause" | "unpause" | "commit" | "set-volume") {
            lock(&self.tasks).remove(&key);
        }
        out
    }

    async fn run(self: Arc<Self>, command: AgentCommand) -> Result<AgentReply> {
        match command {
            AgentCommand::Activate { plan, state } => self.activate(plan, state).await,
            AgentCommand::Suspend { id, generation } => self.suspend(id, generation).await,
            AgentCommand::PrepareIncoming { plan, from } => self.prepare_incoming(plan, from).await,
            AgentCommand::MigrateOut {
                id,
                generation,
                target,
            } => self.migrate_out(id, generation, target).await,
            AgentCommand::FinishIncoming { id, generation } => {
                self.finish_incoming(id, generation).await
            }
            AgentCommand::Discard { id, generation } => self.discard(id, generation).await,
            AgentCommand::Commit {
                id,
                generation,
                image,
                author,
                message,
            } => self.commit(id, generation, image, author, message).await,
            AgentCommand::Pause { id, generation } => self.pause(id, generation, true).await,
            AgentCommand::Unpause { id, generation } => self.pause(id, generation, false).await,
            AgentCommand::RemoveSaved { id, saved, .. } => self.remove_saved(id, saved).await,
            AgentCommand::SetVolume { volume, snapshot } => self.set_volume(volume, snapshot).await,
        }
    }

    /// The sequence number from which reports show everything done so far (a command's
    /// reply carries it).
    pub fn current_seq(&self) -> u64 {
        self.report_base + self.report_count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What runs here now: a snapshot of the table, without waiting on any operation.
    pub fn report(&self) -> AgentReport {
        // Taken before the snapshot: a change made after this number was taken may or may not
        // be in the snapshot, one made before it always is.
        let seq = self.report_base
            + self
                .report_count
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut instances: Vec<AgentInstance> = lock(&self.slots)
            .values()
            .map(|s| AgentInstance {
                id: s.plan.id.clone(),
                generation: s.plan.generation,
                state: s.state,
                endpoint: s.endpoint.to_string(),
                cpu_seconds: if s.pid > 0 {
                    self.hv.cpu_seconds(s.pid)
                } else {
                    0.0
                },
                memory_bytes: if s.pid > 0 {
                    self.hv.memory_bytes(s.pid)
                } else {
                    0
                },
                error: s.error.clone(),
                version: s.version.clone(),
                saved: s.saved.clone(),
            })
            .collect();
        instances.sort_by(|a, b| a.id.cmp(&b.id));
        AgentReport {
            name: self.config.name.clone(),
            address: self.config.listen.to_string(),
            role: self.config.role,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            instances,
            vtep: self.config.net.as_ref().and_then(|n| n.vtep),
            seq,
        }
    }

    /// Stops every VM (the machine goes away: `vmatrix up` ends, or `--on-exit stop`).
    pub async fn stop_all(&self) {
        let slots: Vec<Slot> = lock(&self.slots).drain().map(|(_, s)| s).collect();
        for s in slots {
            match s.held {
                Held::Guest(g) => g.kill().await,
                Held::Incoming(i) => i.abort().await,
                Held::Taken | Held::Nothing => {}
            }
        }
        crate::record::sweep(&self.vms_dir(), &[]);
        // The groups of QEMUs just killed go once the kernel has reaped them.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while self.hv.sweep_groups(std::time::Duration::ZERO) > 0
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        lock(&self.exports).clear();
        // Nothing runs here any more: nothing is pinned.
        let _ = tokio::task::spawn_blocking(self.pins_writer(Vec::new())).await;
    }

    // For the health watcher.

    /// What the health watcher probes for the instance at `generation`, if it is there and no
    /// operation holds it.
    pub(crate) fn probe_target(
        &self,
        id: &InstanceId,
        generation: u64,
    ) -> Option<Option<crate::health::Target>> {
        let slots = lock(&self.slots);
        let s = slots.get(id).filter(|s| s.plan.generation == generation)?;
        if matches!(s.held, Held::Taken) {
            return Some(None);
        }
        // A TCP port is reached at the instance's own address (bridged); with user-mode NAT
        // only the forwarded HTTP port is reachable, at the endpoint.
        let tcp = match s.plan.health.probe {
            vmatrix_core::Probe::Tcp(port) => match s.plan.net {
                Some(n) => Some(SocketAddr::from((n.address, port))),
                None if port == s.plan.port => Some(s.endpoint),
                None => None,
            },
            vmatrix_core::Probe::Http(_) => None,
        };
        Some(Some(crate::health::Target {
            endpoint: s.endpoint,
            check: s.plan.health.clone(),
            tcp,
            state: s.state,
            pid: s.pid,
        }))
    }

    /// What the host's network says about an instance's TAP (bridged only): its link and
    /// counters, and where the bridge sends frames for the guest's MAC. Logged when a running
    /// instance stops answering, to tell a guest that hangs from a frame path that broke.
    pub(crate) fn network_diagnosis(&self, id: &InstanceId, generation: u64) -> Option<String> {
        let (host, _) = self.net.as_ref()?;
        let tap = vmatrix_net::tap_name(id.as_str(), generation);
        let mac = vmatrix_vmm::mac_for(id);
        let link = vmatrix_net::run("ip", &["-s", "-o", "link", "show", "dev", &tap])
            .unwrap_or_else(|e| e.to_string());
        let fdb = vmatrix_net::run("bridge", &["fdb", "show", "br", &host.config.bridge])
            .map(|all| {
                all.lines()
                    .filter(|l| l.starts_with(&mac))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_else(|e| e.to_string());
        Some(format!(
            "TAP {tap}: {}; bridge entries for {mac}: {}",
            link.split_whitespace().collect::<Vec<_>>().join(" "),
            if fdb.is_empty() { "none" } else { fdb.as_str() }
        ))
    }

    pub(crate) fn hv(&self) -> &dyn Hypervisor {
        &*self.hv
    }

    /// Applies a health observation if the slot is still as it was probed.
    pub(crate) fn observe(
        &self,
        id: &InstanceId,
        generation: u64,
        was: InstanceState,
        change: impl FnOnce(&mut SlotView<'_>),
    ) {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get_mut(id) {
            if s.plan.generation == generation && s.state == was && !matches!(s.held, Held::Taken) {
                change(&mut SlotView(s));
            }
        }
    }

    // For adoption.

    /// Puts back the slot a previous agent process left: a running VM (`activating` until its
    /// health check answers — it may have been adopted mid-boot), a destination waiting for
    /// its `finish-incoming` (`migrating`), or a suspended record (no process).
    pub(crate) fn restore(&self, record: VmRecord, dir: PathBuf, held: Held) {
        let id = record.plan.id.clone();
        lock(&self.generations)
            .entry(id.clone())
            .and_modify(|g| *g = (*g).max(record.plan.generation))
            .or_insert(record.plan.generation);
        let console = match &held {
            Held::Guest(g) => g.console(),
            _ => None,
        };
        let (state, pid) = match &held {
            // A paused standby stays paused (a health probe would fail it).
            Held::Guest(g) if record.phase == crate::record::Phase::Paused => {
                (InstanceState::Paused, g.pid())
            }
            Held::Guest(g) => (InstanceState::Activating, g.pid()),
            Held::Incoming(i) => (InstanceState::Migrating, i.pid()),
            Held::Taken | Held::Nothing => (InstanceState::Suspended, 0),
        };
        lock(&self.slots).insert(
            id,
            Slot {
                plan: record.plan,
                version: record.version,
                state,
                endpoint: record.endpoint,
                pid,
                error: None,
                saved: record.saved,
                volume_versions: record.volume_versions,
                held,
                dir,
                console,
            },
        );
    }

    /// Lets commands run: adoption is over.
    pub(crate) fn set_ready(&self) {
        self.ready.send_replace(true);
    }
}

/// The health watcher's narrow view of a slot.
pub(crate) struct SlotView<'a>(&'a mut Slot);

impl SlotView<'_> {
    /// Moves the instance through `t`; an illegal move is logged and refused.
    pub(crate) fn step(&mut self, t: Transition) {
        let _ = self.0.step(t);
    }
    /// Notes why it failed.
    pub(crate) fn fail(&mut self, why: String) {
        if self.0.step(Transition::Fail).is_ok() {
            self.0.error = Some(why);
        }
    }
}

fn key_of(c: &AgentCommand) -> TaskKey {
    match c {
        AgentCommand::Activate { plan, .. } => (plan.id.clone(), plan.generation, "activate"),
        AgentCommand::Suspend { id, generation } => (id.clone(), *generation, "suspend"),
        AgentCommand::PrepareIncoming { plan, .. } => (plan.id.clone(), plan.generation, "prepare"),
        AgentCommand::MigrateOut { id, generation, .. } => (id.clone(), *generation, "migrate-out"),
        AgentCommand::FinishIncoming { id, generation } => (id.clone(), *generation, "finish"),
        AgentCommand::Discard { id, generation } => (id.clone(), *generation, "discard"),
        AgentCommand::Commit { id, generation, .. } => (id.clone(), *generation, "commit"),
        AgentCommand::Pause { id, generation } => (id.clone(), *generation, "pause"),
        AgentCommand::Unpause { id, generation } => (id.clone(), *generation, "unpause"),
        AgentCommand::RemoveSaved { id, generation, .. } => {
            (id.clone(), *generation, "remove-saved")
        }
        // Volume and instance names follow the same rules.
        AgentCommand::SetVolume { volume, .. } => (
            InstanceId::new(volume.as_str()).unwrap_or_else(|_| {
                InstanceId::new("volume").expect("a constant valid instance id")
            }),
            0,
            "set-volume",
        ),
    }
}
