//! The switch: the fixed front door of every service. It sends each request to wherever the
//! service's instances run now (route table watched from the controller), retries an idempotent
//! request that failed before any response byte on another or the new instance (so a migration
//! costs no errors), holds requests while a dormant service wakes, refuses a dropped service's
//! requests at once with 503, and measures per-service load for the policy.
//!
//! The switch must never decide where instances run; it only follows the controller's routes
//! and asks it to wake a service. Nor may any client take more of it than its limits allow
//! ([`Limits`]: connections, header time, request bodies in memory, time to answer).

mod body;
mod connect;
mod follow;
mod limits;
mod load;
mod pool;
mod proxy;
mod stats;
mod tcp;
mod tls;
mod workers;

pub use limits::{Limits, BUFFERED_BODY};
pub use load::{run_load, LoadOptions, LoadResult};
pub use proxy::{serve, SwitchConfig};
pub use stats::Stats;
pub use tls::TlsConfig;
