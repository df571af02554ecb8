//! Several hosts on one box: a test-made bridge and two network namespaces, one agent in each,
//! the controller outside; an instance migrates across the veth link.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::wait_for;
use crate::support::{data_dir, vmatrix};

/// The bridge and namespaces of one test, removed on drop (pass or fail).
struct Net {
    bridge: String,
    namespaces: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// A bridge at `10.77.N.1/24` and one namespace per host at `10.77.N.(i+2)`.
    fn new(n: u8, hosts: usize) -> Self {
        let tag = std::process::id() % 10_000;
        let bridge = format!("vmxbr{tag}");
        let net = Net {
            bridge: bridge.clone(),
            namespaces: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.77.{n}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let mut net = net;
        for h in 0..hosts {
            let ns = format!("vmx{tag}h{h}");
            let outer = format!("vmx{tag}v{h}");
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &outer, "master", &bridge, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.{n}.{}/24", h + 2),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// `vmatrix --data DATA --api API ARGS…`: the controller is not on loopback here.
async fn cli(data: &Path, api: &str, args: &[&str]) -> (bool, String, String) {
    crate::cluster::cli(data, &[&["--api", api], args].concat()).await
}

async fn ps(data: &Path, api: &str) -> Vec<Value> {
    let (ok, out, err) = cli(data, api, &["ps", "--json"]).await;
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out).unwrap()["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
#[ignore = "boots real QEMU in network namespaces (root); run by scripts/test"]
async fn an_instance_migrates_between_hosts_in_network_namespaces() {
    let _host = crate::support::share_host().await;
    let data = data_dir();
    let d = data.path();
    let n = (std::process::id() % 200) as u8 + 20;
    let net = Net::new(n, 2);
    let exe = env!("CARGO_BIN_EXE_vmatrix");

    // The repository with the reference guest, on the shared file system.
    let out = vmatrix()
        .arg("--data")
        .arg(d)
        .args(["guest", "build", "--out"])
        .arg(d.join("guest/reference.img"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vmatrix()
        .arg("--data")
        .arg(d)
        .args(["image", "import", "guest:v1"])
        .arg(d.join("guest/reference.img"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The agents are stopped with SIGTERM below (they stop their VMs then); if the test fails
    // first, they die with SIGKILL and this stops their VMs.
    let _sweep = crate::support::VmSweep(d);
    let api_addr = format!("10.77.{n}.1:7070");
    let api = format!("https://{api_addr}");
    let mut controller = vmatrix()
        .arg("--data")
        .arg(d)
        .args(["controller", "--listen", &api_addr, "--policy", "min"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the controller", Duration::from_secs(30), async || {
        cli(d, &api, &["machines"]).await.0.then_some(())
    })
    .await;
    let mut agents = Vec::new();
    for (h, ns) in net.namespaces.iter().enumerate() {
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns, exe, "--data"])
            .arg(d)
            .args([
                "agent",
                "--name",
                &format!("host{h}"),
                "--listen",
                &format!("10.77.{n}.{}:7071", h + 2),
                "--controller",
                &api,
            ])
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        agents.push(child);
    }
    // This controller wants each new machine approved: both wait until the operator says so.
    wait_for(
        "both agents waiting for approval",
        Duration::from_secs(60),
        async || {
            let (_, out, _) = cli(d, &api, &["machines", "--json"]).await;
            let v = serde_json::from_str::<Value>(&out).ok()?;
            (v["pending"].as_array()?.len() == 2).then_some(())
        },
    )
    .await;
    let (_, listed, _) = cli(d, &api, &["machines"]).await;
    assert!(listed.contains("waiting to join: host0"), "{listed}");
    for h in ["host0", "host1"] {
        let (ok, out, err) = cli(d, &api, &["machine", "approve", h]).await;
        assert!(ok && out.contains("approved"), "{out}{err}");
    }
    wait_for(
        "both agents registered",
        Duration::from_secs(60),
        async || {
            let (_, out, _) = cli(d, &api, &["machines", "--json"]).await;
            let v = serde_json::from_str::<Value>(&out).ok()?;
            let up = v["machines"]
                .as_array()?
                .iter()
                .filter(|m| m["state"] == "up")
                .count();
            (up == 2).then_some(())
        },
    )
    .await;

    let services = d.join("one.toml");
    std::fs::write(
        &services,
        "[[service]]\nname = \"web\"\nimage = \"guest:v1\"\n",
    )
    .unwrap();
    let (ok, _, err) = cli(d, &api, &["apply", "-f", services.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let inst = wait_for(
        "an instance running",
        Duration::from_secs(120),
        async || {
            ps(d, &api)
                .await
                .into_iter()
                .find(|i| i["state"] == "running")
        },
    )
    .await;
    let ep: std::net::SocketAddr = inst["endpoint"].as_str().unwrap().parse().unwrap();
    let put = vmatrix_vmm::http::request(
        ep,
        "PUT",
        "/disk/k",
        b"crossed the link",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert_eq!(put.status, 200);
    let from = inst["machine"].as_str().unwrap().to_owned();
    let to = if from == "host0" { "host1" } else { "host0" };
    let (ok, out, err) = cli(
        d,
        &api,
        &["migrate", inst["id"].as_str().unwrap(), "--to", to],
    )
    .await;
    assert!(ok, "migrate across namespaces: {err}");
    eprintln!("migrate {from} → {to} across the veth link: {}", out.trim());
    let moved = ps(d, &api)
        .await
        .into_iter()
        .find(|i| i["id"] == inst["id"])
        .unwrap();
    assert_eq!(moved["machine"], to);
    let ep: std::net::SocketAddr = moved["endpoint"].as_str().unwrap().parse().unwrap();
    assert!(
        ep.ip().to_string().starts_with(&format!("10.77.{n}.")),
        "{ep}"
    );
    let got = vmatrix_vmm::http::request(ep, "GET", "/disk/k", &[], Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(got.body, b"crossed the link");

    for mut a in agents {
        // SIGTERM: an agent that stops (`--on-exit stop`) stops its VMs.
        if let Some(pid) = a.id() {
            // SAFETY: plain kill(2) of our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let _ = a.wait().await;
    }
    let _ = controller.start_kill();
    let _ = controller.wait().await;
    drop(net);
}
