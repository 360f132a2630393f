//! L1: the in-process cache of one instance, bounded in bytes, with per-entry TTLs and
//! versioned, per-key atomic updates. Knows nothing about where documents come from.
//!
//! Built on [quick_cache](https://docs.rs/quick_cache) (sharded, CLOCK-Pro-like eviction,
//! weights in bytes). It replaced moka, measured side by side (`make bench-memory`,
//! `make bench-micro`; BENCHMARKS.md, "Memory"): the same hits in less than a third of the
//! memory per entry, because an entry is one slot of a shard's slab (key, copy, deadline and
//! generation inline) instead of moka's `Arc`'d entry, deque nodes and timer wheel.
//!
//! # Concurrent calls on the same key
//! Every change goes through [`L1::offer`], which runs inside quick_cache's per-key
//! `entry`: the compare ("is the offered copy newer than what is there, tombstone
//! included?") and the insert happen under the shard's write lock, or, for a key not yet
//! present, behind the placeholder that `entry` leaves, which makes every other `entry` of the
//! key wait. A plain insert would land a loaded value even if an invalidation ran during the
//! load; here a fill that loaded version 41 while 42's tombstone landed finds the tombstone
//! and is refused.
//!
//! # What quick_cache 0.7 does that this relies on (read in its source)
//! - `entry` runs the closure under the shard's write lock; for an absent key it inserts a
//!   placeholder and returns its guard, and every other `entry` of the key waits on it.
//! - `clear` empties each shard under its write lock before it returns, placeholders
//!   included: a guard's later `insert` then fails.
//! - The byte bound is split evenly across shards: a document larger than a shard's share
//!   is not admitted, and reads of it go below L1. So the shards are bounded (see `shards`).
//! - The guard's `insert` clones the value for waiters: the document's first clone gives it
//!   `bytes`' shared header, as its first hit would anyway.
//! - Changing a value in place (inside `entry`) only adjusts the shard's weight counters: it
//!   admits and evicts nothing. So an offer heavier than what it replaces goes through a
//!   placeholder (`ReplaceWithGuard`), like an absent key, and a copy heavier than a shard
//!   admits at all (`HOT_ALLOCATION` of its share) is kept as a tombstone of its version.
//!
//! # Expiry
//! Each entry carries its deadline (milliseconds since the cache was made). A read past it is
//! a miss and an offer treats the entry as absent; the slot is reused by the next fill of the
//! key or given up to eviction. So an expired entry still weighs until then: the byte bound
//! holds, the entry count may include expired entries.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, EntryAction, EntryResult};
use quick_cache::{OptionsBuilder, Weighter};

use crate::model::{CacheKey, Cached, Rank};

/// What [`L1::offer`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// The copy is now in the cache.
    Applied,
    /// The cache held a copy of this rank or newer, which stays (or, for a copy loaded
    /// before [`L1::clear`], the copy's own rank: it may not land).
    Refused(Rank),
}

/// What one entry costs beyond its key and document: its slot in the shard's slab, its share
/// of the hash table, the key's allocation (none up to 24 bytes), the document's shared
/// header and allocator rounding. Counted by the weigher so that `cache.l1_max_bytes` bounds
/// resident memory, not only payload. Measured by `make bench-memory` with quick_cache 0.7
/// on x86_64 glibc and 200-byte documents: 140 bytes with 15-byte keys, 163 with 40-byte
/// keys; keep it in step.
pub const ENTRY_OVERHEAD_BYTES: usize = 160;

#[derive(Clone)]
pub struct L1 {
    cache: Arc<Cache<CacheKey, Entry, ByBytes>>,
    /// Bumped by [`L1::clear`]: a fill started in an older generation never lands, so a load
    /// that began before a flush cannot bring back what the flush was for. (Entries carry no
    /// generation: quick_cache's `clear` removes every entry before it returns, see
    /// [`L1::clear`].)
    generation: Arc<AtomicU32>,
    /// The origin of every entry's deadline.
    epoch: Instant,
    /// The heaviest entry a shard admits (bytes as [`ByBytes`] weighs them): heavier copies
    /// are kept as tombstones.
    max_entry_bytes: u64,
}

/// A cached copy and when it expires. Stored inline in the shard's slot: a hit clones it
/// (the document is reference-counted `Bytes`).
#[derive(Clone, Debug)]
struct Entry {
    cached: Cached,
    /// Milliseconds since [`L1::epoch`] after which the copy is not served.
    expires_ms: u64,
}

/// The share of a shard's bytes for entries that were read again (quick_cache's "hot"
/// queue; its default). Also the heaviest entry a shard admits, as a share of its bytes.
const HOT_ALLOCATION: f64 = 0.97;

/// The least share of `cache.l1_max_bytes` one shard gets, when L1 is that large: a
/// document up to about this size is admitted (quick_cache admits nothing heavier than a
/// shard's share; moka, before it, anything up to the whole bound).
const MIN_SHARD_BYTES: u64 = 16 * 1024 * 1024;

/// How many shards an L1 of `max_bytes` gets on `parallelism` cores: four per core (what
/// quick_cache picks by itself, for little lock contention), but no more than leaves each
/// [`MIN_SHARD_BYTES`], so that a 64-core node does not shrink the largest document L1 takes
/// to a 256th of its bound. A power of two, at least 1.
fn shards(max_bytes: u64, parallelism: usize) -> usize {
    let by_cores = (parallelism * 4).next_power_of_two();
    let by_bytes = (max_bytes / MIN_SHARD_BYTES).max(1);
    let by_bytes = 1usize << (63 - by_bytes.leading_zeros());
    by_cores.min(by_bytes)
}

/// Weighs an entry at its key, its document and [`ENTRY_OVERHEAD_BYTES`].
#[derive(Clone)]
struct ByBytes;

impl Weighter<CacheKey, Entry> for ByBytes {
    fn weight(&self, key: &CacheKey, entry: &Entry) -> u64 {
        weight(key, &entry.cached)
    }
}

/// What an entry of `cached` under `key` weighs: key, document and [`ENTRY_OVERHEAD_BYTES`].
fn weight(key: &CacheKey, cached: &Cached) -> u64 {
    let doc = cached.doc().map_or(0, |d| d.len());
    (key.as_str().len() + doc + ENTRY_OVERHEAD_BYTES) as u64
}

/// What L1 holds for one key, for the debug view ([`L1::inspect`]).
#[derive(Clone, Debug)]
pub struct Inspected {
    /// The copy, tombstones included.
    pub cached: Cached,
    /// Until it stops being served (zero: expired, waiting to be reused or evicted).
    pub ttl_left: Duration,
}

impl L1 {
    /// An empty cache using at most about `max_bytes` of memory: keys, documents and
    /// [`ENTRY_OVERHEAD_BYTES`] per entry.
    pub fn new(max_bytes: u64) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shards = shards(max_bytes, parallelism);
        let options = OptionsBuilder::new()
            // Sizes the ghost list (keys remembered after eviction); nothing is allocated up
            // front.
            .estimated_items_capacity((max_bytes / 1024).clamp(1024, 1 << 24) as usize)
            .weight_capacity(max_bytes)
            .hot_allocation(HOT_ALLOCATION)
            .shards(shards)
            .build()
            .expect("both capacities are set");
        let cache = Cache::with_options(options, ByBytes, Default::default(), Default::default());
        L1 {
            cache: Arc::new(cache),
            generation: Arc::new(AtomicU32::new(0)),
            epoch: Instant::now(),
            // quick_cache admits an entry up to its hot allocation of a shard's share.
            max_entry_bytes: ((max_bytes / shards as u64) as f64 * HOT_ALLOCATION) as u64,
        }
    }

    /// The current generation; capture it before loading, pass it to [`L1::offer_in`].
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::SeqCst)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The copy held for `key`, tombstones included (callers decide what is servable).
    pub fn get(&self, key: &CacheKey) -> Option<Cached> {
        let entry = self.cache.get(key)?;
        (entry.expires_ms > self.now_ms()).then_some(entry.cached)
    }

    /// What L1 holds for `key`, expired entries included.
    pub fn inspect(&self, key: &CacheKey) -> Option<Inspected> {
        let entry = self.cache.peek(key)?;
        Some(Inspected {
            ttl_left: Duration::from_millis(entry.expires_ms.saturating_sub(self.now_ms())),
            cached: entry.cached,
        })
    }

    /// Puts `copy` in the cache for `ttl` if it is newer than what is there.
    ///
    /// # Concurrency
    /// Atomic per key with every other `offer` of the same key.
    /// (Invalidations and writes use this: they belong to whatever generation is current
    /// when they land, so a concurrent clear cannot refuse them.)
    pub fn offer(&self, key: &CacheKey, copy: Cached, ttl: Duration) -> Offer {
        self.offer_at(None, key, copy, ttl)
    }

    /// [`L1::offer`] for a copy loaded in `generation`: refused if L1 was cleared since.
    pub fn offer_in(&self, generation: u32, key: &CacheKey, copy: Cached, ttl: Duration) -> Offer {
        self.offer_at(Some(generation), key, copy, ttl)
    }

    /// A copy lands if it ranks above the entry held; an expired entry ranks below everything.
    ///
    /// # Against [`L1::clear`]
    /// The generation is checked under the shard's write lock (inside `entry`) or, for an
    /// absent key, while the placeholder is held: `clear` bumps the generation before it
    /// takes any shard lock, and removes placeholders with entries. So a copy of an older
    /// generation either sees the new generation and is refused, or lands before `clear`
    /// reaches its shard and is removed by it, or finds its placeholder gone.
    fn offer_at(
        &self,
        generation: Option<u32>,
        key: &CacheKey,
        copy: Cached,
        ttl: Duration,
    ) -> Offer {
        let now_ms = self.now_ms();
        let expires_ms = now_ms.saturating_add(ttl.as_millis() as u64);
        // A copy too heavy for a shard would be dropped by quick_cache while the offer
        // reported it applied, and an older fill could then land: its version is kept as a
        // tombstone instead, so reads of it go below L1 and older copies are refused.
        let copy = if weight(key, &copy) > self.max_entry_bytes {
            Cached::invalidated(copy.version)
        } else {
            copy
        };
        // `Some` until the closure or the insert below takes it: exactly one of them does.
        let mut copy = Some(copy);
        // Whether a copy loaded in `generation` may land now.
        let admitted = || generation.is_none_or(|g| g == self.generation());
        let outcome = self.cache.entry(key, None, |_, entry: &mut Entry| {
            let offered = copy.as_ref().expect("the copy is offered once");
            if !admitted() {
                return EntryAction::Retain(Some(Offer::Refused(offered.rank())));
            }
            if entry.expires_ms > now_ms && !offered.supersedes(&entry.cached) {
                return EntryAction::Retain(Some(Offer::Refused(entry.cached.rank())));
            }
            if weight(key, offered) > weight(key, &entry.cached) {
                // Growing in place would bypass quick_cache's admission and eviction (it
                // only adjusts its counters): re-inserted through a placeholder instead,
                // which other offers of the key wait for as for an absent key.
                return EntryAction::ReplaceWithGuard;
            }
            *entry = Entry {
                cached: copy.take().expect("the copy is offered once"),
                expires_ms,
            };
            EntryAction::Retain(Some(Offer::Applied))
        });
        let placeholder = match outcome {
            EntryResult::Retained(Some(offer)) => return offer,
            EntryResult::Vacant(placeholder) | EntryResult::Replaced(placeholder, _) => placeholder,
            // The closure retains with an answer, or asks for a placeholder; no timeout.
            EntryResult::Retained(None) | EntryResult::Removed(..) | EntryResult::Timeout => {
                unreachable!("entry without timeout or removal")
            }
        };
        let offered = copy.take().expect("the closure left the copy");
        let rank = offered.rank();
        if !admitted() {
            return Offer::Refused(rank);
        }
        let entry = Entry {
            cached: offered,
            expires_ms,
        };
        // Fails only if a clear removed the placeholder meanwhile (possibly one another
        // offer left, handed to this one). A copy of a generation is then refused; a write
        // or an invalidation belongs to the new generation and is offered again.
        match placeholder.insert(entry) {
            Ok(()) => Offer::Applied,
            Err(entry) if generation.is_none() => self.offer_at(None, key, entry.cached, ttl),
            Err(_) => Offer::Refused(rank),
        }
    }

    /// Empties the cache: nothing cached or loading before this call is served after it.
    /// Takes every shard's write lock in turn; an offer of an older generation that lands
    /// meanwhile is in a shard not yet emptied (see `L1::offer_at`).
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.clear();
    }

    /// Entries held, expired ones not yet reused or evicted included.
    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }

    /// The weight held, in bytes as the weigher counts them (see [`ENTRY_OVERHEAD_BYTES`]).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Version;
    use bytes::Bytes;
    use std::sync::mpsc;

    const TTL: Duration = Duration::from_secs(60);

    fn value(v: i64) -> Cached {
        Cached::value(Version(v), Bytes::from(format!("{{\"v\":{v}}}")))
    }

    #[test]
    fn a_fill_never_replaces_a_newer_copy() {
        let l1 = L1::new(1 << 20);
        let k = CacheKey::new("kv", "a");
        assert_eq!(l1.offer(&k, value(2), TTL), Offer::Applied);
        assert!(matches!(l1.offer(&k, value(1), TTL), Offer::Refused(_)));
        assert!(matches!(l1.offer(&k, value(2), TTL), Offer::Refused(_)));
        assert_eq!(l1.offer(&k, value(3), TTL), Offer::Applied);
        assert_eq!(l1.get(&k).unwrap(), value(3));
    }

    /// The race behind Meta's "Cache made consistent": a reader loads 41, 42 commits and its
    /// invalidation lands, then the reader's fill arrives. The interleaving is forced with
    /// channels: the load is held until the invalidation has been applied.
    #[test]
    fn a_slow_fill_cannot_land_under_a_newer_tombstone() {
        let l1 = L1::new(1 << 20);
        let k = CacheKey::new("kv", "race");
        l1.offer(&k, value(40), TTL);
        l1.clear(); // expired: the next read misses

        let (loaded_tx, loaded_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let reader = {
            let (l1, k) = (l1.clone(), k.clone());
            std::thread::spawn(move || {
                assert!(l1.get(&k).is_none(), "miss");
                let loaded = value(41); // what the slow load read
                loaded_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                l1.offer(&k, loaded, TTL)
            })
        };
        loaded_rx.recv().unwrap();
        // Version 42 commits elsewhere; its invalidation arrives while the load is in flight.
        assert_eq!(
            l1.offer(&k, Cached::invalidated(Version(42)), TTL),
            Offer::Applied
        );
        go_tx.send(()).unwrap();
        assert_eq!(
            reader.join().unwrap(),
            Offer::Refused(Rank {
                version: Version(42),
                known: false
            })
        );
        let held = l1.get(&k).unwrap();
        assert!(
            !held.is_servable(),
            "the tombstone stays: reads go below L1"
        );
        // The copy the tombstone waits for is accepted.
        assert_eq!(l1.offer(&k, value(42), TTL), Offer::Applied);
    }

    /// Offers of one key racing from several threads, the key absent at first (so the
    /// placeholder path races the in-place path): whatever the interleaving, the newest
    /// version offered is what stays.
    #[test]
    fn racing_offers_keep_the_newest() {
        for round in 0..200 {
            let l1 = L1::new(1 << 20);
            let k = CacheKey::new("kv", &format!("hot{round}"));
            // Thread t offers versions 1 + t + 4j, j in 0..25 in a scrambled order: each of
            // 1..=100 once.
            let threads: Vec<_> = (0..4i64)
                .map(|t| {
                    let (l1, k) = (l1.clone(), k.clone());
                    std::thread::spawn(move || {
                        for i in 0..25i64 {
                            l1.offer(&k, value(1 + t + 4 * ((i * 7 + t) % 25)), TTL);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(l1.get(&k).unwrap(), value(100), "round {round}");
        }
    }

    #[test]
    fn a_load_started_before_a_clear_never_lands() {
        let l1 = L1::new(1 << 20);
        let k = CacheKey::new("kv", "g");
        let before = l1.generation();
        l1.offer(&k, value(1), TTL);
        l1.clear();
        assert!(l1.get(&k).is_none(), "cleared");
        assert!(matches!(
            l1.offer_in(before, &k, value(2), TTL),
            Offer::Refused(_)
        ));
        assert!(l1.get(&k).is_none());
        // A fresh load lands, even over an older copy of the previous generation.
        assert_eq!(l1.offer(&k, value(1), TTL), Offer::Applied);
        assert_eq!(l1.get(&k).unwrap().version, Version(1));
    }

    #[test]
    fn entries_expire_after_their_own_ttl() {
        let l1 = L1::new(1 << 20);
        let short = CacheKey::new("kv", "short");
        let long = CacheKey::new("kv", "long");
        l1.offer(&short, value(1), Duration::from_millis(50));
        l1.offer(&long, value(1), TTL);
        l1.offer(
            &long,
            Cached::invalidated(Version(5)),
            Duration::from_millis(50),
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(l1.get(&short).is_none());
        assert_eq!(l1.inspect(&short).unwrap().ttl_left, Duration::ZERO);
        // An expired tombstone refuses nothing: the fill it was waiting for may be older.
        assert_eq!(l1.offer(&long, value(4), TTL), Offer::Applied);
        assert_eq!(l1.get(&long).unwrap(), value(4));
    }

    #[test]
    fn shards_leave_each_a_large_share() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(shards(256 * MIB, 2), 8);
        assert_eq!(shards(256 * MIB, 64), 16, "not 256 shards of 1 MiB");
        assert_eq!(shards(40 * MIB, 8), 2);
        assert_eq!(shards(8 * MIB, 2), 1);
        assert_eq!(shards(0, 1), 1);
    }

    /// A document near a sixth of the bound is admitted whatever the number of cores (with
    /// quick_cache's own four shards per core it was not, on two cores and more).
    #[test]
    fn a_large_document_is_admitted() {
        let l1 = L1::new(64 * 1024 * 1024);
        let k = CacheKey::new("kv", "big");
        let doc = Bytes::from(vec![b'x'; 10 * 1024 * 1024]);
        l1.offer(&k, Cached::value(Version(1), doc), TTL);
        assert!(l1.get(&k).is_some(), "a 10 MiB document in a 64 MiB L1");
    }

    /// Tombstones for many keys, then documents in their place: L1 stays within its bound
    /// (growing an entry in place would not evict anything).
    #[test]
    fn copies_replacing_tombstones_stay_within_the_bound() {
        let l1 = L1::new(256 * 1024);
        let doc = Bytes::from(vec![b'x'; 4096]);
        for i in 0..1000 {
            let k = CacheKey::new("kv", &i.to_string());
            l1.offer(&k, Cached::invalidated(Version(i)), TTL);
        }
        for i in 0..1000 {
            let k = CacheKey::new("kv", &i.to_string());
            l1.offer(&k, Cached::value(Version(i), doc.clone()), TTL);
        }
        assert!(
            l1.weighted_size() <= 256 * 1024,
            "{} bytes",
            l1.weighted_size()
        );
    }

    /// A copy too heavy for L1 leaves its version behind as a tombstone: an older fill
    /// that loaded before it cannot land.
    #[test]
    fn a_copy_too_heavy_to_keep_still_refuses_older_ones() {
        let l1 = L1::new(1024 * 1024);
        let k = CacheKey::new("kv", "huge");
        let huge = Cached::value(Version(42), Bytes::from(vec![b'x'; 2 * 1024 * 1024]));
        assert_eq!(l1.offer(&k, huge, TTL), Offer::Applied);
        assert!(
            !l1.get(&k).unwrap().is_servable(),
            "a tombstone, not the copy"
        );
        assert!(matches!(l1.offer(&k, value(41), TTL), Offer::Refused(_)));
    }

    #[test]
    fn the_cache_is_bounded_in_bytes() {
        let l1 = L1::new(64 * 1024);
        let doc = Bytes::from(vec![b'x'; 1024]);
        for i in 0..1000 {
            let k = CacheKey::new("kv", &i.to_string());
            l1.offer(&k, Cached::value(Version(i), doc.clone()), TTL);
        }
        assert!(
            l1.weighted_size() <= 64 * 1024,
            "{} bytes",
            l1.weighted_size()
        );
        assert!(l1.entry_count() < 100, "{} entries", l1.entry_count());
    }
}
