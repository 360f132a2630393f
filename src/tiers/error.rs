//! Why the tiers' guards and replays fail: the errors `tiers` hands its callers besides
//! `DbError` and `L2Error`. A leaf: the rooms' signatures name these, and it imports nothing
//! of `tiers`.

use crate::db::DbError;
use crate::l2::L2Error;
use crate::resource::NotReady;

/// Why a guard against a tier that went back in time (`Guards::secure_redis`,
/// `Guards::secure_postgres`, `Guards::postgres_went_back`) did not finish: the tier is not
/// trusted yet, and the caller retries.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Redis(#[from] L2Error),
    #[error(transparent)]
    Postgres(#[from] DbError),
    /// With Sentinel, the node answering is not the master the Sentinels name: a demoted
    /// master keeps its `run_id`, and would pass as the same incarnation.
    #[error("redis node {node} is not a master the Sentinels name (role {role:?})")]
    NotMaster { node: String, role: String },
    #[error("raising {resource}'s generation failed")]
    RaiseGeneration {
        resource: String,
        #[source]
        source: L2Error,
    },
    #[error("reading generations failed")]
    Generations(#[source] L2Error),
    #[error(transparent)]
    NotReady(#[from] NotReady),
}

/// Why a replay of the changes log failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("reading the changes log failed")]
    Postgres(#[from] DbError),
    #[error("applying the changes log to redis failed")]
    Redis(#[from] L2Error),
}
