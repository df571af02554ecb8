//! Issue 14's persistent volumes with real QEMU: a value written through `/disk` lands on the
//! slot's volume; the instance's QEMU is killed and its replacement — a fresh instance from
//! the untouched image — returns it; it is suspended and resumed on the other machine and the
//! value is there; a live migration carries it; each store of the volume adds only the chunks the guest changed.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{cli, ps, wait_for};
use crate::support::{data_dir, is_qemu_of, kill9, start_matrix, up_log};

async fn put(address: &str, key: &str, value: &str) {
    let r = reqwest::Client::new()
        .put(format!("http://{address}/disk/{key}"))
        .body(value.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("PUT /disk");
    assert!(r.status().is_success(), "PUT /disk/{key}: {}", r.status());
}

async fn get(address: &str, key: &str) -> String {
    let r = reqwest::Client::new()
        .get(format!("http://{address}/disk/{key}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("GET /disk");
    assert!(r.status().is_success(), "GET /disk/{key}: {}", r.status());
    r.text().await.expect("body").trim().to_owned()
}

/// The running instance of web that is not `not`, once there is one.
async fn running_web(d: &Path, not: &str) -> Value {
    wait_for(
        "a running instance of web",
        Duration::from_secs(240),
        async || {
            ps(d)
                .await
                .into_iter()
                .find(|i| i["service"] == "web" && i["state"] == "running" && i["id"] != not)
        },
    )
    .await
}

/// `line` without its terminal colours.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut escape = false;
    for c in line.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (false, c) => out.push(c),
            _ => {}
        }
    }
    out
}

/// The new chunks of each store of a volume, as the agents logged them.
fn stores(d: &Path) -> Vec<u64> {
    std::fs::read_to_string(d.join("up.log"))
        .unwrap_or_default()
        .lines()
        .map(plain)
        .filter(|l| l.contains("volume stored"))
        .filter_map(|l| {
            l.split("new_chunks=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn a_volume_outlives_a_killed_instance_and_moves_with_suspend_and_resume() {
    // It boots, suspends, resumes and migrates guests: not beside the tests that time moves.
    let _alone = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let (_up, _front) = start_matrix(
        d,
        &["--machines", "2", "--policy", "min", "--network", "bridge"],
    )
    .await;
    let services = d.join("services.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\n\
         [[service.volume]]\nname = \"data\"\nsize = \"64M\"\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(ok, "{err}\n{}", up_log(d));
    let first = running_web(d, "").await;
    let (id, address) = (
        first["id"].as_str().unwrap().to_owned(),
        first["address"].as_str().unwrap().to_owned(),
    );
    assert_eq!(first["slot"], 1, "{first}");
    let image_before = crate::lifecycle::version_of(d, "guest:v1").await;

    // 1. Written to the volume; the instance's QEMU killed; its replacement has it.
    put(&address, "color", "blue").await;
    assert_eq!(get(&address, "color").await, "blue");
    kill9(&format!("{id}'s QEMU"), is_qemu_of(d, &id));
    let second = running_web(d, &id).await;
    let (id2, address2) = (
        second["id"].as_str().unwrap().to_owned(),
        second["address"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        second["slot"], 1,
        "the replacement takes the slot: {second}"
    );
    assert_eq!(
        get(&address2, "color").await,
        "blue",
        "the value written before the kill\n{}",
        up_log(d)
    );
    assert_eq!(
        crate::lifecycle::version_of(d, "guest:v1").await,
        image_before,
        "the dormant image is untouched"
    );
    eprintln!("{id} killed; {id2} (slot 1) returned the value from the volume");

    // 2. Suspended, resumed on the other machine: the value is there.
    put(&address2, "color", "green").await;
    let from = second["machine"].as_str().unwrap().to_owned();
    let to = if from == "rm1" { "rm2" } else { "rm1" };
    let (ok, _, err) = cli(d, &["suspend", &id2]).await;
    assert!(ok, "suspend: {err}\n{}", up_log(d));
    let (ok, _, err) = cli(d, &["resume", &id2, "--on", to]).await;
    assert!(ok, "resume: {err}\n{}", up_log(d));
    let back = wait_for(
        "the resumed instance running",
        Duration::from_secs(120),
        async || {
            ps(d)
                .await
                .into_iter()
                .find(|i| i["id"] == id2.as_str() && i["state"] == "running")
        },
    )
    .await;
    assert_eq!(back["machine"], to);
    let address3 = back["address"].as_str().unwrap().to_owned();
    assert_eq!(get(&address3, "color").await, "green");
    eprintln!("{id2} suspended on {from}, resumed on {to}: the value is there");

    // 3. A live migration back mirrors the volume with the system disk: a value written just
    // before the move is read just after it.
    put(&address3, "color", "red").await;
    let (ok, out, err) = cli(d, &["migrate", &id2, "--to", &from]).await;
    assert!(ok, "migrate: {err}\n{}", up_log(d));
    let moved = ps(d)
        .await
        .into_iter()
        .find(|i| i["id"] == id2.as_str())
        .expect("still there");
    assert_eq!(moved["machine"], from.as_str(), "{moved}");
    assert_eq!(get(&address3, "color").await, "red");
    eprintln!(
        "{id2} migrated back to {from} with its volume ({})",
        out.trim()
    );

    // 4. Each store added only what the guest changed: the 64 MiB volume is 1,024 chunks.
    let s = stores(d);
    assert!(s.len() >= 2, "two stores (discard, suspend) logged: {s:?}");
    let last = *s.last().unwrap();
    assert!(
        last <= 32,
        "the suspend's store of the volume added {last} chunks (of 1,024): {s:?}"
    );
    eprintln!("volume stores, new chunks each: {s:?}");

    // 5. `vmatrix volume`: the slot's volume is listed and kept under a snapshot's name.
    let (ok, out, err) = cli(d, &["volume", "snapshot", "vol-web-1-data", "before"]).await;
    assert!(ok, "volume snapshot: {err}");
    let (ok, out2, err) = cli(d, &["volume", "ls", "--json"]).await;
    assert!(ok, "volume ls: {err}");
    let listed: Value = serde_json::from_str(&out2).expect("volume ls --json");
    let vol = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["volume"] == "vol-web-1-data")
        .unwrap_or_else(|| panic!("vol-web-1-data listed: {listed}"));
    assert_eq!(vol["size"], 64 << 20, "{vol}");
    assert!(
        vol["snapshots"][0].as_str().unwrap().starts_with("before"),
        "{vol}"
    );
    eprintln!("{}", out.trim());

    // 6. A restore is refused while an instance holds the slot; with none, the slot's next
    // instance starts from the snapshot ("green"), not from what the last one wrote ("red").
    let (ok, _, err) = cli(d, &["volume", "restore", "vol-web-1-data", "before"]).await;
    assert!(!ok, "a restore under a running instance is refused");
    assert!(err.contains(&id2) && err.contains("holds"), "{err}");
    let (ok, _, err) = cli(d, &["volume", "rm", "vol-web-1-data"]).await;
    assert!(
        !ok && err.contains("holds"),
        "rm under a running instance: {err}"
    );
    let without = d.join("without-web.toml");
    std::fs::write(
        &without,
        "[[service]]\nname = \"other\"\nimage = \"guest:v1\"\nmin = 0\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", without.to_str().unwrap()]).await;
    assert!(ok, "apply without web: {err}");
    wait_for(
        "web's instances gone",
        Duration::from_secs(120),
        async || {
            ps(d)
                .await
                .iter()
                .all(|i| i["service"] != "web")
                .then_some(())
        },
    )
    .await;
    let (ok, out, err) = cli(d, &["volume", "restore", "vol-web-1-data", "before"]).await;
    assert!(ok, "restore with no instance in the slot: {err}");
    eprintln!("{}", out.trim());
    let (ok, _, err) = cli(d, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(ok, "apply web again: {err}");
    let again = running_web(d, &id2).await;
    assert_eq!(again["slot"], 1, "{again}");
    assert_eq!(
        get(again["address"].as_str().unwrap(), "color").await,
        "green",
        "the slot's next instance starts from the snapshot"
    );
    // Not a volume: one line that says so.
    let (ok, _, err) = cli(d, &["volume", "restore", "guest", "v1"]).await;
    assert!(!ok && err.contains("not a volume"), "{err}");
}
