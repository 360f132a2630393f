//! The Redis feed: a pub/sub subscription of its own (which never reconnects by itself, so
//! the driver's loop does), turning messages published by other instances into
//! invalidations, with a heartbeat published on the command connection that must come back
//! on the subscription. Knows nothing about HTTP.

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::context::FeedContext;
use super::driver::{handle_message, on_heartbeat, Phase, Source};
use crate::backoff::ticker;
use crate::coherence::{mono_ms, Feed};

/// The pub/sub source, with this process's heartbeat channel.
pub struct PubSub {
    heartbeat_channel: String,
}

impl PubSub {
    pub fn new(ctx: &FeedContext) -> Self {
        PubSub {
            heartbeat_channel: format!("{}hb:{}", ctx.config.redis.key_prefix, ctx.feed_id),
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
    ) -> Result<(), String> {
        let config = &ctx.config;
        let tiers = &ctx.tiers;
        let heartbeat_channel = self.heartbeat_channel.as_str();
        let lease = config.feeds.lease;
        let mut messages = tiers
            .subscribe(
                &[tiers.invalidation_channel(), heartbeat_channel.to_string()],
                lease,
            )
            .await
            .map_err(|e| format!("subscription failed: {e}"))?;

        let feed_state = &ctx.coherence.redis;
        feed_state.grant(lease);
        let mut phase = Phase::Connecting;
        let mut tick = ticker(config.feeds.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    if mono_ms() > feed_state.valid_until() {
                        return Err(format!("heartbeat not back within {lease:?}"));
                    }
                    // A failed publish shows up as a missing heartbeat; the lease decides.
                    let _ = tiers.publish(heartbeat_channel, mono_ms().to_string()).await;
                }
                message = messages.next() => {
                    let Some(message) = message else {
                        return Err("subscription closed".into());
                    };
                    if message.get_channel_name() == heartbeat_channel {
                        let payload = message.get_payload_bytes();
                        on_heartbeat(ctx, Feed::Redis, &mut phase, payload, last_good).await?;
                    } else {
                        handle_message(ctx, Feed::Redis, message.get_payload_bytes()).await;
                    }
                }
            }
        }
    }
}
