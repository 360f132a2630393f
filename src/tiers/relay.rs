//! The relay's handle to Redis: its lease (the election), whom a synchronous relay waits
//! for (for a successor), which slot's changes Redis holds, the generations its tombstones
//! go under, its publications, and its changes applied. Knows nothing of the replication
//! stream, of L1 or of Postgres.

use std::time::Duration;

use futures_util::stream::BoxStream;

use super::redis_changes::RedisChanges;
use crate::l2::{L2Error, L2};

/// What the relay may do to Redis, and nothing more. Cheap to clone; built once at start-up
/// (see [`crate::tiers::Tiers::relay_redis`]).
#[derive(Clone)]
pub struct RelayRedis {
    l2: L2,
    changes: RedisChanges,
}

impl RelayRedis {
    pub(crate) fn new(l2: L2, changes: RedisChanges) -> Self {
        RelayRedis { l2, changes }
    }

    /// Claims (or extends) the relay's lease in Redis for `holder`, for `ttl`; whether
    /// `holder` holds it now. See [`L2::claim`].
    ///
    /// # Errors
    /// Redis failing: `holder` must assume it does not hold the lease.
    pub async fn claim_lease(&self, holder: &str, ttl: Duration) -> Result<bool, L2Error> {
        self.l2.claim(RELAY_LEASE, holder, ttl).await
    }

    /// Gives up the relay's lease if `holder` still holds it.
    ///
    /// # Errors
    /// Redis failing (the lease then expires by itself).
    pub async fn release_lease(&self, holder: &str) -> Result<(), L2Error> {
        self.l2.release(RELAY_LEASE, holder).await
    }

    /// Records the instances that may hold a lease from the synchronous relay's heartbeats
    /// (their ids), for `ttl`: a relay that takes over waits for their reports before it
    /// confirms anything (see `relay::confirm`).
    ///
    /// # Errors
    /// Redis failing: the heartbeat must then list nobody.
    pub async fn record_listing(&self, ids: &[String], ttl: Duration) -> Result<(), L2Error> {
        self.l2.write_for(RELAY_LISTED, &ids.join(" "), ttl).await
    }

    /// The instances the last synchronous relay recorded (see
    /// [`RelayRedis::record_listing`]); `None` when none is recorded.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn listing(&self) -> Result<Option<Vec<String>>, L2Error> {
        Ok(self
            .l2
            .read(RELAY_LISTED)
            .await?
            .map(|ids| ids.split_whitespace().map(str::to_string).collect()))
    }

    /// The epoch of the replication slot whose changes Redis holds (see
    /// [`crate::schema::capture::STATE_TABLE`]); `None` when no relay has fed it yet.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn fed_by_slot(&self) -> Result<Option<i64>, L2Error> {
        Ok(self.l2.read(SLOT_EPOCH).await?.and_then(|v| v.parse().ok()))
    }

    /// Records that Redis now holds the changes of the slot of `epoch`.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn record_fed_by_slot(&self, epoch: i64) -> Result<(), L2Error> {
        self.l2.write(SLOT_EPOCH, &epoch.to_string()).await
    }

    /// Records that this timeline's primary guards a failover (see
    /// [`L2::record_failover_guarded`]).
    ///
    /// # Errors
    /// Redis failing.
    pub async fn record_failover_guarded(&self, timeline: i32) -> Result<(), L2Error> {
        self.l2.record_failover_guarded(timeline).await
    }

    /// Reads every resource's generation from Redis, which the relay's tombstones go under;
    /// see [`L2::load_generations`].
    ///
    /// # Errors
    /// The command's failure.
    pub async fn load_generations(&self) -> Result<(), L2Error> {
        self.l2.load_generations().await
    }

    /// Publishes `payload` on `channel` (the relay's messages, its heartbeats).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn publish(&self, channel: &str, payload: String) -> Result<(), L2Error> {
        self.l2.publish(channel, payload).await
    }

    /// A Redis subscription of its own to `channels` (the relay's alive channel, the
    /// instances' reports); see [`L2::subscribe`]. `timeout` bounds connecting and
    /// subscribing.
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

    /// Where the relay applies its committed changes to Redis (and publishes a batch with
    /// its last keys); see [`RedisChanges`].
    pub fn changes(&self) -> &RedisChanges {
        &self.changes
    }
}

/// The Redis key (under the prefix) of the relay's lease.
const RELAY_LEASE: &str = "relay";
/// The Redis key (under the prefix) listing the instances a synchronous relay waits for.
const RELAY_LISTED: &str = "relay-listed";
/// The Redis key (under the prefix) naming the slot epoch whose changes Redis holds.
const SLOT_EPOCH: &str = "slot_epoch";
