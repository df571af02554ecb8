//! `vmatrix up` boots a real guest and stops it cleanly on Ctrl-C; bad input gets a clear error.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{data_dir, vmatrix};

#[tokio::test]
#[ignore = "boots real QEMU; run by scripts/test"]
async fn up_serves_the_reference_guest_and_stops_on_ctrl_c() {
    let data = data_dir();
    let forward = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = vmatrix()
        .args(["up", "--forward", &forward.to_string(), "--data"])
        .arg(data.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start vmatrix up");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("vmatrix up printed nothing within 120s")
        .expect("read stdout")
        .expect("vmatrix up exited before serving");
    assert!(line.contains(&format!("http://{forward}/")), "{line}");

    let r = vmatrix_vmm::http::request(forward, "GET", "/", &[], Duration::from_secs(10))
        .await
        .expect("the guest answers through the forward");
    let info: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(info["instance"], "reference-1");

    let qmp_socket = data.path().join("vms/reference-1/qmp.sock");
    assert!(
        find_qemu_for(&qmp_socket).is_some(),
        "no QEMU process found for the VM"
    );

    // Ctrl-C, as a terminal would send it.
    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("vmatrix up did not stop within 30s of Ctrl-C")
        .expect("wait");
    assert!(exit.success(), "vmatrix up exited with {exit}");
    assert_eq!(
        find_qemu_for(&qmp_socket),
        None,
        "QEMU still runs after vmatrix up stopped"
    );
}

/// The pid of the QEMU whose command line names `qmp_socket`.
fn find_qemu_for(qmp_socket: &std::path::Path) -> Option<u32> {
    let needle = qmp_socket.display().to_string();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&needle)
            .then_some(pid)
    })
}

#[tokio::test]
async fn guest_build_is_cached_and_bad_sizes_are_explained() {
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
    let out = vmatrix()
        .args(["--accel", "xen", "up"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto, kvm or tcg"), "{err}");
}
