//! The agent: one per real machine. It runs server VMs through the vmm crate, allocates their
//! ports and directories, exports their images lazily from the repository, reports capacity and
//! per-instance state to the controller, and obeys the controller's commands.
//!
//! Every command carries the instance's generation; the agent refuses one older than the newest
//! it has seen for that instance (fencing), so a controller that lost track cannot act on stale
//! beliefs. The agent must never decide on its own to start, move or stop an instance — except
//! to stop what the controller no longer wants — and never talk to anything but the controller,
//! the repository and its own QEMU processes.
//!
//! A restart of the agent is not a restart of its VMs: QEMU outlives it, and the next agent
//! process adopts what the previous one left ([`record`]).

mod certificate;
mod commands;
mod commit;
mod console;
mod exports;
pub mod fake;
mod health;
mod http;
pub mod hypervisor;
mod identity;
pub mod lease;
mod machine;
mod metrics;
pub mod record;
mod seed;
mod volumes;

pub use http::{serve, ControllerLink};
pub use hypervisor::{Hypervisor, Qemu};
pub use machine::{work_limit, Agent, AgentConfig, AgentError, CommandFailure, FailureKind};
pub use record::{adopt_left, sweep};
