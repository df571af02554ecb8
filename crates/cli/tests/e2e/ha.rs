//! Controllers in high availability (`up --ha`: two controllers on three etcd members) under
//! load through the switch: the leader killed, and the leader frozen. Each prints a row for
//! docs/reliability.md, as the other fault tests do.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::cluster::{cli, ps};
use crate::faults::{load, one_runs_and_row, one_web, runs, signal, stopped, OneWeb};
use crate::support::{data_dir, kill9, processes, up_log};

/// Whether the controller at `api` leads (its health answers 200), stands by (503 with the
/// standby header) or neither (`None`: not answering).
async fn leads(d: &Path, api: &str) -> Option<bool> {
    let r = crate::support::client(d)
        .get(format!("{api}/api/v1/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if r.status().is_success() {
        return Some(true);
    }
    r.headers()
        .contains_key(vmatrix_core::api::STANDBY_HEADER)
        .then_some(false)
}

/// Polls `done` every `every` until it holds; after `limit`, fails with `what` and `up`'s log.
/// Returns how long it took.
async fn until(
    d: &Path,
    what: &str,
    limit: Duration,
    every: Duration,
    mut done: impl AsyncFnMut() -> bool,
) -> Duration {
    let t = Instant::now();
    while !done().await {
        assert!(t.elapsed() < limit, "{what}\n{}", up_log(d));
        tokio::time::sleep(every).await;
    }
    t.elapsed()
}

/// `up --ha` running one instance of web; the leading controller's and the standby's URLs.
async fn ha_web(d: &Path) -> (OneWeb, String, String) {
    let ports = crate::support::free_ports(7).to_string();
    let w = one_web(d, &["--ha", "--ha-ports", &ports]).await;
    let apis: Vec<String> = std::fs::read_to_string(d.join("controller/api"))
        .unwrap()
        .trim()
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(apis.len(), 2, "{apis:?}");
    // Polled: on a busy host a health call may take longer than its 2 s.
    let t = Instant::now();
    loop {
        let roles = [leads(d, &apis[0]).await, leads(d, &apis[1]).await];
        match roles {
            [Some(true), Some(false)] => return (w, apis[0].clone(), apis[1].clone()),
            [Some(false), Some(true)] => return (w, apis[1].clone(), apis[0].clone()),
            other => assert!(
                t.elapsed() < Duration::from_secs(30),
                "one leader and one standby, not {other:?}\n{}",
                up_log(d)
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The controller process of the matrix at `d` that serves `api`.
fn controller_at<'a>(d: &'a Path, api: &str) -> impl Fn(&str) -> bool + 'a {
    let listen = format!("--listen {} ", api.trim_start_matches("https://"));
    let marker = d.display().to_string();
    move |c: &str| {
        c.contains("vmatrix")
            && c.contains(" controller ")
            && c.contains(&listen)
            && c.contains(&marker)
    }
}

/// After the fault: the same instance runs on its same QEMU, and the leader takes an operation
/// (the CLI finds it among the two).
async fn nothing_replaced(d: &Path, w: &OneWeb) {
    let l = ps(d).await;
    assert!(
        l.iter()
            .any(|i| i["id"] == w.id.as_str() && i["state"] == "running"),
        "{l:?}"
    );
    assert!(runs(w.qemu), "its QEMU runs on");
    let other = if w.machine == "rm1" { "rm2" } else { "rm1" };
    let (ok, _, err) = cli(d, &["drain", other]).await;
    assert!(ok, "drain through the leader: {err}");
}

/// The leading controller killed with SIGKILL under load: a controller leads again within
/// 10 s — the standby, or the killed one that `up` starts again, whichever takes the expired
/// lease first — the instance runs on untouched (no machine is fenced: the agents reach the
/// new leader before their leases run out), and then one leads and the other stands by.
#[tokio::test]
#[ignore = "boots real QEMU and runs etcd; run by scripts/test"]
async fn the_standby_controller_leads_when_the_leader_is_killed() {
    let _host = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let (w, leader, standby) = ha_web(d).await;
    let traffic = load(&w.front, "web", 20.0, 30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill9("the leading controller", controller_at(d, &leader));
    let killed = Instant::now();
    let (mut took, mut back, mut who) = (None, None, "");
    while !traffic.is_finished() {
        assert!(!stopped(w.qemu), "the instance's machine was fenced");
        let now = [leads(d, &standby).await, leads(d, &leader).await];
        // A controller leads again: the standby, or the killed one `up` started again (they
        // race for the expired lease).
        if took.is_none() && now.contains(&Some(true)) {
            took = Some(killed.elapsed());
            who = if now[0] == Some(true) {
                "the standby"
            } else {
                "the killed one, started again"
            };
        }
        // And both answer again: one leads, the other stands by.
        if took.is_some()
            && back.is_none()
            && now.contains(&Some(true))
            && now.contains(&Some(false))
        {
            back = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = took.unwrap_or_else(|| panic!("no controller led again\n{}", up_log(d)));
    assert!(
        took < Duration::from_secs(10),
        "a controller led again after {took:?}"
    );
    let back = back.unwrap_or_else(|| panic!("not one leader and one standby\n{}", up_log(d)));
    let r = traffic.await.unwrap();
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    nothing_replaced(d, &w).await;
    one_runs_and_row(
        d,
        "kill -9 of the leading controller (2 controllers, 3 etcd members)",
        &r,
        format!(
            "{who} led {:.1} s after, the other stood by {:.1} s after; no machine fenced, \
             nothing replaced",
            took.as_secs_f64(),
            back.as_secs_f64()
        ),
    )
    .await;
}

/// The leading controller frozen (SIGSTOP) under load: the standby leads once the frozen one's
/// lease expires, and the agents — whose heartbeats to the frozen one hang — move to it before
/// their own leases run out. Thawed, the old leader finds its lease gone and stops without
/// acting; `up` starts it again, standing by.
#[tokio::test]
#[ignore = "boots real QEMU and runs etcd; run by scripts/test"]
async fn a_frozen_leader_is_replaced_and_stops_when_thawed() {
    let _host = crate::support::under_load().await;
    let data = data_dir();
    let d = data.path();
    let (w, leader, standby) = ha_web(d).await;
    let (pid, _) = processes(controller_at(d, &leader))
        .pop()
        .expect("the leader's process");
    let traffic = load(&w.front, "web", 20.0, 30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(pid, "-STOP");
    let took = until(
        d,
        "the standby did not lead",
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || {
            assert!(!stopped(w.qemu), "the instance's machine was fenced");
            leads(d, &standby).await == Some(true)
        },
    )
    .await;
    // Long enough for every agent to have moved to the new leader.
    for _ in 0..30 {
        assert!(!stopped(w.qemu), "the instance's machine was fenced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(pid, "-CONT");
    let stopped_after = until(
        d,
        "the thawed leader did not stop",
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || !runs(pid),
    )
    .await;
    let back = stopped_after
        + until(
            d,
            "the old leader did not come back as a standby",
            Duration::from_secs(30),
            Duration::from_millis(100),
            async || leads(d, &leader).await == Some(false),
        )
        .await;
    // The new leader still leads (polled: a health call may time out on a busy host).
    until(
        d,
        "the new leader does not answer",
        Duration::from_secs(10),
        Duration::from_millis(100),
        async || match leads(d, &standby).await {
            Some(false) => panic!("the new leader stood down\n{}", up_log(d)),
            answer => answer == Some(true),
        },
    )
    .await;
    while !traffic.is_finished() {
        assert!(!stopped(w.qemu), "the instance's machine was fenced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = traffic.await.unwrap();
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    let log = std::fs::read_to_string(d.join("up.log")).unwrap_or_default();
    assert!(log.contains("no longer leads"), "{}", up_log(d));
    nothing_replaced(d, &w).await;
    one_runs_and_row(
        d,
        "SIGSTOP of the leading controller, thawed after the standby led (2 controllers, 3 etcd \
         members)",
        &r,
        format!(
            "the standby led {:.1} s after the freeze; thawed, the old leader stopped {:.2} s \
             later and stood by again after {:.1} s; no machine fenced, nothing replaced",
            took.as_secs_f64(),
            stopped_after.as_secs_f64(),
            back.as_secs_f64()
        ),
    )
    .await;
}
