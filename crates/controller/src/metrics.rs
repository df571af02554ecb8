//! The controller's `/metrics`: the matrix as the controller sees it — machines and their
//! use, instances and what they use, demand against capacity per service, drops — read at
//! scrape time from the same state the API and the dashboard show, and how long operations
//! take, observed as they end.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use vmatrix_core::api::MachineState;
use vmatrix_core::metrics::{self, Histograms, Labels, Sampled};
use vmatrix_core::InstanceId;

use crate::control::{ControlError, Controller};

/// What the controller observes as operations end.
#[derive(Debug)]
pub(crate) struct ControlMetrics {
    /// `vmatrix_operation_seconds{operation, outcome}`: every operation the controller runs.
    operations: Histograms,
    /// `vmatrix_instance_ready_seconds{how}`: from an activation's or a resume's command to
    /// the first report of the instance running.
    ready: Histograms,
    /// Live migrations as QEMU measured them: the guest's pause and the whole copy.
    downtime: Histogram,
    migration: Histogram,
    /// `vmatrix_service_drops_total{priority, by}`: services dropped.
    drops: Family<Labels, Counter>,
    /// Instances on their way up: since when, and how (activate or resume).
    waiting: std::sync::Mutex<HashMap<InstanceId, (Instant, &'static str)>>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self {
            operations: metrics::operation_histograms(),
            ready: metrics::operation_histograms(),
            downtime: metrics::downtime_histogram(),
            migration: metrics::operation_histogram(),
            drops: Family::default(),
            waiting: Default::default(),
        }
    }
}

/// How an operation ended, as the metrics say it: `ok`; `refused` (it was not possible:
/// nothing was done); `failed` (an agent answered that it failed); `unsettled` (an agent did
/// not answer: its reports settle it).
fn outcome<T>(r: &Result<T, ControlError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(ControlError::Agent { .. }) => "failed",
        Err(ControlError::Unreachable { .. }) => "unsettled",
        Err(ControlError::Db(_)) => "failed",
        Err(_) => "refused",
    }
}

impl ControlMetrics {
    /// An operation ended after `took`.
    pub(crate) fn operation<T>(
        &self,
        operation: &'static str,
        took: Duration,
        r: &Result<T, ControlError>,
    ) {
        self.operations
            .get_or_create(&metrics::op_labels(operation, outcome(r)))
            .observe(took.as_secs_f64());
    }

    /// An instance was started (`how`: `activate` or `resume`) at `since`: its first report
    /// running ends the wait.
    pub(crate) fn starting(&self, id: &InstanceId, since: Instant, how: &'static str) {
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id.clone(), (since, how));
        }
    }

    /// An instance's first report of running (or failing: the wait ends unobserved).
    pub(crate) fn started(&self, id: &InstanceId, running: bool) {
        let Some((since, how)) = self.waiting.lock().ok().and_then(|mut w| w.remove(id)) else {
            return;
        };
        if running {
            self.ready
                .get_or_create(&vec![("how", how.to_owned())])
                .observe(since.elapsed().as_secs_f64());
        }
    }

    /// A live migration QEMU finished.
    pub(crate) fn migrated(&self, total_ms: u64, downtime_ms: u64) {
        self.downtime.observe(downtime_ms as f64 / 1000.0);
        self.migration.observe(total_ms as f64 / 1000.0);
    }

    /// A service of `priority` was dropped (by the policy or an operator).
    pub(crate) fn dropped(&self, priority: i32, by: &str) {
        self.drops
            .get_or_create(&vec![
                ("priority", priority.to_string()),
                ("by", by.to_owned()),
            ])
            .inc();
    }
}

impl Controller {
    /// Times `op` as `operation` in the metrics.
    pub(crate) async fn timed<T>(
        &self,
        operation: &'static str,
        op: impl std::future::Future<Output = Result<T, ControlError>>,
    ) -> Result<T, ControlError> {
        let started = Instant::now();
        let r = op.await;
        self.metrics.operation(operation, started.elapsed(), &r);
        r
    }

    /// The controller's metrics in the OpenMetrics text format.
    pub fn metrics_text(&self) -> String {
        let mut s = Sampled::default();
        let instances = self.instances().unwrap_or_default();
        let services = self.services().unwrap_or_default();
        // One pass each: a scrape stays linear in instances and services.
        let memory_of: HashMap<&str, u64> = services
            .iter()
            .map(|s| (s.name.as_str(), u64::from(s.memory_mib) << 20))
            .collect();
        let service_of: HashMap<&InstanceId, String> = instances
            .iter()
            .map(|i| (&i.id, i.service.to_string()))
            .collect();
        if let Ok(reply) = crate::api::machines_reply(self) {
            let ms = &reply.machines;
            s.gauge(
                "vmatrix_machines",
                "Machines by state.",
                [MachineState::Up, MachineState::Down, MachineState::Draining].map(|state| {
                    let n = ms.iter().filter(|m| m.machine.state == state).count();
                    (vec![("state", state.to_string())], n)
                }),
            )
            .gauge(
                "vmatrix_machines_free",
                "Machines up and running nothing: they can be powered down.",
                [(vec![], ms.iter().filter(|m| m.free).count())],
            )
            .gauge(
                "vmatrix_machine_cpu_load",
                "Busy fraction of each machine's vCPUs, from its heartbeats (smoothed).",
                ms.iter()
                    .map(|m| (vec![("machine", m.machine.name.clone())], m.cpu_load)),
            )
            .gauge(
                "vmatrix_machine_instances",
                "Instances placed on each machine.",
                ms.iter()
                    .map(|m| (vec![("machine", m.machine.name.clone())], m.instances)),
            )
            .gauge(
                "vmatrix_machine_memory_bytes",
                "Memory each machine offers to instances.",
                ms.iter().map(|m| {
                    (
                        vec![("machine", m.machine.name.clone())],
                        u64::from(m.machine.memory_mib) << 20,
                    )
                }),
            )
            .gauge(
                "vmatrix_machine_memory_placed_bytes",
                "Memory of the instances placed on each machine, as their services declare it.",
                ms.iter().map(|m| {
                    (
                        vec![("machine", m.machine.name.clone())],
                        placed_memory(&m.machine.name, &instances, &memory_of),
                    )
                }),
            );
        }
        let mut counts = BTreeMap::new();
        for i in &instances {
            *counts
                .entry((i.service.to_string(), i.state.as_str()))
                .or_insert(0u64) += 1;
        }
        s.gauge(
            "vmatrix_instances",
            "Instances by service and state.",
            counts.into_iter().map(|((service, state), n)| {
                (vec![("service", service), ("state", state.to_owned())], n)
            }),
        );
        let usage = self.instance_usage();
        let labels = |id: &InstanceId, machine: &str| -> Labels {
            vec![
                ("instance", id.to_string()),
                ("service", service_of.get(id).cloned().unwrap_or_default()),
                ("machine", machine.to_owned()),
            ]
        };
        s.counter(
            "vmatrix_instance_cpu_seconds",
            "CPU seconds each instance's QEMU has used, as its machine reports.",
            usage
                .iter()
                .map(|(id, u)| (labels(id, &u.machine), u.cpu_seconds)),
        )
        .gauge(
            "vmatrix_instance_memory_bytes",
            "Resident memory of each instance's QEMU, as its machine reports.",
            usage
                .iter()
                .map(|(id, u)| (labels(id, &u.machine), u.memory_bytes)),
        );
        let load = self.load();
        s.gauge(
            "vmatrix_service_demand_rps",
            "Requests per second arriving at each service, as the switch last reported.",
            services.iter().map(|spec| {
                let rps = load.services.get(spec.name.as_str()).map_or(0.0, |l| l.rps);
                (vec![("service", spec.name.to_string())], rps)
            }),
        )
        .gauge(
            "vmatrix_service_capacity_rps",
            "Requests per second each service's running instances can serve (running \
             instances × its capacity_rps).",
            services.iter().map(|spec| {
                let running = instances
                    .iter()
                    .filter(|i| {
                        i.service == spec.name && i.state == vmatrix_core::InstanceState::Running
                    })
                    .count();
                (
                    vec![("service", spec.name.to_string())],
                    running as f64 * spec.capacity_rps,
                )
            }),
        );
        let dropped = self.dropped().unwrap_or_default();
        let mut by_priority: BTreeMap<i32, u64> = BTreeMap::new();
        for spec in &services {
            let n = by_priority.entry(spec.priority).or_default();
            if dropped.iter().any(|(name, _)| name == spec.name.as_str()) {
                *n += 1;
            }
        }
        s.gauge(
            "vmatrix_services_dropped",
            "Services dropped now, per priority (the switch refuses their excess load).",
            by_priority
                .into_iter()
                .map(|(p, n)| (vec![("priority", p.to_string())], n)),
        )
        .counter(
            "vmatrix_load_reports_missing",
            "Policy ticks without a fresh load report from the switch (demand unknown: no \
             scale-in).",
            [(vec![], self.load_missing())],
        )
        .counter(
            "vmatrix_heartbeats",
            "Heartbeats taken in per machine since this controller started.",
            self.heartbeats()
                .into_iter()
                .map(|(m, n)| (vec![("machine", m)], n)),
        );
        let mut registry = metrics::registry();
        registry.register(
            "vmatrix_operation_seconds",
            "How long the controller's operations took, by operation and outcome (ok, refused, \
             failed, unsettled)",
            self.metrics.operations.clone(),
        );
        registry.register(
            "vmatrix_instance_ready_seconds",
            "From an activation's or a resume's command to the instance's first report running",
            self.metrics.ready.clone(),
        );
        registry.register(
            "vmatrix_migration_downtime_seconds",
            "Live migrations: how long the guest was paused (QEMU's figure)",
            self.metrics.downtime.clone(),
        );
        registry.register(
            "vmatrix_migration_seconds",
            "Live migrations: QEMU's whole copy",
            self.metrics.migration.clone(),
        );
        registry.register(
            "vmatrix_service_drops",
            "Services dropped, by priority and by whom (policy or operator)",
            self.metrics.drops.clone(),
        );
        registry.register_collector(Box::new(s));
        metrics::render(&registry)
    }

    /// What each instance uses, as its machine last reported (instances of machines this
    /// process has heard from).
    pub(crate) fn instance_usage(&self) -> BTreeMap<InstanceId, vmatrix_core::api::InstanceUse> {
        let reports = self.reports.lock().unwrap_or_else(|p| p.into_inner());
        reports
            .values()
            .flat_map(|r| {
                r.instances.iter().map(|i| {
                    (
                        i.id.clone(),
                        vmatrix_core::api::InstanceUse {
                            machine: r.name.clone(),
                            cpu_seconds: i.cpu_seconds,
                            memory_bytes: i.memory_bytes,
                        },
                    )
                })
            })
            .collect()
    }
}

/// Memory (bytes) the services of the instances placed on `machine` declare.
fn placed_memory(
    machine: &str,
    instances: &[vmatrix_core::api::InstanceInfo],
    memory_of: &HashMap<&str, u64>,
) -> u64 {
    instances
        .iter()
        .filter(|i| i.machine == machine && i.state.is_placed())
        .map(|i| memory_of.get(i.service.as_str()).copied().unwrap_or(0))
        .sum()
}
