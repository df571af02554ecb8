//! The switch with real QEMU behind it: a live migration under steady load without a failed
//! request, a dormant service woken by its first request, a dropped service refused at once
//! while another keeps serving, and the controller seeing the load the generator sent.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmatrix_switch::{run_load, LoadOptions};

use crate::cluster::{cli, ps, wait_for, wait_routed};
use crate::support::{data_dir, free_port, start_up};

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn the_switch_hides_moves_wakes_dormant_services_and_drops_fast() {
    let _alone = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let api = format!("127.0.0.1:{}", free_port());
    let front = format!("127.0.0.1:{}", free_port());
    let mut up = start_up(
        d,
        &[
            "--machines",
            "3",
            "--listen",
            &api,
            "--switch-listen",
            &front,
            // Manual mode: this test moves instances itself.
            "--policy",
            "min",
        ],
    )
    .await;
    let services = d.join("services.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\npriority = 10\n\n\
         [[service]]\nname = \"batch\"\nimage = \"guest:v1\"\npriority = 1\n\n\
         [[service]]\nname = \"sleepy\"\nimage = \"guest:v1\"\nmin = 0\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(
        ok,
        "{err}\nlast lines of vmatrix up:\n{}",
        crate::support::up_log(d)
    );
    wait_for(
        "web and batch running",
        Duration::from_secs(180),
        async || {
            let l = ps(d).await;
            (l.iter().filter(|i| i["state"] == "running").count() == 2).then_some(())
        },
    )
    .await;
    let http = reqwest::Client::new();
    wait_routed(&front, "web").await;

    // 1. A live migration under 30 requests/s: no failed request. (The rate stays well inside
    // what one TCG guest serves on a slow host — about 40 req/s on a bad day — so a failure
    // here is the move's, not an overloaded guest's.)
    let web = ps(d)
        .await
        .into_iter()
        .find(|i| i["service"] == "web")
        .unwrap();
    let to = if web["machine"] == "rm1" {
        "rm2"
    } else {
        "rm1"
    };
    let load = tokio::spawn({
        let target = format!("http://{front}/s/web/health");
        async move {
            run_load(&LoadOptions::constant(
                target,
                30.0,
                Duration::from_secs(12),
            ))
            .await
        }
    });
    // Move only once the switch has carried a steady stream for a while.
    crate::cluster::wait_switch_requests(d, &front, "web", 100.0).await;
    let (ok, out, err) = cli(d, &["migrate", web["id"].as_str().unwrap(), "--to", to]).await;
    assert!(ok, "migrate: {err}");
    let r = load.await.unwrap();
    eprintln!(
        "migration under load ({}): {} sent, {} ok, {} failed; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        out.trim(), r.sent, r.ok, r.failed(), r.p50_ms, r.p99_ms, r.max_ms
    );
    assert!(r.sent >= 350, "the load ran: {r:?}");
    if r.failed() > 0 {
        // Where this host's side of the service network thought the instance was.
        let port = api.rsplit_once(':').unwrap().1;
        let show = |args: &[&str]| {
            std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        eprintln!(
            "front fdb:\n{}\nfront neighbours:\n{}\nps:\n{:#?}\n{}\n{}",
            show(&["bridge", "fdb", "show", "dev", &format!("vmxv{port}")]),
            show(&["ip", "neigh", "show", "dev", &format!("vmxs{port}")]),
            ps(d).await,
            crate::support::serial_tails(d, web["id"].as_str().unwrap(), 80),
            crate::support::up_log(d)
        );
    }
    assert_eq!(
        r.failed(),
        0,
        "requests failed during the move: {:?}",
        r.errors
    );

    // 2. A dormant service: the first request is held, the service wakes, the request is answered.
    assert!(
        ps(d).await.iter().all(|i| i["service"] != "sleepy"),
        "sleepy starts dormant"
    );
    let t = Instant::now();
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
        .get(format!("http://{front}/s/sleepy/"))
        .send()
        .await
        .expect("the held request is answered");
    let held = t.elapsed();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["instance"].as_str().unwrap().starts_with("sleepy-"),
        "{body}"
    );
    eprintln!(
        "dormant service woken by its first request: held {:.2}s",
        held.as_secs_f64()
    );

    // 3. A dropped service is refused at once while another keeps serving.
    let (ok, _, err) = cli(d, &["drop", "batch"]).await;
    assert!(ok, "{err}");
    let refused = wait_for("batch refused", Duration::from_secs(10), async || {
        let t = Instant::now();
        let r = http
            .get(format!("http://{front}/s/batch/"))
            .send()
            .await
            .ok()?;
        (r.status() == 503).then(|| (t.elapsed(), r.headers().get("retry-after").cloned()))
    })
    .await;
    assert!(refused.1.is_some(), "503 carries Retry-After");
    let t = Instant::now();
    let mut refusals = Vec::new();
    for _ in 0..20 {
        let t1 = Instant::now();
        let r = http
            .get(format!("http://{front}/s/batch/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        refusals.push(t1.elapsed().as_secs_f64() * 1000.0);
        let ok = http
            .get(format!("http://{front}/s/web/health"))
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200, "web keeps serving while batch is dropped");
    }
    refusals.sort_by(f64::total_cmp);
    eprintln!(
        "dropped service refused in {:.2} ms median, {:.2} ms max ({} pairs in {:.2}s)",
        refusals[10],
        refusals[19],
        refusals.len(),
        t.elapsed().as_secs_f64()
    );
    let (ok, _, err) = cli(d, &["undrop", "batch"]).await;
    assert!(ok, "{err}");

    // 4. The controller sees the rate the generator sent, within 5%: its view (the switch's
    // last report, the last 5 whole seconds) is sampled over the load's second half — a host
    // busy with other tests may delay one report by a few seconds, not the count in it.
    let opts = LoadOptions::constant(
        format!("http://{front}/s/web/health"),
        40.0,
        Duration::from_secs(12),
    );
    let load = tokio::spawn(async move { run_load(&opts).await });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut samples = Vec::new();
    while !load.is_finished() {
        let seen: Value = crate::support::api_get(d, &format!("https://{api}/api/v1/load"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        samples.push(seen["services"]["web"]["rps"].as_f64().unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = load.await.unwrap();
    assert_eq!(r.failed(), 0, "{r:?}");
    let near = |x: &f64| (x - r.achieved_rps).abs() <= r.achieved_rps * 0.05;
    eprintln!(
        "load generator achieved {:.1} req/s; the controller saw {:.1}–{:.1} req/s for web \
         ({} of {} samples within 5%)",
        r.achieved_rps,
        samples.iter().copied().fold(f64::INFINITY, f64::min),
        samples.iter().copied().fold(0.0, f64::max),
        samples.iter().filter(|x| near(x)).count(),
        samples.len()
    );
    assert!(
        samples.iter().any(near),
        "the controller saw {samples:?}, the generator sent {}",
        r.achieved_rps
    );

    let _ = up.start_kill();
    let _ = up.wait().await;
}
