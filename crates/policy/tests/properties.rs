//! Properties of `decide` over generated clusters, and the scenarios the policy exists for.

use std::collections::HashMap;

use proptest::prelude::*;
use vmatrix_policy::{
    apply, decide, Action, Config, Instance, InstanceState, Machine, Service, Sharing, Snapshot,
};

fn machine(name: &str, vcpus: u32, memory_mib: u32) -> Machine {
    Machine {
        name: name.into(),
        dedicated: true,
        vcpus,
        memory_mib,
        healthy: true,
        cpu_load: 0.0,
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
        forecast_rps: 0.0,
        standby_max: 0,
        spike_rps: 0.0,
        spread: true,
    }
}

fn svc_index(s: &Snapshot, name: &str) -> usize {
    s.services
        .iter()
        .position(|x| x.name == name)
        .expect("service exists")
}

fn instance(id: &str, service: usize, machine: Option<usize>, state: InstanceState) -> Instance {
    Instance {
        id: id.into(),
        service,
        machine,
        state,
        pinned: false,
    }
}

fn placed(s: &Snapshot, service: &str) -> usize {
    let si = svc_index(s, service);
    s.instances
        .iter()
        .filter(|i| {
            i.service == si
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
        let mut n = s.instances.len();
        apply(&mut s, &plan, |svc| {
            n += 1;
            format!("{svc}-p{n}")
        });
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
        (
            0u32..3,
            0u32..5,
            prop::collection::vec(0.0f64..600.0, 1..12),
            1u32..3,
            any::<bool>(),
        ),
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
                cpu_load: 0.0,
            })
            .collect();
        let services: Vec<Service> = ss
            .iter()
            .enumerate()
            .map(|(i, (min, extra, demand, size, standby))| Service {
                name: format!("s{i}"),
                priority: 100 - i as i32 * 10,
                capacity_rps: 50.0,
                min: *min,
                max: min + extra,
                vcpus: if homogeneous { 1 } else { *size },
                memory_mib: if homogeneous { 256 } else { 256 * size },
                demand: demand.clone(),
                dropped: false,
                forecast_rps: 0.0,
                standby_max: if *standby { 2 } else { 0 },
                spike_rps: if *standby { 100.0 } else { 0.0 },
                spread: i % 2 == 0,
            })
            .collect();
        // Place instances only where they fit, so the starting point is valid.
        let mut used: HashMap<usize, (u32, u32)> = HashMap::new();
        let mut instances = Vec::new();
        for (n, (si, mi, kind)) in ps.iter().enumerate() {
            let si = *si % services.len();
            let svc = &services[si];
            let mi = *mi % machines.len();
            let m = &machines[mi];
            let state = match kind {
                0 => InstanceState::Failed,
                1 => InstanceState::Suspended,
                2 => InstanceState::Paused,
                _ => InstanceState::Running,
            };
            if state == InstanceState::Suspended {
                instances.push(instance(&format!("i{n}"), si, None, state));
                continue;
            }
            let u = used.entry(mi).or_default();
            let cpu = if state == InstanceState::Paused {
                0
            } else {
                svc.vcpus
            };
            if m.dedicated && u.0 + cpu <= m.vcpus && u.1 + svc.memory_mib <= m.memory_mib {
                u.0 += cpu;
                u.1 += svc.memory_mib;
                instances.push(instance(&format!("i{n}"), si, Some(mi), state));
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

fn after(s: &Snapshot) -> Snapshot {
    let mut out = s.clone();
    apply(&mut out, &decide(s, &Config::default()), |svc| {
        format!("{svc}-new")
    });
    out
}

proptest! {
    #[test]
    fn never_overcommits_a_machine(s in arb_snapshot(false)) {
        let after = after(&s);
        for (mi, m) in after.machines.iter().enumerate() {
            let (mut cpu, mut mem) = (0, 0);
            for i in after.instances.iter().filter(|i| i.machine == Some(mi) && i.state != InstanceState::Suspended) {
                if i.state != InstanceState::Paused {
                    cpu += after.services[i.service].vcpus;
                }
                mem += after.services[i.service].memory_mib;
            }
            prop_assert!(cpu <= m.vcpus && mem <= m.memory_mib, "{} over-committed: {cpu} vCPU, {mem} MiB", m.name);
        }
    }

    #[test]
    fn every_action_refers_to_existing_objects(s in arb_snapshot(false)) {
        for a in decide(&s, &Config::default()) {
            prop_assert!(!a.reason().is_empty());
            let live_machine = |m: usize| s.machines.get(m).is_some_and(|x| x.healthy && x.dedicated);
            let instance = |i: usize| i < s.instances.len();
            let service = |n: usize| n < s.services.len();
            let ok = match a {
                Action::Activate { service: sv, machine, .. } | Action::Prepare { service: sv, machine, .. } => service(sv) && live_machine(machine),
                Action::Pause { instance: i, .. } => instance(i) && s.instances[i].state == InstanceState::Running,
                Action::Unpause { instance: i, .. } => instance(i) && s.instances[i].state == InstanceState::Paused,
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

    #[test]
    fn weighted_fair_sharing_never_overcommits_and_keeps_every_service_alive(s in arb_snapshot(true)) {
        let c = Config { sharing: Sharing::WeightedFair, ..Config::default() };
        let (after, rounds) = settle(s, &c, 20);
        prop_assert!(rounds < 20, "no steady state after 20 rounds");
        for (mi, m) in after.machines.iter().enumerate() {
            let here = || after.instances.iter().filter(|i| i.machine == Some(mi) && i.state != InstanceState::Suspended);
            let (n, running) = (here().count() as u32, here().filter(|i| i.state != InstanceState::Paused).count() as u32);
            prop_assert!(running <= m.vcpus && n <= m.memory_mib / 256, "{} over-committed", m.name);
        }
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
        instances: vec![instance("sports-1", 0, Some(0), InstanceState::Running)],
    };
    let plan = decide(&s, &Config::default());
    // 400 req/s × 1.2 headroom ÷ 50 req/s = 10 instances: 9 more, at once, over both machines
    // (the service spreads: one instance goes to m2 even though m1 has room).
    let machines: Vec<usize> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Activate { machine, .. } => Some(*machine),
            _ => None,
        })
        .collect();
    assert_eq!(machines.len(), 9, "{plan:#?}");
    let on_m1 = machines.iter().filter(|m| **m == 0).count();
    assert!((1..=7).contains(&on_m1), "{on_m1} more on m1");
    assert!(machines.contains(&1), "m2 takes some");
}

#[test]
fn replicas_spread_while_services_pack() {
    // Three empty machines, two services of min 2: each service on two machines, and both
    // services share those machines instead of opening a third.
    let s = Snapshot {
        now_s: 0.0,
        machines: (0..3).map(|n| machine(&format!("m{n}"), 8, 2048)).collect(),
        services: vec![service("a", 5, 2, 4, &[0.0]), service("b", 1, 2, 4, &[0.0])],
        instances: vec![],
    };
    let (after, _) = settle(s.clone(), &Config::default(), 10);
    for name in ["a", "b"] {
        let si = svc_index(&after, name);
        let on: std::collections::BTreeSet<_> = after
            .instances
            .iter()
            .filter(|i| i.service == si)
            .filter_map(|i| i.machine)
            .collect();
        assert_eq!(on.len(), 2, "{name} is on {on:?}");
    }
    let busy: std::collections::BTreeSet<_> =
        after.instances.iter().filter_map(|i| i.machine).collect();
    assert_eq!(
        busy.len(),
        2,
        "the services pack onto two machines: {busy:?}"
    );
    // Opting out packs one service onto one machine.
    let mut packed = s;
    packed.services.truncate(1);
    packed.services[0].spread = false;
    let (after, _) = settle(packed, &Config::default(), 10);
    let busy: std::collections::BTreeSet<_> =
        after.instances.iter().filter_map(|i| i.machine).collect();
    assert_eq!(busy.len(), 1, "spread = false: {busy:?}");
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
            instance("sports-1", 1, Some(0), InstanceState::Running),
            instance("sports-2", 1, Some(0), InstanceState::Running),
        ],
    };
    let (after, _) = settle(s, &Config::default(), 5);
    // 150 req/s needs 3 instances, 4 with headroom: strict priority gives finance all 4.
    assert_eq!(
        placed(&after, "finance"),
        4,
        "finance is served as in a large pool"
    );
    assert_eq!(placed(&after, "sports"), 0);
    assert!(after.services[1].dropped);
    assert!(!after.services[0].dropped);
    assert!(
        after
            .instances
            .iter()
            .filter(|i| i.service == 1)
            .all(|i| i.state == InstanceState::Suspended),
        "sports kept its state"
    );
}

#[test]
fn a_higher_priority_scale_out_takes_free_machines_before_evicting() {
    // finance grows; a free machine exists: sports must not be dropped for it.
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 4, 1024), machine("m2", 4, 1024)],
        services: vec![
            service("finance", 10, 1, 10, &[120.0; 10]), // → 3 instances
            service("sports", 5, 2, 10, &[10.0; 10]),    // → min 2
        ],
        instances: vec![
            instance("finance-1", 0, Some(0), InstanceState::Running),
            instance("sports-1", 1, Some(0), InstanceState::Running),
            instance("sports-2", 1, Some(0), InstanceState::Running),
        ],
    };
    let plan = decide(&s, &Config::default());
    assert!(
        plan.iter()
            .all(|a| !matches!(a, Action::Suspend { .. } | Action::Drop { .. })),
        "{plan:#?}"
    );
    let (after, _) = settle(s, &Config::default(), 5);
    assert_eq!(placed(&after, "finance"), 3);
    assert_eq!(placed(&after, "sports"), 2);
}

#[test]
fn failed_instances_and_dead_machines_are_replaced_and_resume_comes_first() {
    let mut s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 4, 1024), machine("m2", 4, 1024)],
        services: vec![service("web", 1, 2, 4, &[10.0; 10])],
        instances: vec![
            instance("web-1", 0, Some(0), InstanceState::Failed),
            instance("web-2", 0, Some(1), InstanceState::Running),
            instance("web-3", 0, None, InstanceState::Suspended),
        ],
    };
    s.machines[1].healthy = false;
    let plan = decide(&s, &Config::default());
    assert!(plan.iter().any(
        |a| matches!(a, Action::Discard { instance: 0, reason } if reason.contains("failed"))
    ));
    assert!(plan.iter().any(
        |a| matches!(a, Action::Discard { instance: 1, reason } if reason.contains("m2 is down"))
    ));
    assert!(
        plan.iter().any(|a| matches!(
            a,
            Action::Resume {
                instance: 2,
                machine: 0,
                ..
            }
        )),
        "{plan:#?}"
    );
    assert_eq!(
        plan.iter()
            .filter(|a| matches!(a, Action::Activate { machine: 0, .. }))
            .count(),
        1
    );
}

#[test]
fn scale_in_waits_for_the_long_window_and_empties_the_emptiest_machine() {
    let c = Config::default();
    let mut demand = vec![200.0; 5];
    demand.extend([20.0; 5]);
    // m1 holds three instances, m2 two.
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 8, 4096), machine("m2", 8, 4096)],
        services: vec![service("web", 1, 1, 10, &demand)],
        instances: (0..5)
            .map(|n| {
                let m = usize::from(n % 2 == 1);
                instance(&format!("web-{n}"), 0, Some(m), InstanceState::Running)
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
    quiet.services[0].demand = vec![120.0; 10]; // → 3 instances
    let plan = decide(&quiet, &c);
    let suspended: Vec<usize> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Suspend { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    assert_eq!(suspended, vec![1, 3], "the two on m2 go: {plan:#?}");
    quiet.services[0].demand = vec![20.0; 10];
    let (after, _) = settle(quiet, &c, 10);
    assert_eq!(placed(&after, "web"), 1);
}

#[test]
fn cool_machines_are_emptied_by_migration_within_the_move_cap() {
    let c = Config {
        max_moves: 3,
        ..Config::default()
    };
    // Three machines with 3, 2 and 1 instances of a steady service: 6 fit on one.
    let spots = [0, 0, 0, 1, 1, 2];
    let s = Snapshot {
        now_s: 0.0,
        machines: (0..3).map(|n| machine(&format!("m{n}"), 8, 2048)).collect(),
        // → 6 instances; `spread = false` (a spread service would keep two machines).
        services: vec![Service {
            spread: false,
            ..service("web", 1, 1, 10, &[240.0; 10])
        }],
        instances: spots
            .iter()
            .enumerate()
            .map(|(n, m)| instance(&format!("web-{n}"), 0, Some(*m), InstanceState::Running))
            .collect(),
    };
    let plan = decide(&s, &c);
    let moves: Vec<(usize, usize)> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Migrate { instance, to, .. } => Some((*instance, *to)),
            _ => None,
        })
        .collect();
    assert!(moves.len() <= 3, "within the cap: {plan:#?}");
    assert_eq!(
        moves[0].0, 5,
        "m3 (one instance) is emptied first: {plan:#?}"
    );
    assert!(
        moves.iter().all(|(_, to)| *to == 0),
        "onto the fullest: {plan:#?}"
    );
    let (after, rounds) = settle(s, &c, 10);
    let busy: std::collections::BTreeSet<_> =
        after.instances.iter().filter_map(|i| i.machine).collect();
    assert_eq!(
        busy.len(),
        1,
        "all six end on one machine after {rounds} rounds"
    );
}

#[test]
fn instances_leave_a_draining_machine_and_a_hot_one_is_relieved() {
    let mut s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 8, 2048), machine("m2", 8, 2048)],
        services: vec![service("web", 1, 2, 10, &[10.0; 10])],
        instances: vec![
            instance("web-1", 0, Some(0), InstanceState::Running),
            instance("web-2", 0, Some(1), InstanceState::Running),
        ],
    };
    s.machines[1].dedicated = false; // drained
    let plan = decide(&s, &Config::default());
    assert!(
        plan.iter().any(
            |a| matches!(a, Action::Migrate { instance: 1, to: 0, reason } if reason.contains("m2"))
        ),
        "{plan:#?}"
    );
    // A machine that lost room (bigger instances) sends one away; consolidation must not move
    // that one again in the same plan.
    let mut grown = Snapshot {
        now_s: 0.0,
        machines: vec![
            machine("m1", 8, 2048),
            machine("m2", 8, 2048),
            machine("m3", 8, 2048),
        ],
        services: vec![service("web", 1, 3, 10, &[10.0; 10])],
        instances: vec![
            instance("web-1", 0, Some(0), InstanceState::Running),
            instance("web-2", 0, Some(0), InstanceState::Running),
            instance("web-3", 0, Some(1), InstanceState::Running),
        ],
    };
    grown.services[0].memory_mib = 1536; // m1 now holds only one
    let plan = decide(&grown, &Config::default());
    let mut moved: Vec<usize> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Migrate { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    let n = moved.len();
    moved.sort_unstable();
    moved.dedup();
    assert_eq!(moved.len(), n, "an instance moved twice: {plan:#?}");
    assert!(n >= 1, "{plan:#?}");
    s.machines[1].dedicated = true;
    s.instances[1].machine = Some(0);
    s.machines[0].cpu_load = 0.97;
    s.instances
        .push(instance("web-3", 0, Some(1), InstanceState::Running));
    s.services[0].demand = vec![120.0; 10]; // → 3 instances: no scaling
    let plan = decide(&s, &Config::default());
    assert!(
        plan.iter().any(
            |a| matches!(a, Action::Migrate { to: 1, reason, .. } if reason.contains("relieve m1"))
        ),
        "{plan:#?}"
    );
}

#[test]
fn weighted_fair_sharing_splits_a_short_pool_by_priority() {
    let c = Config {
        sharing: Sharing::WeightedFair,
        ..Config::default()
    };
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 8, 2048), machine("m2", 8, 2048)], // 16 slots
        services: vec![
            service("finance", 3, 1, 100, &[1000.0; 10]), // wants 24
            service("sports", 1, 1, 100, &[1000.0; 10]),  // wants 24
        ],
        instances: vec![],
    };
    let (after, _) = settle(s.clone(), &c, 10);
    assert_eq!(placed(&after, "finance"), 12, "3/4 of 16");
    assert_eq!(placed(&after, "sports"), 4, "1/4 of 16");
    assert!(after.services.iter().all(|x| x.dropped));
    let (strict, _) = settle(s, &Config::default(), 10);
    assert_eq!(placed(&strict, "finance"), 16);
    assert_eq!(placed(&strict, "sports"), 0);
    // A pool that holds every need: fair sharing cuts nothing, headroom included.
    let roomy = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 64, 64 * 256)],
        services: vec![service("finance", 3, 1, 100, &[150.0; 10])],
        instances: vec![],
    };
    let (after, _) = settle(roomy, &c, 10);
    assert_eq!(placed(&after, "finance"), 4, "150 req/s × 1.2 ÷ 50");
}

#[test]
fn a_callers_forecast_is_provisioned_before_the_demand_comes() {
    let mut s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m1", 8, 4096)],
        services: vec![service("finance", 10, 1, 20, &[10.0; 10])],
        instances: vec![instance("finance-1", 0, Some(0), InstanceState::Running)],
    };
    assert!(
        decide(&s, &Config::default()).is_empty(),
        "10 req/s: one is enough"
    );
    s.services[0].forecast_rps = 200.0; // the market opens in a few minutes
    let started = decide(&s, &Config::default())
        .iter()
        .filter(|a| matches!(a, Action::Activate { .. }))
        .count();
    assert_eq!(started, 4, "200 req/s × 1.2 ÷ 50 = 5 instances, 4 more");
}
