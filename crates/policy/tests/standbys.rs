//! Warm standbys and the fast path over generated clusters: a standby never takes CPU from a
//! running higher priority, CPU is never over-committed, and a paused lower priority is
//! resumed first when room returns.

use proptest::prelude::*;
use vmatrix_policy::{
    apply, decide, react, Action, Config, Instance, InstanceState, Machine, Service, Snapshot,
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

fn service(name: &str, priority: i32, demand: &[f64], standby_max: u32) -> Service {
    Service {
        name: name.into(),
        priority,
        capacity_rps: 50.0,
        min: 1,
        max: 20,
        vcpus: 1,
        memory_mib: 256,
        demand: demand.to_vec(),
        forecast_rps: 0.0,
        dropped: false,
        standby_max,
        spike_rps: if standby_max > 0 { 400.0 } else { 0.0 },
        spread: true,
    }
}

fn instance(id: &str, service: usize, machine: usize, state: InstanceState) -> Instance {
    Instance {
        id: id.into(),
        service,
        machine: Some(machine),
        state,
        pinned: false,
    }
}

/// Machines of 4 vCPUs and 16 slots of memory; three services of priorities 30, 20 and 10,
/// each with a demand now and some running and paused instances placed where CPU and memory
/// allow.
fn arb_cluster() -> impl Strategy<Value = Snapshot> {
    let machines = 1usize..4;
    let services = prop::collection::vec((0.0f64..400.0, 0u32..4), 3);
    let placements = prop::collection::vec((0usize..3, 0usize..4, any::<bool>()), 0..16);
    (machines, services, placements).prop_map(|(n, ss, ps)| {
        let machines: Vec<Machine> = (0..n).map(|i| machine(&format!("m{i}"), 4, 4096)).collect();
        let services: Vec<Service> = ss
            .iter()
            .enumerate()
            .map(|(k, (d, standby))| service(&format!("s{k}"), 30 - 10 * k as i32, &[*d], *standby))
            .collect();
        let mut cpu = vec![0u32; n];
        let mut mem = vec![0u32; n];
        let mut instances = Vec::new();
        for (k, (si, mi, paused)) in ps.into_iter().enumerate() {
            let mi = mi % n;
            let need_cpu = u32::from(!paused);
            if cpu[mi] + need_cpu > 4 || mem[mi] + 256 > 4096 {
                continue;
            }
            cpu[mi] += need_cpu;
            mem[mi] += 256;
            let state = if paused {
                InstanceState::Paused
            } else {
                InstanceState::Running
            };
            instances.push(instance(&format!("i{k}"), si, mi, state));
        }
        Snapshot {
            now_s: 0.0,
            machines,
            services,
            instances,
        }
    })
}

fn priority(s: &Snapshot, idx: usize) -> i32 {
    s.services[s.instances[idx].service].priority
}

/// Every pause that frees CPU (server drop) has, on the same machine and in the same plan, an
/// unpause of a strictly higher priority.
fn drops_only_for_higher(s: &Snapshot, plan: &[Action]) -> Result<(), String> {
    for a in plan {
        let Action::Pause { instance, reason } = a else {
            continue;
        };
        if !reason.starts_with("server drop") {
            continue;
        }
        let m = s.instances[*instance].machine;
        let ok = plan.iter().any(|b| match b {
            Action::Unpause { instance: u, .. } => {
                s.instances[*u].machine == m && priority(s, *u) > priority(s, *instance)
            }
            _ => false,
        });
        if !ok {
            return Err(format!("{a:?} frees CPU for nobody higher: {plan:#?}"));
        }
    }
    Ok(())
}

fn cpu_fits(s: &Snapshot) -> Result<(), String> {
    for (m, machine) in s.machines.iter().enumerate() {
        let used: u32 = s
            .instances
            .iter()
            .filter(|i| {
                i.machine == Some(m)
                    && matches!(i.state, InstanceState::Running | InstanceState::Starting)
            })
            .map(|i| s.services[i.service].vcpus)
            .sum();
        if used > machine.vcpus {
            return Err(format!(
                "{} runs {used} vCPUs of {}",
                machine.name, machine.vcpus
            ));
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn the_fast_path_never_takes_cpu_from_a_higher_priority_nor_overcommits(s in arb_cluster()) {
        let plan = react(&s);
        let only_pauses = plan
            .iter()
            .all(|a| matches!(a, Action::Pause { .. } | Action::Unpause { .. }));
        prop_assert!(only_pauses, "{:?}", plan);
        if let Err(e) = drops_only_for_higher(&s, &plan) {
            prop_assert!(false, "{}", e);
        }
        // Every pause names a running instance of a lower priority than the unpause it serves.
        for a in &plan {
            if let Action::Pause { instance, .. } = a {
                prop_assert_eq!(s.instances[*instance].state, InstanceState::Running);
            }
        }
        let mut after = s.clone();
        apply(&mut after, &plan, |n| format!("{n}-new"));
        if let Err(e) = cpu_fits(&after) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn the_tick_never_takes_cpu_from_a_higher_priority_nor_overcommits(s in arb_cluster()) {
        let plan = decide(&s, &Config::default());
        if let Err(e) = drops_only_for_higher(&s, &plan) {
            prop_assert!(false, "{}", e);
        }
        let mut after = s.clone();
        apply(&mut after, &plan, |n| format!("{n}-new"));
        if let Err(e) = cpu_fits(&after) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn a_spike_unpauses_standbys_and_pauses_the_lower_priority_on_their_machine() {
    // One machine of 3 vCPUs: finance runs 1 with 2 standbys, sports runs 2.
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m0", 3, 4096)],
        services: vec![
            service("finance", 10, &[140.0], 2),
            service("sports", 1, &[60.0], 0),
        ],
        instances: vec![
            instance("finance-1", 0, 0, InstanceState::Running),
            instance("finance-2", 0, 0, InstanceState::Paused),
            instance("finance-3", 0, 0, InstanceState::Paused),
            instance("sports-1", 1, 0, InstanceState::Running),
            instance("sports-2", 1, 0, InstanceState::Running),
        ],
    };
    let plan = react(&s);
    let unpaused = plan
        .iter()
        .filter(|a| matches!(a, Action::Unpause { .. }))
        .count();
    let paused: Vec<usize> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Pause { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    assert_eq!(unpaused, 2, "140 req/s at 50 each: 3 must run: {plan:#?}");
    assert_eq!(
        paused,
        vec![4, 3],
        "both sports instances give their CPU: {plan:#?}"
    );
}

#[test]
fn a_paused_lower_priority_is_resumed_first_when_room_returns() {
    // The spike passed: finance is back to one instance's worth; sports was paused for it.
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m0", 3, 4096)],
        services: vec![
            service("finance", 10, &[20.0; 10], 0),
            service("sports", 1, &[60.0; 10], 0),
        ],
        instances: vec![
            instance("finance-1", 0, 0, InstanceState::Running),
            instance("sports-1", 1, 0, InstanceState::Paused),
            instance("sports-2", 1, 0, InstanceState::Paused),
        ],
    };
    let plan = decide(&s, &Config::default());
    let unpaused: Vec<usize> = plan
        .iter()
        .filter_map(|a| match a {
            Action::Unpause { instance, .. } => Some(*instance),
            _ => None,
        })
        .collect();
    assert_eq!(unpaused.len(), 2, "{plan:#?}");
    assert!(unpaused.iter().all(|i| s.instances[*i].service == 1));
    assert!(
        !plan
            .iter()
            .any(|a| matches!(a, Action::Activate { .. } | Action::Resume { .. })),
        "nothing new starts before the paused ones run: {plan:#?}"
    );
}

#[test]
fn a_lower_priority_paused_for_a_spike_waits_paused_not_suspended() {
    // finance took the machine's CPU at its spike; sports, paused for it, has no standbys of its
    // own but waits paused to run again (not suspended as a standby surplus).
    let s = Snapshot {
        now_s: 0.0,
        machines: vec![machine("m0", 3, 4096)],
        services: vec![
            service("finance", 10, &[140.0; 10], 2),
            service("sports", 1, &[60.0; 10], 0),
        ],
        instances: vec![
            instance("finance-1", 0, 0, InstanceState::Running),
            instance("finance-2", 0, 0, InstanceState::Running),
            instance("finance-3", 0, 0, InstanceState::Running),
            instance("sports-1", 1, 0, InstanceState::Paused),
            instance("sports-2", 1, 0, InstanceState::Paused),
        ],
    };
    let plan = decide(&s, &Config::default());
    assert!(
        !plan.iter().any(|a| match a {
            Action::Suspend { instance, .. } | Action::Discard { instance, .. } =>
                s.instances[*instance].service == 1,
            _ => false,
        }),
        "{plan:#?}"
    );
}

/// A step of load taken by the standbys: while the step lasts (within the scale-in window) no
/// new standby boots beside the instances serving it; once demand has been flat for a whole
/// scale-in window, standbys are prepared again.
#[test]
fn no_new_standby_boots_while_a_step_is_served() {
    let c = Config::default();
    let plan_with = |demand: Vec<f64>| {
        let s = Snapshot {
            now_s: 0.0,
            machines: vec![machine("m0", 8, 8192), machine("m1", 8, 8192)],
            services: vec![service("shop", 10, &demand, 2)],
            instances: vec![
                instance("shop-1", 0, 0, InstanceState::Running),
                instance("shop-2", 0, 0, InstanceState::Running),
                instance("shop-3", 0, 1, InstanceState::Running),
            ],
        };
        decide(&s, &c)
    };
    let prepares = |plan: &[Action]| {
        plan.iter()
            .filter(|a| matches!(a, Action::Prepare { .. }))
            .count()
    };
    // 20 req/s, then 120 for longer than the scale-out window but shorter than the scale-in.
    let mut stepped = vec![20.0; c.scale_in_window];
    stepped.extend(vec![120.0; c.scale_out_window + 1]);
    let plan = plan_with(stepped);
    assert_eq!(
        prepares(&plan),
        0,
        "a standby booted during the step: {plan:#?}"
    );
    let flat = vec![120.0; c.scale_in_window + 1];
    let plan = plan_with(flat);
    assert_eq!(
        prepares(&plan),
        2,
        "no standbys after a flat window: {plan:#?}"
    );
}
