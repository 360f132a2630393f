//! Coalescing of concurrent loads: callers asking for one key while a load of it is in flight
//! wait for that load instead of starting their own. Knows nothing about what is loaded.
//!
//! This is deliberately separate from L1's versioned updates: coalescing decides who loads,
//! the version comparison in [`crate::l1::L1::offer`] decides whether the result may land.
//!
//! # Cancellation
//! If the caller running the load is dropped (its client went away), a waiting caller runs
//! its own load instead; nobody waits forever on an abandoned one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::locks::MutexExt;
use tokio::sync::OnceCell;

pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// Runs `load` for `key` unless a load of `key` is in flight, in which case it waits for
    /// that one and returns a clone of its result. `load` is not polled when unused.
    pub async fn run<F: Future<Output = V>>(&self, key: &K, load: F) -> V {
        let cell = {
            let mut map = self.inflight.locked();
            map.entry(key.clone()).or_default().clone()
        };
        let guard = Leave {
            flight: self,
            key,
            cell: &cell,
        };
        let value = cell.get_or_init(|| load).await.clone();
        drop(guard);
        value
    }

    /// Detaches the load in flight for `key`, if any: callers already waiting keep waiting for
    /// it, later callers start a new load. Called when `key` changed, so that nobody who asks
    /// after the change gets a result read before it.
    pub fn forget(&self, key: &K) {
        let mut map = self.inflight.locked();
        map.remove(key);
    }

    /// Whether a load of `key` is in flight (a batch then joins it rather than load the key
    /// again).
    pub fn is_running(&self, key: &K) -> bool {
        let map = self.inflight.locked();
        map.contains_key(key)
    }

    /// Callers currently waiting on (or running) the load of `key`. For tests.
    pub fn waiters(&self, key: &K) -> usize {
        let map = self.inflight.locked();
        map.get(key).map_or(0, |cell| Arc::strong_count(cell) - 1)
    }
}

/// Removes the key's cell when its load is done (so later callers load afresh), or when the
/// last caller interested in an unfinished load goes away.
struct Leave<'a, K: Hash + Eq + Clone, V> {
    flight: &'a SingleFlight<K, V>,
    key: &'a K,
    cell: &'a Arc<OnceCell<V>>,
}

impl<K: Hash + Eq + Clone, V> Drop for Leave<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self.flight.inflight.locked();
        let ours = map.get(self.key).is_some_and(|c| Arc::ptr_eq(c, self.cell));
        // strong_count: the map's and ours, when nobody else waits.
        if ours && (self.cell.initialized() || Arc::strong_count(self.cell) <= 2) {
            map.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let flight = Arc::new(SingleFlight::<String, u32>::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let key = "k".to_string();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (flight, loads, release, key) =
                (flight.clone(), loads.clone(), release.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run(&key, async {
                        loads.fetch_add(1, Ordering::SeqCst);
                        release.notified().await;
                        7
                    })
                    .await
            }));
        }
        // Every caller has joined before the load may finish.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while flight.waiters(&key) < 10 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "callers never joined"
            );
            tokio::task::yield_now().await;
        }
        release.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(flight.waiters(&key), 0, "the finished load is forgotten");
        // A later call loads afresh.
        assert_eq!(flight.run(&key, async { 8 }).await, 8);
    }

    #[tokio::test]
    async fn callers_after_forget_start_a_new_load() {
        let flight = Arc::new(SingleFlight::<&'static str, u32>::default());
        let release = Arc::new(tokio::sync::Notify::new());
        let old = {
            let (flight, release) = (flight.clone(), release.clone());
            tokio::spawn(async move {
                flight
                    .run(&"k", async {
                        release.notified().await;
                        1
                    })
                    .await
            })
        };
        while flight.waiters(&"k") < 1 {
            tokio::task::yield_now().await;
        }
        flight.forget(&"k");
        assert_eq!(flight.run(&"k", async { 2 }).await, 2, "a fresh load");
        release.notify_one();
        assert_eq!(old.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_load_is_taken_over() {
        let flight = Arc::new(SingleFlight::<&'static str, u32>::default());
        let started = Arc::new(tokio::sync::Notify::new());
        let leader = {
            let (flight, started) = (flight.clone(), started.clone());
            tokio::spawn(async move {
                flight
                    .run(&"k", async {
                        started.notify_one();
                        std::future::pending::<u32>().await
                    })
                    .await
            })
        };
        started.notified().await;
        let follower = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run(&"k", async { 2 }).await })
        };
        while flight.waiters(&"k") < 2 {
            tokio::task::yield_now().await;
        }
        leader.abort();
        assert_eq!(follower.await.unwrap(), 2);
        assert_eq!(flight.waiters(&"k"), 0);
    }
}
