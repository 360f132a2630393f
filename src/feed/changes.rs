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
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{connect_postgres, handle_parsed, recover, AbortOnDrop, Source};
use super::error::FeedError;
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

    /// Connect, find where the poll starts ([`ChangesLog::resume`]), then poll every
    /// `feeds.poll_interval`; a poll that does not succeed within the lease ends the session.
    async fn session(
        &mut self,
        ctx: &FeedContext,
        shutdown: &CancellationToken,
        _last_good: Option<u64>,
    ) -> Result<(), FeedError> {
        let config = &ctx.config;
        let (client, connection) = connect_postgres(ctx).await?;
        let _driver = AbortOnDrop(tokio::spawn(connection));

        let lease = config.feeds.lease;
        let feed = &ctx.coherence.postgres;
        feed.grant(lease);
        let query = within(
            lease,
            "preparing the poll",
            ChangesQuery::prepare(&client, &config.postgres.schema),
        )
        .await?;
        self.resume(ctx, &client, lease).await?;
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
                return Err(FeedError::Silent {
                    what: "no successful poll",
                    lease,
                });
            }
            let started = mono_ms();
            self.poll_and_apply(ctx, &client, &query, lease).await?;
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

impl ChangesLog {
    /// Where the poll starts. On a reconnect the log is durable, so the poll resumes where
    /// it was, unless Postgres went back in time (a restore, a failover), transaction ids
    /// with it. On the first start (or once Postgres went back): the low-water mark is taken
    /// before Redis is repaired from the log, so nothing falls between.
    async fn resume(
        &mut self,
        ctx: &FeedContext,
        client: &tokio_postgres::Client,
        lease: Duration,
    ) -> Result<(), FeedError> {
        if let Some(from) = self.xid {
            let xmin = within(lease, "snapshot", current_xmin(client)).await?;
            let mut went_back = ctx.guards.secure_postgres().await?.is_some();
            if xmin < from && !went_back {
                let why = format!("its transaction ids went back from {from} to {xmin}");
                ctx.guards
                    .postgres_went_back(ctx.guards.high_water(), &why)
                    .await?;
                went_back = true;
            }
            if went_back {
                self.xid = None;
            }
        }
        if self.xid.is_none() {
            let xmin = within(lease, "snapshot", current_xmin(client)).await?;
            recover(ctx, Feed::Postgres, None).await?;
            ctx.coherence.postgres.grant(lease);
            self.xid = Some(xmin);
        }
        Ok(())
    }

    /// One poll: reads the log from the low-water mark, applies what was not applied yet,
    /// and moves the mark to the poll's snapshot.
    ///
    /// # Errors
    /// The poll failed or timed out, or the schema now serves another source.
    async fn poll_and_apply(
        &mut self,
        ctx: &FeedContext,
        client: &tokio_postgres::Client,
        query: &ChangesQuery,
        lease: Duration,
    ) -> Result<(), FeedError> {
        let from = self.xid.unwrap_or_default();
        let (xmin, source, rows) = within(lease, "poll", query.poll(client, from)).await?;
        if source.as_deref() != Some(PostgresSource::ChangesLog.as_str()) {
            // Nothing writes the log any more: polling it would prove nothing.
            return Err(FeedError::SourceChanged(source));
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
        Ok(())
    }
}

/// `statement`, bounded by `lease`; `what` names it in the error.
async fn within<T>(
    lease: Duration,
    what: &'static str,
    statement: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, FeedError> {
    tokio::time::timeout(lease, statement)
        .await
        .map_err(|_| FeedError::Timeout { what })?
        .map_err(|source| FeedError::Postgres { what, source })
}
