//! Why an instance could not start, or did not become ready in time: the errors of start-up's
//! boundary. Knows nothing of how they are reported.

use crate::db::DbError;
use crate::l2::L2Error;
use crate::resource::NotReady;

/// Why the instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address (TCP, or the Unix socket's path) cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The Postgres pool cannot be built from `postgres.*` (its TLS settings, its URL).
    #[error("cannot set up postgres")]
    Postgres(#[source] DbError),
    /// The Redis client cannot be built from `redis.*`.
    #[error("cannot set up redis")]
    Redis(#[source] L2Error),
}

/// Why a started instance was not ready in time ([`super::App::ready`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// The catalog is not loaded yet, with the schema task's last reason.
    #[error(transparent)]
    Schema(#[from] NotReady),
    #[error("a feed is not up yet")]
    FeedDown,
    #[error("redis' incarnation is not checked yet")]
    RedisUnchecked,
}
