//! Applying the feeds' messages, as a room of [`FeedTiers`]: to L1, and to Redis for the
//! feeds that must tell it. What a message does is asked of `decide`.

use crate::coherence::{Feed, Message, Op};
use crate::l1::Offer;
use crate::l2::L2Error;
use crate::model::{CacheKey, Version};
use crate::resource::Catalog;

use super::decide::{effect, news, Effect};
use super::feed::FeedTiers;
use super::shared::{l1_ttl, l2_ttl};

impl FeedTiers {
    /// Applies an invalidation from a feed: a tombstone (or, for a delete, an absence) at the
    /// message's version in L1, and, from the Postgres feed, in Redis too, which repairs Redis
    /// after writes that never went through syncar. A flush empties L1 and raises the
    /// resource's generation in Redis. Returns whether it taught anything new (false for
    /// duplicates and for versions older than what is known: no-ops).
    pub async fn apply(&self, catalog: &Catalog, message: &Message, feed: Feed) -> bool {
        self.apply_to(catalog, message, feed == Feed::Postgres)
            .await
    }

    /// Applies a change the relay has already applied to Redis (the `wal` source): L1 only,
    /// and for a flush, the generation the relay raised.
    pub async fn apply_relayed(&self, catalog: &Catalog, message: &Message) -> bool {
        self.apply_to(catalog, message, false).await
    }

    async fn apply_to(&self, catalog: &Catalog, message: &Message, redis: bool) -> bool {
        if !Version(message.version).plausible() {
            tracing::warn!(resource = %message.resource, version = message.version,
                "ignored a message naming a version Postgres cannot have handed out (forged?)");
            return false;
        }
        let served = catalog.get(&message.resource);
        let known = catalog.knows(&message.resource);
        let (copy, key) = match effect(message, known, served.is_some()) {
            Effect::Flush { clear_l1 } => return self.apply_flush(message, clear_l1, redis).await,
            Effect::Ignore => return false, // not a resource of this instance
            Effect::Seen => {
                self.high_water.saw(Version(message.version));
                return false;
            }
            Effect::Key { copy, key } => (copy, key),
        };
        let Some(resource) = served else {
            return false; // `effect` names a key only of a served resource
        };
        self.high_water.saw(Version(message.version));
        let ck = CacheKey::new(&resource.name, key);
        // New to this instance: judged by L1 when there is one, else by Redis.
        let l1 = self
            .l1
            .as_ref()
            .map(|l1| l1.offer(&ck, copy.clone(), l1_ttl(resource, &copy)) == Offer::Applied);
        // Whatever it taught L1, a load in flight may predate this change.
        self.flights.forget(&ck);
        let mut redis_applied = None;
        if redis {
            let result = if self.l2.available() {
                self.l2.offer(&ck, &copy, l2_ttl(resource, &copy)).await
            } else {
                Err(L2Error::Skipped)
            };
            match result {
                Ok(applied) => redis_applied = Some(applied),
                // Redis must still learn of it (a plain-SQL write has no other way there).
                Err(_) => self
                    .repairs
                    .push(ck.clone(), copy.clone(), resource.ttl.tombstone_ttl),
            }
        }
        let fresh = news(l1, redis_applied);
        if fresh {
            self.watch
                .change(&resource.name, Some(key), message.version, message.op);
        }
        fresh
    }

    /// A resource-wide flush, of a resource served or left out (a left-out one's copies
    /// must not come back when it is served again). The new generation first, so that
    /// nothing read from Redis after L1 is emptied comes from the old one. L1 is emptied
    /// only for a served resource (`clear_l1`, see [`Effect::Flush`]).
    async fn apply_flush(&self, message: &Message, clear_l1: bool, redis: bool) -> bool {
        self.high_water.saw(Version(message.version));
        let name = &message.resource;
        self.l2.note_generation(name, message.version);
        if let (Some(l1), true) = (&self.l1, clear_l1) {
            l1.clear();
        }
        if redis {
            if let Err(e) = self.l2.raise_generation(name, message.version).await {
                tracing::warn!(resource = %name, error = %e, "raising a resource's generation in redis failed");
            }
        }
        // A flush may be a table's new shape (or a TRUNCATE: a recheck finds nothing).
        self.catalog.request_recheck();
        self.watch.change(name, None, message.version, Op::Flush);
        true
    }
}

#[cfg(test)]
mod tests {
    //! The fill/invalidate race (ARCHITECTURE.md, "Read path") on a real L1, without Redis or
    //! Postgres: commits, reads that start (capturing the truth and L1's generation), their
    //! fills landing, Redis hits judged, writers offering their commits, the messages of two
    //! feeds delivered (each in commit order, as one feed's messages of one key are; the two
    //! feeds at their own pace), and flushes, in any interleaving.

    use std::time::Duration;

    use bytes::Bytes;
    use proptest::prelude::*;

    use crate::coherence::{Message, Op};
    use crate::l1::{Offer, L1};
    use crate::model::{CacheKey, Cached, Version};

    use crate::tiers::decide::{
        conflict, invalidation, l1_knows_newer, redis_may_answer, regression, Regression,
    };

    const TTL: Duration = Duration::from_secs(3600);

    #[derive(Clone, Debug)]
    enum Step {
        /// A write commits the next version (a put, or a delete); its message is queued on
        /// both feeds.
        Commit { delete: bool },
        /// A read loads the truth as of now, in L1's current generation.
        StartRead,
        /// The oldest message queued on one of the two feeds reaches L1: `false` the
        /// Postgres feed's (which tells L1 before Redis), `true` the Redis feed's (published
        /// once Redis took the copy, as the relay and writers do).
        Deliver(bool),
        /// A started read (picked by index) offers its copy to L1.
        Land(usize),
        /// A flush or a feed coming back empties L1.
        Clear,
        /// A write through this instance (the last commit) offers its copy to L1, in the
        /// generation its write began in (picked by index among those not settled yet).
        Settle(usize),
        /// A read finds Redis holding one of the key's states (picked by index), no older
        /// than the Redis feed's messages delivered but perhaps behind the Postgres feed's,
        /// and judges it as `Tiers::read_l2` does, offering it to L1.
        RedisHit(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => any::<bool>().prop_map(|delete| Step::Commit { delete }),
            3 => Just(Step::StartRead),
            4 => any::<bool>().prop_map(Step::Deliver),
            4 => any::<usize>().prop_map(Step::Land),
            1 => Just(Step::Clear),
            2 => any::<usize>().prop_map(Step::Settle),
            2 => any::<usize>().prop_map(Step::RedisHit),
        ]
    }

    /// One key's history and what is in flight towards L1.
    struct Race {
        l1: L1,
        ck: CacheKey,
        /// What Postgres holds now.
        truth: Cached,
        /// Every state the key had, the first (never written) included: the state at
        /// version `n` is `history[n]`.
        history: Vec<Cached>,
        /// The newest message delivered on the Redis feed, clears notwithstanding: Redis
        /// holds that version or a newer one.
        redis_floor: Version,
        /// Each feed's messages not delivered yet, oldest first.
        queued: [std::collections::VecDeque<Message>; 2],
        reads: Vec<(Cached, u32)>,
        /// Commits not yet offered to L1 by their writer, with the generation it began in.
        writes: Vec<(Cached, u32)>,
        /// The newest message L1 was told since it was last emptied.
        told: Option<Version>,
    }

    impl Race {
        fn new() -> Self {
            Race {
                l1: L1::new(1 << 20),
                ck: CacheKey::new("users", "k"),
                truth: Cached::absent(Version::NONE),
                history: vec![Cached::absent(Version::NONE)],
                redis_floor: Version::NONE,
                queued: Default::default(),
                reads: Vec::new(),
                writes: Vec::new(),
                told: None,
            }
        }

        fn run(&mut self, step: Step) -> Result<(), TestCaseError> {
            match step {
                Step::Commit { delete } => {
                    let began = self.l1.generation();
                    let v = Version(self.truth.version.0 + 1);
                    self.truth = if delete {
                        Cached::absent(v)
                    } else {
                        Cached::value(v, Bytes::from(v.to_string()))
                    };
                    let op = if delete { Op::Delete } else { Op::Put };
                    let message = Message {
                        resource: "users".into(),
                        key: Some("k".into()),
                        version: v.0,
                        op,
                        ts_us: None,
                        instance: None,
                    };
                    for feed in &mut self.queued {
                        feed.push_back(message.clone());
                    }
                    self.writes.push((self.truth.clone(), began));
                    self.history.push(self.truth.clone());
                }
                Step::StartRead => self.reads.push((self.truth.clone(), self.l1.generation())),
                Step::Deliver(feed) if !self.queued[usize::from(feed)].is_empty() => {
                    let message = self.queued[usize::from(feed)]
                        .pop_front()
                        .expect("not empty");
                    let copy = invalidation(&message).expect("a key's message");
                    self.l1.offer(&self.ck, copy, TTL);
                    self.told = self.told.max(Some(Version(message.version)));
                    if feed {
                        self.redis_floor = self.redis_floor.max(Version(message.version));
                    }
                }
                Step::Land(i) if !self.reads.is_empty() => {
                    let (copy, generation) = self.reads.remove(i % self.reads.len());
                    let cleared = generation != self.l1.generation();
                    let offer = self.l1.offer_in(generation, &self.ck, copy, TTL);
                    if cleared {
                        prop_assert!(matches!(offer, Offer::Refused(_)), "a fill across a clear");
                    }
                }
                Step::Settle(i) if !self.writes.is_empty() => {
                    let (copy, generation) = self.writes.remove(i % self.writes.len());
                    self.settle(copy, generation)?;
                }
                Step::RedisHit(i) => {
                    let floor = self.redis_floor.0 as usize;
                    let copy = self.history[floor + i % (self.history.len() - floor)].clone();
                    self.redis_hit(copy)?;
                }
                Step::Deliver(_) | Step::Land(_) | Step::Settle(_) => {}
                Step::Clear => {
                    self.l1.clear();
                    self.told = None;
                }
            }
            self.check()
        }

        /// As `Tiers::settle` and `repair_regression` judge a write L1 refused: Postgres never
        /// went back here, so whatever L1 holds against the write is a later commit, never a
        /// regression (which would restamp the key, or reset every resource).
        fn settle(&mut self, copy: Cached, generation: u32) -> Result<(), TestCaseError> {
            if let Offer::Refused(_) = self.l1.offer_in(generation, &self.ck, copy.clone(), TTL) {
                if let Some(c) = conflict(&copy, self.l1.get(&self.ck)) {
                    let row = self.truth.doc().map(|_| self.truth.version);
                    let judged = regression(c, self.truth.version, row);
                    prop_assert_eq!(
                        judged,
                        Regression::LaterCommit,
                        "{:?} against {:?}",
                        c,
                        copy
                    );
                }
            }
            Ok(())
        }

        /// A Redis copy is served only if L1, offered it in the read's generation, does not
        /// know a newer version: so never one older than a message L1 was told meanwhile.
        fn redis_hit(&mut self, copy: Cached) -> Result<(), TestCaseError> {
            if !redis_may_answer(&copy, None, false) {
                return Ok(());
            }
            let offer = self
                .l1
                .offer_in(self.l1.generation(), &self.ck, copy.clone(), TTL);
            let refused = match offer {
                Offer::Refused(rank) => Some(rank),
                Offer::Applied => None,
            };
            if !l1_knows_newer(copy.version, refused) {
                let told = self.told.unwrap_or(Version::NONE);
                prop_assert!(copy.version >= told, "served {copy:?} after {told}");
            }
            Ok(())
        }

        /// L1 never holds a copy older than a message it was told since it was emptied.
        fn check(&self) -> Result<(), TestCaseError> {
            let held = self.l1.get(&self.ck);
            if let Some(told) = self.told {
                let held = held.as_ref().map(|h| h.version);
                prop_assert!(held >= Some(told), "held {held:?}, told {told}");
            }
            if let Some(held) = held.filter(Cached::is_servable) {
                prop_assert!(
                    held.version <= self.truth.version,
                    "a version never committed"
                );
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any interleaving leaves L1, once every message and fill has arrived, holding
        /// nothing, a tombstone (a miss), or the last commit: never a copy older than it, and
        /// the last commit itself whenever its message arrived since L1 was last emptied.
        #[test]
        fn reads_writes_and_messages_in_any_interleaving_leave_l1_at_the_last_commit_or_empty(
            steps in proptest::collection::vec(step(), 0..40),
        ) {
            let mut race = Race::new();
            for step in steps {
                race.run(step)?;
            }
            while !race.writes.is_empty() {
                race.run(Step::Settle(0))?;
            }
            for feed in [false, true] {
                while !race.queued[usize::from(feed)].is_empty() {
                    race.run(Step::Deliver(feed))?;
                }
            }
            while !race.reads.is_empty() {
                race.run(Step::Land(0))?;
            }
            let held = race.l1.get(&race.ck);
            if race.told == Some(race.truth.version) {
                // The last commit's message arrived since the last clear.
                prop_assert_eq!(held.as_ref().map(|h| h.version), Some(race.truth.version));
            }
            match held {
                None => prop_assert!(race.told.is_none(), "a message told since the last clear"),
                Some(held) if held.is_servable() => prop_assert_eq!(held, race.truth.clone()),
                // A message older than the truth, arrived after a clear: only a miss.
                Some(tombstone) => prop_assert!(tombstone.version <= race.truth.version),
            }
        }
    }
}
