//! The stream loop of one term: the lease renewed (and the synchronous mode looked at),
//! instances' reports taken, heartbeats emitted, the slot's lag measured, tables' shapes
//! checked, and the stream's events received in batches. Knows nothing of the slot's
//! set-up.

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use crate::backoff::ticker;
use crate::coherence::Relayed;
use crate::config::PostgresSource;
use crate::feed::relayed::{applied_channel, relay_alive_channel};
use crate::resource::Catalog;
use crate::schema::capture::slot_lag;
use crate::schema::shape::ShapeCheck;
use crate::telemetry::{RELAY_ACTIVE, RELAY_SYNCHRONOUS, WAL_LAG_BYTES};

use super::apply::publish;
use super::confirm::{self, synchronous, Confirmations};
use super::context::RelayContext;
use super::error::RelayError;
use super::heartbeat;
use super::session::{listing, Session};
use super::sql::Sql;

/// Stream events taken into one batch at most (only what has already arrived is taken).
const BATCH_EVENTS: usize = 4096;

/// How often the relay asks Postgres whether it waits for it, until Postgres has said.
const SETTLE: Duration = Duration::from_millis(50);

/// How long the relay gathers the instances' reports of a heartbeat before it echoes them.
const ECHO_DELAY: Duration = Duration::from_millis(5);

/// Sleeps until `at`, or forever when `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One term's stream and everything its loop uses.
pub(super) struct Stream<'a> {
    ctx: &'a RelayContext,
    /// The catalog the term started with (its slot).
    catalog: &'a Catalog,
    /// The plain connection: versions, restamps, heartbeats, the slot's lag and state.
    client: tokio_postgres::Client,
    sql: Sql,
    repl: ReplicationClient,
    /// Held while streaming: instances watch it to tell a dead relay at once.
    alive: BoxStream<'static, redis::Msg>,
    /// Instances report what they applied here while this relay is a synchronous standby.
    reports: BoxStream<'static, redis::Msg>,
    /// Prepared once: it runs every `relay_lease / 4`.
    sync_state: tokio_postgres::Statement,
    /// Prepared once: an unnamed statement costs a second round trip each time.
    heartbeat: tokio_postgres::Statement,
    /// What Postgres said of this relay's sync_state, once it streams.
    known_synchronous: Option<bool>,
    /// When the instances' reports are to be echoed ([`Relayed::Listed`]): a few ms after
    /// the first report of a heartbeat's position, so one echo answers a fleet's reports.
    echo_at: Option<tokio::time::Instant>,
    session: Session,
    shape_check: ShapeCheck,
}

impl<'a> Stream<'a> {
    /// Gets a started stream ready for its loop: subscribes to the relay's alive channel and
    /// to the instances' reports, then prepares the plain connection's statements.
    ///
    /// # Errors
    /// Redis or Postgres failing.
    pub(super) async fn open(
        ctx: &'a RelayContext,
        catalog: &'a Catalog,
        client: tokio_postgres::Client,
        sql: Sql,
        repl: ReplicationClient,
        epoch: i64,
    ) -> Result<Self, RelayError> {
        let config = &ctx.config;
        let feeds = &config.feeds;
        let subscribing = |doing| move |source| RelayError::Redis { doing, source };
        let alive_channel = relay_alive_channel(&config.redis.key_prefix, &ctx.instance_id);
        let alive = ctx
            .redis
            .subscribe(&[alive_channel], feeds.lease)
            .await
            .map_err(subscribing("subscribing to the relay's alive channel"))?;
        let reports = ctx
            .redis
            .subscribe(&[applied_channel(&config.redis.key_prefix)], feeds.lease)
            .await
            .map_err(subscribing("subscribing to the instances' reports"))?;
        metrics::gauge!(RELAY_ACTIVE).set(1.0);
        tracing::info!(slot = %catalog.capture.slot, instance = %ctx.instance_id, "relaying the WAL");
        let (sync_state, heartbeat) = prepare(&client).await?;
        let mut confirmations = Confirmations::new(feeds.lease, feeds.relay_lease / 4);
        // Who may hold a lease from the previous synchronous relay's heartbeats: this term
        // confirms nothing new until they have reported (or a lease has passed).
        match ctx.redis.listing().await {
            Ok(listed) => confirmations.expect(listed),
            Err(e) => tracing::debug!(error = %e, "reading the instances waited for failed"),
        }
        Ok(Stream {
            ctx,
            catalog,
            client,
            sql,
            repl,
            alive,
            reports,
            sync_state,
            heartbeat,
            known_synchronous: None,
            echo_at: None,
            // Until Postgres is seen to say otherwise, the relay may be a synchronous standby.
            session: Session::new(epoch, confirmations),
            shape_check: ShapeCheck::new(Duration::ZERO),
        })
    }

    /// Streams until `shutdown` (`Ok`) or a failure.
    pub(super) async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let feeds = &self.ctx.config.feeds;
        let mut renew = ticker(feeds.relay_lease / 4);
        // Until Postgres has said whether it waits for this relay, it is asked more often
        // (for a lease at most: a role that cannot see the view never will): meanwhile the
        // relay takes itself for a synchronous standby (instances use L1 only once it echoes
        // their reports), which an asynchronous one should stop doing soon.
        let mut settle = ticker(SETTLE);
        let settling_until = tokio::time::Instant::now() + feeds.lease;
        let mut beat = ticker(feeds.heartbeat_interval);
        let mut measure = ticker(Duration::from_secs(5));
        // Tables changed by a DDL that no write follows show up in no Relation message: look.
        let mut shapes = ticker(feeds.lease / 2);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                // Without it instances would take this relay for dead: end the term.
                _ = self.alive.next() => return Err(RelayError::AliveClosed),
                _ = renew.tick() => self.renew().await?,
                _ = settle.tick(), if self.known_synchronous.is_none()
                    && tokio::time::Instant::now() < settling_until => {
                    self.observe_sync_state().await;
                }
                report = self.reports.next() => self.take_report(report)?,
                _ = sleep_until_some(self.echo_at) => self.echo().await?,
                _ = beat.tick() => self.emit_heartbeat().await?,
                _ = shapes.tick() => self.check_shapes().await,
                _ = measure.tick() => self.measure_lag().await?,
                event = self.repl.recv() => self.receive(event).await?,
            }
        }
    }

    /// Ends the stream after `result`: a clean shutdown of the replication connection after
    /// a shutdown, an abort after a failure; then a `gap` published, so instances stop
    /// trusting L1 now rather than at the end of their lease (the next relay's heartbeats
    /// bring them back). Returns `result`.
    pub(super) async fn end(mut self, result: Result<(), RelayError>) -> Result<(), RelayError> {
        if result.is_ok() {
            let _ = tokio::time::timeout(self.ctx.config.feeds.lease, self.repl.shutdown()).await;
        } else {
            self.repl.abort();
        }
        let gap = crate::coherence::Relayed::Gap {
            relay: self.ctx.instance_id.clone(),
        };
        let _ = super::apply::publish(self.ctx, gap).await;
        result
    }

    /// Renews the lease; then looks at whether Postgres waits for this relay (the operator
    /// named it in synchronous_standby_names), and confirms what may be confirmed now
    /// (instances gone silent are dropped).
    async fn renew(&mut self) -> Result<(), RelayError> {
        let ctx = self.ctx;
        match ctx
            .redis
            .claim_lease(&ctx.instance_id, ctx.config.feeds.relay_lease)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(RelayError::LeaseLost),
            Err(source) => {
                return Err(RelayError::Redis {
                    doing: "renewing the relay lease",
                    source,
                })
            }
        }
        self.observe_sync_state().await;
        self.session.confirmations.confirm(&self.repl);
        Ok(())
    }

    /// Follows the walsender's sync_state: a synchronous relay confirms a position once
    /// every instance has applied it, an asynchronous one once it is published.
    async fn observe_sync_state(&mut self) {
        let slot = &self.catalog.capture.slot;
        match synchronous(&self.client, &self.sync_state, slot).await {
            // Not streaming yet: what Postgres says of it now proves nothing.
            Ok(None) => {}
            Ok(Some(now)) if Some(now) != self.known_synchronous => {
                if now || self.known_synchronous.is_some() {
                    tracing::info!(
                        synchronous = now,
                        "the relay {} a synchronous standby of postgres: it confirms \
                         a position {}",
                        if now { "is" } else { "is no longer" },
                        if now {
                            "once every instance has applied it"
                        } else {
                            "once it is published"
                        }
                    );
                }
                self.known_synchronous = Some(now);
                let lease = self.ctx.config.feeds.lease;
                self.session
                    .confirmations
                    .set_synchronous(now.then_some(lease));
                metrics::gauge!(RELAY_SYNCHRONOUS).set(if now { 1.0 } else { 0.0 });
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read the relay's sync_state"),
        }
    }

    /// Takes an instance's report of what it applied.
    fn take_report(&mut self, report: Option<redis::Msg>) -> Result<(), RelayError> {
        let report = report.ok_or(RelayError::ReportsClosed)?;
        let echo = self
            .session
            .confirmations
            .reported(&self.repl, report.get_payload_bytes());
        if echo && self.echo_at.is_none() {
            self.echo_at = Some(tokio::time::Instant::now() + ECHO_DELAY);
        }
        Ok(())
    }

    /// Echoes the reports heard (see [`Relayed::Listed`]).
    async fn echo(&mut self) -> Result<(), RelayError> {
        self.echo_at = None;
        if let Some(listed) = listing(self.ctx, &mut self.session.confirmations).await {
            let relay = self.ctx.instance_id.clone();
            publish(self.ctx, Relayed::Listed { relay, listed }).await?;
        }
        Ok(())
    }

    /// Emits a heartbeat into the WAL.
    async fn emit_heartbeat(&mut self) -> Result<(), RelayError> {
        let timeout = self.ctx.config.feeds.heartbeat_interval;
        self.session
            .heartbeats
            .emit(
                &self.client,
                &self.heartbeat,
                &self.ctx.instance_id,
                timeout,
            )
            .await
    }

    /// Checks the resources' tables' shapes, if due.
    async fn check_shapes(&mut self) {
        let config = &self.ctx.config;
        self.shape_check
            .run(
                &self.client,
                config,
                PostgresSource::Wal,
                config.feeds.lease,
            )
            .await;
    }

    /// Measures the slot's lag, for the heartbeats and the metric.
    async fn measure_lag(&mut self) -> Result<(), RelayError> {
        match slot_lag(&self.client, &self.catalog.capture.slot).await? {
            Some(lag) if lag.lost => Err(RelayError::SlotInvalidated),
            Some(lag) => {
                self.session.lag_bytes = Some(lag.bytes);
                metrics::gauge!(WAL_LAG_BYTES).set(lag.bytes as f64);
                Ok(())
            }
            None => Err(RelayError::SlotGone),
        }
    }

    /// Takes `first` and every event already received after it as one batch (under load
    /// many transactions are applied and published at once; idle, each goes out at once),
    /// then applies and publishes what it committed.
    async fn receive(
        &mut self,
        first: Result<Option<ReplicationEvent>, PgWireError>,
    ) -> Result<(), RelayError> {
        let first = event(first)?;
        let (received, ended) = self.take_ready(first);
        // The catalog as it is now: a resource reloaded after its table changed maps by its
        // new columns from the next Relation message on.
        let current = self.ctx.catalog.get().map_err(RelayError::Catalog)?;
        self.session.relations.remap(&current, &self.ctx.config);
        for event in received {
            self.session
                .on_event(
                    self.ctx,
                    &current,
                    &self.client,
                    &self.sql,
                    &self.repl,
                    event,
                )
                .await?;
        }
        if std::mem::take(&mut self.session.relations.seen) {
            // pgoutput sends a `Relation` before a table's first change after its shape
            // changed: look at once instead of at the next tick.
            self.shape_check.due_now();
            self.check_shapes().await;
        }
        self.session.flush(self.ctx, &current, &self.repl).await?;
        ended.map_or(Ok(()), Err)
    }

    /// `first` and the events already received after it, at most [`BATCH_EVENTS`]; and why
    /// the stream ended, if it did while they were taken.
    fn take_ready(
        &mut self,
        first: ReplicationEvent,
    ) -> (Vec<ReplicationEvent>, Option<RelayError>) {
        let mut received = vec![first];
        while received.len() < BATCH_EVENTS {
            match self.repl.recv().now_or_never() {
                Some(next) => match event(next) {
                    Ok(next) => received.push(next),
                    Err(e) => return (received, Some(e)),
                },
                None => break,
            }
        }
        (received, None)
    }
}

/// The event the stream gave, or why it gave none.
fn event(
    received: Result<Option<ReplicationEvent>, PgWireError>,
) -> Result<ReplicationEvent, RelayError> {
    match received {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err(RelayError::StreamEnded),
        Err(source) => Err(RelayError::Replication {
            doing: "replication stream",
            source,
        }),
    }
}

/// Sets the plain connection up for the loop, and prepares its statements: the sync_state
/// query and the heartbeat.
async fn prepare(
    client: &tokio_postgres::Client,
) -> Result<(tokio_postgres::Statement, tokio_postgres::Statement), RelayError> {
    let failed = |doing| move |source| RelayError::Postgres { doing, source };
    // The relay's own statements on customers' tables (a re-inserted row given a fresh
    // version) must never hold the stream behind a customer's lock for long.
    client
        .batch_execute("SET lock_timeout = '200ms'")
        .await
        .map_err(failed("setting lock_timeout"))?;
    let sync_state = client
        .prepare(confirm::SYNC_STATE)
        .await
        .map_err(failed("preparing the sync_state query"))?;
    let heartbeat = client
        .prepare(heartbeat::EMIT)
        .await
        .map_err(failed("preparing the heartbeat"))?;
    Ok((sync_state, heartbeat))
}
