//! The policy: from a snapshot of the cluster and the measured demand, the list of actions that
//! serves the demand with the fewest machines — **server switching** (size each service from its
//! demand, place instances best-fit, consolidate cool machines), **server drop** (when the pool
//! is short, the highest priorities win and the rest are suspended and refused fast), and
//! **recovery** (failed instances and the instances of dead machines are replaced).
//!
//! `decide` is a pure function: no I/O, no clock (time is in the snapshot), no randomness. The
//! controller and the simulator both call it; [`apply`] shows what a plan does to a snapshot.
//! Every action carries the reason that ends up in the event log. This crate must never depend
//! on an async runtime or on any other vMatrix crate.
#![forbid(unsafe_code)]

mod decide;
mod model;

pub use decide::{apply, decide, remove_indices};
pub use model::{Action, Config, Instance, InstanceState, Machine, Service, Sharing, Snapshot};
