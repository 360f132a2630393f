//! The L1 syncar had until it moved to quick_cache, kept for side-by-side measurements
//! (`make bench-memory`, `make bench-micro`): moka 0.12's `future::Cache` with the copy in an
//! `Arc`, a per-entry `Expiry`, a byte weigher and the same versioned compare-and-insert
//! through `and_compute_with`. Not used by syncar itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::ops::compute::Op;
use moka::Expiry;
use syncar::model::{CacheKey, Cached};

#[derive(Clone)]
struct Entry {
    cached: Arc<Cached>,
    expires_at: Instant,
    generation: u64,
}

struct PerEntryTtl;

impl Expiry<CacheKey, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &CacheKey, e: &Entry, now: Instant) -> Option<Duration> {
        Some(e.expires_at.saturating_duration_since(now))
    }
}

pub struct MokaL1 {
    cache: Cache<CacheKey, Entry>,
}

impl MokaL1 {
    /// The weigher counted 512 bytes of overhead per entry, as syncar's did.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, e: &Entry| {
                let doc = e.cached.doc().map_or(0, |d| d.len());
                u32::try_from(k.as_str().len() + doc + 512).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        MokaL1 { cache }
    }

    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let entry = self.cache.get(key).await?;
        (entry.generation == 0).then_some(entry.cached)
    }

    /// Whether `copy` landed: it must rank above what is there.
    pub async fn offer(&self, key: &CacheKey, copy: Cached, ttl: Duration) -> bool {
        let mut applied = false;
        self.cache
            .entry_by_ref(key)
            .and_compute_with(|current| {
                let op = match current {
                    Some(entry) if !copy.supersedes(&entry.value().cached) => Op::Nop,
                    _ => {
                        applied = true;
                        Op::Put(Entry {
                            cached: Arc::new(copy),
                            expires_at: Instant::now() + ttl,
                            generation: 0,
                        })
                    }
                };
                std::future::ready(op)
            })
            .await;
        applied
    }

    pub async fn settle(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }
}
