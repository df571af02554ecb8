//! The policy: from a snapshot of the cluster and the measured demand, the list of actions that
//! serves the demand with the fewest machines — **server switching** (size each service from its
//! demand, place instances best-fit, consolidate cool machines), **server drop** (when the pool
//! is short, the highest priorities win and the rest are suspended and refused fast), and
//! **recovery** (failed instances and the instances of dead machines are replaced). Warm
//! standbys (instances paused in memory) are sized from each service's spike history, and
//! [`react`] — the fast path, run on every demand report — unpauses them, pausing lower
//! priorities for CPU, without waiting for the next tick.
//!
//! One configuration ([`Settings`], seconds) serves every caller; [`Memory`] keeps the one
//! forecast and the spike history; [`place`] is the one placement.
//!
//! `decide` is a pure function: no I/O, no clock (time is in the snapshot), no randomness. The
//! controller and the simulator both call it; [`apply`] shows what a plan does to a snapshot.
//! Every action carries the reason that ends up in the event log. This crate must never depend
//! on an async runtime or on any other vMatrix crate.
#![forbid(unsafe_code)]

mod decide;
mod fast;
mod memory;
mod model;
mod settings;

pub use decide::{apply, decide, place, remove_indices};
pub use fast::react;
pub use memory::Memory;
pub use model::{
    Action, Config, Instance, InstanceState, Machine, Reason, Service, Sharing, Snapshot,
};
pub use settings::Settings;
