//! What the relay keeps in Redis beside the data, as a room of [`Tiers`]: its lease (the
//! election), whom a synchronous relay waits for (for a successor), and which slot's
//! changes Redis holds. Knows nothing of the replication stream.

use std::time::Duration;

use super::Tiers;
use crate::l2::L2Error;

impl Tiers {
    /// Claims (or extends) the relay's lease in Redis for `holder`; see [`crate::l2::L2::claim`].
    ///
    /// # Errors
    /// Redis failing: `holder` must assume it does not hold the lease.
    pub async fn claim_relay(&self, holder: &str, ttl: Duration) -> Result<bool, L2Error> {
        self.l2.claim(RELAY_LEASE, holder, ttl).await
    }

    /// Gives up the relay's lease if `holder` still holds it.
    ///
    /// # Errors
    /// Redis failing (the lease then expires by itself).
    pub async fn release_relay(&self, holder: &str) -> Result<(), L2Error> {
        self.l2.release(RELAY_LEASE, holder).await
    }

    /// Who holds the relay's lease now, if anyone.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn relay_holder(&self) -> Result<Option<String>, L2Error> {
        self.l2.read(RELAY_LEASE).await
    }

    /// Records the instances that may hold a lease from the synchronous relay's heartbeats
    /// (their ids), for `ttl`: a relay that takes over waits for their reports before it
    /// confirms anything (see `relay::confirm`).
    ///
    /// # Errors
    /// Redis failing: the heartbeat must then list nobody.
    pub async fn record_relay_listing(&self, ids: &[String], ttl: Duration) -> Result<(), L2Error> {
        self.l2.write_for(RELAY_LISTED, &ids.join(" "), ttl).await
    }

    /// The instances the last synchronous relay recorded (see
    /// [`Tiers::record_relay_listing`]); `None` when none is recorded.
    ///
    /// # Errors
    /// Redis failing.
    pub async fn relay_listing(&self) -> Result<Option<Vec<String>>, L2Error> {
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
}

/// The Redis key (under the prefix) of the relay's lease.
const RELAY_LEASE: &str = "relay";
/// The Redis key (under the prefix) listing the instances a synchronous relay waits for.
const RELAY_LISTED: &str = "relay-listed";
/// The Redis key (under the prefix) naming the slot epoch whose changes Redis holds.
const SLOT_EPOCH: &str = "slot_epoch";
