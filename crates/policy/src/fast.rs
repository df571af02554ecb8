//! The fast path: run on every demand report, not on the policy's tick. A service whose demand
//! now exceeds what its running instances serve gets its warm standbys unpaused (milliseconds);
//! when a standby's machine has no CPU to spare, lower priorities running there are paused in
//! the same second (server drop). Only pauses and unpauses: everything slower is `decide`'s.

use crate::model::{Action, InstanceState, Snapshot};

/// The pauses and unpauses the demand of now (each service's last sample) calls for. Pure.
pub fn react(s: &Snapshot) -> Vec<Action> {
    let services = &s.services;
    let mut free: Vec<i64> = s.machines.iter().map(|m| i64::from(m.vcpus)).collect();
    let usable: Vec<bool> = s
        .machines
        .iter()
        .map(|m| m.healthy && m.dedicated)
        .collect();
    let mut running = vec![0u32; services.len()];
    let mut paused: Vec<Vec<usize>> = vec![Vec::new(); services.len()];
    // Running instances per machine (pausable by a higher priority).
    let mut on: Vec<Vec<usize>> = vec![Vec::new(); s.machines.len()];
    for (idx, i) in s.instances.iter().enumerate() {
        let (Some(m), Some(svc)) = (i.machine, services.get(i.service)) else {
            continue;
        };
        if m >= s.machines.len() {
            continue;
        }
        match i.state {
            InstanceState::Running | InstanceState::Starting => {
                free[m] -= i64::from(svc.vcpus);
                running[i.service] += 1;
                if i.state == InstanceState::Running {
                    on[m].push(idx);
                }
            }
            InstanceState::Paused if usable[m] => paused[i.service].push(idx),
            _ => {}
        }
    }
    let mut order: Vec<usize> = (0..services.len())
        .filter(|&k| !paused[k].is_empty())
        .collect();
    order.sort_by(|&a, &b| {
        services[b]
            .priority
            .cmp(&services[a].priority)
            .then(services[a].name.cmp(&services[b].name))
    });
    let mut actions = Vec::new();
    for si in order {
        let svc = &services[si];
        let now = svc.demand.last().copied().unwrap_or(0.0);
        if !now.is_finite() {
            continue;
        }
        let serves = (now / svc.capacity_rps.max(1e-9)).ceil();
        while f64::from(running[si]) < serves && !paused[si].is_empty() {
            let need = i64::from(svc.vcpus);
            let pick = paused[si]
                .iter()
                .position(|&idx| s.instances[idx].machine.is_some_and(|m| free[m] >= need))
                .or_else(|| {
                    // A machine where pausing lower priorities frees enough.
                    paused[si].iter().position(|&idx| {
                        s.instances[idx].machine.is_some_and(|m| {
                            free[m]
                                + on[m]
                                    .iter()
                                    .map(|&o| &services[s.instances[o].service])
                                    .filter(|o| o.priority < svc.priority)
                                    .map(|o| i64::from(o.vcpus))
                                    .sum::<i64>()
                                >= need
                        })
                    })
                });
            let Some(pos) = pick else {
                break;
            };
            let idx = paused[si].swap_remove(pos);
            let Some(m) = s.instances[idx].machine else {
                continue;
            };
            // Lowest priorities first.
            on[m].sort_by_key(|&o| std::cmp::Reverse(services[s.instances[o].service].priority));
            while free[m] < need {
                let Some(&victim) = on[m].last() else {
                    break;
                };
                let low = &services[s.instances[victim].service];
                if low.priority >= svc.priority {
                    break;
                }
                on[m].pop();
                free[m] += i64::from(low.vcpus);
                running[s.instances[victim].service] -= 1;
                actions.push(Action::Pause {
                    instance: victim,
                    reason: format!(
                        "server drop: free CPU for {} now (priority {} over {})",
                        svc.name, svc.priority, low.priority
                    )
                    .into(),
                });
            }
            free[m] -= need;
            running[si] += 1;
            on[m].push(idx);
            actions.push(Action::Unpause {
                instance: idx,
                reason: format!(
                    "spike: {now:.1} req/s on {} is more than its running instances serve: \
                     unpause a warm standby",
                    svc.name
                )
                .into(),
            });
        }
    }
    actions
}
