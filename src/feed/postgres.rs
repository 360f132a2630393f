//! The Postgres feed: a LISTEN loop on a connection of its own (never from the pool: the pool
//! drops notifications and its recycling runs `UNLISTEN *`), turning notifications into
//! invalidations, with a heartbeat through the same path. Knows nothing about HTTP.
//!
//! Notifications arrive at commit, for every writer (the triggers fire for plain SQL too), so
//! this feed also repairs Redis after writes that never went through syncar.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{handle_message, lease_ms, mono_ms, on_heartbeat, Feed, Phase};
use crate::app::AppState;
use crate::db::pg_config;
use crate::schema::NOTIFY_CHANNEL;
use crate::tiers::jitter;

/// Runs the feed until `shutdown`: connect, LISTEN, apply notifications, and on any failure
/// (including a heartbeat that stopped coming back) mark the feed down and reconnect with
/// jittered backoff.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let feeds = &state.config.feeds;
    let heartbeat_channel = format!("syncar_hb_{}", state.feed_id);
    let mut backoff = Duration::from_millis(100);
    // Send time of the last heartbeat that came back before an outage: the replay starts there.
    let mut last_good: Option<u64> = None;
    // The catalog says which resources exist; replays and messages need it.
    while state.catalog().is_err() {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let mut outage_logged = false;
    loop {
        let result = session(&state, &heartbeat_channel, &shutdown, last_good).await;
        match result {
            Ok(()) => return,
            Err(reason) => {
                let reason = state.secrets.scrub(&reason);
                let feed = &state.coherence.postgres;
                let was_up = feed.set_down(&reason);
                if was_up {
                    last_good = Some(feed.valid_until().saturating_sub(lease_ms(&state)));
                    backoff = Duration::from_millis(100);
                    outage_logged = true;
                } else if !outage_logged {
                    tracing::warn!(feed = "postgres", reason = %reason, "feed not connected; retrying");
                    outage_logged = true;
                } else {
                    tracing::debug!(feed = "postgres", reason = %reason, "feed retry failed");
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jitter(backoff, 0.5)) => {}
        }
        backoff = (backoff * 2).min(feeds.max_backoff);
        if state.coherence.postgres.is_up() {
            outage_logged = false;
        }
    }
}

/// One connection's life. `Ok` only on shutdown.
async fn session(
    state: &AppState,
    heartbeat_channel: &str,
    shutdown: &CancellationToken,
    last_good: Option<u64>,
) -> Result<(), String> {
    let config = &state.config;
    let mut postgres = config.postgres.clone();
    if let Some(url) = &config.postgres.listen_url {
        postgres.url = url.clone();
    }
    let mut pg = pg_config(&postgres).map_err(|e| e.to_string())?;
    pg.application_name("syncar-listen");
    let (client, mut connection) =
        tokio::time::timeout(postgres.connect_timeout, pg.connect(NoTls))
            .await
            .map_err(|_| {
                state.coherence.set_postgres_unreachable(true);
                "connect timed out".to_string()
            })?
            .map_err(|e| {
                state.coherence.set_postgres_unreachable(true);
                format!("connect failed: {e}")
            })?;
    state.coherence.set_postgres_unreachable(false);

    // The connection is driven here; notifications go through a channel. The task ends with
    // the connection, and is aborted with this session.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(feed = "postgres", error = %e, "listen connection failed");
                    return;
                }
            }
        }
    });
    let _driver = AbortOnDrop(driver);

    let lease = config.feeds.lease;
    tokio::time::timeout(
        lease,
        client.batch_execute(&format!(
            "LISTEN {NOTIFY_CHANNEL}; LISTEN {heartbeat_channel}"
        )),
    )
    .await
    .map_err(|_| "LISTEN timed out".to_string())?
    .map_err(|e| format!("LISTEN failed: {e}"))?;

    let feed_state = &state.coherence.postgres;
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
                // Bounded so a half-open socket cannot stall the loop; the lease decides.
                let notify = format!("NOTIFY {heartbeat_channel}, '{}'", mono_ms());
                let send = client.batch_execute(&notify);
                if let Ok(Err(e)) = tokio::time::timeout(config.feeds.heartbeat_interval, send).await {
                    return Err(format!("heartbeat failed: {e}"));
                }
            }
            notification = rx.recv() => {
                let Some(n) = notification else {
                    return Err("listen connection closed".into());
                };
                if n.channel() == heartbeat_channel {
                    on_heartbeat(state, Feed::Postgres, &mut phase, n.payload().as_bytes(), last_good)
                        .await?;
                } else {
                    handle_message(state, Feed::Postgres, n.payload().as_bytes()).await;
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
