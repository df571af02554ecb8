//! The machine's instances and what the agent does to them.
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
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use vmatrix_core::api::{
    AgentCommand, AgentInstance, AgentReply, AgentReport, InstancePlan, MachineRole,
    MigrationTargetBody, SavedState,
};
use vmatrix_core::{ImageRef, InstanceId, InstanceState, Transition};
use vmatrix_store::cache::ChunkCache;
use vmatrix_store::nbd::{Export, NbdServer};
use vmatrix_store::{ExportFormat, Repository};
use vmatrix_vmm::{Accelerator, BaseImage, Lifetime, MigrationTarget, SuspendedVm, VmSpec};

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

type Result<T> = std::result::Result<T, AgentError>;
type TaskResult = std::result::Result<AgentReply, CommandFailure>;
type TaskKey = (InstanceId, u64, &'static str);

/// Who holds an instance's VM.
enum Held {
    /// The slot: nothing is being done to it.
    Guest(Box<dyn Guest>),
    /// The slot: a paused migration destination.
    Incoming(Box<dyn Incoming>),
    /// An operation took it (the slot is busy).
    Taken,
    /// No process (a suspended instance's record).
    Nothing,
}

struct Slot {
    plan: InstancePlan,
    version: String,
    state: InstanceState,
    endpoint: SocketAddr,
    pid: u32,
    error: Option<String>,
    saved: Option<SavedState>,
    held: Held,
    dir: PathBuf,
}

impl Slot {
    fn record(&self, phase: Phase) -> VmRecord {
        VmRecord {
            plan: self.plan.clone(),
            version: self.version.clone(),
            endpoint: self.endpoint,
            pid: self.pid,
            phase,
            saved: self.saved.clone(),
        }
    }

    fn step(&mut self, t: Transition) -> Result<()> {
        self.state = self.state.next(t).inspect_err(|e| {
            tracing::error!(instance = %self.plan.id, "refused: {e}");
        })?;
        Ok(())
    }
}

struct ExportEntry {
    _server: NbdServer,
    url: String,
    users: HashSet<(InstanceId, u64)>,
}

struct TaskEntry {
    started: Instant,
    result: Shared<BoxFuture<'static, TaskResult>>,
}

/// The agent's state: one per machine.
pub struct Agent {
    /// Its configuration.
    pub config: AgentConfig,
    hv: Arc<dyn Hypervisor>,
    repo: Arc<Repository>,
    cache: Arc<ChunkCache>,
    exports: Mutex<HashMap<String, ExportEntry>>,
    slots: Mutex<HashMap<InstanceId, Slot>>,
    /// Newest generation seen per instance, kept after the instance leaves (fencing).
    generations: Mutex<HashMap<InstanceId, u64>>,
    tasks: Mutex<HashMap<TaskKey, TaskEntry>>,
    /// Pins: the sequence number of the newest set asked for, and of the newest written.
    pin_seq: std::sync::atomic::AtomicU64,
    pin_written: Arc<Mutex<u64>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.config.name)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these quick locks leaves consistent data (every critical
    // section is a few assignments), so the poison flag is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port(ip: IpAddr) -> Result<u16> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| AgentError::Other(format!("no free port on {ip}: {e}")))
}

pub use vmatrix_core::api::work_limit;

fn parse_addr(a: &str) -> Result<SocketAddr> {
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
        for d in ["nbd", "vms"] {
            std::fs::create_dir_all(config.data.join(d)).map_err(|e| {
                AgentError::Other(format!("creating {}: {e}", config.data.display()))
            })?;
        }
        Ok(Arc::new(Self {
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
        }))
    }

    pub(crate) fn vms_dir(&self) -> PathBuf {
        self.config.data.join("vms")
    }

    fn fence(&self, id: &InstanceId, generation: u64) -> Result<()> {
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

    /// The version id a plan runs: pinned in the plan, or the tag resolved now (first
    /// activation only).
    async fn version_of(&self, plan: &InstancePlan) -> Result<String> {
        if let Some(v) = &plan.version {
            return Ok(v.clone());
        }
        let repo = self.repo.clone();
        let image = plan.image.clone();
        let (id, _) = tokio::task::spawn_blocking(move || repo.resolve(&image))
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
        Ok(id)
    }

    /// The NBD backing of `version` on this machine, started on first use and stopped when its
    /// last user leaves. Named by the version id, never by a tag.
    pub(crate) async fn acquire_export(
        &self,
        version: &str,
        user: (InstanceId, u64),
    ) -> Result<String> {
        if let Some(e) = lock(&self.exports).get_mut(version) {
            e.users.insert(user);
            return Ok(e.url.clone());
        }
        let repo = self.repo.clone();
        let v = version.to_owned();
        let manifest = tokio::task::spawn_blocking(move || repo.manifest(&v))
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
        let mut exports = lock(&self.exports);
        // Another task may have started it meanwhile.
        if let Some(e) = exports.get_mut(version) {
            e.users.insert(user);
            return Ok(e.url.clone());
        }
        let name = short(version);
        let export = Export::new(name.clone(), manifest, self.cache.clone());
        let socket = self.config.data.join("nbd").join(format!("{name}.sock"));
        let server = NbdServer::start(export, &socket)?;
        // Reads wait (up to a minute) for the export to come back instead of failing, so a
        // restarting agent does not hurt its guests.
        let url = format!(
            "json:{}",
            // The protocol node only: the format (raw) is the overlay's backing format.
            serde_json::json!({ "file": {
                "driver": "nbd",
                "server": {"type": "unix", "path": socket},
                "export": name,
                "reconnect-delay": 60,
            }})
        );
        exports.insert(
            version.to_owned(),
            ExportEntry {
                _server: server,
                url: url.clone(),
                users: HashSet::from([user]),
            },
        );
        let versions: Vec<String> = exports.keys().cloned().collect();
        drop(exports);
        self.publish_pins(versions);
        Ok(url)
    }

    fn release_export(&self, version: &str, user: &(InstanceId, u64)) {
        let mut exports = lock(&self.exports);
        if let Some(e) = exports.get_mut(version) {
            e.users.remove(user);
            if e.users.is_empty() {
                exports.remove(version);
                let versions: Vec<String> = exports.keys().cloned().collect();
                drop(exports);
                self.publish_pins(versions);
            }
        }
    }

    /// Records in the repository which versions this machine's instances use (GC keeps them
    /// whatever happens to their tags). Written in the background, newest set last.
    fn publish_pins(&self, versions: Vec<String>) {
        let write = self.pins_writer(versions);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(write)),
            Err(_) => write(),
        }
    }

    /// The write of one set of pins, skipped if a newer set was written first.
    fn pins_writer(&self, mut versions: Vec<String>) -> impl FnOnce() + Send + 'static {
        versions.sort();
        let seq = self
            .pin_seq
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let (repo, written) = (self.repo.clone(), self.pin_written.clone());
        let holder = format!("agent-{}", self.config.name);
        move || {
            let mut last = lock(&written);
            if *last > seq {
                return; // a newer set is written already
            }
            match repo.set_pins(&holder, &versions) {
                Ok(()) => *last = seq,
                Err(e) => tracing::warn!("recording the versions in use ({holder}): {e}"),
            }
        }
    }

    /// Versions exported now (for tests and the status route).
    pub fn exported_versions(&self) -> Vec<String> {
        lock(&self.exports).keys().cloned().collect()
    }

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
        spec
    }

    /// Carries out one command from the controller as a task of its own, keyed by (instance,
    /// generation, command): the same command again waits for the same task (or gets its
    /// result), and the task runs to its end whether or not anyone still waits for it.
    pub async fn handle(self: &Arc<Self>, command: AgentCommand) -> TaskResult {
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
                    let task = tokio::spawn(async move { me.run(command).await });
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
        if out.is_err() {
            // A failure is not remembered: the same command again tries again.
            lock(&self.tasks).remove(&key);
        }
        out
    }

    async fn run(self: Arc<Self>, command: AgentCommand) -> Result<AgentReply> {
        match command {
            AgentCommand::Activate { plan, state } => self.activate(plan, state).await,
            AgentCommand::Suspend { id, generation } => self.suspend(id, generation).await,
            AgentCommand::PrepareIncoming { plan } => self.prepare_incoming(plan).await,
            AgentCommand::MigrateOut {
                id,
                generation,
                target,
            } => self.migrate_out(id, generation, target).await,
            AgentCommand::FinishIncoming { id, generation } => {
                self.finish_incoming(id, generation).await
            }
            AgentCommand::Discard { id, generation } => self.discard(id, generation).await,
        }
    }

    /// Inserts a new slot for `plan` unless one exists: then answers what is there (the same
    /// activation again), or refuses.
    fn claim_slot(&self, plan: &InstancePlan, slot: Slot) -> Result<Option<AgentReply>> {
        let mut slots = lock(&self.slots);
        if let Some(existing) = slots.get(&plan.id) {
            if existing.plan.generation == plan.generation
                && existing.state != InstanceState::Suspended
            {
                return Ok(Some(AgentReply::Activated {
                    endpoint: existing.endpoint.to_string(),
                    version: existing.version.clone(),
                }));
            }
            if existing.state != InstanceState::Suspended {
                return Err(AgentError::Busy {
                    id: plan.id.clone(),
                    state: existing.state,
                    what: "a new activation",
                });
            }
        }
        // A suspended record of an older generation is superseded by this activation.
        slots.insert(plan.id.clone(), slot);
        Ok(None)
    }

    async fn activate(
        self: Arc<Self>,
        mut plan: InstancePlan,
        state: Option<SavedState>,
    ) -> Result<AgentReply> {
        let slot = self.new_slot(&mut plan, InstanceState::Activating).await?;
        let (version, endpoint, dir) = (slot.version.clone(), slot.endpoint, slot.dir.clone());
        if let Some(reply) = self.claim_slot(&plan, slot)? {
            return Ok(reply);
        }
        let started = async {
            let spec = self.vm_setup(&plan, &version, endpoint, &dir).await?;
            match &state {
                None => Ok(self.hv.boot(spec, &dir).await?),
                Some(saved) => self.resume_from(saved, spec, &dir).await,
            }
        }
        .await;
        let guest = match started {
            Ok(g) => g,
            Err(e) => {
                self.abandon(&plan, &version, &dir);
                return Err(e);
            }
        };
        let pid = guest.pid();
        if !self.put_back(&plan.id, plan.generation, Held::Guest(guest), |s| {
            s.pid = pid;
            Ok(())
        }) {
            self.discarded_meanwhile(&dir, &version, &plan.id, plan.generation, None);
            return Err(AgentError::Other(format!(
                "instance {} was discarded while it started",
                plan.id
            )));
        }
        self.persist(&plan.id, Phase::Running);
        if let Some(saved) = state {
            // The instance runs again from it: the saved state is superseded.
            let repo = self.repo.clone();
            tokio::task::spawn_blocking(move || {
                for image in [&saved.state, &saved.overlay] {
                    if let Err(e) = repo.remove(image) {
                        tracing::warn!("removing the superseded saved state {image}: {e}");
                    }
                }
            });
        }
        tokio::spawn(crate::health::watch(
            self.clone(),
            plan.id.clone(),
            plan.generation,
        ));
        Ok(AgentReply::Activated {
            endpoint: endpoint.to_string(),
            version,
        })
    }

    /// The first steps of a new VM here: fenced, its version pinned in `plan`, a port and a
    /// directory chosen, and the slot that says it is being started (`state`).
    async fn new_slot(&self, plan: &mut InstancePlan, state: InstanceState) -> Result<Slot> {
        self.fence(&plan.id, plan.generation)?;
        let version = self.version_of(plan).await?;
        plan.version = Some(version.clone());
        let ip = self.config.listen.ip();
        Ok(Slot {
            plan: plan.clone(),
            version,
            state,
            endpoint: SocketAddr::new(ip, free_port(ip)?),
            pid: 0,
            error: None,
            saved: None,
            held: Held::Taken,
            dir: self.vm_dir(&plan.id, plan.generation),
        })
    }

    /// The new VM's directory, and its spec over this machine's export of its version.
    async fn vm_setup(
        &self,
        plan: &InstancePlan,
        version: &str,
        endpoint: SocketAddr,
        dir: &Path,
    ) -> Result<VmSpec> {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", dir.display())))?;
        let url = self
            .acquire_export(version, (plan.id.clone(), plan.generation))
            .await?;
        Ok(self.vm_spec(plan, url, endpoint))
    }

    /// Undoes a start that failed: its slot, its use of the export and its directory.
    fn abandon(&self, plan: &InstancePlan, version: &str, dir: &Path) {
        self.forget(&plan.id, plan.generation);
        self.release_export(version, &(plan.id.clone(), plan.generation));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Takes the VM of `id` out of its slot for an operation, checking its generation.
    fn take(
        &self,
        id: &InstanceId,
        generation: u64,
        what: &'static str,
        t: Transition,
    ) -> Result<Held> {
        let mut slots = lock(&self.slots);
        let s = slots
            .get_mut(id)
            .ok_or_else(|| AgentError::Unknown(id.clone()))?;
        if generation < s.plan.generation {
            return Err(AgentError::Stale {
                id: id.clone(),
                got: generation,
                seen: s.plan.generation,
            });
        }
        if matches!(s.held, Held::Taken | Held::Nothing) || s.state == InstanceState::Failed {
            return Err(AgentError::Busy {
                id: id.clone(),
                state: s.state,
                what,
            });
        }
        s.step(t)?;
        Ok(std::mem::replace(&mut s.held, Held::Taken))
    }

    /// Returns a VM to its slot after an operation and applies `change`; false (and the VM is
    /// killed) if the slot was discarded meanwhile.
    fn put_back(
        &self,
        id: &InstanceId,
        generation: u64,
        held: Held,
        change: impl FnOnce(&mut Slot) -> Result<()>,
    ) -> bool {
        let mut slots = lock(&self.slots);
        match slots.get_mut(id) {
            Some(s) if s.plan.generation == generation => {
                s.held = held;
                if let Err(e) = change(s) {
                    s.error = Some(e.to_string());
                }
                true
            }
            _ => {
                drop(slots);
                tokio::spawn(async move {
                    match held {
                        Held::Guest(g) => g.kill().await,
                        Held::Incoming(i) => i.abort().await,
                        Held::Taken | Held::Nothing => {}
                    }
                });
                false
            }
        }
    }

    fn forget(&self, id: &InstanceId, generation: u64) -> Option<Slot> {
        let mut slots = lock(&self.slots);
        if slots
            .get(id)
            .is_some_and(|s| s.plan.generation == generation)
        {
            return slots.remove(id);
        }
        None
    }

    /// Writes the slot's record beside its VM (what a restarted agent adopts).
    fn persist(&self, id: &InstanceId, phase: Phase) {
        let record = lock(&self.slots)
            .get(id)
            .map(|s| (s.dir.clone(), s.record(phase)));
        if let Some((dir, record)) = record {
            if let Err(e) = record.write(&dir) {
                tracing::warn!(instance = %id, "writing its record in {}: {e}", dir.display());
            }
        }
    }

    async fn suspend(self: Arc<Self>, id: InstanceId, generation: u64) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let Held::Guest(mut guest) =
            self.take(&id, generation, "suspend", Transition::SuspendStarted)?
        else {
            return Err(AgentError::Other(format!(
                "instance {id} has no running VM"
            )));
        };
        let (dir, plan, version) = {
            let slots = lock(&self.slots);
            let s = slots
                .get(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            (s.dir.clone(), s.plan.clone(), s.version.clone())
        };
        let saved = SavedState {
            state: ImageRef::parse(&format!("{id}:state-g{generation}"))
                .map_err(|e| AgentError::Other(e.to_string()))?,
            overlay: ImageRef::parse(&format!("{id}:overlay-g{generation}"))
                .map_err(|e| AgentError::Other(e.to_string()))?,
        };
        let state_file = dir.join("state.bin");
        let durable = async {
            let files = guest
                .save_state(&state_file, work_limit(plan.memory_mib))
                .await?;
            let repo = self.repo.clone();
            let (st, ov) = (saved.state.clone(), saved.overlay.clone());
            tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
                let stored = repo
                    .import_state(&files.state_file, &st, &|_| {})
                    .and_then(|_| repo.import_state(&files.disk, &ov, &|_| {}));
                if stored.is_err() {
                    let _ = repo.remove(&st);
                    let _ = repo.remove(&ov);
                }
                stored.map(drop)
            })
            .await
            .map_err(|e| AgentError::Other(e.to_string()))??;
            Ok::<(), AgentError>(())
        }
        .await;
        if let Err(e) = durable {
            // Leave the VM as it was: running here.
            let _ = std::fs::remove_file(&state_file);
            let resumed = guest.cont().await;
            let kept = self.put_back(&id, generation, Held::Guest(guest), |s| {
                s.step(Transition::Cancelled)?;
                if let Err(c) = resumed {
                    s.step(Transition::Fail)?;
                    s.error = Some(format!(
                        "it could not run again after a failed suspend: {c}"
                    ));
                }
                Ok(())
            });
            if !kept {
                self.discarded_meanwhile(&dir, &version, &id, generation, None);
            }
            return Err(e);
        }
        // The state is durable in the repository: only now does QEMU end.
        guest.end().await;
        let kept = self.put_back(&id, generation, Held::Nothing, |s| {
            s.step(Transition::Suspended)?;
            s.pid = 0;
            s.saved = Some(saved.clone());
            Ok(())
        });
        if !kept {
            // Discarded while it was saved: nothing of it may stay behind.
            self.discarded_meanwhile(&dir, &version, &id, generation, Some(&saved));
            return Err(AgentError::Other(format!(
                "instance {id} was discarded while it was suspended"
            )));
        }
        self.persist(&id, Phase::Suspended);
        for f in ["state.bin", "disk.qcow2", "qmp.sock"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        self.release_export(&version, &(id.clone(), generation));
        Ok(AgentReply::Suspended { saved })
    }

    /// Cleans up after an operation whose instance was discarded while it ran: its directory,
    /// its use of the export and the saved state it may have stored.
    fn discarded_meanwhile(
        &self,
        dir: &Path,
        version: &str,
        id: &InstanceId,
        generation: u64,
        saved: Option<&SavedState>,
    ) {
        let _ = std::fs::remove_dir_all(dir);
        self.release_export(version, &(id.clone(), generation));
        if let Some(saved) = saved.cloned() {
            let repo = self.repo.clone();
            tokio::task::spawn_blocking(move || {
                let _ = repo.remove(&saved.state);
                let _ = repo.remove(&saved.overlay);
            });
        }
    }

    async fn prepare_incoming(self: Arc<Self>, mut plan: InstancePlan) -> Result<AgentReply> {
        let slot = self.new_slot(&mut plan, InstanceState::Migrating).await?;
        let (version, endpoint, dir) = (slot.version.clone(), slot.endpoint, slot.dir.clone());
        {
            let mut slots = lock(&self.slots);
            if let Some(existing) = slots.get(&plan.id) {
                if existing.plan.generation == plan.generation {
                    return Err(AgentError::Busy {
                        id: plan.id.clone(),
                        state: existing.state,
                        what: "preparing it again (already prepared)",
                    });
                }
                if existing.state != InstanceState::Suspended {
                    return Err(AgentError::Busy {
                        id: plan.id.clone(),
                        state: existing.state,
                        what: "an incoming migration",
                    });
                }
            }
            slots.insert(plan.id.clone(), slot);
        }
        let started = async {
            let spec = self.vm_setup(&plan, &version, endpoint, &dir).await?;
            Ok::<_, AgentError>(self.hv.incoming(spec, &dir, endpoint.ip()).await?)
        }
        .await;
        let incoming = match started {
            Ok(i) => i,
            Err(e) => {
                self.abandon(&plan, &version, &dir);
                return Err(e);
            }
        };
        let t = incoming.target();
        let pid = incoming.pid();
        if !self.put_back(&plan.id, plan.generation, Held::Incoming(incoming), |s| {
            s.pid = pid;
            Ok(())
        }) {
            self.discarded_meanwhile(&dir, &version, &plan.id, plan.generation, None);
            return Err(AgentError::Other(format!(
                "instance {} was discarded meanwhile",
                plan.id
            )));
        }
        self.persist(&plan.id, Phase::Incoming);
        Ok(AgentReply::Prepared {
            target: MigrationTargetBody {
                nbd: t.nbd.to_string(),
                export: t.export,
                migration: t.migration.to_string(),
                endpoint: endpoint.to_string(),
            },
            version,
        })
    }

    async fn migrate_out(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
        target: MigrationTargetBody,
    ) -> Result<AgentReply> {
        // The source keeps the generation it runs under; the destination has the new one.
        let t = MigrationTarget {
            nbd: parse_addr(&target.nbd)?,
            export: target.export.clone(),
            migration: parse_addr(&target.migration)?,
        };
        let Held::Guest(guest) =
            self.take(&id, generation, "migrate", Transition::MigrateStarted)?
        else {
            return Err(AgentError::Other(format!(
                "instance {id} has no running VM"
            )));
        };
        let (dir, memory, version, gen) = {
            let slots = lock(&self.slots);
            let s = slots
                .get(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            (
                s.dir.clone(),
                s.plan.memory_mib,
                s.version.clone(),
                s.plan.generation,
            )
        };
        match guest.migrate_out(&t, work_limit(memory)).await {
            Ok((total, down)) => {
                self.forget(&id, gen);
                let _ = std::fs::remove_dir_all(&dir);
                self.release_export(&version, &(id.clone(), gen));
                Ok(AgentReply::MigratedOut {
                    total_ms: total,
                    downtime_ms: down,
                })
            }
            Err((guest, e)) => {
                self.put_back(&id, gen, Held::Guest(guest), |s| {
                    s.step(Transition::Cancelled)
                });
                Err(e.into())
            }
        }
    }

    async fn finish_incoming(
        self: Arc<Self>,
        id: InstanceId,
        generation: u64,
    ) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let held = {
            let mut slots = lock(&self.slots);
            let s = slots
                .get_mut(&id)
                .ok_or_else(|| AgentError::Unknown(id.clone()))?;
            if s.plan.generation != generation || !matches!(s.held, Held::Incoming(_)) {
                if s.plan.generation == generation && s.state == InstanceState::Running {
                    // Finished already (the same command again).
                    return Ok(AgentReply::Finished {
                        endpoint: s.endpoint.to_string(),
                    });
                }
                return Err(AgentError::Busy {
                    id: id.clone(),
                    state: s.state,
                    what: "finish a migration",
                });
            }
            std::mem::replace(&mut s.held, Held::Taken)
        };
        let Held::Incoming(incoming) = held else {
            return Err(AgentError::Other("the incoming VM vanished".into()));
        };
        let memory = lock(&self.slots).get(&id).map_or(0, |s| s.plan.memory_mib);
        match incoming.finish(work_limit(memory)).await {
            Ok(guest) => {
                let pid = guest.pid();
                let mut endpoint = String::new();
                self.put_back(&id, generation, Held::Guest(guest), |s| {
                    s.pid = pid;
                    endpoint = s.endpoint.to_string();
                    s.step(Transition::Moved)
                });
                self.persist(&id, Phase::Running);
                tokio::spawn(crate::health::watch(self.clone(), id, generation));
                Ok(AgentReply::Finished { endpoint })
            }
            Err(e) => {
                self.put_back(&id, generation, Held::Nothing, |s| {
                    s.error = Some(format!("finishing the migration: {e}"));
                    s.step(Transition::Fail)
                });
                Err(e.into())
            }
        }
    }

    async fn discard(self: Arc<Self>, id: InstanceId, generation: u64) -> Result<AgentReply> {
        self.fence(&id, generation)?;
        let slot = {
            let mut slots = lock(&self.slots);
            match slots.get(&id) {
                Some(s) if s.plan.generation <= generation => slots.remove(&id),
                _ => None,
            }
        };
        if let Some(s) = slot {
            match s.held {
                Held::Guest(g) => g.kill().await,
                Held::Incoming(i) => i.abort().await,
                // An operation holds it: it finds the slot gone and kills the VM itself.
                Held::Taken | Held::Nothing => {}
            }
            let _ = std::fs::remove_dir_all(&s.dir);
            self.release_export(&s.version, &(id.clone(), s.plan.generation));
        }
        Ok(AgentReply::Discarded)
    }

    async fn resume_from(
        &self,
        saved: &SavedState,
        spec: VmSpec,
        dir: &Path,
    ) -> Result<Box<dyn Guest>> {
        let incoming = dir.with_extension("in");
        std::fs::create_dir_all(&incoming)
            .map_err(|e| AgentError::Other(format!("creating {}: {e}", incoming.display())))?;
        let repo = self.repo.clone();
        let (st, ov, inc) = (saved.state.clone(), saved.overlay.clone(), incoming.clone());
        let fetched = tokio::task::spawn_blocking(move || -> vmatrix_store::Result<()> {
            repo.export(&st, &inc.join("state.bin"), ExportFormat::Raw, &|_| {})?;
            repo.export(&ov, &inc.join("disk.qcow2"), ExportFormat::Raw, &|_| {})?;
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Other(e.to_string()));
        let resumed = async {
            fetched??;
            let files = SuspendedVm {
                state_file: incoming.join("state.bin"),
                disk: incoming.join("disk.qcow2"),
                state_bytes: 0,
                elapsed: Duration::ZERO,
            };
            Ok::<_, AgentError>(self.hv.resume(spec, dir, &files).await?)
        }
        .await;
        let _ = std::fs::remove_dir_all(&incoming);
        resumed
    }

    /// What runs here now: a snapshot of the table, without waiting on any operation.
    pub fn report(&self) -> AgentReport {
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
        }
    }

    /// Process ids of the VMs this agent holds.
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.slots)
            .values()
            .map(|s| s.pid)
            .filter(|p| *p > 0)
            .collect()
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
        lock(&self.exports).clear();
        // Nothing runs here any more: nothing is pinned.
        let _ = tokio::task::spawn_blocking(self.pins_writer(Vec::new())).await;
    }

    // For the health watcher.

    /// (endpoint, health path, state, pid) of the instance at `generation`, if it is there and
    /// no operation holds it.
    pub(crate) fn probe_target(
        &self,
        id: &InstanceId,
        generation: u64,
    ) -> Option<Option<(SocketAddr, String, InstanceState, u32)>> {
        let slots = lock(&self.slots);
        let s = slots.get(id).filter(|s| s.plan.generation == generation)?;
        if matches!(s.held, Held::Taken) {
            return Some(None);
        }
        Some(Some((s.endpoint, s.plan.health.clone(), s.state, s.pid)))
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

    pub(crate) fn restore(&self, record: VmRecord, dir: PathBuf, held: Option<Box<dyn Guest>>) {
        let id = record.plan.id.clone();
        lock(&self.generations)
            .entry(id.clone())
            .and_modify(|g| *g = (*g).max(record.plan.generation))
            .or_insert(record.plan.generation);
        // An adopted VM is `activating` until its health check answers (it may have been
        // adopted mid-boot); the controller's row stays as it is meanwhile.
        let (state, held) = match held {
            Some(g) => (InstanceState::Activating, Held::Guest(g)),
            None => (InstanceState::Suspended, Held::Nothing),
        };
        lock(&self.slots).insert(
            id,
            Slot {
                plan: record.plan,
                version: record.version,
                state,
                endpoint: record.endpoint,
                pid: if state == InstanceState::Activating {
                    record.pid
                } else {
                    0
                },
                error: None,
                saved: record.saved,
                held,
                dir,
            },
        );
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
        AgentCommand::PrepareIncoming { plan } => (plan.id.clone(), plan.generation, "prepare"),
        AgentCommand::MigrateOut { id, generation, .. } => (id.clone(), *generation, "migrate-out"),
        AgentCommand::FinishIncoming { id, generation } => (id.clone(), *generation, "finish"),
        AgentCommand::Discard { id, generation } => (id.clone(), *generation, "discard"),
    }
}

/// The first 24 hex digits of a version id: short enough for a unix socket path, long enough
/// never to collide.
pub(crate) fn short(version: &str) -> String {
    version.chars().take(24).collect()
}
