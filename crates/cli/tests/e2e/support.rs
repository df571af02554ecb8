//! Helpers shared by the end-to-end tests.

use std::path::Path;

use tokio::process::Command;

/// The `vmatrix` binary under test, killed if the test drops it.
pub fn vmatrix() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmatrix"));
    cmd.kill_on_drop(true);
    cmd.env_remove("RUST_BACKTRACE");
    cmd
}

/// A scratch directory with a short path (unix sockets are limited to 107 bytes).
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmx-e2e-")
        .tempdir_in("/tmp")
        .expect("temp dir")
}

/// Every file under `dir` with its size and modification time, to prove nothing changed.
pub fn snapshot(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let m = e.metadata().expect("metadata");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((
                    e.path().display().to_string(),
                    m.len(),
                    m.modified().expect("mtime"),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Starts `vmatrix --data DIR up ARGS…` and waits (up to 120 s) until it says it is up.
pub async fn start_up(data: &Path, args: &[&str]) -> tokio::process::Child {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut up = vmatrix()
        .arg("--data")
        .arg(data)
        .arg("up")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start vmatrix up");
    let mut lines = BufReader::new(up.stdout.take().expect("piped stdout")).lines();
    loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(120), lines.next_line())
            .await
            .expect("vmatrix up did not come up within 120 s")
            .expect("read stdout")
            .expect("vmatrix up exited before it was up");
        if line.contains("vMatrix is up") {
            return up;
        }
    }
}
