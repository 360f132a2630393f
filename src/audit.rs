//! The consistency auditor's vocabulary: which reads are sampled, and how a sample is judged.
//! After Meta's Polaris ("Cache made consistent", 2022): a reader that measures, in
//! production, the number syncar is judged by, by re-checking what a cache served against
//! the source of truth. The check itself (it reads Postgres and the tiers) is
//! `Tiers::audit`; the task that paces checks is in `app`. Knows nothing about stores.
//!
//! # What counts as stale
//! A copy served at `t` is stale when Postgres held a newer version at the check (shortly
//! after `t`) and the tier that served it still would serve the older copy a lease after
//! the check: the newer version had committed before the check, so the feeds had had a whole
//! lease to evict the copy. A change still propagating is not stale, by the product's
//! own bound.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::model::{Cached, State, Tier, Version};
use crate::resource::DocRef;
use crate::telemetry::{AUDIT_CHECKS, AUDIT_STALE};

/// One read answered from a cache, to be re-checked.
#[derive(Clone, Debug)]
pub struct Sample {
    pub doc: DocRef,
    /// The tier that answered (`l1` or `l2`).
    pub tier: Tier,
    /// The copy it answered with.
    pub served: Cached,
    pub served_at: Instant,
}

/// Where sampled reads go: decided on the read path, so it costs one random draw per read.
#[derive(Debug)]
pub struct AuditTap {
    ratio: f64,
    tx: mpsc::Sender<Sample>,
}

/// Samples waiting for a check at most; beyond, new ones are dropped (the auditor must never
/// slow a read, nor grow without bound).
const QUEUE: usize = 256;

impl AuditTap {
    /// A tap sampling `ratio` of the reads offered to it, and the receiving end for the
    /// auditor task. Registers the auditor's metrics at 0, so dashboards show them from the
    /// start.
    pub fn new(ratio: f64) -> (AuditTap, mpsc::Receiver<Sample>) {
        metrics::counter!(AUDIT_CHECKS).increment(0);
        for tier in [Tier::L1, Tier::L2] {
            metrics::counter!(AUDIT_STALE, "tier" => tier.as_str()).increment(0);
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        (AuditTap { ratio, tx }, rx)
    }

    /// Samples this read with probability `ratio`; `make` runs only for a sampled read.
    pub fn offer(&self, make: impl FnOnce() -> Sample) {
        if self.ratio > 0.0 && fastrand::f64() < self.ratio {
            let _ = self.tx.try_send(make());
        }
    }
}

/// What a check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Postgres holds what was served.
    Consistent,
    /// Postgres holds something newer: look again at the tier a lease later. `Some(v)`: that
    /// version; `None`: the row is gone (a delete, whose version Postgres does not keep).
    Newer(Option<Version>),
    /// The cache served a version Postgres does not have (it went back in time, or the row
    /// was re-inserted below it).
    Ahead(Version),
}

/// Judges what was `served` against what Postgres holds now (`postgres`: the row's version,
/// `None` when absent).
pub fn judge(served: &Cached, postgres: Option<Version>) -> Verdict {
    match (&served.state, postgres) {
        (State::Value(_), Some(v)) if v == served.version => Verdict::Consistent,
        (State::Value(_), Some(v)) if v < served.version => Verdict::Ahead(served.version),
        (State::Value(_), Some(v)) => Verdict::Newer(Some(v)),
        (State::Value(_), None) => Verdict::Newer(None),
        (_, None) => Verdict::Consistent,
        (_, Some(v)) if v > served.version => Verdict::Newer(Some(v)),
        (_, Some(_)) => Verdict::Consistent,
    }
}

/// Whether `held`, what the tier would serve a lease after the check, is still older than
/// what Postgres held at the check (`newer`, from [`Verdict::Newer`]): stale.
pub fn still_stale(held: &Cached, served: &Cached, newer: Option<Version>) -> bool {
    if !held.is_servable() {
        return false;
    }
    match newer {
        Some(v) => held.version < v,
        // The row was deleted before the check: a value no newer than the one served is
        // still that row's old copy.
        None => matches!(held.state, State::Value(_)) && held.version <= served.version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn value(v: i64) -> Cached {
        Cached::value(Version(v), Bytes::from_static(b"1"))
    }

    #[test]
    fn a_sample_is_judged_against_postgres() {
        assert_eq!(judge(&value(5), Some(Version(5))), Verdict::Consistent);
        assert_eq!(
            judge(&value(5), Some(Version(7))),
            Verdict::Newer(Some(Version(7)))
        );
        assert_eq!(judge(&value(5), None), Verdict::Newer(None));
        assert_eq!(
            judge(&value(5), Some(Version(3))),
            Verdict::Ahead(Version(5))
        );
        let gone = Cached::absent(Version(6));
        assert_eq!(judge(&gone, None), Verdict::Consistent);
        assert_eq!(judge(&gone, Some(Version(4))), Verdict::Consistent);
        assert_eq!(
            judge(&gone, Some(Version(9))),
            Verdict::Newer(Some(Version(9)))
        );
    }

    /// A row not written since syncar was installed reads as version 0 (`coalesce`): its copy
    /// is consistent while the row is unwritten, stale once a write stamps it, and a delete
    /// (which takes a fresh version) or its absence is judged as for any other row.
    #[test]
    fn a_row_at_version_0_is_judged_like_any_other() {
        assert_eq!(judge(&value(0), Some(Version(0))), Verdict::Consistent);
        assert_eq!(
            judge(&value(0), Some(Version(12))),
            Verdict::Newer(Some(Version(12)))
        );
        assert_eq!(judge(&value(0), None), Verdict::Newer(None));
        assert!(still_stale(&value(0), &value(0), Some(Version(12))));
        assert!(!still_stale(&value(12), &value(0), Some(Version(12))));
        assert!(still_stale(&value(0), &value(0), None), "deleted since");
    }

    #[test]
    fn only_a_copy_still_served_past_the_lease_is_stale() {
        let served = value(5);
        assert!(still_stale(&value(5), &served, Some(Version(7))));
        assert!(!still_stale(&value(7), &served, Some(Version(7))));
        assert!(!still_stale(
            &Cached::invalidated(Version(7)),
            &served,
            Some(Version(7))
        ));
        assert!(still_stale(&value(5), &served, None));
        assert!(!still_stale(&value(8), &served, None), "re-inserted since");
        assert!(!still_stale(&Cached::absent(Version(6)), &served, None));
    }
}
