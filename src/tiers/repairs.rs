//! The Redis repair queue: writes committed in Postgres whose Redis update failed, applied
//! once Redis answers again. Knows nothing about Postgres.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::l2::L2;
use crate::locks::MutexExt;
use crate::model::{CacheKey, Cached, Version};
use crate::telemetry::{L2_REPAIRS, L2_REPAIR_QUEUE};

/// Redis entries to fix once Redis answers again: writes committed in Postgres whose Redis
/// update failed. Each is the versioned tombstone (or absence) of that write, so applying it
/// late is safe: the script refuses it if Redis already holds something newer.
pub struct Repairs {
    pending: Mutex<HashMap<CacheKey, (Cached, Duration)>>,
    /// `pending.len()`, readable without the lock on every Redis read.
    count: AtomicUsize,
    max: usize,
    /// More failures than `max`: individual keys were lost, the whole prefix is dropped once
    /// Redis is back.
    overflowed: AtomicBool,
    wake: Notify,
}

impl Repairs {
    /// An empty queue tracking at most `max` keys.
    pub fn new(max: usize) -> Self {
        Repairs {
            pending: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
            max,
            overflowed: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// Remembers a repair, keeping the newer one if the key is already queued.
    pub fn push(&self, key: CacheKey, copy: Cached, ttl: Duration) {
        let mut pending = self.pending.locked();
        match pending.get(&key) {
            Some((queued, _)) if !copy.supersedes(queued) => {}
            Some(_) => {
                pending.insert(key, (copy, ttl));
            }
            None if pending.len() >= self.max => {
                if !self.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        max = self.max,
                        "redis repair queue full; the key prefix will be dropped from redis once it answers"
                    );
                }
            }
            None => {
                pending.insert(key, (copy, ttl));
            }
        }
        self.count.store(pending.len(), Ordering::Relaxed);
        metrics::gauge!(L2_REPAIR_QUEUE).set(pending.len() as f64);
        self.wake.notify_one();
    }

    /// Keys waiting for repair.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether a repair newer than `version` is queued for `key`: Redis' copy is behind a
    /// committed write.
    pub fn pending_above(&self, key: &CacheKey, version: Version) -> bool {
        if self.is_empty() {
            return false;
        }
        let pending = self.pending.locked();
        pending.get(key).is_some_and(|(c, _)| c.version > version)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The repair loop: applies queued repairs whenever Redis answers, backing off with jitter
    /// while it does not, and waking at once when any Redis command succeeds again. On
    /// `shutdown` it makes a last attempt, bounded by `final_drain`, and logs what is left.
    pub async fn run(&self, l2: &L2, shutdown: CancellationToken, final_drain: Duration) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        loop {
            if self.is_empty() && !self.overflowed.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => {}
                }
            }
            if self.drain(l2).await {
                backoff.reset();
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
                _ = l2.recovered() => backoff.reset(),
            }
        }
        if !self.is_empty() {
            let _ = tokio::time::timeout(final_drain, self.drain(l2)).await;
            if !self.is_empty() {
                tracing::error!(
                    keys = self.len(),
                    "stopping with redis repairs not applied; those entries stay stale in redis until they expire"
                );
            }
        }
    }

    /// Applies everything queued; false at the first Redis failure. A key leaves the queue
    /// only once its repair is applied (and no newer one was queued meanwhile).
    async fn drain(&self, l2: &L2) -> bool {
        let batch: Vec<_> = {
            let pending = self.pending.locked();
            pending
                .iter()
                .map(|(k, (c, ttl))| (k.clone(), c.clone(), *ttl))
                .collect()
        };
        for (key, copy, ttl) in batch {
            if let Err(e) = l2.offer(&key, &copy, ttl).await {
                metrics::counter!(L2_REPAIRS, "result" => "failed").increment(1);
                tracing::debug!(error = %e, "redis repair failed; retrying later");
                return false;
            }
            metrics::counter!(L2_REPAIRS, "result" => "applied").increment(1);
            let mut pending = self.pending.locked();
            if pending.get(&key).is_some_and(|(queued, _)| *queued == copy) {
                pending.remove(&key);
            }
            self.count.store(pending.len(), Ordering::Relaxed);
            metrics::gauge!(L2_REPAIR_QUEUE).set(pending.len() as f64);
        }
        if self.overflowed.load(Ordering::Relaxed) {
            match l2.flush_prefix().await {
                Ok(removed) => {
                    self.overflowed.store(false, Ordering::Relaxed);
                    metrics::counter!(L2_REPAIRS, "result" => "overflow_flush").increment(1);
                    tracing::warn!(
                        removed,
                        "dropped the key prefix from redis after repair overflow"
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "redis prefix flush failed; retrying later");
                    return false;
                }
            }
        }
        metrics::gauge!(L2_REPAIR_QUEUE).set(self.len() as f64);
        true
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
