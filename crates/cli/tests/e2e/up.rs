//! `vmatrix up` boots a real guest and stops it cleanly on Ctrl-C; bad input gets a clear error.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{data_dir, vmatrix};

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn up_stops_every_process_it_started_on_ctrl_c() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let port = crate::support::free_port();
    let mut child = vmatrix()
        .arg("--data")
        .arg(data.path())
        .args([
            "up",
            "--machines",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--switch-listen",
            &format!("127.0.0.1:{}", crate::support::free_port()),
        ])
        .args(crate::support::net_args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vmatrix up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("vmatrix up printed nothing within 120s")
            .expect("read stdout")
            .expect("vmatrix up exited before it was up");
        if line.contains("vMatrix is up") {
            break;
        }
    }
    let elsewhere = data_dir();
    let services = elsewhere.path().join("one.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\n",
    )
    .unwrap();
    let out = vmatrix()
        .arg("--data")
        .arg(data.path())
        .args(["apply", "-f"])
        .arg(&services)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let marker = data.path().display().to_string();
    while processes_mentioning(&marker)
        .iter()
        .filter(|c| c.contains("qemu-system"))
        .count()
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "no QEMU started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        processes_mentioning(&marker).len() >= 3,
        "controller, agent and QEMU run"
    );
    // State, tokens, logs, the repository and the VM's files: its owner's alone.
    crate::support::assert_private(data.path());
    // QEMU runs in a control group of its own, limited to its spec (1 vCPU, 256 MiB): CPU to
    // its vCPUs plus one, memory to its RAM plus a quarter and 384 MiB.
    let qemu = crate::support::processes(|c| c.contains(&marker) && c.contains("qemu-system"));
    // Under TCG its translation cache is capped, so that it fits the memory limit below.
    if qemu[0].1.contains("-accel tcg") {
        assert!(
            qemu[0].1.contains("-accel tcg,tb-size=256"),
            "{}",
            qemu[0].1
        );
    }
    let groups = cgroups_of(qemu[0].0);
    assert!(
        !groups.is_empty(),
        "QEMU {} is in no vmatrix group",
        qemu[0].0
    );
    for (controller, dir) in &groups {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        match controller.as_str() {
            "cpu" => {
                assert_eq!(read("cpu.cfs_quota_us").trim(), "200000", "{dir:?}");
                // A serving guest weighs one thread at nice 0 per vCPU.
                assert_eq!(read("cpu.shares").trim(), "1024", "{dir:?}");
            }
            "memory" => assert_eq!(
                read("memory.limit_in_bytes").trim(),
                ((256 + 64 + 384) << 20).to_string(),
                "{dir:?}"
            ),
            _ => {
                assert_eq!(read("cpu.max").trim(), "200000 100000", "{dir:?}");
                assert_eq!(read("cpu.weight").trim(), "100", "{dir:?}");
                assert_eq!(
                    read("memory.max").trim(),
                    ((256 + 64 + 384) << 20).to_string()
                );
            }
        }
    }

    // Ctrl-C, as a terminal would send it.
    stop_up(&mut child, "-INT", 30).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?}",
            processes_mentioning(&marker)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nor any interface of its network (bridged, as root: named after the API port).
    let left = links_of(port);
    assert!(left.is_empty(), "interfaces left behind: {left:?}");
    // Nor its machine's control groups (`vmatrix/MACHINE.VM`; `vmatrix` itself may hold
    // another test's).
    for (_, dir) in &groups {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let machine = format!("{}.", name.split('.').next().unwrap());
        let left: Vec<String> = std::fs::read_dir(dir.parent().unwrap())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&machine))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "control groups left behind: {left:?}");
    }
}

/// The vmatrix control groups process `pid` is in: (controller, directory) for each v1
/// hierarchy (`cpu`, `memory`), or ("", directory) on cgroup v2.
fn cgroups_of(pid: u32) -> Vec<(String, PathBuf)> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    own.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            if !path.contains("/vmatrix/") {
                return None;
            }
            let rel = path.trim_start_matches('/');
            let controller = names
                .split(',')
                .find(|n| *n == "cpu" || *n == "memory")
                .unwrap_or("");
            if names.is_empty() {
                Some((String::new(), PathBuf::from("/sys/fs/cgroup").join(rel)))
            } else if controller.is_empty() {
                None
            } else {
                Some((
                    controller.to_owned(),
                    PathBuf::from("/sys/fs/cgroup").join(controller).join(rel),
                ))
            }
        })
        .collect()
}

/// Command lines of live processes that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    crate::support::processes(|c| c.contains(needle))
        .into_iter()
        .map(|(_, c)| c)
        .collect()
}

#[tokio::test]
async fn guest_build_is_cached_and_bad_sizes_are_explained() {
    let _host = crate::support::share_host().await;
    let dir = data_dir();
    let out: PathBuf = dir.path().join("g.img");
    let bad = vmatrix()
        .args(["guest", "build", "--size", "12Q", "--out"])
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("use K, M, G or T"), "{err}");
    let small = vmatrix()
        .args(["guest", "build", "--size", "1M", "--out"])
        .arg(&out)
        .output()
        .await
        .unwrap();
    assert!(!small.status.success());
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(err.contains("too small"), "{err}");
    assert!(!out.exists(), "a refused build left a file behind");
}

#[tokio::test]
async fn an_unknown_accelerator_is_refused_with_the_choices() {
    let _host = crate::support::share_host().await;
    let out = vmatrix()
        .args(["--accel", "xen", "up"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto, kvm or tcg"), "{err}");
}

/// A second agent with a running machine's name is refused, whether it shares the first one's
/// data directory (its lock) or not (the controller: the name has joined already), and the
/// first one's machine goes on reporting.
#[tokio::test]
#[ignore = "starts vmatrix up (root: network namespaces); run by scripts/test"]
async fn a_second_agent_with_a_machines_name_is_refused() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let (mut up, _front) = crate::support::start_matrix(d, &["--machines", "1"]).await;
    let api = std::fs::read_to_string(d.join("controller/api")).unwrap();
    let at = api.trim().to_owned();
    let series = "vmatrix_heartbeats_total{machine=\"rm1\"}";
    let other = data_dir();
    let join_token = std::fs::read_to_string(d.join("controller/join-token")).unwrap();
    for (dir, why) in [
        (
            d,
            "another agent runs as machine rm1 with this data directory",
        ),
        (other.path(), "has joined already"),
    ] {
        let listen = format!("127.0.0.1:{}", crate::support::free_port());
        let out = vmatrix()
            .arg("--data")
            .arg(dir)
            .args([
                "agent", "--name", "rm1", "--accel", "tcg", "--listen", &listen,
            ])
            .args(["--controller", api.trim(), "--repo"])
            .arg(d.join("repo"))
            .arg("--ca")
            .arg(d.join("controller/tls/ca-cert.pem"))
            .env("VMATRIX_JOIN_TOKEN", join_token.trim())
            .stdin(Stdio::null())
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), out)
            .await
            .expect("the second agent ends by itself")
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{said}");
        assert!(said.contains(why), "{said}");
    }
    // The live agent was not disturbed: its heartbeats go on being taken in.
    let before = crate::cluster::metric(d, &at, series)
        .await
        .expect("rm1's heartbeats");
    crate::cluster::wait_for(
        "rm1's heartbeats to go on",
        Duration::from_secs(15),
        async || {
            let now = crate::cluster::metric(d, &at, series).await?;
            (now >= before + 3.0).then_some(())
        },
    )
    .await;
    up.interrupt().await;
}

/// SIGTERM while `up` is still starting (its bridge made, its machines not yet joined) stops
/// it as cleanly as once it is up: no process, interface or namespace of it stays behind. (A
/// signal that came before `up` listened for it killed it half-started, and its bridge stayed.)
#[tokio::test]
#[ignore = "needs root (bridged networking); run by scripts/test"]
async fn up_stopped_while_it_starts_leaves_nothing_behind() {
    let _host = crate::support::share_host().await;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: no bridge to watch for");
        return;
    }
    let data = data_dir();
    let port = crate::support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = vmatrix()
        .arg("--data")
        .arg(data.path())
        .args([
            "up",
            "--machines",
            "2",
            "--network",
            "bridge",
            "--listen",
            &listen,
            "--switch-listen",
            &format!("127.0.0.1:{}", crate::support::free_port()),
        ])
        .args(crate::support::net_args(&["--listen", &listen]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vmatrix up");
    let ours = || links_of(port);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while ours().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "up made no bridge within 120 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "up ended before it made its bridge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_up(&mut child, "-TERM", 60).await;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        assert!(
            !line.contains("vMatrix is up"),
            "stopped too late to test a stop while starting: {line}"
        );
    }
    let marker = data.path().display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !processes_mentioning(&marker).is_empty() || !ours().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?} {:?}",
            processes_mentioning(&marker),
            ours()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The network interfaces of the `up` whose API listens on `port` (named after it).
fn links_of(port: u16) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vmx") && n.contains(&port.to_string()))
        .collect()
}

/// Sends `signal` (as `kill` spells it) to `up` and waits `secs` at most for it to end well.
async fn stop_up(child: &mut tokio::process::Child, signal: &str, secs: u64) {
    let pid = child.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success());
    let exit = tokio::time::timeout(Duration::from_secs(secs), child.wait())
        .await
        .unwrap_or_else(|_| panic!("vmatrix up did not stop within {secs} s of kill {signal}"))
        .expect("wait");
    assert!(exit.success(), "vmatrix up exited with {exit}");
}
