//! Work items spread over a few threads, the first failure stopping the rest (export and copy
//! share it). Hand-written rather than rayon: the copy wants more threads than cores (it waits
//! on a remote store), and a scoped loop over an index is all either needs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Result, StoreError};

/// Threads, one per core (`times` per core for work that mostly waits).
pub(crate) fn workers(times: usize) -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * times
}

/// Runs `work` on every item, `threads` at a time; after a failure no new item starts, and the
/// first failure is returned.
pub(crate) fn try_each<T: Sync>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<StoreError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    return;
                };
                if failure.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                if let Err(e) = work(item) {
                    if let Ok(mut slot) = failure.lock() {
                        slot.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    match failure.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_item_runs_once_and_the_first_failure_stops_the_rest() {
        let items: Vec<u64> = (1..=100).collect();
        let sum = AtomicU64::new(0);
        try_each(&items, 3, |i| {
            sum.fetch_add(*i, Ordering::Relaxed);
            Ok(())
        })
        .expect("no failure");
        assert_eq!(sum.load(Ordering::Relaxed), 5050);

        let ran = AtomicU64::new(0);
        let err = try_each(&items, 1, |i| {
            ran.fetch_add(1, Ordering::Relaxed);
            if *i == 10 {
                Err(StoreError::ChunkVanished { chunk: "x".into() })
            } else {
                Ok(())
            }
        })
        .expect_err("item 10 fails");
        assert!(matches!(err, StoreError::ChunkVanished { .. }), "{err}");
        assert_eq!(ran.load(Ordering::Relaxed), 10, "nothing after the failure");
    }
}
