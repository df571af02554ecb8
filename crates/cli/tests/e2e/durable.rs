//! Never lose a server, with real QEMU (issue 10's acceptance): a CLI hung up 0.2 s into a
//! migration, a controller killed with SIGKILL 0.2 s into a migration and into a suspend and
//! started again, an image re-tagged under a running instance, `web-prod:v1` beside
//! `web:prod-v1`, and an agent killed with SIGKILL and started again — every instance ends
//! running (or suspended) exactly once, with its `/kv` and `/disk` data and its version.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{cli, metric, ps, wait_for};
use crate::support::{
    data_dir, free_port, is_qemu_of, kill9, processes, start_up, up_log, vmatrix, VmSweep,
};

fn field(list: &[Value], id: &str, key: &str) -> String {
    list.iter()
        .find(|i| i["id"] == id)
        .and_then(|i| i[key].as_str())
        .unwrap_or("")
        .to_owned()
}

async fn instance(data: &Path, id: &str) -> Value {
    ps(data)
        .await
        .into_iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no instance {id}"))
}

async fn wait_state(data: &Path, id: &str, state: &str) -> Value {
    wait_for(
        &format!("{id} {state}"),
        Duration::from_secs(120),
        async || {
            let list = ps(data).await;
            list.into_iter()
                .find(|i| i["id"] == id && i["state"] == state)
        },
    )
    .await
}

async fn http(method: &str, url: String, body: &str) -> (u16, String) {
    let c = reqwest::Client::new();
    let r = c
        .request(method.parse().expect("method"), url)
        .body(body.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the guest answers");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// Writes a value to the guest's RAM (`/kv`) and disk (`/disk`).
async fn put(endpoint: &str, value: &str) {
    for kind in ["kv", "disk"] {
        let (s, b) = http("PUT", format!("http://{endpoint}/{kind}/k"), value).await;
        assert_eq!(s, 200, "PUT /{kind}/k: {b}");
    }
}

/// Both values are there.
async fn check(endpoint: &str, value: &str) {
    for kind in ["kv", "disk"] {
        let (s, b) = http("GET", format!("http://{endpoint}/{kind}/k"), "").await;
        assert_eq!((s, b.as_str()), (200, value), "/{kind}/k on {endpoint}");
    }
}

/// One QEMU process for the instance in this test's matrix (`data`), no second copy. A move's
/// source QEMU ends in the background moments after the switch-over (a quit, killed after
/// 2 s), so a second copy is given 15 s to go; one that stays fails the test.
async fn one_copy(data: &Path, id: &str) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let p = processes(is_qemu_of(data, id));
        if p.len() == 1 || std::time::Instant::now() >= deadline {
            assert_eq!(p.len(), 1, "QEMU processes of {id}: {p:?}");
            return p[0].0;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Submits `args` (a migrate or suspend) and, 0.2 s in, kills the controller with SIGKILL;
/// then starts a controller again on the same state.
async fn kill_controller_during(data: &Path, listen: &str, args: &[&str]) -> tokio::process::Child {
    let mut op = vmatrix()
        .arg("--data")
        .arg(data)
        .args(args)
        .spawn()
        .expect("start the op");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // `up`'s controller, or the one this test started again (same command line).
    let controller = crate::support::kill9_and_restart_controller(data, listen).await;
    let _ = op.wait().await;
    controller
}

/// Waits (up to `within`) until instance `id` settles suspended or running after a kill; a
/// suspended one must have no QEMU left and is resumed. Returns it running.
async fn settled_then_running(data: &Path, id: &str, within: Duration) -> Value {
    let settled = wait_for(&format!("{id} settled"), within, async || {
        let i = instance(data, id).await;
        matches!(i["state"].as_str(), Some("suspended" | "running")).then_some(i)
    })
    .await;
    eprintln!("{id} settled {}", settled["state"]);
    if settled["state"] == "suspended" {
        assert!(
            processes(is_qemu_of(data, id)).is_empty(),
            "a suspended instance has no QEMU"
        );
        let (ok, _, err) = cli(data, &["resume", id]).await;
        assert!(ok, "resume: {err}\n{}", up_log(data));
    }
    wait_state(data, id, "running").await
}

/// `vmatrix up` with two machines, the switch and the manual policy (these tests move
/// instances themselves); returns it with the controller's address.
async fn two_machines(data: &Path) -> (crate::support::Up, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let switch = format!("127.0.0.1:{}", free_port());
    let up = start_up(
        data,
        &[
            "--machines",
            "2",
            "--listen",
            &listen,
            "--switch-listen",
            &switch,
            "--policy",
            "min",
            // These tests kill and start processes again themselves.
            "--no-restart",
        ],
    )
    .await;
    (up, listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots real QEMU guests"]
async fn no_operation_loses_a_server_whatever_is_killed() {
    let _serial = crate::support::under_load().await;
    let dir = data_dir();
    let data = dir.path();
    let _sweep = VmSweep(data);
    let (_up, listen) = two_machines(data).await;
    // Two images whose names would once have shared an export socket, with distinct versions.
    let mut prods = Vec::new();
    for (image, version) in [("web-prod:v1", "prod-a"), ("web:prod-v1", "prod-b")] {
        let file = data.join(format!("{version}.img"));
        let (ok, _, err) = cli(
            data,
            &[
                "guest",
                "build",
                "--out",
                &file.display().to_string(),
                "--version",
                version,
            ],
        )
        .await;
        assert!(ok, "guest build: {err}");
        let (ok, _, err) = cli(
            data,
            &["image", "import", image, &file.display().to_string()],
        )
        .await;
        assert!(ok, "import {image}: {err}");
        prods.push(file);
    }
    let services = data.join("services.toml");
    std::fs::write(
        &services,
        r#"
[[service]]
name = "web"
image = "guest:v1"
min = 2
max = 2
[[service]]
name = "p1"
image = "web-prod:v1"
[[service]]
name = "p2"
image = "web:prod-v1"
"#,
    )
    .expect("services file");
    let (ok, _, err) = cli(data, &["apply", "-f", &services.display().to_string()]).await;
    assert!(ok, "apply: {err}");
    for id in ["web-1", "web-2", "p1-1", "p2-1"] {
        wait_state(data, id, "running").await;
    }
    let list = ps(data).await;
    // Side by side, each on its own image.
    for (id, version) in [("p1-1", "prod-a"), ("p2-1", "prod-b")] {
        let (s, body) = http(
            "GET",
            format!("http://{}/", field(&list, id, "endpoint")),
            "",
        )
        .await;
        assert!(
            s == 200 && body.contains(&format!("\"version\":\"{version}\"")),
            "{id}: {body}"
        );
    }
    assert_ne!(
        field(&list, "p1-1", "version"),
        field(&list, "p2-1", "version")
    );
    let v1 = field(&list, "web-1", "version");
    assert_eq!(v1.len(), 64, "a pinned version id: {v1:?}");
    put(&field(&list, "web-1", "endpoint"), "one").await;
    put(&field(&list, "web-2", "endpoint"), "two").await;

    // guest:v1 moves to other bytes while web-1 and web-2 run.
    let (ok, _, err) = cli(
        data,
        &[
            "image",
            "import",
            "guest:v1",
            &prods[0].display().to_string(),
        ],
    )
    .await;
    assert!(ok, "re-tag: {err}");

    // 1. The CLI hangs up 0.2 s into a migration: the migration goes on.
    let from = field(&list, "web-1", "machine");
    let to = if from == "rm1" { "rm2" } else { "rm1" };
    let mut mig = vmatrix()
        .arg("--data")
        .arg(data)
        .args(["migrate", "web-1", "--to", to])
        .spawn()
        .expect("migrate");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: plain kill(2) of our own child: Ctrl-C.
    unsafe {
        libc::kill(mig.id().expect("pid") as libc::pid_t, libc::SIGINT);
    }
    let _ = mig.wait().await;
    let moved = wait_for(
        "web-1 on its destination",
        Duration::from_secs(60),
        async || {
            let i = instance(data, "web-1").await;
            (i["state"] == "running" && i["machine"] == to).then_some(i)
        },
    )
    .await;
    assert_eq!(moved["version"], v1.as_str(), "it keeps its version");
    check(moved["endpoint"].as_str().unwrap_or(""), "one").await;
    one_copy(data, "web-1").await;

    // 2. The controller dies 0.2 s into a migration and comes back.
    let _controller =
        kill_controller_during(data, &listen, &["migrate", "web-1", "--to", &from]).await;
    let settled = wait_for("web-1 settled", Duration::from_secs(60), async || {
        let i = instance(data, "web-1").await;
        (i["state"] == "running").then_some(i)
    })
    .await;
    assert_eq!(settled["version"], v1.as_str());
    check(settled["endpoint"].as_str().unwrap_or(""), "one").await;
    one_copy(data, "web-1").await;

    // 3. The controller dies 0.2 s into a suspend and comes back.
    // (The controller started above is the one killed now; its handle only reaps it.)
    let _controller2 = kill_controller_during(data, &listen, &["suspend", "web-2"]).await;
    let web2 = settled_then_running(data, "web-2", Duration::from_secs(60)).await;
    assert_eq!(
        web2["version"],
        v1.as_str(),
        "resumed on its own version, not the new tag"
    );
    check(web2["endpoint"].as_str().unwrap_or(""), "two").await;
    one_copy(data, "web-2").await;
    // No stuck row: every instance ends running (a replacement the controller started for
    // `min` while web-2 was suspended included — on the new version of the tag).
    let all = wait_for(
        "every instance running",
        Duration::from_secs(120),
        async || {
            let list = ps(data).await;
            list.iter().all(|i| i["state"] == "running").then_some(list)
        },
    )
    .await;
    for i in &all {
        one_copy(data, i["id"].as_str().unwrap_or("")).await;
    }

    // 4. A machine's agent dies with SIGKILL and starts again: the same QEMUs serve on.
    let list = ps(data).await;
    let machine = ["rm1", "rm2"]
        .into_iter()
        .max_by_key(|m| list.iter().filter(|i| i["machine"] == *m).count())
        .expect("a machine");
    let here: Vec<String> = list
        .iter()
        .filter(|i| i["machine"] == machine)
        .map(|i| i["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(here.len() >= 2, "two instances on {machine}: {list:?}");
    let mut pids: Vec<u32> = Vec::new();
    for id in &here {
        pids.push(one_copy(data, id).await);
    }
    let agent_of = |c: &str| {
        c.contains("vmatrix agent")
            && c.contains(&format!("--name {machine} "))
            && c.contains(&data.display().to_string())
    };
    let (_, cmdline) = processes(agent_of).pop().expect("the agent");
    let last_event = events_count(data, &listen).await;
    crate::support::kill9_and_wait("the agent", agent_of).await;
    let agent_log = data.join("agent-again.log");
    let mut agent = crate::support::start_agent_again(&cmdline, pids[0], &agent_log);
    let agent_said = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    // The new agent adopts every VM the killed one left and finds them healthy…
    let machines: Value =
        crate::support::api_get(data, &format!("https://{listen}/api/v1/machines"))
            .await
            .expect("machines")
            .json()
            .await
            .expect("json");
    let address = machines["machines"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == machine))
        .and_then(|m| m["address"].as_str())
        .unwrap_or_else(|| panic!("{machine} in {machines}"))
        .to_owned();
    wait_for(
        &format!("the restarted agent of {machine} to report {here:?} running"),
        Duration::from_secs(60),
        async || {
            if let Ok(Some(status)) = agent.0.try_wait() {
                panic!("the restarted agent exited ({status}):\n{}", agent_said());
            }
            let url = format!("https://{address}/agent/v1/status");
            let report: Value = crate::support::agent_get(data, machine, &url)
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let running = report["instances"].as_array()?.iter().filter(|i| {
                i["state"] == "running" && here.iter().any(|id| i["id"] == id.as_str())
            });
            (running.count() == here.len()).then_some(())
        },
    )
    .await;
    // …and the controller takes in three of its heartbeats that say so.
    let series = format!("vmatrix_heartbeats_total{{machine=\"{machine}\"}}");
    let seen = metric(data, &format!("https://{listen}"), &series)
        .await
        .unwrap_or(0.0);
    wait_for(
        &format!("three heartbeats of {machine} after its adoption"),
        Duration::from_secs(30),
        async || {
            metric(data, &format!("https://{listen}"), &series)
                .await
                .filter(|n| *n >= seen + 3.0)
        },
    )
    .await;
    for (id, pid) in here.iter().zip(&pids) {
        assert_eq!(
            one_copy(data, id).await,
            *pid,
            "{id} is served by the same QEMU"
        );
        let i = instance(data, id).await;
        assert_eq!(
            i["state"],
            "running",
            "{id}; the restarted agent logged:\n{}\n{}",
            agent_said(),
            up_log(data)
        );
        let (s, _) = http(
            "GET",
            format!("http://{}/health", i["endpoint"].as_str().unwrap_or("")),
            "",
        )
        .await;
        assert_eq!(s, 200, "{id} answers");
    }
    let since = events_since(data, &listen, last_event).await;
    assert!(
        !since.iter().any(|e| {
            let o = e["outcome"].as_str().unwrap_or("");
            o == "lost" || o.starts_with("failed")
        }),
        "the controller never failed them: {since:#?}"
    );
}

/// The id of the last event logged so far (0: none).
async fn events_count(d: &Path, listen: &str) -> u64 {
    events_since(d, listen, 0)
        .await
        .last()
        .and_then(|e| e["id"].as_u64())
        .unwrap_or(0)
}

async fn events_since(d: &Path, listen: &str, after: u64) -> Vec<Value> {
    let url = format!("https://{listen}/api/v1/events?after={after}&limit=10000");
    let v: Value = crate::support::api_get(d, &url)
        .await
        .expect("events")
        .json()
        .await
        .expect("json");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// The agent of machine `machine` in the matrix at `data`.
fn agent_named<'a>(data: &'a Path, machine: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |c: &str| {
        c.contains("vmatrix agent")
            && c.contains(&format!("--name {machine} "))
            && c.contains(&data.display().to_string())
    }
}

/// Runs `args` (a migrate or a resume) and, 0.2 s in, kills `machine`'s agent with SIGKILL;
/// starts it again 1 s later in the machine's namespace (found through its fencing watchdog,
/// which outlives the agent). Returns the restarted agent.
async fn kill_agent_during(
    data: &Path,
    machine: &str,
    args: &[&str],
) -> crate::support::Terminated {
    let (_, cmdline) = processes(agent_named(data, machine))
        .pop()
        .expect("the agent");
    let fence = std::fs::read_to_string(data.join("agents").join(machine).join("fence.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .expect("the machine's watchdog");
    let mut op = vmatrix()
        .arg("--data")
        .arg(data)
        .args(args)
        .spawn()
        .expect("start the op");
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill9("the agent", agent_named(data, machine));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent = crate::support::start_agent_again(
        &cmdline,
        fence,
        &data.join(format!("agent-{machine}-again.log")),
    );
    let _ = op.wait().await;
    agent
}

/// An agent killed with SIGKILL 0.2 s into a migration (the source's), into a resume (the
/// destination's), into a suspend and into a commit, started again a second later: the instance
/// ends running exactly once, with its RAM and disk data (or suspended, and resumes); the
/// repository verifies, and the killed commit left neither a half-published tag nor its disk
/// copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots real QEMU guests"]
async fn an_agent_killed_mid_operation_loses_nothing() {
    let _serial = crate::support::under_load().await;
    let dir = data_dir();
    let data = dir.path();
    let _sweep = VmSweep(data);
    let (_up, _) = two_machines(data).await;
    let services = data.join("services.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\nmax = 1\n",
    )
    .expect("services file");
    let (ok, _, err) = cli(data, &["apply", "-f", &services.display().to_string()]).await;
    assert!(ok, "apply: {err}");
    let web = wait_state(data, "web-1", "running").await;
    put(web["endpoint"].as_str().unwrap_or(""), "one").await;
    let other = |m: &str| if m == "rm1" { "rm2" } else { "rm1" }.to_owned();

    // 1. The source's agent dies 0.2 s into a migration.
    let from = web["machine"].as_str().unwrap_or("").to_owned();
    let to = other(&from);
    let _a1 = kill_agent_during(data, &from, &["migrate", "web-1", "--to", &to]).await;
    let settled = wait_for("web-1 settled", Duration::from_secs(90), async || {
        let i = instance(data, "web-1").await;
        (i["state"] == "running").then_some(i)
    })
    .await;
    eprintln!(
        "agent killed mid-migration: web-1 settled running on {}",
        settled["machine"]
    );
    check(settled["endpoint"].as_str().unwrap_or(""), "one").await;
    one_copy(data, "web-1").await;

    // 2. The destination's agent dies 0.2 s into a resume.
    let (ok, _, err) = cli(data, &["suspend", "web-1"]).await;
    assert!(ok, "suspend: {err}\n{}", up_log(data));
    wait_state(data, "web-1", "suspended").await;
    let on = other(settled["machine"].as_str().unwrap_or(""));
    let _a2 = kill_agent_during(data, &on, &["resume", "web-1", "--on", &on]).await;
    let web = settled_then_running(data, "web-1", Duration::from_secs(90)).await;
    check(web["endpoint"].as_str().unwrap_or(""), "one").await;
    one_copy(data, "web-1").await;

    // 3. Its agent dies 0.2 s into a suspend.
    let on = web["machine"].as_str().unwrap_or("").to_owned();
    let _a3 = kill_agent_during(data, &on, &["suspend", "web-1"]).await;
    let web = settled_then_running(data, "web-1", Duration::from_secs(90)).await;
    eprintln!(
        "agent killed mid-suspend: web-1 running on {}",
        web["machine"]
    );
    check(web["endpoint"].as_str().unwrap_or(""), "one").await;
    one_copy(data, "web-1").await;

    // 4. Its agent dies 0.2 s into a commit of its disk.
    let on = web["machine"].as_str().unwrap_or("").to_owned();
    let _a4 = kill_agent_during(
        data,
        &on,
        &["commit", "web-1", "--tag", "guest:killed", "-m", "killed"],
    )
    .await;
    let web = settled_then_running(data, "web-1", Duration::from_secs(90)).await;
    check(web["endpoint"].as_str().unwrap_or(""), "one").await;
    one_copy(data, "web-1").await;
    let (ok, out, err) = cli(data, &["image", "verify"]).await;
    assert!(ok, "verify after a commit's agent was killed: {out}{err}");
    let (_, tags, _) = cli(data, &["image", "ls"]).await;
    eprintln!(
        "agent killed mid-commit: web-1 running on {}; guest:killed {}",
        web["machine"],
        if tags.contains("killed") {
            "published whole (the kill came after)"
        } else {
            "not published"
        }
    );
    // The disk copy the killed commit made is gone once its agent is back.
    let scratch = data.join("agents").join(&on).join("tmp");
    let left: Vec<String> = std::fs::read_dir(&scratch)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", scratch.display());
    // And a commit now succeeds.
    let (ok, out, err) = cli(
        data,
        &["commit", "web-1", "--tag", "guest:after", "-m", "after"],
    )
    .await;
    assert!(ok, "a commit after the kill: {err}\n{}", up_log(data));
    eprintln!("commit after the kill: {}", out.trim());
}
