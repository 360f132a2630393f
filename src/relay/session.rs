//! What one term of streaming keeps between events, and what each event of the stream
//! does to it: transactions gathered to their commit, committed changes applied and
//! published, then their position acknowledged. Knows nothing of the term's timers.

use std::collections::BTreeMap;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};

use crate::coherence::{mono_ms, Message, Relayed};
use crate::resource::Catalog;
use crate::schema::capture::MESSAGE_PREFIX;
use crate::telemetry::RELAY_TRANSACTIONS;

use super::apply::{apply_and_publish, publish};
use super::confirm::Confirmations;
use super::context::RelayContext;
use super::error::RelayError;
use super::heartbeat::Heartbeats;
use super::pgoutput::{self, Change};
use super::reinsert::RecentDeletes;
use super::relations::Relations;
use super::sql::Sql;
use super::transaction::{changes_of, Transaction};

/// Postgres counts time from 2000-01-01; Unix from 1970-01-01 (in microseconds).
const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// What one term of streaming keeps between events.
pub(super) struct Session {
    /// The stream's relations, mapped to resources.
    pub(super) relations: Relations,
    /// The transaction being received.
    txn: Transaction,
    /// Changes of committed transactions not yet applied and published, and the position
    /// to acknowledge once they are.
    pending: Vec<Message>,
    pending_lsn: Option<Lsn>,
    pending_transactions: u64,
    /// The slot's lag, as last measured, for the heartbeats.
    pub(super) lag_bytes: Option<i64>,
    /// This term's heartbeats, emitted and expected back.
    pub(super) heartbeats: Heartbeats,
    /// What is published, and what Postgres is told of it.
    pub(super) confirmations: Confirmations,
    /// The slot's epoch: the heartbeats carry it with their positions.
    epoch: i64,
    /// Deletes relayed in this term, for a re-insert racing one.
    recent_deletes: RecentDeletes,
}

impl Session {
    /// A term's start, streaming from the slot of `epoch`.
    pub(super) fn new(epoch: i64, confirmations: Confirmations) -> Self {
        Session {
            relations: Relations::default(),
            txn: Transaction::default(),
            pending: Vec::new(),
            pending_lsn: None,
            pending_transactions: 0,
            lag_bytes: None,
            heartbeats: Heartbeats::default(),
            confirmations,
            epoch,
            recent_deletes: RecentDeletes::default(),
        }
    }

    /// Takes one event of the stream. A committed transaction's changes wait in `pending`
    /// for [`Session::flush`]; a heartbeat flushes what came before it, then goes out.
    ///
    /// # Errors
    /// Undecodable bytes, or Postgres or Redis failing.
    pub(super) async fn on_event(
        &mut self,
        ctx: &RelayContext,
        catalog: &Catalog,
        client: &tokio_postgres::Client,
        sql: &Sql,
        repl: &ReplicationClient,
        event: ReplicationEvent,
    ) -> Result<(), RelayError> {
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.txn = Transaction::begin(
                    commit_time_micros + POSTGRES_EPOCH_US,
                    self.confirmations.is_synchronous(),
                );
            }
            ReplicationEvent::XLogData { data, .. } => {
                match pgoutput::decode(data).map_err(RelayError::Decode)? {
                    Change::Relation(r) => self.relations.learn(r, catalog, &ctx.config),
                    Change::Other(_) => {}
                    row => self.txn.receive(row, &self.relations),
                }
            }
            ReplicationEvent::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == MESSAGE_PREFIX => match serde_json::from_slice(&content) {
                Ok(announced) => self.txn.announce(announced),
                // Anyone may emit one: a malformed message must not stop the relay (it would
                // come again after every restart). What it would announce gets a version of
                // the relay's own.
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed syncar message in the WAL")
                }
            },
            ReplicationEvent::Message {
                transactional: false,
                prefix,
                content,
                lsn,
            } if prefix == MESSAGE_PREFIX => {
                // Everything before it in the WAL goes out first.
                self.flush(ctx, catalog, repl).await?;
                self.on_heartbeat(ctx, repl, &content, lsn).await?;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.on_commit(catalog, client, sql, end_lsn).await?
            }
            _ => {}
        }
        Ok(())
    }

    /// Applies what committed transactions changed to Redis, publishes it, and only then
    /// acknowledges their position.
    ///
    /// # Errors
    /// Encoding or Redis failing.
    pub(super) async fn flush(
        &mut self,
        ctx: &RelayContext,
        catalog: &Catalog,
        repl: &ReplicationClient,
    ) -> Result<(), RelayError> {
        let Some(lsn) = self.pending_lsn.take() else {
            return Ok(());
        };
        let changes = std::mem::take(&mut self.pending);
        if !changes.is_empty() {
            apply_and_publish(ctx, catalog, &changes, lsn).await?;
        }
        metrics::counter!(RELAY_TRANSACTIONS)
            .increment(std::mem::take(&mut self.pending_transactions));
        // Carried by a message only when something was published for it.
        self.confirmations.advance(repl, lsn, !changes.is_empty());
        Ok(())
    }

    /// A syncar message without a transaction at `lsn`: this term's heartbeat is published
    /// with its lag (instances then report its position); anything else only moves the
    /// position on.
    async fn on_heartbeat(
        &mut self,
        ctx: &RelayContext,
        repl: &ReplicationClient,
        content: &[u8],
        lsn: Lsn,
    ) -> Result<(), RelayError> {
        let Some(sent) = self.heartbeats.own(content, &ctx.instance_id) else {
            self.confirmations.advance(repl, lsn, false);
            return Ok(());
        };
        let listed = listing(ctx, &mut self.confirmations).await;
        publish(
            ctx,
            Relayed::Heartbeat {
                relay: ctx.instance_id.clone(),
                lag_ms: mono_ms().saturating_sub(sent),
                lag_bytes: self.lag_bytes,
                lsn: Some(lsn.to_string()),
                epoch: Some(self.epoch),
                sync: self.confirmations.is_synchronous(),
                listed,
            },
        )
        .await?;
        // Published: instances report this position.
        self.confirmations.beat(lsn);
        self.confirmations.advance(repl, lsn, true);
        Ok(())
    }

    /// A commit at `end_lsn`: the transaction's messages join `pending`.
    async fn on_commit(
        &mut self,
        catalog: &Catalog,
        client: &tokio_postgres::Client,
        sql: &Sql,
        end_lsn: Lsn,
    ) -> Result<(), RelayError> {
        let txn = std::mem::take(&mut self.txn);
        let mut changes = changes_of(txn, catalog, client, sql).await?;
        self.recent_deletes
            .reinserted_after_delete(&mut changes, catalog, client, sql)
            .await?;
        self.pending.extend(changes);
        self.pending_lsn = Some(end_lsn);
        self.pending_transactions += 1;
        Ok(())
    }
}

/// What a heartbeat or an echo lists while the relay is synchronous (see
/// [`Confirmations::listed`]), once the instances that may hold a lease from it are recorded
/// in Redis for a successor (for two leases: the longest a lease it grants can last after
/// the record, and some). `None` when asynchronous, or when the record failed: then no
/// instance counts a lease from this message.
pub(super) async fn listing(
    ctx: &RelayContext,
    confirmations: &mut Confirmations,
) -> Option<BTreeMap<String, u64>> {
    let listed = confirmations.listed()?;
    let record = confirmations.to_record();
    match ctx
        .redis
        .record_listing(&record, 2 * ctx.config.feeds.lease)
        .await
    {
        Ok(()) => Some(listed),
        Err(e) => {
            tracing::debug!(error = %e, "recording the instances waited for failed");
            None
        }
    }
}
