//! The Redis feed: a pub/sub subscription of its own (RESP2 `get_async_pubsub`, which never
//! reconnects by itself, so this loop does), turning messages published by other instances
//! into invalidations, with a heartbeat published on the command connection that must come
//! back on the subscription. Knows nothing about HTTP.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{handle_message, recover, Feed, Heartbeat};
use crate::app::AppState;
use crate::tiers::jitter;

/// Runs the feed until `shutdown`; see the Postgres feed for the shape.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let feeds = &state.config.feeds;
    let heartbeat_channel = format!("{}hb:{}", state.config.redis.key_prefix, state.feed_id);
    let mut backoff = Duration::from_millis(100);
    let mut started = false;
    let mut outage_logged = false;
    loop {
        match session(&state, &heartbeat_channel, &shutdown, &mut started).await {
            Ok(()) => return,
            Err(reason) => {
                let reason = state.secrets.scrub(&reason);
                if state.coherence.redis.set_down(&reason) {
                    backoff = Duration::from_millis(100);
                    outage_logged = true;
                } else if !outage_logged {
                    tracing::warn!(feed = "redis", reason = %reason, "feed not connected; retrying");
                    outage_logged = true;
                } else {
                    tracing::debug!(feed = "redis", reason = %reason, "feed retry failed");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jitter(backoff, 0.5)) => {}
        }
        backoff = (backoff * 2).min(feeds.max_backoff);
        if state.coherence.redis.is_up() {
            outage_logged = false;
        }
    }
}

async fn session(
    state: &AppState,
    heartbeat_channel: &str,
    shutdown: &CancellationToken,
    started: &mut bool,
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

    let down_since = (*started).then(|| state.coherence.redis.since_ms());
    let mut heartbeat = Heartbeat::new();
    let mut recovered = false;
    let mut tick = tokio::time::interval(config.feeds.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if heartbeat.last_seen.elapsed() > lease {
                    return Err(format!("heartbeat not back within {lease:?}"));
                }
                heartbeat.sent += 1;
                // A failed publish shows up as a missing heartbeat; the lease decides.
                let _ = l2.publish(heartbeat_channel, heartbeat.sent.to_string()).await;
            }
            message = messages.next() => {
                let Some(message) = message else {
                    return Err("subscription closed".into());
                };
                if message.get_channel_name() == heartbeat_channel {
                    heartbeat.last_seen = tokio::time::Instant::now();
                    if !recovered {
                        recover(state, Feed::Redis, down_since).await?;
                        recovered = true;
                        *started = true;
                    }
                } else {
                    handle_message(state, Feed::Redis, message.get_payload_bytes()).await;
                }
            }
        }
    }
}
