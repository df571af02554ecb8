//! Fault injection with real processes and real QEMU, under load through the switch. Each test
//! prints one row for docs/reliability.md (`reliability: | fault | lost | duplicated | failed
//! requests | recovery |`): instances lost and duplicated must be 0.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmatrix_switch::{run_load, LoadOptions, LoadResult};

use crate::cluster::{apply_and_wait, cli, ps, wait_routed};
use crate::support::{data_dir, is_qemu_of, kill9, processes, start_matrix, up_log, Up};

/// Steady load on `service`'s health path through the switch at `front`.
pub(crate) fn load(
    front: &str,
    service: &str,
    rps: f64,
    seconds: u64,
) -> tokio::task::JoinHandle<LoadResult> {
    let opts = LoadOptions::constant(
        format!("http://{front}/s/{service}/health"),
        rps,
        Duration::from_secs(seconds),
    );
    tokio::spawn(async move { run_load(&opts).await })
}

/// The agent process of `machine` in the matrix at `data`.
fn agent_of<'a>(data: &'a Path, machine: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |c: &str| {
        c.contains("vmatrix agent")
            && c.contains(&format!("--name {machine} "))
            && c.contains(&data.display().to_string())
    }
}

/// Sends `signal` (`-STOP`, `-CONT`) to process `pid`.
pub(crate) fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill {signal} {pid}");
}

/// Whether process `pid` exists and runs (not stopped, not a zombie, not exiting: a stopped
/// process that gets SIGKILL runs again for the moment it takes to die, but its memory — and
/// with it its command line — is gone by then).
pub(crate) fn runs(pid: u32) -> bool {
    let exiting = std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty());
    !exiting && state_runs(pid)
}

fn state_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()?
                .split_whitespace()
                .next()
                .map(|c| !matches!(c, "T" | "Z" | "X"))
        })
        .unwrap_or(false)
}

pub(crate) fn stopped(pid: u32) -> bool {
    vmatrix_vmm::process::stopped(pid)
}

/// QEMU processes of `service`'s instances that are not stopped (running copies).
fn running_qemus(data: &Path, list: &[Value], service: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for i in list.iter().filter(|i| i["service"] == service) {
        let id = i["id"].as_str().unwrap_or_default();
        for (pid, _) in processes(is_qemu_of(data, id)) {
            if !stopped(pid) {
                out.push((id.to_owned(), pid));
            }
        }
    }
    out
}

fn row(fault: &str, lost: usize, duplicated: usize, r: &LoadResult, recovery: &str) {
    eprintln!(
        "reliability: | {fault} | {lost} | {duplicated} | {} of {} | {recovery} |",
        r.failed(),
        r.sent
    );
}

/// A matrix of two machines (`extra`: more flags for `up`) running one instance of `web`
/// (`min = max = 1`) that the switch routes to.
pub(crate) struct OneWeb {
    pub up: Up,
    pub front: String,
    /// The instance.
    pub id: String,
    /// Its machine.
    pub machine: String,
    /// Its QEMU's pid.
    pub qemu: u32,
}

pub(crate) async fn one_web(d: &Path, extra: &[&str]) -> OneWeb {
    let mut args = vec!["--machines", "2", "--policy", "min"];
    args.extend(extra);
    let (up, front) = start_matrix(d, &args).await;
    let services = d.join("web.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\nmin = 1\nmax = 1\n",
    )
    .unwrap();
    let list = apply_and_wait(d, &services, 1, Duration::from_secs(180)).await;
    if tokio::time::timeout(Duration::from_secs(55), wait_routed(&front, "web"))
        .await
        .is_err()
    {
        panic!("the switch does not route web\n{}", up_log(d));
    }
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let machine = list[0]["machine"].as_str().unwrap().to_owned();
    let (qemu, _) = processes(is_qemu_of(d, &id)).pop().expect("its QEMU");
    OneWeb {
        up,
        front,
        id,
        machine,
        qemu,
    }
}

/// After a machine fell silent at `since`: how long until its copy of `w`'s instance was
/// stopped (fenced), a replacement was placed, and the replacement ran. Watched every 100 ms,
/// asserting that two copies never run at once and that no replacement is placed while the
/// old copy runs.
async fn fenced_then_replaced(d: &Path, w: &OneWeb, since: Instant) -> [Duration; 3] {
    let (mut fenced, mut placed) = (None, None);
    loop {
        let l = ps(d).await;
        assert!(
            running_qemus(d, &l, "web").len() <= 1,
            "two copies ran: {l:?}"
        );
        if fenced.is_none() && stopped(w.qemu) {
            fenced = Some(since.elapsed());
        }
        let replacement = l
            .iter()
            .find(|i| i["service"] == "web" && i["id"] != w.id.as_str());
        if let Some(r) = replacement {
            if placed.is_none() {
                assert!(stopped(w.qemu), "replaced while the old copy ran");
                placed = Some(since.elapsed());
            }
            if r["state"] == "running" {
                let fenced = fenced.expect("replaced, never fenced");
                return [fenced, placed.unwrap_or(fenced), since.elapsed()];
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "not replaced and running within 120 s: {l:?}\n{}",
            up_log(d)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the fenced copy of `w`'s instance is gone (60 s at most), asserting that it
/// never runs again; `log` says what happened if it stays. Returns how long it took.
async fn fenced_copy_removed(d: &Path, w: &OneWeb, log: impl Fn() -> String) -> Duration {
    let t = Instant::now();
    while !processes(is_qemu_of(d, &w.id)).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the fenced copy {} stayed\n{}",
            w.id,
            log()
        );
        assert!(!runs(w.qemu), "the fenced copy ran again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.elapsed()
}

/// The end of a fault: one copy of web runs; the row for docs/reliability.md.
pub(crate) async fn one_runs_and_row(d: &Path, fault: &str, r: &LoadResult, recovery: String) {
    let l = ps(d).await;
    assert_eq!(running_qemus(d, &l, "web").len(), 1, "{l:?}");
    assert_eq!(
        l.iter()
            .filter(|i| i["service"] == "web" && i["state"] == "running")
            .count(),
        1,
        "{l:?}"
    );
    row(fault, 0, 0, r, &recovery);
}

fn timeline([fenced, placed, serving]: [Duration; 3], after: &str) -> String {
    format!(
        "fenced {:.1} s, replaced {:.1} s, serving {:.1} s after {after}",
        fenced.as_secs_f64(),
        placed.as_secs_f64(),
        serving.as_secs_f64()
    )
}

/// An agent frozen with SIGSTOP: its machine's watchdog stops the instance's QEMU when the
/// lease lapses, and only then does the controller start a replacement elsewhere; at no moment
/// do two copies run. Thawed, the agent finds its copy discarded.
#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn a_frozen_agent_is_fenced_before_its_instance_is_replaced() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let w = one_web(d, &[]).await;
    let (agent, _) = processes(agent_of(d, &w.machine)).pop().expect("its agent");
    let traffic = load(&w.front, "web", 20.0, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(agent, "-STOP");
    let times = fenced_then_replaced(d, &w, Instant::now()).await;
    // Thawed: the old copy goes (the controller discards it) and does not run again.
    signal(agent, "-CONT");
    fenced_copy_removed(d, &w, || up_log(d)).await;
    let r = traffic.await.unwrap();
    let recovery = timeline(times, "the freeze");
    one_runs_and_row(
        d,
        "SIGSTOP of an agent (its instance's only machine)",
        &r,
        recovery,
    )
    .await;
    let (_, events, _) = cli(d, &["events"]).await;
    assert!(events.contains(&w.id), "{events}");
}

/// A QEMU killed with SIGKILL under load: the agent sees it gone, the controller replaces the
/// instance, the switch serves from the new one.
#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn a_qemu_killed_under_load_is_replaced() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let w = one_web(d, &[]).await;
    let traffic = load(&w.front, "web", 20.0, 30);
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill9("web's QEMU", is_qemu_of(d, &w.id));
    let killed = Instant::now();
    let serving = loop {
        let l = ps(d).await;
        let replaced = l
            .iter()
            .any(|i| i["service"] == "web" && i["id"] != w.id.as_str() && i["state"] == "running");
        if replaced && !l.iter().any(|i| i["id"] == w.id.as_str()) {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "not replaced: {l:?}\n{}",
            up_log(d)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let r = traffic.await.unwrap();
    let recovery = format!(
        "serving again {:.1} s after the kill",
        serving.as_secs_f64()
    );
    one_runs_and_row(
        d,
        "kill -9 of a QEMU (its service's only instance)",
        &r,
        recovery,
    )
    .await;
}

/// An agent killed with SIGKILL under load. Started again within its lease, it adopts the
/// instance, which never stopped serving. Killed again and left dead past its lease, the
/// machine's watchdog stops the instance before the controller replaces it; the agent started
/// after that removes the fenced copy instead of adopting it.
#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn a_killed_agent_loses_nothing_and_a_dead_one_is_fenced() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    // The test starts the agent again itself, when it chooses.
    let w = one_web(d, &["--no-restart"]).await;
    let (_, cmdline) = processes(agent_of(d, &w.machine)).pop().expect("its agent");

    // 1. Killed, and started again 3 s later: nothing stops serving.
    let traffic = load(&w.front, "web", 20.0, 20);
    tokio::time::sleep(Duration::from_secs(2)).await;
    kill9("the agent", agent_of(d, &w.machine));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = d.join("agent-again.log");
    let mut agent = crate::support::start_agent_again(&cmdline, w.qemu, &again);
    let r = traffic.await.unwrap();
    let l = ps(d).await;
    assert!(
        l.iter()
            .any(|i| i["id"] == w.id.as_str() && i["state"] == "running"),
        "{l:?}"
    );
    assert!(
        !stopped(w.qemu),
        "fenced although the agent came back within its lease"
    );
    assert_eq!(running_qemus(d, &l, "web"), vec![(w.id.clone(), w.qemu)]);
    assert_eq!(r.failed(), 0, "{:?}", r.errors);
    row(
        "kill -9 of an agent, started again after 3 s",
        0,
        0,
        &r,
        "nothing to recover: adopted, served throughout",
    );

    // 2. Killed and left dead: fenced at its lease, then replaced on the other machine.
    crate::cluster::wait_for(
        "the agent to adopt its VM",
        Duration::from_secs(60),
        async || {
            std::fs::read_to_string(&again)
                .ok()?
                .contains("adopted a VM")
                .then_some(())
        },
    )
    .await;
    let traffic = load(&w.front, "web", 20.0, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    let times = fenced_then_replaced(d, &w, Instant::now()).await;
    // Started again: the fenced copy is removed, never resumed.
    let again2 = d.join("agent-again2.log");
    let _agent = crate::support::start_agent_again(&cmdline, w.qemu, &again2);
    let removed = fenced_copy_removed(d, &w, || {
        std::fs::read_to_string(&again2).unwrap_or_default()
    })
    .await;
    let r = traffic.await.unwrap();
    let recovery = format!(
        "{}; the fenced copy removed {:.1} s after the agent came back",
        timeline(times, "the kill"),
        removed.as_secs_f64()
    );
    let fault = "kill -9 of an agent, not started again within its lease";
    one_runs_and_row(d, fault, &r, recovery).await;
}

/// Sets the host end of machine `machine`'s (rmN) link to the underlay up or down.
fn link(port: u16, machine: &str, up: bool) {
    let i: usize = machine
        .trim_start_matches("rm")
        .parse::<usize>()
        .expect("a machine rmN")
        - 1;
    let dev = format!("vmxr{port}n{i}");
    let ok = std::process::Command::new("ip")
        .args(["link", "set", &dev, if up { "up" } else { "down" }])
        .status()
        .expect("run ip");
    assert!(ok.success(), "ip link set {dev}");
}

/// A machine cut off (its link to the underlay down): nothing reaches it and it reaches
/// nothing, the controller included. Its watchdog stops the instance when the lease lapses,
/// the controller replaces it elsewhere; brought back, the machine's old copy is discarded.
#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn a_machine_cut_off_is_fenced_and_its_copy_discarded_when_it_returns() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let w = one_web(d, &["--network", "bridge"]).await;
    let traffic = load(&w.front, "web", 20.0, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    link(w.up.port(), &w.machine, false);
    let times = fenced_then_replaced(d, &w, Instant::now()).await;
    // Back: the machine is heard again; its copy is not placed there any more, so it is
    // discarded, never continued.
    link(w.up.port(), &w.machine, true);
    let removed = fenced_copy_removed(d, &w, || up_log(d)).await;
    let r = traffic.await.unwrap();
    let recovery = format!(
        "{}; the old copy discarded {:.1} s after the link came back",
        timeline(times, "the cut"),
        removed.as_secs_f64()
    );
    let fault = "a machine cut off (link down), brought back after the replacement ran";
    one_runs_and_row(d, fault, &r, recovery).await;
}

/// `vmatrix up` starts again each child that dies, under load: an agent (inside its machine's
/// network namespace, which `up` holds open: the agent takes back the instance, whose QEMU
/// never stopped), then the switch, then the controller. Nothing is lost or duplicated; the
/// requests that fail are the ones in flight through the killed switch.
#[tokio::test]
#[ignore = "boots real QEMU on bridges in network namespaces (root); run by scripts/test"]
async fn up_starts_again_a_child_that_dies() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let w = one_web(d, &[]).await;
    let ds = d.display().to_string();
    let switch_of = |c: &str| c.contains("vmatrix switch") && c.contains(&ds);
    let controller_of = |c: &str| c.contains("vmatrix controller") && c.contains(&ds);
    let adopted = || up_full_log(d).matches("adopted a VM").count();
    let traffic = load(&w.front, "web", 20.0, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut figures = Vec::new();
    let children: [(&str, &Matches); 3] = [
        ("its agent", &agent_of(d, &w.machine)),
        ("the switch", &switch_of),
        ("the controller", &controller_of),
    ];
    for (what, pred) in children {
        let (old, _) = processes(pred).pop().unwrap_or_else(|| panic!("{what}"));
        let adopted_before = adopted();
        let killed = Instant::now();
        kill9(what, pred);
        let new = crate::cluster::wait_for(
            &format!("up to start {what} again"),
            Duration::from_secs(30),
            async || {
                processes(pred)
                    .into_iter()
                    .map(|(p, _)| p)
                    .find(|p| *p != old && runs(*p))
            },
        )
        .await;
        let started = killed.elapsed();
        // Back at work: the agent has taken its VM back, the switch routes, the controller
        // answers and sees the instance running.
        crate::cluster::wait_for(
            &format!("{what} (pid {new}) back at work"),
            Duration::from_secs(60),
            async || match what {
                "its agent" => (adopted() > adopted_before).then_some(()),
                "the switch" => {
                    let r = reqwest::get(format!("http://{}/s/web/health", w.front)).await;
                    r.ok()?.status().is_success().then_some(())
                }
                _ => {
                    let (ok, out, _) = cli(d, &["ps", "--json"]).await;
                    (ok && out.contains("\"running\"")).then_some(())
                }
            },
        )
        .await;
        figures.push(format!(
            "{what} started again {:.1} s after, at work {:.1} s after",
            started.as_secs_f64(),
            killed.elapsed().as_secs_f64()
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let r = traffic.await.unwrap();
    // The same QEMU served throughout: neither fenced nor replaced.
    assert!(runs(w.qemu), "the instance's QEMU {} ended", w.qemu);
    let l = ps(d).await;
    assert_eq!(running_qemus(d, &l, "web"), vec![(w.id.clone(), w.qemu)]);
    assert_eq!(
        up_full_log(d).matches("starting it again").count(),
        3,
        "{}",
        up_log(d)
    );
    one_runs_and_row(
        d,
        "kill -9 of an agent, then the switch, then the controller (`up` starts each again)",
        &r,
        format!("{}; the same QEMU served throughout", figures.join("; ")),
    )
    .await;
}

/// Which processes (by command line) are one child of `up`.
type Matches<'a> = dyn Fn(&str) -> bool + 'a;

/// Everything `up` logged in this test.
fn up_full_log(d: &Path) -> String {
    std::fs::read_to_string(d.join("up.log")).unwrap_or_default()
}
