//! The controller's brain: desired state (services), observed state (agent heartbeats), and the
//! level-triggered reconcile loop that turns differences into agent commands. Manual operations
//! (activate, suspend, resume, migrate, discard, drain) run through the same code. An instance
//! is never acted on by two operations at once (the busy set).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmatrix_core::api::InstanceInfo;
use vmatrix_core::api::SavedState;
use vmatrix_core::api::{
    AgentCommand, AgentReply, AgentReport, ErrorBody, InstancePlan, MachineInfo, MachineRole,
    Operation,
};
use vmatrix_core::{InstanceId, InstanceState, ServiceSpec, Transition};

use crate::db::{Db, DbError, InstanceRow};

/// A machine with no heartbeat for this long is down.
pub const DOWN_AFTER_MS: u64 = 5_000;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The state database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is not possible now.
    #[error("{0}")]
    Conflict(String),
    /// An agent answered that the command failed (it left the VM as it was).
    #[error("agent {machine}: {message}")]
    Agent { machine: String, message: String },
    /// An agent could not be reached or did not answer in time: the command may still run
    /// there; the instance is settled from the agent's next reports.
    #[error("agent {machine} did not answer: {message}")]
    Unreachable { machine: String, message: String },
    /// An illegal state change was attempted (refused and logged).
    #[error(transparent)]
    Transition(#[from] vmatrix_core::IllegalTransition),
}

type Result<T> = std::result::Result<T, ControlError>;

impl ControlError {
    /// The HTTP status that says what kind of failure this is.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::Conflict(_) | Self::Transition(_) => 409,
            Self::Agent { .. } | Self::Unreachable { .. } => 502,
            Self::Db(_) => 500,
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The controller.
pub struct Controller {
    db: Mutex<Db>,
    http: reqwest::Client,
    token: String,
    busy: Mutex<HashSet<InstanceId>>,
    /// When each instance's last operation ended: a heartbeat sent before that is stale for it.
    settled: Mutex<HashMap<InstanceId, Instant>>,
    started: Instant,
    /// Machines heard from since this process started.
    heard: Mutex<HashSet<String>>,
    /// The switch's latest load report.
    load: Mutex<Option<vmatrix_core::api::LoadReport>>,
    /// Demand samples per service, one per reconcile tick, oldest first (the policy's input).
    demand: Mutex<HashMap<String, std::collections::VecDeque<f64>>>,
    /// Whether the load-driven policy runs (else the loop only keeps `min`).
    policy: std::sync::atomic::AtomicBool,
    /// CPU use per machine, from its heartbeats.
    cpu: Mutex<HashMap<String, CpuMeter>>,
    /// Demand over the last season, for the forecast.
    season: Mutex<Season>,
    /// Each machine's latest report since this process started (what settles instances that
    /// an earlier process left mid-operation).
    reports: Mutex<HashMap<String, AgentReport>>,
    /// Operations whose task runs in this process, with their outcome once settled.
    pub(crate) ops: Mutex<HashMap<u64, crate::ops::OpWatch>>,
    /// Bounds the agent calls in flight from the reconcile loop.
    pub(crate) work: Arc<tokio::sync::Semaphore>,
    /// Direct probes of machines whose heartbeats stopped.
    probes: Mutex<HashMap<String, Probe>>,
}

/// A direct probe of a machine without heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Sent, no answer yet.
    Running,
    /// No answer: the machine is down.
    Failed,
}

/// Demand remembered over one season (a week by default) in coarse buckets (the maximum of each),
/// for the policy's forecast: what came one season ago, from now to a little ahead. In memory:
/// a restarted controller starts learning again.
#[derive(Debug)]
pub struct Season {
    period: Duration,
    bucket: Duration,
    ahead: u64,
    /// Per service: (bucket index, maximum rps), oldest first.
    history: HashMap<String, std::collections::VecDeque<(u64, f64)>>,
}

impl Season {
    /// Buckets per season.
    const BUCKETS: u32 = 2016;

    /// A season of `period` (zero: no forecast), looking `ahead` past now.
    pub fn new(period: Duration, ahead: Duration) -> Self {
        let bucket = (period / Self::BUCKETS).max(Duration::from_millis(1));
        Self {
            period,
            bucket,
            ahead: (ahead.as_secs_f64() / bucket.as_secs_f64()).ceil() as u64,
            history: HashMap::new(),
        }
    }

    fn index(&self, at: Duration) -> u64 {
        (at.as_secs_f64() / self.bucket.as_secs_f64()) as u64
    }

    /// Records a demand sample taken `at` since the controller started.
    pub fn record(&mut self, service: &str, at: Duration, rps: f64) {
        if self.period.is_zero() {
            return;
        }
        let i = self.index(at);
        let keep = u64::from(Self::BUCKETS) + self.ahead + 1;
        let h = self.history.entry(service.to_owned()).or_default();
        match h.back_mut() {
            Some((last, max)) if *last == i => *max = max.max(rps),
            _ => h.push_back((i, rps)),
        }
        while h.front().is_some_and(|(first, _)| first + keep < i) {
            h.pop_front();
        }
    }

    /// The most demand seen one season before `at`, from then to `ahead` later (0 when the
    /// history does not reach back that far).
    pub fn forecast(&self, service: &str, at: Duration) -> f64 {
        let season = u64::from(Self::BUCKETS);
        let (Some(h), Some(from)) = (
            self.history.get(service),
            self.index(at).checked_sub(season),
        ) else {
            return 0.0;
        };
        h.iter()
            .filter(|(i, _)| *i >= from && *i <= from + self.ahead)
            .fold(0.0f64, |a, (_, v)| a.max(*v))
    }

    /// Forgets services that are no longer declared.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.history.retain(|name, _| keep(name));
    }
}

/// A machine's CPU load: the CPU seconds its instances' QEMUs used between two heartbeats,
/// over the time between them and its vCPUs, smoothed.
#[derive(Debug, Default)]
struct CpuMeter {
    last: Option<Instant>,
    seconds: HashMap<InstanceId, f64>,
    /// Busy fraction of its vCPUs (0..=1 and above when over-committed), smoothed.
    load: f64,
}

impl CpuMeter {
    /// Takes one heartbeat's CPU seconds of the instances that are running (a booting guest
    /// burns a core for seconds and would make every machine that starts something look hot).
    fn observe(&mut self, now: Instant, vcpus: u32, instances: &[(InstanceId, f64)]) {
        let mut used = 0.0;
        for (id, secs) in instances {
            if let Some(before) = self.seconds.get(id) {
                used += (secs - before).max(0.0);
            }
        }
        if let Some(last) = self.last {
            let dt = now.duration_since(last).as_secs_f64();
            if dt > 0.0 && vcpus > 0 {
                let sample = used / dt / f64::from(vcpus);
                self.load = 0.7 * self.load + 0.3 * sample;
            }
        }
        self.last = Some(now);
        self.seconds = instances.iter().cloned().collect();
    }
}

/// Demand samples kept per service.
const DEMAND_HISTORY: usize = 600;

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Controller")
    }
}

/// Releases an instance from the busy set when an operation ends.
struct BusyGuard<'a> {
    c: &'a Controller,
    id: InstanceId,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.c.settled.lock() {
            s.insert(self.id.clone(), Instant::now());
        }
        if let Ok(mut b) = self.c.busy.lock() {
            b.remove(&self.id);
        }
    }
}

/// A heartbeat can be in flight for this long after an operation ended; until then it may
/// describe the machine as it was before the operation.
const STALE_HEARTBEAT: Duration = Duration::from_secs(3);

impl Controller {
    /// A controller over `db`, using `token` for agents.
    pub fn new(db: Db, token: String) -> Arc<Self> {
        Arc::new(Self {
            db: Mutex::new(db),
            // No overall timeout: each command gets one derived from its work (see `send`).
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("a plain HTTP client builds"),
            token,
            busy: Mutex::new(HashSet::new()),
            settled: Mutex::new(HashMap::new()),
            started: Instant::now(),
            heard: Mutex::new(HashSet::new()),
            cpu: Mutex::new(HashMap::new()),
            season: Mutex::new(Season::new(Duration::ZERO, Duration::ZERO)),
            load: Mutex::new(None),
            demand: Mutex::new(HashMap::new()),
            policy: std::sync::atomic::AtomicBool::new(false),
            reports: Mutex::new(HashMap::new()),
            ops: Mutex::new(HashMap::new()),
            work: Arc::new(tokio::sync::Semaphore::new(16)),
            probes: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn db<T>(
        &self,
        f: impl FnOnce(&Db) -> std::result::Result<T, DbError>,
    ) -> Result<T> {
        let db = self
            .db
            .lock()
            .map_err(|_| ControlError::Conflict("state database lock poisoned".into()))?;
        Ok(f(&db)?)
    }

    /// Appends to the event log (and the process log).
    pub fn event(&self, who: &str, what: &str, why: &str, outcome: &str) {
        tracing::info!(who, what, why, outcome, "event");
        let _ = self.db(|d| d.event(now_ms(), who, what, why, outcome));
    }

    fn claim(&self, id: &InstanceId) -> Result<BusyGuard<'_>> {
        let mut b = self
            .busy
            .lock()
            .map_err(|_| ControlError::Conflict("busy set poisoned".into()))?;
        if !b.insert(id.clone()) {
            return Err(ControlError::Conflict(format!(
                "instance {id} is busy with another operation; try again when it finishes"
            )));
        }
        Ok(BusyGuard {
            c: self,
            id: id.clone(),
        })
    }

    fn is_busy(&self, id: &InstanceId) -> bool {
        self.busy.lock().map(|b| b.contains(id)).unwrap_or(true)
    }

    /// Busy, or changed so recently that a heartbeat may not reflect it yet.
    fn is_unsettled(&self, id: &InstanceId) -> bool {
        self.is_busy(id)
            || self
                .settled
                .lock()
                .map(|s| s.get(id).is_some_and(|t| t.elapsed() < STALE_HEARTBEAT))
                .unwrap_or(true)
    }

    /// Desired services.
    pub fn services(&self) -> Result<Vec<ServiceSpec>> {
        self.db(|d| d.services())
    }

    /// Replaces the desired services.
    pub fn apply(&self, services: Vec<ServiceSpec>) -> Result<()> {
        let names: Vec<String> = services.iter().map(|s| s.name.to_string()).collect();
        self.db(|d| d.set_services(&services))?;
        self.event(
            "api",
            "apply",
            &format!("services: {}", names.join(", ")),
            "ok",
        );
        Ok(())
    }

    /// Machines.
    pub fn machines(&self) -> Result<Vec<MachineInfo>> {
        self.db(|d| d.machines(now_ms(), DOWN_AFTER_MS))
    }

    /// Instances that exist (not discarded).
    pub fn instances(&self) -> Result<Vec<InstanceInfo>> {
        Ok(self
            .db(|d| d.instances())?
            .into_iter()
            .map(|r| r.info)
            .collect())
    }

    /// The event log after `after`.
    pub fn events(&self, after: u64, limit: u32) -> Result<Vec<vmatrix_core::api::Event>> {
        self.db(|d| d.events(after, limit))
    }

    /// Sends `cmd` to `machine`'s agent and waits for its end, at most as long as the work
    /// may take (the agent's task goes on if this gives up: heartbeats then settle it).
    async fn send(
        &self,
        machine: &MachineInfo,
        cmd: &AgentCommand,
        memory_mib: u32,
    ) -> Result<AgentReply> {
        let url = format!("http://{}/agent/v1/command", machine.address);
        let fail = |message: String| ControlError::Agent {
            machine: machine.name.clone(),
            message,
        };
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            // The agent gives up on its own after `work_limit`; twice that covers a boot too.
            .timeout(vmatrix_core::api::work_limit(memory_mib) * 2)
            .json(cmd)
            .send()
            .await
            .map_err(|e| ControlError::Unreachable {
                machine: machine.name.clone(),
                message: e.to_string(),
            })?;
        let status = resp.status();
        if status.is_success() {
            resp.json().await.map_err(|e| ControlError::Unreachable {
                machine: machine.name.clone(),
                message: format!("bad or cut reply: {e}"),
            })
        } else {
            let body: Option<ErrorBody> = resp.json().await.ok();
            Err(fail(format!(
                "{status}: {}",
                body.map_or_else(|| "no details".into(), |b| b.error)
            )))
        }
    }

    fn machine(&self, name: &str) -> Result<MachineInfo> {
        self.db(|d| d.machine(name, now_ms(), DOWN_AFTER_MS))?
            .ok_or_else(|| {
                ControlError::NotFound(format!("no machine {name}; `vmatrix machines` lists them"))
            })
    }

    fn spec_of(&self, service: &vmatrix_core::ServiceName) -> Result<ServiceSpec> {
        self.services()?
            .into_iter()
            .find(|s| s.name == *service)
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "no service {service}; `vmatrix services` lists them"
                ))
            })
    }

    /// The plan of an instance at `generation`: its service's sizes, and the image and version
    /// pinned in its row (the spec's current image only for a first activation).
    fn plan(spec: &ServiceSpec, row: &InstanceRow, generation: u64) -> Result<InstancePlan> {
        let image = if row.info.image.is_empty() {
            spec.image.clone()
        } else {
            vmatrix_core::ImageRef::parse(&row.info.image).map_err(|e| {
                ControlError::Conflict(format!("instance {}: its image {e}", row.info.id))
            })?
        };
        Ok(InstancePlan {
            id: row.info.id.clone(),
            generation,
            service: spec.name.clone(),
            image,
            version: (!row.info.version.is_empty()).then(|| row.info.version.clone()),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            port: spec.port,
            health: spec.health.clone(),
        })
    }

    /// Picks a machine for one instance of `spec`: an up, dedicated, non-draining machine with
    /// room, preferring fewer instances of the same service (spread), then the most free memory.
    fn place(&self, spec: &ServiceSpec, exclude: Option<&str>) -> Result<MachineInfo> {
        let machines = self.machines()?;
        let instances = self.db(|d| d.instances())?;
        let services: HashMap<_, _> = self
            .services()?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let mut best: Option<(u32, i64, MachineInfo)> = None;
        let mut reasons = Vec::new();
        for m in machines {
            if m.state != "up"
                || m.role != MachineRole::Dedicated
                || Some(m.name.as_str()) == exclude
            {
                reasons.push(format!("{}: {} {:?}", m.name, m.state, m.role));
                continue;
            }
            let here: Vec<&InstanceRow> = instances
                .iter()
                .filter(|r| r.info.machine == m.name && r.info.state.is_placed())
                .collect();
            // Sums in u64: a u32 sum of large specs must not wrap into "room".
            let (mut cpu, mut mem) = (0u64, 0u64);
            for r in &here {
                if let Some(s) = services.get(&r.info.service) {
                    cpu += u64::from(s.vcpus);
                    mem += u64::from(s.memory_mib);
                }
            }
            if cpu + u64::from(spec.vcpus) > u64::from(m.vcpus)
                || mem + u64::from(spec.memory_mib) > u64::from(m.memory_mib)
            {
                reasons.push(format!(
                    "{}: full ({cpu}/{} vCPU, {mem}/{} MiB)",
                    m.name, m.vcpus, m.memory_mib
                ));
                continue;
            }
            let same = here.iter().filter(|r| r.info.service == spec.name).count() as u32;
            let free = i64::from(m.memory_mib) - mem as i64;
            let better = match &best {
                None => true,
                Some((s, f, _)) => same < *s || (same == *s && free > *f),
            };
            if better {
                best = Some((same, free, m));
            }
        }
        best.map(|b| b.2).ok_or_else(|| {
            ControlError::Conflict(format!(
                "no machine can take an instance of {} ({} vCPU, {} MiB): {}",
                spec.name,
                spec.vcpus,
                spec.memory_mib,
                if reasons.is_empty() {
                    "no machines registered".into()
                } else {
                    reasons.join("; ")
                }
            ))
        })
    }

    /// Starts a new instance of `service` (on `on`, or where placement says).
    pub async fn activate(
        &self,
        service: &vmatrix_core::ServiceName,
        on: Option<&str>,
        why: &str,
    ) -> Result<InstanceInfo> {
        let spec = self.spec_of(service)?;
        let machine = match on {
            Some(name) => self.machine(name)?,
            None => self.place(&spec, None)?,
        };
        // The id, the busy claim and the row are made in one step under the database lock, so
        // that two activations at once never take the same id and no heartbeat sees the row
        // before it is claimed.
        let (mut row, _busy) = {
            let db = self
                .db
                .lock()
                .map_err(|_| ControlError::Conflict("state database lock poisoned".into()))?;
            let seq = db.next_seq(service)?;
            let id = InstanceId::new(format!("{service}-{seq}"))
                .map_err(|e| ControlError::Conflict(e.to_string()))?;
            let busy = self.claim(&id)?;
            let row = InstanceRow {
                info: InstanceInfo {
                    id: id.clone(),
                    service: service.clone(),
                    image: spec.image.to_string(),
                    version: String::new(),
                    machine: machine.name.clone(),
                    state: InstanceState::Activating,
                    endpoint: String::new(),
                    generation: 1,
                },
                saved: None,
                seq,
            };
            db.put_instance(&row)?;
            (row, busy)
        };
        let id = row.info.id.clone();
        let cmd = AgentCommand::Activate {
            plan: Self::plan(&spec, &row, 1)?,
            state: None,
        };
        match self.send(&machine, &cmd, spec.memory_mib).await {
            Ok(reply) => {
                row.info.endpoint = reply.endpoint.unwrap_or_default();
                // Pinned from now on: every later plan of this instance names this version.
                row.info.version = reply.version.unwrap_or_default();
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &format!("activate {id} on {}", machine.name),
                    why,
                    "started",
                );
                Ok(row.info)
            }
            Err(e) => {
                row.info.state = row.info.state.next(Transition::Fail)?;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &format!("activate {id} on {}", machine.name),
                    why,
                    &format!("failed: {e}"),
                );
                Err(e)
            }
        }
    }

    fn row(&self, id: &InstanceId) -> Result<InstanceRow> {
        self.db(|d| d.instance(id))?.ok_or_else(|| {
            ControlError::NotFound(format!("no instance {id}; `vmatrix ps` lists them"))
        })
    }

    /// Live-migrates a running instance to machine `to`.
    pub async fn migrate(&self, id: &InstanceId, to: &str, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        if row.info.state != InstanceState::Running {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a running instance migrates",
                row.info.state.as_str()
            )));
        }
        if row.info.machine == to {
            return Err(ControlError::Conflict(format!(
                "instance {id} already runs on {to}"
            )));
        }
        let spec = self.spec_of(&row.info.service)?;
        let source = self.machine(&row.info.machine)?;
        let dest = self.machine(to)?;
        if dest.state != "up" {
            return Err(ControlError::Conflict(format!(
                "machine {to} is {}",
                dest.state
            )));
        }
        let started = Instant::now();
        let what = format!("migrate {id} {} → {to}", source.name);
        let next_gen = row.info.generation + 1;
        let plan = Self::plan(&spec, &row, next_gen)?;
        row.info.state = row.info.state.next(Transition::MigrateStarted)?;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", &what, why, "started");
        let mem = spec.memory_mib;
        let discard_dest = || async {
            let _ = self
                .send(
                    &dest,
                    &AgentCommand::Discard {
                        id: id.clone(),
                        generation: next_gen,
                    },
                    mem,
                )
                .await;
        };
        let prep = match self
            .send(&dest, &AgentCommand::PrepareIncoming { plan }, mem)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                // Nothing moved: the source runs on. A destination that did start is
                // stopped (now, or by the heartbeat that reports it unwanted).
                discard_dest().await;
                return self.migration_ended(row, &what, why, Transition::Cancelled, e);
            }
        };
        let Some(target) = prep.target else {
            discard_dest().await;
            let e = ControlError::Agent {
                machine: dest.name.clone(),
                message: "no migration target in the reply".into(),
            };
            return self.migration_ended(row, &what, why, Transition::Cancelled, e);
        };
        let out = self
            .send(
                &source,
                &AgentCommand::MigrateOut {
                    id: id.clone(),
                    generation: row.info.generation,
                    target: target.clone(),
                },
                mem,
            )
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e @ ControlError::Agent { .. }) => {
                // The source answered: the move failed and the guest runs on there.
                discard_dest().await;
                return self.migration_ended(row, &what, why, Transition::Cancelled, e);
            }
            Err(e) => {
                // No answer: the move may have finished or not. The row stays `migrating`
                // until the two machines' reports settle it (see `settle`).
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                return Err(e);
            }
        };
        let finished = self
            .send(
                &dest,
                &AgentCommand::FinishIncoming {
                    id: id.clone(),
                    generation: next_gen,
                },
                mem,
            )
            .await;
        match finished {
            Ok(_) => {
                row.info.machine = dest.name.clone();
                row.info.generation = next_gen;
                row.info.endpoint = target.endpoint;
                row.info.state = row.info.state.next(Transition::Moved)?;
                self.db(|d| d.put_instance(&row))?;
                let (total, down) = out.migration_ms.unwrap_or((0, 0));
                let outcome = format!(
                    "ok in {:.2}s (QEMU total {total} ms, downtime {down} ms)",
                    started.elapsed().as_secs_f64()
                );
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The source has ended and the destination could not run it.
                row.info.machine = dest.name.clone();
                row.info.generation = next_gen;
                self.migration_ended(row, &what, why, Transition::Fail, e)
            }
            Err(e) => {
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
        }
    }

    /// Records how a migration that did not succeed ended, and returns its error.
    fn migration_ended(
        &self,
        mut row: InstanceRow,
        what: &str,
        why: &str,
        t: Transition,
        e: ControlError,
    ) -> Result<String> {
        row.info.state = row.info.state.next(t)?;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", what, why, &format!("failed: {e}"));
        Err(e)
    }

    /// Suspends a running instance into the repository.
    pub async fn suspend(&self, id: &InstanceId, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        if row.info.state != InstanceState::Running {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a running instance suspends",
                row.info.state.as_str()
            )));
        }
        let machine = self.machine(&row.info.machine)?;
        let memory = self
            .spec_of(&row.info.service)
            .map_or(4096, |s| s.memory_mib);
        let what = format!("suspend {id} on {}", machine.name);
        row.info.state = row.info.state.next(Transition::SuspendStarted)?;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", &what, why, "started");
        let started = Instant::now();
        match self
            .send(
                &machine,
                &AgentCommand::Suspend {
                    id: id.clone(),
                    generation: row.info.generation,
                },
                memory,
            )
            .await
        {
            Ok(reply) => {
                self.settle_suspended(&mut row, reply.saved)?;
                let outcome = format!("ok in {:.2}s", started.elapsed().as_secs_f64());
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The agent gave up and let the guest run on: it is as it was.
                row.info.state = row.info.state.next(Transition::Cancelled)?;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &what,
                    why,
                    &format!("failed, still running: {e}"),
                );
                Err(e)
            }
            Err(e) => {
                // No answer: the suspend may go on there; the agent's reports settle it.
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
        }
    }

    /// Records that `row` is suspended into `saved`.
    fn settle_suspended(&self, row: &mut InstanceRow, saved: Option<SavedState>) -> Result<()> {
        if saved.is_none() {
            return Err(ControlError::Conflict(format!(
                "instance {}: the agent did not say where its state went",
                row.info.id
            )));
        }
        row.saved = saved;
        row.info.state = row.info.state.next(Transition::Suspended)?;
        row.info.machine = String::new();
        row.info.endpoint = String::new();
        self.db(|d| d.put_instance(row))?;
        Ok(())
    }

    /// Resumes a suspended instance (on `on`, or where placement says).
    pub async fn resume(&self, id: &InstanceId, on: Option<&str>, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        let Some(saved) = row
            .saved
            .clone()
            .filter(|_| row.info.state == InstanceState::Suspended)
        else {
            return Err(ControlError::Conflict(format!(
                "instance {id} is {}; only a suspended instance resumes",
                row.info.state.as_str()
            )));
        };
        let spec = self.spec_of(&row.info.service)?;
        let machine = match on {
            Some(n) => self.machine(n)?,
            None => self.place(&spec, None)?,
        };
        let what = format!("resume {id} on {}", machine.name);
        row.info.generation += 1;
        row.info.machine = machine.name.clone();
        row.info.state = row.info.state.next(Transition::Resume)?;
        self.db(|d| d.put_instance(&row))?;
        let started = Instant::now();
        let cmd = AgentCommand::Activate {
            plan: Self::plan(&spec, &row, row.info.generation)?,
            state: Some(saved),
        };
        match self.send(&machine, &cmd, spec.memory_mib).await {
            Ok(reply) => {
                row.info.endpoint = reply.endpoint.unwrap_or_default();
                // It runs from the saved state now, which the agent removes: superseded.
                row.saved = None;
                self.db(|d| d.put_instance(&row))?;
                let outcome = format!("ok in {:.2}s", started.elapsed().as_secs_f64());
                self.event("controller", &what, why, &outcome);
                Ok(outcome)
            }
            Err(e @ ControlError::Agent { .. }) => {
                // The saved state is still in the repository: stay suspended.
                row.info.state = InstanceState::Suspended;
                row.info.machine = String::new();
                self.db(|d| d.put_instance(&row))?;
                self.event("controller", &what, why, &format!("failed: {e}"));
                Err(e)
            }
            Err(e) => {
                // No answer: it may run there; its reports settle it (or, if it never shows
                // up, it goes back to suspended: its saved state is still there).
                self.event("controller", &what, why, &format!("unsettled: {e}"));
                Err(e)
            }
        }
    }

    /// Throws an instance away.
    pub async fn discard(&self, id: &InstanceId, why: &str) -> Result<String> {
        let _busy = self.claim(id)?;
        let mut row = self.row(id)?;
        // Discard is legal from failed, suspended, activating and running; a row stuck in
        // migrating or suspending is first declared failed (its machines' reports decide
        // nothing any more: an operator chose to throw it away).
        if matches!(
            row.info.state,
            InstanceState::Migrating | InstanceState::Suspending
        ) {
            row.info.state = row.info.state.next(Transition::Fail)?;
        }
        let next = row.info.state.next(Transition::Discard)?;
        if !row.info.machine.is_empty() {
            match self.machine(&row.info.machine) {
                // A machine that is down is not called: its agent stops the VM when it is back
                // (the controller no longer wants it there).
                Ok(machine) if machine.state != "down" => {
                    if let Err(e) = self
                        .send(
                            &machine,
                            &AgentCommand::Discard {
                                id: id.clone(),
                                generation: row.info.generation,
                            },
                            0,
                        )
                        .await
                    {
                        tracing::warn!("discard {id}: {e}");
                    }
                }
                _ => {}
            }
        }
        row.info.state = next;
        self.db(|d| d.put_instance(&row))?;
        self.event("controller", &format!("discard {id}"), why, "ok");
        Ok("discarded".into())
    }

    /// Moves every instance off a machine and stops placing there.
    pub async fn drain(&self, machine: &str, why: &str) -> Result<String> {
        if !self.db(|d| d.set_draining(machine, true))? {
            return Err(ControlError::NotFound(format!("no machine {machine}")));
        }
        let mut moved = 0;
        for row in self.db(|d| d.instances())? {
            if row.info.machine == machine && row.info.state == InstanceState::Running {
                let spec = self.spec_of(&row.info.service)?;
                let dest = self.place(&spec, Some(machine))?;
                self.migrate(&row.info.id, &dest.name, why).await?;
                moved += 1;
            }
        }
        self.event(
            "controller",
            &format!("drain {machine}"),
            why,
            &format!("ok, {moved} moved"),
        );
        Ok(format!("{moved} instance(s) moved off {machine}"))
    }

    /// Each machine with the number of instances placed on it (activating, running, migrating
    /// or suspending). A healthy dedicated machine with none is free: it can be powered down.
    pub fn machine_use(&self) -> Result<Vec<(MachineInfo, usize)>> {
        let mut placed: HashMap<String, usize> = HashMap::new();
        for r in self.db(|d| d.instances())? {
            if matches!(
                r.info.state,
                InstanceState::Activating
                    | InstanceState::Running
                    | InstanceState::Migrating
                    | InstanceState::Suspending
            ) {
                *placed.entry(r.info.machine).or_default() += 1;
            }
        }
        Ok(self
            .machines()?
            .into_iter()
            .map(|m| {
                let n = placed.get(&m.name).copied().unwrap_or(0);
                (m, n)
            })
            .collect())
    }

    /// A machine's CPU load measured from its heartbeats (busy fraction of its vCPUs; 0 until
    /// two heartbeats came).
    pub fn cpu_load(&self, machine: &str) -> f64 {
        self.cpu
            .lock()
            .ok()
            .and_then(|c| c.get(machine).map(|m| m.load))
            .unwrap_or(0.0)
    }

    /// Services marked dropped, and whether the policy (not an operator) did it.
    pub fn dropped(&self) -> Result<Vec<(String, bool)>> {
        self.db(|d| d.dropped())
    }

    /// The switch's route table: running instances per service, dropped marks, and a version
    /// that changes whenever any of it does.
    pub fn routes(&self) -> Result<vmatrix_core::api::RouteTable> {
        let services = self.services()?;
        let rows = self.db(|d| d.instances())?;
        let dropped = self.db(|d| d.dropped())?;
        let mut out = vmatrix_core::api::RouteTable::default();
        for s in services {
            let backends: Vec<(InstanceId, String)> = rows
                .iter()
                // A migrating instance serves from its source until the switch-over; requests
                // that hit the gap are retried by the switch.
                .filter(|r| {
                    r.info.service == s.name
                        && matches!(
                            r.info.state,
                            InstanceState::Running | InstanceState::Migrating
                        )
                        && !r.info.endpoint.is_empty()
                })
                .map(|r| (r.info.id.clone(), r.info.endpoint.clone()))
                .collect();
            let mark = dropped.iter().find(|(d, _)| d == s.name.as_str());
            // Short of capacity, the running instances keep serving what they can.
            let admit_rps = match mark {
                Some((_, true)) => backends.len() as f64 * s.capacity_rps,
                _ => 0.0,
            };
            out.services.push(vmatrix_core::api::ServiceRoute {
                dropped: mark.is_some(),
                admit_rps,
                service: s.name,
                priority: s.priority,
                backends,
            });
        }
        let bytes = serde_json::to_vec(&out.services).unwrap_or_default();
        out.version = blake3::hash(&bytes).to_hex()[..16].to_string();
        Ok(out)
    }

    /// Stores the switch's load report (the policy's demand input).
    pub fn set_load(&self, report: vmatrix_core::api::LoadReport) {
        if let Ok(mut l) = self.load.lock() {
            *l = Some(report);
        }
    }

    /// The latest load report.
    pub fn load(&self) -> vmatrix_core::api::LoadReport {
        self.load
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_default()
    }

    /// Brings a dormant service back: resumes a suspended instance, or starts one.
    pub async fn wake(&self, service: &vmatrix_core::ServiceName) -> Result<String> {
        self.spec_of(service)?;
        let rows = self.db(|d| d.instances())?;
        let mine: Vec<&InstanceRow> = rows.iter().filter(|r| r.info.service == *service).collect();
        if mine.iter().any(|r| {
            matches!(
                r.info.state,
                InstanceState::Activating | InstanceState::Running | InstanceState::Migrating
            )
        }) {
            return Ok(format!("{service} is already awake or waking"));
        }
        let why = "a request arrived for a dormant service";
        if let Some(r) = mine
            .iter()
            .find(|r| r.info.state == InstanceState::Suspended)
        {
            return self.resume(&r.info.id, None, why).await;
        }
        self.activate(service, None, why)
            .await
            .map(|i| format!("{} activating on {}", i.id, i.machine))
    }

    fn set_dropped(
        &self,
        service: &vmatrix_core::ServiceName,
        dropped: bool,
        who: &str,
        why: &str,
    ) -> Result<String> {
        self.spec_of(service)?;
        let changed = self.db(|d| d.set_dropped(service, dropped, who == "policy"))?;
        let what = if dropped { "drop" } else { "undrop" };
        if changed {
            self.event(who, &format!("{what} {service}"), why, "ok");
        }
        Ok(format!(
            "{service} {}",
            if dropped {
                "dropped: the switch refuses its requests"
            } else {
                "no longer dropped"
            }
        ))
    }

    /// Runs a manual operation to completion.
    pub async fn operate(&self, op: Operation) -> Result<String> {
        let why = "operator request";
        match op {
            Operation::Activate { service, on } => self
                .activate(&service, on.as_deref(), why)
                .await
                .map(|i| format!("{} activating on {}", i.id, i.machine)),
            Operation::Suspend { instance } => self.suspend(&instance, why).await,
            Operation::Resume { instance, on } => self.resume(&instance, on.as_deref(), why).await,
            Operation::Migrate { instance, to } => self.migrate(&instance, &to, why).await,
            Operation::Discard { instance } => self.discard(&instance, why).await,
            Operation::Drain { machine } => self.drain(&machine, why).await,
            Operation::Wake { service } => self.wake(&service).await,
            Operation::Drop { service } => self.set_dropped(&service, true, "api", why),
            Operation::Undrop { service } => self.set_dropped(&service, false, "api", why),
        }
    }

    /// Takes in an agent's heartbeat: the machine's capacity and what really runs there.
    pub async fn heartbeat(self: &Arc<Self>, report: AgentReport) -> Result<()> {
        let info = MachineInfo {
            name: report.name.clone(),
            address: report.address.clone(),
            role: report.role,
            vcpus: report.vcpus,
            memory_mib: report.memory_mib,
            state: "up".into(),
        };
        let first = self
            .heard
            .lock()
            .map(|mut h| h.insert(report.name.clone()))
            .unwrap_or(false);
        self.db(|d| d.upsert_machine(&info, now_ms()))?;
        if let Ok(mut cpu) = self.cpu.lock() {
            let seconds: Vec<(InstanceId, f64)> = report
                .instances
                .iter()
                .filter(|i| i.state == InstanceState::Running)
                .map(|i| (i.id.clone(), i.cpu_seconds))
                .collect();
            cpu.entry(report.name.clone()).or_default().observe(
                Instant::now(),
                report.vcpus,
                &seconds,
            );
        }
        if first {
            self.event(
                &report.name,
                "register",
                &format!("agent at {}", report.address),
                "ok",
            );
        }
        if let Ok(mut reports) = self.reports.lock() {
            reports.insert(report.name.clone(), report.clone());
        }
        self.settle(&report, &info)
    }

    /// Whether `machine`'s latest report (since this process started) lists `id`; `None` if
    /// no report came from it yet.
    fn machine_has(&self, machine: &str, id: &InstanceId) -> Option<bool> {
        let reports = self.reports.lock().ok()?;
        let r = reports.get(machine)?;
        Some(r.instances.iter().any(|i| i.id == *id))
    }

    /// Compares one machine's report with the rows and settles every difference: instances
    /// that came up, failed, finished or gave up an operation while nobody watched (this
    /// process started after the operation, or its call to the agent got no answer); copies
    /// the controller does not want there are stopped; instances the machine lost fail.
    fn settle(self: &Arc<Self>, report: &AgentReport, info: &MachineInfo) -> Result<()> {
        use InstanceState as S;
        let rows: HashMap<InstanceId, InstanceRow> = self
            .db(|d| d.instances())?
            .into_iter()
            .map(|r| (r.info.id.clone(), r))
            .collect();
        let mut reported = HashSet::new();
        for inst in &report.instances {
            reported.insert(inst.id.clone());
            if self.is_busy(&inst.id) {
                continue;
            }
            let unsettled = self.is_unsettled(&inst.id);
            match rows.get(&inst.id) {
                Some(row)
                    if row.info.machine == report.name
                        && row.info.generation == inst.generation =>
                {
                    let mut row = row.clone();
                    if row.info.version.is_empty() && !inst.version.is_empty() {
                        // A row from before versions were pinned learns its version here.
                        row.info.version = inst.version.clone();
                        self.db(|d| d.put_instance(&row))?;
                    }
                    let step = match (row.info.state, inst.state) {
                        (S::Activating, S::Running) => Some(Transition::Ready),
                        (S::Suspending, S::Suspended) => Some(Transition::Suspended),
                        // A suspend or a move that gave up: the guest runs on here.
                        (S::Suspending | S::Migrating, S::Running) if !unsettled => {
                            Some(Transition::Cancelled)
                        }
                        (s, S::Failed) if s != S::Failed => Some(Transition::Fail),
                        _ => None,
                    };
                    let Some(step) = step else { continue };
                    if step == Transition::Suspended {
                        self.settle_suspended(&mut row, inst.saved.clone())?;
                    } else {
                        row.info.state = row.info.state.next(step)?;
                        row.info.endpoint = inst.endpoint.clone();
                        self.db(|d| d.put_instance(&row))?;
                    }
                    let outcome = inst
                        .error
                        .clone()
                        .map_or("ok".into(), |e| format!("failed: {e}"));
                    self.event(
                        &report.name,
                        &format!("{} {}", inst.id, row.info.state.as_str()),
                        "agent report",
                        &outcome,
                    );
                }
                Some(row)
                    if row.info.state == S::Migrating
                        && inst.generation == row.info.generation + 1 =>
                {
                    match inst.state {
                        S::Running => {
                            // A migration finished while no controller watched: adopt it
                            // where it runs.
                            let mut row = row.clone();
                            row.info.machine = report.name.clone();
                            row.info.generation = inst.generation;
                            row.info.endpoint = inst.endpoint.clone();
                            row.info.state = row.info.state.next(Transition::Moved)?;
                            self.db(|d| d.put_instance(&row))?;
                            self.event(
                                "controller",
                                &format!("adopt {} on {}", inst.id, report.name),
                                "its migration finished while no controller watched",
                                "ok",
                            );
                        }
                        S::Migrating
                            if self.machine_has(&row.info.machine, &inst.id) == Some(false) =>
                        {
                            // The source has sent it and ended: only the destination's
                            // continue is missing.
                            self.spawn_finish(row.clone(), info.clone(), inst.generation);
                        }
                        _ => {}
                    }
                }
                _ if unsettled => {}
                _ => {
                    // Not wanted here (unknown, discarded, moved away, an older generation, or
                    // the record of a suspend the controller has already settled).
                    let machine = info.clone();
                    let cmd = AgentCommand::Discard {
                        id: inst.id.clone(),
                        generation: inst.generation,
                    };
                    let me = self.clone();
                    let id = inst.id.clone();
                    tokio::spawn(async move {
                        let outcome = match me.send(&machine, &cmd, 0).await {
                            Ok(_) => "ok".to_string(),
                            Err(e) => format!("failed: {e}"),
                        };
                        me.event(
                            "controller",
                            &format!("stop unwanted {id} on {}", machine.name),
                            "the controller does not want it there",
                            &outcome,
                        );
                    });
                }
            }
        }
        // Instances the controller placed here that the agent no longer has are lost.
        for row in rows.values() {
            if row.info.machine != report.name
                || reported.contains(&row.info.id)
                || self.is_unsettled(&row.info.id)
            {
                continue;
            }
            let mut row = row.clone();
            let why = match row.info.state {
                // A resume that never started: its saved state is still in the repository.
                S::Activating if row.saved.is_some() => {
                    row.info.state = S::Suspended;
                    row.info.machine = String::new();
                    "its resume never started there; it stays suspended"
                }
                S::Running | S::Activating | S::Suspending => {
                    row.info.state = row.info.state.next(Transition::Fail)?;
                    "its machine no longer runs it"
                }
                // A migrating row's source may have handed it over: the destination's report
                // settles it (or `settle_orphans`).
                S::Migrating | S::Suspended | S::Failed | S::Discarded => continue,
            };
            self.db(|d| d.put_instance(&row))?;
            self.event(
                &report.name,
                &format!("{} {}", row.info.id, row.info.state.as_str()),
                why,
                "lost",
            );
        }
        Ok(())
    }

    /// Sends the missing `FinishIncoming` of a migration whose controller died between the
    /// source's end and the destination's continue.
    fn spawn_finish(self: &Arc<Self>, row: InstanceRow, dest: MachineInfo, generation: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(_busy) = me.claim(&row.info.id) else {
                return;
            };
            let memory = me.spec_of(&row.info.service).map_or(4096, |s| s.memory_mib);
            let cmd = AgentCommand::FinishIncoming {
                id: row.info.id.clone(),
                generation,
            };
            let what = format!("finish the migration of {} on {}", row.info.id, dest.name);
            match me.send(&dest, &cmd, memory).await {
                Ok(reply) => {
                    let mut row = row;
                    row.info.machine = dest.name.clone();
                    row.info.generation = generation;
                    row.info.endpoint = reply.endpoint.unwrap_or_default();
                    let moved = row.info.state.next(Transition::Moved);
                    if let Ok(state) = moved {
                        row.info.state = state;
                        let _ = me.db(|d| d.put_instance(&row));
                    }
                    me.event(
                        "controller",
                        &what,
                        "its controller stopped mid-migration",
                        "ok",
                    );
                }
                Err(e) => me.event(
                    "controller",
                    &what,
                    "its controller stopped mid-migration",
                    &format!("failed: {e}"),
                ),
            }
        });
    }

    /// Rows left `migrating` or `suspending` by an earlier process that no machine reports
    /// any more (every machine has reported since this process started): failed, so that the
    /// service gets a replacement.
    fn settle_orphans(&self, rows: &[InstanceRow], machines: &[MachineInfo]) -> Result<()> {
        let reports = match self.reports.lock() {
            Ok(r) => r.clone(),
            Err(_) => return Ok(()),
        };
        let all_heard = machines
            .iter()
            .filter(|m| m.state != "down")
            .all(|m| reports.contains_key(&m.name));
        if !all_heard {
            return Ok(());
        }
        for row in rows {
            if !matches!(
                row.info.state,
                InstanceState::Migrating | InstanceState::Suspending
            ) || self.is_unsettled(&row.info.id)
            {
                continue;
            }
            let anywhere = reports
                .values()
                .any(|r| r.instances.iter().any(|i| i.id == row.info.id));
            if !anywhere {
                let mut row = row.clone();
                row.info.state = row.info.state.next(Transition::Fail)?;
                self.db(|d| d.put_instance(&row))?;
                self.event(
                    "controller",
                    &format!("{} failed", row.info.id),
                    "no machine has it after an interrupted operation",
                    "lost",
                );
            }
        }
        Ok(())
    }

    /// One reconcile pass: replace failed instances, keep every service's `min` running, and
    /// remove instances of services no longer declared. Level-triggered: it only compares the
    /// desired and the observed state, whatever happened before.
    pub async fn reconcile(self: &Arc<Self>) -> Result<()> {
        let services = self.services()?;
        let rows = self.db(|d| d.instances())?;
        let machines = self.machines()?;
        let grace = self.started.elapsed() > Duration::from_millis(DOWN_AFTER_MS * 2);
        let down = self.confirmed_down(&machines);
        if grace {
            self.settle_orphans(&rows, &machines)?;
        }
        for row in &rows {
            if self.is_busy(&row.info.id) {
                continue;
            }
            let on_down_machine =
                row.info.state.is_placed() && grace && down.contains(&row.info.machine);
            if on_down_machine {
                let mut r = row.clone();
                r.info.state = r.info.state.next(Transition::Fail)?;
                self.db(|d| d.put_instance(&r))?;
                self.event(
                    "controller",
                    &format!("{} failed", r.info.id),
                    &format!("machine {} is down", r.info.machine),
                    "lost",
                );
                continue;
            }
            let declared = services.iter().any(|s| s.name == row.info.service);
            if row.info.state == InstanceState::Failed || !declared {
                let why = if declared {
                    "replace a failed instance"
                } else {
                    "its service was removed"
                };
                let (me, id) = (self.clone(), row.info.id.clone());
                self.spawn_work(async move { me.discard(&id, why).await.map(drop) });
            }
        }
        if self.policy.load(std::sync::atomic::Ordering::Relaxed) {
            return self.run_policy(&services);
        }
        let rows = self.db(|d| d.instances())?;
        for spec in &services {
            let live = rows
                .iter()
                .filter(|r| {
                    r.info.service == spec.name
                        && matches!(
                            r.info.state,
                            InstanceState::Activating
                                | InstanceState::Running
                                | InstanceState::Migrating
                        )
                })
                .count() as u32;
            if live < spec.min {
                // One at a time per service: the next tick sees it and starts the next.
                let (me, name, min) = (self.clone(), spec.name.clone(), spec.min);
                self.spawn_work(async move {
                    me.activate(&name, None, &format!("keep min {min} of {name}"))
                        .await
                        .map(drop)
                });
            }
        }
        Ok(())
    }

    /// Runs agent work from the reconcile loop as a task of its own, so that one slow or hung
    /// machine never holds the loop; at most 16 at once (false: none free, try next tick).
    fn spawn_work(
        self: &Arc<Self>,
        work: impl std::future::Future<Output = Result<()>> + Send + 'static,
    ) -> bool {
        let Ok(permit) = self.work.clone().try_acquire_owned() else {
            return false;
        };
        tokio::spawn(async move {
            if let Err(e) = work.await {
                // Level-triggered: the next tick sees the new state and tries again.
                tracing::warn!("reconcile: {e}");
            }
            drop(permit);
        });
        true
    }

    /// Machines without heartbeats whose agent did not answer a direct probe either: only
    /// those are down for the instances on them. A probe runs in the background; until it
    /// failed, the machine gets the benefit of the doubt.
    fn confirmed_down(self: &Arc<Self>, machines: &[MachineInfo]) -> HashSet<String> {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.retain(|name, _| {
            machines
                .iter()
                .any(|m| &m.name == name && m.state == "down")
        });
        let mut down = HashSet::new();
        for m in machines.iter().filter(|m| m.state == "down") {
            match probes.get(&m.name) {
                Some(Probe::Failed) => {
                    down.insert(m.name.clone());
                }
                Some(Probe::Running) => {}
                None => {
                    probes.insert(m.name.clone(), Probe::Running);
                    let (me, machine) = (self.clone(), m.clone());
                    tokio::spawn(async move { me.probe(machine).await });
                }
            }
        }
        down
    }

    async fn probe(&self, machine: MachineInfo) {
        let answered = self
            .http
            .get(format!("http://{}/agent/v1/status", machine.address))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if answered {
            // Alive, its heartbeats are late: it counts as heard now.
            let _ = self.db(|d| {
                d.upsert_machine(
                    &MachineInfo {
                        state: "up".into(),
                        ..machine.clone()
                    },
                    now_ms(),
                )
            });
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&machine.name);
        } else {
            self.probes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(machine.name.clone(), Probe::Failed);
            self.event(
                "controller",
                &format!("machine {} down", machine.name),
                "no heartbeat, and no answer to a direct probe",
                "ok",
            );
        }
    }

    /// Sets the season the policy's forecast looks back over (zero: no forecast), and how far
    /// past now it looks. Forgets what was learnt.
    pub fn set_season(&self, period: Duration, ahead: Duration) {
        *self.season.lock().unwrap_or_else(|p| p.into_inner()) = Season::new(period, ahead);
    }

    /// The demand one season ago, a little ahead of now, for `service` (0 while unknown).
    fn forecast(&self, service: &str) -> f64 {
        let at = self.started.elapsed();
        self.season.lock().map_or(0.0, |s| s.forecast(service, at))
    }

    /// Turns the load-driven policy on (server switching, drop, consolidation) or off (keep `min`).
    pub fn set_policy(&self, on: bool) {
        self.policy.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Appends this tick's demand sample per service, from the switch's latest report.
    fn sample_demand(&self, services: &[ServiceSpec]) -> HashMap<String, Vec<f64>> {
        let load = self.load();
        let mut d = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        d.retain(|name, _| services.iter().any(|s| s.name.as_str() == name));
        let at = self.started.elapsed();
        let mut season = self.season.lock().unwrap_or_else(|p| p.into_inner());
        season.retain(|name| services.iter().any(|s| s.name.as_str() == name));
        for s in services {
            let rps = load.services.get(s.name.as_str()).map_or(0.0, |l| l.rps);
            season.record(s.name.as_str(), at, rps);
            let h = d.entry(s.name.to_string()).or_default();
            h.push_back(rps);
            while h.len() > DEMAND_HISTORY {
                h.pop_front();
            }
        }
        d.iter()
            .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
            .collect()
    }

    /// One policy pass: build the snapshot, call the pure `decide`, carry out the plan.
    fn run_policy(self: &Arc<Self>, services: &[ServiceSpec]) -> Result<()> {
        use vmatrix_policy as p;
        let demand = self.sample_demand(services);
        let dropped = self.db(|d| d.dropped())?;
        let machines = self.machines()?;
        let rows = self.db(|d| d.instances())?;
        let machine_index: HashMap<&str, usize> = machines
            .iter()
            .enumerate()
            .map(|(k, m)| (m.name.as_str(), k))
            .collect();
        let service_index: HashMap<&str, usize> = services
            .iter()
            .enumerate()
            .map(|(k, s)| (s.name.as_str(), k))
            .collect();
        let snapshot = p::Snapshot {
            now_s: self.started.elapsed().as_secs_f64(),
            machines: machines
                .iter()
                .map(|m| p::Machine {
                    name: m.name.clone(),
                    dedicated: m.role == MachineRole::Dedicated && m.state != "draining",
                    vcpus: m.vcpus,
                    memory_mib: m.memory_mib,
                    healthy: m.state != "down",
                    cpu_load: self.cpu_load(&m.name),
                })
                .collect(),
            services: services
                .iter()
                .map(|s| p::Service {
                    name: s.name.to_string(),
                    priority: s.priority,
                    capacity_rps: s.capacity_rps,
                    min: s.min,
                    max: s.max,
                    vcpus: s.vcpus,
                    memory_mib: s.memory_mib,
                    demand: demand.get(s.name.as_str()).cloned().unwrap_or_default(),
                    forecast_rps: self.forecast(s.name.as_str()),
                    // The policy manages its own drops only.
                    dropped: dropped.iter().any(|(d, by)| *by && d == s.name.as_str()),
                })
                .collect(),
            // Instances of undeclared services were discarded above.
            instances: rows
                .iter()
                .filter_map(|r| {
                    Some(p::Instance {
                        id: r.info.id.to_string(),
                        service: *service_index.get(r.info.service.as_str())?,
                        // A machine the controller no longer knows is a dead one.
                        machine: (!r.info.machine.is_empty()).then(|| {
                            machine_index
                                .get(r.info.machine.as_str())
                                .copied()
                                .unwrap_or(usize::MAX)
                        }),
                        state: match r.info.state {
                            InstanceState::Running => p::InstanceState::Running,
                            InstanceState::Suspended => p::InstanceState::Suspended,
                            InstanceState::Failed => p::InstanceState::Failed,
                            InstanceState::Activating
                            | InstanceState::Migrating
                            | InstanceState::Suspending
                            | InstanceState::Discarded => p::InstanceState::Starting,
                        },
                    })
                })
                .collect(),
        };
        let config = p::Config {
            scale_out_window: 5,
            scale_in_window: 60,
            ..p::Config::default()
        };
        let instance = |k: usize| -> Result<InstanceId> {
            let i = snapshot
                .instances
                .get(k)
                .ok_or_else(|| ControlError::Conflict(format!("policy named instance #{k}")))?;
            InstanceId::new(&i.id).map_err(|e| ControlError::Conflict(e.to_string()))
        };
        let machine = |k: usize| -> Result<&str> {
            snapshot
                .machines
                .get(k)
                .map(|m| m.name.as_str())
                .ok_or_else(|| ControlError::Conflict(format!("policy named machine #{k}")))
        };
        let service = |k: usize| -> Result<&ServiceSpec> {
            services
                .get(k)
                .ok_or_else(|| ControlError::Conflict(format!("policy named service #{k}")))
        };
        for action in p::decide(&snapshot, &config) {
            // Names are resolved now; the agent work runs as its own task (`spawn_work`).
            let me = self.clone();
            let result = match &action {
                p::Action::Activate {
                    service: s,
                    machine: m,
                    reason,
                } => service(*s).and_then(|s| {
                    let (name, m, reason) =
                        (s.name.clone(), machine(*m)?.to_owned(), reason.clone());
                    self.spawn_work(async move {
                        me.activate(&name, Some(&m), &reason).await.map(drop)
                    });
                    Ok(())
                }),
                p::Action::Resume {
                    instance: i,
                    machine: m,
                    reason,
                } => instance(*i).and_then(|i| {
                    let (m, reason) = (machine(*m)?.to_owned(), reason.clone());
                    self.spawn_work(
                        async move { me.resume(&i, Some(&m), &reason).await.map(drop) },
                    );
                    Ok(())
                }),
                p::Action::Suspend {
                    instance: i,
                    reason,
                } => instance(*i).map(|i| {
                    let reason = reason.clone();
                    self.spawn_work(async move { me.suspend(&i, &reason).await.map(drop) });
                }),
                p::Action::Migrate {
                    instance: i,
                    to,
                    reason,
                } => instance(*i).and_then(|i| {
                    let (m, reason) = (machine(*to)?.to_owned(), reason.clone());
                    self.spawn_work(async move { me.migrate(&i, &m, &reason).await.map(drop) });
                    Ok(())
                }),
                p::Action::Discard {
                    instance: i,
                    reason,
                } => instance(*i).map(|i| {
                    let reason = reason.clone();
                    self.spawn_work(async move { me.discard(&i, &reason).await.map(drop) });
                }),
                p::Action::Drop { service: s, reason } => service(*s)
                    .and_then(|s| self.set_dropped(&s.name, true, "policy", reason).map(drop)),
                p::Action::Undrop { service: s, reason } => service(*s)
                    .and_then(|s| self.set_dropped(&s.name, false, "policy", reason).map(drop)),
            };
            if let Err(e) = result {
                // Level-triggered: the next tick sees the new state and tries again.
                tracing::warn!("policy action {action:?}: {e}");
            }
        }
        Ok(())
    }

    /// Runs [`Controller::reconcile`] every `period` until the process ends.
    pub async fn run_loop(self: Arc<Self>, period: Duration) {
        loop {
            if let Err(e) = self.reconcile().await {
                tracing::warn!("reconcile: {e}");
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Applies the retention every hour: settled operations and discarded instances older
    /// than a day are forgotten, and the event log keeps its newest 100,000 entries.
    pub async fn prune_loop(self: Arc<Self>) {
        loop {
            let day_ago = now_ms().saturating_sub(24 * 3600 * 1000);
            if let Err(e) = self.db(|d| d.prune(day_ago, 100_000)) {
                tracing::warn!("retention: {e}");
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_season_forecasts_what_came_one_period_ago_a_little_ahead() {
        // A season of 2016 s: one-second buckets; look 3 s ahead.
        let mut s = Season::new(Duration::from_secs(2016), Duration::from_secs(3));
        let at = |secs: u64| Duration::from_secs(secs);
        let mut seen = HashMap::new();
        for t in 0..2200 {
            let rps = if (100..110).contains(&t) { 500.0 } else { 10.0 };
            s.record("web", at(t), rps);
            // Asked, as the controller does, right after each sample.
            seen.insert(t, s.forecast("web", at(t)));
        }
        assert_eq!(seen[&1000], 0.0, "not a whole season known yet");
        assert_eq!(seen[&(2016 + 50)], 10.0, "a quiet time last season");
        assert_eq!(seen[&(2016 + 96)], 10.0);
        assert_eq!(seen[&(2016 + 97)], 500.0, "3 s before last season's spike");
        assert_eq!(seen[&(2016 + 109)], 500.0);
        assert_eq!(seen[&(2016 + 110)], 10.0, "after it");
        assert_eq!(s.forecast("nope", at(2100)), 0.0);
        // Kept bounded: about one season of buckets.
        assert!(s.history["web"].len() <= 2016 + 3 + 2);
        let mut off = Season::new(Duration::ZERO, Duration::ZERO);
        off.record("web", at(5), 100.0);
        assert!(off.history.is_empty());
    }

    #[test]
    fn machine_load_is_cpu_seconds_over_time_and_vcpus() {
        let mut m = CpuMeter::default();
        let t0 = Instant::now();
        let a = InstanceId::new("web-1").expect("id");
        let b = InstanceId::new("web-2").expect("id");
        m.observe(t0, 2, &[(a.clone(), 10.0)]);
        assert_eq!(m.load, 0.0, "one heartbeat tells nothing");
        // 1 s later: web-1 used 1.6 CPU-s, web-2 is new (no rate yet) → 1.6 / 1 s / 2 vCPUs.
        m.observe(
            t0 + Duration::from_secs(1),
            2,
            &[(a.clone(), 11.6), (b.clone(), 3.0)],
        );
        assert!((m.load - 0.3 * 0.8).abs() < 1e-9, "{}", m.load);
        // Steady 0.8 for a while converges to 0.8; a restarted QEMU (counter back to 0) adds 0.
        let mut t = t0 + Duration::from_secs(1);
        let (mut ca, mut cb) = (11.6, 3.0);
        for _ in 0..40 {
            t += Duration::from_secs(1);
            ca += 0.8;
            cb += 0.8;
            m.observe(t, 2, &[(a.clone(), ca), (b.clone(), cb)]);
        }
        assert!((m.load - 0.8).abs() < 0.01, "{}", m.load);
        m.observe(t + Duration::from_secs(1), 2, &[(a, 0.0), (b, cb + 0.8)]);
        assert!(m.load < 0.8, "{}", m.load);
    }
}
