//! The change stream apps watch (`GET /v1/{resource}?watch=true`, Server-Sent Events): every
//! change this instance has applied to its own L1, so an app that reads after an event never
//! gets the older copy from here. Knows nothing about HTTP or the tiers.
//!
//! # Ids and resuming
//! Each event has an id `{epoch}-{n}`: `epoch` is random per process, `n` counts from 1. The
//! last [`RING`] events are kept, so a client reconnecting with `Last-Event-ID` is sent what it
//! missed. When that cannot be proved complete (another epoch: this process restarted; an
//! id older than the ring; a feed went down, so this instance itself may have missed
//! changes; L1 was emptied) the client gets a `reset`: re-read what you hold.
//!
//! # Slow clients
//! Each watcher has a bounded buffer ([`tokio::sync::broadcast`]); one that falls behind is
//! sent a `reset` and closed. Publishing never waits for a watcher.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::coherence::Op;
use crate::locks::MutexExt;

/// Events kept for resuming.
pub const RING: usize = 4096;

/// One thing a watcher is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A change this instance applied to L1 (or, without L1, learned of).
    Change(Arc<Change>),
    /// This instance cannot vouch that no change was missed: re-read.
    Reset { reason: Arc<str> },
    /// Every change committed up to this WAL position (an LSN as a number) has been sent
    /// (`wal` source): the watermark a watcher compares a writer's `pg_current_wal_lsn()`
    /// with. Sent after each batch of relayed changes and each relay heartbeat (every
    /// `feeds.heartbeat_interval`), never replayed.
    Position(u64),
}

/// A change, as sent: `{resource, key, version, op}` (`key` absent for a flush, which means
/// every key of the resource).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    #[serde(skip)]
    pub id: u64,
    pub resource: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub version: i64,
    pub op: Op,
}

/// Where changes are published and watchers subscribe. Cheap to publish to with nobody
/// watching.
#[derive(Debug)]
pub struct WatchHub {
    epoch: u64,
    next: AtomicU64,
    tx: broadcast::Sender<Event>,
    ring: Mutex<VecDeque<Arc<Change>>>,
    /// The id the next change had when the last reset was sent: a watcher whose last event
    /// is older missed that reset.
    reset_at: AtomicU64,
    /// Cancelled on shutdown: streams end, so their connections can drain.
    closing: tokio_util::sync::CancellationToken,
}

/// What a watcher starts from.
pub struct Subscription {
    /// Events missed since `Last-Event-ID`, oldest first; or a reset when that cannot be
    /// proved complete.
    pub backlog: Vec<Event>,
    pub live: broadcast::Receiver<Event>,
}

impl WatchHub {
    /// A hub whose watchers may fall `buffer` events behind before they are reset.
    pub fn new(buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(buffer.max(1));
        WatchHub {
            epoch: fastrand::u64(1..u64::MAX / 2),
            next: AtomicU64::new(1),
            tx,
            ring: Mutex::new(VecDeque::with_capacity(RING)),
            reset_at: AtomicU64::new(0),
            closing: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// The id of `n` in this process: `{epoch}-{n}`.
    pub fn id(&self, n: u64) -> String {
        format!("{:x}-{n}", self.epoch)
    }

    /// Publishes a change applied here.
    pub fn change(&self, resource: &str, key: Option<&str>, version: i64, op: Op) {
        let mut ring = self.ring.locked();
        // Numbered and sent under the lock (a send never waits): watchers get ids in order,
        // so one that skips what it has seen skips nothing new.
        let change = Arc::new(Change {
            id: self.next.fetch_add(1, Ordering::SeqCst),
            resource: resource.to_string(),
            key: key.map(str::to_string),
            version,
            op,
        });
        if ring.len() == RING {
            ring.pop_front();
        }
        ring.push_back(change.clone());
        let _ = self.tx.send(Event::Change(change));
    }

    /// Tells every watcher to re-read, and forgets the ring (nothing before this may be
    /// resumed from).
    /// Tells every watcher that every change up to `lsn` has been sent (see
    /// [`Event::Position`]).
    pub fn position(&self, lsn: u64) {
        let _ = self.tx.send(Event::Position(lsn));
    }

    pub fn reset(&self, reason: &str) {
        let mut ring = self.ring.locked();
        ring.clear();
        self.reset_at
            .store(self.next.load(Ordering::SeqCst), Ordering::SeqCst);
        let _ = self.tx.send(Event::Reset {
            reason: reason.into(),
        });
        drop(ring);
    }

    /// Ends every stream (shutdown): a client reconnects elsewhere with its `Last-Event-ID`.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Completes once [`WatchHub::close`] was called.
    pub async fn closed(&self) {
        self.closing.cancelled().await;
    }

    /// Watchers subscribed now.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A watcher's start: live events from now, and what it missed since `last_event_id`
    /// if that can be proved complete, else a reset. No `last_event_id`: nothing missed.
    pub fn subscribe(&self, last_event_id: Option<&str>) -> Subscription {
        // Subscribed before the ring is read: nothing falls between (duplicates are skipped
        // by id by the caller).
        let live = self.tx.subscribe();
        let Some(last) = last_event_id else {
            return Subscription {
                backlog: Vec::new(),
                live,
            };
        };
        let reset = |reason: &str| Subscription {
            backlog: vec![Event::Reset {
                reason: reason.into(),
            }],
            live: self.tx.subscribe(),
        };
        let Some(n) = last
            .split_once('-')
            .filter(|(epoch, _)| u64::from_str_radix(epoch, 16).ok() == Some(self.epoch))
            .and_then(|(_, n)| n.parse::<u64>().ok())
        else {
            return reset("Last-Event-ID is not from this instance's current process");
        };
        let ring = self.ring.locked();
        if n < self.reset_at.load(Ordering::SeqCst) {
            drop(ring);
            return reset("this instance could not vouch for every change since Last-Event-ID");
        }
        let oldest = ring
            .front()
            .map_or(self.next.load(Ordering::SeqCst), |c| c.id);
        if n.saturating_add(1) < oldest {
            drop(ring);
            return reset("Last-Event-ID is older than the events kept");
        }
        let backlog = ring
            .iter()
            .filter(|c| c.id > n)
            .map(|c| Event::Change(c.clone()))
            .collect();
        Subscription { backlog, live }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Change(c) => Some(c.id),
                Event::Reset { .. } | Event::Position(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_watcher_resumes_from_its_last_id_or_is_reset() {
        let hub = WatchHub::new(16);
        for v in 1..=3 {
            hub.change("kv", Some("a"), v, Op::Put);
        }
        let sub = hub.subscribe(Some(&hub.id(1)));
        assert_eq!(ids(&sub.backlog), vec![2, 3]);
        assert!(hub.subscribe(None).backlog.is_empty());
        let other = hub.subscribe(Some("123-1"));
        assert!(
            matches!(other.backlog[..], [Event::Reset { .. }]),
            "another epoch"
        );
        let junk = hub.subscribe(Some("junk"));
        assert!(matches!(junk.backlog[..], [Event::Reset { .. }]));
        hub.reset("a feed went down");
        let missed = hub.subscribe(Some(&hub.id(3)));
        assert!(
            matches!(missed.backlog[..], [Event::Reset { .. }]),
            "a watcher whose last event came before a reset missed it"
        );
        hub.change("kv", Some("a"), 9, Op::Put);
        let after = hub.subscribe(Some(&hub.id(4)));
        assert!(
            after.backlog.is_empty(),
            "saw 4, after the reset: nothing missed"
        );
    }

    #[test]
    fn an_id_older_than_the_ring_is_a_reset() {
        let hub = WatchHub::new(16);
        for v in 0..(RING as i64 + 10) {
            hub.change("kv", Some("a"), v, Op::Put);
        }
        let sub = hub.subscribe(Some(&hub.id(2)));
        assert!(matches!(sub.backlog[..], [Event::Reset { .. }]));
        let recent = hub.subscribe(Some(&hub.id(RING as u64)));
        assert_eq!(ids(&recent.backlog).len(), 10);
    }
}
