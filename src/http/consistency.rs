//! `consistency=strong` on a write (PUT, DELETE, a transaction), or `feeds.synchronous_writes`
//! for every write: the write returns only once every live instance has applied it, the
//! guarantee a plain-SQL writer gets from the relay as a synchronous standby ("committed
//! means evicted", ARCHITECTURE "Synchronous mode"). Its transaction commits with
//! `synchronous_commit = on`, after Postgres said in the same transaction that the relay is
//! a synchronous standby; else nothing is written and the client gets 503
//! `not_synchronous` saying what to change. `consistency=default` opts a write out of
//! `feeds.synchronous_writes`. The name follows Dapr's state API (`consistency: strong`).
//!
//! Only the `wal` source can give it: the `changes_log` and `notify` sources have no
//! acknowledgement from the instances that Postgres could wait for.

use super::error::ApiError;
use super::request::write_consistency;
use super::state::HttpState;
use crate::config::PostgresSource;
use crate::db::Commit;

/// How the write with this `query` commits.
///
/// # Errors
/// 400 for a malformed query; 503 `not_synchronous` when the write asks for
/// `consistency=strong` on a source that cannot give it; 503 `starting` before the schema
/// is loaded.
pub(super) fn commit(state: &HttpState, query: Option<&str>) -> Result<Commit, ApiError> {
    let strong = write_consistency(query)?.unwrap_or(state.config.feeds.synchronous_writes);
    if !strong {
        return Ok(Commit::AsConfigured);
    }
    let catalog = state.catalog()?;
    let capture = &catalog.capture;
    if capture.source != PostgresSource::Wal {
        return Err(ApiError::NotSynchronous(format!(
            "consistency=strong needs the wal source with the relay as a synchronous \
             standby; this deployment uses {} (its instances cannot tell Postgres what they \
             applied)",
            capture.source.as_str()
        )));
    }
    Ok(Commit::Synchronous {
        slot: capture.slot.clone(),
        heard_synchronous: state.coherence.relay_status().is_some_and(|r| r.sync),
    })
}
