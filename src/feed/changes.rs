//! The Postgres feed without NOTIFY (`feeds.postgres_source = "changes_log"`): polls the
//! changes log that the triggers write, on a connection of its own. Knows nothing about HTTP.
//!
//! NOTIFY makes every notifying commit take a cluster-wide lock; this source keeps the write
//! path free of it, at the price of `poll_interval` of extra delay. Versions are taken before
//! commit, so they are not in commit order; transaction ids are not either. The poller reads by
//! transaction id from the `xmin` of its previous snapshot (every transaction below it has
//! ended, so nothing can appear there later) and skips rows it has already applied.
//! A successful poll is the heartbeat: the lease runs from the start of the last one.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{
    connect_postgres, handle_parsed, mono_ms, recover, AbortOnDrop, Feed, Message, Op, Supervisor,
};
use crate::app::AppState;
use crate::schema::{changes_from_xid, current_xmin};

/// Changes of one poll applied at once (their Redis calls share one pipelined connection).
pub(crate) const APPLY_CONCURRENCY: usize = 64;

/// Where the poller is in the log: the low-water transaction id and what it has applied at or
/// above it.
#[derive(Default)]
struct Cursor {
    xid: Option<i64>,
    applied: HashSet<(i64, i64)>,
}

/// Runs the poller until `shutdown`; failures mark the feed down and reconnect with backoff.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut cursor = Cursor::default();
    let mut supervisor = Supervisor::new(Feed::Postgres);
    if !supervisor.wait_for_catalog(&state, &shutdown).await {
        return;
    }
    while supervisor
        .again(
            session(&state, &shutdown, &mut cursor).await,
            &state,
            &shutdown,
        )
        .await
    {}
}

async fn session(
    state: &AppState,
    shutdown: &CancellationToken,
    cursor: &mut Cursor,
) -> Result<(), String> {
    let config = &state.config;
    let (client, connection) = connect_postgres(state).await?;
    let driver = tokio::spawn(connection);
    let _driver = AbortOnDrop(driver);

    let lease = config.feeds.lease;
    let feed = &state.coherence.postgres;
    feed.grant(lease);
    let schema = &config.postgres.schema;
    if cursor.xid.is_none() {
        // First start: take the low-water mark before replaying, so nothing falls between.
        let xmin = tokio::time::timeout(lease, current_xmin(&client))
            .await
            .map_err(|_| "snapshot timed out".to_string())?
            .map_err(|e| format!("snapshot failed: {e}"))?;
        recover(state, Feed::Postgres, None).await?;
        feed.grant(lease);
        cursor.xid = Some(xmin);
    }
    let mut up = false;
    let mut tick = tokio::time::interval(config.feeds.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if mono_ms() > feed.valid_until() {
            return Err(format!("no successful poll within {lease:?}"));
        }
        let started = mono_ms();
        let from = cursor.xid.unwrap_or_default();
        let (xmin, rows) = tokio::time::timeout(lease, changes_from_xid(&client, schema, from))
            .await
            .map_err(|_| "poll timed out".to_string())?
            .map_err(|e| format!("poll failed: {e}"))?;
        let messages: Vec<Message> = rows
            .into_iter()
            .filter(|(xid, change, _)| cursor.applied.insert((*xid, change.version)))
            .map(|(_, change, ts_us)| Message {
                op: match change.op.as_str() {
                    "delete" => Op::Delete,
                    "flush" => Op::Flush,
                    _ => Op::Put,
                },
                resource: change.resource,
                key: change.key,
                version: change.version,
                ts_us: Some(ts_us),
                instance: None,
            })
            .collect();
        // Many at once: a statement changing 50k rows, applied one Redis round trip after
        // another, took longer than the lease. Order does not matter, since every tier takes
        // only strictly newer versions, and the Redis connection pipelines what is in flight.
        futures_util::stream::iter(messages)
            .for_each_concurrent(APPLY_CONCURRENCY, |message| {
                handle_parsed(state, Feed::Postgres, message)
            })
            .await;
        cursor.xid = Some(xmin);
        cursor.applied.retain(|(xid, _)| *xid >= xmin);
        feed.heartbeat_back(started, lease);
        if !up {
            // Everything since the outage began has just been applied: L1 can be trusted
            // again once emptied of what it held before.
            if let Some(l1) = state.tiers.l1() {
                l1.clear();
                metrics::counter!(crate::telemetry::L1_FLUSHES, "feed" => "postgres").increment(1);
            }
            feed.set_up();
            up = true;
        }
    }
}
