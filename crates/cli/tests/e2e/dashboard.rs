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
    let machines: Value = crate::support::api_get(d, &format!("{api}/api/v1/machines"))
        .await
        .expect("machines")
        .json()
        .await
        .expect("machines JSON");
    let machines: Vec<String> = machines["machines"]
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
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );
}
