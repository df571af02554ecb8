//! Issue 17: `vmatrix demo`, shortened (the same 14 hours of the traces in 2 real minutes
//! instead of 5), end to end with real VMs: its summary shows switching (instances activated
//! and resumed as the peaks move), a drop of the lower priority when both peak, a recovery
//! from a killed QEMU, a rollout with no failed request, and fewer machine-minutes than static
//! provisioning; and it leaves nothing running.

use serde_json::Value;

use crate::support::{data_dir, free_port, vmatrix};

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_demo_switches_drops_recovers_rolls_out_and_beats_static() {
    let _alone = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let api = format!("127.0.0.1:{}", free_port());
    let front = format!("127.0.0.1:{}", free_port());
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        vmatrix()
            .arg("--data")
            .arg(d)
            .args([
                "demo",
                "--minutes",
                "2",
                "--speed",
                "420",
                "--listen",
                &api,
                "--switch-listen",
                &front,
            ])
            .output(),
    )
    .await
    .expect("the demo took over 10 minutes")
    .expect("run vmatrix demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(d.join("demo/demo-up.log")).unwrap_or_default();
    let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\nlast lines of vmatrix up (reversed):\n{tail}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    let text = std::fs::read_to_string(d.join("demo-summary.txt")).expect("the summary");
    assert!(
        stdout.contains(&text),
        "the summary printed is the one written"
    );
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("demo-summary.json")).expect("the JSON summary"),
    )
    .expect("JSON");
    for service in ["finance", "sports"] {
        let q = &r["requests"][service];
        let (sent, served) = (q["sent"].as_u64().unwrap(), q["served"].as_u64().unwrap());
        assert!(sent > 400 && served > sent / 2, "{service}: {q}");
    }
    let ops = &r["operations"];
    let n = |k: &str| ops[k].as_u64().unwrap_or(0);
    // Finance wakes from dormant and scales out at the open and the close; sports scales out,
    // is suspended for finance, and resumed.
    assert!(n("activations") + n("resumes") >= 4, "{ops}");
    assert!(
        n("drops") >= 1,
        "no drop of sports at the joint peak: {ops}"
    );
    assert!(
        r["dropped_s"]["sports"].as_f64().unwrap_or(0.0) > 0.0,
        "{}",
        r["dropped_s"]
    );
    assert!(
        r["dropped_s"].get("finance").is_none(),
        "{}",
        r["dropped_s"]
    );
    assert!(r["requests"]["sports"]["dropped"].as_u64().unwrap() > 0);
    assert_eq!(r["requests"]["finance"]["dropped"], 0, "{}", r["requests"]);
    assert!(r["recovered"] == true, "{}", r["recovery"]);
    assert!(n("discards") >= 1, "{ops}");
    assert!(
        r["rollout"].as_str().is_some_and(|s| s.contains("done")),
        "{}",
        r["rollout"]
    );
    assert_eq!(r["rollout_failed"], 0, "failed requests during the rollout");
    let used = r["measured"]["machine_minutes"].as_f64().unwrap();
    let stat = r["static_provisioning"]["machine_minutes"]
        .as_f64()
        .unwrap();
    assert!(
        used > 0.0 && used < stat,
        "measured {used} against static {stat}"
    );
    // Nothing of the demo's matrix is left running.
    let marker = d.display().to_string();
    let left = crate::support::processes(|c| c.contains(&marker) && !c.contains("cargo"));
    assert!(left.is_empty(), "left running: {left:?}");
}
