//! Issue 16: the dashboard in a real browser (Debian's chromium, driven by playwright-core)
//! against `vmatrix up` with real VMs. Without a token the page asks for one and the API
//! refuses; with it the page shows the machines and running instances the API reports; a
//! migration started from an instance's menu shows in the matrix and in the event feed; a
//! screenshot is kept as an artifact (`target/e2e-artifacts/dashboard.png`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{apply_and_wait, ps};
use crate::support::{data_dir, start_matrix};

fn node_modules() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/vmatrix/tools/node/node_modules")
}

#[tokio::test]
#[ignore = "boots real QEMU and runs chromium; run by scripts/test"]
async fn the_dashboard_shows_the_matrix_and_migrates_from_the_page() {
    let _host = crate::support::share_host().await;
    assert!(
        node_modules().join("playwright-core").is_dir() && PathBuf::from("/usr/bin/chromium").exists(),
        "chromium or playwright-core is missing: run scripts/install-test-tools.sh (scripts/test does)"
    );
    let data = data_dir();
    let d = data.path();
    let (_up, _front) = start_matrix(d, &["--machines", "2", "--policy", "min"]).await;
    let file = d.join("services.toml");
    std::fs::write(
        &file,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\npriority = 10\n",
    )
    .unwrap();
    apply_and_wait(d, &file, 1, Duration::from_secs(180)).await;

    // What the API reports, for the page to show.
    let running: Vec<String> = ps(d)
        .await
        .iter()
        .filter(|i| i["state"] == "running")
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect();
    let api = std::fs::read_to_string(d.join("controller/api")).expect("api file");
    let api = api.trim();
    let machines_json: Value = crate::support::api_get(d, &format!("{api}/api/v1/machines"))
        .await
        .expect("machines")
        .json()
        .await
        .expect("machines JSON");
    let machines: Vec<String> = machines_json["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(machines.len(), 2, "{machines:?}");

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/e2e-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let token = std::fs::read_to_string(d.join("controller/token")).expect("token");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/dashboard.mjs");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(&script)
            .env("NODE_PATH", node_modules())
            .env("VMX_URL", api)
            .env("VMX_TOKEN", token.trim())
            .env(
                "VMX_EXPECT",
                serde_json::json!({ "machines": machines, "running": running }).to_string(),
            )
            .env("VMX_SHOT", &shot)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser run took over 5 minutes")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser run failed: {}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr),
        crate::support::up_log(d)
    );
    eprintln!("dashboard: {stdout}");
    let found: Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or("{}"))
        .expect("the driver's findings");
    // The API agrees with what the page showed after the move.
    let id = found["moved"]["id"].as_str().expect("moved id");
    let to = found["moved"]["to"].as_str().expect("moved to");
    let now = ps(d).await;
    let moved = now
        .iter()
        .find(|i| i["id"] == id)
        .expect("the moved instance");
    assert_eq!(moved["machine"], to, "{moved}");
    // The metrics behind the page, with a real QEMU: the controller's…
    let metric = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .rsplit_once(' ')
                    .map(|(_, v)| v.to_owned())
            })?
            .parse()
            .ok()
    };
    let text = crate::support::api_get(d, &format!("{api}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let resident = metric(
        &text,
        &format!(
            "vmatrix_instance_memory_bytes{{instance=\"{id}\",service=\"web\",machine=\"{to}\"}}"
        ),
    )
    .unwrap_or_else(|| panic!("no memory figure of {id} on {to}:\n{text}"));
    // A 256 MiB guest booted to HTTP has touched tens of MiB at least.
    assert!(resident > 16.0 * 1048576.0, "{resident}");
    for series in [
        "vmatrix_operation_seconds_count{operation=\"migrate\",outcome=\"ok\"}",
        "vmatrix_migration_downtime_seconds_count",
        "vmatrix_instance_ready_seconds_count{how=\"activate\"}",
    ] {
        assert!(metric(&text, series) >= Some(1.0), "{series}:\n{text}");
    }
    // …and the machines' own: the source counted the move, the destination holds it.
    let agent = |m: &str| {
        let m = m.to_owned();
        let machines: Value = machines_json.clone();
        async move {
            let addr = machines["machines"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == m.as_str()))
                .and_then(|x| x["address"].as_str())
                .expect("the machine's address")
                .to_owned();
            crate::support::agent_get(d, &m, &format!("https://{addr}/metrics"))
                .await
                .expect("GET the agent's /metrics")
                .text()
                .await
                .expect("agent metrics")
        }
    };
    let from = found["moved"]["from"].as_str().expect("moved from");
    let source = agent(from).await;
    assert!(
        metric(&source, "vmatrix_agent_migration_downtime_seconds_count") >= Some(1.0),
        "{source}"
    );
    let dest = agent(to).await;
    let rss = metric(
        &dest,
        &format!("vmatrix_agent_instance_memory_bytes{{instance=\"{id}\",service=\"web\"}}"),
    );
    assert!(rss > Some(16.0 * 1048576.0), "{dest}");
    let cpu = metric(
        &dest,
        &format!("vmatrix_agent_instance_cpu_seconds_total{{instance=\"{id}\",service=\"web\"}}"),
    );
    assert!(cpu > Some(0.0), "{dest}");
    eprintln!(
        "metrics: {id} on {to}: {:.0} MiB resident, {:.1} CPU s; the page said {:?}",
        resident / 1048576.0,
        cpu.unwrap_or_default(),
        found["use"]
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );
}
