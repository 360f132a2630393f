//! Coherence across instances: the invalidation messages, the state of each feed, and what a
//! feed does when it goes down and comes back. The two feeds live in [`postgres`] and
//! [`redis`]. Knows nothing about HTTP.
//!
//! # A lost feed never means stale data
//! Pub/sub and NOTIFY drop what is sent while a connection is down, silently. So:
//! - every instance sends itself a heartbeat through each feed; a feed whose heartbeat has not
//!   come back within the lease counts as down, even if no error was ever reported;
//! - from the moment a feed is down, L1 is bypassed (and, for the Postgres feed, Redis too,
//!   unless configured to trust it);
//! - when it is back: replay the changes log from shortly before the outage into Redis, empty
//!   L1, and only then use L1 again.

pub mod postgres;
pub mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::model::now_ms;
use crate::schema::changes_since;
use crate::telemetry::{
    FEED_DUPLICATES, FEED_INVALIDATIONS, FEED_MALFORMED, FEED_UP, L1_FLUSHES, PROPAGATION_DELAY,
};

/// The feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    Postgres,
    Redis,
}

impl Feed {
    pub fn as_str(self) -> &'static str {
        match self {
            Feed::Postgres => "postgres",
            Feed::Redis => "redis",
        }
    }
}

/// An invalidation, as the notify trigger and the Redis publishers send it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub resource: String,
    /// `None` only for `flush`.
    pub key: Option<String>,
    pub version: i64,
    pub op: Op,
    /// The sender's clock when the change was made, in Unix microseconds.
    #[serde(default)]
    pub ts_us: Option<i64>,
    /// The publishing instance (Redis feed only); an instance ignores its own messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Delete,
    /// Everything cached of the resource may be stale (a key too long to announce).
    Flush,
}

/// Why a message could not be used.
#[derive(Debug, thiserror::Error)]
#[error("malformed invalidation message: {0}")]
pub struct MessageError(String);

impl Message {
    /// Parses a payload.
    ///
    /// # Errors
    /// Anything but a well-formed message; never panics, whatever the bytes.
    pub fn parse(payload: &[u8]) -> Result<Message, MessageError> {
        let m: Message =
            serde_json::from_slice(payload).map_err(|e| MessageError(e.to_string()))?;
        if m.key.is_none() && m.op != Op::Flush {
            return Err(MessageError(format!("{:?} without a key", m.op)));
        }
        if m.version < 0 {
            return Err(MessageError("negative version".into()));
        }
        Ok(m)
    }
}

/// Whether a feed is delivering, and since when.
pub struct FeedState {
    feed: Feed,
    enabled: bool,
    up: AtomicBool,
    /// Unix ms of the last change of `up` (or of start).
    since_ms: AtomicU64,
}

impl FeedState {
    fn new(feed: Feed, enabled: bool) -> Self {
        let state = FeedState {
            feed,
            enabled,
            up: AtomicBool::new(false),
            since_ms: AtomicU64::new(now_ms()),
        };
        if enabled {
            metrics::gauge!(FEED_UP, "feed" => feed.as_str()).set(0.0);
        }
        state
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    pub fn since_ms(&self) -> u64 {
        self.since_ms.load(Ordering::SeqCst)
    }

    /// Marks the feed down (logged once per outage). Returns whether it was up.
    pub fn set_down(&self, reason: &str) -> bool {
        let was_up = self.up.swap(false, Ordering::SeqCst);
        if was_up {
            self.since_ms.store(now_ms(), Ordering::SeqCst);
            metrics::gauge!(FEED_UP, "feed" => self.feed.as_str()).set(0.0);
            tracing::warn!(feed = self.feed.as_str(), reason, "feed down; bypassing L1");
        }
        was_up
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::SeqCst) {
            let down_for = now_ms().saturating_sub(self.since_ms());
            self.since_ms.store(now_ms(), Ordering::SeqCst);
            metrics::gauge!(FEED_UP, "feed" => self.feed.as_str()).set(1.0);
            tracing::info!(
                feed = self.feed.as_str(),
                down_ms = down_for,
                "feed up; L1 in use"
            );
        }
    }
}

/// The state of both feeds, read on every request.
pub struct Coherence {
    pub postgres: FeedState,
    pub redis: FeedState,
    trust_redis: bool,
}

impl Coherence {
    pub fn new(postgres: bool, redis: bool, trust_redis: bool) -> Self {
        Coherence {
            postgres: FeedState::new(Feed::Postgres, postgres),
            redis: FeedState::new(Feed::Redis, redis),
            trust_redis,
        }
    }

    pub fn state(&self, feed: Feed) -> &FeedState {
        match feed {
            Feed::Postgres => &self.postgres,
            Feed::Redis => &self.redis,
        }
    }

    /// L1 may be read and filled: every enabled feed is up. With no feed at all (TTL-only
    /// mode) L1 is always used and only its TTL bounds staleness.
    pub fn l1_usable(&self) -> bool {
        [&self.postgres, &self.redis]
            .iter()
            .all(|f| !f.enabled || f.is_up())
    }

    /// Redis may be read: the Postgres feed (which repairs Redis after plain-SQL writes) is up,
    /// or not in use, or Redis is trusted regardless.
    pub fn l2_trusted(&self) -> bool {
        self.trust_redis || !self.postgres.enabled || self.postgres.is_up()
    }

    /// Every enabled feed is up.
    pub fn all_up(&self) -> bool {
        self.l1_usable()
    }
}

/// A feed is back: repair Redis from the changes log since shortly before the outage began,
/// empty L1, and only then mark the feed up. `down_since_ms` is `None` at start-up, when the
/// outage (if any) is unknown: then the whole retained log is replayed.
///
/// # Errors
/// The replay failed (Postgres or Redis); the feed stays down and the caller retries.
pub async fn recover(
    state: &AppState,
    feed: Feed,
    down_since_ms: Option<u64>,
) -> Result<(), String> {
    let config = &state.config;
    let retention = config.feeds.changes_retention;
    let ago = match down_since_ms {
        Some(since) => {
            Duration::from_millis(now_ms().saturating_sub(since)) + config.feeds.replay_margin
        }
        None => retention,
    };
    if let Ok(catalog) = state.catalog() {
        let tiers = &state.tiers;
        if ago > retention {
            // The log no longer covers the outage: Redis cannot be repaired key by key.
            let removed = tiers.l2().flush_prefix().await.map_err(|e| e.to_string())?;
            tracing::warn!(
                feed = feed.as_str(),
                removed,
                "outage longer than feeds.changes_retention; dropped the key prefix from redis"
            );
        } else {
            let client = tiers.db().raw_client().await.map_err(|e| e.to_string())?;
            let changes = changes_since(&**client, &config.postgres.schema, ago)
                .await
                .map_err(|e| e.to_string())?;
            let replayed = changes.len();
            tiers
                .replay(&catalog, changes)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                feed = feed.as_str(),
                replayed,
                window_ms = ago.as_millis() as u64,
                "replayed the changes log into redis"
            );
        }
    }
    if let Some(l1) = state.tiers.l1() {
        l1.clear();
        metrics::counter!(L1_FLUSHES, "feed" => feed.as_str()).increment(1);
    }
    state.coherence.state(feed).set_up();
    Ok(())
}

/// A random identity for this process's feed channels: 16 lowercase hex digits, safe in a
/// Postgres channel name and a Redis key.
pub fn feed_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Heartbeat bookkeeping shared by both feeds.
pub(crate) struct Heartbeat {
    pub sent: u64,
    pub last_seen: tokio::time::Instant,
}

impl Heartbeat {
    pub fn new() -> Self {
        Heartbeat {
            sent: 0,
            last_seen: tokio::time::Instant::now(),
        }
    }
}

/// Applies one message from a feed: parse, skip our own, evict, count.
pub(crate) async fn handle_message(state: &AppState, feed: Feed, payload: &[u8]) {
    let message = match Message::parse(payload) {
        Ok(m) => m,
        Err(e) => {
            metrics::counter!(FEED_MALFORMED, "feed" => feed.as_str()).increment(1);
            tracing::debug!(feed = feed.as_str(), error = %e, "ignoring a malformed message");
            return;
        }
    };
    if feed == Feed::Redis && message.instance.as_deref() == Some(state.instance_id.as_str()) {
        return;
    }
    metrics::counter!(FEED_INVALIDATIONS, "feed" => feed.as_str()).increment(1);
    let Ok(catalog) = state.catalog() else {
        return;
    };
    let fresh = state.tiers.apply(&catalog, &message, feed).await;
    if !fresh {
        metrics::counter!(FEED_DUPLICATES, "feed" => feed.as_str()).increment(1);
    }
    if let Some(ts_us) = message.ts_us {
        let delay_us = (now_ms() as i64 * 1000).saturating_sub(ts_us).max(0);
        metrics::histogram!(PROPAGATION_DELAY, "feed" => feed.as_str())
            .record(delay_us as f64 / 1e6);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_and_bad_ones_are_errors() {
        let m = Message::parse(br#"{"resource":"kv","key":"a","version":5,"op":"put","ts_us":1}"#)
            .unwrap();
        assert_eq!(m.op, Op::Put);
        assert_eq!(m.key.as_deref(), Some("a"));
        let f =
            Message::parse(br#"{"resource":"kv","key":null,"version":5,"op":"flush"}"#).unwrap();
        assert_eq!(f.op, Op::Flush);
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            br#"{"resource":"kv","key":null,"version":5,"op":"put"}"#,
            br#"{"resource":"kv","key":"a","version":-1,"op":"put"}"#,
            br#"{"resource":"kv","key":"a","version":"5","op":"put"}"#,
            br#"{"resource":"kv","key":"a","version":5,"op":"upsert"}"#,
            b"\xff\xfe",
        ] {
            assert!(
                Message::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn l1_is_used_only_while_every_enabled_feed_is_up() {
        let c = Coherence::new(true, true, false);
        assert!(!c.l1_usable() && !c.l2_trusted());
        c.postgres.set_up();
        assert!(!c.l1_usable() && c.l2_trusted());
        c.redis.set_up();
        assert!(c.l1_usable());
        c.redis.set_down("test");
        assert!(!c.l1_usable() && c.l2_trusted());
        let ttl_only = Coherence::new(false, false, false);
        assert!(ttl_only.l1_usable() && ttl_only.l2_trusted());
        let trusting = Coherence::new(true, false, true);
        assert!(!trusting.l1_usable() && trusting.l2_trusted());
    }
}
