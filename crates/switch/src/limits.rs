//! What one client, or all of them together, may take from the switch: connections, time to
//! send a request head, request bodies held in memory, and how long an instance may take to
//! answer. Without these, 300 half-sent requests held 300 sockets for as long as their clients
//! liked and 25 held uploads of 16 MiB doubled the switch's memory.
//!
//! Request bodies: one of known length up to [`BUFFERED_BODY`] is read whole before an instance
//! is chosen, so that an idempotent request can be sent again elsewhere if its instance fails;
//! those bytes count against a budget for the whole switch ([`Limits::body_memory`]), and a
//! request that would exceed it is refused at once. A larger body, or one of unknown length, is
//! never held: it streams from the client to the instance as the instance reads it (a request
//! held while its service wakes leaves its body unread in the client's socket), and is not
//! resent once its first byte went out.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Request bodies of at most this many bytes (and a known length) are read whole.
pub const BUFFERED_BODY: u64 = 64 * 1024;

/// The switch's limits (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A client must send a whole request head within this (and a first byte after
    /// connecting within this).
    pub header_timeout: Duration,
    /// Client connections open at once, in all.
    pub max_connections: usize,
    /// Client connections open at once from one address.
    pub max_connections_per_client: usize,
    /// Bytes of request bodies held in memory at once, in all.
    pub body_memory: usize,
    /// How long an instance may take to send a response's head.
    pub backend_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_client: 512,
            body_memory: 64 * 1024 * 1024,
            backend_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// What is wrong with these limits, if anything.
    pub fn problem(&self) -> Option<String> {
        if self.header_timeout.is_zero() || self.backend_timeout.is_zero() {
            return Some("timeouts must be above zero".into());
        }
        if self.max_connections == 0 || self.max_connections_per_client == 0 {
            return Some("connection limits must be at least 1".into());
        }
        if (self.body_memory as u64) < BUFFERED_BODY {
            return Some(format!(
                "the request body memory must hold at least one buffered body ({BUFFERED_BODY} bytes)"
            ));
        }
        None
    }
}

pub(crate) use vmatrix_serve::{Connection, Connections};

/// Bytes of request bodies held in memory, against [`Limits::body_memory`].
pub(crate) struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
    /// Requests refused because the budget was spent.
    pub(crate) refused: AtomicU64,
}

impl BodyBudget {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Reserves `bytes`, given back when the reservation is dropped; None when the budget
    /// would be exceeded.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(after) = used.checked_add(bytes).filter(|a| *a <= self.limit) else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            match self
                .used
                .compare_exchange_weak(used, after, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Reservation {
                        budget: self.clone(),
                        bytes,
                    })
                }
                Err(now) => used = now,
            }
        }
    }

    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// Bytes of the body budget held by one request until dropped.
pub(crate) struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Where the switch stands against its limits.
pub(crate) fn sample(c: &Connections, b: &BodyBudget, out: &mut vmatrix_core::metrics::Sampled) {
    let one = |v: u64| [(Vec::new(), v)];
    out.gauge(
        "vmatrix_switch_client_connections",
        "Client connections open.",
        one(c.open() as u64),
    )
    .counter(
        "vmatrix_switch_connections_refused",
        "Client connections closed at once: a connection limit was reached.",
        one(c.refused.load(Ordering::Relaxed)),
    )
    .gauge(
        "vmatrix_switch_request_body_bytes",
        "Bytes of request bodies held in memory.",
        one(b.used() as u64),
    )
    .counter(
        "vmatrix_switch_body_memory_refused",
        "Requests refused: the request body memory was spent.",
        one(b.refused.load(Ordering::Relaxed)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_budget_is_given_back() {
        let budget = BodyBudget::new(100);
        let r1 = budget.reserve(60).unwrap();
        assert!(budget.reserve(41).is_none());
        let r2 = budget.reserve(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(r1);
        drop(r2);
        assert_eq!(budget.used(), 0);
        assert!(budget.reserve(usize::MAX).is_none());
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limits::default().problem().is_none());
        let zero = Limits {
            header_timeout: Duration::ZERO,
            ..Limits::default()
        };
        assert!(zero.problem().is_some());
        let tiny = Limits {
            body_memory: 10,
            ..Limits::default()
        };
        assert!(tiny.problem().unwrap().contains("buffered body"));
    }
}
