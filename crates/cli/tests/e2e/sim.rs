//! `vmatrix sim` end to end: the shipped traces in, the report, `summary.json` in the issue's
//! schema, `steps.csv` and the charts out; bad input named in one line.

use serde_json::Value;

use crate::support::{data_dir, vmatrix};

fn repo(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn sim_writes_the_report_the_summary_the_steps_and_the_charts() {
    let _host = crate::support::share_host().await;
    let out = data_dir();
    let o = out.path().join("run");
    let run = vmatrix()
        .args(["sim", "--services", &repo("examples/sim/services.toml")])
        .args([
            "--trace",
            &format!(
                "finance={}",
                repo("examples/traces/finance_profile_4weeks_per_min.csv")
            ),
            "--trace",
            &format!(
                "sports={}",
                repo("examples/traces/sports_worldcup98_0501-0624_per_min.csv")
            ),
        ])
        .args(["--peak-rps", "finance=2000", "--peak-rps", "sports=2000"])
        .args(["--window", "10d..24d", "--machines", "5", "--out"])
        .arg(&o)
        .output()
        .await
        .expect("run vmatrix sim");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for row in [
        "| lower-bound |",
        "| static |",
        "| reactive |",
        "| switching |",
        "| switching-drop |",
    ] {
        assert!(stdout.contains(row), "{row} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("demand dropped, requests, by priority"),
        "{stdout}"
    );

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(o.join("summary.json")).unwrap()).unwrap();
    let policies = ["static", "reactive", "switching", "switching-drop"];
    for policy in policies {
        let p = &summary[policy];
        for key in [
            "machine_hours",
            "peak_machines",
            "mean_utilisation",
            "activations",
            "migrations",
            "slo_violation_minutes",
        ] {
            assert!(p[key].is_number(), "{policy}.{key}: {p}");
        }
        let util = p["mean_utilisation"].as_f64().unwrap();
        assert!(util > 0.0 && util <= 1.0, "{policy}: utilisation {util}");
    }
    let num = |policy: &str, path: &[&str]| -> f64 {
        let mut v = &summary[policy];
        for k in path {
            v = &v[*k];
        }
        v.as_f64()
            .unwrap_or_else(|| panic!("{policy}.{}: {v}", path.join(".")))
    };
    let share = |policy: &str, service: &str| {
        num(policy, &["services", service, "served"])
            / num(policy, &["services", service, "demand"])
    };

    // steps.csv read back: the per-step demand, capacity and machines each total in
    // summary.json was counted from. Recounting the totals from it checks the accounting (what
    // a step serves is min(demand, capacity)) instead of restating it.
    let steps = std::fs::read_to_string(o.join("steps.csv")).unwrap();
    let mut lines = steps.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(
        &header[..4],
        ["step", "t_seconds", "demand_finance", "demand_sports"],
        "{header:?}"
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 14 * 1440, "14 days of 1-minute steps");
    let column = |name: &str| -> Vec<f64> {
        let k = header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no column {name} in {header:?}"));
        rows.iter().map(|r| r[k]).collect()
    };
    let step_s = 60.0;
    assert_eq!(column("t_seconds")[1], step_s);
    let n = rows.len() as f64;
    for policy in [
        "lower-bound",
        "static",
        "reactive",
        "switching",
        "switching-drop",
    ] {
        let key = policy.replace("lower-bound", "lower_bound");
        let machines = column(&format!("machines_{policy}"));
        let hours = machines.iter().sum::<f64>() * step_s / 3600.0;
        let mh = num(&key, &["machine_hours"]);
        assert!(
            (hours - mh).abs() < 1e-6 * mh,
            "{policy}: summary says {mh} machine-hours, its steps add up to {hours}"
        );
        let peak = machines.iter().fold(0.0f64, |a, b| a.max(*b));
        assert_eq!(
            num(&key, &["peak_machines"]),
            peak,
            "{policy}: peak machines"
        );
    }
    for service in ["finance", "sports"] {
        let demand = column(&format!("demand_{service}"));
        // steps.csv rounds demand to 0.01 req/s and capacity to 0.1 req/s.
        let demand_total = demand.iter().sum::<f64>() * step_s;
        let demand_slack = 0.005 * step_s * n + 1e-6 * demand_total;
        let served_slack = 0.055 * step_s * n + 1e-6 * demand_total;
        for policy in policies {
            let d = num(policy, &["services", service, "demand"]);
            let served = num(policy, &["services", service, "served"]);
            let dropped = num(policy, &["services", service, "dropped"]);
            assert!(
                d > 0.0 && (d - demand_total).abs() <= demand_slack,
                "{policy}.{service}: demand {d}, the trace's steps add up to {demand_total}"
            );
            assert!(
                (0.0..=d * (1.0 + 1e-9)).contains(&served) && dropped >= 0.0,
                "{policy}.{service}: served {served}, dropped {dropped} of {d}"
            );
            let capacity = column(&format!("capacity_{policy}_{service}"));
            let recount: f64 = demand
                .iter()
                .zip(&capacity)
                .map(|(d, c)| d.min(*c) * step_s)
                .sum();
            assert!(
                (served - recount).abs() <= served_slack,
                "{policy}.{service}: summary says {served} served, min(demand, capacity) per \
                 step adds up to {recount} (slack {served_slack})"
            );
        }
        // Static provisioning owns every service's peak: it never drops.
        assert_eq!(
            num("static", &["services", service, "dropped"]),
            0.0,
            "static dropped {service}"
        );
    }
    assert_eq!(num("static", &["slo_violation_minutes"]), 0.0);

    // Machine-hours: nothing beats the lower bound, nothing elastic costs what static does,
    // and switching shares the machines static reserves for each service's own peak.
    let lb = num("lower_bound", &["machine_hours"]);
    let st = num("static", &["machine_hours"]);
    for policy in ["reactive", "switching", "switching-drop"] {
        let mh = num(policy, &["machine_hours"]);
        assert!(
            lb <= mh && mh < st,
            "{policy}: {mh} machine-hours, lower bound {lb}, static {st}"
        );
    }
    let sw = num("switching", &["machine_hours"]);
    assert!(sw < st / 3.0, "switching {sw}, static {st}");

    // The scenario's pool of 5 is short: even perfect packing needs more at the peak, so
    // switching-drop must drop, and only the lower priority (sports, 5) may pay for it.
    let lb_peak = num("lower_bound", &["peak_machines"]);
    assert!(
        lb_peak > 5.0,
        "the pool is not short: lower bound peak {lb_peak}"
    );
    assert!(num("switching-drop", &["peak_machines"]) <= 5.0);
    assert!(num("switching-drop", &["slo_violation_minutes"]) > 0.0);
    let (finance, sports) = (
        share("switching-drop", "finance"),
        share("switching-drop", "sports"),
    );
    assert!(
        finance > sports,
        "switching-drop served finance {finance}, sports {sports}: priority ignored"
    );
    assert!(
        finance >= share("switching", "finance") - 1e-3,
        "the short pool cost finance: {finance} vs {} with machines to spare",
        share("switching", "finance")
    );
    assert!(
        num("switching-drop", &["services", "sports", "dropped"])
            > num("switching", &["services", "sports", "dropped"]),
        "the short pool did not cost sports anything"
    );
    for chart in ["machines.svg", "demand-finance.svg", "demand-sports.svg"] {
        let svg = std::fs::read_to_string(o.join(chart)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("<polyline"),
            "{chart}"
        );
    }
}

#[tokio::test]
async fn sim_names_what_is_wrong_in_one_line() {
    let _host = crate::support::share_host().await;
    let run = vmatrix()
        .args(["sim", "--services", &repo("examples/sim/services.toml")])
        .args([
            "--trace",
            &format!(
                "finance={}",
                repo("examples/traces/finance_profile_4weeks_per_min.csv")
            ),
        ])
        .output()
        .await
        .expect("run vmatrix sim");
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        err.trim(),
        "error: no --trace sports=FILE for service sports",
        "{err}"
    );
}

/// One configuration: `vmatrix sim` with no policy flags runs exactly the settings a controller
/// started the way `vmatrix up` starts it runs — and a policy file changes both alike.
#[tokio::test]
async fn sim_runs_exactly_the_settings_the_controller_runs() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let show = |extra: Vec<String>| async move {
        let out = vmatrix()
            .args(["sim", "--show-config"])
            .args(extra)
            .output()
            .await
            .expect("run vmatrix sim --show-config");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("settings as JSON")
    };
    let controller = |extra: Vec<String>| {
        let d = data.path().to_owned();
        async move {
            let listen = format!("127.0.0.1:{}", crate::support::free_port());
            let mut child = vmatrix()
                .arg("--data")
                .arg(&d)
                .args(["controller", "--listen", &listen])
                .args(extra)
                .kill_on_drop(true)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start the controller");
            let url = format!("https://{listen}/api/v1/policy");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let settings = loop {
                if let Ok(r) = crate::support::api_get(&d, &url).await {
                    if r.status().is_success() {
                        break r.json::<Value>().await.expect("settings as JSON");
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no controller on {listen}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            child.kill().await.expect("stop the controller");
            settings
        }
    };
    let sim = show(vec![]).await;
    assert_eq!(sim, controller(vec![]).await, "the defaults differ");
    assert!(sim["headroom"].as_f64().is_some_and(|h| h >= 1.0), "{sim}");
    let file = data.path().join("policy.toml");
    std::fs::write(&file, "[policy]\nheadroom = 1.3\nscale_in_s = 900\n").unwrap();
    let args = vec!["--policy-file".to_string(), file.display().to_string()];
    let sim = show(args.clone()).await;
    assert_eq!(sim["headroom"], 1.3);
    assert_eq!(
        sim,
        controller(args).await,
        "the same file reads differently"
    );
    // Flags override alike.
    let flags = vec!["--scale-out".to_string(), "30s".to_string()];
    let sim = show(flags.clone()).await;
    assert_eq!(sim["scale_out_s"], 30.0);
    assert_eq!(sim, controller(flags).await);
}
