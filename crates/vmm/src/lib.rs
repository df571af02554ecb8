//! The hypervisor driver: one QEMU process per server VM, driven over QMP. It boots a VM from a
//! base image through a per-instance qcow2 overlay, pauses and continues it, stops it, suspends
//! it to a state file and resumes it elsewhere, live-migrates RAM and disk to another QEMU, and
//! shares its serial console.
//!
//! Guarantees: the base image is never written; a QEMU process never outlives its owner (see
//! [`process`]); every failure names the instance and the step. This crate must never decide
//! *where* or *when* a VM runs — that is the controller's and the policy's — and never talk to
//! anything but QEMU and the guest's health endpoint.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod accel;
pub mod args;
pub mod cgroup;
pub mod confine;
pub mod console;
pub mod error;
pub mod http;
pub mod migration;
pub mod process;
pub mod qga;
pub mod qmp;
mod snapshot;
pub use snapshot::OverlayCopy;
pub mod vm;
pub mod volume;

pub use accel::{AccelChoice, Accelerator, ProbeBoot};
pub use console::{Attached, Console, ConsoleError, Input};
pub use error::{Result, VmmError};
pub use migration::{IncomingVm, MigrationFailure, MigrationReport, MigrationTarget, MigrationTls};
pub use process::Lifetime;
pub use vm::{
    mac_for, BaseImage, ImageFormat, StopOutcome, SuspendedVm, TapSpec, Vm, VmDir, VmSpec,
};
pub use volume::VolumeDisk;
