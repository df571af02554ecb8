//! `vmatrix sim` end to end: the shipped traces in, the report, `summary.json` in the issue's
//! schema, `steps.csv` and the charts out; bad input named in one line.

use serde_json::Value;

use crate::support::{data_dir, vmatrix};

fn repo(path: &str) -> String {
    format!("{}/../../{path}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn sim_writes_the_report_the_summary_the_steps_and_the_charts() {
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
    assert!(summary["lower_bound"]["machine_hours"].as_f64().unwrap() > 0.0);
    assert!(summary["lower_bound"]["peak_machines"].as_u64().unwrap() > 0);
    for policy in ["static", "reactive", "switching", "switching-drop"] {
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
        for service in ["finance", "sports"] {
            let s = &p["services"][service];
            let (d, sv, dr) = (
                s["demand"].as_f64().unwrap(),
                s["served"].as_f64().unwrap(),
                s["dropped"].as_f64().unwrap(),
            );
            assert!(
                d > 0.0 && (sv + dr - d).abs() < d * 1e-9,
                "{policy}.{service}: {s}"
            );
        }
    }
    let sw = summary["switching"]["machine_hours"].as_f64().unwrap();
    let st = summary["static"]["machine_hours"].as_f64().unwrap();
    let lb = summary["lower_bound"]["machine_hours"].as_f64().unwrap();
    assert!(
        lb <= sw && sw < st / 3.0,
        "lower bound {lb}, switching {sw}, static {st}"
    );
    assert!(summary["switching-drop"]["peak_machines"].as_u64().unwrap() <= 5);

    let steps = std::fs::read_to_string(o.join("steps.csv")).unwrap();
    let mut lines = steps.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("step,t_seconds,demand_finance,demand_sports"),
        "{header}"
    );
    assert!(header.contains("machines_switching") && header.contains("capacity_reactive_finance"));
    assert_eq!(lines.count(), 14 * 1440);
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
