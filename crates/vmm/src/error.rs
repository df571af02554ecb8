//! What can go wrong while driving QEMU, named after the operation that failed.

use std::path::PathBuf;

use vmatrix_core::InstanceId;

/// Errors of the hypervisor driver. Each names the instance and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The QEMU binary or a QEMU tool could not be started.
    #[error("could not start {program}; is QEMU installed? (run scripts/install-deps.sh as root)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A QEMU tool (qemu-img) ran and failed.
    #[error("{program} {args} failed: {stderr}")]
    Tool {
        program: String,
        args: String,
        stderr: String,
    },
    /// A file or directory operation failed.
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The QMP socket could not be reached or broke.
    #[error("QMP connection to {socket} failed: {detail}")]
    QmpConnection { socket: PathBuf, detail: String },
    /// The guest agent did not carry out a command.
    #[error("guest agent of {instance}: {command} failed: {detail}")]
    GuestAgent {
        instance: String,
        command: String,
        detail: String,
    },
    /// QEMU answered a QMP command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        command: &'static str,
        class: String,
        desc: String,
    },
    /// QEMU's answer could not be understood.
    #[error("QMP reply to {command} not understood: {detail}")]
    QmpProtocol {
        command: &'static str,
        detail: String,
    },
    /// The QEMU process of an instance exited when it should be running.
    #[error("QEMU of instance {instance} exited ({status}); last serial output:\n{serial_tail}\nlast QEMU output:\n{qemu_tail}")]
    Exited {
        instance: InstanceId,
        status: String,
        serial_tail: String,
        qemu_tail: String,
    },
    /// A wait ran past its deadline.
    #[error("instance {instance}: {what} did not happen within {seconds:.1}s; last serial output:\n{serial_tail}")]
    Timeout {
        instance: InstanceId,
        what: &'static str,
        seconds: f64,
        serial_tail: String,
    },
    /// A migration or suspend failed inside QEMU.
    #[error("instance {instance}: {operation} failed in QEMU: {detail}")]
    Migration {
        instance: InstanceId,
        operation: &'static str,
        detail: String,
    },
    /// The request itself is wrong (a path too long for a unix socket, an unusable address).
    #[error("{0}")]
    Invalid(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> VmmError {
    let path = path.into();
    move |source| VmmError::Io {
        action,
        path,
        source,
    }
}
