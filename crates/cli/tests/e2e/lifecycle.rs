//! Issue 13 with real QEMU: a maintenance instance on a shared machine, patched through its
//! serial console, committed as a new version that stores only what changed; it never gets
//! live traffic and the policy never moves it; the dormant v1 is never touched.

use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::cluster::{cli, ps, wait_for, wait_routed};
use crate::support::{data_dir, start_matrix, up_log};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The console of `id` as the writer, over the controller's WebSocket.
async fn console(d: &Path, id: &str) -> Socket {
    let api = std::fs::read_to_string(d.join("controller/api")).expect("api file");
    let token = std::fs::read_to_string(d.join("controller/token")).expect("token");
    let url = format!(
        "{}/api/v1/instances/{id}/console?write=true",
        api.trim().replacen("http", "ws", 1)
    );
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().expect("header"),
    );
    let (mut s, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("console");
    match s.next().await {
        Some(Ok(Message::Text(t))) => {
            let hello: Value = serde_json::from_str(&t).expect("hello");
            assert_eq!(hello["writer"], true, "{hello}");
        }
        other => panic!("no console greeting: {other:?}"),
    }
    s
}

/// Reads console output until it contains `want`.
async fn read_until(s: &mut Socket, want: &str, limit: Duration) -> String {
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

async fn version_of(d: &Path, image: &str) -> String {
    let (ok, out, err) = cli(d, &["image", "show", image, "--json"]).await;
    assert!(ok, "image show {image}: {err}");
    let v: Value = serde_json::from_str(&out).expect("image show --json");
    v["version"].as_str().expect("version").to_owned()
}

/// Requests the switch sent to each instance endpoint.
async fn sent_to(front: &str) -> Vec<(String, u64)> {
    let text = reqwest::get(format!("http://{front}/metrics"))
        .await
        .expect("switch metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter_map(|l| l.strip_prefix("vmatrix_switch_backend_requests_total{backend=\""))
        .filter_map(|l| {
            let (addr, n) = l.split_once("\"} ")?;
            Some((addr.to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn maintain_patch_through_the_console_and_commit_a_new_version() {
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
    let sent = sent_to(&front).await;
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
    let _ = up.start_kill();
    let _ = up.wait().await;
}
