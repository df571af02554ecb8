//! The control plane with real processes and real QEMU: `vmatrix up --machines 3`, `apply`,
//! instances on different machines answering HTTP, migrate, suspend/resume elsewhere, and a
//! controller killed with SIGKILL that comes back without losing or duplicating anything.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    data_dir, free_port, is_qemu_of, kill9, processes, start_controller, start_up, vmatrix,
};

pub(crate) async fn cli(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = vmatrix()
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .await
        .expect("run vmatrix");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) async fn ps(data: &Path) -> Vec<Value> {
    let (ok, out, err) = cli(data, &["ps", "--json"]).await;
    assert!(ok, "ps: {err}");
    let v: Value = serde_json::from_str(&out).expect("ps --json");
    v["instances"].as_array().cloned().unwrap_or_default()
}

/// Each instance's (id, machine, endpoint).
async fn placements(data: &Path) -> Vec<(String, String, String)> {
    ps(data)
        .await
        .iter()
        .map(|i| {
            (
                i["id"].to_string(),
                i["machine"].to_string(),
                i["endpoint"].to_string(),
            )
        })
        .collect()
}

/// Waits until the switch at `front` routes `service` to an instance that answers `/health`.
pub(crate) async fn wait_routed(front: &str, service: &str) {
    let http = reqwest::Client::new();
    wait_for(
        &format!("the switch routing {service}"),
        Duration::from_secs(60),
        async || {
            let r = http
                .get(format!("http://{front}/s/{service}/health"))
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
}

/// `vmatrix apply -f FILE`, then waits until `n` instances run; returns them.
pub(crate) async fn apply_and_wait(d: &Path, file: &Path, n: usize, limit: Duration) -> Vec<Value> {
    let (ok, _, err) = cli(d, &["apply", "-f", file.to_str().unwrap()]).await;
    assert!(ok, "{err}\n{}", crate::support::up_log(d));
    let deadline = Instant::now() + limit;
    loop {
        let l = ps(d).await;
        if l.iter().filter(|i| i["state"] == "running").count() == n {
            return l;
        }
        if Instant::now() >= deadline {
            let (_, events, _) = cli(d, &["events"]).await;
            panic!(
                "timed out waiting for {n} instances running: {l:?}\nevents:\n{events}\nlast lines of vmatrix up:\n{}",
                crate::support::up_log(d)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Live-migrates `id` (of `service`) to `to` while `rps` requests per second go to its health
/// path through the switch at `front` for `seconds` (the move starts once two seconds' worth
/// went through); prints and
/// returns the move's report and what the load saw. Panics, with `up`'s log, if the move fails.
pub(crate) async fn migrate_under_load(
    d: &Path,
    front: &str,
    (service, id, to): (&str, &str, &str),
    rps: f64,
    seconds: u64,
) -> (String, vmatrix_switch::LoadResult) {
    use vmatrix_switch::{run_load, LoadOptions};
    let before = switch_requests(d, front, service).await.unwrap_or(0.0);
    let load = tokio::spawn(run_load_owned(LoadOptions::constant(
        format!("http://{front}/s/{service}/health"),
        rps,
        Duration::from_secs(seconds),
    )));
    async fn run_load_owned(o: LoadOptions) -> vmatrix_switch::LoadResult {
        run_load(&o).await
    }
    // Move once the switch has carried two seconds of this load.
    wait_switch_requests(d, front, service, before + 2.0 * rps).await;
    let (ok, out, err) = cli(d, &["migrate", id, "--to", to]).await;
    assert!(ok, "migrate: {out}{err}\n{}", crate::support::up_log(d));
    let r = load.await.unwrap();
    eprintln!(
        "{id} → {to} under {rps} req/s ({}): {} sent, {} failed; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        out.trim(),
        r.sent,
        r.failed(),
        r.p50_ms,
        r.p99_ms,
        r.max_ms
    );
    (out, r)
}

/// How many requests of `service` the switch at `front` has carried (`None` while its metrics
/// do not answer).
pub(crate) async fn switch_requests(d: &Path, front: &str, service: &str) -> Option<f64> {
    let series = format!("vmatrix_switch_requests_total{{service=\"{service}\"}}");
    metric(d, front, &series).await
}

/// The value of one `series` (name and labels, as printed, or up to the comma after its first
/// labels) at `{at}/metrics` (`at`: an
/// address, served over HTTP — a switch — or a URL), read with the data directory `d`'s token
/// (`None` while it does not answer or lacks the series).
pub(crate) async fn metric(d: &Path, at: &str, series: &str) -> Option<f64> {
    let base = if at.contains("://") {
        at.to_owned()
    } else {
        format!("http://{at}")
    };
    let m = crate::support::api_get(d, &format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    m.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        // A series given up to a comma names its first labels only: any others follow.
        let value = if series.ends_with(',') {
            rest.split_once("} ")?.1
        } else {
            rest.strip_prefix(' ')?
        };
        value.trim().parse().ok()
    })
}

/// Waits (30 s at most) until the switch at `front` has carried `n` requests of `service`.
pub(crate) async fn wait_switch_requests(d: &Path, front: &str, service: &str, n: f64) {
    wait_for("the load under way", Duration::from_secs(30), async || {
        (switch_requests(d, front, service).await? >= n).then_some(())
    })
    .await;
}

pub(crate) async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The events the controller at `listen` (data directory `d`) logged after event `after`,
/// oldest first; empty while it does not answer.
async fn events_after(d: &Path, listen: &str, mut after: u64) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let url = format!("https://{listen}/api/v1/events?after={after}");
        let Ok(r) = crate::support::api_get(d, &url).await else {
            return all;
        };
        let Ok(page) = r.json::<Value>().await else {
            return all;
        };
        let list = page["events"].as_array().cloned().unwrap_or_default();
        match list.last().and_then(|e| e["id"].as_u64()) {
            Some(last) => after = last,
            None => return all,
        }
        all.extend(list);
    }
}

fn instance<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {list:?}"))
}

async fn http(endpoint: &str, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let addr: SocketAddr = endpoint.parse().expect("host:port");
    let r = vmatrix_vmm::http::request(addr, method, path, body, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (r.status, r.text())
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn up_apply_migrate_suspend_resume_and_survive_a_controller_crash() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let front = format!("127.0.0.1:{}", free_port());
    let mut up = start_up(
        d,
        &[
            "--machines",
            "3",
            "--listen",
            &listen,
            "--switch-listen",
            &front,
            // Manual mode: this test moves instances itself, and starts the controller it
            // kills again itself.
            "--policy",
            "min",
            "--no-restart",
        ],
    )
    .await;
    let (ok, out, err) = cli(d, &["machines", "--json"]).await;
    assert!(
        ok,
        "{err}\nlast lines of vmatrix up:\n{}",
        crate::support::up_log(d)
    );
    let machines: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        machines["machines"].as_array().unwrap().len(),
        3,
        "{machines}"
    );

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/services.toml");
    let applied = Instant::now();
    let (ok, _, err) = cli(d, &["apply", "-f", example.to_str().unwrap()]).await;
    assert!(ok, "apply: {err}");
    let list = wait_for(
        "three running instances",
        Duration::from_secs(180),
        async || {
            let l = ps(d).await;
            (l.len() == 3 && l.iter().all(|i| i["state"] == "running")).then_some(l)
        },
    )
    .await;
    eprintln!(
        "apply → all 3 instances serving: {:.1}s",
        applied.elapsed().as_secs_f64()
    );
    // A service's replicas spread over machines; different services share them.
    let sports: std::collections::BTreeSet<&str> = list
        .iter()
        .filter(|i| i["service"] == "sports")
        .map(|i| i["machine"].as_str().unwrap())
        .collect();
    assert_eq!(
        sports.len(),
        2,
        "sports' two instances on two machines: {list:?}"
    );
    for i in &list {
        let (status, body) = http(i["endpoint"].as_str().unwrap(), "GET", "/", b"").await;
        assert_eq!(status, 200);
        assert!(body.contains(i["id"].as_str().unwrap()), "{body}");
    }

    // Migrate through the control plane.
    let s1 = instance(&list, "sports-1").clone();
    let ep = s1["endpoint"].as_str().unwrap();
    assert_eq!(http(ep, "PUT", "/kv/cart", b"in ram").await.0, 200);
    assert_eq!(http(ep, "PUT", "/disk/order", b"on disk").await.0, 200);
    let from = s1["machine"].as_str().unwrap().to_owned();
    let to = if from == "rm1" { "rm2" } else { "rm1" };
    let t = Instant::now();
    let (ok, out, err) = cli(d, &["migrate", "sports-1", "--to", to]).await;
    assert!(ok, "migrate: {err}");
    eprintln!(
        "migrate through the control plane: {:.2}s wall ({})",
        t.elapsed().as_secs_f64(),
        out.trim()
    );
    let moved = instance(&ps(d).await, "sports-1").clone();
    assert_eq!(moved["machine"], to);
    assert_eq!(moved["state"], "running");
    let ep = moved["endpoint"].as_str().unwrap().to_owned();
    assert!(http(&ep, "GET", "/", b"").await.1.contains("sports-1"));
    assert_eq!(http(&ep, "GET", "/kv/cart", b"").await.1, "in ram");
    assert_eq!(http(&ep, "GET", "/disk/order", b"").await.1, "on disk");
    let (_, events, _) = cli(d, &["events"]).await;
    assert!(
        events.contains(&format!("migrate sports-1 {from} → {to}")) && events.contains("ok in"),
        "{events}"
    );

    // Suspend, then resume on a third machine.
    let (ok, _, err) = cli(d, &["suspend", "sports-1"]).await;
    assert!(ok, "suspend: {err}");
    assert_eq!(instance(&ps(d).await, "sports-1")["state"], "suspended");
    let third = ["rm1", "rm2", "rm3"]
        .into_iter()
        .find(|m| *m != to)
        .unwrap();
    let (ok, _, err) = cli(d, &["resume", "sports-1", "--on", third]).await;
    assert!(ok, "resume: {err}");
    let resumed = wait_for(
        "sports-1 running again",
        Duration::from_secs(60),
        async || {
            let l = ps(d).await;
            let i = instance(&l, "sports-1").clone();
            (i["state"] == "running").then_some(i)
        },
    )
    .await;
    assert_eq!(resumed["machine"], third);
    let ep = resumed["endpoint"].as_str().unwrap().to_owned();
    assert_eq!(http(&ep, "GET", "/kv/cart", b"").await.1, "in ram");
    assert_eq!(http(&ep, "GET", "/disk/order", b"").await.1, "on disk");

    // kill -9 the controller; start a new one on the same state: nothing lost or duplicated.
    let before = placements(d).await;
    // Everything logged so far is the old controller's: only events after this one count.
    let mark = events_after(d, &listen, 0)
        .await
        .last()
        .and_then(|e| e["id"].as_u64())
        .expect("the old controller logged events");
    let mut controller = crate::support::kill9_and_restart_controller(d, &listen).await;
    // A controller process logs `register` at the first heartbeat it gets from each machine
    // (the old one logged them long ago): one after the mark is a heartbeat the new controller
    // took in; it then settles its rows by that report, which the watch below gives time to.
    let t = Instant::now();
    wait_for(
        "a heartbeat from rm1, rm2 and rm3 at the new controller",
        Duration::from_secs(30),
        async || {
            let new = events_after(d, &listen, mark).await;
            ["rm1", "rm2", "rm3"]
                .iter()
                .all(|m| {
                    new.iter()
                        .any(|e| e["who"] == *m && e["what"] == "register")
                })
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "every agent registered with the new controller in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // And the instances stay as they were while the agents go on reporting (a heartbeat a
    // second from each, so three more rounds at least).
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            placements(d).await,
            before,
            "the restarted controller changed the instances {:.1}s after every agent registered",
            watch.elapsed().as_secs_f64()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = placements(d).await;
    assert_eq!(
        before, after,
        "the restarted controller sees the same instances"
    );
    let marker = d.display().to_string();
    let qemus = processes(|c| c.contains(&marker) && c.contains("qemu-system")).len();
    // (The suspend let the reconcile loop start a replacement to keep sports at min 2; the
    // resumed instance came back beside it.)
    assert_eq!(
        qemus,
        after.len(),
        "one QEMU per instance, none duplicated: {after:?}"
    );

    // Recovery: a broken instance (its QEMU killed) is thrown away and replaced.
    let victim = instance(&ps(d).await, "sports-2").clone();
    kill9("sports-2's QEMU", is_qemu_of(d, "sports-2"));
    let t = Instant::now();
    let replaced = wait_for("sports-2 replaced", Duration::from_secs(120), async || {
        let l = ps(d).await;
        let gone = !l.iter().any(|i| i["id"] == "sports-2");
        let running = l
            .iter()
            .filter(|i| i["service"] == "sports" && i["state"] == "running")
            .count();
        (gone && running >= 2).then_some(l)
    })
    .await;
    eprintln!(
        "recovery: sports-2 (on {}) replaced in {:.1}s: {:?}",
        victim["machine"],
        t.elapsed().as_secs_f64(),
        replaced
            .iter()
            .map(|i| i["id"].to_string())
            .collect::<Vec<_>>()
    );
    let (_, events, _) = cli(d, &["events"]).await;
    assert!(
        events.contains("sports-2 failed") && events.contains("discard sports-2"),
        "{events}"
    );

    let _ = controller.start_kill();
    let _ = controller.wait().await;
    let _ = up.start_kill();
    let _ = up.wait().await;
}

#[tokio::test]
async fn unauthenticated_changes_are_refused_and_bad_files_point_at_the_line() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut controller = start_controller(d, &listen).await;
    let token = std::fs::read_to_string(d.join("controller/token")).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("controller/token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the token file is private");

    let url = format!("https://{listen}/api/v1");
    let client = crate::support::client(d);
    for (path, body) in [
        ("services", serde_json::json!({"services": []})),
        (
            "operations",
            serde_json::json!({"op": "drain", "machine": "rm1"}),
        ),
        ("agents/heartbeat", serde_json::json!({})),
    ] {
        let r = client
            .post(format!("{url}/{path}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let r = client
            .post(format!("{url}/{path}"))
            .bearer_auth("wrong")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    // Reads too: the instance list names every endpoint (a way around the switch).
    for path in [
        "instances",
        "machines",
        "services",
        "events",
        "load",
        "policy",
        "rollouts",
    ] {
        let r = client.get(format!("{url}/{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "GET {path} without a token");
    }
    let r = client
        .get(format!("https://{listen}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "GET /metrics without a token");
    let r = client
        .get(format!("{url}/instances"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reads with the token");
    let r = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200, "liveness needs no token");
    let r = client
        .post(format!("{url}/operations"))
        .bearer_auth(token.trim())
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("bad request body"),
        "{e}"
    );
    let openapi: Value = client
        .get(format!("https://{listen}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["paths"]["/api/v1/operations"].is_object());
    let metrics = client
        .get(format!("https://{listen}/metrics"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("vmatrix_machines"), "{metrics}");

    let bad = d.join("bad.toml");
    std::fs::write(&bad, "# two services\n[[service]]\nname = \"db\"\nimage = \"guest:v1\"\n\n[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 3\nmax = 2\n").unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", bad.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(
        err.contains("bad.toml:6: service web: min (3) is above max (2)"),
        "{err}"
    );
    std::fs::write(
        &bad,
        "[[service]]\nname = \"db\"\nimage = \"guest:v1\"\nvcpu = 2\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", bad.to_str().unwrap()]).await;
    assert!(!ok);
    assert!(err.contains("bad.toml:4: unknown field `vcpu`"), "{err}");
    let (_, out, _) = cli(d, &["services", "--json"]).await;
    assert!(
        out.contains("\"services\": []"),
        "a refused file changed the services: {out}"
    );
    let _ = controller.start_kill();
    let _ = controller.wait().await;
}
