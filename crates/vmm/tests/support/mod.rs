//! Shared helpers for the real-QEMU tests: the reference guest (built once, cached), the
//! accelerator, free loopback ports and polling with deadlines.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use vmatrix_core::InstanceId;
use vmatrix_vmm::http::{self, HttpResponse};
use vmatrix_vmm::{AccelChoice, Accelerator, ProbeBoot, VmSpec};

/// The reference guest, built once per test binary (cached across runs by its build key).
pub fn guest() -> &'static vmatrix_guest::GuestImage {
    static GUEST: OnceLock<vmatrix_guest::GuestImage> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest/reference.img");
        let image = vmatrix_guest::build(&vmatrix_guest::BuildOptions::new(out))
            .expect("build the reference guest (scripts/install-deps.sh installs its tools)");
        eprintln!(
            "reference guest: {} ({}, {:.2}s)",
            image.disk.display(),
            if image.built { "built" } else { "cached" },
            image.elapsed.as_secs_f64()
        );
        image
    })
}

/// The accelerator the driver picks on this machine (VMATRIX_ACCEL forces one).
pub async fn accel() -> Accelerator {
    let g = guest();
    let choice = AccelChoice::from_env().expect("VMATRIX_ACCEL is auto, kvm or tcg");
    vmatrix_vmm::accel::resolve(
        choice,
        Some(&ProbeBoot {
            kernel: g.kernel.clone(),
            initrd: g.initrd.clone(),
        }),
    )
    .await
}

/// A free port on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr")
}

/// A spec for the reference guest forwarded to a fresh loopback port.
pub async fn spec(instance: &str) -> VmSpec {
    VmSpec::new(
        InstanceId::new(instance).expect("valid id"),
        &guest().disk,
        free_addr(),
        accel().await,
    )
}

/// A scratch directory with a short path (unix socket paths are limited to 107 bytes).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmx-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

pub async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http::request(addr, "GET", path, &[], Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn put(addr: SocketAddr, path: &str, body: &[u8]) -> HttpResponse {
    http::request(addr, "PUT", path, body, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            state != Some("Z")
        }
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
