//! `consistency=` on a write (PUT, DELETE, a transaction), with the names of Dapr's state
//! API; a write that does not say answers as `feeds.write_consistency` says (`default`
//! unless set; `feeds.synchronous_writes = true` is its older spelling of `strong`):
//!
//! - `strong`: the write returns only once every live instance has applied it, the
//!   guarantee a plain-SQL writer gets from the relay as a synchronous standby ("committed
//!   means evicted", ARCHITECTURE "Synchronous mode"). Its transaction commits with
//!   `synchronous_commit = on`, after Postgres said in the same transaction that the relay
//!   is a synchronous standby; else nothing is written and the client gets 503
//!   `not_synchronous` saying what to change. Only the `wal` source can give it: the
//!   `changes_log` and `notify` sources have no acknowledgement from the instances that
//!   Postgres could wait for.
//! - `default`: the write returns once Postgres committed it and Redis and this instance's
//!   L1 hold it; the other instances' L1 copies are evicted by the message that follows.
//! - `eventual`: the write returns once Postgres committed it and this instance will serve
//!   it (its L1 holds it, and no older Redis copy is served here meanwhile); Redis and the
//!   message follow behind the answer, one Redis round trip sooner
//!   ([`crate::tiers::Tiers::put`]). Any source.

use std::future::Future;
use std::time::Duration;

use tokio::sync::oneshot;

use super::error::ApiError;
use super::request::{write_consistency, WriteConsistency};
use super::state::HttpState;
use crate::config::PostgresSource;
use crate::db::Commit;

/// How a write commits, and when it answers.
#[derive(Clone, Debug, Default)]
pub(super) struct WriteMode {
    pub commit: Commit,
    /// `consistency=eventual`: answer before Redis is updated.
    pub eventual: bool,
}

/// How the write with this `query` commits and answers.
///
/// # Errors
/// 400 for a malformed query; 503 `not_synchronous` when the write asks for
/// `consistency=strong` on a source that cannot give it; 503 `starting` before the schema
/// is loaded.
pub(super) fn mode(state: &HttpState, query: Option<&str>) -> Result<WriteMode, ApiError> {
    let asked = write_consistency(query)?.unwrap_or(state.config.feeds.write_default());
    let strong = asked == WriteConsistency::Strong;
    let eventual = asked == WriteConsistency::Eventual;
    if !strong {
        return Ok(WriteMode {
            commit: Commit::AsConfigured,
            eventual,
        });
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
    Ok(WriteMode {
        commit: Commit::Synchronous {
            slot: capture.slot.clone(),
            heard_synchronous: state.coherence.relay_status().is_some_and(|r| r.sync),
        },
        eventual,
    })
}

/// Runs a write spawned on `state.writes`, so that a client hanging up (or the deadline)
/// cannot stop it between commit and cache updates and shutdown waits for it; answers with
/// its outcome once it is done or, with `eventual`, as soon as it sends one early (then the
/// write goes on behind the answer). At most `timeout`.
///
/// # Errors
/// 504 past `timeout`; 500 if the write's task panicked.
pub(super) async fn run_write<T, E, F>(
    state: &HttpState,
    eventual: bool,
    timeout: Duration,
    write: impl FnOnce(Option<oneshot::Sender<T>>) -> F,
) -> Result<Result<T, E>, ApiError>
where
    T: Send + 'static,
    E: Send + 'static,
    F: Future<Output = Result<T, E>> + Send + 'static,
{
    let (early, answered) = if eventual {
        let (tx, rx) = oneshot::channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let task = state.writes.spawn(write(early));
    let outcome = async move {
        if let Some(answered) = answered {
            if let Ok(outcome) = answered.await {
                return Ok(Ok(outcome));
            }
        }
        // Nothing sent early (not eventual, or the write did not commit): its own end.
        task.await.map_err(|e| ApiError::Internal(e.to_string()))
    };
    tokio::time::timeout(timeout, outcome)
        .await
        .map_err(|_| ApiError::Timeout(timeout))?
}
