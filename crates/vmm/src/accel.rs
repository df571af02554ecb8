//! Choosing the accelerator: KVM only where a guest really runs on it, TCG otherwise.
//!
//! `/dev/kvm` existing proves little: under nested virtualisation it can open fine while guests
//! hang early in boot. So `auto` boots the guest's own kernel and initramfs under KVM with a
//! short deadline and looks for the marker its init prints on reaching user space; only then is
//! KVM chosen. The answer is computed once per process.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::error::{Result, VmmError};
use crate::process::QemuProcess;

/// A resolved accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accelerator {
    /// The accelerator's name for QEMU.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// What the operator asked for (`VMATRIX_ACCEL=auto|kvm|tcg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// Probe: KVM if a guest really boots on it, else TCG.
    #[default]
    Auto,
    /// Force KVM.
    Kvm,
    /// Force TCG.
    Tcg,
}

impl AccelChoice {
    /// Reads `VMATRIX_ACCEL`; unset means `auto`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("VMATRIX_ACCEL") {
            Err(_) => Ok(Self::Auto),
            Ok(v) => v.parse(),
        }
    }
}

impl std::str::FromStr for AccelChoice {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(VmmError::Invalid(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg (VMATRIX_ACCEL or --accel)"
            ))),
        }
    }
}

/// A kernel and initramfs whose init prints [`PROBE_MARKER`] when booted with
/// `vmatrix.probe=1` (the reference guest's do).
#[derive(Debug, Clone)]
pub struct ProbeBoot {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
}

/// What the probe guest prints when it reaches user space.
pub const PROBE_MARKER: &str = "VMATRIX-PROBE-OK";
/// How long a KVM guest may take to reach user space before we call KVM unusable; a working
/// KVM boots the reference kernel in about a second.
const PROBE_DEADLINE: Duration = Duration::from_secs(8);

static AUTO: OnceCell<Accelerator> = OnceCell::const_new();

/// Resolves `choice` to an accelerator; `auto` probes once per process.
pub async fn resolve(choice: AccelChoice, probe: Option<&ProbeBoot>) -> Accelerator {
    match choice {
        AccelChoice::Kvm => Accelerator::Kvm,
        AccelChoice::Tcg => Accelerator::Tcg,
        AccelChoice::Auto => *AUTO.get_or_init(|| auto_detect(probe.cloned())).await,
    }
}

async fn auto_detect(probe: Option<ProbeBoot>) -> Accelerator {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        tracing::info!("accelerator: tcg (no usable /dev/kvm)");
        return Accelerator::Tcg;
    }
    let Some(probe) = probe else {
        tracing::info!("accelerator: tcg (/dev/kvm present but no probe guest to verify it)");
        return Accelerator::Tcg;
    };
    match probe_kvm(&probe).await {
        Ok(ProbeOutcome::Booted) => {
            tracing::info!("accelerator: kvm (a probe guest reached user space)");
            Accelerator::Kvm
        }
        Ok(ProbeOutcome::TimedOut) => {
            tracing::info!(
                "accelerator: tcg (/dev/kvm opens, but a probe guest did not boot on it within {PROBE_DEADLINE:?})"
            );
            Accelerator::Tcg
        }
        Ok(ProbeOutcome::Exited(why)) => {
            tracing::info!(
                "accelerator: tcg (QEMU under KVM exited before the guest booted: {why})"
            );
            Accelerator::Tcg
        }
        Err(e) => {
            tracing::info!("accelerator: tcg (KVM probe failed: {e})");
            Accelerator::Tcg
        }
    }
}

enum ProbeOutcome {
    Booted,
    TimedOut,
    Exited(String),
}

async fn probe_kvm(probe: &ProbeBoot) -> Result<ProbeOutcome> {
    let dir = std::env::temp_dir().join(format!("vmatrix-kvm-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(crate::error::io_err("create", &dir))?;
    let serial = dir.join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        "pc,accel=kvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-serial",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("file:{}", serial.display()),
        "-kernel".into(),
        probe.kernel.display().to_string(),
        "-initrd".into(),
        probe.initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 quiet vmatrix.probe=1".into(),
    ])
    .collect();
    let mut qemu = QemuProcess::spawn(
        "qemu-system-x86_64",
        &args,
        &dir.join("qemu.log"),
        crate::process::Lifetime::Owner,
    )?;
    let deadline = Instant::now() + PROBE_DEADLINE;
    let mut outcome = ProbeOutcome::TimedOut;
    while Instant::now() < deadline {
        if std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(PROBE_MARKER)) {
            outcome = ProbeOutcome::Booted;
            break;
        }
        if let Some(status) = qemu.exit_status() {
            let said = crate::process::tail(qemu.log(), 1);
            outcome = ProbeOutcome::Exited(format!("{status}: {}", said.trim()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    qemu.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices() {
        assert_eq!("TCG".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert_eq!("".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        let err = "xen".parse::<AccelChoice>().unwrap_err().to_string();
        assert!(err.contains("auto, kvm or tcg"), "{err}");
    }

    #[tokio::test]
    async fn forced_choices_skip_the_probe() {
        assert_eq!(resolve(AccelChoice::Tcg, None).await, Accelerator::Tcg);
        assert_eq!(resolve(AccelChoice::Kvm, None).await, Accelerator::Kvm);
    }
}
