//! Properties of `decide` over generated clusters, and the scenarios the policy exists for.

use std::collections::HashMap;

use proptest::prelude::*;
use vmatrix_policy::{
    apply, decide, Action, Config, Instance, InstanceState, Machine, Service, Snapshot,
};

fn machine(name: &str, vcpus: u32, memory_mib: u32) -> Machine {
    Machine {
        name: name.into(),
        dedicated: true,
        vcpus,
        memory_mib,
        healthy: true,
    }
}

fn service(name: &str, priority: i32, min: u32, max: u32, demand: &[f64]) -> Service {
    Service {
        name: name.into(),
        priority,
        capacity_rps: 50.0,
        min,
        max,
        vcpus: 1,
        memory_mib: 256,
        demand: demand.to_vec(),
        dropped: false,
    }
}

fn placed(s: &Snapshot, service: &str) -> usize {
    s.instances
        .iter()
        .filter(|i| {
            i.service == service
                && i.machine.is_some()
                && matches!(i.state, InstanceState::Starting | InstanceState::Running)
        })
        .count()
}

/// Runs decide/apply until the plan is empty (or `limit` rounds).
fn settle(mut s: Snapshot, c: &Config, limit: usize) -> (Snapshot, usize) {
    for round in 0..limit {
        let plan = decide(&s, c);
        if plan.is_empty() {
            return (s, round);
        }
        s = apply(&s, &plan);
        for i in &mut s.instances {
            if i.state == InstanceState::Starting {
                i.state = InstanceState::Running;
            }
        }
    }
    (s, limit)
}

fn arb_snapshot(homogeneous: bool) -> impl Strategy<Value = Snapshot> {
    let machines = prop::collection::vec((1u32..8, 2u32..16, any::<bool>(), 0u8..10), 1..6);
    let services = prop::collection::vec(
        (0u32..3, 0u32..5, 0.0f64..600.0, 1u32..3, any::<bool>()),
        1..5,
    );
    let placements = prop::collection::vec((0usize..5, 0usize..6, 0u8..10), 0..12);
    (machines, services, placements).prop_map(move |(ms, ss, ps)| {
        let machines: Vec<Machine> = ms
            .iter()
            .enumerate()
            .map(|(i, (cpu, mem, dedicated, h))| Machine {
                name: format!("m{i}"),
                dedicated: *dedicated || i == 0,
                vcpus: *cpu,
                memory_mib: mem * 256,
                healthy: *h > 0,
            })
            .collect();
        let services: Vec<Service> = ss
            .iter()
            .enumerate()
            .map(|(i, (min, extra, demand, size, _))| Service {
                name: format!("s{i}"),
                priority: 100 - i as i32 * 10,
                capacity_rps: 50.0,
                min: *min,
                max: min + extra,
                vcpus: if homogeneous { 1 } else { *size },
                memory_mib: if homogeneous { 256 } else { 256 * size },
                demand: vec![*demand; 10],
                dropped: false,
            })
            .collect();
        // Place instances only where they fit, so the starting point is valid.
        let mut used: HashMap<String, (u32, u32)> = HashMap::new();
        let mut instances = Vec::new();
        for (n, (si, mi, kind)) in ps.iter().enumerate() {
            let Some(svc) = services.get(*si % services.len()) else {
                continue;
            };
            let m = &machines[*mi % machines.len()];
            let state = match kind {
                0 => InstanceState::Failed,
                1 => InstanceState::Suspended,
                _ => InstanceState::Running,
            };
            if state == InstanceState::Suspended {
                instances.push(Instance {
                    id: format!("i{n}"),
                    service: svc.name.clone(),
                    machine: None,
                    state,
                });
                continue;
            }
            let u = used.entry(m.name.clone()).or_default();
            if m.dedicated && u.0 + svc.vcpus <= m.vcpus && u.1 + svc.memory_mib <= m.memory_mib {
                u.0 += svc.vcpus;
                u.1 += svc.memory_mib;
                instances.push(Instance {
                    id: format!("i{n}"),
                    service: svc.name.clone(),
                    machine: Some(m.name.clone()),
                    state,
                });
            }
        }
        Snapshot {
            now_s: 0.0,
            machines,
            services,
            instances,
        }
    })
}

proptest! {
    #[test]
    fn never_overcommits_a_machine(s in arb_snapshot(false)) {
        let after = apply(&s, &decide(&s, &Config::default()));
        let sizes: HashMap<&str, &Service> = after.services.iter().map(|x| (x.name.as_str(), x)).collect();
        for m in &after.machines {
            let (mut cpu, mut mem) = (0, 0);
            for i in after.instances.iter().filter(|i| i.machine.as_deref() == Some(&m.name) && i.state != InstanceState::Suspended) {
                cpu += sizes[i.service.as_str()].vcpus;
                mem += sizes[i.service.as_str()].memory_mib;
            }
            prop_assert!(cpu <= m.vcpus && mem <= m.memory_mib, "{} over-committed: {cpu} vCPU, {mem} MiB", m.name);
        }
    }

    #[test]
    fn every_action_refers_to_existing_objects(s in arb_snapshot(false)) {
        for a in decide(&s, &Config::default()) {
            prop_assert!(!a.reason().is_empty());
            let live_machine = |m: &str| s.machines.iter().any(|x| x.name == m && x.healthy && x.dedicated);
            let instance = |id: &str| s.instances.iter().any(|i| i.id == id);
            let service = |n: &str| s.services.iter().any(|x| x.name == n);
            let ok = match &a {
                Action::Activate { service: sv, machine, .. } => service(sv) && live_machine(machine),
                Action::Resume { instance: i, machine, .. } => instance(i) && live_machine(machine),
                Action::Migrate { instance: i, to, .. } => instance(i) && live_machine(to),
                Action::Suspend { instance: i, .. } | Action::Discard { instance: i, .. } => instance(i),
                Action::Drop { service: sv, .. } | Action::Undrop { service: sv, .. } => service(sv),
            };
            prop_assert!(ok, "{a:?} names something that does not exist or cannot take load");
        }
    }

    #[test]
    fn never_drops_a_higher_priority_while_a_lower_one_runs(s in arb_snapshot(true)) {
        let (after, _) = settle(s, &Config::default(), 10);
        for hi in after.services.iter().filter(|x| x.dropped) {
            for lo in after.services.iter().filter(|x| x.priority < hi.priority) {
                prop_assert_eq!(placed(&after, &lo.name), 0, "{} (priority {}) is dropped while {} (priority {}) runs", hi.name, hi.priority, lo.name, lo.priority);
            }
        }
    }

    #[test]
    fn keeps_min_where_capacity_allows(s in arb_snapshot(true)) {
        let mut s = s;
        // Ample capacity: one healthy machine big enough for every max.
        s.machines.push(machine("big", 64, 64 * 256));
        let (after, _) = settle(s, &Config::default(), 10);
        for svc in &after.services {
            prop_assert!(placed(&after, &svc.name) as u32 >= svc.min, "{} has fewer than min {}", svc.name, svc.min);
        }
    }

    #[test]
    fn constant_demand_reaches_a_steady_state(s in arb_snapshot(false)) {
        let (after, rounds) = settle(s, &Config::default(), 20);
        prop_assert!(rounds < 20, "no steady state after 20 rounds");
        prop_assert!(decide(&after, &Config::default()).is_empty());
    }
}

#[test]
fn a_spike_is_met_within_one_tick() {
    let mut demand = vec![20.0; 9];
    demand.push(400.0); // the spike arrives on this tick
    let s = Snapshot {
        now_s: 600.0,
        machines: vec![machine("m1", 8, 4096), machine("m2", 8, 4096)],
        services: vec![service("sports", 10, 1, 20, &demand)],
        instances: vec![Instance {
            id: "sports-1".into(),
            service: "sports".into(),
            machine: Some("m1".into()),
            state: InstanceState::Running,
        }],
    };
    let plan = decide(&s, &Config::default());
    let started = plan
        .iter()
        .filter(|a| matches!(a, Action::Activate { .. }))
        .count();
    // 400 req/s × 1.2 headroom ÷ 50 req/s = 10 instances: 9 more, at once.
    assert_eq!(started, 9, "{plan:#?}");
    let machines: std::collections::BTreeSet<_> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Activate { machine, .. } => Some(machine.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(machines.len(), 2, "spread over both machines");
}

#[test]
fn a_short_pool_drops_the_lower_priority_and_keeps_the_higher_whole() {
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 4, 1024)], // room for 4 instances
        services: vec![
            service("finance", 10, 1, 10, &[150.0; 10]),
            service("sports", 5, 1, 10, &[150.0; 10]),
        ],
        instances: vec![
            Instance {
                id: "sports-1".into(),
                service: "sports".into(),
                machine: Some("m1".into()),
                state: InstanceState::Running,
            },
            Instance {
                id: "sports-2".into(),
                service: "sports".into(),
                machine: Some("m1".into()),
                state: InstanceState::Running,
            },
        ],
    };
    let (after, _) = settle(s, &Config::default(), 5);
    assert_eq!(
        placed(&after, "finance"),
        4,
        "finance (150 req/s → 4 instances) is served whole"
    );
    assert_eq!(placed(&after, "sports"), 0);
    assert!(after
        .services
        .iter()
        .any(|x| x.name == "sports" && x.dropped));
    assert!(
        after
            .instances
            .iter()
            .filter(|i| i.service == "sports")
            .all(|i| i.state == InstanceState::Suspended),
        "sports kept its state"
    );
}

#[test]
fn failed_instances_and_dead_machines_are_replaced_and_resume_comes_first() {
    let mut s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 4, 1024), machine("m2", 4, 1024)],
        services: vec![service("web", 1, 2, 4, &[10.0; 10])],
        instances: vec![
            Instance {
                id: "web-1".into(),
                service: "web".into(),
                machine: Some("m1".into()),
                state: InstanceState::Failed,
            },
            Instance {
                id: "web-2".into(),
                service: "web".into(),
                machine: Some("m2".into()),
                state: InstanceState::Running,
            },
            Instance {
                id: "web-3".into(),
                service: "web".into(),
                machine: None,
                state: InstanceState::Suspended,
            },
        ],
    };
    s.machines[1].healthy = false;
    let plan = decide(&s, &Config::default());
    assert!(plan.contains(&Action::Discard {
        instance: "web-1".into(),
        reason: "failed: replace it with a fresh instance".into()
    }));
    assert!(plan.iter().any(|a| matches!(a, Action::Discard { instance, reason } if instance == "web-2" && reason.contains("m2 is down"))));
    assert!(plan.iter().any(|a| matches!(a, Action::Resume { instance, machine, .. } if instance == "web-3" && machine == "m1")), "{plan:#?}");
    assert_eq!(
        plan.iter()
            .filter(|a| matches!(a, Action::Activate { machine, .. } if machine == "m1"))
            .count(),
        1
    );
}

#[test]
fn scale_in_waits_for_the_long_window_and_cool_machines_are_emptied() {
    let c = Config::default();
    let mut demand = vec![200.0; 5];
    demand.extend([20.0; 5]);
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 8, 4096), machine("m2", 8, 4096)],
        services: vec![service("web", 1, 1, 10, &demand)],
        instances: (0..5)
            .map(|n| Instance {
                id: format!("web-{n}"),
                service: "web".into(),
                machine: Some(if n % 2 == 0 { "m1" } else { "m2" }.into()),
                state: InstanceState::Running,
            })
            .collect(),
    };
    assert!(
        decide(&s, &c)
            .iter()
            .all(|a| !matches!(a, Action::Suspend { .. })),
        "the long window still remembers 200 req/s"
    );
    let mut quiet = s.clone();
    quiet.services[0].demand = vec![20.0; 10];
    let (after, _) = settle(quiet, &c, 10);
    assert_eq!(placed(&after, "web"), 1);
    let busy: std::collections::BTreeSet<_> = after
        .instances
        .iter()
        .filter_map(|i| i.machine.clone())
        .collect();
    assert_eq!(
        busy.len(),
        1,
        "the remaining instance is consolidated onto one machine: {after:#?}"
    );
}
