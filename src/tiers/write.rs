//! The write path: Postgres first (acknowledged at commit), then Redis with the message
//! telling the other instances, then L1; repairs of a tier holding a version the commit
//! could not beat.

use crate::coherence::{Message, Op};
use crate::db::{Commit, DbError, DeleteOutcome, TxDone, TxFailed, TxItem, TxOp, WriteOutcome};
use crate::l1::{Offer, L1};
use crate::l2::{L2Error, Stored};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::locks::MutexExt;
use crate::model::{now_us, CacheKey, Cached, State, Version};
use crate::resource::{DocRef, Precondition};
use crate::telemetry::{L2_WRITE_FAILURES, VERSION_REGRESSIONS};

use super::decide::{conflict, op_of, regression, repair_marker, Regression};
use super::{l1_ttl, l2_ttl, Conflict, Started, Tiers};

/// Where a write sends its outcome as soon as Postgres has committed it and this
/// instance's L1 holds it, before Redis and the other instances hear of it
/// (`consistency=eventual`, [`crate::tiers::Tiers::put`]); `None` answers once every tier
/// is updated. Nothing is sent for a write that did not commit (an error, a failed
/// precondition, a delete of an absent key): the caller then waits for the write itself.
pub type Early<T> = Option<tokio::sync::oneshot::Sender<T>>;

/// Keys of writes answered before Redis holds them (`consistency=eventual`), each with the
/// highest such version: until its Redis step is done, a Redis copy of the key below that
/// version is not served by this instance (the read goes to Postgres). So the writer's
/// instance never answers the version its write replaced, even where L1 does not hold the
/// write (off, bypassed while a feed is down, emptied meanwhile), and even when its Redis
/// commands do not reach Redis in the order they were sent (a script sent again after
/// `NOSCRIPT`). Redis' own failures are covered by [`super::Repairs`] once the step ends.
#[derive(Default)]
pub(super) struct Unsettled {
    keys: Mutex<HashMap<CacheKey, (Version, usize)>>,
    /// `keys.len()`, read without the lock on every Redis read.
    count: AtomicUsize,
}

/// One write's mark in [`Unsettled`], lifted when dropped: once its Redis step ends, or
/// when the write's task unwinds from a panic first (a mark left behind would send every
/// read of the key below it to Postgres for the process' life).
#[must_use = "the mark is lifted when this is dropped"]
pub(super) struct Mark<'a> {
    marks: &'a Unsettled,
    key: CacheKey,
}

impl Drop for Mark<'_> {
    fn drop(&mut self) {
        self.marks.unmark(&self.key);
    }
}

impl Unsettled {
    /// A write of `key` at `version` is answered before its Redis step; the mark holds
    /// until the returned [`Mark`] is dropped.
    fn mark(&self, key: &CacheKey, version: Version) -> Mark<'_> {
        let mut keys = self.keys.locked();
        let entry = keys.entry(key.clone()).or_insert((version, 0));
        entry.0 = entry.0.max(version);
        entry.1 += 1;
        self.count.store(keys.len(), Ordering::Relaxed);
        Mark {
            marks: self,
            key: key.clone(),
        }
    }

    /// One write of `key` finished its Redis step (applied, refused or queued for repair).
    fn unmark(&self, key: &CacheKey) {
        let mut keys = self.keys.locked();
        if let Some(entry) = keys.get_mut(key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                keys.remove(key);
            }
        }
        self.count.store(keys.len(), Ordering::Relaxed);
    }

    /// Whether a write of `key` above `version` was answered and Redis may not hold it yet.
    pub(super) fn above(&self, key: &CacheKey, version: Version) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.keys
            .locked()
            .get(key)
            .is_some_and(|(v, _)| *v > version)
    }
}

impl Tiers {
    /// Writes one document: Postgres (acknowledged at commit, which with
    /// [`Commit::Synchronous`] waits for every live instance to have applied it), then Redis
    /// (and the message telling the other instances), then L1.
    ///
    /// With `early` (`consistency=eventual`) the order after the commit is L1, then the
    /// outcome sent to `early`, then Redis and the message: the client hears of the write one
    /// Redis round trip sooner, this instance serves it at once (its key marked in
    /// [`Unsettled`] meanwhile), and another instance may serve the version it replaced
    /// until Redis and the message reach it (the same window a plain-SQL writer's commit has
    /// until the Postgres feed evicts it). A conflict L1 shows is repaired before the
    /// answer, as by default; one found in Redis after it (the answer carries the committed
    /// version).
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
        early: Early<WriteOutcome>,
    ) -> Result<WriteOutcome, DbError> {
        let generation = self.started(doc, self.l1.as_ref().map(L1::generation));
        let mut outcome = self
            .db
            .put(&doc.resource, &doc.key, body, pre, commit)
            .await?;
        if let WriteOutcome::Written(w) = &mut outcome {
            self.saw(w.version);
            let copy = Cached::value(w.version, w.doc.clone());
            let answer = early.map(|tx| {
                let outcome = WriteOutcome::Written(w.clone());
                move || {
                    let _ = tx.send(outcome);
                }
            });
            if let Some(conflict) = self.settle(doc, copy, Op::Put, generation, answer).await {
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
                    let op = op_of(&fresh);
                    self.settle(doc, fresh, op, generation, None::<fn()>).await;
                }
            }
        }
        Ok(outcome)
    }

    /// Deletes one document: Postgres (acknowledged at commit), then a versioned absence in
    /// Redis and L1 that refuses any older fill still in flight. `early` as for
    /// [`Tiers::put`]: the absence in L1, the answer, then Redis.
    ///
    /// # Errors
    /// Postgres' failure; nothing was committed.
    pub async fn delete(
        &self,
        doc: &DocRef,
        pre: Precondition,
        commit: Commit,
        early: Early<DeleteOutcome>,
    ) -> Result<DeleteOutcome, DbError> {
        let generation = self.started(doc, self.l1.as_ref().map(L1::generation));
        let mut outcome = self.db.delete(&doc.resource, &doc.key, pre, commit).await?;
        if let DeleteOutcome::Deleted { version } = &mut outcome {
            self.saw(*version);
            let absent = Cached::absent(*version);
            let answer = early.map(|tx| {
                let outcome = DeleteOutcome::Deleted { version: *version };
                move || {
                    let _ = tx.send(outcome);
                }
            });
            if let Some(conflict) = self
                .settle(doc, absent, Op::Delete, generation, answer)
                .await
            {
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
                    let op = op_of(&fresh);
                    self.settle(doc, fresh, op, generation, None::<fn()>).await;
                }
            }
        }
        Ok(outcome)
    }

    /// Brings Redis and L1 up to a committed copy and tells the other instances. A Redis
    /// failure is queued for repair, never returned: the write is committed and is
    /// acknowledged. (The Postgres feed tells the other instances in that case.)
    ///
    /// Without `answer`: Redis (with the message), then L1. With it: L1, then, unless L1
    /// holds a conflicting copy, the key marked in [`Unsettled`] and `answer` called, then
    /// Redis (and the mark lifted); each tier compares versions on its own, so the order
    /// decides only who sees the copy first.
    pub(super) async fn settle(
        &self,
        doc: &DocRef,
        copy: Cached,
        op: Op,
        generation: Started,
        answer: Option<impl FnOnce()>,
    ) -> Option<Conflict> {
        // A load in flight may have read before this commit: nobody asking from now on joins it.
        self.flights.forget(&doc.ck);
        let mut held = Vec::new();
        if let Some(answer) = answer {
            held.extend(self.settle_l1(doc, &copy, op, generation));
            // L1 holding a newer version (or another document at this one) is a conflict
            // that the write's repair may answer for: then the answer waits for it.
            let early = conflict(&copy, held.iter().cloned()).is_none();
            let mark = early.then(|| {
                let mark = self.unsettled.mark(&doc.ck, copy.version);
                answer();
                mark
            });
            held.extend(self.settle_l2(doc, &copy, op, generation).await);
            drop(mark);
        } else {
            held.extend(self.settle_l2(doc, &copy, op, generation).await);
            held.extend(self.settle_l1(doc, &copy, op, generation));
        }
        conflict(&copy, held)
    }

    /// Offers a committed copy to Redis with the message telling the other instances (queued
    /// for repair if Redis fails); what Redis holds instead when it refuses the copy.
    async fn settle_l2(
        &self,
        doc: &DocRef,
        copy: &Cached,
        op: Op,
        generation: Started,
    ) -> Option<Cached> {
        let (resource, ck) = (&doc.resource, &doc.ck);
        let message = if self.coherence.redis.enabled() {
            let key = ck.as_str().split_once(':').map_or("", |(_, k)| k);
            serde_json::to_string(&Message {
                resource: resource.name.clone(),
                key: Some(key.to_string()),
                version: copy.version.0,
                op,
                ts_us: Some(now_us()),
                instance: Some(self.instance_id.to_string()),
            })
            .unwrap_or_default()
        } else {
            String::new()
        };
        let result = if self.l2.available() {
            self.l2
                .offer_and_publish(generation.l2, ck, copy, l2_ttl(resource, copy), &message)
                .await
        } else {
            Err(L2Error::Skipped)
        };
        // A tier that refuses a just-committed copy holds a newer version (a later commit
        // that got there first, or a version Postgres never reached: it went back), or the
        // same version with other content (the sequence handed it out twice).
        match result {
            Ok(Stored::Newer | Stored::AlreadyHeld) => {
                self.l2.inspect(ck).await.ok().flatten().map(|(c, _)| c)
            }
            Ok(Stored::Applied) => None,
            Err(e) => {
                metrics::counter!(L2_WRITE_FAILURES).increment(1);
                tracing::warn!(resource = %resource.name, version = %copy.version, error = %e,
                    "redis update failed after commit; queued for repair");
                self.repairs
                    .push(ck.clone(), repair_marker(copy), resource.ttl.tombstone_ttl);
                None
            }
        }
    }

    /// Offers a committed copy to L1 and, once it holds it (or there is no L1), tells the
    /// watchers; what L1 holds instead when it refuses the copy.
    fn settle_l1(
        &self,
        doc: &DocRef,
        copy: &Cached,
        op: Op,
        generation: Started,
    ) -> Option<Cached> {
        let (resource, ck) = (&doc.resource, &doc.ck);
        if let (Some(l1), Some(generation)) = (&self.l1, generation.l1) {
            if let Offer::Refused(_) =
                l1.offer_in(generation, ck, copy.clone(), l1_ttl(resource, copy))
            {
                return l1.get(ck);
            }
        }
        let key = ck.as_str().split_once(':').map_or("", |(_, k)| k);
        self.watch
            .change(&resource.name, Some(key), copy.version.0, op);
        None
    }

    /// A write committed at `written`, but a tier holds `conflict`: a newer version, or the
    /// same version with other content. When Postgres cannot have that version for the key
    /// (its sequence is behind it, the row is at a lower version, or the version was handed
    /// out twice), the write would be unreadable, even by its writer. Then: if the sequence went
    /// back, reset every cached resource ([`crate::tiers::Guards::postgres_went_back`], which also moves the
    /// sequence past everything seen); and give the key a fresh version, returned with the
    /// document as Postgres has it (an absence at a fresh version if the row is gone).
    /// Counted in `syncar_version_regressions_total`, logged at error level. `Ok(None)` when
    /// the newer copy is a later commit (nothing wrong).
    pub(super) async fn repair_regression(
        &self,
        doc: &DocRef,
        written: Version,
        conflict: Conflict,
    ) -> Result<Option<Cached>, DbError> {
        let seen = conflict.version();
        let identity = self.db.identity().await?;
        let current = self.db.get(&doc.resource, &doc.key).await?;
        let current_version = current.as_ref().map(|(v, _)| *v);
        let sequence_behind = match regression(conflict, identity.last_version, current_version) {
            Regression::LaterCommit => return Ok(None), // a later commit got to the tiers first
            // The row exists below a cached version: that version never committed for it
            // (or a delete's version outran a re-insert's, see ARCHITECTURE.md's known limits).
            Regression::Restamp => false,
            Regression::ResetThenRestamp => true,
        };
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
            if let Err(e) = self.guards().postgres_went_back(high, &why).await {
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
    /// committed, updates Redis and L1 for each as a single write would, in order. With
    /// `early`, every operation's L1 first, then the outcome sent, then Redis for each (as
    /// [`Tiers::put`]).
    ///
    /// # Errors
    /// The operation that failed, and why; nothing was committed.
    pub async fn transact(
        &self,
        ops: &[(DocRef, TxOp)],
        commit: Commit,
        early: Early<Vec<TxDone>>,
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
        let copies: Vec<_> = ops
            .iter()
            .zip(&done)
            .zip(started)
            .filter_map(|(((doc, _), outcome), generation)| {
                let (copy, op) = match outcome {
                    TxDone::Written(w) => (Cached::value(w.version, w.doc.clone()), Op::Put),
                    TxDone::Deleted { version } => (Cached::absent(*version), Op::Delete),
                    TxDone::NotFound => return None,
                };
                self.saw(copy.version);
                Some((doc, copy, op, generation))
            })
            .collect();
        // A tier ahead of Postgres: the next check of Postgres' history (a feed reconnecting,
        // the auditor) deals with it; a single write repairs at once.
        let refused = |doc: &DocRef, conflict: Conflict| {
            tracing::warn!(resource = %doc.resource.name, ?conflict, "a transaction's write was refused by a cache");
        };
        match early {
            None => {
                for (doc, copy, op, generation) in copies {
                    if let Some(c) = self.settle(doc, copy, op, generation, None::<fn()>).await {
                        refused(doc, c);
                    }
                }
            }
            Some(tx) => {
                let mut held = Vec::with_capacity(copies.len());
                for (doc, copy, op, generation) in &copies {
                    self.flights.forget(&doc.ck);
                    let l1 = self.settle_l1(doc, copy, *op, *generation);
                    held.push((l1, self.unsettled.mark(&doc.ck, copy.version)));
                }
                // A transaction repairs no conflict (above): it answers whatever L1 held.
                let _ = tx.send(done.clone());
                for ((doc, copy, op, generation), (l1, mark)) in copies.iter().zip(held) {
                    let l2 = self.settle_l2(doc, copy, *op, *generation).await;
                    drop(mark);
                    if let Some(c) = conflict(copy, l1.into_iter().chain(l2)) {
                        refused(doc, c);
                    }
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsettled_marks_the_highest_version_until_every_write_of_the_key_is_done() {
        let marks = Unsettled::default();
        let (k, other) = (CacheKey::new("kv", "k"), CacheKey::new("kv", "o"));
        assert!(!marks.above(&k, Version(1)));
        let five = marks.mark(&k, Version(5));
        let three = marks.mark(&k, Version(3));
        assert!(marks.above(&k, Version(4)), "below the highest write");
        assert!(!marks.above(&k, Version(5)), "Redis at the write's version");
        assert!(!marks.above(&other, Version(1)));
        drop(five);
        assert!(marks.above(&k, Version(4)), "one write still on its way");
        drop(three);
        assert!(!marks.above(&k, Version(4)));
        assert_eq!(marks.count.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_write_that_panics_before_its_redis_step_ends_lifts_its_mark() {
        let marks = Unsettled::default();
        let k = CacheKey::new("kv", "k");
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _mark = marks.mark(&k, Version(7));
            assert!(marks.above(&k, Version(6)));
            panic!("the Redis step panicked");
        }));
        assert!(unwound.is_err());
        assert!(!marks.above(&k, Version(6)), "the mark outlived the write");
        assert_eq!(marks.count.load(Ordering::Relaxed), 0);
    }
}
