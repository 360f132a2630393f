//! The three tiers working as one: read-through (L1, then Redis, then Postgres, filling on the
//! way back), write-through (Postgres commit first, then Redis, then L1) and the repair of
//! Redis entries a failed write left behind. Knows nothing about HTTP.
//!
//! `Tiers` is the read and write API (the HTTP layer's); its rooms are `impl Tiers` blocks:
//! `read` (the read path), `write` (the write path). The other components get handles of
//! their own, built from the same pieces once at start-up, each with a narrow API: the
//! feeds [`FeedTiers`] (`feed`, with `apply` for their messages), the relay [`RelayRedis`]
//! (`relay`: its lease, records and publications), the guards against tiers that went back
//! in time [`Guards`] (`guard`), the readiness checks [`Probes`] (`probes`). Batches of
//! changes reach Redis through `redis_changes`; `repairs` is the Redis repair queue; what
//! they all share is in `shared`. What their async code decides is asked of `decide`: pure
//! functions over versions and copies, tested without servers. This file holds the state,
//! the types the rooms share, the auditor's check, and the handles' construction.
//!
//! # Invariants
//! - A write is acknowledged only after Postgres committed it.
//! - No tier ever replaces a copy with an older one: L1 compares under its per-key lock, Redis
//!   inside its Lua script.
//! - A read that finds L1 knows of a newer version than the copy it loaded goes down a tier
//!   instead of returning the older copy.

mod apply;
mod decide;
mod error;
mod feed;
mod guard;
mod probes;
mod read;
mod redis_changes;
mod relay;
mod repairs;
mod shared;
mod write;

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditTap, Sample, Verdict};
use crate::coherence::Coherence;
use crate::db::{Db, DbError};
use crate::l1::L1;
use crate::l2::{L2Error, L2};
use crate::model::{now_ms, Cached, Tier, Version};
use crate::resource::{CatalogCell, DocRef};
use crate::telemetry::{
    error_chain, AUDIT_CHECKS, AUDIT_STALE, CACHE_HITS, CACHE_MISSES, L1_BYPASSED, L1_FLUSHES,
};
use crate::watch::WatchHub;

/// How long past the lease the auditor looks again: an eviction may land just at its end.
const AUDIT_MARGIN: Duration = Duration::from_millis(250);

use decide::Conflict;
pub use error::{GuardError, ReplayError};
pub use feed::FeedTiers;
pub use guard::{Guards, RedisCheck};
pub use probes::Probes;
pub use redis_changes::RedisChanges;
pub use relay::RelayRedis;
pub use repairs::Repairs;
use shared::{l1_ttl, l2_ttl, Flights, HighWater};
pub use shared::{ReadResult, APPLY_CONCURRENCY, OFFER_CHUNK};

/// See [`Tiers::started`].
#[derive(Clone, Copy, Debug)]
struct Started {
    l1: Option<u32>,
    l2: i64,
}

/// How fresh a read must be (query parameters of a GET).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// `min_version=N`: copies older than N are skipped (read-your-writes across instances).
    pub min_version: Option<Version>,
    /// `consistency=strong`: read Postgres, refresh the tiers.
    pub strong: bool,
    /// `min_lsn=X/Y`: the WAL position (an LSN as a number) this instance must have applied
    /// before it answers from its caches; the HTTP layer waits for it, bounded, and reads
    /// Postgres (`strong`) when it is not reached.
    pub min_lsn: Option<u64>,
}

/// The read and write API over the three tiers (the HTTP layer's), and the pieces every
/// other component's handle is built from ([`Tiers::feed_tiers`], [`Tiers::relay_redis`],
/// [`Tiers::guards`], [`Tiers::probes`]). Cheap to clone.
#[derive(Clone)]
pub struct Tiers {
    l1: Option<L1>,
    l2: L2,
    db: Db,
    coherence: Arc<Coherence>,
    /// Identifies this instance's messages on the Redis feed.
    instance_id: Arc<str>,
    flights: Arc<Flights>,
    repairs: Arc<Repairs>,
    /// Writes answered before Redis holds them (`consistency=eventual`).
    unsettled: Arc<write::Unsettled>,
    counters: Arc<Counters>,
    /// The resources, for resets that cover them all.
    catalog: Arc<CatalogCell>,
    /// The highest version this instance has seen anywhere (reads, writes, messages).
    high_water: HighWater,
    /// The high-water version last recorded in Redis by this instance.
    reported_high_water: Arc<AtomicI64>,
    /// Where sampled cached reads go for the auditor; `None`: no auditor.
    audit: Option<Arc<AuditTap>>,
    /// The change stream apps watch: every change applied to L1 here, and the resets.
    watch: Arc<WatchHub>,
    /// `cache.fill_lease`; `None`: off.
    fill_lease: Option<Duration>,
    /// Fill leases claimed here so far: each claim's holder is unique.
    lease_claims: Arc<AtomicU64>,
}

/// What [`Tiers::inspect`] found for one key. Holds no document body beyond L1's own copy.
#[derive(Debug)]
pub struct KeyReport {
    /// `None` when L1 is off; `Some(None)` when it holds nothing for the key.
    pub l1: Option<Option<crate::l1::Inspected>>,
    /// Whether reads use L1 now (every feed up).
    pub l1_usable: bool,
    pub redis_key: String,
    /// Redis' copy and its `PTTL` in ms.
    pub redis: Result<Option<(Cached, i64)>, L2Error>,
    /// Postgres' version and the document's length in bytes; `None` when absent.
    pub postgres: Result<Option<(Version, usize)>, DbError>,
}

/// What Redis said to a read ([`Tiers::load`]).
enum L2Read {
    /// A copy this read may serve (L1 has been offered it).
    Hit(ReadResult),
    /// Nothing servable: no entry, a tombstone, or a copy known to be behind.
    Missed,
    /// Redis was skipped or failed: no use waiting for it.
    Failed,
}

/// Hot-path counters, registered once (a label lookup per read costs more than an L1 hit).
struct Counters {
    l1_hit: metrics::Counter,
    l1_miss: metrics::Counter,
    l2_hit: metrics::Counter,
    l2_miss: metrics::Counter,
    db_hit: metrics::Counter,
    bypassed: metrics::Counter,
}

impl Counters {
    fn new() -> Self {
        Counters {
            l1_hit: metrics::counter!(CACHE_HITS, "tier" => "l1"),
            l1_miss: metrics::counter!(CACHE_MISSES, "tier" => "l1"),
            l2_hit: metrics::counter!(CACHE_HITS, "tier" => "l2"),
            l2_miss: metrics::counter!(CACHE_MISSES, "tier" => "l2"),
            db_hit: metrics::counter!(CACHE_HITS, "tier" => "db"),
            bypassed: metrics::counter!(L1_BYPASSED),
        }
    }
}

impl Tiers {
    /// Tiers over `l1` (`None`: off), `l2` and `db`, obeying the feeds' state `coherence`;
    /// `instance_id` signs this instance's messages, `repair_queue_max` bounds the Redis
    /// repair queue (keys), `catalog` names the resources resets cover. Connects nothing.
    pub fn new(
        l1: Option<L1>,
        l2: L2,
        db: Db,
        coherence: Arc<Coherence>,
        instance_id: &str,
        repair_queue_max: usize,
        catalog: Arc<CatalogCell>,
    ) -> Self {
        Tiers {
            l1,
            l2,
            db,
            coherence,
            instance_id: instance_id.into(),
            flights: Arc::new(Flights::default()),
            repairs: Arc::new(Repairs::new(repair_queue_max)),
            unsettled: Arc::default(),
            counters: Arc::new(Counters::new()),
            catalog,
            high_water: HighWater::default(),
            reported_high_water: Arc::new(AtomicI64::new(0)),
            audit: None,
            watch: Arc::new(WatchHub::new(1024)),
            fill_lease: None,
            lease_claims: Arc::default(),
        }
    }

    /// The same tiers, sharing loads across the fleet through fill leases of `lease` (see
    /// `cache.fill_lease`; zero: off).
    pub fn with_fill_lease(mut self, lease: Duration) -> Self {
        self.fill_lease = (!lease.is_zero()).then_some(lease);
        self
    }

    /// The same tiers, whose watchers may fall `buffer` events behind before they are reset.
    pub fn with_watch_buffer(mut self, buffer: usize) -> Self {
        self.watch = Arc::new(WatchHub::new(buffer));
        self
    }

    /// The change stream apps watch.
    pub fn watch(&self) -> &Arc<WatchHub> {
        &self.watch
    }

    /// The same tiers, sending a sample of their cached reads to `tap`.
    pub fn with_audit(mut self, tap: AuditTap) -> Self {
        self.audit = Some(Arc::new(tap));
        self
    }

    /// Offers a read answered from `tier` to the auditor (sampled, never blocking).
    fn sample(&self, doc: &DocRef, tier: Tier, served: &Cached) {
        if let Some(tap) = &self.audit {
            tap.offer(|| Sample {
                doc: doc.clone(),
                tier,
                served: served.clone(),
                served_at: std::time::Instant::now(),
            });
        }
    }

    /// Checks one sampled read (see [`crate::audit`]): counts it, and when Postgres holds a
    /// newer version, looks at the tier that answered again a `lease` (plus a margin) later;
    /// a copy it would still serve is counted stale, logged with its versions and ages, and
    /// repaired (a tombstone at the newer version, so the next read goes to Postgres).
    /// A cache ahead of Postgres is logged at error level and makes this instance check
    /// whether Postgres went back ([`Guards::secure_postgres`]).
    pub async fn audit(&self, sample: Sample, lease: Duration) {
        let Ok(postgres) = self.db.get(&sample.doc.resource, &sample.doc.key).await else {
            return; // not a check: Postgres did not answer
        };
        metrics::counter!(AUDIT_CHECKS).increment(1);
        let postgres = postgres.map(|(v, _)| v);
        let ck = &sample.doc.ck;
        let resource = &sample.doc.resource;
        match audit::judge(&sample.served, postgres) {
            Verdict::Consistent => {}
            Verdict::Ahead(served) => {
                tracing::error!(
                    resource = %resource.name,
                    tier = sample.tier.as_str(),
                    served = served.0,
                    postgres = postgres.map(|v| v.0),
                    "audit: a cache served a version Postgres does not have"
                );
                if let Err(e) = self.guards().secure_postgres().await {
                    tracing::warn!(error = %error_chain(&e), "audit: checking whether postgres went back failed");
                }
            }
            Verdict::Newer(newer) => {
                tokio::time::sleep(lease + AUDIT_MARGIN).await;
                let held = match sample.tier {
                    Tier::L1 => match &self.l1 {
                        Some(l1) if self.coherence.l1_usable() => l1.get(ck),
                        _ => None,
                    },
                    _ if self.coherence.l2_trusted() && self.l2.trusted() => {
                        self.l2.inspect(ck).await.ok().flatten().map(|(c, _)| c)
                    }
                    _ => None,
                };
                let Some(held) = held else { return };
                if !audit::still_stale(&held, &sample.served, newer) {
                    return;
                }
                metrics::counter!(AUDIT_STALE, "tier" => sample.tier.as_str()).increment(1);
                tracing::warn!(
                    resource = %resource.name,
                    tier = sample.tier.as_str(),
                    served = sample.served.version.0,
                    held = held.version.0,
                    postgres = newer.map(|v| v.0),
                    served_ms_ago = sample.served_at.elapsed().as_millis() as u64,
                    copy_age_ms = now_ms().saturating_sub(held.at_ms),
                    "audit: a stale copy outlived the lease; repairing it"
                );
                let tombstone = Cached::invalidated(newer.unwrap_or(Version(held.version.0 + 1)));
                let ttl = resource.ttl.tombstone_ttl;
                if let Some(l1) = &self.l1 {
                    l1.offer(ck, tombstone.clone(), ttl);
                }
                if self.l2.offer(ck, &tombstone, ttl).await.is_err() {
                    self.repairs.push(ck.clone(), tombstone, ttl);
                }
            }
        }
    }

    /// Notes a version seen in any tier or message (see `high_water`).
    fn saw(&self, version: Version) {
        self.high_water.saw(version);
    }

    /// The highest version this instance has seen.
    fn high_water(&self) -> Version {
        self.high_water.get()
    }

    /// The generations a read or write starts in: what it loads or writes lands only there,
    /// so nothing read before a flush lands after it. L1's is `None` when L1 is not to be
    /// filled (disabled, or bypassed because a feed is down).
    fn started(&self, doc: &DocRef, l1: Option<u32>) -> Started {
        Started {
            l1,
            l2: self.l2.generation(&doc.resource.name),
        }
    }

    /// L1's current generation, if L1 is enabled and usable now (every feed up).
    fn usable_l1(&self) -> Option<u32> {
        let l1 = self.l1.as_ref()?;
        if self.coherence.l1_usable() {
            Some(l1.generation())
        } else {
            self.counters.bypassed.increment(1);
            None
        }
    }

    /// The feeds' handle: their subscriptions and publications, their messages applied,
    /// the changes log replayed, L1 emptied. Built once at start-up.
    pub fn feed_tiers(&self) -> FeedTiers {
        FeedTiers {
            l1: self.l1.clone(),
            l2: self.l2.clone(),
            db: self.db.clone(),
            flights: self.flights.clone(),
            repairs: self.repairs.clone(),
            watch: self.watch.clone(),
            catalog: self.catalog.clone(),
            high_water: self.high_water.clone(),
            changes: self.redis_changes(),
        }
    }

    /// The relay's handle to Redis: its lease, its records, its publications, its changes
    /// applied. Built once at start-up.
    pub fn relay_redis(&self) -> RelayRedis {
        RelayRedis::new(self.l2.clone(), self.redis_changes())
    }

    /// The guards against tiers that went back in time, over these tiers' pieces. Built
    /// once at start-up for the Redis guard, the feeds and the relay.
    pub fn guards(&self) -> Guards {
        Guards {
            l1: self.l1.clone(),
            l2: self.l2.clone(),
            db: self.db.clone(),
            high_water: self.high_water.clone(),
            reported_high_water: self.reported_high_water.clone(),
            watch: self.watch.clone(),
            catalog: self.catalog.clone(),
            instance_id: self.instance_id.clone(),
        }
    }

    /// The readiness checks of the stores (`/readyz`).
    pub fn probes(&self) -> Probes {
        Probes::new(self.l2.clone(), self.db.clone())
    }

    /// Batches of committed changes applied to Redis, sharing these tiers' loads in flight
    /// and high-water version.
    fn redis_changes(&self) -> RedisChanges {
        RedisChanges::new(
            self.l2.clone(),
            self.flights.clone(),
            self.high_water.clone(),
        )
    }

    /// Empties L1 because the catalog was read again after a table changed shape: copies
    /// of the old shape must not be served under the new shape's ETag until the flush that
    /// announces the change arrives.
    pub fn clear_l1_for_new_shapes(&self) {
        if let Some(l1) = &self.l1 {
            l1.clear();
            metrics::counter!(L1_FLUSHES, "feed" => "shape").increment(1);
        }
    }

    /// L1's entries and weighted bytes, if there is an L1.
    pub fn l1_size(&self) -> Option<(u64, u64)> {
        self.l1
            .as_ref()
            .map(|l1| (l1.entry_count(), l1.weighted_size()))
    }

    /// Runs the Redis repair loop until `shutdown`, then makes a last attempt bounded by
    /// `final_drain` (see [`Repairs::run`]).
    pub async fn run_repairs(&self, shutdown: CancellationToken, final_drain: Duration) {
        self.repairs.run(&self.l2, shutdown, final_drain).await;
    }

    /// Keys waiting for a Redis repair. A test hook, like [`Tiers::peek_l1`].
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn pending_repairs(&self) -> usize {
        self.repairs.len()
    }

    /// The copy L1 holds for `ck` in its current generation, tombstones included, without
    /// counting a hit. A test hook: only with the `test-hooks` feature, which the
    /// integration tests turn on and a build of the binary never does.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn peek_l1(&self, ck: &crate::model::CacheKey) -> Option<Cached> {
        self.l1.as_ref()?.get(ck)
    }

    /// Offers `copy` to L1 directly, as an invalidation or write would (for tests that force
    /// an interleaving). `None` without an L1. A test hook, like [`Tiers::peek_l1`].
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn offer_l1(
        &self,
        ck: &crate::model::CacheKey,
        copy: Cached,
        ttl: Duration,
    ) -> Option<crate::l1::Offer> {
        Some(self.l1.as_ref()?.offer(ck, copy, ttl))
    }

    /// The document as Postgres holds it now (an absence at [`Version::NONE`] when there is
    /// no row), touching no cache.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn read_postgres(&self, doc: &DocRef) -> Result<Cached, DbError> {
        Ok(match self.db.get(&doc.resource, &doc.key).await? {
            Some((version, body)) => {
                self.saw(version);
                Cached::value(version, body)
            }
            None => Cached::absent(Version::NONE),
        })
    }
}
