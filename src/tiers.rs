//! The three tiers working as one: read-through (L1, then Redis, then Postgres, filling on the
//! way back), write-through (Postgres commit first, then Redis, then L1) and the repair of
//! Redis entries a failed write left behind. Knows nothing about HTTP.
//!
//! # Invariants
//! - A write is acknowledged only after Postgres committed it.
//! - No tier ever replaces a copy with an older one: L1 compares under its per-key lock, Redis
//!   inside its Lua script.
//! - A read that finds L1 knows of a newer version than the copy it loaded goes down a tier
//!   instead of returning the older copy.

mod repairs;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::audit::{self, AuditTap, Sample, Verdict};
use crate::backoff::jitter;
use crate::coherence::{Coherence, Feed, Message, Op};
use crate::db::{
    Commit, Db, DbError, DeleteOutcome, PostgresIdentity, TxDone, TxFailed, TxItem, TxOp,
    WriteOutcome,
};
use crate::l1::{Offer, L1};
use crate::l2::{L2Error, Stored, L2};
use crate::model::{now_ms, CacheKey, Cached, State, Tier, Version};
use crate::resource::{Catalog, CatalogCell, DocRef, KeyParam, Precondition, Resource};
use crate::single_flight::SingleFlight;
use crate::telemetry::{
    AUDIT_CHECKS, AUDIT_STALE, CACHE_HITS, CACHE_MISSES, FILLS_REJECTED, FILL_LEASES, L1_BYPASSED,
    L1_FLUSHES, L2_WRITE_FAILURES, TIER_RESETS, VERSION_REGRESSIONS,
};
use crate::watch::WatchHub;

/// How long past the lease the auditor looks again: an eviction may land just at its end.
const AUDIT_MARGIN: Duration = Duration::from_millis(250);

pub use repairs::Repairs;

/// Changes applied to the tiers at once (a replay, a poll's batch): their Redis calls share
/// one pipelined connection, and order does not matter since every tier takes only strictly
/// newer versions.
pub const APPLY_CONCURRENCY: usize = 64;

/// Keys per script call when the relay applies a batch to one Redis node
/// ([`L2::offer_many`]): large enough that a 100-row statement is one call, small enough
/// that one call holds Redis for about a millisecond at most.
pub const OFFER_CHUNK: usize = 256;

/// See [`Tiers::started`].
#[derive(Clone, Copy, Debug)]
struct Started {
    l1: Option<u32>,
    l2: i64,
}

/// A servable copy and the tier that answered.
#[derive(Clone, Debug)]
pub struct ReadResult {
    pub cached: Cached,
    pub tier: Tier,
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

#[derive(Clone)]
pub struct Tiers {
    l1: Option<L1>,
    l2: L2,
    db: Db,
    coherence: Arc<Coherence>,
    /// Identifies this instance's messages on the Redis feed.
    instance_id: Arc<str>,
    flights: Arc<SingleFlight<CacheKey, Result<ReadResult, DbError>>>,
    repairs: Arc<Repairs>,
    counters: Arc<Counters>,
    /// The resources, for resets that cover them all.
    catalog: Arc<CatalogCell>,
    /// The highest version this instance has seen anywhere (reads, writes, messages): a
    /// version sequence behind it went back in time.
    high_water: Arc<AtomicI64>,
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

/// What Redis said to a read ([`Tiers::load`]).
enum L2Read {
    /// A copy this read may serve (L1 has been offered it).
    Hit(ReadResult),
    /// Nothing servable: no entry, a tombstone, or a copy known to be behind.
    Missed,
    /// Redis was skipped or failed: no use waiting for it.
    Failed,
}

/// The longest pause between two polls of Redis while another instance holds a key's fill
/// lease.
const FILL_LEASE_POLL_MAX: Duration = Duration::from_millis(8);

/// Why Postgres, as `now` describes it, went back in time against what was recorded
/// (`system`, `timeline`) and the highest version seen (`high`); empty when it did not.
///
/// A new timeline alone is a promoted standby or a point-in-time recovery, either of which
/// may have lost commits the caches hold copies of. It is no reason when `slot_followed`:
/// the relay's failover slot was synchronized to this server, so the stream continues from
/// a position the relay had applied, and the old timeline's primary was recorded holding
/// decoding back for its standby (`synchronized_standby_slots`), so nothing was ever
/// relayed that this server lacks. See README "Failover to a standby".
fn went_back(
    now: &PostgresIdentity,
    system: Option<&str>,
    timeline: Option<&str>,
    high: Version,
    slot_followed: bool,
) -> Vec<String> {
    let mut why = Vec::new();
    if now.last_version < high {
        why.push(format!(
            "its version sequence is at {} but version {} was seen",
            now.last_version.0, high.0
        ));
    }
    if let (Some(now), Some(was)) = (&now.system, system) {
        if now != was {
            why.push(format!(
                "its system identifier changed from {was} to {now} (another cluster)"
            ));
        }
    }
    if let Some(was) = timeline_moved(now, timeline) {
        if !slot_followed {
            why.push(format!(
                "its timeline changed from {was} to {} (a promoted standby or a point-in-time \
                 recovery, which may have lost commits) and no replication slot synchronized \
                 to it proves the relay's continuity (a failover slot needs Postgres 17 or \
                 later, sync_replication_slots on the standby and the wal source)",
                now.timeline.unwrap_or_default()
            ));
        }
    }
    why
}

/// The recorded timeline when Postgres, as `now` describes it, is on another one.
fn timeline_moved<'a>(now: &PostgresIdentity, timeline: Option<&'a str>) -> Option<&'a str> {
    match (now.timeline, timeline) {
        (Some(now), Some(was)) if now.to_string() != was => Some(was),
        _ => None,
    }
}

/// What a tier held that refused a just-committed copy (see `Tiers::settle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conflict {
    /// A newer version.
    Newer(Version),
    /// The same version with other content: the sequence handed it out twice.
    Collision(Version),
}

impl Conflict {
    fn version(self) -> Version {
        match self {
            Conflict::Newer(v) | Conflict::Collision(v) => v,
        }
    }
}

/// What [`Tiers::secure_redis`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisCheck {
    /// The incarnation trusted already.
    Same,
    /// A new incarnation another instance already made safe.
    Adopted,
    /// A new incarnation: every resource's generation raised to this version.
    Reset(Version),
    /// Redis refuses `INFO`: trusted without knowing.
    Unknown,
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
            flights: Arc::new(SingleFlight::default()),
            repairs: Arc::new(Repairs::new(repair_queue_max)),
            counters: Arc::new(Counters::new()),
            catalog,
            high_water: Arc::new(AtomicI64::new(0)),
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
    /// whether Postgres went back ([`Tiers::secure_postgres`]).
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
                if let Err(e) = self.secure_postgres().await {
                    tracing::warn!(error = %e, "audit: checking whether postgres went back failed");
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
        self.high_water.fetch_max(version.0, Ordering::Relaxed);
    }

    /// Raises the high-water version recorded in Redis to this instance's, if it moved since
    /// the last report, so that instances starting later know it too.
    pub async fn report_high_water(&self) {
        let high = self.high_water.load(Ordering::Relaxed);
        if high > self.reported_high_water.load(Ordering::Relaxed)
            && self.l2.raise_high_water(high).await.is_ok()
        {
            self.reported_high_water.fetch_max(high, Ordering::Relaxed);
        }
    }

    /// The highest version this instance has seen.
    pub fn high_water(&self) -> Version {
        Version(self.high_water.load(Ordering::Relaxed))
    }

    /// The feeds' state these tiers obey.
    pub fn coherence(&self) -> &Arc<Coherence> {
        &self.coherence
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

    /// What every tier holds for `doc`, read-only, for the debug view: L1's entry (`None`
    /// when L1 is off), Redis' entry and its key, Postgres' current version and the
    /// document's length in bytes. Changes nothing, fills nothing.
    pub async fn inspect(&self, doc: &DocRef) -> KeyReport {
        let l1 = self.l1.as_ref().map(|l1| l1.inspect(&doc.ck));
        let (redis, postgres) = tokio::join!(
            self.l2.inspect(&doc.ck),
            self.db.get(&doc.resource, &doc.key)
        );
        KeyReport {
            l1,
            l1_usable: self.coherence.l1_usable(),
            redis_key: self.l2.redis_key(&doc.ck),
            redis,
            postgres: postgres.map(|row| row.map(|(v, body)| (v, body.len()))),
        }
    }

    /// The L1 answer for a read, if L1 is usable and holds a servable copy fresh enough for
    /// `options`; `None` means [`Tiers::get_below_l1`] must run.
    pub async fn l1_hit(&self, doc: &DocRef, options: ReadOptions) -> Option<ReadResult> {
        if options.strong || !self.coherence.l1_usable() {
            return None;
        }
        let copy = self.l1.as_ref()?.get(&doc.ck)?;
        let fresh = options.min_version.is_none_or(|min| copy.version >= min);
        if !copy.is_servable() || !fresh {
            return None;
        }
        self.counters.l1_hit.increment(1);
        self.sample(doc, Tier::L1, &copy);
        Some(ReadResult {
            cached: copy,
            tier: Tier::L1,
        })
    }

    /// Reads one document through the tiers.
    ///
    /// # Concurrency
    /// Concurrent misses of one key share one load (see [`SingleFlight`]); a write or an
    /// invalidation of the key detaches the load in flight, so nobody asking afterwards gets
    /// a result read before it.
    ///
    /// # Errors
    /// Only when Postgres had to be asked and failed; Redis failures fall through to Postgres.
    pub async fn get(&self, doc: &DocRef, options: ReadOptions) -> Result<ReadResult, DbError> {
        match self.l1_hit(doc, options).await {
            Some(hit) => Ok(hit),
            None => self.get_below_l1(doc, options).await,
        }
    }

    /// The rest of [`Tiers::get`] once [`Tiers::l1_hit`] found nothing: what may wait on Redis
    /// and Postgres (the HTTP layer puts only this part under the request deadline).
    ///
    /// # Errors
    /// As [`Tiers::get`].
    pub async fn get_below_l1(
        &self,
        doc: &DocRef,
        options: ReadOptions,
    ) -> Result<ReadResult, DbError> {
        let generation = self.started(doc, self.usable_l1());
        if options.strong {
            return self.load_db(doc, generation).await;
        }
        if generation.l1.is_some() {
            self.counters.l1_miss.increment(1);
        }
        let read = self
            .flights
            .run(&doc.ck, self.load(doc, generation))
            .await?;
        if options
            .min_version
            .is_none_or(|min| read.cached.version >= min)
        {
            return Ok(read);
        }
        // The shared load was older than this caller needs (it joined a load started before
        // its write): Postgres has it.
        self.load_db(doc, generation).await
    }

    /// Loads from Redis, else Postgres, filling the tiers above, each in the generation the
    /// read began in.
    ///
    /// # Fill leases
    /// With `cache.fill_lease`, a Redis miss claims the key's fill lease in Redis first
    /// (Meta's memcache leases, "Scaling Memcache at Facebook", NSDI 2013, 3.2.1): the
    /// instance that gets it reads Postgres and fills Redis as without leases, then gives it
    /// up; one that does not polls Redis (after 1, 2, 4, 8, 8... ms) until a copy it may serve
    /// appears there or the lease's time has passed, and then reads Postgres itself. So a
    /// hot key missed by every instance at once (after a plain-SQL write, or at a cold start)
    /// costs Postgres one read instead of one per instance, and an instance that dies holding
    /// the lease delays the others by at most the lease. Copies found by polling pass the same
    /// checks as any Redis hit; coherence never rests on the lease, only the load count does.
    async fn load(&self, doc: &DocRef, generation: Started) -> Result<ReadResult, DbError> {
        if !self.coherence.l2_trusted() {
            return self.load_db(doc, generation).await;
        }
        match self.read_l2(doc, generation).await {
            L2Read::Hit(hit) => return Ok(hit),
            L2Read::Failed => return self.load_db_after_miss(doc, generation).await,
            L2Read::Missed => {}
        }
        let Some(lease) = self.fill_lease else {
            return self.load_db_after_miss(doc, generation).await;
        };
        // `.` is in no resource name: this never names a document's Redis key.
        let name = format!("fill.lease:{}", doc.ck);
        // A holder per claim, not per instance: two loads of one key here (a detached flight
        // and its successor) must not extend or release each other's lease.
        let holder = format!(
            "{}#{}",
            self.instance_id,
            self.lease_claims.fetch_add(1, Ordering::Relaxed)
        );
        match self.l2.claim(&name, &holder, lease).await {
            Ok(true) => {
                metrics::counter!(FILL_LEASES, "outcome" => "held").increment(1);
                let read = self.load_db_after_miss(doc, generation).await;
                // Given up in the background: the answer does not wait for it, and if it
                // fails the lease expires by itself.
                let l2 = self.l2.clone();
                tokio::spawn(async move { l2.release(&name, &holder).await });
                return read;
            }
            Ok(false) => {}
            Err(_) => return self.load_db_after_miss(doc, generation).await,
        }
        let deadline = tokio::time::Instant::now() + lease;
        let mut pause = Duration::from_millis(1);
        loop {
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
            pause = (pause * 2).min(FILL_LEASE_POLL_MAX);
            match self.read_l2(doc, generation).await {
                L2Read::Hit(hit) => {
                    metrics::counter!(FILL_LEASES, "outcome" => "waited").increment(1);
                    return Ok(hit);
                }
                L2Read::Failed => break,
                L2Read::Missed if tokio::time::Instant::now() >= deadline => {
                    metrics::counter!(FILL_LEASES, "outcome" => "timed_out").increment(1);
                    break;
                }
                // The holder gave up without a copy this read may serve (its read failed,
                // or Redis refused its fill): no use waiting out the lease.
                L2Read::Missed if matches!(self.l2.read(&name).await, Ok(None)) => {
                    metrics::counter!(FILL_LEASES, "outcome" => "timed_out").increment(1);
                    break;
                }
                L2Read::Missed => {}
            }
        }
        self.load_db_after_miss(doc, generation).await
    }

    /// [`Tiers::load_db`] for a read Redis did not answer (counted as its miss).
    async fn load_db_after_miss(
        &self,
        doc: &DocRef,
        generation: Started,
    ) -> Result<ReadResult, DbError> {
        self.counters.l2_miss.increment(1);
        self.load_db(doc, generation).await
    }

    /// The Redis answer for a read, or why there is none.
    async fn read_l2(&self, doc: &DocRef, generation: Started) -> L2Read {
        let (resource, ck) = (&doc.resource, &doc.ck);
        if resource.shape_epoch() > self.l2.generation(&resource.name) {
            // The catalog already has the table's new shape, and the flush that retires the
            // old one's copies has not reached this instance yet: Redis may hold copies of
            // the old shape, which the new ETag must not name.
            return L2Read::Failed;
        }
        match self.l2.get(ck).await {
            Ok(Some(copy)) if self.repairs.pending_above(ck, copy.version) => {
                // A committed write of this key has not reached Redis yet.
                L2Read::Missed
            }
            Ok(Some(copy)) if copy.is_servable() => {
                match self.fill_l1(resource, ck, &copy, generation.l1).await {
                    Some(Offer::Refused(known)) if known.version > copy.version => {
                        // L1 knows Redis is behind: go to the source.
                        L2Read::Missed
                    }
                    _ => {
                        self.counters.l2_hit.increment(1);
                        self.sample(doc, Tier::L2, &copy);
                        L2Read::Hit(ReadResult {
                            cached: copy,
                            tier: Tier::L2,
                        })
                    }
                }
            }
            Ok(_) => L2Read::Missed,
            Err(L2Error::Skipped) => L2Read::Failed,
            Err(e) => {
                tracing::debug!(resource = %resource.name, error = %e, "redis read failed; reading postgres");
                L2Read::Failed
            }
        }
    }

    /// Reads Postgres and offers the result to Redis and L1.
    async fn load_db(&self, doc: &DocRef, generation: Started) -> Result<ReadResult, DbError> {
        let copy = self.read_postgres(doc).await?;
        Ok(self.filled_from_postgres(doc, copy, generation).await)
    }

    /// What was read from Postgres (`copy`) offered to Redis and then L1, each in the
    /// generation the read began in; answered with whatever they say.
    async fn filled_from_postgres(
        &self,
        doc: &DocRef,
        copy: Cached,
        generation: Started,
    ) -> ReadResult {
        let (resource, ck) = (&doc.resource, &doc.ck);
        self.counters.db_hit.increment(1);
        let mut newer_exists = false;
        // Only into a Redis this instance trusts: until the guard has checked it, the
        // generations known here may be older than Redis' (an instance that just started
        // knows none), and the copy would land under one nobody reads. A fill only adds a
        // copy, so skipping it is always safe; writes are never skipped.
        if self.l2.available() && self.l2.trusted() {
            match self
                .l2
                .offer_checked(generation.l2, ck, &copy, l2_ttl(resource, &copy))
                .await
            {
                Ok(Stored::Applied | Stored::AlreadyHeld) => {}
                Ok(Stored::Newer) => {
                    metrics::counter!(FILLS_REJECTED, "tier" => "l2").increment(1);
                    // Redis holds a newer version: L1 must not take an older one.
                    newer_exists = true;
                }
                Err(e) => {
                    tracing::debug!(resource = %resource.name, error = %e, "redis fill failed")
                }
            }
        }
        // Postgres is the truth as of this read: answer with it even if a tier refuses it
        // because a newer write landed meanwhile.
        if !newer_exists {
            self.fill_l1(resource, ck, &copy, generation.l1).await;
        }
        ReadResult {
            cached: copy,
            tier: Tier::Db,
        }
    }

    /// Reads many documents of one resource, answering each as [`Tiers::get`] would, in the
    /// order asked: one L1 pass; one Redis `MGET` for what L1 did not answer; then, for what
    /// is still missing, the loads already in flight for those keys are joined and the rest
    /// read in one Postgres query (`= ANY($1)`); every fill goes through the same versioned
    /// offers as a single read. `options` apply to every key.
    ///
    /// # Errors
    /// Per key: only when Postgres had to be asked and failed.
    pub async fn get_many(
        &self,
        docs: &[DocRef],
        options: ReadOptions,
    ) -> Vec<Result<ReadResult, DbError>> {
        let mut answers: Vec<Option<Result<ReadResult, DbError>>> = vec![None; docs.len()];
        let mut missing = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            match self.l1_hit(doc, options).await {
                Some(hit) => answers[i] = Some(Ok(hit)),
                None => missing.push(i),
            }
        }
        if missing.is_empty() {
            return answers.into_iter().flatten().collect();
        }
        let started: Vec<Started> = missing
            .iter()
            .map(|&i| self.started(&docs[i], self.usable_l1()))
            .collect();
        if !options.strong {
            let l1_misses = started.iter().filter(|s| s.l1.is_some()).count();
            self.counters.l1_miss.increment(l1_misses as u64);
        }
        // Redis, for everything L1 did not answer.
        let mut below = Vec::new();
        let fresh = |copy: &Cached| options.min_version.is_none_or(|min| copy.version >= min);
        let from_redis = if options.strong || !self.coherence.l2_trusted() {
            None
        } else {
            let keys: Vec<(&CacheKey, i64)> = missing
                .iter()
                .zip(&started)
                .map(|(&i, s)| (&docs[i].ck, s.l2))
                .collect();
            self.l2.get_many(&keys).await.ok()
        };
        for (j, &i) in missing.iter().enumerate() {
            let doc = &docs[i];
            // As in `read_l2`: no Redis copy of a resource whose new shape's flush has not
            // arrived yet.
            let copy = from_redis
                .as_ref()
                .and_then(|copies| copies[j].clone())
                .filter(|_| doc.resource.shape_epoch() <= started[j].l2);
            let hit = match copy {
                Some(copy)
                    if copy.is_servable()
                        && fresh(&copy)
                        && !self.repairs.pending_above(&doc.ck, copy.version) =>
                {
                    match self
                        .fill_l1(&doc.resource, &doc.ck, &copy, started[j].l1)
                        .await
                    {
                        // L1 knows Redis is behind: go to the source.
                        Some(Offer::Refused(known)) if known.version > copy.version => None,
                        _ => Some(copy),
                    }
                }
                _ => None,
            };
            match hit {
                Some(copy) => {
                    self.counters.l2_hit.increment(1);
                    self.sample(doc, Tier::L2, &copy);
                    answers[i] = Some(Ok(ReadResult {
                        cached: copy,
                        tier: Tier::L2,
                    }));
                }
                None => {
                    if from_redis.is_some() {
                        self.counters.l2_miss.increment(1);
                    }
                    below.push(j);
                }
            }
        }
        // Postgres: join the loads in flight, read the rest at once.
        let (joined, queried): (Vec<usize>, Vec<usize>) = below
            .into_iter()
            .partition(|&j| !options.strong && self.flights.is_running(&docs[missing[j]].ck));
        let joins = joined.iter().map(|&j| {
            let doc = &docs[missing[j]];
            let generation = started[j];
            async move {
                let read = self
                    .flights
                    .run(&doc.ck, self.load(doc, generation))
                    .await?;
                if fresh(&read.cached) {
                    Ok(read)
                } else {
                    self.load_db(doc, generation).await
                }
            }
        });
        let joined_answers = futures_util::future::join_all(joins).await;
        for (&j, answer) in joined.iter().zip(joined_answers) {
            answers[missing[j]] = Some(answer);
        }
        if !queried.is_empty() {
            let resource = &docs[missing[queried[0]]].resource;
            let keys: Vec<&KeyParam> = queried.iter().map(|&j| &docs[missing[j]].key).collect();
            match self.db.get_many(resource, &keys).await {
                Ok(rows) => {
                    let fills = queried.iter().map(|&j| {
                        let doc = &docs[missing[j]];
                        // `get`, not `remove`: a key asked twice (or `7` and `07`) is one row.
                        let copy = match rows.get(&doc.key.to_string()) {
                            Some((version, body)) => {
                                self.saw(*version);
                                Cached::value(*version, body.clone())
                            }
                            None => Cached::absent(Version::NONE),
                        };
                        self.filled_from_postgres(doc, copy, started[j])
                    });
                    let filled = futures_util::future::join_all(fills).await;
                    for (&j, read) in queried.iter().zip(filled) {
                        answers[missing[j]] = Some(Ok(read));
                    }
                }
                Err(e) => {
                    for &j in &queried {
                        answers[missing[j]] = Some(Err(e.clone()));
                    }
                }
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(DbError::Internal("a key was not answered".into()))))
            .collect()
    }

    /// Offers a copy to L1 (if it is to be filled), counting refusals.
    async fn fill_l1(
        &self,
        resource: &Resource,
        ck: &CacheKey,
        copy: &Cached,
        generation: Option<u32>,
    ) -> Option<Offer> {
        let l1 = self.l1.as_ref()?;
        let generation = generation?;
        let offer = l1.offer_in(generation, ck, copy.clone(), l1_ttl(resource, copy));
        if matches!(offer, Offer::Refused(_)) {
            metrics::counter!(FILLS_REJECTED, "tier" => "l1").increment(1);
        }
        Some(offer)
    }

    /// Writes one document: Postgres (acknowledged at commit, which with
    /// [`Commit::Synchronous`] waits for every live instance to have applied it), then Redis
    /// (and the message telling the other instances), then L1.
    ///
    /// Run it to completion (spawned): a write abandoned between commit and cache updates
    /// would leave Redis behind until its repair.
    ///
    /// # Errors
    /// Postgres' failure; nothing was committed.
    pub async fn put(
        &self,
        doc: &DocRef,
        body: crate::model::JsonText,
        pre: Precondition,
        commit: Commit,
    ) -> Result<WriteOutcome, DbError> {
        let generation = self.started(doc, self.l1.as_ref().map(L1::generation));
        let mut outcome = self
            .db
            .put(&doc.resource, &doc.key, body, pre, commit)
            .await?;
        if let WriteOutcome::Written(w) = &mut outcome {
            self.saw(w.version);
            let copy = Cached::value(w.version, w.doc.clone());
            if let Some(conflict) = self.settle(doc, copy, Op::Put, generation).await {
                // Committed already: a failed repair is logged, never the write's answer.
                let repaired = self
                    .repair_regression(doc, w.version, conflict)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "repairing a write below a cached version failed");
                        None
                    });
                if let Some(fresh) = repaired {
                    if let State::Value(body) = &fresh.state {
                        w.version = fresh.version;
                        w.doc = body.clone();
                    }
                    let generation = self.started(doc, self.l1.as_ref().map(L1::generation));
                    let op = if fresh.is_servable() && fresh.doc().is_some() {
                        Op::Put
                    } else {
                        Op::Delete
                    };
                    self.settle(doc, fresh, op, generation).await;
                }
            }
        }
        Ok(outcome)
    }

    /// Deletes one document: Postgres (acknowledged at commit), then a versioned absence in
    /// Redis and L1 that refuses any older fill still in flight.
    ///
    /// # Errors
    /// Postgres' failure; nothing was committed.
    pub async fn delete(
        &self,
        doc: &DocRef,
        pre: Precondition,
        commit: Commit,
    ) -> Result<DeleteOutcome, DbError> {
        let generation = self.started(doc, self.l1.as_ref().map(L1::generation));
        let mut outcome = self.db.delete(&doc.resource, &doc.key, pre, commit).await?;
        if let DeleteOutcome::Deleted { version } = &mut outcome {
            self.saw(*version);
            let absent = Cached::absent(*version);
            if let Some(conflict) = self.settle(doc, absent, Op::Delete, generation).await {
                let repaired = self
                    .repair_regression(doc, *version, conflict)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "repairing a delete below a cached version failed");
                        None
                    });
                if let Some(fresh) = repaired {
                    *version = fresh.version;
                    let generation = self.started(doc, self.l1.as_ref().map(L1::generation));
                    let op = if fresh.doc().is_some() {
                        Op::Put
                    } else {
                        Op::Delete
                    };
                    self.settle(doc, fresh, op, generation).await;
                }
            }
        }
        Ok(outcome)
    }

    /// Brings Redis and L1 up to a committed copy and tells the other instances. A Redis
    /// failure is queued for repair, never returned: the write is committed and is
    /// acknowledged. (The Postgres feed tells the other instances in that case.)
    async fn settle(
        &self,
        doc: &DocRef,
        copy: Cached,
        op: Op,
        generation: Started,
    ) -> Option<Conflict> {
        let (resource, ck) = (&doc.resource, &doc.ck);
        // A load in flight may have read before this commit: nobody asking from now on joins it.
        self.flights.forget(ck);
        let message = if self.coherence.redis.enabled() {
            let key = ck.as_str().split_once(':').map_or("", |(_, k)| k);
            serde_json::to_string(&Message {
                resource: resource.name.clone(),
                key: Some(key.to_string()),
                version: copy.version.0,
                op,
                ts_us: Some(now_ms() as i64 * 1000),
                instance: Some(self.instance_id.to_string()),
            })
            .unwrap_or_default()
        } else {
            String::new()
        };
        let result = if self.l2.available() {
            self.l2
                .offer_and_publish(generation.l2, ck, &copy, l2_ttl(resource, &copy), &message)
                .await
        } else {
            Err(L2Error::Skipped)
        };
        // A tier that refuses a just-committed copy holds a newer version (a later commit
        // that got there first, or a version Postgres never reached: it went back), or the
        // same version with other content (the sequence handed it out twice).
        let mut held = Vec::new();
        match result {
            Ok(Stored::Newer | Stored::AlreadyHeld) => {
                if let Ok(Some((copy, _))) = self.l2.inspect(ck).await {
                    held.push(copy);
                }
            }
            Ok(Stored::Applied) => {}
            Err(e) => {
                metrics::counter!(L2_WRITE_FAILURES).increment(1);
                tracing::warn!(resource = %resource.name, version = %copy.version, error = %e,
                    "redis update failed after commit; queued for repair");
                let repair = match copy.state {
                    State::Value(_) => Cached::invalidated(copy.version),
                    _ => copy.clone(),
                };
                self.repairs
                    .push(ck.clone(), repair, resource.ttl.tombstone_ttl);
            }
        }
        let mut applied = true;
        if let (Some(l1), Some(generation)) = (&self.l1, generation.l1) {
            if let Offer::Refused(_) =
                l1.offer_in(generation, ck, copy.clone(), l1_ttl(resource, &copy))
            {
                applied = false;
                if let Some(cached) = l1.get(ck) {
                    held.push(cached);
                }
            }
        }
        if applied {
            let key = ck.as_str().split_once(':').map_or("", |(_, k)| k);
            self.watch
                .change(&resource.name, Some(key), copy.version.0, op);
        }
        held.into_iter()
            .filter_map(|h| {
                if h.version > copy.version {
                    Some(Conflict::Newer(h.version))
                } else if h.version == copy.version && h.is_servable() && h.state != copy.state {
                    Some(Conflict::Collision(h.version))
                } else {
                    None
                }
            })
            .max_by_key(|c| c.version())
    }

    /// A write committed at `written`, but a tier holds `conflict`: a newer version, or the
    /// same version with other content. When Postgres cannot have that version for the key
    /// (its sequence is behind it, the row is at a lower version, or the version was handed
    /// out twice), the write would be unreadable, even by its writer. Then: if the sequence went
    /// back, reset every cached resource ([`Tiers::postgres_went_back`], which also moves the
    /// sequence past everything seen); and give the key a fresh version, returned with the
    /// document as Postgres has it (an absence at a fresh version if the row is gone).
    /// Counted in `syncar_version_regressions_total`, logged at error level. `Ok(None)` when
    /// the newer copy is a later commit (nothing wrong).
    async fn repair_regression(
        &self,
        doc: &DocRef,
        written: Version,
        conflict: Conflict,
    ) -> Result<Option<Cached>, DbError> {
        let seen = conflict.version();
        let identity = self.db.identity().await?;
        let current = self.db.get(&doc.resource, &doc.key).await?;
        let current_version = current.as_ref().map(|(v, _)| *v);
        let sequence_behind =
            identity.last_version < seen || matches!(conflict, Conflict::Collision(_));
        // The row exists below a cached version: that version never committed for it (or a
        // delete's version outran a re-insert's, see ARCHITECTURE.md's known limits).
        let row_behind = current_version.is_some_and(|v| v < seen);
        if !sequence_behind && !row_behind {
            return Ok(None); // a later commit got to the tiers first
        }
        metrics::counter!(VERSION_REGRESSIONS).increment(1);
        tracing::error!(
            resource = %doc.resource.name,
            written = written.0,
            cached = seen.0,
            postgres_row = current_version.map(|v| v.0),
            postgres_sequence = identity.last_version.0,
            "a write committed below a version a cache holds for its key, which Postgres \
             does not have; giving the key a fresh version"
        );
        if sequence_behind {
            let high = seen.max(self.high_water());
            let why = format!(
                "its version sequence is at {} but a cache holds version {} ({:?})",
                identity.last_version.0, seen.0, conflict
            );
            if let Err(e) = self.postgres_went_back(high, &why).await {
                tracing::error!(error = %e, "resetting the caches failed; advancing the sequence only");
                self.db.advance_sequence(high).await?;
            }
        }
        let fresh = match self.db.restamp(&doc.resource, &doc.key).await? {
            Some((version, body)) => Cached::value(version, body),
            None => Cached::absent(self.db.next_version().await?),
        };
        self.saw(fresh.version);
        Ok(Some(fresh))
    }

    /// Runs `ops` in one Postgres transaction, all or nothing ([`Db::transact`]); once it is
    /// committed, updates Redis and L1 for each as a single write would, in order.
    ///
    /// # Errors
    /// The operation that failed, and why; nothing was committed.
    pub async fn transact(
        &self,
        ops: &[(DocRef, TxOp)],
        commit: Commit,
    ) -> Result<Vec<TxDone>, TxFailed> {
        let started: Vec<Started> = ops
            .iter()
            .map(|(doc, _)| self.started(doc, self.l1.as_ref().map(L1::generation)))
            .collect();
        let items: Vec<TxItem> = ops
            .iter()
            .map(|(doc, op)| TxItem {
                resource: &doc.resource,
                key: &doc.key,
                op,
            })
            .collect();
        let done = self.db.transact(&items, commit).await?;
        for (((doc, _), outcome), generation) in ops.iter().zip(&done).zip(started) {
            let (copy, op) = match outcome {
                TxDone::Written(w) => (Cached::value(w.version, w.doc.clone()), Op::Put),
                TxDone::Deleted { version } => (Cached::absent(*version), Op::Delete),
                TxDone::NotFound => continue,
            };
            self.saw(copy.version);
            if let Some(conflict) = self.settle(doc, copy, op, generation).await {
                // A tier ahead of Postgres: the next check of Postgres' history (a feed
                // reconnecting, the auditor) deals with it; a single write repairs at once.
                tracing::warn!(resource = %doc.resource.name, ?conflict, "a transaction's write was refused by a cache");
            }
        }
        Ok(done)
    }

    /// Applies an invalidation from a feed: a tombstone (or, for a delete, an absence) at the
    /// message's version in L1, and, from the Postgres feed, in Redis too, which repairs Redis
    /// after writes that never went through syncar. A flush empties L1 and raises the
    /// resource's generation in Redis. Returns whether it taught anything new (false for
    /// duplicates and for versions older than what is known: no-ops).
    pub async fn apply(&self, catalog: &Catalog, message: &Message, feed: Feed) -> bool {
        self.apply_to(catalog, message, feed == Feed::Postgres)
            .await
    }

    /// Applies a change the relay has already applied to Redis (the `wal` source): L1 only,
    /// and for a flush, the generation the relay raised.
    pub async fn apply_relayed(&self, catalog: &Catalog, message: &Message) -> bool {
        self.apply_to(catalog, message, false).await
    }

    async fn apply_to(&self, catalog: &Catalog, message: &Message, redis: bool) -> bool {
        if invalidation(message).is_none() && catalog.knows(&message.resource) {
            // A resource-wide flush, of a resource served or left out (a left-out one's
            // copies must not come back when it is served again). The new generation first,
            // so that nothing read from Redis after L1 is emptied comes from the old one.
            self.saw(Version(message.version));
            let name = &message.resource;
            self.l2.note_generation(name, message.version);
            // L1 holds nothing of a left-out resource that will be served (it is emptied
            // when the resource is served again): a table that no longer fits, flushed at
            // each of its writes, does not empty L1 for the others.
            if let (Some(l1), Some(_)) = (&self.l1, catalog.get(name)) {
                l1.clear();
            }
            if redis {
                if let Err(e) = self.l2.raise_generation(name, message.version).await {
                    tracing::warn!(resource = %name, error = %e, "raising a resource's generation in redis failed");
                }
            }
            // A flush may be a table's new shape (or a TRUNCATE: a recheck finds nothing).
            self.catalog.request_recheck();
            self.watch.change(name, None, message.version, Op::Flush);
            return true;
        }
        let Some(resource) = catalog.get(&message.resource) else {
            return false; // not a resource of this instance
        };
        self.saw(Version(message.version));
        let Some(copy) = invalidation(message) else {
            return false;
        };
        let Some(key) = &message.key else {
            return false;
        };
        let ck = CacheKey::new(&resource.name, key);
        // New to this instance: judged by L1 when there is one, else by Redis.
        let mut fresh = None;
        if let Some(l1) = &self.l1 {
            fresh = Some(l1.offer(&ck, copy.clone(), l1_ttl(resource, &copy)) == Offer::Applied);
        }
        // Whatever it taught L1, a load in flight may predate this change.
        self.flights.forget(&ck);
        if redis {
            let result = if self.l2.available() {
                self.l2.offer(&ck, &copy, l2_ttl(resource, &copy)).await
            } else {
                Err(L2Error::Skipped)
            };
            match result {
                Ok(applied) => fresh = fresh.or(Some(applied)),
                // Redis must still learn of it (a plain-SQL write has no other way there).
                Err(_) => self
                    .repairs
                    .push(ck.clone(), copy.clone(), resource.ttl.tombstone_ttl),
            }
        }
        // Without L1 nothing tells a change from its second delivery: every one is sent.
        let fresh = fresh.unwrap_or(self.l1.is_none());
        if fresh {
            self.watch
                .change(&resource.name, Some(key), message.version, message.op);
        }
        fresh
    }

    /// Applies committed changes to Redis only: a tombstone (or absence) per key, a
    /// generation raise per flush, each landing only where Redis holds something older. The
    /// relay of the `wal` source applies its stream this way (instances apply it to their L1
    /// when the relay's message reaches them), and a feed that recovers replays the changes
    /// log this way.
    ///
    /// On one Redis node the keys go in script calls of [`OFFER_CHUNK`] keys each
    /// ([`L2::offer_many`]), concurrently; in a cluster (keys of many hash slots) one call
    /// per key, concurrently: order does not matter (Redis takes only strictly newer
    /// versions) and the connection pipelines what is in flight; one by one, a large log
    /// took seconds. Each key lands in its resource's generation as known before the
    /// batch's flushes are applied: a copy older than a flush of the same batch is never
    /// read again, a newer one is only missed once.
    ///
    /// # Errors
    /// The first Redis failure: the relay acknowledges nothing and the changes come again.
    pub async fn apply_to_redis(
        &self,
        catalog: &Catalog,
        changes: &[Message],
    ) -> Result<(), L2Error> {
        self.apply_batch(catalog, changes, None).await.map(|_| ())
    }

    /// [`Tiers::apply_to_redis`], then `message` published on `channel`, in the script call
    /// of the last keys where Redis allows it (one node, no flush in the batch): instances
    /// hear the batch one round trip sooner, and never before Redis holds all of it. Returns
    /// whether `message` went out; if not, the caller publishes it.
    ///
    /// # Errors
    /// The first Redis failure: the message may or may not have gone out, and the relay
    /// acknowledges nothing (the changes come again).
    pub async fn apply_and_publish(
        &self,
        catalog: &Catalog,
        changes: &[Message],
        channel: &str,
        message: &str,
    ) -> Result<bool, L2Error> {
        self.apply_batch(catalog, changes, Some((channel, message)))
            .await
    }

    async fn apply_batch(
        &self,
        catalog: &Catalog,
        changes: &[Message],
        publish: Option<(&str, &str)>,
    ) -> Result<bool, L2Error> {
        use futures_util::TryStreamExt;
        if let Some(high) = changes.iter().map(|c| c.version).max() {
            self.saw(Version(high));
        }
        let mut copies = Vec::new();
        let mut flushes = Vec::new();
        for change in changes {
            match (invalidation(change), &change.key) {
                (Some(copy), Some(key)) => {
                    let Some(resource) = catalog.get(&change.resource) else {
                        continue;
                    };
                    let ck = CacheKey::new(&resource.name, key);
                    // Whatever it does to Redis, a load in flight here may predate this change.
                    self.flights.forget(&ck);
                    let ttl = l2_ttl(resource, &copy);
                    copies.push((ck, copy, ttl));
                }
                _ if catalog.knows(&change.resource) => flushes.push(change),
                _ => {}
            }
        }
        // The message rides with the last keys only when nothing follows them.
        let riding = publish.filter(|_| flushes.is_empty() && !copies.is_empty());
        if self.l2.publishes_anywhere() {
            let chunks: Vec<_> = copies.chunks(OFFER_CHUNK).collect();
            if let Some((last, rest)) = chunks.split_last() {
                futures_util::future::try_join_all(
                    rest.iter().map(|chunk| self.l2.offer_many(chunk, "", "")),
                )
                .await?;
                let (channel, message) = riding.unwrap_or(("", ""));
                self.l2.offer_many(last, channel, message).await?;
            }
        } else {
            futures_util::stream::iter(copies.iter().map(Ok))
                .try_for_each_concurrent(APPLY_CONCURRENCY, |(ck, copy, ttl)| async move {
                    self.l2.offer(ck, copy, *ttl).await.map(|_| ())
                })
                .await?;
        }
        for change in flushes {
            self.l2
                .raise_generation(&change.resource, change.version)
                .await?;
        }
        Ok(riding.is_some() && self.l2.publishes_anywhere())
    }

    /// Claims (or extends) the relay's lease in Redis for `holder`; see [`L2::claim`].
    ///
    /// # Errors
    /// Redis failing: `holder` must assume it does not hold the lease.
    pub async fn claim_relay(&self, holder: &str, ttl: Duration) -> Result<bool, L2Error> {
        self.l2.claim(RELAY_LEASE, holder, ttl).await
    }

    /// Gives up the relay's lease if `holder` still holds it.
    ///
    /// # Errors
    /// Redis failing (the lease then expires by itself).
    pub async fn release_relay(&self, holder: &str) -> Result<(), L2Error> {
        self.l2.release(RELAY_LEASE, holder).await
    }

    /// Who holds the relay's lease now, if anyone.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn relay_holder(&self) -> Result<Option<String>, L2Error> {
        self.l2.read(RELAY_LEASE).await
    }

    /// The epoch of the replication slot whose changes Redis holds (see
    /// [`crate::schema::capture::STATE_TABLE`]); `None` when no relay has fed it yet.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn fed_by_slot(&self) -> Result<Option<i64>, L2Error> {
        Ok(self.l2.read(SLOT_EPOCH).await?.and_then(|v| v.parse().ok()))
    }

    /// Records that Redis now holds the changes of the slot of `epoch`.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn record_fed_by_slot(&self, epoch: i64) -> Result<(), L2Error> {
        self.l2.write(SLOT_EPOCH, &epoch.to_string()).await
    }

    /// With Sentinel, moves to the master the Sentinels name if it changed (see
    /// [`L2::follow_master`]); Redis is then distrusted until [`Tiers::secure_redis`] has
    /// checked it. Whether it moved.
    ///
    /// # Errors
    /// No Sentinel named a master that answers as one.
    pub async fn follow_redis_master(&self) -> Result<bool, String> {
        self.l2.follow_master().await.map_err(|e| e.to_string())
    }

    /// The Redis node commands go to (`host:port`), and why the Sentinels were last asked in
    /// vain, if they were; for `/readyz`.
    pub fn redis_node(&self) -> (String, Option<String>) {
        (self.l2.node(), self.l2.sentinel_error())
    }

    /// Makes sure Redis is an incarnation reads may trust, and trusts it; see
    /// [`RedisCheck`]. A new incarnation (a restart, perhaps from an older RDB or AOF; a
    /// failover, perhaps to a lagging replica) may hold copies older than writes already
    /// acknowledged, which the version rule would then protect. So, once per incarnation
    /// across the fleet (under a row lock in the state table, which records the `run_id`
    /// handled last), every resource's generation is raised to a fresh version: nothing
    /// Redis held before is reachable. Every instance then re-reads the generations and
    /// empties its L1, which may hold copies read from the new incarnation before it was
    /// noticed. Reads skip Redis from a failure until this has run.
    ///
    /// # Errors
    /// Redis or Postgres failing: Redis stays distrusted, and the guard retries.
    pub async fn secure_redis(&self, catalog: &Catalog) -> Result<RedisCheck, String> {
        // A failure after this point may come from yet another incarnation: then the trust
        // below is not granted, and the guard checks again.
        let checked = self.l2.distrusts();
        let id = self.l2.identity().await.map_err(|e| e.to_string())?;
        if self.l2.follows_sentinel() && (!self.l2.master_named() || id.role != "master") {
            // A demoted master keeps its run_id: without this, it would pass as the same
            // incarnation while the Sentinels have moved on.
            return Err(format!(
                "redis node {} is not a master the Sentinels name (role {:?})",
                self.l2.node(),
                id.role
            ));
        }
        let Some(run_id) = id.run_id.clone() else {
            if !self.l2.trusted() {
                tracing::debug!("redis refuses INFO: a new incarnation cannot be detected");
            }
            self.l2.trust(None, checked);
            return Ok(RedisCheck::Unknown);
        };
        let known = self.l2.incarnation();
        if known.as_deref() == Some(run_id.as_str()) {
            self.l2.trust(Some(&run_id), checked);
            return Ok(RedisCheck::Same);
        }
        let resources = catalog.all_names();
        let l2 = self.l2.clone();
        let name = format!("redis_run_id:{}", self.l2.prefix());
        let (raised, before) = self
            .db
            .once_per_state(&name, &run_id, |version| async move {
                for resource in &resources {
                    l2.raise_generation(resource, version.0)
                        .await
                        .map_err(|e| format!("raising {resource}'s generation failed: {e}"))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?;
        self.l2
            .load_generations()
            .await
            .map_err(|e| format!("reading generations failed: {e}"))?;
        if known.is_some() {
            if let Some(l1) = &self.l1 {
                l1.clear();
            }
            self.watch
                .reset("redis is a new incarnation; L1 was emptied");
        }
        self.l2.trust(Some(&run_id), checked);
        match raised {
            Some(version) => {
                metrics::counter!(TIER_RESETS, "tier" => "redis", "reason" => "new_incarnation")
                    .increment(1);
                tracing::error!(
                    run_id = %run_id,
                    was = %before,
                    role = %id.role,
                    replid = %id.replid,
                    repl_offset = id.repl_offset,
                    generation = version.0,
                    "redis is a new incarnation (a restart or a failover): what it holds may be \
                     older than acknowledged writes, so every resource's generation was raised \
                     and nothing it held before is read"
                );
                Ok(RedisCheck::Reset(version))
            }
            None if before.is_empty() => {
                tracing::info!(run_id = %run_id, "recorded redis' incarnation");
                Ok(RedisCheck::Adopted)
            }
            None => {
                if known.is_some() {
                    tracing::warn!(run_id = %run_id, "redis is a new incarnation, already made safe by another instance; emptied L1");
                }
                Ok(RedisCheck::Adopted)
            }
        }
    }

    /// Whether reads may use Redis now (see [`Tiers::secure_redis`]).
    pub fn redis_trusted(&self) -> bool {
        self.l2.trusted()
    }

    /// Checks that Postgres has not gone back in time since this instance (or, through
    /// Redis' `{prefix}postgres` record, any instance) last looked: the same system and
    /// timeline, and a version sequence at or past every version seen. Run when a Postgres
    /// feed (re)connects and when the relay starts, never on an idle timer. When it went
    /// back, see [`Tiers::postgres_went_back`]. Then records what it found. With Redis down
    /// only this instance's memory is compared.
    ///
    /// # Errors
    /// Postgres failing, or the reset failing (the caller retries).
    pub async fn secure_postgres(&self) -> Result<Option<Version>, String> {
        // Everything seen before the sequence is read cannot be above it, unless it went
        // back: the high-water mark first (read after, a write committed meanwhile would look
        // like a sequence gone back).
        let record = self.l2.postgres_record().await.ok();
        let recorded = |field: &str| record.as_ref().and_then(|r| r.get(field)).cloned();
        let recorded_high: i64 = recorded("high_water")
            .and_then(|h| h.parse().ok())
            .unwrap_or(0);
        let high = self.high_water().max(Version(recorded_high));
        let id = self.db.identity().await.map_err(|e| e.to_string())?;
        let timeline = recorded("timeline");
        let moved = timeline_moved(&id, timeline.as_deref());
        // The slot followed, and on the timeline left the primary held decoding back for
        // its standby: nothing relayed is missing here.
        let guarded =
            moved.is_some_and(|was| recorded(&format!("failover_guarded:{was}")).is_some());
        let followed = guarded && self.slot_followed().await;
        let why = went_back(
            &id,
            recorded("system").as_deref(),
            timeline.as_deref(),
            high,
            followed,
        );
        if let (Some(was), true) = (moved, why.is_empty()) {
            tracing::warn!(
                from = %was,
                to = ?id.timeline,
                "postgres is on a new timeline (a promoted standby): the relay's replication \
                 slot was synchronized to it, so the caches are kept and the relay continues \
                 from the slot"
            );
        }
        let reset = if why.is_empty() {
            None
        } else {
            Some(self.postgres_went_back(high, &why.join("; ")).await?)
        };
        self.saw(id.last_version);
        if record.is_some() {
            let _ = self
                .l2
                .record_postgres(id.system.as_deref(), id.timeline, self.high_water().0)
                .await;
        }
        Ok(reset)
    }

    /// Whether the relay's replication slot on this server was synchronized from the primary
    /// it replaced (see [`went_back`]); `false` for the other sources, whose position no
    /// slot keeps, and when it cannot be read.
    async fn slot_followed(&self) -> bool {
        let Ok(catalog) = self.catalog.get() else {
            return false;
        };
        if catalog.capture.source != crate::config::PostgresSource::Wal {
            return false;
        }
        self.db
            .slot_synced(&catalog.capture.slot)
            .await
            .unwrap_or(false)
    }

    /// Postgres went back in time (`why`): caches may hold versions it will hand out again
    /// for other data, or copies of commits it lost. Moves the version sequence past `high`,
    /// raises every resource's generation to a fresh version (nothing cached in Redis is
    /// reachable), tells every instance to empty L1 (a flush message per resource on the
    /// Redis feed), empties this one's. Counted in `syncar_tier_resets_total{tier="postgres"}`,
    /// logged at error level. Returns the generation.
    ///
    /// # Errors
    /// Postgres or Redis failing: the caches are not known clean, so the caller retries.
    pub async fn postgres_went_back(&self, high: Version, why: &str) -> Result<Version, String> {
        self.db
            .advance_sequence(high)
            .await
            .map_err(|e| e.to_string())?;
        let version = self.db.next_version().await.map_err(|e| e.to_string())?;
        let catalog = self.catalog.get().map_err(|e| e.to_string())?;
        for resource in catalog.all_names() {
            self.l2
                .raise_generation(&resource, version.0)
                .await
                .map_err(|e| format!("raising {resource}'s generation failed: {e}"))?;
            let flush = Message {
                resource: resource.clone(),
                key: None,
                version: version.0,
                op: Op::Flush,
                ts_us: Some(now_ms() as i64 * 1000),
                instance: Some(self.instance_id.to_string()),
            };
            if let Ok(text) = serde_json::to_string(&flush) {
                let _ = self.l2.publish(&self.l2.invalidation_channel(), text).await;
            }
        }
        if let Some(l1) = &self.l1 {
            l1.clear();
        }
        self.watch
            .reset("postgres went back in time; every cache was reset");
        self.saw(version);
        let _ = self.l2.raise_high_water(version.0).await;
        metrics::counter!(TIER_RESETS, "tier" => "postgres", "reason" => "went_back").increment(1);
        tracing::error!(
            why,
            generation = version.0,
            "postgres went back in time: moved its version sequence past every version seen, \
             and made every cached copy unreachable"
        );
        Ok(version)
    }

    /// Distrusts Redis (reads skip it) until [`Tiers::secure_redis`] has run.
    pub fn distrust_redis(&self) {
        self.l2.distrust();
    }

    /// Completes when Redis has been distrusted (one waiter: the Redis guard).
    pub async fn redis_distrusted(&self) {
        self.l2.distrusted().await;
    }

    /// Records that this timeline's primary guards a failover (see
    /// [`L2::record_failover_guarded`]).
    ///
    /// # Errors
    /// Redis failing.
    pub async fn record_failover_guarded(&self, timeline: i32) -> Result<(), L2Error> {
        self.l2.record_failover_guarded(timeline).await
    }

    /// Reads every resource's generation from Redis; see [`L2::load_generations`].
    ///
    /// # Errors
    /// The command's failure.
    pub async fn load_generations(&self) -> Result<(), L2Error> {
        self.l2.load_generations().await
    }

    /// Repairs Redis from the changes log: every key changed within the last `ago` (by
    /// Postgres' clock) gets a tombstone of its newest logged version, which lands only where
    /// Redis holds something older. Returns how many keys were replayed.
    ///
    /// # Errors
    /// Reading the log failed, or the first Redis failure.
    pub async fn replay_changes_log(
        &self,
        catalog: &Catalog,
        ago: Duration,
    ) -> Result<usize, ReplayError> {
        let changes = self.db.changes_since(ago).await?;
        self.apply_to_redis(catalog, &changes).await?;
        Ok(changes.len())
    }

    /// Drops every key under this deployment's prefix from Redis (when a repair key by key is
    /// no longer possible). Returns how many keys were removed.
    ///
    /// # Errors
    /// The first Redis failure.
    pub async fn flush_redis(&self) -> Result<u64, L2Error> {
        self.l2.flush_prefix().await
    }

    /// Empties L1 (a feed came back: nothing cached before may be served), counted for
    /// `feed`. Nothing loading before this call lands after it (see [`L1::clear`]).
    pub fn flush_l1(&self, feed: Feed) {
        if let Some(l1) = &self.l1 {
            l1.clear();
            metrics::counter!(L1_FLUSHES, "feed" => feed.as_str()).increment(1);
        }
        self.watch.reset(&format!(
            "the {} feed came back after an outage; re-read",
            feed.as_str()
        ));
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

    /// Tells watchers this instance can no longer vouch that it hears every change.
    pub fn watch_reset(&self, reason: &str) {
        self.watch.reset(reason);
    }

    /// L1's entries and weighted bytes, if there is an L1.
    pub fn l1_size(&self) -> Option<(u64, u64)> {
        self.l1
            .as_ref()
            .map(|l1| (l1.entry_count(), l1.weighted_size()))
    }

    /// `SELECT 1` through the pool.
    ///
    /// # Errors
    /// Why Postgres cannot be used.
    pub async fn ping_postgres(&self) -> Result<(), DbError> {
        self.db.ping().await
    }

    /// `PING` on the command connection.
    ///
    /// # Errors
    /// Why Redis cannot be used.
    pub async fn ping_redis(&self) -> Result<(), L2Error> {
        self.l2.ping().await
    }

    /// Prunes the changes log past `retention` (one instance at a time does the work);
    /// returns the rows deleted.
    ///
    /// # Errors
    /// Postgres failing.
    pub async fn prune_changes_log(&self, retention: Duration) -> Result<u64, DbError> {
        self.db.prune_changes(retention).await
    }

    /// Publishes `payload` on `channel` (heartbeats).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn publish(&self, channel: &str, payload: String) -> Result<(), L2Error> {
        self.l2.publish(channel, payload).await
    }

    /// A Redis subscription of its own to `channels`; see [`L2::subscribe`].
    ///
    /// # Errors
    /// Connecting or subscribing failed or timed out.
    pub async fn subscribe(
        &self,
        channels: &[String],
        timeout: Duration,
    ) -> Result<futures_util::stream::BoxStream<'static, redis::Msg>, L2Error> {
        self.l2.subscribe(channels, timeout).await
    }

    /// A subscription to `channels` with heartbeat channels of its own; see
    /// [`L2::subscribe_with_heartbeats`].
    ///
    /// # Errors
    /// Reading the layout, connecting or subscribing failed or timed out.
    pub async fn subscribe_with_heartbeats(
        &self,
        channels: &[String],
        suffix: &str,
        timeout: Duration,
    ) -> Result<
        (
            futures_util::stream::BoxStream<'static, redis::Msg>,
            Vec<String>,
        ),
        L2Error,
    > {
        self.l2
            .subscribe_with_heartbeats(channels, suffix, timeout)
            .await
    }

    /// Every channel writes are announced on; see [`L2::invalidation_channels`].
    pub fn invalidation_channels(&self) -> Vec<String> {
        self.l2.invalidation_channels()
    }

    /// How many connections subscribe to `channel`; see [`L2::subscribers`].
    ///
    /// # Errors
    /// The command's failure.
    pub async fn subscribers(&self, channel: &str) -> Result<u64, L2Error> {
        self.l2.subscribers(channel).await
    }

    /// The channel writes through syncar are announced on.
    pub fn invalidation_channel(&self) -> String {
        self.l2.invalidation_channel()
    }

    /// Runs the Redis repair loop until `shutdown`, then makes a last attempt bounded by
    /// `final_drain` (see [`Repairs::run`]).
    pub async fn run_repairs(&self, shutdown: CancellationToken, final_drain: Duration) {
        self.repairs.run(&self.l2, shutdown, final_drain).await;
    }

    /// Keys waiting for a Redis repair.
    pub fn pending_repairs(&self) -> usize {
        self.repairs.len()
    }

    /// The copy L1 holds for `ck` in its current generation, tombstones included, without
    /// counting a hit (for inspection: tests, debugging).
    pub fn peek_l1(&self, ck: &CacheKey) -> Option<Cached> {
        self.l1.as_ref()?.get(ck)
    }

    /// Offers `copy` to L1 directly, as an invalidation or write would (for tests that force
    /// an interleaving). `None` without an L1.
    pub fn offer_l1(&self, ck: &CacheKey, copy: Cached, ttl: Duration) -> Option<Offer> {
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

/// The Redis key (under the prefix) of the relay's lease.
const RELAY_LEASE: &str = "relay";
/// The Redis key (under the prefix) naming the slot epoch whose changes Redis holds.
const SLOT_EPOCH: &str = "slot_epoch";

/// Why a replay of the changes log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the changes log failed")]
    Postgres(#[from] DbError),
    #[error("applying the changes log to redis failed")]
    Redis(#[from] L2Error),
}

/// What a message leaves in a tier: a tombstone for a put, the absence for a delete; `None`
/// for a resource-wide flush.
fn invalidation(message: &Message) -> Option<Cached> {
    let version = Version(message.version);
    match message.op {
        Op::Put => Some(Cached::invalidated(version)),
        Op::Delete => Some(Cached::absent(version)),
        Op::Flush => None,
    }
}

/// How long a copy lives in L1. Values and cached absences are jittered; tombstones are not,
/// so none lives shorter than the configured `tombstone_ttl` the config check relies on.
fn l1_ttl(resource: &Resource, copy: &Cached) -> Duration {
    let t = &resource.ttl;
    match (&copy.state, copy.version) {
        (State::Value(_), _) => jitter(t.l1_ttl, t.ttl_jitter),
        (State::Absent, Version::NONE) => jitter(t.negative_ttl, t.ttl_jitter),
        _ => t.tombstone_ttl,
    }
}

/// How long a copy lives in Redis; see [`l1_ttl`].
fn l2_ttl(resource: &Resource, copy: &Cached) -> Duration {
    let t = &resource.ttl;
    match (&copy.state, copy.version) {
        (State::Value(_), _) => jitter(t.l2_ttl, t.ttl_jitter),
        (State::Absent, Version::NONE) => jitter(t.negative_ttl, t.ttl_jitter),
        _ => t.tombstone_ttl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres(system: &str, timeline: i32, last: i64) -> PostgresIdentity {
        PostgresIdentity {
            system: Some(system.into()),
            timeline: Some(timeline),
            last_version: Version(last),
        }
    }

    #[test]
    fn postgres_went_back_by_sequence_cluster_or_timeline() {
        let same = postgres("71", 1, 100);
        assert!(went_back(&same, Some("71"), Some("1"), Version(100), false).is_empty());
        assert!(
            went_back(&same, None, None, Version(0), false).is_empty(),
            "nothing recorded yet"
        );
        let behind = went_back(&same, Some("71"), Some("1"), Version(101), false);
        assert!(behind[0].contains("sequence is at 100"), "{behind:?}");
        let other = went_back(
            &postgres("72", 1, 500),
            Some("71"),
            Some("1"),
            Version(100),
            true,
        );
        assert!(other[0].contains("another cluster"), "{other:?}");
        let promoted = went_back(
            &postgres("71", 2, 500),
            Some("71"),
            Some("1"),
            Version(100),
            false,
        );
        assert!(
            promoted[0].contains("timeline changed from 1 to 2"),
            "{promoted:?}"
        );
        assert!(
            went_back(
                &postgres("71", 2, 500),
                Some("71"),
                Some("1"),
                Version(100),
                true
            )
            .is_empty(),
            "a promoted standby the relay's slot was synchronized to continues"
        );
        let promoted_behind = went_back(
            &postgres("71", 2, 90),
            Some("71"),
            Some("1"),
            Version(100),
            true,
        );
        assert!(
            promoted_behind.len() == 1 && promoted_behind[0].contains("sequence is at 90"),
            "a synchronized slot does not excuse a sequence that went back: {promoted_behind:?}"
        );
        let unreadable = PostgresIdentity {
            system: None,
            timeline: None,
            last_version: Version(500),
        };
        assert!(
            went_back(&unreadable, Some("71"), Some("1"), Version(100), false).is_empty(),
            "a role that may not read pg_control_* compares the sequence only"
        );
    }
}
