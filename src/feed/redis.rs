//! The Redis feed: a pub/sub subscription of its own (RESP2 `get_async_pubsub`, which never
//! reconnects by itself, so this loop does), turning messages published by other instances
//! into invalidations, with a heartbeat published on the command connection that must come
//! back on the subscription. Knows nothing about HTTP.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{handle_message, mono_ms, on_heartbeat, Feed, Phase, Supervisor};
use crate::app::AppState;

/// Runs the feed until `shutdown`; see the Postgres feed for the shape.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let heartbeat_channel = format!("{}hb:{}", state.config.redis.key_prefix, state.feed_id);
    let mut supervisor = Supervisor::new(Feed::Redis);
    if !supervisor.wait_for_catalog(&state, &shutdown).await {
        return;
    }
    while supervisor
        .again(
            session(&state, &heartbeat_channel, &shutdown, supervisor.last_good).await,
            &state,
            &shutdown,
        )
        .await
    {}
}

async fn session(
    state: &AppState,
    heartbeat_channel: &str,
    shutdown: &CancellationToken,
    last_good: Option<u64>,
) -> Result<(), String> {
    let config = &state.config;
    let l2 = state.tiers.l2();
    let lease = config.feeds.lease;
    let client = l2.client();
    let mut pubsub = tokio::time::timeout(config.redis.connect_timeout, client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect failed: {e}"))?;
    tokio::time::timeout(
        lease,
        pubsub.subscribe(&[l2.invalidation_channel(), heartbeat_channel.to_string()]),
    )
    .await
    .map_err(|_| "SUBSCRIBE timed out".to_string())?
    .map_err(|e| format!("SUBSCRIBE failed: {e}"))?;
    let mut messages = pubsub.into_on_message();

    let feed_state = &state.coherence.redis;
    feed_state.grant(lease);
    let mut phase = Phase::Connecting;
    let mut tick = tokio::time::interval(config.feeds.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if mono_ms() > feed_state.valid_until() {
                    return Err(format!("heartbeat not back within {lease:?}"));
                }
                // A failed publish shows up as a missing heartbeat; the lease decides.
                let _ = l2.publish(heartbeat_channel, mono_ms().to_string()).await;
            }
            message = messages.next() => {
                let Some(message) = message else {
                    return Err("subscription closed".into());
                };
                if message.get_channel_name() == heartbeat_channel {
                    let payload = message.get_payload_bytes();
                    on_heartbeat(state, Feed::Redis, &mut phase, payload, last_good).await?;
                } else {
                    handle_message(state, Feed::Redis, message.get_payload_bytes()).await;
                }
            }
        }
    }
}
