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

use futures_util::StreamExt;
use pgwire_replication::Lsn;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{handle_relayed, Source};
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
    ) -> Result<(), super::error::FeedError> {
        let config = &ctx.config;
        let lease = config.feeds.lease;
        let mut messages = ctx
            .tiers
            .subscribe(std::slice::from_ref(&self.channel), lease)
            .await
            .map_err(|e| format!("subscription to the relay failed: {e}"))?;
        let feed = &ctx.coherence.postgres;
        feed.grant(lease);
        let mut up = false;
        // Whether the relay, a synchronous standby, waits for this instance's reports.
        let mut reporting = false;
        let anchors = &mut self.anchors;
        // The last synchronous heartbeat's emission: an echo between heartbeats vouches
        // for no later than that.
        let mut emitted: Option<u64> = None;
        // The slot epoch the relay's positions are of (see `Relayed::Heartbeat::epoch`).
        let mut relay_epoch: Option<i64> = None;
        // Reports go out in order, beside the loop: a slow round trip to Redis must not
        // hold up the messages (nor, behind them, this instance's lease).
        let (reports, queued) = tokio::sync::mpsc::unbounded_channel();
        let reporter = send_reports(ctx, applied_channel(&config.redis.key_prefix), queued);
        tokio::pin!(reporter);
        // Whether this session had its first heartbeat (for the alive check, which runs
        // beside the loop for the same reason as the reports).
        let caught_up = std::sync::atomic::AtomicBool::new(false);
        let alive = watch_relay_alive(ctx, &caught_up);
        tokio::pin!(alive);
        let mut tick = ticker(config.feeds.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                () = &mut reporter => {}
                () = &mut alive => {}
                _ = tick.tick() => {
                    if mono_ms() > feed.valid_until() {
                        let reason = format!(
                            "no heartbeat from the relay within {lease:?} (no relay, or it lags)"
                        );
                        if !up {
                            return Err(reason.into());
                        }
                        // The subscription lasts: wait for a relay, L1 bypassed meanwhile.
                        feed.set_down(&reason);
                    }
                }
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err("subscription to the relay closed".into());
                    };
                    let payload = match Payload::parse(message.get_payload_bytes()) {
                        Ok(p) => p,
                        Err(e) => {
                            metrics::counter!(FEED_MALFORMED, "feed" => "postgres").increment(1);
                            tracing::debug!(feed = "postgres", error = %e, "ignoring a malformed relay message");
                            continue;
                        }
                    };
                    match payload {
                        Payload::Changes { changes, lsn } => {
                            for change in changes {
                                handle_relayed(ctx, change).await;
                            }
                            if let Some(lsn) = lsn.as_deref().and_then(|l| Lsn::parse(l).ok()) {
                                ctx.coherence.applied(lsn.as_u64());
                                ctx.tiers.watch().position(lsn.as_u64());
                                if reporting {
                                    report(ctx, &reports, lsn, anchors);
                                }
                            }
                        }
                        Payload::Listed { relay, listed } => {
                            // Only the relay whose heartbeats we hear waits for us.
                            let current = ctx.coherence.relay_status().map(|r| r.relay);
                            let echoed = listed
                                .get(&ctx.instance_id)
                                .and_then(|seq| anchors.echoed(*seq));
                            if let (true, true, Some(sent), Some(emitted)) =
                                (up, current.as_deref() == Some(relay.as_str()), echoed, emitted)
                            {
                                feed.heartbeat_back(emitted.min(sent), lease);
                                feed.set_up();
                            }
                        }
                        Payload::Gap { relay } => {
                            // Only the relay whose heartbeats we trust can say it stopped: an
                            // earlier one's word comes after its successor took over.
                            let current = ctx.coherence.relay_status().map(|r| r.relay);
                            if up && current.as_deref() == Some(relay.as_str()) {
                                feed.set_down(&format!("the relay {relay} lost its stream"));
                                feed.revoke();
                            }
                        }
                        Payload::Heartbeat { relay, lag_ms, lag_bytes, lsn, sync, epoch, listed } => {
                            let arrived = mono_ms();
                            reporting = sync;
                            if epoch != relay_epoch {
                                // Another slot (a new one, or a Postgres restored or
                                // failed over without its slot): its positions may lie
                                // below the ones applied so far, which prove nothing now.
                                if relay_epoch.is_some() {
                                    ctx.coherence.forget_applied();
                                }
                                relay_epoch = epoch;
                            }
                            metrics::gauge!(WAL_LAG_SECONDS).set(lag_ms as f64 / 1000.0);
                            if let Some(bytes) = lag_bytes {
                                metrics::gauge!(WAL_LAG_BYTES).set(bytes as f64);
                            }
                            let is_listed = sync
                                && listed.as_ref().is_some_and(|l| l.contains_key(&ctx.instance_id));
                            ctx.coherence.note_relay(RelayStatus {
                                relay,
                                lag_ms,
                                lag_bytes,
                                sync,
                                listed: is_listed,
                            });
                            if !up {
                                // Everything published from now on reaches us; what came
                                // before is in Redis already, and L1 forgets it. The
                                // session's first lease was a grace to wait for this
                                // heartbeat, not a vouching: a lagging stream must count.
                                ctx.tiers
                                    .load_generations()
                                    .await
                                    .map_err(|e| format!("reading generations failed: {e}"))?;
                                ctx.tiers.flush_l1(Feed::Postgres);
                                feed.revoke();
                                up = true;
                                caught_up.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            let lsn = lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
                            if let Some(lsn) = lsn {
                                ctx.coherence.applied(lsn.as_u64());
                                // Watchers' watermark moves on when nothing else does: a
                                // writer's position is reached within a heartbeat.
                                ctx.tiers.watch().position(lsn.as_u64());
                            }
                            // The lease counts from the heartbeat's emission: everything
                            // committed before it has reached this instance.
                            let emission = arrived.saturating_sub(lag_ms);
                            emitted = reporting.then_some(emission);
                            if !reporting {
                                feed.heartbeat_back(emission, lease);
                                feed.set_up();
                                continue;
                            }
                            // A synchronous relay waits for this instance only while it
                            // hears from it: the lease counts from no later than a report
                            // it echoes (see `ReportAnchors`).
                            if let Some(lsn) = lsn {
                                report(ctx, &reports, lsn, anchors);
                            }
                            let echoed = listed
                                .as_ref()
                                .and_then(|l| l.get(&ctx.instance_id))
                                .and_then(|seq| anchors.echoed(*seq));
                            // Not listed (yet): the lease runs out unless a later message
                            // echoes a report; L1 waits for that.
                            if let Some(sent) = echoed {
                                feed.heartbeat_back(emission.min(sent), lease);
                                feed.set_up();
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Every [`alive_check`], once the session had its first heartbeat: asks Redis whether the
/// relay it hears still holds its alive subscription, and if not takes the feed down. A
/// relay killed without a word is gone from Redis at once: no need to wait out the lease
/// (bench-stale: reads stale for up to a second on every instance after a relay's
/// SIGKILL), nor for the next heartbeat's time: commits made meanwhile reach nobody. Never
/// returns while the session lasts.
async fn watch_relay_alive(ctx: &FeedContext, caught_up: &std::sync::atomic::AtomicBool) {
    let mut tick = ticker(alive_check(ctx.config.feeds.heartbeat_interval));
    let feed = &ctx.coherence.postgres;
    loop {
        tick.tick().await;
        let Some(relay) = ctx.coherence.relay_status() else {
            continue;
        };
        if !caught_up.load(std::sync::atomic::Ordering::SeqCst) {
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

/// Queues a report to the relay that this instance has applied every change up to `lsn`,
/// numbered (see [`applied_channel`] and [`ReportAnchors`]; the time it is queued, no later
/// than its sending, is what a lease may count from once it is echoed).
fn report(
    ctx: &FeedContext,
    reports: &tokio::sync::mpsc::UnboundedSender<String>,
    lsn: Lsn,
    anchors: &mut ReportAnchors,
) {
    let seq = anchors.report(mono_ms());
    let _ = reports.send(format!("{} {} {seq}", ctx.instance_id, lsn.as_u64()));
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
