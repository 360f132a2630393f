//! The one run loop every feed shares: wait for the catalog, run sessions (one connection's
//! life each) until shutdown, and between them mark the feed down, remember where the outage
//! began and back off. Also what every session does with what it receives: heartbeats move
//! the feed towards up ([`Phase`]), messages are applied to the tiers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::error::FeedError;
use crate::backoff::Backoff;
use crate::coherence::{mono_ms, Feed, Message};
use crate::config::PostgresSource;
use crate::db::{connect_dedicated, Dedicated};
use crate::model::now_us;
use crate::resource::Catalog;
use crate::telemetry::{
    error_chain, FEED_DUPLICATES, FEED_INVALIDATIONS, FEED_MALFORMED, PROPAGATION_DELAY,
};

/// One kind of feed: how to live one connection.
pub(crate) trait Source: Send {
    /// The feed whose state this source keeps.
    const FEED: Feed;

    /// One connection's life: connect, prove delivery, apply what arrives. `Ok` only on
    /// shutdown; an `Err` is the reason the connection was given up. `last_good` is the send
    /// time ([`mono_ms`]) of the last heartbeat that came back before the outage, `None`
    /// until the feed has been up once (the replay window starts there).
    fn session(
        &mut self,
        ctx: &FeedContext,
        shutdown: &CancellationToken,
        last_good: Option<u64>,
    ) -> impl Future<Output = Result<(), FeedError>> + Send;
}

/// Waits until the catalog is loaded; `None` on shutdown.
pub(crate) async fn wait_for_catalog(
    ctx: &FeedContext,
    shutdown: &CancellationToken,
) -> Option<Arc<Catalog>> {
    loop {
        if let Ok(catalog) = ctx.catalog.get() {
            return Some(catalog);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Runs `source` until `shutdown`: waits for the catalog (replays and messages need it),
/// then runs sessions; a failed one marks the feed down and waits out the backoff.
pub(crate) async fn run<S: Source>(
    mut source: S,
    ctx: Arc<FeedContext>,
    shutdown: CancellationToken,
) {
    if wait_for_catalog(&ctx, &shutdown).await.is_none() {
        return;
    }
    let mut supervisor = Supervisor::new(S::FEED, ctx.config.feeds.max_backoff);
    loop {
        let ended = source.session(&ctx, &shutdown, supervisor.last_good).await;
        let Err(reason) = ended else {
            return;
        };
        if !supervisor.failed(&ctx, &reason, &shutdown).await {
            return;
        }
    }
}

/// What the run loop remembers between sessions.
struct Supervisor {
    feed: Feed,
    backoff: Backoff,
    logged: bool,
    /// See [`Source::session`].
    last_good: Option<u64>,
}

impl Supervisor {
    fn new(feed: Feed, max_backoff: Duration) -> Self {
        Supervisor {
            feed,
            backoff: Backoff::new(MIN_BACKOFF, max_backoff),
            logged: false,
            last_good: None,
        }
    }

    /// A session ended with `reason`: mark the feed down (logged once per outage) and back
    /// off. False on shutdown.
    async fn failed(
        &mut self,
        ctx: &FeedContext,
        reason: &FeedError,
        shutdown: &CancellationToken,
    ) -> bool {
        let reason = ctx.secrets.scrub(&error_chain(reason));
        if self.feed == Feed::Redis {
            // Redis may come back as another incarnation: reads skip it until the guard
            // (or this feed's recovery) has checked.
            ctx.tiers.distrust_redis();
        }
        let feed = ctx.coherence.state(self.feed);
        if feed.set_down(&reason) {
            ctx.tiers.watch_reset(&format!(
                "the {} feed went down; changes may be missed until it is back",
                self.feed.as_str()
            ));
            // set_down logged the outage.
            let lease = ctx.config.feeds.lease.as_millis() as u64;
            self.last_good = Some(feed.valid_until().saturating_sub(lease));
            self.backoff.reset();
            self.logged = true;
        } else if !self.logged {
            tracing::warn!(feed = self.feed.as_str(), reason = %reason, "feed not connected; retrying");
            self.logged = true;
        } else {
            tracing::debug!(feed = self.feed.as_str(), reason = %reason, "feed retry failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(self.backoff.next_pause()) => true,
        }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// A feed is back: make sure its tier has not gone back in time (for the Redis feed, a new
/// incarnation holding older data, [`crate::tiers::Guards::secure_redis`]; for the Postgres
/// feed, a restore or failover, [`crate::tiers::Guards::secure_postgres`]); repair Redis from
/// the changes log since shortly before the outage began
/// (with the `wal` source the relay repairs Redis, so nothing is replayed and Postgres is not
/// asked), re-read the resources' generations, then empty L1. The caller marks the feed up only once a heartbeat sent after this returned
/// comes back, so every message queued meanwhile has been applied first.
/// `last_good` as in [`Source::session`]; `None` at start-up, when the outage (if any) is
/// unknown: then the whole retained log is replayed.
///
/// # Errors
/// The replay failed (Postgres or Redis), or the catalog is not loaded yet; the feed stays
/// down and the caller retries.
pub(crate) async fn recover(
    ctx: &FeedContext,
    feed: Feed,
    last_good: Option<u64>,
) -> Result<(), FeedError> {
    let feeds = &ctx.config.feeds;
    let retention = feeds.changes_retention;
    let ago = match last_good {
        Some(since) => Duration::from_millis(mono_ms().saturating_sub(since)) + feeds.replay_margin,
        None => retention,
    };
    let catalog = ctx.catalog.get()?;
    let tiers = &ctx.tiers;
    match feed {
        // Before anything is replayed into it or read from it: is it the Redis it was?
        Feed::Redis => ctx.guards.secure_redis(&catalog).await.map(|_| ())?,
        // A Postgres restored from a backup, or failed over, comes back through here.
        Feed::Postgres => ctx.guards.secure_postgres().await.map(|_| ())?,
    }
    if catalog.capture.source == PostgresSource::Wal {
        // Nothing to replay: the relay applies every change to Redis, at least once.
    } else if ago > retention {
        // The log no longer covers the outage: Redis cannot be repaired key by key.
        let removed = tiers
            .flush_redis()
            .await
            .map_err(|source| FeedError::Redis {
                what: "dropping the key prefix",
                source,
            })?;
        tracing::warn!(
            feed = feed.as_str(),
            removed,
            "outage longer than feeds.changes_retention; dropped the key prefix from redis"
        );
    } else {
        let replayed = tiers.replay_changes_log(&catalog, ago).await?;
        tracing::info!(
            feed = feed.as_str(),
            replayed,
            window_ms = ago.as_millis() as u64,
            "replayed the changes log into redis"
        );
    }
    start_over(ctx, feed).await
}

/// What every change reaching L1 from now on builds on: the resources' generations re-read
/// from Redis, then L1 emptied of what `feed` vouched for.
///
/// # Errors
/// Redis failing to give the generations.
pub(super) async fn start_over(ctx: &FeedContext, feed: Feed) -> Result<(), FeedError> {
    ctx.tiers
        .load_generations()
        .await
        .map_err(|source| FeedError::Redis {
            what: "reading generations",
            source,
        })?;
    ctx.tiers.flush_l1(feed);
    Ok(())
}

/// Opens the Postgres feed's own connection (`postgres.listen_url`, else `url`), recording
/// whether Postgres could be reached at all.
pub(crate) async fn connect_postgres(ctx: &FeedContext) -> Result<Dedicated, FeedError> {
    let postgres = &ctx.config.postgres;
    let result = connect_dedicated(postgres, postgres.listen_url.as_deref(), "syncar-listen")
        .await
        .map_err(FeedError::Connect);
    ctx.coherence.set_postgres_unreachable(result.is_err());
    result
}

/// Aborts a spawned task (a connection driver) when its session ends.
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where a connection's session is on its way to being trusted.
pub(crate) enum Phase {
    /// Connected; waiting for the first heartbeat to prove delivery.
    Connecting,
    /// Replayed and flushed at this [`mono_ms`]; waiting for a heartbeat sent after it.
    Recovered(u64),
    Up,
}

/// Handles one heartbeat that came back; see [`Phase`]. `last_good` as in
/// [`Source::session`].
pub(crate) async fn on_heartbeat(
    ctx: &FeedContext,
    feed: Feed,
    phase: &mut Phase,
    payload: &[u8],
    last_good: Option<u64>,
) -> Result<(), FeedError> {
    let lease = ctx.config.feeds.lease;
    let Some(sent) = std::str::from_utf8(payload)
        .ok()
        .and_then(|p| p.parse::<u64>().ok())
    else {
        return Ok(()); // not one of ours
    };
    let feed_state = ctx.coherence.state(feed);
    match *phase {
        Phase::Connecting => {
            recover(ctx, feed, last_good).await?;
            let done = mono_ms();
            // The replay may have outlived the lease: give the next heartbeat its chance.
            feed_state.grant(lease);
            *phase = Phase::Recovered(done);
        }
        Phase::Recovered(done) if sent > done => {
            feed_state.heartbeat_back(sent, lease);
            feed_state.set_up();
            *phase = Phase::Up;
        }
        Phase::Recovered(_) => {}
        Phase::Up => feed_state.heartbeat_back(sent, lease),
    }
    Ok(())
}

/// A random identity for this process's feed channels: 16 lowercase hex digits, safe in a
/// Postgres channel name and a Redis key.
pub fn feed_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Applies one message from a feed: parse, skip our own, evict, count.
pub(crate) async fn handle_message(ctx: &FeedContext, feed: Feed, payload: &[u8]) {
    let message = match Message::parse(payload) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!(FEED_MALFORMED, "feed" => feed.as_str()).increment(1);
            tracing::debug!(feed = feed.as_str(), error = %e, "ignoring a malformed message");
            return;
        }
    };
    handle_parsed(ctx, feed, message).await;
}

/// Applies one change relayed from the WAL (already in Redis): L1 only.
pub(crate) async fn handle_relayed(ctx: &FeedContext, message: Message) {
    metrics::counter!(FEED_INVALIDATIONS, "feed" => "postgres").increment(1);
    let Ok(catalog) = ctx.catalog.get() else {
        return;
    };
    if ctx.tiers.apply_relayed(&catalog, &message).await {
        record_delay(Feed::Postgres, message.ts_us);
    } else {
        // Already known: the Redis feed was first, or a new relay resends what its
        // predecessor had published. Its delay would measure the resending, not the change.
        metrics::counter!(FEED_DUPLICATES, "feed" => "postgres").increment(1);
    }
}

/// Records how long a change took from its timestamp to being applied here.
fn record_delay(feed: Feed, ts_us: Option<i64>) {
    if let Some(ts_us) = ts_us {
        let delay_us = now_us().saturating_sub(ts_us).max(0);
        metrics::histogram!(PROPAGATION_DELAY, "feed" => feed.as_str())
            .record(delay_us as f64 / 1e6);
    }
}

/// Applies one parsed message; see [`handle_message`].
pub(crate) async fn handle_parsed(ctx: &FeedContext, feed: Feed, message: Message) {
    if feed == Feed::Redis && message.instance.as_deref() == Some(ctx.instance_id.as_str()) {
        return;
    }
    metrics::counter!(FEED_INVALIDATIONS, "feed" => feed.as_str()).increment(1);
    let Ok(catalog) = ctx.catalog.get() else {
        return;
    };
    let fresh = ctx.tiers.apply(&catalog, &message, feed).await;
    if !fresh {
        metrics::counter!(FEED_DUPLICATES, "feed" => feed.as_str()).increment(1);
    }
    record_delay(feed, message.ts_us);
}
