//! `decide`: one pass from a snapshot to a plan. The steps, in order:
//!
//! 1. **Recovery** — failed instances, and instances on dead machines, are discarded (the
//!    sizing below then replaces them).
//! 2. **Sizing** — each service wants `ceil(max recent demand × headroom ÷ capacity)` instances,
//!    within `min..=max`. Scale-out looks at a short window, scale-in also needs the long window
//!    to agree (hysteresis: no flapping).
//! 3. **Allocation by priority** — services in priority order (strict) claim machine space on
//!    healthy dedicated machines: first the slots their running instances already hold, then new
//!    slots placed best-fit (least memory left over), spreading a service over machines. A service
//!    that cannot get all it wants is **dropped** (the switch refuses its excess load); instances
//!    that lost their slot to a higher priority are suspended with their state kept, and come back
//!    (resumed before any cold boot) when space returns.
//! 4. **Consolidation** — on a quiet tick, while the pool is cool, the machine with the fewest
//!    instances is emptied by live migration (a bounded number of moves) so it can be powered down.

use std::collections::{BTreeMap, HashMap};

use crate::model::{Action, Config, Instance, InstanceState, Machine, Service, Snapshot};

#[derive(Debug, Clone, Copy)]
struct Free {
    vcpus: i64,
    memory: i64,
}

impl Free {
    fn fits(&self, s: &Service) -> bool {
        self.vcpus >= i64::from(s.vcpus) && self.memory >= i64::from(s.memory_mib)
    }
    fn take(&mut self, s: &Service) {
        self.vcpus -= i64::from(s.vcpus);
        self.memory -= i64::from(s.memory_mib);
    }
}

/// The whole capacity of the healthy dedicated machines (shared ones never take live load).
fn capacity(healthy: &HashMap<&str, &Machine>) -> BTreeMap<String, Free> {
    healthy
        .values()
        .filter(|m| m.dedicated)
        .map(|m| {
            let free = Free {
                vcpus: i64::from(m.vcpus),
                memory: i64::from(m.memory_mib),
            };
            (m.name.clone(), free)
        })
        .collect()
}

fn is_placed(i: &Instance) -> bool {
    matches!(i.state, InstanceState::Starting | InstanceState::Running) && i.machine.is_some()
}

fn wanted(s: &Service, window: usize, headroom: f64) -> u32 {
    let recent = s
        .demand
        .iter()
        .rev()
        .take(window.max(1))
        .fold(0.0f64, |a, b| a.max(*b));
    to_instances(s, recent, headroom)
}

fn to_instances(s: &Service, rps: f64, headroom: f64) -> u32 {
    let n = (rps * headroom / s.capacity_rps.max(1e-9)).ceil();
    (n.max(0.0) as u32).clamp(s.min, s.max.max(s.min))
}

/// The demand one (the longest covered) seasonal period ago, from now to `lookahead` ahead.
fn seasonal(s: &Service, c: &Config) -> f64 {
    let len = s.demand.len();
    let Some(&period) = c
        .seasonal_periods
        .iter()
        .filter(|p| **p > 0 && len >= **p)
        .max()
    else {
        return 0.0;
    };
    let start = len - period;
    let end = (start + c.seasonal_lookahead + 1).min(len);
    s.demand[start..end].iter().fold(0.0f64, |a, b| a.max(*b))
}

/// The instances each service wants now, with hysteresis on the way down.
fn desired(s: &Service, current: u32, c: &Config) -> u32 {
    let out =
        wanted(s, c.scale_out_window, c.headroom).max(to_instances(s, seasonal(s, c), c.headroom));
    if out >= current {
        out
    } else {
        out.max(wanted(s, c.scale_in_window, c.headroom))
    }
}

fn demand_now(s: &Service) -> f64 {
    s.demand.last().copied().unwrap_or(0.0)
}

/// Best-fit: the machine that fits one more instance of `s`, preferring machines already in use
/// (an empty machine is only woken when the used ones are full: fewest machines), then fewer
/// instances of `s` there (spread), then the least memory left over.
fn best_fit(
    s: &Service,
    free: &BTreeMap<String, Free>,
    used: &BTreeMap<String, bool>,
    per_service: &HashMap<(String, String), u32>,
) -> Option<String> {
    free.iter()
        .filter(|(_, f)| f.fits(s))
        .min_by_key(|(m, f)| {
            let same = per_service
                .get(&(s.name.clone(), (*m).clone()))
                .copied()
                .unwrap_or(0);
            let empty = !used.get(*m).copied().unwrap_or(false);
            (
                empty,
                same,
                f.memory - i64::from(s.memory_mib),
                (*m).clone(),
            )
        })
        .map(|(m, _)| m.clone())
}

/// One pass from `s` to a plan (see the module docs). Pure: the same snapshot and configuration
/// always give the same plan.
pub fn decide(s: &Snapshot, c: &Config) -> Vec<Action> {
    let mut actions = Vec::new();
    let healthy: HashMap<&str, &Machine> = s
        .machines
        .iter()
        .filter(|m| m.healthy)
        .map(|m| (m.name.as_str(), m))
        .collect();
    let services: HashMap<&str, &Service> =
        s.services.iter().map(|x| (x.name.as_str(), x)).collect();

    // 1. Recovery.
    let mut alive: Vec<&Instance> = Vec::new();
    for i in &s.instances {
        if !services.contains_key(i.service.as_str()) {
            actions.push(Action::Discard {
                instance: i.id.clone(),
                reason: format!("service {} is no longer declared", i.service),
            });
            continue;
        }
        if i.state == InstanceState::Failed {
            actions.push(Action::Discard {
                instance: i.id.clone(),
                reason: "failed: replace it with a fresh instance".into(),
            });
            continue;
        }
        if let (true, Some(m)) = (is_placed(i), &i.machine) {
            if !healthy.contains_key(m.as_str()) {
                actions.push(Action::Discard {
                    instance: i.id.clone(),
                    reason: format!("machine {m} is down: replace its instances"),
                });
                continue;
            }
        }
        alive.push(i);
    }

    // 3. Allocation by priority over the healthy dedicated machines.
    let mut free = capacity(&healthy);
    let mut order: Vec<&Service> = s.services.iter().collect();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    let mut per_service: HashMap<(String, String), u32> = HashMap::new();
    let mut suspended_pool: HashMap<&str, Vec<&Instance>> = HashMap::new();
    for i in &alive {
        if i.state == InstanceState::Suspended {
            suspended_pool
                .entry(i.service.as_str())
                .or_default()
                .push(i);
        }
    }
    // Machines that run something now.
    let mut used: BTreeMap<String, bool> = BTreeMap::new();
    for i in alive.iter().filter(|i| is_placed(i)) {
        if let Some(m) = &i.machine {
            used.insert(m.clone(), true);
        }
    }
    let mut changed = false;
    let mut settled = true;
    for svc in order {
        let mut mine: Vec<&&Instance> = alive
            .iter()
            .filter(|i| i.service == svc.name && is_placed(i))
            .collect();
        mine.sort_by(|a, b| a.id.cmp(&b.id));
        let current = mine.len() as u32;
        let want = desired(svc, current, c);
        let mut kept = 0u32;
        for i in mine {
            let m = i.machine.clone().unwrap_or_default();
            let slot = free.get_mut(&m);
            match slot {
                Some(f) if kept < want && f.fits(svc) => {
                    f.take(svc);
                    kept += 1;
                    *per_service.entry((svc.name.clone(), m)).or_default() += 1;
                }
                _ => {
                    let reason = if kept < want {
                        format!("server drop: no room left for {} (priority {}) after higher priorities", svc.name, svc.priority)
                    } else {
                        format!(
                            "scale in: {:.1} req/s needs {want} instance(s) of {}",
                            demand_now(svc),
                            svc.name
                        )
                    };
                    actions.push(Action::Suspend {
                        instance: i.id.clone(),
                        reason,
                    });
                    changed = true;
                }
            }
        }
        let mut placed = kept;
        while placed < want {
            let Some(m) = best_fit(svc, &free, &used, &per_service) else {
                break;
            };
            used.insert(m.clone(), true);
            if let Some(f) = free.get_mut(&m) {
                f.take(svc);
            }
            *per_service
                .entry((svc.name.clone(), m.clone()))
                .or_default() += 1;
            let reason = if placed < svc.min {
                format!("keep min {} of {}", svc.min, svc.name)
            } else {
                format!(
                    "scale out: {:.1} req/s needs {want} instance(s) of {} at {:.0} req/s each",
                    demand_now(svc),
                    svc.name,
                    svc.capacity_rps
                )
            };
            let resumable = suspended_pool.get_mut(svc.name.as_str()).and_then(|v| {
                if v.is_empty() {
                    None
                } else {
                    Some(v.remove(0))
                }
            });
            match resumable {
                Some(i) => actions.push(Action::Resume {
                    instance: i.id.clone(),
                    machine: m,
                    reason: format!("{reason} (resume before cold boot)"),
                }),
                None => actions.push(Action::Activate {
                    service: svc.name.clone(),
                    machine: m,
                    reason,
                }),
            }
            placed += 1;
            changed = true;
        }
        // Consolidate only when every service is at the size its long window asks for.
        if placed != wanted(svc, c.scale_in_window, c.headroom) {
            settled = false;
        }
        let short = placed < want;
        if short && !svc.dropped {
            actions.push(Action::Drop {
                service: svc.name.clone(),
                reason: format!(
                    "server drop: the pool holds {placed} of the {want} instance(s) {} needs",
                    svc.name
                ),
            });
        } else if !short && svc.dropped {
            actions.push(Action::Undrop {
                service: svc.name.clone(),
                reason: format!("capacity returned: {} has all {want} instance(s)", svc.name),
            });
        }
    }

    // 4. Consolidation, only on a quiet tick.
    let starting = alive.iter().any(|i| i.state == InstanceState::Starting);
    if !changed
        && settled
        && !starting
        && !actions.iter().any(|a| matches!(a, Action::Discard { .. }))
    {
        actions.extend(consolidate(c, &healthy, &services, &alive));
    }
    actions
}

fn consolidate(
    c: &Config,
    healthy: &HashMap<&str, &Machine>,
    services: &HashMap<&str, &Service>,
    alive: &[&Instance],
) -> Vec<Action> {
    let mut free = capacity(healthy);
    let total_mem: i64 = free.values().map(|f| f.memory).sum();
    let mut on: BTreeMap<String, Vec<&Instance>> = BTreeMap::new();
    for i in alive.iter().filter(|i| is_placed(i)) {
        let (Some(m), Some(svc)) = (&i.machine, services.get(i.service.as_str())) else {
            continue;
        };
        if let Some(f) = free.get_mut(m) {
            f.take(svc);
            on.entry(m.clone()).or_default().push(i);
        }
    }
    let used_mem: i64 = total_mem - free.values().map(|f| f.memory).sum::<i64>();
    if total_mem == 0 || used_mem as f64 / total_mem as f64 >= c.consolidate_below {
        return Vec::new();
    }
    // The emptiest non-empty machine, if everything on it fits elsewhere within the move cap.
    let mut candidates: Vec<(&String, &Vec<&Instance>)> = on.iter().collect();
    candidates.sort_by_key(|(m, v)| (v.len(), (*m).clone()));
    for (victim, instances) in candidates {
        if instances.len() > c.max_moves
            || instances.iter().any(|i| i.state != InstanceState::Running)
        {
            continue;
        }
        let mut trial = free.clone();
        trial.remove(victim);
        let mut moves = Vec::new();
        for i in instances {
            let Some(svc) = services.get(i.service.as_str()) else {
                continue;
            };
            // Only onto machines that already run something: consolidation must not spread out.
            let target = trial
                .iter()
                .filter(|(m, f)| f.fits(svc) && on.contains_key(*m))
                .min_by_key(|(m, f)| (f.memory - i64::from(svc.memory_mib), (*m).clone()))
                .map(|(m, _)| m.clone());
            let Some(t) = target else {
                moves.clear();
                break;
            };
            if let Some(f) = trial.get_mut(&t) {
                f.take(svc);
            }
            moves.push(Action::Migrate {
                instance: i.id.clone(),
                to: t,
                reason: format!("consolidate: empty {victim} so it can be powered down"),
            });
        }
        if !moves.is_empty() && moves.len() == instances.len() {
            return moves;
        }
    }
    Vec::new()
}

/// What `actions` do to `s`, at once (the simulator adds the time each takes). New instances
/// start in `Starting`; ids are `SERVICE-pN` with N counting up.
pub fn apply(s: &Snapshot, actions: &[Action]) -> Snapshot {
    let mut out = s.clone();
    let mut next = out.instances.len();
    for a in actions {
        match a {
            Action::Activate {
                service, machine, ..
            } => {
                let mut id = format!("{service}-p{next}");
                while out.instances.iter().any(|i| i.id == id) {
                    next += 1;
                    id = format!("{service}-p{next}");
                }
                next += 1;
                out.instances.push(Instance {
                    id,
                    service: service.clone(),
                    machine: Some(machine.clone()),
                    state: InstanceState::Starting,
                });
            }
            Action::Resume {
                instance, machine, ..
            } => {
                if let Some(i) = out.instances.iter_mut().find(|i| i.id == *instance) {
                    i.machine = Some(machine.clone());
                    i.state = InstanceState::Starting;
                }
            }
            Action::Suspend { instance, .. } => {
                if let Some(i) = out.instances.iter_mut().find(|i| i.id == *instance) {
                    i.machine = None;
                    i.state = InstanceState::Suspended;
                }
            }
            Action::Migrate { instance, to, .. } => {
                if let Some(i) = out.instances.iter_mut().find(|i| i.id == *instance) {
                    i.machine = Some(to.clone());
                }
            }
            Action::Discard { instance, .. } => out.instances.retain(|i| i.id != *instance),
            Action::Drop { service, .. } => {
                if let Some(x) = out.services.iter_mut().find(|x| x.name == *service) {
                    x.dropped = true;
                }
            }
            Action::Undrop { service, .. } => {
                if let Some(x) = out.services.iter_mut().find(|x| x.name == *service) {
                    x.dropped = false;
                }
            }
        }
    }
    out
}
