//! The read path: L1, then Redis under a fill lease, then Postgres, each tier filled in the
//! generation the read began in; one key or many (a batch get).

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::db::DbError;
use crate::l1::Offer;
use crate::l2::{L2Error, Stored};
use crate::model::{CacheKey, Cached, Rank, Tier, Version};
use crate::resource::{DocRef, KeyParam, Resource};
use crate::telemetry::{FILLS_REJECTED, FILL_LEASES};

use super::decide::{l1_answers, l1_knows_newer, load_answers, redis_may_answer, shape_ahead};
use super::{l1_ttl, l2_ttl, KeyReport, L2Read, ReadOptions, ReadResult, Started, Tiers};

/// The longest pause between two polls of Redis while another instance holds a key's fill
/// lease.
const FILL_LEASE_POLL_MAX: Duration = Duration::from_millis(8);

impl Tiers {
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
        if !l1_answers(&copy, options.min_version) {
            return None;
        }
        self.counters.l1_hit.increment(1);
        self.sample(doc, Tier::L1, &copy);
        Some(ReadResult {
            cached: copy,
            tier: Tier::L1,
        })
    }

    /// The version of the tombstone L1 holds for `ck`, if it holds one: a change this
    /// instance applied, newer than any copy a load may bring (see [`load_answers`]).
    fn invalidated_at(&self, ck: &CacheKey) -> Option<Version> {
        self.l1
            .as_ref()?
            .get(ck)
            .filter(|copy| !copy.is_servable())
            .map(|copy| copy.version)
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
        if load_answers(
            &read.cached,
            options.min_version,
            self.invalidated_at(&doc.ck),
        ) {
            return Ok(read);
        }
        // The shared load was older than this caller needs (it joined a load started before
        // its write, or before a change this instance has applied became visible): Postgres
        // has it.
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
    pub(super) async fn load(
        &self,
        doc: &DocRef,
        generation: Started,
    ) -> Result<ReadResult, DbError> {
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
    pub(super) async fn load_db_after_miss(
        &self,
        doc: &DocRef,
        generation: Started,
    ) -> Result<ReadResult, DbError> {
        self.counters.l2_miss.increment(1);
        self.load_db(doc, generation).await
    }

    /// Whether Redis' copy of `key` at `version` is behind a write committed here: one whose
    /// Redis update failed and waits for repair, or one answered before its Redis step
    /// (`consistency=eventual`) still on its way. Such a copy is not served.
    pub(super) fn behind_a_write(&self, key: &CacheKey, version: Version) -> bool {
        self.repairs.pending_above(key, version) || self.unsettled.above(key, version)
    }

    /// The Redis answer for a read, or why there is none.
    pub(super) async fn read_l2(&self, doc: &DocRef, generation: Started) -> L2Read {
        let (resource, ck) = (&doc.resource, &doc.ck);
        if shape_ahead(resource.shape_epoch(), self.l2.generation(&resource.name)) {
            // The catalog already has the table's new shape, and the flush that retires the
            // old one's copies has not reached this instance yet: Redis may hold copies of
            // the old shape, which the new ETag must not name.
            return L2Read::Failed;
        }
        match self.l2.get(ck).await {
            // Not a tombstone, and no committed write of this key still on its way to Redis
            // (`min_version` is checked once the load, which others may share, is done).
            Ok(Some(copy))
                if redis_may_answer(&copy, None, self.behind_a_write(ck, copy.version)) =>
            {
                let offer = self.fill_l1(resource, ck, &copy, generation.l1).await;
                if l1_knows_newer(copy.version, refused(offer)) {
                    // L1 knows Redis is behind: go to the source.
                    return L2Read::Missed;
                }
                self.counters.l2_hit.increment(1);
                self.sample(doc, Tier::L2, &copy);
                L2Read::Hit(ReadResult {
                    cached: copy,
                    tier: Tier::L2,
                })
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
    pub(super) async fn load_db(
        &self,
        doc: &DocRef,
        generation: Started,
    ) -> Result<ReadResult, DbError> {
        let copy = self.read_postgres(doc).await?;
        Ok(self.filled_from_postgres(doc, copy, generation).await)
    }

    /// What was read from Postgres (`copy`) offered to Redis and then L1, each in the
    /// generation the read began in; answered with whatever they say.
    pub(super) async fn filled_from_postgres(
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
        let mut batch = BatchRead {
            tiers: self,
            options,
            answers: vec![None; docs.len()],
        };
        let misses = batch.answer_from_l1(docs).await;
        if !misses.is_empty() {
            let below = batch.answer_from_redis(misses).await;
            let (joined, queried): (Vec<Miss>, Vec<Miss>) = below
                .into_iter()
                .partition(|miss| !options.strong && self.flights.is_running(&miss.doc.ck));
            batch.join_loads(joined).await;
            batch.answer_from_postgres(queried).await;
        }
        batch.finish()
    }

    /// Offers a copy to L1 (if it is to be filled), counting refusals.
    pub(super) async fn fill_l1(
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
}

/// One batch get under way ([`Tiers::get_many`]): its answers so far, by position in the
/// batch. Each phase answers what it can and hands the rest down a tier.
struct BatchRead<'t> {
    tiers: &'t Tiers,
    options: ReadOptions,
    answers: Vec<Option<Result<ReadResult, DbError>>>,
}

/// A key of a batch that L1 did not answer: its position in the batch, and the generations
/// its read began in.
#[derive(Clone, Copy)]
struct Miss<'d> {
    at: usize,
    doc: &'d DocRef,
    started: Started,
}

impl BatchRead<'_> {
    /// One L1 pass: answers what L1 holds; returns the rest, with the generations their
    /// reads begin in.
    async fn answer_from_l1<'d>(&mut self, docs: &'d [DocRef]) -> Vec<Miss<'d>> {
        let tiers = self.tiers;
        let mut missing = Vec::new();
        for (at, doc) in docs.iter().enumerate() {
            match tiers.l1_hit(doc, self.options).await {
                Some(hit) => self.answers[at] = Some(Ok(hit)),
                None => missing.push((at, doc)),
            }
        }
        let misses: Vec<Miss<'d>> = missing
            .into_iter()
            .map(|(at, doc)| Miss {
                at,
                doc,
                started: tiers.started(doc, tiers.usable_l1()),
            })
            .collect();
        if !self.options.strong {
            let l1_misses = misses.iter().filter(|m| m.started.l1.is_some()).count();
            tiers.counters.l1_miss.increment(l1_misses as u64);
        }
        misses
    }

    /// One Redis `MGET` for `misses` (unless the read is strong or Redis is not trusted):
    /// answers the servable copies, filling L1; returns what is left for Postgres.
    async fn answer_from_redis<'d>(&mut self, misses: Vec<Miss<'d>>) -> Vec<Miss<'d>> {
        let tiers = self.tiers;
        let asked = !self.options.strong && tiers.coherence.l2_trusted();
        let copies = if asked {
            let keys: Vec<(&CacheKey, i64)> = misses
                .iter()
                .map(|miss| (&miss.doc.ck, miss.started.l2))
                .collect();
            tiers.l2.get_many(&keys).await.ok()
        } else {
            None
        };
        let mut below = Vec::new();
        for (j, miss) in misses.into_iter().enumerate() {
            let copy = copies.as_ref().and_then(|copies| copies[j].clone());
            match self.servable_from_redis(&miss, copy).await {
                Some(copy) => {
                    tiers.counters.l2_hit.increment(1);
                    tiers.sample(miss.doc, Tier::L2, &copy);
                    self.answers[miss.at] = Some(Ok(ReadResult {
                        cached: copy,
                        tier: Tier::L2,
                    }));
                }
                None => {
                    if copies.is_some() {
                        tiers.counters.l2_miss.increment(1);
                    }
                    below.push(miss);
                }
            }
        }
        below
    }

    /// Redis' `copy` for `miss` if it may be served (offered to L1 on the way), as a single
    /// read's `read_l2` decides: no copy of a resource whose new shape's flush has not
    /// arrived yet, none older than `min_version` or than a pending repair, none L1 knows
    /// to be behind.
    async fn servable_from_redis(&self, miss: &Miss<'_>, copy: Option<Cached>) -> Option<Cached> {
        let doc = miss.doc;
        let copy = copy.filter(|_| !shape_ahead(doc.resource.shape_epoch(), miss.started.l2))?;
        let pending = self.tiers.behind_a_write(&doc.ck, copy.version);
        if !redis_may_answer(&copy, self.options.min_version, pending) {
            return None;
        }
        let offer = self
            .tiers
            .fill_l1(&doc.resource, &doc.ck, &copy, miss.started.l1)
            .await;
        // L1 knows Redis is behind: go to the source.
        (!l1_knows_newer(copy.version, refused(offer))).then_some(copy)
    }

    /// Joins the loads already in flight for `joined` (a single read's, or another batch's);
    /// one that brings a copy older than `min_version` reads Postgres again.
    async fn join_loads(&mut self, joined: Vec<Miss<'_>>) {
        let (tiers, options) = (self.tiers, self.options);
        let joins = joined.iter().map(|miss| async move {
            let read = tiers
                .flights
                .run(&miss.doc.ck, tiers.load(miss.doc, miss.started))
                .await?;
            if load_answers(
                &read.cached,
                options.min_version,
                tiers.invalidated_at(&miss.doc.ck),
            ) {
                Ok(read)
            } else {
                tiers.load_db(miss.doc, miss.started).await
            }
        });
        let answers = futures_util::future::join_all(joins).await;
        for (miss, answer) in joined.iter().zip(answers) {
            self.answers[miss.at] = Some(answer);
        }
    }

    /// Reads `queried` in one Postgres query (`= ANY($1)`) and fills the tiers with what it
    /// found (an absence for a key it did not find); its failure is every key's answer.
    async fn answer_from_postgres(&mut self, queried: Vec<Miss<'_>>) {
        let Some(first) = queried.first() else {
            return;
        };
        let tiers = self.tiers;
        let keys: Vec<&KeyParam> = queried.iter().map(|miss| &miss.doc.key).collect();
        let rows = match tiers.db.get_many(&first.doc.resource, &keys).await {
            Ok(rows) => rows,
            Err(e) => {
                for miss in &queried {
                    self.answers[miss.at] = Some(Err(e.clone()));
                }
                return;
            }
        };
        let fills = queried.iter().map(|miss| {
            // `get`, not `remove`: a key asked twice (or `7` and `07`) is one row.
            let copy = match rows.get(&miss.doc.key.to_string()) {
                Some((version, body)) => {
                    tiers.saw(*version);
                    Cached::value(*version, body.clone())
                }
                None => Cached::absent(Version::NONE),
            };
            tiers.filled_from_postgres(miss.doc, copy, miss.started)
        });
        let filled = futures_util::future::join_all(fills).await;
        for (miss, read) in queried.iter().zip(filled) {
            self.answers[miss.at] = Some(Ok(read));
        }
    }

    /// Every answer, in the batch's order.
    fn finish(self) -> Vec<Result<ReadResult, DbError>> {
        self.answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(DbError::Internal("a key was not answered".into()))))
            .collect()
    }
}

/// The rank L1 refused an offer with, if it did.
fn refused(offer: Option<Offer>) -> Option<Rank> {
    match offer {
        Some(Offer::Refused(rank)) => Some(rank),
        _ => None,
    }
}
