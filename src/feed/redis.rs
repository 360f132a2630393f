//! The Redis feed: a pub/sub subscription of its own (which never reconnects by itself, so
//! the driver's loop does), turning messages published by other instances into
//! invalidations, with a heartbeat published on the command connection that must come back
//! on the subscription. In a Redis Cluster the subscription is one per shard, and a
//! heartbeat goes out on every shard: a round counts only when it came back from all of
//! them. Knows nothing about HTTP.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{handle_message, on_heartbeat, Phase, Source};
use super::error::FeedError;
use crate::backoff::ticker;
use crate::coherence::{mono_ms, Feed};

/// The pub/sub source, with this process's heartbeat channels' suffix.
pub struct PubSub {
    heartbeat_suffix: String,
}

impl PubSub {
    pub fn new(ctx: &FeedContext) -> Self {
        PubSub {
            heartbeat_suffix: format!("hb:{}", ctx.feed_id),
        }
    }
}

impl Source for PubSub {
    const FEED: Feed = Feed::Redis;

    /// Subscribe, apply messages; a heartbeat that stops coming back ends the session.
    async fn session(
        &mut self,
        ctx: &FeedContext,
        shutdown: &CancellationToken,
        last_good: Option<u64>,
    ) -> Result<(), FeedError> {
        let config = &ctx.config;
        let tiers = &ctx.tiers;
        let lease = config.feeds.lease;
        let (mut messages, heartbeat_channels) = tiers
            .subscribe_with_heartbeats(
                &tiers.invalidation_channels(),
                &self.heartbeat_suffix,
                lease,
            )
            .await
            .map_err(|source| FeedError::Redis {
                what: "subscription",
                source,
            })?;
        // Each heartbeat round (its payload, the time it went out) and the channels that
        // have yet to bring it back.
        let mut rounds: HashMap<Vec<u8>, HashSet<String>> = HashMap::new();

        let feed_state = &ctx.coherence.redis;
        feed_state.grant(lease);
        let mut phase = Phase::Connecting;
        let mut tick = ticker(config.feeds.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    if mono_ms() > feed_state.valid_until() {
                        return Err(FeedError::Silent { what: "heartbeat not back", lease });
                    }
                    // A failed publish shows up as a missing heartbeat; the lease decides.
                    let now = mono_ms();
                    let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
                    rounds.retain(|sent, _| {
                        std::str::from_utf8(sent)
                            .ok()
                            .and_then(|s| s.parse::<u64>().ok())
                            .is_some_and(|sent| sent.saturating_add(lease_ms) >= now)
                    });
                    let payload = now.to_string();
                    rounds.insert(
                        payload.clone().into_bytes(),
                        heartbeat_channels.iter().cloned().collect(),
                    );
                    for channel in &heartbeat_channels {
                        let _ = tiers.publish(channel, payload.clone()).await;
                    }
                }
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err(FeedError::Closed("subscription"));
                    };
                    let channel = message.get_channel_name();
                    if heartbeat_channels.iter().any(|c| c == channel) {
                        let payload = message.get_payload_bytes();
                        let Some(owed) = rounds.get_mut(payload) else {
                            continue; // a round given up on, or not ours
                        };
                        owed.remove(channel);
                        if owed.is_empty() {
                            rounds.remove(payload);
                            on_heartbeat(ctx, Feed::Redis, &mut phase, payload, last_good).await?;
                        }
                    } else {
                        handle_message(ctx, Feed::Redis, message.get_payload_bytes()).await;
                    }
                }
            }
        }
    }
}
