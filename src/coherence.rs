//! The coherence vocabulary: the invalidation [`Message`] every feed carries, the state of
//! each feed ([`FeedState`]) and the rules that decide, on every read, whether L1 and Redis
//! may be used ([`Coherence`]), judged against a lease clock ([`mono_ms`]). Pure: no IO, no
//! tasks. Feeds and tiers both import it; it imports neither.
//!
//! # A lost feed never means stale data
//! Pub/sub and NOTIFY drop what is sent while a connection is down, silently. So every
//! instance sends itself a heartbeat through each feed, and a feed whose heartbeat has not
//! come back within the lease counts as down, even if no error was ever reported. From that
//! moment L1 is bypassed (and, for the Postgres feed, Redis too, unless configured to trust
//! it).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::locks::MutexExt;
use crate::model::now_ms;
use crate::telemetry::FEED_UP;

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

/// What the relay of the `wal` source publishes to every instance, in WAL order, on one
/// channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Relayed {
    /// Changes of committed transactions, already applied to Redis by the relay.
    Changes {
        changes: Vec<Message>,
        /// The end of the last commit whose changes this message completes, as Postgres
        /// writes an LSN (`16/B374D848`); absent on all but the last message of a batch
        /// published in pieces.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lsn: Option<String>,
    },
    /// A heartbeat that travelled Postgres, WAL, relay, Redis: every change committed before
    /// it was emitted has been published before it.
    Heartbeat {
        /// The relay's instance id.
        relay: String,
        /// From its emission to its publication, in ms, by the relay's clock: how far the
        /// stream lags. An instance counts the lease from its arrival minus this.
        lag_ms: u64,
        /// WAL the slot retains behind the server's position, in bytes, as last measured.
        lag_bytes: Option<i64>,
        /// The heartbeat's own position in the WAL: every change committed before it has
        /// been published before this message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lsn: Option<String>,
        /// The slot epoch (see [`crate::schema::capture::slot_epoch`]) the positions are
        /// of: a new slot's LSNs may lie below an old one's, so an instance forgets what it
        /// applied when it changes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<i64>,
        /// The relay is a synchronous standby of Postgres: it confirms a position only once
        /// every live instance has reported applying it, so instances report (see
        /// [`crate::feed::relayed::applied_channel`]).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        sync: bool,
        /// While `sync`: the instances the relay waits for, each with the sequence number
        /// of the last report it heard from it. An instance uses L1 only while heartbeats
        /// list it, and counts its lease from the report echoed ([`ReportAnchors`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listed: Option<BTreeMap<String, u64>>,
    },
    /// A synchronous relay's answer to the instances' reports, sent a few ms after it heard
    /// the first report of a heartbeat's position (between heartbeats): the instances it
    /// waits for, as in [`Relayed::Heartbeat`]'s `listed`. An instance's lease may then count
    /// from its report at once instead of at the next heartbeat.
    Listed {
        /// The relay's instance id.
        relay: String,
        /// Every instance it waits for, with the number of its last report heard.
        listed: BTreeMap<String, u64>,
    },
    /// The relay lost its stream (or stops): changes committed from now on reach instances
    /// only once a relay streams again. Instances stop trusting L1 at once instead of at
    /// the end of the lease.
    Gap {
        /// The relay's instance id.
        relay: String,
    },
}

impl Relayed {
    /// Parses a payload.
    ///
    /// # Errors
    /// Anything but a well-formed relay message; never panics, whatever the bytes.
    /// A change that is not well formed (no key for a put or delete, a version below 1) is
    /// dropped from the batch, not the batch with it: the others must still be applied.
    pub fn parse(payload: &[u8]) -> Result<Relayed, MessageError> {
        let mut relayed: Relayed =
            serde_json::from_slice(payload).map_err(|e| MessageError(e.to_string()))?;
        if let Relayed::Changes { changes, .. } = &mut relayed {
            changes.retain(|m| (m.key.is_some() || m.op == Op::Flush) && m.version > 0);
        }
        Ok(relayed)
    }
}

/// What an instance's lease may count from while a synchronous relay waits for it (the
/// `wal` source with the relay named in `synchronous_standby_names`).
///
/// The relay stops waiting for an instance a lease after the last report it heard from it
/// (by its own clock, `feeds.lease`), and from then on confirms commits this instance may
/// not have applied. So the instance's lease must end before that: it counts from no later
/// than the sending of a report the relay echoes (in a heartbeat's listing). The relay
/// heard that report after it was sent, so it waits for this instance at least a lease
/// past then. A report lost (the relay's subscription was being renewed, or the relay
/// changed) shortens the lease instead of outliving the relay's wait, and an instance the
/// relay has not heard yet (it just joined) does not use L1 before the relay waits for it.
///
/// Reports are numbered in the order they are sent on one connection, so the relay hears
/// them in that order and echoes the last one's number; numbers are never reused within a
/// process, whose instance id is its own.
#[derive(Debug, Default)]
pub struct ReportAnchors {
    /// The number of the last report.
    last: u64,
    /// Reports not echoed yet: (number, when it was sent, a [`mono_ms`] value).
    sent: VecDeque<(u64, u64)>,
}

impl ReportAnchors {
    /// Reports kept waiting for an echo; older ones are forgotten (a lease then counts
    /// from none of them: shorter, never longer).
    const KEPT: usize = 64;

    /// Numbers a report about to be sent at `sent_at` ([`mono_ms`]).
    pub fn report(&mut self, sent_at: u64) -> u64 {
        self.last += 1;
        self.sent.push_back((self.last, sent_at));
        if self.sent.len() > Self::KEPT {
            self.sent.pop_front();
        }
        self.last
    }

    /// The relay echoes report `seq` (the last it heard from this instance): when it was
    /// sent, the latest point a lease may count from; `None` if it is not kept (echoed
    /// already, or forgotten).
    pub fn echoed(&mut self, seq: u64) -> Option<u64> {
        let sent_at = self
            .sent
            .iter()
            .filter(|(n, _)| *n <= seq)
            .map(|(_, at)| *at)
            .max();
        self.sent.retain(|(n, _)| *n > seq);
        sent_at
    }
}

/// Milliseconds on a monotonic clock private to this process (heartbeats carry it; a wall
/// clock step cannot stretch or shrink a lease).
pub fn mono_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// Whether a feed is delivering, and since when.
///
/// # Concurrency
/// Readers never wait for the feed's task: `is_up` compares the lease granted by the last
/// heartbeat that came back with the clock, so a feed task stuck in a slow step cannot keep
/// L1 in use past the lease.
pub struct FeedState {
    feed: Feed,
    enabled: bool,
    up: AtomicBool,
    /// Unix ms of the last change of `up` (or of start), for `/readyz`.
    since_ms: AtomicU64,
    /// [`mono_ms`] until which the last heartbeat that came back vouches for the feed: its
    /// send time plus the lease.
    valid_until: AtomicU64,
    /// Why the feed's last session ended, while it is down (for `/readyz`).
    down_reason: std::sync::Mutex<Option<String>>,
}

impl FeedState {
    fn new(feed: Feed, enabled: bool) -> Self {
        let state = FeedState {
            feed,
            enabled,
            up: AtomicBool::new(false),
            since_ms: AtomicU64::new(now_ms()),
            valid_until: AtomicU64::new(0),
            down_reason: std::sync::Mutex::new(None),
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
        self.up.load(Ordering::SeqCst) && mono_ms() < self.valid_until.load(Ordering::SeqCst)
    }

    /// A heartbeat sent at `sent` (a [`mono_ms`] value) came back: the feed delivered
    /// everything sent before it, and is vouched for until `sent + lease`.
    pub(crate) fn heartbeat_back(&self, sent: u64, lease: Duration) {
        self.valid_until
            .fetch_max(sent + lease.as_millis() as u64, Ordering::SeqCst);
    }

    /// Ends the current lease at once: the feed is known to have stopped delivering.
    /// The next heartbeat that comes back grants a new one.
    pub(crate) fn revoke(&self) {
        self.valid_until.store(0, Ordering::SeqCst);
    }

    /// When the lease runs out ([`mono_ms`]).
    pub(crate) fn valid_until(&self) -> u64 {
        self.valid_until.load(Ordering::SeqCst)
    }

    /// Starts a new connection's lease: it has `lease` to get a heartbeat back.
    pub(crate) fn grant(&self, lease: Duration) {
        self.valid_until
            .store(mono_ms() + lease.as_millis() as u64, Ordering::SeqCst);
    }

    /// When `up` last changed (or the instance started), Unix time in ms.
    pub fn since_unix_ms(&self) -> u64 {
        self.since_ms.load(Ordering::SeqCst)
    }

    /// Why the feed is down, for `/readyz`: why its last session ended (each failed try
    /// replaces it), or its lease running out before its task noticed; `None` while it is up
    /// or before its first session ended (connecting).
    pub fn down_reason(&self) -> Option<String> {
        if self.is_up() {
            return None;
        }
        if self.up.load(Ordering::SeqCst) {
            return Some("no heartbeat back within the lease".to_string());
        }
        self.down_reason.locked().clone()
    }

    /// Marks the feed down (logged once per outage) for `reason`, kept for `/readyz` until
    /// it is up again. Returns whether it was up.
    pub fn set_down(&self, reason: &str) -> bool {
        *self.down_reason.locked() = Some(reason.to_string());
        let was_up = self.up.swap(false, Ordering::SeqCst);
        if was_up {
            self.since_ms.store(now_ms(), Ordering::SeqCst);
            metrics::gauge!(FEED_UP, "feed" => self.feed.as_str()).set(0.0);
            tracing::warn!(feed = self.feed.as_str(), reason, "feed down; bypassing L1");
        }
        was_up
    }

    pub(crate) fn set_up(&self) {
        *self.down_reason.locked() = None;
        if !self.up.swap(true, Ordering::SeqCst) {
            let down_for = now_ms().saturating_sub(self.since_unix_ms());
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
    /// `feeds.serve_cached_while_postgres_unreachable`.
    serve_when_unreachable: bool,
    /// The Postgres feed's last connection attempt failed: Postgres itself cannot be reached
    /// from here (as opposed to a LISTEN connection lost while Postgres answers).
    postgres_unreachable: AtomicBool,
    /// What the last relayed heartbeat said (`wal` source), for `/readyz`.
    relay: std::sync::Mutex<Option<RelayStatus>>,
    /// The position of the change stream this instance has applied (`wal` source).
    applied: Applied,
}

/// The WAL position (LSN, as a number) up to which this instance has applied every change
/// the relay published: every commit that ended at or before it has evicted or replaced this
/// instance's copies. Advanced by the relayed changes (the end of the last commit in a
/// message) and heartbeats (the heartbeat's own position, behind which everything was
/// published before it); never moves back. 0 until the first.
struct Applied {
    lsn: tokio::sync::watch::Sender<u64>,
    /// [`mono_ms`] when it last moved.
    at_ms: AtomicU64,
}

impl Default for Applied {
    fn default() -> Self {
        Applied {
            lsn: tokio::sync::watch::Sender::new(0),
            at_ms: AtomicU64::new(0),
        }
    }
}

/// The relay as its last heartbeat described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RelayStatus {
    /// The instance id of the relay.
    pub relay: String,
    pub lag_ms: u64,
    pub lag_bytes: Option<i64>,
    /// The relay is a synchronous standby and waits for this instance's reports.
    pub sync: bool,
    /// While `sync`: the heartbeat listed this instance, so the relay waits for it (L1 is
    /// used only then, see [`ReportAnchors`]). Always false otherwise.
    pub listed: bool,
}

impl Coherence {
    /// Records what a relayed heartbeat said.
    pub fn note_relay(&self, status: RelayStatus) {
        *self.relay.locked() = Some(status);
    }

    /// What the last relayed heartbeat said, if one came.
    pub fn relay_status(&self) -> Option<RelayStatus> {
        self.relay.locked().clone()
    }

    pub fn new(postgres: bool, redis: bool, trust_redis: bool) -> Self {
        Coherence {
            postgres: FeedState::new(Feed::Postgres, postgres),
            redis: FeedState::new(Feed::Redis, redis),
            trust_redis,
            serve_when_unreachable: false,
            postgres_unreachable: AtomicBool::new(false),
            relay: std::sync::Mutex::new(None),
            applied: Applied::default(),
        }
    }

    /// Records that every change up to `lsn` has been applied here (a relayed message's
    /// position). A position behind the current one changes nothing.
    pub fn applied(&self, lsn: u64) {
        let moved = self.applied.lsn.send_if_modified(|current| {
            if lsn > *current {
                *current = lsn;
                true
            } else {
                false
            }
        });
        if moved {
            self.applied.at_ms.store(mono_ms(), Ordering::Relaxed);
            metrics::gauge!(crate::telemetry::APPLIED_LSN).set(lsn as f64);
        }
    }

    /// Forgets the applied position (0 again): the relay's positions are of another slot,
    /// possibly below the ones applied so far.
    pub fn forget_applied(&self) {
        self.applied.lsn.send_replace(0);
        self.applied.at_ms.store(mono_ms(), Ordering::Relaxed);
    }

    /// The applied position and how long ago it last moved, in ms; `None` before the first
    /// (no relay heard yet, or another source).
    pub fn applied_position(&self) -> Option<(u64, u64)> {
        let lsn = *self.applied.lsn.borrow();
        (lsn > 0).then(|| {
            let at = self.applied.at_ms.load(Ordering::Relaxed);
            (lsn, mono_ms().saturating_sub(at))
        })
    }

    /// Waits until every change up to `lsn` has been applied here, for at most `within`.
    /// Returns whether it has been.
    pub async fn wait_applied(&self, lsn: u64, within: Duration) -> bool {
        let mut rx = self.applied.lsn.subscribe();
        let reached = tokio::time::timeout(within, rx.wait_for(|applied| *applied >= lsn))
            .await
            .is_ok_and(|r| r.is_ok());
        reached
    }

    /// See `feeds.serve_cached_while_postgres_unreachable`.
    pub fn serving_cached_while_postgres_unreachable(mut self, on: bool) -> Self {
        self.serve_when_unreachable = on;
        self
    }

    /// Records whether the Postgres feed could connect at all.
    pub(crate) fn set_postgres_unreachable(&self, unreachable: bool) {
        self.postgres_unreachable
            .store(unreachable, Ordering::SeqCst);
    }

    /// The Postgres feed is down because Postgres cannot be reached, and the configuration
    /// says to keep serving cached copies then (no write can commit through syncar; writers
    /// elsewhere that still reach Postgres are bounded only by the TTLs).
    fn riding_out_postgres(&self) -> bool {
        self.serve_when_unreachable
            && self.postgres.enabled
            && !self.postgres.is_up()
            && self.postgres_unreachable.load(Ordering::SeqCst)
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
        let postgres_ok =
            !self.postgres.enabled || self.postgres.is_up() || self.riding_out_postgres();
        postgres_ok && (!self.redis.enabled || self.redis.is_up())
    }

    /// Redis may be read: the Postgres feed (which repairs Redis after plain-SQL writes) is up,
    /// or not in use, or Redis is trusted regardless.
    pub fn l2_trusted(&self) -> bool {
        self.trust_redis
            || !self.postgres.enabled
            || self.postgres.is_up()
            || self.riding_out_postgres()
    }

    /// Every enabled feed is up.
    pub fn all_up(&self) -> bool {
        [&self.postgres, &self.redis]
            .iter()
            .all(|f| !f.enabled || f.is_up())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_only_from_a_report_the_relay_heard() {
        let mut anchors = ReportAnchors::default();
        let first = anchors.report(100);
        let second = anchors.report(120);
        let third = anchors.report(350);
        assert_eq!((first, second, third), (1, 2, 3));
        assert_eq!(anchors.echoed(0), None, "nothing heard yet");
        assert_eq!(
            anchors.echoed(second),
            Some(120),
            "the third report was not heard: it vouches for nothing yet"
        );
        assert_eq!(anchors.echoed(second), None, "an echo counts once");
        assert_eq!(anchors.echoed(third), Some(350));
        // A relay that never echoes: what is kept stays bounded, and the oldest go first.
        for at in 0..1000 {
            anchors.report(at);
        }
        assert_eq!(anchors.sent.len(), ReportAnchors::KEPT);
        assert_eq!(anchors.echoed(4), None, "forgotten: no lease from it");
    }

    #[test]
    fn a_heartbeat_lists_the_instances_a_synchronous_relay_waits_for() {
        let hb = br#"{"kind":"heartbeat","relay":"r","lag_ms":3,"lag_bytes":null,"sync":true,"listed":{"a":4,"b":9}}"#;
        match Relayed::parse(hb).unwrap() {
            Relayed::Heartbeat { listed, sync, .. } => {
                assert!(sync);
                assert_eq!(listed.unwrap().get("b"), Some(&9));
            }
            other => panic!("{other:?}"),
        }
        // A relay of an earlier release lists nobody.
        let old = br#"{"kind":"heartbeat","relay":"r","lag_ms":3,"lag_bytes":null,"sync":true}"#;
        assert!(matches!(
            Relayed::parse(old).unwrap(),
            Relayed::Heartbeat { listed: None, .. }
        ));
    }

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

    proptest::proptest! {
        /// Arbitrary payloads (bytes, or JSON of any shape) parse or are refused; never panic.
        #[test]
        fn any_payload_parses_or_is_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                                             version in proptest::num::i64::ANY,
                                             key in proptest::option::of(".{0,40}"),
                                             op in "put|delete|flush|[a-z]{0,6}") {
            let _ = Message::parse(&bytes);
            let json = serde_json::json!({"resource": "kv", "key": key, "version": version, "op": op});
            if let Ok(m) = Message::parse(json.to_string().as_bytes()) {
                proptest::prop_assert!(m.version >= 0);
                proptest::prop_assert!(m.key.is_some() || m.op == Op::Flush);
            }
        }
    }

    #[test]
    fn l1_is_used_only_while_every_enabled_feed_is_up() {
        let lease = Duration::from_secs(60);
        let c = Coherence::new(true, true, false);
        assert!(!c.l1_usable() && !c.l2_trusted());
        c.postgres.heartbeat_back(mono_ms(), lease);
        c.postgres.set_up();
        assert!(!c.l1_usable() && c.l2_trusted());
        c.redis.heartbeat_back(mono_ms(), lease);
        c.redis.set_up();
        assert!(c.l1_usable());
        c.redis.set_down("test");
        assert!(!c.l1_usable() && c.l2_trusted());
        let ttl_only = Coherence::new(false, false, false);
        assert!(ttl_only.l1_usable() && ttl_only.l2_trusted());
        let trusting = Coherence::new(true, false, true);
        assert!(!trusting.l1_usable() && trusting.l2_trusted());
    }

    /// Readers judge the lease themselves: a feed whose last heartbeat is older than the
    /// lease is down even if its task never noticed (stuck in a slow step).
    #[test]
    fn an_expired_lease_means_down_without_the_feed_task() {
        let c = Coherence::new(true, false, false);
        // A zero lease runs out the moment the heartbeat was sent.
        c.postgres.heartbeat_back(mono_ms(), Duration::ZERO);
        c.postgres.set_up();
        assert!(!c.postgres.is_up(), "the lease ran out");
        c.postgres
            .heartbeat_back(mono_ms(), Duration::from_secs(60));
        assert!(c.postgres.is_up());
    }
}
