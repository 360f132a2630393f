//! The Postgres feed of the `wal` source, as every instance hears it: the relay's channel in
//! Redis. Changes arrive already applied to Redis, so only L1 is touched; the relay's
//! heartbeats (emitted into the WAL, relayed with their lag) prove the whole chain, Postgres
//! to this instance, alive and caught up. Sends Postgres nothing. Knows nothing about HTTP.
//!
//! # Catching up
//! Messages published while this instance was not subscribed are lost to it; Redis is not
//! (the relay applied them there first). So on every new subscription, at the first
//! heartbeat that comes through it, L1 is emptied and the generations re-read: from then on
//! every change reaches L1 through the subscription.
//!
//! # A relay that stops, or lags
//! While the subscription lasts nothing is lost to this instance: a relay that dies is
//! replaced by one that resumes from the last acknowledged position and publishes what
//! follows before its first heartbeat. So a lapse of heartbeats (or a relay's `gap`
//! message, sent when it loses its stream, or its subscription to its own alive channel
//! vanishing, when its process died) only takes the feed down, L1 bypassed; the next
//! heartbeat brings it back without emptying L1.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use pgwire_replication::Lsn;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{handle_relayed, start_over, Source};
use super::error::FeedError;
use crate::backoff::ticker;
use crate::coherence::{mono_ms, Feed, RelayStatus, Relayed as Payload, ReportAnchors};
use crate::telemetry::{FEED_MALFORMED, WAL_LAG_BYTES, WAL_LAG_SECONDS};

/// The subscription to the relay's channel.
pub struct Relayed {
    channel: String,
    /// The reports sent to a synchronous relay, and where each lets the lease count from
    /// once echoed. Kept across sessions: a report's number is never reused, so an echo
    /// meant for an earlier session's report cannot vouch for a later one.
    anchors: ReportAnchors,
}

impl Relayed {
    pub fn new(ctx: &FeedContext) -> Self {
        Relayed {
            channel: relay_channel(&ctx.config.redis.key_prefix),
            anchors: ReportAnchors::default(),
        }
    }
}

/// The channel the relay publishes on.
pub fn relay_channel(prefix: &str) -> String {
    format!("{prefix}wal")
}

/// The channel a relay stays subscribed to while it streams: its subscription vanishes the
/// moment its process dies, which instances see at their next tick (`PUBSUB NUMSUB`).
pub fn relay_alive_channel(prefix: &str, relay: &str) -> String {
    format!("{prefix}relay-alive:{relay}")
}

/// How often an instance asks Redis whether the relay it hears still holds its alive
/// subscription (`PUBSUB NUMSUB`, one command): a fifth of the heartbeat interval, at least
/// 10 ms. A relay killed is noticed within that, where a heartbeat's absence takes the lease.
fn alive_check(heartbeat: std::time::Duration) -> std::time::Duration {
    (heartbeat / 5).max(std::time::Duration::from_millis(10))
}

/// The channel on which instances report the position they applied (`"{instance} {lsn}
/// {seq}"`: the LSN as a number, and the report's number, see
/// [`crate::coherence::ReportAnchors`]) while the relay is a synchronous standby: it
/// confirms a position to Postgres only once every instance that reported within its lease
/// has applied it.
pub fn applied_channel(prefix: &str) -> String {
    format!("{prefix}relay-applied")
}

impl Source for Relayed {
    const FEED: Feed = Feed::Postgres;

    async fn session(
        &mut self,
        ctx: &FeedContext,
        shutdown: &CancellationToken,
        _last_good: Option<u64>,
    ) -> Result<(), FeedError> {
        let config = &ctx.config;
        let lease = config.feeds.lease;
        let mut messages = ctx
            .tiers
            .subscribe(std::slice::from_ref(&self.channel), lease)
            .await
            .map_err(|source| FeedError::Redis {
                what: "subscribing to the relay",
                source,
            })?;
        ctx.coherence.postgres.grant(lease);
        // Reports go out in order, beside the loop: a slow round trip to Redis must not
        // hold up the messages (nor, behind them, this instance's lease).
        let (reports, queued) = tokio::sync::mpsc::unbounded_channel();
        let reporter = send_reports(ctx, applied_channel(&config.redis.key_prefix), queued);
        tokio::pin!(reporter);
        let caught_up = AtomicBool::new(false);
        let mut listening = Listening {
            ctx,
            anchors: &mut self.anchors,
            reports,
            caught_up: &caught_up,
            reporting: false,
            emitted: None,
            relay_epoch: None,
        };
        // The alive check runs beside the loop too, for the same reason.
        let alive = watch_relay_alive(ctx, &caught_up);
        tokio::pin!(alive);
        let mut tick = ticker(config.feeds.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                () = &mut reporter => {}
                () = &mut alive => {}
                _ = tick.tick() => listening.check_lease()?,
                message = messages.next() => {
                    let message = message.ok_or(FeedError::Closed("the subscription to the relay"))?;
                    match Payload::parse(message.get_payload_bytes()) {
                        Ok(payload) => listening.take(payload).await?,
                        Err(e) => {
                            metrics::counter!(FEED_MALFORMED, "feed" => "postgres").increment(1);
                            tracing::debug!(feed = "postgres", error = %e, "ignoring a malformed relay message");
                        }
                    }
                }
            }
        }
    }
}

/// One session's state while it hears the relay's channel.
struct Listening<'a> {
    ctx: &'a FeedContext,
    /// The reports sent to a synchronous relay (kept across sessions, see [`Relayed`]).
    anchors: &'a mut ReportAnchors,
    /// Where reports are queued for [`send_reports`].
    reports: tokio::sync::mpsc::UnboundedSender<String>,
    /// The session had its first heartbeat: L1 was emptied and everything published since
    /// reached it (read by [`watch_relay_alive`] too).
    caught_up: &'a AtomicBool,
    /// The relay, a synchronous standby, waits for this instance's reports.
    reporting: bool,
    /// The last synchronous heartbeat's emission ([`mono_ms`]): an echo between heartbeats
    /// vouches for no later than that.
    emitted: Option<u64>,
    /// The slot epoch the relay's positions are of (see `Relayed::Heartbeat::epoch`).
    relay_epoch: Option<i64>,
}

impl Listening<'_> {
    fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// At every heartbeat interval: a lease run out ends a session that never heard a
    /// heartbeat; once caught up, the subscription lasts and L1 is bypassed meanwhile.
    ///
    /// # Errors
    /// No heartbeat yet within the lease.
    fn check_lease(&self) -> Result<(), FeedError> {
        let feed = &self.ctx.coherence.postgres;
        if mono_ms() <= feed.valid_until() {
            return Ok(());
        }
        let lease = self.ctx.config.feeds.lease;
        if !self.caught_up() {
            return Err(FeedError::Silent {
                what: "no heartbeat from the relay (no relay, or it lags)",
                lease,
            });
        }
        feed.set_down(&if self.reporting {
            format!("the synchronous relay has not echoed this instance's reports within {lease:?}")
        } else {
            format!("no heartbeat from the relay within {lease:?} (no relay, or it lags)")
        });
        Ok(())
    }

    /// Takes one message from the relay.
    ///
    /// # Errors
    /// The generations cannot be read at the first heartbeat.
    async fn take(&mut self, payload: Payload) -> Result<(), FeedError> {
        match payload {
            Payload::Changes { changes, lsn } => {
                tracing::trace!(lsn = ?lsn, changes = changes.len(), "relayed changes");
                for change in changes {
                    handle_relayed(self.ctx, change).await;
                }
                if let Some(lsn) = lsn.as_deref().and_then(|l| Lsn::parse(l).ok()) {
                    self.applied(lsn);
                    if self.reporting {
                        self.report(lsn);
                    }
                }
            }
            Payload::Listed { relay, listed } => self.echoed(&relay, &listed),
            Payload::Gap { relay } => {
                // Only the relay whose heartbeats we trust can say it stopped: an earlier
                // one's word comes after its successor took over.
                if self.caught_up() && self.is_current(&relay) {
                    let feed = &self.ctx.coherence.postgres;
                    feed.set_down(&format!("the relay {relay} lost its stream"));
                    feed.revoke();
                }
            }
            Payload::Heartbeat {
                relay,
                lag_ms,
                lag_bytes,
                lsn,
                sync,
                epoch,
                listed,
            } => {
                let arrived = mono_ms();
                tracing::trace!(relay = %relay, lag_ms, lsn = ?lsn, sync, listed = ?listed, "relay heartbeat");
                self.reporting = sync;
                self.note_epoch(epoch);
                metrics::gauge!(WAL_LAG_SECONDS).set(lag_ms as f64 / 1000.0);
                if let Some(bytes) = lag_bytes {
                    metrics::gauge!(WAL_LAG_BYTES).set(bytes as f64);
                }
                let me = &self.ctx.instance_id;
                self.ctx.coherence.note_relay(RelayStatus {
                    relay,
                    lag_ms,
                    lag_bytes,
                    sync,
                    listed: sync && listed.as_ref().is_some_and(|l| l.contains_key(me)),
                });
                if !self.caught_up() {
                    self.catch_up().await?;
                }
                let lsn = lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
                if let Some(lsn) = lsn {
                    // Watchers' watermark moves on when nothing else does: a writer's
                    // position is reached within a heartbeat.
                    self.applied(lsn);
                }
                // The lease counts from the heartbeat's emission: everything committed
                // before it has reached this instance.
                self.vouch(arrived.saturating_sub(lag_ms), lsn, listed.as_ref());
            }
        }
        Ok(())
    }

    /// A heartbeat emitted at `emission` came, at `lsn`, listing `listed` if synchronous:
    /// an asynchronous relay's heartbeat grants a lease from its emission; a synchronous
    /// relay waits for this instance only while it hears from it, so the lease counts from
    /// no later than a report it echoes (see [`ReportAnchors`]), and an instance not listed
    /// (yet) waits for that before it uses L1.
    fn vouch(&mut self, emission: u64, lsn: Option<Lsn>, listed: Option<&BTreeMap<String, u64>>) {
        let feed = &self.ctx.coherence.postgres;
        let lease = self.ctx.config.feeds.lease;
        if !self.reporting {
            self.emitted = None;
            feed.heartbeat_back(emission, lease);
            feed.set_up();
            return;
        }
        self.emitted = Some(emission);
        if let Some(lsn) = lsn {
            self.report(lsn);
        }
        let echoed = listed
            .and_then(|l| l.get(&self.ctx.instance_id))
            .and_then(|seq| self.anchors.echoed(*seq));
        if let Some(sent) = echoed {
            tracing::trace!(
                from = emission.min(sent),
                "lease renewed by a heartbeat's listing"
            );
            feed.heartbeat_back(emission.min(sent), lease);
            feed.set_up();
        }
    }

    /// The synchronous relay's echo between heartbeats (see [`Payload::Listed`]).
    fn echoed(&mut self, relay: &str, listed: &BTreeMap<String, u64>) {
        // Only the relay whose heartbeats we hear waits for us.
        if !self.caught_up() || !self.reporting || !self.is_current(relay) {
            return;
        }
        let echoed = listed
            .get(&self.ctx.instance_id)
            .and_then(|seq| self.anchors.echoed(*seq));
        if let (Some(sent), Some(emitted)) = (echoed, self.emitted) {
            tracing::trace!(from = emitted.min(sent), "lease renewed by an echo");
            let feed = &self.ctx.coherence.postgres;
            feed.heartbeat_back(emitted.min(sent), self.ctx.config.feeds.lease);
            feed.set_up();
        }
    }

    /// The session's first heartbeat: everything published from now on reaches us; what
    /// came before is in Redis already, and L1 forgets it. The session's first lease was a
    /// grace to wait for this heartbeat, not a vouching: a lagging stream must count.
    ///
    /// # Errors
    /// Reading the generations failed.
    async fn catch_up(&mut self) -> Result<(), FeedError> {
        start_over(self.ctx, Feed::Postgres).await?;
        self.ctx.coherence.postgres.revoke();
        self.caught_up.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Another slot (a new one, or a Postgres restored or failed over without its slot):
    /// its positions may lie below the ones applied so far, which prove nothing now.
    fn note_epoch(&mut self, epoch: Option<i64>) {
        if epoch != self.relay_epoch {
            if self.relay_epoch.is_some() {
                self.ctx.coherence.forget_applied();
            }
            self.relay_epoch = epoch;
        }
    }

    /// Everything up to `lsn` has been applied here.
    fn applied(&self, lsn: Lsn) {
        self.ctx.coherence.applied(lsn.as_u64());
        self.ctx.tiers.watch_position(lsn.as_u64());
    }

    /// Whether `relay` is the one whose heartbeats this instance hears.
    fn is_current(&self, relay: &str) -> bool {
        self.ctx
            .coherence
            .relay_status()
            .is_some_and(|r| r.relay == relay)
    }

    /// Queues a report that this instance has applied every change up to `lsn`, numbered
    /// (see [`applied_channel`] and [`ReportAnchors`]; the time it is queued, no later than
    /// its sending, is what a lease may count from once it is echoed).
    fn report(&mut self, lsn: Lsn) {
        let seq = self.anchors.report(mono_ms());
        let _ = self
            .reports
            .send(format!("{} {} {seq}", self.ctx.instance_id, lsn.as_u64()));
    }
}

/// Every [`alive_check`], once the session had its first heartbeat: asks Redis whether the
/// relay it hears still holds its alive subscription, and if not takes the feed down. A
/// relay killed without a word is gone from Redis at once: no need to wait out the lease
/// (bench-stale: reads stale for up to a second on every instance after a relay's
/// SIGKILL), nor for the next heartbeat's time: commits made meanwhile reach nobody. Never
/// returns while the session lasts.
async fn watch_relay_alive(ctx: &FeedContext, caught_up: &AtomicBool) {
    let mut tick = ticker(alive_check(ctx.config.feeds.heartbeat_interval));
    let feed = &ctx.coherence.postgres;
    loop {
        tick.tick().await;
        let Some(relay) = ctx.coherence.relay_status() else {
            continue;
        };
        if !caught_up.load(Ordering::SeqCst) {
            continue;
        }
        let alive = relay_alive_channel(&ctx.config.redis.key_prefix, &relay.relay);
        if let Ok(0) = ctx.tiers.subscribers(&alive).await {
            if feed.is_up() {
                feed.set_down(&format!("the relay {} is gone", relay.relay));
            }
            feed.revoke();
        }
    }
}

/// Sends the queued reports in order, on one connection. A report lost is made good by the
/// next one: the relay waits, and drops an instance that stays silent for its lease (by
/// then it no longer uses L1, see [`ReportAnchors`]); a failed one takes the feed down at
/// once. Never returns while the session lasts.
async fn send_reports(
    ctx: &FeedContext,
    channel: String,
    mut queued: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    while let Some(report) = queued.recv().await {
        if let Err(e) = ctx.tiers.publish(&channel, report).await {
            tracing::debug!(error = %e, "reporting the applied position failed");
            let feed = &ctx.coherence.postgres;
            feed.set_down("cannot report to the synchronous relay");
            feed.revoke();
        }
    }
    std::future::pending().await
}
