//! How a client's write commits: [`Commit`], and whether Postgres waits for the relay as a
//! synchronous standby before it says a strong write is committed ([`relay_waited_for`]).
//! Sets up the write's transaction; the write itself is `Db`'s.

use super::error::{classify, DbError};

/// How a client's write commits: whether it waits for the relay as a synchronous standby,
/// which confirms a position only once every live instance has applied it ("committed
/// means evicted", ARCHITECTURE "Synchronous mode"). See Postgres' `synchronous_commit` in
/// "Write Ahead Log" and "Synchronous Replication".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Commit {
    /// The session's `synchronous_commit`: the server's, the database's or the role's
    /// setting (`ALTER ROLE syncar SET synchronous_commit = ...`).
    #[default]
    AsConfigured,
    /// `synchronous_commit = on` for the write's transaction, once Postgres says, in the
    /// same transaction, that the relay streaming from `slot` is a synchronous standby
    /// (see [`relay_waited_for`]); else the transaction is rolled back with
    /// [`DbError::NotSynchronous`].
    Synchronous {
        /// The `wal` source's replication slot, whose walsender is the relay's.
        slot: String,
        /// The relay this instance heard last said it was a synchronous standby (its
        /// heartbeat's `sync`): counts only while no relay streams (one is being replaced).
        heard_synchronous: bool,
    },
}

/// Why a commit with `synchronous_commit = on` would not wait for the relay (see
/// [`relay_waited_for`]), said for the client (503 `not_synchronous`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotSynchronous {
    /// The relay streams, and Postgres counts it `async`, `potential` or `quorum` (another
    /// standby's confirmation may be enough).
    #[error(
        "consistency=strong needs the relay to be a synchronous standby, and Postgres counts \
         it {sync_state}: {name_it}",
        name_it = NAME_IT
    )]
    Counted {
        /// Its `pg_stat_replication.sync_state`.
        sync_state: String,
    },
    /// The relay streams, and this role cannot see its `sync_state`.
    #[error(
        "consistency=strong: this role cannot see the relay's sync_state in \
         pg_stat_replication; grant it pg_read_all_stats, or run the relay as this role"
    )]
    SyncStateHidden,
    /// No relay streams now, and the last one heard was not a synchronous standby (or none
    /// was heard yet).
    #[error(
        "consistency=strong: no relay streams now, and the last one heard was not a \
         synchronous standby (or none was heard yet): {name_it}",
        name_it = NAME_IT
    )]
    NoneHeard,
}

/// Whether a commit with `synchronous_commit = on` waits for the relay, from its walsender's
/// `state` and `sync_state` in `pg_stat_replication` (both `None`: no relay streams from the
/// slot now):
/// - streaming and `sync`: Postgres waits for its confirmation;
/// - streaming and anything else (`async`, `potential`, `quorum`: another standby's
///   confirmation may be enough): it does not; the error says what to change;
/// - no relay streaming (one is being replaced, or catching up): Postgres holds a commit
///   until enough synchronous standbys confirm it, so it waits for the next relay, if the
///   last one heard was synchronous (`heard_synchronous`);
/// - streaming without a visible `sync_state`: the role cannot see it (it needs
///   `pg_read_all_stats`, or to be the relay's role).
///
/// # Errors
/// Why the commit would not wait for the relay, for the client (503 `not_synchronous`).
pub fn relay_waited_for(
    state: Option<&str>,
    sync_state: Option<&str>,
    heard_synchronous: bool,
) -> Result<(), NotSynchronous> {
    match (state, sync_state) {
        (Some("streaming"), Some("sync")) => Ok(()),
        (Some("streaming"), Some(other)) => Err(NotSynchronous::Counted {
            sync_state: other.to_string(),
        }),
        (Some("streaming"), None) => Err(NotSynchronous::SyncStateHidden),
        _ if heard_synchronous => Ok(()),
        _ => Err(NotSynchronous::NoneHeard),
    }
}

/// What to change so that Postgres waits for the relay, in every [`NotSynchronous`].
const NAME_IT: &str = "name the relay in synchronous_standby_names (application_name \
                       syncar-relay, e.g. '\"syncar-relay\"'); see the README's \
                       \"Committed means evicted\"";

/// Sets `synchronous_commit = on` for the transaction and reads the relay's walsender:
/// the slot's active walsender in `pg_stat_replication`, or none.
const CHECK_SQL: &str = "SELECT set_config('synchronous_commit', 'on', true), \
                                r.state, r.sync_state \
                         FROM (SELECT 1) AS one LEFT JOIN (pg_replication_slots s \
                               JOIN pg_stat_replication r ON r.pid = s.active_pid) \
                           ON s.slot_name = $1";

impl Commit {
    /// Prepares the transaction for this choice: [`Commit::prepare`], then
    /// [`Commit::check`] (one round trip once the statement is cached on the connection).
    ///
    /// # Errors
    /// A classified [`DbError`]; [`DbError::NotSynchronous`] when the commit would not wait
    /// for the relay.
    pub(super) async fn apply(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<(), DbError> {
        let stmt = self.prepare(tx).await?;
        self.check(tx, stmt.as_ref()).await
    }

    /// The statement [`Commit::check`] runs, for [`Commit::Synchronous`]: prepared once per
    /// connection (then cached, no round trip).
    ///
    /// # Errors
    /// A classified [`DbError`].
    pub(super) async fn prepare(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<Option<tokio_postgres::Statement>, DbError> {
        match self {
            Commit::AsConfigured => Ok(None),
            Commit::Synchronous { .. } => {
                Ok(Some(tx.prepare_cached(CHECK_SQL).await.map_err(classify)?))
            }
        }
    }

    /// For [`Commit::Synchronous`] (`stmt` from [`Commit::prepare`]): sets
    /// `synchronous_commit` for the transaction and checks that Postgres waits for the relay
    /// ([`relay_waited_for`]); nothing for [`Commit::AsConfigured`]. Its request leaves when
    /// the future is first polled: joined (`tokio::join!`, which polls in order) with the
    /// write's statements, it goes first, in the same round trip. It only decides whether the
    /// caller commits, so the write may run before the answer is read.
    ///
    /// # Errors
    /// A classified [`DbError`]; [`DbError::NotSynchronous`] when the commit would not wait
    /// for the relay: roll back.
    pub(super) async fn check(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        stmt: Option<&tokio_postgres::Statement>,
    ) -> Result<(), DbError> {
        let (
            Commit::Synchronous {
                slot,
                heard_synchronous,
            },
            Some(stmt),
        ) = (self, stmt)
        else {
            return Ok(());
        };
        let row = tx.query_one(stmt, &[slot]).await.map_err(classify)?;
        relay_waited_for(
            row.get::<_, Option<String>>(1).as_deref(),
            row.get::<_, Option<String>>(2).as_deref(),
            *heard_synchronous,
        )
        .map_err(|e| DbError::NotSynchronous(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::relay_waited_for;

    #[test]
    fn a_strong_write_commits_only_where_postgres_waits_for_the_relay() {
        let streaming = Some("streaming");
        assert!(relay_waited_for(streaming, Some("sync"), false).is_ok());
        for state in ["async", "potential", "quorum"] {
            let e = relay_waited_for(streaming, Some(state), true)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(state) && e.contains("synchronous_standby_names"),
                "{state}: {e}"
            );
        }
        let e = relay_waited_for(streaming, None, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pg_read_all_stats"), "{e}");
        // No relay streaming: Postgres holds the commit for the next one only if the last
        // was synchronous.
        for state in [None, Some("catchup"), Some("startup")] {
            assert!(relay_waited_for(state, None, true).is_ok(), "{state:?}");
            assert!(relay_waited_for(state, None, false).is_err(), "{state:?}");
        }
    }
}
