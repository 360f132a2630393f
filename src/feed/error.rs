//! Why a feed's session ended: the one error of the feeds' boundary ([`super::driver`]'s
//! `Source::session`), logged by the driver and shown by `/readyz` while the feed is down.
//! Knows nothing of how a feed recovers.

use std::time::Duration;

use crate::db::DbError;
use crate::l2::L2Error;
use crate::resource::NotReady;
use crate::tiers::{GuardError, ReplayError};

/// Why a feed's session ended (the feed is then down, and the driver backs off and tries a
/// new session).
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The feed's own Postgres connection cannot be opened.
    #[error("cannot connect to postgres")]
    Connect(#[source] DbError),
    /// A statement on the feed's own connection failed (`what`: which).
    #[error("{what} failed")]
    Postgres {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement or command on the feed's connection took longer than the lease.
    #[error("{what} timed out")]
    Timeout { what: &'static str },
    /// Redis failed a command the feed needs (`what`: which).
    #[error("{what} failed")]
    Redis {
        what: &'static str,
        #[source]
        source: L2Error,
    },
    /// What proves delivery (`what`: a heartbeat, a poll) did not come within the lease.
    #[error("{what} within {lease:?}")]
    Silent { what: &'static str, lease: Duration },
    /// The connection or subscription the feed reads (`0`: which) ended.
    #[error("{0} closed")]
    Closed(&'static str),
    /// Another instance migrated the schema to another source: this one would prove
    /// nothing by going on.
    #[error(
        "the schema was migrated to postgres_source {0:?}; restart this instance with the same \
         source"
    )]
    SourceChanged(Option<String>),
    /// The tier the feed repairs went back in time and could not be made safe yet.
    #[error(transparent)]
    Guard(#[from] GuardError),
    /// Redis could not be repaired from the changes log.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The catalog is not loaded yet.
    #[error(transparent)]
    NotReady(#[from] NotReady),
}
