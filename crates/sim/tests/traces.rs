//! The simulator's acceptance on real traces: FINANCE (SPY, July 2025) and SPORTS (World Cup 98),
//! each rescaled to a 2,000 requests/s peak, 50 requests/s per instance, 8 instances per machine,
//! 14 days (10d..24d). The SPY file lives only in the development set (`../shared/traces`, not
//! shipped): without it, the shipped derived FINANCE profile stands in and the test says so.

use std::path::PathBuf;

use vmatrix_sim::{parse_trace, run, PolicyKind, Pool, Settings, SimService, Summary};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(path: &PathBuf, window: (f64, f64)) -> vmatrix_sim::Trace {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse_trace(&text, 60.0, Some(window), Some(2000.0)).expect("trace parses")
}

/// The services, and a pool too small for both (but not for FINANCE alone) on that FINANCE trace.
fn services() -> (Vec<SimService>, usize) {
    let day = 86400.0;
    let window = (10.0 * day, 24.0 * day);
    let spy = repo().join("../shared/traces/finance_spy_2025-07_volume_per_min.csv");
    // Five machines hold FINANCE's peak (40 instances) and little else.
    let (finance, small) = if spy.exists() {
        (spy, 5)
    } else {
        eprintln!(
            "{} is not here: using the derived FINANCE profile",
            spy.display()
        );
        (
            repo().join("examples/traces/finance_profile_4weeks_per_min.csv"),
            5,
        )
    };
    let sports = repo().join("examples/traces/sports_worldcup98_0501-0624_per_min.csv");
    let make = |name: &str, priority: i32, path: &PathBuf| {
        let t = load(path, window);
        SimService {
            name: name.into(),
            priority,
            capacity_rps: 50.0,
            min: 1,
            max: 1000,
            vcpus: 1,
            memory_mib: 256,
            history: t.history,
            demand: t.demand,
            ..SimService::default()
        }
    };
    (
        vec![make("finance", 10, &finance), make("sports", 5, &sports)],
        small,
    )
}

fn pool(machines: usize) -> Pool {
    Pool::new(machines, 8, 4096)
}

fn served(s: &Summary, name: &str) -> f64 {
    s.services[name].served / s.services[name].demand
}

/// Issue 18's targets on every held-out pair of the development traces, with the default
/// settings (the ones `vmatrix up` runs): the high priority loses at most 0.1% of its demand,
/// the low one at most 1%, machine-hours at most 0.9× the reactive reference's. (Under a
/// quarter of static's is out of reach where the lower bound itself is near a quarter: the
/// report says which pairs and by how much.)
#[test]
fn the_default_policy_meets_the_targets_on_every_held_out_pair() {
    let dev = repo().join("../shared/traces");
    let texts: Vec<String> = vmatrix_sim::suite::PARTS
        .iter()
        .map(|p| std::fs::read_to_string(dev.join(p.file)))
        .collect::<Result<_, _>>()
        .unwrap_or_default();
    if texts.is_empty() {
        // Only the development machines have the whole set; the shipped pair stands in.
        eprintln!("{} is not here: the shipped traces stand in", dev.display());
        let (services, _) = services();
        let p = pool(20);
        let re = run(PolicyKind::Reactive, &services, &p, &Settings::default());
        let sw = run(PolicyKind::Switching, &services, &p, &Settings::default());
        assert!(sw.machine_hours <= 0.9 * re.machine_hours);
        assert!(1.0 - served(&sw, "finance") <= 0.001);
        return;
    }
    let pool = Pool::new(20, 8, 4096);
    let results = vmatrix_sim::suite::run_suite(&texts, true, &Settings::default(), &pool, 0, true)
        .expect("the suite runs");
    assert_eq!(results.len(), 6, "every ordered pair of three traces");
    for r in &results {
        let high = vmatrix_sim::suite::loss(&r.switching, "high");
        let low = vmatrix_sim::suite::loss(&r.switching, "low");
        let vs = r.switching.machine_hours / r.reactive.machine_hours;
        eprintln!(
            "{} / {}: lost {:.4}% / {:.4}%, {vs:.3}× reactive, {:.3}× static, {:.3}× the lower bound; misses: {:?}",
            r.high,
            r.low,
            high * 100.0,
            low * 100.0,
            r.switching.machine_hours / r.stat.machine_hours,
            r.switching.machine_hours / r.lower.machine_hours,
            r.misses()
        );
        assert!(high <= 0.001, "{} (p10) loses {high}", r.high);
        assert!(low <= 0.01, "{} (p5) loses {low}", r.low);
        assert!(vs <= 0.9, "{} / {}: {vs}× reactive", r.high, r.low);
        assert!(r.switching.machine_hours >= r.lower.machine_hours);
        // Under a quarter of static's where even the lower bound is well under it; elsewhere
        // the report names the miss.
        let quarter = r.switching.machine_hours < 0.25 * r.stat.machine_hours;
        if r.lower.machine_hours < 0.15 * r.stat.machine_hours {
            assert!(quarter, "{} / {}: static's target", r.high, r.low);
        }
        assert_eq!(
            quarter,
            !r.misses().iter().any(|m| m.contains("static")),
            "the report names a missed target"
        );
    }
}

#[test]
fn a_pool_too_small_costs_only_the_lower_priority() {
    let (services, small) = services();
    let config = Settings::default();
    let large = run(PolicyKind::SwitchingDrop, &services, &pool(20), &config);
    let machines = small;
    let small = run(
        PolicyKind::SwitchingDrop,
        &services,
        &pool(machines),
        &config,
    );
    eprintln!(
        "finance served: 20 machines {:.4}, {machines} machines {:.4}; sports {:.4} vs {:.4}",
        served(&large, "finance"),
        served(&small, "finance"),
        served(&large, "sports"),
        served(&small, "sports")
    );
    assert!(small.peak_machines <= machines);
    assert!((served(&small, "finance") - served(&large, "finance")).abs() < 0.001);
    // Finance needs 40 of its 5 machines' 40 slots at its peak: sports gives way.
    assert!(served(&small, "sports") < served(&large, "sports") - 0.0001);
}
