//! Pub/sub: the invalidation channels (one, or one per bucket in a cluster, sharded),
//! publishing, subscribing (with heartbeats) and counting subscribers.

use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{ProtocolVersion, PushKind, Value};

use crate::model::CacheKey;

use super::{bucket_of, hash_slot, ClusterNodes, Conn, L2Error, Shard, CLUSTER_BUCKETS, L2};

impl L2 {
    /// Publishes `message` on `channel` (heartbeats).
    ///
    /// # Errors
    /// The command's failure.
    pub async fn publish(&self, channel: &str, message: String) -> Result<(), L2Error> {
        let mut conn = self.conn();
        let _: i64 = self
            .run(
                "publish",
                redis::cmd(self.publish_command())
                    .arg(channel)
                    .arg(message)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// How many connections subscribe to `channel` (`PUBSUB NUMSUB`): Redis drops a
    /// subscription the moment its connection closes, so this tells at once whether a
    /// process holding one is alive.
    ///
    /// # Errors
    /// The command's failure.
    pub async fn subscribers(&self, channel: &str) -> Result<u64, L2Error> {
        let (_, count): (String, u64) = match self.conn() {
            Conn::Node(mut conn) => {
                self.run(
                    "numsub",
                    redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg(channel)
                        .query_async(&mut conn),
                )
                .await?
            }
            // A shard channel's subscribers are known to the node that owns its slot.
            Conn::Cluster(mut conn) => {
                let owner = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(channel, SlotAddr::Master),
                ));
                let mut numsub = redis::cmd("PUBSUB");
                numsub.arg("SHARDNUMSUB").arg(channel);
                let reply = self
                    .run("numsub", conn.route_command(numsub, owner))
                    .await?;
                redis::from_redis_value(reply)
                    .map_err(|e| L2Error::Redis(format!("PUBSUB SHARDNUMSUB reply: {e}")))?
            }
        };
        Ok(count)
    }

    /// The channel for messages about no one key (flushes): the one invalidation channel,
    /// or in a cluster bucket 0's (every instance subscribes to every bucket).
    pub fn invalidation_channel(&self) -> String {
        if self.cluster.is_some() {
            format!("{}{{0}}invalidations", self.prefix)
        } else {
            format!("{}invalidations", self.prefix)
        }
    }

    /// Every invalidation channel: one, or one per bucket in a cluster.
    pub fn invalidation_channels(&self) -> Vec<String> {
        if self.cluster.is_some() {
            (0..CLUSTER_BUCKETS)
                .map(|b| format!("{}{{{b}}}invalidations", self.prefix))
                .collect()
        } else {
            vec![self.invalidation_channel()]
        }
    }

    /// The channel a write of `key` is announced on: in a cluster its bucket's, in the same
    /// hash slot as the key.
    pub(super) fn channel_of(&self, key: &CacheKey) -> String {
        if self.cluster.is_some() {
            format!("{}{{{}}}invalidations", self.prefix, bucket_of(key))
        } else {
            self.invalidation_channel()
        }
    }

    /// `PUBLISH`, or `SPUBLISH` in a cluster (sharded pub/sub: a message stays within the
    /// shard that owns its channel's slot, where a plain `PUBLISH` is broadcast to every
    /// node).
    pub(super) fn publish_command(&self) -> &'static str {
        if self.cluster.is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// A subscription of its own to `channels`, which never reconnects: when the stream
    /// ends, the caller subscribes again. On one node, RESP2 pub/sub with the same address
    /// and TCP settings as the command connection; it also ends when commands move to
    /// another node ([`L2::follow_master`]). In a cluster, sharded pub/sub on the masters
    /// that own the channels (see [`L2::subscribe_sharded`]); it ends when a node ends a
    /// subscription or a connection drops. Connecting is bounded by `redis.connect_timeout`,
    /// each subscribe command by `timeout`.
    ///
    /// # Errors
    /// Connecting or subscribing failed or timed out; in a cluster also `CLUSTER SLOTS`
    /// failing, or a channel's hash slot served by no master.
    pub async fn subscribe(
        &self,
        channels: &[String],
        timeout: Duration,
    ) -> Result<BoxStream<'static, redis::Msg>, L2Error> {
        if let Some(nodes) = &self.cluster {
            let shards = self.shards().await?;
            return self
                .subscribe_sharded(nodes, &shards, channels, timeout)
                .await;
        }
        // Taken before connecting: a move from here on ends the stream.
        let mut moved = self.moves.subscribe();
        let mut pubsub =
            tokio::time::timeout(self.connect_timeout, self.client().get_async_pubsub())
                .await
                .map_err(|_| L2Error::Timeout(self.connect_timeout))?
                .map_err(|e| L2Error::Redis(format!("connect failed: {e}")))?;
        tokio::time::timeout(timeout, pubsub.subscribe(channels))
            .await
            .map_err(|_| L2Error::Timeout(timeout))?
            .map_err(|e| L2Error::Redis(format!("SUBSCRIBE failed: {e}")))?;
        let moved = Box::pin(async move {
            let _ = moved.changed().await;
        });
        Ok(pubsub.into_on_message().take_until(moved).boxed())
    }

    /// [`L2::subscribe`] in a cluster: one RESP3 connection per master that owns any of
    /// `channels`, with an `SSUBSCRIBE` per channel (channels of different slots may not
    /// share one). The stream ends when any of those connections drops or a node unsubscribes
    /// a channel by itself (Redis does when the channel's slot moves to another node, by
    /// resharding or failover): the caller subscribes again, on the layout of that time.
    ///
    /// The subscriptions are made here rather than through the redis crate's cluster
    /// connection, whose resubscription after a slot moves sends channels of several slots
    /// in one `SSUBSCRIBE` and takes the server's `sunsubscribe` for a confirmation
    /// (redis-rs 1.8.1, read in its source).
    pub(super) async fn subscribe_sharded(
        &self,
        nodes: &ClusterNodes,
        shards: &[Shard],
        channels: &[String],
        timeout: Duration,
    ) -> Result<BoxStream<'static, redis::Msg>, L2Error> {
        let mut by_shard: Vec<Vec<&String>> = vec![Vec::new(); shards.len()];
        for channel in channels {
            let slot = hash_slot(channel.as_bytes());
            let Some(owner) = shards.iter().position(|s| s.serves(slot)) else {
                return Err(L2Error::Redis(format!(
                    "hash slot {slot} (of channel {channel}) is served by no master"
                )));
            };
            by_shard[owner].push(channel);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        let mut connections = Vec::new();
        for (shard, channels) in shards.iter().zip(by_shard) {
            if channels.is_empty() {
                continue;
            }
            let client = nodes.client(&shard.host, shard.port, ProtocolVersion::RESP3)?;
            let config = redis::AsyncConnectionConfig::new()
                .set_push_sender(tx.clone())
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(timeout));
            let node = format!("{}:{}", shard.host, shard.port);
            let conn = tokio::time::timeout(
                self.connect_timeout,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .map_err(|_| L2Error::Timeout(self.connect_timeout))?
            .map_err(|e| L2Error::Redis(format!("connect to {node} failed: {e}")))?;
            let subscribed = futures_util::future::try_join_all(channels.iter().map(|channel| {
                let mut conn = conn.clone();
                async move {
                    redis::cmd("SSUBSCRIBE")
                        .arg(channel.as_str())
                        .query_async::<Value>(&mut conn)
                        .await
                }
            }));
            tokio::time::timeout(timeout, subscribed)
                .await
                .map_err(|_| L2Error::Timeout(timeout))?
                .map_err(|e| L2Error::Redis(format!("SSUBSCRIBE on {node} failed: {e}")))?;
            connections.push(conn);
        }
        drop(tx);
        let pushes = futures_util::stream::unfold((rx, connections), |(mut rx, conns)| async {
            loop {
                let push = rx.recv().await?;
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        if let Some(msg) = redis::Msg::from_push_info(push) {
                            return Some((msg, (rx, conns)));
                        }
                    }
                    // Never asked for: the channel's slot moved, or a connection dropped.
                    PushKind::SUnsubscribe | PushKind::Disconnection => {
                        tracing::warn!(kind = ?push.kind, "a shard subscription ended");
                        return None;
                    }
                    _ => {}
                }
            }
        });
        Ok(pushes.boxed())
    }

    /// [`L2::subscribe`] to `channels` and to heartbeat channels of this subscription's own,
    /// which it returns: `{prefix}{suffix}` on one node; in a cluster one per master that
    /// owns a bucket, `{prefix}{b}{suffix}` with `b` one of its buckets, so each heartbeat
    /// travels on the connection that carries that shard's invalidations. Both come from one
    /// reading of the layout, so every shard subscribed to has its heartbeat.
    ///
    /// # Errors
    /// The layout could not be read, or as [`L2::subscribe`].
    pub async fn subscribe_with_heartbeats(
        &self,
        channels: &[String],
        suffix: &str,
        timeout: Duration,
    ) -> Result<(BoxStream<'static, redis::Msg>, Vec<String>), L2Error> {
        let Some(nodes) = &self.cluster else {
            let heartbeat = format!("{}{suffix}", self.prefix);
            let mut all = channels.to_vec();
            all.push(heartbeat.clone());
            return Ok((self.subscribe(&all, timeout).await?, vec![heartbeat]));
        };
        let shards = self.shards().await?;
        let heartbeats: Vec<String> = shards
            .iter()
            .filter_map(|shard| {
                let b = shard.bucket()?;
                Some(format!("{}{{{b}}}{suffix}", self.prefix))
            })
            .collect();
        if heartbeats.is_empty() {
            return Err(L2Error::Redis("no master serves any bucket".into()));
        }
        let mut all = channels.to_vec();
        all.extend(heartbeats.iter().cloned());
        let stream = self
            .subscribe_sharded(nodes, &shards, &all, timeout)
            .await?;
        Ok((stream, heartbeats))
    }
}
