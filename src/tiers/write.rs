//! The write path: Postgres first (acknowledged at commit), then Redis with the message
//! telling the other instances, then L1; repairs of a tier holding a version the commit
//! could not beat.

use crate::coherence::{Message, Op};
use crate::db::{Commit, DbError, DeleteOutcome, TxDone, TxFailed, TxItem, TxOp, WriteOutcome};
use crate::l1::{Offer, L1};
use crate::l2::{L2Error, Stored};
use crate::model::{now_us, Cached, State, Version};
use crate::resource::{DocRef, Precondition};
use crate::telemetry::{L2_WRITE_FAILURES, VERSION_REGRESSIONS};

use super::decide::{conflict, op_of, regression, repair_marker, Regression};
use super::{l1_ttl, l2_ttl, Conflict, Started, Tiers};

impl Tiers {
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
                    let op = op_of(&fresh);
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
                    let op = op_of(&fresh);
                    self.settle(doc, fresh, op, generation).await;
                }
            }
        }
        Ok(outcome)
    }

    /// Brings Redis and L1 up to a committed copy and tells the other instances. A Redis
    /// failure is queued for repair, never returned: the write is committed and is
    /// acknowledged. (The Postgres feed tells the other instances in that case.)
    pub(super) async fn settle(
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
                ts_us: Some(now_us()),
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
                self.repairs
                    .push(ck.clone(), repair_marker(&copy), resource.ttl.tombstone_ttl);
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
        conflict(&copy, held)
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
}
