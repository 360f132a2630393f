//! What `Tiers` and the handles built from it share: the single-flight map of loads, the
//! high-water version, how long a copy lives in each tier, and the batch sizes of changes
//! applied at once. A leaf: imports nothing of `tiers` (so every room and handle may).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::jitter;
use crate::db::DbError;
use crate::model::{CacheKey, Cached, State, Tier, Version};
use crate::resource::Resource;
use crate::single_flight::SingleFlight;

/// Changes applied to the tiers at once (a replay, a poll's batch): their Redis calls share
/// one pipelined connection, and order does not matter since every tier takes only strictly
/// newer versions.
pub const APPLY_CONCURRENCY: usize = 64;

/// Keys per script call when the relay applies a batch to one Redis node
/// ([`crate::l2::L2::offer_many`]): large enough that a 100-row statement is one call, small
/// enough that one call holds Redis for about a millisecond at most.
pub const OFFER_CHUNK: usize = 256;

/// A servable copy and the tier that answered.
#[derive(Clone, Debug)]
pub struct ReadResult {
    pub cached: Cached,
    pub tier: Tier,
}

/// Loads in flight, one per key; a change to a key detaches its load (see
/// [`SingleFlight::forget`]).
pub(crate) type Flights = SingleFlight<CacheKey, Result<ReadResult, DbError>>;

/// The highest version this instance has seen anywhere (reads, writes, messages): a version
/// sequence behind it went back in time. Cheap to clone; every clone is the same mark.
#[derive(Clone, Debug, Default)]
pub(crate) struct HighWater(Arc<AtomicI64>);

impl HighWater {
    /// Notes a version seen in any tier or message; an implausible one is not noted
    /// ([`Version::IMPLAUSIBLE`]).
    pub(crate) fn saw(&self, version: Version) {
        if version.plausible() {
            self.0.fetch_max(version.0, Ordering::Relaxed);
        }
    }

    /// The highest version seen so far.
    pub(crate) fn get(&self) -> Version {
        Version(self.0.load(Ordering::Relaxed))
    }
}

/// How long a copy lives in L1. Values and cached absences are jittered; tombstones are not,
/// so none lives shorter than the configured `tombstone_ttl` the config check relies on.
pub(crate) fn l1_ttl(resource: &Resource, copy: &Cached) -> Duration {
    let t = &resource.ttl;
    match (&copy.state, copy.version) {
        (State::Value(_), _) => jitter(t.l1_ttl, t.ttl_jitter),
        (State::Absent, Version::NONE) => jitter(t.negative_ttl, t.ttl_jitter),
        _ => t.tombstone_ttl,
    }
}

/// How long a copy lives in Redis; see [`l1_ttl`].
pub(crate) fn l2_ttl(resource: &Resource, copy: &Cached) -> Duration {
    let t = &resource.ttl;
    match (&copy.state, copy.version) {
        (State::Value(_), _) => jitter(t.l2_ttl, t.ttl_jitter),
        (State::Absent, Version::NONE) => jitter(t.negative_ttl, t.ttl_jitter),
        _ => t.tombstone_ttl,
    }
}
