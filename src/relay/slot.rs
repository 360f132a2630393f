//! The replication slot at a term's start: made sure of, its failover settings looked at,
//! its epoch read, and Redis brought to it (every generation raised when Redis was fed by
//! another slot). Knows nothing of streaming.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::coherence::{Message, Op, Relayed};
use crate::resource::Catalog;
use crate::schema::capture::{
    ensure_slot, failover_gaps, new_slot_epoch, retention_gap, server_version_num, slot_epoch,
    SlotState,
};
use crate::schema::SchemaError;
use crate::telemetry::error_chain;

use super::apply::publish;
use super::context::RelayContext;
use super::error::RelayError;
use super::sql::Sql;
use super::transaction::change;

/// Whether what keeps the slot from following a failover was logged at warn level already
/// (each relay term would say it again).
static FAILOVER_WARNED: AtomicBool = AtomicBool::new(false);
/// Whether this process warned that nothing bounds the WAL the slot keeps.
static RETENTION_WARNED: AtomicBool = AtomicBool::new(false);

/// Makes sure `slot` exists, saying why when it had to be created again.
///
/// # Errors
/// Postgres failing.
pub(super) async fn ensure(
    client: &tokio_postgres::Client,
    schema: &str,
    slot: &str,
) -> Result<(), RelayError> {
    match ensure_slot(client, schema, slot).await? {
        SlotState::Kept => {}
        SlotState::Created => tracing::info!(slot = %slot, "created the replication slot"),
        SlotState::Missing => tracing::error!(
            slot = %slot,
            "the replication slot syncar had created is not on this server: it did not follow \
             a failover here (Postgres before 17, no sync_replication_slots on the standby, or \
             not yet synchronized when it was promoted), or it was dropped. Continuity cannot \
             be proven, so a new slot was created and every cached resource is flushed"
        ),
        SlotState::Recreated => tracing::error!(
            slot = %slot,
            "the replication slot had been invalidated (its WAL was removed, see \
             max_slot_wal_keep_size) and was recreated: changes since it fell behind are lost \
             to it, so every cached resource is flushed"
        ),
    }
    Ok(())
}

/// What keeps `slot` from following a failover (empty when nothing does), logged: at warn
/// level once per process, then at debug level.
pub(super) async fn failover_gaps_logged(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Vec<String>, SchemaError> {
    let gaps = failover_gaps(client, slot).await;
    match gaps {
        Ok(ref gaps) if !gaps.is_empty() => {
            let first = !FAILOVER_WARNED.swap(true, Ordering::Relaxed);
            for gap in gaps.iter() {
                if first {
                    tracing::warn!(slot = %slot, "{gap}");
                } else {
                    tracing::debug!(slot = %slot, "{gap}");
                }
            }
        }
        Ok(_) => {}
        Err(ref e) => tracing::debug!(error = %error_chain(e), "cannot read the failover settings"),
    }
    gaps
}

/// Warns, once per process, when nothing bounds the WAL the slot keeps
/// ([`crate::schema::capture::retention_gap`]).
pub(super) async fn retention_gap_logged(client: &tokio_postgres::Client, slot: &str) {
    match retention_gap(client).await {
        Ok(Some(gap)) if !RETENTION_WARNED.swap(true, Ordering::Relaxed) => {
            tracing::warn!(slot = %slot, "{gap}");
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %error_chain(&e), "cannot read max_slot_wal_keep_size"),
    }
}

/// The slot's epoch, recorded now for a slot from before epochs were recorded (what fed
/// Redis is then unknown).
///
/// # Errors
/// Postgres failing.
pub(super) async fn epoch(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<i64, RelayError> {
    Ok(match slot_epoch(client, schema).await? {
        Some(epoch) => epoch,
        None => new_slot_epoch(client, schema).await?,
    })
}

/// Records in Redis that failover is guarded on this timeline, when nothing keeps the slot
/// from following a failover (`gaps` empty) on Postgres 17 or later. Recorded only after
/// the guards ran: a relay on a promoted standby must first compare with what the timeline
/// it left recorded. Failures are logged at debug level.
pub(super) async fn record_failover_guarded(
    ctx: &RelayContext,
    client: &tokio_postgres::Client,
    gaps: &Result<Vec<String>, SchemaError>,
) {
    if let (Ok(gaps), Some(timeline)) = (gaps, current_timeline(client).await) {
        if gaps.is_empty() && server_version_num(client).await.is_ok_and(|v| v >= 170_000) {
            if let Err(e) = ctx.redis.record_failover_guarded(timeline).await {
                tracing::debug!(error = %e, "cannot record that failover is guarded");
            }
        }
    }
}

/// Brings Redis to the slot of `epoch`: if Redis was fed by another slot (or none), it may
/// hold copies no change from this slot will ever invalidate, so every resource's
/// generation is raised (applied, then published) before the epoch is recorded.
///
/// # Errors
/// Postgres or Redis failing.
pub(super) async fn feed_redis_from(
    ctx: &RelayContext,
    catalog: &Catalog,
    client: &tokio_postgres::Client,
    sql: &Sql,
    epoch: i64,
) -> Result<(), RelayError> {
    let redis = |doing| move |source| RelayError::Redis { doing, source };
    let fed_by = ctx
        .redis
        .fed_by_slot()
        .await
        .map_err(redis("reading the slot redis was fed by"))?;
    if fed_by == Some(epoch) {
        return Ok(());
    }
    let version = sql.next_version(client).await?;
    let flushes: Vec<Message> = catalog
        .all_names()
        .iter()
        .map(|r| change(r, None, version, Op::Flush, None))
        .collect();
    ctx.redis
        .changes()
        .apply(catalog, &flushes)
        .await
        .map_err(redis("flushing redis for a new slot"))?;
    publish(
        ctx,
        Relayed::Changes {
            changes: flushes,
            lsn: None,
        },
    )
    .await?;
    ctx.redis
        .record_fed_by_slot(epoch)
        .await
        .map_err(redis("recording the slot redis is fed by"))?;
    let slot = &catalog.capture.slot;
    if fed_by.is_none() {
        // A first start (or a Redis that lost everything): nothing to be alarmed at.
        tracing::info!(
            slot = %slot,
            slot_epoch = ?epoch,
            "redis was fed by no replication slot yet; raised every resource's generation"
        );
    } else {
        tracing::warn!(
            slot = %slot,
            redis_fed_by = ?fed_by,
            slot_epoch = ?epoch,
            "redis was fed by another replication slot; raised every resource's generation"
        );
    }
    Ok(())
}

/// The timeline of the WAL being written (see [`crate::db::PostgresIdentity::timeline`]).
async fn current_timeline(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_one(
            "SELECT ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get(0))
}
