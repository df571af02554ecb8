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
