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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, DbError, DeleteOutcome, WriteOutcome};
use crate::feed::{Coherence, Feed, Message, Op};
use crate::l1::{Offer, L1};
use crate::l2::{L2Error, Stored, L2};
use crate::model::{now_ms, CacheKey, Cached, State, Tier, Version};
use crate::resource::{Catalog, KeyParam, Precondition, Resource};
use crate::schema::Change;
use crate::single_flight::SingleFlight;
use crate::telemetry::{
    CACHE_HITS, CACHE_MISSES, FILLS_REJECTED, L1_BYPASSED, L2_REPAIRS, L2_REPAIR_QUEUE,
    L2_WRITE_FAILURES,
};

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

/// Redis entries to fix once Redis answers again: writes committed in Postgres whose Redis
/// update failed. Each is the versioned tombstone (or absence) of that write, so applying it
/// late is safe: the script refuses it if Redis already holds something newer.
pub struct Repairs {
    pending: Mutex<HashMap<CacheKey, (Cached, Duration)>>,
    /// `pending.len()`, readable without the lock on every Redis read.
    count: std::sync::atomic::AtomicUsize,
    max: usize,
    /// More failures than `max`: individual keys were lost, the whole prefix is dropped once
    /// Redis is back.
    overflowed: AtomicBool,
    wake: Notify,
}

impl Tiers {
    pub fn new(
        l1: Option<L1>,
        l2: L2,
        db: Db,
        coherence: Arc<Coherence>,
        instance_id: &str,
        repair_queue_max: usize,
    ) -> Self {
        Tiers {
            l1,
            l2,
            db,
            coherence,
            instance_id: instance_id.into(),
            flights: Arc::new(SingleFlight::default()),
            repairs: Arc::new(Repairs {
                pending: Mutex::new(HashMap::new()),
                count: std::sync::atomic::AtomicUsize::new(0),
                max: repair_queue_max,
                overflowed: AtomicBool::new(false),
                wake: Notify::new(),
            }),
            counters: Arc::new(Counters::new()),
        }
    }

    pub fn l1(&self) -> Option<&L1> {
        self.l1.as_ref()
    }

    pub fn l2(&self) -> &L2 {
        &self.l2
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn coherence(&self) -> &Arc<Coherence> {
        &self.coherence
    }

    pub fn repairs(&self) -> &Arc<Repairs> {
        &self.repairs
    }

    /// L1's current generation, if L1 is enabled and usable now (every feed up).
    fn usable_l1(&self) -> Option<u64> {
        let l1 = self.l1.as_ref()?;
        if self.coherence.l1_usable() {
            Some(l1.generation())
        } else {
            self.counters.bypassed.increment(1);
            None
        }
    }

    /// The L1 answer for a read, if L1 is usable and holds a servable copy fresh enough for
    /// `options`; `None` means [`Tiers::get_below_l1`] must run.
    pub async fn l1_hit(&self, ck: &CacheKey, options: ReadOptions) -> Option<ReadResult> {
        if options.strong || !self.coherence.l1_usable() {
            return None;
        }
        let copy = self.l1.as_ref()?.get(ck).await?;
        let fresh = options.min_version.is_none_or(|min| copy.version >= min);
        if !copy.is_servable() || !fresh {
            return None;
        }
        self.counters.l1_hit.increment(1);
        Some(ReadResult {
            cached: (*copy).clone(),
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
    pub async fn get(
        &self,
        resource: &Resource,
        key: &KeyParam,
        ck: &CacheKey,
        options: ReadOptions,
    ) -> Result<ReadResult, DbError> {
        match self.l1_hit(ck, options).await {
            Some(hit) => Ok(hit),
            None => self.get_below_l1(resource, key, ck, options).await,
        }
    }

    /// The rest of [`Tiers::get`] once [`Tiers::l1_hit`] found nothing: what may wait on Redis
    /// and Postgres (the HTTP layer puts only this part under the request deadline).
    ///
    /// # Errors
    /// As [`Tiers::get`].
    pub async fn get_below_l1(
        &self,
        resource: &Resource,
        key: &KeyParam,
        ck: &CacheKey,
        options: ReadOptions,
    ) -> Result<ReadResult, DbError> {
        let generation = self.usable_l1();
        if options.strong {
            return self.load_db(resource, key, ck, generation).await;
        }
        if generation.is_some() {
            self.counters.l1_miss.increment(1);
        }
        let read = self
            .flights
            .run(ck, self.load(resource, key, ck, generation))
            .await?;
        if options
            .min_version
            .is_none_or(|min| read.cached.version >= min)
        {
            return Ok(read);
        }
        // The shared load was older than this caller needs (it joined a load started before
        // its write): Postgres has it.
        self.load_db(resource, key, ck, generation).await
    }

    /// Loads from Redis, else Postgres, filling the tiers above. `generation` is L1's when the
    /// read began, or `None` when L1 is not to be filled.
    async fn load(
        &self,
        resource: &Resource,
        key: &KeyParam,
        ck: &CacheKey,
        generation: Option<u64>,
    ) -> Result<ReadResult, DbError> {
        if !self.coherence.l2_trusted() {
            return self.load_db(resource, key, ck, generation).await;
        }
        match self.l2.get(ck).await {
            Ok(Some(copy)) if self.repairs.pending_above(ck, copy.version) => {
                // A committed write of this key has not reached Redis yet.
                self.counters.l2_miss.increment(1);
            }
            Ok(Some(copy)) if copy.is_servable() => {
                match self.fill_l1(resource, ck, &copy, generation).await {
                    Some(Offer::Refused(known)) if known.version > copy.version => {
                        // L1 knows Redis is behind: go to the source.
                        self.counters.l2_miss.increment(1);
                    }
                    _ => {
                        self.counters.l2_hit.increment(1);
                        return Ok(ReadResult {
                            cached: copy,
                            tier: Tier::L2,
                        });
                    }
                }
            }
            Ok(_) | Err(L2Error::Skipped) => {
                self.counters.l2_miss.increment(1);
            }
            Err(e) => {
                self.counters.l2_miss.increment(1);
                tracing::debug!(resource = %resource.name, error = %e, "redis read failed; reading postgres");
            }
        }
        self.load_db(resource, key, ck, generation).await
    }

    /// Reads Postgres and offers the result to Redis and L1.
    async fn load_db(
        &self,
        resource: &Resource,
        key: &KeyParam,
        ck: &CacheKey,
        generation: Option<u64>,
    ) -> Result<ReadResult, DbError> {
        let copy = match self.db.get(resource, key).await? {
            Some((version, doc)) => Cached::value(version, doc),
            None => Cached::absent(Version::NONE),
        };
        self.counters.db_hit.increment(1);
        let mut newer_exists = false;
        if self.l2.available() {
            match self
                .l2
                .offer_checked(ck, &copy, l2_ttl(resource, &copy))
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
            self.fill_l1(resource, ck, &copy, generation).await;
        }
        Ok(ReadResult {
            cached: copy,
            tier: Tier::Db,
        })
    }

    /// Offers a copy to L1 (if it is to be filled), counting refusals.
    async fn fill_l1(
        &self,
        resource: &Resource,
        ck: &CacheKey,
        copy: &Cached,
        generation: Option<u64>,
    ) -> Option<Offer> {
        let l1 = self.l1.as_ref()?;
        let generation = generation?;
        let offer = l1
            .offer_in(generation, ck, copy.clone(), l1_ttl(resource, copy))
            .await;
        if matches!(offer, Offer::Refused(_)) {
            metrics::counter!(FILLS_REJECTED, "tier" => "l1").increment(1);
        }
        Some(offer)
    }

    /// Writes one document: Postgres (acknowledged at commit), then Redis (and the message
    /// telling the other instances), then L1.
    ///
    /// Run it to completion (spawned): a write abandoned between commit and cache updates
    /// would leave Redis behind until its repair.
    ///
    /// # Errors
    /// Postgres' failure; nothing was committed.
    pub async fn put(
        &self,
        resource: &Resource,
        key: &KeyParam,
        ck: &CacheKey,
        body: serde_json::Value,
        pre: Precondition,
    ) -> Result<WriteOutcome, DbError> {
        let generation = self.l1.as_ref().map(L1::generation);
        let outcome = self.db.put(resource, key, body, pre).await?;
        if let WriteOutcome::Written(w) = &outcome {
            let copy = Cached::value(w.version, w.doc.clone());
            self.settle(resource, ck, copy, Op::Put, generation).await;
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
        resource: &Resource,
        key: &KeyParam,
        ck: &CacheKey,
        pre: Precondition,
    ) -> Result<DeleteOutcome, DbError> {
        let generation = self.l1.as_ref().map(L1::generation);
        let outcome = self.db.delete(resource, key, pre).await?;
        if let DeleteOutcome::Deleted { version } = outcome {
            self.settle(
                resource,
                ck,
                Cached::absent(version),
                Op::Delete,
                generation,
            )
            .await;
        }
        Ok(outcome)
    }

    /// Brings Redis and L1 up to a committed copy and tells the other instances. A Redis
    /// failure is queued for repair, never returned: the write is committed and is
    /// acknowledged. (The Postgres feed tells the other instances in that case.)
    async fn settle(
        &self,
        resource: &Resource,
        ck: &CacheKey,
        copy: Cached,
        op: Op,
        generation: Option<u64>,
    ) {
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
                .offer_and_publish(ck, &copy, l2_ttl(resource, &copy), &message)
                .await
        } else {
            Err(L2Error::Skipped)
        };
        if let Err(e) = result {
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
        if let (Some(l1), Some(generation)) = (&self.l1, generation) {
            l1.offer_in(generation, ck, copy.clone(), l1_ttl(resource, &copy))
                .await;
        }
    }

    /// Applies an invalidation from a feed: a tombstone (or, for a delete, an absence) at the
    /// message's version in L1, and, from the Postgres feed, in Redis too, which repairs Redis
    /// after writes that never went through syncar. Returns whether it taught anything new
    /// (false for duplicates and for versions older than what is known: no-ops).
    pub async fn apply(&self, catalog: &Catalog, message: &Message, feed: Feed) -> bool {
        let Some(resource) = catalog.get(&message.resource) else {
            return false; // not a resource of this instance
        };
        let copy = match message.op {
            Op::Put => Cached::invalidated(Version(message.version)),
            Op::Delete => Cached::absent(Version(message.version)),
            Op::Flush => {
                if let Some(l1) = &self.l1 {
                    l1.clear();
                }
                if feed == Feed::Postgres {
                    if let Err(e) = self.l2.flush_resource(&resource.name).await {
                        tracing::warn!(resource = %resource.name, error = %e, "redis flush of a resource failed");
                    }
                }
                return true;
            }
        };
        let Some(key) = &message.key else {
            return false;
        };
        let ck = CacheKey::new(&resource.name, key);
        // New to this instance: judged by L1 when there is one, else by Redis.
        let mut fresh = None;
        if let Some(l1) = &self.l1 {
            fresh =
                Some(l1.offer(&ck, copy.clone(), l1_ttl(resource, &copy)).await == Offer::Applied);
        }
        // Whatever it taught L1, a load in flight may predate this change.
        self.flights.forget(&ck);
        if feed == Feed::Postgres {
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
        fresh.unwrap_or(false)
    }

    /// Replays changes-log entries into Redis: every logged key gets a tombstone of its
    /// newest logged version, which lands only where Redis holds something older.
    ///
    /// # Errors
    /// The first Redis failure.
    pub async fn replay(&self, catalog: &Catalog, changes: Vec<Change>) -> Result<(), L2Error> {
        use futures_util::TryStreamExt;
        // Concurrently: order does not matter (Redis takes only strictly newer versions) and
        // the connection pipelines what is in flight; one by one, a large log took seconds.
        futures_util::stream::iter(changes.into_iter().map(Ok))
            .try_for_each_concurrent(
                crate::feed::changes::APPLY_CONCURRENCY,
                |change| async move {
                    let Some(resource) = catalog.get(&change.resource) else {
                        return Ok(());
                    };
                    let copy = match (change.op.as_str(), &change.key) {
                        ("delete", Some(_)) => Cached::absent(Version(change.version)),
                        (_, Some(_)) => Cached::invalidated(Version(change.version)),
                        (_, None) => {
                            return self.l2.flush_resource(&resource.name).await.map(|_| ())
                        }
                    };
                    let ck =
                        CacheKey::new(&resource.name, change.key.as_deref().unwrap_or_default());
                    self.l2
                        .offer(&ck, &copy, l2_ttl(resource, &copy))
                        .await
                        .map(|_| ())
                },
            )
            .await
    }
}

impl Repairs {
    /// Remembers a repair, keeping the newer one if the key is already queued.
    pub fn push(&self, key: CacheKey, copy: Cached, ttl: Duration) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
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
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.get(key).is_some_and(|(c, _)| c.version > version)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The repair loop: applies queued repairs whenever Redis answers, backing off with jitter
    /// while it does not, and waking at once when any Redis command succeeds again. On
    /// `shutdown` it makes a last attempt, bounded by `final_drain`, and logs what is left.
    pub async fn run(self: Arc<Self>, l2: L2, shutdown: CancellationToken, final_drain: Duration) {
        let mut backoff = MIN_BACKOFF;
        loop {
            if self.is_empty() && !self.overflowed.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wake.notified() => {}
                }
            }
            if self.drain(&l2).await {
                backoff = MIN_BACKOFF;
                continue;
            }
            let pause = jitter(backoff, 0.5);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
                _ = l2.recovered() => backoff = MIN_BACKOFF,
            }
        }
        if !self.is_empty() {
            let _ = tokio::time::timeout(final_drain, self.drain(&l2)).await;
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
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
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
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
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

/// `d` spread uniformly by +-`fraction`, so entries written together expire apart.
pub fn jitter(d: Duration, fraction: f64) -> Duration {
    if fraction <= 0.0 {
        return d;
    }
    let factor = 1.0 + fraction * (fastrand::f64() * 2.0 - 1.0);
    d.mul_f64(factor.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_fraction() {
        let base = Duration::from_secs(10);
        for _ in 0..1000 {
            let d = jitter(base, 0.1);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        assert_eq!(jitter(base, 0.0), base);
    }
}
