//! The words every part of vMatrix shares: the ids and names that cross process boundaries,
//! with the validation that makes them safe to use as file names, SMBIOS strings and URL parts.
//!
//! This crate must never do I/O, start an async runtime or depend on another vMatrix crate:
//! everything else depends on it, so it stays small, pure and fast to compile.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod hardware;
pub mod health;
mod image;
pub mod metrics;
mod names;
mod spec;
mod state;
pub mod volume;

pub use hardware::Hardware;
pub use health::{HealthCheck, Probe};
pub use image::{ImageName, ImageRef, ImageRefError, Tag};
pub use names::{InstanceId, MachineName, NameError, ServiceName};
pub use spec::{
    parse_services, validate_services, FieldError, PortSpec, Protocol, ServiceSpec, SpecError,
};
pub use state::{IllegalTransition, InstanceState, Transition};
pub use volume::{VolumePlan, VolumeSpec};

/// An error with its causes, each once: `reqwest`'s and `hyper`'s own messages name only what
/// was attempted ("error sending request for url …"), the why is in the sources.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}
