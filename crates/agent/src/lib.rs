//! The agent: one per real machine. It runs server VMs through the vmm crate, allocates their
//! ports and directories, exports their images lazily from the repository, reports capacity and
//! per-instance state to the controller, and obeys the controller's commands.
//!
//! Every command carries the instance's generation; the agent refuses one older than the newest
//! it has seen for that instance (fencing), so a controller that lost track cannot act on stale
//! beliefs. The agent must never decide on its own to start, move or stop an instance — except
//! to stop what the controller no longer wants — and never talk to anything but the controller,
//! the repository and its own QEMU processes.

mod http;
mod machine;

pub use http::serve;
pub use machine::{Agent, AgentConfig, AgentError};
