//! Local scratch files for import and export: temporary paths that are removed when dropped,
//! and format conversion with `qemu-img convert`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{io_err, Result, StoreError};

/// A temporary file path that is removed on drop.
pub(crate) struct TempPath(pub(crate) PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

pub(crate) fn tempfile_in(dir: &Path, what: &str) -> Result<TempPath> {
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let seq = crate::backend::TMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nonce =
        blake3::hash(format!("{:?}{}-{seq}", SystemTime::now(), std::process::id()).as_bytes())
            .to_hex();
    Ok(TempPath(
        dir.join(format!(".vmatrix-{what}-{}", &nonce[..12])),
    ))
}

pub(crate) fn convert(src: &Path, dst: &Path, to: &str) -> Result<()> {
    run_qemu_img(&["convert", "-O", to], src, dst)
}

pub(crate) fn convert_to(src: &Path, from: &str, dst: &Path, to: &str) -> Result<()> {
    run_qemu_img(&["convert", "-f", from, "-O", to], src, dst)
}

fn run_qemu_img(args: &[&str], src: &Path, dst: &Path) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .arg(src)
        .arg(dst)
        .output()
        .map_err(io_err("run qemu-img on", src))?;
    if !out.status.success() {
        return Err(StoreError::Tool {
            tool: "qemu-img",
            path: src.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
