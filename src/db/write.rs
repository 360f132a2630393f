//! Document writes: one put or delete in its own transaction, or a client's transaction of
//! several, each committed as [`Commit`] says. Reads nothing but what a write returns.

use tokio_postgres::types::{ToSql, Type};

use crate::model::{JsonText, Version};
use crate::resource::{KeyParam, Param, Precondition, Resource, Shape, WriteSql};

use super::commit::Commit;
use super::error::{classify, DbError};
use super::{
    key_param, typed_key, versioned_doc, Db, DeleteOutcome, TxDone, TxFailed, TxItem, TxOp, TxWhy,
    Typed, WriteOutcome, Written,
};

impl Db {
    /// Writes one document in its own transaction; returns once it is committed.
    ///
    /// # Errors
    /// A classified [`DbError`]; [`DbError::Rejected`] carries Postgres' reason.
    pub async fn put(
        &self,
        resource: &Resource,
        key: &KeyParam,
        body: JsonText,
        pre: Precondition,
        commit: Commit,
    ) -> Result<WriteOutcome, DbError> {
        let (doc, write) = resource
            .prepare_write(key, &body, &pre)
            .map_err(DbError::from)?;
        let versions = if_versions(&pre);
        let params = write_params(&write, key, &doc, &versions);
        let mut client = self.client_for(&resource.name).await?;
        let row = match &commit {
            Commit::AsConfigured if matches!(resource.shape, Shape::Kv) => {
                let stmt = client.prepare_cached(&write.sql).await.map_err(classify)?;
                client
                    .query_opt(&stmt, &untyped(&params))
                    .await
                    .map_err(classify)?
            }
            // A table write's SQL depends on which columns the body has: an unnamed statement,
            // so clients cannot grow the statement caches without bound, sent with its
            // parameters' types in the same round trip as its execution.
            Commit::AsConfigured => client
                .query_typed_opt(write.sql.as_str(), &params)
                .await
                .map_err(classify)?,
            // BEGIN, then the check and the write in one round trip, then COMMIT (or a
            // rollback when the check refuses).
            Commit::Synchronous { .. } => {
                let tx = client.transaction().await.map_err(classify)?;
                let check = commit.prepare(&tx).await?;
                let stmt = match resource.shape {
                    Shape::Kv => Some(tx.prepare_cached(&write.sql).await.map_err(classify)?),
                    _ => None,
                };
                let (checked, row) = tokio::join!(commit.check(&tx, check.as_ref()), async {
                    match &stmt {
                        Some(stmt) => tx.query_opt(stmt, &untyped(&params)).await,
                        None => tx.query_typed_opt(write.sql.as_str(), &params).await,
                    }
                });
                checked?;
                let row = row.map_err(classify)?;
                tx.commit().await.map_err(classify)?;
                row
            }
        };
        Ok(match row {
            Some(row) => WriteOutcome::Written(written(&row)),
            None => WriteOutcome::PreconditionFailed,
        })
    }

    /// Deletes one document; returns once it is committed, with the delete's own version.
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub async fn delete(
        &self,
        resource: &Resource,
        key: &KeyParam,
        pre: Precondition,
        commit: Commit,
    ) -> Result<DeleteOutcome, DbError> {
        let mut client = self.client_for(&resource.name).await?;
        let delete_sql = resource.delete_sql(matches!(pre, Precondition::Versions(_)));
        // The delete trigger takes the delete's version with nextval() in this session, after
        // the row is gone: currval() right after the delete is that version.
        let currval_sql = self.currval_sql();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![key_param(key)];
        if let Precondition::Versions(versions) = &pre {
            params.push(versions);
        }
        let nothing_deleted = || match &pre {
            Precondition::None => DeleteOutcome::NotFound,
            _ => DeleteOutcome::PreconditionFailed,
        };
        if commit == Commit::AsConfigured {
            // BEGIN, the delete, currval() and COMMIT in one round trip, where BEGIN, the
            // pair and COMMIT took three. One transaction still: behind a pooler in
            // transaction mode (PgBouncer) currval() must run on the delete's backend, and a
            // failed delete or currval() must not leave the row gone with no version known.
            // All four leave on the first poll (join! polls in order), so the transaction
            // always ends: COMMIT of a transaction that failed rolls it back, without error.
            let delete = client.prepare_cached(&delete_sql).await.map_err(classify)?;
            let currval = client
                .prepare_cached(&currval_sql)
                .await
                .map_err(classify)?;
            let (begun, deleted, tombstone, committed) = tokio::join!(
                client.batch_execute("BEGIN"),
                client.query_opt(&delete, &params),
                client.query_one(&currval, &[]),
                client.batch_execute("COMMIT"),
            );
            begun.map_err(classify)?;
            if deleted.map_err(classify)?.is_none() {
                // Nothing deleted; currval() may have failed the transaction, which COMMIT
                // then rolled back.
                committed.map_err(classify)?;
                return Ok(nothing_deleted());
            }
            // A failed currval() rolled the delete back: its error is the answer.
            let tombstone: i64 = tombstone.map_err(classify)?.get(0);
            committed.map_err(classify)?;
            return Ok(DeleteOutcome::Deleted {
                version: Version(tombstone),
            });
        }
        let tx = client.transaction().await.map_err(classify)?;
        let check = commit.prepare(&tx).await?;
        let delete = tx.prepare_cached(&delete_sql).await.map_err(classify)?;
        let currval = tx.prepare_cached(&currval_sql).await.map_err(classify)?;
        // The check, the delete and currval() in one round trip, in that order (join! polls
        // in order); currval() fails or reads an older value when nothing was deleted, and is
        // not read then.
        let (checked, deleted, tombstone) = tokio::join!(
            commit.check(&tx, check.as_ref()),
            tx.query_opt(&delete, &params),
            tx.query_one(&currval, &[]),
        );
        checked?;
        if deleted.map_err(classify)?.is_none() {
            tx.rollback().await.map_err(classify)?;
            return Ok(nothing_deleted());
        }
        let tombstone: i64 = tombstone.map_err(classify)?.get(0);
        tx.commit().await.map_err(classify)?;
        Ok(DeleteOutcome::Deleted {
            version: Version(tombstone),
        })
    }

    /// Runs `ops` in one transaction, in order, all or nothing: the first that cannot be done
    /// (its precondition fails, Postgres rejects its document) rolls everything back and is
    /// named by its index. A delete of an absent key without a precondition is not a failure:
    /// [`TxDone::NotFound`].
    ///
    /// # Errors
    /// [`TxFailed`] with the index of the operation that failed (`None`: the connection or
    /// the commit); nothing was committed.
    pub async fn transact(
        &self,
        ops: &[TxItem<'_>],
        commit: Commit,
    ) -> Result<Vec<TxDone>, TxFailed> {
        let at = |index| {
            move |e: DbError| TxFailed {
                index,
                why: TxWhy::Db(e),
            }
        };
        let mut client = self.client().await.map_err(at(None))?;
        let tx = client
            .transaction()
            .await
            .map_err(classify)
            .map_err(at(None))?;
        commit.apply(&tx).await.map_err(at(None))?;
        let mut done = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let item = &ops[i];
            if let TxOp::Delete { pre } = item.op {
                let outcome = self.delete_in(&tx, item, pre).await;
                done.push(outcome.map_err(|why| TxFailed {
                    index: Some(i),
                    why,
                })?);
                i += 1;
                continue;
            }
            // A run of puts goes out in one round trip, in order: each put's answer decides
            // nothing for the next (a failure rolls everything back and names the first).
            // Once one fails, Postgres refuses the rest of the run as an aborted
            // transaction's; their errors are never read.
            let end = ops[i..]
                .iter()
                .position(|o| !matches!(o.op, TxOp::Put { .. }))
                .map_or(ops.len(), |n| i + n);
            let outcomes = in_order(ops[i..end].iter().map(|item| match item.op {
                TxOp::Put { body, pre } => put_in(&tx, item, body, pre),
                TxOp::Delete { .. } => unreachable!("a run holds puts only"),
            }))
            .await;
            for (j, outcome) in outcomes.into_iter().enumerate() {
                done.push(outcome.map_err(|why| TxFailed {
                    index: Some(i + j),
                    why,
                })?);
            }
            i = end;
        }
        tx.commit().await.map_err(classify).map_err(at(None))?;
        Ok(done)
    }

    /// One delete of a transaction ([`Db::transact`]), in `tx`: its version, or
    /// [`TxDone::NotFound`] for an absent key without a precondition.
    ///
    /// # Errors
    /// [`TxWhy::Precondition`] when `pre` does not hold; a classified [`DbError`].
    async fn delete_in(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        item: &TxItem<'_>,
        pre: &Precondition,
    ) -> Result<TxDone, TxWhy> {
        let conditional = matches!(pre, Precondition::Versions(_));
        let sql = item.resource.delete_sql(conditional);
        let deleted = match pre {
            Precondition::Versions(v) => {
                tx.query_typed_opt(
                    sql.as_str(),
                    &[
                        typed_key(item.key),
                        (v as &(dyn ToSql + Sync), Type::INT8_ARRAY),
                    ],
                )
                .await
            }
            _ => {
                tx.query_typed_opt(sql.as_str(), &[typed_key(item.key)])
                    .await
            }
        }
        .map_err(failed)?;
        match (deleted, pre) {
            (None, Precondition::None) => Ok(TxDone::NotFound),
            (None, _) => Err(TxWhy::Precondition),
            (Some(_), _) => {
                // The delete trigger took the delete's version in this session.
                let version: i64 = tx
                    .query_typed_one(&self.currval_sql(), &[])
                    .await
                    .map_err(failed)?
                    .get(0);
                Ok(TxDone::Deleted {
                    version: Version(version),
                })
            }
        }
    }
}

/// Runs `futures` to completion, polling them in the order given each time: a statement
/// leaves when its future is first polled, so they reach Postgres, one connection's
/// pipeline, in that order (as `tokio::join!` does for a fixed number).
async fn in_order<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    use futures_util::future::{maybe_done, MaybeDone};
    use std::future::Future;
    let mut all: Vec<std::pin::Pin<Box<MaybeDone<F>>>> =
        futures.map(|f| Box::pin(maybe_done(f))).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for f in &mut all {
            pending |= f.as_mut().poll(cx).is_pending();
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    all.iter_mut()
        .map(|f| f.as_mut().take_output().expect("every future is done"))
        .collect()
}

/// One put of a transaction ([`Db::transact`]), in `tx`.
///
/// # Errors
/// [`TxWhy::Precondition`] when `pre` does not hold; a classified [`DbError`], the
/// document's own ([`DbError::Rejected`], [`DbError::UnknownColumn`]) included.
async fn put_in(
    tx: &deadpool_postgres::Transaction<'_>,
    item: &TxItem<'_>,
    body: &JsonText,
    pre: &Precondition,
) -> Result<TxDone, TxWhy> {
    let (doc, write) = item
        .resource
        .prepare_write(item.key, body, pre)
        .map_err(|e| TxWhy::Db(DbError::from(e)))?;
    let versions = if_versions(pre);
    let params = write_params(&write, item.key, &doc, &versions);
    let row = tx
        .query_typed_opt(write.sql.as_str(), &params)
        .await
        .map_err(failed)?
        .ok_or(TxWhy::Precondition)?;
    Ok(TxDone::Written(written(&row)))
}

/// A statement of a transaction that failed, classified.
fn failed(e: tokio_postgres::Error) -> TxWhy {
    TxWhy::Db(classify(e))
}

/// What a write's `RETURNING version, document, created` says.
fn written(row: &tokio_postgres::Row) -> Written {
    let (version, doc) = versioned_doc(row);
    Written {
        version,
        doc,
        created: row.get(2),
    }
}

/// The versions `If-Match` names (none, unused, without one).
fn if_versions(pre: &Precondition) -> &[i64] {
    match pre {
        Precondition::Versions(v) => v,
        _ => &[],
    }
}

/// A write's bind parameters, in the order its SQL takes them: `$n::text` or `$n::int8` for
/// the key, `$n::text` for the document, `$n::int8[]` for the versions.
fn write_params<'a>(
    write: &WriteSql,
    key: &'a KeyParam,
    doc: &'a String,
    versions: &'a &[i64],
) -> Vec<Typed<'a>> {
    write
        .params
        .iter()
        .map(|p| match p {
            Param::Key => typed_key(key),
            Param::Doc => (doc as &(dyn ToSql + Sync), Type::TEXT),
            Param::Versions => (versions as &(dyn ToSql + Sync), Type::INT8_ARRAY),
        })
        .collect()
}

/// The parameters alone, for a prepared statement (which knows their types).
fn untyped<'a>(params: &[Typed<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|(p, _)| *p).collect()
}
