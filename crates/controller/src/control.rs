//! The [`Controller`] itself: its state (the database, the busy set, what it measured), its
//! errors, and the queries every other part of it uses — services, machines, instances, the
//! event log, placement, the switch's routes and the drop marks. What it does lives beside it:
//! operations on instances (`actions.rs`), durable operation records (`ops.rs`), the agents'
//! client (`agents.rs`), heartbeats and settlement (`settle.rs`) and the reconcile loop
//! (`reconcile.rs`). An instance is never acted on by two operations at once (the busy set).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmatrix_core::api::InstanceInfo;
use vmatrix_core::api::{AgentReport, InstancePlan, MachineInfo};
use vmatrix_core::{InstanceId, InstanceState, ServiceSpec};

use crate::cpu::CpuMeter;
use crate::db::{Db, DbError, InstanceRow};

/// Bridged networking as the controller runs it: the service network its instances get
/// addresses on, and the hosts that carry it besides the machines (the switches').
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The service network.
    pub net: vmatrix_net::ServiceNet,
    /// Its VXLAN network identifier.
    pub vni: u32,
    /// The tunnel endpoints of hosts that are not machines (the switch's host).
    pub fronts: Vec<std::net::Ipv4Addr>,
    /// More host addresses no instance may reach (the controller's own).
    pub hosts: Vec<std::net::Ipv4Addr>,
}

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
    /// The request itself is wrong (what is wrong, and what to give instead).
    #[error("{0}")]
    BadRequest(String),
    /// The caller did not prove who it is (no credential, or one the controller does not know).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but may not do this (a machine's credential used for another).
    #[error("{0}")]
    Forbidden(String),
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

pub(crate) type Result<T> = std::result::Result<T, ControlError>;

impl ControlError {
    /// The HTTP status that says what kind of failure this is.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::BadRequest(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Conflict(_) | Self::Transition(_) => 409,
            Self::Agent { .. } | Self::Unreachable { .. } => 502,
            Self::Db(_) => 500,
        }
    }
}

/// A version id as people read it: its first 12 hex digits.
pub(crate) fn short_version(version: &str) -> &str {
    version.get(..12).unwrap_or(version)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The controller.
pub struct Controller {
    pub(crate) db: Mutex<Db>,
    /// On etcd: this controller's lead (nothing is read or written without it).
    pub(crate) lead: Mutex<Option<Arc<crate::leader::Lead>>>,
    pub(crate) http: reqwest::Client,
    pub(crate) token: String,
    /// What a new machine joins with (besides the operator's token); empty: none.
    pub(crate) join_token: Mutex<String>,
    /// Each joined machine's credential, by name (the database holds them too).
    pub(crate) credentials: Mutex<HashMap<String, String>>,
    /// New machine names join without an operator's approval.
    pub(crate) auto_approve: std::sync::atomic::AtomicBool,
    pub(crate) busy: Mutex<HashSet<InstanceId>>,
    /// When each instance's last operation ended: a heartbeat sent before that is stale for it.
    pub(crate) settled: Mutex<HashMap<InstanceId, Instant>>,
    pub(crate) started: Instant,
    /// Machines heard from since this process started, with how many of their heartbeats
    /// were taken in (`vmatrix_heartbeats_total`).
    pub(crate) heard: Mutex<HashMap<String, u64>>,
    /// The switch's latest load report, and when it came.
    pub(crate) load: Mutex<Option<(Instant, vmatrix_core::api::LoadReport)>>,
    /// Woken by every load report: the fast path runs then, not on the tick.
    pub(crate) load_came: tokio::sync::Notify,
    /// Ticks on which the switch's load report was missing or stale (demand unknown).
    pub(crate) load_missing: std::sync::atomic::AtomicU64,
    /// Demand samples per service, one per reconcile tick, oldest first (the policy's input;
    /// `NaN` where unknown).
    pub(crate) demand: Mutex<HashMap<String, std::collections::VecDeque<f64>>>,
    /// The policy's settings (one configuration, shared with the simulator).
    pub(crate) settings: Mutex<vmatrix_policy::Settings>,
    /// Whether the load-driven policy runs (else the loop only keeps `min`).
    pub(crate) policy: std::sync::atomic::AtomicBool,
    /// CPU use per machine, from its heartbeats.
    pub(crate) cpu: Mutex<HashMap<String, CpuMeter>>,
    /// Per service: its demand memory (the forecast and the spike history).
    pub(crate) memory: Mutex<HashMap<String, vmatrix_policy::Memory>>,
    /// Each machine's latest report since this process started (what settles instances that
    /// an earlier process left mid-operation).
    pub(crate) reports: Mutex<HashMap<String, AgentReport>>,
    /// Operations whose task runs in this process, with their outcome once settled.
    pub(crate) ops: Mutex<HashMap<u64, crate::ops::OpWatch>>,
    /// Bounds the agent calls in flight from the reconcile loop.
    pub(crate) work: Arc<tokio::sync::Semaphore>,
    /// Direct probes of machines whose heartbeats stopped.
    pub(crate) probes: Mutex<HashMap<String, Probe>>,
    /// Per (machine, instance): the report sequence number from which that machine's reports
    /// show the effect of the last command it answered for the instance (older reports are
    /// not used to judge it).
    pub(crate) fresh_after: Mutex<HashMap<(String, InstanceId), u64>>,
    /// Held while a place is chosen and taken (placement is read, then written).
    pub(crate) placing: Mutex<()>,
    /// Instances booted to be warm standbys: paused as soon as they run (the policy sees them
    /// as standbys already, so that no tick prepares more or takes them for capacity).
    pub(crate) prepared: Mutex<HashSet<InstanceId>>,
    /// The matrix's certificate authority, once loaded ([`crate::authority`]).
    pub(crate) authority: Mutex<Option<Arc<crate::authority::Authority>>>,
    /// The API's and the agent calls' TLS, where the API serves HTTPS (set once, at start).
    pub(crate) secured: std::sync::OnceLock<Arc<crate::authority::Secured>>,
    /// Activations the reconcile loop has under way per service to keep its `min` (manual
    /// mode): counted as live until they end, since on a busy host a task may not have written
    /// its instance's row by the next pass (which then started a second one).
    pub(crate) keeping_min: Mutex<HashMap<String, u32>>,
    /// Maintenance instances: when an admin last used each (console, commit); those idle past
    /// `maintenance_idle` are discarded.
    pub(crate) maintenance_used: Mutex<HashMap<InstanceId, Instant>>,
    /// How long a maintenance instance may stay unused (none: until discarded).
    pub(crate) maintenance_idle: Mutex<Option<Duration>>,
    /// Bridged networking's service network (`None`: user-mode NAT on every machine).
    pub network: Mutex<Option<NetConfig>>,
    /// Services rolling out now: the policy leaves them alone.
    pub(crate) rolling: Arc<Mutex<HashSet<String>>>,
    /// Instances a rollout is retiring: out of the routes, discarded in a moment.
    pub(crate) retiring: Mutex<HashSet<InstanceId>>,
    /// Slots (service, slot) whose volume an operator's restore or removal is changing: no
    /// new instance takes them meanwhile.
    pub(crate) volume_busy: Mutex<HashSet<(String, u32)>>,
    /// Services whose automatic activations fail in a row, and until when they wait.
    pub(crate) backoff: Mutex<HashMap<String, Backoff>>,
    /// Operation durations and the like, observed as they end ([`crate::metrics`]).
    pub(crate) metrics: crate::metrics::ControlMetrics,
}

/// The longest wait between two automatic activations of a service that keep failing.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How long automatic activations of a service wait after failures in a row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    /// Failures in a row.
    pub(crate) failures: u32,
    /// No automatic activation before this.
    pub(crate) until: Instant,
}

/// A direct probe of a machine without heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Sent, no answer yet.
    Running,
    /// No answer: the machine is down.
    Failed,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Controller")
    }
}

/// Releases an instance from the busy set when an operation ends.
pub(crate) struct BusyGuard<'a> {
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
pub(crate) const STALE_HEARTBEAT: Duration = Duration::from_secs(3);

impl Controller {
    /// A controller over `db`, using `token` for agents.
    pub fn new(db: Db, token: String) -> Arc<Self> {
        Arc::new(Self {
            db: Mutex::new(db),
            lead: Mutex::new(None),
            // No overall timeout: each command gets one derived from its work (see `send`).
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("a plain HTTP client builds"),
            token,
            join_token: Mutex::new(String::new()),
            credentials: Mutex::new(HashMap::new()),
            auto_approve: std::sync::atomic::AtomicBool::new(false),
            busy: Mutex::new(HashSet::new()),
            settled: Mutex::new(HashMap::new()),
            started: Instant::now(),
            heard: Mutex::new(HashMap::new()),
            cpu: Mutex::new(HashMap::new()),
            memory: Mutex::new(HashMap::new()),
            settings: Mutex::new(vmatrix_policy::Settings::default()),
            load: Mutex::new(None),
            load_missing: std::sync::atomic::AtomicU64::new(0),
            load_came: tokio::sync::Notify::new(),
            demand: Mutex::new(HashMap::new()),
            policy: std::sync::atomic::AtomicBool::new(false),
            reports: Mutex::new(HashMap::new()),
            ops: Mutex::new(HashMap::new()),
            work: Arc::new(tokio::sync::Semaphore::new(16)),
            probes: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            metrics: Default::default(),
            fresh_after: Mutex::new(HashMap::new()),
            placing: Mutex::new(()),
            prepared: Mutex::new(HashSet::new()),
            authority: Mutex::new(None),
            secured: std::sync::OnceLock::new(),
            keeping_min: Mutex::new(HashMap::new()),
            maintenance_used: Mutex::new(HashMap::new()),
            maintenance_idle: Mutex::new(None),
            network: Mutex::new(None),
            rolling: Arc::new(Mutex::new(HashSet::new())),
            retiring: Mutex::new(HashSet::new()),
            volume_busy: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn db<T>(
        &self,
        f: impl FnOnce(&Db) -> std::result::Result<T, DbError>,
    ) -> Result<T> {
        // SQLite's writes (and etcd's, on etcd) block: a disk busy with someone else's writes
        // can hold one for seconds, and with it the runtime thread, so that on two cores two
        // such calls would stall every request — load reports included. The runtime hands
        // this thread's other work to another one meanwhile.
        blocking(|| {
            let mut db = self.lock_db()?;
            let out = f(&db);
            self.flush_db(&mut db)?;
            Ok(out?)
        })
    }

    /// The state database, locked — only while this controller leads, on etcd (the check is
    /// made after the lock is taken: a call that waited for it acts on nothing stale). A
    /// caller that writes through it must call [`Controller::flush_db`] before it unlocks.
    pub(crate) fn lock_db(&self) -> Result<std::sync::MutexGuard<'_, Db>> {
        let db = self
            .db
            .lock()
            .map_err(|_| ControlError::Conflict("state database lock poisoned".into()))?;
        self.check_lead()?;
        Ok(db)
    }

    /// On etcd, writes what changed to etcd before anyone hears of it; a failure ends this
    /// controller's lead.
    pub(crate) fn flush_db(&self, db: &mut Db) -> Result<()> {
        if let Err(e) = db.flush() {
            if let Some(l) = self.lead.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                l.lose(&e.to_string());
            }
            return Err(e.into());
        }
        self.check_lead()
    }

    /// Fails unless this controller leads (always true on the embedded store).
    pub(crate) fn check_lead(&self) -> Result<()> {
        if let Some(l) = self.lead.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if !l.valid() {
                l.lose("its lease ran out");
                return Err(DbError::Lost("this controller no longer leads".into()).into());
            }
        }
        Ok(())
    }

    /// Sets this controller's lead on etcd (`None`: the embedded store, no lead needed).
    pub fn set_lead(&self, lead: Option<Arc<crate::leader::Lead>>) {
        *self.lead.lock().unwrap_or_else(|e| e.into_inner()) = lead;
    }

    /// Appends to the event log (and the process log).
    pub fn event(&self, who: &str, what: &str, why: &str, outcome: &str) {
        tracing::info!(who, what, why, outcome, "event");
        let _ = self.db(|d| d.event(now_ms(), who, what, why, outcome));
    }

    pub(crate) fn claim(&self, id: &InstanceId) -> Result<BusyGuard<'_>> {
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

    pub(crate) fn is_busy(&self, id: &InstanceId) -> bool {
        self.busy.lock().map(|b| b.contains(id)).unwrap_or(true)
    }

    /// Busy, or changed so recently that a heartbeat may not reflect it yet.
    /// Notes that an activation of `service` failed (the agent refused it, or the instance
    /// failed before it ever ran): automatic activations of it wait 1 s, 2 s, 4 s … up to a
    /// minute before the next try, instead of an activate-fail-discard loop every second.
    pub(crate) fn activation_failed(&self, service: &str) {
        let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let e = b.entry(service.to_owned()).or_insert(Backoff {
            failures: 0,
            until: Instant::now(),
        });
        e.failures += 1;
        let delay =
            Duration::from_secs(1u64 << e.failures.saturating_sub(1).min(6)).min(MAX_BACKOFF);
        e.until = Instant::now() + delay;
        let failures = e.failures;
        drop(b);
        if failures >= 2 {
            self.event(
                "controller",
                &format!("back off {service}"),
                &format!("{failures} activations failed in a row"),
                &format!("next try in {} s", delay.as_secs()),
            );
        }
    }

    /// Notes that an instance of `service` came up: no more waiting.
    pub(crate) fn activation_succeeded(&self, service: &str) {
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(service);
    }

    /// Whether automatic activations of `service` wait now.
    pub(crate) fn backing_off(&self, service: &str) -> bool {
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .is_some_and(|b| b.until > Instant::now())
    }

    pub(crate) fn is_unsettled(&self, id: &InstanceId) -> bool {
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
    /// Bridged networking's settings, if the controller runs it.
    pub(crate) fn net_config(&self) -> Option<NetConfig> {
        self.network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

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

    pub(crate) fn machine(&self, name: &str) -> Result<MachineInfo> {
        self.db(|d| d.machine(name, now_ms(), DOWN_AFTER_MS))?
            .ok_or_else(|| {
                ControlError::NotFound(format!("no machine {name}; `vmatrix machines` lists them"))
            })
    }

    pub(crate) fn spec_of(&self, service: &vmatrix_core::ServiceName) -> Result<ServiceSpec> {
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
    pub(crate) fn plan(
        &self,
        spec: &ServiceSpec,
        row: &InstanceRow,
        generation: u64,
    ) -> Result<InstancePlan> {
        let net = self.net_config();
        let net = net.as_ref();
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
            port: spec.http_port(),
            health: spec.health.clone(),
            net: net.and_then(|n| {
                row.info
                    .address
                    .map(|address| vmatrix_core::api::NetAttach {
                        address,
                        prefix: n.net.prefix(),
                        gateway: n.net.gateway(),
                    })
            }),
            hardware: spec.hardware(),
            cloud_init: vmatrix_core::api::CloudInit {
                ssh_authorized_keys: spec.ssh_authorized_keys.clone(),
                user_data: spec.user_data.clone(),
            },
            volumes: Self::volume_plans(spec, row.info.slot)?,
        })
    }

    /// What the placed instances use on each machine: (vCPUs, MiB); a paused one holds its
    /// memory but no CPU.
    pub(crate) fn placed_use(&self) -> Result<HashMap<String, (u64, u64)>> {
        let services = self.services()?;
        let mut used: HashMap<String, (u64, u64)> = HashMap::new();
        for r in self.db(|d| d.instances())? {
            if !r.info.state.is_placed() {
                continue;
            }
            if let Some(s) = services.iter().find(|s| s.name == r.info.service) {
                let u = used.entry(r.info.machine.clone()).or_default();
                u.1 += u64::from(s.memory_mib);
                if r.info.state != InstanceState::Paused {
                    u.0 += u64::from(s.vcpus);
                }
            }
        }
        Ok(used)
    }

    pub(crate) fn row(&self, id: &InstanceId) -> Result<InstanceRow> {
        self.db(|d| d.instance(id))?.ok_or_else(|| {
            ControlError::NotFound(format!("no instance {id}; `vmatrix ps` lists them"))
        })
    }

    /// Each machine with the number of instances placed on it (activating, running, paused,
    /// migrating or suspending). A healthy dedicated machine with none is free: it can be powered down.
    pub fn machine_use(&self) -> Result<Vec<(MachineInfo, usize)>> {
        let mut placed: HashMap<String, usize> = HashMap::new();
        for r in self.db(|d| d.instances())? {
            if r.info.state.is_placed() {
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
        let retiring = self
            .retiring
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = vmatrix_core::api::RouteTable::default();
        for s in services {
            let backends: Vec<(InstanceId, String)> = rows
                .iter()
                // A migrating instance serves from its source until the switch-over; requests
                // that hit the gap are retried by the switch.
                .filter(|r| {
                    r.info.service == s.name
                        // A maintenance instance never gets live traffic; a retiring one
                        // no new request.
                        && r.info.purpose == vmatrix_core::api::Purpose::Live
                        && !retiring.contains(&r.info.id)
                        && matches!(
                            r.info.state,
                            InstanceState::Running | InstanceState::Migrating
                        )
                        && !r.info.endpoint.is_empty()
                })
                .map(|r| (r.info.id.clone(), r.info.endpoint.clone()))
                .collect();
            let moving: Vec<String> = rows
                .iter()
                .filter(|r| r.info.state == InstanceState::Migrating)
                .map(|r| r.info.endpoint.clone())
                .filter(|e| backends.iter().any(|(_, b)| b == e))
                .collect();
            // TCP ports reach instances at their own addresses (bridged networking).
            let tcp = s
                .tcp_ports()
                .map(|(name, port, listen)| vmatrix_core::api::TcpRoute {
                    name: name.to_owned(),
                    listen,
                    backends: rows
                        .iter()
                        .filter(|r| backends.iter().any(|(id, _)| *id == r.info.id))
                        .filter_map(|r| r.info.address)
                        .map(|a| format!("{a}:{port}"))
                        .collect(),
                })
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
                moving,
                tcp,
            });
        }
        let bytes = serde_json::to_vec(&out.services).unwrap_or_default();
        out.version = blake3::hash(&bytes).to_hex()[..16].to_string();
        Ok(out)
    }

    /// Stores the switch's load report (the policy's demand input).
    pub fn set_load(&self, report: vmatrix_core::api::LoadReport) {
        if let Ok(mut l) = self.load.lock() {
            *l = Some((Instant::now(), report));
        }
        self.load_came.notify_one();
    }

    /// The latest load report (empty when none came).
    pub fn load(&self) -> vmatrix_core::api::LoadReport {
        self.fresh_load(Duration::MAX).unwrap_or_default()
    }

    /// The latest load report if it is younger than `max_age`.
    pub(crate) fn fresh_load(&self, max_age: Duration) -> Option<vmatrix_core::api::LoadReport> {
        self.load
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .filter(|(at, _)| at.elapsed() <= max_age)
            .map(|(_, r)| r)
    }
}

/// Runs `f`, which blocks, on a multi-threaded runtime's worker without stalling the tasks
/// queued behind it ([`tokio::task::block_in_place`]); elsewhere (a current-thread runtime,
/// no runtime) as it is.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
