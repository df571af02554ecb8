//! Issue 13 with real QEMU: a maintenance instance on a shared machine, patched through its
//! serial console, committed as a new version that stores only what changed; it never gets
//! live traffic and the policy never moves it. Then a rollout to it under steady load through
//! the switch with no failed request, a rollback the same way, and a rollout to a version that
//! never passes its health check, which stops after its first batch and reverts. The dormant
//! v1 is never touched.

use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{cli, ps, wait_for, wait_routed};
use crate::support::{data_dir, start_matrix, up_log};

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The console of `id` as the writer, over the controller's WebSocket. A session that a test
/// just closed may hold the writer's role for a moment (its end travels through the
/// controller to the agent): until it is released, the greeting says read-only, so ask again.
pub(crate) async fn console(d: &Path, id: &str) -> Socket {
    let api = std::fs::read_to_string(d.join("controller/api")).expect("api file");
    let token = std::fs::read_to_string(d.join("controller/token")).expect("token");
    let url = format!(
        "{}/api/v1/instances/{id}/console?write=true",
        api.trim().replacen("http", "ws", 1)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut req = url.clone().into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim()).parse().expect("header"),
        );
        let authority = std::fs::read_to_string(d.join("controller/tls/ca-cert.pem"))
            .expect("the controller's authority");
        let tls = vmatrix_serve::tls::client_config(&authority, None, None).expect("TLS");
        let connector = tokio_tungstenite::Connector::Rustls(std::sync::Arc::new(tls));
        let (mut s, _) =
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector))
                .await
                .expect("console");
        let hello: Value = match s.next().await {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).expect("hello"),
            other => panic!("no console greeting: {other:?}"),
        };
        if hello["writer"] == true {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the console's writer role was not released within 30 s: {hello}"
        );
        let _ = s.close(None).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads console output until it contains `want`.
pub(crate) async fn read_until(s: &mut Socket, want: &str, limit: Duration) -> String {
    let mut got = String::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !got.contains(want) {
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for {want:?} on the console after {got:?}: {other:?}"),
        }
    }
    got
}

pub(crate) async fn version_of(d: &Path, image: &str) -> String {
    let (ok, out, err) = cli(d, &["image", "show", image, "--json"]).await;
    assert!(ok, "image show {image}: {err}");
    let v: Value = serde_json::from_str(&out).expect("image show --json");
    v["version"].as_str().expect("version").to_owned()
}

/// Requests the switch sent to each instance endpoint.
async fn sent_to(d: &Path, front: &str) -> Vec<(String, u64)> {
    let text = crate::support::api_get(d, &format!("http://{front}/metrics"))
        .await
        .expect("switch metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter_map(|l| l.strip_prefix("vmatrix_switch_backend_requests_total{backend=\""))
        .filter_map(|l| {
            let (addr, _) = l.split_once('"')?;
            let (_, n) = l.rsplit_once("} ")?;
            Some((addr.to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn maintain_patch_commit_then_roll_out_back_and_refuse_a_broken_version() {
    // Its rollouts must not fail a request under load: not beside another test's load.
    let _alone = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let (mut up, front) = start_matrix(d, &["--machines", "2", "--shared", "1"]).await;
    let services = d.join("services.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 2\nmax = 2\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(ok, "{err}\n{}", up_log(d));
    wait_for("web: 2 running", Duration::from_secs(180), async || {
        let l = ps(d).await;
        (l.iter().filter(|i| i["state"] == "running").count() == 2).then_some(())
    })
    .await;
    wait_routed(&front, "web").await;
    let v1 = version_of(d, "guest:v1").await;

    // A maintenance instance: on the shared machine, purpose maintenance.
    let (ok, out, err) = cli(d, &["maintain", "web"]).await;
    assert!(ok, "maintain: {err}");
    assert!(out.contains("maintenance"), "{out}");
    let admin = wait_for(
        "the maintenance instance running",
        Duration::from_secs(180),
        async || {
            ps(d).await.into_iter().find(|i| {
                i["purpose"] == "maintenance" && i["state"] == "running" && i["machine"] == "sm1"
            })
        },
    )
    .await;
    let id = admin["id"].as_str().unwrap().to_owned();
    let endpoint = admin["endpoint"].as_str().unwrap().to_owned();
    assert!(
        ps(d)
            .await
            .iter()
            .filter(|i| i["id"] != id.as_str())
            .all(|i| i["purpose"] == "live"),
        "the others are live"
    );

    // Live load through the switch meanwhile: none of it reaches the maintenance instance.
    let load = tokio::spawn({
        let target = format!("http://{front}/s/web/www/index.html");
        async move {
            vmatrix_switch::run_load(&vmatrix_switch::LoadOptions::constant(
                target,
                10.0,
                Duration::from_secs(15),
            ))
            .await
        }
    });

    // The CLI's console with piped input: the command runs, its output comes back.
    let mut cmd = crate::support::vmatrix();
    let mut child = cmd
        .arg("--data")
        .arg(d)
        .args(["console", &id])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vmatrix console");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"\necho hello-from-$((40+2))\n")
            .await
            .expect("write");
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("vmatrix console ended")
        .expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hello-from-42"),
        "console output: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Patch the page on the system disk through the console, as an admin would.
    let mut s = console(d, &id).await;
    s.send(Message::Binary(
        b"\necho '<p>web v2</p>' > /data/www/index.html; sync; echo PATCHED-$((40+2))\n".to_vec(),
    ))
    .await
    .expect("send");
    read_until(&mut s, "PATCHED-42", Duration::from_secs(30)).await;
    drop(s);
    let page = reqwest::get(format!("http://{endpoint}/www/index.html"))
        .await
        .expect("the maintenance instance answers")
        .text()
        .await
        .expect("page");
    assert_eq!(page.trim(), "<p>web v2</p>");
    let live = load.await.unwrap();
    assert_eq!(live.failed(), 0, "{live:?}");

    // Commit as guest:v2: a small fraction of the image is new; v1 is untouched.
    let (ok, out, err) = cli(
        d,
        &["commit", &id, "--tag", "guest:v2", "-m", "the v2 page"],
    )
    .await;
    assert!(ok, "commit: {err}\n{}", up_log(d));
    eprintln!("commit: {}", out.trim());
    let new_chunks: u64 = out
        .split(" new chunk(s)")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no chunk count in {out:?}"));
    let image_chunks = 64 * 1024 * 1024 / (64 * 1024);
    assert!(
        new_chunks * 20 < image_chunks,
        "{new_chunks} of {image_chunks} chunks new"
    );
    let v2 = version_of(d, "guest:v2").await;
    assert_ne!(v2, v1);
    assert_eq!(version_of(d, "guest:v1").await, v1, "v1 never changes");
    let (ok, log, err) = cli(d, &["image", "log", "guest"]).await;
    assert!(ok, "{err}");
    assert!(
        log.contains(&v2) && log.contains(&v1) && log.contains("the v2 page"),
        "{log}"
    );

    // The maintenance instance got no switch traffic, the live ones all of it; it was never
    // moved (still generation 1, on sm1).
    let sent = sent_to(d, &front).await;
    let to_admin: u64 = sent
        .iter()
        .filter(|(a, _)| *a == endpoint)
        .map(|(_, n)| n)
        .sum();
    let total: u64 = sent.iter().map(|(_, n)| n).sum();
    assert_eq!(to_admin, 0, "{sent:?}");
    assert!(total >= live.sent, "{sent:?} vs {live:?}");
    let now = ps(d).await;
    let admin_now = now
        .iter()
        .find(|i| i["id"] == id.as_str())
        .expect("still there");
    assert_eq!(
        (
            admin_now["machine"].as_str(),
            admin_now["generation"].as_u64()
        ),
        (Some("sm1"), Some(1))
    );

    let (ok, _, err) = cli(d, &["discard", &id]).await;
    assert!(ok, "{err}");

    // Roll out v2 under steady load: no failed request; afterwards every answer is v2's page.
    let v2_page = "<p>web v2</p>";
    let v1_page = "the page as built";
    let (load, ok, out, err) =
        under_load(&front, cli(d, &["rollout", "web", "--to", "guest:v2"])).await;
    assert!(ok, "rollout: {err}\n{}", up_log(d));
    eprintln!("rollout to v2: {} | {load:?}", out.trim());
    assert_eq!(load.failed(), 0, "rollout to v2 under load: {load:?}");
    assert!(err.contains("1/2 replaced"), "progress is shown: {err}");
    assert_eq!(live_versions(d).await, vec![v2.clone(), v2.clone()]);
    assert_pages(&front, v2_page).await;

    // Back to v1 the same way.
    let (load, ok, out, err) = under_load(&front, cli(d, &["rollback", "web"])).await;
    assert!(ok, "rollback: {err}\n{}", up_log(d));
    eprintln!("rollback to v1: {} | {load:?}", out.trim());
    assert_eq!(load.failed(), 0, "rollback under load: {load:?}");
    assert_eq!(live_versions(d).await, vec![v1.clone(), v1.clone()]);
    assert_pages(&front, v1_page).await;

    // A broken version: an admin wipes the boot code of a maintenance copy and commits it.
    let (ok, _, err) = cli(d, &["maintain", "web"]).await;
    assert!(ok, "maintain: {err}");
    let admin = wait_for(
        "the second maintenance instance",
        Duration::from_secs(180),
        async || {
            ps(d)
                .await
                .into_iter()
                .find(|i| i["purpose"] == "maintenance" && i["state"] == "running")
        },
    )
    .await;
    let id = admin["id"].as_str().unwrap().to_owned();
    let mut s = console(d, &id).await;
    s.send(Message::Binary(
        b"\ndd if=/dev/zero of=/dev/vda bs=446 count=1 conv=notrunc; sync; echo WIPED-$((40+2))\n"
            .to_vec(),
    ))
    .await
    .expect("send");
    read_until(&mut s, "WIPED-42", Duration::from_secs(30)).await;
    drop(s);
    let (ok, _, err) = cli(
        d,
        &["commit", &id, "--tag", "guest:broken", "-m", "a bad patch"],
    )
    .await;
    assert!(ok, "commit: {err}");
    let (ok, _, err) = cli(d, &["discard", &id]).await;
    assert!(ok, "{err}");
    let (load, ok, _, err) = under_load(
        &front,
        cli(
            d,
            &[
                "rollout",
                "web",
                "--to",
                "guest:broken",
                "--batch",
                "1",
                "--health-timeout",
                "30s",
            ],
        ),
    )
    .await;
    assert!(!ok, "a rollout to a version that never boots fails");
    eprintln!("rollout to the broken version: {} | {load:?}", err.trim());
    assert!(err.contains("stopped and reverted"), "{err}");
    assert_eq!(load.failed(), 0, "a stopped rollout under load: {load:?}");
    let (ok, status, err) = cli(d, &["rollout", "--status", "web", "--json"]).await;
    assert!(ok, "{err}");
    let status: Value = serde_json::from_str(&status).expect("status json");
    assert_eq!(status["state"], "reverted", "{status}");
    assert_eq!(
        status["replaced"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert_eq!(live_versions(d).await, vec![v1.clone(), v1.clone()]);
    assert_pages(&front, v1_page).await;
    assert_eq!(
        version_of(d, "guest:v1").await,
        v1,
        "the dormant v1 never changed"
    );

    let _ = up.start_kill();
    let _ = up.wait().await;
}

/// Runs `work` while 5 requests/s go through the switch to web's page (in 5-second slices
/// until the work has ended, and one slice more); the slices' counts summed.
async fn under_load(
    front: &str,
    work: impl std::future::Future<Output = (bool, String, String)>,
) -> (vmatrix_switch::LoadResult, bool, String, String) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = format!("http://{front}/s/web/www/index.html");
    let load = tokio::spawn({
        let done = done.clone();
        async move {
            let mut all = vmatrix_switch::LoadResult::default();
            loop {
                let last = done.load(std::sync::atomic::Ordering::Relaxed);
                let r = vmatrix_switch::run_load(&vmatrix_switch::LoadOptions::constant(
                    target.clone(),
                    5.0,
                    Duration::from_secs(5),
                ))
                .await;
                all.sent += r.sent;
                all.ok += r.ok;
                for (k, n) in r.errors {
                    *all.errors.entry(k).or_default() += n;
                }
                all.max_ms = all.max_ms.max(r.max_ms);
                all.p99_ms = all.p99_ms.max(r.p99_ms);
                if last {
                    return all;
                }
            }
        }
    });
    let (ok, out, err) = work.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = load.await.expect("the load ran");
    (result, ok, out, err)
}

/// The versions web's live instances run, sorted.
async fn live_versions(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = ps(d)
        .await
        .iter()
        .filter(|i| i["service"] == "web" && i["purpose"] == "live" && i["state"] == "running")
        .filter_map(|i| i["version"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

/// 40 requests through the switch all get a page containing `want`.
async fn assert_pages(front: &str, want: &str) {
    let http = reqwest::Client::new();
    for _ in 0..40 {
        let page = http
            .get(format!("http://{front}/s/web/www/index.html"))
            .send()
            .await
            .expect("the switch answers")
            .text()
            .await
            .expect("page");
        assert!(page.contains(want), "{page:?} is not {want:?}");
    }
}
