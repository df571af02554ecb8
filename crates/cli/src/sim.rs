//! `vmatrix sim`: reads the services file and traces (the I/O edge), runs the pure simulator for
//! each policy, prints the comparison and writes `summary.json` and `steps.csv`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use vmatrix_sim::plot::{line_chart, Series};
use vmatrix_sim::{
    lower_bound, parse_trace, run as simulate, Latencies, PolicyKind, Pool, Sharing, SimService,
    Summary,
};

#[derive(clap::Args)]
pub struct SimArgs {
    /// Services file (the same TOML as `apply`).
    #[arg(long, required_unless_present_any = ["show_config", "suite"])]
    pub services: Option<PathBuf>,
    /// SERVICE=FILE: a trace (CSV t_seconds,value) per service.
    #[arg(long = "trace", required_unless_present_any = ["show_config", "suite"])]
    pub traces: Vec<String>,
    /// Instead of --services/--trace: every ordered pair of the development traces on their
    /// `tune` or `held-out` part (or `both`), one table with the targets checked
    /// (docs/benchmarks.md).
    #[arg(long)]
    pub suite: Option<String>,
    /// Where the development traces are (for --suite; default ../shared/traces).
    #[arg(long)]
    pub traces_dir: Option<PathBuf>,
    /// Warm standbys per service in the --suite runs.
    #[arg(long, default_value_t = 0)]
    pub standby_max: u32,
    /// Pack each service's instances in the --suite runs (`spread = false`).
    #[arg(long)]
    pub no_spread: bool,
    /// Machines in the pool (switching-drop is limited to it).
    #[arg(long, default_value_t = 10)]
    pub machines: usize,
    /// The policy's settings (TOML, the same file `vmatrix up --policy-file` reads); the flags
    /// below override single settings. Default: the built-in settings `vmatrix up` runs.
    #[arg(long)]
    pub policy_file: Option<PathBuf>,
    /// Print the policy settings this run uses (JSON) and stop.
    #[arg(long)]
    pub show_config: bool,
    /// static, reactive, switching, switching-drop or all.
    #[arg(long = "policy", default_value = "all")]
    pub kind: String,
    /// Write summary.json, steps.csv and the SVG charts here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// vCPUs per machine.
    #[arg(long, default_value_t = 8)]
    pub machine_vcpus: u32,
    /// Memory per machine, MiB.
    #[arg(long, default_value_t = 4096)]
    pub machine_memory_mib: u32,
    /// SERVICE=R: rescale that trace so its peak is R requests/s.
    #[arg(long = "peak-rps")]
    pub peak_rps: Vec<String>,
    /// START..END of the traces to use, e.g. 10d..17d (units s, m, h, d); what comes before
    /// START is the policies' history.
    #[arg(long)]
    pub window: Option<String>,
    /// Seconds per step.
    #[arg(long, default_value_t = 60.0)]
    pub step: f64,
    /// How a pool too small for every wish is shared: strict-priority or weighted-fair
    /// (default: the policy settings').
    #[arg(long)]
    pub sharing: Option<String>,
    /// Seconds from cold boot to serving (default: measured by `vmatrix bench vmm`).
    #[arg(long)]
    pub boot_s: Option<f64>,
    /// Seconds from resume to serving.
    #[arg(long)]
    pub resume_s: Option<f64>,
    /// Seconds a suspend takes.
    #[arg(long)]
    pub suspend_s: Option<f64>,
    /// Seconds of downtime per live migration.
    #[arg(long)]
    pub migrate_downtime_s: Option<f64>,
    /// Seconds from a change of demand to the fast path seeing it.
    #[arg(long)]
    pub detect_s: Option<f64>,
    /// Seconds from unpausing a standby to serving.
    #[arg(long)]
    pub unpause_s: Option<f64>,
    #[command(flatten)]
    pub policy: crate::policy_file::PolicyFlags,
}

fn pool_of(a: &SimArgs) -> Result<Pool> {
    if a.machines == 0 || a.machine_vcpus == 0 || a.machine_memory_mib == 0 {
        bail!("--machines, --machine-vcpus and --machine-memory-mib must be above 0");
    }
    let measured = Latencies::default();
    let latency = |v: Option<f64>, default: f64, flag: &str| -> Result<f64> {
        match v {
            Some(x) if !(x >= 0.0 && x.is_finite()) => bail!("{flag} {x}: use seconds ≥ 0"),
            Some(x) => Ok(x),
            None => Ok(default),
        }
    };
    Ok(Pool {
        machines: a.machines,
        vcpus: a.machine_vcpus,
        memory_mib: a.machine_memory_mib,
        step_s: a.step,
        latencies: Latencies {
            boot_s: latency(a.boot_s, measured.boot_s, "--boot-s")?,
            resume_s: latency(a.resume_s, measured.resume_s, "--resume-s")?,
            suspend_s: latency(a.suspend_s, measured.suspend_s, "--suspend-s")?,
            migrate_downtime_s: latency(
                a.migrate_downtime_s,
                measured.migrate_downtime_s,
                "--migrate-downtime-s",
            )?,
            detect_s: latency(a.detect_s, measured.detect_s, "--detect-s")?,
            unpause_s: latency(a.unpause_s, measured.unpause_s, "--unpause-s")?,
        },
        record: a.out.is_some(),
    })
}

/// `--suite`: the development traces' pairs, tuned or held-out part.
fn suite(a: &SimArgs, which: &str, settings: &vmatrix_sim::Settings) -> Result<()> {
    let parts: &[bool] = match which {
        "tune" => &[false],
        "held-out" => &[true],
        "both" => &[false, true],
        other => bail!("--suite {other:?}: use tune, held-out or both"),
    };
    let dir = crate::suite::traces_dir(a.traces_dir.as_deref())?;
    let pool = pool_of(a)?;
    let l = pool.latencies;
    println!(
        "{}",
        crate::bench_stats::section(
            "The policy against static, reactive and the lower bound, on traces it was not tuned on",
            &format!("vmatrix sim --suite {which}"),
            &format!(
                "the simulator, with the same `decide` and settings `vmatrix up` runs, over every \
                 ordered pair of the development traces (FINANCE = SPY volume per minute, July \
                 2025; SPORTS = World Cup 98; NASA = NASA KSC, July 1995), the first at priority \
                 10, the second at priority 5, each rescaled to a 2,000 req/s peak, 50 req/s per \
                 instance (1 vCPU / 256 MiB), min 1. Each trace is cut in two: the defaults were \
                 chosen on the earlier part (*tuning part*) and are reported on the later one \
                 (*held-out part*, never tuned on). Machines of {} vCPU / {} MiB; steps of {} s; \
                 each step's demand is seen {} s into it, and what the policy starts serves after \
                 its measured latency (unpause {} s, resume {} s, cold boot {} s, migration \
                 downtime {} s: `vmatrix bench vmm`); the reactive reference gets the same \
                 in-step reaction. *Static*: every service sized for its own peak all the time; \
                 *reactive*: an autoscaler's rule (Kubernetes' HPA) on unlimited machines with \
                 free re-packing; *lower bound*: the demand of each step packed perfectly, no latency. Requests \
                 beyond capacity wait (*held*) and are *lost* only when the step cannot serve \
                 them. Deterministic: one run. Policy settings: `{}`.",
                pool.vcpus,
                pool.memory_mib,
                pool.step_s,
                l.detect_s,
                l.unpause_s,
                l.resume_s,
                l.boot_s,
                l.migrate_downtime_s,
                serde_json::to_string(settings)?
            )
        )
    );
    let mut missed = 0;
    for &held_out in parts {
        let r =
            crate::suite::run_suite(&dir, held_out, settings, &pool, a.standby_max, !a.no_spread)?;
        missed += crate::suite::print(
            &r,
            if held_out {
                "**Held-out part** (reported; never tuned on)"
            } else {
                "**Tuning part**"
            },
        );
    }
    if missed > 0 {
        println!("\n{missed} pair(s) miss a target (the last column says which, by how much)");
    } else {
        println!("\nevery pair meets every target");
    }
    Ok(())
}

pub(crate) fn seconds(s: &str) -> Result<f64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1.0),
        Some('m') => (&s[..s.len() - 1], 60.0),
        Some('h') => (&s[..s.len() - 1], 3600.0),
        Some('d') => (&s[..s.len() - 1], 86400.0),
        _ => (s, 1.0),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a time: use e.g. 90s, 30m, 12h or 10d"))?;
    Ok(n * mult)
}

fn pairs(list: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| anyhow!("{what} {p:?}: write SERVICE=VALUE"))
        })
        .collect()
}

pub fn run(a: SimArgs) -> Result<()> {
    let mut settings = crate::policy_file::load(a.policy_file.as_deref(), &a.policy)?;
    if let Some(sharing) = &a.sharing {
        settings.sharing = match sharing.as_str() {
            "strict-priority" => Sharing::StrictPriority,
            "weighted-fair" => Sharing::WeightedFair,
            other => bail!("--sharing {other:?}: use strict-priority or weighted-fair"),
        };
    }
    if a.show_config {
        println!("{}", serde_json::to_string_pretty(&settings)?);
        return Ok(());
    }
    if let Some(which) = &a.suite {
        return suite(&a, which, &settings);
    }
    let services_file = a
        .services
        .clone()
        .ok_or_else(|| anyhow!("--services FILE is required"))?;
    let text = std::fs::read_to_string(&services_file)
        .with_context(|| format!("reading {}", services_file.display()))?;
    let specs = vmatrix_core::parse_services(
        &services_file.display().to_string(),
        &text,
        &crate::beside(&services_file),
    )?;
    let traces = pairs(&a.traces, "--trace")?;
    let peaks = pairs(&a.peak_rps, "--peak-rps")?;
    let window = match &a.window {
        None => None,
        Some(w) => {
            let (s, e) = w
                .split_once("..")
                .ok_or_else(|| anyhow!("--window {w:?}: write START..END, e.g. 10d..17d"))?;
            Some((seconds(s)?, seconds(e)?))
        }
    };
    let mut services = Vec::new();
    for spec in &specs {
        let file = traces
            .get(spec.name.as_str())
            .ok_or_else(|| anyhow!("no --trace {}=FILE for service {}", spec.name, spec.name))?;
        let peak = peaks
            .get(spec.name.as_str())
            .map(|p| {
                p.parse::<f64>()
                    .map_err(|_| anyhow!("--peak-rps {}={p}: not a number", spec.name))
            })
            .transpose()?;
        let body =
            std::fs::read_to_string(file).with_context(|| format!("reading trace {file}"))?;
        let trace = parse_trace(&body, a.step, window, peak).map_err(|e| anyhow!("{file}: {e}"))?;
        services.push(SimService {
            name: spec.name.to_string(),
            priority: spec.priority,
            capacity_rps: spec.capacity_rps,
            min: spec.min,
            max: spec.max,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            history: trace.history,
            demand: trace.demand,
            standby_max: spec.standby_max,
            spread: spec.spread,
        });
    }
    // Traces of different lengths: the short ones count as no demand at the end.
    let longest = services.iter().map(|s| s.demand.len()).max().unwrap_or(0);
    for s in services.iter().filter(|s| s.demand.len() < longest) {
        eprintln!(
            "warning: the trace of {} covers {:.1} of the {:.1} days simulated; after it ends its demand counts as 0",
            s.name,
            s.demand.len() as f64 * a.step / 86400.0,
            longest as f64 * a.step / 86400.0
        );
    }
    for name in traces.keys() {
        if !specs.iter().any(|s| s.name.as_str() == name) {
            bail!(
                "--trace {name}=…: no such service in {}",
                services_file.display()
            );
        }
    }
    for spec in &specs {
        if spec.vcpus > a.machine_vcpus || spec.memory_mib > a.machine_memory_mib {
            bail!(
                "service {} ({} vCPU, {} MiB) does not fit a machine of {} vCPU, {} MiB: \
                 raise --machine-vcpus / --machine-memory-mib",
                spec.name,
                spec.vcpus,
                spec.memory_mib,
                a.machine_vcpus,
                a.machine_memory_mib
            );
        }
    }
    let pool = pool_of(&a)?;
    let kinds: Vec<PolicyKind> = match a.kind.as_str() {
        "all" => vec![
            PolicyKind::Static,
            PolicyKind::Reactive,
            PolicyKind::Switching,
            PolicyKind::SwitchingDrop,
        ],
        "static" => vec![PolicyKind::Static],
        "reactive" => vec![PolicyKind::Reactive],
        "switching" => vec![PolicyKind::Switching],
        "switching-drop" => vec![PolicyKind::SwitchingDrop],
        other => {
            bail!("--policy {other:?}: use static, reactive, switching, switching-drop or all")
        }
    };
    let started = std::time::Instant::now();
    let lb = lower_bound(&services, &pool);
    let mut results: Vec<(String, Summary)> = vec![("lower-bound".into(), lb)];
    for k in kinds {
        let t = std::time::Instant::now();
        let r = simulate(k, &services, &pool, &settings);
        eprintln!(
            "{}: simulated in {:.2}s",
            k.name(),
            t.elapsed().as_secs_f64()
        );
        results.push((k.name().into(), r));
    }
    let steps = services.iter().map(|s| s.demand.len()).max().unwrap_or(0);
    println!(
        "\n{} service(s), {} steps of {}s ({:.1} days), pool {} × ({} vCPU, {} MiB); {:.2}s\n",
        services.len(),
        steps,
        a.step,
        steps as f64 * a.step / 86400.0,
        a.machines,
        a.machine_vcpus,
        a.machine_memory_mib,
        started.elapsed().as_secs_f64()
    );
    let mut header = vec![
        "policy".to_string(),
        "machine-hours".into(),
        "peak".into(),
        "util".into(),
        "starts".into(),
        "moves".into(),
        "SLO-viol min".into(),
    ];
    for s in &services {
        header.push(format!("{} (p{}) served", s.name, s.priority));
    }
    println!("| {} |", header.join(" | "));
    println!("|{}", " --- |".repeat(header.len()));
    for (name, r) in &results {
        let mut row = vec![
            name.clone(),
            format!("{:.0}", r.machine_hours),
            r.peak_machines.to_string(),
            format!("{:.0}%", r.mean_utilisation * 100.0),
            r.activations.to_string(),
            r.migrations.to_string(),
            format!("{:.0}", r.slo_violation_minutes),
        ];
        for s in &services {
            let x = r.services.get(&s.name).cloned().unwrap_or_default();
            row.push(format!(
                "{:.2}%",
                if x.demand > 0.0 {
                    x.served * 100.0 / x.demand
                } else {
                    100.0
                }
            ));
        }
        println!("| {} |", row.join(" | "));
    }
    // Held demand (served late, after waiting for capacity) per service.
    println!("\nrequests held by the switch until capacity came (served late), % of demand:");
    println!(
        "| policy | {} |",
        services
            .iter()
            .map(|s| format!("{} (p{})", s.name, s.priority))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|{}", " --- |".repeat(services.len() + 1));
    for (name, r) in &results {
        let cells: Vec<String> = services
            .iter()
            .map(|s| {
                let x = r.services.get(&s.name).cloned().unwrap_or_default();
                format!("{:.3}%", x.held * 100.0 / x.demand.max(1e-9))
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    // Dropped demand per priority, in requests.
    let mut priorities: Vec<i32> = services.iter().map(|s| s.priority).collect();
    priorities.sort_unstable_by(|a, b| b.cmp(a));
    priorities.dedup();
    println!("\ndemand dropped, requests, by priority:");
    println!(
        "| policy | {} |",
        priorities
            .iter()
            .map(|p| format!("priority {p}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|{}", " --- |".repeat(priorities.len() + 1));
    for (name, r) in &results {
        let cells: Vec<String> = priorities
            .iter()
            .map(|p| {
                let dropped: f64 = services
                    .iter()
                    .filter(|s| s.priority == *p)
                    .filter_map(|s| r.services.get(&s.name))
                    .map(|x| x.dropped)
                    .sum();
                format!("{dropped:.0}")
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    if let Some(dir) = a.out {
        write_out(&dir, &services, &results, a.step)?;
    }
    Ok(())
}

/// Writes `summary.json`, `steps.csv` and the SVG charts into `dir`.
fn write_out(
    dir: &std::path::Path,
    services: &[SimService],
    results: &[(String, Summary)],
    step: f64,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, body: String| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let mut json = serde_json::Map::new();
    for (name, r) in results {
        let v = if name == "lower-bound" {
            serde_json::json!({"machine_hours": r.machine_hours, "peak_machines": r.peak_machines})
        } else {
            serde_json::to_value(r)?
        };
        json.insert(name.replace("lower-bound", "lower_bound"), v);
    }
    let mut written = vec![write("summary.json", serde_json::to_string_pretty(&json)?)?];
    let steps = services.iter().map(|s| s.demand.len()).max().unwrap_or(0);
    let mut csv = String::from("step,t_seconds");
    for s in services {
        csv.push_str(&format!(",demand_{}", s.name));
    }
    for (name, r) in results {
        for s in services.iter().filter(|_| !r.capacity_per_step.is_empty()) {
            csv.push_str(&format!(",capacity_{name}_{}", s.name));
        }
        csv.push_str(&format!(",machines_{name}"));
    }
    csv.push('\n');
    for t in 0..steps {
        csv.push_str(&format!("{t},{}", t as f64 * step));
        for s in services {
            csv.push_str(&format!(",{:.2}", s.demand.get(t).copied().unwrap_or(0.0)));
        }
        for (_, r) in results {
            for c in &r.capacity_per_step {
                csv.push_str(&format!(",{:.1}", c.get(t).copied().unwrap_or(0.0)));
            }
            let m = r.machines_per_step.get(t).copied().unwrap_or(0);
            csv.push_str(&format!(",{m}"));
        }
        csv.push('\n');
    }
    written.push(write("steps.csv", csv)?);
    const COLOURS: [&str; 6] = [
        "#888", "#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd",
    ];
    let machines: Vec<Vec<f64>> = results
        .iter()
        .map(|(_, r)| r.machines_per_step.iter().map(|&m| m as f64).collect())
        .collect();
    let lines: Vec<Series> = results
        .iter()
        .zip(&machines)
        .enumerate()
        .filter(|(_, ((name, _), _))| name != "static")
        .map(|(k, ((name, _), values))| Series {
            label: name,
            colour: COLOURS[k % COLOURS.len()],
            values,
        })
        .collect();
    written.push(write(
        "machines.svg",
        line_chart("Machines in use", "machines", step, &lines),
    )?);
    for (k, s) in services.iter().enumerate() {
        let mut lines = vec![Series {
            label: "demand",
            colour: "#000",
            values: &s.demand,
        }];
        for (n, (name, r)) in results.iter().enumerate() {
            if name == "lower-bound" || name == "static" {
                continue;
            }
            if let Some(c) = r.capacity_per_step.get(k) {
                lines.push(Series {
                    label: name,
                    colour: COLOURS[n % COLOURS.len()],
                    values: c,
                });
            }
        }
        let title = format!("{} (priority {}): demand and capacity", s.name, s.priority);
        written.push(write(
            &format!("demand-{}.svg", s.name),
            line_chart(&title, "requests/s", step, &lines),
        )?);
    }
    println!();
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
