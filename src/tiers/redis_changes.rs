//! Committed changes applied to Redis only, in batches: the relay's stream and a recovering
//! feed's replay of the changes log go through here. Knows nothing of L1, of feeds or of
//! the relay's lease.

use std::sync::Arc;

use crate::coherence::Message;
use crate::l2::{L2Error, L2};
use crate::model::{CacheKey, Version};
use crate::resource::Catalog;

use super::decide::invalidation;
use super::shared::{l2_ttl, Flights, HighWater, APPLY_CONCURRENCY, OFFER_CHUNK};

/// Applies batches of committed changes to Redis: a tombstone (or absence) per key, a
/// generation raise per flush. Cheap to clone. Each change detaches this instance's load in
/// flight of its key and raises its high-water version, as any change it hears does.
#[derive(Clone)]
pub struct RedisChanges {
    l2: L2,
    flights: Arc<Flights>,
    high_water: HighWater,
}

impl RedisChanges {
    pub(crate) fn new(l2: L2, flights: Arc<Flights>, high_water: HighWater) -> Self {
        RedisChanges {
            l2,
            flights,
            high_water,
        }
    }

    /// Applies committed changes to Redis only: a tombstone (or absence) per key, a
    /// generation raise per flush, each landing only where Redis holds something older. The
    /// relay of the `wal` source applies its stream this way (instances apply it to their
    /// L1 when the relay's message reaches them), and a feed that recovers replays the
    /// changes log this way.
    ///
    /// On one Redis node the keys go in script calls of [`OFFER_CHUNK`] keys each
    /// ([`L2::offer_many`]), concurrently; in a cluster (keys of many hash slots) one call
    /// per key, concurrently: order does not matter (Redis takes only strictly newer
    /// versions) and the connection pipelines what is in flight; one by one, a large log
    /// took seconds. Each key lands in its resource's generation as known before the
    /// batch's flushes are applied: a copy older than a flush of the same batch is never
    /// read again, a newer one is only missed once.
    ///
    /// # Errors
    /// The first Redis failure: the relay acknowledges nothing and the changes come again.
    pub async fn apply(&self, catalog: &Catalog, changes: &[Message]) -> Result<(), L2Error> {
        self.apply_batch(catalog, changes, None).await.map(|_| ())
    }

    /// [`RedisChanges::apply`], then `message` published on `channel`, in the script call
    /// of the last keys where Redis allows it (one node, no flush in the batch): instances
    /// hear the batch one round trip sooner, and never before Redis holds all of it. Returns
    /// whether `message` went out; if not, the caller publishes it.
    ///
    /// # Errors
    /// The first Redis failure: the message may or may not have gone out, and the relay
    /// acknowledges nothing (the changes come again).
    pub async fn apply_and_publish(
        &self,
        catalog: &Catalog,
        changes: &[Message],
        channel: &str,
        message: &str,
    ) -> Result<bool, L2Error> {
        self.apply_batch(catalog, changes, Some((channel, message)))
            .await
    }

    async fn apply_batch(
        &self,
        catalog: &Catalog,
        changes: &[Message],
        publish: Option<(&str, &str)>,
    ) -> Result<bool, L2Error> {
        use futures_util::TryStreamExt;
        if let Some(high) = changes.iter().map(|c| c.version).max() {
            self.high_water.saw(Version(high));
        }
        let mut copies = Vec::new();
        let mut flushes = Vec::new();
        for change in changes {
            match (invalidation(change), &change.key) {
                (Some(copy), Some(key)) => {
                    let Some(resource) = catalog.get(&change.resource) else {
                        continue;
                    };
                    let ck = CacheKey::new(&resource.name, key);
                    // Whatever it does to Redis, a load in flight here may predate this change.
                    self.flights.forget(&ck);
                    let ttl = l2_ttl(resource, &copy);
                    copies.push((ck, copy, ttl));
                }
                _ if catalog.knows(&change.resource) => flushes.push(change),
                _ => {}
            }
        }
        // The message rides with the last keys only when nothing follows them.
        let riding = publish.filter(|_| flushes.is_empty() && !copies.is_empty());
        if self.l2.publishes_anywhere() {
            let chunks: Vec<_> = copies.chunks(OFFER_CHUNK).collect();
            if let Some((last, rest)) = chunks.split_last() {
                futures_util::future::try_join_all(
                    rest.iter().map(|chunk| self.l2.offer_many(chunk, "", "")),
                )
                .await?;
                let (channel, message) = riding.unwrap_or(("", ""));
                self.l2.offer_many(last, channel, message).await?;
            }
        } else {
            futures_util::stream::iter(copies.iter().map(Ok))
                .try_for_each_concurrent(APPLY_CONCURRENCY, |(ck, copy, ttl)| async move {
                    self.l2.offer(ck, copy, *ttl).await.map(|_| ())
                })
                .await?;
        }
        for change in flushes {
            self.l2
                .raise_generation(&change.resource, change.version)
                .await?;
        }
        Ok(riding.is_some() && self.l2.publishes_anywhere())
    }
}
