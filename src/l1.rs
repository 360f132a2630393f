//! L1: the in-process moka cache of one instance, bounded in bytes, with per-entry TTLs and
//! versioned, per-key atomic updates. Knows nothing about where documents come from.
//!
//! # Concurrent calls on the same key
//! Every change goes through [`L1::offer`], which runs inside moka's per-key
//! `and_compute_with`: the compare ("is the offered copy newer than what is there, tombstone
//! included?") and the insert happen under one key lock. moka's `get_with` would insert a
//! loaded value even if an invalidation ran during the load; here a fill that loaded version
//! 41 while 42's tombstone landed finds the tombstone and is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::ops::compute::Op;
use moka::Expiry;

use crate::model::{CacheKey, Cached, Rank};

/// What [`L1::offer`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// The copy is now in the cache.
    Applied,
    /// The cache held a copy of this rank or newer, which stays.
    Refused(Rank),
}

/// What one entry costs beyond its key and document: moka's concurrent map, the entry's
/// metadata, its eviction and expiry nodes, and allocator rounding. Counted by the weigher so
/// that `cache.l1_max_bytes` bounds resident memory, not only payload. Measured by
/// `make bench-memory` (about 490 bytes with moka 0.12 on x86_64 glibc); keep it in step.
pub const ENTRY_OVERHEAD_BYTES: usize = 512;

#[derive(Clone)]
pub struct L1 {
    cache: Cache<CacheKey, Entry>,
    /// Bumped by [`L1::clear`]. Entries of an older generation are never served, and a fill
    /// started in an older generation never lands: a load that began before a flush cannot
    /// bring back what the flush was for, whatever moka's lazy `invalidate_all` does.
    generation: Arc<AtomicU64>,
}

/// A cached copy, when it expires, and the generation it belongs to.
#[derive(Clone, Debug)]
struct Entry {
    cached: Arc<Cached>,
    /// Its insertion plus its TTL. (A deadline rather than the TTL: the same size, and the
    /// time left can be read back for [`L1::inspect`].)
    expires_at: Instant,
    generation: u64,
}

struct PerEntryTtl;

impl Expiry<CacheKey, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &CacheKey, e: &Entry, now: Instant) -> Option<Duration> {
        Some(e.expires_at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        e: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.expires_at.saturating_duration_since(now))
    }
}

/// What L1 holds for one key, for the debug view ([`L1::inspect`]).
#[derive(Clone, Debug)]
pub struct Inspected {
    /// The copy, tombstones included.
    pub cached: Arc<Cached>,
    /// Until moka evicts it.
    pub ttl_left: Duration,
    /// The generation it was filled in.
    pub generation: u64,
    /// Whether that is the current generation (else it is never served: a flush since).
    pub current: bool,
}

impl L1 {
    /// An empty cache using at most about `max_bytes` of memory: keys, documents and
    /// [`ENTRY_OVERHEAD_BYTES`] per entry.
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, e: &Entry| {
                let doc = e.cached.doc().map_or(0, |d| d.len());
                u32::try_from(k.as_str().len() + doc + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        L1 {
            cache,
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The current generation; capture it before loading, pass it to [`L1::offer_in`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The copy held for `key`, tombstones included (callers decide what is servable).
    pub async fn get(&self, key: &CacheKey) -> Option<Arc<Cached>> {
        let entry = self.cache.get(key).await?;
        (entry.generation == self.generation()).then_some(entry.cached)
    }

    /// What L1 holds for `key`, older generations included (see [`Inspected::current`]).
    pub async fn inspect(&self, key: &CacheKey) -> Option<Inspected> {
        let entry = self.cache.get(key).await?;
        Some(Inspected {
            ttl_left: entry.expires_at.saturating_duration_since(Instant::now()),
            current: entry.generation == self.generation(),
            generation: entry.generation,
            cached: entry.cached,
        })
    }

    /// Puts `copy` in the cache for `ttl` if it is newer than what is there.
    ///
    /// # Concurrency
    /// Atomic per key with every other `offer` of the same key.
    /// (Invalidations and writes use this: they belong to whatever generation is current
    /// when they land, so a concurrent clear cannot refuse them.)
    pub async fn offer(&self, key: &CacheKey, copy: Cached, ttl: Duration) -> Offer {
        self.offer_at(None, key, copy, ttl).await
    }

    /// [`L1::offer`] for a copy loaded in `generation`: refused if L1 was cleared since.
    pub async fn offer_in(
        &self,
        generation: u64,
        key: &CacheKey,
        copy: Cached,
        ttl: Duration,
    ) -> Offer {
        self.offer_at(Some(generation), key, copy, ttl).await
    }

    /// Entries of an older generation are never served, but their versions are still facts:
    /// an offer must rank above them too (at an equal rank it may re-tag them as current).
    async fn offer_at(
        &self,
        generation: Option<u64>,
        key: &CacheKey,
        copy: Cached,
        ttl: Duration,
    ) -> Offer {
        let mut refused = None;
        let current_generation = &self.generation;
        self.cache
            .entry_by_ref(key)
            .and_compute_with(|current| {
                let now = current_generation.load(Ordering::SeqCst);
                let generation = generation.unwrap_or(now);
                let op = match current {
                    _ if generation != now => {
                        refused = Some(copy.rank());
                        Op::Nop
                    }
                    Some(entry)
                        if entry.value().cached.supersedes(&copy)
                            || (entry.value().generation == now
                                && !copy.supersedes(&entry.value().cached)) =>
                    {
                        refused = Some(entry.value().cached.rank());
                        Op::Nop
                    }
                    _ => Op::Put(Entry {
                        cached: Arc::new(copy),
                        expires_at: Instant::now() + ttl,
                        // Tagged with the loader's generation: if a clear slipped in since
                        // the check above, the entry is already unservable.
                        generation,
                    }),
                };
                std::future::ready(op)
            })
            .await;
        match refused {
            Some(rank) => Offer::Refused(rank),
            None => Offer::Applied,
        }
    }

    /// Empties the cache: nothing cached or loading before this call is served after it.
    /// (moka frees the memory lazily; counts catch up after [`L1::run_pending_tasks`].)
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate_all();
    }

    /// Runs moka's deferred maintenance, so counts and sizes are exact.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Version;
    use bytes::Bytes;

    const TTL: Duration = Duration::from_secs(60);

    fn value(v: i64) -> Cached {
        Cached::value(Version(v), Bytes::from(format!("{{\"v\":{v}}}")))
    }

    #[tokio::test]
    async fn a_fill_never_replaces_a_newer_copy() {
        let l1 = L1::new(1 << 20);
        let k = CacheKey::new("kv", "a");
        assert_eq!(l1.offer(&k, value(2), TTL).await, Offer::Applied);
        assert!(matches!(
            l1.offer(&k, value(1), TTL).await,
            Offer::Refused(_)
        ));
        assert!(matches!(
            l1.offer(&k, value(2), TTL).await,
            Offer::Refused(_)
        ));
        assert_eq!(l1.offer(&k, value(3), TTL).await, Offer::Applied);
        assert_eq!(*l1.get(&k).await.unwrap(), value(3));
    }

    /// The race behind Meta's "Cache made consistent": a reader loads 41, 42 commits and its
    /// invalidation lands, then the reader's fill arrives. The interleaving is forced with
    /// channels: the load is held until the invalidation has been applied.
    #[tokio::test]
    async fn a_slow_fill_cannot_land_under_a_newer_tombstone() {
        let l1 = L1::new(1 << 20);
        let k = CacheKey::new("kv", "race");
        l1.offer(&k, value(40), TTL).await;
        l1.clear(); // expired: the next read misses

        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = {
            let (l1, k) = (l1.clone(), k.clone());
            tokio::spawn(async move {
                assert!(l1.get(&k).await.is_none(), "miss");
                let loaded = value(41); // what the slow load read
                loaded_tx.send(()).unwrap();
                go_rx.await.unwrap();
                l1.offer(&k, loaded, TTL).await
            })
        };
        loaded_rx.await.unwrap();
        // Version 42 commits elsewhere; its invalidation arrives while the load is in flight.
        assert_eq!(
            l1.offer(&k, Cached::invalidated(Version(42)), TTL).await,
            Offer::Applied
        );
        go_tx.send(()).unwrap();
        let outcome = reader.await.unwrap();
        assert_eq!(
            outcome,
            Offer::Refused(Rank {
                version: Version(42),
                known: false
            })
        );
        let held = l1.get(&k).await.unwrap();
        assert!(
            !held.is_servable(),
            "the tombstone stays: reads go below L1"
        );
        // The copy the tombstone waits for is accepted.
        assert_eq!(l1.offer(&k, value(42), TTL).await, Offer::Applied);
    }

    #[tokio::test]
    async fn a_load_started_before_a_clear_never_lands() {
        let l1 = L1::new(1 << 20);
        let k = CacheKey::new("kv", "g");
        let before = l1.generation();
        l1.offer(&k, value(1), TTL).await;
        l1.clear();
        assert!(l1.get(&k).await.is_none(), "cleared");
        assert!(matches!(
            l1.offer_in(before, &k, value(2), TTL).await,
            Offer::Refused(_)
        ));
        assert!(l1.get(&k).await.is_none());
        // A fresh load lands, even over an older copy of the previous generation.
        assert_eq!(l1.offer(&k, value(1), TTL).await, Offer::Applied);
        assert_eq!(l1.get(&k).await.unwrap().version, Version(1));
    }

    #[tokio::test]
    async fn entries_expire_after_their_own_ttl() {
        let l1 = L1::new(1 << 20);
        let short = CacheKey::new("kv", "short");
        let long = CacheKey::new("kv", "long");
        l1.offer(&short, value(1), Duration::from_millis(50)).await;
        l1.offer(&long, value(1), TTL).await;
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(l1.get(&short).await.is_none());
        assert!(l1.get(&long).await.is_some());
    }

    #[tokio::test]
    async fn the_cache_is_bounded_in_bytes() {
        let l1 = L1::new(64 * 1024);
        let doc = Bytes::from(vec![b'x'; 1024]);
        for i in 0..1000 {
            let k = CacheKey::new("kv", &i.to_string());
            l1.offer(&k, Cached::value(Version(i), doc.clone()), TTL)
                .await;
        }
        l1.run_pending_tasks().await;
        assert!(
            l1.weighted_size() <= 64 * 1024,
            "{} bytes",
            l1.weighted_size()
        );
        assert!(l1.entry_count() < 100, "{} entries", l1.entry_count());
    }
}
