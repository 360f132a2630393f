//! A feed's handle to the tiers: the subscriptions it hears, the heartbeats it publishes,
//! its messages applied to L1 (and Redis), the changes log replayed into Redis, L1 emptied
//! when it comes back. Applying a message is its own room (`apply.rs`). Knows nothing of
//! reads, writes or the relay's lease.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;

use super::error::ReplayError;
use super::redis_changes::RedisChanges;
use super::repairs::Repairs;
use super::shared::{Flights, HighWater};
use crate::coherence::Feed;
use crate::db::Db;
use crate::l1::L1;
use crate::l2::{L2Error, L2};
use crate::resource::{Catalog, CatalogCell};
use crate::telemetry::L1_FLUSHES;
use crate::watch::WatchHub;

/// What a feed may do to the tiers, and nothing more. Cheap to clone; built once at
/// start-up (see [`crate::tiers::Tiers::feed_tiers`]).
#[derive(Clone)]
pub struct FeedTiers {
    pub(super) l1: Option<L1>,
    pub(super) l2: L2,
    /// The changes log, replayed into Redis when a feed comes back.
    pub(super) db: Db,
    /// Loads in flight, detached when a message changes their key.
    pub(super) flights: Arc<Flights>,
    /// Where a message Redis could not take waits for a repair.
    pub(super) repairs: Arc<Repairs>,
    /// The change stream apps watch: every change applied here, and the resets.
    pub(super) watch: Arc<WatchHub>,
    /// Asked to recheck the tables' shapes when a flush is heard.
    pub(super) catalog: Arc<CatalogCell>,
    pub(super) high_water: HighWater,
    /// The replay's way into Redis.
    pub(super) changes: RedisChanges,
}

impl FeedTiers {
    /// A Redis subscription of its own to `channels`; see [`L2::subscribe`]. `timeout`
    /// bounds connecting and subscribing.
    ///
    /// # Errors
    /// Connecting or subscribing failed or timed out.
    pub async fn subscribe(
        &self,
        channels: &[String],
        timeout: Duration,
    ) -> Result<BoxStream<'static, redis::Msg>, L2Error> {
        self.l2.subscribe(channels, timeout).await
    }

    /// A subscription to `channels` with heartbeat channels of its own (named with
    /// `suffix`), and those channels; see [`L2::subscribe_with_heartbeats`].
    ///
    /// # Errors
    /// Reading the layout, connecting or subscribing failed or timed out.
    pub async fn subscribe_with_heartbeats(
        &self,
        channels: &[String],
        suffix: &str,
        timeout: Duration,
    ) -> Result<(BoxStream<'static, redis::Msg>, Vec<String>), L2Error> {
        self.l2
            .subscribe_with_heartbeats(channels, suffix, timeout)
            .await
    }

    /// Every channel writes are announced on; see [`L2::invalidation_channels`].
    pub fn invalidation_channels(&self) -> Vec<String> {
        self.l2.invalidation_channels()
    }

    /// How many connections subscribe to `channel`; see [`L2::subscribers`].
    ///
    /// # Errors
    /// The command's failure.
    pub async fn subscribers(&self, channel: &str) -> Result<u64, L2Error> {
        self.l2.subscribers(channel).await
    }

    /// Publishes `payload` on `channel` (heartbeats, reports to the relay).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn publish(&self, channel: &str, payload: String) -> Result<(), L2Error> {
        self.l2.publish(channel, payload).await
    }

    /// Distrusts Redis (reads skip it) until [`crate::tiers::Guards::secure_redis`] has run.
    pub fn distrust_redis(&self) {
        self.l2.distrust();
    }

    /// Reads every resource's generation from Redis; see [`L2::load_generations`].
    ///
    /// # Errors
    /// The command's failure.
    pub async fn load_generations(&self) -> Result<(), L2Error> {
        self.l2.load_generations().await
    }

    /// Repairs Redis from the changes log: every key changed within the last `ago` (by
    /// Postgres' clock) gets a tombstone of its newest logged version, which lands only where
    /// Redis holds something older. Returns how many keys were replayed.
    ///
    /// # Errors
    /// Reading the log failed, or the first Redis failure.
    pub async fn replay_changes_log(
        &self,
        catalog: &Catalog,
        ago: Duration,
    ) -> Result<usize, ReplayError> {
        let changes = self.db.changes_since(ago).await?;
        self.changes.apply(catalog, &changes).await?;
        Ok(changes.len())
    }

    /// Drops every key under this deployment's prefix from Redis (when a repair key by key is
    /// no longer possible). Returns how many keys were removed.
    ///
    /// # Errors
    /// The first Redis failure.
    pub async fn flush_redis(&self) -> Result<u64, L2Error> {
        self.l2.flush_prefix().await
    }

    /// Empties L1 (a feed came back: nothing cached before may be served), counted for
    /// `feed`. Nothing loading before this call lands after it (see [`L1::clear`]).
    pub fn flush_l1(&self, feed: Feed) {
        if let Some(l1) = &self.l1 {
            l1.clear();
            metrics::counter!(L1_FLUSHES, "feed" => feed.as_str()).increment(1);
        }
        self.watch.reset(&format!(
            "the {} feed came back after an outage; re-read",
            feed.as_str()
        ));
    }

    /// Tells watchers this instance can no longer vouch that it hears every change.
    pub fn watch_reset(&self, reason: &str) {
        self.watch.reset(reason);
    }

    /// Tells watchers every change up to the WAL position `lsn` (an LSN as a number) has
    /// been applied here.
    pub fn watch_position(&self, lsn: u64) {
        self.watch.position(lsn);
    }
}
