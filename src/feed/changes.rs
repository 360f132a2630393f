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

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{connect_postgres, handle_parsed, recover, AbortOnDrop, Source};
use crate::backoff::ticker;
use crate::coherence::{mono_ms, Feed, Message};
use crate::config::PostgresSource;
use crate::schema::shape::ShapeCheck;
use crate::schema::{current_xmin, ChangesQuery};
use crate::tiers::APPLY_CONCURRENCY;

/// The poller, and where it is in the log: the low-water transaction id and what it has
/// applied at or above it. Kept across connections.
#[derive(Default)]
pub struct ChangesLog {
    xid: Option<i64>,
    applied: HashSet<(i64, i64)>,
}

impl Source for ChangesLog {
    const FEED: Feed = Feed::Postgres;

    async fn session(
        &mut self,
        ctx: &FeedContext,
        shutdown: &CancellationToken,
        _last_good: Option<u64>,
    ) -> Result<(), String> {
        let config = &ctx.config;
        let (client, connection) = connect_postgres(ctx).await?;
        let _driver = AbortOnDrop(tokio::spawn(connection));

        let lease = config.feeds.lease;
        let feed = &ctx.coherence.postgres;
        feed.grant(lease);
        let query = tokio::time::timeout(
            lease,
            ChangesQuery::prepare(&client, &config.postgres.schema),
        )
        .await
        .map_err(|_| "preparing the poll timed out".to_string())?
        .map_err(|e| format!("preparing the poll failed: {e}"))?;
        if let Some(from) = self.xid {
            // A reconnect: the log is durable, so the poll resumes where it was, unless
            // Postgres went back in time (a restore, a failover), transaction ids with it.
            let xmin = tokio::time::timeout(lease, current_xmin(&client))
                .await
                .map_err(|_| "snapshot timed out".to_string())?
                .map_err(|e| format!("snapshot failed: {e}"))?;
            let mut went_back = ctx.tiers.secure_postgres().await?.is_some();
            if xmin < from && !went_back {
                let why = format!("its transaction ids went back from {from} to {xmin}");
                ctx.tiers
                    .postgres_went_back(ctx.tiers.high_water(), &why)
                    .await?;
                went_back = true;
            }
            if went_back {
                self.xid = None;
            }
        }
        if self.xid.is_none() {
            // First start (or Postgres went back): take the low-water mark before replaying,
            // so nothing falls between.
            let xmin = tokio::time::timeout(lease, current_xmin(&client))
                .await
                .map_err(|_| "snapshot timed out".to_string())?
                .map_err(|e| format!("snapshot failed: {e}"))?;
            recover(ctx, Feed::Postgres, None).await?;
            feed.grant(lease);
            self.xid = Some(xmin);
        }
        let mut up = false;
        let mut tick = ticker(config.feeds.poll_interval);
        let mut shapes = ShapeCheck::new(lease / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            // Before the poll: a new shape's flush is in the log by then.
            shapes
                .run(&client, config, PostgresSource::ChangesLog, lease)
                .await;
            if mono_ms() > feed.valid_until() {
                return Err(format!("no successful poll within {lease:?}"));
            }
            let started = mono_ms();
            let from = self.xid.unwrap_or_default();
            let (xmin, source, rows) = tokio::time::timeout(lease, query.poll(&client, from))
                .await
                .map_err(|_| "poll timed out".to_string())?
                .map_err(|e| format!("poll failed: {e}"))?;
            if source.as_deref() != Some(PostgresSource::ChangesLog.as_str()) {
                // Nothing writes the log any more: polling it would prove nothing.
                return Err(format!(
                    "the schema was migrated to postgres_source {source:?}; restart this \
                     instance with the same source"
                ));
            }
            let messages: Vec<Message> = rows
                .into_iter()
                .filter(|(xid, change)| self.applied.insert((*xid, change.version)))
                .map(|(_, change)| change)
                .collect();
            // Many at once: a statement changing 50k rows, applied one Redis round trip after
            // another, took longer than the lease. Order does not matter, since every tier
            // takes only strictly newer versions, and the Redis connection pipelines what is in
            // flight.
            futures_util::stream::iter(messages)
                .for_each_concurrent(APPLY_CONCURRENCY, |message| {
                    handle_parsed(ctx, Feed::Postgres, message)
                })
                .await;
            self.xid = Some(xmin);
            self.applied.retain(|(xid, _)| *xid >= xmin);
            feed.heartbeat_back(started, lease);
            if !up {
                // Everything since the outage began has just been applied: L1 can be trusted
                // again once emptied of what it held before.
                ctx.tiers.flush_l1(Feed::Postgres);
                feed.set_up();
                up = true;
            }
        }
    }
}
