//! The decisions of the read, write and apply paths, as pure functions over plain values:
//! versions, copies, what a tier answered. The rooms of `Tiers` do the IO and ask these what
//! it means. A leaf: imports only `model` and `coherence`, touches no tier.
//!
//! Whether a copy may replace another is [`Cached::supersedes`] (in `model`), which L1's
//! `offer` and Redis' scripts both apply; what is here decides what is offered, what an
//! answer or a refusal means, and what follows.

use crate::coherence::{Message, Op};
use crate::model::{Cached, Rank, State, Version};

// ---- Applying the feeds' messages (ARCHITECTURE.md, "The change stream") ----

/// What a message leaves in a tier: a tombstone for a put (some version at least this one
/// exists; the tier does not hold it), the absence for a delete (the message says all there
/// is to know); `None` for a resource-wide flush.
pub(crate) fn invalidation(message: &Message) -> Option<Cached> {
    let version = Version(message.version);
    match message.op {
        Op::Put => Some(Cached::invalidated(version)),
        Op::Delete => Some(Cached::absent(version)),
        Op::Flush => None,
    }
}

/// What applying one feed's message does to this instance ([`effect`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect<'m> {
    /// A resource-wide flush of a configured resource: raise its generation; empty L1 only
    /// when the resource is served (L1 holds nothing of a left-out one, and a left-out table
    /// flushed at each of its writes must not empty L1 for the others).
    Flush { clear_l1: bool },
    /// `copy` offered for `key`, to L1 (and to Redis, from the Postgres feed).
    Key { copy: Cached, key: &'m str },
    /// Not a resource this instance serves (nor, for a flush, one it knows): nothing, not
    /// even its version noted.
    Ignore,
    /// A served resource's message that names no key and is no flush: its version is
    /// noted, nothing else.
    Seen,
}

/// What `message` does here, given whether its resource is configured (`known`, served or
/// left out) and `served`. A flush is judged first: a left-out resource's copies in Redis
/// must not come back when it is served again.
pub(crate) fn effect(message: &Message, known: bool, served: bool) -> Effect<'_> {
    match (invalidation(message), &message.key) {
        (None, _) if known => Effect::Flush { clear_l1: served },
        _ if !served => Effect::Ignore,
        (Some(copy), Some(key)) => Effect::Key { copy, key },
        _ => Effect::Seen,
    }
}

/// Whether a message taught this instance something new, so watchers hear of it: as L1
/// judged it (`l1`: whether its offer applied; `None` without an L1), else as Redis did
/// (`redis`: whether its offer applied; `None` when Redis was not offered it or failed).
/// Without either, nothing tells a change from its second delivery, so it is news.
pub(crate) fn news(l1: Option<bool>, redis: Option<bool>) -> bool {
    l1.or(redis).unwrap_or(true)
}

// ---- The read path (ARCHITECTURE.md, "Read path") ----

/// Whether `copy` is as new as `min_version=N` asks (step 0: copies older than N are skipped
/// at every step).
pub(crate) fn fresh_enough(copy: &Cached, min_version: Option<Version>) -> bool {
    min_version.is_none_or(|min| copy.version >= min)
}

/// Whether a copy a load brought answers the read that waited for it (a load others may
/// share): as new as asked (`min_version`), and no older than the tombstone L1 holds for
/// the key (`invalidated`: a change this instance applied, so committed). A load that
/// started after the eviction but before the commit was visible read the row before it:
/// with the relay a synchronous standby, an instance applies a change while Postgres still
/// holds the commit back (its transaction stays invisible until the standby confirms,
/// `RecordTransactionCommit` waits before `ProcArrayEndTransaction`), and a read that began
/// after the commit returned, joining that load, answered the older row (bench-stale
/// counted about one such read per million). Such a read asks Postgres again.
pub(crate) fn load_answers(
    copy: &Cached,
    min_version: Option<Version>,
    invalidated: Option<Version>,
) -> bool {
    fresh_enough(copy, min_version.max(invalidated))
}

/// Whether L1's `copy` answers a read (step 1): a value or an absence, as new as asked; a
/// tombstone is a miss.
pub(crate) fn l1_answers(copy: &Cached, min_version: Option<Version>) -> bool {
    copy.is_servable() && fresh_enough(copy, min_version)
}

/// Whether Redis may hold copies of a table's old shape: the catalog already has its new
/// shape (`shape_epoch`) and the flush that retires the old one's copies has not raised the
/// resource's `generation` to it yet. Then Redis is not asked: the new ETag must not name an
/// old shape's copy.
pub(crate) fn shape_ahead(shape_epoch: i64, generation: i64) -> bool {
    shape_epoch > generation
}

/// Whether Redis' `copy` may be offered to L1 and answer (step 3, before L1 has its say):
/// servable, as new as asked, and no committed write of the key newer than it still waits
/// to reach Redis (`repair_above`, see `Repairs::pending_above`).
pub(crate) fn redis_may_answer(
    copy: &Cached,
    min_version: Option<Version>,
    repair_above: bool,
) -> bool {
    !repair_above && copy.is_servable() && fresh_enough(copy, min_version)
}

/// Whether L1, refusing Redis' copy at `offered` with the rank it holds (`refused`; `None`
/// when it took the copy or was not offered it), knows Redis is behind (step 3: a tombstone
/// or a write that landed meanwhile). Then the read goes to Postgres. A refusal at the
/// copy's own version (L1 holds it already, or the copy was loaded before L1 was cleared)
/// says nothing against the copy.
pub(crate) fn l1_knows_newer(offered: Version, refused: Option<Rank>) -> bool {
    refused.is_some_and(|known| known.version > offered)
}

// ---- The write path (ARCHITECTURE.md, "Write path", "Tiers that come back from the past") ----

/// What a tier held that refused a just-committed copy ([`conflict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Conflict {
    /// A newer version.
    Newer(Version),
    /// The same version with other content: the sequence handed it out twice.
    Collision(Version),
}

impl Conflict {
    pub(crate) fn version(self) -> Version {
        match self {
            Conflict::Newer(v) | Conflict::Collision(v) => v,
        }
    }
}

/// What the tiers that refused `written` hold against it, the highest version first: a newer
/// version (a later commit that got there first, or one Postgres never reached), or the
/// same version servable with other content (handed out twice). A tombstone of the same
/// version, or an equal copy, is no conflict; nor is anything older.
pub(crate) fn conflict(
    written: &Cached,
    held: impl IntoIterator<Item = Cached>,
) -> Option<Conflict> {
    held.into_iter()
        .filter_map(|h| {
            if h.version > written.version {
                Some(Conflict::Newer(h.version))
            } else if h.version == written.version && h.is_servable() && h.state != written.state {
                Some(Conflict::Collision(h.version))
            } else {
                None
            }
        })
        .max_by_key(|c| c.version())
}

/// What a [`Conflict`] calls for, once Postgres' sequence and the key's row are known
/// ("One write below a cached version").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Regression {
    /// A later commit got to the tiers first: nothing wrong.
    LaterCommit,
    /// The row is below the cached version (which never committed for it, or a delete's
    /// version outran a re-insert's): the key gets a fresh version.
    Restamp,
    /// The sequence is behind the cached version, or handed a version out twice: Postgres
    /// went back; every resource is reset, then the key gets a fresh version.
    ResetThenRestamp,
}

/// What a write refused for `conflict` calls for, given the last version Postgres' sequence
/// handed out (`sequence`) and the key's row version (`row`; `None`: no row).
pub(crate) fn regression(
    conflict: Conflict,
    sequence: Version,
    row: Option<Version>,
) -> Regression {
    let seen = conflict.version();
    let sequence_behind = sequence < seen || matches!(conflict, Conflict::Collision(_));
    let row_behind = row.is_some_and(|v| v < seen);
    match (sequence_behind, row_behind) {
        (true, _) => Regression::ResetThenRestamp,
        (false, true) => Regression::Restamp,
        (false, false) => Regression::LaterCommit,
    }
}

/// What the repair queue keeps for a committed `copy` Redis did not take: a tombstone of a
/// value's version (light, and safe to apply late: Redis refuses it under anything newer),
/// the absence itself for a delete.
pub(crate) fn repair_marker(copy: &Cached) -> Cached {
    match copy.state {
        State::Value(_) => Cached::invalidated(copy.version),
        _ => copy.clone(),
    }
}

/// The operation a copy announces: a put for a value, a delete otherwise.
pub(crate) fn op_of(copy: &Cached) -> Op {
    if copy.doc().is_some() {
        Op::Put
    } else {
        Op::Delete
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const VERSIONS: [i64; 4] = [0, 1, 2, 3];

    /// Every copy of one key over a small domain: each version, as two different values, an
    /// absence and a tombstone.
    fn copies() -> Vec<Cached> {
        VERSIONS
            .iter()
            .flat_map(|&v| {
                let v = Version(v);
                [
                    Cached::value(v, Bytes::from_static(b"\"a\"")),
                    Cached::value(v, Bytes::from_static(b"\"b\"")),
                    Cached::absent(v),
                    Cached::invalidated(v),
                ]
            })
            .collect()
    }

    fn min_versions() -> Vec<Option<Version>> {
        std::iter::once(None)
            .chain((0..=4).map(|v| Some(Version(v))))
            .collect()
    }

    fn message(op: Op, key: Option<&str>, version: i64) -> Message {
        Message {
            resource: "users".into(),
            key: key.map(Into::into),
            version,
            op,
            ts_us: None,
            instance: None,
        }
    }

    #[test]
    fn a_put_leaves_a_tombstone_a_delete_the_absence_and_a_flush_nothing() {
        for v in VERSIONS {
            let put = invalidation(&message(Op::Put, Some("k"), v)).unwrap();
            assert_eq!(put, Cached::invalidated(Version(v)));
            assert!(!put.is_servable(), "a put's tombstone never answers");
            let delete = invalidation(&message(Op::Delete, Some("k"), v)).unwrap();
            assert_eq!(delete, Cached::absent(Version(v)));
            assert!(delete.is_servable(), "a delete says all there is to know");
            assert_eq!(invalidation(&message(Op::Flush, None, v)), None);
            // At its own version the absence replaces the put's tombstone, never the reverse.
            assert!(delete.supersedes(&put) && !put.supersedes(&delete));
        }
    }

    #[test]
    fn what_a_message_does_by_op_key_and_whether_its_resource_is_known_or_served() {
        for op in [Op::Put, Op::Delete, Op::Flush] {
            for key in [None, Some("k")] {
                for known in [false, true] {
                    for served in [false, true] {
                        let m = message(op, key, 7);
                        let got = effect(&m, known, served);
                        let want = match (op, key) {
                            (Op::Flush, _) if known => Effect::Flush { clear_l1: served },
                            _ if !served => Effect::Ignore,
                            (Op::Flush, _) | (_, None) => Effect::Seen,
                            (_, Some(k)) => Effect::Key {
                                copy: invalidation(&m).unwrap(),
                                key: k,
                            },
                        };
                        assert_eq!(got, want, "{op:?} {key:?} known={known} served={served}");
                    }
                }
            }
        }
        // The cases the feeds meet, by name.
        let flush = message(Op::Flush, None, 7);
        assert_eq!(
            effect(&flush, true, false),
            Effect::Flush { clear_l1: false }
        );
        assert_eq!(effect(&flush, false, false), Effect::Ignore);
        let put = message(Op::Put, Some("k"), 7);
        assert_eq!(effect(&put, true, false), Effect::Ignore, "left out");
        assert!(matches!(
            effect(&put, true, true),
            Effect::Key { key: "k", .. }
        ));
    }

    #[test]
    fn a_message_is_news_as_l1_judges_it_else_as_redis_does_else_always() {
        let cases = [
            (None, None, true),
            (None, Some(false), false),
            (None, Some(true), true),
            (Some(false), None, false),
            (Some(false), Some(false), false),
            (Some(false), Some(true), false),
            (Some(true), None, true),
            (Some(true), Some(false), true),
            (Some(true), Some(true), true),
        ];
        for (l1, redis, want) in cases {
            assert_eq!(news(l1, redis), want, "l1={l1:?} redis={redis:?}");
        }
    }

    #[test]
    fn a_loaded_copy_older_than_a_change_this_instance_applied_is_read_again() {
        for copy in copies() {
            for min in min_versions() {
                for invalidated in min_versions() {
                    let answers = [min, invalidated]
                        .into_iter()
                        .flatten()
                        .all(|floor| copy.version >= floor);
                    assert_eq!(
                        load_answers(&copy, min, invalidated),
                        answers,
                        "{copy:?} min={min:?} invalidated={invalidated:?}"
                    );
                }
            }
        }
        // The synchronous race: L1 holds the tombstone of version 3 (applied while Postgres
        // still hid its commit); a load started then brought version 2.
        let older = Cached::value(Version(2), Bytes::from_static(b"\"a\""));
        assert!(!load_answers(&older, None, Some(Version(3))));
        assert!(
            load_answers(&older, None, Some(Version(2))),
            "the same change"
        );
        assert!(load_answers(&older, None, None));
    }

    #[test]
    fn reads_skip_tombstones_and_copies_older_than_min_version_at_every_tier() {
        for copy in copies() {
            for min in min_versions() {
                let fresh = min.is_none_or(|m| copy.version.0 >= m.0);
                assert_eq!(fresh_enough(&copy, min), fresh, "{copy:?} {min:?}");
                let servable = !matches!(copy.state, State::Invalidated);
                assert_eq!(
                    l1_answers(&copy, min),
                    servable && fresh,
                    "{copy:?} {min:?}"
                );
                for repair in [false, true] {
                    assert_eq!(
                        redis_may_answer(&copy, min, repair),
                        servable && fresh && !repair,
                        "{copy:?} {min:?} repair={repair}"
                    );
                }
            }
        }
        // A cached absence answers like a value: it is what Postgres said.
        assert!(l1_answers(&Cached::absent(Version::NONE), None));
        assert!(!l1_answers(
            &Cached::absent(Version::NONE),
            Some(Version(1))
        ));
    }

    #[test]
    fn redis_is_not_asked_while_the_catalog_has_a_shape_its_generation_does_not() {
        for epoch in 0..4 {
            for generation in 0..4 {
                assert_eq!(shape_ahead(epoch, generation), epoch > generation);
            }
        }
    }

    #[test]
    fn l1_knows_redis_is_behind_only_when_it_refuses_with_a_newer_version() {
        for offered in VERSIONS.map(Version) {
            assert!(
                !l1_knows_newer(offered, None),
                "taken, or L1 not offered it"
            );
            for held in copies() {
                let behind = l1_knows_newer(offered, Some(held.rank()));
                assert_eq!(behind, held.version > offered, "{offered} {held:?}");
            }
        }
        // The fill/invalidate race: Redis holds 41, the invalidation of 42 reached L1 first.
        assert!(l1_knows_newer(
            Version(41),
            Some(Cached::invalidated(Version(42)).rank())
        ));
        // L1 holds 41 already (or was cleared since the read began): serve Redis' 41.
        let v41 = Cached::value(Version(41), Bytes::from_static(b"1"));
        assert!(!l1_knows_newer(Version(41), Some(v41.rank())));
    }

    /// Every list of up to three copies from [`copies`].
    fn helds() -> Vec<Vec<Cached>> {
        let all = copies();
        let mut lists = vec![vec![]];
        for _ in 0..3 {
            let longer: Vec<Vec<Cached>> = lists
                .iter()
                .filter(|l| l.len() == lists.last().map_or(0, Vec::len))
                .flat_map(|l| {
                    all.iter().map(move |c| {
                        let mut l = l.clone();
                        l.push(c.clone());
                        l
                    })
                })
                .collect();
            lists.extend(longer);
        }
        lists
    }

    #[test]
    fn a_refused_write_conflicts_with_the_highest_newer_or_colliding_copy_held() {
        let helds = helds();
        assert_eq!(helds.len(), 1 + 16 + 16 * 16 + 16 * 16 * 16);
        for written in copies().into_iter().filter(Cached::is_servable) {
            for held in &helds {
                let got = conflict(&written, held.iter().cloned());
                let against = |h: &&Cached| {
                    h.version > written.version
                        || (h.version == written.version
                            && h.is_servable()
                            && h.state != written.state)
                };
                let top = held.iter().filter(against).map(|h| h.version).max();
                assert_eq!(got.map(Conflict::version), top, "{written:?} {held:?}");
                if let Some(c) = got {
                    let want = if c.version() > written.version {
                        Conflict::Newer(c.version())
                    } else {
                        Conflict::Collision(c.version())
                    };
                    assert_eq!(c, want, "{written:?} {held:?}");
                }
                let mut reversed = held.clone();
                reversed.reverse();
                assert_eq!(conflict(&written, reversed), got, "order of the tiers");
            }
        }
        // By name: a tombstone of the write's own version is the write's own invalidation.
        let v2 = Cached::value(Version(2), Bytes::from_static(b"\"a\""));
        assert_eq!(conflict(&v2, [Cached::invalidated(Version(2))]), None);
        assert_eq!(
            conflict(&v2, [v2.clone()]),
            None,
            "the same copy, delivered twice"
        );
        let other = Cached::value(Version(2), Bytes::from_static(b"\"b\""));
        assert_eq!(
            conflict(&v2, [other]),
            Some(Conflict::Collision(Version(2)))
        );
        assert_eq!(
            conflict(&v2, [Cached::invalidated(Version(3))]),
            Some(Conflict::Newer(Version(3)))
        );
    }

    #[test]
    fn a_conflict_is_a_later_commit_unless_the_sequence_or_the_row_is_behind_it() {
        let rows = std::iter::once(None).chain((0..=4).map(|v| Some(Version(v))));
        for row in rows {
            for sequence in (0..=4).map(Version) {
                for v in (0..=4).map(Version) {
                    assert_eq!(
                        regression(Conflict::Collision(v), sequence, row),
                        Regression::ResetThenRestamp,
                        "a version handed out twice: the sequence went back"
                    );
                    let want = if sequence < v {
                        Regression::ResetThenRestamp
                    } else if row.is_some_and(|r| r < v) {
                        Regression::Restamp
                    } else {
                        Regression::LaterCommit
                    };
                    assert_eq!(regression(Conflict::Newer(v), sequence, row), want);
                }
            }
        }
        // By name: a later commit (sequence and row at 5, the cache at 5), a restore (the
        // sequence at 3, a cache at 5), a delete outrunning a re-insert (the row at 4).
        let newer = Conflict::Newer(Version(5));
        assert_eq!(
            regression(newer, Version(5), Some(Version(5))),
            Regression::LaterCommit
        );
        assert_eq!(regression(newer, Version(5), None), Regression::LaterCommit);
        assert_eq!(
            regression(newer, Version(3), Some(Version(3))),
            Regression::ResetThenRestamp
        );
        assert_eq!(
            regression(newer, Version(9), Some(Version(4))),
            Regression::Restamp
        );
    }

    #[test]
    fn a_repair_marker_never_lands_where_its_write_would_not_and_carries_no_value() {
        for copy in copies() {
            let marker = repair_marker(&copy);
            assert_eq!(marker.version, copy.version);
            assert_eq!(marker.doc(), None);
            assert!(marker.rank() <= copy.rank());
            for held in copies() {
                if marker.supersedes(&held) {
                    assert!(copy.supersedes(&held), "{copy:?} over {held:?}");
                }
            }
            assert_eq!(op_of(&copy) == Op::Put, copy.doc().is_some());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// The messages of one key, delivered in any order and any number of times, leave a
        /// tier (which keeps a copy only when it supersedes the one held) at the highest
        /// version announced: an absence if a delete announced it, a tombstone otherwise.
        #[test]
        fn messages_in_any_order_leave_the_highest_version(
            announced in proptest::collection::vec((0i64..6, proptest::bool::ANY), 1..8),
            order in proptest::collection::vec(proptest::num::usize::ANY, 1..16),
        ) {
            let messages: Vec<Message> = announced
                .iter()
                .map(|&(v, delete)| message(if delete { Op::Delete } else { Op::Put }, Some("k"), v))
                .collect();
            let mut held: Option<Cached> = None;
            let mut delivered: Vec<&Message> = order.iter().map(|i| &messages[i % messages.len()]).collect();
            delivered.extend(&messages); // every message arrives at least once
            for m in delivered {
                let copy = invalidation(m).unwrap();
                if held.as_ref().is_none_or(|h| copy.supersedes(h)) {
                    held = Some(copy);
                }
            }
            let top = announced.iter().map(|&(v, _)| v).max().unwrap();
            let deleted = announced.iter().any(|&(v, d)| v == top && d);
            let held = held.unwrap();
            proptest::prop_assert_eq!(held.version, Version(top));
            proptest::prop_assert_eq!(held.is_servable(), deleted);
        }

        /// Which tier refused a write, and in which order, never changes the conflict.
        #[test]
        fn a_conflict_does_not_depend_on_the_order_of_the_tiers(
            written in 0i64..5,
            held in proptest::collection::vec((0i64..5, 0u8..4), 0..6),
            seed in proptest::num::usize::ANY,
        ) {
            let copy = |(v, kind): (i64, u8)| match kind {
                0 => Cached::value(Version(v), Bytes::from_static(b"\"a\"")),
                1 => Cached::value(Version(v), Bytes::from_static(b"\"b\"")),
                2 => Cached::absent(Version(v)),
                _ => Cached::invalidated(Version(v)),
            };
            let written = copy((written, 0));
            let held: Vec<Cached> = held.into_iter().map(copy).collect();
            let mut rotated = held.clone();
            if !rotated.is_empty() {
                let n = seed % rotated.len();
                rotated.rotate_left(n);
            }
            proptest::prop_assert_eq!(conflict(&written, held), conflict(&written, rotated));
        }
    }
}
